//! Kubelet-driven restore: a pod carrying the annotation `podsnap.io/restore-from: <name>` has
//! each of its containers brought back from the checkpoint `<name>` in the node's checkpoint
//! root instead of started fresh.
//!
//! At the sandbox's Create, before anything of the pod exists:
//! 1. `<name>` is resolved inside the root (absolute paths, `..` and symlinks out of it are
//!    refused), and the pod takes a lease on the checkpoint for the life of this shim
//!    ([`podsnap_checkpoint::node::lease`]: `podsnap rm` and retention leave it alone);
//! 2. the checkpoint must be exactly what its manifest lists (no unlisted file);
//! 3. the restore policy of the node configuration: may a pod of this namespace restore a
//!    checkpoint of that one ([`podsnap_checkpoint::trust::policy`]);
//! 4. the node can run it: architecture, CRIU, kernel, CPU features;
//! 5. every digest, once for the pod's life in this shim.
//!
//! At each container's Create: the container's recorded state comes back as it was. Running
//! and paused containers are restored from their CRIU images after the image and privilege
//! checks (a paused one is paused again right after its restore); a container that had exited is answered with its recorded exit code without
//! running; one that was created but never started is created fresh (it never ran). Only
//! attempt 0 is restored: kubelet's restarts of a container start fresh from the image. The
//! attempt is kubelet's restart count annotation; without it, a second Create of a name this
//! pod already restored counts as a restart.
//!
//! Established connections are always restored ([`NetHold`]), so a TCP connection between two
//! containers of the pod comes back whole: when the dump found such connections, the pod's
//! network is locked, loopback included, until the containers at their ends are all restored
//! (no packet of a restored end reaches the other before it exists: the kernel would answer
//! with a reset). The pod's addresses at the dump are lent to its loopback device meanwhile, for
//! the connections bound to them; the connections to outside the pod are closed after each
//! container's restore unless the checkpoint was taken to keep them (`--tcp-established`) and
//! the pod's address is the same.
//!
//! The restore is a pipeline of phases, one file each; each takes the previous one's state by
//! value and returns its own:
//!
//! | at | phase | file | from -> to |
//! |---|---|---|---|
//! | Create | what the spec asks (annotation, attempt, lazy) | `open.rs` | spec -> [`open::Asked`] |
//! | Create | open: pull (`oci://`, `pull.rs`), resolve in the root, lease | `open.rs` | `Asked` -> [`open::Opened`] |
//! | Create | verify, once per checkpoint: listed files, policy, host, digests | `verify.rs` | `Opened` -> [`verify::Checked`] |
//! | Create | plan one container: recorded state, image and privilege checks, CRIU options, pod network (`network.rs`), shared PIDs and unix links (`shared.rs`) | `plan.rs` | `Checked` -> [`Plan`] |
//! | Create | prepare its files: volumes, /dev/shm, SysV IPC, rootfs changes | `prepare.rs` | [`RestorePlan`] -> [`Prepared`] |
//! | Start | CRIU restore of the container (lazy-pages daemon, stdio, cgroup) | `criu.rs` | `RestoreSource` -> [`criu::Restored`] |
//! | Start | the processes the pod's pause process had adopted | `adopted.rs` | `Restored` -> `Restored` |
//! | Start | finish: cgroups kept, exit watched | `criu.rs` | `Restored` -> pid |
//!
//! [`Restores`] keeps what the pod's containers share between their Creates and Starts.

mod adopted;
mod claim;
pub mod criu;
mod network;
pub mod open;
mod plan;
mod prepare;
mod pull;
mod shared;
pub mod verify;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use oci_spec::runtime::Spec;
use podsnap_checkpoint::criu::container::{DumpOptions, InheritedSocket};
use podsnap_checkpoint::format::manifest::Manifest;
use podsnap_checkpoint::node::lease::Lease;
use podsnap_runtime::bundle::PodIdentity;

use crate::container::{Lazy, RestoreSource};
use crate::error::Result;
use crate::process::lock;

pub use network::NetHold;
#[cfg(test)]
use open::RESTART_COUNT_ANNOTATION;
pub use pull::remove_pulled;
use shared::NewPair;

/// What to do with a container at Create.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Create and start it as usual.
    Fresh,
    /// Do not run it: it had exited with this code.
    Exited(u32),
    /// Restore it from CRIU images.
    Restore(Box<RestorePlan>),
}

impl Plan {
    /// A restore from CRIU images containerd names itself (a Create's `checkpoint`: `ctr`'s
    /// path), not from a pod checkpoint.
    pub fn from_images(image_dir: PathBuf) -> Result<Plan> {
        let options = podsnap_checkpoint::criu::container::inspect(&image_dir)?;
        let span = restore_span("", "", &image_dir.to_string_lossy());
        Ok(Plan::Restore(Box::new(RestorePlan {
            image_dir,
            options,
            rootfs_changes: None,
            volumes: Vec::new(),
            sysv_ipc: None,
            started_order: None,
            name: None,
            paused: false,
            lazy: None,
            unix_ends: Vec::new(),
            adopted: Vec::new(),
            span,
        })))
    }
}

/// A container's restore prepared at its Create: what its Start restores from.
pub struct Prepared {
    pub source: RestoreSource,
    /// It was paused at the checkpoint: paused again once restored.
    pub paused: bool,
}

/// Everything a container's restore needs from its checkpoint.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub image_dir: PathBuf,
    pub options: DumpOptions,
    /// rootfs-diff.tar and rootfs-deleted.json, when the checkpoint lists them.
    pub rootfs_changes: Option<(PathBuf, PathBuf)>,
    /// (archive, host directory) of each emptyDir volume this container mounts, and of the
    /// pod's `/dev/shm`.
    pub volumes: Vec<(PathBuf, PathBuf)>,
    /// (checkpoint directory, the new pod's IPC namespace) when the checkpoint holds SysV IPC
    /// objects of the pod: created there once, before the pod's first container.
    pub sysv_ipc: Option<(PathBuf, PathBuf)>,
    /// The container's name in its pod (kubelet path), marked restored once created.
    pub name: Option<String>,
    /// Its place in the pod's start order at the checkpoint.
    pub started_order: Option<u64>,
    /// It was paused at the checkpoint: it comes back paused.
    pub paused: bool,
    /// Restore it lazily (`podsnap.io/restore-lazy`).
    pub lazy: Option<Lazy>,
    /// Its ends of the checkpoint's unix connections to other containers.
    pub unix_ends: Vec<InheritedSocket>,
    /// (PID in the pod, CRIU images) of each of its processes the pod's pause process had
    /// adopted: restored beside it.
    pub adopted: Vec<(u32, PathBuf)>,
    /// The restore's span (`restore`: sandbox, container, checkpoint, each phase's time),
    /// closed once the container runs or its restore failed ([`restore_span`]).
    pub span: tracing::Span,
}

/// The span of one container's restore; the phases record their times in it.
pub fn restore_span(sandbox: &str, container: &str, checkpoint: &str) -> tracing::Span {
    tracing::info_span!(
        "restore",
        sandbox = %sandbox,
        container = %container,
        checkpoint = %checkpoint,
        planned_ms = tracing::field::Empty,
        prepare_ms = tracing::field::Empty,
        criu_ms = tracing::field::Empty,
        adopted_ms = tracing::field::Empty,
        outcome = tracing::field::Empty,
    )
}

/// What the shim knows of a container being created.
pub struct NewContainer<'a> {
    pub spec: &'a Spec,
    pub identity: &'a PodIdentity,
    /// The overlay lower directories of its rootfs, top first (from the Create request).
    pub layers: &'a [String],
}

/// A checkpoint verified for this pod.
struct Verified {
    manifest: Manifest,
    /// This node's identity, to tell node-local facts apart.
    node_id: String,
}

/// Verified checkpoints, filled volumes and restored containers, for the life of the pod's shim.
#[derive(Default)]
pub struct Restores {
    verified: Mutex<HashMap<PathBuf, Arc<Verified>>>,
    filled: Mutex<HashSet<PathBuf>>,
    /// Held while what the pod's containers share is filled (volumes, SysV IPC): containers
    /// of a pod are created at once (`podsnap restore` starts their restores together), and
    /// the first fills, the others wait and find it filled.
    filling: tokio::sync::Mutex<()>,
    /// Names of the containers restored (or answered as exited) in this pod: a second Create
    /// of one of them is a restart, which starts fresh.
    restored: Mutex<HashSet<String>>,
    /// The pod's leases on the checkpoints it restores from, by checkpoint directory: held
    /// for the life of the shim (released as it exits, see `service.rs`).
    leases: Mutex<HashMap<PathBuf, Lease>>,
    /// The pod's network while its containers are restored.
    net: Arc<tokio::sync::Mutex<Option<NetHold>>>,
    /// Set once the pod's shared PID namespace hands out ids above the checkpoint's.
    pids_reserved: tokio::sync::OnceCell<()>,
    /// The new connections of the checkpoint's unix links between containers, by checkpoint
    /// directory and link: made by the first restore of a container at either end, each end
    /// taken by the restore of its container.
    unix_pairs: Arc<Mutex<HashMap<(PathBuf, usize), NewPair>>>,
}

impl Restores {
    /// Decides how to create a container from its spec's annotations; refuses (before
    /// anything is created) whatever the node's restore policy forbids.
    pub async fn plan(&self, new: &NewContainer<'_>) -> Result<Plan> {
        let Some(asked) = open::asked(self, new)? else {
            return Ok(Plan::Fresh);
        };
        let opened = open::open(self, asked, new.identity).await?;
        let checked = verify::verify(self, opened, new.identity).await?;
        if new.identity.is_sandbox {
            return Ok(Plan::Fresh); // a new sandbox; the checks above refused a bad checkpoint
        }
        plan::container(self, checked, new).await
    }

    /// Remembers that container `name` of this pod came back from the checkpoint: its next
    /// Create is a restart.
    pub fn mark_restored(&self, name: &str) {
        lock(&self.restored).insert(name.to_owned());
    }
}

#[cfg(test)]
mod tests {
    //! Which containers are restored, from their annotations alone (decided before the node
    //! configuration or any checkpoint is read).

    use podsnap_checkpoint::config::RESTORE_ANNOTATION;

    use super::*;

    fn spec(annotations: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "annotations": annotations
        }))
        .expect("spec")
    }

    async fn plan_of(r: &Restores, annotations: serde_json::Value) -> Result<Plan> {
        let spec = spec(annotations);
        let identity = PodIdentity::from_spec(&spec);
        r.plan(&NewContainer {
            spec: &spec,
            identity: &identity,
            layers: &[],
        })
        .await
    }

    fn app(extra: &[(&str, &str)]) -> serde_json::Value {
        let mut a = serde_json::json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": "app",
            "io.kubernetes.cri.sandbox-id": "pod1",
        });
        for (k, v) in extra {
            a[*k] = (*v).into();
        }
        a
    }

    #[tokio::test]
    async fn without_the_annotation_a_container_is_created_fresh() {
        let r = Restores::default();
        assert!(matches!(plan_of(&r, app(&[])).await, Ok(Plan::Fresh)));
        // An empty value asks for nothing either.
        let empty = app(&[(RESTORE_ANNOTATION, "")]);
        assert!(matches!(plan_of(&r, empty).await, Ok(Plan::Fresh)));
    }

    #[tokio::test]
    async fn kubelets_restarts_of_a_restored_container_start_fresh() {
        let r = Restores::default();
        let restart = app(&[(RESTORE_ANNOTATION, "web"), (RESTART_COUNT_ANNOTATION, "1")]);
        assert!(matches!(plan_of(&r, restart).await, Ok(Plan::Fresh)));
        // Without kubelet's count: a name already restored in this pod is a restart.
        r.mark_restored("app");
        let again = app(&[(RESTORE_ANNOTATION, "web")]);
        assert!(matches!(plan_of(&r, again).await, Ok(Plan::Fresh)));
    }

    #[tokio::test]
    async fn a_lazy_value_other_than_true_or_false_refuses_the_restore() {
        let r = Restores::default();
        let a = app(&[
            (RESTORE_ANNOTATION, "web"),
            (podsnap_checkpoint::config::LAZY_ANNOTATION, "yes"),
            (RESTART_COUNT_ANNOTATION, "1"),
        ]);
        // Refused even for a restart: the pod asked for something podsnap does not do.
        let e = plan_of(&r, a).await.expect_err("refused").to_string();
        assert!(e.contains("podsnap.io/restore-lazy: \"yes\""), "{e}");
    }
}
