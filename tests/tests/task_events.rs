//! The shim publishes task events to containerd: create, start, exec-added, exec-started,
//! paused, resumed, exit, delete, and OOM when the kernel kills in a container's memory cgroup.
//! Watched with `ctr events`, the way an admin would.

use std::process::Stdio;
use std::time::Duration;

use podsnap_tests::ctr::{topics_for, EventWatch, DEFAULT_NAMESPACE as NS};
use podsnap_tests::{handler, runtime_type, start_node, WORKLOAD_IMAGE, WORKLOAD_IN_IMAGE};

/// Waits until `ctr task ls` shows `id` in `status`.
fn wait_status(ctr: &podsnap_tests::ctr::Ctr, id: &str, status: &str) {
    ctr.wait_task_status(NS, id, status, Duration::from_secs(30));
}

#[test]
fn task_events() {
    let node = start_node!();
    let ctr = node.ctr().clone();
    let runtime = runtime_type(&handler());
    let watch = EventWatch::start(
        ctr.command(NS)
            .arg("events")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events"),
    );
    watch.wait_subscribed(&ctr, NS);

    // A long-running task through its whole life.
    let id = node.unique("events");
    ctr.run(
        NS,
        &[
            "run",
            "-d",
            "--runtime",
            runtime,
            WORKLOAD_IMAGE,
            &id,
            "sleep",
            "300",
        ],
    )
    .expect("ctr run -d");
    wait_status(&ctr, &id, "RUNNING");
    ctr.run(NS, &["task", "exec", "--exec-id", "e1", &id, "true"])
        .expect("ctr task exec");
    ctr.run(NS, &["task", "pause", &id]).expect("pause");
    wait_status(&ctr, &id, "PAUSED");
    ctr.run(NS, &["task", "resume", &id]).expect("resume");
    wait_status(&ctr, &id, "RUNNING");
    ctr.run(NS, &["task", "kill", "-s", "KILL", &id]).expect("kill");
    wait_status(&ctr, &id, "STOPPED");
    ctr.run(NS, &["task", "delete", &id]).expect("task delete");
    ctr.run(NS, &["container", "delete", &id])
        .expect("container delete");

    // A task that outgrows its memory limit: the kernel kills it, the shim says OOM.
    let oom = node.unique("oom");
    ctr.run(
        NS,
        &[
            "run",
            "-d",
            "--runtime",
            runtime,
            "--memory-limit",
            "33554432",
            WORKLOAD_IMAGE,
            &oom,
            WORKLOAD_IN_IMAGE,
            "serve",
            "--name",
            "oom",
            "--port",
            "8089",
            "--ballast-mib",
            "128",
        ],
    )
    .expect("ctr run -d with a memory limit");
    wait_status(&ctr, &oom, "STOPPED");
    watch.wait_for(&id, "/tasks/delete");
    let events = watch.wait_for(&oom, "/tasks/oom");

    let life = topics_for(&events, &id);
    let expected = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/delete",
    ];
    for topic in expected {
        assert!(
            life.iter().any(|t| t == topic),
            "no {topic} event for {id}; saw {life:?}\n--- ctr events ---\n{events}"
        );
    }
    let position = |topic: &str| life.iter().position(|t| t == topic).unwrap_or(usize::MAX);
    assert!(position("/tasks/create") < position("/tasks/start"), "{life:?}");
    assert!(
        position("/tasks/exec-added") < position("/tasks/exec-started"),
        "{life:?}"
    );
    assert!(position("/tasks/paused") < position("/tasks/resumed"), "{life:?}");
    assert!(
        life.iter().rposition(|t| t == "/tasks/exit") < Some(position("/tasks/delete")),
        "{life:?}"
    );

    let oomed = topics_for(&events, &oom);
    assert!(
        oomed.iter().any(|t| t == "/tasks/oom"),
        "no /tasks/oom event for {oom}; saw {oomed:?}\n--- ctr events ---\n{events}"
    );
    let status = ctr.run(NS, &["task", "ls"]).expect("task ls");
    assert!(status.contains(&oom), "{status}");
    ctr.run(NS, &["task", "delete", &oom])
        .expect("delete the OOM-killed task");
}
