//! Fault injection, for the fault suite: hold points where a test can stop a dump or a restore
//! to kill a process, restart containerd or race a call against it.
//!
//! `PODSNAP_FAILPOINT_HOLD` names a directory. An operation reaching phase P (a pod dump:
//! `before-freeze`, `frozen`, `dumped`, `parts-ready` (every container's part complete and
//! announced, the digests not taken yet), `thawed`, `committed` (the checkpoint in place; with
//! `stop` the pod still frozen), and with `stop` `killed` (every process of the pod killed, not
//! thawed yet) and `stopped` (thawed: the pod gone, the journal not removed yet), and
//! `worker-started` (a program of the dump started, not yet recorded in its journal; the
//! starting thread blocks there); a container
//! restore: `restore`, and in a lazy one `lazy-pages`, its daemon listening, runc not run yet;
//! `podsnap receive`: `migration-receiving`, the first file of a migration written;
//! `podsnap migrate` live: `migration-pages`, bytes of memory about to go to the target after
//! the switch)
//! while the file `<dir>/P` exists
//! writes `<dir>/P.reached` and waits (at most a minute) until `<dir>/P` is removed. Unset, as
//! in production, a hold point costs one environment lookup.

use std::path::Path;
use std::time::Duration;

/// The environment variable naming the directory of hold points.
pub const HOLD_ENV: &str = "PODSNAP_FAILPOINT_HOLD";

/// A hold point named `phase`.
pub async fn hold(phase: &str) {
    let Some(armed) = reached(phase) else { return };
    for _ in 0..600 {
        if !armed.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A hold point named `phase` in code that cannot wait asynchronously: it blocks its thread.
pub fn hold_blocking(phase: &str) {
    let Some(armed) = reached(phase) else { return };
    for _ in 0..600 {
        if !armed.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether hold point `phase` is armed; if so, says it was reached and returns the file whose
/// removal lets it go.
fn reached(phase: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::var_os(HOLD_ENV).filter(|d| !d.is_empty())?;
    let armed = Path::new(&dir).join(phase);
    if !armed.exists() {
        return None;
    }
    log::warn!(
        "{HOLD_ENV}: holding at {phase} until {} is removed",
        armed.display()
    );
    std::fs::write(Path::new(&dir).join(format!("{phase}.reached")), phase).ok()?;
    Some(armed)
}
