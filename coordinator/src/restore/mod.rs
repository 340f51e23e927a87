//! `podsnap restore`: bring a checkpointed pod back as a new pod, through CRI, like kubelet.
//!
//! 1. Check the checkpoint is exactly what its manifest lists, the node's restore policy
//!    (namespace rules), that this node can run it (architecture, CRIU, kernel, CPU), rebuild
//!    every CRI config from it, check that each bind mount of a host path it names is one the
//!    node configuration allows (`[restore] host_paths`: this pod is made through CRI by root,
//!    past any admission control; the path mounted is the one checked, symlinks resolved), and
//!    check each image is on the node with the image id the checkpoint recorded: all before
//!    anything is created. The digests are verified once, by
//!    the shim, which trusts nothing the CLI says.
//! 2. The checkpoint must lie inside the node's checkpoint root, where the shim looks for it
//!    (its name is then its path relative to the root); one outside is brought in under a
//!    fresh name first, by hard links (no data copied; a copy only across filesystems, see
//!    [`podsnap_checkpoint::node::import`]), and removed again once the restore is over: the shim
//!    reads the checkpoint at each container's Create and Start, all of which happen here.
//! 3. RunPodSandbox (handler `podsnap`, a new uid, the restore annotation naming the checkpoint:
//!    a new network namespace and pod IP), then CreateContainer for each container in its
//!    recorded start order, as kubelet would. Each container comes back in its recorded state:
//!    one that had exited (a completed init container, a crashed one) is started and answered
//!    with its recorded exit code at once, without running, before the next is created; one
//!    that was created but never started is left created; the running ones are restored from
//!    their CRIU images by the shim, all at once (StartContainer of each together, once every
//!    container is created): they ran side by side at the checkpoint and each resumes at that
//!    instant, so no ordering between them is lost. With `lazy` the sandbox also carries
//!    `podsnap.io/restore-lazy: "true"`: the shim restores each container with CRIU's lazy pages
//!    (see the shim's `lazy_pages.rs`).
//! 4. Any failure on the way removes what was made: the sandbox with its containers, the pod's
//!    directories, its cgroups and what was brought into the root.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podsnap_checkpoint::config::NodeConfig;
use podsnap_checkpoint::format::manifest::{Manifest, CPUINFO};
/// What bringing a checkpoint into the root did ([`RestoredPod::imported`]).
pub use podsnap_checkpoint::node::import::Imported;
use podsnap_checkpoint::trust::policy::{self, Violation};

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::summary::name_in_root;

mod bring_in;
mod create;
mod images;
mod plan;
mod undo;
mod volumes;

use bring_in::*;
use create::*;
use images::*;
use plan::*;
use undo::*;

/// Where kubelet keeps pod directories.
pub const DEFAULT_PODS_DIR: &str = "/var/lib/kubelet/pods";
/// Where kubelet keeps pod logs.
pub const DEFAULT_LOGS_DIR: &str = "/var/log/pods";
/// The largest saved container spec read back.
const MAX_SPEC_BYTES: u64 = 4 * 1024 * 1024;

/// What to restore and where.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// CRI endpoint (`unix:///run/containerd/containerd.sock`).
    pub runtime_endpoint: String,
    /// The node's checkpoint root (the shim's `PODSNAP_CHECKPOINT_ROOT`).
    pub checkpoint_root: PathBuf,
    pub checkpoint_dir: PathBuf,
    /// The new pod's namespace; the checkpointed pod's when `None`.
    pub namespace: Option<String>,
    /// The new pod's name; the checkpointed pod's when `None`.
    pub name: Option<String>,
    /// kubelet's pod directories (`<pods dir>/<uid>/volumes/...`).
    pub pods_dir: PathBuf,
    /// kubelet's pod log directories.
    pub logs_dir: PathBuf,
    /// The runtime handler to run the pod with.
    pub handler: String,
    /// The node configuration (restore policy).
    pub config: NodeConfig,
    /// Ask for the pod's address at the checkpoint (`podsnap.io/keep-ip`; the node's CNI
    /// configuration must use `podsnap-cni-ipam`).
    pub keep_ip: bool,
    /// Restore lazily (`podsnap.io/restore-lazy`): each container runs once its processes are
    /// back; its memory follows on demand from the checkpoint (see the README for the cost).
    pub lazy: bool,
    /// Told the new pod's sandbox id as soon as RunPodSandbox returns it (before any of its
    /// containers is created): a live migration's page streams go to that pod's shims only.
    pub sandbox_created: Option<std::sync::Arc<tokio::sync::watch::Sender<Option<String>>>>,
}

impl RestoreRequest {
    /// A request with the standard socket, root, kubelet directories and handler.
    pub fn new(checkpoint_dir: impl Into<PathBuf>) -> Self {
        Self {
            runtime_endpoint: format!("unix://{}", crate::containerd::DEFAULT_ADDRESS),
            checkpoint_root: PathBuf::from(crate::DEFAULT_CHECKPOINT_ROOT),
            checkpoint_dir: checkpoint_dir.into(),
            namespace: None,
            name: None,
            pods_dir: PathBuf::from(DEFAULT_PODS_DIR),
            logs_dir: PathBuf::from(DEFAULT_LOGS_DIR),
            handler: crate::pod::HANDLER.to_owned(),
            config: NodeConfig::default(),
            keep_ip: false,
            lazy: false,
            sandbox_created: None,
        }
    }
}

/// A restored pod.
#[derive(Debug, Clone)]
pub struct RestoredPod {
    /// The new sandbox id.
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The new pod IP (empty for a host-network pod).
    pub ip: String,
    /// The checkpoint's name in the root (what the restore annotation says).
    pub checkpoint: String,
    /// What was brought into the root when the checkpoint lay outside it (removed again once
    /// the restore was over).
    pub imported: Option<Imported>,
    /// (name, new container id) in the order they were started.
    pub containers: Vec<(String, String)>,
    /// Containers that had completed (init containers): created and answered with their
    /// recorded exit by the shim, not run again.
    pub not_rerun: Vec<String>,
    /// Images that were missing on this node and pulled by the digest the checkpoint pinned.
    pub images_pulled: Vec<String>,
    /// (name, new container id) of those completed containers.
    pub completed: Vec<(String, String)>,
    /// (name, new container id) of containers that were created but never started at the
    /// checkpoint: created again, and left created.
    pub left_created: Vec<(String, String)>,
    pub pod_dir: PathBuf,
    pub log_dir: PathBuf,
    pub took: Duration,
}

/// Restores a pod from `request.checkpoint_dir`; see the module documentation.
pub async fn restore(request: &RestoreRequest, progress: &dyn Progress) -> Result<RestoredPod> {
    restore_undoable(request, progress).await.map(|(pod, _)| pod)
}

/// What a restore made, to remove it again after it succeeded (a migration whose source does
/// not commit): the sandbox with its containers, the pod's cgroup and directories.
#[derive(Debug)]
pub struct Rollback(Undo);

impl Rollback {
    /// Removes the restored pod; returns what was removed and what not, for the operator.
    pub async fn run(self, request: &RestoreRequest) -> String {
        match crate::cri::connect(&request.runtime_endpoint).await {
            Ok(clients) => self.0.run(&clients).await,
            Err(e) => format!("NOT removed (clean up by hand): {:?}: {e}", self.0),
        }
    }
}

/// [`restore`], and what to remove to undo it.
pub async fn restore_undoable(
    request: &RestoreRequest,
    progress: &dyn Progress,
) -> Result<(RestoredPod, Rollback)> {
    let started = Instant::now();
    let dir = std::fs::canonicalize(&request.checkpoint_dir)
        .map_err(Error::io("open the checkpoint", &request.checkpoint_dir))?;
    progress.step(&format!("checking checkpoint {}", dir.display()));
    let listed_dir = dir.clone();
    let manifest = tokio::task::spawn_blocking(move || Manifest::load_listed(&listed_dir))
        .await
        .map_err(|e| Error::Refused(format!("checkpoint check stopped: {e}")))?
        .map_err(Box::new)?;
    let shown = dir.display().to_string();
    let refused = |v: Violation| Error::Refused(podsnap_checkpoint::Error::refused(&shown, v).to_string());
    let namespace = target_namespace(request, &manifest);
    policy::check_namespace(
        &request.config.restore,
        manifest.pod.namespace.as_deref(),
        &namespace,
        &request.config.describe(),
    )
    .map_err(refused)?;
    let launcher = podsnap_runtime::launcher::TokioLauncher;
    // (Only CRIU's version, the kernel and the architecture are compared.)
    let here = podsnap_checkpoint::trust::identity::this_node(&launcher, Path::new("runc")).await;
    policy::check_host(&manifest.host, &here).map_err(refused)?;
    if manifest.lists(CPUINFO) {
        let host_dir = dir.join(CPUINFO);
        podsnap_checkpoint::trust::identity::check_cpuinfo(&launcher, host_dir.parent().unwrap_or(&dir))
            .await
            .map_err(refused)?;
    }
    let clients = crate::cri::connect(&request.runtime_endpoint).await?;
    if request.keep_ip {
        volumes::check_cni_keeps_addresses(&clients).await?;
    }
    let driver = cgroup_driver(&clients).await;
    let mut plan = plan(request, &dir, manifest, driver)?;
    volumes::check_persistent_volumes(&dir, &plan, progress)?;
    let images_pulled = check_images(&clients, &mut plan, &refused, progress).await?;

    let mut undo = Undo::default();
    let (checkpoint, imported) = match name_in_root(&dir, &request.checkpoint_root) {
        Some(name) => (name, None),
        None => {
            let imported = bring_in(request, &dir, &plan.manifest, progress).await?;
            undo.imported = Some(imported.dir.clone());
            let name = name_in_root(&imported.dir, &request.checkpoint_root).ok_or_else(|| {
                Error::Refused(format!(
                    "the imported checkpoint {} is not inside {}",
                    imported.dir.display(),
                    request.checkpoint_root.display()
                ))
            });
            match name {
                Ok(name) => (name, Some(imported)),
                Err(e) => {
                    undo.run(&clients).await;
                    return Err(e);
                }
            }
        }
    };
    let created = create(request, &plan, &checkpoint, &clients, &mut undo, progress).await;
    if created.is_ok() {
        if let Some(imported) = &imported {
            // Every container was created and started: nothing reads the checkpoint again
            // (restarts start fresh from their images).
            progress.step(&format!("removing the imported checkpoint {checkpoint}"));
            let dir = imported.dir.clone();
            let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
            match removed {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::warn!("remove the imported checkpoint {}: {e}", imported.dir.display()),
                Err(e) => log::warn!("remove the imported checkpoint {}: {e}", imported.dir.display()),
            }
        }
    }
    match created {
        Ok(Created {
            id,
            restored: containers,
            completed,
            left_created,
            ip,
        }) => Ok((
            RestoredPod {
                id,
                name: plan.pod.name.clone(),
                namespace: plan.pod.namespace.clone(),
                uid: plan.pod.uid.clone(),
                ip,
                checkpoint,
                imported,
                containers,
                not_rerun: completed.iter().map(|(name, _)| name.clone()).collect(),
                images_pulled,
                completed,
                left_created,
                pod_dir: plan.pod.pod_dir,
                log_dir: plan.pod.log_dir,
                took: started.elapsed(),
            },
            Rollback(Undo {
                imported: None,
                ..undo
            }),
        )),
        Err(e) => {
            progress.step("restore failed: removing what it created");
            let cleanup = undo.run(&clients).await;
            Err(Error::RolledBack {
                source: Box::new(e),
                cleanup,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::Spec;

    use super::*;
    use crate::spec::NewPod;

    #[test]
    fn uids_look_like_kubernetes_uids() {
        let a = new_uid().expect("uid");
        let b = new_uid().expect("uid");
        assert_eq!(a.len(), 36);
        assert_ne!(a, b);
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn host_mounts_are_refused_or_pointed_at_the_path_checked() {
        use crate::spec::{container_plan, namespace_options};
        let t = tempfile::tempdir().expect("tempdir");
        let base = std::fs::canonicalize(t.path()).expect("canonical");
        std::fs::create_dir(base.join("data")).expect("mkdir");
        std::os::unix::fs::symlink(base.join("data"), base.join("link")).expect("symlink");
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.1.0", "root": {"path": "rootfs"},
            "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "args": ["x"]},
            "mounts": [
                {"destination": "/data", "type": "bind", "source": base.join("link"),
                 "options": ["rbind"]},
                {"destination": "/scratch", "type": "bind", "options": ["rbind"],
                 "source": "/var/lib/kubelet/pods/old/volumes/kubernetes.io~empty-dir/scratch"}
            ]
        }))
        .expect("a spec");
        let pod = NewPod::new("web", "default", "u-1", Path::new("/pods"), Path::new("/logs"));
        let ns = namespace_options(None, &[&spec]);
        let plan = || container_plan("app", &spec, Some("img"), &ns, &pod, "t").expect("a plan");
        let mut request = RestoreRequest::new(base.join("ckpt"));
        let data = base.join("data").display().to_string();
        let err = allow_host_mounts(&request, &base, &mut plan())
            .expect_err("no host path is allowed by default")
            .to_string();
        assert!(
            err.contains("rule: restore.host_paths") && err.contains(&format!("host path {data} ")),
            "{err}"
        );
        request.config.restore.host_paths = vec![base.join("data")];
        let mut allowed = plan();
        allow_host_mounts(&request, &base, &mut allowed).expect("allowed");
        let hosts: Vec<&str> = allowed
            .config
            .mounts
            .iter()
            .map(|m| m.host_path.as_str())
            .collect();
        assert_eq!(
            hosts,
            [data.as_str(), "/pods/u-1/volumes/kubernetes.io~empty-dir/scratch"],
            "the symlink resolved; the pod's own emptyDir needs no allowance"
        );
    }

    #[test]
    fn make_dir_records_what_it_made() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut undo = Undo::default();
        make_dir(&t.path().join("a/b/c"), 0o755, &mut undo).expect("mkdir");
        make_dir(&t.path().join("a/b"), 0o755, &mut undo).expect("exists");
        assert_eq!(
            undo.dirs,
            [t.path().join("a"), t.path().join("a/b"), t.path().join("a/b/c")]
        );
    }
}
