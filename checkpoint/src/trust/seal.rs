//! Seals: podsnap's record that a checkpoint's files are the ones whose digests it computed
//! or checked, so that a restore right after a dump or a pull does not hash hundreds of MiB a
//! second time.
//!
//! A seal is kept outside the checkpoint, in [`SEAL_DIR`] (root's, 0700; on a tmpfs `/run` it
//! is gone at reboot), one file per checkpoint directory (named by the SHA-256 of its path). It
//! holds the boot it was made in and, for the directory, its manifest and every listed file,
//! the file's device, inode, size, modification and change times. A write to a file, a
//! `chmod`, a rename over it or a hard link to it change its change time (the kernel sets it;
//! only the clock could turn it back); a copy is another inode. So a checkpoint whose every file
//! still matches its seal holds the bytes podsnap hashed, and its digests are not read again.
//! Anything else (no seal, another boot's, any file changed, the manifest changed) is verified
//! in full, and sealed again when it passes. Seals are written by podsnap only: when a dump
//! commits its checkpoint (its digests were just computed from those files) and when a pull
//! has checked every file's digest as it wrote it.
//!
//! Who can change a checkpoint without changing its files' change times could as well change
//! the seal: root, who can do anything on the node anyway. Tenants cannot write the checkpoint
//! root (see the README's threat model).

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::manifest::{Manifest, MANIFEST};
use crate::fs::fingerprint::{fingerprint, Fingerprint};

/// Where the node's seals are kept.
pub const SEAL_DIR: &str = "/run/podsnap/seals";
/// The largest seal read back (a checkpoint lists a few hundred files at most).
const MAX_SEAL_BYTES: u64 = 4 << 20;
/// The key under which a seal records the checkpoint directory itself.
const DIR_KEY: &str = ".";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Seal {
    boot: String,
    checkpoint: PathBuf,
    files: BTreeMap<String, Fingerprint>,
}

fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

/// The seal file of `checkpoint` in `seals`, and the checkpoint's canonical path.
fn seal_path(seals: &Path, checkpoint: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    let canonical = std::fs::canonicalize(checkpoint)?;
    let name = hex::encode(Sha256::digest(canonical.as_os_str().as_encoded_bytes()));
    Ok((seals.join(format!("{name}.json")), canonical))
}

/// The seal `checkpoint` would have now, for the files `manifest` lists.
fn current(checkpoint: &Path, canonical: PathBuf, manifest: &Manifest) -> std::io::Result<Seal> {
    let mut files = BTreeMap::new();
    files.insert(DIR_KEY.to_owned(), fingerprint(checkpoint)?);
    files.insert(MANIFEST.to_owned(), fingerprint(&checkpoint.join(MANIFEST))?);
    for rel in manifest.files.keys() {
        files.insert(rel.clone(), fingerprint(&checkpoint.join(rel))?);
    }
    Ok(Seal {
        boot: boot_id()?,
        checkpoint: canonical,
        files,
    })
}

/// Seals `checkpoint`, whose files `manifest` lists and whose digests were just computed or
/// checked by the caller. Written whole (a temporary file renamed), 0600, in `seals` (made
/// 0700 when missing).
pub fn record(seals: &Path, checkpoint: &Path, manifest: &Manifest) -> Result<()> {
    let what = "seal the verified checkpoint";
    let (path, canonical) = seal_path(seals, checkpoint).map_err(|e| Error::io(what, checkpoint, e))?;
    let seal = current(checkpoint, canonical, manifest).map_err(|e| Error::io(what, checkpoint, e))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(seals)
        .map_err(|e| Error::io(what, seals, e))?;
    let bytes = serde_json::to_vec(&seal).map_err(|e| Error::io(what, &path, e.into()))?;
    crate::fs::private::replace_private(&path, &bytes, what)?;
    prune(seals);
    Ok(())
}

/// Removes the seals of checkpoints that are gone (removed by other means than podsnap's) and
/// of other boots.
fn prune(seals: &Path) {
    let Ok(entries) = std::fs::read_dir(seals) else {
        return;
    };
    let boot = boot_id().unwrap_or_default();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let stale = match crate::fs::read::read_capped(&path, MAX_SEAL_BYTES)
            .ok()
            .and_then(|b| serde_json::from_slice::<Seal>(&b).ok())
        {
            Some(seal) => seal.boot != boot || !seal.checkpoint.is_dir(),
            None => true,
        };
        if stale {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Whether `checkpoint` still holds exactly what its seal recorded, for the files `manifest`
/// lists (read by [`Manifest::load_listed`]: nothing else is in the directory). No seal, an
/// unreadable one, another boot's or any difference: `false`.
pub fn holds(seals: &Path, checkpoint: &Path, manifest: &Manifest) -> bool {
    let Ok((path, canonical)) = seal_path(seals, checkpoint) else {
        return false;
    };
    let Ok(bytes) = crate::fs::read::read_capped(&path, MAX_SEAL_BYTES) else {
        return false;
    };
    let Ok(sealed) = serde_json::from_slice::<Seal>(&bytes) else {
        return false;
    };
    current(checkpoint, canonical, manifest).is_ok_and(|now| now == sealed)
}

/// Removes the seal of `checkpoint` (before the checkpoint itself is removed).
pub fn forget(seals: &Path, checkpoint: &Path) {
    if let Ok((path, _)) = seal_path(seals, checkpoint) {
        let _ = std::fs::remove_file(path);
    }
}

/// How [`Manifest::verify_sealed`] knew the files were intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Every file matched its seal: no digest was read.
    Sealed,
    /// Every digest was read and matched (and the checkpoint is sealed now).
    Hashed,
}

impl Manifest {
    /// [`Manifest::verify`] unless the checkpoint at `dir` matches its seal in `seals`; seals it
    /// after a full verification (a seal that cannot be written only costs the next restore a
    /// full verification).
    pub fn verify_sealed(&self, dir: &Path, seals: &Path) -> Result<Verified> {
        if holds(seals, dir, self) {
            return Ok(Verified::Sealed);
        }
        self.verify(dir)?;
        if let Err(e) = record(seals, dir, self) {
            log::warn!("{e}");
        }
        Ok(Verified::Hashed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::FileDigest;
    use std::os::unix::fs::MetadataExt;

    /// A checkpoint of two files with real digests, and its manifest.
    fn checkpoint(dir: &Path) -> Manifest {
        let mut m = crate::format::manifest::tests::sample();
        std::fs::create_dir_all(dir.join("containers/app/checkpoint")).expect("mkdir");
        for (rel, bytes) in [
            ("containers/app/checkpoint/pages-1.img", vec![7u8; 64 << 10]),
            ("containers/app/spec.dump", b"{}".to_vec()),
        ] {
            std::fs::write(dir.join(rel), &bytes).expect("write");
            m.files.insert(
                rel.to_owned(),
                FileDigest {
                    size: bytes.len() as u64,
                    digest: m.digest_algorithm.file(&dir.join(rel)).expect("digest"),
                },
            );
        }
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).expect("json")).expect("write");
        m
    }

    #[test]
    fn a_sealed_checkpoint_is_not_hashed_again_until_a_file_changes() {
        let root = tempfile::tempdir().expect("tempdir");
        let (seals, dir) = (root.path().join("seals"), root.path().join("ckpt"));
        let m = checkpoint(&dir);
        assert!(!holds(&seals, &dir, &m), "no seal yet");
        assert_eq!(m.verify_sealed(&dir, &seals).expect("verified"), Verified::Hashed);
        let mode = std::fs::metadata(&seals).expect("seals").mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(m.verify_sealed(&dir, &seals).expect("sealed"), Verified::Sealed);

        // A byte flipped in place, the size the same: the change time moved; refused by digest.
        let victim = dir.join("containers/app/checkpoint/pages-1.img");
        let mut bytes = std::fs::read(&victim).expect("read");
        bytes[100] ^= 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&victim, &bytes).expect("write");
        assert!(!holds(&seals, &dir, &m));
        let err = m.verify_sealed(&dir, &seals).expect_err("damaged").to_string();
        assert!(err.contains("is damaged"), "{err}");
        assert!(!holds(&seals, &dir, &m), "a refused checkpoint is not sealed");

        // Put back: verified in full, sealed again.
        bytes[100] ^= 1;
        std::fs::write(&victim, &bytes).expect("write");
        assert_eq!(m.verify_sealed(&dir, &seals).expect("verified"), Verified::Hashed);
        assert_eq!(m.verify_sealed(&dir, &seals).expect("sealed"), Verified::Sealed);

        // A file replaced by another inode with the same bytes (and its times copied back).
        let other = dir.join("containers/app/spec.dump.new");
        std::fs::write(&other, b"{}").expect("write");
        std::fs::rename(&other, dir.join("containers/app/spec.dump")).expect("rename");
        assert!(!holds(&seals, &dir, &m));
        assert_eq!(m.verify_sealed(&dir, &seals).expect("verified"), Verified::Hashed);

        // A manifest rewritten; a seal of another boot; a seal that is not JSON.
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).expect("json")).expect("write");
        assert!(!holds(&seals, &dir, &m));
        record(&seals, &dir, &m).expect("seal");
        assert!(holds(&seals, &dir, &m));
        let (path, _) = seal_path(&seals, &dir).expect("path");
        let mut seal: Seal = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        seal.boot = "another boot".into();
        std::fs::write(&path, serde_json::to_vec(&seal).expect("json")).expect("write");
        assert!(!holds(&seals, &dir, &m));
        std::fs::write(&path, b"not json").expect("write");
        assert!(!holds(&seals, &dir, &m));

        // Another directory with the same files (a copy) has no seal.
        record(&seals, &dir, &m).expect("seal");
        let copy = root.path().join("copy");
        checkpoint(&copy);
        assert!(!holds(&seals, &copy, &m));
        forget(&seals, &dir);
        assert!(!holds(&seals, &dir, &m), "forgotten");

        // Sealing prunes the seals of checkpoints that are gone.
        record(&seals, &dir, &m).expect("seal");
        record(&seals, &copy, &m).expect("seal");
        std::fs::remove_dir_all(&copy).expect("rm");
        std::fs::write(seals.join("junk.json"), b"not a seal").expect("write");
        record(&seals, &dir, &m).expect("seal");
        let left: Vec<_> = std::fs::read_dir(&seals)
            .expect("ls")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(
            left,
            [seal_path(&seals, &dir).expect("path").0],
            "only the live seal is left"
        );
    }
}
