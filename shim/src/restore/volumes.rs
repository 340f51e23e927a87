//! Checks of what the checkpoint does not carry, before a container is restored: the volumes
//! it records (this container mounts them, the files the pod held open on them unchanged; the
//! carried ones go into empty directories) and a pod that asked to keep its address having it.

use std::path::PathBuf;

use oci_spec::runtime::Spec;
use podsnap_checkpoint::config::KEEP_IP_ANNOTATION;
use podsnap_checkpoint::format::manifest::Manifest;
use podsnap_checkpoint::format::persistent;
use podsnap_checkpoint::trust::volumes;

use crate::error::{Error, Result};
use crate::exits::MonitorLauncher;

/// The persistent volumes of the checkpoint this container mounted: the new container mounts
/// each at the same path, and the files the pod held open on them are as they were (checked
/// before the container is restored). Returns the carried volumes to fill first: (archive
/// relative to the checkpoint, host directory); `filled` tells the directories this restore
/// already filled (for another container of the pod), which count as empty.
pub(super) fn check_persistent_volumes(
    checkpoint: &str,
    container: &str,
    manifest: &Manifest,
    spec: &Spec,
    filled: impl Fn(&std::path::Path) -> bool,
) -> Result<Vec<(String, PathBuf)>> {
    let mine: Vec<persistent::PersistentVolume> = manifest
        .persistent_volumes
        .iter()
        .filter_map(|v| {
            let mounts: Vec<persistent::PvMount> = v
                .mounts
                .iter()
                .filter(|m| m.container == container)
                .cloned()
                .collect();
            (!mounts.is_empty()).then(|| persistent::PersistentVolume { mounts, ..v.clone() })
        })
        .collect();
    if mine.is_empty() {
        return Ok(Vec::new());
    }
    let new_mounts: Vec<volumes::NewMount> = persistent::bind_mounts(spec)
        .into_iter()
        .map(|m| volumes::NewMount {
            container: container.to_owned(),
            path: m.destination,
            source: PathBuf::from(m.source),
        })
        .collect();
    let checked = volumes::check(
        &mine,
        &new_mounts,
        manifest.created_unix,
        volumes::stat_beneath,
        |dir| filled(dir) || volumes::empty_or_missing(dir),
    );
    if !checked.problems.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "checkpoint {checkpoint:?}: {}",
            checked.problems.join("; ")
        )));
    }
    let kept: Vec<String> = mine
        .iter()
        .filter(|v| v.carried.is_none())
        .map(|v| v.label())
        .collect();
    if manifest.after_dump == Some(persistent::AfterDump::LeftRunning) && !kept.is_empty() {
        log::warn!(
            "container {container}: the pod was left running after checkpoint {checkpoint:?}: its volumes ({}) may have moved on since; the files it held open are unchanged",
            kept.join(", ")
        );
    }
    for (archive, dst) in &checked.fills {
        log::info!(
            "container {container}: the checkpoint's {archive} goes into {} before the restore",
            dst.display()
        );
    }
    Ok(checked.fills)
}

/// A pod asking to keep its address (`podsnap.io/keep-ip`) must have it: the node's CNI
/// configuration hands it out only through `podsnap-cni-ipam`; without it the pod came up with
/// another address, and the restore is refused before any container is restored.
pub(super) async fn check_kept_address(spec: &Spec, manifest: &Manifest) -> Result<()> {
    let asked = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(KEEP_IP_ANNOTATION))
        .is_some_and(|v| v == "true");
    let Some(netns) = crate::pod::dump::pod_netns(spec).filter(|_| asked) else {
        return Ok(());
    };
    let now = podsnap_checkpoint::pod::shared::netlock::addresses(&MonitorLauncher, &netns).await?;
    match podsnap_checkpoint::trust::keep_ip::check_kept(&manifest.pod.ips, &now) {
        Some(why) => Err(Error::InvalidArgument(why)),
        None => Ok(()),
    }
}
