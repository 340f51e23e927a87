//! Starting external programs (runc, criu, mount) and waiting for them.
//!
//! A shim is a child subreaper that reaps every child on SIGCHLD. A program it starts must
//! therefore be waited for through the shim's own exit notifications, never with `waitpid` on
//! the side, or the two race for the exit status. [`Launcher`] is that seam: the shim supplies
//! an implementation backed by its reaper; [`TokioLauncher`] serves everywhere else.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;

/// The outcome of a program run to completion.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Exit code; 128+N when killed by signal N.
    pub code: i32,
    /// Captured standard output (empty unless capture was asked for).
    pub stdout: Vec<u8>,
    /// Captured standard error (empty unless capture was asked for).
    pub stderr: Vec<u8>,
}

impl Outcome {
    /// Whether the program exited with status 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// How output of a launched program is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// Capture stdout and stderr into the [`Outcome`].
    Output,
    /// Leave stdio as the caller set it on the command (e.g. a container's pipes).
    Inherit,
}

/// When a program must stop: at a deadline, or earlier when its caller gives up (the value of
/// `cancel` turns `true`). The program and every process it started are then killed.
#[derive(Debug, Clone, Default)]
pub struct Limit {
    pub deadline: Option<tokio::time::Instant>,
    pub cancel: Option<tokio::sync::watch::Receiver<bool>>,
    /// Told the pid of each program started under this limit, as soon as it runs (a pod
    /// dump's crash journal records its workers so).
    pub spawned: Option<Spawned>,
}

/// What a launcher tells of each program it starts under a [`Limit`]: its pid. And, if
/// marked, the mark every such program carries in its environment ([`MARK_ENV`]), which the
/// programs it starts inherit (runc hands its environment to CRIU, CRIU to its scripts).
#[derive(Clone)]
pub struct Spawned(std::sync::Arc<dyn Fn(i32) + Send + Sync>, Option<String>);

/// The environment variable naming the [`Spawned::marked`] mark of a program and of everything
/// it starts.
pub const MARK_ENV: &str = "PODSNAP_WORKER_MARK";

impl Spawned {
    pub fn new(f: impl Fn(i32) + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f), None)
    }

    /// Every program started under the limit carries `mark` (see [`MARK_ENV`]): found by
    /// [`kill_marked`] even if its pid was never told (its starter died in between).
    pub fn marked(mut self, mark: &str) -> Self {
        self.1 = Some(mark.to_owned());
        self
    }
}

/// A fresh random mark (128 bits, hex) for [`Spawned::marked`].
pub fn new_mark() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut got = 0;
    while got < bytes.len() {
        // SAFETY: getrandom writes at most the given length into the buffer, alive and
        // exclusively borrowed across the call.
        let n = unsafe { libc::getrandom(bytes[got..].as_mut_ptr().cast(), bytes.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += n as usize;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Kills every process whose environment holds exactly `MARK_ENV=mark` (a program started
/// under a [`Spawned::marked`] limit, or one of its descendants), each with its own tree.
/// Returns how many were found. An empty mark finds nothing.
pub fn kill_marked(mark: &str) -> usize {
    if mark.is_empty() {
        return 0;
    }
    let entry = format!("{MARK_ENV}={mark}");
    let marked: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == entry.as_bytes()))
        })
        .collect();
    for pid in &marked {
        log::warn!("killing pid {pid}: it carries the mark of a dead pod dump");
        kill_tree(*pid);
    }
    marked.len()
}

impl std::fmt::Debug for Spawned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Spawned")
    }
}

impl Limit {
    /// A limit `after` from now, cancelled early through `cancel` if given.
    pub fn after(after: Duration, cancel: Option<tokio::sync::watch::Receiver<bool>>) -> Self {
        Self {
            deadline: Some(tokio::time::Instant::now() + after),
            cancel,
            spawned: None,
        }
    }

    /// Tells [`Limit::spawned`] (when set) that the program `pid` was started under this limit.
    /// Launchers call it right after the start, before waiting.
    pub fn started(&self, pid: i32) {
        if let Some(Spawned(f, _)) = &self.spawned {
            f(pid);
        }
    }

    /// Gives `cmd` the mark of [`Limit::spawned`], if any. Launchers call it before the start.
    pub fn prepare(&self, cmd: &mut Command) {
        if let Some(Spawned(_, Some(mark))) = &self.spawned {
            cmd.env(MARK_ENV, mark);
        }
    }

    /// Whether the caller gave up.
    pub fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| *c.borrow())
    }

    /// Whether the deadline passed.
    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
    }

    /// Resolves when the deadline passes (`TimedOut`) or the caller gives up (`Interrupted`);
    /// never, without either.
    pub async fn reached(&self) -> std::io::Error {
        let deadline = async {
            match self.deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending::<()>().await,
            }
        };
        let mut cancel = self.cancel.clone();
        let cancelled = async {
            match cancel.as_mut() {
                Some(rx) => {
                    if rx.wait_for(|v| *v).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = deadline => std::io::Error::new(std::io::ErrorKind::TimedOut, "the deadline passed"),
            () = cancelled => cancelled_error(),
        }
    }
}

/// The error of a program whose caller gave up.
pub fn cancelled_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        "the caller gave up: it was killed",
    )
}

/// Starts a program and waits for it to exit.
#[async_trait]
pub trait Launcher: Send + Sync {
    /// Runs `cmd` to completion.
    async fn run(&self, cmd: Command, capture: Capture) -> std::io::Result<Outcome>;

    /// Runs `cmd` within `limit`: past its deadline, or once its caller gives up, the program
    /// and every process it started are killed, and the result is a `TimedOut` or
    /// `Interrupted` error.
    /// The default ignores the limit: right for test doubles only; both real launchers
    /// override it.
    async fn run_limited(&self, cmd: Command, capture: Capture, limit: &Limit) -> std::io::Result<Outcome> {
        let _ = limit;
        self.run(cmd, capture).await
    }

    /// Runs `cmd`, but gives up after `deadline`: the program and every process it started
    /// are killed, and the result is a `TimedOut` error.
    async fn run_until(
        &self,
        cmd: Command,
        capture: Capture,
        deadline: Duration,
    ) -> std::io::Result<Outcome> {
        self.run_limited(cmd, capture, &Limit::after(deadline, None))
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::TimedOut => timed_out(deadline),
                _ => e,
            })
    }
}

/// The error of a program that ran past its deadline.
pub fn timed_out(deadline: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("did not finish within {} s and was killed", deadline.as_secs()),
    )
}

/// Kills `pid` and every process descending from it (found through `/proc`). The tree is
/// stopped top-down first (`SIGSTOP`, waiting until each is stopped): a stopped process forks
/// no more, so a child forked while the tree is walked (runc starting CRIU) is seen instead of
/// outliving its killed parent. Then every process of it is killed.
pub fn kill_tree(pid: i32) {
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        stop_and_wait(parent);
        tree.extend(children_of(parent));
        i += 1;
    }
    for p in tree {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(p, libc::SIGKILL);
        }
    }
}

/// Sends `SIGSTOP` and waits (at most 100 ms: a process in uninterruptible sleep stops later)
/// until the process is stopped or gone.
fn stop_and_wait(pid: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
        return;
    }
    for _ in 0..100 {
        match process_state(pid) {
            None | Some('T' | 't' | 'Z' | 'X') => return,
            Some(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// The state letter of `/proc/<pid>/stat` (after the command's closing parenthesis).
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

/// A launcher that waits with tokio's own child handling. Right for any process that is not a
/// reaping shim (tests, the CLI).
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioLauncher;

#[async_trait]
impl Launcher for TokioLauncher {
    async fn run(&self, cmd: Command, capture: Capture) -> std::io::Result<Outcome> {
        let mut cmd = tokio::process::Command::from(cmd);
        if capture == Capture::Output {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            let out = cmd.output().await?;
            Ok(Outcome {
                code: exit_code(out.status),
                stdout: out.stdout,
                stderr: out.stderr,
            })
        } else {
            let status = cmd.status().await?;
            Ok(Outcome {
                code: exit_code(status),
                ..Default::default()
            })
        }
    }

    async fn run_limited(
        &self,
        mut cmd: Command,
        capture: Capture,
        limit: &Limit,
    ) -> std::io::Result<Outcome> {
        limit.prepare(&mut cmd);
        let mut cmd = tokio::process::Command::from(cmd);
        if capture == Capture::Output {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().map(|p| p as i32);
        if let Some(pid) = pid {
            limit.started(pid);
        }
        let stdout = child.stdout.take().map(|p| p.into_owned_fd()).transpose()?;
        let stderr = child.stderr.take().map(|p| p.into_owned_fd()).transpose()?;
        let output = async { tokio::join!(read_pipe(stdout), read_pipe(stderr)) };
        let (waited, (stdout, stderr)) = tokio::join!(
            async {
                tokio::select! {
                    status = child.wait() => Ok(status?),
                    e = limit.reached() => {
                        if let Some(pid) = pid {
                            kill_tree(pid);
                        }
                        let _ = child.wait().await;
                        Err(e)
                    }
                }
            },
            output
        );
        let status = waited?;
        Ok(Outcome {
            code: exit_code(status),
            stdout,
            stderr,
        })
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Reads a child's pipe to the end without blocking a runtime thread.
pub async fn read_pipe(fd: Option<OwnedFd>) -> Vec<u8> {
    let mut buf = Vec::new();
    let Some(fd) = fd else { return buf };
    match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(mut rx) => {
            if let Err(e) = rx.read_to_end(&mut buf).await {
                log::debug!("reading a child's output stopped: {e}");
            }
        }
        Err(e) => log::warn!("cannot read a child's output: {e}"),
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_tree_kills_every_descendant() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 100 & sh -c 'sleep 100 & wait' & wait"])
            .spawn()
            .expect("sh");
        let pid = child.id() as i32;
        let mut descendants = Vec::new();
        for _ in 0..200 {
            descendants = {
                let mut all = children_of(pid);
                let grand: Vec<i32> = all.iter().flat_map(|c| children_of(*c)).collect();
                all.extend(grand);
                all
            };
            if descendants.len() >= 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(descendants.len() >= 3, "the tree started: {descendants:?}");
        kill_tree(pid);
        child.wait().expect("wait");
        for p in descendants {
            let mut gone = false;
            for _ in 0..200 {
                if matches!(process_state(p), None | Some('Z' | 'X')) {
                    gone = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(gone, "pid {p} survived ({:?})", process_state(p));
        }
    }
}
