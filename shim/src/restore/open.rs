//! The first phases of a restore, at each Create: what the container's spec asks
//! ([`asked`]: the annotation, kubelet's attempt, lazy or not), then the checkpoint opened
//! ([`open`]: pulled for an `oci://` reference, resolved inside the node's checkpoint root,
//! leased for the pod).

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use podsnap_checkpoint::config::{NodeConfig, LAZY_ANNOTATION, RESTORE_ANNOTATION};
use podsnap_checkpoint::node::lease::{self, Holder, LEASE_DIR};
use podsnap_runtime::bundle::PodIdentity;

use super::claim::claim_for_pod;
use super::pull::{forget_pulled, pull_for_pod, OCI_PREFIX};
use super::{NewContainer, Restores};
use crate::error::{Error, Result};
use crate::process::lock;

/// A container whose spec asks for a restore (and whose attempt is restored).
pub struct Asked {
    /// The annotation's value: a name in the checkpoint root, `oci://REF`, or a live
    /// migration's `podsnap://HOST:PORT/TICKET`.
    pub name: String,
    /// The container's name in its pod.
    pub cname: String,
    pub lazy: bool,
}

/// The checkpoint found in the node's root and leased for the pod.
pub struct Opened {
    pub config: NodeConfig,
    pub root: PathBuf,
    /// Its name in the root (the pulled copy's, for `oci://`).
    pub name: String,
    pub dir: PathBuf,
    /// Pulled for this pod (an `oci://` restore).
    pub pulled: bool,
    pub cname: String,
    pub lazy: bool,
}

/// What the spec asks: `None` for a container created fresh (no annotation, or a restart).
pub fn asked(r: &Restores, new: &NewContainer<'_>) -> Result<Option<Asked>> {
    let Some(name) = new
        .spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(RESTORE_ANNOTATION))
        .filter(|v| !v.is_empty())
        .cloned()
    else {
        return Ok(None);
    };
    let identity = new.identity;
    let cname = identity.name.clone().unwrap_or_default();
    // Checked on the sandbox too: a pod asking for something else is refused whole.
    let lazy = lazy_asked(new.spec)?;
    if !identity.is_sandbox {
        match restart_count(new.spec) {
            // kubelet says which attempt this is (the drop-in passes its annotation).
            Some(attempt) if attempt > 0 => {
                log::info!("container {cname}: attempt {attempt} of a restored pod starts fresh");
                return Ok(None);
            }
            Some(_) => {}
            // Without it: a second Create of a name already restored is a restart.
            None if lock(&r.restored).contains(&cname) => {
                log::info!("container {cname}: restarted in a restored pod, starts fresh");
                return Ok(None);
            }
            None => {}
        }
    }
    Ok(Some(Asked { name, cname, lazy }))
}

/// Opens the checkpoint asked for: pulls an `oci://` one (the sandbox's Create does), resolves
/// the name inside the root and takes the pod's lease. A refused pod keeps nothing it pulled.
pub async fn open(r: &Restores, asked: Asked, identity: &PodIdentity) -> Result<Opened> {
    let config = NodeConfig::load()?;
    let root = config.checkpoint_root();
    let live = asked
        .name
        .strip_prefix(podsnap_checkpoint::format::layout::LIVE_PREFIX);
    let (name, pulled) = match (asked.name.strip_prefix(OCI_PREFIX), live) {
        (Some(reference), _) => (pull_for_pod(reference, identity, &root).await?, true),
        (None, Some(reference)) => (claim_for_pod(reference, identity, &root).await?, true),
        (None, None) => (asked.name, false),
    };
    let leased = resolve(&root, &name).and_then(|dir| {
        r.lease(&root, &name, &dir, identity)?;
        Ok(dir)
    });
    let dir = match leased {
        Ok(dir) => dir,
        Err(e) => {
            forget_pulled(pulled, identity, &root).await;
            return Err(e);
        }
    };
    Ok(Opened {
        config,
        root,
        name,
        dir,
        pulled,
        cname: asked.cname,
        lazy: asked.lazy,
    })
}

/// kubelet's container annotation counting the container's restarts (its attempt).
pub const RESTART_COUNT_ANNOTATION: &str = "io.kubernetes.container.restartCount";

/// Resolves a checkpoint name inside `root`, refusing anything that leads elsewhere.
pub fn resolve(root: &Path, name: &str) -> Result<PathBuf> {
    podsnap_checkpoint::node::store::resolve(root, name).map_err(|why| {
        Error::InvalidArgument(format!(
            "{RESTORE_ANNOTATION}: {name:?} is refused: {why}; it must name a checkpoint inside {}",
            root.display()
        ))
    })
}

impl Restores {
    /// Takes this pod's lease on the checkpoint at `dir` (named `name` in `root`), once; then
    /// checks the checkpoint is still there: a removal that did not see the lease has moved
    /// it away (see [`podsnap_checkpoint::node::lease`]).
    pub(super) fn lease(&self, root: &Path, name: &str, dir: &Path, identity: &PodIdentity) -> Result<()> {
        if lock(&self.leases).contains_key(dir) {
            return Ok(());
        }
        let Some(sandbox) = identity.sandbox_id.as_deref() else {
            log::warn!(
                "container {:?}: no sandbox id: restores from {name} without a lease",
                identity.name
            );
            return Ok(());
        };
        let pod = match (&identity.pod_namespace, &identity.pod_name) {
            (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
            _ => None,
        };
        let lease = lease::take(Path::new(LEASE_DIR), &Holder::this_process(sandbox, pod, dir))?;
        if resolve(root, name)? != dir {
            return Err(Error::InvalidArgument(format!(
                "{RESTORE_ANNOTATION}: checkpoint {name:?} changed while it was being opened; try again"
            )));
        }
        log::info!("pod {sandbox}: holds a lease on checkpoint {name}");
        lock(&self.leases).insert(dir.to_path_buf(), lease);
        Ok(())
    }
}

/// Whether the pod asks for a lazy restore: `podsnap.io/restore-lazy` is `"true"`; absent, empty
/// or `"false"` is an eager one; anything else is refused.
fn lazy_asked(spec: &Spec) -> Result<bool> {
    match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(LAZY_ANNOTATION))
        .map(|v| v.trim())
    {
        None | Some("" | "false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Error::InvalidArgument(format!(
            "{LAZY_ANNOTATION}: {other:?} is neither \"true\" nor \"false\""
        ))),
    }
}

/// kubelet's restart count of a container (0 for its first attempt), when it passes one.
fn restart_count(spec: &Spec) -> Option<u64> {
    spec.annotations()
        .as_ref()?
        .get(RESTART_COUNT_ANNOTATION)?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_name_is_reported_as_the_annotation_it_came_from() {
        // Which names are refused is podsnap_checkpoint::node::store::resolve's (tested there).
        let t = tempfile::tempdir().expect("tempdir");
        let err = resolve(t.path(), "../outside").expect_err("refused").to_string();
        assert!(
            err.starts_with(&format!("{RESTORE_ANNOTATION}: \"../outside\" is refused: ")),
            "{err}"
        );
        assert!(err.ends_with(&format!("inside {}", t.path().display())), "{err}");
    }

    /// A minimal spec with annotation `key` set to `value`, or without it.
    fn annotated(key: &str, value: Option<&str>) -> Spec {
        let mut a = serde_json::Map::new();
        if let Some(v) = value {
            a.insert(key.into(), v.into());
        }
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "annotations": a
        }))
        .expect("spec")
    }

    #[test]
    fn a_lazy_restore_is_asked_with_true_and_nothing_else() {
        let spec = |value: Option<&str>| annotated(LAZY_ANNOTATION, value);
        assert!(!lazy_asked(&spec(None)).expect("absent"));
        assert!(!lazy_asked(&spec(Some("false"))).expect("false"));
        assert!(!lazy_asked(&spec(Some(""))).expect("empty"));
        assert!(lazy_asked(&spec(Some("true"))).expect("true"));
        let err = lazy_asked(&spec(Some("yes"))).expect_err("refused").to_string();
        assert!(err.contains("podsnap.io/restore-lazy: \"yes\""), "{err}");
    }

    #[test]
    fn restart_counts_come_from_kubelet_annotations() {
        let spec = |count: Option<&str>| annotated(RESTART_COUNT_ANNOTATION, count);
        assert_eq!(restart_count(&spec(None)), None);
        assert_eq!(restart_count(&spec(Some("0"))), Some(0));
        assert_eq!(restart_count(&spec(Some("3"))), Some(3));
        assert_eq!(restart_count(&spec(Some("x"))), None);
    }
}
