//! Several pods at one instant (issue 22, items 4 and 5), against the real stack: two pods of
//! one "StatefulSet" (`<set>-0` a server, `<set>-1` a client holding a TCP connection to the
//! server's pod IP, both counting), dumped by one `podsnap dump --selector`; their frozen
//! windows, seen from outside (freezer state and ptrace, sampled every millisecond), overlap;
//! restored in place with `--keep-ip`: ordinal 0 first, ordinal 1 only once 0's readiness
//! command (`podsnap.io/readiness-exec`) passes, and the same connection carries on. And a group one of whose pods cannot be dumped: refused naming it, every pod
//! running on, nothing kept.

#[allow(dead_code)]
#[path = "../benches/common/observer.rs"]
mod observer;
mod pod_checkpoint_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use observer::{Observer, Watched};
use pod_checkpoint_support::*;
use podsnap_tests::kubelet::{
    ask, remove_pod, run_container, run_pod, wait_answering, ContainerSpec, KubePod, PodOptions, APP_PORT,
};
use podsnap_tests::node::{Node, NodeOptions};
use podsnap_tests::HANDLER;

fn workload_node() -> Node {
    Node::start(NodeOptions::new(PathBuf::from(env!(
        "CARGO_BIN_EXE_podsnap-workload"
    ))))
}

/// A pod of the set, labelled `group=<set>`, its one container `app` serving and counting.
fn member(node: &Node, set: &str, ordinal: u32, volume: Option<&Path>) -> (KubePod, String) {
    member_with(node, set, ordinal, volume, &[])
}

fn member_with(
    node: &Node,
    set: &str,
    ordinal: u32,
    volume: Option<&Path>,
    annotations: &[(&str, &str)],
) -> (KubePod, String) {
    let name = format!("{set}-{ordinal}");
    let mut options = PodOptions::new(&name, HANDLER);
    options.labels.insert("group".to_owned(), set.to_owned());
    for (k, v) in annotations {
        options.annotations.insert((*k).to_owned(), (*v).to_owned());
    }
    let pod = run_pod(node, &options).expect("the pod runs");
    let port = APP_PORT.to_string();
    let mut spec = ContainerSpec::workload(
        "app",
        &["serve", "--name", &name, "--port", &port, "--interval-ms", "20"],
    );
    if let Some(v) = volume {
        spec = spec.with_host_path(v, "/data", false);
    }
    let id = run_container(node, &pod, &spec).expect("the app runs");
    wait_answering(&pod.ip, APP_PORT, Duration::from_secs(20)).expect("the app answers");
    (pod, id)
}

const READY: &str = "podsnap.io/readiness-exec";

/// The id of the running `app` container of the ready pod named `name`, if there is one.
fn running_app(node: &Node, name: &str) -> Option<String> {
    let pods = node
        .cri()
        .list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest { filter: None })
        .ok()?
        .items;
    let pod = pods.into_iter().find(|p| {
        p.state == k8s_cri::v1::PodSandboxState::SandboxReady as i32
            && p.metadata.as_ref().is_some_and(|m| m.name == name)
    })?;
    node.cri()
        .pod_containers(&pod.id)
        .ok()?
        .into_iter()
        .find(|c| {
            c.state == k8s_cri::v1::ContainerState::ContainerRunning as i32
                && c.metadata.as_ref().is_some_and(|m| m.name == "app")
        })
        .map(|c| c.id)
}

/// Polls `found` every 50 ms until it gives something or `timeout` passes.
fn wait_for<T>(timeout: Duration, mut found: impl FnMut() -> Option<T>) -> Option<T> {
    let until = std::time::Instant::now() + timeout;
    loop {
        if let Some(t) = found() {
            return Some(t);
        }
        if std::time::Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count(ip: &str) -> u64 {
    ask(ip, APP_PORT, "count")
        .expect("count")
        .trim()
        .parse()
        .expect("a number")
}

/// The value after `key` in `line` (`... key VALUE ...`).
fn word_after<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .skip_while(|w| *w != key)
        .nth(1)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

fn podsnap(node: &Node, args: &[&str]) -> (bool, String, String) {
    let out = podsnap_tests::cli::podsnap(node, &podsnap_binary(), args);
    let (stdout, stderr) = podsnap_tests::cli::text(&out);
    (out.status.success(), stdout, stderr)
}

#[test]
fn a_statefulset_dumped_at_one_instant_comes_back_in_order_with_its_connection() {
    let node = workload_node();
    let set = node.unique("web");
    // web-0 is ready once /tmp/ready exists in its app (the test makes it, below).
    let (web0, app0) = member_with(
        &node,
        &set,
        0,
        None,
        &[(READY, "app: /bin/busybox test -e /tmp/ready")],
    );
    let (web1, app1) = member(&node, &set, 1, None);
    // web-1 holds a connection to web-0's pod IP, checked once.
    let connect = format!("peer-connect tcp {}:{APP_PORT}", web0.ip);
    assert_eq!(
        ask(&web1.ip, APP_PORT, &connect).expect("peer-connect").trim(),
        "ok"
    );
    let first = ask(&web1.ip, APP_PORT, "peer-check").expect("peer-check");
    assert!(first.contains("checks 1 reply pong"), "{first}");
    let local = word_after(&first, "local").to_owned();
    let before = (count(&web0.ip), count(&web1.ip));

    let dir = node.files().checkpoints().join("set");
    let watching = Observer::start(vec![
        Watched::container(&web0.uid, &app0, "web-0"),
        Watched::container(&web1.uid, &app1, "web-1"),
    ]);
    let selector = format!("group={set}");
    let (ok, stdout, stderr) = podsnap(
        &node,
        &[
            "dump",
            "--selector",
            &selector,
            "--tcp-established",
            "--dir",
            &dir.to_string_lossy(),
        ],
    );
    let windows = watching.stop();
    assert!(ok, "group dump: {stdout}{stderr}");
    assert!(stdout.contains(&format!("--- pod default/{set}-0")), "{stdout}");
    assert!(stdout.contains(&format!("--- pod default/{set}-1")), "{stdout}");
    let group: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("group.json")).expect("group.json")).expect("json");
    assert_eq!(group["pods"].as_array().map(Vec::len), Some(2), "{group}");
    for p in ["0", "1"] {
        assert!(
            dir.join(format!("{set}-{p}")).join("manifest.json").exists(),
            "pod {p}'s part is a pod checkpoint"
        );
    }
    assert!(!dir.join(".meet").exists(), "the meeting place is gone");
    // The node's list shows each pod's part as a checkpoint of its own.
    let listed = podsnap_tests::cli::list_json(&node, &podsnap_binary());
    for p in ["0", "1"] {
        let name = format!("set/{set}-{p}");
        assert!(
            listed
                .iter()
                .any(|r| r["name"] == name.as_str() && r["problem"].is_null() && r["pod"].is_string()),
            "{name} in {listed:?}"
        );
    }
    // Each pod was frozen before either was thawed: their windows overlap.
    let seen = &windows.containers;
    let (first, last) = (
        seen.iter().filter_map(|s| s.first).fold(f64::MIN, f64::max),
        seen.iter().filter_map(|s| s.last).fold(f64::MAX, f64::min),
    );
    assert!(
        seen.iter().all(|s| s.first.is_some()) && first < last,
        "the pods' frozen windows do not overlap: {seen:?}"
    );
    eprintln!(
        "frozen windows: {} ; overlap {:.3} s, snapshot spread {:.3} s",
        seen.iter()
            .map(|s| format!(
                "{} {:.3}-{:.3} s",
                s.name,
                s.first.unwrap_or(0.0),
                s.last.unwrap_or(0.0)
            ))
            .collect::<Vec<_>>()
            .join(", "),
        last - first,
        first - seen.iter().filter_map(|s| s.first).fold(f64::MAX, f64::min)
    );

    // The originals go; the group comes back in place, keeping the pods' addresses.
    remove_pod(&node, &web0).expect("web-0 removed");
    remove_pod(&node, &web1).expect("web-1 removed");
    let kubelet = node.files().kubelet();
    let (pods, logs) = (kubelet.join("pods"), kubelet.join("logs/pods"));
    let restore_args = [
        "restore",
        "--checkpoint-dir",
        &dir.to_string_lossy(),
        "--keep-ip",
        "--pods-dir",
        &pods.to_string_lossy(),
        "--logs-dir",
        &logs.to_string_lossy(),
    ]
    .map(|a| a.to_string());
    let (ok, stdout, stderr) = std::thread::scope(|scope| {
        let restoring = scope.spawn(|| {
            let args: Vec<&str> = restore_args.iter().map(String::as_str).collect();
            podsnap(&node, &args)
        });
        // web-0 comes back; web-1 waits while web-0 is not ready.
        let app = wait_for(Duration::from_secs(60), || {
            running_app(&node, &format!("{set}-0"))
        })
        .expect("web-0's app runs again");
        let not_yet = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < not_yet {
            assert!(
                running_app(&node, &format!("{set}-1")).is_none() && !restoring.is_finished(),
                "web-1 came back before web-0 was ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let touched = node
            .cri()
            .exec(&app, &["/bin/busybox", "touch", "/tmp/ready"], 10)
            .expect("exec");
        assert_eq!(touched.exit_code, 0, "touch /tmp/ready");
        restoring.join().expect("the restore thread")
    });
    // Every pod it made is the node's to remove, whatever happens next.
    let restored: Vec<(String, String)> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("pod          "))
        .zip(stdout.lines().filter_map(|l| l.strip_prefix("id           ")))
        .map(|(pod, id)| {
            let uid = pod
                .rsplit_once("(uid ")
                .and_then(|(_, u)| u.strip_suffix(')'))
                .expect("the uid")
                .to_owned();
            (uid, id.trim().to_owned())
        })
        .collect();
    for (uid, id) in &restored {
        let netns = node.cri().pod_netns(id).ok().flatten();
        node.record_pod(uid, netns.as_deref())
            .expect("record the restored pod");
    }
    assert!(ok, "group restore: {stdout}{stderr}");
    assert_eq!(restored.len(), 2, "{stdout}");
    let (at0, at1) = (
        stdout
            .find(&format!("--- pod default/{set}-0"))
            .expect("web-0 restored"),
        stdout
            .find(&format!("--- pod default/{set}-1"))
            .expect("web-1 restored"),
    );
    assert!(at0 < at1, "ordinal 0 comes back first: {stdout}");
    let ready = stdout[at0..at1]
        .lines()
        .find_map(|l| l.strip_prefix("ready        "))
        .unwrap_or_else(|| panic!("web-0's readiness is reported before web-1: {stdout}"));
    assert!(
        ready.starts_with("app: /bin/busybox test -e /tmp/ready passed (attempt ")
            && !ready.contains("(attempt 1,"),
        "it failed until the file was made, then passed: {ready}"
    );
    // web-1's app started only once web-0's ran.
    let started = |sandbox: &str| {
        let c = node
            .cri()
            .pod_containers(sandbox)
            .expect("the restored pod's containers")
            .into_iter()
            .find(|c| c.metadata.as_ref().is_some_and(|m| m.name == "app"))
            .expect("its app");
        node.cri().container(&c.id).expect("ContainerStatus").started_at
    };
    let (s0, s1) = (started(&restored[0].1), started(&restored[1].1));
    assert!(s0 > 0 && s1 >= s0, "web-1 started at {s1}, before web-0 at {s0}");

    wait_answering(&web0.ip, APP_PORT, Duration::from_secs(20)).expect("web-0 answers at its address");
    wait_answering(&web1.ip, APP_PORT, Duration::from_secs(20)).expect("web-1 answers at its address");
    let again = ask(&web1.ip, APP_PORT, "peer-check").expect("peer-check after the restore");
    assert!(
        again.contains("checks 2 reply pong") && word_after(&again, "local") == local,
        "the same connection carries on ({local}): {again}"
    );
    assert!(
        count(&web0.ip) >= before.0 && count(&web1.ip) >= before.1,
        "both counters go on"
    );
}

#[test]
fn a_group_with_a_pod_that_cannot_be_dumped_is_refused_and_every_pod_runs_on() {
    let node = workload_node();
    let set = node.unique("db");
    let disk = tempfile::tempdir().expect("a host directory");
    std::fs::write(disk.path().join("data"), vec![7u8; 8192]).expect("data");
    node.set_podsnap_config("[dump]\ncarry_volumes_max_bytes = 4096\n")
        .expect("config");
    let (db0, _) = member(&node, &set, 0, None);
    let (db1, _) = member(&node, &set, 1, Some(disk.path()));

    // A pod that is not there: refused before anything, naming it.
    let missing = format!("{set}-9");
    let (ok, stdout, stderr) = podsnap(&node, &["dump", "--pod", &db0.name, "--pod", &missing]);
    assert!(!ok, "{stdout}");
    assert!(stderr.contains(&missing), "{stderr}");

    // db-1's volume is over the node's bound: its shim refuses; db-0, held waiting for it,
    // gives up; both run on and nothing is kept.
    let dir = node.files().checkpoints().join("refused");
    let before = (count(&db0.ip), count(&db1.ip));
    let (ok, stdout, stderr) = podsnap(
        &node,
        &[
            "dump",
            "--pod",
            &db0.name,
            "--pod",
            &db1.name,
            "--volumes",
            "local",
            "--dir",
            &dir.to_string_lossy(),
        ],
    );
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains(&format!("pod default/{}", db1.name)) && stderr.contains("carry_volumes_max_bytes"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was kept"), "{stderr}");
    assert!(!dir.exists(), "a refused group leaves no directory");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while count(&db0.ip) <= before.0 + 5 || count(&db1.ip) <= before.1 + 5 {
        assert!(std::time::Instant::now() < deadline, "the pods do not run on");
        std::thread::sleep(Duration::from_millis(50));
    }
}
