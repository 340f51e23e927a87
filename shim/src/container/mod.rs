//! A container the shim runs: creating it with runc, starting it, its exec processes, stdio
//! plumbing, and its removal. Protobuf stays in `task.rs`; this speaks our own types.

pub mod factory;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::asynchronous::io::{Pty, Stdio};
use podsnap_checkpoint::container::{self as ckpt, DumpOptions};
use podsnap_runtime::bundle::{Bundle, PodIdentity};
use podsnap_runtime::cgroup::{CgroupMode, CgroupPaths};
use podsnap_runtime::runc::{CreateOpts, ExecOpts, ProcessStdio, Runc};
use podsnap_runtime::stdio::{self, ConsoleSocket, ShimEnds, Wanted};
use tokio::net::unix::pipe;

use crate::error::{Error, Result};
use crate::exits::ExitRouter;
use crate::lazy_pages::{LazyPages, LeaseFor};
use crate::options::RuncFlags;
use crate::process::{lock, Process, Status};

/// Where console sockets are made (short paths: a unix socket path has 108 bytes at most).
pub const CONSOLE_DIR: &str = "/run/podsnap/console";

/// How long runc gets to hand over a new terminal after it reported success.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

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
    flags: RuncFlags,
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
    lazy_stop: Mutex<Option<tokio::sync::watch::Sender<bool>>>,
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
}

/// A lazy restore's daemon: whose lease it holds on the checkpoint.
#[derive(Debug, Clone)]
pub struct Lazy {
    pub lease_for: Option<LeaseFor>,
}

/// Points runc at the bundle's own CRIU configuration file ([`ckpt::CRIU_CONFIG_FILE`], read by
/// CRIU only while it exists) through the spec's `org.criu.config` annotation. A file the spec
/// already names is kept unless `replace`.
async fn point_at_criu_config(bundle: &Bundle, replace: bool) -> Result<()> {
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

    /// `runc restore`s the container from the checkpoint Create prepared; returns its pid. A
    /// lazy restore starts the container's lazy-pages daemon first and leaves it running.
    async fn restore(&self, src: RestoreSource, exits: &ExitRouter) -> Result<i32> {
        podsnap_checkpoint::failpoint::hold("restore").await;
        log::info!(
            "container {}: restoring from {}{}",
            self.id,
            src.image_dir.display(),
            if src.lazy.is_some() { " (lazy)" } else { "" }
        );
        let work_dir = self.bundle.path().join("criu-restore");
        let daemon = match &src.lazy {
            Some(lazy) => {
                let pod = match (&self.identity.pod_namespace, &self.identity.pod_name) {
                    (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
                    _ => None,
                };
                let lease_for = lazy.lease_for.as_ref();
                Some(LazyPages::start(&self.id, pod.as_deref(), &src.image_dir, &work_dir, lease_for).await?)
            }
            None => None,
        };
        let lazy = daemon.is_some();
        if lazy {
            podsnap_checkpoint::failpoint::hold("lazy-pages").await;
        }
        let restored = self.restore_from_images(src, exits, work_dir, lazy).await;
        match (restored, daemon) {
            (Ok(pid), Some(daemon)) => {
                let (stop, stopped) = tokio::sync::watch::channel(false);
                *lock(&self.lazy_stop) = Some(stop);
                let (runc, id) = (self.runc.clone(), self.id.clone());
                daemon.watch(stopped, move |_| {
                    tokio::spawn(async move {
                        log::error!("container {id}: killed: its memory is incomplete");
                        if let Err(e) = runc.kill(&id, libc::SIGKILL as u32, true).await {
                            log::warn!("container {id}: kill after its lazy-pages daemon failed: {e}");
                        }
                    });
                });
                Ok(pid)
            }
            (Err(e), Some(daemon)) => {
                daemon.stop().await;
                Err(e)
            }
            (restored, None) => restored,
        }
    }

    /// Stops the lazy-pages daemon of a lazy restore, if one still runs (the container goes).
    pub fn stop_lazy_pages(&self) {
        if let Some(stop) = lock(&self.lazy_stop).take() {
            let _ = stop.send(true);
        }
    }

    async fn restore_from_images(
        &self,
        src: RestoreSource,
        exits: &ExitRouter,
        work_dir: PathBuf,
        lazy_pages: bool,
    ) -> Result<i32> {
        let (process_stdio, ends, console) = prepare_io(&self.init.stdio)?;
        let adopted = src.adopted.clone();
        let tcp_close = !src.options.tcp_established;
        let mut options = src.options;
        options.shell_job |= self.init.stdio.terminal;
        // Established connections were captured; without a request to keep them they are
        // restored closed (CRIU's tcp-close), so a new pod IP does not break the restore. The
        // file is this bundle's in any case (a spec from a checkpoint may name another's).
        let mut conf = if options.tcp_established {
            String::new()
        } else {
            "tcp-close\n".to_owned()
        };
        conf.push_str(&ckpt::inherit_lines(&src.unix_ends));
        if let Some(line) = ckpt::cgroups_mode_by_config(&self.runc, &self.id, &mut options).await {
            conf.push_str(line);
        }
        conf.push_str(&self.v2_cgroup_root_line().await);
        self.use_criu_config(&conf).await?;
        let pid_file = self.bundle.path().join("init.pid");
        let _ = std::fs::remove_file(&pid_file);
        let r = ckpt::Restore {
            id: self.id.clone(),
            bundle: self.bundle.path().to_path_buf(),
            image_dir: src.image_dir,
            work_dir: work_dir.clone(),
            options,
            pid_file: pid_file.clone(),
            console_socket: console.as_ref().map(|c| c.path().to_path_buf()),
            no_pivot: self.flags.no_pivot,
            log: self.bundle.path().join("log.json"),
            lazy_pages,
            inherited: src.unix_ends,
        };
        let since = Instant::now();
        // Processes the pause process adopted had the container's output (they were forked
        // from it): they get it again.
        let output = (
            process_stdio.stdout.as_ref().and_then(|f| f.try_clone().ok()),
            process_stdio.stderr.as_ref().and_then(|f| f.try_clone().ok()),
        );
        let restore = async { Ok(ckpt::restore(&self.runc, &r, process_stdio).await?) };
        let restored = run_attached(&self.init, console, restore).await;
        // Read by CRIU for this restore only (a later dump writes its own).
        let _ = std::fs::remove_file(self.bundle.path().join(ckpt::CRIU_CONFIG_FILE));
        if let Err(e) = restored {
            self.init.io.abort().await;
            return Err(e);
        }
        let started = async {
            let pid = read_pid(&pid_file).await?;
            connect_pipes(&self.init, ends)?;
            Ok::<i32, Error>(pid)
        };
        let pid = match started.await {
            Ok(pid) => pid,
            Err(e) => {
                let _ = self.runc.delete(&self.id, true).await;
                self.init.io.abort().await;
                return Err(e);
            }
        };
        self.init.set_pid(pid);
        let spec = self.bundle.spec().ok();
        let mut cgroups = spec
            .as_ref()
            .and_then(|s| cgroups_of(&self.id, s, &self.runc, pid));
        if let (Some(actual), Some(spec)) = (cgroups.as_ref(), spec.as_ref()) {
            if let Some(wanted) = self.v2_cgroup_elsewhere(actual, spec) {
                match actual.move_processes_to(&wanted) {
                    Ok(n) => {
                        log::info!(
                            "container {}: restored into {:?} (where it was dumped): {n} processes \
                             moved to its own cgroup {:?}",
                            self.id,
                            actual.freezer(),
                            wanted.freezer()
                        );
                        cgroups = Some(wanted);
                    }
                    Err(e) => log::warn!(
                        "container {}: its processes stay in {:?}: {e}",
                        self.id,
                        actual.freezer()
                    ),
                }
            }
        }
        if let Err(e) = self
            .restore_adopted(&adopted, &work_dir, tcp_close, cgroups.as_ref(), &output)
            .await
        {
            // Nothing half-restored stays: the container goes with what was restored of it.
            let _ = self.runc.delete(&self.id, true).await;
            self.init.io.abort().await;
            return Err(e);
        }
        *lock(&self.cgroups) = cgroups;
        if let Some(code) = exits.watch(pid, self.init.clone(), since) {
            self.init.set_early_exit(code);
        }
        log::info!("container {}: restored, pid {pid}", self.id);
        Ok(pid)
    }

    /// Restores the processes of this container that the pod's pause process had adopted
    /// (`adopted`: PID in the pod and CRIU images), each with its descendants, once the
    /// container itself is back. runc restores a container's init only, so each comes back as
    /// a container of its own for the length of its restore: this container's spec (its root,
    /// mounts, the pod's namespaces; no terminal, no hooks) with a cgroup of its own, so a
    /// failed restore removes nothing of this container's. CRIU leaves the restored processes
    /// stopped; each moves into this container's cgroups (`into`), then they go on, and that
    /// container's runc state goes (not `runc delete`, which would kill them). A failure after
    /// CRIU's kills what it restored. Their output goes where the container's does (`output`:
    /// copies of its stdout and stderr).
    async fn restore_adopted(
        &self,
        adopted: &[(u32, PathBuf)],
        work_dir: &Path,
        tcp_close: bool,
        into: Option<&CgroupPaths>,
        output: &(Option<OwnedFd>, Option<OwnedFd>),
    ) -> Result<()> {
        for (pid, images) in adopted {
            let id = format!("{}-adopted-{pid}", self.id);
            let dir = self.bundle.path().join(format!("adopted-{pid}"));
            let _cleanup = ckpt::RemoveOnDrop(vec![self.runc.root().join(&id), dir.clone()]);
            ckpt::create_private_dir(&dir)?;
            let raw = tokio::fs::read(self.bundle.config_path())
                .await
                .map_err(|e| Error::Internal(format!("read {}: {e}", self.bundle.config_path().display())))?;
            let mut spec: serde_json::Value =
                serde_json::from_slice(&raw).map_err(|e| Error::Internal(format!("parse the spec: {e}")))?;
            let root = spec
                .pointer("/root/path")
                .and_then(|p| p.as_str())
                .unwrap_or("rootfs");
            spec["root"]["path"] = self.bundle.path().join(root).display().to_string().into();
            if let Some(cg) = spec.pointer_mut("/linux/cgroupsPath") {
                let own = format!("{}-adopted-{pid}", cg.as_str().unwrap_or_default());
                *cg = own.into();
            }
            if let Some(terminal) = spec.pointer_mut("/process/terminal") {
                *terminal = false.into(); // its descriptors come from its images
            }
            if let Some(spec) = spec.as_object_mut() {
                spec.remove("hooks"); // the container's ran when it was created
            }
            let conf = dir.join(ckpt::CRIU_CONFIG_FILE);
            let text = format!("leave-stopped\n{}", if tcp_close { "tcp-close\n" } else { "" });
            write_private(&conf, text.as_bytes()).await?;
            if let Some(a) = spec.get_mut("annotations").and_then(|a| a.as_object_mut()) {
                a.insert(
                    ckpt::CRIU_CONFIG_ANNOTATION.into(),
                    conf.display().to_string().into(),
                );
            }
            let out = serde_json::to_vec(&spec).map_err(|e| Error::Internal(e.to_string()))?;
            write_private(&dir.join("config.json"), &out).await?;
            let mut options = ckpt::inspect(images)?;
            options.tcp_established = true;
            // Dumped as a shell job (its session's leader was gone); its images now lead a
            // session of their own, which a restore into the pod's PID namespace can make.
            options.shell_job = false;
            let r = ckpt::Restore {
                id: id.clone(),
                bundle: dir.clone(),
                image_dir: images.clone(),
                work_dir: work_dir.join(format!("adopted-{pid}")),
                options,
                pid_file: dir.join("pid"),
                console_socket: None,
                no_pivot: self.flags.no_pivot,
                log: dir.join("log.json"),
                lazy_pages: false,
                inherited: Vec::new(),
            };
            let stdio = ProcessStdio {
                stdin: None,
                stdout: output.0.as_ref().and_then(|f| f.try_clone().ok()),
                stderr: output.1.as_ref().and_then(|f| f.try_clone().ok()),
            };
            ckpt::restore(&self.runc, &r, stdio).await?;
            let stopped = match read_pid(&r.pid_file).await {
                Ok(root) => podsnap_runtime::cgroup::process_tree(root),
                Err(e) => {
                    // Restored, but which processes is unknown: what runc made goes whole.
                    let _ = self.runc.delete(&id, true).await;
                    return Err(e);
                }
            };
            // Where CRIU put them: runc's cgroup for it, or (v2) the path they were dumped from.
            let landed = stopped.first().and_then(|p| CgroupPaths::of_pid(*p).ok());
            let went_on = (|| {
                let moved = match into {
                    Some(into) => into.add_processes(&stopped).map_err(|e| {
                        Error::Internal(format!("move adopted pid {pid} into its container's cgroup: {e}"))
                    })?,
                    None => 0,
                };
                for p in &stopped {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::SIGCONT);
                }
                Ok::<usize, Error>(moved)
            })();
            let moved = match went_on {
                Ok(moved) => moved,
                Err(e) => {
                    for p in &stopped {
                        let _ =
                            nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::SIGKILL);
                    }
                    let _ = self.runc.delete(&id, true).await;
                    return Err(e);
                }
            };
            // The cgroups they left and the one runc made for it, empty now (rmdir removes
            // nothing that is not; the container's own are kept).
            let keep: Vec<&Path> = into.map(|c| c.dirs()).unwrap_or_default();
            for d in landed.iter().flat_map(|c| c.dirs()).filter(|d| !keep.contains(d)) {
                let _ = std::fs::remove_dir(d);
            }
            if let Some(own) = spec
                .pointer("/linux/cgroupsPath")
                .and_then(|p| p.as_str())
                .and_then(|p| CgroupPaths::of_container(p, self.runc.systemd_cgroup(), None).ok())
            {
                for d in own.dirs() {
                    let _ = std::fs::remove_dir(d);
                }
            }
            let root = stopped.first().copied().unwrap_or_default();
            lock(&self.adopted).extend(
                stopped
                    .first()
                    .and_then(|p| Some((*p, podsnap_checkpoint::journal::start_time(*p as u32)?))),
            );
            log::info!(
                "container {}: pid {pid} (adopted by the pod's pause process) restored as pid \
                 {root}, {} processes, {moved} moved into the container's cgroup",
                self.id,
                stopped.len()
            );
        }
        Ok(())
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
                ckpt::remove_leftover(&e.path());
            }
        }
    }

    /// On cgroup v2 with a runc that does not tell CRIU the restored container's cgroup (runc
    /// before 1.2): CRIU's `cgroup-root` line naming it, so CRIU restores the processes there,
    /// with their cgroup namespace, instead of in the cgroup path they were dumped from (the
    /// old pod's). Needed under the systemd driver: the scope runc made for the container holds
    /// only CRIU, and systemd removed it once CRIU was gone, so moving the processes there
    /// after the restore left them in a directory outside any unit. Empty otherwise.
    async fn v2_cgroup_root_line(&self) -> String {
        if CgroupMode::of_node() != CgroupMode::Unified {
            return String::new();
        }
        match self.runc.features().await {
            Ok(f) if f.v2_cgroup_root() => return String::new(),
            Ok(_) => {}
            Err(e) => log::warn!("container {}: runc's features are unknown: {e}", self.id),
        }
        let path = self
            .bundle
            .spec()
            .ok()
            .and_then(|s| s.linux().as_ref()?.cgroups_path().clone())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = match CgroupPaths::of_container(&path, self.runc.systemd_cgroup(), None) {
            Ok(CgroupPaths::V2 { dir }) => dir,
            other => {
                log::warn!(
                    "container {}: its v2 cgroup is unknown ({:?}): CRIU restores it where it was \
                     dumped",
                    self.id,
                    other.err()
                );
                return String::new();
            }
        };
        let Ok(rel) = dir.strip_prefix(podsnap_runtime::cgroup::CGROUP_ROOT) else {
            return String::new();
        };
        // ":" names the unified hierarchy alone (a root for every controller otherwise).
        format!("cgroup-root :/{}\n", rel.display())
    }

    /// On v2, the cgroup the container's spec names when its restored processes are elsewhere
    /// (CRIU put them back where they were dumped; [`Container::v2_cgroup_root_line`] keeps
    /// that from happening).
    fn v2_cgroup_elsewhere(
        &self,
        actual: &CgroupPaths,
        spec: &oci_spec::runtime::Spec,
    ) -> Option<CgroupPaths> {
        if !actual.is_v2() {
            return None;
        }
        let path = spec
            .linux()
            .as_ref()?
            .cgroups_path()
            .as_ref()?
            .to_string_lossy()
            .into_owned();
        let wanted = CgroupPaths::of_container(&path, self.runc.systemd_cgroup(), None).ok()?;
        (wanted.freezer() != actual.freezer()).then_some(wanted)
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
            Some(src) => self.restore(src, exits).await?,
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

    /// Points runc at a CRIU configuration file for this container (`org.criu.config`) holding
    /// `text` (for the restore Start is about to run).
    async fn use_criu_config(&self, text: &str) -> Result<()> {
        let conf = self.bundle.path().join(ckpt::CRIU_CONFIG_FILE);
        write_private(&conf, text.as_bytes()).await?;
        point_at_criu_config(&self.bundle, true).await
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
fn cgroups_of(id: &str, spec: &oci_spec::runtime::Spec, runc: &Runc, pid: i32) -> Option<CgroupPaths> {
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

/// Makes the pipes or console socket a process's stdio needs.
fn prepare_io(s: &Stdio) -> Result<(ProcessStdio, ShimEnds, Option<ConsoleSocket>)> {
    for path in [&s.stdin, &s.stdout, &s.stderr] {
        if path.contains("://") && !path.starts_with("fifo://") {
            return Err(Error::InvalidArgument(format!(
                "stdio {path}: only FIFO paths are supported by the podsnap shim"
            )));
        }
    }
    if s.terminal {
        std::fs::create_dir_all(CONSOLE_DIR)
            .map_err(|e| Error::Internal(format!("create {CONSOLE_DIR}: {e}")))?;
        let path = Path::new(CONSOLE_DIR).join(format!("{}-{}.sock", std::process::id(), unique()));
        let console = ConsoleSocket::bind(path).map_err(Error::runtime("make a console socket"))?;
        return Ok((ProcessStdio::default(), ShimEnds::default(), Some(console)));
    }
    let (process, ends) = stdio::pipes(Wanted {
        stdin: !s.stdin.is_empty(),
        stdout: !s.stdout.is_empty(),
        stderr: !s.stderr.is_empty(),
    })
    .map_err(Error::runtime("make stdio pipes"))?;
    Ok((process, ends, None))
}

/// Runs the runc command that starts a process (`create`, `exec`, `restore`) and, when the
/// process gets a terminal, attaches to it as soon as runc hands it over: before runc returns,
/// so a short-lived process cannot finish (and hang up its terminal) before its output is read.
async fn run_attached<F>(p: &Process, console: Option<ConsoleSocket>, run: F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    let Some(console) = console else {
        return run.await;
    };
    let attach = async {
        let master = tokio::time::timeout(CONSOLE_TIMEOUT, console.receive_master())
            .await
            .map_err(|_| Error::Internal(format!("{}: runc sent no terminal", p.describe())))?
            .map_err(Error::runtime("receive the terminal"))?;
        attach_terminal(p, master)
    };
    tokio::pin!(run, attach);
    let mut attached: Option<Result<()>> = None;
    let ran = loop {
        tokio::select! {
            r = &mut run => break r,
            a = &mut attach, if attached.is_none() => attached = Some(a),
        }
    };
    ran?;
    match attached {
        Some(a) => a,
        None => attach.await,
    }
}

/// Copies between a terminal's master side and containerd's FIFOs.
fn attach_terminal(p: &Process, master: std::fs::File) -> Result<()> {
    let s = &p.stdio;
    let io_err = |e: containerd_shim::Error| Error::Internal(format!("{} stdio: {e}", p.describe()));
    let pty = Pty::new(master).map_err(io_err)?;
    if !s.stdin.is_empty() {
        p.io.copy_from_fifo(&fifo_path(&s.stdin), pty.clone())
            .map_err(io_err)?;
    }
    if !s.stdout.is_empty() {
        p.io.copy_to_fifo(pty.clone(), &fifo_path(&s.stdout))
            .map_err(io_err)?;
    }
    *lock(&p.pty) = Some(pty);
    Ok(())
}

/// Starts copying between a process's pipes and containerd's FIFOs (pipes keep what the
/// process wrote, so this can wait until runc returned).
fn connect_pipes(p: &Process, ends: ShimEnds) -> Result<()> {
    let s = &p.stdio;
    let io_err = |e: containerd_shim::Error| Error::Internal(format!("{} stdio: {e}", p.describe()));
    if let Some(w) = ends.stdin {
        p.io.copy_from_fifo(&fifo_path(&s.stdin), sender(w)?)
            .map_err(io_err)?;
    }
    if let Some(r) = ends.stdout {
        p.io.copy_to_fifo(receiver(r)?, &fifo_path(&s.stdout))
            .map_err(io_err)?;
    }
    if let Some(r) = ends.stderr {
        p.io.copy_to_fifo(receiver(r)?, &fifo_path(&s.stderr))
            .map_err(io_err)?;
    }
    Ok(())
}

fn fifo_path(path: &str) -> String {
    path.trim_start_matches("fifo://").to_string()
}

fn sender(fd: OwnedFd) -> Result<pipe::Sender> {
    pipe::Sender::from_owned_fd(fd).map_err(|e| Error::Internal(format!("stdin pipe: {e}")))
}

fn receiver(fd: OwnedFd) -> Result<pipe::Receiver> {
    pipe::Receiver::from_owned_fd(fd).map_err(|e| Error::Internal(format!("output pipe: {e}")))
}

async fn read_pid(path: &Path) -> Result<i32> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| Error::Internal(format!("read pid file {}: {e}", path.display())))?;
    text.trim()
        .parse()
        .map_err(|_| Error::Internal(format!("pid file {} holds {text:?}", path.display())))
}

/// Writes a file only root can read (exec specs can carry secrets in their environment).
pub async fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (path, data) = (path.to_path_buf(), data.to_vec());
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&data))
            .map_err(|e| Error::Internal(format!("write {}: {e}", path.display())))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
