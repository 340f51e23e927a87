//! What a checkpoint directory must hold: exactly the listed files (no more, each of its
//! size), and each with its digest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::format::digest::{DigestAlgorithm, FileDigest};
use crate::format::manifest::MANIFEST;

/// The checkpoint directory holds exactly the manifest and the listed files, each a regular
/// file of its listed size; directories only where a listed file needs them.
pub(crate) fn check_listing(
    dir: &Path,
    files: &BTreeMap<String, FileDigest>,
) -> std::result::Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let mut needed_dirs = std::collections::HashSet::new();
    for rel in files.keys() {
        let mut p = Path::new(rel).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            needed_dirs.insert(d.to_path_buf());
            p = d.parent();
        }
    }
    let mut seen = 0usize;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let abs = dir.join(&rel_dir);
        let entries = std::fs::read_dir(&abs).map_err(|e| format!("{}: {e}", abs.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", abs.display()))?;
            let rel = rel_dir.join(entry.file_name());
            let rel_str = rel.to_string_lossy().into_owned();
            let ft = entry.file_type().map_err(|e| format!("{rel_str}: {e}"))?;
            if ft.is_dir() {
                if !needed_dirs.contains(&rel) {
                    return Err(format!(
                        "{rel_str}/ is not part of the checkpoint (the manifest lists nothing in it)"
                    ));
                }
                stack.push(rel);
            } else if ft.is_file() {
                if rel_str == MANIFEST {
                    continue;
                }
                let Some(want) = files.get(&rel_str) else {
                    return Err(format!("{rel_str} is not listed in the manifest"));
                };
                let len = entry.metadata().map_err(|e| format!("{rel_str}: {e}"))?.len();
                if len != want.size {
                    return Err(format!(
                        "{rel_str} has {len} bytes, the manifest says {}",
                        want.size
                    ));
                }
                seen += 1;
            } else {
                let kind = if ft.is_symlink() {
                    "a symlink"
                } else if ft.is_fifo() {
                    "a FIFO"
                } else if ft.is_socket() {
                    "a socket"
                } else {
                    "a device node"
                };
                return Err(format!("{rel_str} is {kind}, not a regular file"));
            }
        }
    }
    if seen != files.len() {
        let missing = files
            .keys()
            .find(|rel| !dir.join(rel).is_file())
            .cloned()
            .unwrap_or_default();
        return Err(format!("{missing}: listed in the manifest but missing"));
    }
    Ok(())
}

/// Checks every file's digest, largest files first, on as many threads as there are cores.
pub(crate) fn verify_digests(
    dir: &Path,
    algorithm: DigestAlgorithm,
    files: &BTreeMap<String, FileDigest>,
) -> std::result::Result<(), String> {
    let mut todo: Vec<(&String, &FileDigest)> = files.iter().collect();
    todo.sort_by_key(|(_, d)| std::cmp::Reverse(d.size));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(todo.len().max(1));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((rel, want)) = todo.get(i) else {
                        return Ok(());
                    };
                    let got = algorithm
                        .file(&dir.join(rel))
                        .map_err(|e| format!("{rel}: {e}"))?;
                    if got != want.digest {
                        // Stop the other workers early.
                        next.store(usize::MAX / 2, std::sync::atomic::Ordering::Relaxed);
                        return Err(format!(
                            "{rel} is damaged: its {} does not match the manifest",
                            algorithm.shown()
                        ));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a digest worker panicked".into()))
            })
            .collect::<std::result::Result<Vec<()>, String>>()
            .map(drop)
    })
}
