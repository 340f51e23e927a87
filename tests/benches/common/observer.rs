//! Frozen windows seen from outside: a thread that samples, every millisecond, whether each
//! container's processes can run.
//!
//! A container counts as stopped while its freezer cgroup is `FREEZING` or `FROZEN`, or while
//! any of its processes is traced (CRIU seizes every task it dumps with ptrace: runc passes
//! CRIU the container's freezer, CRIU freezes it, seizes the tasks and thaws the cgroup again,
//! so for a dump that CRIU freezes itself the freezer shows only the first few milliseconds;
//! the tasks stay stopped, or run CRIU's parasite code, until CRIU releases them). Both are
//! read from the kernel (`freezer.state`, `TracerPid` in `/proc/<pid>/status`), the same way
//! for every contender, never from a contender's own report.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the observer samples.
const PERIOD: Duration = Duration::from_millis(1);

/// One container to observe: its freezer cgroup and its processes.
pub struct Watched {
    pub name: String,
    freezer: File,
    statuses: Vec<File>,
}

impl Watched {
    /// The container `id` of pod `uid`: its freezer cgroup (found under the pod's cgroups) and
    /// the processes in it now.
    pub fn container(uid: &str, id: &str, name: &str) -> Watched {
        let dir = podsnap_tests::host::pod_cgroup_tree(uid)
            .into_iter()
            .find(|d| d.starts_with("/sys/fs/cgroup/freezer") && d.file_name().is_some_and(|n| n == id))
            .unwrap_or_else(|| panic!("no freezer cgroup for container {id} of pod {uid}"));
        Self::cgroup(&dir, name)
    }

    /// The processes of freezer cgroup `dir`.
    pub fn cgroup(dir: &Path, name: &str) -> Watched {
        let freezer = File::open(dir.join("freezer.state"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join("freezer.state").display()));
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).expect("cgroup.procs");
        let pids: Vec<i32> = procs.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        Self::processes(freezer, &pids, name)
    }

    fn processes(freezer: File, pids: &[i32], name: &str) -> Watched {
        assert!(!pids.is_empty(), "container {name} has no processes");
        let statuses = pids
            .iter()
            .map(|pid| File::open(format!("/proc/{pid}/status")).expect("/proc/<pid>/status"))
            .collect();
        Watched {
            name: name.to_owned(),
            freezer,
            statuses,
        }
    }

    /// Whether the container's processes are stopped now.
    fn stopped(&self, buf: &mut [u8]) -> bool {
        let n = self.freezer.read_at(buf, 0).unwrap_or(0);
        let state = &buf[..n];
        if state.starts_with(b"FROZEN") || state.starts_with(b"FREEZING") {
            return true;
        }
        self.statuses.iter().any(|status| {
            let n = status.read_at(buf, 0).unwrap_or(0);
            std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(|text| text.lines().find_map(|l| l.strip_prefix("TracerPid:")))
                .is_some_and(|pid| pid.trim() != "0")
        })
    }
}

/// What the observer saw of one container.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub name: String,
    /// Seconds from the observer's start to the first sample that found it stopped, and to the
    /// first sample after the last one that did.
    pub first: Option<f64>,
    pub last: Option<f64>,
    /// Time seen stopped (sum of the sample periods that found it stopped), seconds.
    pub stopped: f64,
}

impl Seen {
    /// First stop to last resume, seconds (0 when never seen stopped).
    pub fn span(&self) -> f64 {
        match (self.first, self.last) {
            (Some(a), Some(b)) => b - a,
            _ => 0.0,
        }
    }
}

/// The frozen windows of a pod, as observed.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    pub containers: Vec<Seen>,
    /// When the observer took its first sample (the origin of every `Seen` time).
    pub began: Option<Instant>,
}

impl Windows {
    /// The instant of the first sample that found any container stopped.
    pub fn first_stop(&self) -> Option<Instant> {
        let first = self
            .containers
            .iter()
            .filter_map(|c| c.first)
            .fold(f64::INFINITY, f64::min);
        let began = self.began?;
        first.is_finite().then(|| began + Duration::from_secs_f64(first))
    }

    /// From the first container stopped to the last one running again: the span during which
    /// some container of the pod was frozen.
    pub fn pod(&self) -> f64 {
        let first = self
            .containers
            .iter()
            .filter_map(|c| c.first)
            .fold(f64::MAX, f64::min);
        let last = self
            .containers
            .iter()
            .filter_map(|c| c.last)
            .fold(f64::MIN, f64::max);
        if last >= first {
            last - first
        } else {
            0.0
        }
    }

    /// The longest single container's frozen span.
    pub fn longest(&self) -> f64 {
        self.containers.iter().map(Seen::span).fold(0.0, f64::max)
    }

    /// The sum of every container's frozen span (container-seconds).
    pub fn sum(&self) -> f64 {
        self.containers.iter().map(Seen::span).sum()
    }
}

/// A running observer; [`Observer::stop`] returns what it saw.
pub struct Observer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Windows>,
}

impl Observer {
    /// Starts sampling `watched`.
    pub fn start(watched: Vec<Watched>) -> Observer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let began = Instant::now();
            let mut seen: Vec<Seen> = watched
                .iter()
                .map(|w| Seen {
                    name: w.name.clone(),
                    ..Default::default()
                })
                .collect();
            let mut was = vec![false; watched.len()];
            let mut buf = vec![0u8; 4096];
            let mut previous = began;
            loop {
                let done = flag.load(Ordering::Relaxed);
                let now = Instant::now();
                let at = now.duration_since(began).as_secs_f64();
                let step = now.duration_since(previous).as_secs_f64();
                previous = now;
                for (i, w) in watched.iter().enumerate() {
                    let stopped = w.stopped(&mut buf);
                    if stopped {
                        seen[i].first.get_or_insert(at);
                        seen[i].stopped += step;
                    } else if was[i] {
                        seen[i].last = Some(at);
                    }
                    was[i] = stopped;
                }
                if done {
                    break;
                }
                std::thread::sleep(PERIOD);
            }
            for (i, s) in seen.iter_mut().enumerate() {
                if was[i] {
                    // Still stopped at the end (a dump that stops the pod): up to now.
                    s.last = Some(began.elapsed().as_secs_f64());
                }
            }
            Windows {
                containers: seen,
                began: Some(began),
            }
        });
        // Let it take its first sample.
        std::thread::sleep(Duration::from_millis(5));
        Observer { stop, thread }
    }

    /// Stops sampling (after one more sample) and returns the windows.
    pub fn stop(self) -> Windows {
        std::thread::sleep(Duration::from_millis(5));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the observer thread")
    }
}

/// The freezer cgroup of a plain process (not in a container): for a raw CRIU dump.
pub fn process(pid: i32, name: &str, freezer_dir: Option<PathBuf>) -> Watched {
    let freezer = match freezer_dir {
        Some(dir) => File::open(dir.join("freezer.state")).expect("freezer.state"),
        // A file that never reads FROZEN.
        None => File::open("/dev/null").expect("/dev/null"),
    };
    Watched::processes(freezer, &[pid], name)
}
