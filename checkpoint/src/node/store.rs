//! The checkpoint root: the checkpoints a node keeps, by name. Listing them, resolving a name,
//! removing one.
//!
//! A checkpoint's name is its path relative to the node's checkpoint root
//! ([`crate::config::NodeConfig::checkpoint_root`]): what `podsnap.io/restore-from`, `podsnap
//! list` and `podsnap rm` say.
//!
//! ```text
//! <root>/                              0700
//!   <name>/manifest.json ...           a checkpoint (layout: crate::format::manifest)
//!   <folder>/<name>/manifest.json ...  checkpoints may sit in folders (looked into 8 deep)
//!   .<name>.tmp-<pid>/                 a dump in progress (hidden: never listed)
//!   .<name>.importing-<pid>/           a checkpoint being brought in (crate::node::import)
//!   .<name>.removing-<pid>/            a checkpoint being removed
//! ```
//!
//! - **Listing** ([`list`]): a directory holding a `manifest.json` is a checkpoint: *valid*
//!   when [`Manifest::load_listed`] accepts it (exactly the listed files with their sizes; the
//!   digests are [`Manifest::load_verified`]'s, on request), *broken* otherwise, with the
//!   reason. A directory without a manifest that holds files or a `containers/` directory is
//!   a broken checkpoint too (a partial copy); any other directory is a folder, looked into.
//!   Hidden entries and symlinks are skipped. A checkpoint's size is the sum of its listed
//!   files and its manifest.
//! - **Names** ([`resolve`]): relative, without `.` or `..`, and leading to a directory inside
//!   the root once every symlink is resolved.
//! - **Removal** ([`remove`]): a checkpoint, valid or broken, by its own name (not through a
//!   symlink); never a folder; never one in use ([`crate::node::lease`]). It is renamed away
//!   (hidden) first, so a restore never sees it half-removed.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::manifest::{Manifest, MANIFEST};
use crate::node::lease::{self, Holder};

/// How deep folders of checkpoints are looked into.
const MAX_DEPTH: usize = 8;

/// A checkpoint in the root.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its path relative to the root.
    pub name: String,
    /// Its resolved path.
    pub dir: PathBuf,
    pub content: Content,
}

/// What a checkpoint in the root holds.
#[derive(Debug, Clone)]
pub enum Content {
    /// Exactly what its manifest lists.
    Valid {
        manifest: Box<Manifest>,
        /// Its listed files and its manifest.
        bytes: u64,
    },
    /// Not usable: why.
    Broken(String),
}

impl Stored {
    /// The manifest of a valid checkpoint.
    pub fn manifest(&self) -> Option<&Manifest> {
        match &self.content {
            Content::Valid { manifest, .. } => Some(manifest),
            Content::Broken(_) => None,
        }
    }

    /// The size of a valid checkpoint.
    pub fn bytes(&self) -> Option<u64> {
        match &self.content {
            Content::Valid { bytes, .. } => Some(*bytes),
            Content::Broken(_) => None,
        }
    }

    /// `namespace/name` of the checkpointed pod, as recorded (`?` for a part not recorded).
    pub fn pod(&self) -> Option<String> {
        self.manifest().map(pod_of)
    }
}

/// `namespace/name` of a checkpoint's pod.
pub fn pod_of(m: &Manifest) -> String {
    format!(
        "{}/{}",
        m.pod.namespace.as_deref().unwrap_or("?"),
        m.pod.name.as_deref().unwrap_or("?")
    )
}

/// What a directory of the root is.
enum Kind {
    /// It holds a manifest.
    Checkpoint,
    /// No manifest, but files of a checkpoint: why it is broken.
    Partial(String),
    /// Anything else: may hold checkpoints.
    Folder,
}

fn kind(dir: &Path) -> Kind {
    if std::fs::symlink_metadata(dir.join(MANIFEST)).is_ok() {
        return Kind::Checkpoint;
    }
    // A group checkpoint: its pods' checkpoints are inside.
    if std::fs::symlink_metadata(dir.join(crate::format::group::GROUP_MANIFEST)).is_ok() {
        return Kind::Folder;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return Kind::Partial(format!("unreadable: {e}")),
    };
    for entry in entries.flatten() {
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file || entry.file_name() == "containers" {
            return Kind::Partial(format!(
                "no {MANIFEST}: an incomplete checkpoint (a dump or a copy that did not finish)"
            ));
        }
    }
    Kind::Folder
}

/// Reads a checkpoint's manifest and checks its listing.
fn load(dir: &Path) -> Content {
    match Manifest::load_listed(dir) {
        Ok(manifest) => {
            let manifest_bytes = std::fs::metadata(dir.join(MANIFEST)).map_or(0, |m| m.len());
            Content::Valid {
                bytes: manifest.files.values().map(|f| f.size).sum::<u64>() + manifest_bytes,
                manifest: Box::new(manifest),
            }
        }
        Err(Error::InvalidCheckpoint { reason, .. }) => Content::Broken(reason),
        Err(e) => Content::Broken(e.to_string()),
    }
}

/// Every checkpoint in `root`, valid or broken, by name. A root that does not exist holds none.
pub fn list(root: &Path) -> Result<Vec<Stored>> {
    let root = match std::fs::canonicalize(root) {
        Ok(root) => root,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("open the checkpoint root", root, e)),
    };
    let mut found = Vec::new();
    let mut folders = vec![(PathBuf::new(), 0usize)];
    while let Some((rel, depth)) = folders.pop() {
        let abs = root.join(&rel);
        let entries = std::fs::read_dir(&abs).map_err(|e| Error::io("list the checkpoint root", &abs, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list the checkpoint root", &abs, e))?;
            let file_name = entry.file_name();
            let Some(base) = file_name.to_str() else {
                continue; // podsnap names nothing outside UTF-8
            };
            if base.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let rel = rel.join(base);
            let dir = root.join(&rel);
            let name = rel.to_string_lossy().into_owned();
            let content = match kind(&dir) {
                Kind::Checkpoint => load(&dir),
                Kind::Partial(reason) => Content::Broken(reason),
                Kind::Folder => {
                    if depth + 1 < MAX_DEPTH {
                        folders.push((rel, depth + 1));
                    }
                    continue;
                }
            };
            found.push(Stored { name, dir, content });
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// Resolves checkpoint `name` inside `root`: a relative name without `.` or `..` that leads,
/// once every symlink is resolved, to a directory inside the root (not the root itself).
/// Errors say why it is refused.
pub fn resolve(root: &Path, name: &str) -> std::result::Result<PathBuf, String> {
    let rel = Path::new(name);
    if name.is_empty() || rel.is_absolute() {
        return Err("not a relative name".into());
    }
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err("it contains '..' or '.'".into());
    }
    let root = std::fs::canonicalize(root).map_err(|e| format!("the checkpoint root is unusable ({e})"))?;
    let dir = std::fs::canonicalize(root.join(rel)).map_err(|e| format!("no such checkpoint ({e})"))?;
    if !dir.starts_with(&root) || dir == root {
        return Err("it leads outside the checkpoint root".into());
    }
    if !dir.is_dir() {
        return Err("not a directory".into());
    }
    Ok(dir)
}

/// The live leases on the checkpoint at `dir` (resolved), as one line for an error.
fn in_use(leases: &Path, dir: &Path) -> Result<Option<String>> {
    let holders: Vec<Holder> = lease::holders(leases, dir)?;
    if holders.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        holders
            .iter()
            .map(Holder::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

/// A checkpoint removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub name: String,
    /// Its size, when it was valid.
    pub bytes: Option<u64>,
    /// `namespace/name` of its pod, when it was valid.
    pub pod: Option<String>,
}

/// Removes checkpoint `name` from `root`, unless a lease under `leases` (normally
/// [`lease::LEASE_DIR`]) holds it; see the module documentation.
pub fn remove(root: &Path, name: &str, leases: &Path) -> Result<Removed> {
    let not = |reason: String| Error::NotACheckpoint {
        name: name.to_owned(),
        root: root.to_path_buf(),
        reason,
    };
    let dir = resolve(root, name).map_err(not)?;
    let canonical_root =
        std::fs::canonicalize(root).map_err(|e| Error::io("open the checkpoint root", root, e))?;
    let own = canonical_root.join(name);
    if dir != own {
        let target = dir.strip_prefix(&canonical_root).unwrap_or(&dir);
        return Err(not(format!(
            "it is a symlink to {}: remove the checkpoint by its own name",
            target.display()
        )));
    }
    if Path::new(name)
        .components()
        .any(|c| c.as_os_str().as_encoded_bytes().starts_with(b"."))
    {
        return Err(not("a hidden name (a dump, import or removal in progress)".into()));
    }
    let (bytes, pod) = match kind(&dir) {
        Kind::Folder => {
            return Err(not(format!(
                "a folder: it holds no {MANIFEST} (remove the checkpoints in it by their names)"
            )))
        }
        Kind::Partial(_) => (None, None),
        Kind::Checkpoint => match load(&dir) {
            Content::Valid { manifest, bytes } => (Some(bytes), Some(pod_of(&manifest))),
            Content::Broken(_) => (None, None),
        },
    };
    let busy = |holders: String| Error::InUse {
        name: name.to_owned(),
        holders,
    };
    if let Some(holders) = in_use(leases, &dir)? {
        return Err(busy(holders));
    }
    // Out of sight first: a shim that takes a lease from now on no longer finds it.
    let parent = dir.parent().unwrap_or(&canonical_root);
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let away = parent.join(format!(".{base}.removing-{}", std::process::id()));
    crate::trust::seal::forget(Path::new(crate::trust::seal::SEAL_DIR), &dir);
    std::fs::rename(&dir, &away).map_err(|e| Error::io("move the checkpoint out of sight", &dir, e))?;
    let put_back = || {
        if let Err(e) = std::fs::rename(&away, &dir) {
            log::error!(
                "checkpoint {name}: could not put it back from {}: {e}",
                away.display()
            );
        }
    };
    match in_use(leases, &dir) {
        Ok(None) => {}
        Ok(Some(holders)) => {
            put_back();
            return Err(busy(holders));
        }
        Err(e) => {
            put_back();
            return Err(e);
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&away) {
        // What is left is shown (as broken) rather than hidden.
        put_back();
        return Err(Error::io("remove the checkpoint", &dir, e));
    }
    log::info!("checkpoint {name} removed from {}", canonical_root.display());
    Ok(Removed {
        name: name.to_owned(),
        bytes,
        pod,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::format::manifest::{DigestAlgorithm, FileDigest, FORMAT, VERSION};

    /// Writes a valid checkpoint of pod `namespace/pod` at `dir`, created at `created`, with one
    /// listed file of `size` bytes.
    pub(crate) fn write_checkpoint(dir: &Path, namespace: &str, pod: &str, created: u64, size: usize) {
        std::fs::create_dir_all(dir.join("containers/app")).expect("mkdir");
        let file = dir.join("containers/app/config.json");
        std::fs::write(&file, vec![b' '; size]).expect("write");
        let manifest = serde_json::json!({
            "format": FORMAT,
            "version": VERSION,
            "created_unix": created,
            "pod": {"sandbox_id": "sb", "name": pod, "namespace": namespace},
            "host": {"criu_version": "", "runc_version": "", "kernel": "", "arch": ""},
            "tcp_established": false,
            "containers": [],
            "volumes": [],
            "digest_algorithm": DigestAlgorithm::WRITTEN,
            "files": {"containers/app/config.json": FileDigest {
                size: size as u64,
                digest: DigestAlgorithm::WRITTEN.file(&file).expect("digest"),
            }},
        });
        std::fs::write(dir.join(MANIFEST), manifest.to_string()).expect("manifest");
    }

    #[test]
    fn listing_finds_checkpoints_in_folders_and_reports_broken_ones() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        write_checkpoint(&root.join("a"), "default", "web", 10, 100);
        write_checkpoint(&root.join("team/b"), "team", "db", 20, 5);
        write_checkpoint(&root.join(".staging.tmp-1"), "default", "web", 30, 1);
        write_checkpoint(&root.join("damaged"), "default", "web", 40, 1);
        std::fs::write(root.join("damaged/containers/app/extra"), b"x").expect("unlisted");
        std::fs::create_dir_all(root.join("partial/containers/app")).expect("mkdir");
        std::fs::create_dir_all(root.join("empty-folder")).expect("mkdir");
        std::fs::write(root.join("stray-file"), b"x").expect("write");
        std::os::unix::fs::symlink(root.join("a"), root.join("link")).expect("symlink");
        // A group checkpoint: its pods' parts are listed, not the group as a broken one.
        write_checkpoint(&root.join("set/web-0"), "default", "web-0", 50, 1);
        std::fs::write(root.join("set").join(crate::format::group::GROUP_MANIFEST), b"{}").expect("group");
        let found = list(&root).expect("list");
        let names: Vec<&str> = found.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "damaged", "partial", "set/web-0", "team/b"]);
        let manifest_len = std::fs::metadata(root.join("a").join(MANIFEST))
            .expect("stat")
            .len();
        assert_eq!(found[0].bytes(), Some(100 + manifest_len));
        assert_eq!(found[0].pod().as_deref(), Some("default/web"));
        assert_eq!(found[4].pod().as_deref(), Some("team/db"));
        match &found[1].content {
            Content::Broken(reason) => assert!(reason.contains("extra is not listed"), "{reason}"),
            other => panic!("damaged listed as {other:?}"),
        }
        match &found[2].content {
            Content::Broken(reason) => assert!(reason.contains("no manifest.json"), "{reason}"),
            other => panic!("partial listed as {other:?}"),
        }
        assert!(list(&t.path().join("missing")).expect("no root").is_empty());
    }

    #[test]
    fn removal_takes_checkpoints_only_by_their_own_names_and_never_one_in_use() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        let leases = t.path().join("leases");
        write_checkpoint(&root.join("a"), "default", "web", 10, 100);
        write_checkpoint(&root.join("team/b"), "team", "db", 20, 5);
        std::fs::create_dir_all(root.join("partial/containers")).expect("mkdir");
        std::fs::create_dir_all(t.path().join("outside")).expect("mkdir");
        write_checkpoint(&t.path().join("outside/c"), "default", "web", 10, 1);
        std::os::unix::fs::symlink(t.path().join("outside/c"), root.join("out")).expect("symlink");
        std::os::unix::fs::symlink(root.join("a"), root.join("in")).expect("symlink");

        for (name, why) in [
            ("team", "a folder"),
            ("out", "leads outside"),
            ("in", "is a symlink"),
            ("../outside/c", "'..'"),
            ("/etc", "not a relative name"),
            ("missing", "no such checkpoint"),
            ("", "not a relative name"),
        ] {
            let err = remove(&root, name, &leases).expect_err(name).to_string();
            assert!(
                err.contains("is not a checkpoint") && err.contains(why),
                "{name}: {err}"
            );
        }
        assert!(t.path().join("outside/c").join(MANIFEST).exists());

        let dir = std::fs::canonicalize(root.join("a")).expect("canonical");
        let lease = lease::take(
            &leases,
            &Holder::this_process("sb1", Some("default/web-2".into()), &dir),
        )
        .expect("lease");
        let err = remove(&root, "a", &leases).expect_err("in use").to_string();
        assert!(err.contains("in use by pod default/web-2 (sandbox sb1)"), "{err}");
        assert!(root.join("a").join(MANIFEST).exists(), "untouched");
        drop(lease);
        let removed = remove(&root, "a", &leases).expect("removed");
        assert_eq!(removed.pod.as_deref(), Some("default/web"));
        assert!(removed.bytes.is_some_and(|b| b > 100));
        assert!(!root.join("a").exists());
        assert_eq!(
            remove(&root, "team/b", &leases).expect("in a folder").name,
            "team/b"
        );
        assert_eq!(remove(&root, "partial", &leases).expect("broken").bytes, None);
        let left: Vec<_> = std::fs::read_dir(&root)
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            left.iter().all(|n| !n.starts_with('.')),
            "nothing hidden left: {left:?}"
        );
    }

    #[test]
    fn names_cannot_leave_the_root() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("good")).expect("mkdir");
        std::fs::create_dir_all(t.path().join("outside")).expect("mkdir");
        std::os::unix::fs::symlink(t.path().join("outside"), root.join("link-out")).expect("symlink");
        std::os::unix::fs::symlink("good", root.join("link-in")).expect("symlink");
        assert!(resolve(&root, "good").is_ok());
        assert!(resolve(&root, "link-in").is_ok(), "a link that stays inside");
        for bad in [
            "/etc",
            "../outside",
            "good/../../outside",
            "link-out",
            "",
            ".",
            "missing",
        ] {
            assert!(resolve(&root, bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod proptests;
