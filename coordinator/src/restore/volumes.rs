//! Checks of what the checkpoint does not carry, before anything is created: the volumes it
//! records (the new pod mounts them, the files the pod held open on them unchanged) and, with
//! `--keep-ip`, a pod network that can hand the pod its address back.

use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use podsnap_checkpoint::format::persistent;
use podsnap_checkpoint::trust::volumes;

use super::Plan;
use crate::cri::CriClients;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// `--keep-ip` needs the node's pod network to allocate through `podsnap-cni-ipam`: what
/// containerd loaded (CRI's verbose status) is checked before anything is created.
pub(super) async fn check_cni_keeps_addresses(clients: &CriClients) -> Result<()> {
    let status = clients
        .runtime
        .clone()
        .status(cri::StatusRequest { verbose: true })
        .await
        .map_err(|s| Error::Refused(format!("--keep-ip: CRI Status: {}", s.message())))?
        .into_inner();
    let cniconfig = status.info.get("cniconfig").ok_or_else(|| {
        Error::Refused(
            "--keep-ip: containerd does not report its CNI configuration (CRI Status has no \
             cniconfig): cannot tell whether the pod's address can be kept"
                .to_owned(),
        )
    })?;
    podsnap_checkpoint::trust::keep_ip::cni_keeps_addresses(cniconfig)
        .map_err(|why| Error::Refused(format!("--keep-ip: {why}")))
}

/// The volumes the checkpoint does not carry must be mounted by the new pod as they were, the
/// files the pod held open on them unchanged: checked before anything is created.
pub(super) fn check_persistent_volumes(dir: &Path, plan: &Plan, progress: &dyn Progress) -> Result<()> {
    let volumes = &plan.manifest.persistent_volumes;
    if volumes.is_empty() {
        return Ok(());
    }
    let new_mounts: Vec<volumes::NewMount> = plan
        .containers
        .iter()
        .flat_map(|(c, _, _)| {
            c.config.mounts.iter().map(|m| volumes::NewMount {
                container: c.name.clone(),
                path: m.container_path.clone(),
                source: PathBuf::from(&m.host_path),
            })
        })
        .collect();
    let problems = volumes::check(
        volumes,
        &new_mounts,
        plan.manifest.created_unix,
        volumes::stat_beneath,
        volumes::empty_or_missing,
    )
    .problems;
    if !problems.is_empty() {
        return Err(Error::Refused(format!(
            "checkpoint {}: {}",
            dir.display(),
            problems.join("; ")
        )));
    }
    let names: Vec<String> = volumes
        .iter()
        .filter(|v| v.carried.is_none())
        .map(|v| v.label())
        .collect();
    if plan.manifest.after_dump == Some(persistent::AfterDump::LeftRunning) && !names.is_empty() {
        let warning = format!(
            "warning: the pod was left running after this checkpoint: its volumes ({}) may have \
             moved on since; the files it held open are unchanged",
            names.join(", ")
        );
        log::warn!("{warning}");
        progress.step(&warning);
    }
    Ok(())
}
