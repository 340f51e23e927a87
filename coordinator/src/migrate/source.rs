//! `podsnap migrate --to-node HOST:PORT`: the source of a direct migration.
//!
//! 1. The pod is found through CRI and the target is connected (TLS with pinned keys, its
//!    `welcome` read): a target this node does not trust, or one that does not trust this node,
//!    fails here, before the pod is touched or anything is sent.
//! 2. Every running container of the pod is paused (containerd Tasks.Pause: the cgroup
//!    freezer), then the pod is dumped as `podsnap dump` does, the paused containers left as
//!    they are and the pod's network left locked: nothing of the pod runs, and nothing reaches
//!    it, after its snapshot. The manifest then records those
//!    containers as running (the dump saw them paused, and a restore would pause them again);
//!    one its owner had paused before stays paused.
//! 3. The manifest goes first (the target checks its restore policy and may refuse), then every
//!    file it lists. The files are sent once the dump is complete (not while it writes).
//! 4. The target restores the pod and answers `restored` once every container runs. The source
//!    answers `commit`, and on the target's `kept` kills its paused containers (SIGKILL, then a
//!    thaw so the kills take effect): the pod is stopped at its snapshot, as `podsnap migrate
//!    --to REF` leaves it.
//!
//! Any failure before `commit` (the target refuses or aborts, the connection breaks, the peer
//! is silent for `[migration] peer_timeout_seconds`, the dump fails, SIGINT or SIGTERM) resumes
//! the paused containers: the pod runs on as it was, and the target removes what it made.
//! Between `commit` and `kept` the outcome is unknown to the source (the target keeps its pod
//! only if it read `commit`): the source then leaves its pod paused, running on neither side
//! twice, and says how to resume it or remove it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use tokio::io::AsyncReadExt;

use super::channel::{Channel, Endpoint};
use super::frame::{Frame, Message, Purpose, MAX_DATA_BYTES};
use crate::containerd::{Containerd, CRI_NAMESPACE};
use crate::dump::{dump, DumpRequest};
use crate::error::{Error, Result};
use crate::pod::{find_ready_pod, PodRef};
use crate::progress::Progress;
use podsnap_checkpoint::format::manifest::MANIFEST;
use podsnap_checkpoint::format::record::ContainerState;

/// A pod moved to another node.
#[derive(Debug, Clone)]
pub struct Moved {
    pub pod: PodRef,
    /// Who took it.
    pub target: String,
    /// The pod on the target: namespace/name, sandbox id, IP, containers.
    pub restored_pod: String,
    pub restored_id: String,
    pub restored_ip: String,
    pub containers: Vec<String>,
    /// The checkpoint on this node (kept, as `podsnap migrate --to REF` keeps it).
    pub checkpoint: PathBuf,
    pub files: usize,
    pub bytes: u64,
    /// First pause to the target's `restored`: how long the pod answered on neither node.
    pub paused_for: Duration,
    /// Pause to dump complete, dump complete to files sent, files sent to `restored`.
    pub dump: Duration,
    pub send: Duration,
    pub restore: Duration,
}

/// Moves pod `request.namespace/request.pod` to the node at `to`; see the module header.
/// `request.dir`, `stop` are ignored (the dump goes to the root, and the pod is paused, not
/// stopped, until the target has it).
pub async fn migrate_to_node(
    request: &DumpRequest,
    to: &str,
    endpoint: &Endpoint,
    progress: &dyn Progress,
) -> Result<Moved> {
    progress.step(&format!("finding pod {}/{}", request.namespace, request.pod));
    let clients = crate::cri::connect(&request.runtime_endpoint).await?;
    let pod = find_ready_pod(&clients, &request.namespace, &request.pod, &request.handler).await?;
    progress.step(&format!("connecting to {to}"));
    let mut channel = endpoint.connect(to, Purpose::Control { ticket: None }).await?;
    let target = channel.peer().to_owned();
    log::info!("migration of {pod}: {target} accepted this node");
    let containers = running_containers(&clients, &pod.id).await?;
    let containerd = Containerd::connect(&request.address, CRI_NAMESPACE).await?;
    // The pod's network stays locked from the dump until the pod is resumed or stopped: a
    // paused pod's kernel would otherwise take (and acknowledge) data after the snapshot,
    // which the copy on the target never sees. Unlocked on every way out that resumes it.
    let netns = match containerd.network_namespace(&pod.id).await {
        Ok(ns) => ns,
        Err(e) => {
            log::warn!("pod {pod}: its network namespace is not known ({e}): not held locked");
            None
        }
    };
    let resume = |paused: Vec<(String, String)>| {
        let (containerd, netns) = (containerd.clone(), netns.clone());
        async move { resume(&containerd, &paused, netns.as_deref()).await }
    };

    // Paused from here on: every way out resumes them, until the target keeps the pod.
    progress.step(&format!("pausing {} containers of {pod}", containers.len()));
    let paused_at = Instant::now();
    let mut paused = Vec::new();
    let mut failed = None;
    for (name, id) in &containers {
        match containerd.pause_task(id).await {
            Ok(()) => paused.push((name.clone(), id.clone())),
            Err(e) => {
                failed = Some(Error::Containerd(e));
                break;
            }
        }
    }
    if let Some(e) = failed {
        resume(paused.clone()).await;
        channel
            .abort(&format!("the source could not pause the pod: {e}"))
            .await;
        return Err(e);
    }
    let sent = tokio::select! {
        sent = dump_and_send(request, &paused, netns.is_some(), &mut channel, progress) => sent,
        why = interrupted() => Err(Error::Refused(format!("{why} before the target had the pod"))),
    };
    let (sent, restored) = match sent {
        Ok(sent) => sent,
        Err(e) => {
            progress.step("migration failed: resuming the pod");
            resume(paused.clone()).await;
            if !matches!(&e, Error::Migration(super::Error::Aborted { .. })) {
                channel.abort(&format!("the source gave up: {e}")).await;
            }
            return Err(resumed(e, &pod));
        }
    };
    let paused_for = paused_at.elapsed();
    let Message::Restored {
        pod: restored_pod,
        id: restored_id,
        ip: restored_ip,
        containers: restored_containers,
    } = restored
    else {
        resume(paused.clone()).await;
        return Err(Error::Refused("internal: not a restored message".into()));
    };
    // The switch: the target keeps the pod only if it reads `commit`.
    progress.step(&format!("{target} runs the pod: committing"));
    let kept = async {
        channel.send_message(Message::Commit).await?;
        match channel.recv_message().await? {
            Message::Kept => Ok(()),
            other => Err(channel.unexpected(&Frame::Message(other), "kept")),
        }
    }
    .await;
    if let Err(e) = kept {
        let ids: Vec<&str> = paused.iter().map(|(_, id)| id.as_str()).collect();
        return Err(Error::Refused(format!(
            "{e}\nthe target may or may not run the pod now (it keeps it only if it read this \
             node's commit): the pod {pod} stays paused here, on neither node twice. Check the \
             target ({target}, pod {restored_pod}, sandbox {restored_id}): if it runs the pod, \
             remove this one; if not, unlock its network{} and resume it (`ctr -n {CRI_NAMESPACE} \
             task resume ID` for {}). The checkpoint stays in {}",
            netns.as_deref().map_or(String::new(), |ns| format!(
                " (`nsenter --net={} iptables -w -D INPUT -j PODSNAP-LOCK`, the same for OUTPUT)",
                ns.display()
            )),
            ids.join(", "),
            sent.dir.display()
        )));
    }
    channel.close().await;
    progress.step(&format!("stopping pod {pod} at its snapshot"));
    stop(&containerd, &paused).await;
    Ok(Moved {
        pod,
        target,
        restored_pod,
        restored_id,
        restored_ip,
        containers: restored_containers,
        checkpoint: sent.dir,
        files: sent.files,
        bytes: sent.bytes,
        paused_for,
        dump: sent.dump,
        send: sent.send,
        restore: sent.restore,
    })
}

struct Sent {
    dir: PathBuf,
    files: usize,
    bytes: u64,
    dump: Duration,
    send: Duration,
    restore: Duration,
}

/// Dumps the paused pod, sends the checkpoint, waits for the target's `restored`.
async fn dump_and_send(
    request: &DumpRequest,
    paused: &[(String, String)],
    hold_network: bool,
    channel: &mut Channel,
    progress: &dyn Progress,
) -> Result<(Sent, Message)> {
    let started = Instant::now();
    let mut request = request.clone();
    request.stop = false;
    request.dir = None;
    request.hold_network = hold_network;
    let dumped = dump(&request, progress).await?;
    let dir = dumped.summary.dir.clone();
    // The dump saw the containers this migration paused as paused, and a restore pauses such a
    // container again: they were running, as far as the pod is concerned.
    let mut manifest = crate::dump::read_manifest(&dir)?;
    let mut changed = false;
    for entry in manifest.containers.iter_mut() {
        if entry.state == ContainerState::Paused && paused.iter().any(|(name, _)| *name == entry.name) {
            entry.state = ContainerState::Running;
            changed = true;
        }
    }
    if changed {
        crate::dump::write_manifest(&dir, &manifest)?;
    }
    let dumped_at = Instant::now();
    let (files, bytes) = send_checkpoint(&dir, channel, progress).await?;
    let sent_at = Instant::now();
    progress.step(&format!("{} restores the pod", channel.peer()));
    let restored = match channel.recv_message().await? {
        m @ Message::Restored { .. } => m,
        other => return Err(channel.unexpected(&Frame::Message(other), "restored").into()),
    };
    Ok((
        Sent {
            dir,
            files,
            bytes,
            dump: dumped_at - started,
            send: sent_at - dumped_at,
            restore: sent_at.elapsed(),
        },
        restored,
    ))
}

/// Sends the checkpoint at `dir`: its manifest (the target may refuse it), then every file it
/// lists. Returns (files, bytes) sent.
pub(super) async fn send_checkpoint(
    dir: &std::path::Path,
    channel: &mut Channel,
    progress: &dyn Progress,
) -> Result<(usize, u64)> {
    let manifest_path = dir.join(MANIFEST);
    let raw = tokio::fs::read(&manifest_path)
        .await
        .map_err(Error::io("read the manifest", &manifest_path))?;
    let manifest = podsnap_checkpoint::format::manifest::Manifest::parse(&raw)?;
    channel.send(Frame::Manifest(raw.into())).await?;
    match channel.recv_message().await? {
        Message::Accept => {}
        Message::Refuse { reason } => {
            return Err(super::Error::Refused {
                peer: channel.peer().to_owned(),
                reason,
            }
            .into())
        }
        other => return Err(channel.unexpected(&Frame::Message(other), "accept").into()),
    }
    let total: u64 = manifest.files.values().map(|f| f.size).sum();
    progress.step(&format!(
        "sending {} files ({} bytes) to {}",
        manifest.files.len(),
        total,
        channel.peer()
    ));
    let mut bytes = 0;
    for (rel, listed) in &manifest.files {
        let path = dir.join(rel);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(Error::io("open a checkpoint file", &path))?;
        channel
            .send_message(Message::File {
                path: rel.clone(),
                size: listed.size,
            })
            .await?;
        let mut left = listed.size;
        while left > 0 {
            let mut chunk = vec![0u8; left.min(MAX_DATA_BYTES as u64) as usize];
            file.read_exact(&mut chunk)
                .await
                .map_err(Error::io("read a checkpoint file", &path))?;
            left -= chunk.len() as u64;
            channel.send(Frame::Data(chunk.into())).await?;
        }
        bytes += listed.size;
    }
    Ok((manifest.files.len(), bytes))
}

/// `e`, and that the pod runs on this node as before (a migration given up before the switch).
pub(super) fn resumed(e: Error, pod: &PodRef) -> Error {
    Error::Refused(format!(
        "{e}\nthe pod {pod} was resumed and runs on this node as before"
    ))
}

/// (name, id) of the pod's running containers.
pub(super) async fn running_containers(
    clients: &crate::cri::CriClients,
    sandbox: &str,
) -> Result<Vec<(String, String)>> {
    let listed = clients
        .runtime
        .clone()
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: sandbox.to_owned(),
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .map_err(Error::cri(format!("ListContainers of sandbox {sandbox}")))?
        .into_inner()
        .containers;
    Ok(listed
        .into_iter()
        .map(|c| (c.metadata.map(|m| m.name).unwrap_or_default(), c.id))
        .collect())
}

/// Unlocks the pod's network (`netns`) and resumes what was paused; a failure is logged and
/// said (the operator resumes it by hand).
async fn resume(containerd: &Containerd, paused: &[(String, String)], netns: Option<&std::path::Path>) {
    if let Some(ns) = netns {
        podsnap_checkpoint::pod::shared::netlock::unlock(&podsnap_runtime::launcher::TokioLauncher, ns).await;
    }
    for (name, id) in paused {
        if let Err(e) = containerd.resume_task(id).await {
            log::error!(
                "container {name} ({id}) stays paused: {e}; resume it with `ctr -n {CRI_NAMESPACE} task resume {id}`"
            );
            eprintln!("podsnap: container {name} ({id}) stays paused: {e}");
        }
    }
}

/// Kills every process of the paused containers, then thaws them so the kills take effect (no
/// instruction of theirs runs in between: SIGKILL is taken on the way back to user space).
async fn stop(containerd: &Containerd, paused: &[(String, String)]) {
    for (name, id) in paused {
        if let Err(e) = containerd.kill_task(id).await {
            log::error!("container {name} ({id}): {e}");
            eprintln!("podsnap: could not kill container {name} ({id}) after the move: {e}");
        }
    }
    for (name, id) in paused {
        // A runc that thawed the container to signal it already did this.
        if let Err(e) = containerd.resume_task(id).await {
            log::debug!("container {name} ({id}): resume after the kill: {e}");
        }
    }
}

/// Completes on SIGINT or SIGTERM, saying which.
pub(super) async fn interrupted() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return "interrupted (SIGINT)";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted (SIGINT)",
        _ = term.recv() => "terminated (SIGTERM)",
    }
}
