//! containerd's task API (v3) over ttrpc: a thin adapter from protobuf messages to the pod's
//! containers and processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use containerd_shim::asynchronous::io::Stdio;
use containerd_shim::asynchronous::monitor::monitor_subscribe;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::monitor::{Subject, Topic};
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::shim::oci::{CheckpointOptions, ProcessDetails};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::types::task::{ProcessInfo, Status as ApiStatus};
use containerd_shim::{TtrpcContext, TtrpcResult};
use podsnap_checkpoint::container::{Dump, DumpOptions};
use podsnap_checkpoint::dump::Target;
use podsnap_runtime::bundle::{Bundle, PodIdentity};
use podsnap_runtime::cgroup::Stats;

use crate::container::{write_private, Container, CreateParams, RestoreSource};
use crate::error::{Error, Result};
use crate::events::{self, Events};
use crate::exits::ExitRouter;
use crate::metrics;
use crate::oom;
use crate::options::{runc_from_options, validate_id};
use crate::pod::dump::{self, pod_target, PodCheckpoint};
use crate::process::{lock, Process, Status};
use crate::restore::{NewContainer, Plan, RestorePlan, Restores};

/// How long a lifecycle call waits for a pod dump in progress before it answers busy.
const LIFECYCLE_WAIT: Duration = Duration::from_secs(30);

/// How long a deleted process's output may still drain into containerd's FIFOs.
const IO_DRAIN: Duration = Duration::from_secs(2);

/// The task service of one pod's shim.
#[derive(Clone)]
pub struct PodTask {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    events: Arc<Events>,
    exit: Arc<ExitSignal>,
    containers: Mutex<BTreeMap<String, Arc<Container>>>,
    exits: ExitRouter,
    created: AtomicU64,
    started: AtomicU64,
    /// Held while a pod checkpoint runs.
    pod_busy: std::sync::atomic::AtomicBool,
    /// The pod's lifecycle lock: a pod dump holds it exclusively; Create, Start, Kill,
    /// Pause, Resume, Update, Exec, Delete and container checkpoints share it.
    pod_lock: Arc<tokio::sync::RwLock<()>>,
    restores: Restores,
    /// Containers of the pod whose tasks were deleted after they exited (completed init
    /// containers): a pod checkpoint records them. By name; the newest wins.
    departed: Mutex<BTreeMap<String, Target>>,
    /// containerd asked the shim to exit while containers were left: it exits with the last.
    shutdown_asked: std::sync::atomic::AtomicBool,
    /// Containers being restored (id -> name in the pod): marked restored once they are.
    restoring: Mutex<BTreeMap<String, String>>,
    /// Containers that were paused at their checkpoint: paused again once restored.
    pause_after_restore: Mutex<std::collections::HashSet<String>>,
}

impl PodTask {
    pub fn new(namespace: String, events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace,
                events: Arc::new(events),
                exit,
                containers: Mutex::new(BTreeMap::new()),
                exits: ExitRouter::default(),
                created: AtomicU64::new(0),
                started: AtomicU64::new(0),
                pod_busy: std::sync::atomic::AtomicBool::new(false),
                pod_lock: Arc::new(tokio::sync::RwLock::new(())),
                restores: Restores::default(),
                departed: Mutex::new(BTreeMap::new()),
                pause_after_restore: Mutex::new(std::collections::HashSet::new()),
                restoring: Mutex::new(BTreeMap::new()),
                shutdown_asked: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Starts routing child exits to the pod's processes.
    pub async fn watch_exits(&self) {
        let mut sub = match monitor_subscribe(Topic::All).await {
            Ok(sub) => sub,
            Err(e) => {
                log::error!("cannot watch process exits: {e}");
                return;
            }
        };
        let inner = self.inner.clone();
        tokio::spawn(async move {
            while let Some(ev) = sub.rx.recv().await {
                if let Subject::Pid(pid) = ev.subject {
                    if let Some(p) = inner.exits.exited(pid, ev.exit_code) {
                        inner.process_exited(&p, ev.exit_code).await;
                    }
                }
            }
        });
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.inner.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    async fn do_create(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        let id = req.id.clone();
        validate_id(&id)?;
        if lock(&self.inner.containers).contains_key(&id) {
            return Err(Error::AlreadyExists(format!("container {id}")));
        }
        let (choice, flags) = runc_from_options(&self.inner.namespace, req.options.as_ref())?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = Bundle::new(&bundle)
            .spec()
            .map_err(Error::runtime(format!("create container {id}")))?;
        let identity = PodIdentity::from_spec(&spec);
        let layers = rootfs_layers(&req.rootfs);
        // Decide before anything exists: a bad or forbidden checkpoint is refused here.
        let plan = if req.checkpoint.is_empty() {
            self.inner
                .restores
                .plan(&NewContainer {
                    spec: &spec,
                    identity: &identity,
                    layers: &layers,
                })
                .await?
        } else {
            let image_dir = PathBuf::from(&req.checkpoint);
            let options = podsnap_checkpoint::container::inspect(&image_dir)?;
            Plan::Restore(Box::new(RestorePlan {
                image_dir,
                options,
                rootfs_changes: None,
                volumes: Vec::new(),
                sysv_ipc: None,
                started_order: None,
                name: None,
                paused: false,
                lazy: None,
                unix_ends: Vec::new(),
                adopted: Vec::new(),
            }))
        };
        // From the checkpoint (by name, kubelet path): once restored (at Start) or answered as
        // exited (now), the next Create of that name is a restart.
        let (restored_name, restoring_name) = match &plan {
            Plan::Restore(p) => (None, p.name.clone()),
            Plan::Exited(_) => (identity.name.clone(), None),
            Plan::Fresh => (None, None),
        };
        // Before runc runs: `delete` after a shim died must find the container where it is.
        choice.record(&bundle).await?;
        let rootfs = bundle.join("rootfs");
        let mounted = !req.rootfs.is_empty();
        if mounted {
            mount_rootfs(&req.rootfs, &rootfs).await?;
        }
        let params = CreateParams {
            id: id.clone(),
            bundle: bundle.clone(),
            stdio: Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            runc: choice.runc(),
            flags,
            rootfs_mounted: mounted,
            created_order: self
                .inner
                .created
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                + 1,
            rootfs_layers: layers,
        };
        let created = match plan {
            Plan::Fresh => Container::create(params, &self.inner.exits).await,
            Plan::Exited(code) => {
                log::info!(
                    "container {id}: completed in its checkpoint (exit {code}); it will not run again"
                );
                Container::exited(params, code)
            }
            Plan::Restore(plan) => match self.inner.restores.prepare_files(&plan, &rootfs).await {
                Ok(()) => {
                    if plan.paused {
                        lock(&self.inner.pause_after_restore).insert(id.clone());
                    }
                    log::info!(
                        "container {id}: will be restored from {}",
                        plan.image_dir.display()
                    );
                    Container::prepare_restore(
                        params,
                        RestoreSource {
                            image_dir: plan.image_dir,
                            options: plan.options,
                            started_order: plan.started_order,
                            lazy: plan.lazy,
                            unix_ends: plan.unix_ends,
                            adopted: plan.adopted,
                        },
                    )
                }
                Err(e) => Err(e),
            },
        };
        let container = match created {
            Ok(c) => c,
            Err(e) => {
                if mounted {
                    unmount_rootfs(&rootfs);
                }
                log::error!("container {id}: create failed: {e}");
                return Err(e);
            }
        };
        let pid = container.init.state().pid;
        log::info!(
            "container {id}: created, pid {pid}, pod {:?} ({})",
            container.identity.sandbox_id,
            if container.identity.is_sandbox {
                "sandbox"
            } else {
                "container"
            }
        );
        lock(&self.inner.containers).insert(id.clone(), container.clone());
        // The init's exit (it can die before it is started) follows TaskCreate.
        let announcing = Announcing::hold(&self.inner, &container.init);
        if let Some(name) = restored_name {
            self.inner.restores.mark_restored(&name);
        }
        if let Some(name) = restoring_name {
            lock(&self.inner.restoring).insert(id.clone(), name);
        }
        if !container.restore_pending() && container.exited_plan().is_none() {
            oom::watch(&container, self.inner.events.clone());
        }
        self.inner
            .publish(
                events::CREATE,
                Box::new(TaskCreate {
                    container_id: id,
                    bundle: req.bundle,
                    rootfs: req.rootfs,
                    io: Some(TaskIO {
                        stdin: req.stdin,
                        stdout: req.stdout,
                        stderr: req.stderr,
                        terminal: req.terminal,
                        ..Default::default()
                    })
                    .into(),
                    checkpoint: req.checkpoint,
                    pid: pid as u32,
                    ..Default::default()
                }),
            )
            .await;
        announcing.release().await;
        if let Some(code) = container.init.take_early_exit() {
            self.inner.process_exited(&container.init, code).await;
        }
        Ok(api::CreateTaskResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn do_start(&self, req: api::StartRequest) -> Result<api::StartResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        // An exit of the process (it can end at once) follows its TaskStart / TaskExecStarted.
        let announcing = Announcing::hold(&self.inner, &p);
        let restoring = req.exec_id.is_empty() && c.restore_pending();
        let pid = if req.exec_id.is_empty() {
            self.start_init(&c, restoring).await?
        } else {
            self.start_exec(&c, &p).await?
        };
        announcing.release().await;
        if let Some(code) = p.take_early_exit() {
            self.inner.process_exited(&p, code).await;
        } else if let Some(code) = c.exited_plan().filter(|_| req.exec_id.is_empty()) {
            // A completed container of a restored pod: it "runs" and exits at once.
            self.inner.process_exited(&c.init, code as i32).await;
        } else if restoring && lock(&self.inner.pause_after_restore).remove(&c.id) {
            log::info!("container {}: paused at its checkpoint, paused again", c.id);
            self.do_pause(&c.id, true).await?;
        }
        Ok(api::StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    /// Starts (or restores) a container's init process and publishes TaskStart.
    async fn start_init(&self, c: &Arc<Container>, restoring: bool) -> Result<i32> {
        // A Kill or Delete of the container waits until its start (a restore can take a while)
        // is over: it then finds the process it must end.
        let starting = c.starting.lock().await;
        let restoring_name = if restoring {
            lock(&self.inner.restoring).remove(&c.id)
        } else {
            None
        };
        let started = c.start(&self.inner.started, &self.inner.exits).await;
        drop(starting);
        if let Some(name) = restoring_name {
            // Restored or failed, its restore is over (the pod's network waits for the last).
            self.inner.restores.restore_over(&name).await;
            if started.is_ok() {
                self.inner.restores.mark_restored(&name);
            }
        }
        let pid = started?;
        if c.exited_plan().is_none() {
            if restoring {
                oom::watch(c, self.inner.events.clone());
            }
            log::info!("container {}: started", c.id);
        }
        self.inner
            .publish(
                events::START,
                Box::new(TaskStart {
                    container_id: c.id.clone(),
                    pid: pid as u32,
                    ..Default::default()
                }),
            )
            .await;
        Ok(pid)
    }

    /// Starts an exec process and publishes TaskExecStarted.
    async fn start_exec(&self, c: &Arc<Container>, exec: &Arc<Process>) -> Result<i32> {
        let pid = c.start_exec(exec, &self.inner.exits).await?;
        self.inner
            .publish(
                events::EXEC_STARTED,
                Box::new(TaskExecStarted {
                    container_id: c.id.clone(),
                    exec_id: exec.exec_id.clone(),
                    pid: pid as u32,
                    ..Default::default()
                }),
            )
            .await;
        Ok(pid)
    }

    async fn do_delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        let c = self.container(&req.id)?;
        let _started = c.starting.lock().await;
        if !req.exec_id.is_empty() {
            let exec = c.process(&req.exec_id)?;
            let s = exec.state();
            if s.status == Status::Running || s.status == Status::Paused {
                return Err(Error::FailedPrecondition(format!(
                    "cannot delete {}: it is still running",
                    exec.describe()
                )));
            }
            lock(&c.execs).remove(&req.exec_id);
            self.inner.exits.forget(s.pid);
            drain_io(&exec).await;
            return Ok(delete_response(exec.state()));
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
            unmount_rootfs(&c.bundle.rootfs());
        }
        self.inner.exits.forget(s.pid);
        let s = c.init.state();
        if !c.identity.is_sandbox && s.status == Status::Stopped {
            let mut t = pod_target(&c);
            t.spec = std::fs::read(c.bundle.config_path()).ok();
            if t.spec.is_some() {
                lock(&self.inner.departed).insert(t.entry.name.clone(), t);
            }
        }
        let now_empty = {
            let mut containers = lock(&self.inner.containers);
            containers.remove(&c.id);
            containers.is_empty()
        };
        log::info!("container {}: deleted (exit status {})", c.id, s.exit_code);
        self.inner
            .publish(
                events::DELETE,
                Box::new(TaskDelete {
                    container_id: c.id.clone(),
                    pid: s.pid as u32,
                    exit_status: s.exit_code,
                    exited_at: Some(timestamp(s.exited_at)).into(),
                    id: c.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        if now_empty
            && self
                .inner
                .shutdown_asked
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            // containerd asked the shim to go when it deleted the sandbox's task, before this
            // last container's: go now.
            log::info!("no containers left: shim exits");
            self.inner.exit.signal();
        }
        Ok(delete_response(s))
    }

    async fn do_kill(&self, req: api::KillRequest) -> Result<()> {
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

    async fn do_exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        validate_id(&req.exec_id)?;
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| Error::InvalidArgument(format!("exec {} has no process spec", req.exec_id)))?;
        c.add_exec(
            &req.exec_id,
            Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            spec,
        )?;
        self.inner
            .publish(
                events::EXEC_ADDED,
                Box::new(TaskExecAdded {
                    container_id: c.id.clone(),
                    exec_id: req.exec_id,
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    async fn do_pause(&self, id: &str, pause: bool) -> Result<()> {
        let c = self.container(id)?;
        let status = c.init.state().status;
        let (want, topic): (Status, &str) = if pause {
            (Status::Paused, events::PAUSED)
        } else {
            (Status::Running, events::RESUMED)
        };
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
        let event: Box<dyn MessageDyn> = if pause {
            Box::new(TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            })
        } else {
            Box::new(TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            })
        };
        self.inner.publish(topic, event).await;
        Ok(())
    }

    async fn do_pids(&self, id: &str) -> Result<api::PidsResponse> {
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
        let mut processes = Vec::with_capacity(pids.len());
        for pid in pids {
            let mut info = ProcessInfo {
                pid: pid as u32,
                ..Default::default()
            };
            if let Some((_, exec_id)) = execs.iter().find(|(p, _)| *p == pid) {
                let details = ProcessDetails {
                    exec_id: exec_id.clone(),
                    ..Default::default()
                };
                info.info = Some(to_any(&details)?).into();
            }
            processes.push(info);
        }
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn do_update(&self, req: api::UpdateTaskRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument(format!("update of {} carries no resources", req.id)))?;
        if serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources.value).is_err() {
            return Err(Error::InvalidArgument(format!(
                "update of {}: resources ({}) are not OCI LinuxResources JSON",
                req.id, resources.type_url
            )));
        }
        // One Update of a container at a time: two at once would share the file (one runc
        // reading the other's resources, or none after the first removed it).
        let _one = c.updating.lock().await;
        let file = c.bundle.path().join(".update-resources.json");
        write_private(&file, &resources.value).await?;
        let res = c.runc.update(&c.id, &file).await;
        let _ = tokio::fs::remove_file(&file).await;
        res.map_err(Error::runtime(format!("update container {}", c.id)))
    }

    async fn do_checkpoint(&self, req: api::CheckpointTaskRequest, within: Option<Duration>) -> Result<()> {
        let c = self.container(&req.id)?;
        let opts = match req.options.as_ref() {
            Some(any) if any.type_url.ends_with("containerd.runc.v1.CheckpointOptions") => {
                CheckpointOptions::parse_from_bytes(&any.value)
                    .map_err(|e| Error::InvalidArgument(format!("checkpoint options: {e}")))?
            }
            Some(any) if !any.type_url.is_empty() => {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint options of type {} are not runc CheckpointOptions",
                    any.type_url
                )))
            }
            _ => CheckpointOptions::default(),
        };
        let image_dir = if opts.image_path.is_empty() {
            req.path.clone()
        } else {
            opts.image_path.clone()
        };
        if image_dir.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "checkpoint of {}: no image path given",
                c.id
            )));
        }
        if c.identity.is_sandbox {
            return self
                .checkpoint_pod(&c, PathBuf::from(&image_dir), &opts, within)
                .await;
        }
        let _pod = self.inner.lifecycle("Checkpoint", &req.id).await?;
        let status = c.init.state().status;
        if status != Status::Running && status != Status::Paused {
            return Err(Error::FailedPrecondition(format!(
                "container {} is {status:?}: only a running or paused container can be checkpointed",
                c.id
            )));
        }
        let _busy = c.claim()?;
        podsnap_checkpoint::criu_hold::clear(c.bundle.path());
        let dump = Dump {
            id: c.id.clone(),
            image_dir: PathBuf::from(&image_dir),
            work_dir: (!opts.work_path.is_empty()).then(|| PathBuf::from(&opts.work_path)),
            options: DumpOptions {
                tcp_established: opts.open_tcp,
                external_unix_sockets: opts.external_unix_sockets,
                shell_job: opts.terminal || c.init.stdio.terminal,
                file_locks: opts.file_locks,
                empty_namespaces: opts.empty_namespaces.clone(),
                cgroups_mode: opts.cgroups_mode.clone(),
            },
            leave_running: !opts.exit,
            cgroups: c.cgroups(),
            was_paused: status == Status::Paused,
            limit: podsnap_runtime::launcher::Limit {
                deadline: within.map(|d| tokio::time::Instant::now() + d),
                ..Default::default()
            },
        };
        let started = std::time::Instant::now();
        podsnap_checkpoint::container::dump(&c.runc, &dump)
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
        self.inner
            .publish(
                events::CHECKPOINTED,
                Box::new(TaskCheckpointed {
                    container_id: c.id.clone(),
                    checkpoint: image_dir,
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    /// Checkpoints the whole pod: asked on the sandbox task.
    /// Checkpoints the whole pod. The dump runs in a task of its own, holding the pod's
    /// lifecycle lock: if this request is dropped (its caller gave up), the dump is told to
    /// stop and cleans up (thaws, removes its output) instead of being cut off half-way.
    async fn checkpoint_pod(
        &self,
        sandbox: &Arc<Container>,
        dest: PathBuf,
        opts: &CheckpointOptions,
        within: Option<Duration>,
    ) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.inner.pod_busy.swap(true, Ordering::SeqCst) {
            return Err(Error::FailedPrecondition(format!(
                "pod {} is busy: a checkpoint of it is already running",
                sandbox.id
            )));
        }
        struct Release(Arc<Inner>);
        impl Drop for Release {
            fn drop(&mut self) {
                self.0.pod_busy.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let release = Release(self.inner.clone());
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
        // Lifecycle calls in flight finish first; new ones wait for the dump.
        let lifecycle = tokio::time::timeout(LIFECYCLE_WAIT, self.inner.pod_lock.clone().write_owned())
            .await
            .map_err(|_| {
                Error::FailedPrecondition(format!(
                    "pod {}: lifecycle calls did not finish within {} s; try the checkpoint again",
                    sandbox.id,
                    LIFECYCLE_WAIT.as_secs()
                ))
            })?;
        let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
        struct GiveUp(tokio::sync::watch::Sender<bool>);
        impl Drop for GiveUp {
            fn drop(&mut self) {
                let _ = self.0.send(true);
            }
        }
        let give_up = GiveUp(cancel_tx);
        let containers: Vec<Arc<Container>> = lock(&self.inner.containers).values().cloned().collect();
        let departed: Vec<Target> = lock(&self.inner.departed).values().cloned().collect();
        let request = PodCheckpoint {
            dest: dest.clone(),
            stop: opts.exit,
            keep_tcp: opts.open_tcp,
            deadline,
            cancel: Some(cancel_rx),
            reserve_bytes: config.dump.reserve_bytes,
            network_lock: config.dump.network_lock,
            digests: config.dump.digests,
            root: config.checkpoint_root(),
            retention: config.retention.clone(),
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
        self.inner
            .publish(
                events::CHECKPOINTED,
                Box::new(TaskCheckpointed {
                    container_id: sandbox.id.clone(),
                    checkpoint: dest.display().to_string(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    async fn do_stats(&self, id: &str) -> Result<api::StatsResponse> {
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
        let any = match &stats {
            Stats::V1(s) => to_any(&metrics::v1(s))?,
            Stats::V2(s) => to_any(&metrics::v2(s))?,
        };
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }
}

impl Inner {
    /// Waits (at most [`LIFECYCLE_WAIT`]) for a pod dump in progress; the guard lets the next
    /// dump wait for this call.
    async fn lifecycle(&self, call: &str, id: &str) -> Result<tokio::sync::OwnedRwLockReadGuard<()>> {
        if let Ok(guard) = self.pod_lock.clone().try_read_owned() {
            return Ok(guard);
        }
        log::info!("{call} of container {id} waits until the pod's checkpoint is over");
        tokio::time::timeout(LIFECYCLE_WAIT, self.pod_lock.clone().read_owned())
            .await
            .map_err(|_| {
                Error::FailedPrecondition(format!(
                    "{call} of container {id} refused: the pod is being checkpointed and did not finish within {} s; try again",
                    LIFECYCLE_WAIT.as_secs()
                ))
            })
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        self.events.publish(topic, event).await;
    }

    /// Reports a process's exit: its state, its waiters, and TaskExit (held back while the
    /// process is being announced; see [`Announcing`]).
    async fn process_exited(&self, p: &Arc<Process>, code: i32) {
        if !p.admit_exit(code) {
            log::debug!("{}: exit {code} held until its start is published", p.describe());
            return;
        }
        if !p.set_exited(code) {
            return;
        }
        let s = p.state();
        log::info!("{}: exited with status {}", p.describe(), s.exit_code);
        self.publish(
            events::EXIT,
            Box::new(TaskExit {
                container_id: p.container_id.clone(),
                id: if p.exec_id.is_empty() {
                    p.container_id.clone()
                } else {
                    p.exec_id.clone()
                },
                pid: s.pid as u32,
                exit_status: s.exit_code,
                exited_at: Some(timestamp(s.exited_at)).into(),
                ..Default::default()
            }),
        )
        .await;
    }
}

/// Holds a process's exit back while the call that announces the process (Create for an init,
/// Start for an init or exec) has not published its event yet: containerd expects TaskCreate /
/// TaskStart / TaskExecStarted before the TaskExit of the same process. Released after that
/// event; dropped unreleased (the call failed or was given up) it reports a held exit anyway,
/// so no exit is lost.
struct Announcing {
    inner: Arc<Inner>,
    process: Arc<Process>,
    released: bool,
}

impl Announcing {
    fn hold(inner: &Arc<Inner>, process: &Arc<Process>) -> Self {
        process.hold_exit();
        Self {
            inner: inner.clone(),
            process: process.clone(),
            released: false,
        }
    }

    /// The announcing event is out: reports the exit held meanwhile, if any.
    async fn release(mut self) {
        self.released = true;
        if let Some(code) = self.process.release_exit() {
            self.inner.process_exited(&self.process, code).await;
        }
    }
}

impl Drop for Announcing {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let Some(code) = self.process.release_exit() else {
            return;
        };
        let (inner, process) = (self.inner.clone(), self.process.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { inner.process_exited(&process, code).await });
            }
            Err(_) => log::warn!(
                "{}: exit {code} not reported: no runtime to report it on",
                process.describe()
            ),
        }
    }
}

#[async_trait]
impl Task for PodTask {
    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let s = p.state();
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                c.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.path().display().to_string(),
            pid: s.pid as u32,
            status: api_status(s.status).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: s.exit_code,
            exited_at: s.exited_at.map(|t| timestamp(Some(t))).into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let _pod = self.inner.lifecycle("Create", &req.id).await?;
        Ok(self.do_create(req).await?)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let _pod = self.inner.lifecycle("Start", &req.id).await?;
        Ok(self.do_start(req).await?)
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let _pod = self.inner.lifecycle("Delete", &req.id).await?;
        Ok(self.do_delete(req).await?)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        Ok(self.do_pids(&req.id).await?)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let _pod = self.inner.lifecycle("Pause", &req.id).await?;
        self.do_pause(&req.id, true).await?;
        Ok(api::Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let _pod = self.inner.lifecycle("Resume", &req.id).await?;
        self.do_pause(&req.id, false).await?;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        self.do_checkpoint(req, request_deadline(ctx)).await?;
        Ok(api::Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let _pod = self.inner.lifecycle("Kill", &req.id).await?;
        self.do_kill(req).await?;
        Ok(api::Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let _pod = self.inner.lifecycle("Exec", &req.id).await?;
        self.do_exec(req).await?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let pty = lock(&p.pty).clone();
        let pty =
            pty.ok_or_else(|| Error::FailedPrecondition(format!("{} has no terminal", p.describe())))?;
        podsnap_runtime::stdio::resize(
            &std::os::fd::AsFd::as_fd(&pty),
            req.width as u16,
            req.height as u16,
        )
        .map_err(Error::runtime(format!("resize the terminal of {}", p.describe())))?;
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            p.io.close_input();
        }
        Ok(api::Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let _pod = self.inner.lifecycle("Update", &req.id).await?;
        self.do_update(req).await?;
        Ok(api::Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let s = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: s.exit_code,
            exited_at: Some(timestamp(s.exited_at)).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        Ok(self.do_stats(&req.id).await?)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.container(&req.id).map(|c| c.init.state().pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: task_pid as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let left = lock(&self.inner.containers).len();
        log::debug!(
            "shutdown asked for {} (now: {}), {left} containers left",
            req.id,
            req.now
        );
        if left == 0 || req.now {
            log::info!("no containers left: shim exits");
            self.inner.exit.signal();
        } else {
            // containerd asks once, when the sandbox's task is deleted; the pod's other
            // containers may be deleted after it.
            self.inner
                .shutdown_asked
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(api::Empty::new())
    }
}

fn api_status(s: Status) -> ApiStatus {
    match s {
        Status::Created => ApiStatus::CREATED,
        Status::Running => ApiStatus::RUNNING,
        Status::Paused => ApiStatus::PAUSED,
        Status::Stopped => ApiStatus::STOPPED,
    }
}

fn delete_response(s: crate::process::State) -> api::DeleteResponse {
    api::DeleteResponse {
        pid: s.pid as u32,
        exit_status: s.exit_code,
        exited_at: Some(timestamp(s.exited_at)).into(),
        ..Default::default()
    }
}

fn timestamp(t: Option<SystemTime>) -> Timestamp {
    let d = t
        .unwrap_or_else(SystemTime::now)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

fn to_any(m: &dyn MessageDyn) -> Result<Any> {
    let mut any = Any::new();
    any.type_url = m.descriptor_dyn().full_name().to_string();
    any.value = m
        .write_to_bytes_dyn()
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(any)
}

/// What is left of the caller's deadline (ttrpc carries it as `timeout_nano`).
fn request_deadline(ctx: &TtrpcContext) -> Option<Duration> {
    (ctx.timeout_nano > 0).then(|| Duration::from_nanos(ctx.timeout_nano as u64))
}

/// The overlay lower directories (the image's layers, top first) of a Create's rootfs mounts.
fn rootfs_layers(mounts: &[api::Mount]) -> Vec<String> {
    mounts
        .iter()
        .filter(|m| m.type_ == "overlay")
        .flat_map(|m| m.options.iter())
        .filter_map(|o| o.strip_prefix("lowerdir="))
        .flat_map(|v| v.split(':'))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn mount_rootfs(mounts: &[api::Mount], rootfs: &Path) -> Result<()> {
    std::fs::create_dir_all(rootfs)
        .map_err(|e| Error::Internal(format!("create {}: {e}", rootfs.display())))?;
    for m in mounts {
        if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, rootfs).await {
            unmount_rootfs(rootfs);
            return Err(Error::Internal(format!(
                "mount the rootfs ({} {}) at {}: {e}",
                m.type_,
                m.source,
                rootfs.display()
            )));
        }
    }
    Ok(())
}

fn unmount_rootfs(rootfs: &Path) {
    if let Some(path) = rootfs.to_str() {
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(path), 0) {
            log::warn!("unmount {path}: {e}; detaching");
            let _ = containerd_shim::mount::umount_recursive(Some(path), libc::MNT_DETACH);
        }
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
