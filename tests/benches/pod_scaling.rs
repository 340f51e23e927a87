//! Benchmark (issue 12): how a podsnap pod checkpoint scales, on one private containerd.
//!
//! 1. Containers: pods of 1, 2, 4 and 8 containers holding the same total memory (512 MiB,
//!    `PODSNAP_BENCH_TOTAL_MIB`), each checkpointed by one Tasks.Checkpoint of the sandbox task
//!    with runc `CheckpointOptions{image_path}`; the pod sizes take turns in a rotating order.
//!    Goal: 8 containers cost under 1.3x one.
//! 2. Memory: pods of two containers holding 64 MiB to 2 GiB in all, against two references
//!    on the same machine and filesystem, in a rotating order each round:
//!    - a raw `criu dump` of the same processes: the same workload program with the same
//!      memory, run as plain processes (own session, stdio on /dev/null, host network) and
//!      dumped by `criu dump --leave-running`, all at once: CRIU with no container runtime, no
//!      pod freeze, no digests;
//!    - a sequential write of the same number of bytes, one file per container written at
//!      once, 1 MiB at a time, through the page cache like the dumps (no fsync): the physical
//!      limit of writing that much here.
//!
//! Part 1 also runs every pod size on a second node whose shim has CRIU's kernel feature cache
//! turned off (`PODSNAP_CRIU_KDAT_CACHE=off`, the cache moved aside for each of its dumps):
//! podsnap on a node with a disk-backed `/run` as it was before it kept that cache, alternated
//! with the cached runs round by round.
//!
//! Part 1 also prints where each container's CRIU spent its time (memory pages, the mount tree
//! with its tmpfs archives, the network namespace's conntrack tables, the rest), read from the
//! timestamps of its `dump.log` in the checkpoint: the fixed cost every container's CRIU pays.
//!
//! Every timing starts after `sync` (no writeback of the previous contender inside it); part 1
//! takes `PODSNAP_BENCH_MEMORY=warm|cold` as `pod_checkpoint` does (`common::settle`). Pod
//! frozen windows are observed from outside (`common::observer`).
//!
//! `cargo build --release -p containerd-shim-podsnap-v1 && cargo bench -p podsnap-tests --bench
//! pod_scaling` (rounds: `PODSNAP_BENCH_N`, default 3; `PODSNAP_BENCH_PART=containers` runs part 1
//! only; `PODSNAP_BENCH_KEEP_LOGS=DIR` copies each part 1 container's CRIU `dump.log` there, as
//! `<containers>-<round>-c<i>.log`).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::observer::{Observer, Watched};
use common::{mib, print_table, ratio, seconds, Samples};
use podsnap_tests::containerd_api::ContainerdApi;
use podsnap_tests::ctr::CRI_NAMESPACE as NS;
use podsnap_tests::kubelet::{self, ContainerSpec, KubePod, PodOptions};
use podsnap_tests::node::Node;

/// Container counts of part 1.
const COUNTS: [usize; 4] = [1, 2, 4, 8];
/// Total MiB of part 2 (two containers each).
const TOTALS: [usize; 4] = [64, 256, 1024, 2048];
/// Containers per pod in part 2.
const MEMORY_PODS: usize = 2;
/// The first port the workloads listen on.
const BASE_PORT: u16 = 8100;

fn total_mib() -> usize {
    std::env::var("PODSNAP_BENCH_TOTAL_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

/// Whether part 2 runs (not with `PODSNAP_BENCH_PART=containers`).
fn memory_part() -> bool {
    std::env::var("PODSNAP_BENCH_PART").map_or(true, |p| p != "containers")
}

#[derive(Default, Clone)]
struct Dump {
    time: Samples,
    frozen: Samples,
    mib: Samples,
}

impl Dump {
    fn push(&mut self, time: f64, frozen: f64, bytes: u64) {
        self.time.push(time);
        self.frozen.push(frozen);
        self.mib.push(mib(bytes));
    }

    /// MiB/s of the medians.
    fn throughput(&self) -> String {
        let (m, t) = (self.mib.median(), self.time.median());
        if t > 0.0 {
            format!("{:.0}", m / t)
        } else {
            "-".to_owned()
        }
    }
}

/// Moves CRIU's kernel feature cache (`/run/criu.kdat`, see docs/node-notes.md) aside
/// for as long as it lives, so that the CRIUs of a dump probe the kernel as on a node without
/// it; puts it back on drop.
struct NoKdatCache(Option<(PathBuf, PathBuf)>);

impl NoKdatCache {
    fn new() -> Self {
        use podsnap_tests::paths::{KDAT_CACHE as CACHE, KDAT_RUN_DIR as RUN_DIR};
        let cache = Path::new(RUN_DIR).join(CACHE);
        let aside = Path::new(RUN_DIR).join(format!("{CACHE}.bench-aside"));
        match std::fs::rename(&cache, &aside) {
            Ok(()) => Self(Some((aside, cache))),
            Err(_) => Self(None), // no cache (a tmpfs /run keeps CRIU's own: not moved)
        }
    }
}

impl Drop for NoKdatCache {
    fn drop(&mut self) {
        if let Some((aside, cache)) = self.0.take() {
            let _ = std::fs::rename(aside, cache);
        }
    }
}

/// Where a container's CRIU spent its time, from the timestamps of its log (ms).
#[derive(Debug, Clone, Default)]
struct CriuPhases {
    /// From its release by the pod dump (the pre-dump hold answered) to its end.
    released: f64,
    /// Writing the memory pages.
    pages: f64,
    /// The mount tree: each tmpfs (`/dev`, `/sys/fs/cgroup`, masked paths) archived by a
    /// `tar --gzip` CRIU starts.
    mounts: f64,
    /// The network namespace: the conntrack and expectation tables.
    netns: f64,
}

impl CriuPhases {
    fn read(log: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(log).ok()?;
        // The last run in the file (runc's version check may come first).
        let run = text.rsplit("CRIU run id").next()?;
        let lines: Vec<(f64, &str)> = run
            .lines()
            .filter_map(|l| {
                let (ts, rest) = l.strip_prefix('(')?.split_once(')')?;
                Some((ts.trim().parse::<f64>().ok()? * 1000.0, rest))
            })
            .collect();
        let at = |needle: &str| lines.iter().find(|(_, l)| l.contains(needle)).map(|(t, _)| *t);
        // The hold script's line follows "Running pre-dump scripts"; CRIU goes on after it.
        let hold = lines
            .iter()
            .position(|(_, l)| l.contains("Running pre-dump scripts"))?;
        let released = lines.get(hold + 3).map(|(t, _)| *t)?;
        let end = at("Dumping finished successfully")?;
        Some(CriuPhases {
            released: end - released,
            pages: at("Dumping core")? - at("Dumping pages")?,
            mounts: at("Dumping file-locks")? - at("mnt: Dumping mountpoints")?,
            // None when CRIU ran in the pod's network namespace (it then has none to dump).
            netns: match (at("Dump NET namespace info"), at("Namespaces dump complete")) {
                (Some(start), Some(end)) => end - start,
                _ => 0.0,
            },
        })
    }
}

fn main() {
    let rounds = common::rounds(3);
    let options = common::podsnap_node_options;
    // Part 1's second contender: podsnap with CRIU's kernel feature cache turned off (its
    // shim leaves the cache alone, and the cache is moved aside for each of its dumps).
    let mut off = options();
    off.extra_env
        .push((podsnap_tests::paths::KDAT_SWITCH_ENV.to_owned(), "off".to_owned()));
    let (mut node, mut uncached_node) = Node::start_pair(options(), off);
    let started = Instant::now();
    let total = total_mib();

    let mut by_count: Vec<Dump> = vec![Dump::default(); COUNTS.len()];
    let mut uncached: Vec<Dump> = vec![Dump::default(); COUNTS.len()];
    let mut phases: Vec<Vec<CriuPhases>> = vec![Vec::new(); COUNTS.len()];
    let mut podsnap: Vec<Dump> = vec![Dump::default(); TOTALS.len()];
    let mut raw: Vec<Dump> = vec![Dump::default(); TOTALS.len()];
    let mut write: Vec<Dump> = vec![Dump::default(); TOTALS.len()];
    for round in 0..=rounds {
        for turn in 0..COUNTS.len() {
            let i = (round + turn) % COUNTS.len();
            let n = COUNTS[i];
            for cached in [round % 2 == 0, round % 2 != 0] {
                let ((time, frozen, bytes), criu) = if cached {
                    podsnap_dump(&node, round, n, total / n)
                } else {
                    let _aside = NoKdatCache::new();
                    podsnap_dump(&uncached_node, round, n, total / n)
                };
                if round > 0 && cached {
                    phases[i].extend(criu);
                }
                eprintln!(
                    "round {round}: {n} containers x {} MiB{}: {time:.3} s, frozen {frozen:.3} s",
                    total / n,
                    if cached { "" } else { " (no kdat cache)" }
                );
                if round > 0 {
                    let into = if cached { &mut by_count } else { &mut uncached };
                    into[i].push(time, frozen, bytes);
                }
            }
        }
        for (i, &t) in TOTALS.iter().enumerate().filter(|_| memory_part()) {
            let each = t / MEMORY_PODS;
            for turn in 0..3 {
                match (round + turn) % 3 {
                    0 => {
                        let ((time, frozen, bytes), _) = podsnap_dump(&node, round, MEMORY_PODS, each);
                        eprintln!("round {round}: podsnap {t} MiB: {time:.3} s");
                        if round > 0 {
                            podsnap[i].push(time, frozen, bytes);
                        }
                    }
                    1 => {
                        let (time, frozen, bytes) = raw_criu_dump(&node, round, MEMORY_PODS, each);
                        eprintln!("round {round}: criu dump {t} MiB: {time:.3} s");
                        if round > 0 {
                            raw[i].push(time, frozen, bytes);
                        }
                    }
                    _ => {
                        // The same number of bytes podsnap's checkpoint held (or the memory,
                        // before it has run once).
                        let bytes = podsnap[i]
                            .mib
                            .0
                            .last()
                            .map(|m| (m * 1024.0 * 1024.0) as u64)
                            .unwrap_or((t as u64) << 20);
                        let time = sequential_write(&node, bytes, MEMORY_PODS);
                        eprintln!("round {round}: write {t} MiB: {time:.3} s");
                        if round > 0 {
                            write[i].push(time, 0.0, bytes);
                        }
                    }
                }
            }
        }
    }

    println!();
    println!(
        "### podsnap pod checkpoint by number of containers, {total} MiB dirtied memory in all \
         (median of {rounds}, min-max; {:.0} s for the whole bench; {})",
        seconds(started.elapsed()),
        common::MemoryState::from_env().describe()
    );
    println!();
    let (one, uncached_one) = (by_count[0].clone(), uncached[0].clone());
    let rows: Vec<Vec<String>> = COUNTS
        .iter()
        .zip(by_count.iter().zip(&uncached))
        .map(|(n, (m, u))| {
            vec![
                n.to_string(),
                (total / n).to_string(),
                m.time.cell(2),
                m.frozen.cell(2),
                m.mib.cell(0),
                m.throughput(),
                ratio(&m.time, &one.time),
                u.time.cell(2),
                u.frozen.cell(2),
                ratio(&u.time, &uncached_one.time),
                ratio(&m.time, &u.time),
            ]
        })
        .collect();
    print_table(
        &[
            "containers",
            "MiB each",
            "checkpoint (s)",
            "pod frozen window (s)",
            "image (MiB)",
            "MiB/s",
            "time / 1 container",
            "no kdat cache: checkpoint (s)",
            "no kdat cache: frozen (s)",
            "no kdat cache: time / 1 container",
            "cache / no cache",
        ],
        &rows,
    );
    println!();
    println!(
        "### CRIU's own time per container in those dumps, from its dump.log (ms; median over \
         the containers and rounds): what each container's CRIU pays whatever its memory"
    );
    println!();
    let phase_rows: Vec<Vec<String>> = COUNTS
        .iter()
        .zip(&phases)
        .map(|(n, p)| {
            let med = |f: fn(&CriuPhases) -> f64| Samples(p.iter().map(f).collect()).cell(0);
            vec![
                n.to_string(),
                med(|c| c.released),
                med(|c| c.pages),
                med(|c| c.mounts),
                med(|c| c.netns),
                med(|c| c.released - c.pages - c.mounts - c.netns),
            ]
        })
        .collect();
    print_table(
        &[
            "containers",
            "released to done",
            "memory pages",
            "mount tree (tmpfs archived by tar+gzip)",
            "network namespace (conntrack tables)",
            "the rest",
        ],
        &phase_rows,
    );
    println!();
    println!(
        "### podsnap pod checkpoint by memory ({MEMORY_PODS} containers), against a raw `criu dump` \
         of the same processes and a sequential write of as many bytes (median of {rounds}, min-max)"
    );
    println!();
    println!(
        "raw criu dump: the same workload with the same memory as plain processes, `criu dump \
         --leave-running` of each at once (no runc, no pod freeze, no digests). Write: one file \
         per container written at once, 1 MiB at a time, through the page cache on the same \
         filesystem, no fsync (the dumps do not sync either). Throughput: image MiB / median time."
    );
    println!();
    let mut rows = Vec::new();
    for (i, t) in TOTALS.iter().enumerate() {
        rows.push(vec![
            format!("{t} MiB"),
            podsnap[i].time.cell(2),
            podsnap[i].frozen.cell(2),
            podsnap[i].throughput(),
            raw[i].time.cell(2),
            raw[i].throughput(),
            write[i].time.cell(2),
            write[i].throughput(),
            ratio(&podsnap[i].time, &raw[i].time),
            ratio(&podsnap[i].time, &write[i].time),
        ]);
    }
    print_table(
        &[
            "memory",
            "podsnap (s)",
            "podsnap frozen (s)",
            "podsnap MiB/s",
            "criu dump (s)",
            "criu dump MiB/s",
            "write (s)",
            "write MiB/s",
            "podsnap / criu dump",
            "podsnap / write",
        ],
        &rows,
    );
    let mut problems = node.teardown();
    problems.extend(uncached_node.teardown());
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

/// The workload's arguments for container `i` with `each` MiB.
fn serve_args(i: usize, each: usize) -> Vec<String> {
    [
        "serve".to_owned(),
        "--name".to_owned(),
        format!("c{i}"),
        "--port".to_owned(),
        (BASE_PORT + i as u16).to_string(),
        "--ballast-mib".to_owned(),
        each.to_string(),
    ]
    .to_vec()
}

/// Runs a pod of `n` containers of `each` MiB and waits until every one has its memory
/// written; returns the pod and the container ids.
fn run_pod(node: &Node, name: &str, n: usize, each: usize) -> (KubePod, Vec<String>) {
    let pod = kubelet::run_pod(node, &PodOptions::new(name, "podsnap")).expect("RunPodSandbox");
    let ids: Vec<String> = (0..n)
        .map(|i| {
            let args = serve_args(i, each);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let spec = ContainerSpec::workload(&format!("c{i}"), &args);
            kubelet::run_container(node, &pod, &spec).expect("a container")
        })
        .collect();
    for i in 0..n {
        let port = BASE_PORT + i as u16;
        kubelet::wait_answering(&pod.ip, port, Duration::from_secs(60)).expect("answers");
        kubelet::ask(&pod.ip, port, "ballast-sum").expect("ballast-sum");
    }
    (pod, ids)
}

/// One podsnap pod checkpoint of a new pod of `n` x `each` MiB: (seconds, pod frozen window,
/// checkpoint bytes).
fn podsnap_dump(node: &Node, round: usize, n: usize, each: usize) -> ((f64, f64, u64), Vec<CriuPhases>) {
    let (pod, ids) = run_pod(node, &node.unique(&format!("sc-{round}-{n}-{each}")), n, each);
    let dir = node
        .files()
        .checkpoints()
        .join(format!("scale-{round}-{n}-{each}"));
    let api = ContainerdApi::connect(&node.address(), NS).expect("containerd API");
    common::settle(&node.files().checkpoints());
    let observer = Observer::start(
        ids.iter()
            .enumerate()
            .map(|(i, id)| Watched::container(&pod.uid, id, &format!("c{i}")))
            .collect(),
    );
    let time = common::timed_pod_checkpoint(&api, &pod.id, &dir);
    let windows = observer.stop();
    let bytes = common::dir_size(&dir);
    let criu = (0..n)
        .filter_map(|i| CriuPhases::read(&dir.join(format!("containers/c{i}/checkpoint/dump.log"))))
        .collect();
    if let Some(keep) = std::env::var_os("PODSNAP_BENCH_KEEP_LOGS") {
        for i in 0..n {
            let _ = std::fs::copy(
                dir.join(format!("containers/c{i}/checkpoint/dump.log")),
                Path::new(&keep).join(format!("{n}-{round}-c{i}.log")),
            );
        }
    }
    kubelet::remove_pod(node, &pod).expect("remove the pod");
    std::fs::remove_dir_all(&dir).expect("remove the checkpoint");
    ((time, windows.pod(), bytes), criu)
}

/// A workload run as a plain process, killed on drop.
struct Plain(Child);

impl Drop for Plain {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `n` workloads of `each` MiB as plain processes dumped by `criu dump` at once: (seconds,
/// longest time CRIU held one, image bytes).
fn raw_criu_dump(node: &Node, round: usize, n: usize, each: usize) -> (f64, f64, u64) {
    let workload = env!("CARGO_BIN_EXE_podsnap-workload");
    let plain: Vec<Plain> = (0..n)
        .map(|i| {
            let mut cmd = Command::new(workload);
            cmd.args(serve_args(i, each))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: setsid in the child before exec: async-signal-safe, no allocation.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    nix::unistd::setsid().map(drop).map_err(std::io::Error::from)
                })
            };
            Plain(cmd.spawn().expect("start a workload process"))
        })
        .collect();
    for i in 0..n {
        let port = BASE_PORT + i as u16;
        kubelet::wait_answering("127.0.0.1", port, Duration::from_secs(60)).expect("answers");
        kubelet::ask("127.0.0.1", port, "ballast-sum").expect("ballast-sum");
    }
    let dir = node.dir().join(format!("raw-{round}-{each}"));
    let dirs: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("c{i}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    common::sync_disks();
    let observer = Observer::start(
        plain
            .iter()
            .enumerate()
            .map(|(i, p)| common::observer::process(p.0.id() as i32, &format!("c{i}"), None))
            .collect(),
    );
    let clock = Instant::now();
    std::thread::scope(|scope| {
        for (p, d) in plain.iter().zip(&dirs) {
            scope.spawn(move || criu_dump(p.0.id(), d));
        }
    });
    let time = seconds(clock.elapsed());
    let windows = observer.stop();
    let bytes = common::dir_size(&dir);
    drop(plain);
    std::fs::remove_dir_all(&dir).expect("remove the images");
    (time, windows.longest(), bytes)
}

fn criu_dump(pid: u32, dir: &Path) {
    let out = Command::new("criu")
        .args(["dump", "--leave-running", "-t"])
        .arg(pid.to_string())
        .arg("-D")
        .arg(dir)
        .args(["-o", "dump.log"])
        .output()
        .expect("criu");
    assert!(
        out.status.success(),
        "criu dump of {pid}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.join("dump.log"))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Writes `bytes` (not zeros) beside the checkpoints into `files` new files at once (one
/// writer thread each, as many as the dumps that write them), 1 MiB at a time, no fsync;
/// returns the seconds.
fn sequential_write(node: &Node, bytes: u64, files: usize) -> f64 {
    let paths: Vec<PathBuf> = (0..files)
        .map(|i| node.files().checkpoints().join(format!("sequential-write-{i}")))
        .collect();
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    common::sync_disks();
    let clock = Instant::now();
    std::thread::scope(|scope| {
        for path in &paths {
            let block = &block;
            scope.spawn(move || {
                let mut f = std::fs::File::create(path).expect("create");
                let mut left = bytes / files as u64;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    f.write_all(&block[..n]).expect("write");
                    left -= n as u64;
                }
            });
        }
    });
    let time = seconds(clock.elapsed());
    for path in &paths {
        std::fs::remove_file(path).expect("remove");
    }
    time
}
