//! [`Host`] for unit tests (feature `fake-host`): answers from a script (cgroup members, a
//! process table, freezes or thaws that fail, free space) and records every effect asked of
//! it, in order, so a test can assert what was frozen, thawed, killed or signalled.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nix::sys::signal::Signal;

use super::Host;
use crate::cgroup::CgroupPaths;
use crate::{Error, Result};

/// An effect a [`FakeHost`] was asked for; a cgroup is named by its freezer directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Freeze(PathBuf),
    Thaw(PathBuf),
    SetFreezer(PathBuf, bool),
    Kill(PathBuf),
    AddProcesses(PathBuf, Vec<i32>),
    Signal(i32, Signal),
}

/// One process of the fake process table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeProcess {
    pub ppid: i32,
    pub comm: String,
    /// Its `/proc/<pid>/cgroup` text: processes of one container share it.
    pub cgroup: String,
    pub start: u64,
    pub ns_pid: u32,
    /// SysV segments it attaches.
    pub sysv: Vec<i32>,
}

/// What the fake host answers.
#[derive(Debug, Default)]
pub struct Script {
    /// Cgroup (freezer directory) -> its processes.
    pub members: BTreeMap<PathBuf, Vec<i32>>,
    pub processes: BTreeMap<i32, FakeProcess>,
    /// Cgroups whose freeze fails.
    pub failing_freezes: HashSet<PathBuf>,
    /// Cgroups whose thaw fails.
    pub failing_thaws: HashSet<PathBuf>,
    /// Cgroup directories that can freeze (journal recovery); others are gone.
    pub freezable: HashSet<PathBuf>,
    /// Free bytes on every filesystem.
    pub free_bytes: u64,
}

/// A scripted, recording [`Host`].
#[derive(Debug, Default)]
pub struct FakeHost {
    script: Mutex<Script>,
    calls: Mutex<Vec<Call>>,
}

fn key(cg: &CgroupPaths) -> PathBuf {
    cg.freezer().map(Path::to_path_buf).unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FakeHost {
    pub fn new(script: Script) -> Self {
        Self {
            script: Mutex::new(script),
            calls: Mutex::new(Vec::new()),
        }
    }

    /// Changes the script (say, a process appears after a first check).
    pub fn script(&self) -> MutexGuard<'_, Script> {
        lock(&self.script)
    }

    /// Every effect asked for so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    fn record(&self, call: Call) {
        lock(&self.calls).push(call);
    }
}

impl Host for FakeHost {
    fn freeze(&self, cg: &CgroupPaths) -> Result<()> {
        let dir = key(cg);
        self.record(Call::Freeze(dir.clone()));
        match self.script().failing_freezes.contains(&dir) {
            true => Err(Error::io(
                "freeze",
                dir,
                std::io::Error::other("scripted failure"),
            )),
            false => Ok(()),
        }
    }

    fn thaw(&self, cg: &CgroupPaths) -> Result<()> {
        let dir = key(cg);
        self.record(Call::Thaw(dir.clone()));
        match self.script().failing_thaws.contains(&dir) {
            true => Err(Error::io("thaw", dir, std::io::Error::other("scripted failure"))),
            false => Ok(()),
        }
    }

    fn set_freezer_state(&self, dir: &Path, frozen: bool) -> Result<()> {
        self.record(Call::SetFreezer(dir.to_path_buf(), frozen));
        Ok(())
    }

    fn can_freeze(&self, dir: &Path) -> bool {
        self.script().freezable.contains(dir)
    }

    fn cgroup_processes(&self, cg: &CgroupPaths) -> Result<Vec<i32>> {
        let dir = key(cg);
        self.script()
            .members
            .get(&dir)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("cgroup {}", dir.display())))
    }

    fn kill_cgroup(&self, cg: &CgroupPaths) -> Result<usize> {
        let dir = key(cg);
        self.record(Call::Kill(dir.clone()));
        Ok(self.script().members.get(&dir).map_or(0, Vec::len))
    }

    fn kill_dir(&self, dir: &Path) -> Result<usize> {
        self.record(Call::Kill(dir.to_path_buf()));
        Ok(self.script().members.get(dir).map_or(0, Vec::len))
    }

    fn add_processes(&self, cg: &CgroupPaths, pids: &[i32]) -> Result<usize> {
        self.record(Call::AddProcesses(key(cg), pids.to_vec()));
        Ok(pids.len())
    }

    fn parent(&self, pid: i32) -> Option<i32> {
        self.script().processes.get(&pid).map(|p| p.ppid)
    }

    fn comm(&self, pid: i32) -> Option<String> {
        self.script().processes.get(&pid).map(|p| p.comm.clone())
    }

    fn cgroup_of(&self, pid: i32) -> Option<String> {
        self.script().processes.get(&pid).map(|p| p.cgroup.clone())
    }

    fn start_time(&self, pid: i32) -> Option<u64> {
        self.script().processes.get(&pid).map(|p| p.start)
    }

    fn ns_pid(&self, pid: i32) -> std::io::Result<u32> {
        self.script()
            .processes
            .get(&pid)
            .map(|p| p.ns_pid)
            .ok_or_else(|| std::io::Error::other("no NSpid"))
    }

    fn sysv_attached(&self, pids: &[i32]) -> BTreeSet<i32> {
        let script = self.script();
        pids.iter()
            .filter_map(|pid| script.processes.get(pid))
            .flat_map(|p| p.sysv.iter().copied())
            .collect()
    }

    fn signal(&self, pid: i32, signal: Signal) -> Result<()> {
        self.record(Call::Signal(pid, signal));
        Ok(())
    }

    fn free_bytes(&self, _path: &Path) -> std::io::Result<u64> {
        Ok(self.script().free_bytes)
    }
}
