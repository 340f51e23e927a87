//! Removing what an operation left: leftovers, guards that remove on drop, a directory's
//! contents.

use std::path::{Path, PathBuf};

/// Removes `path` (a file, or a directory with everything in it) that a podsnap operation
/// left; one already gone is fine, any other failure is logged.
pub fn remove_leftover(path: &Path) {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    if let Err(e) = removed {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("remove {}: {e}", path.display());
        }
    }
}

/// Paths removed ([`remove_leftover`]) when dropped: what an operation makes for its own
/// length, gone on every way out of it.
pub struct RemoveOnDrop(pub Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            remove_leftover(p);
        }
    }
}

/// Removes everything inside `dir` (never following symlinks), keeping `dir`.
pub fn remove_contents(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}
