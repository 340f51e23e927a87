//! Benchmark (issue 11): migration downtime of a pod of three containers holding 256 MiB of
//! dirtied memory each (`PODSNAP_BENCH_MIB` to change it) from node A to node B, two private
//! containerds on this machine (own roots, sockets, bridges and subnets: `Node::start_pair`),
//! the contenders taking turns in an order rotated round by round and reversed every other
//! round (round 0 warms every one up and is not counted; rounds: `PODSNAP_BENCH_N`, default 3).
//!
//! Downtime: from the first sample of the outside observer (`common::observer`: freezer state
//! and CRIU's ptrace hold, every millisecond) that finds a container of the pod on A stopped,
//! until every container of the pod on B is RUNNING for CRI and its workload answers on the
//! new pod IP. Each contender works on a fresh pod; the memory restored is checked after the
//! clock stops (the ballast checksums).
//!
//! Memory: `PODSNAP_BENCH_BALLAST` = `mixed` (default, heap-like, about 2.7:1 with zstd) or
//! `uniform` (one byte value per page: compresses to almost nothing).
//!
//! - podsnap through the registry: `podsnap migrate --to REF` on A (the pod frozen at one
//!   instant, dumped, stopped at the snapshot, pushed signed as zstd layers), then `podsnap
//!   restore --from REF` on B (pull, signature and digests verified, new sandbox, containers
//!   restored). A fresh `docker-registry` on 127.0.0.1 per round, so no layer is already there.
//!   The same again at `--zstd-level 3` (the default was 3 until level 1 measured better here),
//!   and restored with `--lazy` (memory copied on demand after the containers run).
//! - (i) podsnap without a registry: `podsnap dump --stop --dir` on A, a plain `cp -a` of the
//!   checkpoint directory into B's checkpoint root, `podsnap restore --checkpoint-dir` on B.
//! - (ii) the per-container KEP-2008 way on containerd's Go runc shim (handler `runc`): CRI
//!   CheckpointContainer of the three containers at once (each writes its archive; the
//!   containers keep running, as the KEP's checkpoint does, so their state after the checkpoint
//!   is lost: downtime still starts at the first freeze); each archive pushed to the same kind
//!   of registry as the layer of a checkpoint image (`podsnap_tests::checkpoint_image`; the
//!   three at once, uncompressed, as the archive is); on B, as kubelet would: PullImage of the
//!   three checkpoint images (at once), RunPodSandbox, then CreateContainer with the checkpoint
//!   image (containerd 2.1 CRI's restore: it pulls the base image by the digest recorded in the
//!   archive, from the registry too) and StartContainer (runc restore), the three at once. The
//!   base image is the workload image pushed to that registry under its name, so both nodes know
//!   it by a pullable digest reference.
//!
//! - podsnap straight to B (issue 23, stage 1): `podsnap receive --listen --once` on B and
//!   `podsnap migrate --to-node` on A, over the `[migration]` channel (mutual TLS, one key both
//!   nodes list): the pod paused, dumped, every file sent, verified and restored on B; not live
//!   (post-copy is not done), so its downtime still grows with memory.
//!
//! Phases (each contender's own boundaries): dump = podsnap's dump as `migrate` reports it / the
//! `podsnap dump` command / the three CheckpointContainer calls; push (or copy) and pull as
//! timed here (`podsnap restore --from`'s pull = its run time less the restore time it prints);
//! restore = from the end of the pull to every container running and answering.
//!
//! `cargo build --workspace --bins --examples && cargo bench --profile dev -p podsnap-tests --bench
//! migration_downtime`; with `PODSNAP_CLI_DIR=target/release` and `PODSNAP_SHIM_DIR=target/release`
//! the release CLI and shim (`cargo build --release -p podsnap-coordinator -p
//! containerd-shim-podsnap-v1 --bins --examples`: with `--bin podsnap` cargo builds the CLI alone
//! and an older shim stays). The `channel_loopback` example beside the CLI measures the channel
//! alone, the live window's yardstick. `PODSNAP_BENCH_ONLY=live,direct,local,registry,kep2008`: only those
//! contenders.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::observer::{Observer, Watched, Windows};
use common::{mib, print_table, ratio, seconds, Samples};
use k8s_cri::v1 as cri;
use podsnap_tests::command::output_text as text;
use podsnap_tests::containerd_api::ContainerdApi;
use podsnap_tests::cri::CriClient;
use podsnap_tests::ctr::CRI_NAMESPACE as NS;
use podsnap_tests::kubelet::{self, ContainerSpec, KubePod, PodOptions};
use podsnap_tests::node::Node;
use podsnap_tests::registry::{self, Registry};

const CONTAINERS: [(&str, u16); 3] = [("one", 8081), ("two", 8082), ("three", 8083)];

/// How long any one container may take to run or answer.
const WAIT: Duration = Duration::from_secs(120);

/// MiB of dirtied memory per container.
fn ballast_mib() -> String {
    std::env::var("PODSNAP_BENCH_MIB").unwrap_or_else(|_| "256".to_owned())
}

/// What the memory holds (`PODSNAP_BENCH_BALLAST`): `mixed` by default, heap-like (a quarter
/// each of one-byte pages, random bytes, text, pointer-like words: about 2.7:1 with zstd);
/// `uniform` pages of one byte value compress to almost nothing and flatter a compressed
/// transfer.
fn ballast_content() -> String {
    std::env::var("PODSNAP_BENCH_BALLAST").unwrap_or_else(|_| "mixed".to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    Registry,
    /// The same at `--zstd-level 3` (the default until level 1 measured better here).
    RegistryLevel3,
    /// The default level, restored with `--lazy` (memory on demand after the restore).
    RegistryLazy,
    Local,
    Kep2008,
    /// `podsnap migrate --to-node --copy` to a `podsnap receive` on B (the `[migration]`
    /// channel: paused, dumped, sent, restored; not live): also the channel's throughput.
    Direct,
    /// `podsnap migrate --to-node`: live (post-copy).
    Live,
}

const CONTENDERS: [Contender; 7] = [
    Contender::Registry,
    Contender::RegistryLevel3,
    Contender::RegistryLazy,
    Contender::Local,
    Contender::Kep2008,
    Contender::Direct,
    Contender::Live,
];

/// What a live round measures beyond a [`Round`].
#[derive(Debug, Clone, Default)]
struct LiveRound {
    /// Switch to the source's release (`migrate`'s memory line).
    window: f64,
    /// Of it: the switch until B had every page.
    filled: f64,
    /// Ping latencies (ms) on B in the first 2 s after every container first answered.
    pings_ms: Vec<f64>,
    /// One `ballast-sum` (every page of a container's memory) sent at the first answer.
    full_read: f64,
}

#[derive(Default)]
struct LiveMeasures {
    window: Samples,
    filled: Samples,
    p99_ms: Samples,
    full_read: Samples,
    /// The channel alone over loopback, MiB/s.
    channel: Samples,
}

/// One round's numbers, in seconds and MiB.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    downtime: f64,
    dump: f64,
    push: f64,
    pull: f64,
    restore: f64,
    moved_mib: f64,
}

#[derive(Default)]
struct Measures {
    downtime: Samples,
    dump: Samples,
    push: Samples,
    pull: Samples,
    restore: Samples,
    moved_mib: Samples,
}

impl Measures {
    fn record(&mut self, r: &Round) {
        self.downtime.push(r.downtime);
        self.dump.push(r.dump);
        self.push.push(r.push);
        self.pull.push(r.pull);
        self.restore.push(r.restore);
        self.moved_mib.push(r.moved_mib);
    }
}

/// What every round shares: the two nodes, the podsnap binary, a directory with the signing key
/// pair and an empty Docker config.
struct Bench {
    a: Node,
    b: Node,
    podsnap: PathBuf,
    dir: tempfile::TempDir,
    signing: PathBuf,
    trusted: PathBuf,
}

fn main() {
    let rounds = common::rounds(3);
    let workload = PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload"));
    // `PODSNAP_CLI_DIR`: the podsnap CLI from there (a release build: the live contender's
    // page streams run through it, TLS included).
    let podsnap = std::env::var_os("PODSNAP_CLI_DIR")
        .map(|d| PathBuf::from(d).join("podsnap"))
        .unwrap_or_else(|| workload.with_file_name("podsnap"));
    assert!(
        podsnap.is_file(),
        "{} is missing: `cargo build --workspace --bins` first (same profile)",
        podsnap.display()
    );
    let (a, b) = Node::start_pair(common::podsnap_node_options(), common::podsnap_node_options());
    let dir = tempfile::tempdir().expect("a bench directory");
    std::fs::create_dir(dir.path().join("docker")).expect("docker config dir");
    let (signing, trusted) = registry::key_pair(dir.path(), "node");
    let mut bench = Bench {
        a,
        b,
        podsnap,
        dir,
        signing,
        trusted,
    };
    let mut measures: Vec<Measures> = CONTENDERS.iter().map(|_| Measures::default()).collect();
    let mut live_measures = LiveMeasures {
        channel: channel_throughput(&bench, memory_mib().round() as u64, rounds.max(3)),
        ..Default::default()
    };
    // `PODSNAP_BENCH_ONLY=live,direct,local,...`: only these contenders (the others' rows empty).
    let only: Option<Vec<String>> = std::env::var("PODSNAP_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_lowercase()).collect());
    let started = Instant::now();
    for round in 0..=rounds {
        for turn in 0..CONTENDERS.len() {
            // Rotated each round and reversed every other round: no contender always follows
            // the same one (the KEP-2008 contender leaves node B's containerd busy removing
            // what it pulled, which slowed whatever came next).
            let n = CONTENDERS.len();
            let which = if round % 2 == 0 {
                (round / 2 + turn) % n
            } else {
                (round / 2 + n - 1 - turn) % n
            };
            let contender = CONTENDERS[which];
            if only
                .as_ref()
                .is_some_and(|o| !o.contains(&format!("{contender:?}").to_lowercase()))
            {
                continue;
            }
            let r = match contender {
                Contender::Registry => registry_round(&bench, round, None, false),
                Contender::RegistryLevel3 => registry_round(&bench, round, Some("3"), false),
                Contender::RegistryLazy => registry_round(&bench, round, None, true),
                Contender::Local => local_round(&bench, round),
                Contender::Kep2008 => kep_round(&bench, round),
                Contender::Direct => direct_round(&bench, round, false).0,
                Contender::Live => {
                    let (r, live) = direct_round(&bench, round, true);
                    let live = live.expect("a live round");
                    eprintln!(
                        "round {round} Live extra: window {:.2} s, full read {:.2} s, {} pings",
                        live.window,
                        live.full_read,
                        live.pings_ms.len()
                    );
                    if round > 0 {
                        live_measures.window.push(live.window);
                        live_measures.filled.push(live.filled);
                        if live.full_read.is_finite() {
                            live_measures.full_read.push(live.full_read);
                        }
                        let mut p = live.pings_ms.clone();
                        p.sort_by(f64::total_cmp);
                        if !p.is_empty() {
                            live_measures
                                .p99_ms
                                .push(p[(p.len() * 99 / 100).min(p.len() - 1)]);
                        }
                    }
                    r
                }
            };
            eprintln!("round {round} {contender:?}: {r:?}");
            if round > 0 {
                measures[which].record(&r);
            }
        }
    }
    let [through_registry, level3, lazy, local, kep, direct, live] = &measures[..] else {
        unreachable!("seven contenders")
    };
    print_tables(rounds, started, [through_registry, level3, lazy], local, kep);
    print_direct(rounds, direct, through_registry, local);
    print_live(
        rounds,
        live,
        &live_measures,
        [through_registry, local, kep, direct],
    );
    let mut problems = bench.b.teardown();
    problems.extend(bench.a.teardown());
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

fn print_tables(
    rounds: usize,
    started: Instant,
    [reg, level3, lazy]: [&Measures; 3],
    local: &Measures,
    kep: &Measures,
) {
    let (mib_each, content) = (ballast_mib(), ballast_content());
    println!();
    println!(
        "### Migration downtime of a pod of three containers, {mib_each} MiB dirtied memory each \
         ({content}), node A to node B (median of {rounds}, min-max; {:.0} s in all)",
        seconds(started.elapsed())
    );
    println!();
    println!(
        "Downtime: first container seen stopped on A (freezer or CRIU's ptrace hold, sampled every \
         millisecond) until every container on B is RUNNING and answers. podsnap through the \
         registry: `podsnap migrate --to REF` on A, `podsnap restore --from REF` on B (signed zstd \
         layers, a fresh docker-registry on 127.0.0.1). (i) `podsnap dump --stop`, `cp -a` into \
         B's checkpoint root, `podsnap restore --checkpoint-dir`. (ii) KEP-2008 on the Go runc \
         shim: CRI CheckpointContainer of the three containers at once, each archive pushed as \
         the layer of a checkpoint image (uncompressed) to the same kind of registry, PullImage on \
         B, RunPodSandbox, CreateContainer from the checkpoint images + StartContainer (containerd \
         CRI's restore), the three at once."
    );
    println!();
    let row = |label: &str, m: &Measures| {
        vec![
            label.to_owned(),
            m.downtime.cell(2),
            m.dump.cell(2),
            m.push.cell(2),
            m.pull.cell(2),
            m.restore.cell(2),
            m.moved_mib.cell(1),
        ]
    };
    let ratios = |label: &str, a: &Measures, b: &Measures| {
        vec![
            label.to_owned(),
            ratio(&a.downtime, &b.downtime),
            ratio(&a.dump, &b.dump),
            ratio(&a.push, &b.push),
            ratio(&a.pull, &b.pull),
            ratio(&a.restore, &b.restore),
            ratio(&a.moved_mib, &b.moved_mib),
        ]
    };
    print_table(
        &[
            "",
            "downtime (s)",
            "dump (s)",
            "push / copy (s)",
            "pull (s)",
            "restore to all answering (s)",
            "moved (MiB)",
        ],
        &[
            row("podsnap through the registry (zstd level 1, the default)", reg),
            row("podsnap through the registry, `--zstd-level 3`", level3),
            row("podsnap through the registry, `restore --from --lazy`", lazy),
            row("(i) podsnap dump, cp, restore (no registry)", local),
            row(
                "(ii) KEP-2008: 3 x CheckpointContainer, registry, CRI restore (Go runc shim)",
                kep,
            ),
            ratios("ratio podsnap registry / (i)", reg, local),
            ratios("ratio podsnap registry / (ii)", reg, kep),
            ratios("ratio podsnap registry, level 3 / level 1", level3, reg),
            ratios("ratio podsnap registry --lazy / (i)", lazy, local),
        ],
    );
    println!();
    let goal = |a: &Samples, b: &Samples, limit: f64, strict: bool| {
        let r = a.median() / b.median();
        let met = if strict { r < limit } else { r <= limit };
        format!("{r:.2}x ({})", if met { "met" } else { "NOT met" })
    };
    println!(
        "Goals: podsnap through the registry at most 1.3x (i): {}; below (ii): {}",
        goal(&reg.downtime, &local.downtime, 1.3, false),
        goal(&reg.downtime, &kep.downtime, 1.0, true)
    );
}

fn specs(image: Option<&str>) -> Vec<ContainerSpec> {
    let (mib, content) = (ballast_mib(), ballast_content());
    CONTAINERS
        .iter()
        .map(|(name, port)| {
            let mut spec = ContainerSpec::ballast(name, *port, &mib, &content);
            if let Some(image) = image {
                spec.image = image.to_owned();
            }
            spec
        })
        .collect()
}

/// A source pod on `node`: every container answering with its ballast written. Returns the
/// pod, its container ids and the ballast checksums.
fn source_pod(
    node: &Node,
    handler: &str,
    name: &str,
    image: Option<&str>,
) -> (KubePod, Vec<String>, Vec<String>) {
    let pod = kubelet::run_pod(node, &PodOptions::new(name, handler)).expect("RunPodSandbox");
    let ids: Vec<String> = specs(image)
        .iter()
        .map(|spec| kubelet::run_container(node, &pod, spec).expect("a container"))
        .collect();
    let sums = CONTAINERS
        .iter()
        .map(|(_, port)| {
            kubelet::wait_answering(&pod.ip, *port, WAIT).expect("answers");
            kubelet::ask(&pod.ip, *port, "ballast-sum").expect("ballast-sum")
        })
        .collect();
    (pod, ids, sums)
}

fn observe(pod: &KubePod, ids: &[String]) -> Observer {
    Observer::start(
        ids.iter()
            .zip(CONTAINERS)
            .map(|(id, (name, _))| Watched::container(&pod.uid, id, name))
            .collect(),
    )
}

/// Waits until every container `ids` on `node` is RUNNING and answers at `ip`.
fn wait_all_answering(node: &Node, ids: &[String], ip: &str) {
    for id in ids {
        node.cri()
            .wait_container_state(id, cri::ContainerState::ContainerRunning, WAIT)
            .unwrap_or_else(|e| panic!("container {id} runs on node B: {e:#}"));
    }
    for (name, port) in CONTAINERS {
        kubelet::wait_answering(ip, port, WAIT).unwrap_or_else(|e| panic!("{name} answers on node B: {e:#}"));
    }
}

/// The restored pod at `ip` holds the memory the source pod had.
fn check_memory(ip: &str, sums: &[String]) {
    for ((name, port), sum) in CONTAINERS.iter().zip(sums) {
        let after = kubelet::ask(ip, *port, "ballast-sum").expect("ballast-sum");
        assert_eq!(&after, sum, "restored memory of {name}");
    }
}

/// The downtime: from the observer's first stopped sample to `end`.
fn downtime(windows: &Windows, end: Instant) -> f64 {
    let first = windows
        .first_stop()
        .expect("the observer saw the pod on node A stopped");
    seconds(end.duration_since(first))
}

/// The ids of the containers of pod `id` on `node`, in [`CONTAINERS`] order.
fn container_ids(node: &Node, id: &str) -> Vec<String> {
    let containers = node.cri().pod_containers(id).expect("ListContainers");
    CONTAINERS
        .iter()
        .map(|(name, _)| {
            containers
                .iter()
                .find(|c| c.metadata.as_ref().is_some_and(|m| m.name == *name))
                .map(|c| c.id.clone())
                .unwrap_or_else(|| panic!("no container {name} in pod {id}: {containers:?}"))
        })
        .collect()
}

/// Removes a pod the CLI restored (its id and uid) from `node`.
fn remove_restored(node: &Node, id: &str, uid: &str) {
    node.cri()
        .stop_and_remove_pod(id)
        .unwrap_or_else(|e| panic!("removing pod {id}: {}", e.message()));
    podsnap_tests::host::remove_pod_cgroups(uid);
}

/// Empties `node`'s checkpoint root.
fn clear_checkpoints(node: &Node) {
    let root = node.files().checkpoints();
    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

/// The value after `key` on the first line of `stdout` that starts with it.
fn field<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key:?} in {stdout}"))
}

/// Seconds of a duration as Rust's `{:?}` prints it (`1.23s`, `456.7ms`, `12µs`, `5ns`).
fn parse_duration(text: &str) -> f64 {
    let text = text.trim().trim_end_matches([',', ';', ')']);
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix("ns") {
        (n, 1e-9)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        panic!("not a duration: {text:?}")
    };
    number
        .parse::<f64>()
        .unwrap_or_else(|e| panic!("not a duration: {text:?}: {e}"))
        * scale
}

/// The duration that follows `word` in `line` (`dump 1.2s (frozen ...), push 3.4s; ...`).
fn duration_after(line: &str, word: &str) -> f64 {
    let rest = line
        .split_once(&format!("{word} "))
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
    parse_duration(rest.split_whitespace().next().unwrap_or_default())
}

impl Bench {
    /// Runs the podsnap CLI against `node`, with the node configuration `config`.
    fn podsnap(&self, node: &Node, config: &Path, args: &[&str]) -> Output {
        let docker = self.dir.path().join("docker");
        let out = registry::podsnap_on(&self.podsnap, config, &docker, node, args);
        assert!(out.status.success(), "podsnap {args:?}: {}", text(&out));
        out
    }

    /// A node configuration allowing `registry` (if any), signing with and trusting our key.
    fn config(&self, registry: Option<&Registry>) -> PathBuf {
        let allowed = registry.map(|r| format!("\"{}\"", r.host())).unwrap_or_default();
        let path = self.dir.path().join("node.toml");
        std::fs::write(
            &path,
            format!(
                "[registry]\nallowed = [{allowed}]\nsigning_key = \"{}\"\ntrusted_keys = [\"{}\"]\n",
                self.signing.display(),
                self.trusted.display()
            ),
        )
        .expect("node configuration");
        path
    }

    /// `podsnap restore` on B with `source` (`--from REF` or `--checkpoint-dir DIR`): the new
    /// pod's (id, uid, ip) and the restore time it printed.
    fn restore_on_b(&self, config: &Path, source: &[&str]) -> ((String, String, String), f64) {
        let pods = self.b.files().kubelet().join("pods");
        let logs = self.b.files().kubelet().join("logs/pods");
        let mut args = vec!["restore"];
        args.extend(source);
        args.extend([
            "--pods-dir",
            pods.to_str().expect("utf8"),
            "--logs-dir",
            logs.to_str().expect("utf8"),
        ]);
        let out = self.podsnap(&self.b, config, &args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let id = field(&stdout, "id ").to_owned();
        let ip = field(&stdout, "ip ").to_owned();
        let uid = field(&stdout, "pod ")
            .rsplit_once("(uid ")
            .and_then(|(_, u)| u.strip_suffix(')'))
            .expect("the new pod's uid")
            .to_owned();
        let took = parse_duration(field(&stdout, "took "));
        let netns = self.b.cri().pod_netns(&id).ok().flatten();
        self.b
            .record_pod(&uid, netns.as_deref())
            .expect("record the restored pod");
        ((id, uid, ip), took)
    }
}

/// podsnap through a fresh registry, at `zstd_level` (the default when `None`), restored
/// lazily or not.
fn registry_round(bench: &Bench, round: usize, zstd_level: Option<&str>, lazy: bool) -> Round {
    let (a, b) = (&bench.a, &bench.b);
    let registry = Registry::start();
    let config = bench.config(Some(&registry));
    let name = a.unique(&format!("mig-reg-{round}"));
    let reference = format!("{}/moves/{name}:v1", registry.host());
    let (pod, ids, sums) = source_pod(a, "podsnap", &name, None);
    common::sync_disks();
    let observer = observe(&pod, &ids);
    let mut args = vec![
        "migrate",
        "--namespace",
        "default",
        "--pod",
        &name,
        "--to",
        &reference,
    ];
    if let Some(level) = zstd_level {
        args.extend(["--zstd-level", level]);
    }
    let out = bench.podsnap(a, &config, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let phases = field(&stdout, "phases ");
    let (dump, push) = (duration_after(phases, "dump"), duration_after(phases, "push"));
    let restore_started = Instant::now();
    let source: &[&str] = if lazy {
        &["--from", &reference, "--lazy"]
    } else {
        &["--from", &reference]
    };
    let ((id, uid, ip), took) = bench.restore_on_b(&config, source);
    let restore_returned = Instant::now();
    let restored_ids = container_ids(b, &id);
    wait_all_answering(b, &restored_ids, &ip);
    let end = Instant::now();
    let windows = observer.stop();
    let pull = (seconds(restore_returned - restore_started) - took).max(0.0);
    let round = Round {
        downtime: downtime(&windows, end),
        dump,
        push,
        pull,
        restore: seconds(end - restore_started) - pull,
        moved_mib: mib(common::dir_size(&registry.storage())),
    };
    check_memory(&ip, &sums);
    remove_restored(b, &id, &uid);
    kubelet::remove_pod(a, &pod).expect("remove the source pod");
    clear_checkpoints(a);
    clear_checkpoints(b);
    round
}

/// Waits for a new pod on the node at `endpoint` (not one of `before`) whose every container
/// answers a ping (connect timeout 20 ms, retried every 2 ms): when, then the latencies of pings
/// in the 2 s after it (round robin over the other containers, every 5 ms) and the time of one
/// `ballast-sum` (every page of the first container) sent at that moment beside them.
fn first_answers(endpoint: &str, before: &[String]) -> (Instant, (Vec<f64>, f64)) {
    let cri = CriClient::connect(endpoint).expect("CRI of B");
    let deadline = Instant::now() + WAIT;
    let (id, ip) = loop {
        assert!(Instant::now() < deadline, "no new pod on B");
        let new = cri
            .pod_ids()
            .unwrap_or_default()
            .into_iter()
            .find(|id| !before.contains(id));
        if let Some(id) = new {
            if let Ok(ip) = cri.pod_ip(&id) {
                if !ip.is_empty() {
                    break (id, ip);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = id;
    for (_, port) in CONTAINERS {
        loop {
            assert!(Instant::now() < deadline, "B's pod never answered on {port}");
            if ping_once(&ip, port).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let at = Instant::now();
    // `PODSNAP_BENCH_FULL_READ=1`: one `ballast-sum` of container one sent at that moment too.
    let full = std::env::var_os("PODSNAP_BENCH_FULL_READ").map(|_| {
        let sum_ip = ip.clone();
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let t = Instant::now();
            let mut stream =
                std::net::TcpStream::connect((sum_ip.as_str(), CONTAINERS[0].1)).expect("connect");
            stream.set_read_timeout(Some(WAIT)).expect("timeout");
            stream.write_all(b"ballast-sum\n").expect("ballast-sum");
            let mut reply = String::new();
            std::io::BufReader::new(stream)
                .read_line(&mut reply)
                .expect("ballast-sum reply");
            assert!(reply.starts_with("ballast"), "ballast-sum: {reply:?}");
            seconds(t.elapsed())
        })
    });
    let mut pings = Vec::new();
    let mut i = 0;
    // The other containers: the first one serves the full read (one request at a time).
    while at.elapsed() < Duration::from_secs(2) {
        let port = CONTAINERS[1 + i % (CONTAINERS.len() - 1)].1;
        i += 1;
        if let Some(ms) = ping_once(&ip, port) {
            pings.push(ms);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let full = full.map_or(f64::NAN, |f| f.join().expect("ballast-sum thread"));
    (at, (pings, full))
}

/// One ping on a new connection (connect timeout 20 ms): its latency in ms, if answered.
fn ping_once(ip: &str, port: u16) -> Option<f64> {
    use std::io::{BufRead, Write};
    let address: std::net::SocketAddr = format!("{ip}:{port}").parse().ok()?;
    let t = Instant::now();
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_millis(20)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"ping\n").ok()?;
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply).ok()?;
    reply
        .starts_with("pong")
        .then(|| t.elapsed().as_secs_f64() * 1000.0)
}

/// MiB of memory the pod holds in all.
fn memory_mib() -> f64 {
    ballast_mib().parse::<f64>().unwrap_or(0.0) * CONTAINERS.len() as f64
}

/// The `[migration]` channel's own throughput over loopback, memory to memory, MiB/s per
/// round: `mib` MiB from one endpoint to another with the nodes' key, by the `channel_loopback`
/// example built beside the CLI (so with its profile: the channel's TLS as optimized as in
/// `podsnap`).
fn channel_throughput(bench: &Bench, mib: u64, rounds: usize) -> Samples {
    let tool = bench.podsnap.with_file_name("examples").join("channel_loopback");
    assert!(
        tool.is_file(),
        "{} is missing: `cargo build [--release] -p podsnap-coordinator --examples` (the CLI's profile)",
        tool.display()
    );
    let out = Command::new(&tool)
        .arg(&bench.signing)
        .arg(&bench.trusted)
        .arg(mib.to_string())
        .arg(rounds.to_string())
        .output()
        .expect("channel_loopback runs");
    assert!(out.status.success(), "channel_loopback: {}", text(&out));
    let samples = Samples(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("MiB/s ")?.parse().ok())
            .collect(),
    );
    assert_eq!(samples.0.len(), rounds, "channel_loopback: {}", text(&out));
    eprintln!("channel alone over loopback: {:?} MiB/s", samples.0);
    samples
}

/// The live migration beside the others.
fn print_live(
    rounds: usize,
    live: &Measures,
    extra: &LiveMeasures,
    [registry, local, kep, copy]: [&Measures; 4],
) {
    println!();
    println!(
        "### `podsnap migrate --to-node`, live (post-copy), {} MiB x 3 (median of {rounds}, min-max)",
        ballast_mib()
    );
    println!();
    println!(
        "Downtime: the first freeze on A until every container on B answers a ping (new connection, \
         20 ms connect timeout, retried every 2 ms). Window: the switch (B runs the pod) until A \
         is released (every page on B), as `migrate` reports it. p99: pings on B in the 2 s after \
         the first answer (new connection each, every 5 ms, round robin over containers two and \
         three); with `PODSNAP_BENCH_FULL_READ=1`, while one `ballast-sum` (every page of container \
         one) sent at that moment runs (its time: full read; it slows the window). Channel: the \
         `[migration]` channel alone over loopback, memory to memory (mutual TLS with the nodes' key, \
         256 KiB data frames, the pod's memory in all), measured before the rounds; beside it what \
         `migrate --to-node --copy` sent divided by its send time, which includes reading and \
         writing the checkpoint's files on both nodes."
    );
    println!();
    let throughput = extra.channel.median();
    let copy_throughput = copy.moved_mib.median() / copy.push.median();
    let memory_mib = memory_mib();
    print_table(
        &[
            "",
            "downtime (s)",
            "dump (s)",
            "send (s)",
            "restore until `restored` (s)",
            "window (s)",
            "of it, every page on B (s)",
            "ping p99 after (ms)",
            "full read after (s)",
        ],
        &[
            vec![
                "live (`migrate --to-node`)".to_owned(),
                live.downtime.cell(2),
                live.dump.cell(2),
                live.push.cell(2),
                live.restore.cell(2),
                extra.window.cell(2),
                extra.filled.cell(2),
                extra.p99_ms.cell(1),
                extra.full_read.cell(2),
            ],
            vec![
                "ratio live / registry".to_owned(),
                ratio(&live.downtime, &registry.downtime),
            ],
            vec![
                "ratio live / (i) local dump + copy + restore".to_owned(),
                ratio(&live.downtime, &local.downtime),
            ],
            vec![
                "ratio live / (ii) KEP-2008".to_owned(),
                ratio(&live.downtime, &kep.downtime),
            ],
            vec![
                "ratio live / `--copy` (not live)".to_owned(),
                ratio(&live.downtime, &copy.downtime),
            ],
        ],
    );
    println!();
    println!(
        "Channel throughput: {} MiB/s alone over loopback; {copy_throughput:.0} MiB/s as `--copy` sent files",
        extra.channel.cell(0)
    );
    println!();
    let window_goal = 1.3 * memory_mib / throughput;
    println!(
        "Goals: downtime at most 0.5 s: {:.2} s ({}); window at most 1.3 x {memory_mib:.0} MiB / {throughput:.0} MiB/s \
         (the channel alone, median) = {window_goal:.2} s: {:.2} s ({})",
        live.downtime.median(),
        if live.downtime.median() <= 0.5 { "met" } else { "NOT met" },
        extra.window.median(),
        if extra.window.median() <= window_goal { "met" } else { "NOT met" },
    );
}

fn local_round(bench: &Bench, round: usize) -> Round {
    let (a, b) = (&bench.a, &bench.b);
    let config = bench.config(None);
    let name = a.unique(&format!("mig-loc-{round}"));
    let (pod, ids, sums) = source_pod(a, "podsnap", &name, None);
    let dumped = a.files().checkpoints().join(format!("local-{round}"));
    let copied = b.files().checkpoints().join(format!("local-{round}"));
    common::sync_disks();
    let observer = observe(&pod, &ids);
    let clock = Instant::now();
    bench.podsnap(
        a,
        &config,
        &[
            "dump",
            "--stop",
            "--namespace",
            "default",
            "--pod",
            &name,
            "--dir",
            dumped.to_str().expect("utf8"),
        ],
    );
    let dump = seconds(clock.elapsed());
    let clock = Instant::now();
    let status = Command::new("cp")
        .arg("-a")
        .arg(&dumped)
        .arg(&copied)
        .status()
        .expect("cp");
    assert!(
        status.success(),
        "cp -a {} {}",
        dumped.display(),
        copied.display()
    );
    let copy = seconds(clock.elapsed());
    let restore_started = Instant::now();
    let ((id, uid, ip), _) =
        bench.restore_on_b(&config, &["--checkpoint-dir", copied.to_str().expect("utf8")]);
    let restored_ids = container_ids(b, &id);
    wait_all_answering(b, &restored_ids, &ip);
    let end = Instant::now();
    let windows = observer.stop();
    let round = Round {
        downtime: downtime(&windows, end),
        dump,
        push: copy,
        pull: 0.0,
        restore: seconds(end - restore_started),
        moved_mib: mib(common::dir_size(&copied)),
    };
    check_memory(&ip, &sums);
    remove_restored(b, &id, &uid);
    kubelet::remove_pod(a, &pod).expect("remove the source pod");
    clear_checkpoints(a);
    clear_checkpoints(b);
    round
}

/// CRI PullImage of `image` on the node at `endpoint` (a connection of its own).
fn cri_pull(endpoint: &str, image: &str) {
    CriClient::connect(endpoint)
        .expect("CRI")
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("PullImage {image}: {}", e.message()));
}

/// Removes every image name of `registry` from `node` (tags and the digest references CRI
/// made when it pulled): CRI's restore pulls the base image by the first digest reference the
/// source node has, and one of a registry gone since would fail it.
fn remove_images_of(node: &Node, registry: &Registry) {
    let prefix = format!("{}/", registry.host());
    let names = node
        .ctr()
        .run(NS, &["images", "ls", "-q"])
        .expect("ctr images ls");
    for name in names.lines().filter(|n| n.starts_with(&prefix)) {
        let _ = node.ctr().run(NS, &["images", "rm", "--sync", name]);
    }
}

/// Runs `work(i)` for each of the three containers at once, each on its own thread.
fn three_at_once<T: Send>(work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let barrier = std::sync::Barrier::new(CONTAINERS.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CONTAINERS.len())
            .map(|i| {
                let (barrier, work) = (&barrier, &work);
                scope.spawn(move || {
                    barrier.wait();
                    work(i)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a worker thread"))
            .collect()
    })
}

fn kep_round(bench: &Bench, round: usize) -> Round {
    let (a, b) = (&bench.a, &bench.b);
    let registry = Registry::start();
    for node in [a, b] {
        node.allow_registry(&registry.host())
            .expect("hosts.toml for the registry");
    }
    // The base image under the registry's name, so the archive records a digest reference
    // node B can pull (containerd's restore pulls it).
    let base = format!("{}/podsnap/workload:1", registry.host());
    a.ctr()
        .run(
            NS,
            &["images", "tag", "--force", podsnap_tests::WORKLOAD_IMAGE, &base],
        )
        .expect("ctr images tag");
    a.ctr()
        .run(NS, &["images", "push", "--plain-http", &base])
        .expect("ctr images push of the base image");
    for node in [a, b] {
        cri_pull(&node.endpoint(), &base);
    }
    let name = a.unique(&format!("mig-kep-{round}"));
    let (pod, ids, sums) = source_pod(a, "runc", &name, Some(&base));
    let archives_dir = a.dir().join(format!("kep-{round}"));
    std::fs::create_dir_all(&archives_dir).expect("mkdir");
    let archives: Vec<PathBuf> = CONTAINERS
        .iter()
        .map(|(n, _)| archives_dir.join(format!("{n}.tar")))
        .collect();
    let images: Vec<String> = CONTAINERS
        .iter()
        .map(|(n, _)| format!("{}/checkpoints/{name}-{n}:v1", registry.host()))
        .collect();
    let apis: Vec<ContainerdApi> = CONTAINERS
        .iter()
        .map(|_| ContainerdApi::connect(&a.address(), NS).expect("containerd API"))
        .collect();
    common::sync_disks();
    let observer = observe(&pod, &ids);
    let clock = Instant::now();
    three_at_once(|i| {
        apis[i]
            .cri_checkpoint(&a.endpoint(), &ids[i], &archives[i])
            .unwrap_or_else(|e| panic!("CheckpointContainer {}: {e:#}", ids[i]))
    });
    let dump = seconds(clock.elapsed());
    let clock = Instant::now();
    let pushed = three_at_once(|i| {
        podsnap_tests::checkpoint_image::push_archive(&images[i], &archives[i], CONTAINERS[i].0)
            .unwrap_or_else(|e| panic!("pushing the checkpoint image {}: {e:#}", images[i]))
    });
    let push = seconds(clock.elapsed());
    let clock = Instant::now();
    let b_endpoint = b.endpoint();
    three_at_once(|i| cri_pull(&b_endpoint, &images[i]));
    let pull = seconds(clock.elapsed());
    let clock = Instant::now();
    let target = kubelet::run_pod(b, &PodOptions::new(&name, "runc")).expect("RunPodSandbox on node B");
    let restore_specs = specs(None);
    let restored_ids = three_at_once(|i| {
        let cri = CriClient::connect(&b_endpoint).expect("CRI");
        let mut spec = restore_specs[i].clone();
        spec.image = images[i].clone();
        let image_id = kubelet::image_id(b, &spec.image)
            .unwrap_or_else(|e| panic!("ImageStatus {}: {}", spec.image, e.message()));
        let config = kubelet::container_config(&target, &spec, &image_id).expect("container config");
        let id = cri
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: target.id.clone(),
                config: Some(config),
                sandbox_config: Some(target.config.clone()),
            })
            .unwrap_or_else(|e| panic!("CreateContainer from {}: {}", spec.image, e.message()))
            .container_id;
        cri.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .unwrap_or_else(|e| {
            panic!(
                "StartContainer {id} (restore from {}): {}",
                spec.image,
                e.message()
            )
        });
        id
    });
    wait_all_answering(b, &restored_ids, &target.ip);
    let end = Instant::now();
    let restore = seconds(clock.elapsed());
    let windows = observer.stop();
    let round = Round {
        downtime: downtime(&windows, end),
        dump,
        push,
        pull,
        restore,
        moved_mib: mib(pushed.iter().map(|p| p.bytes).sum()),
    };
    check_memory(&target.ip, &sums);
    kubelet::remove_pod(b, &target).expect("remove the restored pod");
    kubelet::remove_pod(a, &pod).expect("remove the source pod");
    for node in [a, b] {
        remove_images_of(node, &registry);
    }
    let _ = std::fs::remove_dir_all(&archives_dir);
    round
}

/// `podsnap migrate --to-node` to a `podsnap receive --once` on B: downtime from the first
/// freeze on A (the migration pauses the pod) to every container answering on B.
fn direct_round(bench: &Bench, round: usize, live: bool) -> (Round, Option<LiveRound>) {
    use std::io::BufRead;
    let (a, b) = (&bench.a, &bench.b);
    // One key for both nodes, each listing it as its peer.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bench.signing, std::fs::Permissions::from_mode(0o600)).expect("chmod the key");
    let config = bench.dir.path().join("direct.toml");
    std::fs::write(
        &config,
        format!(
            "[migration]\nkey = \"{}\"\npeers = [\"{}\"]\n",
            bench.signing.display(),
            bench.trusted.display()
        ),
    )
    .expect("node configuration");
    let kubelet = b.files().kubelet();
    let mut receiver = std::process::Command::new(&bench.podsnap)
        .args(["receive", "--listen", "127.0.0.1:0", "--once", "--pods-dir"])
        .arg(kubelet.join("pods"))
        .arg("--logs-dir")
        .arg(kubelet.join("logs/pods"))
        .env("PODSNAP_CONFIG", &config)
        .env("CONTAINER_RUNTIME_ENDPOINT", b.endpoint())
        .env("CONTAINERD_ADDRESS", b.address())
        .env("PODSNAP_CHECKPOINT_ROOT", b.files().checkpoints())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        // Its log (the page streams' requests among it) for a look afterwards.
        .stderr(
            std::fs::File::create(std::env::temp_dir().join(format!(
                "podsnap-bench-receive-{}-{round}.log",
                if live { "live" } else { "copy" }
            )))
            .expect("a log file"),
        )
        .spawn()
        .expect("podsnap receive");
    let mut lines = std::io::BufReader::new(receiver.stdout.take().expect("stdout")).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("listening")
                .map(|a| a.split_whitespace().next().unwrap_or_default().to_owned())
        })
        .expect("podsnap receive listens");
    let name = a.unique(&format!("mig-{}-{round}", if live { "live" } else { "dir" }));
    let (pod, ids, sums) = source_pod(a, "podsnap", &name, None);
    common::sync_disks();
    let before = b.cri().pod_ids().expect("ListPodSandbox on B");
    let observer = observe(&pod, &ids);
    // A live move's downtime ends when B answers, long before `migrate` returns.
    let watcher = live.then(|| {
        let endpoint = b.endpoint().to_owned();
        std::thread::spawn(move || first_answers(&endpoint, &before))
    });
    let mut args = vec![
        "migrate",
        "--namespace",
        "default",
        "--pod",
        &name,
        "--to-node",
        &addr,
    ];
    if !live {
        args.push("--copy");
    }
    let out = bench.podsnap(a, &config, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let phases = field(&stdout, "phases ");
    let received: String = lines.map_while(Result::ok).map(|l| l + "\n").collect();
    let status = receiver.wait().expect("podsnap receive exits");
    assert!(status.success(), "podsnap receive: {status:?}\n{received}");
    let id = field(&received, "id ").to_owned();
    let ip = field(&received, "ip ").to_owned();
    let uid = field(&received, "pod ")
        .rsplit_once("(uid ")
        .and_then(|(_, u)| u.strip_suffix(')'))
        .expect("the restored pod's uid")
        .to_owned();
    let restored_ids = container_ids(b, &id);
    let answered = watcher.map(|w| w.join().expect("the watcher"));
    wait_all_answering(b, &restored_ids, &ip);
    let end = answered.as_ref().map_or_else(Instant::now, |(at, _)| *at);
    let windows = observer.stop();
    let round = Round {
        downtime: downtime(&windows, end),
        dump: duration_after(phases, "dump"),
        push: duration_after(phases, "send"),
        pull: 0.0,
        restore: duration_after(phases, "restore"),
        moved_mib: mib(common::dir_size(&b.files().checkpoints())),
    };
    check_memory(&ip, &sums);
    remove_restored(b, &id, &uid);
    kubelet::remove_pod(a, &pod).expect("remove the source pod");
    clear_checkpoints(a);
    clear_checkpoints(b);
    let live = answered.map(|(_, (pings_ms, full_read))| LiveRound {
        window: memory_time(&stdout, "source released "),
        filled: memory_time(&stdout, "every page there "),
        pings_ms,
        full_read,
    });
    (round, live)
}

/// The duration after `what` in `migrate`'s memory line.
fn memory_time(stdout: &str, what: &str) -> f64 {
    let memory = field(stdout, "memory ");
    let after = memory
        .split_once(what)
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("no {what:?} in {memory:?}"));
    parse_duration(after.split_whitespace().next().unwrap_or_default())
}

/// The direct migration beside the registry path and a local copy.
fn print_direct(rounds: usize, direct: &Measures, registry: &Measures, local: &Measures) {
    println!();
    println!(
        "### `podsnap migrate --to-node --copy` (direct, over the `[migration]` channel; not live) (median of {rounds}, min-max)"
    );
    println!();
    println!(
        "Paused on A, dumped, every file sent over mutual TLS, verified and restored on B by `podsnap receive`; \
         downtime from the first freeze on A until every container answers on B. dump / send / restore: \
         what `migrate --to-node` reports (send: the files, after the dump)."
    );
    println!();
    print_table(
        &[
            "",
            "downtime (s)",
            "dump (s)",
            "send (s)",
            "restore until `restored` (s)",
            "received (MiB)",
        ],
        &[
            vec![
                "direct (`migrate --to-node --copy`)".to_owned(),
                direct.downtime.cell(2),
                direct.dump.cell(2),
                direct.push.cell(2),
                direct.restore.cell(2),
                direct.moved_mib.cell(0),
            ],
            vec![
                "ratio direct / registry (`migrate --to`, default level)".to_owned(),
                ratio(&direct.downtime, &registry.downtime),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
            vec![
                "ratio direct / local dump + copy + restore".to_owned(),
                ratio(&direct.downtime, &local.downtime),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
        ],
    );
}
