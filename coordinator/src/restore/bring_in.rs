//! Step 2: a checkpoint outside the node's checkpoint root brought in under a fresh name.

use std::path::Path;

use podsnap_checkpoint::format::manifest::Manifest;
use podsnap_checkpoint::node::import::{import, Imported};

use crate::error::{Error, Result};
use crate::progress::Progress;

use super::*;

/// Brings the checkpoint at `dir` (outside the root) into the root for this restore: hard
/// links, or a copy across filesystems (said on `progress`).
pub(super) async fn bring_in(
    request: &RestoreRequest,
    dir: &Path,
    manifest: &Manifest,
    progress: &dyn Progress,
) -> Result<Imported> {
    let root = request.checkpoint_root.clone();
    progress.step(&format!("linking the checkpoint into {}", root.display()));
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && !n.starts_with('.'))
        .unwrap_or_else(|| "checkpoint".to_owned());
    let name = format!(
        "{base}-imported-{}",
        crate::dump::utc_stamp(time::OffsetDateTime::now_utc())
    );
    // The import runs on a blocking thread; the line it says when it must copy is shown as
    // it comes (a copy of a large checkpoint takes a while).
    let (told, mut hear) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (src, manifest) = (dir.to_path_buf(), manifest.clone());
    let mut work = tokio::task::spawn_blocking(move || {
        import(&src, &manifest, &root, &name, &mut |line| {
            let _ = told.send(line.to_owned());
        })
    });
    let joined = loop {
        tokio::select! {
            Some(line) = hear.recv() => progress.step(&line),
            joined = &mut work => break joined,
        }
    };
    while let Ok(line) = hear.try_recv() {
        progress.step(&line);
    }
    let imported = joined
        .map_err(|e| Error::Refused(format!("bringing the checkpoint in stopped: {e}")))?
        .map_err(Box::new)?;
    log::info!(
        "checkpoint {} brought in as {}: {} files linked, {} copied ({} bytes)",
        dir.display(),
        imported.dir.display(),
        imported.linked,
        imported.copied,
        imported.copied_bytes
    );
    Ok(imported)
}
