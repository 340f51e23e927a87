//! cgroup v1 pieces the shim needs: where a container's cgroups are, their statistics, freezing,
//! and OOM notification. These machines run the v1 (hybrid) layout; runc uses v1 there.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where cgroup v1 hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A process's cgroup v1 directories, per controller.
#[derive(Debug, Clone, Default)]
pub struct CgroupPaths {
    dirs: HashMap<String, PathBuf>,
}

impl CgroupPaths {
    /// The cgroups of `pid`, from `/proc/<pid>/cgroup`.
    pub fn of_pid(pid: i32) -> Result<Self> {
        let file = format!("/proc/{pid}/cgroup");
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Error::io("read the cgroups of a process", &file, e))?;
        Ok(Self::parse(&text, Path::new(CGROUP_ROOT)))
    }

    /// Parses `/proc/<pid>/cgroup` text, resolving each controller under `root`.
    pub fn parse(text: &str, root: &Path) -> Self {
        let mut dirs = HashMap::new();
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            if controllers.is_empty() {
                continue; // the v2 entry of a hybrid layout
            }
            let rel = path.trim_start_matches('/');
            for c in controllers.split(',') {
                let c = c.trim_start_matches("name=");
                dirs.insert(c.to_string(), root.join(c).join(rel));
            }
        }
        Self { dirs }
    }

    /// The directory of `controller`, if the process is in one.
    pub fn get(&self, controller: &str) -> Option<&Path> {
        self.dirs.get(controller).map(PathBuf::as_path)
    }

    /// Reads the statistics of these cgroups. Missing controllers leave their part empty.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        if let Some(mem) = self.get("memory") {
            s.memory = Some(MemoryStats {
                usage: read_u64(mem, "memory.usage_in_bytes"),
                max_usage: read_u64(mem, "memory.max_usage_in_bytes"),
                limit: read_u64(mem, "memory.limit_in_bytes"),
                failcnt: read_u64(mem, "memory.failcnt"),
                stat: read_flat_keyed(mem, "memory.stat"),
            });
        }
        if let Some(cpu) = self.get("cpuacct") {
            let stat = read_flat_keyed(cpu, "cpuacct.stat");
            // cpuacct.stat counts USER_HZ ticks (100 per second on Linux).
            let ticks_to_ns = 10_000_000u64;
            s.cpu = Some(CpuStats {
                usage_total_ns: read_u64(cpu, "cpuacct.usage"),
                usage_user_ns: stat.get("user").copied().unwrap_or(0) * ticks_to_ns,
                usage_kernel_ns: stat.get("system").copied().unwrap_or(0) * ticks_to_ns,
                per_cpu_ns: std::fs::read_to_string(cpu.join("cpuacct.usage_percpu"))
                    .map(|t| t.split_whitespace().filter_map(|v| v.parse().ok()).collect())
                    .unwrap_or_default(),
                throttling: self
                    .get("cpu")
                    .map(|c| read_flat_keyed(c, "cpu.stat"))
                    .unwrap_or_default(),
            });
        }
        if let Some(pids) = self.get("pids") {
            let max = std::fs::read_to_string(pids.join("pids.max")).unwrap_or_default();
            s.pids = Some(PidsStats {
                current: read_u64(pids, "pids.current"),
                limit: max.trim().parse().unwrap_or(0),
            });
        }
        s
    }

    /// Freezes (`true`) or thaws the freezer cgroup and waits until the kernel reports it done.
    pub fn set_frozen(&self, frozen: bool) -> Result<()> {
        let dir = self
            .freezer()
            .ok_or_else(|| Error::NotFound("freezer cgroup".into()))?;
        set_freezer_state(dir, frozen)
    }

    /// The freezer cgroup's directory.
    pub fn freezer(&self) -> Option<&Path> {
        self.get("freezer")
    }

    /// Sends SIGKILL to every process of the freezer cgroup (while it is frozen the kills wait
    /// for the thaw, and nothing runs before it dies). Returns how many were signalled.
    pub fn kill_all(&self) -> Result<usize> {
        let dir = self
            .freezer()
            .ok_or_else(|| Error::NotFound("freezer cgroup".into()))?;
        let file = dir.join("cgroup.procs");
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io("list the processes", &file, e))?;
        let mut n = 0;
        for pid in text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL) {
                Ok(()) => n += 1,
                Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(Error::io("kill a process", &file, e.into())),
            }
        }
        Ok(n)
    }
}

/// Freezes (`true`) or thaws the freezer cgroup at `dir` and waits until the kernel reports it
/// done (at most about a second).
pub fn set_freezer_state(dir: &Path, frozen: bool) -> Result<()> {
    let file = dir.join("freezer.state");
    let want = if frozen { "FROZEN" } else { "THAWED" };
    for _ in 0..1000 {
        std::fs::write(&file, want).map_err(|e| Error::io("write the freezer state", &file, e))?;
        let now =
            std::fs::read_to_string(&file).map_err(|e| Error::io("read the freezer state", &file, e))?;
        if now.trim() == want {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(Error::Invalid {
        what: "freezer state",
        reason: format!("{} did not become {want}", file.display()),
    })
}

/// A cgroup's statistics, as the v1 controllers report them.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub memory: Option<MemoryStats>,
    pub cpu: Option<CpuStats>,
    pub pids: Option<PidsStats>,
}

/// The memory controller's numbers.
#[derive(Debug, Clone, Default)]
pub struct MemoryStats {
    pub usage: u64,
    pub max_usage: u64,
    pub limit: u64,
    pub failcnt: u64,
    /// `memory.stat`, key by key.
    pub stat: HashMap<String, u64>,
}

/// CPU accounting.
#[derive(Debug, Clone, Default)]
pub struct CpuStats {
    pub usage_total_ns: u64,
    pub usage_user_ns: u64,
    pub usage_kernel_ns: u64,
    pub per_cpu_ns: Vec<u64>,
    /// `cpu.stat`: nr_periods, nr_throttled, throttled_time.
    pub throttling: HashMap<String, u64>,
}

/// The pids controller's numbers.
#[derive(Debug, Clone, Default)]
pub struct PidsStats {
    pub current: u64,
    /// 0 means no limit.
    pub limit: u64,
}

fn read_u64(dir: &Path, file: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

fn read_flat_keyed(dir: &Path, file: &str) -> HashMap<String, u64> {
    std::fs::read_to_string(dir.join(file))
        .map(|t| parse_flat_keyed(&t))
        .unwrap_or_default()
}

fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// An eventfd the kernel signals on each OOM kill in a memory cgroup (v1 `cgroup.event_control`).
#[derive(Debug)]
pub struct OomNotifier {
    eventfd: OwnedFd,
}

impl OomNotifier {
    /// Registers for OOM notifications of the memory cgroup at `dir`.
    pub fn register(dir: &Path) -> Result<Self> {
        let control = dir.join("memory.oom_control");
        let oom =
            std::fs::File::open(&control).map_err(|e| Error::io("open memory.oom_control", &control, e))?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::sys("create an eventfd", nix::Error::last()));
        }
        // SAFETY: efd is a new descriptor we own exclusively.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let event_control = dir.join("cgroup.event_control");
        std::fs::write(
            &event_control,
            format!("{} {}", eventfd.as_raw_fd(), oom.as_raw_fd()),
        )
        .map_err(|e| Error::io("register for OOM events", &event_control, e))?;
        Ok(Self { eventfd })
    }

    /// Takes the eventfd (non-blocking; each 8-byte read counts events since the last).
    pub fn into_fd(self) -> OwnedFd {
        self.eventfd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hybrid_proc_cgroup() {
        let text =
            "12:freezer:/kubepods/pod1/abc\n11:cpu,cpuacct:/kubepods/pod1/abc\n1:name=systemd:/x\n0::/\n";
        let p = CgroupPaths::parse(text, Path::new("/sys/fs/cgroup"));
        assert_eq!(
            p.get("freezer"),
            Some(Path::new("/sys/fs/cgroup/freezer/kubepods/pod1/abc"))
        );
        assert_eq!(
            p.get("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpuacct/kubepods/pod1/abc"))
        );
        assert_eq!(p.get("systemd"), Some(Path::new("/sys/fs/cgroup/systemd/x")));
        assert!(p.get("memory").is_none());
    }

    #[test]
    fn parses_flat_keyed_files() {
        let m = parse_flat_keyed("cache 4096\nrss 8192\nbogus\n");
        assert_eq!(m.get("rss"), Some(&8192));
        assert_eq!(m.len(), 2);
    }
}
