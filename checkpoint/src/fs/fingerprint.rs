//! What a file looks like on disk (device, inode, size, times): a file unchanged since it was
//! read keeps its fingerprint.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What a file looked like when it was sealed: device, inode, size, mtime (s, ns), ctime (s, ns).
pub type Fingerprint = [i64; 7];

pub fn fingerprint(path: &Path) -> std::io::Result<Fingerprint> {
    let m = std::fs::symlink_metadata(path)?;
    Ok([
        m.dev() as i64,
        m.ino() as i64,
        m.size() as i64,
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ])
}
