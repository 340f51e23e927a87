//! The lifecycle of a created container and its processes: Start (or the restore Create
//! prepared), Delete, Kill, Exec, Pause and Resume, Update, and the queries (pids, stats).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use podsnap_runtime::cgroup::Stats;

use super::dump::pod_target;
use super::exit::Announcing;
use super::request::{ExecTask, KillTask, UpdateTask};
use super::Pod;
use crate::container::{write_private, Container};
use crate::error::{Error, Result};
use crate::oom;
use crate::options::validate_id;
use crate::process::{lock, Process, State, Status};
use crate::task_event::TaskEvent;

/// How long a deleted process's output may still drain into containerd's FIFOs.
const IO_DRAIN: Duration = Duration::from_secs(2);

impl Pod {
    /// Starts a container's init (or restores it) or an exec; returns its pid.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<i32> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        // An exit of the process (it can end at once) follows its TaskStart / TaskExecStarted.
        let announcing = Announcing::hold(self, &p);
        let restoring = exec_id.is_empty() && c.restore_pending();
        let pid = if exec_id.is_empty() {
            self.start_init(&c, restoring).await?
        } else {
            self.start_exec(&c, &p).await?
        };
        announcing.release().await;
        if let Some(code) = p.take_early_exit() {
            self.process_exited(&p, code).await;
        } else if let Some(code) = c.exited_plan().filter(|_| exec_id.is_empty()) {
            // A completed container of a restored pod: it "runs" and exits at once.
            self.process_exited(&c.init, code as i32).await;
        } else if restoring && lock(&self.pause_after_restore).remove(&c.id) {
            log::info!("container {}: paused at its checkpoint, paused again", c.id);
            self.pause(&c.id, true).await?;
        }
        Ok(pid)
    }

    /// Starts (or restores) a container's init process and publishes TaskStart.
    async fn start_init(&self, c: &Arc<Container>, restoring: bool) -> Result<i32> {
        // A Kill or Delete of the container waits until its start (a restore can take a while)
        // is over: it then finds the process it must end.
        let starting = c.starting.lock().await;
        let restoring_name = if restoring {
            lock(&self.restoring).remove(&c.id)
        } else {
            None
        };
        let started = c.start(&self.started, &self.exits).await;
        drop(starting);
        if let Some(name) = restoring_name {
            // Restored or failed, its restore is over (the pod's network waits for the last).
            let pids = match &started {
                Ok(_) => c.cgroups().and_then(|cg| cg.processes().ok()).unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            self.restores.restore_over(&name, &pids).await;
            if started.is_ok() {
                self.restores.mark_restored(&name);
            }
        }
        let pid = started?;
        if c.exited_plan().is_none() {
            if restoring {
                oom::watch(c, self.events.clone());
            }
            log::info!("container {}: started", c.id);
        }
        self.publish(TaskEvent::Start {
            container_id: c.id.clone(),
            pid: pid as u32,
        })
        .await;
        Ok(pid)
    }

    /// Starts an exec process and publishes TaskExecStarted.
    async fn start_exec(&self, c: &Arc<Container>, exec: &Arc<Process>) -> Result<i32> {
        let pid = c.start_exec(exec, &self.exits).await?;
        self.publish(TaskEvent::ExecStarted {
            container_id: c.id.clone(),
            exec_id: exec.exec_id.clone(),
            pid: pid as u32,
        })
        .await;
        Ok(pid)
    }

    /// Deletes an exec, or a container's task; returns the final state.
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<State> {
        let c = self.container(id)?;
        let _started = c.starting.lock().await;
        if !exec_id.is_empty() {
            let exec = c.process(exec_id)?;
            let s = exec.state();
            if s.status == Status::Running || s.status == Status::Paused {
                return Err(Error::FailedPrecondition(format!(
                    "cannot delete {}: it is still running",
                    exec.describe()
                )));
            }
            lock(&c.execs).remove(exec_id);
            self.exits.forget(s.pid);
            drain_io(&exec).await;
            return Ok(exec.state());
        }
        let s = c.init.state();
        if s.status == Status::Running || s.status == Status::Paused {
            return Err(Error::FailedPrecondition(format!(
                "cannot delete task {}: it is {}; kill it first",
                c.id,
                if s.status == Status::Running {
                    "running"
                } else {
                    "paused"
                }
            )));
        }
        // A created, never started container still has runc's init waiting: force removes it.
        let force = s.status == Status::Created;
        c.stop_lazy_pages();
        let has_runc_container = c.exited_plan().is_none() && !c.restore_pending();
        if !has_runc_container {
            // Nothing was created in runc.
        } else if let Err(e) = c.runc.delete(&c.id, force).await {
            if !e.to_string().contains("does not exist") {
                log::warn!("container {}: runc delete: {e}; forcing", c.id);
                c.runc
                    .delete(&c.id, true)
                    .await
                    .map_err(Error::runtime(format!("delete container {}", c.id)))?;
            }
        }
        if force {
            c.init.set_exited(128 + libc::SIGKILL);
        }
        c.forget_adopted_states();
        let execs: Vec<_> = lock(&c.execs).drain().map(|(_, p)| p).collect();
        for p in execs {
            p.io.abort().await;
        }
        drain_io(&c.init).await;
        if c.rootfs_mounted {
            self.factory.unmount_rootfs(&c.bundle.rootfs());
        }
        self.exits.forget(s.pid);
        let s = c.init.state();
        if !c.identity.is_sandbox && s.status == Status::Stopped {
            let mut t = pod_target(&c);
            t.spec = std::fs::read(c.bundle.config_path()).ok();
            if t.spec.is_some() {
                lock(&self.departed).insert(t.entry.name.clone(), t);
            }
        }
        let now_empty = {
            let mut containers = lock(&self.containers);
            containers.remove(&c.id);
            containers.is_empty()
        };
        log::info!("container {}: deleted (exit status {})", c.id, s.exit_code);
        self.publish(TaskEvent::Delete {
            container_id: c.id.clone(),
            pid: s.pid as u32,
            exit_status: s.exit_code,
            exited_at: s.exited_at,
        })
        .await;
        if now_empty && self.shutdown_asked.load(Ordering::SeqCst) {
            // containerd asked the shim to go when it deleted the sandbox's task, before this
            // last container's: go now.
            log::info!("no containers left: shim exits");
            self.exit.signal();
        }
        Ok(s)
    }

    pub async fn kill(&self, req: KillTask) -> Result<()> {
        let c = self.container(&req.id)?;
        let _started = c.starting.lock().await;
        let p = c.process(&req.exec_id)?;
        let s = p.state();
        if s.status == Status::Stopped && !req.all {
            return Err(Error::NotFound(format!(
                "{}: process already finished",
                p.describe()
            )));
        }
        if req.exec_id.is_empty() {
            c.runc.kill(&c.id, req.signal, req.all).await.map_err(|e| {
                if c.init.state().status == Status::Stopped {
                    Error::NotFound(format!("container {}: process already finished", c.id))
                } else {
                    Error::runtime(format!("kill container {}", c.id))(e)
                }
            })?;
            if req.signal == libc::SIGKILL as u32 {
                thaw_after_kill(&c);
            }
            return Ok(());
        }
        let signal = nix::sys::signal::Signal::try_from(req.signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("signal {} is not a signal", req.signal)))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid), signal)
            .map_err(|e| Error::NotFound(format!("{}: {e}", p.describe())))
    }

    pub async fn exec(&self, req: ExecTask) -> Result<()> {
        let c = self.container(&req.id)?;
        validate_id(&req.exec_id)?;
        let spec = req
            .spec
            .ok_or_else(|| Error::InvalidArgument(format!("exec {} has no process spec", req.exec_id)))?;
        c.add_exec(&req.exec_id, req.stdio, spec)?;
        self.publish(TaskEvent::ExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id,
        })
        .await;
        Ok(())
    }

    /// Pauses (`pause`) or resumes a container.
    pub async fn pause(&self, id: &str, pause: bool) -> Result<()> {
        let c = self.container(id)?;
        let status = c.init.state().status;
        let want = if pause { Status::Paused } else { Status::Running };
        if status == Status::Stopped || status == Status::Created {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is {status:?}: it cannot be {}",
                if pause { "paused" } else { "resumed" }
            )));
        }
        if pause {
            c.runc
                .pause(id)
                .await
                .map_err(Error::runtime(format!("pause container {id}")))?;
        } else {
            c.runc
                .resume(id)
                .await
                .map_err(Error::runtime(format!("resume container {id}")))?;
        }
        c.init.set_status(want);
        let container_id = id.to_string();
        self.publish(if pause {
            TaskEvent::Paused { container_id }
        } else {
            TaskEvent::Resumed { container_id }
        })
        .await;
        Ok(())
    }

    /// The processes of a container: pid, and the exec id of those that are execs.
    pub async fn pids(&self, id: &str) -> Result<Vec<(i32, Option<String>)>> {
        let c = self.container(id)?;
        let pids = c
            .runc
            .ps(id)
            .await
            .map_err(Error::runtime(format!("list processes of {id}")))?;
        let execs: Vec<(i32, String)> = lock(&c.execs)
            .values()
            .map(|p| (p.state().pid, p.exec_id.clone()))
            .collect();
        Ok(pids
            .into_iter()
            .map(|pid| {
                let exec_id = execs.iter().find(|(p, _)| *p == pid).map(|(_, e)| e.clone());
                (pid, exec_id)
            })
            .collect())
    }

    pub async fn update(&self, req: UpdateTask) -> Result<()> {
        let c = self.container(&req.id)?;
        let (type_url, resources) = req
            .resources
            .ok_or_else(|| Error::InvalidArgument(format!("update of {} carries no resources", req.id)))?;
        if serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources).is_err() {
            return Err(Error::InvalidArgument(format!(
                "update of {}: resources ({type_url}) are not OCI LinuxResources JSON",
                req.id
            )));
        }
        // One Update of a container at a time: two at once would share the file (one runc
        // reading the other's resources, or none after the first removed it).
        let _one = c.updating.lock().await;
        let file = c.bundle.path().join(".update-resources.json");
        write_private(&file, &resources).await?;
        let res = c.runc.update(&c.id, &file).await;
        let _ = tokio::fs::remove_file(&file).await;
        res.map_err(Error::runtime(format!("update container {}", c.id)))
    }

    pub async fn stats(&self, id: &str) -> Result<Stats> {
        let c = self.container(id)?;
        let cgroups = c
            .cgroups()
            .ok_or_else(|| Error::NotFound(format!("cgroups of container {id}")))?;
        let stats = tokio::task::spawn_blocking(move || cgroups.stats())
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        if !stats.missing().is_empty() && c.first_stats_gap() {
            log::warn!(
                "container {id}: its cgroup has no {} (controller not enabled for it): those stats are left out \
                 (logged once)",
                stats.missing().join(", ")
            );
        }
        Ok(stats)
    }

    pub fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        let pty = lock(&p.pty).clone();
        let pty =
            pty.ok_or_else(|| Error::FailedPrecondition(format!("{} has no terminal", p.describe())))?;
        podsnap_runtime::stdio::resize(&std::os::fd::AsFd::as_fd(&pty), width as u16, height as u16)
            .map_err(Error::runtime(format!("resize the terminal of {}", p.describe())))
    }

    pub fn close_io(&self, id: &str, exec_id: &str, stdin: bool) -> Result<()> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if stdin {
            p.io.close_input();
        }
        Ok(())
    }

    /// Waits for a process's exit.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<State> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        Ok(p.wait().await)
    }
}

/// Lets a process's output drain into containerd's FIFOs for a moment, then lets go of them.
async fn drain_io(p: &Process) {
    if tokio::time::timeout(IO_DRAIN, p.io.shutdown()).await.is_err() {
        p.io.abort().await;
    }
}

/// A SIGKILL for a paused container on cgroup v1 waits in its frozen processes until the
/// freezer thaws. runc thaws after its own SIGKILL of a paused container's init, but not after
/// writing `cgroup.kill` (runc 1.2+ on a hybrid node, for `kill --all` and for a container
/// sharing the pod's PID namespace): the container never exited and StopPodSandbox hung. So a
/// container still frozen after SIGKILL is thawed here, and its processes die.
fn thaw_after_kill(c: &Container) {
    let Some(cgroups) = c.cgroups() else { return };
    if !cgroups.v1_frozen() {
        return;
    }
    log::info!(
        "container {}: thawing its frozen cgroup so the SIGKILL takes effect",
        c.id
    );
    if let Err(e) = cgroups.set_frozen(false) {
        log::warn!("container {}: thaw after SIGKILL: {e}", c.id);
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim::asynchronous::io::Stdio;

    use super::*;
    use crate::options::RuncChoice;
    use crate::pod::fake::FakePod;
    use crate::pod::request::CreateTask;

    async fn created(f: &FakePod, id: &str, annotations: serde_json::Value) -> Arc<Container> {
        let bundle = f.bundle(id, annotations);
        f.pod
            .create(CreateTask {
                id: id.into(),
                bundle,
                rootfs: Vec::new(),
                stdio: Stdio::default(),
                checkpoint: String::new(),
                runc: Box::new(|| Ok((RuncChoice::default_for("test"), Default::default()))),
            })
            .await
            .expect("created");
        f.pod.container(id).expect("registered")
    }

    fn app() -> serde_json::Value {
        serde_json::json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": "app",
            "io.kubernetes.cri.sandbox-id": "pod1",
        })
    }

    #[tokio::test]
    async fn a_running_task_is_not_deleted() {
        let f = FakePod::new();
        let c = created(&f, "c1", app()).await;
        c.init.set_status(Status::Running);
        let e = f.pod.delete("c1", "").await.expect_err("running").to_string();
        assert!(
            e.contains("cannot delete task c1: it is running; kill it first"),
            "{e}"
        );
        assert!(f.pod.container("c1").is_ok(), "still registered");
    }

    #[tokio::test]
    async fn a_stopped_app_is_recorded_as_departed_and_the_shim_exits_with_the_last() {
        let f = FakePod::new();
        let c = created(&f, "c1", app()).await;
        c.init.set_status(Status::Running);
        f.pod.process_exited(&c.init, 0).await;
        f.pod.shutdown("sandbox", false);
        assert!(!f.exit_signalled(), "a container is left");
        f.pod.delete("c1", "").await.expect("deleted");
        assert_eq!(f.events.kinds(), ["create", "exit", "delete"]);
        assert_eq!(lock(&f.pod.departed).keys().cloned().collect::<Vec<_>>(), ["app"]);
        assert_eq!(f.pod.container_count(), 0);
        assert!(f.exit_signalled(), "the shim goes with the last container");
    }

    #[tokio::test]
    async fn an_exec_needs_a_running_container_and_a_process_spec() {
        let f = FakePod::new();
        created(&f, "c1", app()).await;
        let exec = |spec: Option<Vec<u8>>| ExecTask {
            id: "c1".into(),
            exec_id: "e1".into(),
            stdio: Stdio::default(),
            spec,
        };
        let e = f.pod.exec(exec(None)).await.expect_err("no spec").to_string();
        assert!(e.contains("exec e1 has no process spec"), "{e}");
        let e = f
            .pod
            .exec(exec(Some(b"{}".to_vec())))
            .await
            .expect_err("created")
            .to_string();
        assert!(e.contains("cannot exec in container c1: it is Created"), "{e}");
        assert_eq!(f.events.kinds(), ["create"]);
    }

    #[tokio::test]
    async fn an_update_without_oci_resources_is_refused_before_runc() {
        let f = FakePod::new();
        created(&f, "c1", app()).await;
        let e = f
            .pod
            .update(UpdateTask {
                id: "c1".into(),
                resources: Some(("example/T".into(), b"not json".to_vec())),
            })
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("update of c1: resources (example/T) are not OCI LinuxResources JSON"),
            "{e}"
        );
    }
}
