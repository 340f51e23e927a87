//! Phase 2, hold and lock: the crash journal and the staging directory, each container's CRIU
//! configuration, runc and CRIU started while the pod runs (each CRIU held before it touches a
//! process), the early digests, the work beside the dump, and the pod's network lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::failpoint::hold as hold_point;
use crate::format::manifest::{CPUINFO, PART_NAMES};
use crate::fs::private::create_private_dir;
use crate::pod::dump::beside::Beside;
use crate::pod::dump::checks::planned_unix_ends;
use crate::pod::dump::criu_configs::CriuConfigs;
use crate::pod::dump::criu_runs::CriuRuns;
use crate::pod::dump::journal::{self, Journal};
use crate::pod::dump::limits::check;
use crate::pod::dump::plan::Planned;
use crate::pod::dump::staging::Staging;
use crate::pod::shared::netlock::NetLock;

/// A dump whose runc and CRIU runs wait for the freeze, the pod's network locked.
/// Fields drop in order: the runs, the configuration files, the work beside, the staging
/// output, then the journal that lists them.
pub(super) struct Held {
    pub(super) runs: CriuRuns,
    pub(super) configs: CriuConfigs,
    pub(super) beside: Beside,
    pub(super) netlock: NetLock,
    pub(super) staging: Staging,
    pub(super) journal: Arc<Journal>,
    pub(super) planned: Planned,
}

impl Held {
    /// Undoes the hold after a failure: the held CRIUs give up and every runc ends, the
    /// network is unlocked, then the configuration files, the staging output and the journal
    /// go.
    pub(super) async fn unwind(self) {
        let Held {
            mut runs,
            configs,
            beside,
            netlock,
            staging,
            journal,
            planned,
        } = self;
        runs.abort().await;
        netlock.release().await;
        drop(runs);
        drop(configs);
        drop(beside);
        drop(staging);
        drop(journal);
        drop(planned);
    }
}

/// Holds the planned dump `p`.
pub(super) async fn hold(mut p: Planned) -> Result<Held> {
    let (owner_pid, owner_start) = crate::fs::proc::this_process();
    // The mark of every program the dump starts (see the journal's module documentation).
    let mark = podsnap_runtime::launcher::new_mark()
        .map_err(|e| crate::error::Error::io("mark the dump's programs (getrandom)", "/dev/urandom", e))?;
    let entry = journal::Entry {
        owner_pid,
        owner_start,
        mark: mark.clone(),
        // The containers the dump freezes (a paused one stays as it is).
        frozen: p
            .running
            .iter()
            .filter(|t| t.is_frozen_by_dump())
            .filter_map(|t| {
                t.cgroups
                    .as_ref()
                    .and_then(|c| c.freezer())
                    .map(Path::to_path_buf)
            })
            .collect(),
        dest: p.req.dest.clone(),
        netns: p.req.netns.clone(),
        ..Default::default()
    };
    let journal = Arc::new(match &p.req.journal {
        Some(path) => Journal::begin(path, entry)?,
        None => Journal::none(),
    });
    // Every program the dump starts (runc, and the CRIU of an adopted process) is recorded as
    // it starts, and carries the dump's mark: a recovery kills those and nothing else.
    let recording = Arc::downgrade(&journal);
    p.limit.spawned = Some(
        podsnap_runtime::launcher::Spawned::new(move |pid| {
            if let Some(journal) = recording.upgrade() {
                journal.worker_started(pid);
            }
        })
        .marked(&mark),
    );
    // Dropped before the journal that lists it: the output goes first.
    let staging = Staging::new(&p.req.dest, journal.clone())?;
    p.report.phases.mark("journal");

    let dir = staging.dir.clone();
    for t in &p.req.targets {
        create_private_dir(&dir.join(t.entry.dir()))?;
    }
    // The CPU this pod runs on, so a restore elsewhere is checked before it starts (outside
    // the frozen window).
    let host_dir = dir
        .join(CPUINFO)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    create_private_dir(&host_dir)?;
    // One network lock for the whole pod, before the first freeze and until the last thaw,
    // whatever happens in between (the frozen phases thaw everything before they return).
    // Under it each container's CRIU skips its own (iptables in the pod's namespace when it
    // starts, per connection, and when it ends: all of it while frozen).
    let lock = p.req.netns.clone().filter(|_| p.req.lock_network);
    // Unix connections between containers, read while the pod runs: the CRIU of each end must
    // be told before it starts that the socket is external (its peer is another CRIU's).
    let planned = planned_unix_ends(&p.req, p.host.as_ref(), &p.running).await?;
    let (configs, holds, told) =
        CriuConfigs::write(&p.running, lock.is_some(), &planned, p.req.serve.is_some())?;
    if let Some(serve) = &p.req.serve {
        serve.check(&p.running, &holds)?;
    }
    // runc and CRIU start first, while the pod runs; each CRIU waits before it touches a
    // process, and no further than that until the pod is locked, frozen and checked.
    // Each container's page images are hashed as CRIU writes them (see the prehash module).
    let image_dirs: Vec<PathBuf> = p
        .running
        .iter()
        .map(|t| dir.join(t.entry.dir()).join(PART_NAMES.images))
        .collect();
    for d in &image_dirs {
        create_private_dir(d)?;
    }
    let prehash = p
        .req
        .early_digests
        .then(|| crate::pod::dump::prehash::Prehash::start(&image_dirs))
        .flatten();
    let mut runs = CriuRuns::start_held(
        &dir,
        &p.running,
        &p.limit,
        holds,
        lock.as_deref(),
        told,
        p.req.serve.as_ref(),
    );
    runs.journal = Some(journal.clone());
    runs.prehash = prehash;
    // What the checkpoint records of the node and of the pod's addresses, and `criu cpuinfo
    // dump`, run beside the freeze and the dumps; only the digests and the manifest need them.
    let runc = p
        .running
        .first()
        .or(p.req.targets.first())
        .map(|t| t.runc.binary().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("runc"));
    let beside = Beside::start(
        p.req.launcher.clone(),
        runc,
        p.req.netns.clone(),
        p.req.pod.sandbox_id.clone(),
        host_dir,
    );
    // The pod's network lock, taken when the dump may go on to the freeze.
    // A lock a dead dump left is removed while the CRIU runs start, so that only the lock
    // itself is between them and the freeze.
    let locked = async {
        let ready = async {
            if runs.any_in_netns() {
                runs.wait_ready(&p.limit, p.req.deadline).await?;
            }
            Ok(())
        };
        // (Not one of the dump's workers: a recovery has nothing to end in a query.)
        let query = podsnap_runtime::launcher::Limit {
            spawned: None,
            ..p.limit.clone()
        };
        let cleared = async {
            match lock.as_deref() {
                Some(ns) => {
                    crate::pod::shared::netlock::clear_stale(p.req.launcher.as_ref(), ns, &query).await
                }
                None => Ok(()),
            }
        };
        let (ready, cleared): (Result<()>, Result<()>) = tokio::join!(ready, cleared);
        ready?;
        cleared?;
        p.report.phases.mark("criu held");
        hold_point("before-freeze").await;
        check(&p.limit, p.req.deadline, "before the freeze")?;
        NetLock::take_cleared(p.req.launcher.clone(), lock.as_deref(), &p.limit).await
    };
    let netlock = match locked.await {
        Ok(netlock) => netlock,
        Err(e) => {
            runs.abort().await;
            return Err(e);
        }
    };
    p.report.phases.mark("network locked");
    Ok(Held {
        runs,
        configs,
        beside,
        netlock,
        staging,
        journal,
        planned: p,
    })
}
