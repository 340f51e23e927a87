//! A lazy pod dump for a live migration (`PodDump::serve`): each running container's CRIU dumps
//! everything but the anonymous memory, then its page server hands that memory out on a
//! connected socket the caller gave (CRIU's `ps-socket`), page by page, to the target's
//! lazy-pages daemon at the other end, until it has every page. The dump returns once every
//! image is written and every page server is ready (CRIU's `status-ready`), with the pod still
//! frozen and its network locked: [`ServedPod`] holds it so until the caller settles it.
//!
//! - [`ServedPod::release`]: every page went (each runc ended: its CRIU's page server was told
//!   by the daemon it has everything); the pod's processes are killed while frozen, then
//!   thawed (the kills take effect), the network stays locked. The pod is stopped at its
//!   snapshot, as `--stop` leaves it.
//! - [`ServedPod::abort`] (before the target runs the pod): runc and CRIU are killed, which
//!   detaches CRIU from the processes without touching them; then the pod is thawed and its
//!   network unlocked. It runs on as it was.
//! - [`ServedPod::abandon`] (after the target runs the pod, its page stream lost): runc and
//!   CRIU are killed, and the pod stays frozen and locked: running it here could make it run
//!   on both nodes, and the target's copy may still be alive. The operator decides.
//!
//! CRIU's own end of a page stream must never see an end of file: its page server takes one
//! between two requests as the daemon's normal end and would report success. The caller keeps
//! its end of each socket open until it settles the pod.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use crate::criu::hold::Hold;
use crate::error::{Error, Result};
use crate::pod::dump::criu_configs::CriuConfigs;
use crate::pod::dump::criu_runs::CriuRuns;
use crate::pod::dump::freeze::FreezeGuard;
use crate::pod::shared::netlock::NetLock;
use crate::pod::target::Target;

/// What a lazy dump serves on: each running container's CRIU page server socket.
#[derive(Clone, Default)]
pub struct Serve {
    /// Container name -> the connected socket its CRIU's page server uses.
    pub sockets: HashMap<String, Arc<OwnedFd>>,
}

impl std::fmt::Debug for Serve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve")
            .field("containers", &self.sockets.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Serve {
    /// The socket of container `name`.
    pub(super) fn socket(&self, name: &str) -> Option<Arc<OwnedFd>> {
        self.sockets.get(name).cloned()
    }

    /// A lazy dump needs, for every running container: a socket, a CRIU held by podsnap (its
    /// configuration file names the socket and tells when it serves), and a freeze by the dump
    /// (a container its owner paused is not one podsnap may hold and stop).
    pub(super) fn check(&self, running: &[Target], holds: &[Option<Hold>]) -> Result<()> {
        for (t, hold) in running.iter().zip(holds) {
            let refuse = |why: &str| {
                Err(Error::Stopped {
                    reason: format!("container {}: {why}: it cannot be migrated live", t.entry.name),
                })
            };
            if self.socket(&t.entry.name).is_none() {
                return refuse("no page stream was set up for it");
            }
            if hold.is_none() {
                return refuse(
                    "its CRIU cannot be held by podsnap (its bundle is not podsnap's, or on a noexec mount)",
                );
            }
            if !t.is_frozen_by_dump() {
                return refuse("it is paused by its owner");
            }
        }
        Ok(())
    }
}

/// A pod dumped lazily, frozen, its memory being served; see the module documentation.
pub struct ServedPod {
    pub(super) runs: CriuRuns,
    pub(super) guard: FreezeGuard,
    pub(super) netlock: Option<NetLock>,
    /// The containers' CRIU configuration files, removed once the pod is settled.
    pub(super) _configs: CriuConfigs,
    /// The pod's sandbox id, for the log.
    pub(super) pod: String,
    /// Released, aborted or abandoned.
    pub(super) settled: bool,
}

impl ServedPod {
    /// Every page went: waits (at most `within`) for every runc, then stops the pod at its
    /// snapshot (killed while frozen, then thawed), its network left locked. Returns how many
    /// processes were killed. When a runc fails or does not end in time, the pod stays frozen
    /// and locked (a page may be missing on the target) and the error says so.
    pub async fn release(mut self, within: Duration) -> Result<usize> {
        self.settled = true;
        let ended = tokio::time::timeout(within, self.runs.wait()).await;
        let failed = match ended {
            Ok(results) => results.into_iter().find_map(|r| r.err()).map(|e| e.to_string()),
            Err(_) => Some(format!("its CRIU did not end within {within:?} of the last page")),
        };
        if let Some(why) = failed {
            let why = format!(
                "pod {}: {why}; the pod stays frozen here and its network locked",
                self.pod
            );
            self.abandon().await;
            return Err(Error::Stopped { reason: why });
        }
        let killed = self.guard.kill_all();
        self.guard.thaw_all();
        if let Some(lock) = self.netlock.take() {
            lock.leave_locked();
        }
        log::info!(
            "pod {}: every page served; stopped at its snapshot ({killed} processes killed while frozen)",
            self.pod
        );
        Ok(killed)
    }

    /// Before the switch: the pod runs on as it was (runc and CRIU killed, thawed, unlocked).
    pub async fn abort(mut self) {
        self.settled = true;
        self.runs.abort().await;
        self.guard.thaw_all();
        if let Some(lock) = self.netlock.take() {
            lock.release().await;
        }
        log::warn!(
            "pod {}: live migration given up before the switch: resumed",
            self.pod
        );
    }

    /// After the switch, the page stream lost: runc and CRIU killed, the pod left frozen and
    /// its network locked.
    pub async fn abandon(mut self) {
        self.settled = true;
        self.runs.abort().await;
        self.guard.forget();
        if let Some(lock) = self.netlock.take() {
            lock.leave_locked();
        }
        log::error!(
            "pod {}: live migration lost after the switch: the pod stays frozen here, its network \
             locked (the target may run it); resume it only if the target does not",
            self.pod
        );
    }
}

impl Drop for ServedPod {
    fn drop(&mut self) {
        // Dropped unsettled (its owner went away): as `abandon`, without waiting.
        if !self.settled {
            self.runs.cancel_served();
            self.guard.forget();
            if let Some(lock) = self.netlock.take() {
                lock.leave_locked();
            }
            log::error!(
                "pod {}: a live migration's dump was dropped unsettled: the pod stays frozen and locked",
                self.pod
            );
        }
    }
}
