//! A container's root filesystem changes: captured from its overlay upper directory at dump,
//! applied onto the new container's rootfs at restore.
//!
//! The capture is a tar of every file, directory and symlink the container added or changed,
//! plus a JSON list of what it deleted (overlay whiteouts) and of directories it replaced
//! whole (opaque directories). Applying it needs no overlay: deletions are done on the mounted
//! rootfs, then the tar is unpacked over it.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What the container removed from its image's files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletions {
    /// Paths (relative to the rootfs) that were deleted.
    pub deleted: Vec<String>,
    /// Directories whose image content was replaced whole.
    pub opaque: Vec<String>,
}

/// The overlay upper directory of the filesystem mounted at `mountpoint`, if it is an overlay.
pub fn upperdir_of(mountpoint: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    upperdir_in(&info, mountpoint)
}

fn upperdir_in(mountinfo: &str, mountpoint: &Path) -> Option<PathBuf> {
    let want = mountpoint.to_str()?;
    // The last matching line is the mount on top.
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        if unescape(fields.get(4)?) != want || fields.get(dash + 1) != Some(&"overlay") {
            return None;
        }
        fields
            .get(dash + 3)?
            .split(',')
            .find_map(|opt| opt.strip_prefix("upperdir=").map(|p| PathBuf::from(unescape(p))))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Captures the changes in `upper` into `tar_path` and `deletions_path`.
pub fn capture(upper: &Path, tar_path: &Path, deletions_path: &Path) -> Result<u64> {
    let file = create_private(tar_path)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.follow_symlinks(false);
    let mut deletions = Deletions::default();
    let mut stack = vec![PathBuf::new()];
    let mut count = 0u64;
    while let Some(rel) = stack.pop() {
        let dir = upper.join(&rel);
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io("read the rootfs changes", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read the rootfs changes", &dir, e))?;
            let path = entry.path();
            let name = rel.join(entry.file_name());
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| Error::io("stat a changed file", &path, e))?;
            let ft = meta.file_type();
            let rel_str = name.to_string_lossy().into_owned();
            if ft.is_char_device() && meta.rdev() == 0 {
                deletions.deleted.push(rel_str);
                continue;
            }
            if ft.is_fifo() || ft.is_socket() || ft.is_block_device() || ft.is_char_device() {
                continue;
            }
            builder
                .append_path_with_name(&path, &name)
                .map_err(|e| Error::io("archive a changed file", &path, e))?;
            count += 1;
            if ft.is_dir() {
                if is_opaque(&path) {
                    deletions.opaque.push(rel_str);
                }
                stack.push(name);
            }
        }
    }
    let mut out = builder
        .into_inner()
        .map_err(|e| Error::io("finish the rootfs archive", tar_path, e))?;
    out.flush()
        .map_err(|e| Error::io("finish the rootfs archive", tar_path, e))?;
    out.get_ref()
        .sync_all()
        .map_err(|e| Error::io("sync the rootfs archive", tar_path, e))?;
    let json = serde_json::to_vec_pretty(&deletions)
        .map_err(|e| Error::io("encode deletions", deletions_path, e.into()))?;
    crate::container::write_private(deletions_path, &json)?;
    Ok(count)
}

fn is_opaque(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut buf = [0u8; 2];
    for name in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        // SAFETY: both strings are NUL-terminated and buf is valid for buf.len() bytes.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n == 1 && buf[0] == b'y' {
            return true;
        }
    }
    false
}

/// Applies captured changes onto a mounted `rootfs`: deletions first, then the archive.
pub fn apply(rootfs: &Path, tar_path: &Path, deletions_path: &Path) -> Result<()> {
    let text = std::fs::read(deletions_path)
        .map_err(|e| Error::io("read the rootfs deletions", deletions_path, e))?;
    let d: Deletions = serde_json::from_slice(&text).map_err(|e| Error::InvalidCheckpoint {
        path: deletions_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    for rel in d.opaque.iter() {
        let dir = inside(rootfs, rel)?;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                remove_any(&e.path())?;
            }
        }
    }
    for rel in d.deleted.iter() {
        let path = inside(rootfs, rel)?;
        if std::fs::symlink_metadata(&path).is_ok() {
            remove_any(&path)?;
        }
    }
    unpack(tar_path, rootfs)
}

/// Unpacks a tar into `dst`, keeping modes and owners; refuses entries that would leave `dst`.
pub fn unpack(tar_path: &Path, dst: &Path) -> Result<()> {
    let file = std::fs::File::open(tar_path).map_err(|e| Error::io("open an archive", tar_path, e))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    archive
        .unpack(dst)
        .map_err(|e| Error::io("unpack an archive", dst, e))
}

/// `rootfs/rel`, refusing `..`, absolute paths and symlinks on the way (they could lead out).
fn inside(rootfs: &Path, rel: &str) -> Result<PathBuf> {
    let p = crate::manifest::safe_relative(rel).map_err(|reason| Error::InvalidCheckpoint {
        path: PathBuf::from(rel),
        reason,
    })?;
    let mut cur = rootfs.to_path_buf();
    let comps: Vec<_> = p.components().collect();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c);
        if i + 1 < comps.len() {
            if let Ok(m) = std::fs::symlink_metadata(&cur) {
                if m.file_type().is_symlink() {
                    return Err(Error::InvalidCheckpoint {
                        path: PathBuf::from(rel),
                        reason: "passes through a symlink".into(),
                    });
                }
            }
        }
    }
    Ok(cur)
}

fn remove_any(path: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io("stat before removing", path, e))?;
    let res = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    res.map_err(|e| Error::io("remove a deleted path", path, e))
}

/// Creates a file only root can read.
pub(crate) fn create_private(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create a checkpoint file", path, e))
}

/// Archives a directory's contents (an emptyDir volume) into `tar_path`.
pub fn archive_dir(src: &Path, tar_path: &Path) -> Result<()> {
    let file = create_private(tar_path)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.follow_symlinks(false);
    builder
        .append_dir_all(".", src)
        .map_err(|e| Error::io("archive a volume", src, e))?;
    let mut out = builder
        .into_inner()
        .map_err(|e| Error::io("finish a volume archive", tar_path, e))?;
    out.flush()
        .map_err(|e| Error::io("finish a volume archive", tar_path, e))?;
    out.get_ref()
        .sync_all()
        .map_err(|e| Error::io("sync a volume archive", tar_path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_upperdir_of_an_overlay_mount() {
        let info = "36 35 0:30 / /run/x/rootfs rw,relatime - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/s/9/fs,workdir=/s/9/work\n\
                    37 35 0:31 / /other rw - tmpfs tmpfs rw\n";
        assert_eq!(
            upperdir_in(info, Path::new("/run/x/rootfs")),
            Some(PathBuf::from("/s/9/fs"))
        );
        assert_eq!(upperdir_in(info, Path::new("/other")), None);
    }

    #[test]
    fn unescapes_mountinfo_octal() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn capture_and_apply_round_trip() {
        let t = tempfile::tempdir().expect("tempdir");
        let upper = t.path().join("upper");
        std::fs::create_dir_all(upper.join("etc/app")).expect("mkdir");
        std::fs::write(upper.join("etc/app/conf"), b"changed").expect("write");
        std::os::unix::fs::symlink("conf", upper.join("etc/app/link")).expect("symlink");
        // A whiteout: char device 0:0 marks a deletion.
        let wh = std::ffi::CString::new(upper.join("gone").to_str().expect("utf8")).expect("cstr");
        // SAFETY: wh is a valid NUL-terminated path.
        let rc = unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR | 0o600, 0) };
        assert_eq!(rc, 0, "mknod needs root");
        let tar = t.path().join("diff.tar");
        let del = t.path().join("deleted.json");
        capture(&upper, &tar, &del).expect("capture");

        let rootfs = t.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc/app")).expect("mkdir");
        std::fs::write(rootfs.join("etc/app/conf"), b"original").expect("write");
        std::fs::write(rootfs.join("gone"), b"to delete").expect("write");
        apply(&rootfs, &tar, &del).expect("apply");
        assert_eq!(
            std::fs::read(rootfs.join("etc/app/conf")).expect("read"),
            b"changed"
        );
        assert_eq!(
            std::fs::read_link(rootfs.join("etc/app/link")).expect("link"),
            Path::new("conf")
        );
        assert!(!rootfs.join("gone").exists());
    }

    #[test]
    fn deletions_cannot_escape_through_symlinks() {
        let t = tempfile::tempdir().expect("tempdir");
        let rootfs = t.path().join("rootfs");
        std::fs::create_dir_all(&rootfs).expect("mkdir");
        std::fs::create_dir_all(t.path().join("outside")).expect("mkdir");
        std::fs::write(t.path().join("outside/precious"), b"x").expect("write");
        std::os::unix::fs::symlink(t.path().join("outside"), rootfs.join("etc")).expect("symlink");
        assert!(inside(&rootfs, "etc/precious").is_err());
        assert!(inside(&rootfs, "../outside/precious").is_err());
        assert!(t.path().join("outside/precious").exists());
    }
}
