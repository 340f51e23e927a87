//! Phase 6, resume: thaw every container (then the checkpoint is finished, see the finish
//! module), or, with `stop`, complete and commit the checkpoint while everything is still
//! frozen, kill every process of the pod, thaw it (the kills take effect) and leave its network
//! locked: nothing of the pod runs after its snapshot.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::failpoint::hold as hold_point;
use crate::format::manifest::{AdoptedProcess, UnixLink};
use crate::fs::private::sync_filesystem;
use crate::pod::dump::adopted::Captured;
use crate::pod::dump::capture::Shared;
use crate::pod::dump::dumps::Dumped;
use crate::pod::dump::finish::{close, write};
use crate::pod::dump::freeze::Frozen;
use crate::pod::dump::hold::Held;
use crate::pod::dump::journal::Phase;
use crate::pod::dump::DumpReport;

/// What the manifest records of the pod beyond its containers.
pub(super) struct Contents {
    pub(super) shared: Shared,
    /// Containers linked by TCP over loopback.
    pub(super) loopback_linked: Vec<String>,
    /// Unix connections between containers.
    pub(super) unix_links: Vec<UnixLink>,
    /// Processes the pause process adopted, dumped.
    pub(super) adopted: Vec<AdoptedProcess>,
    /// Volumes the checkpoint does not carry, with the files held open on them.
    pub(super) persistent_volumes: Vec<crate::format::persistent::PersistentVolume>,
}

/// The pod running again, its checkpoint still to finish.
pub(super) struct Thawed {
    pub(super) held: Held,
    pub(super) contents: Contents,
    /// First freeze to last thaw.
    pub(super) frozen_for: Duration,
}

fn open(c: Captured) -> (Frozen, Contents) {
    let Captured {
        dumped: Dumped {
            mut frozen, shared, ..
        },
        adopted,
        loopback_linked,
    } = c;
    let contents = Contents {
        shared,
        loopback_linked,
        unix_links: std::mem::take(&mut frozen.checked.unix_links),
        adopted,
        persistent_volumes: std::mem::take(&mut frozen.checked.persistent_volumes),
    };
    (frozen, contents)
}

/// Thaws the captured pod `c`. A failed thaw is logged; the others are still thawed.
pub(super) fn thaw(c: Captured) -> Thawed {
    let (frozen, contents) = open(c);
    let Frozen {
        mut guard,
        since,
        mut held,
        ..
    } = frozen;
    guard.thaw_all();
    let frozen_for = since.elapsed();
    held.planned.report.frozen = frozen_for;
    held.planned.report.phases.mark("thawed");
    Thawed {
        held,
        contents,
        frozen_for,
    }
}

/// Completes the checkpoint of a pod still frozen (what was dumped beside CRIU, then the
/// manifest and digests into the staging directory); its bytes.
async fn write_frozen(held: &mut Held, contents: Contents, since: std::time::Instant) -> Result<u64> {
    let recorded = held.beside.done().await?;
    let prehash = held.runs.prehash.take();
    let dir = held.staging.dir.clone();
    write(&held.planned, &dir, prehash, contents, recorded, since.elapsed()).await
}

/// Stops the captured pod `c` at its snapshot (`stop`): the checkpoint is written, synced and
/// committed first, then the pod is killed and thawed, its network left locked.
pub(super) async fn stop_at_snapshot(c: Captured) -> Result<DumpReport> {
    let (frozen, contents) = open(c);
    let Frozen {
        guard,
        since,
        mut held,
        ..
    } = frozen;
    let committed = async {
        // Complete the checkpoint first, then nothing of the pod may run again.
        let bytes = write_frozen(&mut held, contents, since).await?;
        // The pod is gone after this: its checkpoint must be on disk first.
        let dir = held.staging.dir.clone();
        let synced = dir.clone();
        tokio::task::spawn_blocking(move || sync_filesystem(&synced))
            .await
            .map_err(|e| Error::io("sync the checkpoint", &dir, std::io::Error::other(e)))??;
        // From here on a recovery keeps the checkpoint and kills the pod before its thaw.
        held.staging.commit(Phase::Stopping)?;
        hold_point("committed").await;
        Ok::<u64, Error>(bytes)
    }
    .await;
    let bytes = match committed {
        Ok(bytes) => bytes,
        Err(e) => {
            drop(guard);
            held.unwind().await;
            return Err(e);
        }
    };
    let mut guard = guard;
    held.planned.report.bytes = bytes;
    held.planned.report.killed = guard.kill_all();
    hold_point("killed").await;
    guard.thaw_all();
    held.planned.report.frozen = since.elapsed();
    hold_point("stopped").await;
    let Held {
        runs,
        configs,
        beside,
        netlock,
        staging,
        journal,
        planned,
    } = held;
    netlock.leave_locked();
    drop((runs, configs, beside));
    close(staging, journal, planned).await
}

/// A lazy dump (live migration): the checkpoint (all but the memory) is written and committed
/// while the pod stays frozen, and the pod is handed to the caller as it is: frozen, its
/// network locked, its memory served (see the serve module).
pub(super) async fn serve(c: Captured) -> Result<(DumpReport, crate::pod::dump::ServedPod)> {
    let (frozen, contents) = open(c);
    let Frozen {
        guard,
        since,
        mut held,
        ..
    } = frozen;
    let committed = async {
        guard.freeze_again().await?;
        let bytes = write_frozen(&mut held, contents, since).await?;
        held.staging.commit(Phase::Committed)?;
        hold_point("committed").await;
        Ok::<u64, Error>(bytes)
    }
    .await;
    let bytes = match committed {
        Ok(bytes) => bytes,
        Err(e) => {
            // CRIU first (it lets go of the processes untouched), then the thaw.
            held.runs.abort().await;
            drop(guard);
            held.unwind().await;
            return Err(e);
        }
    };
    held.planned.report.bytes = bytes;
    held.planned.report.frozen = since.elapsed();
    let Held {
        runs,
        configs,
        beside,
        netlock,
        staging,
        journal,
        planned,
    } = held;
    drop(beside);
    let served = crate::pod::dump::ServedPod {
        runs,
        guard,
        netlock: Some(netlock),
        _configs: configs,
        pod: planned.req.pod.sandbox_id.clone(),
        settled: false,
    };
    let report = close(staging, journal, planned).await?;
    Ok((report, served))
}
