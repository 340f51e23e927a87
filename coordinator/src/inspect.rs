//! `podsnap inspect`: verify a checkpoint (every digest) and say what it holds; `-o json`
//! prints its manifest and whether it is sealed ([`inspect_json`]).

use std::path::{Path, PathBuf};

use podsnap_checkpoint::format::manifest::Manifest;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::summary::CheckpointSummary;

/// Verifies the checkpoint in `dir` and summarizes it; `root` is the node's checkpoint root.
pub fn inspect(dir: &Path, root: &Path) -> Result<CheckpointSummary> {
    let dir = std::fs::canonicalize(dir).map_err(Error::io("open the checkpoint", dir))?;
    let manifest = Manifest::load_verified(&dir)?;
    Ok(CheckpointSummary::new(&dir, &manifest, root))
}

/// What `podsnap inspect -o json` prints: the checkpoint's manifest once every digest is
/// checked, and whether a seal (a dump's, a pull's or a restore's, see
/// [`podsnap_checkpoint::trust::seal`]) holds for it, read before the digests are (inspect itself
/// never seals).
#[derive(Debug, Clone, Serialize)]
pub struct Inspected {
    pub dir: PathBuf,
    /// Every listed file has its size and digest, nothing unlisted is there.
    pub verified: bool,
    pub sealed: bool,
    /// Why it is not verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The verified manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
}

/// Checks the checkpoint in `dir` as [`inspect`] does and says what [`Inspected`] holds. A
/// checkpoint whose manifest cannot be read or does not match its listing is an error; one
/// whose files do not match their digests is returned with `verified: false`.
pub fn inspect_json(dir: &Path) -> Result<Inspected> {
    let dir = std::fs::canonicalize(dir).map_err(Error::io("open the checkpoint", dir))?;
    let manifest = Manifest::load_listed(&dir)?;
    let sealed = podsnap_checkpoint::trust::seal::holds(
        Path::new(podsnap_checkpoint::trust::seal::SEAL_DIR),
        &dir,
        &manifest,
    );
    Ok(match manifest.verify(&dir) {
        Ok(()) => Inspected {
            dir,
            verified: true,
            sealed,
            problem: None,
            manifest: Some(manifest),
        },
        Err(e) => Inspected {
            dir,
            verified: false,
            sealed,
            problem: Some(Error::from(e).to_string()),
            manifest: None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use podsnap_checkpoint::format::digest::{DigestAlgorithm, FileDigest};
    use podsnap_checkpoint::format::manifest::MANIFEST;

    /// A checkpoint of one file (`host/cpuinfo.img`) in `dir`.
    fn checkpoint(dir: &Path) {
        std::fs::create_dir_all(dir.join("host")).expect("mkdir");
        let file = dir.join("host/cpuinfo.img");
        std::fs::write(&file, b"cpu").expect("write");
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "format": podsnap_checkpoint::format::manifest::FORMAT,
            "version": podsnap_checkpoint::format::manifest::VERSION,
            "created_unix": 0,
            "pod": {"sandbox_id": "s", "name": "web", "namespace": "default", "uid": null, "hostname": null},
            "host": {"criu_version": "4.2.1", "runc_version": "1.1.5", "kernel": "6.18", "arch": "x86_64"},
            "tcp_established": false, "digest_algorithm": "blake3",
            "containers": [], "volumes": [], "files": {},
        }))
        .unwrap_or_else(|e| panic!("a manifest: {e}"));
        let digest = DigestAlgorithm::Blake3.file(&file).expect("digest");
        m.files
            .insert("host/cpuinfo.img".to_owned(), FileDigest { size: 3, digest });
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).expect("json")).expect("write");
    }

    #[test]
    fn inspect_json_gives_the_verified_manifest_or_the_problem() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("c");
        checkpoint(&dir);
        let whole = serde_json::to_value(inspect_json(&dir).expect("inspected")).expect("json");
        assert_eq!(whole["verified"], true);
        assert_eq!(whole["sealed"], false, "nothing sealed it");
        assert!(whole.get("problem").is_none());
        assert_eq!(whole["manifest"]["pod"]["name"], "web");
        assert_eq!(whole["manifest"]["files"]["host/cpuinfo.img"]["size"], 3);

        std::fs::write(dir.join("host/cpuinfo.img"), b"cpx").expect("flip a byte");
        let damaged = serde_json::to_value(inspect_json(&dir).expect("inspected")).expect("json");
        assert_eq!(damaged["verified"], false);
        assert!(
            damaged.get("manifest").is_none(),
            "no manifest of a damaged checkpoint"
        );
        let problem = damaged["problem"].as_str().expect("a problem");
        assert!(problem.contains("is damaged"), "{problem}");

        std::fs::write(dir.join("unlisted"), b"").expect("an unlisted file");
        assert!(
            inspect_json(&dir).is_err(),
            "a wrong listing is an error, as for inspect"
        );
    }
}
