//! The runc checkpoints of a pod's running containers: started before the freeze and held at
//! CRIU's start where the container's CRIU reads podsnap's configuration file, let go once the
//! pod is frozen and checked; under the pod's network lock, run in the pod's network namespace
//! (see [`in_pod_netns`]).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podsnap_runtime::launcher::Limit;

use crate::criu::container::{self, Dump, DumpOptions};
use crate::criu::hold::{Hold, ReadyWatch};
use crate::error::{Error, Result};
use crate::format::manifest::PART_NAMES;
use crate::pod::dump::criu_configs::ToldEnds;
use crate::pod::dump::journal::Journal;
use crate::pod::dump::limits::check;
use crate::pod::target::Target;

/// The runc checkpoints of the running containers, one place per container: started before
/// the freeze and held at CRIU's start when the container has podsnap's CRIU configuration
/// file ([`crate::criu::hold`]), otherwise started once the pod is frozen.
pub(super) struct CriuRuns {
    slots: Vec<DumpSlot>,
    /// What the containers' CRIU runs were told of unix connections between containers.
    pub(super) external_unix: ToldEnds,
    /// Their page images hashed as CRIU writes them.
    pub(super) prehash: Option<crate::pod::dump::prehash::Prehash>,
    /// The dump's crash journal, told of each held CRIU once it waits.
    pub(super) journal: Option<Arc<Journal>>,
    /// A lazy dump (see [`crate::pod::dump::serve`]): its runc and CRIU runs outlive the
    /// dump's deadline and its caller; they are killed when this turns `true`.
    serve_cancel: Option<tokio::sync::watch::Sender<bool>>,
}

struct DumpSlot {
    hold: Option<Hold>,
    /// Its runc and CRIU run in the pod's network namespace.
    in_netns: bool,
    /// Ends with the moment runc ended.
    task: Option<tokio::task::JoinHandle<Result<Instant>>>,
}

impl CriuRuns {
    /// Starts the runc checkpoint of every container of `running` with a hold. `locked_netns`:
    /// the pod's network namespace, when podsnap locks it and every held CRIU was told to skip
    /// its own lock (see [`in_pod_netns`]).
    pub(super) fn start_held(
        dir: &Path,
        running: &[Target],
        limit: &Limit,
        holds: Vec<Option<Hold>>,
        locked_netns: Option<&Path>,
        told: ToldEnds,
        serve: Option<&crate::pod::dump::serve::Serve>,
    ) -> CriuRuns {
        // A lazy dump's runs serve the memory after the dump: not bound by its deadline or
        // its caller, killed only when the served pod is settled (or the dump fails).
        let (serve_cancel, serve_limit) = match serve {
            Some(_) => {
                let (tx, rx) = tokio::sync::watch::channel(false);
                let limit = Limit {
                    deadline: None,
                    cancel: Some(rx),
                    spawned: limit.spawned.clone(),
                };
                (Some(tx), limit)
            }
            None => (None, limit.clone()),
        };
        let limit = &serve_limit;
        let slots = running
            .iter()
            .zip(holds)
            .map(|(t, hold)| {
                let netns = locked_netns
                    .filter(|ns| hold.is_some() && in_pod_netns(t, ns))
                    .map(Path::to_path_buf);
                let in_netns = netns.is_some();
                let mounts = ExternalMounts {
                    masked: told.masked.contains(&t.entry.name),
                    cgroup_tmpfs: told.cgroup_tmpfs.get(&t.entry.name).cloned().unwrap_or_default(),
                };
                let socket = serve.and_then(|s| s.socket(&t.entry.name));
                let task = hold
                    .as_ref()
                    .map(|h| spawn_dump(dir, t, limit, Some(h.keep_open()), netns, mounts, socket));
                DumpSlot { hold, in_netns, task }
            })
            .collect();
        CriuRuns {
            slots,
            external_unix: told,
            prehash: None,
            journal: None,
            serve_cancel,
        }
    }

    /// A lazy dump: waits until every CRIU has written its images and serves the memory (its
    /// hold script saw `status-ready`); when each was seen. A runc that ends before is a failed
    /// dump: its error.
    pub(super) async fn wait_served(&mut self, limit: &Limit, deadline: Duration) -> Result<Vec<Instant>> {
        let watch = ReadyWatch::new(self.slots.iter().filter_map(|s| s.hold.as_ref()));
        let mut served: Vec<Option<Instant>> = vec![None; self.slots.len()];
        loop {
            for (slot, at) in self.slots.iter_mut().zip(served.iter_mut()) {
                if at.is_none() && slot.hold.as_ref().is_some_and(Hold::served) {
                    *at = Some(Instant::now());
                }
                if let Some(ended) = slot.task.take_if(|t| t.is_finished()) {
                    check(limit, deadline, "while the containers were dumped")?;
                    return Err(joined_dump(ended.await).err().unwrap_or_else(|| Error::Stopped {
                        reason: "a lazy dump's runc ended before its page server was done".into(),
                    }));
                }
            }
            if served.iter().all(Option::is_some) {
                return Ok(served.into_iter().flatten().collect());
            }
            check(limit, deadline, "while the containers were dumped")?;
            match &watch {
                Some(watch) => watch.wait(Duration::from_millis(10)).await,
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// Kills a lazy dump's runc and CRIU runs now (they end in the background).
    pub(super) fn cancel_served(&self) {
        if let Some(cancel) = &self.serve_cancel {
            let _ = cancel.send(true);
        }
    }

    /// Whether a CRIU runs in the pod's network namespace: it probes the kernel there as it
    /// starts when it finds no kernel feature cache it can use (CRIU's own, or podsnap's, see
    /// [`crate::criu::kdat`]), its TCP repair probe included, a connection on the loopback that
    /// the pod's network lock would hold until the dump's deadline. The lock then waits until
    /// every CRIU is waiting.
    pub(super) fn any_in_netns(&self) -> bool {
        self.slots.iter().any(|s| s.in_netns)
    }

    /// Waits until every held CRIU is waiting. A runc that ends before is a failed dump (its
    /// CRIU cannot have dumped anything): its error.
    pub(super) async fn wait_ready(&mut self, limit: &Limit, deadline: Duration) -> Result<()> {
        // Woken by each script's `ready` file; runc ending early and the limit are looked at
        // at least every 10 ms (no notification of either here).
        let watch = ReadyWatch::new(self.slots.iter().filter_map(|s| s.hold.as_ref()));
        loop {
            for slot in &mut self.slots {
                if let Some(ended) = slot.task.take_if(|t| t.is_finished()) {
                    // Past the deadline or once the caller gave up, runc was killed for it:
                    // that is the failure.
                    check(limit, deadline, "while runc and CRIU started")?;
                    return Err(joined_dump(ended.await).err().unwrap_or_else(|| Error::Stopped {
                        reason: "CRIU ended before the pod was frozen".into(),
                    }));
                }
            }
            if self.slots.iter().all(|s| s.hold.as_ref().is_none_or(Hold::ready)) {
                // Each held CRIU runs now (a child of its runc): recorded, so that a recovery
                // finds it even if its runc dies first.
                if let Some(journal) = &self.journal {
                    journal.record_descendants();
                }
                return Ok(());
            }
            check(limit, deadline, "while runc and CRIU started")?;
            match &watch {
                Some(watch) => watch.wait(Duration::from_millis(10)).await,
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// Lets every held CRIU go on.
    pub(super) fn release(&mut self) {
        for hold in self.slots.iter_mut().filter_map(|s| s.hold.as_mut()) {
            hold.release();
        }
    }

    /// Starts the runc checkpoints not started yet.
    pub(super) fn start_rest(&mut self, dir: &Path, running: &[Target], limit: &Limit) {
        for (slot, t) in self.slots.iter_mut().zip(running) {
            if slot.task.is_none() {
                let told = &self.external_unix;
                let mounts = ExternalMounts {
                    masked: told.masked.contains(&t.entry.name),
                    cgroup_tmpfs: told.cgroup_tmpfs.get(&t.entry.name).cloned().unwrap_or_default(),
                };
                slot.task = Some(spawn_dump(dir, t, limit, None, None, mounts, None));
            }
        }
    }

    /// Waits for every runc; when each ended, or why it failed (in `running`'s order).
    pub(super) async fn wait(&mut self) -> Vec<Result<Instant>> {
        let mut out = Vec::new();
        for slot in &mut self.slots {
            out.push(match slot.task.take() {
                Some(task) => joined_dump(task.await),
                None => Err(Error::Stopped {
                    reason: "a container's dump was never started".into(),
                }),
            });
            if let Some(hold) = slot.hold.take() {
                hold.remove();
            }
        }
        out
    }

    /// Makes the held CRIUs give up and waits for every runc started.
    pub(super) async fn abort(&mut self) {
        for hold in self.slots.iter_mut().filter_map(|s| s.hold.as_mut()) {
            hold.abort();
        }
        // A lazy dump's CRIU past its hold serves until killed.
        self.cancel_served();
        for (i, ended) in self.wait().await.into_iter().enumerate() {
            if let Err(e) = ended {
                log::debug!("pod dump stopped: dump {i}: {e}");
            }
        }
    }
}

fn joined_dump(joined: std::result::Result<Result<Instant>, tokio::task::JoinError>) -> Result<Instant> {
    joined.map_err(|e| Error::io("dump task", "pod", std::io::Error::other(e)))?
}

/// CRIU's cgroups mode for the dump of `t`, chosen before its CRIU starts: `ignore` when its
/// runc offers it (1.2 and later), every process of the container sits in the container's own
/// cgroup (no cgroup below it in any hierarchy) and the container has no cgroup namespace of
/// its own. CRIU then skips walking and recording the container's cgroups while the pod is
/// frozen, and its restore leaves the processes where runc puts them: in the container's new
/// cgroup, which runc makes from the spec (as it does in every mode). Otherwise runc's default
/// (soft), which records and restores cgroups below the container's, and the container's cgroup
/// namespace: CRIU restores that only when it manages cgroups (with `ignore` a container with
/// its own, as CRI makes them on cgroup v2, came back in the host's). A runc that cannot say its
/// release gets the default.
async fn cgroups_mode(t: &Target) -> String {
    let features = match t.runc.features().await {
        Ok(f) => f,
        Err(e) => {
            log::warn!(
                "container {}: runc's features are unknown ({e}): CRIU's default cgroups mode",
                t.entry.id
            );
            return String::new();
        }
    };
    if !features.cgroups_mode_ignore() {
        return String::new();
    }
    let Some(cgroups) = &t.cgroups else {
        return String::new();
    };
    let namespace = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).ok();
    let own_namespace = match t.pid {
        Some(pid) => namespace(&pid.to_string()) != namespace("self"),
        None => true,
    };
    if own_namespace {
        log::info!(
            "container {}: it has a cgroup namespace of its own: CRIU records it (default cgroups mode)",
            t.entry.id
        );
        return String::new();
    }
    let nested = cgroups
        .dirs()
        .into_iter()
        .find(|d| podsnap_runtime::cgroup::tree(d).len() > 1);
    match nested {
        Some(dir) => {
            log::info!(
                "container {}: {} holds cgroups of its own: CRIU records them (default cgroups mode)",
                t.entry.id,
                dir.display()
            );
            String::new()
        }
        None => "ignore".to_owned(),
    }
}

/// What a container's CRIU was told are external mounts (see [`crate::pod::dump::criu_configs`]).
struct ExternalMounts {
    masked: bool,
    cgroup_tmpfs: Vec<crate::criu::container::CgroupTmpfsEntry>,
}

/// Whether the processes of `t` are in the pod's network namespace at `netns`: then its CRIU can
/// run there and take the namespace as its own. A CRIU in another network namespace than the
/// dumped processes' walks theirs while the pod is frozen, for every container of the pod
/// alike: the links, and the conntrack and expectation tables through netlink (a walk of the
/// host's whole conntrack hash table, 11 ms of kernel time here for an empty table of 262144
/// buckets), in a process forked for it, and runs its network-lock and network-unlock scripts
/// (a round trip to runc and to podsnap's hold script each). Neither is needed under the pod's
/// lock: nothing of the pod's network is restored from the images (a restore runs in a new
/// pod's namespace), and podsnap's lock keeps every connection still.
fn in_pod_netns(t: &Target, netns: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(pid) = t.pid else {
        return false;
    };
    let ino = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let theirs = ino(Path::new(&format!("/proc/{pid}/ns/net")));
    theirs.is_some() && theirs == ino(netns)
}

/// Starts `runc checkpoint` of `t` into its place under `dir`; `hold` is kept open until runc
/// ends (its CRIU waits on it). With `netns` (the pod's, which podsnap locks and `t`'s
/// processes are in) runc and CRIU run in it. `mounts`: what its CRIU was told are external
/// mounts (its masked directories, its `/sys/fs/cgroup` tmpfs).
fn spawn_dump(
    dir: &Path,
    t: &Target,
    limit: &Limit,
    hold: Option<Arc<std::fs::File>>,
    netns: Option<std::path::PathBuf>,
    mounts: ExternalMounts,
    serve: Option<Arc<std::os::fd::OwnedFd>>,
) -> tokio::task::JoinHandle<Result<Instant>> {
    let t = t.clone();
    let image_dir = dir.join(t.entry.dir()).join(PART_NAMES.images);
    let limit = limit.clone();
    tokio::spawn(async move {
        let began = Instant::now();
        let cgroups_mode = cgroups_mode(&t).await;
        let dump = Dump {
            id: t.entry.id.clone(),
            image_dir,
            work_dir: None,
            options: DumpOptions {
                tcp_established: true,
                file_locks: true,
                cgroups_mode,
                criu_in_netns: netns.is_some(),
                masked_tmpfs_external: mounts.masked,
                cgroup_tmpfs: mounts.cgroup_tmpfs,
                lazy_pages: serve.is_some(),
                ..Default::default()
            },
            leave_running: true,
            cgroups: None,
            was_paused: true,
            limit,
            netns,
            serve,
        };
        let result = container::dump(&t.runc, &dump).await;
        drop(hold);
        log::info!(
            "container {} ({}): runc checkpoint took {} ms{}",
            t.entry.name,
            t.entry.id,
            began.elapsed().as_millis(),
            if result.is_ok() { "" } else { ", failed" }
        );
        result.map_err(|e| match e {
            Error::Dump { source, log_tail, .. } => Error::Dump {
                id: format!("{} ({})", t.entry.name, t.entry.id),
                source,
                log_tail,
            },
            other => other,
        })?;
        Ok(Instant::now())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs whose one runc already ended with `error`.
    async fn ended(error: &str) -> CriuRuns {
        let reason = error.to_owned();
        let task = tokio::spawn(async move { Err(Error::Stopped { reason }) });
        while !task.is_finished() {
            tokio::task::yield_now().await;
        }
        CriuRuns {
            slots: vec![DumpSlot {
                hold: None,
                in_netns: false,
                task: Some(task),
            }],
            external_unix: ToldEnds::default(),
            prehash: None,
            journal: None,
            serve_cancel: None,
        }
    }

    #[tokio::test]
    async fn a_runc_that_ends_before_its_criu_is_ready_fails_the_dump_with_its_error() {
        let limit = Limit::after(Duration::from_secs(60), None);
        let err = ended("runc said no")
            .await
            .wait_ready(&limit, Duration::from_secs(60))
            .await
            .expect_err("failed")
            .to_string();
        assert!(err.contains("runc said no"), "{err}");
    }

    #[tokio::test]
    async fn a_runc_killed_at_the_deadline_fails_the_dump_with_the_deadline() {
        let limit = Limit::after(Duration::ZERO, None);
        let err = ended("runc checkpoint failed: the deadline passed")
            .await
            .wait_ready(&limit, Duration::from_secs(3))
            .await
            .expect_err("stopped")
            .to_string();
        assert!(
            err.contains("the dump deadline of 3 s passed while runc and CRIU started"),
            "{err}"
        );
    }
}
