//! Facts of processes from /proc: whether a process still runs, and since when.
//!
//! Why not the `procfs` crate: what is read here is one field of `/proc/<pid>/stat` (its start
//! time, counted after the command name's closing parenthesis); `procfs` would be a new
//! dependency of the whole workspace for that, and its mountinfo reader, the other place it would
//! serve, does not decode the kernel's escapes (see `podsnap_runtime::mountinfo`).

/// This process as a journal owner.
pub fn this_process() -> (u32, u64) {
    let pid = std::process::id();
    (pid, start_time(pid).unwrap_or(0))
}

/// Whether the process `pid` that started at `start` (see [`this_process`]) still runs: the
/// same pid with the same start time, not a zombie. A start time of 0 (unknown) never matches.
pub fn alive(pid: u32, start: u64) -> bool {
    start != 0 && start_time(pid) == Some(start)
}

/// A live process's start time (clock ticks since boot, `/proc/<pid>/stat` field 22); `None`
/// for a process that is gone or dead but not yet reaped (a zombie).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}
