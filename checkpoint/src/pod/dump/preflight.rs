//! The pre-flight check of a pod dump: will it fit? Before anything is frozen, the dump's size
//! is estimated (the memory the containers' processes use, what they changed in their root
//! filesystems, the pod's emptyDir volumes) and compared with the free space of the filesystem
//! the checkpoint goes to. A dump that cannot fit is refused with the numbers; one that fits
//! the estimate but still runs out of space fails cleanly all the same (see the pod dump).
//! The node configuration may keep a reserve free on that filesystem (`[dump] reserve_bytes`):
//! a dump must then fit with the reserve left over.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fs::units::mib;
use crate::pod::spec::empty_dirs;
use crate::pod::target::Target;
use podsnap_runtime::host::{Host, LinuxHost};
use std::sync::Arc;

/// What a dump is expected to write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Estimate {
    pub memory: u64,
    pub rootfs: u64,
    pub volumes: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.memory + self.rootfs + self.volumes
    }
}

/// Refuses a dump into `dest` that cannot fit and leave `reserve` bytes free; `carried` is
/// what the persistent volumes the dump carries hold.
pub async fn check(
    host: Arc<dyn Host>,
    dest: &Path,
    targets: &[Target],
    running: &[Target],
    carried: u64,
    reserve: u64,
) -> Result<()> {
    let dest = dest.to_path_buf();
    let targets: Vec<Target> = targets.to_vec();
    let running: Vec<Target> = running.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut estimate = estimate(&targets, &running);
        estimate.volumes += carried;
        let (fs, free) = free_space_on(host.as_ref(), &dest)?;
        decide(&dest, &fs, free, &estimate, reserve)
    })
    .await
    .map_err(|e| Error::io("estimate the dump", "", std::io::Error::other(e)))?
}

fn decide(dest: &Path, fs: &Path, free: u64, e: &Estimate, reserve: u64) -> Result<()> {
    if e.total().saturating_add(reserve) <= free {
        return Ok(());
    }
    let keep = if reserve == 0 {
        String::new()
    } else {
        format!(
            ", the node keeps {} free there ([dump] reserve_bytes = {reserve})",
            mib(reserve)
        )
    };
    Err(Error::NoSpace {
        path: dest.to_path_buf(),
        reason: format!(
            "the dump needs about {} (memory {}, root filesystem changes {}, volumes {}){keep} and {} has {} free",
            mib(e.total()),
            mib(e.memory),
            mib(e.rootfs),
            mib(e.volumes),
            fs.display(),
            mib(free)
        ),
    })
}

/// The dump's expected size.
pub fn estimate(targets: &[Target], running: &[Target]) -> Estimate {
    let mut e = Estimate::default();
    for t in running {
        // What CRIU writes: anonymous and shared memory (file-backed pages stay in files).
        // Without a memory controller (a v2 cgroup with none enabled), the processes' own.
        if let Some(cg) = &t.cgroups {
            e.memory += cg
                .stats()
                .dumpable_memory()
                .unwrap_or_else(|| processes_memory(cg));
        }
        if let Some(upper) = crate::archive::rootfs::upperdir_of(&t.bundle.join("rootfs")) {
            e.rootfs += tree_size(&upper);
        }
    }
    for (src, _) in empty_dirs(targets).values() {
        e.volumes += tree_size(src);
    }
    e
}

/// The anonymous and shared resident memory (`RssAnon` + `RssShmem`) of the cgroup's
/// processes; shared pages count once per process, so this errs high.
fn processes_memory(cg: &podsnap_runtime::cgroup::CgroupPaths) -> u64 {
    let pids = cg.processes().unwrap_or_default();
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .map(|status| {
            status
                .lines()
                .filter_map(|l| {
                    let rest = l
                        .strip_prefix("RssAnon:")
                        .or_else(|| l.strip_prefix("RssShmem:"))?;
                    rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
                })
                .sum::<u64>()
                * 1024
        })
        .sum()
}

/// Bytes of the regular files under `dir` (not following symlinks).
pub(super) fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
}

/// The free space (for unprivileged use, as CRIU's files are no different) of the filesystem
/// holding `path` or its nearest existing ancestor.
pub fn free_space(path: &Path) -> Result<(PathBuf, u64)> {
    free_space_on(&LinuxHost, path)
}

/// [`free_space`] on `host`.
pub fn free_space_on(host: &dyn Host, path: &Path) -> Result<(PathBuf, u64)> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent.to_path_buf(),
            _ => {
                p = PathBuf::from(".");
                break;
            }
        }
    }
    let free = host
        .free_bytes(&p)
        .map_err(|e| Error::io("read free space", &p, e))?;
    Ok((p, free))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_that_cannot_fit_is_refused_with_the_numbers() {
        let e = Estimate {
            memory: 300 << 20,
            rootfs: 1 << 20,
            volumes: 0,
        };
        assert!(decide(Path::new("/x"), Path::new("/"), 400 << 20, &e, 0).is_ok());
        let err = decide(Path::new("/x/ckpt"), Path::new("/x"), 100 << 20, &e, 0)
            .expect_err("too big")
            .to_string();
        assert!(err.contains("needs about 301.0 MiB (memory 300.0 MiB"), "{err}");
        assert!(err.contains("/x has 100.0 MiB free"), "{err}");
    }

    #[test]
    fn a_dump_that_would_eat_into_the_reserve_is_refused_with_the_numbers() {
        let e = Estimate {
            memory: 100 << 20,
            rootfs: 0,
            volumes: 0,
        };
        let free = 400 << 20;
        assert!(decide(Path::new("/x"), Path::new("/"), free, &e, 300 << 20).is_ok());
        let err = decide(Path::new("/x/ckpt"), Path::new("/x"), free, &e, (300 << 20) + 1)
            .expect_err("into the reserve")
            .to_string();
        assert!(err.contains("needs about 100.0 MiB"), "{err}");
        assert!(
            err.contains("the node keeps 300.0 MiB free there ([dump] reserve_bytes = 314572801)"),
            "{err}"
        );
        assert!(err.contains("/x has 400.0 MiB free"), "{err}");
        assert!(decide(Path::new("/x"), Path::new("/"), free, &e, u64::MAX).is_err());
    }

    #[test]
    fn free_space_is_read_from_the_nearest_existing_ancestor() {
        let t = tempfile::tempdir().expect("tempdir");
        let (fs, free) = free_space(&t.path().join("a/b/c")).expect("statvfs");
        assert_eq!(fs, t.path());
        assert!(free > 0);
        std::fs::write(t.path().join("f"), vec![0u8; 5000]).expect("write");
        assert_eq!(tree_size(t.path()), 5000);
    }
}
