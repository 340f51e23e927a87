//! Broken requests fail with clear errors and leave nothing behind; the rest keeps running.

use std::time::Duration;

use k8s_cri::v1 as cri;
use podsnap_tests::ctr::DEFAULT_NAMESPACE as NS;
use podsnap_tests::kubelet::{
    ask, create_container, run_three_container_pod, start_container, ContainerSpec, PodOptions, APP_PORT,
    SIDECAR_PORT,
};
use podsnap_tests::{handler, host, node, runtime_type, shim_binary, start_node, WORKLOAD_IMAGE};

#[test]
fn bad_input() {
    let mut node = start_node!();
    let handler = handler();
    let cri = node.cri().clone();
    let options = PodOptions::new(&node.unique("bad"), &handler);
    let pod = run_three_container_pod(&node, &options).expect("the three-container pod runs");
    let shims = node.shim_pids(shim_binary(&handler));

    // A container whose entrypoint does not exist: CreateContainer or StartContainer fails and
    // says which binary.
    let broken = ContainerSpec::workload("broken", &[]).with_command(&["/no/such/entrypoint"]);
    let failure = match create_container(&node, &pod.pod, &broken) {
        Err(status) => (None, status),
        Ok(id) => match start_container(&node, &id) {
            Err(status) => (Some(id), status),
            Ok(()) => panic!("StartContainer of a missing entrypoint succeeded"),
        },
    };
    let (broken_id, status) = failure;
    eprintln!(
        "broken entrypoint: {} failed: {}",
        if broken_id.is_some() {
            "StartContainer"
        } else {
            "CreateContainer"
        },
        status.message()
    );
    assert!(
        status.message().contains("/no/such/entrypoint"),
        "the error names the missing binary: {status:?}"
    );
    if let Some(id) = &broken_id {
        // Kubelet then sees it exited (StartError) and removes it.
        let seen = cri.container(id).expect("status of the failed container");
        assert_ne!(seen.state, cri::ContainerState::ContainerRunning as i32);
        cri.remove_container(cri::RemoveContainerRequest {
            container_id: id.clone(),
        })
        .expect("RemoveContainer of the failed container");
        let mounts: Vec<_> = host::mounts_under(node.dir())
            .into_iter()
            .filter(|m| m.to_string_lossy().contains(id.as_str()))
            .collect();
        assert!(mounts.is_empty(), "the failed container left mounts: {mounts:?}");
        let cgroups: Vec<_> = host::pod_cgroup_leftovers(&pod.pod.uid)
            .into_iter()
            .filter(|c| c.contains(id.as_str()))
            .collect();
        assert!(
            cgroups.is_empty(),
            "the failed container left cgroups: {cgroups:?}"
        );
        assert!(
            cri.container(id).is_err(),
            "the removed container is gone from CRI"
        );
        let state = host::paths_named_after(
            &[
                host::RUNC_ROOT_PARENTS[0],
                host::RUNC_ROOT_PARENTS[1],
                "/run/podsnap",
            ],
            &[id.as_str()],
        );
        assert!(
            state.is_empty(),
            "the failed container left runtime state: {state:?}"
        );
    }
    assert_eq!(
        node.shim_pids(shim_binary(&handler)),
        shims,
        "still one shim, the same"
    );
    // The others keep running.
    assert_eq!(
        ask(&pod.pod.ip, APP_PORT, "get 127.0.0.1:9090 ping").expect("app answers"),
        "pong sidecar"
    );
    assert!(ask(&pod.pod.ip, SIDECAR_PORT, "count").is_ok());

    // Exec of a missing binary: an error (or a failed exit) that names it.
    match cri.exec(&pod.app_id, &["/no/such/binary"], 10) {
        Err(status) => {
            eprintln!("exec of a missing binary: {}", status.message());
            assert!(status.message().contains("/no/such/binary"), "{status:?}")
        }
        Ok(answer) => {
            assert_ne!(answer.exit_code, 0, "exec of a missing binary succeeded");
            let stderr = String::from_utf8_lossy(&answer.stderr);
            assert!(stderr.contains("/no/such/binary"), "stderr: {stderr}");
        }
    }
    assert_eq!(
        cri.container(&pod.app_id).expect("app status").state,
        cri::ContainerState::ContainerRunning as i32,
        "the app survives a failed exec"
    );

    // ctr: kill of an unknown task, delete of a running task.
    let ctr = node.ctr().clone();
    let unknown = ctr
        .output(NS, &["task", "kill", "no-such-task"])
        .expect("ctr runs");
    assert!(!unknown.status.success(), "kill of an unknown task fails");
    assert!(unknown.stderr.contains("not found"), "stderr: {}", unknown.stderr);
    eprintln!("ctr task kill no-such-task: {}", unknown.stderr.trim());

    let runtime = runtime_type(&handler);
    let running = node.unique("running");
    ctr.run(
        NS,
        &[
            "run",
            "-d",
            "--runtime",
            runtime,
            WORKLOAD_IMAGE,
            &running,
            "podsnap-workload",
            "pause",
        ],
    )
    .expect("ctr run -d");
    let refused = ctr.output(NS, &["task", "delete", &running]).expect("ctr runs");
    assert!(!refused.status.success(), "delete of a running task fails");
    assert!(
        refused.stderr.contains("running") || refused.stderr.contains("stop"),
        "the error says the task runs: {}",
        refused.stderr
    );
    eprintln!("ctr task delete <running>: {}", refused.stderr.trim());
    // The refusal came back: the task runs on, its process alive (no later change can come
    // from a call that has answered).
    assert_eq!(
        ctr.task_status(NS, &running).expect("ctr task ls").as_deref(),
        Some("RUNNING")
    );
    let listing = ctr.run(NS, &["task", "ls"]).expect("ctr task ls");
    let pid: i32 = listing
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&running.as_str())).then(|| f.get(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no pid for {running} in {listing}"));
    assert!(
        podsnap_tests::host::alive(pid),
        "the refused delete left its process alive"
    );
    ctr.run(NS, &["task", "kill", &running]).expect("ctr task kill");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ctr.task_status(NS, &running).expect("ctr task ls").as_deref() != Some("STOPPED") {
        assert!(
            std::time::Instant::now() < deadline,
            "the pause process stops on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ctr.run(NS, &["task", "delete", &running])
        .expect("ctr task delete");
    ctr.run(NS, &["container", "rm", &running])
        .expect("ctr container rm");

    cri.stop_and_remove_pod(&pod.pod.id).expect("the pod stops");
    assert!(
        node::processes_rooted_under(node.dir()).is_empty(),
        "no container process left"
    );
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}
