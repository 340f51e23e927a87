//! [`Host`] on this machine: cgroup files, /proc, signals and statvfs.

use std::collections::BTreeSet;
use std::path::Path;

use nix::sys::signal::Signal;

use super::Host;
use crate::cgroup::{self, CgroupPaths};
use crate::{Error, Result};

/// The host podsnap runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinuxHost;

impl Host for LinuxHost {
    fn freeze(&self, cg: &CgroupPaths) -> Result<()> {
        cg.set_frozen(true)
    }

    fn thaw(&self, cg: &CgroupPaths) -> Result<()> {
        cg.set_frozen(false)
    }

    fn set_freezer_state(&self, dir: &Path, frozen: bool) -> Result<()> {
        cgroup::set_freezer_state(dir, frozen)
    }

    fn can_freeze(&self, dir: &Path) -> bool {
        cgroup::can_freeze(dir)
    }

    fn cgroup_processes(&self, cg: &CgroupPaths) -> Result<Vec<i32>> {
        cg.processes()
    }

    fn kill_cgroup(&self, cg: &CgroupPaths) -> Result<usize> {
        cg.kill_all()
    }

    fn kill_dir(&self, dir: &Path) -> Result<usize> {
        cgroup::kill_all_in(dir)
    }

    fn add_processes(&self, cg: &CgroupPaths, pids: &[i32]) -> Result<usize> {
        cg.add_processes(pids)
    }

    fn parent(&self, pid: i32) -> Option<i32> {
        parse_ppid(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    fn comm(&self, pid: i32) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|c| c.trim().to_owned())
    }

    fn cgroup_of(&self, pid: i32) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()
    }

    fn start_time(&self, pid: i32) -> Option<u64> {
        parse_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    fn ns_pid(&self, pid: i32) -> std::io::Result<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        parse_ns_pid(&status).ok_or_else(|| std::io::Error::other("no NSpid"))
    }

    fn sysv_attached(&self, pids: &[i32]) -> BTreeSet<i32> {
        pids.iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/maps")).ok())
            .flat_map(|maps| sysv_mappings(&maps))
            .collect()
    }

    fn signal(&self, pid: i32, signal: Signal) -> Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .map_err(|e| Error::io("signal a process", format!("/proc/{pid}"), e.into()))
    }

    fn free_bytes(&self, path: &Path) -> std::io::Result<u64> {
        let st = nix::sys::statvfs::statvfs(path)?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }
}

/// The parent pid in a `/proc/<pid>/stat` text: the second field after the command name's
/// closing parenthesis (the name may hold spaces and parentheses).
pub fn parse_ppid(stat: &str) -> Option<i32> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The start time in a `/proc/<pid>/stat` text (field 22); `None` for a zombie or a dead task.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The last pid of `NSpid` in a `/proc/<pid>/status` text.
pub fn parse_ns_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|ids| ids.split_whitespace().last()?.parse().ok())
}

/// The segment ids of the SysV mappings in a `/proc/<pid>/maps` text.
pub fn sysv_mappings(maps: &str) -> Vec<i32> {
    maps.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let path = fields.get(5)?;
            path.starts_with("/SYSV").then(|| fields.get(4)?.parse().ok())?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (a (b) c) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";

    #[test]
    fn stat_fields_count_after_the_last_parenthesis() {
        assert_eq!(parse_ppid(STAT), Some(17));
        assert_eq!(parse_start_time(STAT), Some(98765));
        let zombie = STAT.replace(") S ", ") Z ");
        assert_eq!(parse_start_time(&zombie), None, "a zombie has no start time");
        assert_eq!(parse_ppid("garbage"), None);
    }

    #[test]
    fn the_namespace_pid_is_the_last_of_nspid() {
        assert_eq!(parse_ns_pid("Name:\tsh\nNSpid:\t4242\t7\n"), Some(7));
        assert_eq!(parse_ns_pid("NSpid:\t12\n"), Some(12));
        assert_eq!(parse_ns_pid("Name:\tsh\n"), None);
    }

    #[test]
    fn sysv_mappings_are_read_from_maps() {
        let maps = "7f00-7f01 rw-s 00000000 00:01 32769 /SYSV0000002a (deleted)\n\
                    7f02-7f03 r--p 00000000 08:01 1234 /usr/lib/libc.so.6\n";
        assert_eq!(sysv_mappings(maps), vec![32769]);
    }

    #[test]
    fn this_process_is_seen_through_proc() {
        let me = std::process::id() as i32;
        let host = LinuxHost;
        assert!(host.start_time(me).is_some());
        assert_eq!(host.parent(me), Some(nix::unistd::getppid().as_raw()));
        assert!(host.cgroup_of(me).is_some_and(|c| !c.is_empty()));
        assert!(host.comm(-1).is_none());
    }
}
