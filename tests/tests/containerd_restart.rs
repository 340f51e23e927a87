//! containerd restarts under a running pod: the shim and the containers carry on, and
//! containerd reconnects to the shim.

use std::time::Duration;

use k8s_cri::v1 as cri;
use podsnap_tests::kubelet::{ask, run_three_container_pod, PodOptions, APP_PORT};
use podsnap_tests::{handler, host, shim_binary, start_node};

#[test]
fn containerd_restart() {
    let mut node = start_node!();
    let handler = handler();
    let options = PodOptions::new(&node.unique("restart"), &handler);
    let pod = run_three_container_pod(&node, &options).expect("the three-container pod runs");
    let shim = shim_binary(&handler);
    let shims = node.shim_pids(shim);
    assert_eq!(shims.len(), 1, "{shim} processes: {shims:?}");
    let app_pid = node
        .cri()
        .container_pid(&pod.app_id)
        .expect("app status")
        .expect("app pid");
    let before: u64 = ask(&pod.pod.ip, APP_PORT, "count")
        .expect("count")
        .parse()
        .expect("a number");
    let old_containerd = node.containerd_pid();

    node.restart_containerd().expect("containerd restarts");
    assert_ne!(node.containerd_pid(), old_containerd, "a new containerd process");

    // The shim and the containers survived.
    assert_eq!(
        node.shim_pids(shim),
        shims,
        "the same shim process serves the pod"
    );
    assert!(host::alive(app_pid), "the app process survived");
    let cri = node.cri().clone();
    for (name, id) in [("sidecar", &pod.sidecar_id), ("app", &pod.app_id)] {
        let status = cri.container(id).expect("ContainerStatus after restart");
        assert_eq!(
            status.state,
            cri::ContainerState::ContainerRunning as i32,
            "{name} state after restart"
        );
    }
    let init = cri.container(&pod.init_id).expect("init status after restart");
    assert_eq!(init.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(init.exit_code, 0);
    let sandbox = cri
        .pod_status(&pod.pod.id)
        .expect("PodSandboxStatus after restart");
    assert_eq!(
        sandbox.status.map(|s| s.state),
        Some(cri::PodSandboxState::SandboxReady as i32),
        "the sandbox is ready"
    );
    let after: u64 = ask(&pod.pod.ip, APP_PORT, "count")
        .expect("count")
        .parse()
        .expect("a number");
    assert!(after > before, "the app kept counting: {before} then {after}");

    // Events reach the new containerd: the shim's first forward after the restart fails on
    // the old connection, and the shim connects again (the containerd-shim crate's publisher
    // did not, and lost every event from then on).
    let watch = podsnap_tests::ctr::EventWatch::start(
        node.ctr()
            .command(podsnap_tests::ctr::CRI_NAMESPACE)
            .arg("events")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ctr events"),
    );
    watch.wait_subscribed(node.ctr(), podsnap_tests::ctr::CRI_NAMESPACE);

    // ExecSync goes through the reconnected shim.
    let answer = cri
        .exec(
            &pod.app_id,
            &["podsnap-workload", "client", "127.0.0.1:9090", "ping"],
            20,
        )
        .expect("ExecSync after restart");
    assert_eq!(
        answer.exit_code,
        0,
        "stderr: {}",
        String::from_utf8_lossy(&answer.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&answer.stdout), "pong sidecar\n");
    let events = watch.wait_for(&pod.app_id, "/tasks/exec-started");
    let topics = podsnap_tests::ctr::topics_for(&events, &pod.app_id);
    assert!(
        topics.iter().any(|t| t == "/tasks/exec-added") && topics.iter().any(|t| t == "/tasks/exec-started"),
        "the exec's events reached the restarted containerd: {topics:?}"
    );
    drop(watch);
    let stats = cri
        .container_stats(cri::ContainerStatsRequest {
            container_id: pod.app_id.clone(),
        })
        .expect("ContainerStats after restart");
    assert!(stats.stats.is_some());

    // The pod stops and goes away.
    cri.stop_and_remove_pod(&pod.pod.id)
        .expect("StopPodSandbox + RemovePodSandbox after restart");
    assert!(
        host::wait_gone(&[app_pid], Duration::from_secs(10)).is_empty(),
        "app process gone"
    );
    assert!(
        host::wait_gone(&shims, Duration::from_secs(10)).is_empty(),
        "the shim exits"
    );
    assert!(host::pod_cgroup_leftovers(&pod.pod.uid).is_empty());

    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}
