//! Exits, reported in containerd's order: TaskCreate (of an init) or TaskStart /
//! TaskExecStarted first, TaskExit of the same process after. A process can end (and be
//! reaped) while the call announcing it still runs; [`Announcing`] holds its exit until that
//! call has published.

use std::sync::Arc;

use super::Pod;
use crate::process::Process;
use crate::task_event::TaskEvent;

impl Pod {
    /// Reports a process's exit: its state, its waiters, and TaskExit (held back while the
    /// process is being announced; see [`Announcing`]).
    pub async fn process_exited(&self, p: &Arc<Process>, code: i32) {
        if !p.admit_exit(code) {
            log::debug!("{}: exit {code} held until its start is published", p.describe());
            return;
        }
        if !p.set_exited(code) {
            return;
        }
        let s = p.state();
        log::info!("{}: exited with status {}", p.describe(), s.exit_code);
        self.publish(TaskEvent::Exit {
            container_id: p.container_id.clone(),
            id: if p.exec_id.is_empty() {
                p.container_id.clone()
            } else {
                p.exec_id.clone()
            },
            pid: s.pid as u32,
            exit_status: s.exit_code,
            exited_at: s.exited_at,
        })
        .await;
    }
}

/// Holds a process's exit back while the call that announces the process (Create for an init,
/// Start for an init or exec) has not published its event yet: containerd expects TaskCreate /
/// TaskStart / TaskExecStarted before the TaskExit of the same process. Released after that
/// event; dropped unreleased (the call failed or was given up) it reports a held exit anyway,
/// so no exit is lost.
pub struct Announcing {
    pod: Arc<Pod>,
    process: Arc<Process>,
    released: bool,
}

impl Announcing {
    pub fn hold(pod: &Arc<Pod>, process: &Arc<Process>) -> Self {
        process.hold_exit();
        Self {
            pod: pod.clone(),
            process: process.clone(),
            released: false,
        }
    }

    /// The announcing event is out: reports the exit held meanwhile, if any.
    pub async fn release(mut self) {
        self.released = true;
        if let Some(code) = self.process.release_exit() {
            self.pod.process_exited(&self.process, code).await;
        }
    }
}

impl Drop for Announcing {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let Some(code) = self.process.release_exit() else {
            return;
        };
        let (pod, process) = (self.pod.clone(), self.process.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { pod.process_exited(&process, code).await });
            }
            Err(_) => log::warn!(
                "{}: exit {code} not reported: no runtime to report it on",
                process.describe()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim::asynchronous::io::Stdio;

    use super::*;
    use crate::pod::fake::FakePod;
    use crate::process::Status;

    fn process(exec_id: &str) -> Arc<Process> {
        let p = Arc::new(Process::new("c1", exec_id, Stdio::default(), None));
        p.set_pid(41);
        p.set_status(Status::Running);
        p
    }

    #[tokio::test]
    async fn an_exit_during_its_start_is_published_after_the_start_event() {
        let f = FakePod::new();
        let p = process("");
        let announcing = Announcing::hold(&f.pod, &p);
        // The reaper sees the exit while Start is still running.
        f.pod.process_exited(&p, 3).await;
        assert!(f.events.kinds().is_empty(), "{:?}", f.events.kinds());
        f.pod
            .publish(TaskEvent::Start {
                container_id: "c1".into(),
                pid: 41,
            })
            .await;
        announcing.release().await;
        assert_eq!(f.events.kinds(), ["start", "exit"]);
        let events = crate::process::lock(&f.events.0).clone();
        let TaskEvent::Exit { id, exit_status, .. } = &events[1] else {
            panic!("{events:?}")
        };
        assert_eq!((id.as_str(), *exit_status), ("c1", 3));
    }

    #[tokio::test]
    async fn an_exec_exit_follows_its_exec_started_and_names_the_exec() {
        let f = FakePod::new();
        let p = process("e1");
        let announcing = Announcing::hold(&f.pod, &p);
        f.pod.process_exited(&p, 0).await;
        f.pod
            .publish(TaskEvent::ExecStarted {
                container_id: "c1".into(),
                exec_id: "e1".into(),
                pid: 41,
            })
            .await;
        announcing.release().await;
        assert_eq!(f.events.kinds(), ["exec-started", "exit"]);
        let events = crate::process::lock(&f.events.0).clone();
        assert!(
            matches!(&events[1], TaskEvent::Exit { id, .. } if id == "e1"),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn a_dropped_announcement_still_reports_the_exit_it_held() {
        let f = FakePod::new();
        let p = process("");
        let announcing = Announcing::hold(&f.pod, &p);
        f.pod.process_exited(&p, 9).await;
        drop(announcing); // the call failed before its event
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), p.wait())
            .await
            .expect("the exit is reported");
        assert_eq!(waited.exit_code, 9);
        for _ in 0..100 {
            if !f.events.kinds().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(f.events.kinds(), ["exit"]);
    }

    #[tokio::test]
    async fn an_exit_with_nothing_announcing_is_published_at_once_and_once() {
        let f = FakePod::new();
        let p = process("");
        p.release_exit(); // announced long ago
        f.pod.process_exited(&p, 1).await;
        f.pod.process_exited(&p, 1).await;
        assert_eq!(f.events.kinds(), ["exit"]);
    }
}
