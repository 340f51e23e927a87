//! The pod dump's crash journal: before a pod dump freezes anything it writes down what it is
//! about to freeze and where its staging output is, and it removes the note only once every
//! container is thawed (or killed, with `stop`) and the output committed or removed. If the
//! process running the dump dies (a shim killed mid-dump), whoever comes next for that pod
//! (containerd's cleanup of a dead shim, `containerd-shim-podsnap-v1 delete`, or the pod's next
//! shim) calls [`recover`], which does what the dump's [`Phase`] says is left to do:
//!
//! - `dumping`: undo it. Kill the dump's workers, thaw what the note lists, unlock the pod's
//!   network, remove the staging output.
//! - `committed` (the checkpoint is complete and the pod thawed): finish it. Kill the workers,
//!   move the checkpoint into place if the move had not happened yet, thaw, unlock.
//! - `stopping` (`stop`: the checkpoint is complete and synced, the pod frozen and to be killed
//!   at its snapshot): finish the stop. Kill the workers, move the checkpoint into place, kill
//!   every process of the listed cgroups while they are frozen, then thaw (they die before
//!   running anything); the network stays locked, as the dump leaves it.
//!
//! A committed checkpoint is never removed, in place or not. The dump's workers (runc, and the
//! CRIU each runc started) are known exactly: each program the dump starts is recorded with
//! its start time as it starts, and each CRIU once it waits to be let go; and each carries a
//! random mark of the dump in its environment, which runc hands on to CRIU and CRIU to its
//! scripts, so that one started in the instant before the shim died is found too. Nothing else
//! is killed, whatever its command line or working directory.
//!
//! ```text
//! /run/podsnap/dumps/<sandbox-id>.json   0600, written atomically (temporary file, rename);
//!                                        synced, but for the list of workers (see
//!                                        `Journal::update_workers`)
//!   { "owner_pid", "owner_start", "frozen": [cgroup dirs: v1 freezer cgroups, or v2 cgroups,
//!     told apart by freezer.state / cgroup.freeze], "staging", "in_place", "dest",
//!     "netns", "phase": "dumping" | "committed" | "stopping",
//!     "workers": [{ "pid", "start" }], "mark" }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fs::proc::{alive, start_time};
use crate::fs::remove::remove_contents;

/// Where pod dumps keep their journals.
pub const JOURNAL_DIR: &str = "/run/podsnap/dumps";
/// The largest journal read back.
const MAX_JOURNAL_BYTES: u64 = 1024 * 1024;
/// The most workers a journal records (a dump starts a runc and a CRIU per container).
const MAX_WORKERS: usize = 4096;

/// The journal of pod `sandbox_id`.
pub fn journal_path(sandbox_id: &str) -> PathBuf {
    Path::new(JOURNAL_DIR).join(format!("{sandbox_id}.json"))
}

/// How far a dump got, as far as its recovery is concerned (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Nothing is committed: a recovery undoes the dump.
    #[default]
    Dumping,
    /// The checkpoint is complete and the pod thawed: a recovery keeps the checkpoint.
    Committed,
    /// `stop`: the checkpoint is complete and synced; the pod, frozen, is to be killed at the
    /// snapshot: a recovery keeps the checkpoint and kills the pod before it thaws.
    Stopping,
}

/// A process the dump started (runc, CRIU), and its start time (a reused pid is not it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub pid: u32,
    pub start: u64,
}

/// What a dump in progress may leave behind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// How far the dump got.
    #[serde(default)]
    pub phase: Phase,
    /// The processes the dump started, as they started.
    #[serde(default)]
    pub workers: Vec<Worker>,
    /// The random mark in the environment of every program the dump starts and of what they
    /// start (`podsnap_runtime::launcher::MARK_ENV`): a worker started just before its shim
    /// died, not yet in `workers`, is found by it.
    #[serde(default)]
    pub mark: String,
}

/// A journal written for a dump in progress; removed when dropped (after the dump's own
/// cleanup has run).
#[derive(Debug, Default)]
pub struct Journal {
    path: Option<PathBuf>,
    entry: Mutex<Entry>,
}

impl Journal {
    /// No journal (a dump whose caller keeps none).
    pub fn none() -> Self {
        Self::default()
    }

    /// Writes `entry` at `path`, durably, before anything is frozen.
    pub fn begin(path: &Path, entry: Entry) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        crate::fs::private::create_private_dir(dir)?;
        write(path, &entry)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            entry: Mutex::new(entry),
        })
    }

    /// Changes the entry with `change` and writes it (e.g. once the staging directory is
    /// known, or at a new phase).
    pub fn update(&self, change: impl FnOnce(&mut Entry)) -> Result<()> {
        let mut entry = self.entry.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut entry);
        match &self.path {
            Some(path) => write(path, &entry),
            None => Ok(()),
        }
    }

    /// [`Journal::update`] for the list of workers: replaced atomically but not synced. The
    /// list serves a recovery after the shim died, which the page cache outlives; after a
    /// power loss no worker runs. (Synced, the four or five records of a dump's start cost
    /// as many disk flushes on the way to the freeze.)
    fn update_workers(&self, change: impl FnOnce(&mut Entry) -> bool) -> Result<()> {
        let mut entry = self.entry.lock().unwrap_or_else(|e| e.into_inner());
        match &self.path {
            Some(path) if change(&mut entry) => write_unsynced(path, &entry),
            _ => Ok(()),
        }
    }

    /// The phase written last.
    pub fn phase(&self) -> Phase {
        self.entry.lock().unwrap_or_else(|e| e.into_inner()).phase
    }

    /// Records the process `pid` the dump just started (a failure to is logged: the recovery
    /// then cannot end that one).
    pub fn worker_started(&self, pid: i32) {
        crate::failpoint::hold_blocking("worker-started");
        let Some(start) = u32::try_from(pid).ok().and_then(start_time) else {
            return; // gone already
        };
        let recorded = self.update_workers(|e| {
            let room = e.workers.len() < MAX_WORKERS;
            if room {
                e.workers.push(Worker {
                    pid: pid as u32,
                    start,
                });
            }
            room
        });
        if let Err(e) = recorded {
            log::warn!("the dump journal does not list its worker {pid}: {e}");
        }
    }

    /// Records every process descending from a recorded worker that is not recorded yet (the
    /// CRIU each runc started: one whose runc dies first is no longer found through it).
    pub fn record_descendants(&self) {
        let recorded = self.update_workers(|e| {
            let mut found = Vec::new();
            for w in e.workers.iter().filter(|w| alive(w.pid, w.start)) {
                for pid in podsnap_runtime::cgroup::process_tree(w.pid as i32)
                    .into_iter()
                    .skip(1)
                {
                    let pid = pid as u32;
                    if e.workers.iter().chain(&found).any(|k: &Worker| k.pid == pid) {
                        continue;
                    }
                    if let Some(start) = start_time(pid) {
                        found.push(Worker { pid, start });
                    }
                }
            }
            let room = MAX_WORKERS.saturating_sub(e.workers.len());
            let before = e.workers.len();
            e.workers.extend(found.into_iter().take(room));
            e.workers.len() > before
        });
        if let Err(e) = recorded {
            log::warn!("the dump journal does not list the CRIU runs: {e}");
        }
    }
}

/// Writes a journal entry durably and atomically.
fn write(path: &Path, entry: &Entry) -> Result<()> {
    let json =
        serde_json::to_vec_pretty(entry).map_err(|e| Error::io("encode the dump journal", path, e.into()))?;
    crate::fs::private::write_synced(path, &json)
}

/// Writes a journal entry atomically, without waiting for the disk.
fn write_unsynced(path: &Path, entry: &Entry) -> Result<()> {
    let json =
        serde_json::to_vec_pretty(entry).map_err(|e| Error::io("encode the dump journal", path, e.into()))?;
    crate::fs::private::replace_private(path, &json, "write the dump journal")
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

/// What [`recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Freezer cgroups thawed.
    pub thawed: Vec<PathBuf>,
    /// The staging output removed.
    pub removed: Option<PathBuf>,
    /// The committed checkpoint kept (and moved into place, if the dump had not yet).
    pub kept: Option<PathBuf>,
    /// Processes of the pod killed at the snapshot (a dump with `stop` that had committed).
    pub stopped: usize,
    /// The dump's owner is still alive: nothing was touched.
    pub owner_alive: bool,
    /// Processes of the dead dump (runc, CRIU) that were still running, killed.
    pub killed: usize,
}

/// Kills each of `workers` that still runs (the same pid with the same start time), with every
/// process descending from it. Returns how many were found running.
fn kill_workers(workers: &[Worker]) -> usize {
    let running: Vec<&Worker> = workers.iter().filter(|w| alive(w.pid, w.start)).collect();
    for w in &running {
        log::warn!("killing pid {} of a dead pod dump", w.pid);
        podsnap_runtime::launcher::kill_tree(w.pid as i32);
    }
    running.len()
}

/// Kills the dead dump's workers: those carrying its mark (every program it started, even
/// one started in the instant before its shim died, and what they started), then the recorded
/// ones still running (a journal written before marks). Returns how many were found.
fn kill_dump_workers(entry: &Entry) -> usize {
    let marked = podsnap_runtime::launcher::kill_marked(&entry.mark);
    marked + kill_workers(&entry.workers)
}

/// Finishes the commit of a dead dump's complete checkpoint: moves the staging directory into
/// place if it is still there. Checks that the checkpoint holds every file its manifest lists
/// (the digests were taken by the dump; `podsnap inspect` checks them).
fn finish_commit(entry: &Entry) -> std::result::Result<(), String> {
    let moved = entry.in_place || !entry.staging.exists();
    let at = if moved { &entry.dest } else { &entry.staging };
    crate::format::manifest::Manifest::load_listed(at).map_err(|e| e.to_string())?;
    if moved {
        return Ok(());
    }
    if entry.dest.exists() {
        return Err(format!(
            "{} exists: the checkpoint stays at {}",
            entry.dest.display(),
            entry.staging.display()
        ));
    }
    std::fs::rename(&entry.staging, &entry.dest)
        .and_then(|()| std::fs::File::open(entry.dest.parent().unwrap_or(Path::new("/")))?.sync_all())
        .map_err(|e| format!("move {} into place: {e}", entry.staging.display()))
}

/// Finishes or undoes what a dead dump left, by its phase (see the module documentation), then
/// removes the journal. A journal whose owner still runs is left alone. No journal: nothing
/// to do.
pub async fn recover(launcher: &dyn podsnap_runtime::launcher::Launcher, path: &Path) -> Result<Recovered> {
    recover_on(&podsnap_runtime::host::LinuxHost, launcher, path).await
}

/// [`recover`], thawing and killing through `host`.
pub async fn recover_on(
    host: &dyn podsnap_runtime::host::Host,
    launcher: &dyn podsnap_runtime::launcher::Launcher,
    path: &Path,
) -> Result<Recovered> {
    let bytes = match crate::fs::read::read_capped(path, MAX_JOURNAL_BYTES) {
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
    // runc and CRIU outlive a killed shim: end whatever still works for the dead dump, with
    // everything it started.
    let mut done = Recovered {
        killed: kill_dump_workers(&entry),
        ..Default::default()
    };
    let mut phase = entry.phase;
    if phase != Phase::Dumping {
        match finish_commit(&entry) {
            Ok(()) => done.kept = Some(entry.dest.clone()),
            Err(e) => {
                // Not a checkpoint to stop the pod for; kept all the same (it was complete).
                log::error!(
                    "the committed checkpoint of a dead pod dump is not whole: {e}; the pod is thawed, nothing is removed"
                );
                phase = Phase::Committed;
            }
        }
    }
    if phase == Phase::Stopping {
        for dir in entry.frozen.iter().filter(|d| host.can_freeze(d)) {
            match host.kill_dir(dir) {
                Ok(n) => done.stopped += n,
                Err(e) => log::error!("kill {} at the snapshot after a dead dump: {e}", dir.display()),
            }
        }
    }
    for dir in &entry.frozen {
        if !host.can_freeze(dir) {
            continue; // the cgroup is gone with its container
        }
        match host.set_freezer_state(dir, false) {
            Ok(()) => done.thawed.push(dir.clone()),
            Err(e) => log::error!("thaw {} after a dead dump: {e}", dir.display()),
        }
    }
    if let Some(ns) = entry.netns.as_ref().filter(|_| phase != Phase::Stopping) {
        crate::pod::shared::netlock::unlock(launcher, ns).await;
    }
    if phase == Phase::Dumping && !entry.staging.as_os_str().is_empty() && entry.staging.exists() {
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
        "a pod dump died half-way ({phase:?}): killed {} of its processes, kept {:?}, stopped {} processes of the pod, thawed {:?}, removed {:?}",
        done.killed,
        done.kept,
        done.stopped,
        done.thawed,
        done.removed
    );
    Ok(done)
}

#[cfg(test)]
mod tests;
