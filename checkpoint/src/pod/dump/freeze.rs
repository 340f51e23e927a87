//! Phase 3, freeze and check: once every held CRIU waits, every running container's own cgroup
//! is frozen at once (CRIU cannot see a parent's freeze), then the frozen pod is checked (see
//! the checks module). From here until the thaw, a guard thaws whatever was frozen on every
//! way out.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use podsnap_runtime::cgroup::CgroupPaths;
use podsnap_runtime::host::Host;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::failpoint::hold as hold_point;
use crate::format::manifest::UnixLink;
use crate::pod::dump::checks::{
    adopted_processes, cgroup_procs, checked_unix_links, pod_ipc, AdoptedRoot, PodIpc,
};
use crate::pod::dump::hold::Held;
use crate::pod::dump::limits::check;
use crate::pod::shared::links::SocketOwners;
use crate::pod::target::Target;

/// The containers a dump froze: thawed on drop whatever happened (error, panic, a dropped
/// future), or explicitly by [`FreezeGuard::thaw_all`].
pub(super) struct FreezeGuard {
    host: Arc<dyn Host>,
    list: Vec<(String, CgroupPaths)>,
}

impl FreezeGuard {
    pub(super) fn new(host: Arc<dyn Host>) -> Self {
        Self {
            host,
            list: Vec::new(),
        }
    }

    /// Freezes `to_freeze` (containers of the dump into `dest`, whose cgroups are known) all
    /// at once. Each is listed before its freeze is tried, so one whose freeze fails or times
    /// out is thawed too. The first failure is returned once every freeze ended.
    pub(super) async fn freeze_all(
        &mut self,
        dest: &Path,
        to_freeze: &[(&Target, CgroupPaths)],
    ) -> Result<()> {
        for (t, cg) in to_freeze {
            self.list.push((t.entry.id.clone(), cg.clone()));
        }
        let freezes: Vec<_> = to_freeze
            .iter()
            .map(|(_, cg)| {
                let (cg, host) = (cg.clone(), self.host.clone());
                tokio::task::spawn_blocking(move || host.freeze(&cg))
            })
            .collect();
        let mut failed = None;
        for ((t, _), freeze) in to_freeze.iter().zip(freezes) {
            let result = freeze
                .await
                .map_err(|e| Error::io("freeze a container", &t.bundle, std::io::Error::other(e)))
                .and_then(|r| {
                    r.map_err(|e| Error::InvalidCheckpoint {
                        path: dest.to_path_buf(),
                        reason: format!("freeze container {}: {e}", t.entry.name),
                    })
                });
            if let Err(e) = result {
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// SIGKILLs every process of every frozen container (they die at the thaw, before running
    /// anything). Returns how many were signalled.
    pub(super) fn kill_all(&self) -> usize {
        let mut n = 0;
        for (id, cg) in &self.list {
            match self.host.kill_cgroup(cg) {
                Ok(k) => n += k,
                Err(e) => log::error!("container {id}: kill at the snapshot failed: {e}"),
            }
        }
        n
    }

    /// Freezes again every container it froze: CRIU thaws a cgroup it found frozen once it has
    /// seized its processes (they stay stopped under its ptrace), and a lazy dump's pod must
    /// stay frozen without CRIU: if CRIU dies, its processes must not run on.
    pub(super) async fn freeze_again(&self) -> Result<()> {
        let (host, list) = (self.host.clone(), self.list.clone());
        tokio::task::spawn_blocking(move || {
            for (id, cg) in &list {
                host.freeze(cg).map_err(|e| Error::Stopped {
                    reason: format!("container {id}: freeze it again after its dump: {e}"),
                })?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Stopped {
            reason: format!("freeze again: {e}"),
        })?
    }

    /// Leaves every container frozen for good (a live migration lost after its switch).
    pub(super) fn forget(&mut self) {
        for (id, _) in self.list.drain(..) {
            log::warn!("container {id} stays frozen");
        }
    }

    pub(super) fn thaw_all(&mut self) {
        for (id, cg) in self.list.drain(..) {
            if let Err(e) = self.host.thaw(&cg) {
                log::error!("container {id}: thaw after the dump failed: {e}");
            }
        }
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        if !self.list.is_empty() {
            log::warn!(
                "pod dump stopped half-way: thawing {} containers",
                self.list.len()
            );
            self.thaw_all();
        }
    }
}

/// What the checks of the frozen pod found, for the phases after.
pub(super) struct Checked {
    /// Processes the pause process adopted, by the root each is dumped from.
    pub(super) adopted: Vec<AdoptedRoot>,
    pub(super) ipc: Option<PodIpc>,
    pub(super) unix_links: Vec<UnixLink>,
    /// Which containers loopback connections link, read beside the dumps.
    pub(super) loopback: Option<JoinHandle<BTreeSet<String>>>,
    /// The pod's persistent volumes, with the files held open on them (and for those it
    /// carries, their archive).
    pub(super) persistent_volumes: Vec<crate::format::persistent::PersistentVolume>,
    /// The carried volumes to archive: (host directory, archive in the checkpoint).
    pub(super) carried: Vec<(std::path::PathBuf, String)>,
}

/// The pod frozen and checked.
pub(super) struct Frozen {
    pub(super) guard: FreezeGuard,
    /// When the first freeze was tried.
    pub(super) since: Instant,
    pub(super) checked: Checked,
    pub(super) held: Held,
}

impl Frozen {
    /// Undoes the dump after a failure: every runc ends, the pod is thawed, then the hold is
    /// undone (network unlocked, output and journal removed).
    pub(super) async fn unwind(self) {
        let Frozen { guard, mut held, .. } = self;
        // No runc may outlive the dump: the held ones give up, the others end.
        held.runs.abort().await;
        drop(guard);
        held.unwind().await;
    }
}

/// Freezes and checks the held pod `h`.
pub(super) async fn freeze(mut h: Held) -> Result<Frozen> {
    let mut guard = FreezeGuard::new(h.planned.host.clone());
    match freeze_and_check(&mut h, &mut guard).await {
        Ok((since, checked)) => Ok(Frozen {
            guard,
            since,
            checked,
            held: h,
        }),
        Err(e) => {
            h.runs.abort().await;
            drop(guard);
            h.unwind().await;
            Err(e)
        }
    }
}

async fn freeze_and_check(h: &mut Held, guard: &mut FreezeGuard) -> Result<(Instant, Checked)> {
    let (limit, deadline) = (h.planned.limit.clone(), h.planned.req.deadline);
    h.runs.wait_ready(&limit, deadline).await?;
    h.planned.report.phases.mark("criu waiting");
    let p = &h.planned;
    let to_freeze = to_freeze(&p.req.dest, &p.running)?;
    // Every container's freeze at once: the window opens with the first and the dumps start
    // once the last is frozen.
    let since = Instant::now();
    guard.freeze_all(&p.req.dest, &to_freeze).await?;
    h.planned.report.phases.mark("frozen");
    check(&limit, deadline, "while freezing the pod")?;
    hold_point("frozen").await;
    check(&limit, deadline, "while the pod was frozen")?;

    // What would not come back, and what the containers share, read once from the frozen
    // pod's processes.
    let p = &h.planned;
    let host = p.host.as_ref();
    let procs: Vec<(String, Vec<i32>)> = p
        .running
        .iter()
        .map(|t| (t.entry.name.clone(), cgroup_procs(host, t)))
        .collect();
    let mut persistent_volumes = crate::pod::dump::volumes::record(
        &p.running
            .iter()
            .zip(&procs)
            .map(|(t, (_, pids))| crate::pod::dump::volumes::ContainerAtDump {
                name: t.entry.name.clone(),
                mounts: podsnap_runtime::bundle::Bundle::new(&t.bundle)
                    .spec()
                    .map(|spec| crate::format::persistent::bind_mounts(&spec))
                    .unwrap_or_default(),
                pids: pids.clone(),
            })
            .collect::<Vec<_>>(),
        Path::new("/proc"),
    );
    let carried = super::carry::mark(&mut persistent_volumes, &p.carry);
    let adopted = adopted_processes(host, &p.req.targets, &p.running, &procs)?;
    let ipc = pod_ipc(host, &p.running, &procs)?;
    let owners = SocketOwners::read(&procs);
    let unix_links = checked_unix_links(&p.req, &procs, &owners, &h.runs.external_unix, &adopted).await?;
    h.planned.report.phases.mark("checked");
    // Which containers loopback connections link, read beside the dumps (the pod stays frozen
    // until they are done; the kernel's TCP tables take milliseconds to list).
    let loopback =
        tokio::task::spawn_blocking(move || crate::pod::shared::links::loopback_linked(&procs, &owners));
    Ok((
        since,
        Checked {
            adopted,
            ipc,
            unix_links,
            loopback: Some(loopback),
            persistent_volumes,
            carried,
        },
    ))
}

/// The running containers the dump freezes (one its owner paused stays as it is), each with
/// its cgroups. A container whose cgroups are unknown is refused before anything is frozen.
pub(super) fn to_freeze<'a>(dest: &Path, running: &'a [Target]) -> Result<Vec<(&'a Target, CgroupPaths)>> {
    running
        .iter()
        .filter(|t| t.is_frozen_by_dump())
        .map(|t| {
            let cg = t.cgroups.clone().ok_or_else(|| Error::InvalidCheckpoint {
                path: dest.to_path_buf(),
                reason: format!("container {}: its cgroups are unknown", t.entry.name),
            })?;
            Ok((t, cg))
        })
        .collect()
}
