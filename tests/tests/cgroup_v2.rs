//! cgroup v2 end to end on any host (`podsnap_tests::runc_v2::V2Plan`): on a unified host
//! containerd, the podsnap shim, runc and CRIU run as they are; on a hybrid or v1 host (these
//! machines) in a private mount namespace with cgroup2 on `/sys/fs/cgroup`
//! (`NodeOptions::cgroup2`). Where the cgroup2 root offers the cpu, memory and pids
//! controllers, the real runc runs and the resources (ctr's and CRI's CPU and memory settings,
//! an Update) are checked in the containers' cgroups, before and after checkpoint and restore;
//! where it offers none (these machines), `runc` on their `PATH` is the test-only stand-in
//! that drops the resource settings and the tests check what it dropped. What is real either
//! way: the cgroup2 hierarchy, the containers' cgroups in it, the freeze through
//! `cgroup.freeze`, runc (1.3 or 1.1.5, as the suite runs), CRIU, containerd, the shim.

mod pod_checkpoint_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pod_checkpoint_support::*;
use podsnap_tests::containerd_api::{CheckpointOptions, ContainerdApi};
use podsnap_tests::ctr::{Ctr, CRI_NAMESPACE, DEFAULT_NAMESPACE as NS};
use podsnap_tests::host::CgroupMode;
use podsnap_tests::kubelet::{run_three_container_pod, PodOptions};
use podsnap_tests::node::{Node, NodeOptions};
use podsnap_tests::runc_v2::{RuncV2, V2Plan};
use podsnap_tests::{runtime_type, HANDLER, WORKLOAD_IMAGE};

const PORT: u16 = 7070;

fn v2_node(extra_env: &[(&str, &str)]) -> (Node, RuncV2) {
    let plan = V2Plan::of_host();
    eprintln!("cgroup v2 node on this host: {plan:?}");
    let runc = RuncV2::new(Path::new(env!("CARGO_BIN_EXE_podsnap-test-runc")), plan);
    let mut options = runc.node_options(NodeOptions::new(PathBuf::from(env!(
        "CARGO_BIN_EXE_podsnap-workload"
    ))));
    options
        .extra_env
        .extend(extra_env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let node = Node::start(options);
    // The node really is a v2 node: the host's own layout, or a private namespace's on a host
    // that is not unified (the test process keeps the host's).
    assert_eq!(CgroupMode::detect(&node.cgroup_root()), CgroupMode::Unified);
    assert_eq!(
        CgroupMode::detect(Path::new("/sys/fs/cgroup")) == CgroupMode::Unified,
        !plan.private_namespace,
        "the test process keeps the host's layout"
    );
    (node, runc)
}

/// A number in a cgroup file (`max` is `None`).
fn cgroup_value(dir: &Path, file: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()));
    text.trim().parse().ok()
}

/// runc's cgroup v2 weight for CPU shares (`1 + (shares - 2) * 9999 / 262142`).
fn cpu_weight(shares: u64) -> u64 {
    1 + (shares - 2) * 9999 / 262142
}

/// The CPU shares and memory limit a container is run with where the node can take them.
const SHARES: u64 = 512;
const MEMORY: u64 = 256 << 20;

/// The pid of task `id` (`ctr task ls`).
fn task_pid(ctr: &Ctr, namespace: &str, id: &str) -> i32 {
    let listing = ctr.run(namespace, &["task", "ls"]).expect("ctr task ls");
    listing
        .lines()
        .skip(1)
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.first() == Some(&id)).then(|| fields.get(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no task {id} in {listing}"))
}

/// The v2 cgroup of `pid` as the node sees it: `/proc/<pid>/cgroup`'s `0::` line under the
/// node's cgroup2 mount.
fn v2_cgroup(node: &Node, pid: i32) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/pid/cgroup");
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no v2 line in {text}"));
    assert_ne!(
        path, "/",
        "pid {pid} sits in the cgroup2 root: runc did not place it"
    );
    let dir = node.cgroup_root().join(path.trim_start_matches('/'));
    assert!(
        dir.join("cgroup.freeze").is_file(),
        "{} is no v2 cgroup",
        dir.display()
    );
    dir
}

/// `frozen` of the cgroup's `cgroup.events`.
fn frozen(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("cgroup.events")).expect("cgroup.events");
    text.lines()
        .find_map(|l| l.strip_prefix("frozen ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no frozen line in {text}"))
}

fn ask(ctr: &Ctr, id: &str, command: &str) -> String {
    ctr.ask_workload(NS, id, PORT, command)
        .unwrap_or_else(|e| panic!("{command} to {id}: {e}"))
}

fn count(ctr: &Ctr, id: &str) -> u64 {
    ask(ctr, id, "count").parse().expect("a count")
}

/// Waits (at most 30 s) until `id` answers and counts at least `n`.
fn wait_count(ctr: &Ctr, id: &str, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(reply) = ctr.ask_workload(NS, id, PORT, "count") {
            if let Ok(c) = reply.parse::<u64>() {
                if c >= n {
                    return c;
                }
            }
        }
        assert!(Instant::now() < deadline, "{id} never counted {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ctr run -d` of a counting server on the host's network: a netns made now would not reach
/// the node's private mount namespace, and runc restores a private one empty (loopback down).
/// With `resources`, ctr is given CPU shares and a memory limit ([`SHARES`], [`MEMORY`]).
fn run_server(ctr: &Ctr, id: &str, resources: bool) {
    let port = PORT.to_string();
    let (shares, memory) = (SHARES.to_string(), MEMORY.to_string());
    let mut args = vec!["run", "-d", "--net-host", "--runtime", runtime_type(HANDLER)];
    if resources {
        args.extend(["--cpu-shares", &shares, "--memory-limit", &memory]);
    }
    args.extend([
        WORKLOAD_IMAGE,
        id,
        "podsnap-workload",
        "serve",
        "--name",
        id,
        "--port",
        &port,
    ]);
    ctr.run(NS, &args).expect("ctr run on the v2 node");
}

/// The container's resources are in its cgroup: [`SHARES`] as `cpu.weight`, [`MEMORY`] as
/// `memory.max`.
fn assert_resources(cgroup: &Path, what: &str) {
    assert_eq!(
        (
            cgroup_value(cgroup, "cpu.weight"),
            cgroup_value(cgroup, "memory.max")
        ),
        (Some(cpu_weight(SHARES)), Some(MEMORY)),
        "{what}: the resources in {}",
        cgroup.display()
    );
}

fn shim_log_lines(node: &Node, needle: &str) -> usize {
    std::fs::read_to_string(node.files().log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn a_container_on_cgroup_v2_pauses_execs_reports_v2_metrics_and_checkpoints() {
    let (node, runc) = v2_node(&[]);
    let resources = runc.plan().resources;
    let ctr = node.ctr().clone();
    let id = node.unique("v2");
    run_server(&ctr, &id, resources);
    ctr.wait_task_status(NS, &id, "RUNNING", Duration::from_secs(30));
    wait_count(&ctr, &id, 3);
    let cgroup = v2_cgroup(&node, task_pid(&ctr, NS, &id));
    if resources {
        // runc wrote ctr's CPU shares and memory limit; an Update changes the limit.
        assert_resources(&cgroup, "created");
        let api = ContainerdApi::connect(&node.files().socket(), NS).expect("containerd API");
        let raised = MEMORY * 2;
        let answers = api.update_at_once(&id, &[serde_json::json!({ "memory": { "limit": raised } })]);
        assert!(answers.iter().all(Result::is_ok), "Update: {answers:?}");
        assert_eq!(cgroup_value(&cgroup, "memory.max"), Some(raised), "updated");
    } else {
        // What the stand-in runc dropped: ctr's default 1024 CPU shares, which runc would
        // write as cpu.weight.
        let created = runc.lines();
        assert!(
            created
                .iter()
                .any(|l| l.starts_with(&format!("create {id} dropped: ")) && l.contains("cpu=")),
            "{created:?}"
        );
    }

    // Pause and resume: cgroup.freeze through runc, seen in cgroup.events.
    assert_eq!(frozen(&cgroup), 0);
    ctr.run(NS, &["task", "pause", &id]).expect("ctr task pause");
    assert_eq!(frozen(&cgroup), 1, "paused: the v2 cgroup is frozen");
    assert_eq!(ctr.task_status(NS, &id).expect("ls").as_deref(), Some("PAUSED"));
    ctr.run(NS, &["task", "resume", &id]).expect("ctr task resume");
    assert_eq!(frozen(&cgroup), 0);
    let resumed = count(&ctr, &id);
    wait_count(&ctr, &id, resumed + 2);

    // Exec: runc exec puts the process into the container's v2 cgroup.
    let exec = ctr
        .run(
            NS,
            &["task", "exec", "--exec-id", "cg", &id, "cat", "/proc/self/cgroup"],
        )
        .expect("ctr task exec");
    let exec_v2 = exec
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default();
    assert_eq!(
        node.cgroup_root().join(exec_v2.trim_start_matches('/')),
        cgroup,
        "the exec'd process's cgroup: {exec:?}"
    );

    // Metrics: containerd's v2 message (ctr decodes it by its type), with the core cpu.stat
    // numbers; a memory and pids part only where those controllers are enabled.
    for _ in 0..3 {
        let json = ctr
            .run(NS, &["task", "metrics", "--format", "json", &id])
            .expect("ctr task metrics");
        let metrics: serde_json::Value = serde_json::from_str(&json).expect("metrics JSON");
        let usage = metrics["cpu"]["usage_usec"].as_u64().unwrap_or(0);
        assert!(usage > 0, "v2 cpu usage_usec: {json}");
        if resources {
            let used = metrics["memory"]["usage"].as_u64().unwrap_or(0);
            assert!(used > 0, "v2 memory usage: {json}");
        } else {
            assert!(
                metrics.get("memory").is_none() && metrics.get("pids").is_none(),
                "{json}"
            );
        }
    }
    let gap = format!("container {id}: its cgroup has no memory.current");
    assert_eq!(
        shim_log_lines(&node, &gap),
        usize::from(!resources),
        "the missing files are logged once for three requests (none when they are there)"
    );

    // Container checkpoint and restore, in each of CRIU's cgroup modes.
    let api = ContainerdApi::connect(&node.files().socket(), NS).expect("containerd API");
    ctr.run(NS, &["task", "kill", "-s", "SIGKILL", &id])
        .expect("kill");
    ctr.wait_task_status(NS, &id, "STOPPED", Duration::from_secs(30));
    ctr.run(NS, &["task", "delete", &id]).expect("delete");
    ctr.run(NS, &["container", "rm", &id]).expect("rm");
    // runc 1.1.5 knows soft, full and strict on checkpoint ("ignore" it refuses: "Invalid manage
    // cgroups mode"), and restores in soft mode whatever it is asked (its restore never reads the
    // flag: CRIU's restore.log says "cgroups restore mode 0x4"). runc 1.2 added ignore, and its
    // restore passes the mode on. Here, on a v2 node of a machine whose controllers all stay on
    // v1, the container's processes also sit in v1 root cgroups, which runc 1.2+ hands CRIU as
    // well: full and strict then write the dumped v1 root's properties (CRIU: "Failed writing
    // 1024 to cpu///cpu.shares: Invalid argument"), which cannot happen on a real v2 node (no v1
    // hierarchy). So 1.1.5 runs full and strict, 1.2+ runs ignore.
    let modes: &[&str] = if node.runc_version()
        >= (podsnap_tests::prereq::RuncVersion {
            major: 1,
            minor: 2,
            patch: 0,
        }) {
        &["", "soft", "ignore"]
    } else {
        &["", "soft", "full", "strict"]
    };
    for &mode in modes {
        // A fresh container per mode (one port at a time on the host's network).
        let id = format!("{id}-{}", if mode.is_empty() { "default" } else { mode });
        run_server(&ctr, &id, resources);
        ctr.wait_task_status(NS, &id, "RUNNING", Duration::from_secs(30));
        let before = wait_count(&ctr, &id, 3);
        let images = node.dir().join(format!(
            "images-{}",
            if mode.is_empty() { "default" } else { mode }
        ));
        api.checkpoint(
            &id,
            &CheckpointOptions {
                exit: true,
                cgroups_mode: mode.to_owned(),
                image_path: images.to_string_lossy().into_owned(),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("checkpoint (cgroups mode {mode:?}): {e:#}"));
        ctr.wait_task_status(NS, &id, "STOPPED", Duration::from_secs(30));
        ctr.run(NS, &["task", "delete", &id])
            .expect("delete the stopped task");
        api.create_restored_task(&id, &images)
            .unwrap_or_else(|e| panic!("restore (cgroups mode {mode:?}): {e:#}"));
        api.start(&id)
            .unwrap_or_else(|e| panic!("start the restore (cgroups mode {mode:?}): {e:#}"));
        let after = wait_count(&ctr, &id, before);
        assert!(
            after >= before,
            "mode {mode:?}: counter went back {before} -> {after}"
        );
        // Restored into a v2 cgroup of its own, which freezes (and holds its resources).
        let cgroup = v2_cgroup(&node, task_pid(&ctr, NS, &id));
        assert_eq!(frozen(&cgroup), 0);
        if resources {
            assert_resources(&cgroup, &format!("restored (cgroups mode {mode:?})"));
        }
        ctr.run(NS, &["task", "kill", "-s", "SIGKILL", &id])
            .expect("kill");
        ctr.wait_task_status(NS, &id, "STOPPED", Duration::from_secs(30));
        ctr.run(NS, &["task", "delete", &id]).expect("delete");
        ctr.run(NS, &["container", "rm", &id]).expect("rm");
    }
    assert_eq!(
        runc.lines()
            .iter()
            .any(|l| l.starts_with(&format!("restore {id}-default dropped: "))),
        !resources,
        "the restores went through the stand-in (only where the node has no controllers): {:?}",
        runc.lines()
    );
}

#[test]
fn a_pod_dump_on_cgroup_v2_freezes_through_cgroup_freeze_and_the_pod_restores() {
    let holds = tempfile::tempdir().expect("hold-point directory");
    let hold_dir = holds.path().to_string_lossy().into_owned();
    let (node, runc) = v2_node(&[("PODSNAP_FAILPOINT_HOLD", &hold_dir)]);
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("v2pod"), HANDLER))
        .expect("the three-container pod runs on the v2 node");
    let ctr = node.ctr().clone();
    let sidecar = v2_cgroup(&node, task_pid(&ctr, CRI_NAMESPACE, &pod.sidecar_id));
    let app = v2_cgroup(&node, task_pid(&ctr, CRI_NAMESPACE, &pod.app_id));
    assert!(
        app.starts_with(node.cgroup_root().join("kubepods/besteffort")),
        "CRI's cgroupfs parent on v2: {}",
        app.display()
    );
    let resources = runc.plan().resources;
    let dropped = runc.lines();
    if resources {
        // CRI's CPU shares of a BestEffort container (2) are its cgroup's weight.
        for c in [&sidecar, &app] {
            assert_eq!(
                cgroup_value(c, "cpu.weight"),
                Some(cpu_weight(2)),
                "{}",
                c.display()
            );
        }
    } else {
        // CRI's shares and the pod's limits were dropped for every container, the pause too.
        for c in [&pod.sidecar_id, &pod.app_id] {
            assert!(
                dropped
                    .iter()
                    .any(|l| l.starts_with(&format!("create {c} dropped: ")) && l.contains("cpu=")),
                "{dropped:?}"
            );
        }
    }
    // CRI gives each container a cgroup namespace of its own on v2.
    let cgroup_namespace =
        |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).expect("the cgroup namespace");
    let node_namespace = cgroup_namespace(node.containerd_pid().expect("containerd") as i32);
    assert_ne!(
        cgroup_namespace(task_pid(&ctr, CRI_NAMESPACE, &pod.app_id)),
        node_namespace,
        "the app has a cgroup namespace of its own"
    );
    let before = mark_and_count(&pod);

    // Hold the dump once everything is frozen and look: both containers' cgroup.events say
    // frozen 1 (the shim's own freeze, not runc's pause).
    std::fs::write(holds.path().join("frozen"), "").expect("arm the hold point");
    let request = dump_request(&node, &pod.pod.name, &pod.pod.namespace, None);
    let dumping = std::thread::spawn(move || {
        block_on(podsnap_coordinator::dump::dump(
            &request,
            &podsnap_coordinator::progress::Quiet,
        ))
    });
    let reached = holds.path().join("frozen.reached");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reached.exists() {
        assert!(
            Instant::now() < deadline && !dumping.is_finished(),
            "the dump never reached the frozen hold point"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        (frozen(&sidecar), frozen(&app)),
        (1, 1),
        "frozen through cgroup.freeze"
    );
    std::fs::remove_file(holds.path().join("frozen")).expect("release the hold point");
    let outcome = dumping
        .join()
        .expect("the dump thread")
        .expect("podsnap dump on v2");
    assert_eq!(outcome.summary.dumped, ["sidecar", "app"]);
    assert_eq!((frozen(&sidecar), frozen(&app)), (0, 0), "thawed after the dump");

    remove_original(&node, &pod);
    let restored =
        restore(&node, &restore_request(&node, &outcome.summary.dir)).expect("podsnap restore on v2");
    let app_id = restored
        .containers
        .iter()
        .find(|(n, _)| n == "app")
        .map(|(_, id)| id.clone())
        .expect("a restored app");
    let volume = pods_dir(&node)
        .join(&restored.uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(podsnap_tests::kubelet::DATA_VOLUME);
    check_restored(&node, &restored.ip, &pod.pod.ip, &volume, &app_id, before);
    // The restored app runs in the new pod's cgroup: runc 1.2+ tells CRIU that cgroup, for
    // runc 1.1.5 (which does so on v1 only) the shim names it in CRIU's configuration.
    let restored_app = v2_cgroup(&node, task_pid(&ctr, CRI_NAMESPACE, &app_id));
    assert!(
        restored_app.starts_with(
            node.cgroup_root()
                .join(format!("kubepods/besteffort/pod{}", restored.uid))
        ),
        "the restored app runs in the new pod's cgroup: {}",
        restored_app.display()
    );
    assert!(
        !app.exists(),
        "the cgroup CRIU re-created at the old path is gone: {}",
        app.display()
    );
    // And it has a cgroup namespace of its own again (CRIU restores it when it manages
    // cgroups: the dump used runc's default mode for such containers, not ignore).
    assert_ne!(
        cgroup_namespace(task_pid(&ctr, CRI_NAMESPACE, &app_id)),
        node_namespace,
        "the restored app's cgroup namespace is its own"
    );
    let modes: Vec<String> = ["sidecar", "app"]
        .iter()
        .map(|c| {
            let options = outcome
                .summary
                .dir
                .join("containers")
                .join(c)
                .join("checkpoint")
                .join(podsnap_tests::paths::CRIU_OPTIONS_FILE);
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&options).expect("podsnap-criu.json")).expect("JSON");
            json["cgroups_mode"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(
        modes,
        ["", ""],
        "runc's default mode for containers with a cgroup namespace"
    );
    if resources {
        assert_eq!(
            cgroup_value(&restored_app, "cpu.weight"),
            Some(cpu_weight(2)),
            "the restored app's resources"
        );
    } else {
        assert!(
            dropped.len() < runc.lines().len(),
            "the restore went through the stand-in runc too"
        );
    }
}

/// On v2, a process the pause process adopted (a pod sharing one PID namespace) comes back too:
/// CRIU restores it into the cgroup path it was dumped from (runc 1.1.5 gives CRIU the new
/// container's cgroup on v1 only); the shim moves it into its container's new cgroup, and the
/// old path goes.
#[test]
fn an_adopted_process_on_cgroup_v2_comes_back_into_its_containers_cgroup() {
    use podsnap_tests::kubelet::{ask, run_container, run_pod, wait_answering, ContainerSpec};
    let (node, _runc) = v2_node(&[]);
    let mut options = PodOptions::new(&node.unique("v2orphan"), HANDLER);
    options.share_process_namespace = true;
    let pod = run_pod(&node, &options).expect("sandbox");
    let sidecar = ContainerSpec::workload("sidecar", &["serve", "--name", "sidecar", "--port", "9090"]);
    let sidecar_id = run_container(&node, &pod, &sidecar).expect("the sidecar runs");
    wait_answering(&pod.ip, 9090, Duration::from_secs(20)).expect("the sidecar answers");
    let spawned = ask(&pod.ip, 9090, "spawn-daemon 7070").expect("spawn-daemon");
    assert!(spawned.starts_with("daemon pid "), "{spawned}");
    wait_answering(&pod.ip, 7070, Duration::from_secs(20)).expect("the daemon answers");
    let ctr = node.ctr().clone();
    let old = v2_cgroup(&node, task_pid(&ctr, CRI_NAMESPACE, &sidecar_id));
    let procs = |dir: &Path| {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .expect("cgroup.procs")
            .split_whitespace()
            .count()
    };
    assert_eq!(procs(&old), 2, "the sidecar and its daemon in one cgroup");

    let request = dump_request(&node, &pod.name, "default", None);
    let outcome = block_on(podsnap_coordinator::dump::dump(
        &request,
        &podsnap_coordinator::progress::Quiet,
    ))
    .expect("podsnap dump on v2");
    let m = verified(&node, &outcome.summary.dir);
    assert_eq!(m.adopted.len(), 1, "{:?}", m.adopted);
    podsnap_tests::kubelet::remove_pod(&node, &pod).expect("the original pod goes");

    let restored =
        restore(&node, &restore_request(&node, &outcome.summary.dir)).expect("podsnap restore on v2");
    wait_answering(&restored.ip, 7070, Duration::from_secs(20)).expect("the daemon answers again");
    assert_eq!(ask(&restored.ip, 7070, "ping").expect("ping"), "pong daemon");
    let new_sidecar = restored
        .containers
        .iter()
        .find(|(n, _)| n == "sidecar")
        .map(|(_, id)| id.clone())
        .expect("a restored sidecar");
    let new = v2_cgroup(&node, task_pid(&ctr, CRI_NAMESPACE, &new_sidecar));
    assert!(
        new.starts_with(
            node.cgroup_root()
                .join(format!("kubepods/besteffort/pod{}", restored.uid))
        ),
        "the new pod's cgroup: {}",
        new.display()
    );
    assert_eq!(procs(&new), 2, "the daemon joined its container's new cgroup");
    assert!(
        !old.exists(),
        "the old path CRIU re-created is gone: {}",
        old.display()
    );
}
