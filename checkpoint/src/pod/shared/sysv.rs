//! The System V IPC objects of a pod's IPC namespace (shared memory segments, semaphore sets,
//! message queues), captured once for the pod and restored into the new pod's IPC namespace
//! before its first container.
//!
//! Why podsnap and not CRIU: each container joins the pod's IPC namespace, which belongs to the
//! pause process. runc restores a container into the new pod's IPC namespace by asking CRIU to
//! join it, and CRIU then restores nothing of what the namespace held. So the objects come back
//! here, with their ids (a process that has a segment attached is restored by CRIU attaching
//! the same id again), keys, owners, modes and contents:
//!
//! - shared memory: the bytes of each segment (`pod/sysv-shm-<id>.bin`, read through a
//!   read-only attach while the pod is frozen);
//! - semaphores: the value of each semaphore of each set;
//! - message queues: every queued message in order (read with `MSG_COPY`, which leaves the
//!   queue as it was), and the queue's byte limit.
//!
//! The work runs on a thread of its own that joins the pod's IPC namespace (`setns` changes only
//! the calling thread's namespace); the host's IPC namespace is never read nor written. A
//! restore checks every object against the checkpoint before it creates anything, creates each
//! with the exact id it had (the namespace's `*_next_id` sysctl), and removes what it created if
//! any step fails. Not kept: segments already removed while still attached come back as
//! ordinary segments of key `IPC_PRIVATE` (they go with the pod's namespace), per-process
//! semaphore undo lists, and the times and last pids of each object.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::layout::SYSV_STATE;

/// `shmctl` commands and flags glibc has and the libc crate does not.
const SHM_DEST: u32 = 0o1000;
const MSG_COPY: libc::c_int = 0o40000;
/// The largest message a queue may hold, whatever its limit says (the kernel's `msgmnb` cap).
const MAX_MESSAGE: usize = 1 << 24;
/// Bounds on what a checkpoint may ask a restore to create (the kernel's own limits apply too).
const MAX_OBJECTS: usize = 32_768;
const MAX_SEMAPHORES: usize = 32_000;

/// The file that holds the bytes of segment `id`, relative to the checkpoint root.
pub fn shm_data_file(id: i32) -> String {
    format!("pod/sysv-shm-{id}.bin")
}

/// Who an object belongs to and who may use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Perm {
    pub key: i32,
    pub id: i32,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits only (`0o777`).
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShmSegment {
    pub perm: Perm,
    pub size: u64,
    /// It was removed (`IPC_RMID`) while still attached.
    #[serde(default)]
    pub removed: bool,
    /// The container whose processes had it attached: that container's CRIU run creates it
    /// (and attaches it again); podsnap holds no copy of its bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_in: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SemSet {
    pub perm: Perm,
    pub values: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub mtype: i64,
    /// The message's bytes, hex.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsgQueue {
    pub perm: Perm,
    /// The queue's byte limit (`msg_qbytes`).
    pub qbytes: u64,
    pub messages: Vec<Message>,
}

/// Every SysV object of an IPC namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SysvState {
    pub shm: Vec<ShmSegment>,
    pub sem: Vec<SemSet>,
    pub msg: Vec<MsgQueue>,
}

impl SysvState {
    pub fn is_empty(&self) -> bool {
        self.shm.is_empty() && self.sem.is_empty() && self.msg.is_empty()
    }

    /// Refuses a state no dump writes (before anything is created from it).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.shm.len() + self.sem.len() + self.msg.len() > MAX_OBJECTS {
            return Err(format!("more than {MAX_OBJECTS} SysV objects"));
        }
        let mut ids = std::collections::HashSet::new();
        let perms = self
            .shm
            .iter()
            .map(|s| ("shm", &s.perm))
            .chain(self.sem.iter().map(|s| ("sem", &s.perm)))
            .chain(self.msg.iter().map(|q| ("msg", &q.perm)));
        for (kind, p) in perms {
            if p.id < 0 || p.mode & !0o777 != 0 {
                return Err(format!("{kind} object {}: bad id or mode {:o}", p.id, p.mode));
            }
            if !ids.insert((kind, p.id)) {
                return Err(format!("{kind} object {} listed twice", p.id));
            }
        }
        for s in &self.sem {
            if s.values.is_empty() || s.values.len() > MAX_SEMAPHORES {
                return Err(format!(
                    "semaphore set {}: {} semaphores",
                    s.perm.id,
                    s.values.len()
                ));
            }
            if s.values.iter().any(|v| *v > 32_767) {
                return Err(format!("semaphore set {}: a value above 32767", s.perm.id));
            }
        }
        for q in &self.msg {
            for m in &q.messages {
                if m.mtype <= 0 {
                    return Err(format!("queue {}: message type {}", q.perm.id, m.mtype));
                }
                let len = m.text.len() / 2;
                if m.text.len() % 2 != 0 || len > MAX_MESSAGE || hex::decode(&m.text).is_err() {
                    return Err(format!("queue {}: a malformed message", q.perm.id));
                }
            }
        }
        Ok(())
    }
}

/// Runs `work` on a new thread that has joined the IPC namespace at `ns` (refused if it is the
/// one this process runs in: the host's, for the shim and the CLI).
fn in_ipc_ns<T: Send + 'static>(ns: &Path, work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let file = File::open(ns).map_err(|e| Error::io("open the pod's IPC namespace", ns, e))?;
    let own = "/proc/thread-self/ns/ipc";
    let host = std::fs::metadata(own).map_err(|e| Error::io("stat this IPC namespace", own, e))?;
    let this = file
        .metadata()
        .map_err(|e| Error::io("stat the pod's IPC namespace", ns, e))?;
    if (this.dev(), this.ino()) == (host.dev(), host.ino()) {
        return Err(Error::io(
            "enter the pod's IPC namespace",
            ns,
            std::io::Error::other("it is the host's IPC namespace"),
        ));
    }
    let ns_path = ns.to_path_buf();
    std::thread::Builder::new()
        .name("podsnap-sysv".into())
        .spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWIPC)
                .map_err(|e| Error::io("enter the pod's IPC namespace", &ns_path, e.into()))?;
            work()
        })
        .map_err(|e| Error::io("start a thread", ns, e))?
        .join()
        .map_err(|_| Error::io("SysV IPC thread", ns, std::io::Error::other("panicked")))?
}

fn last_error(what: &'static str, id: i32) -> Error {
    Error::io(what, format!("SysV object {id}"), std::io::Error::last_os_error())
}

/// The ids listed in `/proc/sysvipc/<kind>` for the calling thread's IPC namespace.
fn listed_ids(kind: &str) -> Result<Vec<i32>> {
    let path = format!("/proc/sysvipc/{kind}");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("list SysV objects", &path, e))?;
    Ok(parse_ids(&text))
}

/// The second column (the id) of every line but the header.
fn parse_ids(text: &str) -> Vec<i32> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

fn perm_of(p: &libc::ipc_perm, id: i32) -> Perm {
    Perm {
        key: p.__key,
        id,
        uid: p.uid,
        gid: p.gid,
        mode: u32::from(p.mode) & 0o777,
    }
}

/// Captures the SysV objects of the IPC namespace at `ns` into `root` (the checkpoint being
/// written): the state file and one data file per segment. Returns the state (`None` when the
/// namespace holds no object: nothing is written).
/// `attached` maps the segments processes have attached to their container (see
/// the host seam's `sysv_attached`): those are left to that container's CRIU run.
pub fn capture(ns: &Path, root: &Path, attached: &BTreeMap<i32, String>) -> Result<Option<SysvState>> {
    let root = root.to_path_buf();
    let attached = attached.clone();
    let state = in_ipc_ns(ns, move || capture_here(&root, &attached))?;
    Ok((!state.is_empty()).then_some(state))
}

fn capture_here(root: &Path, attached: &BTreeMap<i32, String>) -> Result<SysvState> {
    let mut state = SysvState::default();
    for id in listed_ids("shm")? {
        // SAFETY: a zeroed shmid_ds is a valid out buffer.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: `ds` is a valid out pointer.
        if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } != 0 {
            continue; // removed since it was listed
        }
        let size = ds.shm_segsz;
        let segment = ShmSegment {
            perm: perm_of(&ds.shm_perm, id),
            size: size as u64,
            removed: u32::from(ds.shm_perm.mode) & SHM_DEST != 0,
            attached_in: attached.get(&id).cloned(),
        };
        if segment.attached_in.is_some() {
            state.shm.push(segment);
            continue;
        }
        let path = root.join(shm_data_file(id));
        // SAFETY: attaching an existing segment read-only at an address the kernel chooses.
        let addr = unsafe { libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY) };
        if addr as isize == -1 {
            return Err(last_error("attach a SysV segment", id));
        }
        // SAFETY: the mapping is `size` bytes long and readable until the shmdt below.
        let bytes = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), size) };
        let written = create_private(&path).and_then(|mut f| {
            f.write_all(bytes)
                .map_err(|e| Error::io("write a SysV segment", &path, e))
        });
        // SAFETY: `addr` was returned by shmat above and is no longer used.
        unsafe { libc::shmdt(addr) };
        written?;
        state.shm.push(segment);
    }
    for id in listed_ids("sem")? {
        // SAFETY: a zeroed semid_ds is a valid out buffer.
        let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT takes a pointer to a semid_ds.
        if unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) } != 0 {
            continue;
        }
        let mut values = vec![0u16; ds.sem_nsems as usize];
        // SAFETY: GETALL writes `sem_nsems` unsigned shorts to the array.
        if unsafe { libc::semctl(id, 0, libc::GETALL, values.as_mut_ptr()) } != 0 {
            return Err(last_error("read a SysV semaphore set", id));
        }
        state.sem.push(SemSet {
            perm: perm_of(&ds.sem_perm, id),
            values,
        });
    }
    for id in listed_ids("msg")? {
        // SAFETY: a zeroed msqid_ds is a valid out buffer.
        let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: `ds` is a valid out pointer.
        if unsafe { libc::msgctl(id, libc::IPC_STAT, &mut ds) } != 0 {
            continue;
        }
        let room = (ds.msg_qbytes as usize).clamp(1, MAX_MESSAGE);
        let mut buf = vec![0u8; std::mem::size_of::<libc::c_long>() + room];
        let mut messages = Vec::new();
        for index in 0..ds.msg_qnum {
            // SAFETY: `buf` holds an mtype followed by `room` bytes; MSG_COPY reads the message
            // at `index` without removing it.
            let n = unsafe {
                libc::msgrcv(
                    id,
                    buf.as_mut_ptr().cast(),
                    room,
                    index as libc::c_long,
                    libc::IPC_NOWAIT | MSG_COPY,
                )
            };
            if n < 0 {
                return Err(last_error("read a SysV message (MSG_COPY)", id));
            }
            let (head, text) = buf.split_at(std::mem::size_of::<libc::c_long>());
            let mut mtype = [0u8; std::mem::size_of::<libc::c_long>()];
            mtype.copy_from_slice(head);
            messages.push(Message {
                mtype: libc::c_long::from_ne_bytes(mtype),
                text: hex::encode(&text[..n as usize]),
            });
        }
        state.msg.push(MsgQueue {
            perm: perm_of(&ds.msg_perm, id),
            qbytes: ds.msg_qbytes,
            messages,
        });
    }
    Ok(state)
}

fn create_private(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create a checkpoint file", path, e))
}

/// Creates `state`'s objects in the IPC namespace at `ns`, segments filled from the files under
/// `root` (a verified checkpoint). Everything is checked first; on failure what was created is
/// removed again.
pub fn restore(ns: &Path, root: &Path, state: &SysvState) -> Result<()> {
    state.validate().map_err(|reason| invalid(root, reason))?;
    let mut state = state.clone();
    state.shm.retain(|s| s.attached_in.is_none());
    let mut data = Vec::new();
    for s in &state.shm {
        let path = root.join(shm_data_file(s.perm.id));
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| Error::io("open a SysV segment", &path, e))?;
        if !meta.is_file() || meta.len() != s.size {
            return Err(invalid(
                root,
                format!(
                    "segment {}: {} does not hold its {} bytes",
                    s.perm.id,
                    path.display(),
                    s.size
                ),
            ));
        }
        data.push(path);
    }
    let root_owned = root.to_path_buf();
    in_ipc_ns(ns, move || {
        let mut made = Created::default();
        restore_here(&state, &data, &mut made).inspect_err(|_| made.remove_all())?;
        made.keep();
        log::info!(
            "SysV IPC restored from {}: {} segments, {} semaphore sets, {} queues",
            root_owned.display(),
            state.shm.len(),
            state.sem.len(),
            state.msg.len()
        );
        Ok(())
    })
}

fn invalid(root: &Path, reason: String) -> Error {
    Error::InvalidCheckpoint {
        path: root.join(SYSV_STATE),
        reason,
    }
}

/// What a restore created so far (removed on failure).
#[derive(Default)]
struct Created {
    shm: Vec<i32>,
    sem: Vec<i32>,
    msg: Vec<i32>,
}

impl Created {
    fn remove_all(&mut self) {
        // SAFETY: IPC_RMID takes no buffer (null); the ids are the objects this restore made.
        unsafe {
            for id in self.shm.drain(..) {
                libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
            }
            for id in self.sem.drain(..) {
                libc::semctl(id, 0, libc::IPC_RMID);
            }
            for id in self.msg.drain(..) {
                libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
    }

    fn keep(&mut self) {
        self.shm.clear();
        self.sem.clear();
        self.msg.clear();
    }
}

/// Makes the next object of a kind get `id` (the namespace's `<kind>_next_id`).
fn next_id(kind: &str, id: i32) -> Result<()> {
    let path = format!("/proc/sys/kernel/{kind}_next_id");
    std::fs::write(&path, id.to_string()).map_err(|e| Error::io("set the next SysV id", &path, e))
}

/// Checks the object just made got `wanted`, removing it otherwise.
fn got_id(kind: &'static str, got: i32, wanted: i32, remove: impl FnOnce(i32)) -> Result<()> {
    if got < 0 {
        return Err(Error::io(
            kind,
            format!("SysV object {wanted}"),
            std::io::Error::last_os_error(),
        ));
    }
    if got != wanted {
        remove(got);
        return Err(Error::io(
            kind,
            format!("SysV object {wanted}"),
            std::io::Error::other(format!("the kernel gave id {got}")),
        ));
    }
    Ok(())
}

fn set_owner(perm: &mut libc::ipc_perm, p: &Perm) {
    perm.uid = p.uid;
    perm.gid = p.gid;
    perm.mode = (p.mode & 0o777) as libc::c_ushort;
}

fn restore_here(state: &SysvState, data: &[PathBuf], made: &mut Created) -> Result<()> {
    for (s, path) in state.shm.iter().zip(data) {
        let p = &s.perm;
        next_id("shm", p.id)?;
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | p.mode as libc::c_int;
        // SAFETY: shmget takes plain integers.
        let got = unsafe { libc::shmget(p.key, s.size as usize, flags) };
        got_id("create a SysV segment", got, p.id, |id| {
            // SAFETY: removing the segment just made.
            unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        })?;
        made.shm.push(p.id);
        // SAFETY: attaching the segment just made, read-write, where the kernel chooses.
        let addr = unsafe { libc::shmat(p.id, std::ptr::null(), 0) };
        if addr as isize == -1 {
            return Err(last_error("attach a SysV segment", p.id));
        }
        // SAFETY: the mapping is `size` bytes long and writable until the shmdt below.
        let bytes = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), s.size as usize) };
        let filled = File::open(path)
            .and_then(|mut f| f.read_exact(bytes))
            .map_err(|e| Error::io("fill a SysV segment", path, e));
        // SAFETY: `addr` came from shmat above and is no longer used.
        unsafe { libc::shmdt(addr) };
        filled?;
        // SAFETY: a zeroed shmid_ds, then IPC_STAT fills it and IPC_SET reads it.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: `ds` is a valid buffer for both calls.
        if unsafe { libc::shmctl(p.id, libc::IPC_STAT, &mut ds) } != 0 {
            return Err(last_error("read a SysV segment", p.id));
        }
        set_owner(&mut ds.shm_perm, p);
        // SAFETY: as above.
        if unsafe { libc::shmctl(p.id, libc::IPC_SET, &mut ds) } != 0 {
            return Err(last_error("set a SysV segment's owner", p.id));
        }
    }
    for s in &state.sem {
        let p = &s.perm;
        next_id("sem", p.id)?;
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | p.mode as libc::c_int;
        // SAFETY: semget takes plain integers.
        let got = unsafe { libc::semget(p.key, s.values.len() as libc::c_int, flags) };
        got_id("create a SysV semaphore set", got, p.id, |id| {
            // SAFETY: removing the set just made.
            unsafe { libc::semctl(id, 0, libc::IPC_RMID) };
        })?;
        made.sem.push(p.id);
        let mut values = s.values.clone();
        // SAFETY: SETALL reads one unsigned short per semaphore of the set.
        if unsafe { libc::semctl(p.id, 0, libc::SETALL, values.as_mut_ptr()) } != 0 {
            return Err(last_error("set SysV semaphore values", p.id));
        }
        // SAFETY: a zeroed semid_ds, filled by IPC_STAT and read by IPC_SET.
        let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT and IPC_SET take a pointer to a semid_ds.
        if unsafe { libc::semctl(p.id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) } != 0 {
            return Err(last_error("read a SysV semaphore set", p.id));
        }
        set_owner(&mut ds.sem_perm, p);
        // SAFETY: as above.
        if unsafe { libc::semctl(p.id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) } != 0 {
            return Err(last_error("set a SysV semaphore set's owner", p.id));
        }
    }
    for q in &state.msg {
        let p = &q.perm;
        next_id("msg", p.id)?;
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | p.mode as libc::c_int;
        // SAFETY: msgget takes plain integers.
        let got = unsafe { libc::msgget(p.key, flags) };
        got_id("create a SysV message queue", got, p.id, |id| {
            // SAFETY: removing the queue just made.
            unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        })?;
        made.msg.push(p.id);
        // The limit first, so messages the old queue held fit in the new one.
        // SAFETY: a zeroed msqid_ds, filled by IPC_STAT and read by IPC_SET.
        let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: `ds` is a valid buffer for both calls.
        if unsafe { libc::msgctl(p.id, libc::IPC_STAT, &mut ds) } != 0 {
            return Err(last_error("read a SysV message queue", p.id));
        }
        set_owner(&mut ds.msg_perm, p);
        ds.msg_qbytes = q.qbytes as libc::msglen_t;
        // SAFETY: as above.
        if unsafe { libc::msgctl(p.id, libc::IPC_SET, &mut ds) } != 0 {
            return Err(last_error("set a SysV message queue's owner and limit", p.id));
        }
        for m in &q.messages {
            let text = hex::decode(&m.text)
                .map_err(|e| Error::io("decode a message", "sysv", std::io::Error::other(e)))?;
            let mut buf = Vec::with_capacity(std::mem::size_of::<libc::c_long>() + text.len());
            buf.extend_from_slice(&(m.mtype as libc::c_long).to_ne_bytes());
            buf.extend_from_slice(&text);
            // SAFETY: `buf` is an mtype followed by `text.len()` bytes.
            if unsafe { libc::msgsnd(p.id, buf.as_ptr().cast(), text.len(), libc::IPC_NOWAIT) } != 0 {
                return Err(last_error("queue a SysV message", p.id));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
