//! The shim publishes task events to containerd: create, start, exec-added, exec-started,
//! paused, resumed, exit, delete, and OOM when the kernel kills in a container's memory cgroup.
//! Watched with `ctr events`, the way an admin would.

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podsnap_tests::ctr::DEFAULT_NAMESPACE as NS;
use podsnap_tests::{handler, runtime_type, start_node, WORKLOAD_IMAGE, WORKLOAD_IN_IMAGE};

/// `ctr events` running in the background, its lines collected; killed on drop.
struct EventWatch {
    child: Child,
    seen: Arc<Mutex<String>>,
}

impl EventWatch {
    fn start(mut child: Child) -> Self {
        let seen = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("ctr events stdout");
        let sink = seen.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut s = sink.lock().expect("events lock");
                s.push_str(&line);
                s.push('\n');
            }
        });
        Self { child, seen }
    }

    /// Everything printed so far.
    fn text(&self) -> String {
        self.seen.lock().expect("events lock").clone()
    }

    /// Waits (up to 20 s) until `topic` was seen for container `id`; returns all events.
    fn wait_for(&self, id: &str, topic: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.text();
            if topics_for(&text, id).iter().any(|t| t == topic) || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `ctr task ls` shows `id` in `status`.
fn wait_status(ctr: &podsnap_tests::ctr::Ctr, id: &str, status: &str) {
    ctr.wait_task_status(NS, id, status, Duration::from_secs(30));
}

/// The topics `ctr events` printed for container `id` (its lines name the topic and carry the
/// container id in the event body).
fn topics_for(events: &str, id: &str) -> Vec<String> {
    events
        .lines()
        .filter(|l| l.contains(id))
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("/tasks/"))
                .map(str::to_owned)
        })
        .collect()
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
    std::thread::sleep(Duration::from_millis(500));

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
