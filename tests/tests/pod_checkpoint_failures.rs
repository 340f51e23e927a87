//! Pod checkpoint failures and bad input against the real stack: a dump CRIU refuses in one
//! container leaves the whole pod running and thawed and writes nothing; a second dump of a pod
//! being dumped is refused as busy; damaged checkpoints, missing images and restore annotations
//! that leave the checkpoint root are refused before anything is created; a restore failing
//! half-way removes what it made.

mod pod_checkpoint_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1 as cri;
use pod_checkpoint_support::*;
use podsnap_tests::kubelet::{
    ask, run_container, run_pod, run_three_container_pod, wait_answering, ContainerSpec, PodOptions,
    APP_PORT, DATA_MOUNT, DATA_VOLUME, SIDECAR_PORT,
};
use podsnap_tests::node::Node;
use podsnap_tests::{host, start_node, HANDLER};

fn count(ip: &str, port: u16) -> u64 {
    ask(ip, port, "count").expect("count").parse().expect("a number")
}

/// `freezer.state` of every cgroup of pod `uid` (the pod's and each container's).
fn freezer_states(uid: &str) -> Vec<(PathBuf, String)> {
    let mut states = Vec::new();
    for pod in host::pod_cgroup_dirs(uid)
        .into_iter()
        .filter(|d| d.starts_with("/sys/fs/cgroup/freezer"))
    {
        let mut dirs = vec![pod];
        while let Some(dir) = dirs.pop() {
            if let Ok(state) = std::fs::read_to_string(dir.join("freezer.state")) {
                states.push((dir.clone(), state.trim().to_owned()));
            }
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
    }
    states
}

/// A container CRIU refuses to dump without a flag: it holds a deleted 3 MiB file open, larger
/// than CRIU's default ghost-file limit (1 MiB).
fn ghost_container() -> ContainerSpec {
    ContainerSpec::workload(
        "ghost",
        &[
            "-c",
            "dd if=/dev/zero of=/tmp/ghost bs=1M count=3 2>/dev/null && exec 3</tmp/ghost && rm /tmp/ghost \
             && touch /tmp/ready && exec sleep 100000",
        ],
    )
    .with_command(&["/bin/sh"])
}

#[test]
fn a_failed_dump_leaves_the_pod_running_and_writes_nothing() {
    let node = start_node!();
    let name = node.unique("ghostly");
    let pod = run_pod(&node, &PodOptions::new(&name, HANDLER)).expect("RunPodSandbox");
    pod.empty_dir(DATA_VOLUME).expect("the emptyDir");
    let sidecar = ContainerSpec::workload(
        "sidecar",
        &[
            "serve", "--name", "sidecar", "--port", "9090", "--volume", DATA_MOUNT,
        ],
    )
    .with_empty_dir(DATA_VOLUME, DATA_MOUNT);
    let app = ContainerSpec::workload(
        "app",
        &["serve", "--name", "app", "--port", "8080", "--volume", DATA_MOUNT],
    )
    .with_empty_dir(DATA_VOLUME, DATA_MOUNT);
    let mut ids = Vec::new();
    for spec in [&sidecar, &ghost_container(), &app] {
        ids.push(run_container(&node, &pod, spec).expect("container runs"));
    }
    for port in [SIDECAR_PORT, APP_PORT] {
        wait_answering(&pod.ip, port, Duration::from_secs(30)).expect("serving");
    }
    // The ghost container has its deleted file open once /tmp/ready exists.
    let ready = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        node.cri()
            .exec(&ids[1], &["test", "-e", "/tmp/ready"], 10)
            .is_ok_and(|r| r.exit_code == 0)
    });
    assert!(ready, "the ghost container got ready");

    let root = node.files().checkpoints();
    let request = dump_request(&node, &name, "default", None);
    let err = block_on(podsnap_coordinator::dump::dump(
        &request,
        &podsnap_coordinator::progress::Lines,
    ))
    .expect_err("CRIU refuses the ghost container");
    let message = format!("{err}");
    eprintln!("dump error: {message}");
    assert!(
        message.contains("ghost"),
        "the error names the container: {message}"
    );
    assert!(
        message.contains("CRIU log"),
        "the error quotes CRIU's log: {message}"
    );
    assert!(
        message.contains("Can't dump ghost file"),
        "CRIU's cause is quoted: {message}"
    );

    assert!(
        names_in(&root).is_empty(),
        "no checkpoint left: {:?}",
        names_in(&root)
    );
    let states = freezer_states(&pod.uid);
    assert!(states.len() >= 4, "the pod's freezer cgroups: {states:?}");
    for (dir, state) in &states {
        assert_eq!(state, "THAWED", "{}", dir.display());
    }
    for (spec, id) in [&sidecar.name, "ghost", &app.name].iter().zip(&ids) {
        let status = node.cri().container(id).expect("ContainerStatus");
        assert_eq!(
            status.state,
            cri::ContainerState::ContainerRunning as i32,
            "{spec} still runs"
        );
    }
    let (s0, a0) = (count(&pod.ip, SIDECAR_PORT), count(&pod.ip, APP_PORT));
    for (port, before) in [(SIDECAR_PORT, s0), (APP_PORT, a0)] {
        podsnap_tests::kubelet::wait_count_above(&pod.ip, port, before, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("counters advance after the failed dump: {e:#}"));
    }
}

#[test]
fn a_second_dump_of_a_pod_being_dumped_is_busy() {
    let node = start_node!();
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("busy"), HANDLER))
        .expect("the pod runs");
    // A large volume makes the dump last a few seconds.
    std::fs::write(pod.volume.join("ballast"), vec![7u8; 256 * 1024 * 1024]).expect("ballast");
    let root = node.files().checkpoints();
    let dirs = [root.join("first"), root.join("second")];
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .iter()
            .map(|dir| {
                let request = dump_request(&node, &pod.pod.name, "default", Some(dir.clone()));
                scope.spawn(move || {
                    block_on(podsnap_coordinator::dump::dump(
                        &request,
                        &podsnap_coordinator::progress::Quiet,
                    ))
                    .map(|o| o.summary.dir)
                    .map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a dump thread"))
            .collect()
    });
    eprintln!("{results:#?}");
    let ok: Vec<&PathBuf> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let busy: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!((ok.len(), busy.len()), (1, 1), "{results:?}");
    assert!(busy[0].contains("busy"), "{}", busy[0]);
    let written: Vec<String> = names_in(&root);
    assert_eq!(written.len(), 1, "only the first dump wrote: {written:?}");
    assert!(ok[0].join("manifest.json").is_file());
    assert!(count(&pod.pod.ip, APP_PORT) > 0, "the pod still answers");
}

/// Copies a directory tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let target = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

/// Edits a checkpoint's manifest.json.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read manifest")).expect("manifest JSON");
    edit(&mut manifest);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).expect("JSON")).expect("write manifest");
}

/// Records `rel`'s current size and digest in the manifest (a consistent but altered checkpoint).
fn redigest(dir: &Path, rel: &str) {
    podsnap_tests::checkpoint::redigest(dir, rel);
}

/// The largest file under `dir`, relative to `root`.
fn largest_file(root: &Path, dir: &str) -> String {
    std::fs::read_dir(root.join(dir))
        .expect("read_dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .map(|e| format!("{dir}/{}", e.file_name().to_string_lossy()))
        .expect("a file")
}

/// What a restore must not leave behind: sandboxes, pod and log directories, checkpoint
/// copies, pod cgroups.
#[derive(Debug, PartialEq, Eq)]
struct NodeState {
    sandboxes: Vec<String>,
    pods: Vec<String>,
    logs: Vec<String>,
    checkpoints: Vec<String>,
    pod_cgroups: BTreeSet<String>,
}

fn node_state(node: &Node) -> NodeState {
    NodeState {
        sandboxes: sandbox_ids(node),
        pods: names_in(&pods_dir(node)),
        logs: names_in(&logs_dir(node)),
        checkpoints: names_in(&node.files().checkpoints()),
        pod_cgroups: ["freezer", "memory", "cpu,cpuacct", "pids"]
            .iter()
            .flat_map(|h| names_in(&Path::new("/sys/fs/cgroup").join(h).join("kubepods/besteffort")))
            .filter(|n| n.starts_with("pod"))
            .collect(),
    }
}

/// A good checkpoint of the three-container pod in the root, under `name`.
fn good_checkpoint(node: &Node, name: &str) -> PathBuf {
    let pod = run_three_container_pod(node, &PodOptions::new(&node.unique("source"), HANDLER))
        .expect("the pod runs");
    mark_and_count(&pod);
    let dir = node.files().checkpoints().join(name);
    dump(node, &pod, Some(dir.clone())).expect("podsnap dump");
    dir
}

#[test]
fn bad_checkpoints_and_names_are_refused_before_anything_is_created() {
    let node = start_node!();
    let good = good_checkpoint(&node, "good");
    let outside = node.dir().join("outside");
    let state = node_state(&node);

    let flipped = outside.join("flipped");
    copy_tree(&good, &flipped);
    let victim = largest_file(&flipped, "containers/app/checkpoint");
    let mut bytes = std::fs::read(flipped.join(&victim)).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(flipped.join(&victim), bytes).expect("write");

    let missing = outside.join("missing");
    copy_tree(&good, &missing);
    let gone = largest_file(&missing, "containers/sidecar/checkpoint");
    std::fs::remove_file(missing.join(&gone)).expect("rm");

    let future = outside.join("future");
    copy_tree(&good, &future);
    // Past any version this podsnap knows (it writes 4, or 5 when volumes are carried or, as
    // here, the containers' CRIU ran in the pod's network namespace, and reads up to 5): a
    // checkpoint of a newer podsnap.
    let written = podsnap_tests::checkpoint::read_manifest(&good)
        .expect("the manifest")
        .version;
    assert_eq!(
        written, 5,
        "a checkpoint whose containers' CRIU ran in the pod's network namespace is version 5"
    );
    let newer = written + 1;
    edit_manifest(&future, |m| m["version"] = serde_json::json!(newer));
    let newer_refused = format!("format version {newer} is not supported");

    let no_image = outside.join("no-image");
    copy_tree(&good, &no_image);
    let spec_rel = "containers/app/spec.dump";
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(no_image.join(spec_rel)).expect("read")).expect("JSON");
    spec["annotations"]["io.kubernetes.cri.image-name"] = serde_json::json!("localhost/podsnap/missing:1");
    std::fs::write(no_image.join(spec_rel), serde_json::to_vec(&spec).expect("JSON")).expect("write");
    redigest(&no_image, spec_rel);

    let unlisted = outside.join("unlisted");
    copy_tree(&good, &unlisted);
    std::fs::write(unlisted.join("containers/app/checkpoint/extra.img"), b"x").expect("write");

    // The CLI checks structure, policy and images up front; the digests are verified once per
    // restore, by the shim when the sandbox is created, and the CLI then removes what it made.
    for (dir, expected, up_front) in [
        (&flipped, "is damaged", false),
        (&missing, gone.as_str(), true),
        (&future, newer_refused.as_str(), true),
        (&no_image, "localhost/podsnap/missing:1", true),
        (
            &unlisted,
            "containers/app/checkpoint/extra.img is not listed",
            true,
        ),
    ] {
        let err = restore(&node, &restore_request(&node, dir))
            .map(|p| p.id)
            .expect_err("a bad checkpoint is refused");
        let message = err.to_string();
        eprintln!("{}: {message}", dir.display());
        assert!(message.contains(expected), "{}: {message}", dir.display());
        if up_front {
            assert!(
                !message.contains("removed:"),
                "refused before creating anything: {message}"
            );
        } else {
            assert!(
                message.contains("RunPodSandbox") && !message.contains("NOT removed"),
                "refused by the shim before any container, and rolled back: {message}"
            );
        }
        assert_eq!(node_state(&node), state, "{}: nothing left", dir.display());
    }

    // The kubelet path: the shim checks the checkpoint at the sandbox's creation; names that
    // leave the root are refused.
    copy_tree(&flipped, &node.files().checkpoints().join("flipped"));
    let before = sandbox_ids(&node);
    for (name, expected) in [
        ("flipped", "is damaged"),
        ("../outside/flipped", "is refused"),
        ("/etc", "is refused"),
        (good.to_str().expect("utf-8"), "is refused"),
    ] {
        let mut options = PodOptions::new(&node.unique("annotated"), HANDLER);
        options
            .annotations
            .insert("podsnap.io/restore-from".to_owned(), name.to_owned());
        let err = run_pod(&node, &options).expect_err("RunPodSandbox refuses the checkpoint");
        let message = format!("{err:#}");
        eprintln!("restore-from {name:?}: {message}");
        assert!(message.contains(expected), "{name}: {message}");
        assert_eq!(sandbox_ids(&node), before, "{name}: no sandbox left");
    }
}

/// Whether a seal holds for the checkpoint at `dir`, as `podsnap inspect -o json` reads it
/// (before it checks any digest; inspect never seals).
fn sealed(node: &Node, dir: &Path) -> bool {
    let (inspected, _) = podsnap_tests::cli::inspect_json(node, podsnap_bin(), dir);
    inspected["sealed"]
        .as_bool()
        .expect("inspect says whether it is sealed")
}

/// A checkpoint the dump sealed (its digests just computed: a restore does not hash it again)
/// and then damaged in place, one byte of a CRIU image flipped, its size the same: the seal
/// no longer holds, every digest is read, and the restore is refused before any container.
#[test]
fn a_sealed_checkpoint_damaged_in_place_is_refused() {
    let node = start_node!();
    let dir = good_checkpoint(&node, "sealed");
    assert!(sealed(&node, &dir), "the dump sealed its checkpoint");
    let state = node_state(&node);

    let victim = dir.join(largest_file(&dir, "containers/app/checkpoint"));
    let mut bytes = std::fs::read(&victim).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&victim, &bytes).expect("write in place");
    assert!(!sealed(&node, &dir), "a write breaks the seal");
    let message = restore(&node, &restore_request(&node, &dir))
        .map(|p| p.id)
        .expect_err("a damaged checkpoint is refused")
        .to_string();
    assert!(message.contains("is damaged"), "{message}");
    assert!(
        message.contains("RunPodSandbox") && !message.contains("NOT removed"),
        "refused by the shim before any container, and rolled back: {message}"
    );
    assert_eq!(node_state(&node), state, "nothing left");
    assert!(!sealed(&node, &dir), "a refused checkpoint is not sealed");

    // Repaired in place: verified in full, restored, and sealed again.
    bytes[middle] ^= 0x01;
    std::fs::write(&victim, &bytes).expect("write in place");
    let pod = restore(&node, &restore_request(&node, &dir)).expect("the repaired checkpoint restores");
    assert!(sealed(&node, &dir), "sealed by the restore's verification");
    let before = node.log_tail(400);
    assert!(
        before.contains("digests Hashed"),
        "the shim read every digest of the repaired checkpoint"
    );
    drop(pod);
}

#[test]
fn a_restore_failing_half_way_removes_what_it_made() {
    let node = start_node!();
    let good = good_checkpoint(&node, "good");
    // Consistent digests, but the app's CRIU images lack a file: the shim accepts the
    // checkpoint, the sidecar is restored, then the app's restore fails at StartContainer.
    let broken = node.dir().join("outside/broken");
    copy_tree(&good, &broken);
    let core = names_in(&broken.join("containers/app/checkpoint"))
        .into_iter()
        .find(|n| n.starts_with("core-"))
        .expect("a CRIU core image");
    let rel = format!("containers/app/checkpoint/{core}");
    std::fs::remove_file(broken.join(&rel)).expect("rm");
    edit_manifest(&broken, |m| {
        m["files"].as_object_mut().expect("files").remove(&rel);
    });
    let state = node_state(&node);

    let err = restore(&node, &restore_request(&node, &broken))
        .map(|p| p.id)
        .expect_err("the app's restore fails");
    let message = err.to_string();
    eprintln!("{message}");
    assert!(message.contains("StartContainer app"), "{message}");
    assert!(message.contains("removed: pod sandbox"), "{message}");
    assert!(!message.contains("NOT removed"), "{message}");
    assert_eq!(node_state(&node), state, "everything made was removed");
}
