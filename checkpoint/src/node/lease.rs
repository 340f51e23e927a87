//! Leases: which checkpoints are in use. A pod restored from a checkpoint of the node's root
//! (kubelet's path, and `podsnap restore`, which goes through it) reads the checkpoint at each
//! of its containers' Create and Start; its shim holds a *lease* on the checkpoint for as long
//! as the shim runs (the pod's life), and `podsnap rm` and retention ([`crate::node::retention`])
//! leave a leased checkpoint alone.
//!
//! ```text
//! /run/podsnap/leases/                   0700; a tmpfs: gone at reboot, as every pod is
//!   <encoded checkpoint path>/           0700, one per checkpoint in use
//!     <sandbox id>                       0600, one per pod restored from it, written atomically
//!       { "sandbox_id", "pod", "checkpoint", "owner_pid", "owner_start" }
//!     <sandbox id>.lazy-pages.<container> 0600, one per lazy-pages daemon of a lazy restore
//!       { ..., "lazy_pages_of": "<container id>" }  owned by the daemon, not the shim
//! ```
//!
//! A lazy restore's `criu lazy-pages` daemon reads the checkpoint's page images after the
//! restore is over, until every page is back; its lease is owned by the daemon's own pid, so
//! it lasts exactly as long as the daemon, even past a shim that died.
//!
//! - **Key.** The checkpoint's resolved absolute path (several roots on one host never mix),
//!   encoded into one file name ([`encode`]): every byte outside `[A-Za-z0-9._-]` becomes
//!   `%XX`, so `/` is `%2F` and the name always starts with `%2F`; a path whose encoding is
//!   longer than a file name may be (or is empty, `.` or `..`: never a resolved path's) is
//!   `sha256-<hex digest of the path>` instead.
//! - **Taken** by the pod's shim when it first plans a restore from the checkpoint (the
//!   sandbox's Create), before it reads anything of it; **released** when the shim exits, or
//!   at once when the sandbox's restore is refused.
//! - **Live** while its owner runs: the owner's pid *and* its start time, so a reused pid does
//!   not keep a lease; a zombie counts as dead. A lease whose owner is gone (a killed shim) is
//!   stale: ignored, and removed by whoever reads it. A lease file that does not parse is
//!   removed too (leases are written whole, by rename).
//! - **Races with a removal** ([`crate::node::store::remove`]): the remover checks for leases,
//!   renames the checkpoint away, checks again and puts it back if a lease appeared meanwhile;
//!   the shim takes its lease, then checks that the checkpoint is still where it was. Either
//!   the remover sees the lease, or the shim no longer finds the checkpoint: a restore never
//!   runs from a checkpoint that is being removed.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Where leases live.
pub const LEASE_DIR: &str = "/run/podsnap/leases";
/// The largest lease file read back.
const MAX_LEASE_BYTES: u64 = 64 * 1024;
/// The longest file name Linux filesystems take.
const NAME_MAX: usize = 255;
/// How often taking a lease is tried when a sweep removes its (empty) directory meanwhile.
const TAKE_ATTEMPTS: usize = 5;

/// Who holds a lease: a pod restored from the checkpoint, through its shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The restored pod's sandbox id (the lease file's name).
    pub sandbox_id: String,
    /// `namespace/name` of the pod, when known.
    pub pod: Option<String>,
    /// The checkpoint's resolved path.
    pub checkpoint: PathBuf,
    /// The process holding the lease (the pod's shim) and its start time.
    pub owner_pid: u32,
    pub owner_start: u64,
    /// The container whose lazy-pages daemon (the owner) serves its memory from the
    /// checkpoint; `None` for the pod's own lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_pages_of: Option<String>,
}

impl Holder {
    /// This process holding a lease on `checkpoint` for pod `sandbox_id`.
    pub fn this_process(sandbox_id: &str, pod: Option<String>, checkpoint: &Path) -> Self {
        let (owner_pid, owner_start) = crate::fs::proc::this_process();
        Self {
            sandbox_id: sandbox_id.to_owned(),
            pod,
            checkpoint: checkpoint.to_path_buf(),
            owner_pid,
            owner_start,
            lazy_pages_of: None,
        }
    }

    /// The lazy-pages daemon `pid` serving container `container`'s memory from `checkpoint`
    /// for pod `sandbox_id`; `None` when `pid` is not a live process.
    pub fn lazy_pages(
        sandbox_id: &str,
        pod: Option<String>,
        checkpoint: &Path,
        pid: u32,
        container: &str,
    ) -> Option<Self> {
        Some(Self {
            sandbox_id: sandbox_id.to_owned(),
            pod,
            checkpoint: checkpoint.to_path_buf(),
            owner_pid: pid,
            owner_start: crate::fs::proc::start_time(pid)?,
            lazy_pages_of: Some(container.to_owned()),
        })
    }

    /// The lease file's name: the sandbox id, or for a lazy-pages daemon the sandbox id and
    /// (the start of) its container's id.
    fn file_name(&self) -> String {
        match &self.lazy_pages_of {
            None => self.sandbox_id.clone(),
            Some(c) => format!("{}.lazy-pages.{}", self.sandbox_id, c.get(..12).unwrap_or(c)),
        }
    }

    /// Whether the lease's owner still runs.
    pub fn alive(&self) -> bool {
        crate::fs::proc::alive(self.owner_pid, self.owner_start)
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = self.sandbox_id.get(..13).unwrap_or(&self.sandbox_id);
        match &self.pod {
            Some(pod) => write!(f, "pod {pod} (sandbox {short})")?,
            None => write!(f, "sandbox {short}")?,
        }
        match &self.lazy_pages_of {
            Some(c) => write!(
                f,
                " through the lazy-pages daemon of container {} (pid {})",
                c.get(..13).unwrap_or(c),
                self.owner_pid
            ),
            None => Ok(()),
        }
    }
}

/// The lease directory name of the checkpoint at `checkpoint` (a resolved absolute path).
pub fn encode(checkpoint: &Path) -> String {
    let bytes = checkpoint.as_os_str().as_encoded_bytes();
    let mut out = String::with_capacity(bytes.len() + 16);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // Too long for a file name, or not one entry of the lease directory (never an absolute
    // path's encoding, which starts with `%2F`).
    if out.len() > NAME_MAX || matches!(out.as_str(), "" | "." | "..") {
        return format!("sha256-{}", hex::encode(Sha256::digest(bytes)));
    }
    out
}

/// The directory of the leases on `checkpoint` under `base`.
fn leases_of(base: &Path, checkpoint: &Path) -> PathBuf {
    base.join(encode(checkpoint))
}

/// A lease held by this process; removed when dropped. The shim keeps its leases for its
/// whole life (a process that exits drops nothing: see [`release_own`]).
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
}

impl Drop for Lease {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                if let Some(dir) = self.path.parent() {
                    // Only when empty; another pod's lease keeps it.
                    let _ = std::fs::remove_dir(dir);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("release the lease {}: {e}", self.path.display()),
        }
    }
}

/// Takes a lease for `holder` on `holder.checkpoint` under `base` (normally [`LEASE_DIR`]).
pub fn take(base: &Path, holder: &Holder) -> Result<Lease> {
    let id = &holder.file_name();
    let valid = !id.is_empty()
        && id.len() <= NAME_MAX
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let dir = leases_of(base, &holder.checkpoint);
    if !valid {
        return Err(Error::io(
            "take a lease on a checkpoint",
            &dir,
            std::io::Error::other(format!("{id:?} is not a sandbox id")),
        ));
    }
    let json = serde_json::to_vec_pretty(holder)
        .map_err(|e| Error::io("encode a checkpoint lease", &dir, e.into()))?;
    let mut last = None;
    for _ in 0..TAKE_ATTEMPTS {
        crate::fs::private::create_private_dir(&dir)?;
        let path = dir.join(id);
        let tmp = dir.join(format!(".{id}.tmp-{}", std::process::id()));
        // A sweep may remove the directory while it is empty: then try again.
        match crate::fs::private::write_private(&tmp, &json)
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| Error::io("write a lease", &path, e)))
        {
            Ok(()) => return Ok(Lease { path }),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                last = Some(source);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
    }
    Err(Error::io(
        "take a lease on a checkpoint",
        &dir,
        last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound)),
    ))
}

/// The live holders of leases on `checkpoint` (a resolved absolute path); stale leases found
/// on the way are removed.
pub fn holders(base: &Path, checkpoint: &Path) -> Result<Vec<Holder>> {
    let dir = leases_of(base, checkpoint);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read the leases of a checkpoint", &dir, e)),
    };
    let mut live = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("read the leases of a checkpoint", &dir, e))?;
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue; // a lease being written
        }
        if let Some(holder) = read_live(&entry.path()) {
            live.push(holder);
        }
    }
    if live.is_empty() {
        let _ = std::fs::remove_dir(&dir);
    }
    live.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
    Ok(live)
}

/// The lease at `path` when its owner lives; a stale or unreadable lease is removed.
fn read_live(path: &Path) -> Option<Holder> {
    let bytes = match crate::fs::read::read_capped(path, MAX_LEASE_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!("lease {} is unreadable ({e}): removed", path.display());
            let _ = std::fs::remove_file(path);
            return None;
        }
    };
    match serde_json::from_slice::<Holder>(&bytes) {
        Ok(holder) if holder.alive() => Some(holder),
        Ok(holder) => {
            log::info!(
                "lease of {} on {} is stale (its shim, pid {}, is gone): removed",
                holder,
                holder.checkpoint.display(),
                holder.owner_pid
            );
            let _ = std::fs::remove_file(path);
            None
        }
        Err(e) => {
            log::warn!("lease {} does not parse ({e}): removed", path.display());
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

/// Removes every lease this process holds (the shim, as it exits); returns how many.
pub fn release_own(base: &Path) -> usize {
    let (pid, start) = crate::fs::proc::this_process();
    sweep(base, |h| h.owner_pid == pid && h.owner_start == start)
}

/// Removes every stale lease (owner gone) under `base`; returns how many.
pub fn prune(base: &Path) -> usize {
    sweep(base, |h| !h.alive())
}

/// Removes the leases under `base` that `drop_it` picks, and lease directories left empty.
fn sweep(base: &Path, drop_it: impl Fn(&Holder) -> bool) -> usize {
    let Ok(dirs) = std::fs::read_dir(base) else {
        return 0;
    };
    let mut removed = 0;
    for dir in dirs.flatten() {
        let Ok(files) = std::fs::read_dir(dir.path()) else {
            continue;
        };
        for file in files.flatten() {
            if file.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let path = file.path();
            let holder = crate::fs::read::read_capped(&path, MAX_LEASE_BYTES)
                .ok()
                .and_then(|b| serde_json::from_slice::<Holder>(&b).ok());
            // An unparseable lease file is nobody's: dropped as stale.
            if holder.as_ref().is_none_or(&drop_it) && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        let _ = std::fs::remove_dir(dir.path());
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inverse of [`encode`] for names that are not digests.
    fn decode(name: &str) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStringExt;
        let b = name.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
    }

    #[test]
    fn names_encode_to_one_safe_file_name_and_back() {
        for path in [
            "/var/lib/podsnap/checkpoints/default-web-20261201T100000Z",
            "/r/team-a/nightly",
            "/r/team-a%2Fnightly",
            "/r/with space/ünïcode",
            "/r/a.b_c-d",
        ] {
            let name = encode(Path::new(path));
            assert!(name.starts_with("%2F"), "{name}");
            assert!(!name.contains('/') && name != "." && name != "..", "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b)),
                "{name}"
            );
            assert_eq!(decode(&name).as_deref(), Some(Path::new(path)), "{name}");
        }
        assert_ne!(
            encode(Path::new("/r/a/b")),
            encode(Path::new("/r/a%2Fb")),
            "'%' is escaped too: no two paths share a name"
        );
        let long = format!("/r/{}", "x".repeat(300));
        let name = encode(Path::new(&long));
        assert!(name.starts_with("sha256-") && name.len() == 71, "{name}");
        assert_ne!(name, encode(Path::new(&format!("{long}y"))));
    }

    #[test]
    fn a_lease_lives_with_its_owner_and_goes_with_its_guard() {
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().join("leases");
        let ckpt = t.path().join("root/ckpt");
        let lease = take(
            &base,
            &Holder::this_process("sb1", Some("default/web".into()), &ckpt),
        )
        .expect("take");
        let held = holders(&base, &ckpt).expect("holders");
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].sandbox_id, "sb1");
        assert_eq!(held[0].to_string(), "pod default/web (sandbox sb1)");
        assert!(holders(&base, &t.path().join("root/other"))
            .expect("none")
            .is_empty());
        drop(lease);
        assert!(holders(&base, &ckpt).expect("holders").is_empty());
        assert!(!base.join(encode(&ckpt)).exists(), "the empty directory goes");
    }

    #[test]
    fn dead_owners_reused_pids_and_garbage_are_stale() {
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().join("leases");
        let ckpt = t.path().join("root/ckpt");
        let mut dead = Holder::this_process("sb-dead", None, &ckpt);
        dead.owner_pid = u32::MAX - 1;
        let mut reused = Holder::this_process("sb-reused", None, &ckpt);
        reused.owner_start += 1; // this pid, but another process's start time
        let live = Holder::this_process("sb-live", None, &ckpt);
        for h in [&dead, &reused, &live] {
            std::mem::forget(take(&base, h).expect("take"));
        }
        std::fs::write(base.join(encode(&ckpt)).join("sb-garbage"), b"{").expect("garbage");
        let held = holders(&base, &ckpt).expect("holders");
        assert_eq!(held, std::slice::from_ref(&live));
        let left: Vec<_> = std::fs::read_dir(base.join(encode(&ckpt)))
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["sb-live"], "stale leases were removed");
        assert_eq!(prune(&base), 0, "the live one stays");
        assert_eq!(release_own(&base), 1);
        assert!(holders(&base, &ckpt).expect("holders").is_empty());
        assert!(
            std::fs::read_dir(&base).expect("base").next().is_none(),
            "nothing left"
        );
    }

    #[test]
    fn a_zombie_holds_nothing() {
        // A child that exited and is not reaped yet.
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        let start = (0..200)
            .find_map(|_| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let rest = &stat[stat.rfind(')')? + 2..];
                let fields: Vec<&str> = rest.split(' ').collect();
                if fields.first() == Some(&"Z") {
                    return fields.get(19)?.parse::<u64>().ok();
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
                None
            })
            .expect("the child turns into a zombie");
        assert!(!crate::fs::proc::alive(pid, start), "a zombie is dead");
        child.wait().expect("reap");
    }

    #[test]
    fn a_lazy_pages_daemon_holds_its_own_lease_for_as_long_as_it_runs() {
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().join("leases");
        let ckpt = t.path().join("root/ckpt");
        let pod = take(
            &base,
            &Holder::this_process("sb1", Some("default/web".into()), &ckpt),
        )
        .expect("the pod's lease");
        let mut daemon = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn");
        let container = "0123456789abcdef0123";
        let holder = Holder::lazy_pages("sb1", Some("default/web".into()), &ckpt, daemon.id(), container)
            .expect("a live process");
        let lease = take(&base, &holder).expect("the daemon's lease");
        let held = holders(&base, &ckpt).expect("holders");
        assert_eq!(held.len(), 2, "{held:?}");
        let shown: Vec<String> = held.iter().map(Holder::to_string).collect();
        assert!(
            shown.contains(&format!(
                "pod default/web (sandbox sb1) through the lazy-pages daemon of container \
                 0123456789abc (pid {})",
                daemon.id()
            )),
            "{shown:?}"
        );
        assert!(base
            .join(encode(&ckpt))
            .join("sb1.lazy-pages.0123456789ab")
            .exists());
        // The shim exiting releases its own lease, not the daemon's.
        assert_eq!(release_own(&base), 1);
        assert_eq!(holders(&base, &ckpt).expect("holders"), [holder]);
        // A daemon that died (unreaped or gone) holds nothing.
        daemon.kill().expect("kill");
        daemon.wait().expect("reap");
        assert!(holders(&base, &ckpt).expect("holders").is_empty());
        drop(lease);
        drop(pod);
        assert!(Holder::lazy_pages("sb1", None, &ckpt, u32::MAX - 1, container).is_none());
    }

    #[test]
    fn bad_sandbox_ids_are_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        for id in ["", "../x", ".hidden", "a/b"] {
            let h = Holder::this_process(id, None, &t.path().join("ckpt"));
            assert!(take(t.path(), &h).is_err(), "{id:?}");
        }
    }
}

#[cfg(test)]
mod proptests;
