//! The pod dump's crash journal: before a pod dump freezes anything it writes down what it is
//! about to freeze and where its staging output is, and it removes the note only once every
//! container is thawed and the output committed or removed. If the process running the dump
//! dies (a shim killed mid-dump), whoever comes next for that pod (containerd's cleanup of a
//! dead shim, `containerd-shim-podsnap-v1 delete`, or the pod's next shim) calls [`recover`]:
//! it thaws what the note lists and removes the staging output.
//!
//! ```text
//! /run/podsnap/dumps/<sandbox-id>.json   0600, written atomically (temporary file, rename)
//!   { "owner_pid", "owner_start", "frozen": [cgroup dirs: v1 freezer cgroups, or v2 cgroups,
//!     told apart by freezer.state / cgroup.freeze], "staging", "in_place", "dest",
//!     "netns" }
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where pod dumps keep their journals.
pub const JOURNAL_DIR: &str = "/run/podsnap/dumps";
/// The largest journal read back.
const MAX_JOURNAL_BYTES: u64 = 1024 * 1024;

/// The journal of pod `sandbox_id`.
pub fn journal_path(sandbox_id: &str) -> PathBuf {
    Path::new(JOURNAL_DIR).join(format!("{sandbox_id}.json"))
}

/// What a dump in progress may leave behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The process running the dump, and its start time (so a reused pid is not mistaken for it).
    pub owner_pid: u32,
    pub owner_start: u64,
    /// The cgroup directories the dump freezes: v1 freezer cgroups or v2 cgroups.
    pub frozen: Vec<PathBuf>,
    /// The staging directory the dump writes into.
    pub staging: PathBuf,
    /// The staging directory is the destination itself (it existed, empty): only its contents
    /// are removed.
    pub in_place: bool,
    pub dest: PathBuf,
    /// The pod's network namespace, locked by the dump.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

/// A journal written for a dump in progress; removed when dropped (after the dump's own
/// cleanup has run).
#[derive(Debug)]
pub struct Journal {
    path: Option<PathBuf>,
}

impl Journal {
    /// No journal (a dump whose caller keeps none).
    pub fn none() -> Self {
        Self { path: None }
    }

    /// Writes `entry` at `path`, durably, before anything is frozen.
    pub fn begin(path: &Path, entry: &Entry) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        crate::container::create_private_dir(dir)?;
        let json = serde_json::to_vec_pretty(entry)
            .map_err(|e| Error::io("encode the dump journal", path, e.into()))?;
        crate::dump::write_synced(path, &json)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
        })
    }

    /// Updates the journal (e.g. once the staging directory is known).
    pub fn update(&self, entry: &Entry) -> Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let json = serde_json::to_vec_pretty(entry)
            .map_err(|e| Error::io("encode the dump journal", path, e.into()))?;
        crate::dump::write_synced(path, &json)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("remove the dump journal {}: {e}", path.display());
                }
            }
        }
    }
}

/// This process as a journal owner.
pub fn this_process() -> (u32, u64) {
    let pid = std::process::id();
    (pid, start_time(pid).unwrap_or(0))
}

/// Whether the process `pid` that started at `start` (see [`this_process`]) still runs: the
/// same pid with the same start time, not a zombie. A start time of 0 (unknown) never matches.
pub fn alive(pid: u32, start: u64) -> bool {
    start != 0 && start_time(pid) == Some(start)
}

/// A live process's start time (clock ticks since boot, `/proc/<pid>/stat` field 22); `None`
/// for a process that is gone or dead but not yet reaped (a zombie).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// What [`recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Freezer cgroups thawed.
    pub thawed: Vec<PathBuf>,
    /// The staging output removed.
    pub removed: Option<PathBuf>,
    /// The dump's owner is still alive: nothing was touched.
    pub owner_alive: bool,
    /// Processes of the dead dump (runc, CRIU) that were still running, killed.
    pub killed: usize,
}

/// Kills every process whose command line names `staging`, or whose working directory is
/// inside it (a CRIU whose runc died first: `criu swrk` names no path, but it works in the
/// images directory), and their descendants.
fn kill_workers(staging: &Path) -> usize {
    let needle = staging.as_os_str().as_encoded_bytes();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let works_inside = std::fs::read_link(p.path().join("cwd")).is_ok_and(|cwd| {
            let cwd = cwd.as_os_str().as_encoded_bytes();
            let cwd = cwd.strip_suffix(b" (deleted)").unwrap_or(cwd);
            cwd.starts_with(needle) && matches!(cwd.get(needle.len()), None | Some(b'/'))
        });
        if works_inside || cmdline.windows(needle.len()).any(|w| w == needle) {
            log::warn!("killing pid {pid} of a dead pod dump");
            podsnap_runtime::launcher::kill_tree(pid);
            n += 1;
        }
    }
    n
}

/// Undoes what a dead dump left: thaws every cgroup its journal lists, unlocks the pod's
/// network, removes its staging output, then the journal. A journal whose owner still runs is
/// left alone. No journal: nothing to do.
pub async fn recover(launcher: &dyn podsnap_runtime::launcher::Launcher, path: &Path) -> Result<Recovered> {
    let bytes = match crate::manifest::read_capped(path, MAX_JOURNAL_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recovered::default()),
        Err(e) => return Err(Error::io("read the dump journal", path, e)),
    };
    let entry: Entry = match serde_json::from_slice(&bytes) {
        Ok(e) => e,
        Err(e) => {
            // A torn journal (the owner died writing it) froze nothing yet.
            log::warn!("dump journal {} is unreadable ({e}): removed", path.display());
            let _ = std::fs::remove_file(path);
            return Ok(Recovered::default());
        }
    };
    if alive(entry.owner_pid, entry.owner_start) {
        return Ok(Recovered {
            owner_alive: true,
            ..Default::default()
        });
    }
    let mut done = Recovered::default();
    // runc and CRIU outlive a killed shim: end whatever still works on the dead dump's output
    // (their command lines name its staging directory), with everything they started.
    if !entry.staging.as_os_str().is_empty() {
        done.killed = kill_workers(&entry.staging);
    }
    for dir in &entry.frozen {
        if !podsnap_runtime::cgroup::can_freeze(dir) {
            continue; // the cgroup is gone with its container
        }
        match podsnap_runtime::cgroup::set_freezer_state(dir, false) {
            Ok(()) => done.thawed.push(dir.clone()),
            Err(e) => log::error!("thaw {} after a dead dump: {e}", dir.display()),
        }
    }
    if let Some(ns) = &entry.netns {
        crate::netlock::unlock(launcher, ns).await;
    }
    if !entry.staging.as_os_str().is_empty() && entry.staging.exists() {
        let res = if entry.in_place {
            remove_contents(&entry.staging)
        } else {
            std::fs::remove_dir_all(&entry.staging)
        };
        match res {
            Ok(()) => done.removed = Some(entry.staging.clone()),
            Err(e) => log::error!("remove {} after a dead dump: {e}", entry.staging.display()),
        }
    }
    std::fs::remove_file(path).map_err(|e| Error::io("remove the dump journal", path, e))?;
    log::warn!(
        "a pod dump died half-way: killed {} of its processes, thawed {:?}, removed {:?}",
        done.killed,
        done.thawed,
        done.removed
    );
    Ok(done)
}

/// Removes everything inside `dir` (never following symlinks), keeping `dir`.
pub fn remove_contents(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(staging: &Path, frozen: Vec<PathBuf>) -> Entry {
        Entry {
            owner_pid: u32::MAX - 1,
            owner_start: 12345,
            frozen,
            staging: staging.to_path_buf(),
            in_place: false,
            dest: staging.with_extension("final"),
            netns: None,
        }
    }

    const NO_PROGRAMS: podsnap_runtime::launcher::TokioLauncher = podsnap_runtime::launcher::TokioLauncher;

    #[tokio::test]
    async fn a_dead_owners_staging_is_removed_and_the_journal_with_it() {
        let t = tempfile::tempdir().expect("tempdir");
        let staging = t.path().join(".ckpt.tmp-1");
        std::fs::create_dir_all(staging.join("containers/app")).expect("mkdir");
        let path = t.path().join("journal/pod.json");
        let j = Journal::begin(&path, &entry(&staging, vec![])).expect("begin");
        std::mem::forget(j); // the owner "dies": its Drop never runs
        let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
        assert_eq!(done.removed.as_deref(), Some(staging.as_path()));
        assert!(!staging.exists() && !path.exists());
        assert_eq!(
            recover(&NO_PROGRAMS, &path).await.expect("again"),
            Recovered::default()
        );
    }

    #[tokio::test]
    async fn a_live_owner_is_left_alone() {
        let t = tempfile::tempdir().expect("tempdir");
        let staging = t.path().join("staging");
        std::fs::create_dir(&staging).expect("mkdir");
        let (pid, start) = this_process();
        let mut e = entry(&staging, vec![]);
        e.owner_pid = pid;
        e.owner_start = start;
        let path = t.path().join("pod.json");
        let j = Journal::begin(&path, &e).expect("begin");
        assert!(recover(&NO_PROGRAMS, &path).await.expect("recover").owner_alive);
        assert!(staging.exists() && path.exists());
        drop(j);
        assert!(!path.exists(), "the journal goes with its guard");
    }

    #[tokio::test]
    async fn in_place_staging_keeps_the_directory_and_torn_journals_are_dropped() {
        let t = tempfile::tempdir().expect("tempdir");
        let dest = t.path().join("dest");
        std::fs::create_dir_all(dest.join("containers")).expect("mkdir");
        std::fs::write(dest.join("manifest.tmp"), b"x").expect("write");
        let mut e = entry(&dest, vec![t.path().join("no-such-cgroup")]);
        e.in_place = true;
        let path = t.path().join("pod.json");
        std::mem::forget(Journal::begin(&path, &e).expect("begin"));
        let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
        assert!(done.thawed.is_empty(), "a gone cgroup is skipped");
        assert!(dest.is_dir());
        assert_eq!(std::fs::read_dir(&dest).expect("list").count(), 0);
        std::fs::write(&path, b"{\"owner_pid\": 1").expect("torn");
        assert_eq!(
            recover(&NO_PROGRAMS, &path).await.expect("torn"),
            Recovered::default()
        );
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_dead_dumps_v1_and_v2_cgroups_are_thawed() {
        // Fixture cgroups in the kernel's formats: a v1 freezer that reports THAWED once
        // written, and a v2 cgroup whose cgroup.events already says frozen 0.
        let t = tempfile::tempdir().expect("tempdir");
        let v1 = t.path().join("freezer/kubepods/pod/c1");
        let v2 = t.path().join("unified/kubepods/pod/c2");
        std::fs::create_dir_all(&v1).expect("mkdir");
        std::fs::create_dir_all(&v2).expect("mkdir");
        std::fs::write(v1.join("freezer.state"), "FROZEN\n").expect("write");
        std::fs::write(v2.join("cgroup.freeze"), "1\n").expect("write");
        std::fs::write(v2.join("cgroup.events"), "populated 1\nfrozen 0\n").expect("write");
        let staging = t.path().join("staging");
        std::fs::create_dir(&staging).expect("mkdir");
        let path = t.path().join("pod.json");
        std::mem::forget(
            Journal::begin(&path, &entry(&staging, vec![v1.clone(), v2.clone()])).expect("begin"),
        );
        let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
        assert_eq!(done.thawed, [v1.clone(), v2.clone()]);
        assert_eq!(
            std::fs::read_to_string(v1.join("freezer.state")).expect("read"),
            "THAWED"
        );
        assert_eq!(
            std::fs::read_to_string(v2.join("cgroup.freeze")).expect("read"),
            "0"
        );
    }

    #[test]
    fn a_worker_inside_the_staging_output_is_killed_even_when_nothing_names_it() {
        let t = tempfile::tempdir().expect("tempdir");
        let staging = t.path().join(".web.tmp-1");
        let images = staging.join("containers/app/checkpoint");
        std::fs::create_dir_all(&images).expect("mkdir");
        let other = t.path().join(".web.tmp-10");
        std::fs::create_dir_all(&other).expect("mkdir");
        let spawn = |cwd: &Path| {
            std::process::Command::new("sleep")
                .arg("100")
                .current_dir(cwd)
                .spawn()
                .expect("sleep")
        };
        let (mut inside, mut beside) = (spawn(&images), spawn(&other));
        assert_eq!(kill_workers(&staging), 1, "only the one working inside");
        let status = inside.wait().expect("wait");
        assert!(!status.success(), "killed");
        assert!(
            beside.try_wait().expect("try_wait").is_none(),
            "a sibling's is left"
        );
        beside.kill().expect("kill");
        beside.wait().expect("wait");
    }

    #[test]
    fn start_times_identify_this_process() {
        let (pid, start) = this_process();
        assert_eq!(pid, std::process::id());
        assert!(start > 0);
    }
}
