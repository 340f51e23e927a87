//! Writing a checkpoint's files back (a container's rootfs diff, an emptyDir volume) inside a
//! directory the kernel confines every operation to.
//!
//! A tenant controls what these archives hold (whatever its container wrote ends up in them) and
//! what the target rootfs holds (its image's files, symlinks such as `var/run -> /run` or
//! `etc -> /` included). So nothing here follows a symlink, in any path component, the last one
//! included, and nothing here names a file by a string resolved from `/` or from the root's path.
//!
//! # The rule
//!
//! Goal: applying a capture ([`crate::archive::rootfs::capture`]) onto a fresh mount of the container's
//! image gives exactly what the container saw through overlayfs, and nothing outside the root
//! changes.
//!
//! 1. The root is opened once (`O_RDONLY|O_DIRECTORY|O_NOFOLLOW|O_CLOEXEC`). Every directory
//!    beneath it is opened relative to that descriptor with `openat2` and `RESOLVE_BENEATH |
//!    RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: an entry's parent directory is resolved that
//!    way, and its last component is handled by `*at` calls that never follow it (`fstatat` and
//!    `fchownat` with `AT_SYMLINK_NOFOLLOW`, `openat` with `O_NOFOLLOW`, `unlinkat`, `mkdirat`,
//!    `symlinkat`, `mknodat`, `linkat` with flags 0); modes, owners and times of everything but
//!    symlinks are set through the opened descriptor (`fchown`, then `fchmod`, then `futimens`).
//! 2. Names are relative with normal components only; a leading `./` and a trailing `/` are
//!    ignored. `.` alone names the root itself: a directory entry for it sets the root's owner,
//!    mode and mtime (a volume archive starts with one). `..`, `.` inside a name, empty
//!    components, absolute names, NUL bytes: the whole archive is refused
//!    ([`Error::InvalidCheckpoint`]), and so are the same in a deletion or opaque path.
//! 3. The archive is read twice. A survey checks every entry's name, type, size and hard-link
//!    target name, and that every opaque directory is a directory entry, before anything is
//!    changed. Then entries are applied in order (a capture lists parents before children):
//!    - the parent must resolve beneath the root with no symlink and be a directory; if it is
//!      missing, a symlink or not a directory the archive is refused, naming the entry;
//!    - whatever is at the last component is removed first, unless it is a real directory and the
//!      entry is a directory too (a directory is removed recursively, by descriptor, never
//!      following a symlink), so a type change the container made is restored: an image symlink
//!      it replaced by a directory becomes a directory, and the other way round;
//!    - directory: created if missing, kept if a real directory; if it is opaque, it is emptied
//!      right away, before its children arrive; then owner and mode. Directory mtimes are set at
//!      the very end, after the deletions, since writing children changes them;
//!    - regular file: created `O_CREAT|O_EXCL|O_NOFOLLOW`, content copied (runs of zeros become
//!      holes), then owner, then the archived mode with setuid, setgid and sticky bits (after the
//!      owner: chown clears setuid), then mtime;
//!    - symlink: created with its target text, which is never interpreted; owner and mtime of the
//!      link itself;
//!    - hard link: its target, named in the archive, must be an existing regular file beneath
//!      the root (parent resolved as above, last component not followed); then `linkat` with
//!      flags 0. A target outside, missing, a symlink or anything else refuses the archive;
//!    - FIFO: `mknodat`, then owner, mode and mtime through a non-blocking descriptor;
//!    - device nodes and every other type: refused, podsnap never creates device nodes from a
//!      checkpoint;
//!    - owners are the archived numeric uid and gid; extended attributes are not applied; access
//!      times are left as they are;
//!    - an entry may not claim more bytes than the archive has left after its header, and a
//!      sparse file may not expand beyond [`MAX_SPARSE_FILE_BYTES`].
//! 4. Deletions come after the archive. Each path's parent is resolved as above: a missing parent,
//!    or one that is not a directory, means there is nothing to delete; a parent reached through
//!    a symlink refuses the apply as hostile, since a capture never has a whiteout there (overlay
//!    shows the upper's directory at that path, and that directory is in the archive). The last
//!    component is removed without following it: `unlinkat`, or recursively by descriptor for a
//!    real directory.
//! 5. An opaque path that is not a directory entry of the archive refuses it: a capture always
//!    archives the opaque directory itself.
//! 6. A volume archive is unpacked with the same entry handling, the volume directory as root,
//!    no deletions.
//!
//! A refusal found by the survey changes nothing. One found later (a parent that turns out to be
//! a symlink in the rootfs, a hard-link target that is not a regular file) leaves the root partly
//! written, still only beneath it; the restore fails and does not use it.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

use crate::error::{Error, Result};

mod at;
mod writer;

use writer::Writer;

/// The largest file a sparse archive entry may expand to. Its holes are read back as zeros, so
/// this bounds the time one entry can take.
pub const MAX_SPARSE_FILE_BYTES: u64 = 64 << 30;

/// Applies a rootfs capture (`tar_path`, and the `deleted` and `opaque` lists of its deletions
/// file `deletions_path`, named in errors) onto `rootfs`, a fresh mount of the container's
/// image, following the rule in the module header.
pub fn apply_changes(
    rootfs: &Path,
    tar_path: &Path,
    deleted: &[String],
    opaque: &[String],
    deletions_path: &Path,
) -> Result<()> {
    let deleted = parse_listed(deleted, deletions_path, "deleted")?;
    let opaque = parse_listed(opaque, deletions_path, "opaque")?;
    let archive = ArchiveFile::open(tar_path, "rootfs diff")?;
    let dirs = archive.survey()?;
    if let Some(missing) = opaque.iter().find(|p| !dirs.contains(*p)) {
        return Err(Error::InvalidCheckpoint {
            path: deletions_path.to_path_buf(),
            reason: format!(
                "opaque directory {missing} is not a directory entry of {}",
                tar_path.display()
            ),
        });
    }
    let root = Root::open(rootfs)?;
    let mut writer = Writer::new(&root, &archive, opaque.into_iter().collect());
    writer.apply_archive()?;
    let removed = writer.apply_deletions(&deleted, deletions_path)?;
    writer.set_directory_times();
    log::info!(
        "{}: applied {} archived entries and {removed} deletions",
        rootfs.display(),
        writer.entries
    );
    Ok(())
}

/// Unpacks a volume archive into `dst` with the same confined entry handling (no deletions).
pub fn unpack(tar_path: &Path, dst: &Path) -> Result<()> {
    let archive = ArchiveFile::open(tar_path, "volume archive")?;
    archive.survey()?;
    let root = Root::open(dst)?;
    let mut writer = Writer::new(&root, &archive, HashSet::new());
    writer.apply_archive()?;
    writer.set_directory_times();
    log::info!("{}: unpacked {} archived entries", dst.display(), writer.entries);
    Ok(())
}

/// A path beneath a confined root: normal components only; no components is the root itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RelPath(Vec<CString>);

impl RelPath {
    /// Parses an archived name or a listed path (the rule's point 2).
    fn parse(raw: &[u8]) -> std::result::Result<RelPath, String> {
        let shown = String::from_utf8_lossy(raw);
        if raw.is_empty() {
            return Err("an empty name".into());
        }
        if raw.contains(&0) {
            return Err(format!("{shown:?} contains a NUL byte"));
        }
        if raw.first() == Some(&b'/') {
            return Err(format!("{shown:?} is absolute"));
        }
        let mut rest = raw;
        while let Some(r) = rest.strip_prefix(b"./") {
            rest = r;
        }
        let rest = rest.strip_suffix(b"/").unwrap_or(rest);
        if rest.is_empty() || rest == b"." {
            return Ok(RelPath(Vec::new()));
        }
        let mut components = Vec::new();
        for c in rest.split(|b| *b == b'/') {
            match c {
                b"" => return Err(format!("{shown:?} has an empty component")),
                b"." => return Err(format!("{shown:?} has a `.` component")),
                b".." => return Err(format!("{shown:?} has a `..` component")),
                _ => components.push(CString::new(c).map_err(|_| format!("{shown:?} contains a NUL byte"))?),
            }
        }
        Ok(RelPath(components))
    }

    fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent's components and the last one; `None` for the root.
    fn split_last(&self) -> Option<(&[CString], &CStr)> {
        self.0
            .split_last()
            .map(|(last, parent)| (parent, last.as_c_str()))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            f.write_str(&c.to_string_lossy())?;
        }
        Ok(())
    }
}

/// Parses the paths a [`Deletions`] lists; the root itself is never one.
fn parse_listed(paths: &[String], file: &Path, list: &str) -> Result<Vec<RelPath>> {
    paths
        .iter()
        .map(|p| match RelPath::parse(p.as_bytes()) {
            Ok(rel) if rel.is_root() => Err(format!("{p:?} names the root itself")),
            other => other,
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|reason| Error::InvalidCheckpoint {
            path: file.to_path_buf(),
            reason: format!("{list} path {reason}"),
        })
}

/// The directory everything is written beneath.
struct Root {
    fd: OwnedFd,
    /// For messages only: no file is ever opened by this path after the root itself.
    path: PathBuf,
}

impl Root {
    fn open(path: &Path) -> Result<Root> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::open(path, flags, Mode::empty())
            .map_err(|e| Error::io("open the directory to restore into", path, e.into()))?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Opens the directory at `components` beneath the root, following no symlink in any of
    /// them, the last included.
    fn open_dir(&self, components: &[CString]) -> nix::Result<OwnedFd> {
        let mut joined = Vec::new();
        for (i, c) in components.iter().enumerate() {
            if i > 0 {
                joined.push(b'/');
            }
            joined.extend_from_slice(c.as_bytes());
        }
        if joined.is_empty() {
            joined.push(b'.');
        }
        let path = CString::new(joined).map_err(|_| Errno::EINVAL)?;
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        // EAGAIN: a rename raced the resolution; the kernel asks for a retry.
        let mut tries = 0;
        loop {
            match nix::fcntl::openat2(&self.fd, path.as_c_str(), how) {
                Err(Errno::EAGAIN) if tries < 8 => tries += 1,
                other => return other,
            }
        }
    }

    /// Where `rel` is, for messages.
    fn shown(&self, rel: &RelPath) -> PathBuf {
        self.path.join(rel.to_string())
    }
}

/// One archive being applied, for reading and for messages.
struct ArchiveFile<'a> {
    path: &'a Path,
    len: u64,
    /// "rootfs diff" or "volume archive".
    what: &'static str,
}

impl<'a> ArchiveFile<'a> {
    fn open(path: &'a Path, what: &'static str) -> Result<Self> {
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io("stat an archive", path, e))?
            .len();
        Ok(ArchiveFile { path, len, what })
    }

    fn reader(&self) -> Result<tar::Archive<BufReader<File>>> {
        let file = File::open(self.path).map_err(|e| Error::io("open an archive", self.path, e))?;
        Ok(tar::Archive::new(BufReader::new(file)))
    }

    fn refuse(&self, reason: String) -> Error {
        Error::InvalidCheckpoint {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn read_error(&self, e: std::io::Error) -> Error {
        Error::io("read an archive", self.path, e)
    }

    /// Checks every entry before anything is written; returns the directory entries.
    fn survey(&self) -> Result<HashSet<RelPath>> {
        let mut dirs = HashSet::new();
        let mut reader = self.reader()?;
        for entry in reader.entries_with_seek().map_err(|e| self.read_error(e))? {
            let entry = entry.map_err(|e| self.read_error(e))?;
            let planned = self.plan(&entry)?;
            if matches!(planned.kind, Kind::Directory) {
                dirs.insert(planned.name);
            }
        }
        Ok(dirs)
    }

    /// What an entry asks for, or why the archive is refused.
    fn plan<R: Read>(&self, entry: &tar::Entry<'_, R>) -> Result<Planned> {
        let raw = entry.path_bytes();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let name = RelPath::parse(&raw).map_err(|r| self.refuse(format!("entry name {r}")))?;
        let header = entry.header();
        let field = |what: &str, e: std::io::Error| self.refuse(format!("entry {shown:?}: bad {what}: {e}"));
        let kind = match header.entry_type() {
            tar::EntryType::Directory => Kind::Directory,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => Kind::File,
            tar::EntryType::Symlink => match entry.link_name_bytes() {
                Some(target) if !target.is_empty() && !target.contains(&0) => {
                    Kind::Symlink(target.into_owned())
                }
                _ => return Err(self.refuse(format!("symlink {shown:?} has no valid target"))),
            },
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default();
                match RelPath::parse(&target) {
                    Ok(t) if !t.is_root() && t != name => Kind::HardLink(t),
                    Ok(_) => {
                        return Err(self.refuse(format!("hard link {shown:?} links to the root or to itself")))
                    }
                    Err(r) => return Err(self.refuse(format!("hard link {shown:?}: target {r}"))),
                }
            }
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(self.refuse(format!(
                    "device node {shown:?} in a {} is refused: podsnap never creates device nodes \
                     from a checkpoint",
                    self.what
                )))
            }
            other => {
                return Err(self.refuse(format!(
                    "entry {shown:?} of type {other:?} in a {} is refused",
                    self.what
                )))
            }
        };
        if name.is_root() && !matches!(kind, Kind::Directory) {
            return Err(self.refuse(format!("entry {shown:?} names the root but is not a directory")));
        }
        let stored = header.entry_size().map_err(|e| field("size", e))?;
        let left = self.len.saturating_sub(entry.raw_file_position());
        if stored > left {
            return Err(self.refuse(format!(
                "entry {shown:?} claims {stored} bytes but the archive has {left} left"
            )));
        }
        if entry.size() > stored && entry.size() > MAX_SPARSE_FILE_BYTES {
            return Err(self.refuse(format!(
                "sparse file {shown:?} expands to {} bytes, more than {MAX_SPARSE_FILE_BYTES}",
                entry.size()
            )));
        }
        let id = |what: &str, v: std::io::Result<u64>| {
            let v = v.map_err(|e| field(what, e))?;
            u32::try_from(v).map_err(|_| self.refuse(format!("entry {shown:?}: {what} {v} is out of range")))
        };
        let uid = id("uid", header.uid())?;
        let gid = id("gid", header.gid())?;
        let mode = header.mode().map_err(|e| field("mode", e))? & 0o7777;
        let mtime = header
            .mtime()
            .ok()
            .and_then(|s| libc::time_t::try_from(s).ok())
            .map(|s| TimeSpec::new(s, 0));
        Ok(Planned {
            name,
            shown,
            kind,
            uid,
            gid,
            mode,
            mtime,
        })
    }
}

/// What one archive entry becomes.
enum Kind {
    Directory,
    File,
    /// The target text, never interpreted.
    Symlink(Vec<u8>),
    /// The existing file this is another name of.
    HardLink(RelPath),
    Fifo,
}

/// An entry that passed the checks.
struct Planned {
    name: RelPath,
    /// The name as archived, for messages.
    shown: String,
    kind: Kind,
    uid: u32,
    gid: u32,
    /// Permission bits with setuid, setgid and sticky.
    mode: u32,
    mtime: Option<TimeSpec>,
}

impl Planned {
    fn owner(&self) -> (Option<Uid>, Option<Gid>) {
        (Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid)))
    }

    fn mode(&self) -> Mode {
        Mode::from_bits_truncate(self.mode as libc::mode_t)
    }
}

#[cfg(test)]
mod tests;
