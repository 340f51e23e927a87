//! What the containers of a restored pod share: the PID namespace's ids kept for the restores,
//! and the unix connections between containers (each pair made once, each end handed to its
//! container's restore).

use std::path::Path;
use std::sync::Arc;

use oci_spec::runtime::Spec;
use podsnap_checkpoint::criu::container::InheritedSocket;
use podsnap_checkpoint::format::manifest::Manifest;
use podsnap_checkpoint::ContainerState;

use super::Restores;
use crate::error::{Error, Result};
use crate::exits::MonitorLauncher;
use crate::process::lock;

/// A new unix connection for a link of the checkpoint: each container's restore gets a copy of
/// its end; the shim's copies go once both restores are over (else the peer of a container
/// that died would never see the end of the stream), or when the pod's restore is.
pub(super) struct NewPair {
    pub(super) ends: [std::os::fd::OwnedFd; 2],
    pub(super) containers: [String; 2],
    pub(super) over: [bool; 2],
}

impl Restores {
    /// Container `cname`'s ends of the unix connections between containers of the checkpoint
    /// at `dir`: each link's pair is made once (the first restore at either end makes it, with
    /// the queued bytes of both ends in it); each restore gets a copy of its end.
    pub(super) fn unix_ends(
        &self,
        dir: &Path,
        manifest: &Manifest,
        cname: &str,
    ) -> Result<Vec<InheritedSocket>> {
        let mut ends = Vec::new();
        let mut pairs = lock(&self.unix_pairs);
        for (i, link) in manifest.unix_links.iter().enumerate() {
            let Some(side) = link.ends.iter().position(|e| e.container == cname) else {
                continue;
            };
            let pair = match pairs.entry((dir.to_path_buf(), i)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let made = podsnap_checkpoint::pod::shared::links::connect_link(
                        dir,
                        manifest.part_names(),
                        link,
                    )?;
                    log::info!(
                        "unix connection {i} of the checkpoint: {:?} <-> {:?}, made for the restore",
                        link.ends[0],
                        link.ends[1]
                    );
                    e.insert(NewPair {
                        ends: made,
                        containers: [link.ends[0].container.clone(), link.ends[1].container.clone()],
                        over: [false; 2],
                    })
                }
            };
            let fd = pair.ends[side]
                .try_clone()
                .map_err(|e| Error::Internal(format!("copy a unix connection's end: {e}")))?;
            ends.push(InheritedSocket {
                ino: link.ends[side].ino,
                fd: Arc::new(fd),
            });
        }
        Ok(ends)
    }

    /// In a pod sharing one PID namespace, before the first of its containers is restored:
    /// makes the namespace hand out ids above every id the checkpoint's processes had. The
    /// containers' restores run side by side, and a restored process's new thread or a CRIU
    /// helper would otherwise take the next free id, which may be one another container's
    /// restore needs.
    pub(super) async fn reserve_pids(&self, spec: &Spec, manifest: &Manifest, dir: &Path) -> Result<()> {
        let Some(pidns) =
            crate::pod::dump::joined_namespace(spec, oci_spec::runtime::LinuxNamespaceType::Pid)
        else {
            return Ok(()); // a PID namespace of its own (or the host's): nothing is shared
        };
        self.pids_reserved
            .get_or_try_init(|| async {
                let names = manifest.part_names();
                let mut highest = 1;
                for c in manifest.containers.iter().filter(|c| {
                    c.dumped && matches!(c.state, ContainerState::Running | ContainerState::Paused)
                }) {
                    let images = dir.join(c.dir()).join(names.images);
                    highest = highest.max(podsnap_checkpoint::criu::container::highest_pid(&images)?);
                }
                for a in &manifest.adopted {
                    let images = dir.join(a.images(names));
                    highest = highest.max(podsnap_checkpoint::criu::container::highest_pid(&images)?);
                }
                podsnap_checkpoint::criu::container::reserve_pids(&MonitorLauncher, &pidns, highest).await?;
                log::info!(
                    "pod PID namespace {}: ids up to {highest} kept for the restores",
                    pidns.display()
                );
                Ok(())
            })
            .await
            .map(|_| ())
    }
}
