//! `podsnap node install | uninstall | status` against a real containerd laid out like a host
//! (`NodeOptions::host_root`, see `podsnap_tests::host_node`): the installer edits the host
//! root's containerd configuration and restarts containerd in place with the node's restart
//! command, as it restarts a host's containerd with systemd.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use k8s_cri::v1 as cri;
use podsnap_tests::host_node::{config_bytes, tree, ConfigStyle};
use podsnap_tests::kubelet::{
    ask, remove_pod, run_container, run_pod, wait_answering, ContainerSpec, KubePod, PodOptions, APP_PORT,
};
use podsnap_tests::node::{Node, NodeOptions};
use podsnap_tests::{host, PODSNAP_SHIM};

/// Where cargo put the binaries (`cargo build --workspace --bins`): target/<profile>.
fn bins() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf();
    for name in [PODSNAP_SHIM, "podsnap", "podsnap-cni-ipam"] {
        assert!(
            dir.join(name).is_file(),
            "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
            dir.join(name).display()
        );
    }
    dir
}

fn start(style: ConfigStyle) -> Node {
    let mut options = NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    options.host_root = Some(style);
    options.podsnap_shim = false;
    Node::start(options)
}

/// `podsnap ARGS` against `node`.
fn podsnap(node: &Node, args: &[&str]) -> Output {
    podsnap_tests::cli::podsnap(node, &bins().join("podsnap"), args)
}

fn text(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `podsnap node install` into `node`'s host root with its restart command, and `extra`.
fn install(node: &Node, binaries: &Path, extra: &[&str]) -> Output {
    let host_root = node.host_root();
    let restart = node.restart_command();
    let mut args = vec![
        "node",
        "install",
        "--host-root",
        host_root.to_str().expect("utf8"),
        "--restart-command",
        &restart,
        "--binaries",
        binaries.to_str().expect("utf8"),
        "--timeout",
        "30",
    ];
    args.extend_from_slice(extra);
    podsnap(node, &args)
}

fn uninstall(node: &Node, extra: &[&str]) -> Output {
    let host_root = node.host_root();
    let restart = node.restart_command();
    let mut args = vec![
        "node",
        "uninstall",
        "--host-root",
        host_root.to_str().expect("utf8"),
        "--restart-command",
        &restart,
        "--timeout",
        "30",
    ];
    args.extend_from_slice(extra);
    podsnap(node, &args)
}

/// The runtime handlers CRI `Status` reports (what `crictl info` shows as runtimeHandlers).
fn handlers(node: &Node) -> Vec<String> {
    node.cri()
        .status(cri::StatusRequest { verbose: false })
        .expect("CRI Status")
        .runtime_handlers
        .into_iter()
        .map(|h| h.name)
        .collect()
}

/// A one-container pod of `handler` serving the workload; returns the pod and its container.
fn serving_pod(node: &Node, base: &str, handler: &str) -> (KubePod, String) {
    let pod = run_pod(node, &PodOptions::new(&node.unique(base), handler)).expect("RunPodSandbox");
    let port = APP_PORT.to_string();
    let app = run_container(
        node,
        &pod,
        &ContainerSpec::workload("app", &["serve", "--name", "app", "--port", &port]),
    )
    .expect("the app container runs");
    wait_answering(&pod.ip, APP_PORT, Duration::from_secs(30)).expect("the app answers");
    (pod, app)
}

fn count(pod_ip: &str) -> u64 {
    ask(pod_ip, APP_PORT, "count")
        .expect("count")
        .parse()
        .expect("a number")
}

/// A pod of the installed `podsnap` handler runs, is dumped with `podsnap dump`, removed, and
/// restored with `podsnap restore`; its counter goes on.
fn podsnap_pod_is_checkpointed_and_restored(node: &Node) {
    let (pod, _app) = serving_pod(node, "installed", "podsnap");
    let before = count(&pod.ip);
    let dir = node.files().checkpoints().join(&pod.name);
    let dumped = podsnap(
        node,
        &[
            "dump",
            "--namespace",
            "default",
            "--pod",
            &pod.name,
            "--dir",
            dir.to_str().expect("utf8"),
        ],
    );
    assert!(dumped.status.success(), "podsnap dump: {}", text(&dumped));
    remove_pod(node, &pod).expect("the original pod goes");
    let kubelet = node.files().kubelet();
    let restored = podsnap(
        node,
        &[
            "restore",
            "--checkpoint-dir",
            dir.to_str().expect("utf8"),
            "--pods-dir",
            kubelet.join("pods").to_str().expect("utf8"),
            "--logs-dir",
            kubelet.join("logs/pods").to_str().expect("utf8"),
        ],
    );
    let out = text(&restored);
    assert!(restored.status.success(), "podsnap restore: {out}");
    let field = |name: &str| {
        String::from_utf8_lossy(&restored.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    let ip = field("ip ");
    let id = field("id ");
    let uid = field("pod ")
        .split("(uid ")
        .nth(1)
        .map(|u| u.trim_end_matches(')').to_owned())
        .expect("the uid");
    node.record_pod(&uid, None).expect("ledger");
    wait_answering(&ip, APP_PORT, Duration::from_secs(30)).expect("the restored app answers");
    let after = count(&ip);
    assert!(
        after >= before,
        "the counter went on from the checkpoint: {before} then {after}"
    );
    node.cri()
        .stop_and_remove_pod(&id)
        .expect("the restored pod goes");
    host::remove_pod_cgroups(&uid);
}

/// The whole round for one configuration style: a runc pod running before, install (restart,
/// handler served, runc pod untouched), a podsnap pod dumped and restored, a reinstall that
/// changes nothing, status, uninstall (configuration byte for byte, every added file gone,
/// handler gone).
fn round(style: ConfigStyle, expect_drop_in: &str, config_changes: bool) {
    let mut node = start(style);
    let bins = bins();
    let host_root = node.host_root();
    let config_before = config_bytes(node.files());
    let tree_before = tree(&host_root);
    assert!(
        !handlers(&node).contains(&"podsnap".to_owned()),
        "no podsnap before the install"
    );
    let (runc_pod, runc_app) = serving_pod(&node, "runc-before", "runc");
    let runc_pid = node.cri().container_pid(&runc_app).expect("status").expect("pid");
    let runc_count = count(&runc_pod.ip);
    let containerd_before = node.containerd_pid();

    let node_config = node.dir().join("node-config.toml");
    std::fs::write(&node_config, "[dump]\ndeadline_seconds = 100\n").expect("node config");
    let cni = "/opt/cni/bin";
    let installed = install(
        &node,
        &bins,
        &[
            "--cni-bin-dir",
            cni,
            "--node-config",
            node_config.to_str().expect("utf8"),
        ],
    );
    let out = text(&installed);
    assert!(installed.status.success(), "install: {out}");
    node.reconnect().expect("CRI after the install");
    assert!(
        out.contains("restarted    containerd, with the restart command"),
        "{out}"
    );
    assert!(out.contains(&format!("drop-in      {expect_drop_in}")), "{out}");
    assert_ne!(
        node.containerd_pid(),
        containerd_before,
        "containerd was restarted"
    );
    assert!(
        handlers(&node).contains(&"podsnap".to_owned()),
        "CRI serves the podsnap handler"
    );
    for file in [
        "usr/local/bin/containerd-shim-podsnap-v1",
        "usr/local/bin/podsnap",
        "opt/cni/bin/podsnap-cni-ipam",
        "etc/podsnap/config.toml",
        "etc/podsnap/installed.json",
        expect_drop_in.trim_start_matches('/'),
    ] {
        assert!(host_root.join(file).is_file(), "{file} installed: {out}");
    }
    assert_eq!(
        std::fs::read_to_string(host_root.join("etc/podsnap/config.toml")).expect("node config"),
        "[dump]\ndeadline_seconds = 100\n"
    );
    let config_after = config_bytes(node.files());
    if config_changes {
        let text = String::from_utf8_lossy(&config_after);
        assert!(
            text.contains("imports = [\"/etc/podsnap/containerd.toml\"]"),
            "{text}"
        );
        // Only the import line was added.
        let without: String = text
            .lines()
            .filter(|l| !l.starts_with("imports = "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            without.as_bytes(),
            &config_before[..],
            "the rest of config.toml as it was"
        );
    } else {
        assert_eq!(
            config_after, config_before,
            "config.toml untouched: it already imports conf.d"
        );
    }
    // The runc pod started before the install kept running across the restart.
    assert!(host::alive(runc_pid), "the runc pod's app survived the restart");
    assert!(count(&runc_pod.ip) > runc_count, "and kept counting");
    assert_eq!(
        node.cri().container(&runc_app).expect("status").state,
        cri::ContainerState::ContainerRunning as i32
    );

    podsnap_pod_is_checkpointed_and_restored(&node);

    // A reinstall of the same thing: nothing written, no restart.
    let containerd_now = node.containerd_pid();
    let again = install(
        &node,
        &bins,
        &[
            "--cni-bin-dir",
            cni,
            "--node-config",
            node_config.to_str().expect("utf8"),
        ],
    );
    let out = text(&again);
    assert!(again.status.success(), "reinstall: {out}");
    assert!(out.contains("written      nothing"), "{out}");
    assert!(out.contains("restarted    no"), "{out}");
    assert_eq!(node.containerd_pid(), containerd_now, "no restart");

    let host_arg = host_root.to_str().expect("utf8").to_owned();
    let status = podsnap(&node, &["node", "status", "--host-root", &host_arg]);
    let out = text(&status);
    assert!(status.status.success(), "status: {out}");
    assert!(out.contains("handler      podsnap served"), "{out}");
    assert!(out.contains("containerd   containerd 2."), "{out}");
    assert!(out.contains("containerd-shim-podsnap-v1 (ok)"), "{out}");

    let removed = uninstall(&node, &[]);
    let out = text(&removed);
    assert!(removed.status.success(), "uninstall: {out}");
    node.reconnect().expect("CRI after the uninstall");
    assert_eq!(
        config_bytes(node.files()),
        config_before,
        "config.toml byte for byte as before"
    );
    assert_eq!(
        tree(&host_root),
        tree_before,
        "every file the install added is gone"
    );
    assert!(
        !handlers(&node).contains(&"podsnap".to_owned()),
        "CRI no longer serves podsnap"
    );
    assert!(host::alive(runc_pid), "the runc pod survived both restarts");
    let status = podsnap(&node, &["node", "status", "--host-root", &host_arg]);
    assert!(text(&status).contains("installed    no"), "{}", text(&status));
    remove_pod(&node, &runc_pod).expect("runc pod removed");
}

#[test]
fn install_into_a_version_3_config_without_imports() {
    round(ConfigStyle::V3, "/etc/podsnap/containerd.toml", true);
}

#[test]
fn install_into_a_config_that_imports_conf_d() {
    round(ConfigStyle::V3ConfD, "/etc/containerd/conf.d/podsnap.toml", false);
}

#[test]
fn install_into_a_version_2_config() {
    round(ConfigStyle::V2, "/etc/podsnap/containerd.toml", true);
}

/// The exe of a process, with its inode: `(path, inode)`.
fn exe(pid: i32) -> (String, u64) {
    use std::os::unix::fs::MetadataExt;
    let link = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe link");
    let inode = std::fs::metadata(format!("/proc/{pid}/exe")).expect("exe").ino();
    (link.display().to_string(), inode)
}

#[test]
fn uninstall_is_refused_under_a_podsnap_pod_and_an_upgrade_keeps_its_shim() {
    use std::os::unix::fs::MetadataExt;
    let mut node = start(ConfigStyle::V3);
    let bins = bins();
    let config_before = config_bytes(node.files());
    let tree_before = tree(&node.host_root());
    let installed = install(&node, &bins, &[]);
    assert!(installed.status.success(), "install: {}", text(&installed));
    node.reconnect().expect("CRI after the install");
    let (pod, _app) = serving_pod(&node, "upgraded", "podsnap");

    let refused = uninstall(&node, &[]);
    let out = text(&refused);
    assert!(
        !refused.status.success(),
        "uninstall under a running podsnap pod: {out}"
    );
    assert!(
        out.contains(&format!("default/{}", pod.name)),
        "the refusal names the pod: {out}"
    );
    assert!(
        handlers(&node).contains(&"podsnap".to_owned()),
        "nothing was undone"
    );

    // A new version of the binaries (the same programs with different bytes: ELF ignores
    // trailing data).
    let new_bins = node.dir().join("new-bins");
    std::fs::create_dir(&new_bins).expect("mkdir");
    for name in [PODSNAP_SHIM, "podsnap", "podsnap-cni-ipam"] {
        let mut bytes = std::fs::read(bins.join(name)).expect("binary");
        bytes.extend_from_slice(b"\0podsnap-test-upgrade\0");
        std::fs::write(new_bins.join(name), bytes).expect("new binary");
        std::fs::set_permissions(
            new_bins.join(name),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
    }
    let old_shims = node.shim_pids(PODSNAP_SHIM);
    assert_eq!(old_shims.len(), 1, "one shim serves the pod: {old_shims:?}");
    let (_, old_inode) = exe(old_shims[0]);
    let containerd = node.containerd_pid();
    let upgraded = install(&node, &new_bins, &[]);
    let out = text(&upgraded);
    assert!(upgraded.status.success(), "upgrade: {out}");
    assert!(
        out.contains("written      ") && out.contains("containerd-shim-podsnap-v1"),
        "{out}"
    );
    assert!(
        out.contains("restarted    no"),
        "a new shim needs no restart: {out}"
    );
    assert_eq!(node.containerd_pid(), containerd);
    let installed_shim = node.host_root().join("usr/local/bin").join(PODSNAP_SHIM);
    let new_inode = std::fs::metadata(&installed_shim).expect("new shim").ino();
    assert_ne!(new_inode, old_inode, "the shim binary was replaced by a new file");
    // The running pod's shim still runs its old binary.
    let (old_exe, inode_now) = exe(old_shims[0]);
    assert_eq!(inode_now, old_inode, "the old shim kept its binary");
    assert!(
        old_exe.ends_with("(deleted)"),
        "the old binary is unlinked: {old_exe}"
    );
    assert!(count(&pod.ip) > 0, "the old pod still answers");
    // A new pod gets the new binary.
    let (new_pod, _) = serving_pod(&node, "after-upgrade", "podsnap");
    let new_shim = node
        .shim_pids(PODSNAP_SHIM)
        .into_iter()
        .find(|p| !old_shims.contains(p))
        .expect("a shim for the new pod");
    assert_eq!(
        exe(new_shim).1,
        new_inode,
        "the new pod's shim runs the new binary"
    );

    remove_pod(&node, &pod).expect("pod removed");
    remove_pod(&node, &new_pod).expect("pod removed");
    let removed = uninstall(&node, &[]);
    assert!(removed.status.success(), "uninstall: {}", text(&removed));
    node.reconnect().expect("CRI after the uninstall");
    assert_eq!(config_bytes(node.files()), config_before);
    assert_eq!(tree(&node.host_root()), tree_before);
}

#[test]
fn a_drop_in_containerd_refuses_is_rolled_back() {
    let mut node = start(ConfigStyle::V3);
    let bins = bins();
    let config_before = config_bytes(node.files());
    let tree_before = tree(&node.host_root());
    let (runc_pod, runc_app) = serving_pod(&node, "runc-rollback", "runc");
    let runc_pid = node.cri().container_pid(&runc_app).expect("status").expect("pid");
    // The first restart finds the drop-in broken (as a drop-in containerd cannot read would
    // be); later restarts run as they are.
    let flag = node.dir().join("broke-once");
    let drop_in = node.host_root().join("etc/podsnap/containerd.toml");
    let restart = format!(
        "if [ ! -e '{flag}' ]; then touch '{flag}'; echo 'this is [not toml' >> '{drop_in}'; fi; {}",
        node.restart_command(),
        flag = flag.display(),
        drop_in = drop_in.display()
    );
    let host_root = node.host_root();
    let failed = podsnap(
        &node,
        &[
            "node",
            "install",
            "--host-root",
            host_root.to_str().expect("utf8"),
            "--restart-command",
            &restart,
            "--binaries",
            bins.to_str().expect("utf8"),
            "--timeout",
            "30",
        ],
    );
    let out = text(&failed);
    assert!(!failed.status.success(), "install with a broken drop-in: {out}");
    assert!(flag.exists(), "the broken restart happened");
    node.reconnect().expect("CRI after the rollback");
    assert!(out.contains("nothing of the install is left"), "{out}");
    assert!(
        out.contains("containerd was restarted on the old configuration and serves CRI again"),
        "{out}"
    );
    assert!(
        !node.log_grep("failed to unmarshal TOML").is_empty(),
        "containerd refused the drop-in: {}",
        node.log_tail(20)
    );
    // The node is as it was.
    assert_eq!(config_bytes(node.files()), config_before, "config.toml as before");
    assert_eq!(tree(&host_root), tree_before, "nothing of the install left");
    assert!(!handlers(&node).contains(&"podsnap".to_owned()));
    assert!(host::alive(runc_pid), "the runc pod survived");
    assert!(count(&runc_pod.ip) > 0);
    remove_pod(&node, &runc_pod).expect("runc pod removed");
}
