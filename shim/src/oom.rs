//! OOM events: the kernel's out-of-memory notifications on a container's memory cgroup (v1
//! eventfd, v2 `memory.events` through inotify), turned into containerd's TaskOOM.

use std::sync::Arc;

use podsnap_runtime::cgroup::oom::{OomCheck, OomWatch};

use crate::container::Container;
use crate::task_event::{EventSink, TaskEvent};

/// Publishes an OOM event each time the kernel reports one in the container's memory cgroup,
/// for as long as that cgroup exists. A container whose cgroup cannot say (no memory
/// controller there) gets one warning, at its creation.
pub fn watch(c: &Container, events: Arc<dyn EventSink>) {
    let Some(cgroups) = c.cgroups() else {
        return; // already warned when its cgroups were not found
    };
    let watch = match OomWatch::register(&cgroups) {
        Ok(w) => w,
        Err(e) => {
            log::warn!("container {}: no OOM events: {e}", c.id);
            return;
        }
    };
    let id = c.id.clone();
    tokio::spawn(async move {
        // SAFETY: the AsyncFd owns the watch and with it the descriptor, so the descriptor
        // stays open and the same for as long as it is registered.
        let Ok(mut afd) = (unsafe { tokio::io::unix::AsyncFd::register(watch) }) else {
            log::warn!("container {id}: no OOM events: the descriptor cannot be polled");
            return;
        };
        loop {
            let Ok(mut guard) = afd.readable_mut().await else {
                return;
            };
            let outcome = guard.get_inner_mut().check();
            guard.clear_ready();
            let n = match outcome {
                Ok(OomCheck::Oom(n)) => n,
                Ok(OomCheck::Nothing) => continue,
                Ok(OomCheck::Gone) => return, // the cgroup went away with the container
                Err(e) => {
                    log::warn!("container {id}: OOM notifications stopped: {e}");
                    return;
                }
            };
            log::info!("container {id}: out of memory ({n})");
            for _ in 0..n {
                events
                    .publish(TaskEvent::Oom {
                        container_id: id.clone(),
                    })
                    .await;
            }
        }
    });
}
