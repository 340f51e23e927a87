//! Finding a pod through CRI by its Kubernetes namespace and name, the way an operator names it.

use k8s_cri::v1 as cri;

use crate::cri::CriClients;
use crate::error::{Error, Result};

/// podsnap's RuntimeClass handler.
pub const HANDLER: &str = "podsnap";

/// A pod sandbox as CRI lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// The sandbox id (containerd's container id of the pause container).
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The CRI runtime handler that runs it.
    pub handler: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Finds the one ready sandbox of pod `namespace/name` and checks it runs on `handler`.
pub async fn find_ready_pod(cri: &CriClients, namespace: &str, name: &str, handler: &str) -> Result<PodRef> {
    let items = cri
        .runtime
        .clone()
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .map_err(Error::cri("ListPodSandbox"))?
        .into_inner()
        .items;
    pick(items, namespace, name, handler)
}

/// The lookup itself, apart from the call (unit-tested).
fn pick(items: Vec<cri::PodSandbox>, namespace: &str, name: &str, handler: &str) -> Result<PodRef> {
    let named: Vec<cri::PodSandbox> = items
        .into_iter()
        .filter(|p| {
            p.metadata
                .as_ref()
                .is_some_and(|m| m.name == name && m.namespace == namespace)
        })
        .collect();
    let total = named.len();
    let ready: Vec<&cri::PodSandbox> = named
        .iter()
        .filter(|p| p.state == cri::PodSandboxState::SandboxReady as i32)
        .collect();
    let pod = match ready.as_slice() {
        [one] => *one,
        [] => {
            let detail = if total == 0 {
                "no pod sandbox has that name in that namespace on this node".to_owned()
            } else {
                format!("its {total} sandbox(es) on this node are not ready")
            };
            return Err(Error::PodNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                detail,
            });
        }
        several => {
            return Err(Error::PodAmbiguous {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                count: several.len(),
                ids: several
                    .iter()
                    .map(|p| p.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    if pod.runtime_handler != handler {
        return Err(Error::WrongHandler {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            handler: pod.runtime_handler.clone(),
            wanted: handler.to_owned(),
        });
    }
    let uid = pod.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
    Ok(PodRef {
        id: pod.id.clone(),
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        uid,
        handler: pod.runtime_handler.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, name: &str, ns: &str, ready: bool, handler: &str) -> cri::PodSandbox {
        cri::PodSandbox {
            id: id.into(),
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{id}"),
                namespace: ns.into(),
                attempt: 0,
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
    fn finds_the_ready_sandbox_by_name_and_namespace() {
        let items = vec![
            sandbox("a", "web", "default", false, HANDLER),
            sandbox("b", "web", "default", true, HANDLER),
            sandbox("c", "web", "other", true, HANDLER),
        ];
        let pod = pick(items, "default", "web", HANDLER).expect("found");
        assert_eq!(pod.id, "b");
        assert_eq!(pod.uid, "uid-b");
        assert_eq!(pod.to_string(), "default/web");
    }

    #[test]
    fn clear_errors() {
        let err = pick(vec![], "default", "web", HANDLER).expect_err("none");
        assert!(err.to_string().contains("pod default/web not found"), "{err}");
        let err = pick(
            vec![sandbox("a", "web", "default", false, HANDLER)],
            "default",
            "web",
            HANDLER,
        )
        .expect_err("not ready");
        assert!(err.to_string().contains("not ready"), "{err}");
        let two = vec![
            sandbox("a", "web", "default", true, HANDLER),
            sandbox("b", "web", "default", true, HANDLER),
        ];
        let err = pick(two, "default", "web", HANDLER).expect_err("two");
        assert!(
            err.to_string().contains("ambiguous") && err.to_string().contains("a, b"),
            "{err}"
        );
        let err = pick(
            vec![sandbox("a", "web", "default", true, "runc")],
            "default",
            "web",
            HANDLER,
        )
        .expect_err("runc");
        assert!(err.to_string().contains("runtime handler \"runc\""), "{err}");
    }
}
