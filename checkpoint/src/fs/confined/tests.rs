use super::*;
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

/// A rootfs deletions file as the tests write it (the format's own type is a layer up).
#[derive(serde::Serialize, serde::Deserialize)]
struct Deletions {
    deleted: Vec<String>,
    opaque: Vec<String>,
}

/// [`apply_changes`] with the lists read from a deletions file, as a restore does.
fn apply_file(rootfs: &Path, tar: &Path, deletions: &Path) -> Result<()> {
    let bytes = std::fs::read(deletions).map_err(|e| Error::io("read the rootfs deletions", deletions, e))?;
    let d: Deletions = serde_json::from_slice(&bytes).map_err(|e| Error::InvalidCheckpoint {
        path: deletions.to_path_buf(),
        reason: e.to_string(),
    })?;
    apply_changes(rootfs, tar, &d.deleted, &d.opaque, deletions)
}

#[test]
fn names_are_relative_and_normal() {
    let ok = |raw: &str| RelPath::parse(raw.as_bytes()).map(|p| p.to_string());
    assert_eq!(ok("etc/passwd").as_deref(), Ok("etc/passwd"));
    assert_eq!(ok("./etc/app/").as_deref(), Ok("etc/app"));
    assert_eq!(ok(".").as_deref(), Ok("."));
    assert_eq!(ok("./").as_deref(), Ok("."));
    for bad in [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/./b",
        "a//b",
        "./..",
        "a/..",
    ] {
        assert!(RelPath::parse(bad.as_bytes()).is_err(), "{bad:?} accepted");
    }
    assert!(RelPath::parse(b"a\0b").is_err());
}

/// A rootfs and a canary beside it, in one temporary directory.
struct Fixture {
    tmp: tempfile::TempDir,
    rootfs: PathBuf,
    canary: PathBuf,
    canary_before: BTreeMap<PathBuf, String>,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rootfs = tmp.path().join("rootfs");
        let canary = tmp.path().join("canary");
        std::fs::create_dir_all(&rootfs).expect("mkdir rootfs");
        std::fs::create_dir_all(canary.join("sub")).expect("mkdir canary");
        std::fs::write(canary.join("file"), b"canary file").expect("write");
        std::fs::write(canary.join("x"), b"canary x").expect("write");
        std::fs::write(canary.join("passwd"), b"root:x:0:0").expect("write");
        std::fs::write(canary.join("sub/deep"), b"deep").expect("write");
        std::fs::set_permissions(canary.join("file"), std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let canary_before = describe(&canary);
        Fixture {
            tmp,
            rootfs,
            canary,
            canary_before,
        }
    }

    fn assert_canary_untouched(&self) {
        assert_eq!(describe(&self.canary), self.canary_before, "the canary changed");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Writes `entries` as a tar and `deletions` as JSON; applies them to the rootfs.
    fn apply(&self, entries: &[Raw], deleted: &[&str], opaque: &[&str]) -> Result<()> {
        let tar = self.path("diff.tar");
        write_tar(&tar, entries);
        let del = self.path("deleted.json");
        let d = Deletions {
            deleted: deleted.iter().map(|s| s.to_string()).collect(),
            opaque: opaque.iter().map(|s| s.to_string()).collect(),
        };
        std::fs::write(&del, serde_json::to_vec(&d).expect("json")).expect("write");
        apply_file(&self.rootfs, &tar, &del)
    }
}

/// Every file beneath `dir`: type, mode, owner, content or link target. Never follows.
fn describe(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let what = if m.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("symlink {:?}", std::fs::read_link(&p).expect("readlink"))
            } else if m.is_file() {
                format!("file {:?}", std::fs::read(&p).expect("read"))
            } else {
                "other".to_string()
            };
            out.insert(p, format!("{what} {:o} {}:{}", m.mode(), m.uid(), m.gid()));
        }
    }
    out
}

/// An archive entry as raw header fields, so hostile names can be written.
struct Raw {
    name: Vec<u8>,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    link: Vec<u8>,
    data: Vec<u8>,
    /// Overrides the header's size field (a lie about the data).
    claimed_size: Option<u64>,
}

impl Raw {
    fn new(name: &str, kind: tar::EntryType) -> Raw {
        Raw {
            name: name.as_bytes().to_vec(),
            kind,
            mode: if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            },
            uid: 0,
            gid: 0,
            link: Vec::new(),
            data: Vec::new(),
            claimed_size: None,
        }
    }
    fn dir(name: &str) -> Raw {
        Raw::new(name, tar::EntryType::Directory)
    }
    fn file(name: &str, data: &[u8]) -> Raw {
        Raw {
            data: data.to_vec(),
            ..Raw::new(name, tar::EntryType::Regular)
        }
    }
    fn link(name: &str, kind: tar::EntryType, target: &str) -> Raw {
        Raw {
            link: target.as_bytes().to_vec(),
            ..Raw::new(name, kind)
        }
    }
}

fn write_tar(path: &Path, entries: &[Raw]) {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let gnu = h.as_gnu_mut().expect("gnu header");
        gnu.name[..e.name.len()].copy_from_slice(&e.name);
        gnu.linkname[..e.link.len()].copy_from_slice(&e.link);
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(1_700_000_000);
        h.set_size(e.claimed_size.unwrap_or(e.data.len() as u64));
        h.set_cksum();
        b.append(&h, e.data.as_slice()).expect("append");
    }
    std::fs::write(path, b.into_inner().expect("tar")).expect("write tar");
}

fn symlink(target: &Path, at: &Path) {
    std::os::unix::fs::symlink(target, at).expect("symlink");
}

#[test]
fn escaping_names_are_refused_before_anything_is_written() {
    let f = Fixture::new();
    let abs = format!("{}/x", f.canary.display());
    for bad in ["../canary/x", abs.as_str(), "a/../../x", "/abs/x", ""] {
        let err = f
            .apply(&[Raw::file("ok", b"first"), Raw::file(bad, b"evil")], &[], &[])
            .expect_err(bad);
        assert!(matches!(err, Error::InvalidCheckpoint { .. }), "{bad:?}: {err}");
        assert!(
            !f.rootfs.join("ok").exists(),
            "{bad:?}: the survey let a write through"
        );
        f.assert_canary_untouched();
    }
    for bad in ["../canary/x", abs.as_str(), "a/../../x", ""] {
        assert!(f.apply(&[], &[bad], &[]).is_err(), "deletion {bad:?}");
        assert!(f.apply(&[], &[], &[bad]).is_err(), "opaque {bad:?}");
        f.assert_canary_untouched();
    }
}

#[test]
fn a_symlinked_parent_is_never_written_through() {
    let f = Fixture::new();
    symlink(&f.canary, &f.rootfs.join("etc"));
    let err = f
        .apply(&[Raw::file("etc/passwd", b"evil")], &[], &[])
        .expect_err("through a symlink");
    assert!(err.to_string().contains("symlink"), "{err}");
    f.assert_canary_untouched();
}

#[test]
fn an_image_symlink_replaced_by_an_opaque_directory_becomes_that_directory() {
    let f = Fixture::new();
    std::fs::create_dir(f.rootfs.join("var")).expect("mkdir");
    symlink(&f.canary, &f.rootfs.join("var/run"));
    f.apply(
        &[
            Raw::dir("var/"),
            Raw::dir("var/run/"),
            Raw::file("var/run/app.pid", b"42"),
        ],
        &[],
        &["var/run"],
    )
    .expect("apply");
    let run = f.rootfs.join("var/run");
    assert!(std::fs::symlink_metadata(&run).expect("lstat").is_dir());
    let names: Vec<_> = std::fs::read_dir(&run)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["app.pid"]);
    assert_eq!(std::fs::read(run.join("app.pid")).expect("read"), b"42");
    f.assert_canary_untouched();
}

#[test]
fn deletions_never_follow_a_symlink() {
    let f = Fixture::new();
    symlink(&f.canary, &f.rootfs.join("link"));
    let err = f.apply(&[], &["link/x"], &[]).expect_err("through a symlink");
    assert!(matches!(err, Error::InvalidCheckpoint { .. }), "{err}");
    f.assert_canary_untouched();
    // The symlink itself: removed, not what it points to.
    f.apply(&[], &["link"], &[]).expect("delete the link");
    assert!(std::fs::symlink_metadata(f.rootfs.join("link")).is_err());
    f.assert_canary_untouched();
    // A deletion whose parent is missing or not a directory is nothing to do.
    std::fs::write(f.rootfs.join("plain"), b"p").expect("write");
    f.apply(&[], &["missing/x", "plain/x", "absent"], &[])
        .expect("nothing to delete");
}

#[test]
fn a_deleted_directory_is_removed_without_following_symlinks_inside() {
    let f = Fixture::new();
    std::fs::create_dir_all(f.rootfs.join("d/e")).expect("mkdir");
    std::fs::write(f.rootfs.join("d/e/f"), b"f").expect("write");
    symlink(&f.canary, &f.rootfs.join("d/to-canary"));
    symlink(&f.canary, &f.rootfs.join("d/e/to-canary"));
    f.apply(&[], &["d"], &[]).expect("delete");
    assert!(std::fs::symlink_metadata(f.rootfs.join("d")).is_err());
    f.assert_canary_untouched();
}

#[test]
fn an_opaque_directory_over_a_symlink_is_a_new_directory() {
    let f = Fixture::new();
    symlink(&f.canary, &f.rootfs.join("d"));
    f.apply(&[Raw::dir("d/"), Raw::file("d/new", b"n")], &[], &["d"])
        .expect("apply");
    assert!(std::fs::symlink_metadata(f.rootfs.join("d"))
        .expect("lstat")
        .is_dir());
    assert_eq!(std::fs::read(f.rootfs.join("d/new")).expect("read"), b"n");
    f.assert_canary_untouched();
    let err = f
        .apply(&[Raw::file("e", b"")], &[], &["e"])
        .expect_err("opaque not a dir entry");
    assert!(err.to_string().contains("opaque"), "{err}");
}

#[test]
fn a_symlink_swapped_in_for_a_directory_is_replaced_not_followed() {
    let f = Fixture::new();
    symlink(&f.canary, &f.rootfs.join("d"));
    f.apply(&[Raw::dir("d/"), Raw::file("d/file", b"mine")], &[], &[])
        .expect("apply");
    assert!(std::fs::symlink_metadata(f.rootfs.join("d"))
        .expect("lstat")
        .is_dir());
    assert_eq!(std::fs::read(f.rootfs.join("d/file")).expect("read"), b"mine");
    f.assert_canary_untouched();
}

#[test]
fn a_directory_replaced_by_a_file_is_removed_without_following_symlinks_inside() {
    let f = Fixture::new();
    std::fs::create_dir_all(f.rootfs.join("d/sub")).expect("mkdir");
    symlink(&f.canary, &f.rootfs.join("d/sub/c"));
    std::fs::write(f.rootfs.join("d/old"), b"old").expect("write");
    f.apply(&[Raw::file("d", b"now a file")], &[], &[])
        .expect("apply");
    assert_eq!(std::fs::read(f.rootfs.join("d")).expect("read"), b"now a file");
    f.assert_canary_untouched();
}

#[test]
fn hard_links_to_outside_or_to_non_files_are_refused() {
    let f = Fixture::new();
    symlink(&f.canary, &f.rootfs.join("out"));
    symlink(&f.canary.join("file"), &f.rootfs.join("evil"));
    std::fs::create_dir(f.rootfs.join("dir")).expect("mkdir");
    let abs = format!("{}/file", f.canary.display());
    for target in [
        "../canary/file",
        abs.as_str(),
        "out/file",
        "evil",
        "dir",
        "missing",
        "h",
    ] {
        let err = f
            .apply(&[Raw::link("h", tar::EntryType::Link, target)], &[], &[])
            .expect_err(target);
        assert!(
            matches!(err, Error::InvalidCheckpoint { .. }),
            "{target:?}: {err}"
        );
        f.assert_canary_untouched();
    }
    std::fs::write(f.rootfs.join("real"), b"r").expect("write");
    f.apply(&[Raw::link("h", tar::EntryType::Link, "real")], &[], &[])
        .expect("a link to a file inside");
    let (a, b) = (
        std::fs::metadata(f.rootfs.join("real")).expect("stat"),
        std::fs::symlink_metadata(f.rootfs.join("h")).expect("stat"),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
}

#[test]
fn device_nodes_are_refused_and_fifos_created_inside() {
    let f = Fixture::new();
    for kind in [tar::EntryType::Char, tar::EntryType::Block] {
        let err = f
            .apply(&[Raw::new("dev/sda", kind)], &[], &[])
            .expect_err("device");
        assert!(
            err.to_string().contains("podsnap never creates device nodes"),
            "{err}"
        );
    }
    let fifo = Raw {
        mode: 0o620,
        uid: 7,
        gid: 8,
        ..Raw::new("pipe", tar::EntryType::Fifo)
    };
    f.apply(&[fifo], &[], &[]).expect("fifo");
    let m = std::fs::symlink_metadata(f.rootfs.join("pipe")).expect("lstat");
    assert!(m.file_type().is_fifo());
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o620, 7, 8));
}

#[test]
fn setuid_files_keep_their_bits_and_owner() {
    let f = Fixture::new();
    let root_suid = Raw {
        mode: 0o4755,
        ..Raw::file("bin/su", b"\x7fELF")
    };
    let user_sgid = Raw {
        mode: 0o6750,
        uid: 1234,
        gid: 5678,
        ..Raw::file("bin/tool", b"tool")
    };
    f.apply(&[Raw::dir("bin/"), root_suid, user_sgid], &[], &[])
        .expect("apply");
    let m = std::fs::symlink_metadata(f.rootfs.join("bin/su")).expect("lstat");
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o4755, 0, 0));
    let m = std::fs::symlink_metadata(f.rootfs.join("bin/tool")).expect("lstat");
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o6750, 1234, 5678));
}

#[test]
fn an_entry_larger_than_the_archive_is_refused() {
    let f = Fixture::new();
    let liar = Raw {
        claimed_size: Some(1 << 40),
        ..Raw::file("big", b"small")
    };
    let err = f.apply(&[liar], &[], &[]).expect_err("too big");
    assert!(err.to_string().contains("claims"), "{err}");
    assert!(!f.rootfs.join("big").exists());
}

#[test]
fn a_volume_archive_unpacks_with_its_root_entry() {
    let f = Fixture::new();
    let tar = f.path("volume.tar");
    let root = Raw {
        mode: 0o1777,
        ..Raw::dir("./")
    };
    write_tar(
        &tar,
        &[
            root,
            Raw::dir("./cache/"),
            Raw::file("./cache/x", b"x"),
            Raw::link("./l", tar::EntryType::Symlink, "/etc"),
        ],
    );
    unpack(&tar, &f.rootfs).expect("unpack");
    let m = std::fs::symlink_metadata(&f.rootfs).expect("lstat");
    assert_eq!(m.mode() & 0o7777, 0o1777);
    assert_eq!(std::fs::read(f.rootfs.join("cache/x")).expect("read"), b"x");
    assert_eq!(
        std::fs::read_link(f.rootfs.join("l")).expect("readlink"),
        Path::new("/etc")
    );
    write_tar(&tar, &[Raw::file("../canary/x", b"evil")]);
    assert!(unpack(&tar, &f.rootfs).is_err());
    f.assert_canary_untouched();
}
