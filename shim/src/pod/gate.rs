//! The pod's lifecycle gate: a pod checkpoint runs alone. Create, Start, Kill, Pause, Resume,
//! Update, Exec, Delete and container checkpoints enter it side by side; a pod dump takes it
//! whole, after the calls in flight. A call that comes during a dump waits for it (at most
//! [`LIFECYCLE_WAIT`]), then is answered; one pod checkpoint at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::error::{Error, Result};

/// How long a lifecycle call waits for a pod dump in progress before it answers busy (and a
/// pod dump for the calls in flight).
pub const LIFECYCLE_WAIT: Duration = Duration::from_secs(30);

pub struct LifecycleGate {
    /// A pod dump holds it exclusively; lifecycle calls share it.
    lock: Arc<RwLock<()>>,
    /// Set while a pod checkpoint runs (from its request to the end of its dump).
    busy: Arc<AtomicBool>,
    wait: Duration,
}

impl Default for LifecycleGate {
    fn default() -> Self {
        Self::with_wait(LIFECYCLE_WAIT)
    }
}

/// The pod checkpoint's claim: released when dropped.
pub struct PodBusy(Arc<AtomicBool>);

impl Drop for PodBusy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl LifecycleGate {
    pub fn with_wait(wait: Duration) -> Self {
        Self {
            lock: Arc::new(RwLock::new(())),
            busy: Arc::new(AtomicBool::new(false)),
            wait,
        }
    }

    /// Lets lifecycle call `call` of container `id` in: at once, or once the pod dump in
    /// progress is over. The guard lets the next dump wait for this call.
    pub async fn enter(&self, call: &str, id: &str) -> Result<OwnedRwLockReadGuard<()>> {
        if let Ok(guard) = self.lock.clone().try_read_owned() {
            return Ok(guard);
        }
        log::info!("{call} of container {id} waits until the pod's checkpoint is over");
        tokio::time::timeout(self.wait, self.lock.clone().read_owned())
            .await
            .map_err(|_| {
                Error::FailedPrecondition(format!(
                    "{call} of container {id} refused: the pod is being checkpointed and did not finish within {} s; try again",
                    self.wait.as_secs()
                ))
            })
    }

    /// Claims the pod for a checkpoint of it; a second claim is refused as busy.
    pub fn claim(&self, sandbox: &str) -> Result<PodBusy> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(Error::FailedPrecondition(format!(
                "pod {sandbox} is busy: a checkpoint of it is already running"
            )));
        }
        Ok(PodBusy(self.busy.clone()))
    }

    /// Takes the gate whole for a pod dump: lifecycle calls in flight finish first; new ones
    /// wait for the dump.
    pub async fn exclusive(&self, sandbox: &str) -> Result<OwnedRwLockWriteGuard<()>> {
        tokio::time::timeout(self.wait, self.lock.clone().write_owned())
            .await
            .map_err(|_| {
                Error::FailedPrecondition(format!(
                    "pod {sandbox}: lifecycle calls did not finish within {} s; try the checkpoint again",
                    self.wait.as_secs()
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test]
    async fn a_call_during_a_pod_dump_waits_and_is_answered_after_it() {
        let gate = Arc::new(LifecycleGate::default());
        let dump = gate.exclusive("pod").await.expect("the dump takes the gate");
        let answered = Arc::new(AtomicUsize::new(0));
        let call = {
            let (gate, answered) = (gate.clone(), answered.clone());
            tokio::spawn(async move {
                let _in = gate.enter("Start", "c1").await?;
                answered.fetch_add(1, Ordering::SeqCst);
                Ok::<(), Error>(())
            })
        };
        // The call is parked on the gate (a bounded wait for it to get there, never a sleep
        // that assumes it did).
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(answered.load(Ordering::SeqCst), 0, "answered during the dump");
        drop(dump);
        call.await
            .expect("joined")
            .expect("answered once the dump is over");
        assert_eq!(answered.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_call_that_waits_too_long_is_refused_as_busy() {
        let gate = LifecycleGate::with_wait(Duration::from_millis(20));
        let _dump = gate.exclusive("pod").await.expect("the dump takes the gate");
        let e = gate.enter("Kill", "c1").await.expect_err("refused").to_string();
        assert!(
            e.contains("Kill of container c1 refused: the pod is being checkpointed"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_pod_dump_waits_for_the_calls_in_flight() {
        let gate = LifecycleGate::with_wait(Duration::from_millis(20));
        let call = gate.enter("Create", "c1").await.expect("in");
        let e = gate
            .exclusive("pod")
            .await
            .expect_err("a call is in flight")
            .to_string();
        assert!(e.contains("pod pod: lifecycle calls did not finish"), "{e}");
        drop(call);
        gate.exclusive("pod").await.expect("free once the call is over");
    }

    #[test]
    fn one_pod_checkpoint_at_a_time() {
        let gate = LifecycleGate::default();
        let first = gate.claim("pod").expect("first");
        let e = gate.claim("pod").err().expect("second refused").to_string();
        assert!(
            e.contains("pod pod is busy: a checkpoint of it is already running"),
            "{e}"
        );
        drop(first);
        gate.claim("pod").expect("free again");
    }
}
