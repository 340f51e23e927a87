//! Private files and directories (0600, 0700; only root reads a checkpoint), whole-or-nothing
//! replacement and synced writes.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};

/// Creates a directory (and missing parents) that only root can enter. Only what it creates is
/// made 0700: an existing directory (say a 1777 `/tmp`) keeps its mode and owner.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(p) = cursor.filter(|p| !p.as_os_str().is_empty()) {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(Error::io(
                    "create a checkpoint directory",
                    p,
                    std::io::Error::from(std::io::ErrorKind::NotADirectory),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(p.to_path_buf()),
            Err(e) => return Err(Error::io("create a checkpoint directory", p, e)),
        }
        cursor = p.parent();
    }
    for p in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(0o700).create(p) {
            Ok(()) => {
                // The umask may have taken bits away; never more than 0700 either way.
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| Error::io("make a checkpoint directory private", p, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => {}
            Err(e) => return Err(Error::io("create a checkpoint directory", p, e)),
        }
    }
    Ok(())
}

/// Writes a file only root can read.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| Error::io("write a checkpoint file", path, e))
}

/// Replaces `path` whole or not at all: a private temporary file beside it (0600, created
/// exclusively: never through a symlink) renamed over it. `what` names the file in errors.
pub fn replace_private(path: &Path, data: &[u8], what: &'static str) -> Result<()> {
    use std::io::Write;
    let mut tmp = temporary_beside(path).map_err(|e| Error::io(what, path, e))?;
    tmp.write_all(data).map_err(|e| Error::io(what, path, e))?;
    tmp.persist(path).map_err(|e| Error::io(what, path, e.error))?;
    Ok(())
}

/// A private temporary file (0600, `O_EXCL`) in `path`'s directory, named after it; removed
/// when dropped unless persisted.
fn temporary_beside(path: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempfile_in(parent_of(path))
}

/// The directory holding `path` (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Creates a file only root can read.
pub fn create_private(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create a checkpoint file", path, e))
}

/// Gives `path` (a file or directory this dump wrote, never a symlink) `mode` unless it has it.
pub fn make_private(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io("stat a checkpoint file", path, e))?;
    if meta.file_type().is_symlink() || meta.permissions().mode() & 0o7777 == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("make a checkpoint file private", path, e))
}

/// Writes a file durably and atomically: private temporary file beside it, fsync, rename,
/// fsync the directory.
pub fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp = temporary_beside(path).map_err(|e| Error::io("create a checkpoint file", path, e))?;
    tmp.write_all(data)
        .map_err(|e| Error::io("write", tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io("sync", tmp.path(), e))?;
    tmp.persist(path)
        .map_err(|e| Error::io("rename into place", path, e.error))?;
    sync_dir(parent_of(path))
}

/// Writes every dirty page of the filesystem holding `dir` to disk (one `syncfs`, instead of
/// an fsync per file).
pub fn sync_filesystem(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir).map_err(|e| Error::io("open the checkpoint", dir, e))?;
    // SAFETY: syncfs on a descriptor we own and keep open across the call.
    let rc = unsafe { libc::syncfs(d.as_raw_fd()) };
    if rc != 0 {
        return Err(Error::io(
            "sync the checkpoint",
            dir,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync a directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
    }

    #[test]
    fn a_replaced_file_is_private_whole_and_leaves_no_temporary() {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("seal.json");
        std::fs::write(&path, b"old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        replace_private(&path, b"new", "write a seal").expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            std::fs::read_dir(t.path()).expect("list").count(),
            1,
            "no temporary left"
        );
        let err = replace_private(&t.path().join("missing/seal.json"), b"x", "write a seal")
            .expect_err("no directory")
            .to_string();
        assert!(err.contains("write a seal"), "{err}");
    }

    #[test]
    fn a_synced_write_is_private_and_replaces_the_old_file() {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("manifest.json");
        write_synced(&path, b"{}").expect("write");
        write_synced(&path, b"{\"v\":1}").expect("again");
        assert_eq!(std::fs::read(&path).expect("read"), b"{\"v\":1}");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            std::fs::read_dir(t.path()).expect("list").count(),
            1,
            "no temporary left"
        );
    }
}
