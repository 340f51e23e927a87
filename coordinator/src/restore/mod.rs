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
//!    [`podsnap_checkpoint::import`]), and removed again once the restore is over: the shim
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

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use oci_spec::runtime::Spec;
use podsnap_checkpoint::config::{NodeConfig, KEEP_IP_ANNOTATION, LAZY_ANNOTATION};
use podsnap_checkpoint::import::{import, Imported};
use podsnap_checkpoint::manifest::{ContainerEntry, Manifest, CPUINFO};
use podsnap_checkpoint::policy::{self, NewImage, Violation};
use podsnap_checkpoint::{ContainerState, Role};
use podsnap_runtime::cgroup::{CgroupMode, CgroupPaths, CGROUP_ROOT};

use crate::cri::CriClients;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::spec::{container_plan, namespace_options, sandbox_config, CgroupDriver, ContainerPlan, NewPod};
use crate::summary::name_in_root;

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

/// What becomes of a container once created: its recorded state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Started: the shim restores it from its images.
    Restore,
    /// Started: the shim answers it exited with this code, without running it.
    Exited(u32),
    /// Not started: it had never been started.
    LeaveCreated,
}

/// Everything decided before the first CRI call that creates something.
struct Plan {
    manifest: Manifest,
    pod: NewPod,
    sandbox: Option<Spec>,
    namespaces: cri::NamespaceOption,
    /// In start order, with the image id each must run (when the checkpoint recorded one).
    containers: Vec<(ContainerPlan, Then, Option<String>)>,
}

/// Restores a pod from `request.checkpoint_dir`; see the module documentation.
pub async fn restore(request: &RestoreRequest, progress: &dyn Progress) -> Result<RestoredPod> {
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
    let here = podsnap_checkpoint::host::this_node(&launcher, Path::new("runc")).await;
    policy::check_host(&manifest.host, &here).map_err(refused)?;
    if manifest.lists(CPUINFO) {
        let host_dir = dir.join(CPUINFO);
        podsnap_checkpoint::host::check_cpuinfo(&launcher, host_dir.parent().unwrap_or(&dir))
            .await
            .map_err(refused)?;
    }
    let clients = crate::cri::connect(&request.runtime_endpoint).await?;
    let driver = cgroup_driver(&clients).await;
    let mut plan = plan(request, &dir, manifest, driver)?;
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
        }) => Ok(RestoredPod {
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
        }),
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

/// The new pod's namespace: the one asked for, else the checkpointed pod's.
fn target_namespace(request: &RestoreRequest, manifest: &Manifest) -> String {
    request
        .namespace
        .clone()
        .or_else(|| manifest.pod.namespace.clone())
        .or_else(|| {
            manifest
                .pod
                .annotations
                .get("io.kubernetes.cri.sandbox-namespace")
                .cloned()
        })
        .unwrap_or_else(|| "default".to_owned())
}

/// Reads the saved specs and builds every CRI config for a new pod.
/// The node's cgroup driver, as CRI's RuntimeConfig tells kubelet; cgroupfs when the runtime
/// does not say (kubelet then keeps its own setting, cgroupfs by default).
async fn cgroup_driver(clients: &CriClients) -> CgroupDriver {
    let mut runtime = clients.runtime.clone();
    match runtime.runtime_config(cri::RuntimeConfigRequest {}).await {
        Ok(answer) => {
            let driver = answer
                .into_inner()
                .linux
                .map(|l| l.cgroup_driver)
                .unwrap_or(cri::CgroupDriver::Cgroupfs as i32);
            if driver == cri::CgroupDriver::Systemd as i32 {
                CgroupDriver::Systemd
            } else {
                CgroupDriver::Cgroupfs
            }
        }
        Err(_) => CgroupDriver::Cgroupfs,
    }
}

fn plan(request: &RestoreRequest, dir: &Path, manifest: Manifest, driver: CgroupDriver) -> Result<Plan> {
    let recorded = |key: &str| manifest.pod.annotations.get(key).cloned();
    let name = request
        .name
        .clone()
        .or_else(|| manifest.pod.name.clone())
        .or_else(|| recorded("io.kubernetes.cri.sandbox-name"))
        .ok_or_else(|| Error::Refused("the checkpoint does not record the pod's name: give --name".into()))?;
    let namespace = target_namespace(request, &manifest);
    let uid = new_uid()?;
    let mut pod = NewPod::new(&name, &namespace, &uid, &request.pods_dir, &request.logs_dir);
    pod.cgroup_driver = driver;

    let mut sandbox = None;
    let mut specs: Vec<(&ContainerEntry, Spec, Then)> = Vec::new();
    for entry in manifest.restore_order() {
        if entry.role == Role::Sandbox {
            sandbox = Some(load_spec(dir, &manifest, entry)?);
            continue;
        }
        let then = match entry.state {
            ContainerState::Running | ContainerState::Paused if entry.dumped => Then::Restore,
            ContainerState::Running | ContainerState::Paused => {
                return Err(Error::Refused(format!(
                    "checkpoint {} records container {} as running but holds no images of it",
                    dir.display(),
                    entry.name
                )))
            }
            ContainerState::Stopped => Then::Exited(entry.exit_code.unwrap_or(u32::MAX)),
            ContainerState::Created => Then::LeaveCreated,
        };
        specs.push((entry, load_spec(dir, &manifest, entry)?, then));
    }
    if !specs.iter().any(|(_, _, then)| *then == Then::Restore) {
        return Err(Error::Refused(format!(
            "checkpoint {} holds no running container to restore",
            dir.display()
        )));
    }
    let container_specs: Vec<&Spec> = specs.iter().map(|(_, s, _)| s).collect();
    let namespaces = namespace_options(sandbox.as_ref(), &container_specs);
    let mut containers = Vec::new();
    for (entry, spec, then) in &specs {
        let random = new_uid()?;
        let mut config = container_plan(
            &entry.name,
            spec,
            entry.image.as_deref(),
            &namespaces,
            &pod,
            &random[..8],
        )
        .map_err(Error::Refused)?;
        allow_host_mounts(request, dir, &mut config)?;
        containers.push((config, *then, entry.image_id.clone()));
    }
    drop(specs);
    Ok(Plan {
        manifest,
        pod,
        sandbox,
        namespaces,
        containers,
    })
}

/// Checks each bind mount of a host path of `plan` against the node's `[restore] host_paths`
/// and points it at the path checked (every symlink resolved).
fn allow_host_mounts(request: &RestoreRequest, dir: &Path, plan: &mut ContainerPlan) -> Result<()> {
    for &i in &plan.host_mounts {
        let Some(mount) = plan.config.mounts.get_mut(i) else {
            continue;
        };
        let resolved = policy::check_host_path(
            &request.config.restore,
            &plan.name,
            &mount.container_path,
            Path::new(&mount.host_path),
            &request.config.describe(),
        )
        .map_err(|v| {
            Error::Refused(podsnap_checkpoint::Error::refused(dir.display().to_string(), v).to_string())
        })?;
        mount.host_path = resolved.to_string_lossy().into_owned();
    }
    Ok(())
}

fn load_spec(dir: &Path, manifest: &Manifest, entry: &ContainerEntry) -> Result<Spec> {
    let path = dir.join(entry.file(manifest.part_names().spec));
    let meta = std::fs::metadata(&path).map_err(Error::io("read a saved container spec", &path))?;
    if meta.len() > MAX_SPEC_BYTES {
        return Err(Error::Refused(format!(
            "{} is larger than {MAX_SPEC_BYTES} bytes",
            path.display()
        )));
    }
    let bytes = std::fs::read(&path).map_err(Error::io("read a saved container spec", &path))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Refused(format!("{} is not an OCI runtime spec: {e}", path.display())))
}

/// Every image must be on the node with the image id the checkpoint recorded for its container.
/// An image missing here is pulled by the digest the checkpoint pinned (never by its tag, which
/// may have moved since), and the restored container runs that exact image. Returns what was
/// pulled.
async fn check_images(
    clients: &CriClients,
    plan: &mut Plan,
    refused: &dyn Fn(Violation) -> Error,
    progress: &dyn Progress,
) -> Result<Vec<String>> {
    let images: BTreeSet<String> = plan.containers.iter().map(|(c, _, _)| c.image.clone()).collect();
    let mut pulled = Vec::new();
    for image in images {
        let users: Vec<&ContainerPlan> = plan
            .containers
            .iter()
            .filter(|(c, _, _)| c.image == image)
            .map(|(c, _, _)| c)
            .collect();
        let names = users
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let found = match crate::cri::image_status(clients, &image).await? {
            Some(found) => found,
            None => {
                let pinned = pinned_digest(&plan.manifest, &users, &image, &names)?;
                progress.step(&format!(
                    "pulling image {pinned} (container {names}: {image} is not on this node)"
                ));
                clients
                    .image
                    .clone()
                    .pull_image(cri::PullImageRequest {
                        image: Some(crate::cri::image_spec(&pinned)),
                        auth: None,
                        sandbox_config: None,
                    })
                    .await
                    .map_err(|e| {
                        Error::Refused(format!(
                            "image {image} (container {names}) is not on this node and pulling \
                             {pinned} failed: {}",
                            e.message()
                        ))
                    })?;
                let found = crate::cri::image_status(clients, &pinned).await?.ok_or_else(|| {
                    Error::Refused(format!("image {pinned} is not on this node after its pull"))
                })?;
                for (c, _, _) in plan.containers.iter_mut().filter(|(c, _, _)| c.image == image) {
                    // kubelet's way: the resolved reference to run, the name the pod asked for.
                    if let Some(spec) = c.config.image.as_mut() {
                        spec.image = pinned.clone();
                        spec.user_specified_image = image.clone();
                    }
                }
                pulled.push(pinned);
                found
            }
        };
        for (c, _, _) in plan
            .containers
            .iter()
            .filter(|(c, then, _)| c.image == image && *then == Then::Restore)
        {
            let Some(entry) = plan.manifest.container(&c.name) else {
                continue;
            };
            let new = NewImage {
                name: Some(&image),
                id: Some(&found.id),
                layers: None,
                same_node: false,
            };
            policy::check_image(entry, &new).map_err(refused)?;
        }
    }
    Ok(pulled)
}

/// The digest the checkpoint pinned `image` to, for a pull: one for all its containers, of
/// the image's own repository (a checkpoint cannot make a node pull another repository's image
/// under this name).
fn pinned_digest(manifest: &Manifest, users: &[&ContainerPlan], image: &str, names: &str) -> Result<String> {
    let pins: BTreeSet<&str> = users
        .iter()
        .filter_map(|c| manifest.container(&c.name))
        .filter_map(|e| e.image_digest.as_deref())
        .collect();
    let pinned = match pins.into_iter().collect::<Vec<_>>().as_slice() {
        [] => {
            return Err(Error::Refused(format!(
                "image {image} (container {names}) is not on this node and the checkpoint does \
                 not pin it by digest (it was never pulled from a registry on the node that took \
                 it): pull it first"
            )))
        }
        [one] => (*one).to_owned(),
        many => {
            return Err(Error::Refused(format!(
                "image {image} (container {names}) is not on this node and the checkpoint pins \
                 it to several digests: {}",
                many.join(", ")
            )))
        }
    };
    let well_formed = pinned
        .split_once("@sha256:")
        .is_some_and(|(_, hex)| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed || policy::image_repository(&pinned) != policy::image_repository(image) {
        return Err(Error::Refused(format!(
            "the checkpoint pins image {image} (container {names}) to {pinned:?}, which is not a \
             digest of that repository"
        )));
    }
    Ok(pinned)
}

/// (name, container id) pairs.
type Named = Vec<(String, String)>;

/// What the CRI calls made.
struct Created {
    id: String,
    restored: Named,
    completed: Named,
    left_created: Named,
    ip: String,
}

/// The CRI calls, recording in `undo` everything made.
async fn create(
    request: &RestoreRequest,
    plan: &Plan,
    checkpoint: &str,
    clients: &CriClients,
    undo: &mut Undo,
    progress: &dyn Progress,
) -> Result<Created> {
    let pod = &plan.pod;
    undo.cgroup = Some(pod.cgroup_dir());
    make_dir(&pod.pod_dir, 0o750, undo)?;
    make_dir(&pod.log_dir, 0o755, undo)?;
    let mut config = sandbox_config(
        &plan.manifest,
        plan.sandbox.as_ref(),
        &plan.namespaces,
        pod,
        checkpoint,
    );
    if request.keep_ip {
        config
            .annotations
            .insert(KEEP_IP_ANNOTATION.to_owned(), "true".to_owned());
    }
    if request.lazy {
        config
            .annotations
            .insert(LAZY_ANNOTATION.to_owned(), "true".to_owned());
    }
    progress.step(&format!(
        "creating pod {}/{} (uid {}) from checkpoint {checkpoint}",
        pod.namespace, pod.name, pod.uid
    ));
    let mut runtime = clients.runtime.clone();
    let id = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: request.handler.clone(),
        })
        .await
        .map_err(Error::cri(format!(
            "RunPodSandbox {}/{}",
            pod.namespace, pod.name
        )))?
        .into_inner()
        .pod_sandbox_id;
    undo.sandbox = Some(id.clone());
    log::info!("pod {}/{}: sandbox {id} created", pod.namespace, pod.name);

    let mut started = Vec::new();
    let mut completed = Vec::new();
    let mut left_created = Vec::new();
    // Containers are created one after another in their recorded order (completed ones are
    // answered at once, in order); the restores of those that ran, the slow part, start
    // together once all are created: they ran side by side at the checkpoint, and each
    // comes back at that instant, so none waits for another.
    let mut to_restore = Vec::new();
    for (c, then, _) in &plan.containers {
        progress.step(&match then {
            Then::Restore => format!("restoring container {}", c.name),
            Then::Exited(code) => format!(
                "recreating exited container {} (exit {code}, not run again)",
                c.name
            ),
            Then::LeaveCreated => format!("recreating container {} (never started)", c.name),
        });
        for dir in &c.empty_dirs {
            make_dir(dir, 0o777, undo)?;
        }
        for file in &c.files {
            if let Some(parent) = file.parent() {
                make_dir(parent, 0o750, undo)?;
            }
            std::fs::File::create(file).map_err(Error::io("create the termination log", file))?;
        }
        make_dir(&pod.log_dir.join(&c.name), 0o755, undo)?;
        let container_id = runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: id.clone(),
                config: Some(c.config.clone()),
                sandbox_config: Some(config.clone()),
            })
            .await
            .map_err(Error::cri(format!("CreateContainer {}", c.name)))?
            .into_inner()
            .container_id;
        match then {
            Then::LeaveCreated => left_created.push((c.name.clone(), container_id)),
            Then::Restore => to_restore.push((c.name.clone(), container_id)),
            Then::Exited(code) => {
                runtime
                    .start_container(cri::StartContainerRequest {
                        container_id: container_id.clone(),
                    })
                    .await
                    .map_err(Error::cri(format!("StartContainer {}", c.name)))?;
                wait_exited(&mut runtime, &c.name, &container_id, *code).await?;
                completed.push((c.name.clone(), container_id));
            }
        }
    }
    let starts = to_restore.iter().map(|(name, container_id)| {
        let mut runtime = runtime.clone();
        async move {
            runtime
                .start_container(cri::StartContainerRequest {
                    container_id: container_id.clone(),
                })
                .await
                .map_err(Error::cri(format!("StartContainer {name}")))
        }
    });
    let mut first_error = None;
    for ((name, container_id), result) in to_restore.iter().zip(futures::future::join_all(starts).await) {
        match result {
            Ok(_) => {
                log::info!(
                    "pod {}/{}: container {name} ({container_id}) restored",
                    pod.namespace,
                    pod.name
                );
                started.push((name.clone(), container_id.clone()));
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let ip = runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .map_err(Error::cri(format!("PodSandboxStatus {id}")))?
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    Ok(Created {
        id,
        restored: started,
        completed,
        left_created,
        ip,
    })
}

/// How long a completed container may take to be reported exited.
const COMPLETED_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until CRI reports a completed container exited with its recorded code (the shim
/// answers it at once, without running it).
async fn wait_exited(
    runtime: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    name: &str,
    id: &str,
    code: u32,
) -> Result<()> {
    let deadline = Instant::now() + COMPLETED_EXIT_TIMEOUT;
    loop {
        let status = runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            })
            .await
            .map_err(Error::cri(format!("ContainerStatus {name}")))?
            .into_inner()
            .status;
        if let Some(s) = status.filter(|s| s.state == cri::ContainerState::ContainerExited as i32) {
            if i64::from(s.exit_code) == i64::from(code) {
                return Ok(());
            }
            return Err(Error::Refused(format!(
                "container {name} had completed with exit code {code} but exited with {}",
                s.exit_code
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::Refused(format!(
                "container {name} had completed before the checkpoint but did not exit within \
                 {COMPLETED_EXIT_TIMEOUT:?}: is the pod's runtime handler podsnap?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Brings the checkpoint at `dir` (outside the root) into the root for this restore: hard
/// links, or a copy across filesystems (said on `progress`).
async fn bring_in(
    request: &RestoreRequest,
    dir: &Path,
    manifest: &Manifest,
    progress: &dyn Progress,
) -> Result<Imported> {
    let root = request.checkpoint_root.clone();
    progress.step(&format!("linking the checkpoint into {}", root.display()));
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && !n.starts_with('.'))
        .unwrap_or_else(|| "checkpoint".to_owned());
    let name = format!(
        "{base}-imported-{}",
        crate::dump::utc_stamp(time::OffsetDateTime::now_utc())
    );
    // The import runs on a blocking thread; the line it says when it must copy is shown as
    // it comes (a copy of a large checkpoint takes a while).
    let (told, mut hear) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (src, manifest) = (dir.to_path_buf(), manifest.clone());
    let mut work = tokio::task::spawn_blocking(move || {
        import(&src, &manifest, &root, &name, &mut |line| {
            let _ = told.send(line.to_owned());
        })
    });
    let joined = loop {
        tokio::select! {
            Some(line) = hear.recv() => progress.step(&line),
            joined = &mut work => break joined,
        }
    };
    while let Ok(line) = hear.try_recv() {
        progress.step(&line);
    }
    let imported = joined
        .map_err(|e| Error::Refused(format!("bringing the checkpoint in stopped: {e}")))?
        .map_err(Box::new)?;
    log::info!(
        "checkpoint {} brought in as {}: {} files linked, {} copied ({} bytes)",
        dir.display(),
        imported.dir.display(),
        imported.linked,
        imported.copied,
        imported.copied_bytes
    );
    Ok(imported)
}

/// Makes `dir` (and missing parents, which are recorded too) with `mode`.
fn make_dir(dir: &Path, mode: u32, undo: &mut Undo) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(p) = cursor.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(p.to_path_buf());
        cursor = p.parent();
    }
    for p in missing.iter().rev() {
        std::fs::create_dir(p).map_err(Error::io("create a directory", p))?;
        undo.dirs.push(p.clone());
    }
    if !missing.is_empty() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(Error::io("chmod a directory", dir))?;
    }
    Ok(())
}

/// What a failed restore must remove.
#[derive(Debug, Default)]
struct Undo {
    sandbox: Option<String>,
    /// The pod's cgroup, relative to each hierarchy's root.
    cgroup: Option<PathBuf>,
    /// Directories made, in creation order.
    dirs: Vec<PathBuf>,
    imported: Option<PathBuf>,
}

impl Undo {
    /// Removes everything recorded; returns a line per thing done or failed.
    async fn run(self, clients: &CriClients) -> String {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut runtime = clients.runtime.clone();
        if let Some(id) = &self.sandbox {
            let stopped = runtime
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await;
            let removed = runtime
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await;
            match (stopped, removed) {
                (_, Ok(_)) => done.push(format!("pod sandbox {id} and its containers")),
                (Err(s), Err(r)) => failed.push(format!(
                    "pod sandbox {id}: stop: {}; remove: {}",
                    s.message(),
                    r.message()
                )),
                (Ok(_), Err(r)) => failed.push(format!("pod sandbox {id}: remove: {}", r.message())),
            }
        }
        if let Some(rel) = &self.cgroup {
            failed.extend(remove_pod_cgroups(rel));
        }
        // The earliest directory made contains the later ones.
        let mut removed: Vec<PathBuf> = Vec::new();
        for dir in &self.dirs {
            if removed.iter().any(|r| dir.starts_with(r)) {
                continue;
            }
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {
                    done.push(dir.display().to_string());
                    removed.push(dir.clone());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => failed.push(format!("{}: {e}", dir.display())),
            }
        }
        if let Some(imported) = &self.imported {
            match std::fs::remove_dir_all(imported) {
                Ok(()) => done.push(format!("the imported checkpoint {}", imported.display())),
                Err(e) => failed.push(format!("the imported checkpoint {}: {e}", imported.display())),
            }
        }
        let mut report = format!(
            "removed: {}",
            if done.is_empty() {
                "nothing".to_owned()
            } else {
                done.join(", ")
            }
        );
        if !failed.is_empty() {
            report.push_str(&format!(
                "\nNOT removed (clean up by hand): {}",
                failed.join("; ")
            ));
        }
        report
    }
}

/// Removes the pod's (now empty) cgroup `rel` and those below it, in every v1 hierarchy or
/// the v2 one, as kubelet does once a pod is gone. Returns what could not be removed.
fn remove_pod_cgroups(rel: &Path) -> Vec<String> {
    let mut failed = Vec::new();
    if rel.as_os_str().is_empty() {
        return failed; // never a hierarchy's root
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let paths = CgroupPaths::at(rel, &own, Path::new(CGROUP_ROOT), CgroupMode::of_node());
    for pod in paths.dirs() {
        if !pod.is_dir() {
            continue;
        }
        for dir in podsnap_runtime::cgroup::tree(pod).iter().rev() {
            if let Err(e) = std::fs::remove_dir(dir) {
                failed.push(format!("cgroup {}: {e}", dir.display()));
            }
        }
    }
    failed
}

/// A random pod uid in the usual 8-4-4-4-12 form.
fn new_uid() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(Error::io("read random bytes", "/dev/urandom"))?;
    // Version 4, variant 1.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
