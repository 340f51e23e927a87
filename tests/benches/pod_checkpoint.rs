//! Benchmark (issues 4 and 12): a pod of three containers holding 256 MiB of dirtied memory
//! each (`PODSNAP_BENCH_MIB` to change it), checkpointed and restored by podsnap and by
//! containerd's Go runc shim, side by side on one private containerd, the contenders taking
//! turns in a rotating order round by round (round 0 warms every one up and is not counted).
//!
//! - podsnap (handler `podsnap`): one Tasks.Checkpoint on the sandbox task with runc
//!   `CheckpointOptions{image_path}` (leave running): the shim freezes every container, dumps
//!   them in parallel, thaws, and writes digests and the manifest. Restore: `podsnap restore`
//!   (the coordinator's library: a new sandbox, every container restored from the checkpoint,
//!   digests verified once) until every container runs. Its page images are digested as the
//!   node's default says (`[dump] digests = "auto"`: as CRIU closes them when the node has more
//!   CPUs than the pod has containers, else after the thaw); a second podsnap contender always
//!   digests them as CRIU closes them (`"early"`), set in the node configuration before its turn.
//! - Go runc shim, in parallel (handler `runc`; the main baseline): the three containers
//!   checkpointed at once, one Tasks.Checkpoint each with runc `CheckpointOptions{image_path}`
//!   (the same directory form podsnap writes; no rw-layer diff, no content store): what a
//!   person would do by hand. Each container is frozen on its own, so the pod is not captured
//!   at one instant. Restore: in place, each task killed, then all three created again at once
//!   from their directories (Tasks.Create with runc `Options{criu_image_path}`) and started.
//! - Go runc shim, in turn (a second reference): `ctr task checkpoint` of the three containers
//!   one after another (each paused by ctr, dumped, its rw layer diffed, everything ingested
//!   and hashed into the content store, resumed). Restore: in place, each task re-created from
//!   its checkpoint image's CRIU blob (containerd unpacks it) and started, one after another.
//!
//! The Go shim has no pod restore here: containerd 2.1 CRI's restore-by-create (KEP-2008)
//! re-pulls the checkpoint's base image by reference and these nodes have no registry, and
//! `ctr container restore` needs annotations that `ctr task checkpoint` images lack. So both
//! Go restores are in place (same sandbox, no new sandbox, no digest check): less work than
//! podsnap's restore does.
//!
//! Frozen windows are observed from outside, the same way for every contender
//! (`common::observer`): a thread samples every millisecond each container's freezer state and
//! whether CRIU holds its processes (ptrace). Pod frozen window: from the first container
//! stopped to the last one running again. Per container: its own first stop to last resume.
//!
//! Image size: the checkpoint directories; for `ctr task checkpoint` the content-store blobs of
//! the three checkpoint images (CRIU tar, rw layer, spec).
//!
//! Restore from outside the checkpoint root (podsnap only): the same checkpoint moved out of
//! the root on the same filesystem (`podsnap restore` hard-links it in: no data copied), and a
//! copy of it on a tmpfs mounted by the bench (another filesystem: the restore must copy every
//! file into the root first), each timed like the restore above.
//!
//! `PODSNAP_BENCH_MEMORY=warm|cold` prepares the memory the same way before every timed
//! checkpoint (`common::settle`): page cache freed just before, or 3 s without frees; the
//! dump's writes tend to run several times faster after the first on these machines
//! (docs/node-notes.md).
//!
//! `cargo build --release -p containerd-shim-podsnap-v1 && cargo bench -p podsnap-tests --bench
//! pod_checkpoint` (rounds: `PODSNAP_BENCH_N`, default 5). `PODSNAP_BENCH_CHECKPOINT_ONLY=1`: the
//! checkpoints of podsnap and the Go shim in parallel only (no restores, no `ctr task checkpoint`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::observer::{Observer, Watched, Windows};
use common::{mib, print_table, ratio, seconds, Samples};
use k8s_cri::v1 as cri;
use podsnap_coordinator::restore::RestoreRequest;
use podsnap_tests::containerd_api::{CheckpointOptions, ContainerdApi};
use podsnap_tests::ctr::CRI_NAMESPACE as NS;
use podsnap_tests::host::Tmpfs;
use podsnap_tests::kubelet::{self, ContainerSpec, KubePod, PodOptions};
use podsnap_tests::node::Node;

const CONTAINERS: [(&str, u16); 3] = [("one", 8081), ("two", 8082), ("three", 8083)];

/// MiB of dirtied memory per container.
fn ballast_mib() -> String {
    std::env::var("PODSNAP_BENCH_MIB").unwrap_or_else(|_| "256".to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    Podsnap,
    /// podsnap with `[dump] digests = "early"`: page images digested as CRIU closes them.
    PodsnapEarly,
    GoParallel,
    GoInTurn,
}

const CONTENDERS: [Contender; 4] = [
    Contender::Podsnap,
    Contender::PodsnapEarly,
    Contender::GoParallel,
    Contender::GoInTurn,
];

/// What the node's default `[dump] digests = "auto"` chooses for this pod here (the shim
/// decides the same way, from the CPUs it may use).
fn auto_digests() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let how = if podsnap_coordinator::DigestTiming::Auto.early(CONTAINERS.len(), cpus) {
        "as CRIU writes"
    } else {
        "after the thaw"
    };
    format!("auto: {cpus} CPUs, {} containers: {how}", CONTAINERS.len())
}

/// `PODSNAP_BENCH_CHECKPOINT_ONLY=1`: checkpoints only, podsnap against the Go shim in parallel.
fn checkpoint_only() -> bool {
    std::env::var("PODSNAP_BENCH_CHECKPOINT_ONLY").is_ok_and(|v| v == "1")
}

#[derive(Default)]
struct Measures {
    checkpoint: Samples,
    pod_frozen: Samples,
    longest: Samples,
    sum: Samples,
    image_mib: Samples,
    restore: Samples,
    /// podsnap only: restore from outside the root, linked in / copied in.
    restore_linked: Samples,
    restore_copied: Samples,
    /// podsnap only: how long each step of the dump took, ms (see [`STEPS`]).
    steps: Vec<Samples>,
}

/// The pod dump's phase marks, as the shim's `pod_dump` span line gives them (ms from the
/// dump's start), and the step each one ends.
const STEPS: [(&str, &str); 13] = [
    ("preflight_ms", "plan: names, kdat cache, the volumes, free space"),
    ("journal_ms", "crash journal, staging directory"),
    (
        "criu_held_ms",
        "runc and CRIU started in the pod's netns, waiting in CRIU's pre-dump hook (a stale lock removed meanwhile)",
    ),
    ("network_locked_ms", "the network locked (iptables-restore)"),
    (
        "criu_waiting_ms",
        "the CRIU runs not in the pod's netns waiting too",
    ),
    ("frozen_ms", "every container frozen (the window opens)"),
    (
        "checked_ms",
        "frozen pod checked (volumes, adopted, IPC, unix links)",
    ),
    ("dumped_ms", "every CRIU dump, rootfs and volume captures"),
    ("thawed_ms", "thawed, network unlocked (the window closes)"),
    ("described_ms", "specs, metadata, the parts announced"),
    (
        "digested_ms",
        "digests: the page images CRIU closed last, every other file",
    ),
    ("finished_ms", "the manifest written"),
    ("committed_ms", "renamed into place"),
];

/// The `pod_dump` span line of the dump of `sandbox` in the node's log: each step's duration,
/// ms, in [`STEPS`]' order (a step whose mark is missing: 0).
fn dump_steps(node: &Node, sandbox: &str) -> [f64; STEPS.len()] {
    let text = std::fs::read_to_string(node.files().log()).unwrap_or_default();
    let mark = format!("pod_dump sandbox={sandbox} ");
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains(&mark))
        .unwrap_or_else(|| panic!("no pod_dump line for {sandbox} in the node's log"));
    let value = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.trim_end_matches('"').strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse::<f64>().ok())
    };
    // Marks in the order of the flow: each step ends at its mark, from the mark before it
    // (the thaw comes before the finish without digests after it, after it with them).
    let mut marks: Vec<(usize, f64)> = STEPS
        .iter()
        .enumerate()
        .filter_map(|(i, (key, _))| Some((i, value(key)?)))
        .collect();
    marks.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut steps = [0.0; STEPS.len()];
    let mut before = 0.0;
    for (i, at) in marks {
        steps[i] = at - before;
        before = at;
    }
    steps
}

/// One round's numbers, in seconds and MiB.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    checkpoint: f64,
    pod_frozen: f64,
    longest: f64,
    sum: f64,
    image_mib: f64,
    restore: f64,
    restore_linked: f64,
    restore_copied: f64,
    /// podsnap only: each step of the dump, ms.
    steps: Option<[f64; STEPS.len()]>,
}

impl Round {
    fn new(checkpoint: f64, windows: &Windows, image_mib: f64, restore: f64) -> Round {
        Round {
            checkpoint,
            pod_frozen: windows.pod(),
            longest: windows.longest(),
            sum: windows.sum(),
            image_mib,
            restore,
            ..Default::default()
        }
    }

    fn record(&self, m: &mut Measures) {
        m.checkpoint.push(self.checkpoint);
        m.pod_frozen.push(self.pod_frozen);
        m.longest.push(self.longest);
        m.sum.push(self.sum);
        m.image_mib.push(self.image_mib);
        m.restore.push(self.restore);
        if let Some(steps) = self.steps {
            m.steps.resize_with(STEPS.len(), Samples::default);
            for (samples, ms) in m.steps.iter_mut().zip(steps) {
                samples.push(ms);
            }
        }
        if self.restore_linked > 0.0 && self.restore_copied > 0.0 {
            m.restore_linked.push(self.restore_linked);
            m.restore_copied.push(self.restore_copied);
        }
    }
}

fn main() {
    let rounds = common::rounds(5);
    let mut node = Node::start(common::podsnap_node_options());
    let runtime = common::runtime();
    let mut measures: Vec<Measures> = CONTENDERS.iter().map(|_| Measures::default()).collect();
    let started = Instant::now();
    for round in 0..=rounds {
        for turn in 0..CONTENDERS.len() {
            let which = (round + turn) % CONTENDERS.len();
            let contender = CONTENDERS[which];
            if checkpoint_only() && contender == Contender::GoInTurn {
                continue;
            }
            let digests = match contender {
                Contender::PodsnapEarly => "[dump]\ndigests = \"early\"\n",
                _ => "",
            };
            node.set_podsnap_config(digests).expect("node configuration");
            let m = match contender {
                Contender::Podsnap | Contender::PodsnapEarly => podsnap_round(&node, &runtime, round),
                Contender::GoParallel => go_parallel_round(&node, round),
                Contender::GoInTurn => go_in_turn_round(&node, round),
            };
            eprintln!("round {round} {contender:?}: {m:?}");
            if round > 0 {
                m.record(&mut measures[which]);
            }
        }
    }
    let [podsnap, early, parallel, in_turn] = &measures[..] else {
        unreachable!("four contenders")
    };
    let mib_each = ballast_mib();

    println!();
    println!(
        "### A pod of three containers, {mib_each} MiB dirtied memory each: checkpoint and restore \
         (median of {rounds}, min-max; {:.0} s in all; {})",
        seconds(started.elapsed()),
        common::MemoryState::from_env().describe()
    );
    println!();
    println!(
        "Frozen windows observed from outside (freezer state and CRIU's ptrace hold, sampled every \
         millisecond), the same way for every contender. podsnap: Tasks.Checkpoint of the sandbox \
         task (image_path), the pod frozen at one instant; restore = `podsnap restore` (new \
         sandbox, digests verified once). Go shim in parallel: Tasks.Checkpoint (image_path) of \
         the three containers at once, each frozen on its own; restore in place, the three tasks \
         re-created from their directories at once. Go shim in turn: `ctr task checkpoint` of \
         each container one after another (content store); restore in place from the CRIU blobs, \
         one after another."
    );
    println!();
    let row = |label: &str, m: &Measures| {
        vec![
            label.to_owned(),
            m.checkpoint.cell(2),
            m.pod_frozen.cell(2),
            m.longest.cell(2),
            m.sum.cell(2),
            m.image_mib.cell(0),
            m.restore.cell(2),
        ]
    };
    let ratios = |label: &str, a: &Measures, b: &Measures| {
        vec![
            label.to_owned(),
            ratio(&a.checkpoint, &b.checkpoint),
            ratio(&a.pod_frozen, &b.pod_frozen),
            ratio(&a.longest, &b.longest),
            ratio(&a.sum, &b.sum),
            ratio(&a.image_mib, &b.image_mib),
            ratio(&a.restore, &b.restore),
        ]
    };
    print_table(
        &[
            "",
            "checkpoint (s)",
            "pod frozen window (s)",
            "longest container frozen (s)",
            "container-seconds frozen",
            "image (MiB)",
            "restore to all running (s)",
        ],
        &[
            row(
                &format!("podsnap pod checkpoint (digests {})", auto_digests()),
                podsnap,
            ),
            row(
                "podsnap, digests as CRIU writes (`[dump] digests = \"early\"`)",
                early,
            ),
            row("Go runc shim, 3 x Tasks.Checkpoint in parallel", parallel),
            row("Go runc shim, 3 x ctr task checkpoint in turn", in_turn),
            ratios("ratio podsnap / Go in parallel", podsnap, parallel),
            ratios("ratio podsnap early / Go in parallel", early, parallel),
            ratios("ratio podsnap / Go in turn", podsnap, in_turn),
        ],
    );
    println!();
    println!(
        "podsnap's pod frozen window / the Go shim's longest single-container frozen time (in \
         parallel): {}",
        ratio(&podsnap.pod_frozen, &parallel.longest)
    );
    println!();
    println!(
        "### Where podsnap's pod dump spends its time (median of {rounds}, min-max, ms), from the \
         shim's `pod_dump` span: each step from the mark before it"
    );
    println!();
    let step_rows: Vec<Vec<String>> = STEPS
        .iter()
        .enumerate()
        .map(|(i, (key, what))| {
            let cell = |m: &Measures| m.steps.get(i).map(|s| s.cell(0)).unwrap_or_default();
            vec![
                format!("{} ({what})", key.trim_end_matches("_ms")),
                cell(podsnap),
                cell(early),
            ]
        })
        .collect();
    print_table(
        &["step", "podsnap (default)", "podsnap (digests early)"],
        &step_rows,
    );
    println!();
    println!(
        "### `podsnap restore` of that pod from outside the checkpoint root (median of {rounds}, min-max)"
    );
    println!();
    println!(
        "Same filesystem: the checkpoint is hard-linked into the root (no data copied). Another \
         filesystem (a tmpfs): every file is copied into the root first. Both are removed from the \
         root once the restore is over; times are to all containers running."
    );
    println!();
    let saved = Samples(
        podsnap
            .restore_copied
            .0
            .iter()
            .zip(&podsnap.restore_linked.0)
            .map(|(copied, linked)| copied - linked)
            .collect(),
    );
    print_table(
        &["", "restore (s)"],
        &[
            vec!["checkpoint inside the root".to_owned(), podsnap.restore.cell(2)],
            vec![
                "outside the root, same filesystem (hard links)".to_owned(),
                podsnap.restore_linked.cell(2),
            ],
            vec![
                "outside the root, another filesystem (copied)".to_owned(),
                podsnap.restore_copied.cell(2),
            ],
            vec!["saved by not copying (per round)".to_owned(), saved.cell(2)],
            vec![
                "ratio linked / copied".to_owned(),
                ratio(&podsnap.restore_linked, &podsnap.restore_copied),
            ],
        ],
    );
    if std::env::var_os("PODSNAP_KEEP_LOGS").is_some() {
        node.save_log("kept");
    }
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

fn specs() -> Vec<ContainerSpec> {
    let mib = ballast_mib();
    CONTAINERS
        .iter()
        .map(|(name, port)| {
            let port = port.to_string();
            ContainerSpec::workload(
                name,
                &["serve", "--name", name, "--port", &port, "--ballast-mib", &mib],
            )
        })
        .collect()
}

/// Runs the pod and waits until every container answers with its ballast written; returns the
/// pod, its container ids and the ballast checksums.
fn run_pod(node: &Node, handler: &str, name: &str) -> (KubePod, Vec<String>, Vec<String>) {
    let pod = kubelet::run_pod(node, &PodOptions::new(name, handler)).expect("RunPodSandbox");
    let ids: Vec<String> = specs()
        .iter()
        .map(|spec| kubelet::run_container(node, &pod, spec).expect("a container"))
        .collect();
    let sums = CONTAINERS
        .iter()
        .map(|(_, port)| {
            kubelet::wait_answering(&pod.ip, *port, Duration::from_secs(60)).expect("answers");
            kubelet::ask(&pod.ip, *port, "ballast-sum").expect("ballast-sum")
        })
        .collect();
    (pod, ids, sums)
}

/// Observes the containers `ids` of `pod`.
fn observe(pod: &KubePod, ids: &[String]) -> Observer {
    Observer::start(
        ids.iter()
            .zip(CONTAINERS)
            .map(|(id, (name, _))| Watched::container(&pod.uid, id, name))
            .collect(),
    )
}

/// Checks the restored pod at `ip` holds the same memory.
fn check_restored(ip: &str, sums: &[String]) {
    for ((name, port), sum) in CONTAINERS.iter().zip(sums) {
        kubelet::wait_answering(ip, *port, Duration::from_secs(60)).expect("restored answers");
        let after = kubelet::ask(ip, *port, "ballast-sum").expect("ballast-sum");
        assert_eq!(&after, sum, "restored memory of {name}");
    }
}

fn podsnap_round(node: &Node, runtime: &tokio::runtime::Runtime, round: usize) -> Round {
    let (pod, ids, sums) = run_pod(node, "podsnap", &node.unique(&format!("pc-ps-{round}")));
    let dir = node.files().checkpoints().join(format!("bench-{round}"));
    let api = ContainerdApi::connect(&node.address(), NS).expect("containerd API");
    common::settle(&node.files().checkpoints());
    let observer = observe(&pod, &ids);
    let checkpoint = common::timed_pod_checkpoint(&api, &pod.id, &dir);
    let windows = observer.stop();
    let image_mib = mib(common::dir_size(&dir));
    let steps = Some(dump_steps(node, &pod.id));
    kubelet::remove_pod(node, &pod).expect("remove the pod");
    if checkpoint_only() {
        let _ = std::fs::remove_dir_all(&dir);
        return Round {
            steps,
            ..Round::new(checkpoint, &windows, image_mib, 0.0)
        };
    }

    let (restore, imported) = timed_restore(node, runtime, &dir, &sums);
    assert!(imported.is_none(), "a checkpoint in the root is used in place");

    // The same checkpoint outside the root, same filesystem: linked in.
    let outside = node.dir().join(format!("outside-{round}"));
    std::fs::rename(&dir, &outside).expect("move the checkpoint out of the root");
    let (restore_linked, imported) = timed_restore(node, runtime, &outside, &sums);
    let imported = imported.expect("brought into the root");
    assert_eq!(imported.copied, 0, "linked, not copied: {imported:?}");
    // On another filesystem: copied in.
    let tmpfs = Tmpfs::mount(&node.dir().join(format!("tmpfs-{round}")), "size=2g");
    let copy = tmpfs.0.join("checkpoint");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&outside)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(status.success(), "copy the checkpoint to the tmpfs");
    let (restore_copied, imported) = timed_restore(node, runtime, &copy, &sums);
    let imported = imported.expect("brought into the root");
    assert_eq!(imported.linked, 0, "copied from the tmpfs: {imported:?}");
    drop(tmpfs);
    let _ = std::fs::remove_dir_all(&outside);
    Round {
        restore_linked,
        restore_copied,
        steps,
        ..Round::new(checkpoint, &windows, image_mib, restore)
    }
}

/// `podsnap restore` (the library) of `dir` until every container runs, timed; the restored
/// pod is checked and removed. Returns the seconds and what was brought into the root.
fn timed_restore(
    node: &Node,
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    sums: &[String],
) -> (f64, Option<podsnap_coordinator::restore::Imported>) {
    let mut request = RestoreRequest::new(dir);
    request.runtime_endpoint = node.endpoint();
    request.checkpoint_root = node.files().checkpoints();
    request.pods_dir = node.files().kubelet().join("pods");
    request.logs_dir = node.files().kubelet().join("logs/pods");
    common::sync_disks();
    let clock = Instant::now();
    let restored = runtime
        .block_on(podsnap_coordinator::restore::restore(
            &request,
            &podsnap_coordinator::progress::Quiet,
        ))
        .unwrap_or_else(|e| panic!("podsnap restore of {}: {e}", dir.display()));
    for (_, id) in &restored.containers {
        node.cri()
            .wait_container_state(id, cri::ContainerState::ContainerRunning, Duration::from_secs(60))
            .expect("restored container runs");
    }
    let took = seconds(clock.elapsed());
    let netns = node.cri().pod_netns(&restored.id).ok().flatten();
    node.record_pod(&restored.uid, netns.as_deref())
        .expect("record the pod");
    check_restored(&restored.ip, sums);
    node.cri()
        .stop_and_remove_pod(&restored.id)
        .expect("remove the restored pod");
    podsnap_tests::host::remove_pod_cgroups(&restored.uid);
    (took, restored.imported)
}

/// Runs `work` for every container at once, each on its own thread with its own containerd
/// connection, all released together; returns when every one is done.
fn at_once(node: &Node, ids: &[String], work: impl Fn(&ContainerdApi, usize, &str) + Sync) {
    let apis: Vec<ContainerdApi> = ids
        .iter()
        .map(|_| ContainerdApi::connect(&node.address(), NS).expect("containerd API"))
        .collect();
    let barrier = std::sync::Barrier::new(ids.len());
    std::thread::scope(|scope| {
        for (i, (id, api)) in ids.iter().zip(&apis).enumerate() {
            let (barrier, work) = (&barrier, &work);
            scope.spawn(move || {
                barrier.wait();
                work(api, i, id);
            });
        }
    });
}

fn go_parallel_round(node: &Node, round: usize) -> Round {
    let (pod, ids, sums) = run_pod(node, "runc", &node.unique(&format!("pc-gp-{round}")));
    let dir = node.dir().join(format!("go-parallel-{round}"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let dirs: Vec<PathBuf> = CONTAINERS.iter().map(|(name, _)| dir.join(name)).collect();
    common::settle(&node.files().checkpoints());
    let observer = observe(&pod, &ids);
    let clock = Instant::now();
    at_once(node, &ids, |api, i, id| {
        api.checkpoint(
            id,
            &CheckpointOptions {
                image_path: dirs[i].to_string_lossy().into_owned(),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("Tasks.Checkpoint of {id}: {e:#}"));
    });
    let checkpoint = seconds(clock.elapsed());
    let windows = observer.stop();
    let image_mib = mib(common::dir_size(&dir));
    if checkpoint_only() {
        kubelet::remove_pod(node, &pod).expect("remove the pod");
        let _ = std::fs::remove_dir_all(&dir);
        return Round::new(checkpoint, &windows, image_mib, 0.0);
    }

    // Restore in place: every task killed, then all re-created from their directories at once.
    let api = ContainerdApi::connect(&node.address(), NS).expect("containerd API");
    for id in &ids {
        stop_task(node, &api, id);
    }
    common::sync_disks();
    let clock = Instant::now();
    at_once(node, &ids, |api, i, id| {
        api.create_restored_task(id, &dirs[i])
            .and_then(|_| api.start(id))
            .unwrap_or_else(|e| panic!("restore of {id} from {}: {e:#}", dirs[i].display()));
    });
    let restore = seconds(clock.elapsed());
    check_restored(&pod.ip, &sums);
    for id in &ids {
        stop_task(node, &api, id);
    }
    kubelet::remove_pod(node, &pod).expect("remove the pod");
    let _ = std::fs::remove_dir_all(&dir);
    Round::new(checkpoint, &windows, image_mib, restore)
}

fn go_in_turn_round(node: &Node, round: usize) -> Round {
    let (pod, ids, sums) = run_pod(node, "runc", &node.unique(&format!("pc-go-{round}")));
    common::sync_disks();
    let observer = observe(&pod, &ids);
    let clock = Instant::now();
    let images: Vec<String> = ids
        .iter()
        .map(|id| {
            node.ctr()
                .run(NS, &["task", "checkpoint", id])
                .unwrap_or_else(|e| panic!("ctr task checkpoint {id}: {e}"))
                .trim()
                .to_owned()
        })
        .collect();
    let checkpoint = seconds(clock.elapsed());
    let windows = observer.stop();
    let image_mib = mib(images.iter().map(|name| image_bytes(node, name)).sum());

    // Restore in place: each task is killed (CRI deletes it), then created again from the CRIU
    // blob of its checkpoint image (containerd unpacks it for the shim) and started.
    let api = ContainerdApi::connect(&node.address(), NS).expect("containerd API");
    for id in &ids {
        stop_task(node, &api, id);
    }
    let blobs: Vec<(String, i64)> = images.iter().map(|name| criu_blob(node, name)).collect();
    common::sync_disks();
    let clock = Instant::now();
    for (id, (digest, size)) in ids.iter().zip(&blobs) {
        api.create_task_from_blob(id, CRIU_TAR, digest, *size)
            .and_then(|_| api.start(id))
            .unwrap_or_else(|e| panic!("restore of {id} from its checkpoint image: {e:#}"));
    }
    let restore = seconds(clock.elapsed());
    check_restored(&pod.ip, &sums);
    for id in &ids {
        stop_task(node, &api, id);
    }
    for name in &images {
        let _ = node.ctr().run(NS, &["images", "rm", "--sync", name]);
    }
    kubelet::remove_pod(node, &pod).expect("remove the pod");
    Round::new(checkpoint, &windows, image_mib, restore)
}

/// The index of image `name` (a checkpoint image: CRIU tar, rw layer, spec).
fn image_index(node: &Node, name: &str) -> serde_json::Value {
    let listing = node.ctr().run(NS, &["images", "ls"]).expect("ctr images ls");
    let digest = listing
        .lines()
        .skip(1)
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.first() == Some(&name)).then(|| {
                fields
                    .iter()
                    .find(|f| f.starts_with("sha256:"))
                    .map(|f| (*f).to_owned())
            })?
        })
        .unwrap_or_else(|| panic!("no image {name}"));
    let index = node
        .ctr()
        .run(NS, &["content", "get", &digest])
        .expect("ctr content get");
    serde_json::from_str(&index).expect("index JSON")
}

/// The bytes of every blob an image's index lists.
fn image_bytes(node: &Node, name: &str) -> u64 {
    image_index(node, name)["manifests"]
        .as_array()
        .map(|m| m.iter().filter_map(|d| d["size"].as_u64()).sum())
        .unwrap_or(0)
}

/// containerd's media type of a CRIU checkpoint tar.
const CRIU_TAR: &str = "application/vnd.containerd.container.criu.checkpoint.criu.tar";

/// The digest and size of the CRIU tar in checkpoint image `name`.
fn criu_blob(node: &Node, name: &str) -> (String, i64) {
    let index = image_index(node, name);
    index["manifests"]
        .as_array()
        .and_then(|m| m.iter().find(|d| d["mediaType"] == CRIU_TAR))
        .and_then(|d| Some((d["digest"].as_str()?.to_owned(), d["size"].as_i64()?)))
        .unwrap_or_else(|| panic!("no CRIU blob in {name}: {index}"))
}

/// Kills a task and waits until it is gone (CRI deletes the task of a container that exited;
/// we delete it if CRI does not), its bundle included: containerd removes the bundle of a
/// dead shim after the task is gone, and a task created again under the same id meanwhile
/// loses its own (the Go shim's restore then fails with "open .../work: no such file").
fn stop_task(node: &Node, api: &ContainerdApi, id: &str) {
    stop_task_only(node, api, id);
    let bundle = node
        .dir()
        .join("state/io.containerd.runtime.v2.task")
        .join(NS)
        .join(id);
    let deadline = Instant::now() + Duration::from_secs(20);
    while bundle.exists() {
        assert!(
            Instant::now() < deadline,
            "the bundle of task {id} stays: {}",
            bundle.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop_task_only(node: &Node, api: &ContainerdApi, id: &str) {
    let _ = node.ctr().run(NS, &["task", "kill", "-s", "SIGKILL", id]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Some(task) = api.task(id).expect("Tasks.Get") {
        if task.status == "STOPPED" && Instant::now() + Duration::from_secs(15) > deadline {
            let _ = node.ctr().run(NS, &["task", "delete", id]);
        }
        assert!(Instant::now() < deadline, "task {id} stays {task:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
