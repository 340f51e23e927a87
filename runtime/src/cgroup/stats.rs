//! A container's cgroup statistics, as the kernel's v1 controllers or its v2 interface files
//! report them.
//!
//! cgroups-rs reads the files it reads right (memory, cpuacct, pids, v1 and v2); three v2
//! files are parsed here instead: `io.stat` (cgroups-rs keeps only lines of exactly seven
//! fields, so any line with more keys is lost, and panics on a minor number above 32767),
//! `memory.swap.max` (it reads `max` as 0) and `memory.events` (it has no reader for it).
//! A file a cgroup lacks (its controller is not enabled there) leaves its part out and is
//! named in `missing`, so the caller can say so once instead of reporting zeros.

use std::collections::HashMap;
use std::path::Path;

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::MaxValue;

use super::CgroupPaths;

/// A cgroup's statistics, v1 or v2.
#[derive(Debug, Clone)]
pub enum Stats {
    V1(V1Stats),
    V2(V2Stats),
}

impl Stats {
    /// The interface files that were not there (controllers not enabled for the cgroup).
    pub fn missing(&self) -> &[&'static str] {
        match self {
            Self::V1(s) => &s.missing,
            Self::V2(s) => &s.missing,
        }
    }

    /// Anonymous and shared memory of the cgroup and its descendants: what CRIU writes out
    /// (file-backed pages stay in their files). `None` without a memory controller.
    pub fn dumpable_memory(&self) -> Option<u64> {
        match self {
            Self::V1(s) => s
                .memory
                .as_ref()
                .map(|m| m.get("total_rss") + m.get("total_shmem")),
            // v2's memory.stat is hierarchical already.
            Self::V2(s) => s.memory.as_ref().map(|m| m.get("anon") + m.get("shmem")),
        }
    }
}

/// The v1 controllers' numbers.
#[derive(Debug, Clone, Default)]
pub struct V1Stats {
    pub memory: Option<MemoryStats>,
    pub cpu: Option<CpuStats>,
    pub pids: Option<PidsStats>,
    pub missing: Vec<&'static str>,
}

/// The memory controller's numbers (v1 and v2).
#[derive(Debug, Clone, Default)]
pub struct MemoryStats {
    /// v1 `memory.usage_in_bytes`, v2 `memory.current`.
    pub usage: u64,
    /// v1 `memory.max_usage_in_bytes`, v2 `memory.peak` (0 before Linux 5.19).
    pub max_usage: u64,
    /// v1 `memory.limit_in_bytes`, v2 `memory.max` (`u64::MAX`: none).
    pub limit: u64,
    /// v1 `memory.failcnt` (v2 has none: see `memory.events`).
    pub failcnt: u64,
    /// v2 `memory.swap.current`.
    pub swap_usage: u64,
    /// v2 `memory.swap.max` (`u64::MAX`: none).
    pub swap_limit: u64,
    /// `memory.stat`, key by key.
    pub stat: HashMap<String, u64>,
}

impl MemoryStats {
    /// A `memory.stat` key, 0 when absent.
    pub fn get(&self, key: &str) -> u64 {
        self.stat.get(key).copied().unwrap_or(0)
    }
}

/// v1 CPU accounting.
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

/// The v2 interface files' numbers.
#[derive(Debug, Clone, Default)]
pub struct V2Stats {
    pub memory: Option<MemoryStats>,
    /// `memory.events`: low, high, max, oom, oom_kill, oom_group_kill.
    pub memory_events: Option<HashMap<String, u64>>,
    /// `cpu.stat` (usage_usec, user_usec, system_usec always; nr_periods, nr_throttled,
    /// throttled_usec, nr_bursts, burst_usec with the cpu controller).
    pub cpu: Option<HashMap<String, u64>>,
    /// `io.stat`, one entry per device.
    pub io: Option<Vec<IoEntry>>,
    pub pids: Option<PidsStats>,
    pub missing: Vec<&'static str>,
}

/// One device's line of `io.stat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoEntry {
    pub major: u64,
    pub minor: u64,
    pub rbytes: u64,
    pub wbytes: u64,
    pub rios: u64,
    pub wios: u64,
}

impl V1Stats {
    /// Reads the v1 hierarchies of `paths`.
    pub fn read(paths: &CgroupPaths) -> Self {
        let mut s = Self::default();
        let mut need = |dir: Option<&Path>, file: &'static str| match dir {
            Some(d) if d.join(file).exists() => Some(d.to_path_buf()),
            _ => {
                s.missing.push(file);
                None
            }
        };
        let memory = need(paths.get("memory"), "memory.usage_in_bytes");
        let cpuacct = need(paths.get("cpuacct"), "cpuacct.usage");
        let pids = need(paths.get("pids"), "pids.current");
        if let Some(dir) = memory {
            let m = MemController::new(dir.clone(), dir, false).memory_stat();
            s.memory = Some(MemoryStats {
                usage: m.usage_in_bytes,
                max_usage: m.max_usage_in_bytes,
                limit: unlimited_if_negative(m.limit_in_bytes),
                failcnt: m.fail_cnt,
                swap_usage: 0,
                swap_limit: 0,
                stat: m.stat.raw,
            });
        }
        if let Some(dir) = cpuacct {
            let a = CpuAcctController::new(dir.clone(), dir).cpuacct();
            let stat = parse_flat_keyed(&a.stat);
            // cpuacct.stat counts USER_HZ ticks (100 per second on Linux).
            let ticks_to_ns = 10_000_000u64;
            s.cpu = Some(CpuStats {
                usage_total_ns: a.usage,
                usage_user_ns: stat.get("user").copied().unwrap_or(0) * ticks_to_ns,
                usage_kernel_ns: stat.get("system").copied().unwrap_or(0) * ticks_to_ns,
                per_cpu_ns: a
                    .usage_percpu
                    .split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect(),
                throttling: paths
                    .get("cpu")
                    .map(|c| parse_flat_keyed(&CpuController::new(c.into(), c.into(), false).cpu().stat))
                    .unwrap_or_default(),
            });
        }
        if let Some(dir) = pids {
            s.pids = Some(read_pids(&dir, false));
        }
        s
    }
}

impl V2Stats {
    /// Reads the v2 cgroup at `dir`.
    pub fn read(dir: &Path) -> Self {
        let mut s = Self::default();
        let mut has = |file: &'static str| {
            let there = dir.join(file).exists();
            if !there {
                s.missing.push(file);
            }
            there
        };
        let (memory, events, cpu, io, pids) = (
            has("memory.current"),
            has("memory.events"),
            has("cpu.stat"),
            has("io.stat"),
            has("pids.current"),
        );
        if memory {
            let mc = MemController::new(dir.into(), dir.into(), true);
            let m = mc.memory_stat();
            s.memory = Some(MemoryStats {
                usage: m.usage_in_bytes,
                max_usage: m.max_usage_in_bytes,
                limit: unlimited_if_negative(m.limit_in_bytes),
                failcnt: 0,
                swap_usage: mc.memswap().usage_in_bytes,
                swap_limit: read_max(&dir.join("memory.swap.max")).unwrap_or(0),
                stat: m.stat.raw,
            });
        }
        if events {
            s.memory_events = std::fs::read_to_string(dir.join("memory.events"))
                .ok()
                .map(|t| parse_flat_keyed(&t));
        }
        if cpu {
            s.cpu = Some(parse_flat_keyed(
                &CpuController::new(dir.into(), dir.into(), true).cpu().stat,
            ));
        }
        if io {
            s.io = std::fs::read_to_string(dir.join("io.stat"))
                .ok()
                .map(|t| parse_io_stat(&t));
        }
        if pids {
            s.pids = Some(read_pids(dir, true));
        }
        s
    }
}

fn read_pids(dir: &Path, v2: bool) -> PidsStats {
    let c = PidController::new(dir.into(), dir.into(), v2);
    PidsStats {
        current: c.get_pid_current().unwrap_or(0),
        limit: match c.get_pid_max() {
            Ok(MaxValue::Value(n)) => u64::try_from(n).unwrap_or(0),
            Ok(MaxValue::Max) | Err(_) => 0,
        },
    }
}

/// cgroups-rs reports "no limit" as -1.
fn unlimited_if_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// A v2 limit file: a number, or `max` (`u64::MAX`).
fn read_max(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    match text.trim() {
        "max" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

/// A flat-keyed file (`key value` per line), as `memory.stat`, `cpu.stat`, `memory.events`,
/// `cgroup.events`. Lines that are not are skipped.
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// `io.stat`: `MAJ:MIN key=value ...` per device; unknown keys (io.cost's, io.latency's) are
/// skipped, malformed lines too.
pub fn parse_io_stat(text: &str) -> Vec<IoEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (major, minor) = fields.next()?.split_once(':')?;
            let mut e = IoEntry {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                ..Default::default()
            };
            for field in fields {
                let Some((k, v)) = field.split_once('=') else {
                    continue;
                };
                let Ok(v) = v.parse() else { continue };
                match k {
                    "rbytes" => e.rbytes = v,
                    "wbytes" => e.wbytes = v,
                    "rios" => e.rios = v,
                    "wios" => e.wios = v,
                    _ => {}
                }
            }
            Some(e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            std::fs::write(dir.join(name), text).expect("write fixture");
        }
    }

    #[test]
    fn parses_flat_keyed_files() {
        let m = parse_flat_keyed("cache 4096\nrss 8192\nbogus\n");
        assert_eq!(m.get("rss"), Some(&8192));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn io_stat_keeps_every_device_and_skips_unknown_keys() {
        // The kernel's documented form, plus io.cost's extra keys and a large minor number.
        let text = "8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n\
                    8:0 rbytes=90430464 wbytes=299008000 rios=8950 wios=1252 dbytes=50331648 dios=3021 \
                    cost.vrate=135.77 cost.usage=12345\n\
                    253:40000 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0\n\
                    garbage\n";
        let io = parse_io_stat(text);
        assert_eq!(io.len(), 3);
        assert_eq!(
            io[0],
            IoEntry {
                major: 8,
                minor: 16,
                rbytes: 1459200,
                wbytes: 314773504,
                rios: 192,
                wios: 353
            }
        );
        assert_eq!((io[1].rios, io[1].wios), (8950, 1252));
        assert_eq!((io[2].major, io[2].minor, io[2].wios), (253, 40000, 4));
    }

    #[test]
    fn v2_stats_from_the_documented_files() {
        let t = tempfile::tempdir().expect("tempdir");
        write(
            t.path(),
            &[
                ("memory.current", "7340032\n"),
                ("memory.peak", "9437184\n"),
                ("memory.max", "max\n"),
                ("memory.swap.current", "4096\n"),
                ("memory.swap.max", "max\n"),
                (
                    "memory.stat",
                    "anon 4194304\nfile 2097152\nkernel 262144\nshmem 65536\nfile_mapped 1048576\n\
                     pgfault 1200\npgmajfault 3\n",
                ),
                (
                    "memory.events",
                    "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n",
                ),
                (
                    "cpu.stat",
                    "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\nnr_periods 10\n\
                     nr_throttled 2\nthrottled_usec 3000\nnr_bursts 0\nburst_usec 0\n",
                ),
                (
                    "io.stat",
                    "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
                ),
                ("pids.current", "3\n"),
                ("pids.max", "max\n"),
            ],
        );
        let s = V2Stats::read(t.path());
        assert!(s.missing.is_empty(), "{:?}", s.missing);
        let m = s.memory.as_ref().expect("memory");
        assert_eq!((m.usage, m.max_usage, m.limit), (7340032, 9437184, u64::MAX));
        assert_eq!((m.swap_usage, m.swap_limit), (4096, u64::MAX));
        assert_eq!((m.get("anon"), m.get("pgmajfault")), (4194304, 3));
        assert_eq!(s.memory_events.as_ref().and_then(|e| e.get("oom_kill")), Some(&1));
        let cpu = s.cpu.as_ref().expect("cpu");
        assert_eq!((cpu["usage_usec"], cpu["throttled_usec"]), (1500000, 3000));
        assert_eq!(s.io.as_ref().map(Vec::len), Some(1));
        let pids = s.pids.as_ref().expect("pids");
        assert_eq!((pids.current, pids.limit), (3, 0));
        assert_eq!(Stats::V2(s).dumpable_memory(), Some(4194304 + 65536));

        // A limit set; pids limited.
        write(t.path(), &[("memory.max", "268435456\n"), ("pids.max", "100\n")]);
        let s = V2Stats::read(t.path());
        assert_eq!(s.memory.as_ref().map(|m| m.limit), Some(268435456));
        assert_eq!(s.pids.as_ref().map(|p| p.limit), Some(100));
    }

    #[test]
    fn a_v2_cgroup_without_controllers_names_what_it_lacks() {
        // What runc's cgroup looks like on a cgroup2 root with no controller enabled: the core
        // files only (cpu.stat's usage lines are core).
        let t = tempfile::tempdir().expect("tempdir");
        write(
            t.path(),
            &[
                ("cgroup.procs", "42\n"),
                ("cpu.stat", "usage_usec 2000\nuser_usec 1500\nsystem_usec 500\n"),
            ],
        );
        let s = V2Stats::read(t.path());
        assert_eq!(
            s.missing,
            ["memory.current", "memory.events", "io.stat", "pids.current"]
        );
        assert!(s.memory.is_none() && s.io.is_none() && s.pids.is_none());
        assert_eq!(s.cpu.as_ref().map(|c| c["usage_usec"]), Some(2000));
        assert_eq!(Stats::V2(s).dumpable_memory(), None);
    }

    #[test]
    fn v1_stats_from_the_documented_files() {
        let t = tempfile::tempdir().expect("tempdir");
        for c in ["memory", "cpu,cpuacct", "pids"] {
            std::fs::create_dir(t.path().join(c)).expect("mkdir");
        }
        write(
            &t.path().join("memory"),
            &[
                ("memory.usage_in_bytes", "1048576\n"),
                ("memory.max_usage_in_bytes", "2097152\n"),
                ("memory.limit_in_bytes", "9223372036854771712\n"),
                ("memory.failcnt", "0\n"),
                (
                    "memory.stat",
                    "cache 4096\nrss 8192\ntotal_rss 8192\ntotal_shmem 4096\n",
                ),
            ],
        );
        write(
            &t.path().join("cpu,cpuacct"),
            &[
                ("cpuacct.usage", "123456789\n"),
                ("cpuacct.stat", "user 10\nsystem 5\n"),
                ("cpuacct.usage_percpu", "100000000 23456789 \n"),
                ("cpu.stat", "nr_periods 4\nnr_throttled 1\nthrottled_time 77\n"),
            ],
        );
        write(
            &t.path().join("pids"),
            &[("pids.current", "2\n"), ("pids.max", "max\n")],
        );
        let own = "5:pids:/\n4:cpu,cpuacct:/\n3:memory:/\n0::/\n";
        let paths = CgroupPaths::at(Path::new(""), own, t.path(), super::super::CgroupMode::Hybrid);
        // `at` maps each controller to root/<controller>: give cpu and cpuacct their mount's
        // name, as the kernel's symlinks do on a real node.
        std::os::unix::fs::symlink("cpu,cpuacct", t.path().join("cpu")).expect("symlink");
        std::os::unix::fs::symlink("cpu,cpuacct", t.path().join("cpuacct")).expect("symlink");
        let s = V1Stats::read(&paths);
        assert!(s.missing.is_empty(), "{:?}", s.missing);
        let m = s.memory.as_ref().expect("memory");
        assert_eq!((m.usage, m.max_usage, m.get("rss")), (1048576, 2097152, 8192));
        let cpu = s.cpu.as_ref().expect("cpu");
        assert_eq!(cpu.usage_total_ns, 123456789);
        assert_eq!(
            (cpu.usage_user_ns, cpu.usage_kernel_ns),
            (100_000_000, 50_000_000)
        );
        assert_eq!(cpu.per_cpu_ns, [100000000, 23456789]);
        assert_eq!(cpu.throttling.get("throttled_time"), Some(&77));
        assert_eq!(s.pids.as_ref().map(|p| (p.current, p.limit)), Some((2, 0)));
        assert_eq!(Stats::V1(s).dumpable_memory(), Some(8192 + 4096));
    }
}
