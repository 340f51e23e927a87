//! What podsnap reads of CRIU's image files, and no more.
//!
//! An image is two little-endian magics (the common one, then the image's own) followed by
//! entries: a little-endian u32 length and a protobuf message of that length, in some images
//! followed by data the message describes (a socket queue's bytes, a SysV segment's). Every
//! reader here treats the bytes as untrusted: a truncated or malformed image is an error, never
//! a panic or a read past the end.

use std::path::Path;

use crate::error::{Error, Result};

pub mod shm;

/// The magic at the start of every image but the inventory.
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// `pstree.img`.
pub const PSTREE_MAGIC: u32 = 0x5027_3030;
/// `pagemap-*.img`.
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// `files.img`: every file a dumped process had open, unix sockets among them.
pub const FILES_MAGIC: u32 = 0x5630_3138;
/// `sk-queues.img`: what sat in the receive queues of the dumped sockets.
pub const SK_QUEUES_MAGIC: u32 = 0x5626_4026;

/// A field of a protobuf message, as far as podsnap reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// A fixed 32- or 64-bit value: skipped.
    Other,
}

fn varint(bytes: &mut &[u8]) -> std::result::Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first().ok_or("a truncated varint")?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("a varint too long".into())
}

/// The (field number, value) pairs of a protobuf message, in order.
pub fn fields(mut bytes: &[u8]) -> std::result::Result<Vec<(u64, Field<'_>)>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let value = match key & 7 {
            0 => Field::Varint(varint(&mut bytes)?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                bytes = bytes.get(n..).ok_or("a truncated field")?;
                Field::Other
            }
            2 => {
                let n = usize::try_from(varint(&mut bytes)?).map_err(|_| "a field too long")?;
                let v = bytes.get(..n).ok_or("a truncated field")?;
                bytes = &bytes[n..];
                Field::Bytes(v)
            }
            _ => return Err("an unknown protobuf wire type".into()),
        };
        out.push((key >> 3, value));
    }
    Ok(out)
}

/// The varint fields of a protobuf message: (field number, value).
pub fn varints(bytes: &[u8]) -> std::result::Result<Vec<(u64, u64)>, String> {
    Ok(fields(bytes)?
        .into_iter()
        .filter_map(|(n, v)| match v {
            Field::Varint(v) => Some((n, v)),
            _ => None,
        })
        .collect())
}

/// Checks the image's own magic (`what` names it in the error) and returns its body.
fn body<'a>(data: &'a [u8], magic: u32, what: &str) -> std::result::Result<&'a [u8], String> {
    let u32_at =
        |at: usize| -> Option<u32> { Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?)) };
    if u32_at(4) != Some(magic) {
        return Err(format!("not a CRIU {what} image"));
    }
    Ok(&data[8..])
}

/// Takes one entry (its length, then the message) off the front of `body`.
fn next_entry<'a>(body: &mut &'a [u8]) -> std::result::Result<&'a [u8], String> {
    let len: [u8; 4] = body
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or("a truncated entry")?;
    let len = u32::from_le_bytes(len) as usize;
    let entry = body.get(4..4 + len).ok_or("a truncated entry")?;
    *body = &body[4 + len..];
    Ok(entry)
}

/// The messages of an image whose entries carry no data after them.
pub fn entries<'a>(data: &'a [u8], magic: u32, what: &str) -> std::result::Result<Vec<&'a [u8]>, String> {
    let mut rest = body(data, magic, what)?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        out.push(next_entry(&mut rest)?);
    }
    Ok(out)
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `msg` with each varint field `f(field number, value)` answers `Some` for set to that value;
/// every other field copied as it is.
fn with_varints(mut msg: &[u8], f: impl Fn(u64, u64) -> Option<u64>) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(msg.len());
    while !msg.is_empty() {
        let start = msg;
        let key = varint(&mut msg)?;
        let wire = key & 7;
        if wire == 0 {
            let value = varint(&mut msg)?;
            put_varint(key, &mut out);
            put_varint(f(key >> 3, value).unwrap_or(value), &mut out);
            continue;
        }
        let len = match wire {
            1 => 8,
            5 => 4,
            2 => usize::try_from(varint(&mut msg)?).map_err(|_| "a field too long")?,
            _ => return Err("an unknown protobuf wire type".into()),
        };
        msg = msg.get(len..).ok_or("a truncated field")?;
        out.extend_from_slice(&start[..start.len() - msg.len()]);
    }
    Ok(out)
}

/// Makes the first process of the dump in `dir` (the root of its tree) the leader of its own
/// session and process group (`pstree.img`), with every process of the tree that shared its
/// session or group. For a process a pod's pause process adopted: it was started in a session
/// whose leader is gone (a daemon's double fork), which CRIU restores only as a shell job, in
/// the restoring process's session, out of reach from the pod's PID namespace.
pub fn make_session_leader(dir: &Path) -> Result<()> {
    let path = dir.join("pstree.img");
    let bad = |reason: String| invalid(&path, reason);
    let data = crate::fs::read::read_capped(&path, MAX_IMAGE_BYTES).map_err(|e| bad(e.to_string()))?;
    let messages = entries(&data, PSTREE_MAGIC, "process tree").map_err(bad)?;
    let read = |m: &[u8]| -> std::result::Result<(u64, u64, u64), String> {
        let f = varints(m)?;
        let get = |n: u64| f.iter().find(|(k, _)| *k == n).map(|(_, v)| *v).unwrap_or(0);
        Ok((get(1), get(3), get(4)))
    };
    let root = messages.first().ok_or_else(|| bad("no process".into()))?;
    let (pid, pgid, sid) = read(root).map_err(bad)?;
    if sid == pid && pgid == pid {
        return Ok(());
    }
    let pids: std::collections::HashSet<u64> = messages
        .iter()
        .map(|m| read(m).map(|(p, _, _)| p))
        .collect::<std::result::Result<_, _>>()
        .map_err(bad)?;
    // Only ids of processes gone (not in the tree) are replaced.
    let gone = |v: u64| (v == sid || v == pgid) && !pids.contains(&v);
    let mut out = data[..8].to_vec();
    for m in &messages {
        let m = with_varints(m, |field, v| {
            ((field == 3 || field == 4) && gone(v)).then_some(pid)
        })
        .map_err(bad)?;
        out.extend((m.len() as u32).to_le_bytes());
        out.extend(m);
    }
    crate::fs::private::replace_private(&path, &out, "rewrite CRIU's process tree")
}

/// What podsnap reads of a unix socket in `files.img` (CRIU's `unix_sk_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixSocket {
    /// The file id: what the socket's queue entries name.
    pub id: u32,
    pub ino: u64,
    /// `SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_SEQPACKET`.
    pub kind: u32,
    /// The file's status flags (`O_NONBLOCK`...).
    pub flags: u32,
    /// CRIU's `sk_shutdown`: 1 read, 2 write, 3 both.
    pub shutdown: u32,
}

/// The largest `files.img` or `sk-queues.img` read.
const MAX_IMAGE_BYTES: u64 = 64 << 20;

fn read_image(dir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let path = dir.join(name);
    match crate::fs::read::read_capped(&path, MAX_IMAGE_BYTES) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(invalid(&path, e.to_string())),
    }
}

fn invalid(path: &Path, reason: String) -> Error {
    Error::InvalidCheckpoint {
        path: path.to_path_buf(),
        reason,
    }
}

/// The unix socket with inode `ino` among the files of the dump in `dir` (`files.img`).
pub fn unix_socket(dir: &Path, ino: u64) -> Result<Option<UnixSocket>> {
    let Some(data) = read_image(dir, "files.img")? else {
        return Ok(None);
    };
    let bad = |reason: String| invalid(&dir.join("files.img"), reason);
    for entry in entries(&data, FILES_MAGIC, "files").map_err(bad)? {
        // file_entry: type = 1, id = 2, ... usk = 16 (unix_sk_entry).
        for (n, v) in fields(entry).map_err(bad)? {
            let (16, Field::Bytes(usk)) = (n, v) else { continue };
            // unix_sk_entry: id = 1, ino = 2, type = 3, state = 4, flags = 5, ..., shutdown = 12.
            let f = varints(usk).map_err(bad)?;
            let get = |n: u64| f.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
            if get(2) != Some(ino) {
                continue;
            }
            let small = |n: u64| {
                u32::try_from(get(n).unwrap_or(0))
                    .map_err(|_| bad(format!("socket {ino}: field {n} out of range")))
            };
            return Ok(Some(UnixSocket {
                id: small(1)?,
                ino,
                kind: small(3)?,
                flags: small(5)?,
                shutdown: small(12)?,
            }));
        }
    }
    Ok(None)
}

/// The packets that sat in the receive queue of the socket with file id `id` when the dump in
/// `dir` was taken (`sk-queues.img`), in order. A queued packet carrying descriptors or
/// credentials is refused: podsnap hands the bytes back, not what they carried.
pub fn queued_packets(dir: &Path, id: u32) -> Result<Vec<Vec<u8>>> {
    let Some(data) = read_image(dir, "sk-queues.img")? else {
        return Ok(Vec::new());
    };
    let bad = |reason: String| invalid(&dir.join("sk-queues.img"), reason);
    let mut rest = body(&data, SK_QUEUES_MAGIC, "socket queue").map_err(bad)?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let entry = next_entry(&mut rest).map_err(bad)?;
        // sk_packet_entry: id_for = 1, length = 2, scm = 4 (repeated); the data follows.
        let (mut id_for, mut length, mut scm) = (None, None, false);
        for (n, v) in fields(entry).map_err(bad)? {
            match (n, v) {
                (1, Field::Varint(v)) => id_for = Some(v),
                (2, Field::Varint(v)) => length = Some(v),
                (4, _) => scm = true,
                _ => {}
            }
        }
        let (Some(id_for), Some(length)) = (id_for, length) else {
            return Err(bad("a queued packet without its socket or length".into()));
        };
        let length = usize::try_from(length).map_err(|_| bad("a queued packet too long".into()))?;
        let payload = rest
            .get(..length)
            .ok_or_else(|| bad("a truncated queued packet".into()))?;
        rest = &rest[length..];
        if id_for != u64::from(id) {
            continue;
        }
        if scm {
            return Err(bad(format!(
                "socket {id}: a queued message carries descriptors or credentials, which podsnap \
                 cannot hand back"
            )));
        }
        out.push(payload.to_vec());
    }
    Ok(out)
}

/// Images as CRIU writes them, for tests of code that reads them.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// An image of `magic` holding `entries` (message, data after it).
    pub fn image(magic: u32, entries: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = [IMG_COMMON_MAGIC.to_le_bytes(), magic.to_le_bytes()].concat();
        for (msg, data) in entries {
            out.extend((msg.len() as u32).to_le_bytes());
            out.extend(*msg);
            out.extend(*data);
        }
        out
    }

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Values that make a varint field interesting: limits of the integer types the fields
    /// become, and page counts whose byte count overflows.
    pub const EDGE_VALUES: [u64; 12] = [
        0,
        1,
        2,
        0x7f,
        0x80,
        i32::MAX as u64,
        u32::MAX as u64,
        u32::MAX as u64 + 1,
        u64::MAX / 4096 + 1,
        1 << 52,
        1 << 63,
        u64::MAX,
    ];

    /// `data` (an image whose entries carry no data after them, as `magic` says) with varint
    /// fields set to edge values: each pick `(entry, field, value)` sets, in entry number
    /// `entry` (modulo the count), every varint of the field number found at index `field`
    /// (modulo the fields) to `EDGE_VALUES[value]` (modulo their count). Entries are written
    /// back with their new lengths, so the image stays well formed and reaches the fields'
    /// readers.
    pub fn with_edge_values(data: &[u8], magic: u32, picks: &[(u32, u32, u8)]) -> Vec<u8> {
        let Ok(messages) = entries(data, magic, "image") else {
            return data.to_vec();
        };
        let mut messages: Vec<Vec<u8>> = messages.into_iter().map(<[u8]>::to_vec).collect();
        for &(entry, field, value) in picks {
            if messages.is_empty() {
                break;
            }
            let i = entry as usize % messages.len();
            let Ok(numbers) = varints(&messages[i]) else {
                continue;
            };
            let Some(&(number, _)) = numbers.get(field as usize % numbers.len().max(1)) else {
                continue;
            };
            let edge = EDGE_VALUES[value as usize % EDGE_VALUES.len()];
            if let Ok(m) = with_varints(&messages[i], |n, _| (n == number).then_some(edge)) {
                messages[i] = m;
            }
        }
        let mut out = data[..8].to_vec();
        for m in messages {
            out.extend((m.len() as u32).to_le_bytes());
            out.extend(m);
        }
        out
    }

    /// A `file_entry` holding a `unix_sk_entry`.
    pub fn unix_file_entry(s: &UnixSocket) -> Vec<u8> {
        let mut usk = Vec::new();
        for (field, value) in [
            (1, u64::from(s.id)),
            (2, s.ino),
            (3, u64::from(s.kind)),
            (4, 1),
            (5, u64::from(s.flags)),
            (12, u64::from(s.shutdown)),
        ] {
            varint(field << 3, &mut usk);
            varint(value, &mut usk);
        }
        let mut entry = Vec::new();
        for (field, value) in [(1u64, 7u64), (2, u64::from(s.id))] {
            varint(field << 3, &mut entry);
            varint(value, &mut entry);
        }
        varint((16 << 3) | 2, &mut entry);
        varint(usk.len() as u64, &mut entry);
        entry.extend(usk);
        entry
    }

    /// An `sk_packet_entry` for the socket of file id `id` and `len` bytes.
    pub fn queue_entry(id: u32, len: usize) -> Vec<u8> {
        let mut entry = Vec::new();
        for (field, value) in [(1u64, u64::from(id)), (2, len as u64)] {
            varint(field << 3, &mut entry);
            varint(value, &mut entry);
        }
        entry
    }

    /// Writes `files.img` with `sockets` and `sk-queues.img` with `queued` (file id, bytes)
    /// into `dir`.
    pub fn write_socket_images(dir: &Path, sockets: &[UnixSocket], queued: &[(u32, &[u8])]) {
        std::fs::create_dir_all(dir).expect("mkdir");
        let files: Vec<Vec<u8>> = sockets.iter().map(unix_file_entry).collect();
        let files: Vec<(&[u8], &[u8])> = files.iter().map(|e| (e.as_slice(), &[][..])).collect();
        std::fs::write(dir.join("files.img"), image(FILES_MAGIC, &files)).expect("files.img");
        let heads: Vec<Vec<u8>> = queued.iter().map(|(id, b)| queue_entry(*id, b.len())).collect();
        let queue: Vec<(&[u8], &[u8])> = heads
            .iter()
            .zip(queued)
            .map(|(h, (_, b))| (h.as_slice(), *b))
            .collect();
        std::fs::write(dir.join("sk-queues.img"), image(SK_QUEUES_MAGIC, &queue)).expect("sk-queues.img");
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// The bytes of a socket queue image CRIU 4.2.1 wrote here: one packet of 88 bytes for the
    /// socket of file id 0x1b.
    fn criu_queue_image() -> Vec<u8> {
        let text: Vec<u8> = (10..=20)
            .flat_map(|i| format!("ping {i}\n").into_bytes())
            .collect();
        assert_eq!(text.len(), 88);
        image(SK_QUEUES_MAGIC, &[(&[0x08, 0x1b, 0x10, 0x58], &text)])
    }

    #[test]
    fn queued_packets_are_read_for_their_socket_only() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut img = criu_queue_image();
        // A second socket's packet after it.
        img.extend(4u32.to_le_bytes());
        img.extend([0x08, 0x1c, 0x10, 0x03]);
        img.extend(b"abc");
        std::fs::write(t.path().join("sk-queues.img"), &img).expect("write");
        let got = queued_packets(t.path(), 0x1b).expect("read");
        assert_eq!(got.len(), 1);
        assert!(got[0].starts_with(b"ping 10\n") && got[0].ends_with(b"ping 20\n"));
        assert_eq!(
            queued_packets(t.path(), 0x1c).expect("read"),
            vec![b"abc".to_vec()]
        );
        assert!(queued_packets(t.path(), 7).expect("read").is_empty());
    }

    #[test]
    fn crafted_queues_are_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("sk-queues.img");
        let mut truncated = criu_queue_image();
        truncated.truncate(truncated.len() - 1);
        let long_length = image(
            SK_QUEUES_MAGIC,
            &[(&[0x08, 0x1b, 0x10, 0xff, 0xff, 0xff, 0xff, 0x0f], b"x")],
        );
        let descriptors = image(
            SK_QUEUES_MAGIC,
            &[(&[0x08, 0x1b, 0x10, 0x01, 0x22, 0x02, 0x08, 0x01], b"x")],
        );
        let wrong_magic = image(FILES_MAGIC, &[]);
        for (bytes, says) in [
            (truncated, "truncated"),
            (long_length, "truncated"),
            (descriptors, "descriptors"),
            (wrong_magic, "not a CRIU"),
        ] {
            std::fs::write(&path, &bytes).expect("write");
            let err = queued_packets(t.path(), 0x1b).expect_err("refused").to_string();
            assert!(err.contains(says), "{err}");
        }
        assert!(queued_packets(&t.path().join("none"), 1)
            .expect("no image")
            .is_empty());
    }

    #[test]
    fn unix_sockets_are_found_by_inode_in_the_files_image() {
        let t = tempfile::tempdir().expect("tempdir");
        let s = UnixSocket {
            id: 0x21,
            ino: 10_699_210,
            kind: 1,
            flags: 0x802,
            shutdown: 2,
        };
        let other = UnixSocket {
            id: 0x22,
            ino: 5,
            ..s
        };
        write_socket_images(t.path(), &[other, s], &[]);
        assert_eq!(unix_socket(t.path(), 10_699_210).expect("read"), Some(s));
        assert_eq!(unix_socket(t.path(), 1).expect("read"), None);
    }

    #[test]
    fn an_adopted_tree_leads_its_own_session() {
        let t = tempfile::tempdir().expect("tempdir");
        let entry = |pid: u64, pgid: u64, sid: u64, threads: &[u64]| {
            let mut m = Vec::new();
            for (f, v) in [(1, pid), (2, 0), (3, pgid), (4, sid)] {
                put_varint(f << 3, &mut m);
                put_varint(v, &mut m);
            }
            for th in threads {
                put_varint(5 << 3, &mut m);
                put_varint(*th, &mut m);
            }
            m
        };
        // A daemon (12) whose session leader (11) is gone, and its child (13) in a group of its own.
        let root = entry(12, 11, 11, &[12, 40]);
        let child = entry(13, 13, 11, &[13]);
        let path = t.path().join("pstree.img");
        std::fs::write(&path, image(PSTREE_MAGIC, &[(&root, &[]), (&child, &[])])).expect("write");
        make_session_leader(t.path()).expect("rewritten");
        let data = std::fs::read(&path).expect("read");
        let got: Vec<Vec<(u64, u64)>> = entries(&data, PSTREE_MAGIC, "x")
            .expect("entries")
            .into_iter()
            .map(|m| varints(m).expect("fields"))
            .collect();
        assert_eq!(got[0], vec![(1, 12), (2, 0), (3, 12), (4, 12), (5, 12), (5, 40)]);
        assert_eq!(got[1], vec![(1, 13), (2, 0), (3, 13), (4, 12), (5, 13)]);
        // Already a leader: left alone.
        let before = std::fs::read(&path).expect("read");
        make_session_leader(t.path()).expect("no change");
        assert_eq!(std::fs::read(&path).expect("read"), before);
        std::fs::write(&path, b"junk").expect("write");
        assert!(make_session_leader(t.path()).is_err());
    }

    #[test]
    fn fields_survive_arbitrary_bytes() {
        for seed in 0u32..2000 {
            let bytes: Vec<u8> = (0..(seed % 37))
                .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 97) >> 7) as u8)
                .collect();
            let _ = fields(&bytes);
            let _ = entries(&bytes, SK_QUEUES_MAGIC, "x");
        }
    }
}

#[cfg(test)]
mod proptests;
