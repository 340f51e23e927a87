//! podsnap on the runc releases nodes run: bookworm's 1.1.5 and sid's 1.3 (what nodes with
//! containerd 2.x run). The suite runs on either (`PODSNAP_TEST_RUNC`); these tests look at
//! what differs between them.
//!
//! - A pod dump asks CRIU to leave the containers' cgroups alone (`--manage-cgroups-mode
//!   ignore`: CRIU neither walks nor records them while the pod is frozen; runc puts the
//!   restored processes into the new containers' cgroups) where the runc offers it (1.2 and
//!   later, read from `runc --version`), and not on 1.1.5, which refuses the mode; the restore
//!   repeats what the dump used, and the pod comes back either way.
//! - A checkpoint moves between nodes running different runc releases, both ways: a restore by
//!   1.1.5 of a dump made with `ignore` tells CRIU the mode through the container's CRIU
//!   configuration file (runc 1.1.5 cannot pass it, and CRIU's default mode looks for the
//!   dumped container's cgroups, gone with it).

mod pod_checkpoint_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use pod_checkpoint_support::*;
use podsnap_tests::kubelet::{run_three_container_pod, PodOptions, ThreeContainerPod};
use podsnap_tests::node::{Node, NodeOptions};
use podsnap_tests::prereq;
use podsnap_tests::prereq::RuncVersion;
use podsnap_tests::HANDLER;

/// A `runc` that writes each command line it is given to a log, then runs the node's runc.
struct RecordingRunc {
    dir: tempfile::TempDir,
}

impl RecordingRunc {
    fn new(real: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("podsnap-runc-log-")
            .tempdir()
            .expect("a directory for the recording runc");
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> {}\nexec {} \"$@\"\n",
            dir.path().join("calls").display(),
            real.display()
        );
        let path = dir.path().join("runc");
        std::fs::write(&path, script).expect("write the recording runc");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self { dir }
    }

    /// The runc subcommands seen so far whose arguments hold `word` (`checkpoint`, `restore`).
    fn calls(&self, word: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("calls"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == word))
            .map(str::to_owned)
            .collect()
    }
}

fn options(runc: &Path) -> NodeOptions {
    let mut o = NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    o.runc = runc.to_path_buf();
    o
}

fn offers_ignore(version: RuncVersion) -> bool {
    version
        >= (RuncVersion {
            major: 1,
            minor: 2,
            patch: 0,
        })
}

/// The cgroups mode each dumped container's `podsnap-criu.json` records.
fn recorded_modes(checkpoint: &Path) -> Vec<String> {
    ["sidecar", "app"]
        .iter()
        .map(|c| {
            let file = checkpoint
                .join("containers")
                .join(c)
                .join("checkpoint")
                .join(podsnap_tests::paths::CRIU_OPTIONS_FILE);
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            json["cgroups_mode"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

fn app_of(restored: &podsnap_coordinator::restore::RestoredPod) -> String {
    restored
        .containers
        .iter()
        .find(|(n, _)| n == "app")
        .map(|(_, id)| id.clone())
        .expect("a restored app")
}

fn check_back(
    node: &Node,
    pod: &ThreeContainerPod,
    restored: &podsnap_coordinator::restore::RestoredPod,
    before: Before,
) {
    let volume = pods_dir(node)
        .join(&restored.uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(podsnap_tests::kubelet::DATA_VOLUME);
    check_restored(
        node,
        &restored.ip,
        &pod.pod.ip,
        &volume,
        &app_of(restored),
        before,
    );
}

#[test]
fn a_pod_dump_ignores_cgroups_where_runc_offers_it_and_the_pod_comes_back() {
    let real = prereq::runc_under_test();
    let version = prereq::runc_version(&real);
    let recording = RecordingRunc::new(&real);
    let mut o = options(&real);
    o.path_prefix.push(recording.dir.path().to_path_buf());
    let node = Node::start(o);
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("cgmode"), HANDLER))
        .expect("the pod runs");
    let before = mark_and_count(&pod);
    let outcome = dump(&node, &pod, None).expect("podsnap dump");

    let checkpoints = recording.calls("checkpoint");
    assert_eq!(
        checkpoints.len(),
        2,
        "one runc checkpoint per container: {checkpoints:?}"
    );
    let ignored = |calls: &[String]| {
        calls
            .iter()
            .filter(|c| c.contains("--manage-cgroups-mode ignore"))
            .count()
    };
    let expected = if offers_ignore(version) { 2 } else { 0 };
    assert_eq!(
        ignored(&checkpoints),
        expected,
        "runc {version}: --manage-cgroups-mode ignore on {expected} of the checkpoints: {checkpoints:?}"
    );
    assert!(
        checkpoints
            .iter()
            .all(|c| !c.contains("--manage-cgroups-mode ") || c.contains("ignore")),
        "no other mode is asked for: {checkpoints:?}"
    );
    let want = if offers_ignore(version) { "ignore" } else { "" };
    assert_eq!(recorded_modes(&outcome.summary.dir), [want, want]);

    remove_original(&node, &pod);
    let restored = restore(&node, &restore_request(&node, &outcome.summary.dir)).expect("podsnap restore");
    let restores = recording.calls("restore");
    assert_eq!(restores.len(), 2, "{restores:?}");
    assert_eq!(
        ignored(&restores),
        expected,
        "the restore repeats the dump's mode: {restores:?}"
    );
    check_back(&node, &pod, &restored, before);
}

#[test]
fn a_checkpoint_moves_between_runc_1_3_and_1_1_both_ways() {
    let new = PathBuf::from(prereq::RUNC_1_3);
    let old = prereq::find_program("runc").expect("bookworm's runc on PATH");
    let (node_new, node_old) = Node::start_pair(options(&new), options(&old));
    assert!(
        offers_ignore(node_new.runc_version()),
        "{}",
        node_new.runc_version()
    );
    assert!(
        !offers_ignore(node_old.runc_version()),
        "{}",
        node_old.runc_version()
    );

    // Dumped on 1.3 (cgroups ignored), restored on 1.1.5 (ignore through CRIU's configuration).
    let pod = run_three_container_pod(&node_new, &PodOptions::new(&node_new.unique("to-old"), HANDLER))
        .expect("the pod runs on runc 1.3");
    let before = mark_and_count(&pod);
    let outcome = dump(&node_new, &pod, None).expect("dump on runc 1.3");
    assert_eq!(recorded_modes(&outcome.summary.dir), ["ignore", "ignore"]);
    remove_original(&node_new, &pod);
    let on_old =
        restore(&node_old, &restore_request(&node_old, &outcome.summary.dir)).expect("restore on runc 1.1.5");
    check_back(&node_old, &pod, &on_old, before);
    assert!(
        !node_old
            .log_grep("dumped with cgroups mode ignore, which this runc does not pass")
            .is_empty(),
        "the shim says it fell back"
    );

    // The other way: a pod dumped on 1.1.5 (runc's default mode), restored on 1.3.
    let pod = run_three_container_pod(&node_old, &PodOptions::new(&node_old.unique("to-new"), HANDLER))
        .expect("the pod runs on runc 1.1.5");
    let before = mark_and_count(&pod);
    let outcome = dump(&node_old, &pod, None).expect("dump on runc 1.1.5");
    assert_eq!(recorded_modes(&outcome.summary.dir), ["", ""]);
    remove_original(&node_old, &pod);
    let on_new =
        restore(&node_new, &restore_request(&node_new, &outcome.summary.dir)).expect("restore on runc 1.3");
    check_back(&node_new, &pod, &on_new, before);
}

/// A paused container of a pod sharing one PID namespace is stopped by kubelet's
/// StopContainer: runc 1.2+ kills such a container (and any `kill --all`) by writing
/// `cgroup.kill`, which on a hybrid node leaves the SIGKILL waiting in the still frozen v1
/// freezer; the shim thaws it (runc 1.1.5 thaws itself). Without that the container never
/// exited and StopPodSandbox hung.
#[test]
fn a_paused_container_sharing_the_pods_pid_namespace_is_killed() {
    use podsnap_tests::kubelet::{run_container, run_pod, wait_answering, ContainerSpec};
    let node = Node::start(options(&prereq::runc_under_test()));
    let mut o = PodOptions::new(&node.unique("pausekill"), HANDLER);
    o.share_process_namespace = true;
    let pod = run_pod(&node, &o).expect("sandbox");
    let app = ContainerSpec::workload("app", &["serve", "--name", "app", "--port", "8080"]);
    let id = run_container(&node, &pod, &app).expect("the app runs");
    wait_answering(&pod.ip, 8080, std::time::Duration::from_secs(20)).expect("the app answers");
    node.ctr()
        .run(podsnap_tests::ctr::CRI_NAMESPACE, &["task", "pause", &id])
        .expect("ctr task pause");
    let started = std::time::Instant::now();
    node.cri()
        .stop_container(k8s_cri::v1::StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .expect("StopContainer");
    let status = node
        .cri()
        .wait_container_state(
            &id,
            k8s_cri::v1::ContainerState::ContainerExited,
            std::time::Duration::from_secs(20),
        )
        .expect("the paused app exits");
    assert_eq!(status.exit_code, 137, "killed by SIGKILL: {status:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    podsnap_tests::kubelet::remove_pod(&node, &pod).expect("the pod goes");
}
