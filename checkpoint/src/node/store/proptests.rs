//! Properties of checkpoint names (what `podsnap.io/restore-from`, `podsnap restore` and
//! `podsnap rm` give): a name is refused or resolves to a directory inside the root, through
//! whatever symlinks the root holds.

use proptest::prelude::*;

use super::*;
use crate::testkit::cases;

/// Name components: real checkpoints and folders, symlinks out of the root and within it,
/// escapes, the root itself.
const PARTS: [&str; 12] = [
    "ckpt", "folder", "inner", "out-abs", "out-rel", "in-link", "..", ".", "", "/", "nope", "ckpt/..",
];

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(150),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn names_resolve_inside_the_root_or_are_refused(
        parts in prop::collection::vec(0..PARTS.len(), 1..4),
        leading_slash in any::<bool>(),
    ) {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        for d in [root.join("ckpt"), root.join("folder/inner"), outside.join("ckpt")] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::os::unix::fs::symlink(&outside, root.join("out-abs")).expect("symlink");
        std::os::unix::fs::symlink("../outside", root.join("out-rel")).expect("symlink");
        std::os::unix::fs::symlink("folder", root.join("in-link")).expect("symlink");
        let mut name = parts.iter().map(|&i| PARTS[i]).collect::<Vec<_>>().join("/");
        if leading_slash {
            name.insert(0, '/');
        }
        if let Ok(dir) = resolve(&root, &name) {
            let root = std::fs::canonicalize(&root).expect("root");
            prop_assert!(dir.starts_with(&root) && dir != root && dir.is_dir(), "{name:?} -> {dir:?}");
        }
    }
}
