//! Properties of what a restore reads of a container's CRIU images before CRIU does: the page
//! maps against their page files, and the dump's options. A real `pagemap-*.img` (CRIU 4.2, see
//! `criu_image/testdata`) mutated gives an error or a value, never a panic.

use proptest::prelude::*;

use super::*;
use crate::criu::image::testing::with_edge_values;
use crate::testkit::{assert_bounded, cases, mutate, Mutation};

const PAGEMAP: &[u8] = include_bytes!("../image/testdata/pagemap-1.img");
const INVENTORY: &[u8] = include_bytes!("../image/testdata/inventory.img");
/// The pages CRIU wrote for that map (`pages-1.img`: 7364608 bytes).
const PRESENT: u64 = 1798;

/// A checkpoint directory holding the fixture's images, `pagemap` as its map and a (sparse)
/// page file of the fixture's size.
fn images(pagemap: &[u8]) -> tempfile::TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    std::fs::write(t.path().join("inventory.img"), INVENTORY).expect("write");
    std::fs::write(t.path().join("pagemap-1.img"), pagemap).expect("write");
    let pages = std::fs::File::create(t.path().join("pages-1.img")).expect("create");
    pages.set_len(PRESENT * 4096).expect("size");
    t
}

#[test]
fn the_fixture_maps_its_pages() {
    assert_eq!(parse_pagemap(PAGEMAP), Ok((1, PRESENT)));
    let t = images(PAGEMAP);
    inspect(t.path()).expect("a whole memory image");
}

/// Found by `mutated_page_maps_are_read_or_refused`: a map whose entries claim more pages than
/// a 64-bit byte count holds overflowed `present * 4096` (a panic in a debug build, a wrapped
/// size compared in a release one).
#[test]
fn a_page_count_past_u64_bytes_is_refused() {
    let mut map = crate::criu::image::testing::image(
        crate::criu::image::PAGEMAP_MAGIC,
        &[(&[0x08, 0x01], &[])], // pagemap_head { pages_id: 1 }
    );
    // pagemap_entry { vaddr: 0, nr_pages (field 5): u64::MAX / 4096 + 1, flags: PE_PRESENT }
    let mut entry = vec![0x08, 0x00, 0x28];
    let mut v = u64::MAX / 4096 + 1;
    while v >= 0x80 {
        entry.push((v as u8) | 0x80);
        v >>= 7;
    }
    entry.extend([v as u8, 0x20, 0x04]);
    map.extend((entry.len() as u32).to_le_bytes());
    map.extend(entry);
    let t = images(&map);
    let err = inspect(t.path()).expect_err("refused").to_string();
    assert!(err.contains("pages"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(300),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A mutated page map: the check answers, and accepts only a map whose present pages are
    /// exactly what the page file holds.
    #[test]
    fn mutated_page_maps_are_read_or_refused(
        picks in prop::collection::vec(any::<(u32, u32, u8)>(), 0..4),
        m in prop::collection::vec(any::<Mutation>(), 0..4),
    ) {
        let map = with_edge_values(PAGEMAP, PAGEMAP_MAGIC, &picks);
        let map = mutate(&map, &m);
        let t = images(&map);
        let checked = assert_bounded("check_memory_images", map.len(), 64, 64 << 10, || {
            check_memory_images(t.path(), false)
        });
        if checked.is_ok() {
            let (id, present) = parse_pagemap(&map).expect("accepted maps parse");
            prop_assert!(present == PRESENT || (id != 1 && present == 0), "{id} {present}");
        }
    }

    /// Any bytes as the dump's options: read or refused.
    #[test]
    fn any_options_file_is_read_or_refused(m in prop::collection::vec(any::<Mutation>(), 0..8)) {
        let valid = serde_json::to_vec(&DumpOptions {
            tcp_established: true,
            empty_namespaces: vec!["network".into()],
            cgroups_mode: "soft".into(),
            ..DumpOptions::default()
        })
        .expect("json");
        let t = images(PAGEMAP);
        std::fs::write(t.path().join(CRIU_OPTIONS_FILE), mutate(&valid, &m)).expect("write");
        if let Ok(options) = inspect(t.path()) {
            let _ = options.criu(t.path(), None);
        }
    }
}
