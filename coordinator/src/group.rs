//! Several pods at one instant: `podsnap dump --selector KEY=VALUE` (or several `--pod`s)
//! and `podsnap restore` of the group checkpoint it writes.
//!
//! The dump asks every pod's shim at once (one Tasks.Checkpoint per sandbox, side by side),
//! each into its own part of the group's directory (`<group>/<pod>`, a pod checkpoint usable
//! on its own), each told through its request file (`<group>/<pod>.request`) that it is one of
//! a group meeting in `<group>/.meet`: every pod is held, its network locked, before any is
//! frozen, and every pod dumped before any is thawed (see
//! `podsnap_checkpoint::pod::dump::group`). When one pod fails, the others are told at once
//! (`abort`) and undo their dumps: the pods run on as they were and the group's directory is
//! removed; a pod already stopped at its snapshot keeps its checkpoint (it is all that is left
//! of it), and the error says so. `group.json` lists the pods once all are done.
//!
//! The restore brings the pods back chain by chain (see
//! [`GroupManifest::restore_chains`]): a StatefulSet's members one after another by ordinal,
//! each once the one before has all its containers running and, when its pod says how
//! (`podsnap.io/readiness-exec`), is ready; other pods side by side.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use k8s_cri::v1 as cri;
use podsnap_checkpoint::format::group::{
    GroupManifest, GroupPod, GROUP_FORMAT, GROUP_MANIFEST, GROUP_VERSION,
};
use podsnap_checkpoint::format::layout::{DumpAsk, GroupAsk};
use podsnap_checkpoint::pod::dump::group::ABORT;

use crate::containerd::{Containerd, CRI_NAMESPACE};
use crate::dump::{checkpoint_pod, create_private_dir_all, read_manifest, DumpRequest, ImageIds};
use crate::error::{Error, Result};
use crate::pod::{find_ready_pod, PodRef};
use crate::progress::Progress;
use crate::restore::{restore, RestoreRequest, RestoredPod};
use crate::summary::CheckpointSummary;

/// Where the group's pods meet, inside its directory.
const MEET_DIR: &str = ".meet";

/// Which pods a group dump takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    /// These pods, by name.
    Named(Vec<String>),
    /// Every ready pod of the namespace whose CRI labels (kubelet's copy of the pod's labels)
    /// have KEY=VALUE.
    Selector { key: String, value: String },
}

impl Members {
    /// `KEY=VALUE`.
    pub fn selector(text: &str) -> Result<Members> {
        match text.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok(Members::Selector {
                key: key.to_owned(),
                value: value.to_owned(),
            }),
            _ => Err(Error::Refused(format!("--selector {text:?}: say KEY=VALUE"))),
        }
    }
}

/// A finished group dump.
#[derive(Debug, Clone)]
pub struct GroupOutcome {
    pub dir: PathBuf,
    /// Each pod and its part's summary, in the group's order.
    pub pods: Vec<(PodRef, CheckpointSummary)>,
    pub took: Duration,
}

/// Dumps the pods `members` of `request.namespace` at one instant into one group checkpoint
/// (`request.dir`, or `<root>/<namespace>-group-<UTC time>`); see the module documentation.
pub async fn dump_group(
    request: &DumpRequest,
    members: &Members,
    progress: &dyn Progress,
) -> Result<GroupOutcome> {
    let started = Instant::now();
    let clients = crate::cri::connect(&request.runtime_endpoint).await?;
    let pods = find_members(&clients, request, members).await?;
    let names: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
    let mut named = request.clone();
    named.pod = "group".to_owned();
    let dir = crate::dump::destination(&named)?;
    create_private_dir_all(&dir)?;
    let meet = dir.join(MEET_DIR);
    create_private_dir_all(&meet)?;
    progress.step(&format!(
        "checkpointing pods {} at one instant into {}",
        names.join(", "),
        dir.display()
    ));
    let containerd = Containerd::connect(&request.address, CRI_NAMESPACE).await?;
    let mut calls: FuturesUnordered<_> = pods
        .iter()
        .map(|pod| {
            let ask = DumpAsk {
                serve: None,
                carry_volumes: request.carry_volumes.clone(),
                group: Some(GroupAsk {
                    dir: meet.clone(),
                    me: pod.name.clone(),
                    members: names.clone(),
                }),
                hold_network: false,
            };
            let (containerd, part) = (&containerd, dir.join(&pod.name));
            async move {
                let done = checkpoint_pod(containerd, pod, &part, request, &ask).await;
                (pod, done)
            }
        })
        .collect();
    // The first failure tells every other pod at once.
    let mut failures = Vec::new();
    let mut done = Vec::new();
    while let Some((pod, result)) = calls.next().await {
        match result {
            Ok(()) => done.push(pod.clone()),
            Err(e) => {
                if failures.is_empty() {
                    let _ = std::fs::write(meet.join(ABORT), b"");
                }
                failures.push(format!("pod {pod}: {e}"));
            }
        }
    }
    drop(calls);
    let _ = std::fs::remove_dir_all(&meet);
    if !failures.is_empty() {
        return Err(undo_group(&dir, &done, request.stop, failures));
    }
    let mut parts = Vec::new();
    for pod in &pods {
        let part = dir.join(&pod.name);
        ImageIds::of(&clients, &pod.id).await?.record(&part)?;
        let manifest = read_manifest(&part)?;
        parts.push((
            pod.clone(),
            CheckpointSummary::new(&part, &manifest, &request.checkpoint_root),
        ));
    }
    let group = GroupManifest {
        format: GROUP_FORMAT.to_owned(),
        version: GROUP_VERSION,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        namespace: request.namespace.clone(),
        pods: names.iter().map(|n| GroupPod { name: n.clone() }).collect(),
    };
    let json = serde_json::to_vec_pretty(&group)
        .map_err(|e| Error::io("encode the group manifest", &dir)(e.into()))?;
    podsnap_checkpoint::fs::private::write_synced(&dir.join(GROUP_MANIFEST), &json).map_err(Box::new)?;
    log::info!(
        "pods {} dumped at one instant into {}",
        names.join(", "),
        dir.display()
    );
    Ok(GroupOutcome {
        dir,
        pods: parts,
        took: started.elapsed(),
    })
}

/// After a failed group dump: the parts of pods that were dumped are removed, unless the pods
/// were stopped at the snapshot (their checkpoint is then all that is left of them); the
/// group's directory goes when nothing is left in it.
fn undo_group(dir: &Path, done: &[PodRef], stop: bool, failures: Vec<String>) -> Error {
    let mut said = failures.join("; ");
    if stop && !done.is_empty() {
        let kept: Vec<&str> = done.iter().map(|p| p.name.as_str()).collect();
        said.push_str(&format!(
            "; pods {} were stopped at their snapshot before the failure: their checkpoints are \
             kept in {} (restore each with podsnap restore --checkpoint-dir {}/<pod>)",
            kept.join(", "),
            dir.display(),
            dir.display()
        ));
    } else {
        for pod in done {
            let _ = std::fs::remove_dir_all(dir.join(&pod.name));
        }
        let _ = std::fs::remove_dir(dir);
        said.push_str("; every pod of the group was thawed and runs on, and nothing was kept");
    }
    Error::Refused(format!("group dump: {said}"))
}

/// The ready pods the group takes, each on podsnap's handler; refused naming a pod that is not.
async fn find_members(
    clients: &crate::cri::CriClients,
    request: &DumpRequest,
    members: &Members,
) -> Result<Vec<PodRef>> {
    let names: Vec<String> = match members {
        Members::Named(names) => {
            let mut names = names.clone();
            names.sort();
            names.dedup();
            names
        }
        Members::Selector { key, value } => {
            let labels = [
                (
                    "io.kubernetes.pod.namespace".to_owned(),
                    request.namespace.clone(),
                ),
                (key.clone(), value.clone()),
            ]
            .into_iter()
            .collect();
            let items = clients
                .runtime
                .clone()
                .list_pod_sandbox(cri::ListPodSandboxRequest {
                    filter: Some(cri::PodSandboxFilter {
                        state: Some(cri::PodSandboxStateValue {
                            state: cri::PodSandboxState::SandboxReady as i32,
                        }),
                        label_selector: labels,
                        ..Default::default()
                    }),
                })
                .await
                .map_err(Error::cri("ListPodSandbox"))?
                .into_inner()
                .items;
            let mut names: Vec<String> = items
                .into_iter()
                .filter_map(|p| p.metadata.map(|m| m.name))
                .collect();
            names.sort();
            names.dedup();
            if names.is_empty() {
                return Err(Error::Refused(format!(
                    "no ready pod of namespace {} has the label {key}={value} on this node",
                    request.namespace
                )));
            }
            names
        }
    };
    let mut pods = Vec::new();
    for name in &names {
        podsnap_checkpoint::format::names::validate_name(name).map_err(Error::Refused)?;
        pods.push(find_ready_pod(clients, &request.namespace, name, &request.handler).await?);
    }
    Ok(pods)
}

/// How long a restored pod's readiness command may take to pass.
const READY_WITHIN: Duration = Duration::from_secs(120);
/// How often it is run until then.
const READY_EVERY: Duration = Duration::from_millis(200);

/// When the restored pod's checkpoint asks for it (the pod's
/// [`READINESS_EXEC_ANNOTATION`](podsnap_checkpoint::config::READINESS_EXEC_ANNOTATION)):
/// runs its readiness command in its container (CRI ExecSync) until it exits 0; says how it
/// passed. Refused when it never does within [`READY_WITHIN`] or names no container of the pod.
async fn wait_ready(
    dir: &Path,
    pod: &RestoredPod,
    endpoint: &str,
    progress: &dyn Progress,
) -> Result<Option<String>> {
    let manifest = read_manifest(dir)?;
    let Some(text) = manifest
        .pod
        .annotations
        .get(podsnap_checkpoint::config::READINESS_EXEC_ANNOTATION)
    else {
        return Ok(None);
    };
    let (container, command) = text.split_once(':').unwrap_or(("", text));
    let (container, argv) = (
        container.trim(),
        command.split_whitespace().map(str::to_owned).collect::<Vec<_>>(),
    );
    let refused = |why: String| {
        Error::Refused(format!(
            "pod {}: {} {text:?}: {why}",
            pod.name,
            podsnap_checkpoint::config::READINESS_EXEC_ANNOTATION
        ))
    };
    let Some((_, id)) = pod.containers.iter().find(|(name, _)| name == container) else {
        return Err(refused(format!(
            "names no restored container of the pod ({container:?})"
        )));
    };
    if argv.is_empty() {
        return Err(refused("names no command".to_owned()));
    }
    progress.step(&format!(
        "waiting for pod {} to be ready: {container}: {}",
        pod.name,
        argv.join(" ")
    ));
    let clients = crate::cri::connect(endpoint).await?;
    let started = Instant::now();
    let mut last = String::new();
    for attempt in 1.. {
        let answer = clients
            .runtime
            .clone()
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: argv.clone(),
                timeout: 10,
            })
            .await;
        match answer {
            Ok(r) if r.get_ref().exit_code == 0 => {
                return Ok(Some(format!(
                    "{container}: {} passed (attempt {attempt}, {:.1?})",
                    argv.join(" "),
                    started.elapsed()
                )))
            }
            Ok(r) => {
                let r = r.into_inner();
                last = format!(
                    "exit code {}: {}",
                    r.exit_code,
                    String::from_utf8_lossy(&r.stderr).trim()
                );
            }
            Err(status) => last = status.message().to_owned(),
        }
        if started.elapsed() >= READY_WITHIN {
            break;
        }
        tokio::time::sleep(READY_EVERY).await;
    }
    Err(refused(format!(
        "did not pass within {READY_WITHIN:?} (last: {last}); the pods after it in its chain were not restored"
    )))
}

/// The group checkpoint in `dir`, if it is one.
pub fn load_group(dir: &Path) -> Result<Option<GroupManifest>> {
    Ok(GroupManifest::load(dir)?)
}

/// Restores the group checkpoint `request.checkpoint_dir` chain by chain (see the module
/// documentation); `report` is told of each pod as it comes back (and, when its checkpoint's
/// pod asks for one, how its readiness command passed). Stops at the first failure:
/// the pods already restored stay, and the error names the pod that failed and those not
/// restored.
pub async fn restore_group(
    request: &RestoreRequest,
    group: &GroupManifest,
    progress: &dyn Progress,
    report: &(dyn Fn(&RestoreRequest, &RestoredPod, Option<&str>) + Sync),
) -> Result<Vec<RestoredPod>> {
    if request.name.is_some() {
        return Err(Error::Refused(
            "--name renames one pod: a group checkpoint restores each pod under its own name".to_owned(),
        ));
    }
    // Every pod's part is there and lists what it holds before any pod is made.
    for pod in &group.pods {
        let part = request.checkpoint_dir.join(&pod.name);
        podsnap_checkpoint::format::manifest::Manifest::load_listed(&part).map_err(|e| {
            Error::Refused(format!(
                "group checkpoint {}: pod {}: {e}; nothing was restored",
                request.checkpoint_dir.display(),
                pod.name
            ))
        })?;
    }
    let chains = group.restore_chains();
    let restore_chain = |chain: Vec<String>| async move {
        let mut restored = Vec::new();
        for name in &chain {
            let mut one = request.clone();
            one.checkpoint_dir = request.checkpoint_dir.join(name);
            progress.step(&format!("restoring pod {name} of the group"));
            let ready = match restore(&one, progress).await {
                Ok(pod) => {
                    let ready = wait_ready(&one.checkpoint_dir, &pod, &one.runtime_endpoint, progress).await;
                    report(&one, &pod, ready.as_ref().ok().and_then(Clone::clone).as_deref());
                    restored.push(pod);
                    ready.map(drop)
                }
                Err(e) => Err(e),
            };
            match ready {
                Ok(()) => {}
                Err(e) => {
                    let after: Vec<&str> = chain
                        .iter()
                        .skip_while(|n| *n != name)
                        .skip(1)
                        .map(String::as_str)
                        .collect();
                    let not = if after.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} not restored: they come after it)", after.join(", "))
                    };
                    return (restored, Some(format!("pod {name} of the group{not}: {e}")));
                }
            }
        }
        (restored, None)
    };
    let results = futures::future::join_all(chains.into_iter().map(restore_chain)).await;
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for (pods, error) in results {
        all.extend(pods);
        errors.extend(error);
    }
    if errors.is_empty() {
        Ok(all)
    } else {
        let done: Vec<String> = all.iter().map(|p| p.name.clone()).collect();
        Err(Error::Refused(format!(
            "group restore: {}{}",
            errors.join("; "),
            if done.is_empty() {
                String::new()
            } else {
                format!("; restored and left running: {}", done.join(", "))
            }
        )))
    }
}
