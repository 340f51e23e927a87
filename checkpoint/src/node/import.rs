//! Bringing a checkpoint from elsewhere under the node's checkpoint root, for the length of a
//! restore: the shim restores only checkpoints inside the root (by name), so `podsnap restore
//! --checkpoint-dir DIR` with DIR outside it brings DIR in first, and removes it again once
//! the restore is over.
//!
//! No data is copied when it can be avoided: each file the manifest lists, and the manifest,
//! is hard-linked into a fresh directory of the root (directories 0700). A file is copied
//! instead, into a new 0600 file, when:
//! - the link fails with `EXDEV` (the checkpoint is on another filesystem than the root) or
//!   `EPERM` (a filesystem without hard links): every later file is then copied too;
//! - the source file is not root's own 0600 regular file: a link shares the inode, so its
//!   mode would be the imported file's, and its owner could change it after the shim
//!   verified it. The source is never changed (podsnap never chmods a file it did not make).
//!
//! Each source file is opened once (`O_NOFOLLOW`), checked on the open descriptor, and linked
//! through it (`/proc/self/fd/N`, `AT_SYMLINK_FOLLOW`) or copied from it: what was checked is
//! what is linked. The digests are not read here: the shim verifies them, once.
//!
//! ```text
//! <root>/.<name>.importing-<pid>/    being brought in (hidden); removed if that fails
//! <root>/<name>/                     renamed into place, never over an existing name
//! ```

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::error::{Error, Result};
use crate::format::manifest::{safe_relative, Manifest, MANIFEST};
use crate::fs::private::create_private_dir;

/// How many fresh names are tried before giving up.
const MAX_NAME_TRIES: usize = 1000;

/// A checkpoint brought into the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Where it is now.
    pub dir: PathBuf,
    /// Its name in the root.
    pub name: String,
    /// Files hard-linked.
    pub linked: usize,
    /// Files copied, and their bytes.
    pub copied: usize,
    pub copied_bytes: u64,
}

/// Removes a half-built import when dropped before it is complete.
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                log::warn!("remove the partial import {}: {e}", dir.display());
            }
        }
    }
}

/// Brings the checkpoint at `src` (whose `manifest` was loaded and its listing checked) into
/// `root` as `<name>` (or `<name>-2`, `-3`... when taken). `copying` is told once, with the
/// reason, when files are copied rather than linked.
pub fn import(
    src: &Path,
    manifest: &Manifest,
    root: &Path,
    name: &str,
    copying: &mut dyn FnMut(&str),
) -> Result<Imported> {
    create_private_dir(root)?;
    let staging = root.join(format!(".{name}.importing-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io("remove a stale import", &staging, e))?;
    }
    create_private_dir(&staging)?;
    let mut partial = Partial(Some(staging.clone()));
    let euid = nix::unistd::geteuid().as_raw();
    let total: u64 = manifest.files.values().map(|f| f.size).sum();
    let mut link = true;
    let mut told = false;
    let mut done = Imported {
        dir: PathBuf::new(),
        name: String::new(),
        linked: 0,
        copied: 0,
        copied_bytes: 0,
    };
    let files = manifest
        .files
        .keys()
        .map(String::as_str)
        .chain(std::iter::once(MANIFEST));
    for rel in files {
        let rel_path = safe_relative(rel).map_err(|reason| Error::InvalidCheckpoint {
            path: src.to_path_buf(),
            reason,
        })?;
        let (from, to) = (src.join(rel_path), staging.join(rel_path));
        if let Some(parent) = to.parent() {
            create_private_dir(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&from)
            .map_err(|e| Error::io("open a checkpoint file", &from, e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat a checkpoint file", &from, e))?;
        if !meta.is_file() {
            return Err(Error::InvalidCheckpoint {
                path: src.to_path_buf(),
                reason: format!("{rel} is not a regular file"),
            });
        }
        let own = meta.uid() == euid && meta.mode() & 0o7777 == 0o600;
        let why_copy = if !link {
            None // already told: the whole checkpoint is being copied
        } else if !own {
            Some(format!(
                "{rel} is not root's own 0600 file (mode {:04o}, owner {})",
                meta.mode() & 0o7777,
                meta.uid()
            ))
        } else {
            match link_open(&file, &to) {
                Ok(()) => {
                    done.linked += 1;
                    continue;
                }
                Err(Errno::EXDEV) => {
                    link = false;
                    Some(format!(
                        "{} is on another filesystem than {}",
                        src.display(),
                        root.display()
                    ))
                }
                Err(Errno::EPERM) => {
                    link = false;
                    Some(format!(
                        "the filesystem of {} takes no hard links",
                        root.display()
                    ))
                }
                Err(e) => return Err(Error::io("hard-link a checkpoint file", &to, e.into())),
            }
        };
        if let Some(why) = why_copy.filter(|_| !told) {
            told = true;
            copying(&format!(
                "{why}: copying {} into {}",
                if link {
                    format!("{rel} (others are linked)")
                } else {
                    format!("the checkpoint's files ({})", crate::fs::units::mib(total))
                },
                root.display()
            ));
        }
        done.copied_bytes += copy_open(file, &to)?;
        done.copied += 1;
    }
    // Into place under a name nothing else has (never over an existing checkpoint).
    let mut tries = 0;
    let (dir, final_name) = loop {
        tries += 1;
        let candidate = if tries == 1 {
            name.to_owned()
        } else {
            format!("{name}-{tries}")
        };
        let dir = root.join(&candidate);
        match nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &staging,
            nix::fcntl::AT_FDCWD,
            &dir,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => break (dir, candidate),
            Err(Errno::EEXIST) if tries < MAX_NAME_TRIES => continue,
            Err(e) => {
                return Err(Error::io(
                    "move the imported checkpoint into place",
                    &dir,
                    e.into(),
                ))
            }
        }
    };
    partial.0 = None;
    done.dir = dir;
    done.name = final_name;
    Ok(done)
}

/// Hard-links the open file `file` at `to`.
fn link_open(file: &std::fs::File, to: &Path) -> nix::Result<()> {
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        proc_path.as_str(),
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    )
}

/// Copies the open file `file` into a new 0600 file `to`; returns the bytes copied.
fn copy_open(mut file: std::fs::File, to: &Path) -> Result<u64> {
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(|e| Error::io("create an imported checkpoint file", to, e))?;
    std::io::copy(&mut file, &mut out).map_err(|e| Error::io("copy a checkpoint file", to, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn source(t: &Path) -> (PathBuf, Manifest) {
        let src = t.join("src/ckpt");
        crate::node::store::tests::write_checkpoint(&src, "default", "web", 1, 4096);
        for p in [src.join(MANIFEST), src.join("containers/app/config.json")] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let m = Manifest::load_listed(&src).expect("valid");
        (src, m)
    }

    #[test]
    fn files_are_linked_not_copied_and_names_are_fresh() {
        let t = tempfile::tempdir().expect("tempdir");
        let (src, m) = source(t.path());
        let root = t.path().join("root");
        let mut told = Vec::new();
        let first =
            import(&src, &m, &root, "ckpt-imported", &mut |s| told.push(s.to_owned())).expect("import");
        assert_eq!((first.linked, first.copied), (2, 0));
        assert!(told.is_empty(), "{told:?}");
        assert_eq!(first.name, "ckpt-imported");
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        let rel = "containers/app/config.json";
        assert_eq!(ino(&first.dir.join(rel)), ino(&src.join(rel)), "a hard link");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&first.dir), 0o700);
        assert_eq!(mode(&first.dir.join("containers/app")), 0o700);
        Manifest::load_verified(&first.dir).expect("the import is the checkpoint");

        let second = import(&src, &m, &root, "ckpt-imported", &mut |_| {}).expect("again");
        assert_eq!(second.name, "ckpt-imported-2", "never over an existing name");
        let hidden: Vec<_> = std::fs::read_dir(&root)
            .expect("list")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "no staging left");
    }

    #[test]
    fn a_file_that_is_not_roots_own_0600_is_copied_and_left_as_it_was() {
        let t = tempfile::tempdir().expect("tempdir");
        let (src, m) = source(t.path());
        let rel = "containers/app/config.json";
        std::fs::set_permissions(src.join(rel), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut told = Vec::new();
        let done = import(&src, &m, &t.path().join("root"), "x", &mut |s| {
            told.push(s.to_owned())
        })
        .expect("import");
        assert_eq!((done.linked, done.copied, done.copied_bytes), (1, 1, 4096));
        assert_eq!(told.len(), 1);
        assert!(
            told[0].contains("not root's own 0600 file (mode 0644"),
            "{told:?}"
        );
        let meta = |p: &Path| std::fs::metadata(p).expect("stat");
        assert_ne!(meta(&done.dir.join(rel)).ino(), meta(&src.join(rel)).ino());
        assert_eq!(meta(&done.dir.join(rel)).permissions().mode() & 0o7777, 0o600);
        assert_eq!(
            meta(&src.join(rel)).permissions().mode() & 0o7777,
            0o644,
            "the source is not changed"
        );
    }

    #[test]
    fn a_missing_file_fails_and_leaves_nothing() {
        let t = tempfile::tempdir().expect("tempdir");
        let (src, m) = source(t.path());
        std::fs::remove_file(src.join("containers/app/config.json")).expect("rm");
        let root = t.path().join("root");
        assert!(import(&src, &m, &root, "x", &mut |_| {}).is_err());
        assert_eq!(std::fs::read_dir(&root).expect("list").count(), 0);
    }
}
