//! Phase 4, the container dumps: the pod frozen, every held CRIU is let go and the others are
//! started, the shared captures run beside them (see the capture module), and each container's
//! CRIU images are trimmed to the SysV segments its own processes attach.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::format::manifest::PART_NAMES;
use crate::pod::dump::capture::{Capturing, Shared};
use crate::pod::dump::freeze::Frozen;
use crate::pod::dump::limits::check;

/// Every container dumped and the shared state captured, the pod still frozen.
pub(super) struct Dumped {
    pub(super) frozen: Frozen,
    pub(super) shared: Shared,
    /// The slowest single container's CRIU dump, from the moment the dumps were let go.
    pub(super) slowest: Duration,
}

/// Dumps the frozen pod `f`. runc and CRIU are killed at the deadline or when the caller gives
/// up: their failure is then that.
pub(super) async fn dump_containers(mut f: Frozen) -> Result<Dumped> {
    let (limit, deadline) = (f.held.planned.limit.clone(), f.held.planned.req.deadline);
    let dumped = dump_all(&mut f).await.map_err(|e| {
        match check(&limit, deadline, "while the containers were dumped") {
            Err(stopped) => {
                log::warn!("pod dump stopped: {e}");
                stopped
            }
            Ok(()) => e,
        }
    });
    match dumped {
        Ok((slowest, shared)) => Ok(Dumped {
            frozen: f,
            shared,
            slowest,
        }),
        Err(e) => {
            f.unwind().await;
            Err(e)
        }
    }
}

async fn dump_all(f: &mut Frozen) -> Result<(Duration, Shared)> {
    let h = &mut f.held;
    let dir = h.staging.dir.clone();
    let released = Instant::now();
    h.runs.release();
    h.runs.start_rest(&dir, &h.planned.running, &h.planned.limit);
    let ipc = f.checked.ipc.as_ref();
    let capturing = Capturing::start(
        &dir,
        &h.planned.req.targets,
        &h.planned.running,
        ipc,
        &f.checked.carried,
    )?;
    let mut slowest = Duration::ZERO;
    let mut first_error = None;
    let ended = match h.planned.req.serve.is_some() {
        // A lazy dump's runc ends only once its memory went: its images are complete when its
        // CRIU serves.
        true => match h.runs.wait_served(&h.planned.limit, h.planned.req.deadline).await {
            Ok(at) => at.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        },
        false => h.runs.wait().await,
    };
    for (t, ended) in h.planned.running.iter().zip(ended) {
        match ended {
            Ok(at) => {
                slowest = slowest.max(at.saturating_duration_since(released));
                // Its CRIU images recreate only the SysV segments its own processes attach.
                if let Some(keep) = ipc.and_then(|i| i.members.get(&t.entry.id)).cloned() {
                    let images = dir.join(t.entry.dir()).join(PART_NAMES.images);
                    let trimmed = tokio::task::spawn_blocking(move || {
                        crate::criu::image::shm::trim_criu_images(&images, &keep)
                    })
                    .await
                    .map_err(|e| Error::io("trim IPC images", &t.bundle, std::io::Error::other(e)))
                    .and_then(|r| r);
                    if let Err(e) = trimmed {
                        first_error.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let shared = capturing.finish(&dir, &mut slowest, first_error).await?;
    Ok((slowest, shared))
}
