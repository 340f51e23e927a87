//! Child exits. The shim is a subreaper: the shim crate reaps every child on SIGCHLD and
//! announces each exit on its monitor. Programs the shim runs (runc, criu) are waited for through
//! that monitor ([`MonitorLauncher`]), and container processes are matched to their exits by pid
//! ([`ExitRouter`]).

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use containerd_shim::asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe};
use containerd_shim::monitor::{Subject, Topic};
use podsnap_runtime::launcher::{kill_tree, read_pipe, timed_out, Capture, Launcher, Limit, Outcome};

use crate::process::{lock, Process};

/// Runs programs and waits for them through the shim's reaper.
#[derive(Debug, Default, Clone, Copy)]
pub struct MonitorLauncher;

#[async_trait]
impl Launcher for MonitorLauncher {
    async fn run(&self, cmd: Command, capture: Capture) -> std::io::Result<Outcome> {
        self.run_bounded(cmd, capture, None).await
    }

    async fn run_until(
        &self,
        cmd: Command,
        capture: Capture,
        deadline: std::time::Duration,
    ) -> std::io::Result<Outcome> {
        self.run_bounded(cmd, capture, Some(deadline)).await
    }

    async fn run_limited(&self, cmd: Command, capture: Capture, limit: &Limit) -> std::io::Result<Outcome> {
        self.run_watched(cmd, capture, limit).await
    }
}

impl MonitorLauncher {
    async fn run_bounded(
        &self,
        cmd: Command,
        capture: Capture,
        deadline: Option<std::time::Duration>,
    ) -> std::io::Result<Outcome> {
        let limit = Limit {
            deadline: deadline.map(|d| tokio::time::Instant::now() + d),
            ..Default::default()
        };
        self.run_watched(cmd, capture, &limit)
            .await
            .map_err(|e| match (e.kind(), deadline) {
                (std::io::ErrorKind::TimedOut, Some(d)) => timed_out(d),
                _ => e,
            })
    }

    async fn run_watched(
        &self,
        mut cmd: Command,
        capture: Capture,
        limit: &Limit,
    ) -> std::io::Result<Outcome> {
        limit.prepare(&mut cmd);
        // Subscribe before spawning: a fast child could otherwise exit unseen.
        let mut sub = monitor_subscribe(Topic::Pid)
            .await
            .map_err(std::io::Error::other)?;
        if capture == Capture::Output {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = monitor_unsubscribe(sub.id).await;
                return Err(e);
            }
        };
        let pid = child.id() as i32;
        limit.started(pid);
        let stdout = child.stdout.take().map(OwnedFd::from);
        let stderr = child.stderr.take().map(OwnedFd::from);
        // Dropping a std Child neither waits nor kills: the reaper owns its exit.
        drop(child);
        let mut stopped: Option<std::io::Error> = None;
        let ((stdout, stderr), code) = tokio::join!(
            async { tokio::join!(read_pipe(stdout), read_pipe(stderr)) },
            async {
                loop {
                    tokio::select! {
                        ev = sub.rx.recv() => match ev {
                            Some(ev) => {
                                if matches!(ev.subject, Subject::Pid(p) if p == pid) {
                                    return Some(ev.exit_code);
                                }
                            }
                            None => return None,
                        },
                        e = limit.reached(), if stopped.is_none() => {
                            // Past the deadline, or the caller gave up: kill the program and
                            // all it started, then collect its exit as usual.
                            log::warn!("{} stopped ({e}): killing it", runtime_describe(&pid));
                            kill_tree(pid);
                            stopped = Some(e);
                        }
                    }
                }
            }
        );
        let _ = monitor_unsubscribe(sub.id).await;
        let code = code.ok_or_else(|| std::io::Error::other("the shim's exit monitor closed"))?;
        if let Some(e) = stopped {
            return Err(e);
        }
        Ok(Outcome { code, stdout, stderr })
    }
}

fn runtime_describe(pid: &i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .map(|c| c.replace('\0', " ").trim().to_string())
        .unwrap_or_else(|_| format!("pid {pid}"))
}

/// How many exits nobody claimed are remembered, for a process whose pid is learnt only after
/// it may already have exited (a short exec).
const UNCLAIMED_CAP: usize = 512;

/// Matches exits to the container processes the shim watches.
#[derive(Default)]
pub struct ExitRouter {
    inner: Mutex<Routes>,
}

#[derive(Default)]
struct Routes {
    watched: HashMap<i32, Arc<Process>>,
    unclaimed: VecDeque<(i32, i32, Instant)>,
}

impl ExitRouter {
    /// Watches `pid` for `process`. If `pid` already exited after `since`, returns its exit code
    /// and does not watch it.
    pub fn watch(&self, pid: i32, process: Arc<Process>, since: Instant) -> Option<i32> {
        let mut r = lock(&self.inner);
        if let Some(pos) = r
            .unclaimed
            .iter()
            .position(|(p, _, at)| *p == pid && *at >= since)
        {
            let (_, code, _) = r.unclaimed.remove(pos)?;
            return Some(code);
        }
        r.watched.insert(pid, process);
        None
    }

    /// Stops watching `pid`.
    pub fn forget(&self, pid: i32) {
        lock(&self.inner).watched.remove(&pid);
    }

    /// Routes an exit: the watched process, or `None` (then it is remembered a while).
    pub fn exited(&self, pid: i32, code: i32) -> Option<Arc<Process>> {
        let mut r = lock(&self.inner);
        if let Some(p) = r.watched.remove(&pid) {
            return Some(p);
        }
        if r.unclaimed.len() >= UNCLAIMED_CAP {
            r.unclaimed.pop_front();
        }
        r.unclaimed.push_back((pid, code, Instant::now()));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::asynchronous::io::Stdio as ShimStdio;

    #[test]
    fn an_exit_before_watch_is_claimed_later() {
        let r = ExitRouter::default();
        let since = Instant::now();
        assert!(r.exited(42, 7).is_none());
        let p = Arc::new(Process::new("c", "e", ShimStdio::default(), None));
        assert_eq!(r.watch(42, p.clone(), since), Some(7));
        // Once claimed it is gone.
        assert_eq!(r.watch(42, p, since), None);
        assert!(r.exited(42, 0).is_some());
    }

    #[test]
    fn an_exit_older_than_the_process_is_not_claimed() {
        let r = ExitRouter::default();
        assert!(r.exited(43, 1).is_none());
        let since = Instant::now() + std::time::Duration::from_secs(1);
        let p = Arc::new(Process::new("c", "e", ShimStdio::default(), None));
        assert_eq!(r.watch(43, p, since), None);
    }

    #[test]
    fn exit_recorded_before_watch_is_matched_when_since_is_earlier() {
        // Create's order: the instant is taken before runc runs; the init exits and is reaped
        // while runc create returns and the pid file is read; only then is it watched.
        let r = ExitRouter::default();
        let since = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(r.exited(44, 137).is_none(), "nobody watches it yet");
        assert!(r.exited(45, 1).is_none(), "nor this one");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let p = Arc::new(Process::new("c", "", ShimStdio::default(), None));
        assert_eq!(r.watch(44, p.clone(), since), Some(137));
        // An instant taken at watch time (after the exit) would have lost it.
        assert_eq!(r.watch(45, p, Instant::now()), None);
    }
}
