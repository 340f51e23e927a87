//! One node at a time on this host.
//!
//! Nodes share `/run/containerd/{s,fifo,runc}`, `/var/run/netns` and two cores. An exclusive
//! `flock` on [`LOCK_PATH`] serializes them across threads (each holder opens the file anew, so
//! each has its own lock) and across processes (nextest, a second `cargo test`). The kernel drops
//! the lock when its holder dies, so a crashed test never wedges the suite.

use std::fs::File;
use std::os::fd::AsRawFd;

/// The lock file every node holds while it runs.
pub const LOCK_PATH: &str = "/run/podsnap-tests.lock";

/// Holds the host-wide lock until dropped.
#[derive(Debug)]
pub struct SerialGuard {
    _file: File,
}

/// Waits for the host-wide lock and returns its guard.
///
/// # Panics
/// When the lock file cannot be opened or locked.
pub fn serial() -> SerialGuard {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(LOCK_PATH)
        .unwrap_or_else(|e| panic!("cannot open the test lock {LOCK_PATH}: {e}"));
    loop {
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return SerialGuard { _file: file };
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            panic!("cannot lock {LOCK_PATH}: {error}");
        }
    }
}
