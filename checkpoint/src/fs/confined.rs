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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use crate::error::{Error, Result};

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

/// Applies one archive (and deletions) beneath a root.
struct Writer<'a> {
    root: &'a Root,
    archive: &'a ArchiveFile<'a>,
    /// Opaque directories not yet emptied.
    opaque: HashSet<RelPath>,
    /// Directory mtimes, set last.
    dir_times: Vec<(RelPath, TimeSpec)>,
    entries: u64,
}

impl<'a> Writer<'a> {
    fn new(root: &'a Root, archive: &'a ArchiveFile<'a>, opaque: HashSet<RelPath>) -> Self {
        Writer {
            root,
            archive,
            opaque,
            dir_times: Vec::new(),
            entries: 0,
        }
    }

    fn apply_archive(&mut self) -> Result<()> {
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

    fn apply_entry(&mut self, p: &Planned, content: &mut impl Read) -> Result<()> {
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
    fn apply_root(&mut self, p: &Planned) -> Result<()> {
        self.set_owner_and_mode(&self.root.fd, p)?;
        if let Some(t) = p.mtime {
            self.dir_times.push((p.name.clone(), t));
        }
        Ok(())
    }

    /// Owner first: chown clears setuid and setgid, which the mode then sets again.
    fn set_owner_and_mode(&self, fd: &impl AsFd, p: &Planned) -> Result<()> {
        let (uid, gid) = p.owner();
        nix::unistd::fchown(fd, uid, gid)
            .map_err(|e| Error::io("set an owner", self.root.shown(&p.name), e.into()))?;
        nix::sys::stat::fchmod(fd, p.mode())
            .map_err(|e| Error::io("set a mode", self.root.shown(&p.name), e.into()))
    }

    /// Copies a regular file's content; runs of zeros are left as holes.
    fn write_content(&self, file: &File, content: &mut impl Read, p: &Planned) -> Result<()> {
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
    fn apply_deletions(&mut self, deleted: &[RelPath], deletions_path: &Path) -> Result<u64> {
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
    fn set_directory_times(&mut self) {
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
    fn parent_error(&self, shown: &str, which: &str, e: Errno) -> Error {
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

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn is_dir(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFDIR
}

/// What is at `name` in `dir`, without following it; `None` if nothing is.
fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> nix::Result<Option<FileStat>> {
    match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes whatever is at `name` in `dir`, a directory recursively.
fn clear_at(dir: BorrowedFd<'_>, name: &CStr) -> nix::Result<()> {
    match stat_at(dir, name)? {
        Some(st) => remove_at(dir, name, &st),
        None => Ok(()),
    }
}

/// Removes `name` in `dir`, which `st` describes: `unlinkat` for anything but a directory, the
/// directory's contents by descriptor and then the directory.
fn remove_at(dir: BorrowedFd<'_>, name: &CStr, st: &FileStat) -> nix::Result<()> {
    if is_dir(st) {
        let sub = open_subdir(dir, name)?;
        empty_dir(sub.as_fd())?;
        nix::unistd::unlinkat(dir, name, UnlinkatFlags::RemoveDir)
    } else {
        nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
    }
}

/// Created owner-only; the archived mode is set once the owner is.
fn make_dir(dir: BorrowedFd<'_>, name: &CStr) -> nix::Result<()> {
    nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o700))
}

/// Opens the real directory `name` in `dir`; a symlink there fails (`O_NOFOLLOW`).
fn open_subdir(dir: BorrowedFd<'_>, name: &CStr) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    nix::fcntl::openat(dir, name, flags, Mode::empty())
}

fn set_mtime(fd: &impl AsFd, mtime: Option<TimeSpec>) -> nix::Result<()> {
    match mtime {
        Some(t) => nix::sys::stat::futimens(fd, &TimeSpec::UTIME_OMIT, &t),
        None => Ok(()),
    }
}

/// Removes everything in the directory `dir`, depth first, by descriptor: real subdirectories
/// are descended into, symlinks are unlinked, never followed. Iterative, so a deep tree costs
/// one descriptor per level and no stack.
fn empty_dir(dir: BorrowedFd<'_>) -> nix::Result<()> {
    struct Level {
        fd: OwnedFd,
        name: CString,
        subdirs: Vec<CString>,
    }
    let mut top_subdirs = remove_non_dirs(dir)?;
    let mut stack: Vec<Level> = Vec::new();
    loop {
        let (current, subdirs) = match stack.last_mut() {
            Some(level) => (level.fd.as_fd(), &mut level.subdirs),
            None => (dir, &mut top_subdirs),
        };
        match subdirs.pop() {
            Some(name) => {
                let fd = open_subdir(current, &name)?;
                let subdirs = remove_non_dirs(fd.as_fd())?;
                stack.push(Level { fd, name, subdirs });
            }
            None => {
                let Some(done) = stack.pop() else {
                    return Ok(());
                };
                drop(done.fd);
                let parent = stack.last().map_or(dir, |l| l.fd.as_fd());
                nix::unistd::unlinkat(parent, done.name.as_c_str(), UnlinkatFlags::RemoveDir)?;
            }
        }
    }
}

/// Unlinks every entry of `dir` but its real subdirectories, whose names it returns.
fn remove_non_dirs(dir: BorrowedFd<'_>) -> nix::Result<Vec<CString>> {
    let mut subdirs = Vec::new();
    for name in list_dir(dir)? {
        match stat_at(dir, &name)? {
            Some(st) if is_dir(&st) => subdirs.push(name),
            Some(_) => nix::unistd::unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir)?,
            None => {}
        }
    }
    Ok(subdirs)
}

/// The names in the directory `dir` (not `.` and `..`).
fn list_dir(dir: BorrowedFd<'_>) -> nix::Result<Vec<CString>> {
    // A descriptor of its own, so the listing starts at the beginning and closing it is ours.
    let own = nix::fcntl::openat(
        dir,
        c".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in nix::dir::Dir::from_fd(own)?.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::deletions::Deletions;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// [`apply_changes`] with the lists read from a deletions file, as a restore does.
    pub(super) fn apply_file(rootfs: &Path, tar: &Path, deletions: &Path) -> Result<()> {
        let d = Deletions::read(deletions)?;
        apply_changes(rootfs, tar, &d.deleted, &d.opaque, deletions)
    }

    #[test]
    fn names_are_relative_and_normal() {
        let ok = |raw: &str| RelPath::parse(raw.as_bytes()).map(|p| p.to_string());
        assert_eq!(ok("etc/passwd").as_deref(), Ok("etc/passwd"));
        assert_eq!(ok("./etc/app/").as_deref(), Ok("etc/app"));
        assert_eq!(ok(".").as_deref(), Ok("."));
        assert_eq!(ok("./").as_deref(), Ok("."));
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "./..",
            "a/..",
        ] {
            assert!(RelPath::parse(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
        assert!(RelPath::parse(b"a\0b").is_err());
    }

    /// A rootfs and a canary beside it, in one temporary directory.
    struct Fixture {
        tmp: tempfile::TempDir,
        rootfs: PathBuf,
        canary: PathBuf,
        canary_before: BTreeMap<PathBuf, String>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().expect("tempdir");
            let rootfs = tmp.path().join("rootfs");
            let canary = tmp.path().join("canary");
            std::fs::create_dir_all(&rootfs).expect("mkdir rootfs");
            std::fs::create_dir_all(canary.join("sub")).expect("mkdir canary");
            std::fs::write(canary.join("file"), b"canary file").expect("write");
            std::fs::write(canary.join("x"), b"canary x").expect("write");
            std::fs::write(canary.join("passwd"), b"root:x:0:0").expect("write");
            std::fs::write(canary.join("sub/deep"), b"deep").expect("write");
            std::fs::set_permissions(canary.join("file"), std::fs::Permissions::from_mode(0o640))
                .expect("chmod");
            let canary_before = describe(&canary);
            Fixture {
                tmp,
                rootfs,
                canary,
                canary_before,
            }
        }

        fn assert_canary_untouched(&self) {
            assert_eq!(describe(&self.canary), self.canary_before, "the canary changed");
        }

        fn path(&self, name: &str) -> PathBuf {
            self.tmp.path().join(name)
        }

        /// Writes `entries` as a tar and `deletions` as JSON; applies them to the rootfs.
        fn apply(&self, entries: &[Raw], deleted: &[&str], opaque: &[&str]) -> Result<()> {
            let tar = self.path("diff.tar");
            write_tar(&tar, entries);
            let del = self.path("deleted.json");
            let d = Deletions {
                deleted: deleted.iter().map(|s| s.to_string()).collect(),
                opaque: opaque.iter().map(|s| s.to_string()).collect(),
            };
            std::fs::write(&del, serde_json::to_vec(&d).expect("json")).expect("write");
            apply_file(&self.rootfs, &tar, &del)
        }
    }

    /// Every file beneath `dir`: type, mode, owner, content or link target. Never follows.
    fn describe(dir: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir") {
                let p = e.expect("entry").path();
                let m = std::fs::symlink_metadata(&p).expect("lstat");
                let what = if m.is_dir() {
                    stack.push(p.clone());
                    "dir".to_string()
                } else if m.file_type().is_symlink() {
                    format!("symlink {:?}", std::fs::read_link(&p).expect("readlink"))
                } else if m.is_file() {
                    format!("file {:?}", std::fs::read(&p).expect("read"))
                } else {
                    "other".to_string()
                };
                out.insert(p, format!("{what} {:o} {}:{}", m.mode(), m.uid(), m.gid()));
            }
        }
        out
    }

    /// An archive entry as raw header fields, so hostile names can be written.
    struct Raw {
        name: Vec<u8>,
        kind: tar::EntryType,
        mode: u32,
        uid: u64,
        gid: u64,
        link: Vec<u8>,
        data: Vec<u8>,
        /// Overrides the header's size field (a lie about the data).
        claimed_size: Option<u64>,
    }

    impl Raw {
        fn new(name: &str, kind: tar::EntryType) -> Raw {
            Raw {
                name: name.as_bytes().to_vec(),
                kind,
                mode: if kind == tar::EntryType::Directory {
                    0o755
                } else {
                    0o644
                },
                uid: 0,
                gid: 0,
                link: Vec::new(),
                data: Vec::new(),
                claimed_size: None,
            }
        }
        fn dir(name: &str) -> Raw {
            Raw::new(name, tar::EntryType::Directory)
        }
        fn file(name: &str, data: &[u8]) -> Raw {
            Raw {
                data: data.to_vec(),
                ..Raw::new(name, tar::EntryType::Regular)
            }
        }
        fn link(name: &str, kind: tar::EntryType, target: &str) -> Raw {
            Raw {
                link: target.as_bytes().to_vec(),
                ..Raw::new(name, kind)
            }
        }
    }

    fn write_tar(path: &Path, entries: &[Raw]) {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            let gnu = h.as_gnu_mut().expect("gnu header");
            gnu.name[..e.name.len()].copy_from_slice(&e.name);
            gnu.linkname[..e.link.len()].copy_from_slice(&e.link);
            h.set_entry_type(e.kind);
            h.set_mode(e.mode);
            h.set_uid(e.uid);
            h.set_gid(e.gid);
            h.set_mtime(1_700_000_000);
            h.set_size(e.claimed_size.unwrap_or(e.data.len() as u64));
            h.set_cksum();
            b.append(&h, e.data.as_slice()).expect("append");
        }
        std::fs::write(path, b.into_inner().expect("tar")).expect("write tar");
    }

    fn symlink(target: &Path, at: &Path) {
        std::os::unix::fs::symlink(target, at).expect("symlink");
    }

    #[test]
    fn escaping_names_are_refused_before_anything_is_written() {
        let f = Fixture::new();
        let abs = format!("{}/x", f.canary.display());
        for bad in ["../canary/x", abs.as_str(), "a/../../x", "/abs/x", ""] {
            let err = f
                .apply(&[Raw::file("ok", b"first"), Raw::file(bad, b"evil")], &[], &[])
                .expect_err(bad);
            assert!(matches!(err, Error::InvalidCheckpoint { .. }), "{bad:?}: {err}");
            assert!(
                !f.rootfs.join("ok").exists(),
                "{bad:?}: the survey let a write through"
            );
            f.assert_canary_untouched();
        }
        for bad in ["../canary/x", abs.as_str(), "a/../../x", ""] {
            assert!(f.apply(&[], &[bad], &[]).is_err(), "deletion {bad:?}");
            assert!(f.apply(&[], &[], &[bad]).is_err(), "opaque {bad:?}");
            f.assert_canary_untouched();
        }
    }

    #[test]
    fn a_symlinked_parent_is_never_written_through() {
        let f = Fixture::new();
        symlink(&f.canary, &f.rootfs.join("etc"));
        let err = f
            .apply(&[Raw::file("etc/passwd", b"evil")], &[], &[])
            .expect_err("through a symlink");
        assert!(err.to_string().contains("symlink"), "{err}");
        f.assert_canary_untouched();
    }

    #[test]
    fn an_image_symlink_replaced_by_an_opaque_directory_becomes_that_directory() {
        let f = Fixture::new();
        std::fs::create_dir(f.rootfs.join("var")).expect("mkdir");
        symlink(&f.canary, &f.rootfs.join("var/run"));
        f.apply(
            &[
                Raw::dir("var/"),
                Raw::dir("var/run/"),
                Raw::file("var/run/app.pid", b"42"),
            ],
            &[],
            &["var/run"],
        )
        .expect("apply");
        let run = f.rootfs.join("var/run");
        assert!(std::fs::symlink_metadata(&run).expect("lstat").is_dir());
        let names: Vec<_> = std::fs::read_dir(&run)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["app.pid"]);
        assert_eq!(std::fs::read(run.join("app.pid")).expect("read"), b"42");
        f.assert_canary_untouched();
    }

    #[test]
    fn deletions_never_follow_a_symlink() {
        let f = Fixture::new();
        symlink(&f.canary, &f.rootfs.join("link"));
        let err = f.apply(&[], &["link/x"], &[]).expect_err("through a symlink");
        assert!(matches!(err, Error::InvalidCheckpoint { .. }), "{err}");
        f.assert_canary_untouched();
        // The symlink itself: removed, not what it points to.
        f.apply(&[], &["link"], &[]).expect("delete the link");
        assert!(std::fs::symlink_metadata(f.rootfs.join("link")).is_err());
        f.assert_canary_untouched();
        // A deletion whose parent is missing or not a directory is nothing to do.
        std::fs::write(f.rootfs.join("plain"), b"p").expect("write");
        f.apply(&[], &["missing/x", "plain/x", "absent"], &[])
            .expect("nothing to delete");
    }

    #[test]
    fn a_deleted_directory_is_removed_without_following_symlinks_inside() {
        let f = Fixture::new();
        std::fs::create_dir_all(f.rootfs.join("d/e")).expect("mkdir");
        std::fs::write(f.rootfs.join("d/e/f"), b"f").expect("write");
        symlink(&f.canary, &f.rootfs.join("d/to-canary"));
        symlink(&f.canary, &f.rootfs.join("d/e/to-canary"));
        f.apply(&[], &["d"], &[]).expect("delete");
        assert!(std::fs::symlink_metadata(f.rootfs.join("d")).is_err());
        f.assert_canary_untouched();
    }

    #[test]
    fn an_opaque_directory_over_a_symlink_is_a_new_directory() {
        let f = Fixture::new();
        symlink(&f.canary, &f.rootfs.join("d"));
        f.apply(&[Raw::dir("d/"), Raw::file("d/new", b"n")], &[], &["d"])
            .expect("apply");
        assert!(std::fs::symlink_metadata(f.rootfs.join("d"))
            .expect("lstat")
            .is_dir());
        assert_eq!(std::fs::read(f.rootfs.join("d/new")).expect("read"), b"n");
        f.assert_canary_untouched();
        let err = f
            .apply(&[Raw::file("e", b"")], &[], &["e"])
            .expect_err("opaque not a dir entry");
        assert!(err.to_string().contains("opaque"), "{err}");
    }

    #[test]
    fn a_symlink_swapped_in_for_a_directory_is_replaced_not_followed() {
        let f = Fixture::new();
        symlink(&f.canary, &f.rootfs.join("d"));
        f.apply(&[Raw::dir("d/"), Raw::file("d/file", b"mine")], &[], &[])
            .expect("apply");
        assert!(std::fs::symlink_metadata(f.rootfs.join("d"))
            .expect("lstat")
            .is_dir());
        assert_eq!(std::fs::read(f.rootfs.join("d/file")).expect("read"), b"mine");
        f.assert_canary_untouched();
    }

    #[test]
    fn a_directory_replaced_by_a_file_is_removed_without_following_symlinks_inside() {
        let f = Fixture::new();
        std::fs::create_dir_all(f.rootfs.join("d/sub")).expect("mkdir");
        symlink(&f.canary, &f.rootfs.join("d/sub/c"));
        std::fs::write(f.rootfs.join("d/old"), b"old").expect("write");
        f.apply(&[Raw::file("d", b"now a file")], &[], &[])
            .expect("apply");
        assert_eq!(std::fs::read(f.rootfs.join("d")).expect("read"), b"now a file");
        f.assert_canary_untouched();
    }

    #[test]
    fn hard_links_to_outside_or_to_non_files_are_refused() {
        let f = Fixture::new();
        symlink(&f.canary, &f.rootfs.join("out"));
        symlink(&f.canary.join("file"), &f.rootfs.join("evil"));
        std::fs::create_dir(f.rootfs.join("dir")).expect("mkdir");
        let abs = format!("{}/file", f.canary.display());
        for target in [
            "../canary/file",
            abs.as_str(),
            "out/file",
            "evil",
            "dir",
            "missing",
            "h",
        ] {
            let err = f
                .apply(&[Raw::link("h", tar::EntryType::Link, target)], &[], &[])
                .expect_err(target);
            assert!(
                matches!(err, Error::InvalidCheckpoint { .. }),
                "{target:?}: {err}"
            );
            f.assert_canary_untouched();
        }
        std::fs::write(f.rootfs.join("real"), b"r").expect("write");
        f.apply(&[Raw::link("h", tar::EntryType::Link, "real")], &[], &[])
            .expect("a link to a file inside");
        let (a, b) = (
            std::fs::metadata(f.rootfs.join("real")).expect("stat"),
            std::fs::symlink_metadata(f.rootfs.join("h")).expect("stat"),
        );
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    }

    #[test]
    fn device_nodes_are_refused_and_fifos_created_inside() {
        let f = Fixture::new();
        for kind in [tar::EntryType::Char, tar::EntryType::Block] {
            let err = f
                .apply(&[Raw::new("dev/sda", kind)], &[], &[])
                .expect_err("device");
            assert!(
                err.to_string().contains("podsnap never creates device nodes"),
                "{err}"
            );
        }
        let fifo = Raw {
            mode: 0o620,
            uid: 7,
            gid: 8,
            ..Raw::new("pipe", tar::EntryType::Fifo)
        };
        f.apply(&[fifo], &[], &[]).expect("fifo");
        let m = std::fs::symlink_metadata(f.rootfs.join("pipe")).expect("lstat");
        assert!(m.file_type().is_fifo());
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o620, 7, 8));
    }

    #[test]
    fn setuid_files_keep_their_bits_and_owner() {
        let f = Fixture::new();
        let root_suid = Raw {
            mode: 0o4755,
            ..Raw::file("bin/su", b"\x7fELF")
        };
        let user_sgid = Raw {
            mode: 0o6750,
            uid: 1234,
            gid: 5678,
            ..Raw::file("bin/tool", b"tool")
        };
        f.apply(&[Raw::dir("bin/"), root_suid, user_sgid], &[], &[])
            .expect("apply");
        let m = std::fs::symlink_metadata(f.rootfs.join("bin/su")).expect("lstat");
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o4755, 0, 0));
        let m = std::fs::symlink_metadata(f.rootfs.join("bin/tool")).expect("lstat");
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o6750, 1234, 5678));
    }

    #[test]
    fn an_entry_larger_than_the_archive_is_refused() {
        let f = Fixture::new();
        let liar = Raw {
            claimed_size: Some(1 << 40),
            ..Raw::file("big", b"small")
        };
        let err = f.apply(&[liar], &[], &[]).expect_err("too big");
        assert!(err.to_string().contains("claims"), "{err}");
        assert!(!f.rootfs.join("big").exists());
    }

    #[test]
    fn a_volume_archive_unpacks_with_its_root_entry() {
        let f = Fixture::new();
        let tar = f.path("volume.tar");
        let root = Raw {
            mode: 0o1777,
            ..Raw::dir("./")
        };
        write_tar(
            &tar,
            &[
                root,
                Raw::dir("./cache/"),
                Raw::file("./cache/x", b"x"),
                Raw::link("./l", tar::EntryType::Symlink, "/etc"),
            ],
        );
        unpack(&tar, &f.rootfs).expect("unpack");
        let m = std::fs::symlink_metadata(&f.rootfs).expect("lstat");
        assert_eq!(m.mode() & 0o7777, 0o1777);
        assert_eq!(std::fs::read(f.rootfs.join("cache/x")).expect("read"), b"x");
        assert_eq!(
            std::fs::read_link(f.rootfs.join("l")).expect("readlink"),
            Path::new("/etc")
        );
        write_tar(&tar, &[Raw::file("../canary/x", b"evil")]);
        assert!(unpack(&tar, &f.rootfs).is_err());
        f.assert_canary_untouched();
    }
}

#[cfg(test)]
mod proptests;
