//! Every file the installer touches, opened inside the host root the kernel confines it to.
//!
//! Paths are given as the host sees them (`/etc/containerd/config.toml`). In the DaemonSet the
//! host's `/` is mounted at `/host`, and the host's own symlinks (`/etc/containerd ->
//! /opt/ctd/etc`, absolute or relative) must resolve inside that mount, never inside the
//! installer's container: every path is opened with `openat2(RESOLVE_IN_ROOT)` relative to a
//! descriptor of the host root, which makes `/` and `..` stop at the host root.
//!
//! Writes are atomic: the new content goes to a temporary file in the same directory
//! (`.<name>.podsnap-new`, created exclusively), is synced, given its mode, then renamed over the
//! old name; the directory is synced after. A reader (containerd starting, a shim being
//! executed) sees the old file or the new one, never a part. A running program whose binary is
//! replaced this way keeps its old inode.
//!
//! A file whose last component is a symlink is never replaced (the rename would swap the link
//! for a file and change the node's layout): the caller is told to name the real file.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::UnlinkatFlags;
use sha2::{Digest, Sha256};

/// The most of a text file (a containerd configuration, the record) read into memory.
pub const TEXT_CAP: u64 = 16 * 1024 * 1024;

/// The host's filesystem, seen through a directory (`/` on the node itself, `/host` in the
/// DaemonSet).
#[derive(Debug)]
pub struct HostRoot {
    path: PathBuf,
    fd: OwnedFd,
}

/// What is at a path of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Nothing.
    Missing,
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symlink (not followed).
    Symlink,
    /// A socket, device or FIFO.
    Other,
}

impl HostRoot {
    /// Opens the host root at `path`.
    pub fn open(path: &Path) -> std::io::Result<HostRoot> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(HostRoot {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// The host root's own path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where host path `host` lies from here (for messages and for programs given a path).
    pub fn outside(&self, host: &Path) -> PathBuf {
        self.path.join(relative(host))
    }

    /// Opens `host` (following symlinks, confined to the root) with `flags`.
    fn open_at(&self, host: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
        let rel = relative(host);
        let path = if rel.as_os_str().is_empty() {
            CString::new(".").map_err(|_| Errno::EINVAL)?
        } else {
            CString::new(rel.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let mut tries = 0;
        loop {
            match nix::fcntl::openat2(&self.fd, path.as_c_str(), how) {
                // A rename raced the resolution: the kernel asks for a retry.
                Err(Errno::EAGAIN) if tries < 8 => tries += 1,
                other => return other,
            }
        }
    }

    /// The directory holding `host`, opened, and the last component's name.
    fn parent(&self, host: &Path) -> std::io::Result<(OwnedFd, CString)> {
        let name = host.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with no file name")
        })?;
        let name = CString::new(name.as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in a path"))?;
        let parent = host.parent().unwrap_or(Path::new("/"));
        let dir = self.open_at(parent, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        Ok((dir, name))
    }

    /// What is at `host` (its last component not followed; a missing parent is `Missing`).
    pub fn kind(&self, host: &Path) -> std::io::Result<Kind> {
        if host.file_name().is_none() {
            // The root itself.
            return Ok(Kind::Dir);
        }
        let (dir, name) = match self.parent(host) {
            Ok(found) => found,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Ok(Kind::Missing)
            }
            Err(e) => return Err(e),
        };
        match nix::sys::stat::fstatat(&dir, name.as_c_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(
                match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
                    SFlag::S_IFREG => Kind::File,
                    SFlag::S_IFDIR => Kind::Dir,
                    SFlag::S_IFLNK => Kind::Symlink,
                    _ => Kind::Other,
                },
            ),
            Err(Errno::ENOENT) => Ok(Kind::Missing),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether `host` exists (following symlinks inside the root).
    pub fn exists(&self, host: &Path) -> bool {
        self.open_at(host, OFlag::O_PATH).is_ok()
    }

    /// Opens `host` for reading; `None` when it does not exist.
    pub fn open_read(&self, host: &Path) -> std::io::Result<Option<File>> {
        match self.open_at(host, OFlag::O_RDONLY) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The content of text file `host` (at most [`TEXT_CAP`] bytes); `None` when it does not
    /// exist.
    pub fn read(&self, host: &Path) -> std::io::Result<Option<Vec<u8>>> {
        let Some(file) = self.open_read(host)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        file.take(TEXT_CAP + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > TEXT_CAP {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {TEXT_CAP} bytes"),
            ));
        }
        Ok(Some(bytes))
    }

    /// The whole content of file `host` (a binary too); `None` when it does not exist.
    pub fn read_any(&self, host: &Path) -> std::io::Result<Option<Vec<u8>>> {
        let Some(mut file) = self.open_read(host)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// `sha256:<hex>` of file `host`; `None` when it does not exist.
    pub fn digest(&self, host: &Path) -> std::io::Result<Option<String>> {
        match self.open_read(host)? {
            Some(file) => digest_reader(file).map(Some),
            None => Ok(None),
        }
    }

    /// The entries of directory `host` (names only); empty when it does not exist.
    pub fn list(&self, host: &Path) -> std::io::Result<Vec<String>> {
        let fd = match self.open_at(host, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut dir = nix::dir::Dir::from_fd(fd)?;
        let mut names: Vec<String> = dir
            .iter()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        Ok(names)
    }

    /// Writes `bytes` to `host` atomically with `mode` (see the module header). Refuses when
    /// `host` is a symlink or not a regular file.
    pub fn write_atomic(&self, host: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
        self.replace_with(host, mode, |file| file.write_all(bytes))
    }

    /// Copies file `source` (a path of the installer's own filesystem) to `host` atomically
    /// with `mode`; returns the copy's digest.
    pub fn copy_in(&self, source: &Path, host: &Path, mode: u32) -> std::io::Result<String> {
        let mut input = File::open(source)?;
        let mut hasher = Sha256::new();
        self.replace_with(host, mode, |file| {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])?;
            }
        })?;
        Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    fn replace_with(
        &self,
        host: &Path,
        mode: u32,
        fill: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        match self.kind(host)? {
            Kind::Missing | Kind::File => {}
            Kind::Symlink => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "is a symlink: name the file it points to instead",
                ))
            }
            Kind::Dir | Kind::Other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "is not a regular file",
                ))
            }
        }
        let (dir, name) = self.parent(host)?;
        let mut temp_name = b".".to_vec();
        temp_name.extend_from_slice(name.as_bytes());
        temp_name.extend_from_slice(b".podsnap-new");
        let temp = CString::new(temp_name).map_err(|_| Errno::EINVAL)?;
        // A leftover of an interrupted run.
        match nix::unistd::unlinkat(&dir, temp.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = nix::fcntl::openat(
            &dir,
            temp.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        let mut file = File::from(fd);
        let written = fill(&mut file)
            .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode)))
            .and_then(|()| file.sync_all());
        drop(file);
        if let Err(e) = written.and_then(|()| {
            nix::fcntl::renameat(&dir, temp.as_c_str(), &dir, name.as_c_str()).map_err(std::io::Error::from)
        }) {
            let _ = nix::unistd::unlinkat(&dir, temp.as_c_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        nix::unistd::fsync(&dir)?;
        Ok(())
    }

    /// Removes file (or symlink) `host`; `false` when it was not there.
    pub fn remove_file(&self, host: &Path) -> std::io::Result<bool> {
        let (dir, name) = match self.parent(host) {
            Ok(found) => found,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(e),
        };
        match nix::unistd::unlinkat(&dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) => {
                nix::unistd::fsync(&dir)?;
                Ok(true)
            }
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes directory `host` if it is empty; `false` when it is not empty or not there.
    pub fn remove_dir_if_empty(&self, host: &Path) -> std::io::Result<bool> {
        let (dir, name) = match self.parent(host) {
            Ok(found) => found,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(e),
        };
        match nix::unistd::unlinkat(&dir, name.as_c_str(), UnlinkatFlags::RemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) | Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates directory `host` and its missing parents with `mode`; returns those it created,
    /// outermost first.
    pub fn create_dirs(&self, host: &Path, mode: u32) -> std::io::Result<Vec<PathBuf>> {
        let mut missing = Vec::new();
        let mut at = host.to_path_buf();
        loop {
            match self.kind(&at)? {
                Kind::Missing => missing.push(at.clone()),
                Kind::Dir => break,
                // A symlink to a directory is fine (resolved inside the root).
                Kind::Symlink if self.open_at(&at, OFlag::O_RDONLY | OFlag::O_DIRECTORY).is_ok() => break,
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{} exists and is not a directory", at.display()),
                    ))
                }
            }
            match at.parent() {
                Some(parent) if parent != at => at = parent.to_path_buf(),
                _ => break,
            }
        }
        missing.reverse();
        for dir_path in &missing {
            let (parent, name) = self.parent(dir_path)?;
            match nix::sys::stat::mkdirat(&parent, name.as_c_str(), Mode::from_bits_truncate(mode)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            // mkdir's mode is cut by the umask: set it exactly.
            let fd = self.open_at(dir_path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
            nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(mode))?;
        }
        Ok(missing)
    }
}

/// `host` without its root: `/etc/x` -> `etc/x` (`..` is left for the kernel to stop at the
/// root).
fn relative(host: &Path) -> PathBuf {
    host.components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .map(|c| c.as_os_str())
        .collect::<Vec<&OsStr>>()
        .iter()
        .collect()
}

/// `sha256:<hex>` of everything `reader` gives.
pub fn digest_reader(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("opt/ctd")).expect("mkdir");
        std::fs::create_dir_all(root.path().join("etc")).expect("mkdir");
        std::os::unix::fs::symlink("/opt/ctd", root.path().join("etc/containerd")).expect("symlink");
        let host = HostRoot::open(root.path()).expect("open");
        host.write_atomic(Path::new("/etc/containerd/config.toml"), b"version = 3\n", 0o644)
            .expect("write");
        assert_eq!(
            std::fs::read(root.path().join("opt/ctd/config.toml")).expect("read"),
            b"version = 3\n"
        );
        // `..` stops at the root.
        assert_eq!(
            host.read(Path::new("/../../opt/ctd/config.toml")).expect("read"),
            Some(b"version = 3\n".to_vec())
        );
        assert_eq!(
            host.kind(Path::new("/etc/containerd")).expect("kind"),
            Kind::Symlink
        );
        assert_eq!(host.kind(Path::new("/nope/x")).expect("kind"), Kind::Missing);
    }

    #[test]
    fn writes_replace_atomically_and_refuse_symlinks() {
        let root = tempfile::tempdir().expect("tempdir");
        let host = HostRoot::open(root.path()).expect("open");
        let created = host.create_dirs(Path::new("/a/b/c"), 0o755).expect("mkdirs");
        assert_eq!(
            created,
            vec![
                PathBuf::from("/a"),
                PathBuf::from("/a/b"),
                PathBuf::from("/a/b/c")
            ]
        );
        host.write_atomic(Path::new("/a/b/c/f"), b"one", 0o600)
            .expect("write");
        let before = std::fs::metadata(root.path().join("a/b/c/f")).expect("meta");
        host.write_atomic(Path::new("/a/b/c/f"), b"two", 0o755)
            .expect("write");
        let after = std::fs::metadata(root.path().join("a/b/c/f")).expect("meta");
        assert_ne!(
            std::os::unix::fs::MetadataExt::ino(&before),
            std::os::unix::fs::MetadataExt::ino(&after),
            "a new inode: a running program keeps the old one"
        );
        assert_eq!(after.permissions().mode() & 0o777, 0o755);
        assert_eq!(
            host.list(Path::new("/a/b/c")).expect("list"),
            vec!["f".to_owned()]
        );
        std::os::unix::fs::symlink("f", root.path().join("a/b/c/l")).expect("symlink");
        let err = host
            .write_atomic(Path::new("/a/b/c/l"), b"x", 0o644)
            .expect_err("a symlink");
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(
            host.digest(Path::new("/a/b/c/f")).expect("digest"),
            Some(digest_bytes(b"two"))
        );
        assert!(host.remove_file(Path::new("/a/b/c/f")).expect("rm"));
        assert!(!host.remove_file(Path::new("/a/b/c/f")).expect("rm again"));
        assert!(!host
            .remove_dir_if_empty(Path::new("/a/b/c"))
            .expect("not empty: l"));
        assert!(host.remove_file(Path::new("/a/b/c/l")).expect("rm"));
        assert!(host.remove_dir_if_empty(Path::new("/a/b/c")).expect("empty"));
    }
}
