use super::*;
use podsnap_runtime::launcher::{Capture, Launcher, Outcome};
use std::process::Command;
use std::sync::Arc;

/// runc that "checkpoints" by writing a file into the image dir, then fails with a CRIU log.
struct FailingCriu;

#[async_trait::async_trait]
impl Launcher for FailingCriu {
    async fn run(&self, cmd: Command, _c: Capture) -> std::io::Result<Outcome> {
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let pos = args.iter().position(|a| a == "--image-path").expect("image path");
        let dir = PathBuf::from(&args[pos + 1]);
        std::fs::write(dir.join("pages-1.img"), b"partial").expect("write");
        std::fs::write(
            dir.join("dump.log"),
            "line 1\nError (criu/sk-unix.c:1): unix: cannot dump\n",
        )
        .expect("write");
        Ok(Outcome {
            code: 1,
            stdout: vec![],
            stderr: b"criu failed: type NOTIFY errno 0".to_vec(),
        })
    }
}

#[tokio::test]
async fn failed_dump_removes_its_directory_and_quotes_criu() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("ckpt");
    let runc = Runc::new("runc", "/run/x", Arc::new(FailingCriu));
    let d = Dump {
        id: "c1".into(),
        image_dir: dir.clone(),
        work_dir: None,
        options: DumpOptions::default(),
        leave_running: true,
        cgroups: None,
        was_paused: false,
        limit: Limit::default(),
        netns: None,
        serve: None,
    };
    let err = dump(&runc, &d).await.expect_err("must fail").to_string();
    assert!(err.starts_with("checkpoint of container c1 failed"), "{err}");
    assert!(err.contains("unix: cannot dump"), "{err}");
    assert!(!dir.exists(), "partial checkpoint left behind");
}

#[tokio::test]
async fn failed_dump_into_existing_dir_keeps_what_was_there() {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(root.path().join("mine"), b"x").expect("write");
    let runc = Runc::new("runc", "/run/x", Arc::new(FailingCriu));
    let d = Dump {
        id: "c1".into(),
        image_dir: root.path().to_path_buf(),
        work_dir: None,
        options: DumpOptions::default(),
        leave_running: true,
        cgroups: None,
        was_paused: false,
        limit: Limit::default(),
        netns: None,
        serve: None,
    };
    dump(&runc, &d).await.expect_err("must fail");
    let left: Vec<_> = listing(root.path()).into_iter().collect();
    assert_eq!(left, vec![OsString::from("mine")]);
}

#[test]
fn private_dirs_leave_existing_parents_alone() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().expect("tempdir");
    let shared = root.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    create_private_dir(&shared.join("a/b")).expect("create");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode(&shared), 0o1777, "an existing parent changed mode");
    assert_eq!(mode(&shared.join("a")), 0o700);
    assert_eq!(mode(&shared.join("a/b")), 0o700);
    create_private_dir(&shared).expect("exists");
    assert_eq!(mode(&shared), 0o1777);
}

#[test]
fn log_tail_quotes_the_cause_before_the_tail() {
    let root = tempfile::tempdir().expect("tempdir");
    let log = root.path().join("dump.log");
    let mut text = String::from(
        "(00.01) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self\n\
         (00.02) Error (criu/sk-inet.c:199): inet: Connected TCP socket, consider using \
         --tcp-established option.\n",
    );
    for i in 0..40 {
        text.push_str(&format!("(00.{i:02}) cleanup line {i}\n"));
    }
    text.push_str("(00.99) Error (criu/cr-dump.c:1975): Dumping FAILED.\n");
    std::fs::write(&log, text).expect("write");
    let tail = log_tail(&log).expect("a tail");
    assert!(tail.starts_with("(00.02) Error (criu/sk-inet.c:199)"), "{tail}");
    assert!(!tail.contains("RLIMIT_NOFILE"), "{tail}");
    assert!(tail.ends_with("Dumping FAILED."), "{tail}");
    assert_eq!(tail.lines().count(), 1 + 1 + LOG_TAIL_LINES, "{tail}");
}

fn pagemap(pages_id: u64, entries: &[(u64, u64, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(0x5458_4319u32.to_le_bytes());
    out.extend(PAGEMAP_MAGIC.to_le_bytes());
    let mut push = |msg: Vec<u8>| {
        out.extend((msg.len() as u32).to_le_bytes());
        out.extend(msg);
    };
    push(vec![0x08, pages_id as u8]);
    let varint = |m: &mut Vec<u8>, mut v: u64| loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            m.push(b);
            break;
        }
        m.push(b | 0x80);
    };
    for &(vaddr, nr, flags) in entries {
        let mut m = vec![0x08];
        varint(&mut m, vaddr);
        // CRIU 4's layout: field 2 left at 0, the count in field 5.
        m.extend([0x10, 0, 0x20, flags as u8, 0x28]);
        varint(&mut m, nr);
        push(m);
    }
    out
}

#[test]
fn a_crafted_pagemap_whose_pages_overflow_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = root.path();
    std::fs::write(d.join(CRIU_INVENTORY), b"").expect("inventory");
    std::fs::write(d.join("pages-7.img"), vec![0u8; 4096]).expect("pages");
    // 2^52 + 1 pages: 2^64 + 4096 bytes, 4096 once wrapped, as the pages file holds.
    std::fs::write(
        d.join("pagemap-1.img"),
        pagemap(7, &[(0x40_0000, (1 << 52) + 1, PE_PRESENT)]),
    )
    .expect("pagemap");
    let err = inspect(d).expect_err("more pages than can exist").to_string();
    assert!(err.contains("pagemap-1.img") && err.contains("pages"), "{err}");
    // Counts that overflow when added up.
    std::fs::write(
        d.join("pagemap-1.img"),
        pagemap(
            7,
            &[(0x40_0000, u64::MAX, PE_PRESENT), (0x50_0000, 2, PE_PRESENT)],
        ),
    )
    .expect("pagemap");
    assert!(inspect(d).is_err());
}

#[test]
fn a_pagemap_larger_than_the_cap_is_refused_unread() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = root.path();
    std::fs::write(d.join(CRIU_INVENTORY), b"").expect("inventory");
    // A valid head (14 bytes), then empty entries (4 zero bytes each) to just past the cap:
    // a well-formed image (sparse: nothing is written, and nothing must be read).
    let f = std::fs::File::create(d.join("pagemap-1.img")).expect("create");
    use std::io::Write;
    let head = pagemap(7, &[]);
    (&f).write_all(&head).expect("head");
    let len = head.len() as u64 + (MAX_PAGEMAP_BYTES - head.len() as u64) / 4 * 4 + 4;
    assert!(len > MAX_PAGEMAP_BYTES);
    f.set_len(len).expect("grow");
    let err = inspect(d).expect_err("too large").to_string();
    assert!(
        err.contains("pagemap-1.img") && err.contains("more than"),
        "{err}"
    );
}

#[test]
fn memory_images_must_match_their_pagemap() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = root.path();
    std::fs::write(d.join(CRIU_INVENTORY), b"").expect("inventory");
    // 3 present pages and 2 lazy/parent ones that live elsewhere.
    std::fs::write(
        d.join("pagemap-1.img"),
        pagemap(7, &[(0x40_0000, 3, PE_PRESENT), (0x50_0000, 2, 1)]),
    )
    .expect("pagemap");
    std::fs::write(d.join("pages-7.img"), vec![0u8; 3 * 4096]).expect("pages");
    assert_eq!(
        parse_pagemap(&std::fs::read(d.join("pagemap-1.img")).expect("read")),
        Ok((7, 3))
    );
    inspect(d).expect("consistent images");
    std::fs::write(d.join("pages-7.img"), vec![0u8; 4096]).expect("truncate");
    let err = inspect(d).expect_err("truncated").to_string();
    assert!(err.contains("memory image is damaged"), "{err}");
    std::fs::remove_file(d.join("pages-7.img")).expect("rm");
    let err = inspect(d).expect_err("missing").to_string();
    assert!(err.contains("pages-7.img"), "{err}");
}

#[test]
fn the_highest_pid_counts_every_task_and_thread() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = root.path();
    // What CRIU 4.2 wrote for one task (pid 27254, no other thread), then a second task
    // (pid 9, parent 27254) with threads 9 and 31000.
    let mut img = vec![0x19, 0x43, 0x56, 0x54, 0x30, 0x30, 0x27, 0x50];
    img.extend([
        0x12, 0, 0, 0, 0x08, 0xf6, 0xd4, 0x01, 0x10, 0x00, 0x18, 0xf6, 0xd4, 0x01,
    ]);
    img.extend([0x20, 0xf6, 0xd4, 0x01, 0x28, 0xf6, 0xd4, 0x01]);
    assert_eq!(highest_of(d, &img), Ok(27254));
    img.extend([0x0c, 0, 0, 0, 0x08, 0x09, 0x10, 0xf6, 0xd4, 0x01, 0x28, 0x09]);
    img.extend([0x28, 0x98, 0xf2, 0x01]);
    assert_eq!(highest_of(d, &img), Ok(31000));
    img.truncate(img.len() - 2);
    let err = highest_of(d, &img).expect_err("truncated");
    assert!(err.contains("truncated entry"), "{err}");
    let err = highest_of(d, &pagemap(1, &[])).expect_err("another image");
    assert!(err.contains("not a CRIU process tree image"), "{err}");
    std::fs::remove_file(d.join(PSTREE_IMAGE)).expect("rm");
    assert!(highest_pid(d).is_err(), "no pstree.img");
}

fn highest_of(d: &Path, img: &[u8]) -> std::result::Result<u32, String> {
    std::fs::write(d.join(PSTREE_IMAGE), img).expect("write");
    highest_pid(d).map_err(|e| e.to_string())
}

/// In a real PID namespace: after the reservation, the next process gets the id after it.
#[tokio::test]
async fn reserved_pids_are_not_handed_out_again() {
    use podsnap_runtime::launcher::TokioLauncher;
    let mut holder = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "sleep", "60"])
        .spawn()
        .expect("unshare (util-linux) starts a PID namespace");
    let ns = || -> Option<PathBuf> {
        let children =
            std::fs::read_to_string(format!("/proc/{}/task/{}/children", holder.id(), holder.id())).ok()?;
        let pid = children.split_whitespace().next()?;
        Some(PathBuf::from(format!("/proc/{pid}/ns/pid")))
    };
    let mut pidns = None;
    for _ in 0..200 {
        pidns = ns();
        if pidns.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let pidns = pidns.expect("the namespace's first process");
    let result = reserve_pids(&TokioLauncher, &pidns, 4242).await;
    let next = Command::new("nsenter")
        .arg(format!("--pid={}", pidns.display()))
        .args(["--", "sh", "-c", "echo $$"])
        .output()
        .expect("nsenter");
    let _ = holder.kill();
    let _ = holder.wait();
    result.expect("reserved");
    assert_eq!(String::from_utf8_lossy(&next.stdout).trim(), "4243");
    let err = reserve_pids(&TokioLauncher, Path::new("/nonexistent/ns/pid"), 7)
        .await
        .expect_err("no such namespace")
        .to_string();
    assert!(err.contains("reserve the recorded process ids"), "{err}");
}

#[test]
fn inspect_refuses_what_is_not_a_checkpoint() {
    let root = tempfile::tempdir().expect("tempdir");
    let missing = inspect(&root.path().join("nope"))
        .expect_err("missing")
        .to_string();
    assert!(missing.contains("cannot read it"), "{missing}");
    let empty = inspect(root.path()).expect_err("empty").to_string();
    assert!(empty.contains("no CRIU inventory.img"), "{empty}");
    std::fs::write(root.path().join(CRIU_INVENTORY), b"").expect("write");
    assert_eq!(inspect(root.path()).expect("defaults"), DumpOptions::default());
    let opts = DumpOptions {
        tcp_established: true,
        ..Default::default()
    };
    write_private(
        &root.path().join(CRIU_OPTIONS_FILE),
        &serde_json::to_vec(&opts).expect("json"),
    )
    .expect("write");
    assert_eq!(inspect(root.path()).expect("options"), opts);
}

#[test]
fn pages_flagged_lazy_are_in_the_pages_file_unless_the_dump_was_lazy() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = root.path();
    std::fs::write(d.join(CRIU_INVENTORY), b"").expect("inventory");
    // 2 present pages, and 3 present pages flagged lazy (CRIU flags them so in every dump).
    std::fs::write(
        d.join("pagemap-1.img"),
        pagemap(
            7,
            &[(0x40_0000, 2, PE_PRESENT), (0x50_0000, 3, PE_PRESENT | PE_LAZY)],
        ),
    )
    .expect("pagemap");
    std::fs::write(d.join("pages-7.img"), vec![0u8; 5 * 4096]).expect("pages");
    inspect(d).expect("an ordinary dump writes its lazy-flagged pages");
    // A lazy dump (live migration) leaves them to its page server.
    let lazy = DumpOptions {
        lazy_pages: true,
        ..Default::default()
    };
    std::fs::write(
        d.join(CRIU_OPTIONS_FILE),
        serde_json::to_vec(&lazy).expect("json"),
    )
    .expect("options");
    let err = inspect(d)
        .expect_err("a lazy dump's file holds them not")
        .to_string();
    assert!(err.contains("the memory image is damaged"), "{err}");
    std::fs::write(d.join("pages-7.img"), vec![0u8; 2 * 4096]).expect("pages");
    assert!(inspect(d).expect("a lazy dump's images").lazy_pages);
}
