//! CRIU's cache of what the kernel can do, on nodes whose `/run` is not a tmpfs.
//!
//! Every CRIU run first probes the kernel's features (about 30 ms of forks and test syscalls
//! here), unless it finds them in `/run/criu.kdat`. CRIU writes that file only when `/run` is a
//! tmpfs, so that a reboot (perhaps into another kernel) clears it; it reads it wherever it is.
//! A pod dump runs one CRIU per container, so on a node with a disk-backed `/run` the probing
//! is paid once per container in every dump and every restore.
//!
//! There podsnap keeps the cache itself: CRIU writes it in a private mount namespace with a
//! tmpfs on `/run` (`criu check`), podsnap installs it as `/run/criu.kdat`, and keeps beside it
//! what it was made for (`criu.kdat.podsnap`: boot id, kernel release, the CRIU binary's path,
//! size and time). Before a dump or restore, a cache whose record does not match this boot,
//! kernel and CRIU is removed first, then made again. On a tmpfs `/run` nothing is done: CRIU
//! keeps its cache itself. `PODSNAP_CRIU_KDAT_CACHE=off` in the shim's environment turns this
//! off (a cache already made stays until the next reboot's check removes it).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use podsnap_runtime::launcher::{Capture, Launcher};

use crate::error::{Error, Result};

/// Where CRIU looks for its cache (fixed in CRIU).
pub const RUN_DIR: &str = "/run";
/// CRIU's cache file, in [`RUN_DIR`].
pub const CACHE: &str = "criu.kdat";
/// What podsnap made the cache for, beside it.
pub const RECORD: &str = "criu.kdat.podsnap";
/// Set to `off` to leave CRIU's cache alone.
pub const SWITCH_ENV: &str = "PODSNAP_CRIU_KDAT_CACHE";
/// A cache larger than this is not CRIU's (it is under 1 KiB).
const MAX_CACHE_BYTES: usize = 64 * 1024;

/// What [`ensure`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `/run` is a tmpfs: CRIU keeps its cache itself.
    CriuKeepsIt,
    /// Turned off by [`SWITCH_ENV`].
    Off,
    /// The cache was made for this boot, kernel and CRIU.
    Current,
    /// The cache was (re)made; a stale one was removed first.
    Made,
}

/// Makes sure the CRIU cache in `run_dir` (`/run` for CRIU to find it) is absent or current;
/// makes it when it is not. A failure leaves no cache of another boot, kernel or CRIU behind
/// (CRIU then probes the kernel as without one).
pub async fn ensure(launcher: &dyn Launcher, run_dir: &Path) -> Result<Outcome> {
    if std::env::var(SWITCH_ENV).is_ok_and(|v| v == "off") {
        return Ok(Outcome::Off);
    }
    let fs = nix::sys::statfs::statfs(run_dir)
        .map_err(|e| Error::io("check the file system of CRIU's cache", run_dir, e.into()))?;
    if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
        return Ok(Outcome::CriuKeepsIt);
    }
    // One at a time in this process (a shim's dump and restores may come at once).
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    let (cache, record) = (run_dir.join(CACHE), run_dir.join(RECORD));
    let wanted = key()?;
    if std::fs::read_to_string(&record).is_ok_and(|r| r == wanted) && cache.is_file() {
        return Ok(Outcome::Current);
    }
    // Not made for this boot, kernel and CRIU (or by someone else): gone before anything else.
    for path in [&record, &cache] {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io("remove a stale CRIU cache", path, e))
            }
            _ => {}
        }
    }
    let bytes = generate(launcher).await?;
    install(&cache, &bytes)?;
    install(&record, wanted.as_bytes())?;
    Ok(Outcome::Made)
}

/// [`ensure`] for `/run`, its outcome logged; never fails (CRIU works without the cache).
pub async fn ensure_logged(launcher: &dyn Launcher) {
    match ensure(launcher, Path::new(RUN_DIR)).await {
        Ok(Outcome::Made) => log::info!("CRIU's kernel feature cache made: {RUN_DIR}/{CACHE}"),
        Ok(_) => {}
        Err(e) => log::warn!("CRIU's kernel feature cache: {e}; CRIU probes the kernel each run"),
    }
}

/// What a cache is made for: this boot, this kernel, this CRIU binary.
fn key() -> Result<String> {
    let boot_path = "/proc/sys/kernel/random/boot_id";
    let boot = std::fs::read_to_string(boot_path).map_err(|e| Error::io("read the boot id", boot_path, e))?;
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .map_err(|e| Error::io("read the kernel release", "uname", e.into()))?;
    let criu = criu_binary().ok_or_else(|| {
        Error::io(
            "find criu",
            "PATH",
            std::io::Error::new(std::io::ErrorKind::NotFound, "no criu on PATH"),
        )
    })?;
    let meta = std::fs::metadata(&criu).map_err(|e| Error::io("read criu's metadata", &criu, e))?;
    Ok(format!(
        "boot {}\nkernel {release}\ncriu {} {} {}.{}\n",
        boot.trim(),
        criu.display(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

/// The `criu` runc runs: the first on `PATH`.
fn criu_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("criu"))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

/// CRIU's cache as CRIU writes it on a tmpfs `/run` of a mount namespace of its own.
async fn generate(launcher: &dyn Launcher) -> Result<Vec<u8>> {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=1m,mode=0700 podsnap-criu-kdat {RUN_DIR} && \
             {{ criu check >/dev/null 2>&1; exec cat {RUN_DIR}/{CACHE}; }}"
        ))
        .stdin(Stdio::null());
    let what = "make CRIU's kernel feature cache (unshare, criu check)";
    let out = launcher
        .run(cmd, Capture::Output)
        .await
        .map_err(|e| Error::io(what, RUN_DIR, e))?;
    if !out.success() || out.stdout.is_empty() || out.stdout.len() > MAX_CACHE_BYTES {
        let reason = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(Error::io(
            what,
            RUN_DIR,
            std::io::Error::other(format!("exit {}, {} bytes: {reason}", out.code, out.stdout.len())),
        ));
    }
    Ok(out.stdout)
}

/// Writes `path` whole or not at all, 0600.
fn install(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fs::private::replace_private(path, bytes, "write CRIU's kernel feature cache")
}

#[cfg(test)]
mod tests {
    use super::*;
    use podsnap_runtime::launcher::TokioLauncher;

    /// With the real CRIU: made once, then current; remade (the stale one gone first) when its
    /// record is not this boot's; left to CRIU on a tmpfs.
    #[tokio::test]
    async fn the_cache_is_made_once_per_boot_kernel_and_criu() {
        let root = tempfile::tempdir().expect("tempdir");
        let d = root.path();
        if nix::sys::statfs::statfs(d).expect("statfs").filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
            panic!("the test directory {} must not be a tmpfs", d.display());
        }
        assert_eq!(ensure(&TokioLauncher, d).await.expect("made"), Outcome::Made);
        let cache = std::fs::read(d.join(CACHE)).expect("the cache");
        assert!(
            !cache.is_empty() && cache.len() <= MAX_CACHE_BYTES,
            "{}",
            cache.len()
        );
        let mode = std::fs::metadata(d.join(CACHE)).expect("meta").mode() & 0o777;
        assert_eq!(mode, 0o600);
        let record = std::fs::read_to_string(d.join(RECORD)).expect("the record");
        assert_eq!(record, key().expect("key"));
        assert!(record.contains(&format!(
            "kernel {}",
            nix::sys::utsname::uname()
                .expect("uname")
                .release()
                .to_string_lossy()
        )));
        assert_eq!(
            ensure(&TokioLauncher, d).await.expect("current"),
            Outcome::Current
        );

        // Another boot's record: the cache is made again.
        std::fs::write(d.join(RECORD), record.replacen("boot ", "boot 0", 1)).expect("write");
        std::fs::write(d.join(CACHE), b"stale").expect("write");
        assert_eq!(ensure(&TokioLauncher, d).await.expect("remade"), Outcome::Made);
        // CRIU's own cache again (its magic numbers lead; a few bytes differ run to run).
        let again = std::fs::read(d.join(CACHE)).expect("the cache");
        assert_eq!((again.len(), &again[..16]), (cache.len(), &cache[..16]));
        // No record at all (a cache someone else put there): made again too.
        std::fs::remove_file(d.join(RECORD)).expect("rm");
        assert_eq!(ensure(&TokioLauncher, d).await.expect("remade"), Outcome::Made);
        let leftovers: Vec<_> = std::fs::read_dir(d)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != CACHE && n != RECORD)
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        assert_eq!(
            ensure(&TokioLauncher, Path::new("/dev/shm"))
                .await
                .expect("tmpfs"),
            Outcome::CriuKeepsIt
        );
    }

    #[test]
    fn install_replaces_whole_files_and_never_follows_a_symlink_left_beside_them() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = root.path().join(CACHE);
        install(&target, b"one").expect("install");
        install(&target, b"two").expect("replace");
        assert_eq!(std::fs::read(&target).expect("read"), b"two");
        // A symlink at the temporary name an older podsnap used (`.<name>.<pid>`) is not
        // followed: the temporary file is created exclusively, under a name of its own.
        let victim = root.path().join("victim");
        std::fs::write(&victim, b"keep").expect("write");
        let tmp = root.path().join(format!(".{CACHE}.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).expect("symlink");
        install(&target, b"three").expect("replaced beside the symlink");
        assert_eq!(std::fs::read(&victim).expect("read"), b"keep");
        assert_eq!(std::fs::read(&target).expect("read"), b"three");
        assert!(std::fs::symlink_metadata(&target).expect("stat").is_file());
    }
}
