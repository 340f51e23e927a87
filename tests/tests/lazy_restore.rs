//! Lazy restore (issue 12 item 4) against the real stack: a pod of two containers holding
//! ballast memory, dumped, then brought back with `podsnap restore --lazy` (and through
//! kubelet's path with `podsnap.io/restore-lazy: "true"`): each container's memory comes back
//! through a `criu lazy-pages` daemon of the pod's shim. Checked: every ballast page holds what
//! was written (`ballast-sum` reads each page, faulting in whatever was not back yet), the
//! counters continue, the daemons ran and all exit once every page is back, their leases on the
//! checkpoint go with them, and with the pod gone the checkpoint can be removed. A daemon that
//! cannot start fails the container's start with the reason and leaves nothing running; a
//! daemon killed while its container is restored leaves nothing running (its pages would read as
//! zeros); a pod removed while it is restored lazily leaves no daemon and no lease.

mod pod_checkpoint_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use pod_checkpoint_support::*;
use podsnap_tests::kubelet::{self, ask, ContainerSpec, KubePod, PodOptions};
use podsnap_tests::node::{Node, NodeOptions};
use podsnap_tests::HANDLER;

/// (name, port, ballast MiB) of the pod's containers.
const CONTAINERS: [(&str, u16, &str); 2] = [("big", 8201, "256"), ("small", 8202, "32")];

fn specs() -> Vec<ContainerSpec> {
    CONTAINERS
        .iter()
        .map(|(name, port, mib)| {
            let port = port.to_string();
            ContainerSpec::workload(
                name,
                &["serve", "--name", name, "--port", &port, "--ballast-mib", mib],
            )
        })
        .collect()
}

fn count(ip: &str, port: u16) -> u64 {
    ask(ip, port, "count")
        .unwrap_or_else(|e| panic!("count from {ip}:{port}: {e:#}"))
        .parse()
        .unwrap_or_else(|e| panic!("count from {ip}:{port} is not a number: {e}"))
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pids of `criu lazy-pages` daemons serving any of the containers `ids`.
fn lazy_daemons(ids: &[String]) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.starts_with("criu lazy-pages") && ids.iter().any(|id| cmdline.contains(id.as_str()))
        })
        .collect()
}

/// The live leases on the checkpoint at `dir`, as `podsnap list -o json` shows them in its
/// `in_use_by`: (pod holds, lazy-pages daemon holds).
fn holds(node: &Node, dir: &Path) -> (usize, usize) {
    let held = podsnap_tests::cli::users_of(node, podsnap_bin(), dir);
    let lazy = held.iter().filter(|h| h.get("lazy_pages_of").is_some()).count();
    (held.len() - lazy, lazy)
}

/// The sums and counters of the pod's containers, once every counter has gone past
/// [`MIN_COUNT`] (a restart from zero cannot pass for a restore).
fn sums_and_counts(ip: &str) -> (Vec<String>, Vec<u64>) {
    let sums = CONTAINERS
        .iter()
        .map(|(_, port, _)| ask(ip, *port, "ballast-sum").expect("ballast-sum"))
        .collect();
    let mut counts = Vec::new();
    wait_for("the counters to pass MIN_COUNT", Duration::from_secs(30), || {
        counts = CONTAINERS.iter().map(|(_, port, _)| count(ip, *port)).collect();
        counts.iter().all(|c| *c >= MIN_COUNT)
    });
    (sums, counts)
}

/// What a lazily restored pod must show, then its daemons' end: memory intact page by page,
/// counters on from where they were, a daemon per container that ran and exits, its lease gone.
fn check_lazy_pod(node: &Node, ip: &str, ids: &[String], dir: &Path, sums: &[String], counts: &[u64]) {
    let logged = |id: &str, what: &str| {
        node.log_grep(&format!("container {id} (pod "))
            .iter()
            .filter(|l| l.contains(what))
            .count()
    };
    for id in ids {
        // The shim's log reaches containerd's through a FIFO: waited for, not raced.
        wait_for(
            &format!("the shim to log {id}'s lazy-pages daemon"),
            Duration::from_secs(30),
            || logged(id, "serves its memory") > 0,
        );
        assert_eq!(logged(id, "serves its memory"), 1, "one daemon for {id}");
    }
    for (((name, port, _), sum), before) in CONTAINERS.iter().zip(sums).zip(counts) {
        kubelet::wait_answering(ip, *port, Duration::from_secs(60)).expect("the restored container answers");
        let after = count(ip, *port);
        assert!(
            after >= *before,
            "{name}: the counter goes on from {before}, not from zero: {after}"
        );
        assert_eq!(
            &ask(ip, *port, "ballast-sum").expect("ballast-sum"),
            sum,
            "{name}: every ballast page is back"
        );
    }
    wait_for(
        "the lazy-pages daemons to exit with every page back",
        Duration::from_secs(120),
        || lazy_daemons(ids).is_empty(),
    );
    for id in ids {
        wait_for(
            &format!("the shim to log how {id}'s daemon ended"),
            Duration::from_secs(30),
            || logged(id, "exited") + logged(id, "stopped") > 0,
        );
        assert_eq!(
            logged(id, "exited: all of its memory is back"),
            1,
            "{id}'s daemon ended with every page transferred:\n{}",
            node.log_tail(40)
        );
    }
    assert!(
        node.log_grep("lazy-pages daemon (pid").is_empty(),
        "no daemon failed:\n{}",
        node.log_tail(40)
    );
    // The daemons' holds went with them; the pod's own hold stays while it runs.
    wait_for("the daemons' leases to go", Duration::from_secs(30), || {
        holds(node, dir).1 == 0
    });
    assert_eq!(holds(node, dir), (1, 0), "the pod still holds the checkpoint");
    for ((name, port, _), sum) in CONTAINERS.iter().zip(sums) {
        assert_eq!(
            &ask(ip, *port, "ballast-sum").expect("ballast-sum"),
            sum,
            "{name}: the memory is still whole once its daemon is gone"
        );
    }
}

/// A pod restored lazily from `checkpoint` on kubelet's path.
fn options_for(node: &Node, name: &str, checkpoint: &str) -> PodOptions {
    let mut options = PodOptions::new(&node.unique(name), HANDLER);
    options
        .annotations
        .insert("podsnap.io/restore-from".to_owned(), checkpoint.to_owned());
    options
        .annotations
        .insert("podsnap.io/restore-lazy".to_owned(), "true".to_owned());
    options
}

fn remove_and_check_unheld(node: &Node, pod_id: &str, uid: &str, dir: &Path) {
    node.cri()
        .stop_and_remove_pod(pod_id)
        .expect("remove the restored pod");
    podsnap_tests::host::remove_pod_cgroups(uid);
    wait_for(
        "the pod's lease to go with its shim",
        Duration::from_secs(30),
        || holds(node, dir) == (0, 0),
    );
}

#[test]
fn a_lazily_restored_pod_has_all_of_its_memory_and_its_daemons_end() {
    // The shim can be held at the start of a container's restore (see the failure case below).
    let hold_points = tempfile::tempdir().expect("a directory of hold points");
    let mut node_options = NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    node_options.extra_env.push((
        podsnap_tests::paths::FAILPOINT_HOLD_ENV.to_owned(),
        hold_points.path().display().to_string(),
    ));
    let node = Node::start(node_options);
    let name = node.unique("lazy");
    let pod = kubelet::run_pod(&node, &PodOptions::new(&name, HANDLER)).expect("RunPodSandbox");
    for spec in specs() {
        kubelet::run_container(&node, &pod, &spec).expect("a container");
    }
    for (_, port, _) in CONTAINERS {
        kubelet::wait_answering(&pod.ip, port, Duration::from_secs(60)).expect("answers");
    }
    let (sums, counts) = sums_and_counts(&pod.ip);
    let request = dump_request(&node, &pod.name, &pod.namespace, None);
    let outcome = block_on(podsnap_coordinator::dump::dump(
        &request,
        &podsnap_coordinator::progress::Lines,
    ))
    .expect("podsnap dump");
    let dir: PathBuf = std::fs::canonicalize(&outcome.summary.dir).expect("the checkpoint");
    let checkpoint = outcome.summary.restore_name.clone().expect("a name in the root");
    kubelet::remove_pod(&node, &pod).expect("remove the original pod");

    // A value other than "true" or "false" refuses the pod before anything exists.
    let before = sandbox_ids(&node);
    let mut options = PodOptions::new(&node.unique("lazy-bad"), HANDLER);
    options
        .annotations
        .insert("podsnap.io/restore-from".to_owned(), checkpoint.clone());
    options
        .annotations
        .insert("podsnap.io/restore-lazy".to_owned(), "yes".to_owned());
    let err = kubelet::run_pod(&node, &options).expect_err("a bad podsnap.io/restore-lazy is refused");
    assert!(
        format!("{err:#}").contains("podsnap.io/restore-lazy: \"yes\""),
        "{err:#}"
    );
    assert_eq!(sandbox_ids(&node), before, "no sandbox left");

    // podsnap restore --lazy.
    let mut request = restore_request(&node, &dir);
    request.lazy = true;
    let restored = restore(&node, &request).expect("podsnap restore --lazy");
    let ids: Vec<String> = restored.containers.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids.len(), CONTAINERS.len());
    for id in &ids {
        let status = node.cri().container(id).expect("ContainerStatus");
        assert_eq!(
            status.state,
            cri::ContainerState::ContainerRunning as i32,
            "{id} runs"
        );
    }
    check_lazy_pod(&node, &restored.ip, &ids, &dir, &sums, &counts);
    remove_and_check_unheld(&node, &restored.id, &restored.uid, &dir);

    // kubelet's path: the annotations on the pod, its containers created and started by CRI.
    let again: KubePod = kubelet::run_pod(&node, &options_for(&node, "lazy-kubelet", &checkpoint))
        .expect("RunPodSandbox, lazy");
    let ids: Vec<String> = specs()
        .iter()
        .map(|spec| kubelet::run_container(&node, &again, spec).expect("a restored container"))
        .collect();
    check_lazy_pod(&node, &again.ip, &ids, &dir, &sums, &counts);
    remove_and_check_unheld(&node, &again.id, &again.uid, &dir);

    // A daemon that cannot start (its pid file cannot be created: a directory is in the way,
    // put there while the shim holds at the start of the container's restore) fails the start
    // of its container, naming the daemon, and leaves nothing behind.
    let pod =
        kubelet::run_pod(&node, &options_for(&node, "lazy-nostart", &checkpoint)).expect("RunPodSandbox");
    let [big, _] = &specs()[..] else {
        unreachable!("two containers")
    };
    let id = kubelet::create_container(&node, &pod, big).expect("CreateContainer");
    std::fs::write(hold_points.path().join("restore"), b"").expect("arm the hold");
    let started = std::thread::scope(|scope| {
        let starting = scope.spawn(|| kubelet::start_container(&node, &id));
        let reached = hold_points.path().join("restore.reached");
        wait_for("the restore to start", Duration::from_secs(60), || {
            reached.exists()
        });
        let work_dir = node
            .dir()
            .join("state/io.containerd.runtime.v2.task/k8s.io")
            .join(&id)
            .join("criu-restore");
        std::fs::create_dir_all(work_dir.join("lazy-pages.pid")).expect("a directory in the way");
        std::fs::remove_file(hold_points.path().join("restore")).expect("release the hold");
        starting.join().expect("the starting thread")
    });
    let err = started.expect_err("the restore fails");
    assert!(
        err.message()
            .contains("the lazy-pages daemon (criu lazy-pages) did not start"),
        "{}",
        err.message()
    );
    assert!(
        lazy_daemons(std::slice::from_ref(&id)).is_empty(),
        "no daemon left"
    );
    assert_eq!(holds(&node, &dir), (1, 0), "no daemon lease left");
    assert_ne!(
        node.cri().container(&id).expect("status").state,
        cri::ContainerState::ContainerRunning as i32,
        "nothing runs"
    );
    remove_and_check_unheld(&node, &pod.id, &pod.uid, &dir);

    // A daemon that dies with pages not yet copied: they would read as zeros, so the container
    // must not go on running. Made certain by stopping the daemon (SIGSTOP) before runc runs:
    // CRIU's restorer hands the process's userfaultfd over and closes its own copy, then waits
    // on the first lazy page it touches; the daemon is killed right then. Either the restore
    // fails (seen: CRIU cannot tell the dead daemon the restore is over and kills the restored
    // processes), or it completes on zeroed pages and the shim, seeing its daemon killed, kills
    // the container: never a container running on.
    let pod = kubelet::run_pod(&node, &options_for(&node, "lazy-dies", &checkpoint)).expect("RunPodSandbox");
    let id = kubelet::create_container(&node, &pod, big).expect("CreateContainer");
    let restore_log = node
        .dir()
        .join("state/io.containerd.runtime.v2.task/k8s.io")
        .join(&id)
        .join("criu-restore/restore.log");
    std::fs::write(hold_points.path().join("lazy-pages"), b"").expect("arm the hold");
    let started = std::thread::scope(|scope| {
        let starting = scope.spawn(|| kubelet::start_container(&node, &id));
        let reached = hold_points.path().join("lazy-pages.reached");
        wait_for("the daemon to listen", Duration::from_secs(60), || {
            reached.exists()
        });
        let daemons = lazy_daemons(std::slice::from_ref(&id));
        assert_eq!(daemons.len(), 1, "one daemon for {id}: {daemons:?}");
        let daemon = nix::unistd::Pid::from_raw(daemons[0]);
        nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGSTOP).expect("stop the daemon");
        std::fs::remove_file(hold_points.path().join("lazy-pages")).expect("release the hold");
        wait_for(
            "CRIU's restorer to hand its userfaultfd over",
            Duration::from_secs(60),
            || std::fs::read_to_string(&restore_log).is_ok_and(|l| l.contains("lazy-pages: closing uffd")),
        );
        nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGKILL).expect("kill the daemon");
        starting.join().expect("the starting thread")
    });
    match started {
        Err(status) => eprintln!("the restore failed: {}", status.message()),
        Ok(()) => {
            let status = node
                .cri()
                .wait_container_state(&id, cri::ContainerState::ContainerExited, Duration::from_secs(60))
                .expect("the container whose daemon died ends");
            eprintln!("restored, then ended: exit {}", status.exit_code);
            wait_for(
                "the shim to log the daemon's failure",
                Duration::from_secs(30),
                || {
                    !node
                        .log_grep(&format!("container {id}: killed: its memory is incomplete"))
                        .is_empty()
                },
            );
            assert!(
                node.log_grep(&format!("container {id} (pod "))
                    .iter()
                    .any(|l| l.contains("failed (exit") && l.contains("read as zeros")),
                "the daemon's failure is logged as such:\n{}",
                node.log_tail(40)
            );
        }
    }
    assert_ne!(
        node.cri().container(&id).expect("status").state,
        cri::ContainerState::ContainerRunning as i32,
        "nothing runs on zeroed memory"
    );
    wait_for("the dead daemon's lease to go", Duration::from_secs(30), || {
        holds(&node, &dir) == (1, 0)
    });
    remove_and_check_unheld(&node, &pod.id, &pod.uid, &dir);

    // A lazily restored pod removed at once (its daemons may still be copying): no daemon and
    // no lease are left.
    let pod = kubelet::run_pod(&node, &options_for(&node, "lazy-gone", &checkpoint)).expect("RunPodSandbox");
    let ids: Vec<String> = specs()
        .iter()
        .map(|spec| kubelet::run_container(&node, &pod, spec).expect("a restored container"))
        .collect();
    remove_and_check_unheld(&node, &pod.id, &pod.uid, &dir);
    wait_for("no daemon of the removed pod", Duration::from_secs(30), || {
        lazy_daemons(&ids).is_empty()
    });

    // Nothing holds it: it can be removed.
    podsnap_tests::cli::rm(&node, podsnap_bin(), &checkpoint)
        .expect("the checkpoint, no longer in use, is removed");
}
