//! The shim's process lifecycle (containerd's `start` and `delete` actions) and the making of
//! its task service. One shim process per pod: `start` groups a container with its pod by the
//! CRI sandbox id and hands back the running shim's address when there is one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::{Config, Flags, StartOpts};
use podsnap_runtime::bundle::{Bundle, PodIdentity};
use podsnap_runtime::runc::Runc;

use crate::events::Events;
use crate::exits::MonitorLauncher;
use crate::task::PodTask;

/// Where runc keeps state for podsnap containers, per containerd namespace.
pub const RUNC_ROOT: &str = "/run/podsnap/runc";

/// The shim process.
pub struct PodShim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

/// runc with podsnap's defaults for a containerd namespace.
pub fn default_runc(namespace: &str) -> Runc {
    Runc::new(
        "runc",
        Path::new(RUNC_ROOT).join(namespace),
        Arc::new(MonitorLauncher),
    )
}

#[async_trait]
impl Shim for PodShim {
    type T = PodTask;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs `start` in the container's bundle directory.
        let grouping = Bundle::new(".")
            .spec()
            .ok()
            .and_then(|spec| PodIdentity::from_spec(&spec).sandbox_id)
            .unwrap_or_else(|| opts.id.clone());
        let address = opts.socket_address(&grouping);
        if shim_answers(&address).await {
            log::info!("container {}: joins the shim of pod {grouping}", opts.id);
        } else {
            let spawned = spawn(opts, &grouping, Vec::new()).await?;
            debug_assert_eq!(spawned, address);
        }
        write_address(&address)?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // Called after the shim died: remove what it leaves behind for this container.
        let runc = default_runc(&self.namespace);
        if let Err(e) = runc.delete(&self.id, true).await {
            log::warn!(
                "container {}: runc delete --force after the shim went away: {e}",
                self.id
            );
        }
        let rootfs = PathBuf::from("rootfs");
        if let Ok(abs) = std::fs::canonicalize(&rootfs) {
            if let Some(path) = abs.to_str() {
                let _ = containerd_shim::mount::umount_recursive(Some(path), libc::MNT_DETACH);
            }
        }
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(containerd_shim::util::timestamp()?).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> PodTask {
        let task = PodTask::new(
            self.namespace.clone(),
            Events::new(publisher, self.namespace.clone()),
            self.exit.clone(),
        );
        task.watch_exits().await;
        task
    }
}

/// Whether a shim already serves at `address`.
async fn shim_answers(address: &str) -> bool {
    let path = address.trim_start_matches("unix://");
    tokio::net::UnixStream::connect(path).await.is_ok()
}

/// Writes the `address` file containerd reads back when it reconnects.
fn write_address(address: &str) -> containerd_shim::Result<()> {
    let tmp = "address.tmp";
    std::fs::write(tmp, address)
        .and_then(|_| std::fs::rename(tmp, "address"))
        .map_err(|e| containerd_shim::Error::IoError {
            context: "write the address file".into(),
            err: e,
        })
}
