//! Facts of this node a dump records that change only with a binary or a boot: the versions
//! runc and CRIU print, and CRIU's image of the CPU's features. Asking for them costs a pod
//! dump three programs (`runc --version`, `criu --version`, `criu cpuinfo dump`) on its way to
//! the freeze, beside every runc and CRIU of the pod starting; the answers are kept here once.
//!
//! ```text
//! /run/podsnap/facts/                 0700; a tmpfs on most nodes: gone at reboot
//!   version-<key>                     0600, what `<binary> --version` printed
//!   cpuinfo-<key>.img                 0600, `criu cpuinfo dump`'s image
//! ```
//!
//! `<key>` is the BLAKE3 of the binary's path, device, inode, size and times, and of the boot
//! id: a binary replaced (even in place) or a reboot (perhaps onto another CPU) is a new key.
//! A fact that cannot be read or kept is asked for again, as without the cache.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where the facts are kept.
pub const FACTS_DIR: &str = "/run/podsnap/facts";
/// The largest fact read back (a version line, CRIU's CPU image: under 4 KiB).
const MAX_FACT_BYTES: u64 = 64 * 1024;

/// The facts kept in a directory.
#[derive(Debug, Clone)]
pub struct Facts {
    dir: PathBuf,
}

impl Default for Facts {
    fn default() -> Self {
        Self::at(Path::new(FACTS_DIR))
    }
}

impl Facts {
    /// The facts kept in `dir` (made 0700 when one is first kept).
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// The key of the fact `kind` about `binary` (a path, or a name found on `PATH`); `None`
    /// when the binary cannot be found.
    fn key(&self, kind: &str, binary: &Path) -> Option<PathBuf> {
        let path = resolve(binary)?;
        let m = std::fs::metadata(&path).ok()?;
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let mut h = blake3::Hasher::new();
        h.update(
            format!(
                "{}\n{} {} {} {}.{} {}.{}\n{}",
                path.display(),
                m.dev(),
                m.ino(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                boot.trim()
            )
            .as_bytes(),
        );
        let hex = h.finalize().to_hex();
        Some(self.dir.join(format!("{kind}-{}", &hex[..32])))
    }

    /// The fact kept at `at`, if any.
    fn read(at: &Path) -> Option<Vec<u8>> {
        crate::fs::read::read_capped(at, MAX_FACT_BYTES).ok()
    }

    /// Keeps `bytes` at `at` (best effort: a fact not kept is asked for again).
    fn keep(&self, at: &Path, bytes: &[u8]) {
        let kept = crate::fs::private::create_private_dir(&self.dir)
            .and_then(|()| crate::fs::private::replace_private(at, bytes, "keep a fact of the node"));
        if let Err(e) = kept {
            log::debug!("{} not kept: {e}", at.display());
        }
    }

    /// What `binary --version` printed, kept; `ask` runs it when it is not.
    pub async fn version<F>(&self, binary: &Path, ask: F) -> String
    where
        F: std::future::Future<Output = String>,
    {
        let at = self.key("version", binary);
        if let Some(v) = at.as_deref().and_then(Self::read) {
            return String::from_utf8_lossy(&v).into_owned();
        }
        let v = ask.await;
        if let (Some(at), false) = (&at, v.is_empty()) {
            self.keep(at, v.as_bytes());
        }
        v
    }

    /// CRIU's image of the CPU's features (`criu` being `criu`), written into `dest`: the kept
    /// one, or `ask`'s (which writes `dest`), then kept.
    pub async fn cpuinfo<F>(&self, criu: &Path, dest: &Path, ask: F) -> crate::error::Result<()>
    where
        F: std::future::Future<Output = crate::error::Result<()>>,
    {
        let at = self.key("cpuinfo", criu).map(|p| p.with_extension("img"));
        if let Some(image) = at.as_deref().and_then(Self::read) {
            return crate::fs::private::write_private(dest, &image);
        }
        ask.await?;
        if let (Some(at), Some(image)) = (&at, Self::read(dest)) {
            self.keep(at, &image);
        }
        Ok(())
    }
}

/// `binary` if it is a path, else the first executable of that name on `PATH`.
fn resolve(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return Some(binary.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    #[tokio::test]
    async fn a_version_is_asked_once_per_binary_and_again_once_the_binary_changed() {
        let t = tempfile::tempdir().expect("tempdir");
        let facts = Facts::at(&t.path().join("facts"));
        let bin = script(t.path(), "tool", "echo one");
        let ask = |v: &'static str| async move { v.to_owned() };
        assert_eq!(facts.version(&bin, ask("tool version 1")).await, "tool version 1");
        assert_eq!(facts.version(&bin, ask("not asked")).await, "tool version 1");
        // Replaced in place (another size): asked again.
        std::fs::write(&bin, "#!/bin/sh\necho two, longer\n").expect("rewrite");
        assert_eq!(facts.version(&bin, ask("tool version 2")).await, "tool version 2");
        // Kept private.
        let dir = t.path().join("facts");
        let mode = std::fs::metadata(&dir).expect("stat").mode();
        assert_eq!(mode & 0o777, 0o700);
        for e in std::fs::read_dir(&dir).expect("list").flatten() {
            assert_eq!(e.metadata().expect("stat").mode() & 0o777, 0o600);
        }
        // An empty answer (the binary failed) is not kept.
        let other = script(t.path(), "other", "exit 1");
        assert_eq!(facts.version(&other, ask("")).await, "");
        assert_eq!(facts.version(&other, ask("other 1")).await, "other 1");
    }

    #[tokio::test]
    async fn a_cpu_image_is_copied_from_the_kept_one_and_a_failure_keeps_nothing() {
        let t = tempfile::tempdir().expect("tempdir");
        let facts = Facts::at(&t.path().join("facts"));
        let criu = script(t.path(), "criu", "exit 0");
        let first = t.path().join("first.img");
        facts
            .cpuinfo(&criu, &first, async {
                std::fs::write(&first, b"cpu image").map_err(|e| crate::error::Error::io("w", &first, e))
            })
            .await
            .expect("asked");
        let second = t.path().join("second.img");
        facts
            .cpuinfo(&criu, &second, async { panic!("not asked again") })
            .await
            .expect("kept");
        assert_eq!(std::fs::read(&second).expect("read"), b"cpu image");
        // Another binary: its own failure, nothing kept for it.
        let other = script(t.path(), "criu2", "exit 1");
        let failed = facts
            .cpuinfo(&other, &t.path().join("x.img"), async {
                Err(crate::error::Error::io(
                    "ask",
                    "criu2",
                    std::io::Error::other("no"),
                ))
            })
            .await;
        assert!(failed.is_err());
        assert!(facts
            .key("cpuinfo", &other)
            .is_some_and(|k| !k.with_extension("img").exists()));
    }
}
