//! The rootfs deletions file: what a container removed from its image's files.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The largest deletions file read back.
pub const MAX_DELETIONS_BYTES: u64 = 64 * 1024 * 1024;

/// What the container removed from its image's files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletions {
    /// Paths (relative to the rootfs) that were deleted.
    pub deleted: Vec<String>,
    /// Directories whose image content was replaced whole.
    pub opaque: Vec<String>,
}

impl Deletions {
    /// Reads a deletions file written by the rootfs capture, refusing one above
    /// [`MAX_DELETIONS_BYTES`].
    pub fn read(path: &Path) -> Result<Deletions> {
        let file = std::fs::File::open(path).map_err(|e| Error::io("read the rootfs deletions", path, e))?;
        let mut text = Vec::new();
        file.take(MAX_DELETIONS_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|e| Error::io("read the rootfs deletions", path, e))?;
        if text.len() as u64 > MAX_DELETIONS_BYTES {
            return Err(Error::InvalidCheckpoint {
                path: path.to_path_buf(),
                reason: format!("larger than {MAX_DELETIONS_BYTES} bytes"),
            });
        }
        serde_json::from_slice(&text).map_err(|e| Error::InvalidCheckpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}
