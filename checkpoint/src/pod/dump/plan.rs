//! Phase 1, plan: the names are valid, which containers are dumped, the dump's limit, CRIU's
//! kernel feature cache, the volumes to carry, and whether the dump fits in the destination's free space. Nothing
//! has been started or written when it refuses.

use std::sync::Arc;
use std::time::Instant;

use podsnap_runtime::host::Host;
use podsnap_runtime::launcher::Limit;

use crate::error::{Error, Result};
use crate::format::manifest::validate_name;
use crate::pod::dump::{preflight, DumpReport, Phases, PodDump};
use crate::pod::target::{running, Target};

/// A dump that may go on.
pub(super) struct Planned {
    pub(super) req: PodDump,
    pub(super) host: Arc<dyn Host>,
    /// The containers whose processes are dumped (running or paused), in the pod's order.
    pub(super) running: Vec<Target>,
    /// The deadline and the caller's cancel; runc and CRIU are killed when either comes.
    pub(super) limit: Limit,
    /// What the report says so far (the phases' ends).
    pub(super) report: DumpReport,
    /// The persistent volumes carried in the checkpoint.
    pub(super) carry: Vec<super::carry::ToCarry>,
    pub(super) started: Instant,
}

/// Plans the dump `req` on `host`.
pub(super) async fn plan(req: PodDump, host: Arc<dyn Host>, phases: Phases) -> Result<Planned> {
    let started = Instant::now();
    let report = DumpReport {
        phases,
        ..Default::default()
    };
    for t in &req.targets {
        validate_name(&t.entry.name).map_err(|reason| Error::InvalidCheckpoint {
            path: req.dest.clone(),
            reason,
        })?;
    }
    let limit = Limit::after(req.deadline, req.cancel.clone());
    let running: Vec<Target> = running(&req.targets).into_iter().cloned().collect();
    // Each container's CRIU finds the kernel's features in the cache, not by probing.
    crate::criu::kdat::ensure_logged(&*req.launcher).await;
    let carry = {
        let (dest, running, carry, max) = (
            req.dest.clone(),
            running.clone(),
            req.carry.clone(),
            req.carry_max_bytes,
        );
        tokio::task::spawn_blocking(move || super::carry::choose(&dest, &running, &carry, max))
            .await
            .map_err(|e| Error::io("size the volumes to carry", &req.dest, std::io::Error::other(e)))??
    };
    let carried_bytes = carry.iter().map(|c| c.bytes).sum();
    preflight::check(
        host.clone(),
        &req.dest,
        &req.targets,
        &running,
        carried_bytes,
        req.reserve_bytes,
    )
    .await?;
    report.phases.mark("preflight");
    Ok(Planned {
        req,
        host,
        running,
        limit,
        report,
        carry,
        started,
    })
}
