//! How the pod makes its containers (the model is containerd's Rust runc shim's
//! `ContainerFactory`): [`RuncFactory`] mounts rootfs and runs runc; unit tests of the pod's
//! logic use a fake (`pod::fake`).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use super::{Container, CreateParams, RestoreSource};
use crate::convert::mount_to;
use crate::error::{Error, Result};
use crate::exits::ExitRouter;
use crate::task_event::Mount;

#[async_trait]
pub trait ContainerFactory: Send + Sync {
    /// Mounts a Create's rootfs at `rootfs` (all or nothing).
    async fn mount_rootfs(&self, mounts: &[Mount], rootfs: &Path) -> Result<()>;
    /// Unmounts what [`ContainerFactory::mount_rootfs`] mounted.
    fn unmount_rootfs(&self, rootfs: &Path);
    /// A container run fresh (`runc create`). On failure nothing is left registered or
    /// running; the caller still owns the rootfs mount.
    async fn create(&self, p: CreateParams, exits: &ExitRouter) -> Result<Arc<Container>>;
    /// A container that does not run: its Start reports it exited with `code`.
    fn exited(&self, p: CreateParams, code: u32) -> Result<Arc<Container>>;
    /// A container restored at its Start from what its Create prepared.
    fn prepare_restore(&self, p: CreateParams, src: RestoreSource) -> Result<Arc<Container>>;
}

/// Containers of runc, on the node's mounts.
pub struct RuncFactory;

#[async_trait]
impl ContainerFactory for RuncFactory {
    async fn mount_rootfs(&self, mounts: &[Mount], rootfs: &Path) -> Result<()> {
        std::fs::create_dir_all(rootfs)
            .map_err(|e| Error::Internal(format!("create {}: {e}", rootfs.display())))?;
        for m in mounts {
            if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(&mount_to(m), rootfs).await {
                self.unmount_rootfs(rootfs);
                return Err(Error::Internal(format!(
                    "mount the rootfs ({} {}) at {}: {e}",
                    m.kind,
                    m.source,
                    rootfs.display()
                )));
            }
        }
        Ok(())
    }

    fn unmount_rootfs(&self, rootfs: &Path) {
        if let Some(path) = rootfs.to_str() {
            if let Err(e) = containerd_shim::mount::umount_recursive(Some(path), 0) {
                log::warn!("unmount {path}: {e}; detaching");
                let _ = containerd_shim::mount::umount_recursive(Some(path), libc::MNT_DETACH);
            }
        }
    }

    async fn create(&self, p: CreateParams, exits: &ExitRouter) -> Result<Arc<Container>> {
        Container::create(p, exits).await
    }

    fn exited(&self, p: CreateParams, code: u32) -> Result<Arc<Container>> {
        Container::exited(p, code)
    }

    fn prepare_restore(&self, p: CreateParams, src: RestoreSource) -> Result<Arc<Container>> {
        Container::prepare_restore(p, src)
    }
}
