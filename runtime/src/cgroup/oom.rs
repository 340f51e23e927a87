//! OOM notification for a container's memory cgroup.
//!
//! - v1: an eventfd registered through `cgroup.event_control` on `memory.oom_control`; the
//!   kernel signals it when the cgroup goes under OOM, and once more when the cgroup is removed.
//! - v2: inotify on `memory.events` (the kernel notifies each change of it as a modification);
//!   each rise of its `oom_kill` counter is an OOM kill.
//!
//! [`OomWatch`] is a readable descriptor (for an event loop) and [`OomWatch::check`] says what
//! happened once it is readable.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::CgroupPaths;
use crate::{Error, Result};

/// What a readable [`OomWatch`] had to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomCheck {
    /// This many OOM kills since the last check (v2), or an OOM condition (v1: always 1).
    Oom(u64),
    /// Something changed that was no OOM (another counter of `memory.events`).
    Nothing,
    /// The cgroup is gone: stop watching.
    Gone,
}

/// A registered OOM notification.
#[derive(Debug)]
pub enum OomWatch {
    V1 {
        eventfd: OwnedFd,
        dir: PathBuf,
    },
    V2 {
        inotify: Inotify,
        file: PathBuf,
        kills: u64,
    },
}

impl OomWatch {
    /// Registers for the OOM events of the container's memory cgroup. An error says why there
    /// can be none (no memory controller: the file is missing).
    pub fn register(cgroups: &CgroupPaths) -> Result<Self> {
        let dir = cgroups
            .get("memory")
            .ok_or_else(|| Error::NotFound("memory cgroup".into()))?;
        if cgroups.is_v2() {
            Self::register_v2(dir)
        } else {
            Self::register_v1(dir)
        }
    }

    /// v2: watches `dir/memory.events`.
    pub fn register_v2(dir: &Path) -> Result<Self> {
        let file = dir.join("memory.events");
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| Error::sys("create an inotify instance", e))?;
        // Watch first, then read the starting count: no kill falls between the two.
        inotify
            .add_watch(&file, AddWatchFlags::IN_MODIFY)
            .map_err(|e| Error::io("watch memory.events", &file, e.into()))?;
        let kills = read_oom_kills(&file).map_err(|e| Error::io("read memory.events", &file, e))?;
        Ok(Self::V2 { inotify, file, kills })
    }

    /// v1: an eventfd on `dir/memory.oom_control`.
    pub fn register_v1(dir: &Path) -> Result<Self> {
        let control = dir.join("memory.oom_control");
        let oom =
            std::fs::File::open(&control).map_err(|e| Error::io("open memory.oom_control", &control, e))?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::sys("create an eventfd", nix::Error::last()));
        }
        // SAFETY: efd is a new descriptor we own exclusively.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let event_control = dir.join("cgroup.event_control");
        std::fs::write(
            &event_control,
            format!("{} {}", eventfd.as_raw_fd(), oom.as_raw_fd()),
        )
        .map_err(|e| Error::io("register for OOM events", &event_control, e))?;
        Ok(Self::V1 {
            eventfd,
            dir: dir.to_path_buf(),
        })
    }

    /// Reads what made the descriptor readable (non-blocking: nothing pending is `Nothing`).
    pub fn check(&mut self) -> std::io::Result<OomCheck> {
        match self {
            Self::V1 { eventfd, dir } => {
                let mut buf = [0u8; 8];
                match nix::unistd::read(&*eventfd, &mut buf) {
                    Ok(8) => {}
                    Ok(_) | Err(nix::errno::Errno::EAGAIN) => return Ok(OomCheck::Nothing),
                    Err(e) => return Err(e.into()),
                }
                // The kernel signals when the cgroup goes under OOM (before its killer runs,
                // so kill counters may not have moved yet), and when the cgroup is removed: a
                // signal while it still exists is an OOM.
                if !dir.exists() {
                    return Ok(OomCheck::Gone);
                }
                Ok(OomCheck::Oom(1))
            }
            Self::V2 { inotify, file, kills } => {
                let mut gone = false;
                loop {
                    match inotify.read_events() {
                        Ok(events) if events.is_empty() => break,
                        Ok(events) => {
                            gone |= events.iter().any(|e| {
                                e.mask
                                    .intersects(AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_DELETE_SELF)
                            });
                        }
                        Err(nix::errno::Errno::EAGAIN) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                let now = match read_oom_kills(file) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OomCheck::Gone),
                    Err(e) if gone => {
                        log::debug!("memory.events after its cgroup went: {e}");
                        return Ok(OomCheck::Gone);
                    }
                    Err(e) => return Err(e),
                };
                let new = now.saturating_sub(*kills);
                *kills = now;
                if new > 0 {
                    Ok(OomCheck::Oom(new))
                } else if gone {
                    Ok(OomCheck::Gone)
                } else {
                    Ok(OomCheck::Nothing)
                }
            }
        }
    }
}

impl AsRawFd for OomWatch {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::V1 { eventfd, .. } => eventfd.as_raw_fd(),
            Self::V2 { inotify, .. } => inotify.as_fd().as_raw_fd(),
        }
    }
}

fn read_oom_kills(file: &Path) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(file)?;
    Ok(super::stats::parse_flat_keyed(&text)
        .get("oom_kill")
        .copied()
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(oom: u64, kills: u64) -> String {
        format!("low 0\nhigh 0\nmax {oom}\noom {oom}\noom_kill {kills}\noom_group_kill 0\n")
    }

    #[test]
    fn v2_counts_each_rise_of_oom_kill() {
        let t = tempfile::tempdir().expect("tempdir");
        let file = t.path().join("memory.events");
        std::fs::write(&file, events(0, 2)).expect("write");
        let cg = CgroupPaths::V2 {
            dir: t.path().to_path_buf(),
        };
        let mut w = OomWatch::register(&cg).expect("register");
        assert_eq!(
            w.check().expect("check"),
            OomCheck::Nothing,
            "kills before the watch do not count"
        );
        // The kernel rewrites the file: inotify hears it, the counter tells what it was.
        std::fs::write(&file, events(1, 2)).expect("write");
        assert_eq!(
            w.check().expect("check"),
            OomCheck::Nothing,
            "max/oom alone is no kill"
        );
        std::fs::write(&file, events(3, 5)).expect("write");
        assert_eq!(w.check().expect("check"), OomCheck::Oom(3));
        assert_eq!(w.check().expect("check"), OomCheck::Nothing);
        std::fs::remove_file(&file).expect("remove");
        assert_eq!(w.check().expect("check"), OomCheck::Gone);
    }

    #[test]
    fn v2_without_a_memory_controller_is_an_error() {
        let t = tempfile::tempdir().expect("tempdir");
        let cg = CgroupPaths::V2 {
            dir: t.path().to_path_buf(),
        };
        let e = OomWatch::register(&cg).expect_err("no memory.events");
        assert!(e.to_string().contains("memory.events"), "{e}");
    }

    #[test]
    fn v1_without_a_memory_cgroup_is_not_found() {
        let cg = CgroupPaths::V1 {
            dirs: [("freezer".to_owned(), PathBuf::from("/x"))]
                .into_iter()
                .collect(),
        };
        assert!(matches!(OomWatch::register(&cg), Err(Error::NotFound(_))));
    }
}
