//! Properties of the SysV readers: CRIU's shared memory records (`ipcns-shm-*.img`), the state
//! file a checkpoint holds (`pod/sysv-ipc.json`) and the kernel's listings. Valid inputs built
//! here, mutated, give an error or a value, never a panic.

use proptest::prelude::*;

use super::*;
use crate::criu::image::shm::*;
use crate::criu::image::testing::EDGE_VALUES;
use crate::testkit::{assert_bounded, cases, mutate, Mutation};
use std::collections::BTreeSet;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// An `IpcShmEntry` record as CRIU writes it (length, message, then the segment's bytes
/// rounded up to 4 unless they are in the page images); `data` caps the bytes written after
/// it (a crafted size is not followed by that much).
fn shm_record(id: u64, size: u64, in_pagemaps: bool, data: usize) -> Vec<u8> {
    let mut desc = Vec::new();
    for (f, v) in [(1u64, 5u64), (7, id)] {
        varint(f << 3, &mut desc);
        varint(v, &mut desc);
    }
    let mut entry = vec![0x0a];
    varint(desc.len() as u64, &mut entry);
    entry.extend(desc);
    for (f, v) in [(2u64, size), (3, u64::from(in_pagemaps))] {
        varint(f << 3, &mut entry);
        varint(v, &mut entry);
    }
    let mut out = (entry.len() as u32).to_le_bytes().to_vec();
    out.extend(&entry);
    if !in_pagemaps {
        let n = usize::try_from(size).unwrap_or(usize::MAX).min(data);
        out.extend(vec![0xab; n.div_ceil(4) * 4]);
    }
    out
}

/// Found by `crafted_shm_records_are_kept_or_refused`: a record whose size is near
/// `u64::MAX` overflowed the rounded data length (a panic in a debug build, a wrapped and
/// possibly accepted length in a release one).
#[test]
fn a_segment_size_past_usize_is_refused() {
    for size in [u64::MAX, u64::MAX - 2, 1 << 63] {
        let body = [shm_record(300, size, false, 0), shm_record(301, 8, false, 8)].concat();
        let keep: BTreeSet<i32> = [300, 301].into();
        let err = filter_shm_entries(&body, &keep).expect_err("refused");
        assert!(err.contains("truncated"), "{size}: {err}");
    }
}

fn record() -> impl Strategy<Value = (u64, u64, bool)> {
    (
        prop_oneof![0u64..512, Just(i32::MAX as u64), Just(1u64 << 32), Just(u64::MAX)],
        prop_oneof![0u64..64, (0..EDGE_VALUES.len()).prop_map(|i| EDGE_VALUES[i])],
        any::<bool>(),
    )
}

/// A SysV state a dump writes.
fn sample_state() -> SysvState {
    let perm = |id| Perm {
        key: 0x5151,
        id,
        uid: 0,
        gid: 0,
        mode: 0o640,
    };
    SysvState {
        shm: vec![ShmSegment {
            perm: perm(1),
            size: 8192,
            removed: false,
            attached_in: Some("app".into()),
        }],
        sem: vec![SemSet {
            perm: perm(2),
            values: vec![5, 0, 9],
        }],
        msg: vec![MsgQueue {
            perm: perm(3),
            qbytes: 16384,
            messages: vec![
                Message {
                    mtype: 1,
                    text: hex::encode("first"),
                },
                Message {
                    mtype: 7,
                    text: hex::encode("second"),
                },
            ],
        }],
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// CRIU's shared memory records, sizes at the edges, mutated: the filter keeps whole records
    /// or refuses, and never returns more than it was given.
    #[test]
    fn crafted_shm_records_are_kept_or_refused(
        records in prop::collection::vec(record(), 0..5),
        keep in prop::collection::btree_set(prop_oneof![0i32..512, Just(i32::MAX)], 0..4),
        m in prop::collection::vec(any::<Mutation>(), 0..4),
    ) {
        let body: Vec<u8> = records
            .iter()
            .flat_map(|&(id, size, paged)| shm_record(id, size, paged, 256))
            .collect();
        let body = mutate(&body, &m);
        let kept = assert_bounded("filter_shm_entries", body.len(), 8, 4096, || {
            filter_shm_entries(&body, &keep)
        });
        if let Ok(kept) = kept {
            prop_assert!(kept.len() <= body.len());
            // What is kept is itself a well-formed list of the kept segments.
            let again = filter_shm_entries(&kept, &keep);
            prop_assert_eq!(again, Ok(kept));
        }
    }

    /// A mutated state file: read and validated, or refused; a state that validates has ids,
    /// modes and messages a restore can create.
    #[test]
    fn mutated_state_files_validate_or_are_refused(m in prop::collection::vec(any::<Mutation>(), 1..8)) {
        let json = serde_json::to_vec(&sample_state()).expect("json");
        let bytes = mutate(&json, &m);
        let Ok(state) = serde_json::from_slice::<SysvState>(&bytes) else {
            return Ok(());
        };
        if state.validate().is_ok() {
            for p in state.shm.iter().map(|s| &s.perm).chain(state.sem.iter().map(|s| &s.perm)) {
                prop_assert!(p.id >= 0 && p.mode <= 0o777);
            }
            for q in &state.msg {
                prop_assert!(q.perm.id >= 0 && q.perm.mode <= 0o777);
                for msg in &q.messages {
                    prop_assert!(msg.mtype > 0 && hex::decode(&msg.text).is_ok());
                }
            }
        }
    }

    /// The kernel's listings, any text: ids or nothing.
    #[test]
    fn listings_take_any_text(text in "\\PC{0,200}") {
        let _ = parse_ids(&text);
        let _ = podsnap_runtime::host::linux::sysv_mappings(&text);
    }
}
