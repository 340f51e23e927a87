//! Facts of processes from /proc: whether a process still runs, and since when.
//!
//! Why not the `procfs` crate: what is read here is two fields of `/proc/<pid>/stat` (the
//! flags and the start time, counted after the command name's closing parenthesis); `procfs` would be a new
//! dependency of the whole workspace for that, and its mountinfo reader, the other place it would
//! serve, does not decode the kernel's escapes (see `podsnap_runtime::mountinfo`).

/// This process as a journal owner.
pub fn this_process() -> (u32, u64) {
    let pid = std::process::id();
    (pid, start_time(pid).unwrap_or(0))
}

/// Whether the process `pid` that started at `start` (see [`this_process`]) still runs: the
/// same pid with the same start time, neither a zombie nor exiting. A start time of 0 (unknown)
/// never matches.
///
/// Exiting counts as dead: a process killed with `SIGKILL` closes its files (its sockets: what
/// tells containerd its shim is gone) before it becomes a zombie, so whoever cleans up after
/// it can look while it still shows as running; it runs no more code of its own by then.
pub fn alive(pid: u32, start: u64) -> bool {
    start != 0
        && read_stat(pid)
            .and_then(|s| parse_stat(&s))
            .is_some_and(|s| s.start == start && !s.exiting)
}

/// A live process's start time (clock ticks since boot, `/proc/<pid>/stat` field 22); `None`
/// for a process that is gone or dead but not yet reaped (a zombie).
pub fn start_time(pid: u32) -> Option<u64> {
    read_stat(pid).and_then(|s| parse_stat(&s)).map(|s| s.start)
}

fn read_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// What is read of a `/proc/<pid>/stat` line.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    start: u64,
    /// `PF_EXITING` is set in the flags (field 9): the process is dying.
    exiting: bool,
}

/// The kernel's `PF_EXITING` task flag.
const PF_EXITING: u64 = 0x4;

/// Parses a stat line; `None` for a zombie (or a dead task) and for a line not of the kernel's
/// format.
fn parse_stat(stat: &str) -> Option<Stat> {
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = stat.get(stat.rfind(')')? + 1..)?.trim_start();
    let fields: Vec<&str> = rest.split(' ').collect();
    // fields[0] is field 3 (the state), fields[6] field 9 (flags), fields[19] field 22.
    if matches!(fields.first(), Some(&("Z" | "X" | "x"))) {
        return None;
    }
    let flags: u64 = fields.get(6)?.parse().ok()?;
    Some(Stat {
        start: fields.get(19)?.trim().parse().ok()?,
        exiting: flags & PF_EXITING != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line as the kernel writes it, with `comm`, state, flags and start time given.
    fn line(comm: &str, state: &str, flags: u64, start: u64) -> String {
        format!(
            "4242 ({comm}) {state} 1 4242 4242 0 -1 {flags} 120 0 0 0 3 1 0 0 20 0 4 0 {start} 12345678 900 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
        )
    }

    #[test]
    fn a_running_process_has_its_start_time() {
        assert_eq!(
            parse_stat(&line("containerd-shim", "S", 0x400100, 987654)),
            Some(Stat {
                start: 987654,
                exiting: false
            })
        );
    }

    #[test]
    fn a_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let s = parse_stat(&line("a) b (c", "R", 0x400000, 77)).expect("parsed");
        assert_eq!(s.start, 77);
    }

    #[test]
    fn a_dying_process_is_exiting_and_a_zombie_is_gone() {
        let dying = parse_stat(&line("shim", "R", 0x400104, 5)).expect("parsed");
        assert!(dying.exiting);
        assert_eq!(parse_stat(&line("shim", "Z", 0x400104, 5)), None);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_is_not() {
        let (pid, start) = this_process();
        assert!(alive(pid, start));
        assert!(!alive(pid, start + 1));
        assert!(!alive(pid, 0));
    }
}
