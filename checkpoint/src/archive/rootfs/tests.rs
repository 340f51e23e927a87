use super::*;

#[test]
fn the_dump_finds_the_upper_directory_or_says_why_not() {
    let t = tempfile::tempdir().expect("tempdir");
    // A directory name with a space, a tab, a backslash and bytes that are not UTF-8.
    let odd = t
        .path()
        .join(std::ffi::OsStr::from_bytes(b"sp ace\ttab\\\xc3\xa9\xff"));
    let upper = odd.join("fs");
    std::fs::create_dir_all(&upper).expect("mkdir");
    // As overlayfs writes it: the backslash escape it was given (`\\`), octal-escaped.
    let escaped: Vec<u8> = upper
        .as_os_str()
        .as_bytes()
        .iter()
        .flat_map(|&b| match b {
            b'\\' => b"\\134\\134".to_vec(),
            b' ' | b'\t' | b'\n' => format!("\\{b:03o}").into_bytes(),
            _ => vec![b],
        })
        .collect();
    let mut text =
        b"36 35 0:30 / /run/x/rootfs rw,relatime - overlay overlay rw,lowerdir=/l1:/l2,upperdir=".to_vec();
    text.extend(escaped);
    text.extend_from_slice(b",workdir=/w\n37 35 0:31 / /other rw - tmpfs tmpfs rw\n");
    text.extend_from_slice(b"38 35 0:32 / /ro ro - overlay overlay ro,lowerdir=/l1:/l2\n");
    text.extend_from_slice(
        b"39 35 0:33 / /gone rw - overlay overlay rw,lowerdir=/l,upperdir=/nowhere/fs,workdir=/w\n",
    );
    let mounts = mountinfo::parse(&text).expect("parse");
    assert_eq!(upperdir_in(&mounts, Path::new("/run/x/rootfs")), Ok(Some(upper)));
    assert_eq!(
        upperdir_in(&mounts, Path::new("/ro")),
        Ok(None),
        "read-only: nothing changed"
    );
    for (at, why) in [
        ("/other", "a tmpfs mount, not an overlay"),
        ("/gone", "/nowhere/fs"),
        ("/unmounted", "nothing is mounted at /unmounted"),
    ] {
        let e = upperdir_in(&mounts, Path::new(at)).expect_err(at);
        assert!(e.contains(why), "{at}: {e}");
    }
    let e = upperdir_for_dump("app", Path::new("/surely/not/mounted")).expect_err("refused");
    assert!(e.to_string().contains("container app"), "{e}");
}

#[test]
fn capture_and_apply_round_trip() {
    let t = tempfile::tempdir().expect("tempdir");
    let upper = t.path().join("upper");
    std::fs::create_dir_all(upper.join("etc/app")).expect("mkdir");
    std::fs::write(upper.join("etc/app/conf"), b"changed").expect("write");
    std::os::unix::fs::symlink("conf", upper.join("etc/app/link")).expect("symlink");
    // A whiteout: char device 0:0 marks a deletion.
    let wh = std::ffi::CString::new(upper.join("gone").to_str().expect("utf8")).expect("cstr");
    // SAFETY: wh is a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR | 0o600, 0) };
    assert_eq!(rc, 0, "mknod needs root");
    let tar = t.path().join("diff.tar");
    let del = t.path().join("deleted.json");
    capture(&upper, &tar, &del).expect("capture");

    let rootfs = t.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc/app")).expect("mkdir");
    std::fs::write(rootfs.join("etc/app/conf"), b"original").expect("write");
    std::fs::write(rootfs.join("gone"), b"to delete").expect("write");
    apply(&rootfs, &tar, &del).expect("apply");
    assert_eq!(
        std::fs::read(rootfs.join("etc/app/conf")).expect("read"),
        b"changed"
    );
    assert_eq!(
        std::fs::read_link(rootfs.join("etc/app/link")).expect("link"),
        Path::new("conf")
    );
    assert!(!rootfs.join("gone").exists());
}

#[test]
fn deletions_cannot_escape_through_symlinks() {
    let t = tempfile::tempdir().expect("tempdir");
    let rootfs = t.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("mkdir");
    std::fs::create_dir_all(t.path().join("outside")).expect("mkdir");
    std::fs::write(t.path().join("outside/precious"), b"x").expect("write");
    std::os::unix::fs::symlink(t.path().join("outside"), rootfs.join("etc")).expect("symlink");
    let tar = t.path().join("diff.tar");
    tar::Builder::new(std::fs::File::create(&tar).expect("create"))
        .into_inner()
        .expect("empty tar");
    for deleted in ["etc/precious", "../outside/precious"] {
        let del = t.path().join("deleted.json");
        let d = Deletions {
            deleted: vec![deleted.into()],
            opaque: vec![],
        };
        std::fs::write(&del, serde_json::to_vec(&d).expect("json")).expect("write");
        assert!(apply(&rootfs, &tar, &del).is_err(), "{deleted:?} accepted");
        assert!(t.path().join("outside/precious").exists());
    }
}

#[test]
fn symlink_targets_and_long_names_are_kept_byte_for_byte() {
    let t = tempfile::tempdir().expect("tempdir");
    let upper = t.path().join("upper");
    let deep = upper.join("a".repeat(60)).join("b".repeat(60));
    std::fs::create_dir_all(&deep).expect("mkdir");
    let long = format!("/{}/{}", "x".repeat(90), "y".repeat(90));
    let targets = ["/", "a//b", "./x", "../..", "dir/", long.as_str()];
    for (i, target) in targets.iter().enumerate() {
        std::os::unix::fs::symlink(target, deep.join(format!("link{i}"))).expect("symlink");
    }
    std::fs::write(deep.join("f"), b"f").expect("write");
    std::fs::hard_link(deep.join("f"), upper.join("h".repeat(120))).expect("link");
    let (tar, del) = (t.path().join("diff.tar"), t.path().join("deleted.json"));
    capture(&upper, &tar, &del).expect("capture");
    let rootfs = t.path().join("rootfs");
    std::fs::create_dir(&rootfs).expect("mkdir");
    apply(&rootfs, &tar, &del).expect("apply");
    let restored = rootfs.join(deep.strip_prefix(&upper).expect("beneath"));
    for (i, target) in targets.iter().enumerate() {
        let got = std::fs::read_link(restored.join(format!("link{i}"))).expect("readlink");
        assert_eq!(got.as_os_str().as_bytes(), target.as_bytes());
    }
    let (f, h) = (
        std::fs::symlink_metadata(restored.join("f")).expect("lstat"),
        std::fs::symlink_metadata(rootfs.join("h".repeat(120))).expect("lstat"),
    );
    assert_eq!(f.ino(), h.ino());
}

#[test]
fn volumes_keep_fifos_and_hard_links() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("volume");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    std::fs::write(src.join("sub/a"), b"shared").expect("write");
    std::fs::hard_link(src.join("sub/a"), src.join("b")).expect("link");
    nix::unistd::mkfifo(&src.join("pipe"), nix::sys::stat::Mode::from_bits_truncate(0o640)).expect("mkfifo");
    let tar = t.path().join("volume.tar");
    archive_dir(&src, &tar).expect("archive");
    let dst = t.path().join("restored");
    std::fs::create_dir(&dst).expect("mkdir");
    unpack(&tar, &dst).expect("unpack");
    let (a, b) = (
        std::fs::symlink_metadata(dst.join("sub/a")).expect("lstat"),
        std::fs::symlink_metadata(dst.join("b")).expect("lstat"),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(std::fs::read(dst.join("b")).expect("read"), b"shared");
    let pipe = std::fs::symlink_metadata(dst.join("pipe")).expect("lstat");
    assert!(pipe.file_type().is_fifo());
    assert_eq!(pipe.mode() & 0o7777, 0o640);
}

/// A small xorshift generator: reproducible rounds without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
    fn content(&mut self) -> Vec<u8> {
        let len = *self.pick(&[0usize, 1, 100, 5000, 70_000]);
        (0..len).map(|_| (self.next() & 0xff) as u8).collect()
    }
}

const OWNERS: [u32; 5] = [0, 1, 1000, 65534, 100_000];
const FILE_MODES: [u32; 8] = [0o644, 0o600, 0o755, 0o4755, 0o2755, 0o6711, 0o1644, 0o444];
const DIR_MODES: [u32; 5] = [0o755, 0o700, 0o1777, 0o2775, 0o555];

/// What a file looks like, never following a symlink.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    /// A regular file's bytes or a symlink's target.
    content: Vec<u8>,
}

/// Everything beneath a root (not the root itself), and which regular files share an inode.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    files: std::collections::BTreeMap<PathBuf, Seen>,
    links: std::collections::BTreeSet<Vec<PathBuf>>,
}

fn snapshot(root: &Path) -> Snapshot {
    use std::os::unix::ffi::OsStrExt;
    let mut files = std::collections::BTreeMap::new();
    let mut inodes: HashMap<u64, Vec<PathBuf>> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).expect("read_dir") {
            let name = rel.join(e.expect("entry").file_name());
            let path = root.join(&name);
            let m = std::fs::symlink_metadata(&path).expect("lstat");
            let ft = m.file_type();
            let (kind, content) = if ft.is_dir() {
                stack.push(name.clone());
                ("dir", Vec::new())
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path).expect("readlink");
                ("symlink", target.as_os_str().as_bytes().to_vec())
            } else if ft.is_file() {
                inodes.entry(m.ino()).or_default().push(name.clone());
                ("file", std::fs::read(&path).expect("read"))
            } else if ft.is_fifo() {
                ("fifo", Vec::new())
            } else {
                ("other", Vec::new())
            };
            let mode = if ft.is_symlink() { 0 } else { m.mode() & 0o7777 };
            let seen = Seen {
                kind,
                mode,
                uid: m.uid(),
                gid: m.gid(),
                mtime: m.mtime(),
                content,
            };
            files.insert(name, seen);
        }
    }
    let links = inodes
        .into_values()
        .filter(|names| names.len() > 1)
        .map(|mut names| {
            names.sort();
            names
        })
        .collect();
    Snapshot { files, links }
}

/// The first differences between two snapshots, for a failure message.
fn differences(want: &Snapshot, got: &Snapshot) -> String {
    let mut out = Vec::new();
    for (path, w) in &want.files {
        match got.files.get(path) {
            Some(g) if g == w => {}
            Some(g) => out.push(format!("{}: want {w:?}\n   got {g:?}", path.display())),
            None => out.push(format!("{}: missing (want {w:?})", path.display())),
        }
    }
    for (path, g) in &got.files {
        if !want.files.contains_key(path) {
            out.push(format!("{}: unexpected {g:?}", path.display()));
        }
    }
    if want.links != got.links {
        out.push(format!("hard links: want {:?}, got {:?}", want.links, got.links));
    }
    out.truncate(12);
    out.join("\n")
}

/// A mount made by a test, unmounted (lazily) when dropped, even when an assertion failed.
struct Mounted {
    target: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn tmpfs(target: &Path) -> Mounted {
        nix::mount::mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .expect("mount tmpfs (needs root)");
        Mounted {
            target: target.to_path_buf(),
            mounted: true,
        }
    }

    fn overlay(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> Mounted {
        let options = format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
            lower.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            merged,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .expect("mount overlay (needs root)");
        Mounted {
            target: merged.to_path_buf(),
            mounted: true,
        }
    }

    /// Unmounts now. A test of this binary that forks at that instant (the child holds the
    /// parent's descriptors until its exec) makes the mount busy for a moment: tried again,
    /// for at most 10 s.
    fn unmount(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match nix::mount::umount2(&self.target, nix::mount::MntFlags::empty()) {
                Err(nix::errno::Errno::EBUSY) if std::time::Instant::now() < deadline => {
                    std::thread::yield_now();
                }
                done => {
                    done.expect("umount");
                    break;
                }
            }
        }
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn set_owner_mode(path: &Path, uid: u32, gid: u32, mode: Option<u32>) {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("lchown");
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

fn set_mtime(path: &Path, secs: i64) {
    use nix::sys::time::TimeSpec;
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::new(secs, 0),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .expect("utimensat");
}

fn write_sparse(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create");
    f.set_len(1 << 20).expect("set_len");
    f.write_all_at(b"in the middle", 512 * 1024).expect("write");
}

/// Symlink targets an image or a container may hold, out-pointing ones included.
fn symlink_target(rng: &mut Rng, canary: &Path) -> PathBuf {
    let targets = [
        canary.to_path_buf(),
        canary.join("file"),
        PathBuf::from("/"),
        PathBuf::from(".."),
        PathBuf::from("../.."),
        PathBuf::from("../../canary"),
        PathBuf::from("nowhere"),
        PathBuf::from("/etc"),
    ];
    rng.pick(&targets).clone()
}

/// A random image: directories, files (setuid ones too), symlinks pointing anywhere, hard
/// links, FIFOs, a sparse file; random owners, modes and mtimes.
fn build_image(root: &Path, canary: &Path, rng: &mut Rng) {
    let mut dirs = vec![root.to_path_buf()];
    let mut files: Vec<PathBuf> = Vec::new();
    let mut all = Vec::new();
    for i in 0..5 + rng.below(30) {
        let parent = rng.pick(&dirs).clone();
        let path = parent.join(format!("{}{i}", rng.pick(&["d", "f", "etc", "run", "x"])));
        let (uid, gid) = (*rng.pick(&OWNERS), *rng.pick(&OWNERS));
        match rng.below(9) {
            0 | 1 => {
                std::fs::create_dir(&path).expect("mkdir");
                set_owner_mode(&path, uid, gid, Some(*rng.pick(&DIR_MODES)));
                dirs.push(path.clone());
            }
            2..=4 => {
                std::fs::write(&path, rng.content()).expect("write");
                set_owner_mode(&path, uid, gid, Some(*rng.pick(&FILE_MODES)));
                files.push(path.clone());
            }
            5 => {
                std::os::unix::fs::symlink(symlink_target(rng, canary), &path).expect("symlink");
                set_owner_mode(&path, uid, gid, None);
            }
            6 if !files.is_empty() => {
                std::fs::hard_link(rng.pick(&files), &path).expect("link");
                files.push(path.clone());
                continue;
            }
            7 => {
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
                set_owner_mode(&path, uid, gid, Some(0o640));
            }
            _ => {
                write_sparse(&path);
                files.push(path.clone());
            }
        }
        all.push(path);
    }
    for (i, path) in all.iter().chain(dirs.iter().skip(1)).enumerate() {
        set_mtime(path, 1_500_000_000 + i as i64 * 1000);
    }
}

/// Everything beneath `root` (not the root), by kind: (directories, others).
fn walk(root: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, &'static str)>) {
    let snap = snapshot(root);
    let mut dirs = vec![root.to_path_buf()];
    let mut others = Vec::new();
    for (name, seen) in snap.files {
        if seen.kind == "dir" {
            dirs.push(root.join(name));
        } else {
            others.push((root.join(name), seen.kind));
        }
    }
    (dirs, others)
}

/// One thing a container may do to its rootfs, done on the merged view. Only ever acts on
/// real directories and on last components that are not followed.
fn container_op(merged: &Path, canary: &Path, rng: &mut Rng) {
    let (dirs, others) = walk(merged);
    let files: Vec<&PathBuf> = others
        .iter()
        .filter(|(_, k)| *k == "file")
        .map(|(p, _)| p)
        .collect();
    let symlinks: Vec<&PathBuf> = others
        .iter()
        .filter(|(_, k)| *k == "symlink")
        .map(|(p, _)| p)
        .collect();
    let subdirs = &dirs[1..];
    let fresh = |rng: &mut Rng| -> Option<PathBuf> {
        let path = rng.pick(&dirs).join(rng.pick(&["n0", "n1", "n2", "n3"]));
        std::fs::symlink_metadata(&path).is_err().then_some(path)
    };
    let (uid, gid) = (*rng.pick(&OWNERS), *rng.pick(&OWNERS));
    match rng.below(16) {
        0 => {
            if let Some(p) = fresh(rng) {
                std::fs::write(&p, rng.content()).expect("create");
                set_owner_mode(&p, uid, gid, Some(*rng.pick(&FILE_MODES)));
            }
        }
        1 | 2 if !files.is_empty() => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt;
            let p = rng.pick(&files);
            let append = rng.below(2) == 0;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .append(append)
                .truncate(!append)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)
                .expect("open to write");
            f.write_all(&rng.content()).expect("write");
        }
        3 => {
            let non_links: Vec<&PathBuf> = subdirs
                .iter()
                .chain(others.iter().filter(|(_, k)| *k != "symlink").map(|(p, _)| p))
                .collect();
            if !non_links.is_empty() {
                let p = rng.pick(&non_links);
                let mode = if p.is_dir() {
                    *rng.pick(&DIR_MODES)
                } else {
                    *rng.pick(&FILE_MODES)
                };
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            }
        }
        4 if !others.is_empty() => {
            std::os::unix::fs::lchown(&rng.pick(&others).0, Some(uid), Some(gid)).expect("lchown");
        }
        5 if !others.is_empty() => std::fs::remove_file(&rng.pick(&others).0).expect("rm"),
        6 if !subdirs.is_empty() => std::fs::remove_dir_all(rng.pick(subdirs)).expect("rm -r"),
        7 if !subdirs.is_empty() => {
            // rm -r and mkdir again: an opaque directory.
            let d = rng.pick(subdirs);
            std::fs::remove_dir_all(d).expect("rm -r");
            std::fs::create_dir(d).expect("mkdir");
            std::fs::write(d.join("again"), rng.content()).expect("write");
        }
        8 if !symlinks.is_empty() => {
            // The image's `var/run -> /run` replaced by a directory.
            let l = rng.pick(&symlinks);
            std::fs::remove_file(l).expect("rm");
            std::fs::create_dir(l).expect("mkdir");
            std::fs::write(l.join("pid"), b"42").expect("write");
        }
        9 if !subdirs.is_empty() => {
            let d = rng.pick(subdirs);
            std::fs::remove_dir_all(d).expect("rm -r");
            std::fs::write(d, rng.content()).expect("write");
        }
        10 if !others.is_empty() => {
            let p = &rng.pick(&others).0;
            std::fs::remove_file(p).expect("rm");
            std::os::unix::fs::symlink(symlink_target(rng, canary), p).expect("symlink");
        }
        11 if !files.is_empty() => {
            if let Some(p) = fresh(rng) {
                std::fs::hard_link(rng.pick(&files), &p).expect("ln");
            }
        }
        12 => {
            if let Some(p) = fresh(rng) {
                nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
                set_owner_mode(&p, uid, gid, Some(0o620));
            }
        }
        13 => {
            if let Some(p) = fresh(rng) {
                std::fs::create_dir(&p).expect("mkdir");
                set_owner_mode(&p, uid, gid, Some(*rng.pick(&DIR_MODES)));
                std::fs::write(p.join("inside"), rng.content()).expect("write");
            }
        }
        14 if !others.is_empty() => {
            if let Some(p) = fresh(rng) {
                std::fs::rename(&rng.pick(&others).0, &p).expect("rename");
            }
        }
        _ => {
            if let Some(p) = fresh(rng) {
                write_sparse(&p);
            }
        }
    }
}

/// One round: a random image mounted as an overlay lower layer, random container activity
/// on the merged view, capture of the upper layer, apply onto the image; the result must be
/// what the merged view showed, and the canary beside it unchanged.
fn overlay_round(base: &Path, round: usize, rng: &mut Rng) {
    let t = base.join(format!("round-{round}"));
    let [lower, upper, work, merged, canary] =
        ["lower", "upper", "work", "merged", "canary"].map(|d| t.join(d));
    for d in [&t, &lower, &upper, &work, &merged, &canary] {
        std::fs::create_dir(d).expect("mkdir");
    }
    std::fs::create_dir(canary.join("sub")).expect("mkdir");
    std::fs::write(canary.join("file"), b"canary").expect("write");
    std::fs::write(canary.join("sub/deep"), b"deep").expect("write");
    let canary_before = snapshot(&canary);
    build_image(&lower, &canary, rng);
    let mut overlay = Mounted::overlay(&lower, &upper, &work, &merged);
    for _ in 0..1 + rng.below(20) {
        container_op(&merged, &canary, rng);
    }
    let want = snapshot(&merged);
    overlay.unmount();
    let (tar, del) = (t.join("diff.tar"), t.join("deleted.json"));
    capture(&upper, &tar, &del).unwrap_or_else(|e| panic!("round {round}: capture: {e}"));
    apply(&lower, &tar, &del).unwrap_or_else(|e| panic!("round {round}: apply: {e}"));
    let got = snapshot(&lower);
    assert!(want == got, "round {round}:\n{}", differences(&want, &got));
    assert!(
        snapshot(&canary) == canary_before,
        "round {round}: the canary changed"
    );
    std::fs::remove_dir_all(&t).expect("clean up a round");
}

/// Property: capture then apply reproduces what the container saw through overlayfs, for
/// random images and random container activity on a real overlay mount (needs root). The
/// rounds run on a tmpfs of their own: the capture's fsync and the mounts stay cheap.
#[test]
fn applying_a_capture_reproduces_the_overlay_view() {
    let t = tempfile::tempdir().expect("tempdir");
    let _tmpfs = Mounted::tmpfs(t.path());
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for round in 0..300 {
        overlay_round(t.path(), round, &mut rng);
    }
}
