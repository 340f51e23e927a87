use super::*;
use crate::criu::image::shm::*;
use crate::criu::image::IMG_COMMON_MAGIC;
use std::collections::BTreeSet;

fn perm(id: i32) -> Perm {
    Perm {
        key: 7,
        id,
        uid: 0,
        gid: 0,
        mode: 0o600,
    }
}

#[test]
fn ids_come_from_the_second_column() {
    let text = "       key      shmid perms                  size  cpid  lpid nattch\n\
                4242      32768   666      4096     1     1      0\n\
                0      65537   600      8192     1     1      1\n";
    assert_eq!(parse_ids(text), vec![32768, 65537]);
    assert!(parse_ids("header only\n").is_empty());
}

#[test]
fn sysv_mappings_are_found_in_maps() {
    let maps = "7f1e2c000000-7f1e2c010000 rw-s 00000000 00:01 32768                      /SYSV00001bbc (deleted)\n\
                7f1e2d000000-7f1e2d001000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6\n\
                7f1e2e000000-7f1e2e010000 rw-s 00000000 00:01 98305                      /SYSV00000000 (deleted)\n\
                7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]\n";
    assert_eq!(
        podsnap_runtime::host::linux::sysv_mappings(maps),
        vec![32768, 98305]
    );
}

/// An `IpcShmEntry` record as CRIU writes it: length, protobuf, contents unless paged.
fn shm_record(id: u64, size: u64, in_pagemaps: bool) -> Vec<u8> {
    let mut desc = vec![0x08, 0x05]; // key 5
    desc.extend([0x38, (id & 0x7f) as u8 | 0x80, (id >> 7) as u8]); // field 7, 2-byte varint
    let mut entry = vec![0x0a, desc.len() as u8];
    entry.extend(&desc);
    entry.extend([0x10, size as u8, 0x18, u8::from(in_pagemaps)]);
    let mut out = (entry.len() as u32).to_le_bytes().to_vec();
    out.extend(&entry);
    if !in_pagemaps {
        out.extend(vec![0xab; (size as usize).div_ceil(4) * 4]);
    }
    out
}

#[test]
fn criu_shm_images_keep_only_the_segments_asked() {
    let (a, b, c) = (
        shm_record(300, 10, false),
        shm_record(301, 64, true),
        shm_record(302, 8, false),
    );
    let body = [a.clone(), b.clone(), c.clone()].concat();
    assert_eq!(ShmRecord::parse(&a[4..a.len() - 12]).expect("parse").id, 300);
    let keep: BTreeSet<i32> = [301, 302].into();
    assert_eq!(filter_shm_entries(&body, &keep).expect("filter"), [b, c].concat());
    assert!(filter_shm_entries(&body, &BTreeSet::new())
        .expect("filter")
        .is_empty());
    assert!(
        filter_shm_entries(&body[..body.len() - 1], &keep).is_err(),
        "truncated"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let header = [IMG_COMMON_MAGIC.to_le_bytes(), 0x4628_3044u32.to_le_bytes()].concat();
    std::fs::write(
        dir.path().join("ipcns-shm-9.img"),
        [header.clone(), body].concat(),
    )
    .expect("w");
    std::fs::write(
        dir.path().join("ipcns-sem-9.img"),
        [header.clone(), vec![1, 2, 3]].concat(),
    )
    .expect("w");
    std::fs::write(dir.path().join("pages-1.img"), b"untouched").expect("w");
    trim_criu_images(dir.path(), &[302].into()).expect("trim");
    assert_eq!(
        std::fs::read(dir.path().join("ipcns-shm-9.img")).expect("r"),
        [header.clone(), shm_record(302, 8, false)].concat()
    );
    assert_eq!(
        std::fs::read(dir.path().join("ipcns-sem-9.img")).expect("r"),
        header
    );
    assert_eq!(
        std::fs::read(dir.path().join("pages-1.img")).expect("r"),
        b"untouched"
    );
    std::fs::write(dir.path().join("ipcns-msg-9.img"), b"nope").expect("w");
    assert!(
        trim_criu_images(dir.path(), &BTreeSet::new()).is_err(),
        "no magic"
    );
}

#[test]
fn crafted_states_are_refused() {
    let ok = SysvState {
        shm: vec![ShmSegment {
            perm: perm(1),
            size: 4096,
            removed: false,
            attached_in: None,
        }],
        sem: vec![SemSet {
            perm: perm(2),
            values: vec![3],
        }],
        msg: vec![MsgQueue {
            perm: perm(3),
            qbytes: 16384,
            messages: vec![Message {
                mtype: 1,
                text: "6869".into(),
            }],
        }],
    };
    assert_eq!(ok.validate(), Ok(()));
    let mut twice = ok.clone();
    twice.shm.push(twice.shm[0].clone());
    assert!(twice.validate().expect_err("listed twice").contains("twice"));
    let mut setuid = ok.clone();
    setuid.shm[0].perm.mode = 0o4777;
    assert!(setuid.validate().is_err());
    let mut bad_type = ok.clone();
    bad_type.msg[0].messages[0].mtype = 0;
    assert!(bad_type.validate().is_err());
    let mut bad_text = ok.clone();
    bad_text.msg[0].messages[0].text = "xyz".into();
    assert!(bad_text.validate().is_err());
    let mut no_sems = ok;
    no_sems.sem[0].values.clear();
    assert!(no_sems.validate().is_err());
}

/// A private IPC namespace of a child thread, so the test never touches the host's: objects
/// made there are captured, then restored into another fresh namespace with the same ids.
#[test]
fn objects_round_trip_between_namespaces() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("this test needs root (it creates IPC namespaces)");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("pod")).expect("pod dir");
    let ns_a = private_ipc_ns(dir.path(), "a");
    let made = {
        let ns = ns_a.to_path_buf();
        std::thread::spawn(move || {
            enter(&ns);
            make_objects()
        })
        .join()
        .expect("thread")
    };
    let state = capture(&ns_a, dir.path(), &BTreeMap::new())
        .expect("capture")
        .expect("objects");
    assert_eq!(state.shm.len(), 1);
    assert_eq!(state.shm[0].perm.id, made.0);
    assert_eq!(state.sem[0].values, vec![5, 0, 9]);
    assert_eq!(state.msg[0].messages.len(), 2);
    assert_eq!(
        hex::decode(&state.msg[0].messages[1].text).expect("hex"),
        b"second"
    );
    // The queue still holds both messages (MSG_COPY left them).
    let ns = ns_a.to_path_buf();
    let left = std::thread::spawn(move || {
        enter(&ns);
        queue_len(made.2)
    })
    .join()
    .expect("thread");
    assert_eq!(left, 2);

    let ns_b = private_ipc_ns(dir.path(), "b");
    restore(&ns_b, dir.path(), &state).expect("restore");
    let again_dir = dir.path().join("again");
    std::fs::create_dir_all(again_dir.join("pod")).expect("dir");
    let again = capture(&ns_b, &again_dir, &BTreeMap::new())
        .expect("capture again")
        .expect("objects");
    assert_eq!(again, state, "the same objects, ids and contents");
    assert_eq!(
        std::fs::read(dir.path().join("again").join(shm_data_file(made.0))).expect("data"),
        std::fs::read(dir.path().join(shm_data_file(made.0))).expect("data")
    );
    // A second restore into the same namespace fails and leaves what is there.
    let err = restore(&ns_b, dir.path(), &state).expect_err("ids are taken");
    assert!(err.to_string().contains("SysV"), "{err}");
    // The host's namespace is refused.
    let err = restore(Path::new("/proc/self/ns/ipc"), dir.path(), &state).expect_err("host");
    assert!(err.to_string().contains("host's IPC namespace"), "{err}");
}

fn enter(ns: &Path) {
    let f = File::open(ns).expect("open ns");
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWIPC).expect("setns");
}

/// A bind mount of a namespace, unmounted when dropped.
struct NsMount(PathBuf);

impl std::ops::Deref for NsMount {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for NsMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A new IPC namespace kept alive by a bind mount at `<dir>/<name>`.
fn private_ipc_ns(dir: &Path, name: &str) -> NsMount {
    let target = dir.join(name);
    File::create(&target).expect("mount point");
    let t = target.clone();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC).expect("unshare");
        let tid = nix::unistd::gettid();
        let own = format!("/proc/self/task/{tid}/ns/ipc");
        nix::mount::mount(
            Some(own.as_str()),
            &t,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind the namespace");
    })
    .join()
    .expect("thread");
    NsMount(target)
}

/// A segment with a pattern, a set of three semaphores, a queue of two messages.
fn make_objects() -> (i32, i32, i32) {
    // SAFETY: plain SysV calls on objects this test creates in its private namespace.
    unsafe {
        let shm = libc::shmget(0x5151, 8192, libc::IPC_CREAT | 0o640);
        assert!(shm >= 0);
        let addr = libc::shmat(shm, std::ptr::null(), 0);
        assert_ne!(addr as isize, -1);
        for i in 0..8192usize {
            *addr.cast::<u8>().add(i) = (i % 251) as u8;
        }
        libc::shmdt(addr);
        let sem = libc::semget(0x5152, 3, libc::IPC_CREAT | 0o600);
        assert!(sem >= 0);
        let mut values: [u16; 3] = [5, 0, 9];
        assert_eq!(libc::semctl(sem, 0, libc::SETALL, values.as_mut_ptr()), 0);
        let msg = libc::msgget(0x5153, libc::IPC_CREAT | 0o600);
        assert!(msg >= 0);
        for (t, text) in [(1 as libc::c_long, &b"first"[..]), (7, &b"second"[..])] {
            let mut buf = t.to_ne_bytes().to_vec();
            buf.extend_from_slice(text);
            assert_eq!(libc::msgsnd(msg, buf.as_ptr().cast(), text.len(), 0), 0);
        }
        (shm, sem, msg)
    }
}

fn queue_len(id: i32) -> u64 {
    // SAFETY: IPC_STAT into a zeroed buffer.
    unsafe {
        let mut ds: libc::msqid_ds = std::mem::zeroed();
        assert_eq!(libc::msgctl(id, libc::IPC_STAT, &mut ds), 0);
        ds.msg_qnum
    }
}
