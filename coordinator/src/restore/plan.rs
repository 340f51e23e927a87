//! Step 1 of a restore, before anything is made: the target namespace, the cgroup driver,
//! every container's CRI config rebuilt from the checkpoint, and the host-path bind mounts checked.

use std::path::Path;

use k8s_cri::v1 as cri;
use oci_spec::runtime::Spec;
use podsnap_checkpoint::format::manifest::{ContainerEntry, Manifest};
use podsnap_checkpoint::trust::policy::{self};
use podsnap_checkpoint::{ContainerState, Role};

use crate::cri::CriClients;
use crate::error::{Error, Result};
use crate::spec::{container_plan, namespace_options, CgroupDriver, ContainerPlan, NewPod};

use super::*;

/// What becomes of a container once created: its recorded state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Then {
    /// Started: the shim restores it from its images.
    Restore,
    /// Started: the shim answers it exited with this code, without running it.
    Exited(u32),
    /// Not started: it had never been started.
    LeaveCreated,
}

/// Everything decided before the first CRI call that creates something.
pub(super) struct Plan {
    pub(super) manifest: Manifest,
    pub(super) pod: NewPod,
    pub(super) sandbox: Option<Spec>,
    pub(super) namespaces: cri::NamespaceOption,
    /// In start order, with the image id each must run (when the checkpoint recorded one).
    pub(super) containers: Vec<(ContainerPlan, Then, Option<String>)>,
}

/// The new pod's namespace: the one asked for, else the checkpointed pod's.
pub(super) fn target_namespace(request: &RestoreRequest, manifest: &Manifest) -> String {
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
pub(super) async fn cgroup_driver(clients: &CriClients) -> CgroupDriver {
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

pub(super) fn plan(
    request: &RestoreRequest,
    dir: &Path,
    manifest: Manifest,
    driver: CgroupDriver,
) -> Result<Plan> {
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
pub(super) fn allow_host_mounts(
    request: &RestoreRequest,
    dir: &Path,
    plan: &mut ContainerPlan,
) -> Result<()> {
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

pub(super) fn load_spec(dir: &Path, manifest: &Manifest, entry: &ContainerEntry) -> Result<Spec> {
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
