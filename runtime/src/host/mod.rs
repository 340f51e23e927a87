//! The host seam: what podsnap asks of the kernel about cgroups and processes (freeze, thaw,
//! kill, membership, /proc facts, signals, free space), behind one small trait, so the
//! decisions built on it (what a dump refuses, what it thaws on which error) are unit tested
//! against [`fake::FakeHost`] (feature `fake-host`), and run on [`linux::LinuxHost`].
//!
//! External programs are not here: they go through [`crate::launcher::Launcher`]. Files of a
//! checkpoint are not either: tests use temporary directories for those.

use std::collections::BTreeSet;
use std::path::Path;

use nix::sys::signal::Signal;

use crate::cgroup::CgroupPaths;
use crate::Result;

#[cfg(any(test, feature = "fake-host"))]
pub mod fake;
pub mod linux;

pub use linux::LinuxHost;

/// Cgroup and process work on the host. Keep it small: one method per fact or effect.
pub trait Host: Send + Sync {
    /// Freezes a container's cgroup and waits until the kernel says it is frozen.
    fn freeze(&self, cg: &CgroupPaths) -> Result<()>;
    /// Thaws a container's cgroup and waits until the kernel says it is thawed.
    fn thaw(&self, cg: &CgroupPaths) -> Result<()>;
    /// Freezes (`true`) or thaws the cgroup directory `dir` (v1 freezer or v2).
    fn set_freezer_state(&self, dir: &Path, frozen: bool) -> Result<()>;
    /// Whether `dir` is a cgroup that can be frozen (it still exists).
    fn can_freeze(&self, dir: &Path) -> bool;
    /// The processes of a container's cgroup and of those below it.
    fn cgroup_processes(&self, cg: &CgroupPaths) -> Result<Vec<i32>>;
    /// SIGKILLs every process of a container's cgroup; how many were signalled.
    fn kill_cgroup(&self, cg: &CgroupPaths) -> Result<usize>;
    /// SIGKILLs every process of the cgroup directory `dir` (a v1 freezer or a v2 cgroup) and
    /// of those below it; how many were signalled.
    fn kill_dir(&self, dir: &Path) -> Result<usize>;
    /// Puts `pids` into a container's cgroups; how many were put.
    fn add_processes(&self, cg: &CgroupPaths, pids: &[i32]) -> Result<usize>;
    /// A process's parent (`/proc/<pid>/stat`); `None` when it is gone.
    fn parent(&self, pid: i32) -> Option<i32>;
    /// A process's command name (`/proc/<pid>/comm`); `None` when it is gone.
    fn comm(&self, pid: i32) -> Option<String>;
    /// A process's `/proc/<pid>/cgroup` text; `None` when it is gone.
    fn cgroup_of(&self, pid: i32) -> Option<String>;
    /// A live process's start time (clock ticks since boot); `None` when it is gone or a zombie.
    fn start_time(&self, pid: i32) -> Option<u64>;
    /// A process's pid in its own PID namespace (the last of `NSpid` in its status).
    fn ns_pid(&self, pid: i32) -> std::io::Result<u32>;
    /// The SysV shared memory segments the processes `pids` attach (from their `maps`).
    fn sysv_attached(&self, pids: &[i32]) -> BTreeSet<i32>;
    /// Sends `signal` to `pid`.
    fn signal(&self, pid: i32, signal: Signal) -> Result<()>;
    /// The bytes free for an unprivileged writer on the filesystem holding `path` (existing).
    fn free_bytes(&self, path: &Path) -> std::io::Result<u64>;
}
