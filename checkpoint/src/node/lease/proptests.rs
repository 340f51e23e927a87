//! Properties of lease keys and lease files read back: a checkpoint path encodes to one file
//! name that stays in the lease directory, and any lease file content parses or is refused.

use proptest::prelude::*;

use super::*;
use crate::testkit::{cases, mutate, Mutation};

/// Found by `any_path_is_one_file_name`: the paths `""`, `.` and `..` (never a resolved
/// checkpoint path, which is absolute) encoded as themselves: `..` named the parent of the
/// lease directory.
#[test]
fn names_that_are_not_one_entry_are_digested() {
    for path in ["", ".", ".."] {
        let name = encode(Path::new(path));
        assert!(name.starts_with("sha256-"), "{path:?} -> {name:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_path_is_one_file_name(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        use std::os::unix::ffi::OsStrExt;
        let name = encode(Path::new(std::ffi::OsStr::from_bytes(&bytes)));
        prop_assert!(!name.is_empty() && name.len() <= NAME_MAX, "{name:?}");
        prop_assert!(name != "." && name != ".." && !name.contains('/') && !name.contains('\0'), "{name:?}");
        let base = Path::new("/run/podsnap/leases");
        let dir = leases_of(base, Path::new(std::ffi::OsStr::from_bytes(&bytes)));
        prop_assert_eq!(dir.parent(), Some(base));
    }

    /// A lease file mutated: parsed (and then named safely) or refused.
    #[test]
    fn mutated_lease_files_parse_or_are_refused(m in prop::collection::vec(any::<Mutation>(), 1..6)) {
        let mut holder = Holder::this_process("0123456789abcdef", Some("ns/pod".into()), Path::new("/r/ckpt"));
        holder.lazy_pages_of = Some("ü".repeat(8));
        let bytes = mutate(&serde_json::to_vec(&holder).expect("json"), &m);
        if let Ok(h) = serde_json::from_slice::<Holder>(&bytes) {
            let _ = h.file_name();
            let _ = h.to_string();
        }
    }
}
