//! A container's cgroups: where they are, freezing and thawing them, killing what runs in
//! them, their statistics ([`stats`]) and OOM notification ([`oom`]).
//!
//! Three layouts exist and the node's is read once, as runc does, from the filesystem mounted
//! at `/sys/fs/cgroup` ([`CgroupMode`]):
//!
//! ```text
//! legacy   /sys/fs/cgroup/<controller>/<path>       every controller on a v1 hierarchy
//! hybrid   the same, plus an empty cgroup2 at /sys/fs/cgroup/unified (these machines)
//! unified  /sys/fs/cgroup/<path>                    cgroup v2: one directory for all
//! ```
//!
//! A container's place in them is [`CgroupPaths`]: one directory per controller on v1 (and
//! hybrid, where runc uses v1), one directory on v2. It is learnt from the container's
//! `linux.cgroupsPath` as runc reads it, for the cgroupfs driver (`/kubepods/pod<uid>/<id>`)
//! and the systemd driver (`kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`, see
//! [`systemd`]), or else from `/proc/<pid>/cgroup`.

pub mod oom;
pub mod stats;
pub mod systemd;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{Error, Result};

pub use stats::Stats;

/// Where cgroup filesystems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup2 hierarchy of a hybrid node, under [`CGROUP_ROOT`] (and its key in
/// [`CgroupPaths::V1`]).
pub const UNIFIED: &str = "unified";

/// How long a freeze or a thaw may take before it is an error.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// The node's cgroup layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup v1 only.
    Legacy,
    /// cgroup v1 controllers and an (empty) cgroup2 hierarchy at `/sys/fs/cgroup/unified`.
    Hybrid,
    /// cgroup v2 at `/sys/fs/cgroup`.
    Unified,
}

impl CgroupMode {
    /// The layout of this process's mount namespace (read once: a process does not move).
    pub fn of_node() -> Self {
        static MODE: OnceLock<CgroupMode> = OnceLock::new();
        *MODE.get_or_init(|| Self::detect(Path::new(CGROUP_ROOT)))
    }

    /// Reads the layout under `root`: cgroup2 mounted there is unified; otherwise hybrid when
    /// `root/unified` is cgroup2, legacy if not.
    pub fn detect(root: &Path) -> Self {
        let is_cgroup2 = |p: &Path| {
            nix::sys::statfs::statfs(p)
                .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        };
        if is_cgroup2(root) {
            Self::Unified
        } else if is_cgroup2(&root.join("unified")) {
            Self::Hybrid
        } else {
            Self::Legacy
        }
    }

    /// How it is named in logs and the README: `v1`, `hybrid`, `v2`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Legacy => "v1",
            Self::Hybrid => "hybrid",
            Self::Unified => "v2",
        }
    }
}

/// Where a container's cgroups are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupPaths {
    /// cgroup v1 (legacy or hybrid): a directory per controller (`name=systemd` as `systemd`),
    /// and on a hybrid node the cgroup2 one as `unified` (runc puts containers there too, and
    /// runc 1.2+ kills a container through its `cgroup.kill`).
    V1 { dirs: BTreeMap<String, PathBuf> },
    /// cgroup v2: the one directory.
    V2 { dir: PathBuf },
}

impl CgroupPaths {
    /// The cgroups of `pid`, from `/proc/<pid>/cgroup`.
    pub fn of_pid(pid: i32) -> Result<Self> {
        let file = format!("/proc/{pid}/cgroup");
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Error::io("read the cgroups of a process", &file, e))?;
        Self::parse(&text, Path::new(CGROUP_ROOT), CgroupMode::of_node()).ok_or_else(|| Error::Invalid {
            what: "cgroup membership",
            reason: format!("{file} names no cgroup of this node's layout"),
        })
    }

    /// The cgroups of a container whose spec says `linux.cgroupsPath = cgroups_path` and whose
    /// runc runs with `--systemd-cgroup` when `systemd`, on this node; checked against
    /// `/proc/<pid>/cgroup` when `pid` is given: where runc really put the process wins (a
    /// relative path, a cgroup namespace).
    pub fn of_container(cgroups_path: &str, systemd: bool, pid: Option<i32>) -> Result<Self> {
        let resolved = (|| {
            let rel = systemd::relative_dir(cgroups_path, systemd)?;
            let own = std::fs::read_to_string("/proc/self/cgroup")
                .map_err(|e| Error::io("read this process's cgroups", "/proc/self/cgroup", e))?;
            Ok::<_, Error>(Self::at(
                &rel,
                &own,
                Path::new(CGROUP_ROOT),
                CgroupMode::of_node(),
            ))
        })();
        match (resolved, pid) {
            (Ok(paths), None) => Ok(paths),
            (Ok(paths), Some(pid)) => match Self::of_pid(pid) {
                Ok(actual) if actual.freezer() != paths.freezer() => {
                    log::info!(
                        "cgroupsPath {cgroups_path:?} resolves to {:?} but pid {pid} is in {:?}: using the latter",
                        paths.freezer(),
                        actual.freezer()
                    );
                    Ok(actual)
                }
                _ => Ok(paths),
            },
            (Err(e), Some(pid)) => {
                log::info!("cgroupsPath {cgroups_path:?}: {e}; using /proc/{pid}/cgroup");
                Self::of_pid(pid)
            }
            (Err(e), None) => Err(e),
        }
    }

    /// Parses `/proc/<pid>/cgroup` text for a node of layout `mode` with its cgroup
    /// filesystems under `root`. `None`: the text has no line of that layout.
    pub fn parse(text: &str, root: &Path, mode: CgroupMode) -> Option<Self> {
        match mode {
            CgroupMode::Unified => text.lines().find_map(|line| {
                let path = line.strip_prefix("0::")?;
                Some(Self::V2 {
                    dir: root.join(path.trim_start_matches('/')),
                })
            }),
            CgroupMode::Legacy | CgroupMode::Hybrid => {
                let mut dirs = BTreeMap::new();
                for (controllers, path) in v1_lines(text) {
                    for c in controllers {
                        dirs.insert(c.to_owned(), root.join(c).join(path.trim_start_matches('/')));
                    }
                }
                if dirs.is_empty() {
                    return None;
                }
                if mode == CgroupMode::Hybrid {
                    if let Some(path) = text.lines().find_map(|l| l.strip_prefix("0::")) {
                        dirs.insert(
                            UNIFIED.to_owned(),
                            root.join(UNIFIED).join(path.trim_start_matches('/')),
                        );
                    }
                }
                Some(Self::V1 { dirs })
            }
        }
    }

    /// The cgroup `rel` (relative to each hierarchy's root) on a node of layout `mode`, whose
    /// v1 hierarchies are those `own` (this process's `/proc/self/cgroup`) lists.
    pub fn at(rel: &Path, own: &str, root: &Path, mode: CgroupMode) -> Self {
        match mode {
            CgroupMode::Unified => Self::V2 { dir: root.join(rel) },
            CgroupMode::Legacy | CgroupMode::Hybrid => Self::V1 {
                dirs: v1_lines(own)
                    .flat_map(|(controllers, _)| controllers)
                    .chain((mode == CgroupMode::Hybrid).then_some(UNIFIED))
                    .map(|c| (c.to_owned(), root.join(c).join(rel)))
                    .collect(),
            },
        }
    }

    /// The directory of v1 `controller`; on v2 the one directory whatever the controller.
    pub fn get(&self, controller: &str) -> Option<&Path> {
        match self {
            Self::V1 { dirs } => dirs.get(controller).map(PathBuf::as_path),
            Self::V2 { dir } => Some(dir),
        }
    }

    /// The directory that freezes: the v1 freezer cgroup, or the v2 cgroup.
    pub fn freezer(&self) -> Option<&Path> {
        self.get("freezer")
    }

    /// Every distinct directory (each v1 hierarchy's, or the v2 one).
    pub fn dirs(&self) -> Vec<&Path> {
        match self {
            Self::V1 { dirs } => {
                let mut seen: Vec<&Path> = Vec::new();
                for d in dirs.values() {
                    if !seen.contains(&d.as_path()) {
                        seen.push(d);
                    }
                }
                seen
            }
            Self::V2 { dir } => vec![dir],
        }
    }

    /// `true` on v2.
    pub fn is_v2(&self) -> bool {
        matches!(self, Self::V2 { .. })
    }

    /// Reads the statistics of these cgroups; what the kernel does not offer (a controller not
    /// enabled) is left out and named in [`Stats::missing`].
    pub fn stats(&self) -> Stats {
        match self {
            Self::V1 { .. } => Stats::V1(stats::V1Stats::read(self)),
            Self::V2 { dir } => Stats::V2(stats::V2Stats::read(dir)),
        }
    }

    /// Whether the container's v1 freezer cgroup is frozen (or freezing). Always `false` on
    /// v2, whose freezer lets SIGKILL through; `false` when the cgroup is gone.
    pub fn v1_frozen(&self) -> bool {
        match self {
            Self::V1 { .. } => self
                .freezer()
                .and_then(|d| std::fs::read_to_string(d.join("freezer.state")).ok())
                .is_some_and(|s| s.trim() != "THAWED"),
            Self::V2 { .. } => false,
        }
    }

    /// Freezes (`true`) or thaws the container and waits until the kernel reports it done.
    pub fn set_frozen(&self, frozen: bool) -> Result<()> {
        let dir = self
            .freezer()
            .ok_or_else(|| Error::NotFound("freezer cgroup".into()))?;
        set_freezer_state(dir, frozen)
    }

    /// The processes of the container's cgroup (the freezer's on v1) and of those below it.
    pub fn processes(&self) -> Result<Vec<i32>> {
        let dir = self
            .freezer()
            .ok_or_else(|| Error::NotFound("freezer cgroup".into()))?;
        let mut pids = Vec::new();
        for d in tree(dir) {
            let file = d.join("cgroup.procs");
            let text =
                std::fs::read_to_string(&file).map_err(|e| Error::io("list the processes", &file, e))?;
            pids.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
        Ok(pids)
    }

    /// Moves every process of these v2 cgroups (and of those below) into `to` (made if missing),
    /// then removes the cgroup they left when it is empty. For processes CRIU restored into the
    /// cgroup path they were dumped from (on v2, runc 1.1.5 does not give CRIU the new
    /// container's cgroup, so the shim names it in CRIU's configuration; a process the pause
    /// process adopted is restored into a cgroup of its own, then moved). Returns how many
    /// processes moved. Not for v1 (runc places restored processes there itself).
    pub fn move_processes_to(&self, to: &CgroupPaths) -> Result<usize> {
        let (Self::V2 { dir: from }, Self::V2 { dir: dest }) = (self, to) else {
            return Err(Error::Invalid {
                what: "cgroup move",
                reason: "only between v2 cgroups".into(),
            });
        };
        std::fs::create_dir_all(dest).map_err(|e| Error::io("create a cgroup", dest, e))?;
        let procs = dest.join("cgroup.procs");
        let mut moved = 0;
        for pid in self.processes()? {
            match std::fs::write(&procs, pid.to_string()) {
                Ok(()) => moved += 1,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(Error::io("move a process into its cgroup", &procs, e)),
            }
        }
        // Empty now, the cgroup left behind goes (children first); a busy one stays.
        for d in tree(from).iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        Ok(moved)
    }

    /// Puts the processes `pids` (and their threads) into these cgroups, every hierarchy of
    /// them on v1; a process gone meanwhile is skipped. Returns how many were put.
    pub fn add_processes(&self, pids: &[i32]) -> Result<usize> {
        let mut added = BTreeSet::new();
        for dir in self.dirs() {
            let procs = dir.join("cgroup.procs");
            for pid in pids {
                match std::fs::write(&procs, pid.to_string()) {
                    Ok(()) => {
                        added.insert(*pid);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => return Err(Error::io("move a process into its cgroup", &procs, e)),
                }
            }
        }
        Ok(added.len())
    }

    /// Sends SIGKILL to every process of the container's cgroup and those below it (while it
    /// is frozen the kills wait for the thaw, and nothing runs before it dies). Returns how
    /// many were signalled.
    pub fn kill_all(&self) -> Result<usize> {
        let dir = self
            .freezer()
            .ok_or_else(|| Error::NotFound("freezer cgroup".into()))?;
        kill_all_in(dir)
    }
}

/// Sends SIGKILL to every process of the cgroup at `dir` (a v1 freezer or a v2 cgroup) and of
/// those below it; see [`CgroupPaths::kill_all`]. Returns how many were signalled.
pub fn kill_all_in(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for d in tree(dir) {
        let file = d.join("cgroup.procs");
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io("list the processes", &file, e))?;
        for pid in text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL) {
                Ok(()) => n += 1,
                Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(Error::sys("kill a process of a cgroup", e)),
            }
        }
    }
    Ok(n)
}

/// The v1 lines of `/proc/<pid>/cgroup`: each hierarchy's controllers (`name=` dropped) and path.
fn v1_lines(text: &str) -> impl Iterator<Item = (Vec<&str>, &str)> {
    text.lines().filter_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        if controllers.is_empty() {
            return None; // the v2 line of a hybrid layout
        }
        Some((
            controllers
                .split(',')
                .map(|c| c.trim_start_matches("name="))
                .collect(),
            path,
        ))
    })
}

/// `root` and every process descending from it, `root` first (from each thread's
/// `/proc/<pid>/task/<tid>/children`). For a tree that cannot change meanwhile (stopped).
pub fn process_tree(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut at = 0;
    while at < out.len() && out.len() < 65_536 {
        let pid = out[at];
        at += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
                if !out.contains(&child) {
                    out.push(child);
                }
            }
        }
    }
    out
}

/// The cgroup directory `dir` and every one below it, parents before their children (reversed:
/// an order to remove them in).
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    dirs
}

/// Freezes (`true`) or thaws the cgroup at `dir`, v1 (`freezer.state`) or v2 (`cgroup.freeze`)
/// by the file it has, and waits until the kernel reports it done.
pub fn set_freezer_state(dir: &Path, frozen: bool) -> Result<()> {
    if dir.join("freezer.state").exists() {
        set_v1_freezer(dir, frozen)
    } else {
        set_v2_freeze(dir, frozen)
    }
}

/// Whether `dir` is a cgroup that can be frozen (v1 freezer or v2), i.e. still exists.
pub fn can_freeze(dir: &Path) -> bool {
    dir.join("freezer.state").exists() || dir.join("cgroup.freeze").exists()
}

fn set_v1_freezer(dir: &Path, frozen: bool) -> Result<()> {
    let file = dir.join("freezer.state");
    let want = if frozen { "FROZEN" } else { "THAWED" };
    let deadline = Instant::now() + FREEZE_TIMEOUT;
    loop {
        std::fs::write(&file, want).map_err(|e| Error::io("write the freezer state", &file, e))?;
        let now =
            std::fs::read_to_string(&file).map_err(|e| Error::io("read the freezer state", &file, e))?;
        if now.trim() == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Invalid {
                what: "freezer state",
                reason: format!("{} did not become {want}", file.display()),
            });
        }
        // v1 offers no notification: FREEZING turns FROZEN on a later write.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// v2: writes `cgroup.freeze`, then waits on `cgroup.events` (the kernel notifies a change of
/// it as a file modification) until `frozen` says the same.
fn set_v2_freeze(dir: &Path, frozen: bool) -> Result<()> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let control = dir.join("cgroup.freeze");
    let events = dir.join("cgroup.events");
    let want = if frozen { 1 } else { 0 };
    // Watch before writing, so the change cannot slip between the write and the watch.
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| Error::sys("create an inotify instance", e))?;
    inotify
        .add_watch(&events, AddWatchFlags::IN_MODIFY)
        .map_err(|e| Error::io("watch cgroup.events", &events, e.into()))?;
    std::fs::write(&control, if frozen { "1" } else { "0" })
        .map_err(|e| Error::io("write cgroup.freeze", &control, e))?;
    let deadline = Instant::now() + FREEZE_TIMEOUT;
    loop {
        let text =
            std::fs::read_to_string(&events).map_err(|e| Error::io("read cgroup.events", &events, e))?;
        if stats::parse_flat_keyed(&text).get("frozen") == Some(&want) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Invalid {
                what: "cgroup freeze",
                reason: format!(
                    "{} did not report frozen {want} within {FREEZE_TIMEOUT:?}",
                    events.display()
                ),
            });
        }
        let mut fds = [nix::poll::PollFd::new(
            inotify.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let wait = nix::poll::PollTimeout::try_from(left).unwrap_or(nix::poll::PollTimeout::MAX);
        match nix::poll::poll(&mut fds, wait) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::sys("wait for cgroup.events", e)),
        }
        // Drain; the file is read again above.
        while inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str =
        "12:freezer:/kubepods/pod1/abc\n11:cpu,cpuacct:/kubepods/pod1/abc\n1:name=systemd:/x\n0::/\n";

    #[test]
    fn parses_hybrid_proc_cgroup() {
        let p = CgroupPaths::parse(HYBRID, Path::new("/sys/fs/cgroup"), CgroupMode::Hybrid).expect("v1");
        assert_eq!(
            p.freezer(),
            Some(Path::new("/sys/fs/cgroup/freezer/kubepods/pod1/abc"))
        );
        assert_eq!(
            p.get("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpuacct/kubepods/pod1/abc"))
        );
        assert_eq!(p.get("systemd"), Some(Path::new("/sys/fs/cgroup/systemd/x")));
        assert_eq!(
            p.get("unified"),
            Some(Path::new("/sys/fs/cgroup/unified")),
            "hybrid: the cgroup2 one too"
        );
        assert!(p.get("memory").is_none());
        assert!(!p.is_v2());
        let legacy = CgroupPaths::parse(HYBRID, Path::new("/sys/fs/cgroup"), CgroupMode::Legacy).expect("v1");
        assert!(legacy.get("unified").is_none(), "legacy: no cgroup2");
    }

    #[test]
    fn parses_unified_proc_cgroup() {
        let text = "0::/kubepods.slice/kubepods-besteffort.slice/cri-containerd-abc.scope\n";
        let p = CgroupPaths::parse(text, Path::new("/sys/fs/cgroup"), CgroupMode::Unified).expect("v2");
        let dir =
            Path::new("/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/cri-containerd-abc.scope");
        assert_eq!(p, CgroupPaths::V2 { dir: dir.into() });
        assert_eq!(p.freezer(), Some(dir));
        assert_eq!(p.get("memory"), Some(dir), "one directory for every controller");
        // A v1-only text on a unified node names nothing, and the reverse.
        assert_eq!(
            CgroupPaths::parse("4:memory:/a\n", Path::new("/r"), CgroupMode::Unified),
            None
        );
        assert_eq!(
            CgroupPaths::parse("0::/a\n", Path::new("/r"), CgroupMode::Legacy),
            None
        );
    }

    #[test]
    fn a_path_lands_in_every_v1_hierarchy_or_the_v2_one() {
        let rel = Path::new("kubepods/besteffort/podu/c1");
        let v1 = CgroupPaths::at(rel, HYBRID, Path::new("/cg"), CgroupMode::Hybrid);
        assert_eq!(
            v1.freezer(),
            Some(Path::new("/cg/freezer/kubepods/besteffort/podu/c1"))
        );
        assert_eq!(
            v1.get("cpu"),
            Some(Path::new("/cg/cpu/kubepods/besteffort/podu/c1"))
        );
        assert_eq!(v1.dirs().len(), 5, "freezer, cpu, cpuacct, systemd, unified");
        assert_eq!(
            v1.get("unified"),
            Some(Path::new("/cg/unified/kubepods/besteffort/podu/c1"))
        );
        let v2 = CgroupPaths::at(rel, "0::/\n", Path::new("/cg"), CgroupMode::Unified);
        assert_eq!(v2.dirs(), [Path::new("/cg/kubepods/besteffort/podu/c1")]);
    }

    #[test]
    fn v2_freeze_waits_for_cgroup_events() {
        // A fixture cgroup: cgroup.events already says what the write asks for, so the wait
        // ends at once; the write itself must land in cgroup.freeze.
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("cgroup.freeze"), "0\n").expect("write");
        std::fs::write(t.path().join("cgroup.events"), "populated 1\nfrozen 1\n").expect("write");
        set_freezer_state(t.path(), true).expect("freeze");
        assert_eq!(
            std::fs::read_to_string(t.path().join("cgroup.freeze")).expect("read"),
            "1"
        );
        assert!(can_freeze(t.path()));
        // A thaw the kernel reports only later: another thread plays the kernel.
        let events = t.path().join("cgroup.events");
        let kernel = std::thread::spawn(move || {
            // The thaw is written first; then the kernel's report follows.
            while std::fs::read_to_string(events.with_file_name("cgroup.freeze")).expect("read") != "0" {
                std::thread::yield_now();
            }
            std::fs::write(&events, "populated 1\nfrozen 0\n").expect("write");
        });
        set_freezer_state(t.path(), false).expect("thaw");
        kernel.join().expect("kernel thread");
        assert!(!can_freeze(&t.path().join("gone")));
    }
}
