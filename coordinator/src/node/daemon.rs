//! The DaemonSet's installer (`podsnap node install --wait [--label-node NODE]`): install, label
//! the node so the RuntimeClass schedules `podsnap` pods onto it, then wait. On SIGTERM (the
//! DaemonSet deleted, the pod evicted) the label goes first, so nothing new is scheduled onto
//! the node, then everything is uninstalled. An uninstall refused because `podsnap` pods still
//! run leaves the node installed (and unlabelled) and the pod fails, naming them.

use tokio::signal::unix::{signal, SignalKind};

use super::kube::{ApiClient, READY_LABEL, READY_VALUE};
use super::{install, uninstall, Error, InstallRequest, UninstallRequest};

/// Installs, labels, waits for SIGTERM or SIGINT, unlabels and uninstalls. `report` prints a
/// line for the operator (the pod's log).
pub async fn run(
    request: &InstallRequest,
    label_node: Option<&str>,
    report: impl Fn(&str),
) -> Result<(), Error> {
    // Listen before anything is changed: a SIGTERM during the install is not lost.
    let mut term = signal(SignalKind::terminate()).map_err(Error::io("listening for", "SIGTERM"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::io("listening for", "SIGINT"))?;
    let installed = install(request).await?;
    report(&super::report::installed(&installed));
    let api = match label_node {
        Some(node) => {
            let api = ApiClient::in_cluster()?;
            api.label_node(node, READY_LABEL, Some(READY_VALUE)).await?;
            report(&format!("labelled     node {node} {READY_LABEL}={READY_VALUE}"));
            Some((api, node))
        }
        None => None,
    };
    report("waiting      for SIGTERM to uninstall");
    tokio::select! {
        _ = term.recv() => report("SIGTERM      uninstalling"),
        _ = int.recv() => report("SIGINT       uninstalling"),
    }
    if let Some((api, node)) = api {
        match api.label_node(node, READY_LABEL, None).await {
            Ok(()) => report(&format!("unlabelled   node {node}")),
            Err(e) => report(&format!("warning      the label stays on node {node}: {e}")),
        }
    }
    let done = uninstall(&UninstallRequest {
        host_root: request.host_root.clone(),
        restart_command: request.restart_command.clone(),
        runtime_endpoint: request.runtime_endpoint.clone(),
        force: false,
        timeout: request.timeout,
    })
    .await?;
    report(&super::report::uninstalled(&done));
    Ok(())
}
