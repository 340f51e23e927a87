//! The pod's network while its containers are restored ([`NetHold`]): lent addresses, the lock
//! for connections over loopback, released once the containers are back (or given up on).

use std::collections::HashSet;
use std::path::PathBuf;

use oci_spec::runtime::Spec;
use podsnap_checkpoint::format::manifest::Manifest;
use podsnap_checkpoint::ContainerState;

use super::Restores;
use crate::error::Result;
use crate::exits::MonitorLauncher;
use crate::process::lock;

/// The new pod's network namespace while its containers are restored: its addresses at the
/// dump lent to its loopback device until every container the checkpoint holds running is
/// restored (or its restore failed), and locked (loopback too) until those linked by TCP over
/// loopback are; released [`NET_HOLD_IDLE`] after a restore when no other container's began (a
/// pod that restores only some of them), at the latest [`NET_HOLD_LIMIT`] after the first.
pub struct NetHold {
    netns: PathBuf,
    /// Names of the containers still to restore.
    waiting: HashSet<String>,
    /// Those of them at an end of a connection over loopback to another container.
    linked: HashSet<String>,
    locked: bool,
    /// The checkpoint asked to keep connections to outside the pod.
    keep_outside: bool,
    /// The pod's addresses at the dump that this pod does not have, lent to its loopback device
    /// while CRIU restores the connections bound to them.
    borrowed: Vec<std::net::IpAddr>,
    /// Counts the pod's container restores planned and finished (the idle timer's clock).
    generation: u64,
}

/// The longest the pod's network stays locked waiting for its containers' restores.
const NET_HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);
/// How long after a container's restore the next one must begin for the lock to wait for it.
const NET_HOLD_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

impl Restores {
    /// Prepares the pod's network before the first of its containers is restored: lends it its
    /// addresses at the dump, and locks it when containers are linked by TCP over loopback.
    pub(super) async fn hold_network(&self, spec: &Spec, manifest: &Manifest) -> Result<()> {
        use podsnap_checkpoint::pod::shared::netlock;
        let mut net = self.net.lock().await;
        if let Some(h) = net.as_mut() {
            h.generation += 1;
            return Ok(());
        }
        let Some(netns) = crate::pod::dump::pod_netns(spec) else {
            return Ok(()); // the host's network: nothing of the pod's own to hold
        };
        let waiting: HashSet<String> = manifest
            .containers
            .iter()
            .filter(|c| c.dumped && matches!(c.state, ContainerState::Running | ContainerState::Paused))
            .map(|c| c.name.clone())
            .collect();
        let linked: HashSet<String> = manifest
            .loopback_linked
            .iter()
            .filter(|n| waiting.contains(*n))
            .cloned()
            .collect();
        let now = netlock::addresses(&MonitorLauncher, &netns).await?;
        let borrowed: Vec<_> = manifest
            .pod
            .ips
            .iter()
            .filter(|ip| !now.contains(ip))
            .copied()
            .collect();
        let mut h = NetHold {
            netns,
            waiting,
            linked,
            locked: false,
            keep_outside: manifest.tcp_established,
            borrowed: Vec::new(),
            generation: 0,
        };
        if !h.linked.is_empty() {
            let wait = podsnap_runtime::launcher::Limit::after(netlock::XTABLES_WAIT, None);
            netlock::lock_with(&MonitorLauncher, &h.netns, netlock::Scope::All, &wait).await?;
            h.locked = true;
            log::info!(
                "pod network {} locked until {:?} (linked over loopback) are restored",
                h.netns.display(),
                h.linked
            );
        }
        // Connections come back bound to the pod's addresses at the dump.
        let lent = netlock::borrow_addresses(&MonitorLauncher, &h.netns, &borrowed, true).await;
        h.borrowed = borrowed;
        if let Err(e) = lent {
            release_network(&mut h).await;
            return Err(e.into());
        }
        *net = Some(h);
        let held = self.net.clone();
        tokio::spawn(async move {
            tokio::time::sleep(NET_HOLD_LIMIT).await;
            if let Some(h) = held.lock().await.as_mut().filter(|h| !h.waiting.is_empty()) {
                log::warn!(
                    "pod network {}: still waiting for {:?} after {:?}; released",
                    h.netns.display(),
                    h.waiting,
                    NET_HOLD_LIMIT
                );
                release_network(h).await;
            }
        });
        Ok(())
    }

    /// Container `name`'s restore is over (restored or failed): its connections to outside the
    /// pod are closed unless kept; the lock goes once every linked container is back, the lent
    /// addresses once every container is.
    pub async fn restore_over(&self, name: &str, pids: &[i32]) {
        lock(&self.unix_pairs).retain(|_, p| {
            for (c, over) in p.containers.iter().zip(p.over.iter_mut()) {
                *over |= c == name;
            }
            !p.over.iter().all(|o| *o)
        });
        let mut net = self.net.lock().await;
        let Some(h) = net.as_mut() else { return };
        if !h.waiting.remove(name) {
            return;
        }
        close_outside(h, pids).await;
        h.linked.remove(name);
        if h.locked && h.linked.is_empty() {
            podsnap_checkpoint::pod::shared::netlock::unlock(&MonitorLauncher, &h.netns).await;
            h.locked = false;
            log::info!(
                "pod network {} unlocked: its linked containers are back",
                h.netns.display()
            );
        }
        if h.waiting.is_empty() {
            release_network(h).await;
            lock(&self.unix_pairs).clear(); // every restore of the pod is over
            return;
        }
        h.generation += 1;
        let (held, generation) = (self.net.clone(), h.generation);
        let pairs = self.unix_pairs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(NET_HOLD_IDLE).await;
            let mut net = held.lock().await;
            if let Some(h) = net
                .as_mut()
                .filter(|h| h.generation == generation && !h.waiting.is_empty())
            {
                log::warn!(
                    "pod network {}: no restore of {:?} began within {:?}; released",
                    h.netns.display(),
                    h.waiting,
                    NET_HOLD_IDLE
                );
                release_network(h).await;
                lock(&pairs).clear(); // the restores that did not come never will
            }
        });
    }
}

/// Closes the connections to outside of a container just restored (its processes `pids`: those
/// CRIU brought back) unless they are kept (and can be: the pod's address did not change). The
/// other containers' are left alone: one restored earlier may have accepted new clients since.
async fn close_outside(h: &NetHold, pids: &[i32]) {
    if h.keep_outside && h.borrowed.is_empty() {
        return;
    }
    if h.keep_outside {
        log::warn!(
            "pod network {}: the pod's address changed ({:?} at the dump): its connections to \
             outside the pod cannot be kept",
            h.netns.display(),
            h.borrowed
        );
    }
    match podsnap_checkpoint::pod::shared::netlock::close_outside_connections_of(
        &MonitorLauncher,
        &h.netns,
        pids,
    )
    .await
    {
        Ok(0) => {}
        Ok(n) => log::info!(
            "pod network {}: closed {n} connections to outside the pod",
            h.netns.display()
        ),
        Err(e) => log::warn!("pod network {}: {e}", h.netns.display()),
    }
}

/// Unlocks the pod's network and takes the lent addresses back: nothing more is waited for.
async fn release_network(h: &mut NetHold) {
    use podsnap_checkpoint::pod::shared::netlock;
    if h.locked {
        netlock::unlock(&MonitorLauncher, &h.netns).await;
        h.locked = false;
    }
    if let Err(e) = netlock::borrow_addresses(&MonitorLauncher, &h.netns, &h.borrowed, false).await {
        log::warn!("pod network {}: {e}", h.netns.display());
    }
    h.borrowed.clear();
    h.waiting.clear();
    h.linked.clear();
    log::info!("pod network {} released", h.netns.display());
}
