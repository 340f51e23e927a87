//! `ctr` against the runtime under test, the way an admin debugs a node: run with and without a
//! terminal, exec, kill, pause/resume, metrics, ps.

use std::time::{Duration, Instant};

use podsnap_tests::containerd_api::ContainerdApi;
use podsnap_tests::ctr::{Ctr, DEFAULT_NAMESPACE as NS};
use podsnap_tests::{handler, runtime_type, start_node, WORKLOAD_IMAGE};

/// Waits until `ctr task ls` shows `id` in `status`.
fn wait_status(ctr: &Ctr, id: &str, status: &str) {
    ctr.wait_task_status(NS, id, status, Duration::from_secs(20));
}

/// `ctr task ps` pids of a task.
fn task_pids(ctr: &Ctr, id: &str) -> Vec<i32> {
    ctr.run(NS, &["task", "ps", id])
        .expect("ctr task ps")
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn ctr_run() {
    let mut node = start_node!();
    let ctr = node.ctr().clone();
    let runtime = runtime_type(&handler());

    // A foreground run without a terminal: output comes back, the container is removed.
    let echo = node.unique("echo");
    let out = ctr
        .run(
            NS,
            &[
                "run",
                "--rm",
                "--runtime",
                runtime,
                WORKLOAD_IMAGE,
                &echo,
                "echo",
                "hi",
            ],
        )
        .expect("ctr run --rm echo hi");
    assert_eq!(out, "hi\n");
    assert!(
        !ctr.list_ids(NS, "containers").expect("ctr c ls").contains(&echo),
        "--rm removed it"
    );

    // A foreground run with a terminal (ctr needs one on its stdio): output comes back and the
    // process sees a tty.
    let tty = node.unique("tty");
    let answer = ctr
        .run_in_pty(
            NS,
            &[
                "run",
                "--rm",
                "-t",
                "--runtime",
                runtime,
                WORKLOAD_IMAGE,
                &tty,
                "sh",
                "-c",
                "tty; echo tty-out",
            ],
            Duration::from_secs(60),
        )
        .expect("ctr run -t");
    assert!(answer.status.success(), "ctr run -t: {:?}", answer);
    assert!(answer.output.contains("tty-out"), "output: {:?}", answer.output);
    assert!(
        answer.output.contains("/dev/pts/"),
        "the process has a terminal: {:?}",
        answer.output
    );

    // A detached container with a terminal: its process has the console as stdio.
    let detached_tty = node.unique("dtty");
    let started = ctr
        .run_in_pty(
            NS,
            &[
                "run",
                "-d",
                "-t",
                "--runtime",
                runtime,
                WORKLOAD_IMAGE,
                &detached_tty,
                "sh",
                "-c",
                "sleep 1000",
            ],
            Duration::from_secs(60),
        )
        .expect("ctr run -d -t");
    assert!(started.status.success(), "ctr run -d -t: {started:?}");
    wait_status(&ctr, &detached_tty, "RUNNING");
    let console = ctr
        .run(
            NS,
            &[
                "task",
                "exec",
                "--exec-id",
                "t1",
                &detached_tty,
                "readlink",
                "/proc/1/fd/0",
            ],
        )
        .expect("exec readlink");
    assert!(
        console.starts_with("/dev/pts/"),
        "stdin of the -t container: {console:?}"
    );
    ctr.run(NS, &["task", "kill", "-s", "SIGKILL", &detached_tty])
        .expect("kill the -t container");
    wait_status(&ctr, &detached_tty, "STOPPED");
    ctr.run(NS, &["task", "delete", &detached_tty])
        .expect("delete the -t task");
    ctr.run(NS, &["container", "rm", &detached_tty])
        .expect("rm the -t container");

    // A detached server.
    let server = node.unique("server");
    ctr.run(
        NS,
        &[
            "run",
            "-d",
            "--runtime",
            runtime,
            WORKLOAD_IMAGE,
            &server,
            "podsnap-workload",
            "serve",
            "--name",
            "server",
            "--port",
            "7070",
        ],
    )
    .expect("ctr run -d");
    wait_status(&ctr, &server, "RUNNING");

    // exec: output and exit code, without and with a terminal.
    let exec = ctr
        .output(
            NS,
            &[
                "task",
                "exec",
                "--exec-id",
                "x1",
                &server,
                "sh",
                "-c",
                "echo exec-out; exit 5",
            ],
        )
        .expect("ctr task exec");
    assert_eq!(exec.stdout, "exec-out\n", "stderr: {}", exec.stderr);
    assert_eq!(exec.status.code(), Some(5), "exec exit code");
    let count = ctr
        .run(
            NS,
            &[
                "task",
                "exec",
                "--exec-id",
                "x2",
                &server,
                "podsnap-workload",
                "client",
                "127.0.0.1:7070",
                "ping",
            ],
        )
        .expect("exec client");
    assert_eq!(count, "pong server\n");
    let tty_exec = ctr
        .run_in_pty(
            NS,
            &[
                "task",
                "exec",
                "-t",
                "--exec-id",
                "x3",
                &server,
                "sh",
                "-c",
                "tty; echo tty-exec",
            ],
            Duration::from_secs(30),
        )
        .expect("ctr task exec -t");
    assert!(tty_exec.status.success(), "{tty_exec:?}");
    assert!(
        tty_exec.output.contains("tty-exec") && tty_exec.output.contains("/dev/pts/"),
        "{tty_exec:?}"
    );

    // ps and metrics.
    let pids = task_pids(&ctr, &server);
    assert!(!pids.is_empty(), "ctr task ps lists the server");
    let metrics = ctr
        .run(NS, &["task", "metrics", &server])
        .expect("ctr task metrics");
    assert!(
        metrics.contains("memory") && metrics.contains("cpu"),
        "metrics: {metrics}"
    );

    // pause and resume.
    ctr.run(NS, &["task", "pause", &server]).expect("ctr task pause");
    wait_status(&ctr, &server, "PAUSED");
    ctr.run(NS, &["task", "resume", &server])
        .expect("ctr task resume");
    wait_status(&ctr, &server, "RUNNING");
    let after = ctr
        .run(
            NS,
            &[
                "task",
                "exec",
                "--exec-id",
                "x4",
                &server,
                "podsnap-workload",
                "client",
                "127.0.0.1:7070",
                "count",
            ],
        )
        .expect("exec after resume");
    assert!(
        after.trim().parse::<u64>().is_ok(),
        "count after resume: {after:?}"
    );

    // kill (SIGTERM by default): the server exits 0, then delete.
    ctr.run(NS, &["task", "kill", &server]).expect("ctr task kill");
    wait_status(&ctr, &server, "STOPPED");
    ctr.run(NS, &["task", "delete", &server])
        .expect("ctr task delete");
    ctr.run(NS, &["container", "rm", &server])
        .expect("ctr container rm");

    // kill --all: every process of the container gets the signal.
    let busy = node.unique("busy");
    ctr.run(
        NS,
        &[
            "run",
            "-d",
            "--runtime",
            runtime,
            WORKLOAD_IMAGE,
            &busy,
            "sh",
            "-c",
            "sleep 1000 & sleep 1000 & wait",
        ],
    )
    .expect("ctr run -d busy");
    wait_status(&ctr, &busy, "RUNNING");
    let deadline = Instant::now() + Duration::from_secs(10);
    while task_pids(&ctr, &busy).len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids = task_pids(&ctr, &busy);
    assert_eq!(pids.len(), 3, "sh and two sleeps: {pids:?}");
    ctr.run(NS, &["task", "kill", "--all", "-s", "SIGKILL", &busy])
        .expect("ctr task kill --all");
    wait_status(&ctr, &busy, "STOPPED");
    assert!(
        podsnap_tests::host::wait_gone(&pids, Duration::from_secs(10)).is_empty(),
        "every process of the container is gone"
    );
    ctr.run(NS, &["task", "delete", &busy])
        .expect("ctr task delete busy");
    ctr.run(NS, &["container", "rm", &busy])
        .expect("ctr container rm busy");

    assert!(ctr.list_ids(NS, "tasks").expect("ctr t ls").is_empty());
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

/// The memory cgroup (v1, this machine's layout) of `pid`.
fn memory_cgroup(pid: u32) -> std::path::PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/pid/cgroup");
    let path = text
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned()))
        .unwrap_or_else(|| panic!("no memory cgroup in {text}"));
    std::path::Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'))
}

/// Resource updates of one task at once (containerd's Tasks.Update from clients other than
/// CRI, which serializes its own per container) each succeed, the limit in force is one of
/// theirs, and no resources file is left in the bundle.
#[test]
fn updates_of_one_task_at_once_each_apply() {
    const ROUNDS: u64 = 12;
    const AT_ONCE: u64 = 4;
    let node = start_node!();
    let ctr = node.ctr().clone();
    let id = node.unique("update");
    ctr.run(
        NS,
        &[
            "run",
            "-d",
            "--runtime",
            runtime_type(&handler()),
            WORKLOAD_IMAGE,
            &id,
            "sleep",
            "1000",
        ],
    )
    .expect("ctr run -d");
    wait_status(&ctr, &id, "RUNNING");
    let api = ContainerdApi::connect(&node.files().socket(), NS).expect("containerd API");
    let pid = api.task(&id).expect("Tasks.Get").expect("the task").pid;
    let limit_file = memory_cgroup(pid).join("memory.limit_in_bytes");
    for round in 0..ROUNDS {
        let limits: Vec<u64> = (0..AT_ONCE).map(|k| (256 + round * 8 + k) << 20).collect();
        let resources: Vec<serde_json::Value> = limits
            .iter()
            .map(|l| serde_json::json!({ "memory": { "limit": l } }))
            .collect();
        let answers = api.update_at_once(&id, &resources);
        let failed: Vec<String> = answers
            .iter()
            .filter_map(|a| a.as_ref().err().map(|e| format!("{e:#}")))
            .collect();
        assert!(failed.is_empty(), "round {round}: updates failed: {failed:#?}");
        let now: u64 = std::fs::read_to_string(&limit_file)
            .expect("memory.limit_in_bytes")
            .trim()
            .parse()
            .expect("a number");
        assert!(
            limits.contains(&now),
            "round {round}: the limit {now} is none of {limits:?}"
        );
    }
    let bundle = node
        .dir()
        .join("state/io.containerd.runtime.v2.task")
        .join(NS)
        .join(&id);
    let left: Vec<String> = std::fs::read_dir(&bundle)
        .expect("the bundle")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("update-resources"))
        .collect();
    assert!(left.is_empty(), "left in the bundle: {left:?}");
    ctr.run(NS, &["task", "kill", "-s", "SIGKILL", &id])
        .expect("kill");
    wait_status(&ctr, &id, "STOPPED");
}
