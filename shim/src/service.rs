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

use crate::events::Events;
use crate::exits::MonitorLauncher;
use crate::options::RuncChoice;
use crate::task::PodTask;

/// The shim process.
pub struct PodShim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for PodShim {
    type T = PodTask;

    fn runtime_info(
        runtime_id: &str,
        options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
    ) -> containerd_shim::Result<containerd_shim::protos::types::introspection::RuntimeInfo> {
        crate::info::runtime_info(runtime_id, options)
    }

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
            // A new shim for the pod: if the last one died in the middle of a pod dump, undo
            // what that dump left (frozen containers, staging output, the network lock), or
            // finish it once its checkpoint was committed.
            // (No reaper runs during `start`: programs are waited for by tokio here.)
            recover_dead_dump(&podsnap_runtime::launcher::TokioLauncher, &grouping).await;
            let spawned = spawn(opts, &grouping, Vec::new()).await?;
            debug_assert_eq!(spawned, address);
        }
        write_address(&address)?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // Called after the shim died, in the container's bundle: remove what it leaves behind,
        // with the runc (and runc root) Create recorded there. First whatever a pod dump
        // running in the dead shim left: a frozen container would not even die.
        let pod = Bundle::new(".")
            .spec()
            .ok()
            .and_then(|spec| PodIdentity::from_spec(&spec).sandbox_id)
            .unwrap_or_else(|| self.id.clone());
        recover_dead_dump(&MonitorLauncher, &pod).await;
        // The dead shim's leases on checkpoints (it held them while it ran) are stale now.
        let pruned =
            podsnap_checkpoint::node::lease::prune(Path::new(podsnap_checkpoint::node::lease::LEASE_DIR));
        if pruned > 0 {
            log::info!("pod {pod}: released {pruned} stale checkpoint leases");
        }
        // The pod is gone: so is the checkpoint pulled for it (an `oci://` restore).
        remove_pulled_for(&pod).await;
        let choice = match RuncChoice::recorded(Path::new(".")) {
            Ok(Some(choice)) => choice,
            Ok(None) => RuncChoice::default_for(&self.namespace),
            Err(e) => {
                log::warn!(
                    "container {}: cannot read its runc record: {e}; using podsnap's runc root",
                    self.id
                );
                RuncChoice::default_for(&self.namespace)
            }
        };
        // containerd runs `delete` once for a dead shim, with the shim's own id (the pod's
        // sandbox): the pod's other containers, whose shim this was too, go with it, apps first.
        let runc = choice.runc();
        let mut members = pod_members(&choice.root, &pod);
        members.retain(|(id, _)| id != &self.id);
        members.push((self.id.clone(), std::env::current_dir().unwrap_or_default()));
        for (id, bundle) in members {
            if let Err(e) = runc.delete(&id, true).await {
                log::warn!("container {id}: runc delete --force after the shim went away: {e}");
            }
            if let Ok(abs) = std::fs::canonicalize(bundle.join("rootfs")) {
                if let Some(path) = abs.to_str() {
                    let _ = containerd_shim::mount::umount_recursive(Some(path), libc::MNT_DETACH);
                }
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
        // The pod is gone with this shim: the checkpoints it was restored from are free.
        let released = podsnap_checkpoint::node::lease::release_own(Path::new(
            podsnap_checkpoint::node::lease::LEASE_DIR,
        ));
        if released > 0 {
            log::info!("pod {}: released {released} checkpoint leases", self.id);
        }
        // And the checkpoint pulled for it (an `oci://` restore) with them.
        remove_pulled_for(&self.id).await;
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

/// Removes the checkpoint pulled into the node's checkpoint root for pod `sandbox`, if any.
async fn remove_pulled_for(sandbox: &str) {
    match podsnap_checkpoint::config::NodeConfig::load() {
        Ok(config) => {
            let (root, sandbox) = (config.checkpoint_root(), sandbox.to_owned());
            let _ = tokio::task::spawn_blocking(move || crate::restore::remove_pulled(&root, &sandbox)).await;
        }
        Err(e) => log::warn!("pod {sandbox}: a checkpoint pulled for it may stay in the root: {e}"),
    }
}

/// Undoes what a pod dump of `pod` left if the shim running it died (see
/// `podsnap_checkpoint::pod::dump::journal`).
async fn recover_dead_dump(launcher: &dyn podsnap_runtime::launcher::Launcher, pod: &str) {
    let path = podsnap_checkpoint::pod::dump::journal::journal_path(pod);
    match podsnap_checkpoint::pod::dump::journal::recover(launcher, &path).await {
        Ok(done) if done.owner_alive => {
            log::info!("pod {pod}: a dump is in progress in a live shim; left alone")
        }
        Ok(done) if !done.thawed.is_empty() || done.removed.is_some() || done.kept.is_some() => log::warn!(
            "pod {pod}: its last shim died during a pod dump: kept the checkpoint {:?}, stopped {} of the pod's processes at it, thawed {:?}, removed {:?}",
            done.kept,
            done.stopped,
            done.thawed,
            done.removed
        ),
        Ok(_) => {}
        Err(e) => log::error!("pod {pod}: recovering from a dead pod dump: {e}"),
    }
}

/// The containers of pod `pod` that runc knows under `root`: (id, bundle), from runc's state
/// (runc keeps the spec's annotations and the bundle as labels; containerd may have removed
/// the bundles of a dead shim's tasks already).
fn pod_members(root: &Path, pod: &str) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let sandbox_label = format!("{}={pod}", podsnap_runtime::bundle::SANDBOX_ID);
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        let Ok(state) = std::fs::read(entry.path().join("state.json")) else {
            continue;
        };
        let Ok(state) = serde_json::from_slice::<serde_json::Value>(&state) else {
            continue;
        };
        let labels: Vec<&str> = state["config"]["labels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str())
            .collect();
        if !labels.contains(&sandbox_label.as_str()) && id != pod {
            continue;
        }
        let bundle = labels
            .iter()
            .find_map(|l| l.strip_prefix("bundle="))
            .map(PathBuf::from)
            .unwrap_or_default();
        out.push((id, bundle));
    }
    out
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
