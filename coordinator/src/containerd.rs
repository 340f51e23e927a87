//! containerd's own API (gRPC), for what CRI cannot say: checkpointing a task into a directory
//! with runc `CheckpointOptions`, the way `ctr task checkpoint --image-path` means it.

use std::path::{Path, PathBuf};

use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::CheckpointTaskRequest;
use tonic::transport::Channel;
use tonic::Request;

/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// The containerd namespace of CRI's (kubelet's) pods.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// runc's checkpoint options (`containerd.runc.v1.CheckpointOptions`), which containerd forwards
/// to the shim unchanged. Field numbers follow containerd's `runc/options/oci.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckpointOptions {
    #[prost(bool, tag = "1")]
    pub exit: bool,
    #[prost(bool, tag = "2")]
    pub open_tcp: bool,
    #[prost(bool, tag = "3")]
    pub external_unix_sockets: bool,
    #[prost(bool, tag = "4")]
    pub terminal: bool,
    #[prost(bool, tag = "5")]
    pub file_locks: bool,
    #[prost(string, repeated, tag = "6")]
    pub empty_namespaces: Vec<String>,
    #[prost(string, tag = "7")]
    pub cgroups_mode: String,
    #[prost(string, tag = "8")]
    pub image_path: String,
    #[prost(string, tag = "9")]
    pub work_path: String,
}

impl CheckpointOptions {
    const TYPE_URL: &'static str = "containerd.runc.v1.CheckpointOptions";

    fn to_any(&self) -> prost_types::Any {
        prost_types::Any {
            type_url: Self::TYPE_URL.to_string(),
            value: prost::Message::encode_to_vec(self),
        }
    }
}

/// A containerd client bound to one namespace.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
}

/// Errors talking to containerd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to containerd at {address}: {source}")]
    Connect {
        address: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// A call failed; the message is containerd's (for a failed dump: the shim's, naming the
    /// container and quoting CRIU's log), printed as is.
    #[error("cannot {what}: {}", .status.message())]
    Call {
        what: String,
        status: Box<tonic::Status>,
    },
}

impl Containerd {
    /// Connects to containerd's socket (a path or `unix://` address).
    pub async fn connect(address: impl AsRef<Path>, namespace: &str) -> Result<Self, Error> {
        let text = address.as_ref().to_string_lossy();
        let path = PathBuf::from(text.strip_prefix("unix://").unwrap_or(&text));
        let channel = containerd_client::connect(&path)
            .await
            .map_err(|source| Error::Connect {
                address: path,
                source,
            })?;
        Ok(Self {
            channel,
            namespace: namespace.to_string(),
        })
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Ok(ns) = self.namespace.parse() {
            req.metadata_mut().insert("containerd-namespace", ns);
        }
        req
    }

    /// Checkpoints a task. With `options.image_path` set, the shim writes the checkpoint into
    /// that directory and containerd stores nothing; returns containerd's descriptors otherwise.
    pub async fn checkpoint_task(
        &self,
        container_id: &str,
        options: &CheckpointOptions,
        timeout: Option<std::time::Duration>,
    ) -> Result<usize, Error> {
        let req = CheckpointTaskRequest {
            container_id: container_id.to_string(),
            parent_checkpoint: String::new(),
            options: Some(options.to_any()),
        };
        let mut request = self.request(req);
        if let Some(t) = timeout {
            // containerd hands the deadline on to the shim, which stops the dump at it.
            request.set_timeout(t);
        }
        let started = std::time::Instant::now();
        let resp = TasksClient::new(self.channel.clone())
            .checkpoint(request)
            .await
            .map_err(|status| Error::Call {
                what: format!("checkpoint task {container_id}"),
                status: Box::new(past_deadline(status, timeout, started.elapsed())),
            })?;
        Ok(resp.into_inner().descriptors.len())
    }
}

impl Containerd {
    /// Freezes a task (Tasks.Pause): its processes stay as they are until [`Self::resume_task`].
    pub async fn pause_task(&self, container_id: &str) -> Result<(), Error> {
        let req = containerd_client::services::v1::PauseTaskRequest {
            container_id: container_id.to_owned(),
        };
        TasksClient::new(self.channel.clone())
            .pause(self.request(req))
            .await
            .map_err(|status| Error::Call {
                what: format!("pause task {container_id}"),
                status: Box::new(status),
            })
            .map(drop)
    }

    /// Thaws a paused task (Tasks.Resume).
    pub async fn resume_task(&self, container_id: &str) -> Result<(), Error> {
        let req = containerd_client::services::v1::ResumeTaskRequest {
            container_id: container_id.to_owned(),
        };
        TasksClient::new(self.channel.clone())
            .resume(self.request(req))
            .await
            .map_err(|status| Error::Call {
                what: format!("resume task {container_id}"),
                status: Box::new(status),
            })
            .map(drop)
    }

    /// The network namespace the spec of container `id` joins (a pod's sandbox: the pod's), if
    /// it names one by path.
    pub async fn network_namespace(&self, id: &str) -> Result<Option<PathBuf>, Error> {
        let req = containerd_client::services::v1::GetContainerRequest { id: id.to_owned() };
        let got =
            containerd_client::services::v1::containers_client::ContainersClient::new(self.channel.clone())
                .get(self.request(req))
                .await
                .map_err(|status| Error::Call {
                    what: format!("get container {id}"),
                    status: Box::new(status),
                })?
                .into_inner();
        let spec = got
            .container
            .and_then(|c| c.spec)
            .and_then(|any| serde_json::from_slice::<serde_json::Value>(&any.value).ok());
        Ok(spec.and_then(|s| {
            s["linux"]["namespaces"]
                .as_array()?
                .iter()
                .find(|n| n["type"] == "network")?["path"]
                .as_str()
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        }))
    }

    /// Sends SIGKILL to every process of a task (Tasks.Kill with `all`).
    pub async fn kill_task(&self, container_id: &str) -> Result<(), Error> {
        let req = containerd_client::services::v1::KillRequest {
            container_id: container_id.to_owned(),
            exec_id: String::new(),
            signal: libc::SIGKILL as u32,
            all: true,
        };
        TasksClient::new(self.channel.clone())
            .kill(self.request(req))
            .await
            .map_err(|status| Error::Call {
                what: format!("kill task {container_id}"),
                status: Box::new(status),
            })
            .map(drop)
    }
}

/// A call that failed at (or just before) the caller's own timeout failed because of it, however
/// the transport said so (tonic's "Timeout expired", or the stream reset as containerd gives up
/// at the deadline it was handed: "h2 protocol error"): said as a deadline, with what came.
fn past_deadline(
    status: tonic::Status,
    timeout: Option<std::time::Duration>,
    elapsed: std::time::Duration,
) -> tonic::Status {
    /// Clocks of the two ends differ a little: the server's deadline may fire first.
    const MARGIN: std::time::Duration = std::time::Duration::from_millis(100);
    match timeout {
        Some(t) if elapsed + MARGIN >= t && status.code() != tonic::Code::DeadlineExceeded => {
            tonic::Status::deadline_exceeded(format!(
                "the client's deadline of {} s passed ({})",
                t.as_secs_f64(),
                status.message()
            ))
        }
        _ => status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_at_the_callers_timeout_is_a_deadline() {
        use std::time::Duration;
        let reset = || tonic::Status::unknown("h2 protocol error: http2 error");
        let s = past_deadline(reset(), Some(Duration::from_secs(1)), Duration::from_millis(1005));
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        assert!(
            s.message().contains("deadline of 1 s passed") && s.message().contains("h2 protocol"),
            "{s:?}"
        );
        // Earlier than the timeout, or without one: as it came.
        let s = past_deadline(reset(), Some(Duration::from_secs(10)), Duration::from_secs(1));
        assert_eq!(s.code(), tonic::Code::Unknown);
        assert_eq!(
            past_deadline(reset(), None, Duration::from_secs(99)).code(),
            tonic::Code::Unknown
        );
    }

    #[test]
    fn options_encode_with_containerds_type_url() {
        let o = CheckpointOptions {
            open_tcp: true,
            image_path: "/x".into(),
            ..Default::default()
        };
        let any = o.to_any();
        assert_eq!(any.type_url, "containerd.runc.v1.CheckpointOptions");
        // field 2 (varint) = 1, field 8 (len-delimited) = "/x"
        assert_eq!(any.value, vec![0x10, 0x01, 0x42, 0x02, b'/', b'x']);
    }
}
