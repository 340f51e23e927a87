//! Kubelet's path of a live migration, on the target. The source runs
//! `podsnap migrate --listen ADDR`, which prints the pod's `podsnap://HOST:PORT/TICKET` and
//! waits; a pod annotated `podsnap.io/restore-from` with it is created on the target (through
//! the API server, with the `podsnap` RuntimeClass). At the sandbox's creation its shim starts
//! `podsnap receive --from podsnap://...` ([`receive_claimed`]), which connects to the source
//! with this node's `[migration]` key and the ticket, receives the checkpoint without its memory
//! into the root under the name the shim gave, listens for the page streams of that pod's
//! containers only, and says `received NAME`: the shim goes on, and kubelet creates and
//! starts the containers, each restored lazily. Once every container the checkpoint ran runs
//! in the sandbox (CRI's state, polled), the source is told `restored`; from there on it is a
//! live migration as `receive --listen` runs it: `commit`, `kept`, every page, `released`.
//!
//! Failure before the switch: `abort` goes to the source, which resumes its pod; the page
//! streams close, and the shims kill the containers that were restored (their memory will not
//! come). kubelet may retry them: they then fail, and the pod is the cluster's to remove (the
//! received checkpoint goes with it). After the switch, as any live migration: a lost source
//! kills the containers rather than run them with missing memory.

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use podsnap_checkpoint::format::layout::{parse_live_reference, LIVE_PREFIX};
use podsnap_checkpoint::format::persistent::AfterDump;

use super::channel::Endpoint;
use super::frame::{Message, Purpose};
use super::live::{check_pipe_max, served_containers, PageSockets};
use super::pages::Pages;
use super::target::{check_manifest, land, switch_and_fill, Landed, Unfilled};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::restore::RestoreRequest;

/// How long the containers of a claimed pod may take to run, by default (kubelet creates and
/// starts them one after another; the source's pod stays frozen meanwhile).
pub const RUNNING_DEADLINE: Duration = Duration::from_secs(120);

/// What the shim of a pod annotated `podsnap.io/restore-from: podsnap://...` asks.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The annotation's value, `podsnap://HOST:PORT/TICKET`.
    pub reference: String,
    /// The checkpoint's name in the root (the shim's, for this pod).
    pub name: String,
    /// The pod's sandbox id: only its shims get the page streams, and its containers are
    /// waited for.
    pub sandbox: String,
    /// The pod's namespace: the restore policy is checked for it.
    pub namespace: String,
    /// The node: CRI endpoint, checkpoint root, configuration (restore policy, reserve).
    pub restore: RestoreRequest,
    /// How long every container may take to run once the checkpoint is in place.
    pub deadline: Duration,
}

/// Receives the pod claimed with the ticket of `request.reference`; `ready` is told the
/// checkpoint's name once it is in place (the shim goes on then). Returns once the source
/// let go of the pod (every page here) or with what failed.
pub async fn receive_claimed(
    request: &ClaimRequest,
    endpoint: &Endpoint,
    progress: &dyn Progress,
    ready: &(dyn Fn(&str) + Sync),
) -> Result<()> {
    let rest = request.reference.strip_prefix(LIVE_PREFIX).ok_or_else(|| {
        Error::Refused(format!(
            "{:?} is not a live migration's reference ({LIVE_PREFIX}HOST:PORT/TICKET)",
            request.reference
        ))
    })?;
    let (addr, ticket) = parse_live_reference(rest).map_err(Error::Refused)?;
    check_pipe_max()?;
    progress.step(&format!("claiming the pod from {addr}"));
    let channel = endpoint
        .connect(&addr, Purpose::Control { ticket: Some(ticket) })
        .await?;
    let root = &request.restore.checkpoint_root;
    let check = |raw: &[u8]| {
        let manifest = check_manifest(&request.restore, raw, Some(&request.namespace))?;
        if manifest.after_dump != Some(AfterDump::Migrating) {
            return Err("kubelet's path takes live migrations only (`podsnap migrate --listen`)".to_owned());
        }
        Ok(manifest)
    };
    let (channel, landed) = land(channel, root, Some(request.name.clone()), check, progress).await?;
    let Landed { manifest, dir, .. } = landed;
    // The sandbox exists already: its shims, and no other pod's, get the streams.
    let (_known, pod) = tokio::sync::watch::channel(Some(request.sandbox.clone()));
    let (sockets, locals) = match PageSockets::listen(&request.name, &manifest, &pod) {
        Ok(s) => s,
        Err(e) => {
            channel.abort(&e.to_string()).await;
            return Err(e);
        }
    };
    let pages = Pages::start(channel, locals, true)?;
    ready(&request.name);
    progress.step(&format!(
        "checkpoint in place at {}: waiting for kubelet to start the pod's containers",
        dir.display()
    ));
    let wanted = served_containers(&manifest);
    let running = until_running(
        &request.restore.runtime_endpoint,
        &request.sandbox,
        &wanted,
        request.deadline,
    )
    .await;
    let (label, ip) = match running {
        Ok(r) => r,
        Err(e) => {
            pages.abort(format!("the target gave up: {e}")).await;
            drop(sockets);
            return Err(Error::Refused(format!(
                "{e}\nthe source resumes its pod; the containers restored here were killed (their \
                 memory will not come)"
            )));
        }
    };
    let restored = Message::Restored {
        pod: label.clone(),
        id: request.sandbox.clone(),
        ip,
        containers: wanted,
    };
    let filled = switch_and_fill(pages, restored, &manifest, &label, progress).await;
    drop(sockets);
    match filled {
        Ok(()) => Ok(()),
        Err(Unfilled::NotCommitted(e)) => Err(Error::Refused(format!(
            "the source did not commit ({e}): the containers restored here were killed, the \
             source keeps its pod"
        ))),
        Err(Unfilled::Lost(e)) => Err(e),
    }
}

/// Waits until every container named in `wanted` runs in sandbox `sandbox` (at most
/// `deadline`); the pod's `namespace/name` and address then.
async fn until_running(
    endpoint: &str,
    sandbox: &str,
    wanted: &[String],
    deadline: Duration,
) -> Result<(String, String)> {
    let clients = crate::cri::connect(endpoint).await?;
    let give_up = Instant::now() + deadline;
    // The sandbox is still being created when this starts (its Create waits for the
    // checkpoint): unknown or not ready is "not yet" until it was ready once.
    let mut was_ready = false;
    loop {
        let status = clients
            .runtime
            .clone()
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.to_owned(),
                verbose: false,
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().status)
            .filter(|s| s.state() == cri::PodSandboxState::SandboxReady);
        let Some(status) = status else {
            if was_ready {
                return Err(Error::Refused(format!(
                    "the pod (sandbox {sandbox}) is no longer ready"
                )));
            }
            if Instant::now() >= give_up {
                return Err(Error::Refused(format!(
                    "the pod (sandbox {sandbox}) was not ready within {deadline:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        was_ready = true;
        let running = super::source::running_containers(&clients, sandbox).await?;
        let missing: Vec<&str> = wanted
            .iter()
            .filter(|w| !running.iter().any(|(n, _)| n == *w))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            let label = status
                .metadata
                .map(|m| format!("{}/{}", m.namespace, m.name))
                .unwrap_or_else(|| sandbox.to_owned());
            let ip = status.network.map(|n| n.ip).unwrap_or_default();
            return Ok((label, ip));
        }
        if Instant::now() >= give_up {
            return Err(Error::Refused(format!(
                "container(s) {} of the pod did not run within {deadline:?}",
                missing.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
