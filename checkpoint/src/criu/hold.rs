//! CRIU's dump of a container, started before the pod is frozen and held at its start.
//!
//! A pod dump freezes every container at one instant and only then may CRIU stop and read the
//! processes. Starting runc only after the freeze puts runc's own start, its CRIU version
//! check, CRIU's start and its kernel probing inside the frozen window: 30 to 60 ms a container
//! on two loaded cores, which a runtime that dumps one container at a time pays before its
//! freeze. So each container's `runc checkpoint` starts while the pod still runs, and its CRIU
//! waits in a pre-dump action script (run after CRIU's setup, before it freezes or seizes
//! anything) until podsnap has frozen the whole pod and checked it, then answers `go`; or
//! `abort`, and CRIU gives up without having touched the processes.
//!
//! The script is named in the container's CRIU configuration file (the bundle's `criu.conf`,
//! see [`crate::criu::container::CRIU_CONFIG_FILE`]), which runc hands CRIU on every dump; CRIU runs
//! configured scripts beside runc's RPC notifications. Layout, in the container's bundle, for
//! the length of one dump:
//!
//! ```text
//! criu-hold/
//!   hold    the action script (sh): for `pre-dump` only, creates `ready`, reads one word
//!           from `go` and succeeds if it is "go"
//!   go      a FIFO podsnap holds open read-write until runc ends (a read never waits for a
//!           writer; a podsnap gone means end of file: the script fails, CRIU aborts)
//!   ready   created by the script: CRIU is waiting
//!   served  created by the script at `status-ready` (a lazy dump): every image is written
//!           and CRIU's page server serves the memory
//! ```

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::error::{Error, Result};

/// The directory of a held dump in a container's bundle.
pub const HOLD_DIR: &str = "criu-hold";

/// One container's held CRIU dump: podsnap's end of it.
pub struct Hold {
    dir: PathBuf,
    go: Arc<std::fs::File>,
    answered: bool,
}

impl Hold {
    /// Whether CRIU can run a script from the container's `bundle` (not on a `noexec` mount).
    pub fn possible(bundle: &Path) -> bool {
        nix::sys::statvfs::statvfs(bundle)
            .is_ok_and(|st| !st.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC))
    }

    /// Prepares the hold of the container of `bundle`; returns it and the CRIU configuration
    /// line naming its script.
    pub fn prepare(bundle: &Path) -> Result<(Hold, String)> {
        let dir = bundle.join(HOLD_DIR);
        let shown = dir.display().to_string();
        if shown.contains('\'') || shown.contains('\n') {
            return Err(Error::io(
                "hold CRIU's dump",
                &dir,
                std::io::Error::other("the bundle path cannot be quoted for sh"),
            ));
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io("remove a stale CRIU hold", &dir, e));
            }
            _ => {}
        }
        crate::fs::private::create_private_dir(&dir)?;
        let go = dir.join("go");
        let c_go = std::ffi::CString::new(go.as_os_str().as_encoded_bytes())
            .map_err(|e| Error::io("hold CRIU's dump", &go, std::io::Error::other(e)))?;
        // SAFETY: mkfifo reads the NUL-terminated path, alive across the call.
        if unsafe { libc::mkfifo(c_go.as_ptr(), 0o600) } != 0 {
            return Err(Error::io(
                "hold CRIU's dump (mkfifo)",
                &go,
                std::io::Error::last_os_error(),
            ));
        }
        // Read-write: the open does not wait for a reader, and the script's open for reading
        // does not wait for a writer.
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&go)
            .map_err(|e| Error::io("hold CRIU's dump", &go, e))?;
        let script = dir.join("hold");
        let pid = std::process::id();
        let text = format!(
            "#!/bin/sh\n\
             # podsnap: CRIU's dump of this container waits here, before it stops any process,\n\
             # until the whole pod is frozen.\n\
             # A lazy dump (live migration): its images are complete, its page server ready.\n\
             if [ \"$CRTOOLS_SCRIPT_ACTION\" = status-ready ]; then : > '{shown}/served'; exit $?; fi\n\
             [ \"$CRTOOLS_SCRIPT_ACTION\" = pre-dump ] || exit 0\n\
             # Left behind by a podsnap that died: fail, never wait.\n\
             [ -d /proc/{pid} ] || exit 1\n\
             : > '{shown}/ready' || exit 1\n\
             read answer < '{shown}/go' || exit 1\n\
             [ \"$answer\" = go ]\n"
        );
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o700)
                .open(&script)
                .map_err(|e| Error::io("write the CRIU hold script", &script, e))?;
            f.write_all(text.as_bytes())
                .map_err(|e| Error::io("write the CRIU hold script", &script, e))?;
        }
        let line = format!("action-script {}\n", script.display());
        Ok((
            Hold {
                dir,
                go: Arc::new(fifo),
                answered: false,
            },
            line,
        ))
    }

    /// The FIFO end the dump's task keeps open until runc ends.
    pub fn keep_open(&self) -> Arc<std::fs::File> {
        self.go.clone()
    }

    /// Whether CRIU is waiting.
    pub fn ready(&self) -> bool {
        self.dir.join("ready").exists()
    }

    /// Whether a lazy dump's CRIU has written every image and serves the memory
    /// (`status-ready`).
    pub fn served(&self) -> bool {
        self.dir.join("served").exists()
    }

    /// Lets CRIU go on and dump the (frozen) container.
    pub fn release(&mut self) {
        self.answer("go");
    }

    /// Makes CRIU give up before it touches a process.
    pub fn abort(&mut self) {
        self.answer("abort");
    }

    fn answer(&mut self, word: &str) {
        if self.answered {
            return;
        }
        self.answered = true;
        // A FIFO with room for it: never blocks.
        if let Err(e) = (&*self.go).write_all(format!("{word}\n").as_bytes()) {
            log::warn!("{}: answer {word:?}: {e}", self.dir.display());
        }
    }

    /// Removes the hold's files (once runc has ended).
    pub fn remove(self) {
        let dir = self.dir.clone();
        drop(self);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("remove {}: {e}", dir.display());
            }
        }
    }
}

/// Wakes a waiter when a held CRIU's script creates its `ready` file: one inotify descriptor
/// watching the hold directories (created before it, so no event is missed once it watches;
/// a file made before is found by the caller's own check).
pub struct ReadyWatch(Option<AsyncFd<InotifyFd>>);

/// The inotify descriptor, as tokio's `AsyncFd` takes it.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl ReadyWatch {
    /// Watches the directories of `holds` (within a tokio runtime with its I/O driver). `None`
    /// when it cannot (no inotify descriptor left): the caller polls instead.
    pub fn new<'a>(holds: impl IntoIterator<Item = &'a Hold>) -> Option<Self> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).ok()?;
        for hold in holds {
            inotify
                .add_watch(&hold.dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                .ok()?;
        }
        // SAFETY: the descriptor is the Inotify's own, which the AsyncFd owns (inside
        // InotifyFd) for its whole life: it stays open and as_raw_fd always returns it.
        unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
            .ok()
            .map(|fd| Self(Some(fd)))
    }

    /// Waits until a file appears in a watched directory, or `at_most` passed.
    pub async fn wait(&self, at_most: Duration) {
        let Some(fd) = &self.0 else { return };
        let woken = async {
            let Ok(mut ready) = fd.readable().await else {
                return;
            };
            // Every queued event read: the next wait is for a new one.
            loop {
                match fd.get_ref().0.read_events() {
                    Ok(_) => continue,
                    Err(Errno::EAGAIN) => {
                        ready.clear_ready();
                        return;
                    }
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(at_most, woken).await;
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            close_inotify_beside(fd.into_inner().0);
        }
    }
}

/// Closes an inotify descriptor on a thread of its own. The close waits for the kernel's
/// notification grace period (SRCU): 8 ms and more measured here, which a pod dump paid
/// once on its way to the network lock and once more before the freeze.
pub fn close_inotify_beside(inotify: Inotify) {
    let spawned = std::thread::Builder::new()
        .name("inotify-close".into())
        .spawn(move || drop(inotify));
    // No thread: closed here, slowly.
    if let Err(e) = spawned {
        log::debug!("an inotify descriptor is closed on the dump's path ({e})");
    }
}

/// Removes what a pod dump or a restore left for CRIU in the container's `bundle` (its CRIU
/// configuration file and hold), before a dump of that container alone: a pod dump that died
/// half-way could leave CRIU a script to wait in.
pub fn clear(bundle: &Path) {
    crate::fs::remove::remove_leftover(&bundle.join(crate::criu::container::CRIU_CONFIG_FILE));
    crate::fs::remove::remove_leftover(&bundle.join(HOLD_DIR));
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the hold script as CRIU would, for `action`.
    fn run_script(dir: &Path, action: &str) -> std::process::Child {
        std::process::Command::new(dir.join(HOLD_DIR).join("hold"))
            .env("CRTOOLS_SCRIPT_ACTION", action)
            .spawn()
            .expect("run the hold script")
    }

    fn wait_ready(hold: &Hold) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !hold.ready() {
            assert!(std::time::Instant::now() < deadline, "the script never got ready");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn the_script_waits_for_go_at_pre_dump_only() {
        let t = tempfile::tempdir().expect("tempdir");
        assert!(Hold::possible(t.path()), "a temporary directory allows exec");
        let (mut hold, line) = Hold::prepare(t.path()).expect("hold");
        assert!(line.starts_with("action-script /"), "{line}");
        // Other actions pass at once.
        assert!(run_script(t.path(), "post-dump").wait().expect("wait").success());
        assert!(!hold.ready());
        let mut child = run_script(t.path(), "pre-dump");
        wait_ready(&hold);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "it waits for an answer"
        );
        hold.release();
        assert!(child.wait().expect("wait").success(), "go lets CRIU on");
        hold.remove();
        assert!(!t.path().join(HOLD_DIR).exists());
    }

    #[tokio::test]
    async fn the_ready_watch_wakes_when_the_script_is_ready_and_times_out_otherwise() {
        let t = tempfile::tempdir().expect("tempdir");
        let (hold, _) = Hold::prepare(t.path()).expect("hold");
        let watch = ReadyWatch::new([&hold]).expect("inotify");
        let began = std::time::Instant::now();
        watch.wait(Duration::from_millis(50)).await;
        assert!(
            began.elapsed() >= Duration::from_millis(50),
            "nothing happened: it timed out"
        );
        let mut child = run_script(t.path(), "pre-dump");
        let began = std::time::Instant::now();
        while !hold.ready() {
            watch.wait(Duration::from_secs(30)).await;
            assert!(
                began.elapsed() < Duration::from_secs(20),
                "the script never got ready"
            );
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "woken by the ready file, not by the 30 s timeout"
        );
        let mut hold = hold;
        hold.abort();
        assert!(!child.wait().expect("wait").success(), "abort stops CRIU");
    }

    #[test]
    fn abort_or_a_dropped_hold_fails_the_script() {
        let t = tempfile::tempdir().expect("tempdir");
        let (mut hold, _) = Hold::prepare(t.path()).expect("hold");
        let mut child = run_script(t.path(), "pre-dump");
        wait_ready(&hold);
        hold.abort();
        assert!(!child.wait().expect("wait").success(), "abort stops CRIU");

        let (hold, _) = Hold::prepare(t.path()).expect("hold again");
        let kept = hold.keep_open();
        let mut child = run_script(t.path(), "pre-dump");
        wait_ready(&hold);
        drop(hold);
        assert!(!child.wait().expect("wait").success(), "a dropped hold aborts");
        drop(kept);
    }
}
