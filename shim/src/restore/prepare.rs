//! Prepare a container's files at its Create, before its Start restores it: the pod's emptyDir
//! volumes and /dev/shm (once per pod), its SysV IPC objects (once per IPC namespace), the
//! container's rootfs changes.

use std::path::Path;

use podsnap_checkpoint::format::manifest::MAX_JSON_BYTES;
use podsnap_checkpoint::fs::read::read_capped;

use super::{Prepared, RestorePlan, Restores};
use crate::container::RestoreSource;
use crate::error::{Error, Result};
use crate::process::lock;

impl Restores {
    /// Prepares a container's filesystem for its restore: emptyDir volumes (once per pod) and
    /// its rootfs changes. A volume counts as filled only once its archive is unpacked.
    pub async fn prepare(&self, plan: RestorePlan, rootfs: &Path) -> Result<Prepared> {
        let preparing = std::time::Instant::now();
        let prepared = self.prepare_files(&plan, rootfs).await;
        plan.span
            .record("prepare_ms", preparing.elapsed().as_millis() as u64);
        if let Err(e) = prepared {
            plan.span.record("outcome", "prepare failed");
            return Err(e);
        }
        Ok(Prepared {
            paused: plan.paused,
            source: RestoreSource {
                image_dir: plan.image_dir,
                options: plan.options,
                started_order: plan.started_order,
                lazy: plan.lazy,
                unix_ends: plan.unix_ends,
                adopted: plan.adopted,
                span: plan.span,
            },
        })
    }

    async fn prepare_files(&self, plan: &RestorePlan, rootfs: &Path) -> Result<()> {
        let filling = self.filling.lock().await;
        for (archive, dst) in &plan.volumes {
            if lock(&self.filled).contains(dst) {
                continue;
            }
            let (a, d) = (archive.clone(), dst.clone());
            tokio::task::spawn_blocking(move || {
                let was_empty = podsnap_checkpoint::trust::volumes::empty_or_missing(&d);
                std::fs::create_dir_all(&d)
                    .map_err(|e| podsnap_checkpoint::Error::io("create a volume", &d, e))?;
                podsnap_checkpoint::archive::rootfs::unpack(&a, &d).inspect_err(|_| {
                    // A volume this restore was filling is left as it found it: empty.
                    if was_empty {
                        if let Err(e) = podsnap_checkpoint::fs::remove::remove_contents(&d) {
                            log::warn!("{}: a half-filled volume stays: {e}", d.display());
                        }
                    }
                })
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
            lock(&self.filled).insert(dst.clone());
        }
        if let Some((dir, ns)) = plan.sysv_ipc.clone() {
            // Keyed by the namespace: once for the pod.
            if !lock(&self.filled).contains(&ns) {
                let n = ns.clone();
                tokio::task::spawn_blocking(move || {
                    let path = dir.join(podsnap_checkpoint::format::layout::SYSV_STATE);
                    let state: podsnap_checkpoint::pod::shared::sysv::SysvState =
                        read_capped(&path, MAX_JSON_BYTES)
                            .map_err(|e| e.to_string())
                            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                            .map_err(|reason| podsnap_checkpoint::Error::InvalidCheckpoint {
                                path: path.clone(),
                                reason,
                            })?;
                    podsnap_checkpoint::pod::shared::sysv::restore(&n, &dir, &state)
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
                lock(&self.filled).insert(ns);
            }
        }
        drop(filling);
        if let Some((tar, del)) = plan.rootfs_changes.clone() {
            let r = rootfs.to_path_buf();
            tokio::task::spawn_blocking(move || podsnap_checkpoint::archive::rootfs::apply(&r, &tar, &del))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
        }
        Ok(())
    }
}
