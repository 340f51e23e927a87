//! A whole-pod checkpoint, asked with a Checkpoint on the pod's sandbox task: every container
//! of the pod is captured at one instant by `podsnap-checkpoint`'s pod dump; completed
//! containers are recorded; the pod is stopped afterwards when asked. A checkpoint written
//! into the node's checkpoint root is followed by the node's retention
//! ([`podsnap_checkpoint::node::retention`]), whoever asked for the dump.

use std::path::PathBuf;
use std::sync::Arc;

use podsnap_checkpoint::config::RetentionPolicy;
use podsnap_checkpoint::format::manifest::{ContainerEntry, PodInfo};
use podsnap_checkpoint::format::names::validate_name;
use podsnap_checkpoint::pod::dump::journal::journal_path;
use podsnap_checkpoint::pod::dump::{dump_pod, PodDump, Target};
use podsnap_checkpoint::{ContainerState, Role};

use crate::container::Container;
use crate::error::Result;
use crate::exits::MonitorLauncher;
use crate::process::{lock, Status};

/// What a pod checkpoint was asked to do.
#[derive(Debug, Clone)]
pub struct PodCheckpoint {
    pub dest: PathBuf,
    /// Stop the pod at the snapshot.
    pub stop: bool,
    /// Keep established TCP connections on restore (they are always captured).
    pub keep_tcp: bool,
    /// How long the dump may take.
    pub deadline: std::time::Duration,
    /// Turns `true` when the caller gives up.
    pub cancel: Option<tokio::sync::watch::Receiver<bool>>,
    /// Free space the dump must leave on the destination's filesystem.
    pub reserve_bytes: u64,
    /// The persistent volumes carried in the checkpoint, and the most they may hold.
    pub carry: podsnap_checkpoint::format::persistent::Carry,
    pub carry_max_bytes: u64,
    /// The group the pod is dumped with at one instant.
    pub group: Option<podsnap_checkpoint::format::layout::GroupAsk>,
    /// How the pod's network is held still.
    pub network_lock: podsnap_checkpoint::config::NetworkLock,
    /// Leave it locked after the dump (the caller paused the pod and will unlock it).
    pub hold_network: bool,
    /// When the page images are digested.
    pub digests: podsnap_checkpoint::config::DigestTiming,
    /// The node's checkpoint root and its bounds, applied after a dump into it.
    pub root: PathBuf,
    pub retention: RetentionPolicy,
    /// A lazy dump for a live migration: where its caller listens (see `pod::serve`).
    pub serve: Option<PathBuf>,
}

/// Checkpoints the pod of `sandbox`: `containers` are its live containers, `departed` those
/// whose tasks were deleted after they exited.
pub async fn checkpoint(
    sandbox: &Arc<Container>,
    containers: &[Arc<Container>],
    departed: Vec<Target>,
    request: &PodCheckpoint,
) -> Result<()> {
    let claims: Vec<_> = containers.iter().map(|c| c.claim()).collect::<Result<_>>()?;
    let mut targets: Vec<Target> = containers.iter().map(|c| pod_target(c)).collect();
    for t in departed {
        if !targets.iter().any(|live| live.entry.name == t.entry.name) {
            targets.push(t);
        }
    }
    let ident = &sandbox.identity;
    let spec = sandbox.bundle.spec().ok();
    let pod = PodInfo {
        sandbox_id: sandbox.id.clone(),
        name: ident.pod_name.clone(),
        namespace: ident.pod_namespace.clone(),
        uid: ident.pod_uid.clone(),
        hostname: spec.as_ref().and_then(|s| s.hostname().clone()),
        annotations: spec
            .as_ref()
            .and_then(|s| s.annotations().clone())
            .map(|a| a.into_iter().collect())
            .unwrap_or_default(),
        cri_config: None,
        ips: Vec::new(),
    };
    let dest = &request.dest;
    // The CRIU runs that dump memory at once: every live container but the pause process's.
    let dumping = containers
        .iter()
        .filter(|c| !c.identity.is_sandbox && c.init.state().status != Status::Stopped)
        .count();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let early_digests = request.digests.early(dumping, cpus);
    log::debug!(
        "pod {}: {dumping} containers dumping on {cpus} CPUs, digests {:?}: {}",
        sandbox.id,
        request.digests,
        if early_digests { "early" } else { "after the thaw" }
    );
    let dump = PodDump {
        dest: dest.clone(),
        pod,
        targets,
        tcp_established: request.keep_tcp,
        launcher: Arc::new(MonitorLauncher),
        stop: request.stop,
        deadline: request.deadline,
        cancel: request.cancel.clone(),
        journal: Some(journal_path(&sandbox.id)),
        netns: spec.as_ref().and_then(pod_netns),
        lock_network: request.network_lock == podsnap_checkpoint::config::NetworkLock::Pod,
        hold_network: request.hold_network,
        early_digests,
        reserve_bytes: request.reserve_bytes,
        carry: request.carry.clone(),
        carry_max_bytes: request.carry_max_bytes,
        group: request.group.clone(),
        serve: None,
    };
    log::info!(
        "pod {}: checkpoint of {} containers into {}",
        sandbox.id,
        containers.len(),
        dest.display()
    );
    let report = match &request.serve {
        Some(dir) => {
            // A live migration: the memory goes from CRIU to the target through the caller.
            let mut dump = dump;
            let names: Vec<String> = podsnap_checkpoint::pod::target::running(&dump.targets)
                .into_iter()
                .map(|t| t.entry.name.clone())
                .collect();
            let connected = crate::pod::serve::connect(dir, &names)?;
            dump.serve = Some(connected.serve.clone());
            let (report, served) = podsnap_checkpoint::pod::dump::dump_pod_serving(dump)
                .await
                .inspect_err(|e| log::error!("pod {}: {e}", sandbox.id))?;
            crate::pod::serve::settle(sandbox.id.clone(), served, connected);
            report
        }
        None => dump_pod(dump)
            .await
            .inspect_err(|e| log::error!("pod {}: {e}", sandbox.id))?,
    };
    drop(claims);
    log::info!(
        "pod {}: checkpointed {:?} in {:?} (frozen {:?}, slowest dump {:?}, {} bytes)",
        sandbox.id,
        report.dumped,
        report.total,
        report.frozen,
        report.slowest_dump,
        report.bytes
    );
    if request.stop {
        // The dump killed every running container's processes at the snapshot, while they
        // were frozen. What remains: containers paused by their owner (frozen, their kills
        // wait for a resume) and the sandbox, last.
        log::info!(
            "pod {}: stopped at the snapshot ({} processes killed while frozen)",
            sandbox.id,
            report.killed
        );
        for c in containers
            .iter()
            .filter(|c| !c.identity.is_sandbox && c.init.state().status == Status::Paused)
            .chain(std::iter::once(sandbox))
        {
            let s = c.init.state().status;
            if s == Status::Running || s == Status::Paused {
                if let Err(e) = c.runc.kill(&c.id, libc::SIGKILL as u32, true).await {
                    log::warn!("container {}: stop after the checkpoint: {e}", c.id);
                }
                if s == Status::Paused {
                    let _ = c.runc.resume(&c.id).await;
                }
            }
        }
    }
    retain(&sandbox.id, request).await;
    Ok(())
}

/// Applies the node's retention to the checkpoint root after a dump into it (never to a
/// destination elsewhere). What it removes is logged; a failure is logged and leaves the new
/// checkpoint as it is.
async fn retain(pod: &str, request: &PodCheckpoint) {
    if request.retention.unbounded() {
        return;
    }
    let inside = match (
        std::fs::canonicalize(&request.root),
        std::fs::canonicalize(&request.dest),
    ) {
        (Ok(root), Ok(dest)) => dest.starts_with(&root) && dest != root,
        _ => false,
    };
    if !inside {
        return;
    }
    let (root, dest, policy) = (
        request.root.clone(),
        request.dest.clone(),
        request.retention.clone(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let leases = std::path::Path::new(podsnap_checkpoint::node::lease::LEASE_DIR);
    let applied = tokio::task::spawn_blocking(move || {
        podsnap_checkpoint::node::retention::apply(&root, &dest, &policy, leases, now)
    })
    .await;
    match applied {
        Ok(Ok(pruned)) if !pruned.is_empty() => log::info!(
            "pod {pod}: retention removed {} checkpoints: {}",
            pruned.len(),
            pruned
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => log::warn!("pod {pod}: retention of {}: {e}", request.root.display()),
        Err(e) => log::warn!("pod {pod}: retention stopped: {e}"),
    }
}

/// A container as the pod dump sees it.
pub fn pod_target(c: &Container) -> Target {
    let s = c.init.state();
    let name = c
        .identity
        .name
        .clone()
        .filter(|n| validate_name(n).is_ok())
        .unwrap_or_else(|| c.id.clone());
    Target {
        entry: ContainerEntry {
            name,
            id: c.id.clone(),
            role: if c.identity.is_sandbox {
                Role::Sandbox
            } else {
                Role::Container
            },
            image: c.identity.image.clone(),
            image_id: None,
            image_digest: None,
            rootfs_layers: c.rootfs_layers.clone(),
            created_order: c.created_order,
            started_order: *lock(&c.started_order),
            state: record_state(s.status),
            exit_code: (s.status == Status::Stopped).then_some(s.exit_code),
            dumped: false,
            cri_config: None,
        },
        runc: c.runc.clone(),
        bundle: c.bundle.path().to_path_buf(),
        cgroups: c.cgroups(),
        pid: (s.pid > 0).then_some(s.pid),
        spec: None,
        adopted: lock(&c.adopted).clone(),
        created: Some(c.created_at),
    }
}

fn record_state(s: Status) -> ContainerState {
    match s {
        Status::Created => ContainerState::Created,
        Status::Running => ContainerState::Running,
        Status::Paused => ContainerState::Paused,
        Status::Stopped => ContainerState::Stopped,
    }
}

/// The pod's network namespace (the sandbox's, by path), when it is not the host's.
pub fn pod_netns(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    joined_namespace(spec, oci_spec::runtime::LinuxNamespaceType::Network)
}

/// The namespace of kind `typ` the container joins by path (the pod's), if it joins one.
pub fn joined_namespace(
    spec: &oci_spec::runtime::Spec,
    typ: oci_spec::runtime::LinuxNamespaceType,
) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == typ)?
        .path()
        .clone()
}
