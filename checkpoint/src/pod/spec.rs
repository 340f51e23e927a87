//! What a pod is in its containers' OCI specs: its `/dev/shm`, its IPC namespace, its emptyDir
//! volumes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::format::layout::empty_dir_name;
use crate::format::manifest::VolumeMount;
use crate::format::record::Role;
use crate::pod::target::Target;

/// The host directory of a container's `/dev/shm`, when it is the pod's own (a bind mount, in
/// a container with an IPC namespace of the pod's; a pod on the host's IPC namespace shares the
/// host's `/dev/shm`, which is never captured).
pub fn dev_shm_source(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    let own_ipc = spec
        .linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Ipc);
    if !own_ipc {
        return None;
    }
    let m = spec
        .mounts()
        .iter()
        .flatten()
        .find(|m| m.destination() == Path::new("/dev/shm"))?;
    let bind = m.typ().as_deref() == Some("bind")
        || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind");
    let src = m.source().clone()?;
    (bind && src != Path::new("/dev/shm")).then_some(src)
}

/// The pod's `/dev/shm` directory, from its containers' specs.
pub fn pod_dev_shm(targets: &[Target]) -> Option<PathBuf> {
    targets
        .iter()
        .filter(|t| t.entry.role == Role::Container)
        .filter_map(|t| podsnap_runtime::bundle::Bundle::new(&t.bundle).spec().ok())
        .find_map(|spec| dev_shm_source(&spec))
}

/// The IPC namespace a container joins by path (the pod's: the pause process's), when it has
/// one of its own (`None`: the host's, or a private one CRIU captures with the container).
pub fn joined_ipc_ns(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Ipc)?
        .path()
        .clone()
}

/// The pod's emptyDir volumes: name -> (host directory, mounts), from the containers' specs.
pub fn empty_dirs(targets: &[Target]) -> BTreeMap<String, (PathBuf, Vec<VolumeMount>)> {
    let mut out: BTreeMap<String, (PathBuf, Vec<VolumeMount>)> = BTreeMap::new();
    for t in targets.iter().filter(|t| t.entry.role == Role::Container) {
        let Ok(spec) = podsnap_runtime::bundle::Bundle::new(&t.bundle).spec() else {
            continue;
        };
        for m in spec.mounts().iter().flatten() {
            let Some(src) = m.source().as_ref().and_then(|s| s.to_str()) else {
                continue;
            };
            let Some(name) = empty_dir_name(src) else { continue };
            let entry = out
                .entry(name.to_string())
                .or_insert_with(|| (PathBuf::from(src), Vec::new()));
            entry.1.push(VolumeMount {
                container: t.entry.name.clone(),
                path: m.destination().display().to_string(),
            });
        }
    }
    out
}
