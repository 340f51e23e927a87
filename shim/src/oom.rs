//! OOM events: the kernel's out-of-memory notifications on a container's memory cgroup, turned
//! into containerd's TaskOOM.

use std::path::Path;
use std::sync::Arc;

use containerd_shim::protos::events::task::TaskOOM;
use podsnap_runtime::cgroup::OomNotifier;

use crate::container::Container;
use crate::events::{self, Events};

/// Publishes an OOM event each time the kernel kills in the container's memory cgroup, for as
/// long as that cgroup exists.
pub fn watch(c: &Container, events: Arc<Events>) {
    let Some(dir) = c.cgroups().and_then(|g| g.get("memory").map(Path::to_path_buf)) else {
        return;
    };
    let fd = match OomNotifier::register(&dir) {
        Ok(n) => n.into_fd(),
        Err(e) => {
            log::warn!("container {}: no OOM notifications: {e}", c.id);
            return;
        }
    };
    let id = c.id.clone();
    tokio::spawn(async move {
        // SAFETY: the AsyncFd owns the eventfd, so the descriptor stays open and the same
        // for as long as it is registered.
        let Ok(afd) = (unsafe { tokio::io::unix::AsyncFd::register(fd) }) else {
            return;
        };
        loop {
            let Ok(mut guard) = afd.readable().await else {
                return;
            };
            let mut buf = [0u8; 8];
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)) {
                Ok(Ok(8)) => {}
                Ok(Ok(_)) | Err(_) => continue, // spurious readiness
                Ok(Err(e)) => {
                    log::warn!("container {id}: OOM notifications stopped: {e}");
                    return;
                }
            }
            if !dir.exists() {
                return; // the cgroup went away with the container
            }
            // The kernel signals when the cgroup goes under OOM (before its killer runs, so
            // the kill counters may not have moved yet), and when the cgroup is removed: any
            // signal while it still exists is an OOM.
            log::info!("container {id}: out of memory");
            events
                .publish(
                    events::OOM,
                    Box::new(TaskOOM {
                        container_id: id.clone(),
                        ..Default::default()
                    }),
                )
                .await;
        }
    });
}
