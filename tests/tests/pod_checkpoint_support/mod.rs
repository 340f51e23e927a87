//! What the pod checkpoint suites share: the coordinator called as a library against the node,
//! the state recorded before a dump, and the checks every restored pod must pass.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use podsnap_coordinator::dump::{DumpOutcome, DumpRequest};
use podsnap_coordinator::progress::Lines;
use podsnap_coordinator::restore::{RestoreRequest, RestoredPod};
use podsnap_tests::kubelet::{ask, wait_answering, ThreeContainerPod, APP_PORT, SIDECAR_PORT};
use podsnap_tests::node::Node;

/// A file the app writes into its rootfs before the dump.
pub const ROOTFS_FILE: &str = "/tmp/x";
/// A file the app writes into the emptyDir before the dump.
pub const VOLUME_FILE: &str = "written-before-dump";
/// Counters must reach this before a dump, so a restart from zero cannot pass for a restore.
pub const MIN_COUNT: u64 = 20;

/// A current-thread runtime for the coordinator's async calls.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

/// `podsnap dump` of `pod` on `node` into `dir` (the node's root when `None`).
pub fn dump_request(node: &Node, name: &str, namespace: &str, dir: Option<PathBuf>) -> DumpRequest {
    let mut request = DumpRequest::new(namespace, name);
    request.runtime_endpoint = node.endpoint();
    request.address = node.address();
    request.checkpoint_root = node.files().checkpoints();
    request.dir = dir;
    request
}

/// Runs `podsnap dump` (the library) for `pod`.
pub fn dump(
    node: &Node,
    pod: &ThreeContainerPod,
    dir: Option<PathBuf>,
) -> podsnap_coordinator::Result<DumpOutcome> {
    let request = dump_request(node, &pod.pod.name, &pod.pod.namespace, dir);
    block_on(podsnap_coordinator::dump::dump(&request, &Lines))
}

/// `podsnap restore --checkpoint-dir dir` against `node`, kubelet's directories in the node.
pub fn restore_request(node: &Node, dir: &Path) -> RestoreRequest {
    let mut request = RestoreRequest::new(dir);
    request.runtime_endpoint = node.endpoint();
    request.checkpoint_root = node.files().checkpoints();
    request.pods_dir = pods_dir(node);
    request.logs_dir = logs_dir(node);
    request.config = podsnap_coordinator::NodeConfig::read(&node.files().podsnap_config())
        .expect("the node's podsnap configuration");
    request
}

/// Runs `podsnap restore` (the library); records the new pod with the node for teardown.
pub fn restore(node: &Node, request: &RestoreRequest) -> podsnap_coordinator::Result<RestoredPod> {
    restore_with(node, request, &Lines)
}

/// [`restore`], telling its steps to `progress`.
pub fn restore_with(
    node: &Node,
    request: &RestoreRequest,
    progress: &dyn podsnap_coordinator::progress::Progress,
) -> podsnap_coordinator::Result<RestoredPod> {
    let restored = block_on(podsnap_coordinator::restore::restore(request, progress))?;
    let netns = node.cri().pod_netns(&restored.id).ok().flatten();
    node.record_pod(&restored.uid, netns.as_deref())
        .expect("recording the restored pod");
    Ok(restored)
}

/// kubelet's pod directories in the node.
pub fn pods_dir(node: &Node) -> PathBuf {
    node.files().kubelet().join("pods")
}

/// kubelet's pod log directories in the node.
pub fn logs_dir(node: &Node) -> PathBuf {
    node.files().kubelet().join("logs/pods")
}

/// The counters of the running pod just before its dump.
#[derive(Debug, Clone, Copy)]
pub struct Before {
    pub sidecar: u64,
    pub app: u64,
}

fn count(ip: &str, port: u16) -> u64 {
    ask(ip, port, "count")
        .unwrap_or_else(|e| panic!("count from {ip}:{port}: {e:#}"))
        .parse()
        .unwrap_or_else(|e| panic!("count from {ip}:{port} is not a number: {e}"))
}

/// Leaves marks in the running pod (a rootfs file, a volume file), waits until both counters
/// are past [`MIN_COUNT`], and returns them.
pub fn mark_and_count(pod: &ThreeContainerPod) -> Before {
    let ip = &pod.pod.ip;
    assert_eq!(
        ask(ip, APP_PORT, &format!("touch {ROOTFS_FILE}")).expect("touch"),
        "ok"
    );
    assert_eq!(
        ask(ip, APP_PORT, &format!("touch /data/{VOLUME_FILE}")).expect("touch"),
        "ok"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = Before {
            sidecar: count(ip, SIDECAR_PORT),
            app: count(ip, APP_PORT),
        };
        if before.sidecar >= MIN_COUNT && before.app >= MIN_COUNT {
            return before;
        }
        assert!(Instant::now() < deadline, "counters stuck at {before:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Removes the original pod the way kubelet would, so only the restored one is left.
pub fn remove_original(node: &Node, pod: &ThreeContainerPod) {
    podsnap_tests::kubelet::remove_pod(node, &pod.pod).expect("removing the original pod");
}

/// Everything a restored three-container pod must show: counters continue (not from zero),
/// the emptyDir holds what was written, the init container ran once, the app reaches the
/// sidecar on 127.0.0.1, the app's listener answers on the new IP, the rootfs file is there.
pub fn check_restored(node: &Node, ip: &str, old_ip: &str, volume: &Path, app_id: &str, before: Before) {
    assert!(!ip.is_empty(), "the restored pod has an IP");
    assert_ne!(ip, old_ip, "the restored pod has a new IP");
    for port in [SIDECAR_PORT, APP_PORT] {
        wait_answering(ip, port, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("restored listener {ip}:{port}: {e:#}"));
    }
    let (sidecar, app) = (count(ip, SIDECAR_PORT), count(ip, APP_PORT));
    assert!(
        sidecar >= before.sidecar && app >= before.app,
        "counters went back: sidecar {} -> {sidecar}, app {} -> {app}",
        before.sidecar,
        before.app
    );
    podsnap_tests::kubelet::wait_count_above(ip, APP_PORT, app, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the restored app's counter advances: {e:#}"));

    let written = volume.join(VOLUME_FILE);
    let text = std::fs::read_to_string(&written)
        .unwrap_or_else(|e| panic!("{} in the restored emptyDir: {e}", written.display()));
    assert!(text.starts_with("app count "), "{text:?}");
    let marker = std::fs::read_to_string(volume.join("init.log")).expect("the init marker");
    assert_eq!(marker.lines().count(), 1, "init ran once: {marker:?}");

    assert_eq!(
        ask(ip, APP_PORT, "get 127.0.0.1:9090 ping").expect("app -> sidecar"),
        "pong sidecar"
    );

    let exec = node
        .cri()
        .exec(app_id, &["cat", ROOTFS_FILE], 20)
        .expect("ExecSync in the restored app");
    assert_eq!(
        exec.exit_code,
        0,
        "{ROOTFS_FILE} in the restored app: {}",
        String::from_utf8_lossy(&exec.stderr)
    );
    assert!(
        String::from_utf8_lossy(&exec.stdout).starts_with("app count "),
        "{ROOTFS_FILE}: {:?}",
        String::from_utf8_lossy(&exec.stdout)
    );
}

/// The ids of every pod sandbox on the node.
pub fn sandbox_ids(node: &Node) -> Vec<String> {
    let mut ids = node.cri().pod_ids().expect("ListPodSandbox");
    ids.sort();
    ids
}

/// The names in a directory (empty when it does not exist).
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The container of `pod` named `name`, from CRI.
pub fn container_named(node: &Node, pod_id: &str, name: &str) -> cri::Container {
    node.cri()
        .pod_containers(pod_id)
        .expect("ListContainers")
        .into_iter()
        .find(|c| c.metadata.as_ref().is_some_and(|m| m.name == name))
        .unwrap_or_else(|| panic!("pod {pod_id} has no container {name}"))
}

/// [`podsnap_binary`], built (or found built) once per test process.
pub fn podsnap_bin() -> &'static Path {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(podsnap_binary)
}

/// The checkpoint at `dir`, checked twice over: `podsnap inspect -o json` verifies it (every
/// digest, as a restore does), and the suite's own reader of the format finds exactly the files
/// its manifest lists, of their sizes and digests. Its manifest, as that reader parses it.
pub fn verified(node: &Node, dir: &Path) -> podsnap_tests::checkpoint::Manifest {
    let (inspected, ok) = podsnap_tests::cli::inspect_json(node, podsnap_bin(), dir);
    assert!(
        ok && inspected["verified"] == true,
        "podsnap inspect does not verify {}: {inspected}",
        dir.display()
    );
    podsnap_tests::checkpoint::verify(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The `podsnap` binary next to this test's executable, built if missing.
pub fn podsnap_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join("podsnap");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = std::process::Command::new(cargo);
    // The same selection as the test command's own `cargo build --workspace --bins`, so the
    // features resolve alike and this is a no-op there.
    build.args(["build", "--quiet", "--workspace", "--bins"]);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            build.arg("--release");
        }
        Some(other) => {
            build.args(["--profile", other]);
        }
    }
    if let Some(target_dir) = profile_dir.parent() {
        build.env("CARGO_TARGET_DIR", target_dir);
    }
    let status = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build for the podsnap binary");
    assert!(status.success(), "cargo build of the podsnap binary failed");
    assert!(binary.is_file(), "{} was not built", binary.display());
    binary
}
