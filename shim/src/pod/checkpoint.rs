//! Checkpoint: of one container (CRIU through runc), or of the whole pod when asked on its
//! sandbox. The pod's dump (`dump.rs`) runs in a task of its own holding the lifecycle gate
//! whole: if the request is dropped (its caller gave up), the dump is told to stop and cleans
//! up (thaws, removes its output) instead of being cut off half-way.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use podsnap_checkpoint::criu::container::{Dump, DumpOptions};
use podsnap_checkpoint::pod::dump::Target;

use super::dump::{self, PodCheckpoint};
use super::request::CheckpointTask;
use super::Pod;
use crate::container::Container;
use crate::error::{Error, Result};
use crate::process::{lock, Status};
use crate::task_event::TaskEvent;

/// Sends the pod dump its cancel when dropped: the request was given up, or the dump is over.
struct GiveUp(tokio::sync::watch::Sender<bool>);

impl Drop for GiveUp {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

impl Pod {
    /// Checkpoints container `id` (the pod when it is the sandbox) as `req` asks (its parse
    /// error, if any, is answered after the container is found). `within`: what is left of
    /// the caller's deadline.
    pub async fn checkpoint(
        &self,
        id: &str,
        req: Result<CheckpointTask>,
        within: Option<Duration>,
    ) -> Result<()> {
        let c = self.container(id)?;
        let opts = req?;
        if c.identity.is_sandbox {
            return self
                .checkpoint_pod(&c, PathBuf::from(&opts.image_dir), &opts, within)
                .await;
        }
        let _pod = self.gate.enter("Checkpoint", id).await?;
        let status = c.init.state().status;
        if status != Status::Running && status != Status::Paused {
            return Err(Error::FailedPrecondition(format!(
                "container {} is {status:?}: only a running or paused container can be checkpointed",
                c.id
            )));
        }
        let _busy = c.claim()?;
        podsnap_checkpoint::criu::hold::clear(c.bundle.path());
        let image_dir = opts.image_dir;
        let dump = Dump {
            id: c.id.clone(),
            image_dir: PathBuf::from(&image_dir),
            work_dir: opts.work_dir,
            options: DumpOptions {
                tcp_established: opts.open_tcp,
                external_unix_sockets: opts.external_unix_sockets,
                shell_job: opts.terminal || c.init.stdio.terminal,
                file_locks: opts.file_locks,
                empty_namespaces: opts.empty_namespaces,
                cgroups_mode: opts.cgroups_mode,
                criu_in_netns: false,
                masked_tmpfs_external: false,
                cgroup_tmpfs: Vec::new(),
                lazy_pages: false,
            },
            leave_running: !opts.exit,
            cgroups: c.cgroups(),
            was_paused: status == Status::Paused,
            limit: podsnap_runtime::launcher::Limit {
                deadline: within.map(|d| tokio::time::Instant::now() + d),
                ..Default::default()
            },
            netns: None,
            serve: None,
        };
        let started = std::time::Instant::now();
        podsnap_checkpoint::criu::container::dump(&c.runc, &dump)
            .await
            .inspect_err(|e| {
                log::error!("container {}: {e}", c.id);
            })?;
        log::info!(
            "container {}: checkpointed to {image_dir} in {:?}{}",
            c.id,
            started.elapsed(),
            if opts.exit { ", exiting" } else { "" }
        );
        self.publish(TaskEvent::Checkpointed {
            container_id: c.id.clone(),
            checkpoint: image_dir,
        })
        .await;
        Ok(())
    }

    /// Checkpoints the whole pod (asked on its sandbox task).
    async fn checkpoint_pod(
        &self,
        sandbox: &Arc<Container>,
        dest: PathBuf,
        opts: &CheckpointTask,
        within: Option<Duration>,
    ) -> Result<()> {
        let release = self.gate.claim(&sandbox.id)?;
        let config = podsnap_checkpoint::config::NodeConfig::load()?;
        let annotations = sandbox.bundle.spec().ok().and_then(|s| s.annotations().clone());
        let deadline = config
            .dump
            .deadline(
                annotations
                    .as_ref()
                    .and_then(|a| a.get(podsnap_checkpoint::config::DUMP_DEADLINE_ANNOTATION))
                    .map(String::as_str),
                within,
            )
            .map_err(Error::InvalidArgument)?;
        // Which persistent volumes to carry and the group dumped at one instant: the caller's
        // request beside the destination (the volumes: or the pod's annotation).
        let asked = podsnap_checkpoint::pod::dump::asked(
            &dest,
            &annotations
                .clone()
                .map(|a| a.into_iter().collect())
                .unwrap_or_default(),
        )?;
        // Lifecycle calls in flight finish first; new ones wait for the dump.
        let lifecycle = self.gate.exclusive(&sandbox.id).await?;
        let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
        let give_up = GiveUp(cancel_tx);
        let containers: Vec<Arc<Container>> = lock(&self.containers).values().cloned().collect();
        let departed: Vec<Target> = lock(&self.departed).values().cloned().collect();
        let request = PodCheckpoint {
            dest: dest.clone(),
            stop: opts.exit,
            keep_tcp: opts.open_tcp,
            deadline,
            cancel: Some(cancel_rx),
            reserve_bytes: config.dump.reserve_bytes,
            carry: asked.carry,
            carry_max_bytes: config.dump.carry_max_bytes(),
            group: asked.group,
            network_lock: config.dump.network_lock,
            hold_network: asked.hold_network,
            digests: config.dump.digests,
            root: config.checkpoint_root(),
            retention: config.retention.clone(),
            serve: asked.serve,
        };
        let sandbox_task = sandbox.clone();
        let dump = tokio::spawn(async move {
            let done = dump::checkpoint(&sandbox_task, &containers, departed, &request).await;
            drop(lifecycle);
            drop(release);
            done
        });
        let done = dump
            .await
            .map_err(|e| Error::Internal(format!("the pod dump task failed: {e}")))?;
        drop(give_up); // the dump is over: nothing left to cancel
        done?;
        self.publish(TaskEvent::Checkpointed {
            container_id: sandbox.id.clone(),
            checkpoint: dest.display().to_string(),
        })
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_up_request_tells_the_dump_to_stop() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let give_up = GiveUp(tx);
        assert!(!*rx.borrow());
        drop(give_up);
        assert!(*rx.borrow(), "the dump sees the cancel");
    }
}
