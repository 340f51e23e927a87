//! Benchmark (issue 4): a pod of three containers holding 256 MiB of dirtied memory each,
//! checkpointed and restored, podsnap against containerd's Go runc shim, side by side on one
//! private containerd, alternating round by round.
//!
//! - podsnap (handler `podsnap`): one Tasks.Checkpoint on the sandbox task with runc
//!   `CheckpointOptions{image_path}` (leave running): the shim freezes every container, dumps
//!   them in parallel and writes the manifest. Frozen window: the manifest's `stats.frozen_us`
//!   (first freeze to last thaw). Restore: `podsnap restore` (the coordinator's library: verify
//!   every digest, RunPodSandbox with the restore annotation, create and start each container)
//!   until every container runs.
//! - Go runc shim (handler `runc`): `ctr task checkpoint` of the three containers one after
//!   another (each paused by ctr, dumped, its rw layer diffed, resumed; images in the content
//!   store). Frozen window: from the first container's pause to the last one's resume (the
//!   span during which some container of the pod is frozen), from containerd's
//!   `/tasks/paused` and `/tasks/resumed` events; the sum of the three pauses is printed too.
//!   No pod restore works for it here: containerd 2.1 CRI's restore-by-create (KEP-2008) re-pulls
//!   the checkpoint's base image by reference and these nodes have no registry ("failed to pull
//!   checkpoint base image sha256:..."), and `ctr container restore` needs runtime and snapshotter
//!   annotations that `ctr task checkpoint` images lack. So its restore is containerd's own, in
//!   place: each container's task is killed, then created again from the CRIU blob of its
//!   checkpoint image (Tasks.Create with the descriptor; containerd unpacks it) and started, one
//!   after another, in the same sandbox (no new sandbox, no digest check: less work than
//!   podsnap's restore does).
//!
//! Image size: podsnap's checkpoint directory; for the Go shim the content-store blobs of the
//! three `ctr task checkpoint` images (CRIU tar, rw layer, spec).
//!
//! Restore from outside the checkpoint root (podsnap only): the same checkpoint moved out of
//! the root on the same filesystem (`podsnap restore` hard-links it in: no data copied), and a
//! copy of it on a tmpfs mounted by the bench (another filesystem: the restore must copy every
//! file into the root first), each timed like the restore above; the difference is what not
//! copying saves.
//!
//! `cargo build --release -p containerd-shim-podsnap-v1 && cargo bench -p podsnap-tests --bench
//! pod_checkpoint` (rounds: `PODSNAP_BENCH_N`, default 5).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{mib, print_table, ratio, seconds, Samples};
use k8s_cri::v1 as cri;
use podsnap_coordinator::restore::RestoreRequest;
use podsnap_tests::containerd_api::{CheckpointOptions, ContainerdApi};
use podsnap_tests::ctr::CRI_NAMESPACE as NS;
use podsnap_tests::host::Tmpfs;
use podsnap_tests::kubelet::{self, ContainerSpec, KubePod, PodOptions};
use podsnap_tests::node::{Node, NodeOptions};

const BALLAST_MIB: &str = "256";
const CONTAINERS: [(&str, u16); 3] = [("one", 8081), ("two", 8082), ("three", 8083)];

#[derive(Default)]
struct Measures {
    checkpoint: Samples,
    frozen: Samples,
    frozen_sum: Samples,
    restore: Samples,
    verify: Samples,
    image_mib: Samples,
    slowest: Samples,
    frozen_over_slowest: Samples,
    /// podsnap only: restore from outside the root, linked in / copied in.
    restore_linked: Samples,
    restore_copied: Samples,
}

fn main() {
    let rounds = common::rounds(5);
    let mut options = NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    options.podsnap_shim = true;
    options.log_level = "info".to_owned();
    let mut node = Node::start(options);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut podsnap = Measures::default();
    let mut go = Measures::default();
    let started = Instant::now();
    for round in 0..=rounds {
        // Alternate who goes first; round 0 warms both up and is not counted.
        for first in [round % 2 == 0, round % 2 != 0] {
            if first {
                let m = podsnap_round(&node, &runtime, round);
                eprintln!("round {round} podsnap: {m:?}");
                if round > 0 {
                    m.record(&mut podsnap);
                }
            } else {
                let m = go_round(&node, round);
                eprintln!("round {round} Go runc shim: {m:?}");
                if round > 0 {
                    m.record(&mut go);
                }
            }
        }
    }

    println!();
    println!(
        "### A pod of three containers, {BALLAST_MIB} MiB dirtied memory each: checkpoint and restore \
         (median of {rounds}, min-max; {:.0} s in all)",
        seconds(started.elapsed())
    );
    println!();
    println!(
        "podsnap: Tasks.Checkpoint on the sandbox task (image_path), frozen = manifest stats.frozen_us, \
         restore = `podsnap restore` (library, digests verified). Go shim: `ctr task checkpoint` of \
         the three containers in turn, frozen = first pause to last resume (sum of the three pauses \
         in its own column), restore = each task re-created from its checkpoint image's CRIU blob and \
         started, in place (same sandbox: no new sandbox, no digest check)."
    );
    println!();
    let row = |label: &str, m: &Measures| {
        vec![
            label.to_owned(),
            m.checkpoint.cell(2),
            m.frozen.cell(2),
            m.frozen_sum.cell(2),
            m.restore.cell(2),
            m.verify.cell(2),
            m.image_mib.cell(0),
            m.slowest.cell(2),
            m.frozen_over_slowest.cell(2),
        ]
    };
    let rows = vec![
        row("podsnap pod checkpoint", &podsnap),
        row("Go runc shim, 3 x ctr task checkpoint", &go),
        vec![
            "ratio podsnap / Go shim".to_owned(),
            ratio(&podsnap.checkpoint, &go.checkpoint),
            ratio(&podsnap.frozen, &go.frozen),
            ratio(&podsnap.frozen_sum, &go.frozen_sum),
            ratio(&podsnap.restore, &go.restore),
            String::new(),
            ratio(&podsnap.image_mib, &go.image_mib),
            ratio(&podsnap.slowest, &go.slowest),
            String::new(),
        ],
    ];
    print_table(
        &[
            "",
            "checkpoint (s)",
            "pod frozen window (s)",
            "container-seconds frozen",
            "restore to all running (s)",
            "one digest check of the checkpoint (s)",
            "image (MiB)",
            "slowest single container dump (s)",
            "frozen window / slowest dump",
        ],
        &rows,
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
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

/// One round's numbers, in seconds and MiB.
#[derive(Debug, Clone, Copy)]
struct Round {
    checkpoint: f64,
    frozen: f64,
    frozen_sum: f64,
    /// The slowest single container's dump (podsnap: manifest stats.slowest_dump_us; Go shim:
    /// the longest of the three pause-to-resume spans).
    slowest: f64,
    restore: f64,
    /// One digest check of the whole checkpoint (podsnap only; informational).
    verify: f64,
    image_mib: f64,
    /// podsnap only: restores from outside the root (0 for the Go shim).
    restore_linked: f64,
    restore_copied: f64,
}

impl Round {
    fn record(&self, m: &mut Measures) {
        m.checkpoint.push(self.checkpoint);
        m.frozen.push(self.frozen);
        m.frozen_sum.push(self.frozen_sum);
        m.restore.push(self.restore);
        if self.verify > 0.0 {
            m.verify.push(self.verify);
        }
        m.image_mib.push(self.image_mib);
        m.slowest.push(self.slowest);
        m.frozen_over_slowest.push(self.frozen / self.slowest);
        if self.restore_linked > 0.0 && self.restore_copied > 0.0 {
            m.restore_linked.push(self.restore_linked);
            m.restore_copied.push(self.restore_copied);
        }
    }
}

fn specs() -> Vec<ContainerSpec> {
    CONTAINERS
        .iter()
        .map(|(name, port)| {
            let port = port.to_string();
            ContainerSpec::workload(
                name,
                &[
                    "serve",
                    "--name",
                    name,
                    "--port",
                    &port,
                    "--ballast-mib",
                    BALLAST_MIB,
                ],
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

/// Checks the restored pod at `ip` holds the same memory.
fn check_restored(ip: &str, sums: &[String]) {
    for ((name, port), sum) in CONTAINERS.iter().zip(sums) {
        kubelet::wait_answering(ip, *port, Duration::from_secs(60)).expect("restored answers");
        let after = kubelet::ask(ip, *port, "ballast-sum").expect("ballast-sum");
        assert_eq!(&after, sum, "restored memory of {name}");
    }
}

fn podsnap_round(node: &Node, runtime: &tokio::runtime::Runtime, round: usize) -> Round {
    let (pod, _ids, sums) = run_pod(node, "podsnap", &node.unique(&format!("pc-ps-{round}")));
    let dir = node.files().checkpoints().join(format!("bench-{round}"));
    let api = ContainerdApi::connect(&node.address(), NS).expect("containerd API");
    common::sync_disks();
    let clock = Instant::now();
    api.checkpoint(
        &pod.id,
        &CheckpointOptions {
            image_path: dir.to_string_lossy().into_owned(),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("pod checkpoint of {}: {e:#}", pod.id));
    let checkpoint = seconds(clock.elapsed());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest.json"))
            .expect("manifest JSON");
    let frozen = manifest["stats"]["frozen_us"].as_f64().expect("stats.frozen_us") / 1e6;
    let slowest = manifest["stats"]["slowest_dump_us"]
        .as_f64()
        .expect("stats.slowest_dump_us")
        / 1e6;
    let image_mib = mib(common::dir_size(&dir));
    kubelet::remove_pod(node, &pod).expect("remove the pod");

    // One digest check of every file, timed apart (the restore below does its own).
    let clock = Instant::now();
    podsnap_checkpoint::manifest::Manifest::load_verified(&dir).expect("the checkpoint verifies");
    let verify = seconds(clock.elapsed());

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
        checkpoint,
        // All three containers are frozen together for this window.
        frozen,
        frozen_sum: frozen * CONTAINERS.len() as f64,
        slowest,
        restore,
        verify,
        image_mib,
        restore_linked,
        restore_copied,
    }
}

/// `podsnap restore` (the library) of `dir` until every container runs, timed; the restored
/// pod is checked and removed. Returns the seconds and what was brought into the root.
fn timed_restore(
    node: &Node,
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    sums: &[String],
) -> (f64, Option<podsnap_checkpoint::import::Imported>) {
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

/// `ctr events` lines, collected while it runs.
struct Events {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Events {
    fn start(node: &Node) -> Self {
        let mut child = node
            .ctr()
            .command(NS)
            .arg("events")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("ctr events stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut lines) = sink.lock() {
                    lines.push(line);
                }
            }
        });
        // Let it subscribe before anything happens.
        std::thread::sleep(Duration::from_millis(300));
        Self { child, lines }
    }

    /// Stops `ctr events`; returns (topic, container id, seconds of the day) of every pause and
    /// resume it saw.
    fn stop(mut self) -> Vec<(String, String, f64)> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let lines = self.lines.lock().map(|l| l.clone()).unwrap_or_default();
        lines
            .iter()
            .filter_map(|line| {
                // "2026-11-27 02:38:04.123456789 +0000 UTC k8s.io /tasks/paused {...}"
                let fields: Vec<&str> = line.splitn(7, ' ').collect();
                let topic = fields.get(5)?;
                if *topic != "/tasks/paused" && *topic != "/tasks/resumed" {
                    return None;
                }
                let clock: Vec<f64> = fields.get(1)?.split(':').filter_map(|p| p.parse().ok()).collect();
                let at = clock.first()? * 3600.0 + clock.get(1)? * 60.0 + clock.get(2)?;
                let body: serde_json::Value = serde_json::from_str(fields.get(6)?).ok()?;
                let id = body["container_id"].as_str()?.to_owned();
                Some(((*topic).to_owned(), id, at))
            })
            .collect()
    }
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

fn go_round(node: &Node, round: usize) -> Round {
    let (pod, ids, sums) = run_pod(node, "runc", &node.unique(&format!("pc-go-{round}")));
    let events = Events::start(node);
    common::sync_disks();
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
    let seen = events.stop();
    let at = |topic: &str, id: &str| {
        seen.iter()
            .find(|(t, i, _)| t == topic && i == id)
            .map(|(_, _, at)| *at)
            .unwrap_or_else(|| panic!("no {topic} event for {id}: {seen:?}"))
    };
    let pauses: Vec<(f64, f64)> = ids
        .iter()
        .map(|id| (at("/tasks/paused", id), at("/tasks/resumed", id)))
        .collect();
    let frozen = pauses.iter().map(|p| p.1).fold(f64::MIN, f64::max)
        - pauses.iter().map(|p| p.0).fold(f64::MAX, f64::min);
    let frozen_sum: f64 = pauses.iter().map(|(paused, resumed)| resumed - paused).sum();
    let slowest = pauses
        .iter()
        .map(|(paused, resumed)| resumed - paused)
        .fold(0.0, f64::max);
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
    Round {
        checkpoint,
        frozen,
        frozen_sum,
        slowest,
        restore,
        verify: 0.0,
        image_mib,
        restore_linked: 0.0,
        restore_copied: 0.0,
    }
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
/// we delete it if CRI does not).
fn stop_task(node: &Node, api: &ContainerdApi, id: &str) {
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
