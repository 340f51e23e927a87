//! The systemd cgroup driver end to end (`SystemdCgroup = true`, the default of most
//! distributions): a node whose init is systemd 252, running as PID 1 of private PID, mount,
//! cgroup, UTS and IPC namespaces with only the units it needs and dbus-daemon for the system
//! bus (`podsnap_tests::systemd`); containerd runs as its service, and both CRI handlers have
//! `SystemdCgroup = true` and `BinaryName` set to the node's runc, which is left off `PATH`
//! (bookworm's runc is what `PATH` finds there): kubelet's pod slices, runc's scopes through
//! D-Bus, and podsnap reading both from its handler's options.
//!
//! On the hybrid layout (v1 controllers, this machine's own) pods run, report statistics, are
//! dumped and restored under their slices, and a container over its memory limit is
//! OOM-killed and reported so. On cgroup v2 (cgroup2 alone in the namespaces) the same runs
//! with the stand-in runc that drops resource settings (`podsnap_tests::runc_v2`): on this
//! machine every controller stays bound to v1, so the v2 hierarchy has no memory controller
//! and neither memory statistics nor OOM kills can happen there (runc's error when a limit is
//! kept: `openat2 /sys/fs/cgroup/.../memory.max: no such file or directory`).
//!
//! Each test checks that its teardown leaves nothing: no process of systemd's namespaces (dbus
//! and containerd among them), no cgroup it made in the host's hierarchies (its own cgroup,
//! `system.slice`, `kubepods.slice`), no mount, and no `/run/systemd` on the host.

mod pod_checkpoint_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1 as cri;
use pod_checkpoint_support::*;
use podsnap_tests::host::CgroupMode;
use podsnap_tests::kubelet::{
    create_container, run_pod, run_three_container_pod, start_container, ContainerSpec, PodOptions,
};
use podsnap_tests::node::{Node, NodeOptions};
use podsnap_tests::runc_v2::{RuncV2, V2Plan};
use podsnap_tests::{handler, host, systemd};

/// A systemd node, on cgroup v2 alone when `cgroup2` (with the stand-in runc).
fn systemd_node(cgroup2: bool) -> (Node, Option<RuncV2>) {
    let mut options = NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    let stand_in = cgroup2.then(|| {
        RuncV2::new(
            Path::new(env!("CARGO_BIN_EXE_podsnap-test-runc")),
            V2Plan::of_host(),
        )
    });
    if let Some(runc) = &stand_in {
        options = runc.node_options(options);
    }
    options.systemd = true;
    let node = Node::start(options);
    let systemd = node.systemd().expect("the node's systemd");
    assert_eq!(
        systemd
            .systemctl(&["is-system-running"])
            .expect("is-system-running")
            .trim(),
        "running"
    );
    assert_eq!(
        systemd.property("dbus.service", "ActiveState").expect("dbus"),
        "active",
        "the system bus runs"
    );
    assert_eq!(
        CgroupMode::detect(&node.cgroup_root()),
        if cgroup2 {
            CgroupMode::Unified
        } else {
            CgroupMode::Hybrid
        }
    );
    // containerd runs as a service of that systemd.
    let unit = systemd
        .systemctl(&["list-units", "--plain", "--no-legend", "podsnap-containerd-*"])
        .expect("list-units");
    assert!(unit.contains("running"), "containerd's unit: {unit}");
    // CRI tells kubelet the driver from the default handler's options.
    let driver = node
        .cri()
        .runtime_config(cri::RuntimeConfigRequest {})
        .expect("RuntimeConfig")
        .linux
        .map(|l| l.cgroup_driver);
    assert_eq!(driver, Some(cri::CgroupDriver::Systemd as i32));
    (node, stand_in)
}

/// What the host's cgroup hierarchies hold at their roots and at the test process's cgroups,
/// and whether the host has `/run/systemd`: a teardown must leave them as they were.
fn host_cgroup_snapshot() -> (Vec<PathBuf>, bool) {
    let mut dirs = Vec::new();
    for h in systemd::hierarchies().expect("hierarchies") {
        for top in [h.mount_point.clone(), h.own_dir()] {
            for entry in std::fs::read_dir(&top).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(entry.path());
                }
            }
        }
    }
    dirs.sort();
    dirs.dedup();
    (dirs, Path::new("/run/systemd").exists())
}

/// Tears the node down and checks that nothing of it is left on the host.
fn teardown_leaves_nothing(mut node: Node, before: (Vec<PathBuf>, bool)) {
    let dir = node.dir().to_path_buf();
    let systemd_pid = node.systemd().map(|s| s.pid).expect("systemd");
    let cgroups = node.systemd().map(|s| s.cgroups.clone()).unwrap_or_default();
    let namespace = std::fs::read_link(format!("/proc/{systemd_pid}/ns/pid")).expect("its PID namespace");
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
    let left: Vec<i32> = host::processes()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok().as_ref() == Some(&namespace))
        .collect();
    assert!(
        left.is_empty(),
        "processes of the node's namespaces are left: {left:?}"
    );
    for cgroup in &cgroups {
        assert!(!cgroup.exists(), "{} is left", cgroup.display());
    }
    let after = host_cgroup_snapshot();
    let new: Vec<&PathBuf> = after.0.iter().filter(|d| !before.0.contains(d)).collect();
    assert!(new.is_empty(), "cgroups left in the host's hierarchies: {new:?}");
    assert_eq!(after.1, before.1, "/run/systemd on the host");
    assert!(
        host::mounts_under(&dir).is_empty(),
        "{:?}",
        host::mounts_under(&dir)
    );
    assert!(!dir.exists(), "{} is left", dir.display());
}

/// The scope runc made through systemd for container `id` of the pod `uid`: it is active, its
/// control group is inside the pod's slice, and it holds the container's process.
fn check_scope(node: &Node, uid: &str, id: &str) -> String {
    let systemd = node.systemd().expect("systemd");
    let unit = format!("cri-containerd-{id}.scope");
    assert_eq!(
        systemd.property(&unit, "ActiveState").expect("ActiveState"),
        "active",
        "{unit}"
    );
    let group = systemd.property(&unit, "ControlGroup").expect("ControlGroup");
    assert_eq!(
        group,
        format!(
            "/kubepods.slice/kubepods-besteffort.slice/{}/{unit}",
            podsnap_tests::kubelet::cgroup_parent(uid, true)
        )
    );
    // CRI's pid is the one of the node's PID namespace (containerd's): read the scope's
    // processes there too.
    let pid = node
        .cri()
        .container_pid(id)
        .expect("ContainerStatus")
        .expect("a running container has a pid");
    let procs = match CgroupMode::detect(&node.cgroup_root()) {
        CgroupMode::Unified => format!("/sys/fs/cgroup{group}/cgroup.procs"),
        _ => format!("/sys/fs/cgroup/memory{group}/cgroup.procs"),
    };
    let listed =
        podsnap_tests::command::run_within(systemd.command("cat").arg(&procs), Duration::from_secs(10))
            .expect("the scope's processes");
    assert!(
        listed.split_whitespace().any(|p| p == pid.to_string()),
        "pid {pid} in {procs}: {listed:?}"
    );
    group
}

/// CRI's statistics of a running container: CPU always, memory when the node has the
/// controller.
fn check_stats(node: &Node, id: &str, memory: bool) {
    let stats = node
        .cri()
        .container_stats(cri::ContainerStatsRequest {
            container_id: id.to_owned(),
        })
        .expect("ContainerStats")
        .stats
        .expect("stats present");
    let cpu = stats.cpu.and_then(|c| c.usage_core_nano_seconds).map(|v| v.value);
    assert!(cpu.unwrap_or(0) > 0, "cpu usage {cpu:?}");
    let working_set = stats.memory.and_then(|m| m.working_set_bytes).map(|v| v.value);
    if memory {
        assert!(working_set.unwrap_or(0) > 0, "memory working set {working_set:?}");
    }
    let metrics = node
        .ctr()
        .run(podsnap_tests::ctr::CRI_NAMESPACE, &["task", "metrics", id])
        .expect("ctr task metrics");
    assert!(metrics.contains("cpu"), "{metrics}");
    if memory {
        assert!(metrics.contains("memory"), "{metrics}");
    }
}

/// Runs the three-container pod, checks its scopes and statistics, dumps it, removes it,
/// restores it and checks the restored pod's scopes: what both layouts share.
fn pod_runs_dumps_and_restores_under_slices(node: &Node, memory: bool) {
    let pod = run_three_container_pod(node, &PodOptions::new(&node.unique("sd"), &handler()))
        .expect("the three-container pod runs on the systemd node");
    assert!(
        pod.pod.cgroup_parent().ends_with(".slice"),
        "{}",
        pod.pod.cgroup_parent()
    );
    let old_scope = check_scope(node, &pod.pod.uid, &pod.app_id);
    check_scope(node, &pod.pod.uid, &pod.sidecar_id);
    check_stats(node, &pod.app_id, memory);

    let before = mark_and_count(&pod);
    let outcome = dump(node, &pod, None).expect("podsnap dump on the systemd node");
    assert_eq!(outcome.summary.dumped, ["sidecar", "app"]);
    let manifest = verified(node, &outcome.summary.dir);
    // The runc that dumped is the node's (its BinaryName), not bookworm's on PATH.
    assert_eq!(
        manifest.host.runc_version.split('+').next(),
        Some(node.runc_version().to_string().as_str()),
        "{:?}",
        manifest.host
    );
    remove_original(node, &pod);
    let systemd = node.systemd().expect("systemd");
    assert_eq!(
        systemd
            .property(&format!("cri-containerd-{}.scope", pod.app_id), "ActiveState")
            .expect("ActiveState"),
        "inactive",
        "the removed pod's scopes are gone"
    );

    let restored = restore(node, &restore_request(node, &outcome.summary.dir)).expect("podsnap restore");
    let app_id = restored
        .containers
        .iter()
        .find(|(n, _)| n == "app")
        .map(|(_, id)| id.clone())
        .expect("a restored app");
    let sidecar_id = restored
        .containers
        .iter()
        .find(|(n, _)| n == "sidecar")
        .map(|(_, id)| id.clone())
        .expect("a restored sidecar");
    let volume = pods_dir(node)
        .join(&restored.uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(podsnap_tests::kubelet::DATA_VOLUME);
    check_restored(node, &restored.ip, &pod.pod.ip, &volume, &app_id, before);
    // The restored containers run in scopes of the new pod's slice.
    let new_scope = check_scope(node, &restored.uid, &app_id);
    check_scope(node, &restored.uid, &sidecar_id);
    assert_ne!(new_scope, old_scope);
    check_stats(node, &app_id, memory);
}

#[test]
fn the_systemd_driver_on_cgroup_v1_runs_dumps_restores_and_reports_oom() {
    let before = host_cgroup_snapshot();
    let (node, _) = systemd_node(false);
    pod_runs_dumps_and_restores_under_slices(&node, true);

    // A container over its memory limit (systemd's MemoryLimit on its scope): the kernel kills
    // it, the shim reports the OOM, and CRI says OOMKilled.
    let pod = run_pod(&node, &PodOptions::new(&node.unique("sdoom"), &handler())).expect("sandbox");
    let mut spec = ContainerSpec::workload(
        "hog",
        &["serve", "--name", "hog", "--port", "9191", "--ballast-mib", "128"],
    );
    spec.memory_limit = 32 << 20;
    let id = create_container(&node, &pod, &spec).expect("CreateContainer");
    start_container(&node, &id).expect("StartContainer");
    let status = node
        .cri()
        .wait_container_state(&id, cri::ContainerState::ContainerExited, Duration::from_secs(60))
        .expect("the hog exits");
    assert_eq!(status.reason, "OOMKilled", "{status:?}");
    teardown_leaves_nothing(node, before);
}

#[test]
fn the_systemd_driver_on_cgroup_v2_runs_dumps_and_restores_under_slices() {
    let before = host_cgroup_snapshot();
    let (node, _runc) = systemd_node(true);
    pod_runs_dumps_and_restores_under_slices(&node, false);
    teardown_leaves_nothing(node, before);
}
