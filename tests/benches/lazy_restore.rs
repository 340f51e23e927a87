//! Benchmark (issue 12 item 4): `podsnap restore --lazy` against the eager restore, on one
//! private containerd.
//!
//! A pod of three containers holding 1 GiB of ballast each (`PODSNAP_BENCH_MIB` to change it)
//! is checkpointed once into the node's root; then, round by round, the two contenders restore
//! it in alternating order (round 0 is a warm-up, not counted):
//! - eager: `podsnap restore` (the coordinator's library), CRIU reads every page back before
//!   the containers run;
//! - lazy: the same with `--lazy` (`podsnap.io/restore-lazy`): each container runs once its
//!   processes are rebuilt; a `criu lazy-pages` daemon per container brings the memory back on
//!   demand and in the background.
//!
//! Timed from the restore call: **to all running**, every container CRI RUNNING and its
//! workload answering a `count`; and, for the lazy pod, **to all memory back**, every
//! container's lazy-pages daemon exited (sampled every 10 ms in `/proc`). Untimed after that:
//! every ballast page of every container is checked (`ballast-sum`), then the pod is removed.
//! Both contenders include the shim's check of every digest of the checkpoint (it reads every
//! page image once, so the restore itself reads them from the page cache).
//!
//! `cargo build --workspace --bins && cargo bench --profile dev -p podsnap-tests --bench
//! lazy_restore` (rounds: `PODSNAP_BENCH_N`, default 5).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{print_table, ratio, seconds, Samples};
use k8s_cri::v1 as cri;
use podsnap_coordinator::restore::RestoreRequest;
use podsnap_tests::kubelet::{self, ContainerSpec, PodOptions};
use podsnap_tests::node::Node;

/// (name, port) of the pod's containers.
const CONTAINERS: [(&str, u16); 3] = [("c0", 8301), ("c1", 8302), ("c2", 8303)];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    Eager,
    Lazy,
}

const CONTENDERS: [Contender; 2] = [Contender::Eager, Contender::Lazy];

fn ballast_mib() -> String {
    std::env::var("PODSNAP_BENCH_MIB").unwrap_or_else(|_| "1024".to_owned())
}

#[derive(Default)]
struct Measures {
    running: Samples,
    memory_back: Samples,
    restores: Samples,
}

/// What one restore took, in seconds.
struct Timed {
    running: f64,
    memory_back: f64,
    /// From the shim's first container restore to its last one done (its log's timestamps).
    restores: f64,
}

fn main() {
    let rounds = common::rounds(5);
    let mut node = Node::start(common::podsnap_node_options());
    let runtime = common::runtime();
    let started = Instant::now();
    let mib = ballast_mib();

    let (dir, sums) = checkpoint(&node, &runtime, &mib);
    let image_mib = common::mib(common::dir_size(&dir));
    eprintln!("checkpoint {} ({image_mib:.0} MiB)", dir.display());

    let mut measures: Vec<Measures> = CONTENDERS.iter().map(|_| Measures::default()).collect();
    for round in 0..=rounds {
        for turn in 0..CONTENDERS.len() {
            let which = (round + turn) % CONTENDERS.len();
            let contender = CONTENDERS[which];
            let t = timed_restore(&node, &runtime, &dir, &sums, contender);
            eprintln!(
                "round {round} {contender:?}: all running {:.3} s, all memory back {:.3} s, \
                 container restores {:.3} s",
                t.running, t.memory_back, t.restores
            );
            if round > 0 {
                measures[which].running.push(t.running);
                measures[which].memory_back.push(t.memory_back);
                measures[which].restores.push(t.restores);
            }
        }
    }
    let [eager, lazy] = &measures[..] else {
        unreachable!("two contenders")
    };

    println!();
    println!(
        "### `podsnap restore --lazy` against the eager restore: a pod of 3 containers x {mib} MiB \
         (checkpoint {image_mib:.0} MiB), median of {rounds} (min-max), contenders alternated"
    );
    println!();
    println!(
        "Timed from the restore call; all running = every container CRI RUNNING and its workload \
         answering; all memory back = (lazy) every lazy-pages daemon exited, (eager) the same \
         instant as all running. Both include the shim's digest check of the whole checkpoint. \
         Container restores = the shim's three container restores (runc restore, and for lazy \
         the daemons' start), from the first begun to the last done, from its log."
    );
    println!();
    print_table(
        &[
            "restore",
            "to all running (s)",
            "to all memory back (s)",
            "container restores (s)",
        ],
        &[
            vec![
                "eager".to_owned(),
                eager.running.cell(3),
                eager.memory_back.cell(3),
                eager.restores.cell(3),
            ],
            vec![
                "lazy (`--lazy`)".to_owned(),
                lazy.running.cell(3),
                lazy.memory_back.cell(3),
                lazy.restores.cell(3),
            ],
            vec![
                "lazy / eager".to_owned(),
                ratio(&lazy.running, &eager.running),
                ratio(&lazy.memory_back, &eager.memory_back),
                ratio(&lazy.restores, &eager.restores),
            ],
        ],
    );
    eprintln!("bench took {:.0} s", seconds(started.elapsed()));
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

/// Runs the pod, waits until every container has its ballast written, checkpoints it into the
/// node's root with `podsnap dump` (the library) and removes it: the checkpoint and the ballast
/// checksums.
fn checkpoint(node: &Node, runtime: &tokio::runtime::Runtime, mib: &str) -> (PathBuf, Vec<String>) {
    let name = node.unique("lazy-bench");
    let pod = kubelet::run_pod(node, &PodOptions::new(&name, "podsnap")).expect("RunPodSandbox");
    for (c, port) in CONTAINERS {
        let port = port.to_string();
        let spec = ContainerSpec::workload(c, &["serve", "--name", c, "--port", &port, "--ballast-mib", mib]);
        kubelet::run_container(node, &pod, &spec).expect("a container");
    }
    let sums = CONTAINERS
        .iter()
        .map(|(_, port)| {
            kubelet::wait_answering(&pod.ip, *port, Duration::from_secs(120)).expect("answers");
            kubelet::ask(&pod.ip, *port, "ballast-sum").expect("ballast-sum")
        })
        .collect();
    let mut request = podsnap_coordinator::dump::DumpRequest::new(&pod.namespace, &pod.name);
    request.runtime_endpoint = node.endpoint();
    request.address = node.address();
    request.checkpoint_root = node.files().checkpoints();
    let outcome = runtime
        .block_on(podsnap_coordinator::dump::dump(
            &request,
            &podsnap_coordinator::progress::Quiet,
        ))
        .unwrap_or_else(|e| panic!("podsnap dump: {e}"));
    kubelet::remove_pod(node, &pod).expect("remove the pod");
    (outcome.summary.dir, sums)
}

/// The pids of `criu lazy-pages` daemons serving any of the containers `ids`.
fn lazy_daemons(ids: &[String]) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok()))
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.starts_with("criu lazy-pages") && ids.iter().any(|id| cmdline.contains(id.as_str()))
        })
        .count()
}

/// One restore of `dir` by `contender`: seconds to all running and to all memory back. The
/// restored pod's memory is checked against `sums` (untimed), then it is removed.
fn timed_restore(
    node: &Node,
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    sums: &[String],
    contender: Contender,
) -> Timed {
    let mut request = RestoreRequest::new(dir);
    request.runtime_endpoint = node.endpoint();
    request.checkpoint_root = node.files().checkpoints();
    request.pods_dir = node.files().kubelet().join("pods");
    request.logs_dir = node.files().kubelet().join("logs/pods");
    request.lazy = contender == Contender::Lazy;
    common::sync_disks();
    let clock = Instant::now();
    let restored = runtime
        .block_on(podsnap_coordinator::restore::restore(
            &request,
            &podsnap_coordinator::progress::Quiet,
        ))
        .unwrap_or_else(|e| panic!("podsnap restore ({contender:?}) of {}: {e}", dir.display()));
    let ids: Vec<String> = restored.containers.iter().map(|(_, id)| id.clone()).collect();
    for id in &ids {
        node.cri()
            .wait_container_state(
                id,
                cri::ContainerState::ContainerRunning,
                Duration::from_secs(120),
            )
            .expect("restored container runs");
    }
    for (_, port) in CONTAINERS {
        kubelet::wait_answering(&restored.ip, port, Duration::from_secs(120)).expect("answers");
        kubelet::ask(&restored.ip, port, "count").expect("count");
    }
    let running = seconds(clock.elapsed());
    let netns = node.cri().pod_netns(&restored.id).ok().flatten();
    node.record_pod(&restored.uid, netns.as_deref())
        .expect("record the pod");
    let memory_back = match contender {
        Contender::Eager => running,
        Contender::Lazy => {
            let deadline = Instant::now() + Duration::from_secs(300);
            while lazy_daemons(&ids) > 0 {
                assert!(Instant::now() < deadline, "lazy-pages daemons still running");
                std::thread::sleep(Duration::from_millis(10));
            }
            seconds(clock.elapsed())
        }
    };
    for ((name, port), sum) in CONTAINERS.iter().zip(sums) {
        let after = kubelet::ask(&restored.ip, *port, "ballast-sum").expect("ballast-sum");
        assert_eq!(&after, sum, "restored memory of {name} ({contender:?})");
    }
    node.cri()
        .stop_and_remove_pod(&restored.id)
        .expect("remove the restored pod");
    podsnap_tests::host::remove_pod_cgroups(&restored.uid);
    Timed {
        running,
        memory_back,
        restores: restores_span(node, &ids),
    }
}

/// Seconds from the first of the containers `ids` beginning its restore in the shim to the
/// last one restored, from the timestamps of the shim's lines in containerd's log.
fn restores_span(node: &Node, ids: &[String]) -> f64 {
    let at = |needle: &str| -> Vec<f64> { node.log_grep(needle).iter().filter_map(|l| time_of(l)).collect() };
    let begun: Vec<f64> = ids
        .iter()
        .flat_map(|id| at(&format!("container {id}: restoring from")))
        .collect();
    let done: Vec<f64> = ids
        .iter()
        .flat_map(|id| at(&format!("container {id}: restored, pid")))
        .collect();
    assert!(
        begun.len() == ids.len() && done.len() == ids.len(),
        "the shim logs each restore: {begun:?} {done:?}"
    );
    let first = begun.iter().copied().fold(f64::INFINITY, f64::min);
    let last = done.iter().copied().fold(0.0, f64::max);
    last - first
}

/// The seconds of the day of a containerd log line (`time="2026-12-01T10:12:41.873Z" ...`).
fn time_of(line: &str) -> Option<f64> {
    let t = line.split("time=\"").nth(1)?.split('T').nth(1)?;
    let t = t.split(['Z', '+', '"']).next()?;
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}
