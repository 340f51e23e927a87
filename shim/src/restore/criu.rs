//! The container's restore at its Start (containerd's contract: Create prepares, Start
//! restores): the lazy-pages daemon of a lazy restore, CRIU through `runc restore` with the
//! container's stdio and a CRIU configuration of its own, the move into the cgroup its spec
//! names (cgroup v2), then the adopted processes (`adopted.rs`), then the exit watch.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Instant;

use podsnap_checkpoint::criu::container as ckpt;
use podsnap_runtime::cgroup::{CgroupMode, CgroupPaths};

use crate::container::io::{connect_pipes, prepare_io, read_pid, run_attached, write_private};
use crate::container::{cgroups_of, point_at_criu_config, Container, RestoreSource};
use crate::error::{Error, Result};
use crate::exits::ExitRouter;
use crate::lazy_pages::{LazyPages, Remote};
use crate::process::lock;

/// A container CRIU restored (its init running), its adopted processes not yet.
pub struct Restored {
    pub pid: i32,
    /// Its cgroups (moved where its spec says).
    pub cgroups: Option<CgroupPaths>,
    /// When its restore began (exits after it are its own).
    since: Instant,
    pub work_dir: PathBuf,
    /// Connections are restored closed (not kept).
    pub tcp_close: bool,
    /// (PID in the pod, CRIU images) of the processes the pause process had adopted.
    pub adopted: Vec<(u32, PathBuf)>,
    /// Copies of the container's stdout and stderr, for the adopted processes.
    pub output: (Option<OwnedFd>, Option<OwnedFd>),
}

/// `runc restore`s the container from the checkpoint Create prepared; returns its pid. A
/// lazy restore starts the container's lazy-pages daemon first and leaves it running.
pub async fn restore(c: &Container, src: RestoreSource, exits: &ExitRouter) -> Result<i32> {
    podsnap_checkpoint::failpoint::hold("restore").await;
    log::info!(
        "container {}: restoring from {}{}",
        c.id,
        src.image_dir.display(),
        if src.lazy.is_some() { " (lazy)" } else { "" }
    );
    let work_dir = c.bundle.path().join("criu-restore");
    let remote = src
        .lazy
        .as_ref()
        .and_then(|l| l.remote.clone())
        .map(|socket| Remote {
            socket,
            sandbox: c.identity.sandbox_id.clone().unwrap_or_default(),
            state: Default::default(),
        });
    let daemon = match &src.lazy {
        Some(lazy) => {
            let pod = match (&c.identity.pod_namespace, &c.identity.pod_name) {
                (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
                _ => None,
            };
            let lease_for = lazy.lease_for.as_ref();
            Some(
                LazyPages::start(
                    &c.id,
                    pod.as_deref(),
                    &src.image_dir,
                    &work_dir,
                    lease_for,
                    remote.as_ref(),
                )
                .await?,
            )
        }
        None => None,
    };
    let lazy = daemon.is_some();
    if lazy {
        podsnap_checkpoint::failpoint::hold("lazy-pages").await;
    }
    // The phases, each from the previous one's state.
    let span = src.span.clone();
    let restored = async {
        let started = std::time::Instant::now();
        let restored = restore_images(c, src, work_dir, lazy).await?;
        span.record("criu_ms", started.elapsed().as_millis() as u64);
        let started = std::time::Instant::now();
        let restored = super::adopted::restore(c, restored).await?;
        span.record("adopted_ms", started.elapsed().as_millis() as u64);
        Ok::<i32, Error>(finish(c, restored, exits))
    }
    .await;
    let restored = match (restored, &remote) {
        (Ok(pid), Some(remote)) => {
            // From here on a lost page stream kills the container's processes; one lost
            // before (the daemon may have let the kernel fill the missing pages with zeros)
            // fails the restore now.
            let lost = {
                let mut st = lock(&remote.state);
                st.cgroups = c.cgroups();
                st.lost.clone()
            };
            match lost {
                None => Ok(pid),
                Some(why) => {
                    if let Err(e) = c.runc.kill(&c.id, libc::SIGKILL as u32, true).await {
                        log::warn!("container {}: kill after its page stream was lost: {e}", c.id);
                    }
                    Err(Error::FailedPrecondition(format!(
                        "container {}: the source of its memory was lost before it ran ({why}): \
                         killed rather than run with missing memory",
                        c.id
                    )))
                }
            }
        }
        (restored, _) => restored,
    };
    span.record("outcome", if restored.is_ok() { "running" } else { "failed" });
    match (restored, daemon) {
        (Ok(pid), Some(daemon)) => {
            let (stop, stopped) = tokio::sync::watch::channel(false);
            *lock(&c.lazy_stop) = Some(stop);
            let (runc, id) = (c.runc.clone(), c.id.clone());
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

/// CRIU restores the container from its images (through `runc restore`), into the cgroup its
/// spec names.
async fn restore_images(
    c: &Container,
    src: RestoreSource,
    work_dir: PathBuf,
    lazy_pages: bool,
) -> Result<Restored> {
    let (process_stdio, ends, console) = prepare_io(&c.init.stdio)?;
    let adopted = src.adopted.clone();
    let tcp_close = !src.options.tcp_established;
    let mut options = src.options;
    options.shell_job |= c.init.stdio.terminal;
    // Established connections were captured; without a request to keep them they are
    // restored closed (CRIU's tcp-close), so a new pod IP does not break the restore. The
    // file is this bundle's in any case (a spec from a checkpoint may name another's).
    let mut conf = if options.tcp_established {
        String::new()
    } else {
        "tcp-close\n".to_owned()
    };
    conf.push_str(&ckpt::inherit_lines(&src.unix_ends));
    if let Some(line) = ckpt::cgroups_mode_by_config(&c.runc, &c.id, &mut options).await {
        conf.push_str(line);
    }
    conf.push_str(&v2_cgroup_root_line(c).await);
    let netns = criu_netns(c, &options)?;
    let masked = match options.masked_tmpfs_external {
        true => Some(ckpt::MaskedTmpfs::mount(&work_dir)?),
        false => None,
    };
    conf.push_str(&masked.as_ref().map(ckpt::MaskedTmpfs::line).unwrap_or_default());
    let cgroup_tmpfs = match options.cgroup_tmpfs.is_empty() {
        true => None,
        false => Some(ckpt::MaskedTmpfs::mount_cgroup(&work_dir, &options.cgroup_tmpfs)?),
    };
    conf.push_str(
        &cgroup_tmpfs
            .as_ref()
            .map(ckpt::MaskedTmpfs::cgroup_line)
            .unwrap_or_default(),
    );
    use_criu_config(c, &conf).await?;
    let pid_file = c.bundle.path().join("init.pid");
    let _ = std::fs::remove_file(&pid_file);
    let r = ckpt::Restore {
        id: c.id.clone(),
        bundle: c.bundle.path().to_path_buf(),
        image_dir: src.image_dir,
        work_dir: work_dir.clone(),
        options,
        pid_file: pid_file.clone(),
        console_socket: console.as_ref().map(|c| c.path().to_path_buf()),
        no_pivot: c.flags.no_pivot,
        log: c.bundle.path().join("log.json"),
        lazy_pages,
        inherited: src.unix_ends,
        netns,
    };
    let since = Instant::now();
    // Processes the pause process adopted had the container's output (they were forked
    // from it): they get it again.
    let output = (
        process_stdio.stdout.as_ref().and_then(|f| f.try_clone().ok()),
        process_stdio.stderr.as_ref().and_then(|f| f.try_clone().ok()),
    );
    let restore = async { Ok(ckpt::restore(&c.runc, &r, process_stdio).await?) };
    let restored = run_attached(&c.init, console, restore).await;
    drop((masked, cgroup_tmpfs));
    // Read by CRIU for this restore only (a later dump writes its own).
    let _ = std::fs::remove_file(c.bundle.path().join(ckpt::CRIU_CONFIG_FILE));
    if let Err(e) = restored {
        c.init.io.abort().await;
        return Err(e);
    }
    let started = async {
        let pid = read_pid(&pid_file).await?;
        connect_pipes(&c.init, ends)?;
        Ok::<i32, Error>(pid)
    };
    let pid = match started.await {
        Ok(pid) => pid,
        Err(e) => {
            let _ = c.runc.delete(&c.id, true).await;
            c.init.io.abort().await;
            return Err(e);
        }
    };
    c.init.set_pid(pid);
    let spec = c.bundle.spec().ok();
    let mut cgroups = spec.as_ref().and_then(|s| cgroups_of(&c.id, s, &c.runc, pid));
    if let (Some(actual), Some(spec)) = (cgroups.as_ref(), spec.as_ref()) {
        if let Some(wanted) = v2_cgroup_elsewhere(c, actual, spec) {
            match actual.move_processes_to(&wanted) {
                Ok(n) => {
                    log::info!(
                        "container {}: restored into {:?} (where it was dumped): {n} processes \
                         moved to its own cgroup {:?}",
                        c.id,
                        actual.freezer(),
                        wanted.freezer()
                    );
                    cgroups = Some(wanted);
                }
                Err(e) => log::warn!(
                    "container {}: its processes stay in {:?}: {e}",
                    c.id,
                    actual.freezer()
                ),
            }
        }
    }
    Ok(Restored {
        pid,
        cgroups,
        since,
        work_dir,
        tcp_close,
        adopted,
        output,
    })
}

/// The container is back: its cgroups, its exit watched.
fn finish(c: &Container, restored: Restored, exits: &ExitRouter) -> i32 {
    let Restored {
        pid, cgroups, since, ..
    } = restored;
    *lock(&c.cgroups) = cgroups;
    if let Some(code) = exits.watch(pid, c.init.clone(), since) {
        c.init.set_early_exit(code);
    }
    log::info!("container {}: restored, pid {pid}", c.id);
    pid
}

/// On cgroup v2 with a runc that does not tell CRIU the restored container's cgroup (runc
/// before 1.2): CRIU's `cgroup-root` line naming it, so CRIU restores the processes there,
/// with their cgroup namespace, instead of in the cgroup path they were dumped from (the
/// old pod's). Needed under the systemd driver: the scope runc made for the container holds
/// only CRIU, and systemd removed it once CRIU was gone, so moving the processes there
/// after the restore left them in a directory outside any unit. Empty otherwise.
async fn v2_cgroup_root_line(c: &Container) -> String {
    if CgroupMode::of_node() != CgroupMode::Unified {
        return String::new();
    }
    match c.runc.features().await {
        Ok(f) if f.v2_cgroup_root() => return String::new(),
        Ok(_) => {}
        Err(e) => log::warn!("container {}: runc's features are unknown: {e}", c.id),
    }
    let path = c
        .bundle
        .spec()
        .ok()
        .and_then(|s| s.linux().as_ref()?.cgroups_path().clone())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = match CgroupPaths::of_container(&path, c.runc.systemd_cgroup(), None) {
        Ok(CgroupPaths::V2 { dir }) => dir,
        other => {
            log::warn!(
                "container {}: its v2 cgroup is unknown ({:?}): CRIU restores it where it was \
                 dumped",
                c.id,
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
/// (CRIU put them back where they were dumped; [`v2_cgroup_root_line`] keeps
/// that from happening).
fn v2_cgroup_elsewhere(
    c: &Container,
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
    let wanted = CgroupPaths::of_container(&path, c.runc.systemd_cgroup(), None).ok()?;
    (wanted.freezer() != actual.freezer()).then_some(wanted)
}

/// The network namespace CRIU must restore the container in: its spec's, when the dump ran
/// CRIU in the container's network namespace (the images hold none, and CRIU leaves the
/// processes in its own). Such a checkpoint cannot be restored into a container without a
/// network namespace path (its processes would come back in the host's network).
fn criu_netns(c: &Container, options: &ckpt::DumpOptions) -> Result<Option<PathBuf>> {
    if !options.criu_in_netns {
        return Ok(None);
    }
    let spec = c
        .bundle
        .spec()
        .map_err(Error::runtime(format!("restore container {}", c.id)))?;
    let path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|nss| {
            nss.iter()
                .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        })
        .and_then(|ns| ns.path().clone());
    match path {
        Some(path) => Ok(Some(path)),
        None => Err(Error::FailedPrecondition(format!(
            "container {}: its checkpoint was dumped in its pod's network namespace and must be \
             restored into a pod: its spec names no network namespace to join",
            c.id
        ))),
    }
}

/// Points runc at a CRIU configuration file for this container (`org.criu.config`) holding
/// `text` (for the restore Start is about to run).
async fn use_criu_config(c: &Container, text: &str) -> Result<()> {
    let conf = c.bundle.path().join(ckpt::CRIU_CONFIG_FILE);
    write_private(&conf, text.as_bytes()).await?;
    point_at_criu_config(&c.bundle, true).await
}
