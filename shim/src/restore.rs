//! Kubelet-driven restore: a pod carrying the annotation `podsnap.io/restore-from: <name>` has
//! each of its containers restored from the checkpoint `<name>` in the node's checkpoint root
//! instead of started fresh; a completed init container is answered with its recorded exit
//! (0) without running it. The checkpoint is verified (every digest) once, at the sandbox's
//! Create, before anything of the pod exists. `<name>` never leads outside the root: absolute
//! paths, `..` and symlinks out of it are refused.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use oci_spec::runtime::Spec;
use podsnap_checkpoint::container::DumpOptions;
use podsnap_checkpoint::dump::empty_dir_name;
use podsnap_checkpoint::manifest::Manifest;
use podsnap_runtime::bundle::PodIdentity;

use crate::error::{Error, Result};
use crate::process::lock;

/// The pod annotation naming the checkpoint to restore from.
pub const RESTORE_ANNOTATION: &str = "podsnap.io/restore-from";
/// Where checkpoints live unless `PODSNAP_CHECKPOINT_ROOT` says otherwise.
pub const DEFAULT_CHECKPOINT_ROOT: &str = "/var/lib/podsnap/checkpoints";
/// The environment variable naming the node's checkpoint root.
pub const CHECKPOINT_ROOT_ENV: &str = "PODSNAP_CHECKPOINT_ROOT";

/// The node's checkpoint root.
pub fn checkpoint_root() -> PathBuf {
    std::env::var_os(CHECKPOINT_ROOT_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CHECKPOINT_ROOT))
}

/// Resolves a checkpoint name inside `root`, refusing anything that leads elsewhere.
pub fn resolve(root: &Path, name: &str) -> Result<PathBuf> {
    let refuse = |why: &str| {
        Error::InvalidArgument(format!(
            "{RESTORE_ANNOTATION}: {name:?} is refused: {why}; it must name a checkpoint inside {}",
            root.display()
        ))
    };
    let rel = Path::new(name);
    if name.is_empty() || rel.is_absolute() {
        return Err(refuse("not a relative name"));
    }
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(refuse("it contains '..' or '.'"));
    }
    let root =
        std::fs::canonicalize(root).map_err(|e| refuse(&format!("the checkpoint root is unusable ({e})")))?;
    let dir =
        std::fs::canonicalize(root.join(rel)).map_err(|e| refuse(&format!("no such checkpoint ({e})")))?;
    if !dir.starts_with(&root) || dir == root {
        return Err(refuse("it leads outside the checkpoint root"));
    }
    if !dir.is_dir() {
        return Err(refuse("not a directory"));
    }
    Ok(dir)
}

/// What to do with a container at Create.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Create and start it as usual.
    Fresh,
    /// Do not run it: it had exited with this code (a completed init container).
    Exited(u32),
    /// Restore it from CRIU images.
    Restore(Box<RestorePlan>),
}

/// Everything a container's restore needs from its checkpoint.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub image_dir: PathBuf,
    pub options: DumpOptions,
    /// rootfs-diff.tar and rootfs-deleted.json, when the dump captured rootfs changes.
    pub rootfs_changes: Option<(PathBuf, PathBuf)>,
    /// (archive, host directory) of each emptyDir volume this container mounts.
    pub volumes: Vec<(PathBuf, PathBuf)>,
}

/// Verified checkpoints and filled volumes, for the life of the pod's shim.
#[derive(Default)]
pub struct Restores {
    verified: Mutex<HashMap<PathBuf, Arc<Manifest>>>,
    filled: Mutex<HashSet<PathBuf>>,
}

impl Restores {
    /// Decides how to create a container from its spec's annotations.
    pub async fn plan(&self, spec: &Spec, identity: &PodIdentity) -> Result<Plan> {
        let Some(name) = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(RESTORE_ANNOTATION))
            .filter(|v| !v.is_empty())
            .cloned()
        else {
            return Ok(Plan::Fresh);
        };
        let dir = resolve(&checkpoint_root(), &name)?;
        let manifest = self.verified(&dir).await?;
        if identity.is_sandbox {
            return Ok(Plan::Fresh); // a new sandbox; its check above refused a bad checkpoint
        }
        let cname = identity.name.clone().unwrap_or_default();
        let entry = manifest.container(&cname).ok_or_else(|| {
            Error::InvalidArgument(format!("container {cname:?} is not in checkpoint {name:?}"))
        })?;
        if !entry.dumped {
            return Ok(Plan::Exited(entry.exit_code.unwrap_or(0)));
        }
        let cdir = dir.join(entry.dir());
        let image_dir = cdir.join("criu");
        let mut options = podsnap_checkpoint::container::inspect(&image_dir)?;
        // Connections are always captured; they come back only if the dump asked to keep them.
        options.tcp_established = manifest.tcp_established;
        let tar = cdir.join("rootfs-diff.tar");
        let del = cdir.join("rootfs-deleted.json");
        let rootfs_changes = (tar.is_file() && del.is_file()).then_some((tar, del));
        let mut volumes = Vec::new();
        for m in spec.mounts().iter().flatten() {
            let Some(src) = m.source().as_ref().and_then(|s| s.to_str()) else {
                continue;
            };
            let Some(vname) = empty_dir_name(src) else {
                continue;
            };
            if let Some(v) = manifest.volumes.iter().find(|v| v.name == vname) {
                volumes.push((dir.join(&v.archive), PathBuf::from(src)));
            }
        }
        Ok(Plan::Restore(Box::new(RestorePlan {
            image_dir,
            options,
            rootfs_changes,
            volumes,
        })))
    }

    async fn verified(&self, dir: &Path) -> Result<Arc<Manifest>> {
        if let Some(m) = lock(&self.verified).get(dir) {
            return Ok(m.clone());
        }
        let d = dir.to_path_buf();
        let m = tokio::task::spawn_blocking(move || Manifest::load_verified(&d))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let m = Arc::new(m);
        lock(&self.verified).insert(dir.to_path_buf(), m.clone());
        Ok(m)
    }

    /// Prepares a container's filesystem for its restore: emptyDir volumes (once per pod) and
    /// its rootfs changes.
    pub async fn prepare_files(&self, plan: &RestorePlan, rootfs: &Path) -> Result<()> {
        for (archive, dst) in &plan.volumes {
            if !lock(&self.filled).insert(dst.clone()) {
                continue;
            }
            let (a, d) = (archive.clone(), dst.clone());
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&d)
                    .map_err(|e| podsnap_checkpoint::Error::io("create a volume", &d, e))?;
                podsnap_checkpoint::rootfs::unpack(&a, &d)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        }
        if let Some((tar, del)) = plan.rootfs_changes.clone() {
            let r = rootfs.to_path_buf();
            tokio::task::spawn_blocking(move || podsnap_checkpoint::rootfs::apply(&r, &tar, &del))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_leave_the_root() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("good")).expect("mkdir");
        std::fs::create_dir_all(t.path().join("outside")).expect("mkdir");
        std::os::unix::fs::symlink(t.path().join("outside"), root.join("link-out")).expect("symlink");
        std::os::unix::fs::symlink("good", root.join("link-in")).expect("symlink");
        assert!(resolve(&root, "good").is_ok());
        assert!(
            resolve(&root, "link-in").is_ok(),
            "a link that stays inside is fine"
        );
        for bad in [
            "/etc",
            "../outside",
            "good/../../outside",
            "link-out",
            "",
            ".",
            "missing",
        ] {
            let err = resolve(&root, bad).expect_err(bad).to_string();
            assert!(err.contains("is refused"), "{bad}: {err}");
        }
    }
}
