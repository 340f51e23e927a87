//! `podsnap drain --to-node HOST:PORT`: every ready pod of the podsnap runtime handler on this
//! node, moved to the node listening there as `podsnap migrate --to-node` moves one, at most
//! `parallel` at a time. Each pod's outcome is its own: one that cannot move is resumed by its
//! migration and left running here, and named; the others go on. The pods are taken in the
//! order of their namespaces and names.

use futures::StreamExt;
use k8s_cri::v1 as cri;

use super::channel::Endpoint;
use super::source::Moved;
use crate::dump::DumpRequest;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// What to drain, and where to.
#[derive(Debug, Clone)]
pub struct DrainRequest {
    /// The sockets, root, handler, timeout and TCP choice of every pod's migration (its
    /// namespace and pod are replaced by each pod's).
    pub each: DumpRequest,
    /// The target (`podsnap receive --listen`).
    pub to: String,
    /// At most this many migrations at once (at least 1).
    pub parallel: usize,
}

/// One pod's outcome.
#[derive(Debug)]
pub struct Drained {
    /// `namespace/name`.
    pub pod: String,
    /// The move, or why the pod stays here (it runs on: its migration resumed it).
    pub outcome: std::result::Result<Moved, String>,
}

/// The ready pods of `handler` on this node, as (namespace, name), sorted.
pub async fn pods_on_node(runtime_endpoint: &str, handler: &str) -> Result<Vec<(String, String)>> {
    let clients = crate::cri::connect(runtime_endpoint).await?;
    let items = clients
        .runtime
        .clone()
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .map_err(Error::cri("ListPodSandbox"))?
        .into_inner()
        .items;
    Ok(of_handler(items, handler))
}

/// The ready sandboxes of `handler` among `items`, as (namespace, name), sorted (unit-tested).
fn of_handler(items: Vec<cri::PodSandbox>, handler: &str) -> Vec<(String, String)> {
    let mut pods: Vec<(String, String)> = items
        .into_iter()
        .filter(|p| p.state == cri::PodSandboxState::SandboxReady as i32 && p.runtime_handler == handler)
        .filter_map(|p| p.metadata.map(|m| (m.namespace, m.name)))
        .collect();
    pods.sort();
    pods.dedup();
    pods
}

/// A pod's steps, each prefixed with the pod.
struct Prefixed<'a> {
    pod: String,
    progress: &'a dyn Progress,
}

impl Progress for Prefixed<'_> {
    fn step(&self, message: &str) {
        self.progress.step(&format!("[{}] {message}", self.pod));
    }
}

/// Drains this node (see the module documentation). `each` is told every pod's outcome as it
/// comes; the outcomes are returned in the pods' order. An error only when the pods could not
/// be listed.
pub async fn drain(
    request: &DrainRequest,
    endpoint: &Endpoint,
    progress: &dyn Progress,
    each: &(dyn Fn(&Drained) + Sync),
) -> Result<Vec<Drained>> {
    let pods = pods_on_node(&request.each.runtime_endpoint, &request.each.handler).await?;
    progress.step(&format!(
        "draining {} pods to {}, {} at a time",
        pods.len(),
        request.to,
        request.parallel.max(1)
    ));
    let moves = pods.iter().enumerate().map(|(i, (namespace, name))| {
        let mut one = request.each.clone();
        one.namespace = namespace.clone();
        one.pod = name.clone();
        let pod = format!("{namespace}/{name}");
        async move {
            let prefixed = Prefixed {
                pod: pod.clone(),
                progress,
            };
            let outcome = super::live::migrate_live(&one, &request.to, endpoint, &prefixed)
                .await
                .map(|(moved, _)| moved)
                .map_err(|e| format!("{e:#}"));
            (i, Drained { pod, outcome })
        }
    });
    let mut done: Vec<(usize, Drained)> = futures::stream::iter(moves)
        .buffer_unordered(request.parallel.max(1))
        .inspect(|(_, d)| each(d))
        .collect()
        .await;
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, d)| d).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(ns: &str, name: &str, handler: &str, ready: bool) -> cri::PodSandbox {
        cri::PodSandbox {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                namespace: ns.into(),
                ..Default::default()
            }),
            state: if ready {
                cri::PodSandboxState::SandboxReady as i32
            } else {
                cri::PodSandboxState::SandboxNotready as i32
            },
            runtime_handler: handler.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_ready_pods_of_the_handler_are_drained_in_order() {
        let pods = of_handler(
            vec![
                sandbox("b", "web", "podsnap", true),
                sandbox("a", "db", "podsnap", true),
                sandbox("a", "other-runtime", "runc", true),
                sandbox("a", "gone", "podsnap", false),
                sandbox("a", "db", "podsnap", true),
            ],
            "podsnap",
        );
        assert_eq!(
            pods,
            vec![
                ("a".to_owned(), "db".to_owned()),
                ("b".to_owned(), "web".to_owned())
            ]
        );
    }
}
