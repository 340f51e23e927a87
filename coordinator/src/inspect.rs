//! `podsnap inspect`: verify a checkpoint (every digest) and say what it holds.

use std::path::Path;

use podsnap_checkpoint::manifest::Manifest;

use crate::error::{Error, Result};
use crate::summary::CheckpointSummary;

/// Verifies the checkpoint in `dir` and summarizes it; `root` is the node's checkpoint root.
pub fn inspect(dir: &Path, root: &Path) -> Result<CheckpointSummary> {
    let dir = std::fs::canonicalize(dir).map_err(Error::io("open the checkpoint", dir))?;
    let manifest = Manifest::load_verified(&dir)?;
    Ok(CheckpointSummary::new(&dir, &manifest, root))
}
