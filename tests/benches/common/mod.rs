//! What the benchmarks share: iteration counts, medians, markdown tables, process memory,
//! directory sizes, and the workload's answers through `ctr task exec`.
//!
//! Every benchmark runs its contenders side by side on one private containerd, alternating
//! them round by round (the first round of each is a warm-up and is not counted), and prints
//! medians and ratios: these machines are small and noisy.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use podsnap_tests::ctr::Ctr;
use podsnap_tests::node::NodeOptions;

/// A private node running podsnap's shim with the workload cargo built for this bench, its
/// containerd logging at info (the shim's phase lines).
pub fn podsnap_node_options() -> NodeOptions {
    let mut options = NodeOptions::new(std::path::PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    options.podsnap_shim = true;
    options.log_level = "info".to_owned();
    options
}

/// A current-thread tokio runtime for the coordinator's library calls.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// One Tasks.Checkpoint of a pod's sandbox task with runc's `image_path` (podsnap's pod
/// checkpoint into `dir`, leave running): how long the call took, in seconds.
pub fn timed_pod_checkpoint(
    api: &podsnap_tests::containerd_api::ContainerdApi,
    sandbox_id: &str,
    dir: &Path,
) -> f64 {
    let clock = Instant::now();
    api.checkpoint(
        sandbox_id,
        &podsnap_tests::containerd_api::CheckpointOptions {
            image_path: dir.to_string_lossy().into_owned(),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("pod checkpoint of {sandbox_id}: {e:#}"));
    seconds(clock.elapsed())
}

/// Rounds counted per contender: `PODSNAP_BENCH_N`, else `default`.
pub fn rounds(default: usize) -> usize {
    std::env::var("PODSNAP_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// Samples of one measure.
#[derive(Debug, Clone, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, value: f64) {
        self.0.push(value);
    }

    pub fn median(&self) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        match sorted.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        }
    }

    pub fn min(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }

    /// `median (min-max)` with `decimals` decimals.
    pub fn cell(&self, decimals: usize) -> String {
        if self.0.is_empty() {
            return "-".to_owned();
        }
        format!(
            "{:.d$} ({:.d$}-{:.d$})",
            self.median(),
            self.min(),
            self.max(),
            d = decimals
        )
    }
}

/// `a / b` of two medians as `0.52x`.
pub fn ratio(a: &Samples, b: &Samples) -> String {
    let (a, b) = (a.median(), b.median());
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".to_owned()
    }
}

/// Prints a markdown table.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    println!("| {} |", header.join(" | "));
    println!("|{}|", header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
}

pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Flushes dirty pages so one contender's writeback does not land in the next one's timing.
pub fn sync_disks() {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// The memory a timed dump writes its page cache into (`PODSNAP_BENCH_MEMORY`): on these
/// virtual machines a write into memory freed less than a second before runs several times
/// faster than into memory freed seconds before or never used (docs/node-notes.md), and which
/// one a dump gets is otherwise chance. The preparation narrows that draw; it does not remove
/// it (a single large dump still lands in either mode now and then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryState {
    /// Whatever the round left (the default).
    AsIs,
    /// Just freed: 1 GiB written into a scratch file beside the checkpoints and deleted
    /// (never written back) right before the timing starts.
    Warm,
    /// Nothing freed recently: 3 s of quiet before the timing starts.
    Cold,
}

impl MemoryState {
    pub fn from_env() -> MemoryState {
        match std::env::var("PODSNAP_BENCH_MEMORY").as_deref() {
            Ok("warm") => MemoryState::Warm,
            Ok("cold") => MemoryState::Cold,
            Ok("" | "as-is") | Err(_) => MemoryState::AsIs,
            Ok(other) => panic!("PODSNAP_BENCH_MEMORY={other}: warm, cold or as-is"),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            MemoryState::AsIs => "memory as each round left it",
            MemoryState::Warm => "memory warm: 1 GiB of page cache freed just before each timed checkpoint",
            MemoryState::Cold => "memory cold: 3 s without frees before each timed checkpoint",
        }
    }
}

/// [`sync_disks`], then the memory put in the state `PODSNAP_BENCH_MEMORY` asks for, a scratch
/// file (if any) written in `dir`.
pub fn settle(dir: &Path) {
    sync_disks();
    match MemoryState::from_env() {
        MemoryState::AsIs => {}
        MemoryState::Cold => std::thread::sleep(Duration::from_secs(3)),
        MemoryState::Warm => {
            use std::io::Write;
            let scratch = dir.join(".bench-scratch");
            let mut f = std::fs::File::create(&scratch).expect("the scratch file");
            let block = vec![0x5au8; 1 << 20];
            for _ in 0..1024 {
                f.write_all(&block).expect("write the scratch file");
            }
            drop(f);
            std::fs::remove_file(&scratch).expect("remove the scratch file");
        }
    }
}

/// Total size in bytes of the regular files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) if m.is_file() => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// RSS and PSS of a process in KiB, from `/proc/<pid>/smaps_rollup`.
pub fn rss_pss_kib(pid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// Sends `command` to the workload server on `127.0.0.1:port` inside container `id`.
pub fn try_ask(ctr: &Ctr, namespace: &str, id: &str, port: u16, command: &str) -> Result<String, String> {
    ctr.ask_workload(namespace, id, port, command)
}

/// Waits until the server in `id` answers `ping`.
pub fn wait_answering(ctr: &Ctr, namespace: &str, id: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match try_ask(ctr, namespace, id, port, "ping") {
            Ok(reply) if reply.starts_with("pong") => return,
            other => assert!(Instant::now() < deadline, "{id} does not answer: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `ctr task ls` shows `id` in `status`.
pub fn wait_status(ctr: &Ctr, namespace: &str, id: &str, status: &str) {
    ctr.wait_task_status(namespace, id, status, Duration::from_secs(60));
}

/// Kills, deletes and removes a `ctr` container.
pub fn remove_container(ctr: &Ctr, namespace: &str, id: &str) {
    if ctr.task_status(namespace, id).expect("ctr task ls").is_some() {
        let _ = ctr.run(namespace, &["task", "kill", "-s", "SIGKILL", id]);
        wait_status(ctr, namespace, id, "STOPPED");
        ctr.run(namespace, &["task", "delete", id])
            .unwrap_or_else(|e| panic!("ctr task delete {id}: {e}"));
    }
    ctr.run(namespace, &["container", "rm", id])
        .unwrap_or_else(|e| panic!("ctr container rm {id}: {e}"));
}

pub mod observer;
