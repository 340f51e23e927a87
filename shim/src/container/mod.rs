//! A container the shim runs: creating it with runc, starting it (or restoring it: the
//! restore's Start phases are `restore::criu` and `restore::adopted`), its exec processes and
//! its removal. Made through a `factory::ContainerFactory`; stdio plumbing in `io.rs`.
//! Protobuf stays in `task.rs` and `convert.rs`; this speaks our own types.

pub mod factory;
pub mod io;

pub use io::write_private;
use io::{connect_pipes, prepare_io, read_pid, run_attached};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::asynchronous::io::Stdio;
use podsnap_checkpoint::criu::container::{self as ckpt, DumpOptions};
use podsnap_runtime::bundle::{Bundle, PodIdentity};
use podsnap_runtime::cgroup::{CgroupMode, CgroupPaths};
use podsnap_runtime::runc::{CreateOpts, ExecOpts, Runc};

use crate::error::{Error, Result};
use crate::exits::ExitRouter;
use crate::lazy_pages::LeaseFor;
use crate::options::RuncFlags;
use crate::process::{lock, Process, Status};

/// Where console sockets are made (short paths: a unix socket path has 108 bytes at most).
pub const CONSOLE_DIR: &str = "/run/podsnap/console";

/// How long runc gets to hand over a new terminal after it reported success.
pub(crate) const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What Create needs, in our own terms.
pub struct CreateParams {
    pub id: String,
    pub bundle: PathBuf,
    pub stdio: Stdio,
    pub runc: Runc,
    pub flags: RuncFlags,
    /// Whether the shim mounted the rootfs (and must unmount it).
    pub rootfs_mounted: bool,
    pub created_order: u64,
    /// The overlay lower directories of its rootfs (the image's layers), top first.
    pub rootfs_layers: Vec<String>,
}

/// One container of the pod.
pub struct Container {
    pub id: String,
    pub bundle: Bundle,
    pub identity: PodIdentity,
    pub created_order: u64,
    /// The overlay lower directories of its rootfs (the image's layers), top first.
    pub rootfs_layers: Vec<String>,
    pub started_order: Mutex<Option<u64>>,
    pub init: Arc<Process>,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    pub rootfs_mounted: bool,
    pub runc: Runc,
    pub cgroups: Mutex<Option<CgroupPaths>>,
    /// Set when Create carried a checkpoint: Start restores from it instead of starting.
    restore_from: Mutex<Option<RestoreSource>>,
    pub(crate) flags: RuncFlags,
    /// Held while a checkpoint of this container runs.
    busy: AtomicBool,
    /// The cgroup files its stats lacked were logged (once per container, not per request).
    stats_gaps_logged: AtomicBool,
    /// Held while the container starts (or is restored): Kill and Delete wait for it.
    pub starting: tokio::sync::Mutex<()>,
    /// Held while an Update runs: Updates of one container apply one after the other (each
    /// writes the resources file runc reads, and runc writes the cgroup files one by one).
    pub updating: tokio::sync::Mutex<()>,
    /// For a container that is not to run: the exit it reports.
    exited_plan: Option<u32>,
    /// Stops the lazy-pages daemon of a lazy restore still bringing its memory back.
    pub(crate) lazy_stop: Mutex<Option<tokio::sync::watch::Sender<bool>>>,
    /// (host pid, start time) of the processes restored as adopted by the pod's pause process
    /// (their parent is now this shim): a later pod dump takes them as adopted again.
    pub adopted: Mutex<Vec<(i32, u64)>>,
    /// When this shim created it (a pod checkpoint records it in `config.dump`).
    pub created_at: std::time::SystemTime,
}

/// The checkpoint a container is to be restored from.
#[derive(Debug, Clone)]
pub struct RestoreSource {
    pub image_dir: PathBuf,
    pub options: DumpOptions,
    /// Where the container came in the pod's start order at the checkpoint: kept, whatever
    /// order the restores of a pod's containers finish in.
    pub started_order: Option<u64>,
    /// Restore lazily: memory comes back through a lazy-pages daemon.
    pub lazy: Option<Lazy>,
    /// Its ends of the checkpoint's unix connections to other containers.
    pub unix_ends: Vec<ckpt::InheritedSocket>,
    /// (PID in the pod, CRIU images) of its processes the pod's pause process had adopted.
    pub adopted: Vec<(u32, PathBuf)>,
    /// The restore's span ([`crate::restore::restore_span`]).
    pub span: tracing::Span,
}

/// A lazy restore's daemon: whose lease it holds on the checkpoint.
#[derive(Debug, Clone)]
pub struct Lazy {
    pub lease_for: Option<LeaseFor>,
    /// A live migration's checkpoint: the memory comes from `podsnap receive`'s page stream
    /// at this socket.
    pub remote: Option<PathBuf>,
}

/// Points runc at the bundle's own CRIU configuration file ([`ckpt::CRIU_CONFIG_FILE`], read by
/// CRIU only while it exists) through the spec's `org.criu.config` annotation. A file the spec
/// already names is kept unless `replace`.
pub(crate) async fn point_at_criu_config(bundle: &Bundle, replace: bool) -> Result<()> {
    let conf = bundle.path().join(ckpt::CRIU_CONFIG_FILE);
    let path = bundle.config_path();
    let raw = tokio::fs::read(&path)
        .await
        .map_err(|e| Error::Internal(format!("read {}: {e}", path.display())))?;
    let mut spec: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| Error::Internal(format!("parse {}: {e}", path.display())))?;
    let annotations = spec
        .as_object_mut()
        .ok_or_else(|| Error::Internal("the OCI spec is not an object".into()))?
        .entry("annotations")
        .or_insert_with(|| serde_json::json!({}));
    let Some(a) = annotations.as_object_mut() else {
        return Ok(());
    };
    let wanted = serde_json::Value::from(conf.display().to_string());
    match a.get(ckpt::CRIU_CONFIG_ANNOTATION) {
        Some(named) if *named == wanted => return Ok(()),
        Some(_) if !replace => return Ok(()),
        _ => {}
    }
    a.insert(ckpt::CRIU_CONFIG_ANNOTATION.into(), wanted);
    let out = serde_json::to_vec(&spec).map_err(|e| Error::Internal(e.to_string()))?;
    write_private(&path, &out).await
}

/// Marks a container busy for as long as it lives.
pub struct BusyGuard<'a>(&'a AtomicBool);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Container {
    /// `runc create`s the container. On failure nothing is left registered or running; the
    /// caller still owns the rootfs mount.
    pub async fn create(p: CreateParams, exits: &ExitRouter) -> Result<Arc<Container>> {
        let bundle = Bundle::new(&p.bundle);
        let spec = bundle
            .spec()
            .map_err(Error::runtime(format!("create container {}", p.id)))?;
        let identity = PodIdentity::from_spec(&spec);
        if !identity.is_sandbox {
            // A pod dump hands CRIU options through it (the user's own file, if named, wins).
            point_at_criu_config(&bundle, false).await?;
        }
        let init = Arc::new(Process::new(&p.id, "", p.stdio.clone(), None));
        let flags = p.flags.clone();

        let (process_stdio, ends, console) = prepare_io(&p.stdio)?;
        let opts = CreateOpts {
            pid_file: bundle.path().join("init.pid"),
            console_socket: console.as_ref().map(|c| c.path().to_path_buf()),
            no_pivot: p.flags.no_pivot,
            no_new_keyring: p.flags.no_new_keyring,
            log: bundle.path().join("log.json"),
        };
        let _ = std::fs::remove_file(&opts.pid_file);
        let pid_file = opts.pid_file.clone();
        // Before runc runs: the init can exit (and be reaped) before its pid is read back.
        let since = Instant::now();
        let created_at = std::time::SystemTime::now();
        let create = async {
            p.runc
                .create(&p.id, bundle.path(), opts, process_stdio)
                .await
                .map_err(Error::runtime(format!("create container {}", p.id)))
        };
        let created = run_attached(&init, console, create).await;
        if let Err(e) = created {
            init.io.abort().await;
            return Err(e);
        }

        let started = async {
            let pid = read_pid(&pid_file).await?;
            connect_pipes(&init, ends)?;
            Ok::<i32, Error>(pid)
        };
        let pid = match started.await {
            Ok(pid) => pid,
            Err(e) => {
                // runc created it: take it down again.
                if let Err(de) = p.runc.delete(&p.id, true).await {
                    log::warn!("container {}: cleanup after a failed create: {de}", p.id);
                }
                init.io.abort().await;
                return Err(e);
            }
        };
        init.set_pid(pid);
        if let Some(code) = exits.watch(pid, init.clone(), since) {
            init.set_early_exit(code);
        }
        let cgroups = cgroups_of(&p.id, &spec, &p.runc, pid);
        Ok(Arc::new(Container {
            id: p.id,
            bundle,
            identity,
            created_order: p.created_order,
            rootfs_layers: p.rootfs_layers,
            started_order: Mutex::new(None),
            init,
            execs: Mutex::new(HashMap::new()),
            rootfs_mounted: p.rootfs_mounted,
            runc: p.runc,
            cgroups: Mutex::new(cgroups),
            restore_from: Mutex::new(None),
            flags,
            busy: AtomicBool::new(false),
            stats_gaps_logged: AtomicBool::new(false),
            starting: tokio::sync::Mutex::new(()),
            updating: tokio::sync::Mutex::new(()),
            exited_plan: None,
            lazy_stop: Mutex::new(None),
            adopted: Mutex::new(Vec::new()),
            created_at,
        }))
    }

    /// Prepares a container to be restored on Start (containerd's contract: Create prepares,
    /// Start restores). The caller has checked the checkpoint.
    pub fn prepare_restore(p: CreateParams, src: RestoreSource) -> Result<Arc<Container>> {
        Self::without_runc(p, Some(src), None)
    }

    /// A container that is not run at all: Start reports it exited with `code` (a completed
    /// init container of a restored pod).
    pub fn exited(p: CreateParams, code: u32) -> Result<Arc<Container>> {
        Self::without_runc(p, None, Some(code))
    }

    /// The recorded exit of a container that is not to run, if it is one.
    pub fn exited_plan(&self) -> Option<u32> {
        self.exited_plan
    }

    fn without_runc(
        p: CreateParams,
        restore: Option<RestoreSource>,
        exited_plan: Option<u32>,
    ) -> Result<Arc<Container>> {
        let bundle = Bundle::new(&p.bundle);
        let spec = bundle
            .spec()
            .map_err(Error::runtime(format!("create container {}", p.id)))?;
        Ok(Arc::new(Container {
            identity: PodIdentity::from_spec(&spec),
            init: Arc::new(Process::new(&p.id, "", p.stdio.clone(), None)),
            id: p.id,
            bundle,
            created_order: p.created_order,
            rootfs_layers: p.rootfs_layers,
            started_order: Mutex::new(None),
            execs: Mutex::new(HashMap::new()),
            rootfs_mounted: p.rootfs_mounted,
            runc: p.runc,
            cgroups: Mutex::new(None),
            restore_from: Mutex::new(restore),
            flags: p.flags,
            busy: AtomicBool::new(false),
            stats_gaps_logged: AtomicBool::new(false),
            starting: tokio::sync::Mutex::new(()),
            updating: tokio::sync::Mutex::new(()),
            exited_plan,
            lazy_stop: Mutex::new(None),
            adopted: Mutex::new(Vec::new()),
            created_at: std::time::SystemTime::now(),
        }))
    }

    /// Claims the container for a checkpoint; a second claim gets a "busy" error.
    pub fn claim(&self) -> Result<BusyGuard<'_>> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(Error::FailedPrecondition(format!(
                "container {} is busy: a checkpoint of it is already running",
                self.id
            )));
        }
        Ok(BusyGuard(&self.busy))
    }

    /// Stops the lazy-pages daemon of a lazy restore, if one still runs (the container goes).
    pub fn stop_lazy_pages(&self) {
        if let Some(stop) = lock(&self.lazy_stop).take() {
            let _ = stop.send(true);
        }
    }

    /// Removes what a dump or restore of an adopted process of this container left in runc's
    /// root when the shim died during it (its temporary runc state, see
    /// [`Container::restore_adopted`]): never `runc delete`d, which would kill the processes of
    /// the container's cgroup.
    pub fn forget_adopted_states(&self) {
        let prefix = format!("{}-adopted-", self.id);
        let Ok(entries) = std::fs::read_dir(self.runc.root()) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                log::info!(
                    "container {}: removing a stale runc state {:?}",
                    self.id,
                    e.file_name()
                );
                podsnap_checkpoint::fs::remove::remove_leftover(&e.path());
            }
        }
    }

    /// `runc start` (or `runc restore` for a container created from a checkpoint).
    pub async fn start(&self, order: &AtomicU64, exits: &ExitRouter) -> Result<i32> {
        let s = self.init.state();
        if s.status != Status::Created {
            return Err(Error::FailedPrecondition(format!(
                "container {} cannot start: it is {:?}, not created",
                self.id, s.status
            )));
        }
        let restore = lock(&self.restore_from).take();
        let recorded_order = restore.as_ref().and_then(|r| r.started_order);
        let pid = match restore {
            Some(src) => crate::restore::criu::restore(self, src, exits).await?,
            None if self.exited_plan.is_some() => 0,
            None => {
                self.runc
                    .start(&self.id)
                    .await
                    .map_err(Error::runtime(format!("start container {}", self.id)))?;
                s.pid
            }
        };
        self.init.set_status(Status::Running);
        let started = match recorded_order {
            Some(recorded) => {
                // Later starts of the pod come after it.
                order.fetch_max(recorded, Ordering::SeqCst);
                recorded
            }
            None => order.fetch_add(1, Ordering::SeqCst) + 1,
        };
        *lock(&self.started_order) = Some(started);
        Ok(pid)
    }

    /// Whether Create prepared a restore that Start has not done yet.
    pub fn restore_pending(&self) -> bool {
        lock(&self.restore_from).is_some()
    }

    /// Looks up a process: the init process for an empty exec id.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in container {}", self.id)))
    }

    /// Registers an exec process (not started yet).
    pub fn add_exec(&self, exec_id: &str, stdio: Stdio, spec: Vec<u8>) -> Result<()> {
        let status = self.init.state().status;
        if status != Status::Running && status != Status::Paused {
            return Err(Error::FailedPrecondition(format!(
                "cannot exec in container {}: it is {status:?}",
                self.id
            )));
        }
        if serde_json::from_slice::<oci_spec::runtime::Process>(&spec).is_err() {
            return Err(Error::InvalidArgument(format!(
                "exec {exec_id} in container {}: the process spec is not a valid OCI process",
                self.id
            )));
        }
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return Err(Error::AlreadyExists(format!(
                "exec {exec_id} in container {}",
                self.id
            )));
        }
        execs.insert(
            exec_id.to_string(),
            Arc::new(Process::new(&self.id, exec_id, stdio, Some(spec))),
        );
        Ok(())
    }

    /// `runc exec --detach`s a registered exec process; returns its pid.
    pub async fn start_exec(&self, exec: &Arc<Process>, exits: &ExitRouter) -> Result<i32> {
        if exec.state().status != Status::Created {
            return Err(Error::FailedPrecondition(format!(
                "{} was already started",
                exec.describe()
            )));
        }
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let spec_file = self.bundle.path().join(format!(".exec-{n}.json"));
        let pid_file = self.bundle.path().join(format!(".exec-{n}.pid"));
        let log = self.bundle.path().join(format!(".exec-{n}.log"));
        let spec = exec.spec.clone().unwrap_or_default();
        write_private(&spec_file, &spec).await?;
        let since = Instant::now();
        let result = async {
            let (process_stdio, ends, console) = prepare_io(&exec.stdio)?;
            let opts = ExecOpts {
                process_spec: spec_file.clone(),
                pid_file: pid_file.clone(),
                console_socket: console.as_ref().map(|c| c.path().to_path_buf()),
                log: log.clone(),
            };
            let run = async {
                self.runc
                    .exec(&self.id, opts, process_stdio)
                    .await
                    .map_err(Error::runtime(exec.describe()))
            };
            run_attached(exec, console, run).await?;
            let pid = read_pid(&pid_file).await?;
            exec.set_pid(pid);
            exec.set_status(Status::Running);
            connect_pipes(exec, ends)?;
            if let Some(code) = exits.watch(pid, exec.clone(), since) {
                exec.set_early_exit(code);
            }
            Ok(pid)
        }
        .await;
        for f in [&spec_file, &pid_file, &log] {
            let _ = tokio::fs::remove_file(f).await;
        }
        if result.is_err() {
            exec.io.abort().await;
        }
        result
    }

    /// The container's cgroups, learnt at create (the init process may be gone by now).
    pub fn cgroups(&self) -> Option<CgroupPaths> {
        lock(&self.cgroups).clone()
    }

    /// `true` the first time only: whether to log what its cgroup statistics lack.
    pub fn first_stats_gap(&self) -> bool {
        !self.stats_gaps_logged.swap(true, Ordering::SeqCst)
    }
}

/// Where the container's cgroups are: its spec's `linux.cgroupsPath` as runc reads it (with
/// the systemd driver when runc runs with it), checked against `/proc/<pid>/cgroup`.
pub(crate) fn cgroups_of(
    id: &str,
    spec: &oci_spec::runtime::Spec,
    runc: &Runc,
    pid: i32,
) -> Option<CgroupPaths> {
    let path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let found = if path.is_empty() {
        CgroupPaths::of_pid(pid)
    } else {
        CgroupPaths::of_container(&path, runc.systemd_cgroup(), Some(pid))
    };
    match found {
        Ok(c) => {
            log::debug!(
                "container {id}: cgroups ({}) at {:?}",
                CgroupMode::of_node().name(),
                c.freezer()
            );
            Some(c)
        }
        Err(e) => {
            log::warn!("container {id}: its cgroups are unknown ({e}): no stats, OOM events or pod dump");
            None
        }
    }
}
