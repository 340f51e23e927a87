//! The SysV IPC images of one container's CRIU dump, trimmed to what that container's restore
//! must create: the pod's SysV objects are restored once for the pod, not by each CRIU run.

use std::collections::BTreeSet;
use std::path::Path;

use super::{fields as protobuf_fields, Field, IMG_COMMON_MAGIC};
use crate::error::{Error, Result};

/// Rewrites the IPC namespace images of one container's CRIU dump in `criu_dir` so its restore
/// creates only the segments in `keep` (those its own processes attach: CRIU must create them to
/// attach them again) and no semaphore set or message queue: podsnap restores the rest once for
/// the pod (the pod's SysV restore); CRIU restoring them again in each container's run would fail on the
/// objects already there.
pub fn trim_criu_images(criu_dir: &Path, keep: &BTreeSet<i32>) -> Result<()> {
    let entries = std::fs::read_dir(criu_dir).map_err(|e| Error::io("read CRIU images", criu_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("read CRIU images", criu_dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        if name.starts_with("ipcns-sem-") || name.starts_with("ipcns-msg-") {
            rewrite_image(&path, |_| Ok(Vec::new()))?;
        } else if name.starts_with("ipcns-shm-") {
            rewrite_image(&path, |body| filter_shm_entries(body, keep))?;
        }
    }
    Ok(())
}

/// Replaces the entries of the image at `path` (after its two magics) by `f(entries)`.
fn rewrite_image(path: &Path, f: impl FnOnce(&[u8]) -> std::result::Result<Vec<u8>, String>) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read a CRIU image", path, e))?;
    let bad = |reason: String| Error::InvalidCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 8 || u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) != IMG_COMMON_MAGIC {
        return Err(bad("not a CRIU image (no magic)".into()));
    }
    let mut out = bytes[..8].to_vec();
    out.extend(f(&bytes[8..]).map_err(bad)?);
    if out.len() == bytes.len() {
        return Ok(());
    }
    crate::fs::private::replace_private(path, &out, "rewrite a CRIU image")
}

/// The `IpcShmEntry` records of `body` whose segment id is in `keep`, each with the bytes that
/// follow it in the image (the segment's contents, unless CRIU put them in its page images).
pub(crate) fn filter_shm_entries(body: &[u8], keep: &BTreeSet<i32>) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let len_bytes: [u8; 4] = body
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or("a truncated shm entry")?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        let entry = body.get(at + 4..at + 4 + len).ok_or("a truncated shm entry")?;
        let shm = ShmRecord::parse(entry)?;
        // The segment's bytes, rounded up to 4; a crafted size may not fit an address.
        let data = if shm.in_pagemaps {
            Some(0)
        } else {
            usize::try_from(shm.size)
                .ok()
                .and_then(|n| n.checked_next_multiple_of(4))
        };
        let end = data
            .and_then(|data| (at + 4 + len).checked_add(data))
            .filter(|end| *end <= body.len())
            .ok_or("a truncated shm segment")?;
        if keep.contains(&shm.id) {
            out.extend_from_slice(&body[at..end]);
        }
        at = end;
    }
    Ok(out)
}

/// What podsnap reads of CRIU's `IpcShmEntry` (protobuf: 1 desc {7 id}, 2 size, 3 in_pagemaps).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ShmRecord {
    pub(crate) id: i32,
    size: u64,
    in_pagemaps: bool,
}

impl ShmRecord {
    pub(crate) fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut r = ShmRecord::default();
        for (field, value) in protobuf_fields(bytes)? {
            match (field, value) {
                (1, Field::Bytes(desc)) => {
                    for (f, v) in protobuf_fields(desc)? {
                        if let (7, Field::Varint(id)) = (f, v) {
                            r.id = i32::try_from(id).map_err(|_| "a bad shm id")?;
                        }
                    }
                }
                (2, Field::Varint(size)) => r.size = size,
                (3, Field::Varint(flag)) => r.in_pagemaps = flag != 0,
                _ => {}
            }
        }
        Ok(r)
    }
}
