//! A process the shim runs: a container's init process or an exec'd one. Its state, stdio and
//! exit, and the waiters for that exit.

use std::sync::Mutex;
use std::time::SystemTime;

use containerd_shim::asynchronous::io::{IoTasks, Pty, Stdio};
use tokio::sync::watch;

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

/// A snapshot of a process's state.
#[derive(Debug, Clone, Copy)]
pub struct State {
    pub status: Status,
    pub pid: i32,
    pub exit_code: u32,
    pub exited_at: Option<SystemTime>,
}

/// One process of a container.
pub struct Process {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub stdio: Stdio,
    pub io: IoTasks,
    pub pty: Mutex<Option<Pty>>,
    /// For exec processes: the OCI process spec (JSON) containerd sent.
    pub spec: Option<Vec<u8>>,
    state: Mutex<State>,
    exited: watch::Sender<bool>,
    /// An exit seen before the shim knew the pid (a process that ended at once); the task
    /// layer reports it once the process is set up.
    early_exit: Mutex<Option<i32>>,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, stdio: Stdio, spec: Option<Vec<u8>>) -> Self {
        Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stdio,
            io: IoTasks::default(),
            pty: Mutex::new(None),
            spec,
            state: Mutex::new(State {
                status: Status::Created,
                pid: 0,
                exit_code: 0,
                exited_at: None,
            }),
            exited: watch::channel(false).0,
            early_exit: Mutex::new(None),
        }
    }

    /// Remembers an exit that came before the process was set up.
    pub fn set_early_exit(&self, code: i32) {
        *lock(&self.early_exit) = Some(code);
    }

    /// Takes that early exit, if there was one.
    pub fn take_early_exit(&self) -> Option<i32> {
        lock(&self.early_exit).take()
    }

    /// How logs name this process.
    pub fn describe(&self) -> String {
        if self.exec_id.is_empty() {
            format!("container {}", self.container_id)
        } else {
            format!("exec {} in container {}", self.exec_id, self.container_id)
        }
    }

    pub fn state(&self) -> State {
        *lock(&self.state)
    }

    pub fn set_pid(&self, pid: i32) {
        lock(&self.state).pid = pid;
    }

    /// Moves to `status` unless the process already stopped (an exit wins every race).
    pub fn set_status(&self, status: Status) {
        let mut s = lock(&self.state);
        if s.status != Status::Stopped {
            s.status = status;
        }
    }

    /// Records the exit; returns false if it was already recorded.
    pub fn set_exited(&self, code: i32) -> bool {
        {
            let mut s = lock(&self.state);
            if s.status == Status::Stopped {
                return false;
            }
            s.status = Status::Stopped;
            s.exit_code = code as u32;
            s.exited_at = Some(SystemTime::now());
        }
        self.exited.send_replace(true);
        true
    }

    /// Waits until the process has exited and returns its final state.
    pub async fn wait(&self) -> State {
        let mut rx = self.exited.subscribe();
        // The sender lives as long as self, so this only ends when the flag is set.
        let _ = rx.wait_for(|exited| *exited).await;
        self.state()
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: the state kept behind
/// these locks is always left consistent by the short critical sections that change it.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_wins_over_later_status_changes_and_wakes_waiters() {
        let p = std::sync::Arc::new(Process::new("c", "", Stdio::default(), None));
        p.set_status(Status::Running);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await })
        };
        assert!(p.set_exited(3));
        assert!(!p.set_exited(4), "a second exit is ignored");
        p.set_status(Status::Running);
        let s = waiter.await.expect("join");
        assert_eq!(s.status, Status::Stopped);
        assert_eq!(s.exit_code, 3);
        assert!(s.exited_at.is_some());
    }
}
