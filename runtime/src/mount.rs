//! Unmounting what a failed operation left mounted (CRIU's cgroup yard in its work directory).

use std::path::{Path, PathBuf};

/// Mount points at or below `dir`, deepest first, from `/proc/self/mountinfo` (none when the
/// table cannot be read: logged).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mounts = match crate::mountinfo::read_self() {
        Ok(mounts) => mounts,
        Err(e) => {
            log::warn!("mounts under {}: {e}", dir.display());
            return Vec::new();
        }
    };
    let mut found: Vec<PathBuf> = mounts
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Detaches every mount at or below `dir`; returns how many it could not detach.
pub fn unmount_under(dir: &Path) -> usize {
    let mut failed = 0;
    for m in mounts_under(dir) {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            log::warn!("unmount {}: {e}", m.display());
            failed += 1;
        }
    }
    failed
}
