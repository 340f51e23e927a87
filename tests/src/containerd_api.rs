//! containerd's own API (gRPC), for what `ctr` cannot say against a non-runc runtime:
//!
//! - a checkpoint into a plain directory: Tasks.Checkpoint with runc `CheckpointOptions`
//!   carrying `image_path` (through podsnap's coordinator, the way `podsnap` itself does it);
//! - a task restored from such a directory: Tasks.Create with runc `Options` carrying
//!   `criu_image_path`, which containerd's task service turns into the shim's `checkpoint`
//!   path (the Go client's `WithRestoreImagePath`), then Tasks.Start;
//! - CRI CheckpointContainer (containerd writes its KEP-2008 archive at `location`);
//! - Tasks.Update calls in flight together (CRI serializes its own per container; another
//!   client of containerd's API does not, and `ctr` has no update).
//!
//! Blocking calls on a private single-threaded runtime, like the rest of the harness.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::MountsRequest;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    CreateTaskRequest, GetContainerRequest, GetRequest, StartRequest, UpdateTaskRequest,
};
use k8s_cri::v1 as cri;
use tonic::transport::Channel;
use tonic::Request;

pub use podsnap_coordinator::containerd::CheckpointOptions;

/// How long one call may take (a dump or restore of a few hundred MiB included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// runc's create options (`containerd.runc.v1.Options`); only the fields a restore needs.
/// Field numbers follow containerd's `api/types/runc/options/oci.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RuncOptions {
    /// criu image path: the directory to restore from.
    #[prost(string, tag = "10")]
    pub criu_image_path: String,
    /// criu work path (its restore.log); the image directory when empty.
    #[prost(string, tag = "11")]
    pub criu_work_path: String,
}

impl RuncOptions {
    fn to_any(&self) -> prost_types::Any {
        prost_types::Any {
            type_url: "containerd.runc.v1.Options".to_owned(),
            value: prost::Message::encode_to_vec(self),
        }
    }
}

/// A task's state as Tasks.Get reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    /// The init process's host pid.
    pub pid: u32,
    /// containerd's status name: `RUNNING`, `PAUSED`, `CREATED`, `STOPPED`...
    pub status: String,
}

/// A blocking client of one containerd (and its CRI endpoint), bound to a namespace.
#[derive(Clone)]
pub struct ContainerdApi {
    runtime: Arc<tokio::runtime::Runtime>,
    channel: Channel,
    address: PathBuf,
    namespace: String,
}

impl std::fmt::Debug for ContainerdApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerdApi")
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl ContainerdApi {
    /// Connects to containerd's gRPC socket; calls go to `namespace`.
    pub fn connect(address: &Path, namespace: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let channel = runtime
            .block_on(containerd_client::connect(address))
            .with_context(|| format!("connecting to containerd at {}", address.display()))?;
        Ok(Self {
            runtime: Arc::new(runtime),
            channel,
            address: address.to_path_buf(),
            namespace: namespace.to_owned(),
        })
    }

    /// What containerd's Introspection API reports of the task runtime `runtime` (its shim's
    /// `-info` answer, as containerd's CRI plugin asks for it).
    pub fn runtime_info(&self, runtime: &str) -> Result<containerd_client::types::RuntimeInfo> {
        use prost::Message;
        let request = containerd_client::types::RuntimeRequest {
            runtime_path: runtime.to_owned(),
            options: None,
        };
        let options = prost_types::Any {
            type_url: "types.containerd.io/containerd.types.RuntimeRequest".to_owned(),
            value: request.encode_to_vec(),
        };
        let answer = self
            .block_on(
                "Introspection.PluginInfo",
                containerd_client::services::v1::introspection_client::IntrospectionClient::new(
                    self.channel.clone(),
                )
                .plugin_info(self.request(
                    containerd_client::services::v1::PluginInfoRequest {
                        r#type: "io.containerd.runtime.v2".to_owned(),
                        id: "task".to_owned(),
                        options: Some(options),
                    },
                )),
            )?
            .map_err(|s| anyhow!("PluginInfo for {runtime}: {}", s.message()))?
            .into_inner();
        let extra = answer
            .extra
            .ok_or_else(|| anyhow!("PluginInfo for {runtime}: no runtime info"))?;
        containerd_client::types::RuntimeInfo::decode(extra.value.as_slice())
            .with_context(|| format!("PluginInfo for {runtime}: {}", extra.type_url))
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Ok(value) = self.namespace.parse() {
            request.metadata_mut().insert("containerd-namespace", value);
        }
        request
    }

    fn block_on<F: std::future::Future>(&self, what: &str, call: F) -> Result<F::Output> {
        self.runtime
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, call).await })
            .map_err(|_| anyhow!("{what} took longer than {CALL_TIMEOUT:?}"))
    }

    /// Tasks.Checkpoint of `id` with runc `options`; with `options.image_path` set the shim
    /// writes a plain directory and containerd stores nothing.
    pub fn checkpoint(&self, id: &str, options: &CheckpointOptions) -> Result<()> {
        let address = self.address.clone();
        let namespace = self.namespace.clone();
        self.block_on(&format!("checkpoint of {id}"), async move {
            let containerd =
                podsnap_coordinator::containerd::Containerd::connect(&address, &namespace).await?;
            containerd.checkpoint_task(id, options, None).await
        })?
        .map(|_| ())
        .map_err(|e| anyhow!("{e}"))
    }

    /// Tasks.Create of the task of container `id` restoring from `image_dir` (runc `Options`
    /// with `criu_image_path`), with the container's snapshot as rootfs and no stdio. The task
    /// is CREATED; [`Self::start`] runs the restore.
    pub fn create_restored_task(&self, id: &str, image_dir: &Path) -> Result<u32> {
        let options = RuncOptions {
            criu_image_path: image_dir.to_string_lossy().into_owned(),
            criu_work_path: String::new(),
        };
        self.create_task(id, Some(options.to_any()), None, &image_dir.display().to_string())
    }

    /// Tasks.Create of the task of container `id` restoring from a CRIU checkpoint blob of the
    /// content store (`media_type`, `digest`, `size`: the descriptor in a checkpoint image's
    /// index); containerd unpacks it into a temporary directory for the shim.
    pub fn create_task_from_blob(&self, id: &str, media_type: &str, digest: &str, size: i64) -> Result<u32> {
        let descriptor = containerd_client::types::Descriptor {
            media_type: media_type.to_owned(),
            digest: digest.to_owned(),
            size,
            annotations: Default::default(),
        };
        self.create_task(id, None, Some(descriptor), digest)
    }

    fn create_task(
        &self,
        id: &str,
        options: Option<prost_types::Any>,
        checkpoint: Option<containerd_client::types::Descriptor>,
        from: &str,
    ) -> Result<u32> {
        let container = self
            .block_on(
                "Containers.Get",
                ContainersClient::new(self.channel.clone())
                    .get(self.request(GetContainerRequest { id: id.to_owned() })),
            )?
            .map_err(|s| anyhow!("Containers.Get {id}: {}", s.message()))?
            .into_inner()
            .container
            .ok_or_else(|| anyhow!("containerd has no container {id}"))?;
        let mut rootfs = Vec::new();
        if !container.snapshot_key.is_empty() {
            rootfs = self
                .block_on(
                    "Snapshots.Mounts",
                    SnapshotsClient::new(self.channel.clone()).mounts(self.request(MountsRequest {
                        snapshotter: container.snapshotter.clone(),
                        key: container.snapshot_key.clone(),
                    })),
                )?
                .map_err(|s| anyhow!("Snapshots.Mounts {}: {}", container.snapshot_key, s.message()))?
                .into_inner()
                .mounts;
        }
        let request = CreateTaskRequest {
            container_id: id.to_owned(),
            rootfs,
            options,
            checkpoint,
            ..Default::default()
        };
        let answer = self
            .block_on(
                "Tasks.Create",
                TasksClient::new(self.channel.clone()).create(self.request(request)),
            )?
            .map_err(|s| anyhow!("Tasks.Create {id} from {from}: {}", s.message()))?;
        Ok(answer.into_inner().pid)
    }

    /// Tasks.Start of a created task; returns its pid.
    pub fn start(&self, id: &str) -> Result<u32> {
        self.start_within(id, CALL_TIMEOUT)
    }

    /// Tasks.Start, giving up (with an error saying so) after `timeout`.
    pub fn start_within(&self, id: &str, timeout: Duration) -> Result<u32> {
        let mut client = TasksClient::new(self.channel.clone());
        let call = client.start(self.request(StartRequest {
            container_id: id.to_owned(),
            exec_id: String::new(),
        }));
        let answer = self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, call).await })
            .map_err(|_| anyhow!("Tasks.Start {id} took longer than {timeout:?}"))?
            .map_err(|s| anyhow!("Tasks.Start {id}: {}", s.message()))?;
        Ok(answer.into_inner().pid)
    }

    /// Tasks.Update of task `id` with each of `resources` (OCI LinuxResources, sent as JSON
    /// the way containerd's Go client sends them), every call in flight at once; the answers
    /// in the order of `resources`.
    pub fn update_at_once(&self, id: &str, resources: &[serde_json::Value]) -> Vec<Result<()>> {
        let calls: Vec<_> = resources
            .iter()
            .map(|r| {
                let request = self.request(UpdateTaskRequest {
                    container_id: id.to_owned(),
                    resources: Some(prost_types::Any {
                        type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
                            .to_owned(),
                        value: r.to_string().into_bytes(),
                    }),
                    annotations: Default::default(),
                });
                let mut client = TasksClient::new(self.channel.clone());
                async move { client.update(request).await }
            })
            .collect();
        self.runtime.block_on(async {
            let handles: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
            let mut answers = Vec::new();
            for (h, r) in handles.into_iter().zip(resources) {
                answers.push(match tokio::time::timeout(CALL_TIMEOUT, h).await {
                    Ok(Ok(Ok(_))) => Ok(()),
                    Ok(Ok(Err(s))) => Err(anyhow!("Tasks.Update {id} with {r}: {}", s.message())),
                    Ok(Err(e)) => Err(anyhow!("Tasks.Update {id} with {r}: {e}")),
                    Err(_) => Err(anyhow!(
                        "Tasks.Update {id} with {r} took longer than {CALL_TIMEOUT:?}"
                    )),
                });
            }
            answers
        })
    }

    /// Tasks.Get: the task's pid and status, `None` when containerd has no task `id`.
    pub fn task(&self, id: &str) -> Result<Option<TaskState>> {
        let answer = self.block_on(
            "Tasks.Get",
            TasksClient::new(self.channel.clone()).get(self.request(GetRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            })),
        )?;
        match answer {
            Ok(answer) => Ok(answer.into_inner().process.map(|p| TaskState {
                pid: p.pid,
                status: containerd_client::types::v1::Status::try_from(p.status)
                    .map(|s| s.as_str_name().to_owned())
                    .unwrap_or_else(|_| format!("status {}", p.status)),
            })),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(anyhow!("Tasks.Get {id}: {}", status.message())),
        }
    }

    /// CRI CheckpointContainer at `endpoint`: containerd writes its checkpoint archive (a tar)
    /// at `location`.
    pub fn cri_checkpoint(&self, endpoint: &str, container_id: &str, location: &Path) -> Result<()> {
        let request = cri::CheckpointContainerRequest {
            container_id: container_id.to_owned(),
            location: location.to_string_lossy().into_owned(),
            timeout: 0,
        };
        self.block_on("CheckpointContainer", async move {
            let mut clients = podsnap_coordinator::cri::connect(endpoint).await?;
            clients
                .runtime
                .checkpoint_container(request)
                .await
                .map_err(|s| anyhow!("CheckpointContainer {container_id}: {}", s.message()))
        })?
        .map(|_| ())
    }
}
