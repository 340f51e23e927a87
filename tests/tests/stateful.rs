//! Stateful pods (issue 22), against the real stack: a volume the checkpoint does not carry (a
//! PersistentVolume) is recorded at the dump with the files the pod holds open on it, and a
//! restore checks it before it creates anything: the new pod mounts the same volume at the same
//! path, the held files are as the checkpoint saw them (size and modification time). Also the
//! kubelet path (a pod annotated with `podsnap.io/restore-from`) and the checkpoint of a pod
//! left running, whose volume moved on after it.

mod pod_checkpoint_support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use k8s_cri::v1 as cri;
use pod_checkpoint_support::*;
use podsnap_tests::kubelet::{
    create_container, remove_pod, run_container, run_pod, start_container, wait_answering, ContainerSpec,
    KubePod, PodOptions, APP_PORT,
};
use podsnap_tests::node::Node;
use podsnap_tests::{start_node, HANDLER};

const PV: &str = "pv-data";
const MOUNT: &str = "/data";
const WAL: &str = "db.wal";

/// Where a CSI driver's volume appears to kubelet (`.../pods/<uid>/volumes/kubernetes.io~csi/
/// <pv>/mount`), outside the node's kubelet directory: a PersistentVolume outlives the pods that
/// mount it, and removing the test's pods must not take it away.
fn csi_volume(node: &Node) -> PathBuf {
    let dir = node
        .dir()
        .join("csi/pods/volume-owner/volumes/kubernetes.io~csi")
        .join(PV)
        .join("mount");
    std::fs::create_dir_all(&dir).expect("mkdir the volume");
    std::fs::canonicalize(&dir).expect("the volume's path")
}

/// A database stand-in: appends `db tick N` to `/data/db.wal` (on the volume, if given) every
/// 20 ms through a descriptor it keeps open (O_APPEND).
fn db_spec(volume: Option<&Path>) -> ContainerSpec {
    let port = APP_PORT.to_string();
    // Without the volume, its log goes to the container's own /tmp.
    let wal = format!("{}/{WAL}", if volume.is_some() { MOUNT } else { "/tmp" });
    let spec = ContainerSpec::workload(
        "db",
        &[
            "serve",
            "--name",
            "db",
            "--port",
            &port,
            "--hold-file",
            &wal,
            "--interval-ms",
            "20",
        ],
    );
    match volume {
        Some(v) => spec.with_host_path(v, MOUNT, false),
        None => spec,
    }
}

fn ticks(wal: &Path) -> Vec<u64> {
    std::fs::read_to_string(wal)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("db tick ")?.parse().ok())
        .collect()
}

fn wait_ticks_above(wal: &Path, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks(wal).len() <= n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} ticks, waiting for more than {n}",
            ticks(wal).len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every line of the file is whole, each tick once, in order, none missing.
fn assert_whole(wal: &Path, what: &str) {
    let text = std::fs::read_to_string(wal).expect("the log");
    let ticks = ticks(wal);
    assert_eq!(
        ticks.len(),
        text.lines().count(),
        "{what}: a line that is not a tick: {text}"
    );
    for (i, t) in ticks.iter().enumerate() {
        assert_eq!(*t, i as u64 + 1, "{what}: line {} is tick {t}", i + 1);
    }
}

fn sandboxes(node: &Node) -> usize {
    node.cri()
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .expect("ListPodSandbox")
        .items
        .len()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("the manifest")).expect("json")
}

/// `podsnap inspect DIR`, as an operator reads it.
fn inspect_text(node: &Node, dir: &Path) -> String {
    let out = podsnap_tests::cli::podsnap(node, &podsnap_binary(), &["inspect", &dir.to_string_lossy()]);
    let (stdout, stderr) = podsnap_tests::cli::text(&out);
    assert!(out.status.success(), "podsnap inspect: {stdout}{stderr}");
    stdout
}

fn run_db(node: &Node, name: &str, volume: &Path) -> KubePod {
    let pod = run_pod(node, &PodOptions::new(name, HANDLER)).expect("the pod runs");
    run_container(node, &pod, &db_spec(Some(volume))).expect("the db runs");
    wait_answering(&pod.ip, APP_PORT, Duration::from_secs(20)).expect("the db answers");
    pod
}

/// A node whose restores may mount the "CSI" volumes again, and the db pod writing on one.
fn db_on_a_csi_volume() -> (Node, PathBuf, String, KubePod) {
    let node = start_node!();
    let volume = csi_volume(&node);
    node.set_podsnap_config(&format!(
        "[restore]\nhost_paths = [\"{}\"]\n",
        node.dir().join("csi").display()
    ))
    .expect("config");
    let name = node.unique("db");
    let pod = run_db(&node, &name, &volume);
    (node, volume, name, pod)
}

fn dump_db(node: &Node, name: &str, dir: &Path, stop: bool) {
    let mut request = dump_request(node, name, "default", Some(dir.to_path_buf()));
    request.stop = stop;
    block_on(podsnap_coordinator::dump::dump(
        &request,
        &podsnap_coordinator::progress::Lines,
    ))
    .expect("podsnap dump");
}

/// A restore that must be refused before it creates anything; returns the refusal.
fn refused(node: &Node, dir: &Path, what: &str) -> String {
    let (count, pods) = (sandboxes(node), names_in(&pods_dir(node)));
    let err = restore(node, &restore_request(node, dir))
        .map(|p| format!("restored as pod {}", p.id))
        .expect_err(what)
        .to_string();
    assert_eq!(sandboxes(node), count, "{what}: a refused restore created a pod");
    assert_eq!(
        names_in(&pods_dir(node)),
        pods,
        "{what}: a refused restore made a pod directory"
    );
    err
}

#[test]
fn a_persistent_volume_is_recorded_and_a_restore_over_a_changed_one_is_refused() {
    let (node, volume, name, pod) = db_on_a_csi_volume();
    let wal = volume.join(WAL);
    wait_ticks_above(&wal, 20, "before the dump");

    // Stopped at the snapshot: the manifest records the volume and the file held open on it.
    let dir = node.files().checkpoints().join("db");
    dump_db(&node, &name, &dir, true);
    let size = std::fs::metadata(&wal).expect("the log").len();
    let m = manifest(&dir);
    assert_eq!(m["after_dump"], "stopped", "{m}");
    let recorded = &m["persistent_volumes"][0];
    assert_eq!(recorded["plugin"], "csi", "{recorded}");
    assert_eq!(recorded["name"], PV, "{recorded}");
    assert_eq!(recorded["node_local"], false, "{recorded}");
    assert_eq!(recorded["mounts"][0]["container"], "db", "{recorded}");
    assert_eq!(recorded["mounts"][0]["path"], MOUNT, "{recorded}");
    let held = &recorded["held_files"][0];
    assert_eq!(held["path"], WAL, "{recorded}");
    assert_eq!(
        held["size"], size,
        "the file as the frozen pod left it: {recorded}"
    );
    let mtime = (
        held["mtime"][0].as_i64().expect("seconds"),
        held["mtime"][1].as_i64().expect("nanoseconds"),
    );
    let shown = inspect_text(&node, &dir);
    assert!(
        shown.contains("pod after    stopped at the snapshot (--stop)"),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("not carried  csi/{PV} (db:{MOUNT}; 1 file held open)")),
        "{shown}"
    );
    remove_pod(&node, &pod).expect("the original pod removed");

    // Written to behind the checkpoint's back: refused, the file and both sizes named.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&wal)
        .and_then(|mut f| f.write_all(b"intruder\n"))
        .expect("append");
    let err = refused(&node, &dir, "a restore over a volume that changed");
    assert!(err.contains(WAL) && err.contains(&format!("csi/{PV}")), "{err}");
    assert!(
        err.contains(&format!("{size} bytes at the checkpoint, {} now", size + 9)),
        "{err}"
    );

    // The same size again but a later modification time (a preallocated log segment): refused.
    let f = std::fs::OpenOptions::new().write(true).open(&wal).expect("open");
    f.set_len(size).expect("truncate");
    let err = refused(
        &node,
        &dir,
        "a restore over a file of the same size, modified since",
    );
    assert!(err.contains(WAL) && err.contains("modified at"), "{err}");
    assert!(
        !err.contains("bytes at the checkpoint"),
        "the size is the same: {err}"
    );

    // As the checkpoint saw it: a pod whose container lacks the volume is refused through
    // kubelet's path, naming the volume.
    f.set_modified(UNIX_EPOCH + Duration::new(mtime.0 as u64, mtime.1 as u32))
        .expect("the recorded mtime");
    drop(f);
    let mut options = PodOptions::new(&node.unique("nopv"), HANDLER);
    options
        .annotations
        .insert("podsnap.io/restore-from".to_owned(), "db".to_owned());
    let bare = run_pod(&node, &options).expect("the annotated sandbox");
    let id = create_container(&node, &bare, &db_spec(None)).expect("CreateContainer");
    let status = start_container(&node, &id).expect_err("a container without the volume must be refused");
    assert!(
        status.message().contains(&format!(
            "volume csi/{PV} is not mounted at {MOUNT} in container db"
        )),
        "{}",
        status.message()
    );
    node.cri()
        .remove_container(cri::RemoveContainerRequest { container_id: id })
        .expect("RemoveContainer");
    remove_pod(&node, &bare).expect("the refused pod removed");

    // The volume as it was: the restore goes on, the process appends where it stopped and the
    // file is whole.
    let at_dump = ticks(&wal).len();
    let restored = restore(&node, &restore_request(&node, &dir)).expect("restore over the unchanged volume");
    wait_answering(&restored.ip, APP_PORT, Duration::from_secs(20)).expect("the restored db answers");
    wait_ticks_above(&wal, at_dump + 20, "after the restore");
    assert_whole(&wal, "after the restore");
    assert!(
        ticks(&wal)[at_dump] == at_dump as u64 + 1,
        "the restored process went on from its last tick"
    );
}

#[test]
fn a_checkpoint_of_a_pod_left_running_is_refused_once_its_volume_moved_on() {
    let (node, volume, name, pod) = db_on_a_csi_volume();
    let wal = volume.join(WAL);
    wait_ticks_above(&wal, 10, "before the dump");
    let dir = node.files().checkpoints().join("running");
    dump_db(&node, &name, &dir, false);
    assert_eq!(manifest(&dir)["after_dump"], "left-running");
    let shown = inspect_text(&node, &dir);
    assert!(
        shown.contains(
            "pod after    left running (--leave-running): the volumes below may have moved on since"
        ),
        "{shown}"
    );
    // The pod writes on (as the PostgreSQL pod committed rows after its checkpoint).
    let at_dump = ticks(&wal).len();
    wait_ticks_above(&wal, at_dump + 10, "after the dump");
    remove_pod(&node, &pod).expect("the original pod removed");
    let err = refused(
        &node,
        &dir,
        "a restore of a pod left running whose volume moved on",
    );
    assert!(
        err.contains("the volume changed since the checkpoint") && err.contains(WAL),
        "{err}"
    );
}

/// `--keep-ip` on a node whose pod network does not allocate through podsnap-cni-ipam: refused
/// before anything is created, naming what the CNI configuration lacks; on kubelet's path (the
/// annotations) the container is refused, naming the address at the checkpoint and the one the
/// pod was given.
#[test]
fn keep_ip_that_cannot_keep_the_address_is_refused() {
    let mut options =
        podsnap_tests::node::NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    options.plain_ipam = true;
    let node = Node::start(options);
    let name = node.unique("keep");
    let pod = run_pod(&node, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    run_container(&node, &pod, &db_spec(None)).expect("the app runs");
    wait_answering(&pod.ip, APP_PORT, Duration::from_secs(20)).expect("the app answers");
    let dir = node.files().checkpoints().join("keep");
    dump_db(&node, &name, &dir, true);
    remove_pod(&node, &pod).expect("the stopped pod goes");

    let (count, pods) = (sandboxes(&node), names_in(&pods_dir(&node)));
    let mut request = restore_request(&node, &dir);
    request.keep_ip = true;
    let err = restore(&node, &request)
        .map(|p| format!("restored as pod {} with address {}", p.id, p.ip))
        .expect_err("--keep-ip without podsnap-cni-ipam")
        .to_string();
    assert!(
        err.contains("does not allocate addresses through podsnap-cni-ipam")
            && err.contains("ipam host-local"),
        "{err}"
    );
    assert_eq!(sandboxes(&node), count, "a refused restore created a pod");
    assert_eq!(
        names_in(&pods_dir(&node)),
        pods,
        "a refused restore made a pod directory"
    );

    let mut options = PodOptions::new(&node.unique("kept"), HANDLER);
    for (key, value) in [
        ("podsnap.io/restore-from", "keep"),
        ("podsnap.io/keep-ip", "true"),
    ] {
        options.annotations.insert(key.to_owned(), value.to_owned());
    }
    let annotated = run_pod(&node, &options).expect("the annotated sandbox");
    assert_ne!(
        annotated.ip, pod.ip,
        "host-local gave the new pod another address"
    );
    let id = create_container(&node, &annotated, &db_spec(None)).expect("CreateContainer");
    let status = start_container(&node, &id).expect_err("a pod that did not get its address back");
    let message = status.message();
    assert!(
        message.contains(&format!("address at the checkpoint ({})", pod.ip))
            && message.contains(&format!("given {}", annotated.ip)),
        "{message}"
    );
    node.cri()
        .remove_container(cri::RemoveContainerRequest { container_id: id })
        .expect("RemoveContainer");
}

/// A node-local volume carried in the checkpoint (`--volumes local`), from node A to node B,
/// from the checkpoint's directory and through a registry: first refused over the node's bound, the pod left running; then dumped
/// with the db stopped at the snapshot, the volume's content archived at that instant. On B the
/// local volume is another disk: a directory with other content refuses the restore before
/// anything is created; an empty one gets the content back, and the db goes on with its log
/// whole, from where it stopped.
#[test]
fn a_local_volume_is_carried_to_a_second_node_through_a_registry() {
    let workload =
        || podsnap_tests::node::NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    let (node_a, node_b) = Node::start_pair(workload(), workload());
    let registry = podsnap_tests::registry::Registry::start();
    let keys = tempfile::tempdir().expect("a key directory");
    let docker = keys.path().join("docker");
    std::fs::create_dir(&docker).expect("an empty docker configuration");
    let (signing, trusted) = podsnap_tests::registry::key_pair(keys.path(), "node");
    // The local PersistentVolume, as kubelet mounts it (both nodes run on this one machine: B's
    // "disk" is the same path, emptied once A's content is moved aside).
    let disks = tempfile::tempdir().expect("the nodes' local disks");
    let volume = disks
        .path()
        .join("pods/volume-owner/volumes/kubernetes.io~local-volume/pv-local/mount");
    std::fs::create_dir_all(volume.join("base")).expect("the local volume");
    let seed = b"rows committed before the pod started\n".repeat(64);
    std::fs::write(volume.join("base/seed"), &seed).expect("a file the db does not hold open");
    let config = |node: &Node, dump: &str| {
        node.set_podsnap_config(&format!(
            "[registry]\nallowed = [\"{}\"]\nsigning_key = \"{}\"\ntrusted_keys = [\"{}\"]\n\
             [restore]\nhost_paths = [\"{}\"]\n{dump}",
            registry.host(),
            signing.display(),
            trusted.display(),
            disks.path().display()
        ))
        .expect("the node's configuration");
        node.files().podsnap_config()
    };
    let binary = podsnap_binary();
    let podsnap = |node: &Node, config: &Path, args: &[&str]| {
        podsnap_tests::registry::podsnap_on(&binary, config, &docker, node, args)
    };
    let name = node_a.unique("local");
    let pod = run_db(&node_a, &name, &volume);
    let wal = volume.join(WAL);
    wait_ticks_above(&wal, 20, "before the dump");
    let reference = format!("{}/carried/{name}:v1", registry.host());
    let dump = [
        "dump",
        "--stop",
        "--volumes",
        "local",
        "--namespace",
        "default",
        "--pod",
        &name,
        "--push",
        &reference,
    ];

    // Over the bound: refused before anything is frozen, naming the volume; the db runs on.
    let bounded = config(&node_a, "[dump]\ncarry_volumes_max_bytes = 1024\n");
    let out = podsnap(&node_a, &bounded, &dump);
    let (stdout, stderr) = podsnap_tests::cli::text(&out);
    assert!(!out.status.success(), "a dump over the bound: {stdout}");
    assert!(
        stderr.contains("carry_volumes_max_bytes = 1024") && stderr.contains("local-volume/pv-local"),
        "{stderr}"
    );
    let n = ticks(&wal).len();
    wait_ticks_above(&wal, n + 10, "after the refused dump");

    // Carried: the summary says so, the manifest names the archive.
    let config_a = config(&node_a, "");
    let out = podsnap(&node_a, &config_a, &dump);
    let (stdout, stderr) = podsnap_tests::cli::text(&out);
    assert!(out.status.success(), "dump --volumes local: {stdout}{stderr}");
    assert!(
        stdout.contains(&format!("carried      local-volume/pv-local (db:{MOUNT}; ")),
        "{stdout}"
    );
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("checkpoint   "))
        .map(PathBuf::from)
        .expect("the checkpoint's directory");
    let m = manifest(&dir);
    assert_eq!(
        m["persistent_volumes"][0]["carried"], "volumes/carried~0.tar",
        "{m}"
    );
    assert_eq!(
        m["version"], 5,
        "a checkpoint that carries a volume is version 5: an older podsnap refuses it"
    );
    // Stopped at the snapshot: what the log holds now is what the checkpoint carries.
    let at_dump = std::fs::read(&wal).expect("the log at the snapshot");
    remove_pod(&node_a, &pod).expect("the original pod removed");
    let on_a = volume.with_file_name("mount-on-node-a");
    std::fs::rename(&volume, &on_a).expect("node A's disk moved aside");

    // B's local volume, the same PersistentVolume, holds something else: refused before
    // anything is created, the file held open named.
    std::fs::create_dir_all(&volume).expect("B's local volume");
    std::fs::write(volume.join("other"), b"not this pod's").expect("other content");
    let config_b = config(&node_b, "");
    let restore = podsnap_tests::registry::restore_args(&node_b, &["--from", &reference]);
    let restore: Vec<&str> = restore.iter().map(String::as_str).collect();
    let count = sandboxes(&node_b);
    let out = podsnap(&node_b, &config_b, &restore);
    let (stdout, stderr) = podsnap_tests::cli::text(&out);
    assert!(!out.status.success(), "a restore over other content: {stdout}");
    assert!(
        stderr.contains(&format!("{WAL} on local-volume/pv-local: gone"))
            && stderr.contains("an empty directory gets it back"),
        "{stderr}"
    );
    assert_eq!(sandboxes(&node_b), count, "the refused restore created a pod");

    // Empty: filled from the checkpoint, the db goes on; first from A's checkpoint directory
    // itself (brought into B's root for the restore), then through the registry.
    std::fs::remove_file(volume.join("other")).expect("emptied");
    let first = podsnap_tests::registry::restore_on(
        &binary,
        &config_b,
        &docker,
        &node_b,
        &["--checkpoint-dir", dir.to_str().expect("utf8")],
    );
    wait_answering(&first.ip, APP_PORT, Duration::from_secs(20)).expect("the db answers on B");
    assert_eq!(
        std::fs::read(volume.join("base/seed")).expect("the seed came back"),
        seed
    );
    node_b
        .cri()
        .stop_and_remove_pod(&first.id)
        .expect("the first restored pod removed");
    std::fs::remove_dir_all(&volume).expect("B's volume emptied again");
    std::fs::create_dir(&volume).expect("B's empty volume");
    let restored = podsnap_tests::registry::restore_from(&binary, &config_b, &docker, &node_b, &reference);
    wait_answering(&restored.ip, APP_PORT, Duration::from_secs(20)).expect("the restored db answers");
    assert_eq!(
        std::fs::read(volume.join("base/seed")).expect("the seed came back"),
        seed
    );
    let n = String::from_utf8_lossy(&at_dump)
        .lines()
        .filter(|l| l.starts_with("db tick "))
        .count();
    wait_ticks_above(&wal, n + 20, "after the restore on node B");
    assert_whole(&wal, "after the restore on node B");
    let now = std::fs::read(&wal).expect("the log");
    assert_eq!(
        &now[..at_dump.len()],
        &at_dump[..],
        "the log on B starts as it was at the snapshot"
    );
    assert_eq!(
        ticks(&wal)[n],
        n as u64 + 1,
        "the restored process went on from its last tick"
    );
}
