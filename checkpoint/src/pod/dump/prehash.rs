//! Digests of CRIU's page images computed while the dump writes them.
//!
//! A pod dump digests every file of the checkpoint for its manifest; nearly all of the bytes are
//! the containers' memory, `pages-*.img`. Watching each container's images directory (inotify), a
//! page image is followed from the moment CRIU creates it: a thread of a pool of one per core (at
//! most [`MAX_THREADS`]; page images queue for them in the order CRIU created them, however many
//! processes the pod has) reads what CRIU has appended so far (CRIU only ever appends to a page
//! image, by `splice`), hashes it, and waits for more, until CRIU closes the file and every byte is
//! read. So the digest of the last page image is ready moments after CRIU closes it, instead of a
//! whole file's read and hash later (50 ms for 256 MiB on one core here), when the dumps leave a
//! CPU idle. A CRIU writes one page image at a time, so the followers that wait for more are at
//! most one per CRIU. While the pod is frozen the hashing runs in the idle scheduling class
//! (`SCHED_IDLE`), on whatever CPU the dumps leave idle, so that it lengthens the frozen window as
//! little as it can; once the dump waits for it, it runs in the normal class. The manifest takes
//! such a digest only if the file is exactly as it was when its last byte was hashed (device,
//! inode, size, times) and the size is what was hashed; anything else is hashed again.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::format::manifest::{DigestAlgorithm, FileDigest};
use crate::fs::fingerprint::{fingerprint, Fingerprint};

/// A digest taken early, and what the file looked like then.
#[derive(Debug, Clone)]
pub struct Prehashed {
    pub digest: FileDigest,
    fingerprint: Fingerprint,
}

impl Prehashed {
    /// Whether `path` is still the file that was hashed.
    pub fn holds_for(&self, path: &Path) -> bool {
        fingerprint(path).is_ok_and(|f| f == self.fingerprint)
    }
}

/// The most threads hashing closed page images for one dump.
pub const MAX_THREADS: usize = 8;

/// How long a follower that caught up with CRIU waits before it reads again.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(2);

/// The watcher: a thread reading inotify events and queueing each page image closed to a pool
/// of [`Prehash::threads`] threads.
pub struct Prehash {
    stop: Arc<AtomicBool>,
    /// Set when the dump waits for the digests: they run at normal priority from then on.
    urgent: Arc<AtomicBool>,
    /// Ends once every queued page image is hashed (or skipped, for a dump that failed) and
    /// its inotify descriptor is closed.
    watcher: Option<std::thread::JoinHandle<()>>,
    /// Told once every queued page image is hashed: the watcher's descriptor may still be
    /// closing.
    finished: std::sync::mpsc::Receiver<()>,
    done: Arc<Mutex<HashMap<PathBuf, Prehashed>>>,
    threads: usize,
}

impl Prehash {
    /// Watches `dirs` (each container's CRIU images directory, made already). `None` when
    /// inotify is not available: everything is then hashed after the thaw, as before.
    pub fn start(dirs: &[PathBuf]) -> Option<Prehash> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .inspect_err(|e| log::debug!("no early digests (inotify: {e})"))
            .ok()?;
        let mut watched = HashMap::new();
        for d in dirs {
            match inotify.add_watch(d, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_CLOSE_WRITE) {
                Ok(wd) => {
                    watched.insert(wd, d.clone());
                }
                Err(e) => log::debug!("no early digests for {} ({e})", d.display()),
            }
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS));
        let pool = rayon_core::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("prehash-{i}"))
            .build()
            .inspect_err(|e| log::debug!("no early digests (thread pool: {e})"))
            .ok()?;
        let stop = Arc::new(AtomicBool::new(false));
        let urgent = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(HashMap::new()));
        let (stop_w, urgent_w, done_w) = (stop.clone(), urgent.clone(), done.clone());
        let (finished_tx, finished) = std::sync::mpsc::channel();
        let watcher = std::thread::Builder::new()
            .name("prehash".into())
            .spawn(move || {
                // Returns once every page image queued to the pool is done.
                pool.in_place_scope_fifo(|hashing| {
                    watch(&inotify, watched, &stop_w, &urgent_w, &done_w, hashing)
                });
                // Every digest is in: the dump goes on, while the inotify descriptor closes here
                // (a close waits for the kernel's grace period: milliseconds).
                let _ = finished_tx.send(());
                drop(inotify);
            })
            .inspect_err(|e| log::debug!("no early digests (thread: {e})"))
            .ok()?;
        log::debug!("page images are digested as CRIU writes them, on {threads} threads");
        Some(Prehash {
            stop,
            urgent,
            watcher: Some(watcher),
            finished,
            done,
            threads,
        })
    }

    /// How many threads hash page images.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Stops watching, waits for the digests under way and queued, and returns them by path.
    pub fn finish(mut self) -> HashMap<PathBuf, Prehashed> {
        self.urgent.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        // Told when every digest is in (or the watcher is gone), not when its thread ends.
        let _ = self.finished.recv();
        drop(self.watcher.take());
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Prehash {
    fn drop(&mut self) {
        // A dump that failed: the watcher ends at its next poll, the pool skips what is queued.
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn watch<'s>(
    inotify: &Inotify,
    watched: HashMap<nix::sys::inotify::WatchDescriptor, PathBuf>,
    stop: &'s AtomicBool,
    urgent: &'s AtomicBool,
    done: &'s Mutex<HashMap<PathBuf, Prehashed>>,
    hashing: &rayon_core::ScopeFifo<'s>,
) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // Each page image created, and whether CRIU closed it.
    let mut followed: HashMap<PathBuf, Arc<AtomicBool>> = HashMap::new();
    // Events already queued when asked to stop are still taken: a page image closed just
    // before the last dump ended is hashed here, not again after the thaw.
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(if stopping { 0u8 } else { 20u8 })).unwrap_or(0);
        if ready == 0 {
            if stopping {
                break;
            }
            continue;
        }
        for event in inotify.read_events().unwrap_or_default() {
            let (Some(dir), Some(name)) = (watched.get(&event.wd), event.name) else {
                continue;
            };
            let name = name.to_string_lossy();
            if !(name.starts_with("pages-") && name.ends_with(".img")) {
                continue;
            }
            let path = dir.join(name.as_ref());
            if event.mask.contains(AddWatchFlags::IN_CREATE) {
                let closed = followed.entry(path.clone()).or_default().clone();
                hashing.spawn_fifo(move |_| follow(&path, &closed, stop, urgent, done));
            } else if let Some(closed) = followed.get(&path) {
                closed.store(true, Ordering::SeqCst);
            } else {
                // Closed, never seen created (made before the watch): hashed as it is.
                hashing.spawn_fifo(move |_| {
                    // Stopped without being waited for: the dump failed, its output goes.
                    if stop.load(Ordering::SeqCst) && !urgent.load(Ordering::SeqCst) {
                        return;
                    }
                    hash_one(&path, urgent, done)
                });
            }
        }
    }
    // Asked to stop: every CRIU has ended (or the dump failed), nothing writes any more.
    for closed in followed.values() {
        closed.store(true, Ordering::SeqCst);
    }
}

/// Follows the page image at `path` while CRIU appends to it (see the module documentation),
/// and records its digest once `closed` is set and every byte is read.
fn follow(
    path: &Path,
    closed: &AtomicBool,
    stop: &AtomicBool,
    urgent: &AtomicBool,
    done: &Mutex<HashMap<PathBuf, Prehashed>>,
) {
    use std::io::Read;
    if DigestAlgorithm::WRITTEN != DigestAlgorithm::Blake3 || !make_private(path) {
        return;
    }
    let Ok(mut f) = std::fs::File::open(path) else {
        return;
    };
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut polite = !urgent.load(Ordering::SeqCst);
    if polite {
        set_idle(true);
    }
    let digest = loop {
        if stop.load(Ordering::SeqCst) && !urgent.load(Ordering::SeqCst) {
            break None; // the dump failed
        }
        if polite && urgent.load(Ordering::SeqCst) {
            set_idle(false);
            polite = false;
        }
        // Looked at before the read: a read that finds nothing more after the close is the end.
        let was_closed = closed.load(Ordering::SeqCst);
        match f.read(&mut buf) {
            Ok(0) if was_closed => break Some(h.finalize().to_hex().to_string()),
            Ok(0) => std::thread::sleep(FOLLOW_POLL),
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break None,
        }
    };
    if polite {
        set_idle(false);
    }
    let Some(digest) = digest else { return };
    // The file as the last byte was read; anything written since shows in its times or size.
    let Ok(after) = fingerprint(path) else { return };
    if after[2] as u64 != total {
        return;
    }
    done.lock().unwrap_or_else(|e| e.into_inner()).insert(
        path.to_path_buf(),
        Prehashed {
            digest: FileDigest { size: total, digest },
            fingerprint: after,
        },
    );
}

/// Makes the page image at `path` private (as the manifest's digests leave every file; a mode
/// change later would change its times): whether it is a regular file, private now.
fn make_private(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| {
        m.file_type().is_file()
            && (m.permissions().mode() & 0o7777 == 0o600
                || std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).is_ok())
    })
}

/// Hashes one closed page image: made private first (as the manifest's digests leave every
/// file; a mode change later would change its times), recorded only if it did not change while
/// it was read.
fn hash_one(path: &Path, urgent: &AtomicBool, done: &Mutex<HashMap<PathBuf, Prehashed>>) {
    if DigestAlgorithm::WRITTEN != DigestAlgorithm::Blake3 || !make_private(path) {
        return;
    }
    let Ok(before) = fingerprint(path) else { return };
    let Some(digest) = blake3_politely(path, urgent) else {
        return;
    };
    if fingerprint(path).ok() != Some(before) {
        return;
    }
    let size = before[2] as u64;
    done.lock().unwrap_or_else(|e| e.into_inner()).insert(
        path.to_path_buf(),
        Prehashed {
            digest: FileDigest { size, digest },
            fingerprint: before,
        },
    );
}

/// Puts this thread in the idle scheduling class (it runs only on a CPU nothing else wants), or
/// back in the normal one.
fn set_idle(idle: bool) {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle { libc::SCHED_IDLE } else { libc::SCHED_OTHER };
    // SAFETY: a plain system call on this thread (0), with a valid parameter.
    unsafe {
        libc::sched_setscheduler(0, policy, &param);
    }
}

/// The BLAKE3 of `path` on this one thread, in the idle class until `urgent`.
fn blake3_politely(path: &Path, urgent: &AtomicBool) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut polite = !urgent.load(Ordering::SeqCst);
    if polite {
        set_idle(true);
    }
    loop {
        if polite && urgent.load(Ordering::SeqCst) {
            set_idle(false);
            polite = false;
        }
        let n = crate::fs::read::read_full(&mut f, &mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    if polite {
        set_idle(false);
    }
    Some(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_images_closed_while_watched_are_hashed_and_reused_only_unchanged() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("checkpoint");
        std::fs::create_dir(&dir).expect("mkdir");
        let pre = Prehash::start(std::slice::from_ref(&dir)).expect("inotify");
        std::fs::write(dir.join("pages-1.img"), vec![7u8; 3 << 20]).expect("write");
        std::fs::write(dir.join("pages-2.img"), b"later changed").expect("write");
        std::fs::write(dir.join("core-1.img"), b"not a page image").expect("write");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let done = pre.finish();
        assert_eq!(done.len(), 2, "{:?}", done.keys().collect::<Vec<_>>());
        let one = &done[&dir.join("pages-1.img")];
        assert_eq!(one.digest.size, 3 << 20);
        assert_eq!(
            one.digest.digest,
            DigestAlgorithm::WRITTEN
                .file(&dir.join("pages-1.img"))
                .expect("digest")
        );
        assert!(one.holds_for(&dir.join("pages-1.img")));
        // Hashed private, so the dump's own chmod later changes nothing.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("pages-1.img"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.join("pages-2.img"), b"changed").expect("rewrite");
        assert!(!done[&dir.join("pages-2.img")].holds_for(&dir.join("pages-2.img")));
    }

    /// A page image written in pieces, with pauses, as CRIU appends to it: followed from its
    /// creation, its digest is that of the whole file once closed.
    #[test]
    fn a_page_image_followed_while_written_gets_the_digest_of_the_whole_file() {
        use std::io::Write;
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("images");
        std::fs::create_dir(&dir).expect("mkdir");
        let pre = Prehash::start(std::slice::from_ref(&dir)).expect("inotify");
        let path = dir.join("pages-9.img");
        let mut f = std::fs::File::create(&path).expect("create");
        for i in 0..5u8 {
            f.write_all(&vec![i; (1 << 20) + 4096 * usize::from(i)])
                .expect("write");
            f.flush().expect("flush");
            // The follower catches up and waits for more.
            std::thread::sleep(std::time::Duration::from_millis(15));
        }
        drop(f);
        let done = pre.finish();
        let got = &done[&path];
        assert_eq!(
            got.digest.digest,
            DigestAlgorithm::WRITTEN.file(&path).expect("digest"),
            "the digest of every byte"
        );
        assert_eq!(got.digest.size, std::fs::metadata(&path).expect("stat").len());
        assert!(got.holds_for(&path));
    }

    /// A dump that failed: the followers stop without a digest and `finish` is not waited
    /// on for a file that is never closed.
    #[test]
    fn a_follower_of_a_failed_dump_stops() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("images");
        std::fs::create_dir(&dir).expect("mkdir");
        let pre = Prehash::start(std::slice::from_ref(&dir)).expect("inotify");
        let path = dir.join("pages-1.img");
        let f = std::fs::File::create(&path).expect("create");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let stop = pre.stop.clone();
        let watcher = {
            let mut pre = pre;
            pre.watcher.take().expect("running")
        };
        assert!(stop.load(Ordering::SeqCst), "dropped: stopped");
        watcher
            .join()
            .expect("the watcher and its followers end though the file stays open");
        drop(f);
    }
}
