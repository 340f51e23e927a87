//! A container's root filesystem changes: captured from its overlay upper directory at dump,
//! applied onto the new container's rootfs at restore; and emptyDir volumes, archived whole.
//!
//! The capture is a tar of every file, directory, symlink and FIFO the container added or
//! changed (parents before children; a regular file with several names in the upper directory is
//! archived once, its other names as hard links), plus a JSON list of what it deleted (overlay
//! whiteouts) and of directories it replaced whole (opaque directories). Sockets and device
//! nodes are not archived. Applying it needs no overlay and happens in [`crate::fs::confined`],
//! which never follows a symlink and never writes outside the rootfs.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use podsnap_runtime::mountinfo;

use crate::error::{Error, Result};
use crate::format::deletions::Deletions;
use crate::fs::private::create_private;

/// The overlay upper directory of the filesystem mounted at `mountpoint`, if it is an overlay
/// with one (the dump's size estimate; the dump itself asks [`upperdir_for_dump`]).
pub fn upperdir_of(mountpoint: &Path) -> Option<PathBuf> {
    let mounts = mountinfo::read_self().ok()?;
    mountinfo::top_at(&mounts, mountpoint)?.overlay_upperdir()
}

/// The overlay lower directories (the image's layers, top first) of the filesystem mounted at
/// `mountpoint`, if it is an overlay.
pub fn lowerdirs_of(mountpoint: &Path) -> Option<Vec<String>> {
    let mounts = mountinfo::read_self().ok()?;
    let top = mountinfo::top_at(&mounts, mountpoint).filter(|m| m.is_overlay())?;
    Some(
        top.overlay_lowerdirs()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect(),
    )
}

/// Where the dump finds `container`'s file changes: the upper directory of the overlay mounted
/// at its `rootfs` (`None`: a read-only overlay, where nothing can change). Anything else is an
/// error naming the container, since a checkpoint without its file changes would lose them.
pub fn upperdir_for_dump(container: &str, rootfs: &Path) -> Result<Option<PathBuf>> {
    let refuse = |reason: String| Error::RootfsChanges {
        container: container.to_owned(),
        reason,
    };
    let mounts = mountinfo::read_self().map_err(|e| refuse(e.to_string()))?;
    upperdir_in(&mounts, rootfs).map_err(refuse)
}

fn upperdir_in(mounts: &[mountinfo::Mount], rootfs: &Path) -> std::result::Result<Option<PathBuf>, String> {
    let Some(top) = mountinfo::top_at(mounts, rootfs) else {
        return Err(format!("nothing is mounted at {}", rootfs.display()));
    };
    if !top.is_overlay() {
        return Err(format!(
            "{} is a {} mount, not an overlay",
            rootfs.display(),
            top.fs_type
        ));
    }
    let Some(upper) = top.overlay_upperdir() else {
        if top.super_options().iter().any(|(name, _)| name == b"ro") {
            return Ok(None);
        }
        return Err(format!(
            "the overlay at {} is writable but names no upper directory",
            rootfs.display()
        ));
    };
    match std::fs::symlink_metadata(&upper) {
        Ok(meta) if meta.is_dir() => Ok(Some(upper)),
        Ok(_) => Err(format!(
            "the upper directory of the overlay at {} is not a directory: {}",
            rootfs.display(),
            upper.display()
        )),
        Err(e) => Err(format!(
            "the upper directory of the overlay at {} ({}): {e}",
            rootfs.display(),
            upper.display()
        )),
    }
}

/// Captures the changes in `upper` into `tar_path` and `deletions_path`; returns how many
/// entries the archive holds.
pub fn capture(upper: &Path, tar_path: &Path, deletions_path: &Path) -> Result<u64> {
    let mut archive = TreeArchive::create(tar_path)?;
    let mut deletions = Deletions::default();
    archive.append_tree(upper, Some(&mut deletions))?;
    let count = archive.finish()?;
    let json = serde_json::to_vec_pretty(&deletions)
        .map_err(|e| Error::io("encode deletions", deletions_path, e.into()))?;
    crate::fs::private::write_private(deletions_path, &json)?;
    Ok(count)
}

fn is_opaque(dir: &Path) -> bool {
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

/// Applies captured changes onto a mounted `rootfs`, confined to it: see [`crate::fs::confined`].
pub fn apply(rootfs: &Path, tar_path: &Path, deletions_path: &Path) -> Result<()> {
    let deletions = Deletions::read(deletions_path)?;
    crate::fs::confined::apply_changes(
        rootfs,
        tar_path,
        &deletions.deleted,
        &deletions.opaque,
        deletions_path,
    )
}

/// Unpacks a volume archive into `dst`, confined to it: see [`crate::fs::confined`].
pub fn unpack(tar_path: &Path, dst: &Path) -> Result<()> {
    crate::fs::confined::unpack(tar_path, dst)
}

/// Archives a directory's contents (an emptyDir volume) into `tar_path`: a `.` entry for the
/// directory itself, then everything beneath it as [`capture`] archives it.
pub fn archive_dir(src: &Path, tar_path: &Path) -> Result<()> {
    let mut archive = TreeArchive::create(tar_path)?;
    let meta = std::fs::symlink_metadata(src).map_err(|e| Error::io("stat a volume", src, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            "archive a volume",
            src,
            std::io::Error::other("not a directory"),
        ));
    }
    archive.append(src, Path::new("."), &meta)?;
    archive.append_tree(src, None)?;
    archive.finish().map(drop)
}

/// A tar being written from a directory tree: parents before children, a multiply-linked
/// regular file once and then as hard links, FIFOs, no sockets or device nodes.
struct TreeArchive {
    builder: tar::Builder<std::io::BufWriter<std::fs::File>>,
    path: PathBuf,
    /// The archived name of each regular file with several names, by (device, inode).
    first_names: HashMap<(u64, u64), PathBuf>,
    entries: u64,
}

impl TreeArchive {
    fn create(path: &Path) -> Result<TreeArchive> {
        let file = create_private(path)?;
        let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
        builder.follow_symlinks(false);
        Ok(TreeArchive {
            builder,
            path: path.to_path_buf(),
            first_names: HashMap::new(),
            entries: 0,
        })
    }

    /// Archives everything beneath `src`, named relative to it. With `deletions`, `src` is an
    /// overlay upper directory: its whiteouts are recorded as deleted instead of archived, and
    /// its opaque directories as opaque (and archived).
    fn append_tree(&mut self, src: &Path, mut deletions: Option<&mut Deletions>) -> Result<()> {
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = src.join(&rel);
            let mut names = std::fs::read_dir(&dir)
                .and_then(|entries| {
                    entries
                        .map(|e| e.map(|e| e.file_name()))
                        .collect::<std::io::Result<Vec<_>>>()
                })
                .map_err(|e| Error::io("read a directory to archive", &dir, e))?;
            names.sort();
            for name in names {
                let path = dir.join(&name);
                let rel_name = rel.join(&name);
                let meta = std::fs::symlink_metadata(&path)
                    .map_err(|e| Error::io("stat a file to archive", &path, e))?;
                let ft = meta.file_type();
                if let Some(d) = deletions.as_deref_mut() {
                    if ft.is_char_device() && meta.rdev() == 0 {
                        d.deleted.push(rel_name.to_string_lossy().into_owned());
                        continue;
                    }
                    if ft.is_dir() && is_opaque(&path) {
                        d.opaque.push(rel_name.to_string_lossy().into_owned());
                    }
                }
                if self.append(&path, &rel_name, &meta)? && ft.is_dir() {
                    stack.push(rel_name);
                }
            }
        }
        Ok(())
    }

    /// Archives the file at `path` as `name`; false if it is of a type that is not archived.
    fn append(&mut self, path: &Path, name: &Path, meta: &std::fs::Metadata) -> Result<bool> {
        let ft = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
        header.set_size(0);
        let written = if ft.is_file() {
            let key = (meta.dev(), meta.ino());
            match self.first_names.get(&key) {
                Some(first) if meta.nlink() > 1 => {
                    header.set_entry_type(tar::EntryType::Link);
                    let first = first.as_os_str().as_bytes().to_vec();
                    self.append_with_link_name(&mut header, name, &first)
                }
                _ => {
                    if meta.nlink() > 1 {
                        self.first_names.insert(key, name.to_path_buf());
                    }
                    std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(path)
                        .and_then(|mut file| self.builder.append_file(name, &mut file))
                }
            }
        } else if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            self.builder.append_data(&mut header, name, std::io::empty())
        } else if ft.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            std::fs::read_link(path).and_then(|target| {
                self.append_with_link_name(&mut header, name, target.as_os_str().as_bytes())
            })
        } else if ft.is_fifo() {
            header.set_entry_type(tar::EntryType::Fifo);
            self.builder.append_data(&mut header, name, std::io::empty())
        } else {
            log::debug!("{}: a socket or device node, not archived", path.display());
            return Ok(false);
        };
        written.map_err(|e| Error::io("archive a file", path, e))?;
        self.entries += 1;
        Ok(true)
    }

    /// Appends a symlink or hard link entry whose link name is exactly `target` (the builder's
    /// own link-name handling normalizes it: a symlink to `/` would point to `//`). A target
    /// longer than the header's field goes first in a GNU long-link entry.
    fn append_with_link_name(
        &mut self,
        header: &mut tar::Header,
        name: &Path,
        target: &[u8],
    ) -> std::io::Result<()> {
        let field_len = header.as_old().linkname.len();
        if target.len() > field_len {
            let mut long = tar::Header::new_gnu();
            let marker = b"././@LongLink";
            long.as_old_mut().name[..marker.len()].copy_from_slice(marker);
            long.set_mode(0o644);
            long.set_mtime(0);
            long.set_entry_type(tar::EntryType::GNULongLink);
            long.set_size(target.len() as u64 + 1);
            long.set_cksum();
            self.builder.append(&long, target.chain(&[0u8][..]))?;
        }
        let field = &mut header.as_old_mut().linkname;
        let n = target.len().min(field_len);
        field.fill(0);
        field[..n].copy_from_slice(&target[..n]);
        self.builder.append_data(header, name, std::io::empty())
    }

    /// Ends the archive; returns how many entries it holds. Not synced: it is written while
    /// the pod is frozen, and an fsync there waits for the disk (the dump's digests make a
    /// checkpoint torn by a crash fail verification; `--stop` syncs the whole checkpoint
    /// before the pod is killed, see the pod dump).
    fn finish(self) -> Result<u64> {
        let mut out = self
            .builder
            .into_inner()
            .map_err(|e| Error::io("finish an archive", &self.path, e))?;
        out.flush()
            .map_err(|e| Error::io("finish an archive", &self.path, e))?;
        Ok(self.entries)
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
