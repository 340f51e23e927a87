//! A three-container pod through CRI, made the way kubelet makes it, on the handler under test.

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use podsnap_tests::kubelet::{
    ask, parse_cri_log_line, run_three_container_pod, PodOptions, APP_PORT, SIDECAR_PORT,
};
use podsnap_tests::{handler, host, node, shim_binary, start_node};

#[test]
fn cri_pod() {
    let mut node = start_node!();
    let handler = handler();
    let cri = node.cri().clone();
    let options = PodOptions::new(&node.unique("webapp"), &handler);
    let pod = run_three_container_pod(&node, &options).expect("the three-container pod runs");
    let sandbox = &pod.pod;

    // Networking: an IP from our CNI bridge, a netns under /var/run/netns.
    assert!(
        !sandbox.ip.is_empty() && sandbox.ip.starts_with("10."),
        "pod IP {:?}",
        sandbox.ip
    );
    let netns = sandbox
        .netns
        .clone()
        .expect("the pod has a network namespace path");
    assert!(std::path::Path::new(&netns).exists(), "netns {netns} exists");

    // The init container ran once, exited 0, and is left exited.
    let init = cri.container(&pod.init_id).expect("init status");
    assert_eq!(init.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(init.exit_code, 0, "init exit code");
    let marker = std::fs::read_to_string(pod.volume.join("init.log")).expect("init marker");
    assert_eq!(marker.lines().count(), 1, "init marker: {marker:?}");

    // One pod network: the app reaches the sidecar on 127.0.0.1.
    assert_eq!(
        ask(&sandbox.ip, APP_PORT, "get 127.0.0.1:9090 ping").expect("app -> sidecar"),
        "pong sidecar"
    );
    // One IPC namespace: SysV and POSIX shared memory written by the sidecar, read by the app.
    assert_eq!(
        ask(&sandbox.ip, SIDECAR_PORT, "shm-write 4242 sysv-from-sidecar").expect("the workload answers"),
        "ok"
    );
    assert_eq!(
        ask(&sandbox.ip, APP_PORT, "shm-read 4242").expect("the workload answers"),
        "sysv-from-sidecar"
    );
    assert_eq!(
        ask(
            &sandbox.ip,
            SIDECAR_PORT,
            "posix-shm-write podsnap-test posix-from-sidecar"
        )
        .expect("the workload answers"),
        "ok"
    );
    assert_eq!(
        ask(&sandbox.ip, APP_PORT, "posix-shm-read podsnap-test").expect("the workload answers"),
        "posix-from-sidecar"
    );

    // ExecSync: output and exit codes.
    let count = || -> u64 {
        let answer = cri
            .exec(
                &pod.app_id,
                &["podsnap-workload", "client", "127.0.0.1:8080", "count"],
                20,
            )
            .expect("ExecSync client");
        assert_eq!(
            answer.exit_code,
            0,
            "stderr: {}",
            String::from_utf8_lossy(&answer.stderr)
        );
        String::from_utf8_lossy(&answer.stdout)
            .trim()
            .parse()
            .expect("count is a number")
    };
    let first = count();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut second = count();
    while second <= first {
        assert!(
            Instant::now() < deadline,
            "the app's counter advances: {first} then {second}"
        );
        std::thread::sleep(Duration::from_millis(50));
        second = count();
    }
    let three = cri
        .exec(&pod.app_id, &["sh", "-c", "exit 3"], 20)
        .expect("ExecSync exit 3");
    assert_eq!(three.exit_code, 3);
    let echo = cri
        .exec(&pod.sidecar_id, &["sh", "-c", "echo out; echo err >&2"], 20)
        .expect("ExecSync echo");
    assert_eq!(String::from_utf8_lossy(&echo.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&echo.stderr), "err\n");

    // Logs in CRI format at the path kubelet asked for.
    let app_log = sandbox.container_log("app");
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let text = std::fs::read_to_string(&app_log).unwrap_or_default();
        if text.contains("app count") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        log.contains("app serving on 0.0.0.0:8080"),
        "app log {}: {log:?}",
        app_log.display()
    );
    assert!(log.contains("app count"), "app log: {log:?}");
    for line in log.lines() {
        let parsed = parse_cri_log_line(line).expect("CRI log format");
        assert_eq!(parsed.stream, "stdout");
        assert_eq!(parsed.tag, "F");
    }
    let init_log = std::fs::read_to_string(sandbox.container_log("init")).unwrap_or_default();
    assert!(
        init_log.contains("init wrote /data/init.log"),
        "init log: {init_log:?}"
    );

    // Stats.
    let stats = cri
        .container_stats(cri::ContainerStatsRequest {
            container_id: pod.app_id.clone(),
        })
        .expect("ContainerStats")
        .stats
        .expect("stats present");
    let cpu = stats.cpu.and_then(|c| c.usage_core_nano_seconds).map(|v| v.value);
    let memory = stats.memory.and_then(|m| m.working_set_bytes).map(|v| v.value);
    assert!(cpu.unwrap_or(0) > 0, "cpu usage {cpu:?}");
    assert!(memory.unwrap_or(0) > 0, "memory working set {memory:?}");

    // ListContainers shows each container's state.
    let listed = cri.pod_containers(&sandbox.id).expect("ListContainers");
    assert_eq!(listed.len(), 3, "{listed:?}");
    for (name, id) in pod.containers() {
        let container = listed.iter().find(|c| c.id == id).expect("listed");
        let expected = if name == "init" {
            cri::ContainerState::ContainerExited
        } else {
            cri::ContainerState::ContainerRunning
        };
        assert_eq!(container.state, expected as i32, "{name}");
        assert_eq!(container.metadata.as_ref().map(|m| m.name.as_str()), Some(name));
    }

    // Pulls never leave the machine: the node's registry config sends them to 127.0.0.1:9.
    let started = Instant::now();
    let pull = node.cri().pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: "docker.io/library/busybox:latest".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let refused = pull.expect_err("no registry is reachable");
    assert!(
        refused.message().contains("127.0.0.1:9"),
        "the pull went elsewhere: {refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a pull fails at once"
    );

    // One shim process for the whole pod.
    let shim = shim_binary(&handler);
    let shims = node.shim_pids(shim);
    assert_eq!(shims.len(), 1, "{shim} processes for one pod: {shims:?}");

    // Stop and remove: nothing of the pod is left.
    let mut pids: Vec<i32> = [&pod.sidecar_id, &pod.app_id]
        .iter()
        .filter_map(|id| cri.container_pid(id).ok().flatten())
        .collect();
    pids.extend(cri.sandbox_pid(&sandbox.id).ok().flatten());
    assert_eq!(pids.len(), 3, "pids of pause, sidecar and app: {pids:?}");
    cri.stop_and_remove_pod(&sandbox.id)
        .expect("StopPodSandbox + RemovePodSandbox");
    assert!(cri.pod_ids().expect("ListPodSandbox").is_empty(), "no pod listed");
    assert!(
        host::wait_gone(&pids, Duration::from_secs(10)).is_empty(),
        "container processes gone"
    );
    assert!(
        host::wait_gone(&shims, Duration::from_secs(10)).is_empty(),
        "the pod's shim exits"
    );
    assert!(
        node::processes_rooted_under(node.dir()).is_empty(),
        "no process in the pod's rootfs"
    );
    let ids = [&sandbox.id, &pod.init_id, &pod.sidecar_id, &pod.app_id];
    let mounts: Vec<_> = host::mounts_under(node.dir())
        .into_iter()
        .filter(|m| ids.iter().any(|id| m.to_string_lossy().contains(id.as_str())))
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let cgroups = host::pod_cgroup_leftovers(&sandbox.uid);
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    assert!(!std::path::Path::new(&netns).exists(), "netns {netns} removed");
    let socket = host::shim_socket(&node.address(), "k8s.io", &sandbox.id);
    assert!(!socket.exists(), "shim socket {} removed", socket.display());
    let state = host::paths_named_after(
        &[
            host::RUNC_ROOT_PARENTS[0],
            host::RUNC_ROOT_PARENTS[1],
            "/run/podsnap",
        ],
        &ids.iter().map(|id| id.as_str()).collect::<Vec<_>>(),
    );
    assert!(state.is_empty(), "runtime state left: {state:?}");
    assert!(
        host::remove_pod_cgroups(&sandbox.uid).is_empty(),
        "pod cgroups removable"
    );

    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}
