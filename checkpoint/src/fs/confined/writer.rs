//! The writer: one archive (and the deletions) applied beneath a root, every name opened
//! with `openat2` beneath it (see the parent module for the rule).

use crate::error::{Error, Result};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::at::*;
use super::*;

/// Applies one archive (and deletions) beneath a root.
pub(super) struct Writer<'a> {
    root: &'a Root,
    archive: &'a ArchiveFile<'a>,
    /// Opaque directories not yet emptied.
    opaque: HashSet<RelPath>,
    /// Directory mtimes, set last.
    dir_times: Vec<(RelPath, TimeSpec)>,
    pub(super) entries: u64,
}

impl<'a> Writer<'a> {
    pub(super) fn new(root: &'a Root, archive: &'a ArchiveFile<'a>, opaque: HashSet<RelPath>) -> Self {
        Writer {
            root,
            archive,
            opaque,
            dir_times: Vec::new(),
            entries: 0,
        }
    }

    pub(super) fn apply_archive(&mut self) -> Result<()> {
        let mut reader = self.archive.reader()?;
        for entry in reader.entries().map_err(|e| self.archive.read_error(e))? {
            let mut entry = entry.map_err(|e| self.archive.read_error(e))?;
            let planned = self.archive.plan(&entry)?;
            self.apply_entry(&planned, &mut entry)?;
            self.entries += 1;
        }
        if let Some(left) = self.opaque.iter().next() {
            return Err(self.archive.refuse(format!(
                "opaque directory {left} is not a directory entry of the archive"
            )));
        }
        Ok(())
    }

    pub(super) fn apply_entry(&mut self, p: &Planned, content: &mut impl Read) -> Result<()> {
        let Some((parent_path, name)) = p.name.split_last() else {
            return self.apply_root(p);
        };
        let parent = self
            .root
            .open_dir(parent_path)
            .map_err(|e| self.parent_error(&p.shown, "its parent", e))?;
        let parent = parent.as_fd();
        let io = |context: &'static str, e: Errno| Error::io(context, self.root.shown(&p.name), e.into());
        match &p.kind {
            Kind::Directory => {
                let existing = stat_at(parent, name).map_err(|e| io("stat an existing file", e))?;
                match existing {
                    Some(st) if is_dir(&st) => {}
                    Some(st) => {
                        remove_at(parent, name, &st)
                            .map_err(|e| io("remove what a directory replaces", e))?;
                        make_dir(parent, name).map_err(|e| io("create a directory", e))?;
                    }
                    None => make_dir(parent, name).map_err(|e| io("create a directory", e))?,
                }
                let dir = open_subdir(parent, name).map_err(|e| io("open a directory", e))?;
                if self.opaque.remove(&p.name) {
                    empty_dir(dir.as_fd()).map_err(|e| io("empty an opaque directory", e))?;
                }
                self.set_owner_and_mode(&dir, p)?;
                if let Some(t) = p.mtime {
                    self.dir_times.push((p.name.clone(), t));
                }
            }
            Kind::File => {
                clear_at(parent, name).map_err(|e| io("remove what a file replaces", e))?;
                let flags =
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let fd = nix::fcntl::openat(parent, name, flags, Mode::from_bits_truncate(0o600))
                    .map_err(|e| io("create a file", e))?;
                let file = File::from(fd);
                self.write_content(&file, content, p)?;
                self.set_owner_and_mode(&file, p)?;
                set_mtime(&file, p.mtime).map_err(|e| io("set a file's mtime", e))?;
            }
            Kind::Symlink(target) => {
                clear_at(parent, name).map_err(|e| io("remove what a symlink replaces", e))?;
                nix::unistd::symlinkat(target.as_slice(), parent, name)
                    .map_err(|e| io("create a symlink", e))?;
                let (uid, gid) = p.owner();
                nix::unistd::fchownat(parent, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|e| io("set a symlink's owner", e))?;
                if let Some(t) = p.mtime {
                    nix::sys::stat::utimensat(
                        parent,
                        name,
                        &TimeSpec::UTIME_OMIT,
                        &t,
                        UtimensatFlags::NoFollowSymlink,
                    )
                    .map_err(|e| io("set a symlink's mtime", e))?;
                }
            }
            Kind::HardLink(target) => {
                let Some((target_parent_path, target_name)) = target.split_last() else {
                    return Err(self
                        .archive
                        .refuse(format!("hard link {:?} links to the root", p.shown)));
                };
                let target_parent = self
                    .root
                    .open_dir(target_parent_path)
                    .map_err(|e| self.parent_error(&p.shown, "its hard-link target's parent", e))?;
                let target_parent = target_parent.as_fd();
                match stat_at(target_parent, target_name).map_err(|e| io("stat a hard-link target", e))? {
                    Some(st) if file_type(&st) == SFlag::S_IFREG => {}
                    Some(_) => {
                        return Err(self.archive.refuse(format!(
                            "hard link {:?}: target {target} is not a regular file",
                            p.shown
                        )))
                    }
                    None => {
                        return Err(self
                            .archive
                            .refuse(format!("hard link {:?}: target {target} does not exist", p.shown)))
                    }
                }
                clear_at(parent, name).map_err(|e| io("remove what a hard link replaces", e))?;
                nix::unistd::linkat(target_parent, target_name, parent, name, AtFlags::empty())
                    .map_err(|e| io("create a hard link", e))?;
            }
            Kind::Fifo => {
                clear_at(parent, name).map_err(|e| io("remove what a FIFO replaces", e))?;
                nix::sys::stat::mknodat(parent, name, SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0)
                    .map_err(|e| io("create a FIFO", e))?;
                // Non-blocking: opening a FIFO for reading does not wait for a writer.
                let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let fd = nix::fcntl::openat(parent, name, flags, Mode::empty())
                    .map_err(|e| io("open a FIFO", e))?;
                let st = nix::sys::stat::fstat(&fd).map_err(|e| io("stat a FIFO", e))?;
                if file_type(&st) != SFlag::S_IFIFO {
                    return Err(io("open a FIFO", Errno::EINVAL));
                }
                self.set_owner_and_mode(&fd, p)?;
                set_mtime(&fd, p.mtime).map_err(|e| io("set a FIFO's mtime", e))?;
            }
        }
        Ok(())
    }

    /// The `.` entry: owner, mode and mtime of the root directory itself.
    pub(super) fn apply_root(&mut self, p: &Planned) -> Result<()> {
        self.set_owner_and_mode(&self.root.fd, p)?;
        if let Some(t) = p.mtime {
            self.dir_times.push((p.name.clone(), t));
        }
        Ok(())
    }

    /// Owner first: chown clears setuid and setgid, which the mode then sets again.
    pub(super) fn set_owner_and_mode(&self, fd: &impl AsFd, p: &Planned) -> Result<()> {
        let (uid, gid) = p.owner();
        nix::unistd::fchown(fd, uid, gid)
            .map_err(|e| Error::io("set an owner", self.root.shown(&p.name), e.into()))?;
        nix::sys::stat::fchmod(fd, p.mode())
            .map_err(|e| Error::io("set a mode", self.root.shown(&p.name), e.into()))
    }

    /// Copies a regular file's content; runs of zeros are left as holes.
    pub(super) fn write_content(&self, file: &File, content: &mut impl Read, p: &Planned) -> Result<()> {
        const CHUNK: usize = 64 * 1024;
        let shown = || self.root.shown(&p.name);
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        loop {
            let mut filled = 0;
            while filled < CHUNK {
                match content.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.archive.read_error(e)),
                }
            }
            if filled == 0 {
                break;
            }
            let chunk = &buf[..filled];
            if chunk.iter().any(|b| *b != 0) {
                file.write_all_at(chunk, offset)
                    .map_err(|e| Error::io("write a file", shown(), e))?;
            }
            offset += filled as u64;
        }
        file.set_len(offset)
            .map_err(|e| Error::io("write a file", shown(), e))
    }

    /// Removes each deleted path (the rule's point 4); returns how many were there.
    pub(super) fn apply_deletions(&mut self, deleted: &[RelPath], deletions_path: &Path) -> Result<u64> {
        let mut removed = 0;
        for rel in deleted {
            let Some((parent_path, name)) = rel.split_last() else {
                continue;
            };
            let parent = match self.root.open_dir(parent_path) {
                Ok(fd) => fd,
                Err(Errno::ENOENT | Errno::ENOTDIR) => {
                    log::debug!(
                        "{}: no parent directory, nothing to delete",
                        self.root.shown(rel).display()
                    );
                    continue;
                }
                Err(Errno::ELOOP | Errno::EXDEV) => {
                    return Err(Error::InvalidCheckpoint {
                        path: deletions_path.to_path_buf(),
                        reason: format!(
                            "deleted path {rel} passes through a symlink in the rootfs; a capture never \
                             has one there"
                        ),
                    })
                }
                Err(e) => {
                    return Err(Error::io(
                        "open a deleted path's parent directory",
                        self.root.shown(rel),
                        e.into(),
                    ))
                }
            };
            let io = |e: Errno| Error::io("remove a deleted path", self.root.shown(rel), e.into());
            match stat_at(parent.as_fd(), name).map_err(io)? {
                Some(st) => {
                    remove_at(parent.as_fd(), name, &st).map_err(io)?;
                    removed += 1;
                }
                None => log::debug!("{}: already absent", self.root.shown(rel).display()),
            }
        }
        Ok(removed)
    }

    /// Directory mtimes, once nothing more is written beneath them. A directory that is gone or
    /// no longer a directory (a later entry replaced it) is skipped: mtimes are best effort.
    pub(super) fn set_directory_times(&mut self) {
        for (rel, t) in self.dir_times.drain(..).rev() {
            let result = if rel.is_root() {
                set_mtime(&self.root.fd, Some(t))
            } else {
                self.root.open_dir(&rel.0).and_then(|fd| set_mtime(&fd, Some(t)))
            };
            if let Err(e) = result {
                log::debug!("{}: mtime not set: {e}", self.root.shown(&rel).display());
            }
        }
    }

    /// The error for a parent directory that does not resolve beneath the root.
    pub(super) fn parent_error(&self, shown: &str, which: &str, e: Errno) -> Error {
        let why = match e {
            Errno::ELOOP => "passes through a symlink",
            Errno::EXDEV => "leaves the root",
            Errno::ENOENT => "does not exist (a capture lists parents before children)",
            Errno::ENOTDIR => "is not a directory",
            other => {
                return Error::io(
                    "open an entry's parent directory",
                    self.root.path.join(shown),
                    other.into(),
                )
            }
        };
        self.archive.refuse(format!("entry {shown:?}: {which} {why}"))
    }
}
