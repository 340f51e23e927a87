//! A pod's dump as one member of a group dumped at one instant (`podsnap dump --selector` or
//! several `--pod`s): every pod of the group is held (its network locked, its CRIU runs
//! waiting) before any is frozen, and every pod's processes are dumped before any is thawed,
//! so the pods' snapshots are of one instant as their network sees it: a packet one pod sent
//! after another's snapshot was dropped by the other's lock and is sent again after a restore.
//!
//! Each pod has its own shim, so the members meet at files in a directory the caller made
//! (root's, 0700, not a symlink): a member that reached phase P writes `<member>.P` and waits
//! until every member has; one that failed writes `<member>.failed`, and the caller may write
//! `abort`; either makes every waiting member give up (its dump then undoes itself: thawed,
//! unlocked, no output). The dump's deadline and its caller giving up stop the wait too.

use std::path::Path;
use std::time::Duration;

use podsnap_runtime::launcher::Limit;

use crate::error::{Error, Result};
pub use crate::format::layout::GroupAsk;
use crate::format::names::validate_name;

/// The phases the members meet at.
pub const HELD: &str = "held";
pub const DUMPED: &str = "dumped";
/// The file the caller writes to stop every member.
pub const ABORT: &str = "abort";

/// How long a held member waits for the others to be held (its network locked meanwhile): a
/// member whose dump never started (its caller died) costs the others this, not the deadline.
pub const HELD_WAIT: Duration = Duration::from_secs(20);

/// How often a waiting member looks at the directory.
const POLL: Duration = Duration::from_millis(2);

/// Refuses a group whose names could leave its directory, or whose directory is not a private
/// one of this process's user.
pub fn check(g: &GroupAsk) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    for name in g.members.iter().chain(std::iter::once(&g.me)) {
        validate_name(name)?;
    }
    if !g.members.contains(&g.me) {
        return Err(format!("{:?} is not one of the group's members", g.me));
    }
    if !g.dir.is_absolute() {
        return Err(format!("the group directory {} is not absolute", g.dir.display()));
    }
    let meta = std::fs::symlink_metadata(&g.dir)
        .map_err(|e| format!("the group directory {}: {e}", g.dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "the group directory {} must be a directory of uid {me}, mode 0700",
            g.dir.display()
        ));
    }
    Ok(())
}

/// Says member `g.me` reached `phase`, then waits until every member has. Gives up when a
/// member failed, the caller aborted, or `limit` is reached.
pub async fn meet(g: &GroupAsk, phase: &str, limit: &Limit) -> Result<()> {
    meet_within(g, phase, limit, HELD_WAIT).await
}

/// [`meet`], a held member waiting at most `held_wait`.
async fn meet_within(g: &GroupAsk, phase: &str, limit: &Limit, held_wait: Duration) -> Result<()> {
    // Held, a pod waits with its network locked: not for long. Dumped, it waits frozen for
    // the others' dumps, which take as long as their memory does: up to the deadline.
    let until = (phase == HELD).then(|| std::time::Instant::now() + held_wait);
    let mark = |name: &str| g.dir.join(format!("{name}.{phase}"));
    std::fs::write(mark(&g.me), b"").map_err(|e| Error::io("join the group", &g.dir, e))?;
    loop {
        if let Some(why) = stopped(g) {
            return Err(Error::Stopped {
                reason: format!("{why} (waiting for the group's pods to be {phase})"),
            });
        }
        if g.members.iter().all(|m| mark(m).exists()) {
            return Ok(());
        }
        if limit.cancelled() || limit.expired() || until.is_some_and(|u| std::time::Instant::now() >= u) {
            let waiting: Vec<&str> = g
                .members
                .iter()
                .filter(|m| !mark(m).exists())
                .map(String::as_str)
                .collect();
            return Err(Error::Stopped {
                reason: format!("the group's pods {} were not {phase} in time", waiting.join(", ")),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Why the group stops, if it does: a member failed or the caller aborted.
fn stopped(g: &GroupAsk) -> Option<String> {
    if g.dir.join(ABORT).exists() {
        return Some("the group dump was aborted".to_owned());
    }
    g.members
        .iter()
        .find(|m| g.dir.join(format!("{m}.failed")).exists())
        .map(|m| format!("pod {m} of the group failed"))
}

/// Tells the others member `g.me` failed (best effort: a member that cannot write it is found
/// out by the deadline).
pub fn fail(g: &GroupAsk) {
    let _ = std::fs::write(g.dir.join(format!("{}.failed", g.me)), b"");
}

/// Between phases 2 and 3: a member of a group waits until every pod is held; on failure
/// the dump is undone (CRIU runs stopped, network unlocked, staging removed).
pub(super) async fn meet_held(held: super::hold::Held) -> Result<super::hold::Held> {
    let Some(g) = held.planned.req.group.clone() else {
        return Ok(held);
    };
    match meet(&g, HELD, &held.planned.limit).await {
        Ok(()) => Ok(held),
        Err(e) => {
            held.unwind().await;
            Err(e)
        }
    }
}

/// Between phases 5 and 6: a member of a group waits until every pod is dumped, frozen; on
/// failure the dump is undone (thawed, unlocked, no output).
pub(super) async fn meet_dumped(c: super::adopted::Captured) -> Result<super::adopted::Captured> {
    let Some(g) = c.dumped.frozen.held.planned.req.group.clone() else {
        return Ok(c);
    };
    match meet(&g, DUMPED, &c.dumped.frozen.held.planned.limit).await {
        Ok(()) => Ok(c),
        Err(e) => {
            c.dumped.frozen.unwind().await;
            Err(e)
        }
    }
}

/// Whether `dir` holds the mark of `member` at `phase` (for the caller and tests).
pub fn reached(dir: &Path, member: &str, phase: &str) -> bool {
    dir.join(format!("{member}.{phase}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn group(dir: &Path, me: &str) -> GroupAsk {
        GroupAsk {
            dir: dir.to_path_buf(),
            me: me.into(),
            members: vec!["a".into(), "b".into()],
        }
    }

    fn private_dir() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        tmp
    }

    #[tokio::test]
    async fn members_go_on_together_and_stop_when_one_fails() {
        let tmp = private_dir();
        let (a, b) = (group(tmp.path(), "a"), group(tmp.path(), "b"));
        check(&a).expect("a valid group");
        let limit = Limit::after(Duration::from_secs(10), None);
        let (ra, rb) = tokio::join!(meet(&a, HELD, &limit), meet(&b, HELD, &limit));
        ra.expect("a met b");
        rb.expect("b met a");
        assert!(reached(tmp.path(), "a", HELD) && reached(tmp.path(), "b", HELD));
        // b fails before it is dumped: a, waiting, gives up at once.
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { meet(&a, DUMPED, &Limit::after(Duration::from_secs(10), None)).await }
        });
        fail(&b);
        let err = waiting.await.expect("join").expect_err("b failed");
        assert!(err.to_string().contains("pod b of the group failed"), "{err}");
    }

    #[tokio::test]
    async fn a_held_member_waits_for_the_others_a_short_while_not_the_whole_deadline() {
        let tmp = private_dir();
        let a = group(tmp.path(), "a");
        let (held_wait, deadline) = (Duration::from_millis(100), Duration::from_secs(600));
        let started = std::time::Instant::now();
        let err = meet_within(&a, HELD, &Limit::after(deadline, None), held_wait)
            .await
            .expect_err("b never came");
        assert!(err.to_string().contains("pods b were not held in time"), "{err}");
        let waited = started.elapsed();
        assert!(
            waited >= held_wait && waited < Duration::from_secs(10),
            "waited {waited:?}"
        );
        // Dumped, a member waits for the others' dumps up to the deadline, not held_wait.
        let b = group(tmp.path(), "b");
        let limit = Limit::after(Duration::from_millis(400), None);
        let started = std::time::Instant::now();
        meet_within(&b, DUMPED, &limit, held_wait)
            .await
            .expect_err("a never dumped");
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_member_that_never_comes_stops_the_wait_at_the_deadline() {
        let tmp = private_dir();
        let a = group(tmp.path(), "a");
        let err = meet(&a, HELD, &Limit::after(Duration::from_millis(50), None))
            .await
            .expect_err("b never came");
        assert!(err.to_string().contains("pods b were not held in time"), "{err}");
        std::fs::write(tmp.path().join(ABORT), b"").expect("abort");
        let err = meet(
            &group(tmp.path(), "b"),
            DUMPED,
            &Limit::after(Duration::from_secs(10), None),
        )
        .await
        .expect_err("aborted");
        assert!(err.to_string().contains("aborted"), "{err}");
    }

    #[test]
    fn names_that_leave_the_directory_and_shared_directories_are_refused() {
        let tmp = private_dir();
        let mut g = group(tmp.path(), "a");
        g.members.push("../x".into());
        assert!(check(&g).is_err());
        let g = group(tmp.path(), "c");
        assert!(check(&g).expect_err("not a member").contains("not one of"));
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(check(&group(tmp.path(), "a"))
            .expect_err("shared")
            .contains("mode 0700"));
    }
}
