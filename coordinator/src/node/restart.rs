//! Restarting containerd on the host, the way the host runs it.
//!
//! In order:
//! 1. `--restart-command CMD`: `/bin/sh -c CMD` in the host's namespaces.
//! 2. systemd runs on the host (`/run/systemd/system` exists under the host root): systemd's
//!    `RestartUnit` over D-Bus (the system bus socket under the host root), waiting for the job's
//!    `JobRemoved` signal and its result; the unit is the first of the flavour's units systemd
//!    knows (`containerd.service`, `k3s.service`, ...).
//! 3. no system bus but systemd: `systemctl restart UNIT` in the host's namespaces.
//!
//! "The host's namespaces" are those of the running containerd (mount, UTS, IPC, network, PID,
//! cgroup): its pid comes from the CRI socket's peer credentials (the DaemonSet's pod runs with
//! `hostPID`, so that pid is valid there), else PID 1's are taken. They are opened once, before
//! the first restart (a restart that fails leaves no containerd to ask, and the rollback's
//! restart needs them again), and entered with `setns` in the child before it executes, where
//! they differ from the installer's own; on the node itself they are the installer's.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;

use super::discover::Flavor;
use super::host_root::HostRoot;
use super::Error;

/// How containerd is restarted on this host, and the namespaces commands run in.
#[derive(Debug, Clone)]
pub struct Restarter {
    /// The way.
    pub how: Restart,
    namespaces: std::sync::Arc<Vec<(OwnedFd, nix::sched::CloneFlags)>>,
}

impl std::fmt::Display for Restarter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.how.fmt(f)
    }
}

/// How containerd is restarted on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// A shell command of the operator's.
    Command(String),
    /// systemd over D-Bus (the socket's path as the installer sees it).
    SystemdBus {
        /// The system bus socket.
        socket: std::path::PathBuf,
        /// Candidate units, the first systemd knows is restarted.
        units: Vec<String>,
    },
    /// `systemctl restart` in the host's namespaces.
    Systemctl {
        /// Candidate units.
        units: Vec<String>,
    },
}

impl std::fmt::Display for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Restart::Command(c) => write!(f, "the restart command `{c}`"),
            Restart::SystemdBus { units, .. } => write!(f, "systemd over D-Bus ({})", units.join(" or ")),
            Restart::Systemctl { units } => write!(f, "systemctl restart ({})", units.join(" or ")),
        }
    }
}

/// Chooses how to restart containerd and opens the host's namespaces (containerd's, found
/// through the CRI socket `endpoint`; see the module header).
pub fn restarter(
    host: &HostRoot,
    flavor: Flavor,
    command: Option<&str>,
    endpoint: &str,
) -> Result<Restarter, Error> {
    let how = choose(host, flavor, command)?;
    let pid = crate::cri::socket_path(endpoint).ok().and_then(|p| peer_pid(&p));
    Ok(Restarter {
        how,
        namespaces: std::sync::Arc::new(host_namespaces(pid.unwrap_or(1))),
    })
}

/// The pid of the process listening on unix socket `path` (its peer credentials).
fn peer_pid(path: &Path) -> Option<i32> {
    let stream = std::os::unix::net::UnixStream::connect(path).ok()?;
    let creds = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    (creds.pid() > 0).then_some(creds.pid())
}

/// Chooses how to restart containerd (see the module header).
pub fn choose(host: &HostRoot, flavor: Flavor, command: Option<&str>) -> Result<Restart, Error> {
    if let Some(command) = command {
        return Ok(Restart::Command(command.to_owned()));
    }
    let units: Vec<String> = flavor.units().iter().map(|u| (*u).to_owned()).collect();
    if host.exists(Path::new("/run/systemd/system")) {
        let socket = host.outside(Path::new("/run/dbus/system_bus_socket"));
        if socket.exists() {
            return Ok(Restart::SystemdBus { socket, units });
        }
        return Ok(Restart::Systemctl { units });
    }
    Err(Error::Restart(format!(
        "containerd must be restarted, and systemd does not run on the host ({} has no \
         /run/systemd/system): give the command that restarts containerd with --restart-command",
        host.path().display()
    )))
}

impl Restarter {
    /// Restarts containerd; returns when the restart was carried out (not when containerd is
    /// ready: the caller waits for CRI).
    pub async fn run(&self, timeout: Duration) -> Result<(), Error> {
        let namespaces = &self.namespaces;
        match &self.how {
            Restart::Command(command) => {
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c").arg(command);
                run_in_host(
                    cmd,
                    namespaces,
                    timeout,
                    &format!("the restart command `{command}`"),
                )
                .await
            }
            Restart::Systemctl { units } => {
                let mut last = String::new();
                for unit in units {
                    let mut cmd = Command::new("systemctl");
                    cmd.args(["restart", unit]);
                    match run_in_host(cmd, namespaces, timeout, &format!("systemctl restart {unit}")).await {
                        Ok(()) => return Ok(()),
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(Error::Restart(last))
            }
            Restart::SystemdBus { socket, units } => {
                tokio::time::timeout(timeout, restart_over_bus(socket, units))
                    .await
                    .map_err(|_| {
                        Error::Restart(format!(
                            "systemd did not finish restarting {} within {timeout:?}",
                            units.join(" or ")
                        ))
                    })?
            }
        }
    }
}

/// `RestartUnit(unit, "replace")` on systemd's manager, then the job's `JobRemoved`.
async fn restart_over_bus(socket: &Path, units: &[String]) -> Result<(), Error> {
    let bus_error =
        |e: zbus::Error| Error::Restart(format!("systemd over D-Bus ({}): {e}", socket.display()));
    let connection = zbus::connection::Builder::address(format!("unix:path={}", socket.display()).as_str())
        .map_err(bus_error)?
        .build()
        .await
        .map_err(bus_error)?;
    let manager = zbus::Proxy::new(
        &connection,
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
    )
    .await
    .map_err(bus_error)?;
    // The first unit systemd has loaded.
    let mut chosen = None;
    for unit in units {
        let found: zbus::Result<zbus::zvariant::OwnedObjectPath> =
            manager.call("GetUnit", &(unit.as_str(),)).await;
        if found.is_ok() {
            chosen = Some(unit.clone());
            break;
        }
    }
    let unit = chosen.ok_or_else(|| {
        Error::Restart(format!(
            "systemd runs none of {}: give the command that restarts containerd with --restart-command",
            units.join(", ")
        ))
    })?;
    let () = manager.call("Subscribe", &()).await.map_err(bus_error)?;
    let mut removed = manager.receive_signal("JobRemoved").await.map_err(bus_error)?;
    let job: zbus::zvariant::OwnedObjectPath = manager
        .call("RestartUnit", &(unit.as_str(), "replace"))
        .await
        .map_err(bus_error)?;
    log::info!("systemd restarts {unit} (job {})", job.as_str());
    while let Some(message) = removed.next().await {
        let Ok((_id, path, _unit, result)) =
            message
                .body()
                .deserialize::<(u32, zbus::zvariant::OwnedObjectPath, String, String)>()
        else {
            continue;
        };
        if path == job {
            return match result.as_str() {
                "done" => Ok(()),
                other => Err(Error::Restart(format!(
                    "systemd's restart of {unit} ended with `{other}` (see `journalctl -u {unit}` on the node)"
                ))),
            };
        }
    }
    Err(Error::Restart(format!(
        "the D-Bus connection closed while systemd restarted {unit}"
    )))
}

/// The namespaces of process `pid` that differ from ours, opened, in the order they are entered
/// (none when they cannot be read).
fn host_namespaces(pid: i32) -> Vec<(OwnedFd, nix::sched::CloneFlags)> {
    use nix::sched::CloneFlags;
    let kinds = [
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        // The mount namespace last: the others are opened by path from here.
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let mut found = Vec::new();
    for (name, flag) in kinds {
        let host = format!("/proc/{pid}/ns/{name}");
        let ours = format!("/proc/self/ns/{name}");
        let (Ok(h), Ok(o)) = (std::fs::read_link(&host), std::fs::read_link(&ours)) else {
            continue;
        };
        if h == o {
            continue;
        }
        match std::fs::File::open(&host) {
            Ok(f) => found.push((OwnedFd::from(f), flag)),
            Err(e) => {
                log::warn!("cannot open {host} ({e}): the command runs in the installer's {name} namespace")
            }
        }
    }
    found
}

/// Runs `cmd` in the host's namespaces, its output logged; fails on a non-zero exit or after
/// `timeout` (then it is killed).
async fn run_in_host(
    mut cmd: Command,
    namespaces: &[(OwnedFd, nix::sched::CloneFlags)],
    timeout: Duration,
    what: &str,
) -> Result<(), Error> {
    if !namespaces.is_empty() {
        let raw: Vec<(i32, nix::sched::CloneFlags)> = namespaces
            .iter()
            .map(|(fd, flag)| (fd.as_raw_fd(), *flag))
            .collect();
        // SAFETY: the closure runs in the forked child before exec and calls only setns(2) and
        // chdir(2), which are async-signal-safe, on descriptors the parent keeps open (the
        // Restarter owns them until the child has executed).
        unsafe {
            cmd.pre_exec(move || {
                for (fd, flag) in &raw {
                    // SAFETY: `fd` is an open namespace descriptor owned by the parent, which
                    // outlives the child's exec.
                    let borrowed = std::os::fd::BorrowedFd::borrow_raw(*fd);
                    nix::sched::setns(borrowed, *flag).map_err(std::io::Error::from)?;
                }
                nix::unistd::chdir("/").map_err(std::io::Error::from)?;
                Ok(())
            });
        }
    }
    cmd.stdin(std::process::Stdio::null());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let output = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| Error::Restart(format!("{what} did not finish within {timeout:?}")))?
        .map_err(|e| Error::Restart(format!("{what} could not run: {e}")))?;
    let tail = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    };
    if output.status.success() {
        log::info!("{what}: done");
        Ok(())
    } else {
        Err(Error::Restart(format!(
            "{what} failed ({}): {}{}",
            output.status,
            tail(&output.stderr),
            tail(&output.stdout)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(c: &str) -> Restarter {
        Restarter {
            how: Restart::Command(c.to_owned()),
            namespaces: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_command_runs_and_its_failure_is_reported() {
        command("true")
            .run(Duration::from_secs(10))
            .await
            .expect("true succeeds");
        let err = command("echo broken >&2; exit 3")
            .run(Duration::from_secs(10))
            .await
            .expect_err("exit 3")
            .to_string();
        assert!(err.contains("broken") && err.contains("exit status: 3"), "{err}");
        let err = command("sleep 5")
            .run(Duration::from_millis(200))
            .await
            .expect_err("too slow")
            .to_string();
        assert!(err.contains("did not finish"), "{err}");
    }

    #[test]
    fn without_systemd_a_command_is_required() {
        let root = tempfile::tempdir().expect("tempdir");
        let host = HostRoot::open(root.path()).expect("open");
        let err = choose(&host, Flavor::Containerd, None)
            .expect_err("no systemd")
            .to_string();
        assert!(err.contains("--restart-command"), "{err}");
        std::fs::create_dir_all(root.path().join("run/systemd/system")).expect("mkdir");
        assert_eq!(
            choose(&host, Flavor::K3s, None).expect("systemd"),
            Restart::Systemctl {
                units: vec!["k3s.service".to_owned(), "k3s-agent.service".to_owned()]
            }
        );
        assert_eq!(
            choose(&host, Flavor::Containerd, Some("x")).expect("explicit"),
            Restart::Command("x".to_owned())
        );
    }
}
