//! A blocking CRI client for tests: each call runs on the client's own single-threaded tokio
//! runtime, so tests and `Drop` code stay plain synchronous Rust.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use podsnap_coordinator::cri::{connect, CriClients};
use tonic::Status;

/// How long one CRI call may take (StopPodSandbox waits for containers to stop).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(120);

/// A synchronous CRI client of one endpoint.
#[derive(Clone)]
pub struct CriClient {
    runtime: Arc<tokio::runtime::Runtime>,
    clients: CriClients,
    endpoint: String,
}

impl std::fmt::Debug for CriClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriClient")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

macro_rules! rpc {
    ($(#[$doc:meta])* $service:ident $name:ident($request:ident) -> $response:ident) => {
        $(#[$doc])*
        pub fn $name(&self, request: cri::$request) -> Result<cri::$response, Status> {
            let mut client = self.clients.$service.clone();
            let call = async move { tokio::time::timeout(RPC_TIMEOUT, client.$name(request)).await };
            match self.runtime.block_on(call) {
                Ok(answer) => answer.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "{} took longer than {:?}",
                    stringify!($name),
                    RPC_TIMEOUT
                ))),
            }
        }
    };
}

impl CriClient {
    /// Connects to `endpoint` (`unix:///path` or a path) with podsnap's own CRI connector.
    pub fn connect(endpoint: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let clients = runtime.block_on(connect(endpoint))?;
        Ok(Self {
            runtime: Arc::new(runtime),
            clients,
            endpoint: endpoint.to_owned(),
        })
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    rpc!(runtime version(VersionRequest) -> VersionResponse);
    rpc!(runtime status(StatusRequest) -> StatusResponse);
    rpc!(runtime runtime_config(RuntimeConfigRequest) -> RuntimeConfigResponse);
    rpc!(runtime run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse);
    rpc!(runtime stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse);
    rpc!(runtime remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse);
    rpc!(runtime pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse);
    rpc!(runtime list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse);
    rpc!(runtime pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse);
    rpc!(runtime create_container(CreateContainerRequest) -> CreateContainerResponse);
    rpc!(runtime start_container(StartContainerRequest) -> StartContainerResponse);
    rpc!(runtime stop_container(StopContainerRequest) -> StopContainerResponse);
    rpc!(runtime remove_container(RemoveContainerRequest) -> RemoveContainerResponse);
    rpc!(runtime container_status(ContainerStatusRequest) -> ContainerStatusResponse);
    rpc!(runtime list_containers(ListContainersRequest) -> ListContainersResponse);
    rpc!(runtime exec_sync(ExecSyncRequest) -> ExecSyncResponse);
    rpc!(runtime container_stats(ContainerStatsRequest) -> ContainerStatsResponse);
    rpc!(runtime list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse);
    rpc!(image image_status(ImageStatusRequest) -> ImageStatusResponse);
    rpc!(image list_images(ListImagesRequest) -> ListImagesResponse);
    rpc!(image pull_image(PullImageRequest) -> PullImageResponse);

    /// Whether CRI reports both `RuntimeReady` and `NetworkReady`.
    pub fn ready(&self) -> Result<bool, Status> {
        let status = self.status(cri::StatusRequest { verbose: false })?;
        let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
        let is_true = |kind: &str| conditions.iter().any(|c| c.r#type == kind && c.status);
        Ok(is_true("RuntimeReady") && is_true("NetworkReady"))
    }

    /// A container's status.
    pub fn container(&self, container_id: &str) -> Result<cri::ContainerStatus, Status> {
        self.container_status(cri::ContainerStatusRequest {
            container_id: container_id.to_owned(),
            verbose: false,
        })?
        .status
        .ok_or_else(|| Status::internal(format!("no status for container {container_id}")))
    }

    /// Polls until container `container_id` is in `state`, or fails after `timeout` with the
    /// last status seen.
    pub fn wait_container_state(
        &self,
        container_id: &str,
        state: cri::ContainerState,
        timeout: Duration,
    ) -> anyhow::Result<cri::ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.container(container_id)?;
            if status.state == state as i32 {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "container {container_id} is {:?} (reason {:?}, message {:?}), not {state:?} \
                     after {timeout:?}",
                    cri::ContainerState::try_from(status.state),
                    status.reason,
                    status.message
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `cmd` in a container through ExecSync (timeout in seconds, as CRI has it).
    pub fn exec(
        &self,
        container_id: &str,
        cmd: &[&str],
        timeout_seconds: i64,
    ) -> Result<cri::ExecSyncResponse, Status> {
        self.exec_sync(cri::ExecSyncRequest {
            container_id: container_id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: timeout_seconds,
        })
    }

    /// The pod's status with the runtime's verbose info.
    pub fn pod_status(&self, pod_id: &str) -> Result<cri::PodSandboxStatusResponse, Status> {
        self.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_owned(),
            verbose: true,
        })
    }

    /// The pod's IP, empty when it has none (host network).
    pub fn pod_ip(&self, pod_id: &str) -> Result<String, Status> {
        Ok(self
            .pod_status(pod_id)?
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default())
    }

    /// The pod's network namespace path, read from the verbose status (containerd's
    /// `runtimeSpec`); `None` for a host-network pod or when the runtime does not say.
    pub fn pod_netns(&self, pod_id: &str) -> Result<Option<String>, Status> {
        let status = self.pod_status(pod_id)?;
        Ok(status
            .info
            .values()
            .filter_map(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .find_map(|value| find_netns(&value)))
    }

    /// The host pid of a container's init process, from the verbose status (`info.pid`).
    pub fn container_pid(&self, container_id: &str) -> Result<Option<i32>, Status> {
        let status = self.container_status(cri::ContainerStatusRequest {
            container_id: container_id.to_owned(),
            verbose: true,
        })?;
        Ok(info_pid(&status.info))
    }

    /// The host pid of a pod's sandbox (pause) process, from the verbose status (`info.pid`).
    pub fn sandbox_pid(&self, pod_id: &str) -> Result<Option<i32>, Status> {
        Ok(info_pid(&self.pod_status(pod_id)?.info))
    }

    /// Every pod sandbox id.
    pub fn pod_ids(&self) -> Result<Vec<String>, Status> {
        Ok(self
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })?
            .items
            .into_iter()
            .map(|p| p.id)
            .collect())
    }

    /// The containers of one pod.
    pub fn pod_containers(&self, pod_id: &str) -> Result<Vec<cri::Container>, Status> {
        Ok(self
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: pod_id.to_owned(),
                    ..Default::default()
                }),
            })?
            .containers)
    }

    /// StopPodSandbox then RemovePodSandbox.
    ///
    /// A failed StopPodSandbox is tried again, as kubelet does (a pod whose processes all just
    /// exited can race containerd's own cleanup of its sandbox: "ttrpc: closed").
    pub fn stop_and_remove_pod(&self, pod_id: &str) -> Result<(), Status> {
        let stop = || {
            self.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod_id.to_owned(),
            })
        };
        let mut stopped = stop();
        for _ in 0..3 {
            if stopped.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            stopped = stop();
        }
        stopped?;
        self.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        })?;
        Ok(())
    }
}

/// The `pid` field of a verbose status's `info` JSON.
fn info_pid(info: &std::collections::HashMap<String, String>) -> Option<i32> {
    info.values()
        .filter_map(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .find_map(|value| value.get("pid").and_then(serde_json::Value::as_i64))
        .and_then(|pid| i32::try_from(pid).ok())
        .filter(|&pid| pid > 0)
}

/// The first network namespace path (`.../netns/...`) found in a JSON document.
fn find_netns(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Object(map) => {
            // The runtime spec: {"type": "network", "path": "/var/run/netns/cni-..."}.
            if map.get("type").and_then(|t| t.as_str()) == Some("network") {
                if let Some(path) = map.get("path").and_then(|p| p.as_str()) {
                    if !path.is_empty() {
                        return Some(path.to_owned());
                    }
                }
            }
            map.values().find_map(find_netns)
        }
        serde_json::Value::Array(items) => items.iter().find_map(find_netns),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_in_runtime_spec() {
        let info: serde_json::Value = serde_json::from_str(
            r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},
               {"type":"network","path":"/var/run/netns/cni-1"}]}}}"#,
        )
        .expect("valid JSON");
        assert_eq!(find_netns(&info).as_deref(), Some("/var/run/netns/cni-1"));
    }
}
