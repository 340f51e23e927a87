//! Pod checkpoint and restore against the real stack: the three-container pod (init, sidecar,
//! app sharing an emptyDir) dumped and brought back as a new pod, three ways:
//! `podsnap dump` + `podsnap restore`; `ctr task checkpoint` on the sandbox task (a checkpoint
//! image in containerd's content store) + `podsnap restore`; and kubelet's own CRI calls on a pod
//! carrying `podsnap.io/restore-from`.

mod pod_checkpoint_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use pod_checkpoint_support::*;
use podsnap_tests::ctr::CRI_NAMESPACE;
use podsnap_tests::kubelet::{
    create_container, run_pod, run_three_container_pod, start_container, PodOptions, APP_PORT, DATA_VOLUME,
};
use podsnap_tests::{paths, start_node, HANDLER};

fn volume_of(node: &podsnap_tests::node::Node, uid: &str) -> PathBuf {
    pods_dir(node)
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(DATA_VOLUME)
}

fn id_of<'a>(containers: &'a [(String, String)], name: &str) -> &'a str {
    containers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, id)| id.as_str())
        .unwrap_or_else(|| panic!("no restored container {name} in {containers:?}"))
}

#[test]
fn podsnap_dump_and_restore_bring_the_pod_back() {
    let node = start_node!();
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("webapp"), HANDLER))
        .expect("the three-container pod runs");
    let before = mark_and_count(&pod);

    // The dump makes CRIU's kernel feature cache again (shared by the host's CRIU runs: one
    // removed meanwhile only makes them probe the kernel).
    for f in [paths::KDAT_CACHE, paths::KDAT_RECORD] {
        let _ = std::fs::remove_file(std::path::Path::new(paths::KDAT_RUN_DIR).join(f));
    }
    let app_created = node
        .cri()
        .container(&pod.app_id)
        .expect("the app's status")
        .created_at;
    let outcome = dump(&node, &pod, None).expect("podsnap dump");
    let dumped = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock")
        .as_secs() as i64;
    let summary = &outcome.summary;
    eprintln!("{summary}");
    assert!(
        summary.dir.starts_with(node.files().checkpoints()),
        "the default destination is in the root: {}",
        summary.dir.display()
    );
    assert_eq!(summary.dumped, ["sidecar", "app"]);
    assert_eq!(summary.volumes, [DATA_VOLUME]);
    assert!(
        summary.frozen > Duration::ZERO && summary.bytes > 0,
        "{summary:?}"
    );
    assert!(summary.restore_name.is_some());
    let created = app_created / 1_000_000_000..=dumped;
    kep_2008_archive_is_read_by_checkpointctl(&summary.dir, "app", &pod.app_id, created);
    criu_kernel_cache_is_this_boots();
    criu_ran_in_the_pod_netns(&summary.dir.join("containers/app/checkpoint"));
    // Images without a network namespace: a restore older than format version 5 would bring
    // the processes back in the host's network; it refuses the version instead.
    let version = podsnap_tests::checkpoint::read_manifest(&summary.dir)
        .expect("the manifest")
        .version;
    assert_eq!(
        version, 5,
        "the version of a checkpoint whose CRIU ran in the pod's netns"
    );
    let masked = masked_dirs_are_external(&node, &pod.app_id, &summary.dir.join("containers/app/checkpoint"));
    // cgroup v1 (this node): the app's /sys/fs/cgroup tmpfs was external to its CRIU too, and
    // the options record what it holds.
    let cgroup_tmpfs = cgroup_tmpfs_of(&node, &pod.app_id);
    let images = summary.dir.join("containers/app/checkpoint");
    let options: serde_json::Value =
        serde_json::from_slice(&std::fs::read(images.join("podsnap-criu.json")).expect("options"))
            .expect("json");
    assert_eq!(
        options["cgroup_tmpfs"].as_array().map(Vec::len),
        Some(cgroup_tmpfs.1.len()),
        "{options}"
    );
    let log = std::fs::read_to_string(images.join("dump.log")).expect("CRIU's log");
    assert!(
        log.contains("Found podsnap-cgroup-tmpfs mapping for ./sys/fs/cgroup mountpoint"),
        "/sys/fs/cgroup was not external to CRIU"
    );

    // --leave-running (the default): the pod goes on.
    let after_dump = ask_count(&pod.pod.ip, APP_PORT);
    podsnap_tests::kubelet::wait_count_above(&pod.pod.ip, APP_PORT, after_dump, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the dumped pod keeps running: {e:#}"));

    remove_original(&node, &pod);
    let restored = restore(&node, &restore_request(&node, &summary.dir)).expect("podsnap restore");
    let names: Vec<&str> = restored.containers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["sidecar", "app"], "restored in start order");
    let log = node.log_tail(2000);
    // `[dump] digests = "auto"`: the page images were hashed as CRIU closed them only if the
    // shim had a core to spare beside the two containers' CRIU runs, else all after the thaw.
    let early = node.log_grep("digested as CRIU closed them");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if podsnap_coordinator::DigestTiming::Auto.early(2, cpus) {
        assert!(
            early.iter().any(|l| !l.contains(": 0 of ")),
            "{cpus} CPUs for 2 dumps, no page image digested early: {early:?}"
        );
    } else {
        assert!(
            !early.is_empty() && early.iter().all(|l| l.contains(": 0 of ")),
            "{cpus} CPUs for 2 dumps: page images digested while frozen: {early:?}"
        );
    }
    assert!(
        log.contains(&format!(
            "checkpoint {}: digests Sealed",
            summary.restore_name.as_deref().unwrap_or_default()
        )),
        "the checkpoint the dump sealed is not hashed again"
    );
    assert!(
        restored.imported.is_none(),
        "a checkpoint in the root is used in place"
    );
    assert_eq!(
        Some(restored.checkpoint.as_str()),
        summary.restore_name.as_deref()
    );
    for (name, id) in &restored.containers {
        let status = node.cri().container(id).expect("ContainerStatus");
        assert_eq!(
            status.state,
            cri::ContainerState::ContainerRunning as i32,
            "{name} runs"
        );
    }
    check_restored(
        &node,
        &restored.ip,
        &pod.pod.ip,
        &volume_of(&node, &restored.uid),
        id_of(&restored.containers, "app"),
        before,
    );
    masked_dirs_came_back(&node, id_of(&restored.containers, "app"), &masked);
    assert_eq!(
        cgroup_tmpfs_of(&node, id_of(&restored.containers, "app")),
        cgroup_tmpfs,
        "the restored app's /sys/fs/cgroup"
    );
    // The completed init container is recorded (exit 0), not dumped, and not run again: the
    // new pod lists it as exited 0, and a checkpoint of the new pod records it again.
    assert_eq!(summary.recorded, [("init".to_owned(), Some(0))]);
    assert_eq!(restored.not_rerun, ["init"]);
    let init = node
        .cri()
        .container(id_of(&restored.completed, "init"))
        .expect("init status");
    assert_eq!(
        (init.state, init.exit_code),
        (cri::ContainerState::ContainerExited as i32, 0)
    );
    let request = dump_request(&node, &restored.name, &restored.namespace, None);
    let again = block_on(podsnap_coordinator::dump::dump(
        &request,
        &podsnap_coordinator::progress::Quiet,
    ))
    .expect("a checkpoint of the restored pod");
    assert_eq!(again.summary.dumped, ["sidecar", "app"]);
    assert_eq!(again.summary.recorded, [("init".to_owned(), Some(0))]);
}

/// The app's CRIU ran in the pod's network namespace, locked by podsnap: its images hold no
/// network namespace (no walk of it, nor of its conntrack tables, while the pod was frozen),
/// and the options its restore reads say so (the restore, checked by `check_restored`, brings
/// the listeners back in the new pod's namespace).
fn criu_ran_in_the_pod_netns(images: &std::path::Path) {
    let options = std::fs::read_to_string(images.join("podsnap-criu.json")).expect("the dump's CRIU options");
    let options: serde_json::Value = serde_json::from_str(&options).expect("json");
    assert_eq!(options["criu_in_netns"], serde_json::json!(true), "{options}");
    let netns: Vec<String> = std::fs::read_dir(images)
        .expect("the images")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("netns-"))
        .collect();
    assert!(netns.is_empty(), "CRIU recorded a network namespace: {netns:?}");
    let log = std::fs::read_to_string(images.join("dump.log")).expect("CRIU's log");
    assert!(
        !log.contains("Dump NET namespace info") && !log.contains("Running network-lock scripts"),
        "CRIU walked or locked the pod's network namespace"
    );
}

/// The pid of container `id` and its mount table (`/proc/<pid>/mountinfo`).
fn mountinfo_of(node: &podsnap_tests::node::Node, id: &str) -> (i32, String) {
    let pid = node
        .cri()
        .container_pid(id)
        .expect("ContainerStatus")
        .expect("the app's pid");
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    (pid, info)
}

/// The app's `/sys/fs/cgroup` (cgroup v1: a tmpfs holding a directory per hierarchy, each
/// mounted, and links): its mount options and entries, the hierarchies mounted on it.
fn cgroup_tmpfs_of(node: &podsnap_tests::node::Node, id: &str) -> (String, Vec<String>) {
    let (pid, info) = mountinfo_of(node, id);
    let options = info
        .lines()
        .filter_map(|l| {
            let (mount, fs) = l.split_once(" - ")?;
            let f: Vec<&str> = mount.split(' ').collect();
            (f.get(4) == Some(&"/sys/fs/cgroup") && fs.starts_with("tmpfs ")).then(|| f[5].to_owned())
        })
        .next_back()
        .expect("a tmpfs on /sys/fs/cgroup");
    let dir = format!("/proc/{pid}/root/sys/fs/cgroup");
    let mut entries: Vec<String> = std::fs::read_dir(&dir)
        .expect("/sys/fs/cgroup")
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            match std::fs::read_link(e.path()) {
                Ok(to) => format!("{name} -> {}", to.display()),
                Err(_) => name,
            }
        })
        .collect();
    entries.sort();
    let memory = format!("{dir}/memory/memory.limit_in_bytes");
    assert!(
        std::path::Path::new(&memory).exists(),
        "{memory}: the hierarchy is mounted"
    );
    (options, entries)
}

/// The masked directories of the app (its spec's maskedPaths that runc covered with an empty
/// read-only tmpfs) as they are in the running app: (mount point, mount options).
fn masked_tmpfs_of(node: &podsnap_tests::node::Node, id: &str) -> Vec<(String, String)> {
    let (_, info) = mountinfo_of(node, id);
    let mut masked: Vec<(String, String)> = info
        .lines()
        .filter_map(|l| {
            let (mount, fs) = l.split_once(" - ")?;
            let f: Vec<&str> = mount.split(' ').collect();
            let point = (*f.get(4)?).to_owned();
            let is_masked = [
                "/proc/acpi",
                "/proc/scsi",
                "/sys/firmware",
                "/sys/devices/virtual/powercap",
            ]
            .contains(&point.as_str());
            let options = (*f.get(5)?).to_owned();
            (is_masked && fs.starts_with("tmpfs ")).then_some((point, options))
        })
        .collect();
    masked.sort();
    masked
}

/// The app's masked directories are read-only tmpfs mounts that its CRIU was told are
/// external: no archive of them in the images, only the mount points (CRIU's `Found
/// podsnap-masked mapping for ./proc/acpi mountpoint`). Returns them as they were.
fn masked_dirs_are_external(
    node: &podsnap_tests::node::Node,
    id: &str,
    images: &std::path::Path,
) -> Vec<(String, String)> {
    let masked = masked_tmpfs_of(node, id);
    assert!(!masked.is_empty(), "the app has no masked tmpfs to check");
    assert!(
        masked.iter().all(|(_, o)| o.split(',').any(|o| o == "ro")),
        "{masked:?}"
    );
    let options = std::fs::read_to_string(images.join("podsnap-criu.json")).expect("the dump's CRIU options");
    let options: serde_json::Value = serde_json::from_str(&options).expect("json");
    assert_eq!(
        options["masked_tmpfs_external"],
        serde_json::json!(true),
        "{options}"
    );
    let log = std::fs::read_to_string(images.join("dump.log")).expect("CRIU's log");
    for (point, _) in &masked {
        assert!(
            log.contains(&format!("Found podsnap-masked mapping for .{point} mountpoint")),
            "{point} was not external to CRIU"
        );
    }
    masked
}

/// The restored app has the same masked directories: read-only, empty tmpfs mounts (restored
/// from the tmpfs the restore made, not from the images).
fn masked_dirs_came_back(node: &podsnap_tests::node::Node, id: &str, before: &[(String, String)]) {
    assert_eq!(
        masked_tmpfs_of(node, id),
        before,
        "the restored app's masked directories"
    );
    let pid = node
        .cri()
        .container_pid(id)
        .expect("ContainerStatus")
        .expect("the restored app's pid");
    for (point, _) in before {
        let dir = format!("/proc/{pid}/root{point}");
        let entries = std::fs::read_dir(&dir).expect("a masked directory").count();
        assert_eq!(entries, 0, "{dir} is empty");
        let probe = format!("{dir}/podsnap-probe");
        assert!(std::fs::write(&probe, b"x").is_err(), "{dir} is read-only");
    }
}

/// A container part of the pod checkpoint, tarred as it is, is a KEP-2008 container checkpoint
/// archive: `checkpointctl show` names the container, its image and id, and its creation time
/// (within `created`, seconds since the epoch); `inspect --ps-tree` reads the process tree from
/// the CRIU images.
fn kep_2008_archive_is_read_by_checkpointctl(
    checkpoint: &std::path::Path,
    name: &str,
    id: &str,
    created: std::ops::RangeInclusive<i64>,
) {
    let t = tempfile::tempdir().expect("tempdir");
    let archive = t.path().join(format!("{name}.tar"));
    let part = checkpoint.join("containers").join(name);
    let status = Command::new("tar")
        .arg("-C")
        .arg(&part)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .expect("tar");
    assert!(status.success(), "tar of {}", part.display());
    let checkpointctl = |args: &[&str]| {
        let out = Command::new("checkpointctl")
            .args(args)
            .arg(&archive)
            .output()
            .expect("checkpointctl (packaging/install-deps.sh installs it)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "checkpointctl {args:?}: {text}");
        text
    };
    let shown = checkpointctl(&["show"]);
    let row = shown
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{shown}"));
    for want in [
        podsnap_tests::WORKLOAD_IMAGE,
        &id[..12],
        "io.containerd.podsnap.v1",
        "containerd",
    ] {
        assert!(row.contains(want), "{want:?} missing in {row:?}\n{shown}");
    }
    // CONTAINER IMAGE ID RUNTIME CREATED ENGINE ...: the time the container was created.
    let shown_created = row.split_whitespace().nth(4).unwrap_or_default();
    let secs = utc_seconds(shown_created)
        .unwrap_or_else(|| panic!("CREATED {shown_created:?} is not a UTC time in:\n{shown}"));
    assert!(
        created.contains(&secs),
        "CREATED {shown_created} ({secs}) is not the container's creation time (between {} and {}):\n{shown}",
        created.start(),
        created.end()
    );
    let tree = checkpointctl(&["inspect", "--ps-tree"]);
    assert!(tree.contains("podsnap-workloa"), "the app's process in:\n{tree}");
}

/// Seconds since the epoch of an RFC 3339 UTC time as checkpointctl shows it
/// (`2026-12-07T09:00:00Z`).
fn utc_seconds(shown: &str) -> Option<i64> {
    let (date, clock) = shown.strip_suffix('Z')?.split_once('T')?;
    let number = |s: Option<&str>| s?.parse::<i64>().ok();
    let mut d = date.splitn(3, '-');
    let (y, m, day) = (number(d.next())?, number(d.next())?, number(d.next())?);
    let mut c = clock.splitn(3, ':');
    let (h, min, s) = (number(c.next())?, number(c.next())?, number(c.next())?);
    // Days from 1970-01-01 of a proleptic Gregorian date (years counted from March).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(days * 86_400 + h * 3600 + min * 60 + s)
}

#[test]
fn checkpointctl_times_read_as_seconds_since_the_epoch() {
    assert_eq!(utc_seconds("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(utc_seconds("2026-12-07T09:00:00Z"), Some(1_796_634_000));
    assert_eq!(utc_seconds("2024-02-29T23:59:59Z"), Some(1_709_251_199));
    assert!(utc_seconds("0001-01-01T00:00:00Z").is_some_and(|s| s < 0));
    assert_eq!(utc_seconds("2026-12-07 09:00:00"), None);
}

/// After a dump (which started with no cache), CRIU's kernel feature cache is there: on a
/// node whose `/run` is a tmpfs CRIU wrote it itself and podsnap recorded nothing; elsewhere
/// (these machines) podsnap made it, for this boot and this kernel (see
/// docs/node-notes.md).
fn criu_kernel_cache_is_this_boots() {
    use paths::{KDAT_CACHE as CACHE, KDAT_RECORD as RECORD, KDAT_RUN_DIR as RUN_DIR};
    let run = std::path::Path::new(RUN_DIR);
    if nix::sys::statfs::statfs(run)
        .expect("statfs /run")
        .filesystem_type()
        == nix::sys::statfs::TMPFS_MAGIC
    {
        assert!(
            run.join(CACHE).is_file(),
            "CRIU keeps its cache in a tmpfs /run itself"
        );
        assert!(
            !run.join(RECORD).exists(),
            "podsnap leaves CRIU's own cache alone on a tmpfs /run"
        );
        return;
    }
    let record = std::fs::read_to_string(run.join(RECORD)).expect("podsnap's record of CRIU's cache");
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    assert!(record.starts_with(&format!("boot {}\n", boot.trim())), "{record}");
    let release = nix::sys::utsname::uname().expect("uname");
    assert!(
        record.contains(&format!("kernel {}\n", release.release().to_string_lossy())),
        "{record}"
    );
    use std::os::unix::fs::PermissionsExt;
    let cache = std::fs::metadata(run.join(CACHE)).expect("CRIU's cache");
    assert!(
        cache.len() > 0 && cache.permissions().mode() & 0o777 == 0o600,
        "{cache:?}"
    );
}

fn ask_count(ip: &str, port: u16) -> u64 {
    podsnap_tests::kubelet::ask(ip, port, "count")
        .expect("count")
        .parse()
        .expect("a number")
}

/// The descriptor of the pod checkpoint layer in a checkpoint image's index.
fn checkpoint_layer(node: &podsnap_tests::node::Node, digest: &str, depth: usize) -> Option<String> {
    let blob = node.ctr().run(CRI_NAMESPACE, &["content", "get", digest]).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&blob).ok()?;
    let mut descriptors: Vec<&serde_json::Value> = Vec::new();
    for key in ["manifests", "layers"] {
        if let Some(list) = doc.get(key).and_then(|v| v.as_array()) {
            descriptors.extend(list);
        }
    }
    for d in &descriptors {
        let media = d["mediaType"].as_str().unwrap_or_default();
        if media.contains("checkpoint") && media.ends_with(".tar") {
            return d["digest"].as_str().map(str::to_owned);
        }
    }
    if depth == 0 {
        return None;
    }
    descriptors
        .iter()
        .filter_map(|d| d["digest"].as_str())
        .find_map(|d| checkpoint_layer(node, d, depth - 1))
}

#[test]
fn ctr_task_checkpoint_of_the_sandbox_restores_through_podsnap() {
    let node = start_node!();
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("webapp"), HANDLER))
        .expect("the three-container pod runs");
    let before = mark_and_count(&pod);
    let images_before = node
        .ctr()
        .list_ids(CRI_NAMESPACE, "images")
        .expect("ctr images ls");

    let printed = node
        .ctr()
        .run(CRI_NAMESPACE, &["task", "checkpoint", &pod.pod.id])
        .expect("ctr task checkpoint on the sandbox task");
    eprintln!("ctr task checkpoint printed: {printed}");
    let listing = node
        .ctr()
        .run(CRI_NAMESPACE, &["images", "ls"])
        .expect("ctr images ls");
    let (name, digest) = listing
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() >= 3).then(|| (f[0].to_owned(), f[2].to_owned()))
        })
        .find(|(name, _)| !images_before.contains(name))
        .unwrap_or_else(|| panic!("no checkpoint image appeared:\n{listing}"));
    let layer = checkpoint_layer(&node, &digest, 2)
        .unwrap_or_else(|| panic!("checkpoint image {name} ({digest}) has no checkpoint layer"));

    // Extract the layer into the checkpoint root and restore it from there.
    let blob = node
        .ctr()
        .command(CRI_NAMESPACE)
        .args(["content", "get", &layer])
        .output()
        .expect("ctr content get");
    assert!(blob.status.success(), "{}", String::from_utf8_lossy(&blob.stderr));
    let target = node.files().checkpoints().join("from-ctr");
    std::fs::create_dir_all(&target).expect("mkdir");
    tar::Archive::new(blob.stdout.as_slice())
        .unpack(&target)
        .expect("unpacking the checkpoint layer");
    assert!(
        target.join("manifest.json").is_file(),
        "the layer holds a pod checkpoint: {:?}",
        names_in(&target)
    );

    remove_original(&node, &pod);
    let restored = restore(&node, &restore_request(&node, &target)).expect("podsnap restore");
    assert_eq!(restored.checkpoint, "from-ctr");
    check_restored(
        &node,
        &restored.ip,
        &pod.pod.ip,
        &volume_of(&node, &restored.uid),
        id_of(&restored.containers, "app"),
        before,
    );
}

#[test]
fn kubelet_restores_a_pod_annotated_with_restore_from() {
    let node = start_node!();
    let name = node.unique("webapp");
    let pod = run_three_container_pod(&node, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    let before = mark_and_count(&pod);

    // The dump through the real binary, into a named directory of the root; --stop ends the
    // pod's containers once they are dumped.
    let checkpoint = "webapp-kubelet";
    let dir = node.files().checkpoints().join(checkpoint);
    let output = Command::new(podsnap_binary())
        .args([
            "dump",
            "--stop",
            "--namespace",
            "default",
            "--pod",
            &name,
            "--dir",
        ])
        .arg(&dir)
        .env("CONTAINER_RUNTIME_ENDPOINT", node.endpoint())
        .env("CONTAINERD_ADDRESS", node.address())
        .env("PODSNAP_CHECKPOINT_ROOT", node.files().checkpoints())
        .output()
        .expect("running podsnap dump");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "podsnap dump failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("dumped       sidecar, app"), "{stdout}");
    assert!(stdout.contains(&format!("restore-from {checkpoint}")), "{stdout}");
    assert!(
        !stderr.contains('\u{1b}'),
        "no spinner when stderr is not a terminal: {stderr:?}"
    );
    for id in [&pod.sidecar_id, &pod.app_id] {
        node.cri()
            .wait_container_state(id, cri::ContainerState::ContainerExited, Duration::from_secs(10))
            .expect("--stop stops the dumped containers");
    }
    remove_original(&node, &pod);

    // kubelet: RunPodSandbox with the annotation, PodSandboxStatus (in run_pod), then each
    // container in the pod spec's order: the init container to completion first.
    let mut options = PodOptions::new(&name, HANDLER);
    options
        .annotations
        .insert("podsnap.io/restore-from".to_owned(), checkpoint.to_owned());
    let new_pod = run_pod(&node, &options).expect("RunPodSandbox with podsnap.io/restore-from");
    let volume = new_pod.empty_dir(DATA_VOLUME).expect("the emptyDir");
    let [init, sidecar, app] = podsnap_tests::kubelet::three_container_specs();

    // Checked after the rest, so one failure does not hide the others.
    let mut init_problem = None;
    let init_id = create_container(&node, &new_pod, &init).expect("CreateContainer init");
    let started = Instant::now();
    match start_container(&node, &init_id) {
        Err(status) => init_problem = Some(format!("StartContainer init: {}", status.message())),
        Ok(()) => {
            let status = node
                .cri()
                .wait_container_state(
                    &init_id,
                    cri::ContainerState::ContainerExited,
                    Duration::from_secs(10),
                )
                .expect("the completed init container exits at once");
            assert_eq!(status.exit_code, 0, "{status:?}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "init answered at once"
            );
        }
    }

    let mut ids = Vec::new();
    for spec in [&sidecar, &app] {
        let id = create_container(&node, &new_pod, spec)
            .unwrap_or_else(|s| panic!("CreateContainer {}: {}", spec.name, s.message()));
        start_container(&node, &id)
            .unwrap_or_else(|s| panic!("StartContainer {}: {}", spec.name, s.message()));
        ids.push(id);
    }
    check_restored(&node, &new_pod.ip, &pod.pod.ip, &volume, &ids[1], before);
    if let Some(problem) = init_problem {
        panic!("the completed init container was not answered with exit 0: {problem}");
    }
}

/// Processes in pod `uid`'s cgroups (counted in the freezer hierarchy).
fn pod_processes(uid: &str) -> usize {
    podsnap_tests::host::pod_cgroup_tree(uid)
        .into_iter()
        .filter(|d| d.starts_with("/sys/fs/cgroup/freezer"))
        .map(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .map(|t| t.lines().count())
                .unwrap_or(0)
        })
        .sum()
}

/// The threads of process `pid` whose name starts with `prefix`.
fn threads_named(pid: i32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
                })
                .count()
        })
        .unwrap_or(0)
}

/// A CPU-bound `sh` loop, in a process group of its own; killed with its group when dropped.
struct BusyLoop(std::process::Child);

impl BusyLoop {
    fn start() -> Self {
        use std::os::unix::process::CommandExt;
        Self(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .process_group(0)
                .spawn()
                .expect("sh"),
        )
    }
}

impl Drop for BusyLoop {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the group is this child's own.
        unsafe {
            libc::kill(-(self.0.id() as i32), libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// A container of 300 processes, each with memory of its own, dumps into a checkpoint that
/// verifies, and the page images CRIU closes one per process are digested by a bounded pool:
/// sampled all through the dump, the shim never runs more digest threads (named `prehash*`:
/// the watcher and its workers) than the watcher plus one per core. Every core is kept busy
/// meanwhile, as on a loaded node: the digests, in the idle scheduling class while the pod is
/// frozen, queue up then instead of finishing as fast as CRIU closes the files.
#[test]
fn a_container_of_300_processes_dumps_with_a_bounded_digest_pool() {
    const CHILDREN: usize = 300;
    let node = start_node!();
    let pod = run_pod(&node, &PodOptions::new(&node.unique("many"), HANDLER)).expect("sandbox");
    let port = APP_PORT.to_string();
    let children = CHILDREN.to_string();
    let spec = podsnap_tests::kubelet::ContainerSpec::workload(
        "app",
        &[
            "serve",
            "--name",
            "app",
            "--port",
            &port,
            "--children",
            &children,
            "--child-kib",
            "256",
        ],
    );
    podsnap_tests::kubelet::run_container(&node, &pod, &spec).expect("the container runs");
    podsnap_tests::kubelet::wait_answering(&pod.ip, APP_PORT, Duration::from_secs(30)).expect("answers");
    let deadline = Instant::now() + Duration::from_secs(60);
    // The pause process, the server and its children.
    while pod_processes(&pod.uid) < CHILDREN + 2 {
        assert!(
            Instant::now() < deadline,
            "the children start: {}",
            pod_processes(&pod.uid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let shims = node.shim_pids(podsnap_tests::PODSNAP_SHIM);
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
    let shim = shims[0];
    // Followed as CRIU writes them whatever the node's cores (the default follows only with a
    // core to spare).
    node.set_podsnap_config("[dump]\ndigests = \"early\"\n")
        .expect("node configuration");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy: Vec<BusyLoop> = (0..cores).map(|_| BusyLoop::start()).collect();
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(threads_named(shim, "prehash"));
                std::thread::sleep(Duration::from_millis(1));
            }
            peak
        })
    };
    let dir = node.files().checkpoints().join("many");
    let request = dump_request(&node, &pod.name, &pod.namespace, Some(dir.clone()));
    let dumped = block_on(podsnap_coordinator::dump::dump(
        &request,
        &podsnap_coordinator::progress::Lines,
    ));
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.join().expect("sampler");
    drop(busy);
    dumped.expect("the dump of 300 processes");
    let m = verified(&node, &dir);
    let page_images = m
        .files
        .keys()
        .filter(|f| f.rsplit('/').next().is_some_and(|n| n.starts_with("pages-")))
        .count();
    assert!(page_images > CHILDREN, "a page image per process: {page_images}");
    eprintln!("digest threads at most {peak} at once ({cores} cores, {page_images} page images)");
    assert!(peak >= 1, "the sampler saw the digest watcher");
    assert!(
        peak <= 1 + cores,
        "{peak} digest threads at once for {page_images} page images: not bounded by the {cores} cores"
    );
}

/// On a node whose containerd root, and so every overlay upper directory, lies under a path
/// with a space (escaped `\040` in mountinfo) and a character that is not ASCII (`é`: two
/// bytes the kernel writes as they are), the app's rootfs change is in the checkpoint and back
/// in the restored app.
#[test]
fn rootfs_changes_are_kept_when_the_containerd_root_has_a_space_and_a_non_ascii_byte() {
    let mut options =
        podsnap_tests::node::NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    options.containerd_root = "root d\u{e9}".to_owned();
    let node = podsnap_tests::node::Node::start(options);
    let snapshots = node
        .dir()
        .join("root d\u{e9}/io.containerd.snapshotter.v1.overlayfs/snapshots");
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("webapp"), HANDLER))
        .expect("the three-container pod runs");
    assert!(
        !names_in(&snapshots).is_empty(),
        "the containers' layers are under {}",
        snapshots.display()
    );
    let before = mark_and_count(&pod);

    let outcome = dump(&node, &pod, None).expect("podsnap dump");
    let diff = outcome.summary.dir.join("containers/app/rootfs-diff.tar");
    let file = std::fs::File::open(&diff).unwrap_or_else(|e| panic!("{}: {e}", diff.display()));
    let captured: Vec<String> = tar::Archive::new(file)
        .entries()
        .expect("the rootfs tar")
        .map(|e| {
            e.expect("a tar entry")
                .path()
                .expect("an entry path")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let want = ROOTFS_FILE.trim_start_matches('/');
    assert!(
        captured.iter().any(|p| p == want),
        "{want} is not in the app's rootfs capture: {captured:?}"
    );

    remove_original(&node, &pod);
    let restored = restore(&node, &restore_request(&node, &outcome.summary.dir)).expect("podsnap restore");
    check_restored(
        &node,
        &restored.ip,
        &pod.pod.ip,
        &volume_of(&node, &restored.uid),
        id_of(&restored.containers, "app"),
        before,
    );
}
