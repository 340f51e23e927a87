//! The `*at` calls the writer and the root make, each relative to a directory descriptor and
//! never following a symlink.

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::UnlinkatFlags;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub(super) fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

pub(super) fn is_dir(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFDIR
}

/// What is at `name` in `dir`, without following it; `None` if nothing is.
pub(super) fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> nix::Result<Option<FileStat>> {
    match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes whatever is at `name` in `dir`, a directory recursively.
pub(super) fn clear_at(dir: BorrowedFd<'_>, name: &CStr) -> nix::Result<()> {
    match stat_at(dir, name)? {
        Some(st) => remove_at(dir, name, &st),
        None => Ok(()),
    }
}

/// Removes `name` in `dir`, which `st` describes: `unlinkat` for anything but a directory, the
/// directory's contents by descriptor and then the directory.
pub(super) fn remove_at(dir: BorrowedFd<'_>, name: &CStr, st: &FileStat) -> nix::Result<()> {
    if is_dir(st) {
        let sub = open_subdir(dir, name)?;
        empty_dir(sub.as_fd())?;
        nix::unistd::unlinkat(dir, name, UnlinkatFlags::RemoveDir)
    } else {
        nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
    }
}

/// Created owner-only; the archived mode is set once the owner is.
pub(super) fn make_dir(dir: BorrowedFd<'_>, name: &CStr) -> nix::Result<()> {
    nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o700))
}

/// Opens the real directory `name` in `dir`; a symlink there fails (`O_NOFOLLOW`).
pub(super) fn open_subdir(dir: BorrowedFd<'_>, name: &CStr) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    nix::fcntl::openat(dir, name, flags, Mode::empty())
}

pub(super) fn set_mtime(fd: &impl AsFd, mtime: Option<TimeSpec>) -> nix::Result<()> {
    match mtime {
        Some(t) => nix::sys::stat::futimens(fd, &TimeSpec::UTIME_OMIT, &t),
        None => Ok(()),
    }
}

/// Removes everything in the directory `dir`, depth first, by descriptor: real subdirectories
/// are descended into, symlinks are unlinked, never followed. Iterative, so a deep tree costs
/// one descriptor per level and no stack.
pub(super) fn empty_dir(dir: BorrowedFd<'_>) -> nix::Result<()> {
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
pub(super) fn remove_non_dirs(dir: BorrowedFd<'_>) -> nix::Result<Vec<CString>> {
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
pub(super) fn list_dir(dir: BorrowedFd<'_>) -> nix::Result<Vec<CString>> {
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
