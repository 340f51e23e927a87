//! Lazy restore (pod annotation `podsnap.io/restore-lazy: "true"`, `podsnap restore --lazy`):
//! a container runs as soon as CRIU has rebuilt its processes; their anonymous memory comes
//! back through userfaultfd, on demand and in the background, from a `criu lazy-pages` daemon
//! reading the checkpoint's page images.
//!
//! Per container restored lazily:
//! 1. before `runc restore --lazy-pages`: `criu lazy-pages -D <images> -W <work dir> -d
//!    --pidfile <work dir>/lazy-pages.pid` listens on `lazy-pages.socket` in the restore's
//!    work directory (a name relative to CRIU's working directory: the restoring CRIU, run by
//!    runc with the same `--work-path`, connects to it there), then detaches. Its launcher
//!    exits only once the socket listens; the shim, a subreaper, adopts the daemon and reaps it.
//!    A daemon that does not start fails the restore before runc runs.
//! 2. the daemon takes a lease on the checkpoint in its own name ([`Holder::lazy_pages`]): the
//!    checkpoint stays in use (`podsnap rm`, retention) for as long as the daemon runs, even past
//!    a shim that died.
//! 3. the restore: CRIU hands each restored process's userfaultfd to the daemon. After it, the
//!    daemon answers page faults first and pushes every other page in the background, then exits
//!    0. The shim watches for that exit, drops the lease and logs it.
//!
//! The cost of `--lazy`: until its daemon exits, part of a container's memory is only in the
//! checkpoint. A daemon that dies early (killed, an unreadable image) releases the only
//! userfaultfd: the kernel then fills every page not yet copied with zeros (seen here: a
//! restored process segfaulted on its zeroed heap a moment after its daemon was killed). So a
//! daemon that exits with an error, or is killed, while its container runs ends the container:
//! the shim logs the daemon's log tail as an error and kills the container's processes (its
//! exit is reported as usual; kubelet starts it fresh) rather than let it run on zeroed memory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podsnap_runtime::cgroup::CgroupPaths;

use containerd_shim::asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe, Subscription};
use containerd_shim::monitor::{Subject, Topic};
use podsnap_checkpoint::node::lease::{self, Holder, Lease, LEASE_DIR};
use podsnap_runtime::launcher::{Capture, Launcher};

use crate::error::{Error, Result};
use crate::exits::MonitorLauncher;

/// The daemon's socket, in the restore's work directory (CRIU's fixed name).
pub const SOCKET: &str = "lazy-pages.socket";
/// The daemon's log, in the restore's work directory.
pub const LOG: &str = "lazy-pages.log";
/// Where the daemon's launcher writes its pid.
const PIDFILE: &str = "lazy-pages.pid";
/// How long the daemon may take to listen.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Whom the daemon's lease on the checkpoint is for.
#[derive(Debug, Clone)]
pub struct LeaseFor {
    pub sandbox_id: String,
    /// `namespace/name` of the pod, when known.
    pub pod: Option<String>,
    /// The checkpoint's resolved directory.
    pub checkpoint: PathBuf,
}

/// A live migration's lazy restore: the memory comes from the source node's CRIU, through the
/// page stream `podsnap receive` carries at `socket`, not from the images.
#[derive(Debug, Clone)]
pub struct Remote {
    pub socket: PathBuf,
    /// The pod whose container is restored (its sandbox id): named to `podsnap receive`
    /// first, which carries the stream only for the pod it created.
    pub sandbox: String,
    /// What a lost stream finds (and does), under one lock with the restore's end.
    pub state: Arc<Mutex<RemoteState>>,
}

/// A [`Remote`] restore's state as a lost stream sees it.
#[derive(Debug, Default)]
pub struct RemoteState {
    /// The container's cgroups once it runs: every process of it is killed when the stream
    /// is lost before the daemon has every page, before the daemon sees the loss.
    pub cgroups: Option<CgroupPaths>,
    /// The stream was lost before the container ran: its restore must fail (its processes
    /// are killed as soon as they are known), whatever the daemon did with the loss.
    pub lost: Option<String>,
}

/// Where the daemon of a [`Remote`] restore finds its page server's socket.
const PS_SOCKET_FD: std::os::fd::RawFd = 1000;

/// `criu lazy-pages` for the images in `image_dir`, listening in `work_dir`.
pub fn command(image_dir: &Path, work_dir: &Path) -> Command {
    let mut cmd = Command::new("criu");
    cmd.arg("lazy-pages")
        .arg("--images-dir")
        .arg(image_dir)
        .arg("--work-dir")
        .arg(work_dir)
        .arg("--daemon")
        .arg("--pidfile")
        .arg(work_dir.join(PIDFILE))
        .arg("--log-file")
        .arg(LOG)
        .stdin(std::process::Stdio::null());
    cmd
}

/// How a daemon ended, and what the shim makes of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Exit 0: every page of the container is back (or its processes are gone).
    Done,
    /// The shim stopped it (the restore failed, or the container is being deleted).
    Stopped,
    /// It exited with an error or was killed by someone else: pages not yet copied read as
    /// zeros from now on.
    Failed(i32),
}

impl Ended {
    fn of(code: i32, stopped: bool) -> Self {
        match (code, stopped) {
            (_, true) => Ended::Stopped,
            (0, false) => Ended::Done,
            (code, false) => Ended::Failed(code),
        }
    }
}

/// A running lazy-pages daemon, owned by the shim.
pub struct LazyPages {
    pub pid: i32,
    /// `container <id> (pod <namespace/name>)`, for the log.
    container: String,
    work_dir: PathBuf,
    /// Exits announced since before the daemon started (its own among them, once it ends).
    exits: Subscription,
    lease: Option<Lease>,
}

impl LazyPages {
    /// Starts the daemon for container `container`'s images in `image_dir`, listening in
    /// `work_dir` (the restore's work directory, created 0700 if missing); it holds a lease on
    /// the checkpoint for `lease_for`. On error nothing is left running.
    pub async fn start(
        container_id: &str,
        pod: Option<&str>,
        image_dir: &Path,
        work_dir: &Path,
        lease_for: Option<&LeaseFor>,
        remote: Option<&Remote>,
    ) -> Result<Self> {
        let container = match pod {
            Some(pod) => format!("{container_id} (pod {pod})"),
            None => container_id.to_owned(),
        };
        podsnap_checkpoint::fs::private::create_private_dir(work_dir)?;
        for leftover in [SOCKET, PIDFILE] {
            // From an earlier attempt: CRIU binds the socket and creates the pid file anew.
            let _ = std::fs::remove_file(work_dir.join(leftover));
        }
        let failed = |why: String| {
            let tail = podsnap_checkpoint::criu::container::log_tail(&work_dir.join(LOG))
                .map(|t| format!("; CRIU's log {}:\n{t}", work_dir.join(LOG).display()))
                .unwrap_or_default();
            Error::FailedPrecondition(format!(
                "lazy restore of container {container}: the lazy-pages daemon (criu lazy-pages) \
                 did not start: {why}{tail}\n(userfaultfd must be usable: `criu check --feature \
                 uffd-noncoop`; restore without podsnap.io/restore-lazy to read memory eagerly)"
            ))
        };
        // Subscribed before the daemon exists: its exit cannot pass unseen.
        let exits = monitor_subscribe(Topic::Pid)
            .await
            .map_err(|e| Error::Internal(format!("watch the lazy-pages daemon's exit: {e}")))?;
        let mut cmd = command(image_dir, work_dir);
        // Its end of the page stream (kept open by the daemon, which inherits it).
        let _page_server = match remote {
            Some(remote) => {
                let fd = connect_remote(&container, remote).map_err(&failed)?;
                cmd.arg("--page-server")
                    .arg("--ps-socket")
                    .arg(PS_SOCKET_FD.to_string());
                let fds = [(PS_SOCKET_FD, fd)];
                podsnap_runtime::runc::inherit_fds(&mut cmd, "lazy-pages", container_id, &fds)
                    .map_err(|e| failed(e.to_string()))?;
                Some(fds)
            }
            None => None,
        };
        let launched = MonitorLauncher
            .run_until(cmd, Capture::Output, START_DEADLINE)
            .await;
        let pid = match launched {
            Ok(out) if out.success() => std::fs::read_to_string(work_dir.join(PIDFILE))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("no pid in {}", work_dir.join(PIDFILE).display())),
            Ok(out) => Err(format!(
                "exit {}{}",
                out.code,
                match String::from_utf8_lossy(&out.stderr).trim() {
                    "" => String::new(),
                    e => format!(": {e}"),
                }
            )),
            Err(e) => Err(e.to_string()),
        };
        let pid = match pid {
            Ok(pid) => pid,
            Err(why) => {
                let _ = monitor_unsubscribe(exits.id).await;
                return Err(failed(why));
            }
        };
        let mut daemon = LazyPages {
            pid,
            container: container.clone(),
            work_dir: work_dir.to_path_buf(),
            exits,
            lease: None,
        };
        if let Some(l) = lease_for {
            let taken = Holder::lazy_pages(
                &l.sandbox_id,
                l.pod.clone(),
                &l.checkpoint,
                pid as u32,
                container_id,
            )
            .ok_or_else(|| "it exited at once".to_owned())
            .and_then(|h| lease::take(Path::new(LEASE_DIR), &h).map_err(|e| e.to_string()));
            match taken {
                Ok(lease) => daemon.lease = Some(lease),
                Err(why) => {
                    daemon.stop().await;
                    return Err(failed(why));
                }
            }
        }
        log::info!(
            "container {container}: lazy-pages daemon pid {pid} serves its memory from {} \
             (socket {}, log {})",
            image_dir.display(),
            work_dir.join(SOCKET).display(),
            work_dir.join(LOG).display()
        );
        Ok(daemon)
    }

    /// Kills the daemon (the restore failed) and waits for it.
    pub async fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let code = self.exited().await;
        log::info!(
            "container {}: lazy-pages daemon pid {} stopped (exit {code:?})",
            self.container,
            self.pid
        );
        self.release().await;
    }

    /// Watches the daemon once the container runs: logs how it ended, and calls `on_failure`
    /// when it failed (see the module documentation) unless `stop` was set first. The lease
    /// goes with the daemon.
    pub fn watch<F>(mut self, mut stop: tokio::sync::watch::Receiver<bool>, on_failure: F)
    where
        F: FnOnce(String) + Send + 'static,
    {
        tokio::spawn(async move {
            let mut stopped = false;
            let code = loop {
                tokio::select! {
                    code = self.exited() => break code,
                    changed = stop.wait_for(|s| *s), if !stopped => {
                        stopped = true;
                        if changed.is_ok() {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(self.pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                }
            };
            // No exit code: the shim's exit monitor closed, the shim is going away.
            let ended = code.map_or(Ended::Stopped, |code| Ended::of(code, stopped));
            let log_path = self.work_dir.join(LOG);
            match ended {
                Ended::Done => log::info!(
                    "container {}: lazy-pages daemon pid {} exited: all of its memory is back",
                    self.container,
                    self.pid
                ),
                Ended::Stopped => log::info!(
                    "container {}: lazy-pages daemon pid {} stopped with its container",
                    self.container,
                    self.pid
                ),
                Ended::Failed(code) => {
                    let tail = podsnap_checkpoint::criu::container::log_tail(&log_path).unwrap_or_default();
                    let why = format!(
                        "its lazy-pages daemon (pid {}) failed (exit {code}) before all of its \
                         memory was back: pages not yet copied now read as zeros; CRIU's log {}:\n{tail}",
                        self.pid,
                        log_path.display()
                    );
                    log::error!("container {}: {why}", self.container);
                    on_failure(why);
                }
            }
            self.release().await;
        });
    }

    /// The daemon's exit code once it ends; `None` if the shim's exit monitor closed.
    async fn exited(&mut self) -> Option<i32> {
        while let Some(ev) = self.exits.rx.recv().await {
            if matches!(ev.subject, Subject::Pid(p) if p == self.pid) {
                return Some(ev.exit_code);
            }
        }
        None
    }

    async fn release(mut self) {
        let _ = monitor_unsubscribe(self.exits.id).await;
        drop(self.lease.take());
        let _ = std::fs::remove_file(self.work_dir.join(SOCKET));
    }
}

/// Connects to `podsnap receive`'s page stream of the container and carries it to a new
/// socketpair; returns the daemon's end. A stream lost before the daemon ended kills the
/// container's processes first, then closes the daemon's end (see [`crate::page_stream`]).
fn connect_remote(
    container: &str,
    remote: &Remote,
) -> std::result::Result<Arc<std::os::fd::OwnedFd>, String> {
    let outer = std::os::unix::net::UnixStream::connect(&remote.socket).map_err(|e| {
        format!(
            "no page stream at {} ({e}): the memory of a live migration's checkpoint comes only \
             from its source, through `podsnap receive`",
            remote.socket.display()
        )
    })?;
    use std::io::Write as _;
    // Which pod this is, before any byte of CRIU's: `podsnap receive` serves only its own.
    let hello = podsnap_checkpoint::format::layout::page_stream_hello(&remote.sandbox);
    (&outer).write_all(hello.as_bytes()).map_err(|e| {
        format!(
            "the page stream at {} ({e}): naming the pod to `podsnap receive`",
            remote.socket.display()
        )
    })?;
    let (daemon, shim) = crate::page_stream::pair().map_err(|e| e.to_string())?;
    let (name, state, inner) = (container.to_owned(), remote.state.clone(), shim.clone());
    let on_lost = Box::new(move |why: String| {
        log::error!(
            "container {name}: the source of its memory was lost ({why}) before every page \
             arrived: its processes are killed rather than run with missing memory"
        );
        // Under the lock the restore's end takes: either the cgroups are known here, or the
        // restore sees `lost` once it has them.
        let cg = match state.lock() {
            Ok(mut st) => {
                st.lost = Some(why);
                st.cgroups.clone()
            }
            Err(_) => None,
        };
        match cg {
            Some(cg) => {
                for _ in 0..100 {
                    match cg.kill_all() {
                        Ok(0) => break,
                        Ok(_) => std::thread::sleep(Duration::from_millis(20)),
                        Err(e) => {
                            log::warn!("container {name}: kill: {e}");
                            break;
                        }
                    }
                }
            }
            None => log::warn!("container {name}: not running yet: its restore fails"),
        }
        // Only now may the daemon see the end.
        let _ = inner.shutdown(std::net::Shutdown::Both);
    });
    crate::page_stream::carry(container.to_owned(), outer, shim, on_lost).map_err(|e| e.to_string())?;
    Ok(Arc::new(daemon))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_listens_in_the_restores_work_directory_and_detaches() {
        let cmd = command(Path::new("/ck/app/checkpoint"), Path::new("/run/b/criu-restore"));
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(cmd.get_program(), "criu");
        assert_eq!(
            args.join(" "),
            "lazy-pages --images-dir /ck/app/checkpoint --work-dir /run/b/criu-restore --daemon \
             --pidfile /run/b/criu-restore/lazy-pages.pid --log-file lazy-pages.log"
        );
    }

    #[test]
    fn only_an_unasked_failure_ends_the_container() {
        assert_eq!(Ended::of(0, false), Ended::Done);
        assert_eq!(Ended::of(1, false), Ended::Failed(1));
        assert_eq!(
            Ended::of(137, false),
            Ended::Failed(137),
            "killed by someone else"
        );
        assert_eq!(Ended::of(137, true), Ended::Stopped, "killed by the shim");
        assert_eq!(Ended::of(0, true), Ended::Stopped);
    }
}
