//! What containerd serves, asked over CRI as `crictl info` and `crictl pods` ask: whether the
//! runtime is ready, whether the `podsnap` handler is among the runtime handlers CRI `Status`
//! reports, and which pods of that handler run.

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;

use super::dropin::HANDLER;
use super::Error;

/// How long one CRI call may take here.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// containerd as CRI shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// `RuntimeReady` is true.
    pub ready: bool,
    /// The `podsnap` handler is among `runtime_handlers`.
    pub handler: bool,
    /// The runtime's name and version (`containerd v2.1.9`).
    pub version: String,
}

async fn clients(endpoint: &str) -> Result<crate::cri::CriClients, String> {
    tokio::time::timeout(CALL_TIMEOUT, crate::cri::connect(endpoint))
        .await
        .map_err(|_| format!("no answer from {endpoint} within {CALL_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())
}

/// Asks CRI once.
pub async fn served(endpoint: &str) -> Result<Served, String> {
    let clients = clients(endpoint).await?;
    let mut runtime = clients.runtime;
    let status = tokio::time::timeout(
        CALL_TIMEOUT,
        runtime.status(cri::StatusRequest { verbose: false }),
    )
    .await
    .map_err(|_| format!("CRI Status took longer than {CALL_TIMEOUT:?}"))?
    .map_err(|s| format!("CRI Status: {}", s.message()))?
    .into_inner();
    let ready = status.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.r#type == "RuntimeReady" && c.status)
    });
    let handler = status.runtime_handlers.iter().any(|h| h.name == HANDLER);
    let version = match tokio::time::timeout(
        CALL_TIMEOUT,
        runtime.version(cri::VersionRequest {
            version: String::new(),
        }),
    )
    .await
    {
        Ok(Ok(v)) => {
            let v = v.into_inner();
            format!("{} {}", v.runtime_name, v.runtime_version)
        }
        _ => "unknown".to_owned(),
    };
    Ok(Served {
        ready,
        handler,
        version,
    })
}

/// Waits until CRI answers with the runtime ready and the handler present (`handler`) or
/// absent (`!handler`); fails after `timeout` with the last state seen.
pub async fn wait_for(endpoint: &str, handler: bool, timeout: Duration) -> Result<Served, Error> {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match served(endpoint).await {
            Ok(s) if s.ready && s.handler == handler => return Ok(s),
            Ok(s) => {
                last = format!(
                    "CRI answers, runtime {}, handler `{HANDLER}` {}",
                    if s.ready { "ready" } else { "not ready" },
                    if s.handler { "served" } else { "not served" }
                )
            }
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(Error::NotReady(format!(
                "containerd did not come back {} the `{HANDLER}` handler within {timeout:?}: {last}",
                if handler { "with" } else { "without" }
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pods of the `podsnap` handler that are ready (running) on the node, as
/// `namespace/name (sandbox <12 hex>)`.
pub async fn podsnap_pods(endpoint: &str) -> Result<Vec<String>, Error> {
    let clients = clients(endpoint)
        .await
        .map_err(|e| Error::NotReady(format!("cannot list the node's pods over CRI: {e}")))?;
    let mut runtime = clients.runtime;
    let pods = tokio::time::timeout(
        CALL_TIMEOUT,
        runtime.list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                state: Some(cri::PodSandboxStateValue {
                    state: cri::PodSandboxState::SandboxReady as i32,
                }),
                ..Default::default()
            }),
        }),
    )
    .await
    .map_err(|_| Error::NotReady("CRI ListPodSandbox did not answer".to_owned()))?
    .map_err(|s| Error::NotReady(format!("CRI ListPodSandbox: {}", s.message())))?
    .into_inner();
    Ok(pods
        .items
        .into_iter()
        .filter(|p| p.runtime_handler == HANDLER)
        .map(|p| {
            let meta = p.metadata.unwrap_or_default();
            format!(
                "{}/{} (sandbox {})",
                meta.namespace,
                meta.name,
                &p.id[..p.id.len().min(12)]
            )
        })
        .collect())
}
