//! What is captured beside the CRIU dumps while the pod is frozen: each container's rootfs
//! changes, the pod's emptyDir volumes and the persistent ones it carries, its `/dev/shm` and
//! its SysV IPC objects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};

use crate::archive::rootfs;
use crate::error::{Error, Result};
use crate::format::layout::{DEV_SHM_ARCHIVE, SYSV_STATE};
use crate::format::manifest::{VolumeEntry, VolumeMount, ROOTFS_DELETED, ROOTFS_DIFF};
use crate::fs::private::{create_private_dir, write_private};
use crate::pod::dump::checks::PodIpc;
use crate::pod::shared::sysv::SysvState;
use crate::pod::spec::{empty_dirs, pod_dev_shm};
use crate::pod::target::Target;

/// What the pod's containers share, captured once for the pod, as the manifest names it.
#[derive(Debug, Default)]
pub(super) struct Shared {
    pub(super) volumes: Vec<VolumeEntry>,
    /// The `/dev/shm` archive, relative to the checkpoint.
    pub(super) dev_shm: Option<String>,
    /// The SysV IPC state, relative to the checkpoint.
    pub(super) sysv_ipc: Option<String>,
}

/// The captures running beside the CRIU dumps.
pub(super) struct Capturing {
    tasks: JoinSet<Result<Duration>>,
    volumes: BTreeMap<String, (PathBuf, Vec<VolumeMount>)>,
    dev_shm: Option<PathBuf>,
    sysv: Option<JoinHandle<Result<Option<SysvState>>>>,
}

impl Capturing {
    /// Starts the captures into the checkpoint at `dir`: the rootfs changes of each of
    /// `running`, the volumes and `/dev/shm` of the pod's `targets`, the persistent volumes
    /// it carries (`carried`: host directory, archive) and the SysV objects of its IPC
    /// namespace.
    pub(super) fn start(
        dir: &Path,
        targets: &[Target],
        running: &[Target],
        ipc: Option<&PodIpc>,
        carried: &[(PathBuf, String)],
    ) -> Result<Self> {
        let mut tasks = JoinSet::new();
        for t in running {
            // The rootfs changes are archived beside the CRIU dump (both while frozen).
            let cdir = dir.join(t.entry.dir());
            let rootfs_dir = t.bundle.join("rootfs");
            let bundle = t.bundle.clone();
            let name = t.entry.name.clone();
            tasks.spawn(async move {
                let tar = cdir.join(ROOTFS_DIFF);
                let del = cdir.join(ROOTFS_DELETED);
                tokio::task::spawn_blocking(move || match rootfs::upperdir_for_dump(&name, &rootfs_dir)? {
                    Some(upper) => rootfs::capture(&upper, &tar, &del).map(drop),
                    None => {
                        log::info!(
                            "container {name}: its rootfs {} is a read-only overlay: no changes to capture",
                            rootfs_dir.display()
                        );
                        Ok(())
                    }
                })
                .await
                .map_err(|e| Error::io("capture rootfs changes", &bundle, std::io::Error::other(e)))??;
                Ok::<Duration, Error>(Duration::ZERO)
            });
        }
        let volumes = empty_dirs(targets);
        if !volumes.is_empty() || !carried.is_empty() {
            create_private_dir(&dir.join("volumes"))?;
        }
        for (src, archive) in carried {
            let (src, tar) = (src.clone(), dir.join(archive));
            tasks.spawn(async move {
                tokio::task::spawn_blocking(move || rootfs::archive_dir(&src, &tar))
                    .await
                    .map_err(|e| {
                        Error::io("archive a carried volume", "volumes", std::io::Error::other(e))
                    })??;
                Ok(Duration::ZERO)
            });
        }
        // The pod's /dev/shm, once for the pod (every container of it shares it).
        let dev_shm = pod_dev_shm(targets);
        if let Some(src) = dev_shm.clone() {
            create_private_dir(&dir.join("pod"))?;
            let tar = dir.join(DEV_SHM_ARCHIVE);
            tasks.spawn(async move {
                tokio::task::spawn_blocking(move || rootfs::archive_dir(&src, &tar))
                    .await
                    .map_err(|e| Error::io("archive /dev/shm", "pod", std::io::Error::other(e)))??;
                Ok(Duration::ZERO)
            });
        }
        for (name, (src, _)) in &volumes {
            let src = src.clone();
            let tar = dir.join("volumes").join(format!("{name}.tar"));
            tasks.spawn(async move {
                tokio::task::spawn_blocking(move || rootfs::archive_dir(&src, &tar))
                    .await
                    .map_err(|e| Error::io("archive a volume", "volumes", std::io::Error::other(e)))??;
                Ok(Duration::ZERO)
            });
        }
        // The SysV objects of the pod's IPC namespace, once for the pod.
        let sysv = match ipc {
            Some(ipc) => {
                create_private_dir(&dir.join("pod"))?;
                let (root, ns, attached) = (dir.to_path_buf(), ipc.ns.clone(), ipc.attached.clone());
                Some(tokio::task::spawn_blocking(move || {
                    crate::pod::shared::sysv::capture(&ns, &root, &attached)
                }))
            }
            None => None,
        };
        Ok(Self {
            tasks,
            volumes,
            dev_shm,
            sysv,
        })
    }

    /// Waits for every capture. The slowest task's time raises `slowest`; the first failure
    /// goes into `first_error` (the caller's, after the CRIU runs'). Once all ended without
    /// one, the SysV state is written and what the manifest names returned.
    pub(super) async fn finish(
        mut self,
        dir: &Path,
        slowest: &mut Duration,
        mut first_error: Option<Error>,
    ) -> Result<Shared> {
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok(Ok(took)) => *slowest = (*slowest).max(took),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(Error::io("dump task", dir, std::io::Error::other(e)));
                }
            }
        }
        let sysv_ipc = match self.sysv {
            Some(task) => match task.await {
                Ok(Ok(Some(state))) => Some(state),
                Ok(Ok(None)) => None,
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                    None
                }
                Err(e) => {
                    first_error.get_or_insert(Error::io("SysV IPC capture", dir, std::io::Error::other(e)));
                    None
                }
            },
            None => None,
        };
        if let Some(e) = first_error {
            return Err(e);
        }
        if let Some(state) = &sysv_ipc {
            let json = serde_json::to_vec_pretty(state)
                .map_err(|e| Error::io("encode the SysV IPC state", dir, e.into()))?;
            write_private(&dir.join(SYSV_STATE), &json)?;
        }
        let volumes = self
            .volumes
            .into_iter()
            .map(|(name, (_, mounts))| VolumeEntry {
                archive: format!("volumes/{name}.tar"),
                name,
                mounts,
            })
            .collect();
        Ok(Shared {
            volumes,
            dev_shm: self.dev_shm.map(|_| DEV_SHM_ARCHIVE.to_owned()),
            sysv_ipc: sysv_ipc.map(|_| SYSV_STATE.to_owned()),
        })
    }
}
