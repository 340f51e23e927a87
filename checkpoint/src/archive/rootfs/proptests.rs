//! Properties of the confined archive writer (`fs::confined`, kept here beside the capture that
//! makes its input): a real rootfs capture and a real volume archive
//! (every entry type a capture writes: directories, files, a sparse file, symlinks with absolute
//! and relative targets, a hard link, a FIFO, long names and link targets, whiteouts), mutated
//! byte by byte and header field by header field (checksums fixed, so entries reach the
//! writer), with a mutated deletions file, are applied into a root that holds symlinks to a
//! directory beside it. Whatever the outcome, nothing outside the root changes, nothing panics
//! and memory stays in proportion to the archive.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;

use crate::error::Result;
use crate::format::deletions::Deletions;
use crate::fs::confined::{apply_changes, unpack};
use crate::testkit::{
    assert_bounded, cases, edit_tar_headers, mutate, mutate_json, tar_headers, Mutation, TarEdit,
};

/// [`apply_changes`] with the lists read from a deletions file, as a restore does.
fn apply_file(rootfs: &Path, tar: &Path, deletions: &Path) -> Result<()> {
    let d = Deletions::read(deletions)?;
    apply_changes(rootfs, tar, &d.deleted, &d.opaque, deletions)
}

/// A capture of an upper directory and an archive of a volume, as bytes.
struct Captured {
    diff: Vec<u8>,
    deletions: serde_json::Value,
    volume: Vec<u8>,
}

/// Builds a tree with every kind of entry, symlinks aimed at `outside`.
fn tree(dir: &Path, outside: &Path) {
    let long = "x".repeat(120);
    for d in ["d", "opaque", &format!("d/{long}")] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    std::fs::write(dir.join("d/f"), b"hello").expect("write");
    std::fs::write(dir.join(format!("d/{long}/{long}")), b"long").expect("write");
    std::fs::hard_link(dir.join("d/f"), dir.join("d/h")).expect("link");
    let sparse = std::fs::File::create(dir.join("sparse")).expect("create");
    sparse.set_len(256 << 10).expect("size");
    sparse.write_at(b"middle", 128 << 10).expect("write");
    std::os::unix::fs::symlink(outside, dir.join("d/abs")).expect("symlink");
    std::os::unix::fs::symlink("../../outside", dir.join("d/rel")).expect("symlink");
    std::os::unix::fs::symlink(format!("/{}", "t".repeat(150)), dir.join("longlink")).expect("symlink");
    nix::unistd::mkfifo(&dir.join("p"), nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
    // An overlay whiteout and an opaque directory.
    nix::sys::stat::mknod(
        &dir.join("gone"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .expect("whiteout");
    let opaque = std::ffi::CString::new(dir.join("opaque").as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: both strings are NUL-terminated; the value is one byte.
    let set = unsafe {
        libc::lsetxattr(
            opaque.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(set, 0, "set the opaque xattr (needs root)");
}

fn captured() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let t = tempfile::tempdir().expect("tempdir");
        let upper = t.path().join("upper");
        tree(&upper, &t.path().join("outside"));
        let (diff, deletions, volume) = (
            t.path().join("d.tar"),
            t.path().join("d.json"),
            t.path().join("v.tar"),
        );
        crate::archive::rootfs::capture(&upper, &diff, &deletions).expect("capture");
        std::fs::remove_file(upper.join("gone")).expect("rm whiteout");
        crate::archive::rootfs::archive_dir(&upper, &volume).expect("archive");
        let deletions: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&deletions).expect("read")).expect("json");
        assert_eq!(deletions["deleted"], serde_json::json!(["gone"]));
        assert_eq!(deletions["opaque"], serde_json::json!(["opaque"]));
        Captured {
            diff: std::fs::read(&diff).expect("read"),
            deletions,
            volume: std::fs::read(&volume).expect("read"),
        }
    })
}

/// A snapshot of everything under `dir`: type, mode, owner, size, content or target, mtime.
fn describe(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list").flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).expect("stat");
            let what = if m.is_dir() {
                stack.push(p.clone());
                "dir".to_owned()
            } else if m.file_type().is_symlink() {
                format!("-> {:?}", std::fs::read_link(&p).expect("readlink"))
            } else if m.is_file() {
                format!("{:?}", std::fs::read(&p).expect("read"))
            } else {
                format!("{:?}", m.file_type())
            };
            out.insert(
                p,
                format!("{what} {:o} {}:{} {}", m.mode(), m.uid(), m.gid(), m.mtime()),
            );
        }
    }
    out
}

/// A root to write into beside a directory it must not touch: the root holds symlinks to it
/// (absolute and relative), a file and a directory of the image.
struct Scene {
    tmp: tempfile::TempDir,
    root: PathBuf,
    before: BTreeMap<PathBuf, String>,
}

impl Scene {
    fn new() -> Scene {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).expect("mkdir");
        std::fs::write(outside.join("x"), b"outside x").expect("write");
        std::fs::write(outside.join("f"), b"outside f").expect("write");
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("d")).expect("mkdir");
        std::fs::write(root.join("d/f"), b"image file").expect("write");
        std::fs::write(root.join("gone"), b"deleted by the container").expect("write");
        std::os::unix::fs::symlink(&outside, root.join("esc")).expect("symlink");
        std::os::unix::fs::symlink("../outside", root.join("up")).expect("symlink");
        std::os::unix::fs::symlink(&outside, root.join("opaque")).expect("symlink");
        let before = Scene::outside_root(tmp.path(), &root);
        Scene { tmp, root, before }
    }

    /// Everything in the temporary directory but the root.
    fn outside_root(tmp: &Path, root: &Path) -> BTreeMap<PathBuf, String> {
        let mut all = describe(tmp);
        let inputs = tmp.join("in");
        all.retain(|p, _| (!p.starts_with(root) || p == root) && !p.starts_with(&inputs));
        // The root's own mode and times may be set by an archive's `.` entry.
        all.remove(root);
        all
    }

    fn assert_outside_untouched(&self, what: &str) -> std::result::Result<(), TestCaseError> {
        let now = Scene::outside_root(self.tmp.path(), &self.root);
        prop_assert_eq!(&now, &self.before, "{} changed what is outside the root", what);
        Ok(())
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let dir = self.tmp.path().join("in");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    }
}

/// Names that try to leave the root, through `..`, absolute paths, or the root's symlinks.
const NAMES: [&[u8]; 14] = [
    b"../outside/x",
    b"/outside/x",
    b"d/../../outside/x",
    b"esc/x",
    b"up/x",
    b"esc",
    b"d/abs/x",
    b"d/rel/x",
    b".",
    b"./",
    b"",
    b"opaque/x",
    b"d//f",
    b"d/./f",
];

#[test]
fn the_captures_apply_whole() {
    let c = captured();
    let scene = Scene::new();
    let diff = scene.file("diff.tar", &c.diff);
    let deletions = scene.file("deletions.json", &serde_json::to_vec(&c.deletions).expect("json"));
    apply_file(&scene.root, &diff, &deletions).expect("a capture applies");
    assert!(!scene.root.join("gone").exists());
    assert_eq!(std::fs::read(scene.root.join("d/h")).expect("read"), b"hello");
    assert!(std::fs::symlink_metadata(scene.root.join("opaque"))
        .expect("stat")
        .is_dir());
    assert!(std::fs::symlink_metadata(scene.root.join("p"))
        .expect("stat")
        .file_type()
        .is_fifo());
    assert_eq!(
        tar_headers(&c.diff).len(),
        14,
        "every entry and the long names' extensions"
    );
    let volume = scene.file("volume.tar", &c.volume);
    let dst = scene.tmp.path().join("root/vol");
    std::fs::create_dir(&dst).expect("mkdir");
    unpack(&volume, &dst).expect("a volume unpacks");
    assert_eq!(std::fs::read(dst.join("sparse")).expect("read").len(), 256 << 10);
    scene.assert_outside_untouched("the captures").expect("untouched");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(200),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A mutated rootfs capture (archive and deletions) applied onto a root with symlinks out.
    #[test]
    fn mutated_captures_never_write_outside_the_root(
        edits in prop::collection::vec(any::<TarEdit>(), 0..4),
        m in prop::collection::vec(any::<Mutation>(), 0..3),
        picks in prop::collection::vec(any::<(u32, u8, u32)>(), 0..3),
    ) {
        let c = captured();
        let scene = Scene::new();
        let tar = mutate(&edit_tar_headers(&c.diff, &edits, &NAMES), &m);
        let mut deletions = c.deletions.clone();
        mutate_json(&mut deletions, &picks);
        let diff = scene.file("diff.tar", &tar);
        let json = serde_json::to_vec(&deletions).expect("json");
        let del = scene.file("deletions.json", &json);
        let _ = assert_bounded("apply_changes", tar.len() + json.len(), 8, 1 << 20, || {
            apply_file(&scene.root, &diff, &del)
        });
        scene.assert_outside_untouched("apply_changes")?;
    }

    /// A mutated volume archive unpacked into a directory of the root.
    #[test]
    fn mutated_volume_archives_never_write_outside_their_directory(
        edits in prop::collection::vec(any::<TarEdit>(), 0..4),
        m in prop::collection::vec(any::<Mutation>(), 0..3),
    ) {
        let c = captured();
        let scene = Scene::new();
        let tar = mutate(&edit_tar_headers(&c.volume, &edits, &NAMES), &m);
        let volume = scene.file("volume.tar", &tar);
        let _ = assert_bounded("unpack", tar.len(), 8, 1 << 20, || unpack(&volume, &scene.root));
        scene.assert_outside_untouched("unpack")?;
    }
}
