//! Plan one container's restore (not the sandbox's: a new sandbox is made): its recorded state
//! decides (running or paused: restored; exited: answered with its exit code; created: fresh),
//! then the image and privilege checks, its CRIU options, the pod's network hold and shared PID
//! namespace, its rootfs changes, volumes, /dev/shm and SysV IPC, lazy or not, its unix links.

use std::path::PathBuf;

use oci_spec::runtime::Spec;
use podsnap_checkpoint::format::layout::empty_dir_name;
use podsnap_checkpoint::format::manifest::{MAX_JSON_BYTES, ROOTFS_DELETED, ROOTFS_DIFF};
use podsnap_checkpoint::fs::read::read_capped;
use podsnap_checkpoint::trust::policy::{self, NewImage, Violation};
use podsnap_checkpoint::ContainerState;

use super::verify::Checked;
use super::{NewContainer, Plan, RestorePlan, Restores};
use crate::container::Lazy;
use crate::error::{Error, Result};
use crate::exits::MonitorLauncher;
use crate::lazy_pages::LeaseFor;
use crate::process::lock;

/// The snapshotter directory overlay layers live in (`.../snapshots/<n>/fs` -> `...`): two
/// containerds on one machine (their own roots) are two nodes.
fn snapshot_root(layers: &[String]) -> Option<&str> {
    layers.first()?.rsplit_once("/snapshots/").map(|(root, _)| root)
}

/// Plans the restore of a container of the pod from the checked checkpoint.
pub async fn container(r: &Restores, checked: Checked, new: &NewContainer<'_>) -> Result<Plan> {
    let planning = std::time::Instant::now();
    let Checked { opened, verified } = checked;
    let (name, dir, cname, lazy) = (opened.name, opened.dir, opened.cname, opened.lazy);
    let identity = new.identity;
    let manifest = &verified.manifest;
    let refused = |v: Violation| Error::from(podsnap_checkpoint::Error::refused(&name, v));
    let entry = manifest.container(&cname).ok_or_else(|| {
        Error::InvalidArgument(format!("container {cname:?} is not in checkpoint {name:?}"))
    })?;
    match entry.state {
        ContainerState::Created => {
            log::info!("container {cname}: was created but never started; created fresh");
            lock(&r.restored).insert(cname);
            return Ok(Plan::Fresh);
        }
        ContainerState::Stopped => {
            // The manifest parser refuses a stopped container without an exit code.
            return Ok(Plan::Exited(entry.exit_code.unwrap_or(u32::MAX)));
        }
        ContainerState::Running | ContainerState::Paused if !entry.dumped => {
            return Err(Error::InvalidArgument(format!(
                "checkpoint {name:?} records container {cname:?} as running but holds no images of it"
            )));
        }
        ContainerState::Running | ContainerState::Paused => {}
    }
    let image = NewImage {
        name: identity.image.as_deref(),
        id: None,
        layers: Some(new.layers),
        // The same machine and the same containerd (snapshotter root): layer paths compare.
        same_node: !verified.node_id.is_empty()
            && manifest.host.node_id == verified.node_id
            && snapshot_root(&entry.rootfs_layers) == snapshot_root(new.layers),
    };
    policy::check_image(entry, &image).map_err(refused)?;
    let names = manifest.part_names();
    let spec_file = dir.join(entry.file(names.spec));
    let old: Spec = read_capped(&spec_file, MAX_JSON_BYTES)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| Error::InvalidArgument(format!("checkpoint {name:?}: {}: {e}", spec_file.display())))?;
    policy::check_privilege(&cname, &old, new.spec).map_err(refused)?;
    let carried = super::volumes::check_persistent_volumes(&name, &cname, manifest, new.spec, |d| {
        lock(&r.filled).contains(d)
    })?;

    let image_dir = dir.join(entry.dir()).join(names.images);
    let mut options = podsnap_checkpoint::criu::container::inspect(&image_dir)?;
    // Connections are always captured and restored: those to outside the pod are closed
    // after the last container's restore unless the dump asked to keep them.
    options.tcp_established = true;
    super::volumes::check_kept_address(new.spec, manifest).await?;
    r.hold_network(new.spec, manifest).await?;
    r.reserve_pids(new.spec, manifest, &dir).await?;
    let adopted = manifest
        .adopted
        .iter()
        .filter(|a| a.container == cname)
        .map(|a| (a.pid, dir.join(a.images(names))))
        .collect();
    podsnap_checkpoint::criu::kdat::ensure_logged(&MonitorLauncher).await;
    let (tar, del) = (entry.file(ROOTFS_DIFF), entry.file(ROOTFS_DELETED));
    let rootfs_changes =
        (manifest.lists(&tar) && manifest.lists(&del)).then(|| (dir.join(tar), dir.join(del)));
    let mut volumes = Vec::new();
    for m in new.spec.mounts().iter().flatten() {
        let Some(src) = m.source().as_ref().and_then(|s| s.to_str()) else {
            continue;
        };
        let Some(vname) = empty_dir_name(src) else {
            continue;
        };
        if let Some(v) = manifest.volumes.iter().find(|v| v.name == vname) {
            if manifest.lists(&v.archive) {
                volumes.push((dir.join(&v.archive), PathBuf::from(src)));
            }
        }
    }
    // The persistent volumes the checkpoint carries, into their (empty) new directories.
    for (archive, dst) in carried {
        if !manifest.lists(&archive) {
            return Err(Error::InvalidArgument(format!(
                "checkpoint {name:?}: the carried volume archive {archive} is not listed"
            )));
        }
        volumes.push((dir.join(archive), dst));
    }
    // The pod's /dev/shm comes back before its first container does (files its processes
    // hold open or mapped must be there for CRIU).
    if let (Some(archive), Some(dst)) = (
        manifest.dev_shm.as_ref().filter(|a| manifest.lists(a)),
        podsnap_checkpoint::pod::spec::dev_shm_source(new.spec),
    ) {
        volumes.push((dir.join(archive), dst));
    }
    let sysv_ipc = match manifest.sysv_ipc.as_ref().filter(|a| manifest.lists(a)) {
        Some(_) => Some((
            dir.clone(),
            podsnap_checkpoint::pod::spec::joined_ipc_ns(new.spec).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "checkpoint {name:?} holds the pod's SysV IPC objects but container \
                     {cname:?} joins no IPC namespace of a pod"
                ))
            })?,
        )),
        None => None,
    };
    // A live migration's checkpoint holds no memory: it comes from the source, lazily.
    let migrating = manifest.after_dump == Some(podsnap_checkpoint::format::persistent::AfterDump::Migrating);
    let remote = migrating.then(|| {
        let checkpoint = dir.file_name().unwrap_or_default().to_string_lossy();
        podsnap_checkpoint::format::layout::page_stream_socket(&checkpoint, &cname)
    });
    let lazy = (lazy || migrating).then(|| Lazy {
        remote,
        lease_for: identity.sandbox_id.as_ref().map(|sandbox_id| LeaseFor {
            sandbox_id: sandbox_id.clone(),
            pod: match (&identity.pod_namespace, &identity.pod_name) {
                (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
                _ => None,
            },
            checkpoint: dir.clone(),
        }),
    });
    if lazy.is_some() {
        log::info!("container {cname}: will be restored lazily (its memory on demand)");
    }
    // Last: every check above passed.
    let unix_ends = r.unix_ends(&dir, manifest, &cname)?;
    let span = super::restore_span(
        identity.sandbox_id.as_deref().unwrap_or_default(),
        &cname,
        &dir.to_string_lossy(),
    );
    span.record("planned_ms", planning.elapsed().as_millis() as u64);
    Ok(Plan::Restore(Box::new(RestorePlan {
        image_dir,
        options,
        rootfs_changes,
        volumes,
        sysv_ipc,
        name: Some(cname),
        started_order: entry.started_order,
        paused: entry.state == ContainerState::Paused,
        lazy,
        unix_ends,
        adopted,
        span,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_compare_only_within_one_snapshotter() {
        let a = vec!["/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/7/fs".to_owned()];
        let b = vec!["/srv/ctr/io.containerd.snapshotter.v1.overlayfs/snapshots/7/fs".to_owned()];
        assert_eq!(
            snapshot_root(&a),
            Some("/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs")
        );
        assert_ne!(snapshot_root(&a), snapshot_root(&b));
        assert_eq!(snapshot_root(&[]), None);
    }
}
