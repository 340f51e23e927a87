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
    /// Whether an exit may be reported now, or is held until the event announcing the
    /// process (its create, start or exec-started) is out.
    exit_gate: Mutex<ExitGate>,
}

/// containerd's order of events for one process: TaskCreate (of an init) or TaskStart /
/// TaskExecStarted first, TaskExit after. A process that ends at once can be reaped while the
/// call that announces it is still running; its exit waits here until that call has published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitGate {
    /// Exits are reported as they come.
    Open,
    /// The process is being announced: an exit (the first one) is kept for later.
    Held(Option<i32>),
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
            // Not announced yet: Create (init) and Start (exec) open the gate.
            exit_gate: Mutex::new(ExitGate::Held(None)),
        }
    }

    /// Holds the process's exit back while the event announcing it is being published.
    /// An exit already held stays held.
    pub fn hold_exit(&self) {
        let mut g = lock(&self.exit_gate);
        if *g == ExitGate::Open {
            *g = ExitGate::Held(None);
        }
    }

    /// Offers an exit for reporting: true if it may be reported now, false if it is held
    /// (then [`Process::release_exit`] hands it back).
    pub fn admit_exit(&self, code: i32) -> bool {
        match &mut *lock(&self.exit_gate) {
            ExitGate::Open => true,
            ExitGate::Held(held) => {
                held.get_or_insert(code);
                false
            }
        }
    }

    /// The process is announced: lets exits through from now on and returns the one held.
    pub fn release_exit(&self) -> Option<i32> {
        match std::mem::replace(&mut *lock(&self.exit_gate), ExitGate::Open) {
            ExitGate::Open => None,
            ExitGate::Held(held) => held,
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

    #[test]
    fn an_exit_waits_until_the_process_is_announced() {
        let p = Process::new("c", "", Stdio::default(), None);
        // Before Create has published, an exit is held...
        assert!(!p.admit_exit(1));
        // ...and handed back once it has.
        assert_eq!(p.release_exit(), Some(1));
        assert!(p.admit_exit(2), "announced: exits pass");
        assert_eq!(p.release_exit(), None);
    }

    #[test]
    fn an_exit_during_start_is_held_until_start_is_published() {
        let p = Process::new("c", "e", Stdio::default(), None);
        assert_eq!(p.release_exit(), None, "created, nothing exited");
        p.hold_exit();
        assert!(!p.admit_exit(0));
        assert!(!p.admit_exit(9), "a second exit is held too");
        p.hold_exit();
        assert_eq!(
            p.release_exit(),
            Some(0),
            "the first exit wins, holding twice keeps it"
        );
        assert!(p.admit_exit(0));
    }

    #[tokio::test]
    async fn a_start_that_publishes_first_comes_before_the_exit() {
        // The task layer's use of the gate: the exit watcher and Start race; whichever runs
        // first, the start event is out before the exit event.
        use std::sync::Arc;
        for exit_first in [true, false] {
            let p = Arc::new(Process::new("c", "", Stdio::default(), None));
            let log = Arc::new(Mutex::new(Vec::<&str>::new()));
            assert_eq!(p.release_exit(), None, "created and announced");
            let exited = |p: &Process, code: i32, log: &Mutex<Vec<&str>>| {
                if p.admit_exit(code) && p.set_exited(code) {
                    lock(log).push("exit");
                }
            };
            p.hold_exit(); // Start begins
            if exit_first {
                exited(&p, 0, &log);
            }
            lock(&log).push("start");
            if let Some(code) = p.release_exit() {
                exited(&p, code, &log);
            }
            if !exit_first {
                exited(&p, 0, &log);
            }
            assert_eq!(*lock(&log), ["start", "exit"], "exit first: {exit_first}");
            assert_eq!(p.state().status, Status::Stopped);
        }
    }
}
