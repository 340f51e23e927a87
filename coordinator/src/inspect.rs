//! `podsnap inspect`: verify a checkpoint (every digest) and say what it holds; `-o json`
//! prints its manifest and whether it is sealed ([`inspect_json`]).

use std::path::{Path, PathBuf};

use podsnap_checkpoint::manifest::Manifest;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::summary::CheckpointSummary;

/// Verifies the checkpoint in `dir` and summarizes it; `root` is the node's checkpoint root.
pub fn inspect(dir: &Path, root: &Path) -> Result<CheckpointSummary> {
    let dir = std::fs::canonicalize(dir).map_err(Error::io("open the checkpoint", dir))?;
    let manifest = Manifest::load_verified(&dir)?;
    Ok(CheckpointSummary::new(&dir, &manifest, root))
}

/// What `podsnap inspect -o json` prints: the checkpoint's manifest once every digest is
/// checked, and whether a seal (a dump's, a pull's or a restore's, see
/// [`podsnap_checkpoint::seal`]) holds for it, read before the digests are (inspect itself
/// never seals).
#[derive(Debug, Clone, Serialize)]
pub struct Inspected {
    pub dir: PathBuf,
    /// Every listed file has its size and digest, nothing unlisted is there.
    pub verified: bool,
    pub sealed: bool,
    /// Why it is not verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The verified manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
}

/// Checks the checkpoint in `dir` as [`inspect`] does and says what [`Inspected`] holds. A
/// checkpoint whose manifest cannot be read or does not match its listing is an error; one
/// whose files do not match their digests is returned with `verified: false`.
pub fn inspect_json(dir: &Path) -> Result<Inspected> {
    let dir = std::fs::canonicalize(dir).map_err(Error::io("open the checkpoint", dir))?;
    let manifest = Manifest::load_listed(&dir)?;
    let sealed =
        podsnap_checkpoint::seal::holds(Path::new(podsnap_checkpoint::seal::SEAL_DIR), &dir, &manifest);
    Ok(match manifest.verify(&dir) {
        Ok(()) => Inspected {
            dir,
            verified: true,
            sealed,
            problem: None,
            manifest: Some(manifest),
        },
        Err(e) => Inspected {
            dir,
            verified: false,
            sealed,
            problem: Some(Error::from(e).to_string()),
            manifest: None,
        },
    })
}
