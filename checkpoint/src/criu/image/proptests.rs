//! Properties of the CRIU image readers: any bytes, and real images CRIU wrote (`testdata/`,
//! dumped by CRIU 4.2 from a process with a unix stream pair holding queued bytes, a seqpacket
//! pair holding one packet, and a child) mutated, give an error or a value: no panic, memory in
//! proportion to the image.

use proptest::prelude::*;

use super::*;
use crate::testkit::{assert_bounded, cases, mutate, Mutation};

const PSTREE: &[u8] = include_bytes!("testdata/pstree.img");
const FILES: &[u8] = include_bytes!("testdata/files.img");
const SK_QUEUES: &[u8] = include_bytes!("testdata/sk-queues.img");

/// Bytes held per image byte at most: entries and fields are listed (a few dozen bytes per
/// field of two bytes), then copied out.
const PER_BYTE: usize = 64;
const FIXED: usize = 64 << 10;

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(any::<Mutation>(), 0..6)
}

/// Varint fields of well-formed entries set to edge values (see `testing::with_edge_values`).
fn edges() -> impl Strategy<Value = Vec<(u32, u32, u8)>> {
    prop::collection::vec(any::<(u32, u32, u8)>(), 0..4)
}

/// The inodes of the unix sockets in a files image.
fn unix_inodes(files: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    for entry in entries(files, FILES_MAGIC, "files").expect("the fixture parses") {
        for (n, v) in fields(entry).expect("fields") {
            if let (16, Field::Bytes(usk)) = (n, v) {
                let f = varints(usk).expect("usk");
                out.extend(f.iter().filter(|(k, _)| *k == 2).map(|(_, v)| *v));
            }
        }
    }
    out
}

#[test]
fn the_fixtures_are_what_criu_wrote() {
    let t = tempfile::tempdir().expect("tempdir");
    std::fs::write(t.path().join("files.img"), FILES).expect("write");
    std::fs::write(t.path().join("sk-queues.img"), SK_QUEUES).expect("write");
    let inodes = unix_inodes(FILES);
    assert_eq!(inodes.len(), 4, "two pairs");
    let mut queued = Vec::new();
    for ino in inodes {
        let s = unix_socket(t.path(), ino).expect("read").expect("found");
        queued.extend(queued_packets(t.path(), s.id).expect("queue"));
    }
    queued.sort();
    assert_eq!(queued, vec![b"one packet".to_vec(), b"queued for b ".repeat(8)]);
    std::fs::write(t.path().join("pstree.img"), PSTREE).expect("write");
    assert_eq!(entries(PSTREE, PSTREE_MAGIC, "pstree").expect("tree").len(), 2);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any bytes: the protobuf and entry readers answer without panicking, in bounded memory.
    #[test]
    fn protobuf_readers_take_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        assert_bounded("fields", bytes.len(), PER_BYTE, FIXED, || {
            let _ = fields(&bytes);
            let _ = varints(&bytes);
            let _ = with_varints(&bytes, |_, v| Some(v.wrapping_add(1)));
            for magic in [PSTREE_MAGIC, FILES_MAGIC, SK_QUEUES_MAGIC] {
                if let Ok(list) = entries(&bytes, magic, "x") {
                    prop_assert!(list.len() <= bytes.len() / 4);
                }
            }
            Ok(())
        })?;
    }

    /// Messages re-encoded with their varints changed keep every other field as it was.
    #[test]
    fn with_varints_keeps_what_it_does_not_change(m in mutations()) {
        let tree = entries(PSTREE, PSTREE_MAGIC, "pstree").expect("fixture");
        for msg in tree {
            let msg = mutate(msg, &m);
            if let (Ok(before), Ok(after)) = (fields(&msg), with_varints(&msg, |_, _| None)) {
                prop_assert_eq!(fields(&after).expect("re-encoded"), before);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(500),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A mutated process tree: the session rewrite and the highest pid answer, and a rewritten
    /// tree is still a tree of as many processes.
    #[test]
    fn mutated_process_trees_are_read_or_refused(picks in edges(), m in mutations()) {
        let bytes = mutate(&testing::with_edge_values(PSTREE, PSTREE_MAGIC, &picks), &m);
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("pstree.img");
        std::fs::write(&path, &bytes).expect("write");
        let before = entries(&bytes, PSTREE_MAGIC, "pstree").map(|e| e.len());
        let done = assert_bounded("make_session_leader", bytes.len(), PER_BYTE, FIXED, || {
            make_session_leader(t.path())
        });
        if done.is_ok() {
            let after = std::fs::read(&path).expect("read");
            prop_assert_eq!(entries(&after, PSTREE_MAGIC, "pstree").map(|e| e.len()), before);
        }
        let _ = assert_bounded("highest_pid", bytes.len(), PER_BYTE, FIXED, || {
            crate::criu::container::highest_pid(t.path())
        });
    }

    /// Mutated files and queue images: every socket lookup and queue read answers, and what a
    /// queue read returns is never more than the image holds.
    #[test]
    fn mutated_socket_images_are_read_or_refused(
        picks in edges(),
        files_m in mutations(),
        queue_m in mutations(),
        mutate_files in any::<bool>(),
    ) {
        let files = testing::with_edge_values(FILES, FILES_MAGIC, &picks);
        let files = if mutate_files { mutate(&files, &files_m) } else { files };
        let queue = mutate(SK_QUEUES, &queue_m);
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("files.img"), &files).expect("write");
        std::fs::write(t.path().join("sk-queues.img"), &queue).expect("write");
        for ino in unix_inodes(FILES) {
            let found = assert_bounded("unix_socket", files.len(), PER_BYTE, FIXED, || {
                unix_socket(t.path(), ino)
            });
            let id = match found {
                Ok(Some(s)) => s.id,
                _ => 0x1b,
            };
            let packets = assert_bounded("queued_packets", queue.len(), PER_BYTE, FIXED, || {
                queued_packets(t.path(), id)
            });
            if let Ok(packets) = packets {
                prop_assert!(packets.iter().map(Vec::len).sum::<usize>() <= queue.len());
            }
        }
    }
}
