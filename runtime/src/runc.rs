//! A client for the runc command line.
//!
//! Each method runs one `runc` subcommand through the [`Launcher`]. Commands that hand the new
//! process its stdio (create, exec, restore) cannot capture runc's own stderr (it belongs to the
//! container), so runc logs those in JSON to a file and errors are read back from there.
//!
//! runc's checkpoint and restore options changed between the releases nodes run (bookworm's
//! 1.1.5, containerd 2.x nodes' 1.2 and 1.3): what a binary offers is read from its
//! `runc --version` once per binary and process ([`Runc::features`], [`RuncFeatures`]), never
//! assumed. (1.3's `--tcp-skip-in-flight` and `--link-remap` are not used: podsnap sets such
//! CRIU options in each container's CRIU configuration file, which works with every runc.)

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde::Deserialize;

use crate::launcher::{Capture, Launcher, Limit, Outcome};
use crate::{Error, Result};

/// How to reach runc and where it keeps its state.
#[derive(Clone)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
    systemd_cgroup: bool,
    launcher: Arc<dyn Launcher>,
}

impl std::fmt::Debug for Runc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runc")
            .field("binary", &self.binary)
            .field("root", &self.root)
            .finish()
    }
}

/// The stdio a new container or exec process gets: our ends of pipes, or `None` for /dev/null.
#[derive(Debug, Default)]
pub struct ProcessStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Options of `runc create`.
#[derive(Debug, Default)]
pub struct CreateOpts {
    pub pid_file: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub no_pivot: bool,
    pub no_new_keyring: bool,
    /// Where runc logs (JSON); errors are read back from here.
    pub log: PathBuf,
}

/// Options of `runc exec`.
#[derive(Debug, Default)]
pub struct ExecOpts {
    pub process_spec: PathBuf,
    pub pid_file: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub log: PathBuf,
}

/// How CRIU treats the container's cgroups (`--manage-cgroups-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupsMode {
    #[default]
    Default,
    Soft,
    Full,
    Strict,
    Ignore,
}

impl CgroupsMode {
    /// Parses containerd's `cgroups_mode` string; empty means runc's default.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "" => Ok(Self::Default),
            "soft" => Ok(Self::Soft),
            "full" => Ok(Self::Full),
            "strict" => Ok(Self::Strict),
            "ignore" => Ok(Self::Ignore),
            other => Err(Error::Invalid {
                what: "cgroups mode",
                reason: format!("{other:?} is none of soft, full, strict, ignore"),
            }),
        }
    }

    fn flag(self) -> Option<&'static str> {
        match self {
            Self::Default => None,
            Self::Soft => Some("soft"),
            Self::Full => Some("full"),
            Self::Strict => Some("strict"),
            Self::Ignore => Some("ignore"),
        }
    }
}

/// CRIU options shared by checkpoint and restore.
#[derive(Debug, Clone, Default)]
pub struct CriuOpts {
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    pub tcp_established: bool,
    pub external_unix_sockets: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    pub cgroups_mode: CgroupsMode,
}

/// Options of `runc checkpoint`.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOpts {
    pub criu: CriuOpts,
    pub parent_path: Option<PathBuf>,
    pub leave_running: bool,
    /// When runc and CRIU must be stopped (killed with every process they started).
    pub limit: Limit,
    /// The network namespace runc (and so CRIU) runs in, when not this process's: CRIU takes
    /// a container in its own network namespace as sharing CRIU's, and neither walks nor
    /// locks nor records it (see `podsnap_checkpoint::criu::container::DumpOptions`).
    pub netns: Option<PathBuf>,
    /// `--lazy-pages --page-server ADDR`: CRIU dumps everything but the anonymous memory,
    /// which its page server then serves to a `criu lazy-pages` daemon until it has every page
    /// (post-copy). With a `ps-socket` in CRIU's configuration file the page server uses that
    /// connected socket and listens nowhere.
    pub lazy_pages: Option<String>,
    /// Descriptors runc (and the CRIU it starts) gets at the given numbers.
    pub inherit_fds: Vec<(std::os::fd::RawFd, std::sync::Arc<OwnedFd>)>,
}

/// Options of `runc restore`.
#[derive(Debug, Default)]
pub struct RestoreOpts {
    pub criu: CriuOpts,
    pub pid_file: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub no_pivot: bool,
    pub log: PathBuf,
    /// Give up (killing runc, CRIU and the half-restored processes) after this long.
    pub deadline: Option<std::time::Duration>,
    /// `--lazy-pages`: CRIU leaves anonymous memory to a `criu lazy-pages` daemon listening
    /// on `lazy-pages.socket` in the work directory (userfaultfd).
    pub lazy_pages: bool,
    /// Descriptors runc (and the CRIU it starts, which inherits them) gets at the given
    /// numbers, for CRIU's `inherit-fd`.
    pub inherit_fds: Vec<(std::os::fd::RawFd, std::sync::Arc<OwnedFd>)>,
    /// The network namespace runc (and so CRIU) runs in, when not this process's: images of a
    /// container dumped in CRIU's own network namespace come back in CRIU's.
    pub netns: Option<PathBuf>,
}

/// The most descriptors a restore hands runc for CRIU's `inherit-fd`.
pub const MAX_INHERITED_FDS: usize = 64;

/// A runc release, from the first line of `runc --version` (`runc version 1.3.6+ds1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuncVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl RuncVersion {
    /// Reads `runc --version` output; `None` when its first line names no `X.Y[.Z]` release
    /// (a development build says `runc version unknown`).
    pub fn parse(version_output: &str) -> Option<Self> {
        let line = version_output.lines().next()?;
        let v = line.trim().strip_prefix("runc version")?.trim();
        let numeric: String = v
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = numeric.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = parts.next().flatten().unwrap_or(0);
        Some(Self { major, minor, patch })
    }

    fn at_least(self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl std::fmt::Display for RuncVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What a runc binary offers for checkpoint and restore, by its release: an unknown release
/// (a build that does not say) is taken to offer none of the newer options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuncFeatures {
    pub version: Option<RuncVersion>,
}

impl RuncFeatures {
    /// The features of the runc whose `runc --version` printed `version_output`.
    pub fn from_version_output(version_output: &str) -> Self {
        Self {
            version: RuncVersion::parse(version_output),
        }
    }

    fn at_least(&self, major: u32, minor: u32) -> bool {
        self.version.is_some_and(|v| v.at_least(major, minor))
    }

    /// `--manage-cgroups-mode ignore` (runc 1.2): CRIU neither dumps nor restores the
    /// container's cgroups; on restore runc alone puts the processes into the container's
    /// cgroup (as it does in every mode: CRIU starts inside it).
    pub fn cgroups_mode_ignore(&self) -> bool {
        self.at_least(1, 2)
    }

    /// On cgroup v2, runc tells CRIU the restored container's cgroup (CRIU's `cgroup_root`;
    /// runc 1.2, which dropped 1.1's "v1 only"). Without it CRIU restores the processes into
    /// the cgroup path they were dumped from.
    pub fn v2_cgroup_root(&self) -> bool {
        self.at_least(1, 2)
    }
}

/// What `runc state` reports.
#[derive(Debug, Clone, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub pid: i32,
    pub status: String,
    #[serde(default)]
    pub bundle: String,
}

impl Runc {
    /// A client for `binary` keeping container state under `root`.
    pub fn new(binary: impl Into<PathBuf>, root: impl Into<PathBuf>, launcher: Arc<dyn Launcher>) -> Self {
        Self {
            binary: binary.into(),
            root: root.into(),
            systemd_cgroup: false,
            launcher,
        }
    }

    /// Uses systemd to manage cgroups (`--systemd-cgroup`).
    pub fn with_systemd_cgroup(mut self, on: bool) -> Self {
        self.systemd_cgroup = on;
        self
    }

    /// Whether runc is told to use systemd for cgroups (containerd's `SystemdCgroup`): the
    /// container's `cgroupsPath` is then `slice:prefix:name`.
    pub fn systemd_cgroup(&self) -> bool {
        self.systemd_cgroup
    }

    /// runc's state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The runc binary (a name looked up on `PATH`, or a path).
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// What this runc offers, from `runc --version`: run once per binary in this process (a
    /// binary does not change under a running shim), later calls answer from memory. A runc
    /// that cannot be run is an error; one that does not say its release offers nothing new.
    pub async fn features(&self) -> Result<RuncFeatures> {
        static KNOWN: std::sync::Mutex<Vec<(PathBuf, RuncFeatures)>> = std::sync::Mutex::new(Vec::new());
        let known = |binary: &Path| {
            KNOWN
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .find(|(b, _)| b == binary)
                .map(|(_, f)| *f)
        };
        if let Some(f) = known(&self.binary) {
            return Ok(f);
        }
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--version").stdin(Stdio::null());
        let out = self
            .launcher
            .run(cmd, Capture::Output)
            .await
            .map_err(|source| Error::Launch {
                binary: self.binary.display().to_string(),
                source,
            })?;
        if !out.success() {
            return Err(runc_error(
                "--version",
                "-",
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let features = RuncFeatures::from_version_output(&text);
        match features.version {
            Some(v) => log::info!("{}: runc {v}", self.binary.display()),
            None => log::warn!(
                "{}: its release is unknown ({:?}): none of the newer checkpoint options is used",
                self.binary.display(),
                text.lines().next().unwrap_or_default()
            ),
        }
        let mut all = KNOWN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !all.iter().any(|(b, _)| *b == self.binary) {
            all.push((self.binary.clone(), features));
        }
        Ok(features)
    }

    fn command(&self, log: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        if let Some(log) = log {
            cmd.arg("--log").arg(log).arg("--log-format").arg("json");
        }
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    async fn run(&self, what: &str, id: &str, cmd: Command) -> Result<Outcome> {
        self.run_within(what, id, cmd, &Limit::default()).await
    }

    /// Runs runc within `limit`; a deadline passed or a caller that gave up is runc's error.
    async fn run_within(&self, what: &str, id: &str, cmd: Command, limit: &Limit) -> Result<Outcome> {
        let out = self
            .launcher
            .run_limited(cmd, Capture::Output, limit)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted => {
                    runc_error(what, id, source.to_string())
                }
                _ => Error::Launch {
                    binary: self.binary.display().to_string(),
                    source,
                },
            })?;
        if out.success() {
            return Ok(out);
        }
        let mut message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if message.is_empty() {
            message = format!("exit status {}", out.code);
        }
        Err(runc_error(what, id, message))
    }

    async fn run_with_stdio(
        &self,
        what: &str,
        id: &str,
        mut cmd: Command,
        stdio: ProcessStdio,
        log: &Path,
        deadline: Option<std::time::Duration>,
    ) -> Result<()> {
        cmd.stdin(stdio_of(stdio.stdin));
        cmd.stdout(stdio_of(stdio.stdout));
        cmd.stderr(stdio_of(stdio.stderr));
        let ran = match deadline {
            Some(d) => self.launcher.run_until(cmd, Capture::Inherit, d).await,
            None => self.launcher.run(cmd, Capture::Inherit).await,
        };
        let out = match ran {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(runc_error(what, id, e.to_string()));
            }
            Err(source) => {
                return Err(Error::Launch {
                    binary: self.binary.display().to_string(),
                    source,
                })
            }
        };
        if out.success() {
            return Ok(());
        }
        let message = last_error_in_log(log).unwrap_or_else(|| format!("exit status {}", out.code));
        Err(runc_error(what, id, message))
    }

    /// `runc create`: sets the container up, its process waits for `start`.
    pub async fn create(&self, id: &str, bundle: &Path, opts: CreateOpts, stdio: ProcessStdio) -> Result<()> {
        let mut cmd = self.command(Some(&opts.log));
        cmd.arg("create").arg("--bundle").arg(bundle);
        cmd.arg("--pid-file").arg(&opts.pid_file);
        if let Some(sock) = &opts.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        if opts.no_pivot {
            cmd.arg("--no-pivot");
        }
        if opts.no_new_keyring {
            cmd.arg("--no-new-keyring");
        }
        cmd.arg(id);
        self.run_with_stdio("create", id, cmd, stdio, &opts.log, None)
            .await
    }

    /// `runc start`.
    pub async fn start(&self, id: &str) -> Result<()> {
        let mut cmd = self.command(None);
        cmd.args(["start", id]);
        self.run("start", id, cmd).await.map(drop)
    }

    /// `runc state`.
    pub async fn state(&self, id: &str) -> Result<ContainerState> {
        let mut cmd = self.command(None);
        cmd.args(["state", id]);
        let out = self.run("state", id, cmd).await?;
        serde_json::from_slice(&out.stdout).map_err(|e| Error::Invalid {
            what: "runc state output",
            reason: e.to_string(),
        })
    }

    /// `runc kill`: sends `signal` to the container's init (or every process with `all`).
    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let mut cmd = self.command(None);
        cmd.arg("kill");
        if all {
            cmd.arg("--all");
        }
        cmd.arg(id).arg(signal.to_string());
        self.run("kill", id, cmd).await.map(drop)
    }

    /// `runc delete`.
    pub async fn delete(&self, id: &str, force: bool) -> Result<()> {
        let mut cmd = self.command(None);
        cmd.arg("delete");
        if force {
            cmd.arg("--force");
        }
        cmd.arg(id);
        self.run("delete", id, cmd).await.map(drop)
    }

    /// `runc pause`: freezes the container's cgroup.
    pub async fn pause(&self, id: &str) -> Result<()> {
        let mut cmd = self.command(None);
        cmd.args(["pause", id]);
        self.run("pause", id, cmd).await.map(drop)
    }

    /// `runc resume`: thaws the container's cgroup.
    pub async fn resume(&self, id: &str) -> Result<()> {
        let mut cmd = self.command(None);
        cmd.args(["resume", id]);
        self.run("resume", id, cmd).await.map(drop)
    }

    /// `runc ps`: the host pids of every process in the container.
    pub async fn ps(&self, id: &str) -> Result<Vec<i32>> {
        let mut cmd = self.command(None);
        cmd.args(["ps", "--format", "json", id]);
        let out = self.run("ps", id, cmd).await?;
        let pids: Option<Vec<i32>> = serde_json::from_slice(&out.stdout).map_err(|e| Error::Invalid {
            what: "runc ps output",
            reason: e.to_string(),
        })?;
        Ok(pids.unwrap_or_default())
    }

    /// `runc exec --detach`: starts an additional process in the container.
    pub async fn exec(&self, id: &str, opts: ExecOpts, stdio: ProcessStdio) -> Result<()> {
        let mut cmd = self.command(Some(&opts.log));
        cmd.arg("exec").arg("--detach");
        cmd.arg("--process").arg(&opts.process_spec);
        cmd.arg("--pid-file").arg(&opts.pid_file);
        if let Some(sock) = &opts.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id);
        self.run_with_stdio("exec", id, cmd, stdio, &opts.log, None).await
    }

    /// `runc update --resources FILE`: applies new resource limits (OCI LinuxResources JSON).
    pub async fn update(&self, id: &str, resources_json: &Path) -> Result<()> {
        let mut cmd = self.command(None);
        cmd.arg("update").arg("--resources").arg(resources_json).arg(id);
        self.run("update", id, cmd).await.map(drop)
    }

    /// `runc checkpoint`: dumps the container with CRIU into `opts.criu.image_path`.
    pub async fn checkpoint(&self, id: &str, opts: &CheckpointOpts) -> Result<()> {
        let mut cmd = self.command(None);
        cmd.arg("checkpoint");
        push_criu_args(&mut cmd, &opts.criu);
        if let Some(parent) = &opts.parent_path {
            cmd.arg("--parent-path").arg(parent);
        }
        if opts.leave_running {
            cmd.arg("--leave-running");
        }
        if let Some(server) = &opts.lazy_pages {
            cmd.arg("--lazy-pages").arg("--page-server").arg(server);
        }
        cmd.arg(id);
        inherit_fds(&mut cmd, "checkpoint", id, &opts.inherit_fds)?;
        let _netns = enter_netns(&mut cmd, opts.netns.as_deref())?;
        self.run_within("checkpoint", id, cmd, &opts.limit)
            .await
            .map(drop)
    }

    /// `runc restore --detach`: brings a container back from CRIU images.
    pub async fn restore(
        &self,
        id: &str,
        bundle: &Path,
        opts: RestoreOpts,
        stdio: ProcessStdio,
    ) -> Result<()> {
        let mut cmd = self.command(Some(&opts.log));
        cmd.arg("restore").arg("--detach");
        cmd.arg("--bundle").arg(bundle);
        cmd.arg("--pid-file").arg(&opts.pid_file);
        push_criu_args(&mut cmd, &opts.criu);
        if let Some(sock) = &opts.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        if opts.no_pivot {
            cmd.arg("--no-pivot");
        }
        if opts.lazy_pages {
            cmd.arg("--lazy-pages");
        }
        cmd.arg(id);
        inherit_fds(&mut cmd, "restore", id, &opts.inherit_fds)?;
        let _netns = enter_netns(&mut cmd, opts.netns.as_deref())?;
        let ran = self
            .run_with_stdio("restore", id, cmd, stdio, &opts.log, opts.deadline)
            .await;
        drop(opts.inherit_fds);
        ran
    }
}

/// Makes `cmd` start with each of `fds` at its given number (without close-on-exec: runc and
/// the CRIU it starts keep them). `what`, `id`: the command and container, for errors.
pub fn inherit_fds(
    cmd: &mut Command,
    what: &str,
    id: &str,
    fds: &[(std::os::fd::RawFd, std::sync::Arc<OwnedFd>)],
) -> Result<()> {
    if fds.len() > MAX_INHERITED_FDS {
        return Err(runc_error(
            what,
            id,
            format!(
                "{} descriptors to hand CRIU, more than {MAX_INHERITED_FDS}",
                fds.len()
            ),
        ));
    }
    if !fds.is_empty() {
        let moves: Vec<(std::os::fd::RawFd, std::os::fd::RawFd)> = fds
            .iter()
            .map(|(at, fd)| (*at, std::os::fd::AsRawFd::as_raw_fd(fd.as_ref())))
            .collect();
        let above = moves.iter().map(|(at, _)| *at).max().unwrap_or(0) + 1;
        // SAFETY: between fork and exec the closure only calls fcntl and dup2, which are
        // async-signal-safe; the caller keeps the descriptors open until the program has ended.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, move || {
                // Each source is first copied above every target (close-on-exec), so no
                // dup2 overwrites a source still to move, and a source already at its
                // number still gets a copy without close-on-exec.
                let mut copies = [0; MAX_INHERITED_FDS];
                for (i, (_, fd)) in moves.iter().enumerate().take(copies.len()) {
                    copies[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above);
                    if copies[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, (at, _)) in moves.iter().enumerate().take(copies.len()) {
                    // dup2 leaves the copy without close-on-exec: runc and CRIU keep it.
                    if libc::dup2(copies[i], *at) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    Ok(())
}

/// Makes `cmd` start in the network namespace at `netns` (when given); the returned file must
/// stay open until `cmd` has started.
fn enter_netns(cmd: &mut Command, netns: Option<&Path>) -> Result<Option<std::fs::File>> {
    let Some(path) = netns else {
        return Ok(None);
    };
    let file = std::fs::File::open(path).map_err(|e| Error::Invalid {
        what: "network namespace to run runc in",
        reason: format!("{}: {e}", path.display()),
    })?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: between fork and exec the closure only calls setns, async-signal-safe; the
    // descriptor stays open (in the returned file) until the command has started.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(Some(file))
}

fn push_criu_args(cmd: &mut Command, o: &CriuOpts) {
    cmd.arg("--image-path").arg(&o.image_path);
    if let Some(work) = &o.work_path {
        cmd.arg("--work-path").arg(work);
    }
    if o.tcp_established {
        cmd.arg("--tcp-established");
    }
    if o.external_unix_sockets {
        cmd.arg("--ext-unix-sk");
    }
    if o.shell_job {
        cmd.arg("--shell-job");
    }
    if o.file_locks {
        cmd.arg("--file-locks");
    }
    for ns in &o.empty_namespaces {
        cmd.arg("--empty-ns").arg(ns);
    }
    if let Some(mode) = o.cgroups_mode.flag() {
        cmd.arg("--manage-cgroups-mode").arg(mode);
    }
}

fn stdio_of(fd: Option<OwnedFd>) -> Stdio {
    fd.map(Stdio::from).unwrap_or_else(Stdio::null)
}

fn runc_error(what: &str, id: &str, message: String) -> Error {
    // runc often starts its own message with "runc <command> failed: "; say it once.
    let prefix = format!("runc {what} failed: ");
    let message = message
        .strip_prefix(&prefix)
        .map(str::to_string)
        .unwrap_or(message);
    Error::Runc {
        command: what.to_string(),
        id: id.to_string(),
        message,
    }
}

/// The last error runc wrote to its JSON log, if any.
pub fn last_error_in_log(log: &Path) -> Option<String> {
    #[derive(Deserialize)]
    struct Line {
        level: String,
        msg: String,
    }
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .find(|l| l.level == "error" || l.level == "fatal")
        .map(|l| l.msg)
}

/// Builds the argument list a command would run with (for logs and tests).
pub fn describe(cmd: &Command) -> String {
    let mut parts: Vec<OsString> = vec![cmd.get_program().to_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_owned()));
    parts
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A launcher that records commands and answers from a script.
    struct Scripted {
        seen: Mutex<Vec<String>>,
        answer: Outcome,
    }

    #[async_trait::async_trait]
    impl Launcher for Scripted {
        async fn run(&self, cmd: Command, _capture: Capture) -> std::io::Result<Outcome> {
            self.seen.lock().expect("lock").push(describe(&cmd));
            Ok(self.answer.clone())
        }
    }

    fn runc(answer: Outcome) -> (Runc, Arc<Scripted>) {
        let s = Arc::new(Scripted {
            seen: Mutex::new(Vec::new()),
            answer,
        });
        (Runc::new("runc", "/run/r", s.clone()), s)
    }

    #[tokio::test]
    async fn checkpoint_passes_every_criu_option() {
        let (r, seen) = runc(Outcome::default());
        let opts = CheckpointOpts {
            criu: CriuOpts {
                image_path: "/img".into(),
                work_path: Some("/work".into()),
                tcp_established: true,
                external_unix_sockets: true,
                shell_job: true,
                file_locks: true,
                empty_namespaces: vec!["network".into()],
                cgroups_mode: CgroupsMode::Soft,
            },
            parent_path: Some("/parent".into()),
            leave_running: true,
            limit: Limit::default(),
            netns: None,
            lazy_pages: Some("127.0.0.1:1".into()),
            inherit_fds: Vec::new(),
        };
        r.checkpoint("c1", &opts).await.expect("checkpoint");
        let line = seen.seen.lock().expect("lock")[0].clone();
        assert_eq!(
            line,
            "runc --root /run/r checkpoint --image-path /img --work-path /work --tcp-established \
             --ext-unix-sk --shell-job --file-locks --empty-ns network --manage-cgroups-mode soft \
             --parent-path /parent --leave-running --lazy-pages --page-server 127.0.0.1:1 c1"
        );
    }

    #[tokio::test]
    async fn failure_quotes_stderr() {
        let (r, _) = runc(Outcome {
            code: 1,
            stdout: vec![],
            stderr: b"container does not exist\n".to_vec(),
        });
        let err = r.kill("nope", 9, false).await.expect_err("must fail");
        assert_eq!(
            err.to_string(),
            "runc kill failed for nope: container does not exist"
        );
    }

    #[test]
    fn versions_tell_the_checkpoint_options() {
        let old = RuncFeatures::from_version_output(
            "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\n",
        );
        assert_eq!(
            old.version,
            Some(RuncVersion {
                major: 1,
                minor: 1,
                patch: 5
            })
        );
        assert!(!old.cgroups_mode_ignore() && !old.v2_cgroup_root());
        let v12 = RuncFeatures::from_version_output("runc version 1.2.0-rc.1\n");
        assert!(v12.cgroups_mode_ignore() && v12.v2_cgroup_root());
        let v13 = RuncFeatures::from_version_output("runc version 1.3.6+ds1\ncommit: x\n");
        assert_eq!(v13.version.map(|v| v.to_string()).as_deref(), Some("1.3.6"));
        assert!(v13.cgroups_mode_ignore() && v13.v2_cgroup_root());
        let v2 = RuncFeatures::from_version_output("runc version 2.0\n");
        assert!(v2.cgroups_mode_ignore(), "a later major offers them too");
        for unknown in [
            "runc version unknown\n",
            "",
            "crun version 1.28\n",
            "runc version 1\n",
        ] {
            let f = RuncFeatures::from_version_output(unknown);
            assert_eq!(f.version, None, "{unknown:?}");
            assert!(!f.cgroups_mode_ignore(), "{unknown:?}: nothing is assumed");
        }
    }

    #[tokio::test]
    async fn features_are_read_once_per_binary() {
        let (_, seen) = runc(Outcome {
            code: 0,
            stdout: b"runc version 1.3.6+ds1\n".to_vec(),
            stderr: vec![],
        });
        let r = Runc::new("/test/only/runc-features-once", "/run/r", seen.clone());
        assert!(r.features().await.expect("features").cgroups_mode_ignore());
        assert!(r.features().await.expect("features").v2_cgroup_root());
        assert_eq!(
            *seen.seen.lock().expect("lock"),
            ["/test/only/runc-features-once --version"]
        );
    }

    #[test]
    fn cgroups_mode_rejects_unknown() {
        assert!(CgroupsMode::parse("weird").is_err());
        assert_eq!(CgroupsMode::parse("").expect("empty"), CgroupsMode::Default);
        assert_eq!(CgroupsMode::parse("strict").expect("strict"), CgroupsMode::Strict);
    }

    #[test]
    fn reads_last_error_from_json_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log.json");
        std::fs::write(
            &log,
            "{\"level\":\"info\",\"msg\":\"hello\"}\n{\"level\":\"error\",\"msg\":\"exec: no such file\"}\n{\"level\":\"info\",\"msg\":\"bye\"}\n",
        )
        .expect("write");
        assert_eq!(last_error_in_log(&log).as_deref(), Some("exec: no such file"));
    }
}
