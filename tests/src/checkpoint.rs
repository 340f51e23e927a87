//! The suite's own reader of the pod checkpoint on disk (docs/checkpoint-format.md), written
//! apart from the code under test so that a test never checks a checkpoint with the code that
//! wrote it: the manifest's fields the tests look at ([`Manifest`]), the digests (BLAKE3, or
//! SHA-256 in version 1 checkpoints), and [`verify`]: every listed file there with its size
//! and digest, nothing else in the directory.
//!
//! Unknown manifest fields are ignored here: the tests read what they assert on, the format is
//! the code under test's to define.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::IpAddr;
use std::path::{Component, Path};

use serde::Deserialize;
use sha2::Digest as _;

/// The manifest's file name, in the checkpoint directory.
pub const MANIFEST: &str = "manifest.json";
/// `format` of a podsnap pod checkpoint.
pub const FORMAT: &str = "podsnap.io/pod-checkpoint";
/// The largest manifest this reader takes (the documented cap).
const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;

/// What the tests read of a checkpoint's `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created_unix: u64,
    pub pod: Pod,
    pub host: Host,
    pub containers: Vec<Container>,
    /// `blake3` or `sha256`; absent in version 1 (SHA-256).
    #[serde(default)]
    pub digest_algorithm: Option<String>,
    #[serde(default)]
    pub dev_shm: Option<String>,
    #[serde(default)]
    pub sysv_ipc: Option<String>,
    #[serde(default)]
    pub loopback_linked: Vec<String>,
    #[serde(default)]
    pub unix_links: Vec<UnixLink>,
    #[serde(default)]
    pub adopted: Vec<Adopted>,
    /// Every file of the checkpoint but the manifest, relative to its directory.
    pub files: BTreeMap<String, Listed>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Pod {
    pub sandbox_id: String,
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Host {
    pub criu_version: String,
    pub runc_version: String,
    pub kernel: String,
    pub arch: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Container {
    pub name: String,
    pub id: String,
    #[serde(default)]
    pub image_id: Option<String>,
    /// The image layers under its rootfs, recorded by the dump.
    #[serde(default)]
    pub rootfs_layers: Vec<String>,
    /// `created`, `running`, `paused` or `stopped`.
    pub state: String,
    pub exit_code: Option<u32>,
    pub dumped: bool,
}

/// A connected unix socket pair between two containers.
#[derive(Debug, Clone, Deserialize)]
pub struct UnixLink {
    /// `stream` or `seqpacket`.
    pub kind: String,
    pub ends: Vec<UnixEnd>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UnixEnd {
    pub container: String,
}

/// A process the pause process adopted, dumped on its own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Adopted {
    pub container: String,
    pub pid: u32,
}

/// A listed file's size and digest (hex).
#[derive(Debug, Clone, Deserialize)]
pub struct Listed {
    pub size: u64,
    #[serde(alias = "sha256")]
    pub digest: String,
}

impl Manifest {
    /// The container named `name`.
    pub fn container(&self, name: &str) -> Option<&Container> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// The digest algorithm of this checkpoint's files.
    pub fn algorithm(&self) -> Result<Algorithm, String> {
        match (self.version, self.digest_algorithm.as_deref()) {
            (1, None) => Ok(Algorithm::Sha256),
            (_, Some("blake3")) => Ok(Algorithm::Blake3),
            (_, Some("sha256")) => Ok(Algorithm::Sha256),
            (v, other) => Err(format!("version {v}: unknown digest algorithm {other:?}")),
        }
    }
}

/// A digest algorithm of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Blake3,
    Sha256,
}

impl Algorithm {
    /// The hex digest of the file at `path`.
    pub fn file(self, path: &Path) -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        match self {
            Algorithm::Blake3 => {
                let mut h = blake3::Hasher::new();
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                Ok(h.finalize().to_hex().to_string())
            }
            Algorithm::Sha256 => {
                let mut h = sha2::Sha256::new();
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                Ok(hex::encode(h.finalize()))
            }
        }
    }
}

/// Reads and parses `dir/manifest.json` (capped), without checking the files.
pub fn read_manifest(dir: &Path) -> Result<Manifest, String> {
    let path = dir.join(MANIFEST);
    let f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(format!(
            "{}: larger than {MAX_MANIFEST_BYTES} bytes",
            path.display()
        ));
    }
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if m.format != FORMAT {
        return Err(format!(
            "{}: format {:?}, not {FORMAT:?}",
            path.display(),
            m.format
        ));
    }
    Ok(m)
}

/// [`read_manifest`], then the checkpoint is exactly what it lists: each listed file a regular
/// file inside `dir` of its size and digest, and nothing else under `dir` (no unlisted file,
/// symlink, or directory without a listed file).
pub fn verify(dir: &Path) -> Result<Manifest, String> {
    let m = read_manifest(dir)?;
    let algorithm = m.algorithm()?;
    for (rel, listed) in &m.files {
        let inside = Path::new(rel)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if !inside || rel.is_empty() {
            return Err(format!("{rel}: not a path inside the checkpoint"));
        }
        let path = dir.join(rel);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("{rel}: {e}"))?;
        if !meta.file_type().is_file() {
            return Err(format!("{rel}: not a regular file"));
        }
        if meta.len() != listed.size {
            return Err(format!("{rel}: {} bytes, listed {}", meta.len(), listed.size));
        }
        let digest = algorithm.file(&path).map_err(|e| format!("{rel}: {e}"))?;
        if digest != listed.digest {
            return Err(format!("{rel}: digest {digest}, listed {}", listed.digest));
        }
    }
    let mut found = BTreeSet::new();
    walk(dir, dir, &mut found)?;
    for rel in &found {
        if !m.files.contains_key(rel) {
            return Err(format!("{rel}: not listed in the manifest"));
        }
    }
    Ok(m)
}

/// Every file under `dir` but the manifest, relative to `root`; refuses symlinks, other kinds
/// and directories with no file below them.
fn walk(root: &Path, dir: &Path, found: &mut BTreeSet<String>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned();
        let kind = entry.file_type().map_err(|e| format!("{rel}: {e}"))?;
        if kind.is_dir() {
            let before = found.len();
            walk(root, &path, found)?;
            if found.len() == before {
                return Err(format!("{rel}: a directory with no listed file"));
            }
        } else if kind.is_file() {
            if rel != MANIFEST {
                found.insert(rel);
            }
        } else {
            return Err(format!("{rel}: neither a file nor a directory"));
        }
    }
    Ok(())
}

/// Edits `dir/manifest.json` as JSON.
pub fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(MANIFEST);
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read the manifest")).expect("manifest JSON");
    edit(&mut m);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).expect("JSON")).expect("write the manifest");
}

/// Records `rel`'s current size and digest in the manifest (a consistent but altered
/// checkpoint, as an attacker with write access to a copy of it could make).
pub fn redigest(dir: &Path, rel: &str) {
    let algorithm = read_manifest(dir)
        .and_then(|m| m.algorithm())
        .expect("the manifest's digest algorithm");
    let path = dir.join(rel);
    let size = std::fs::metadata(&path).expect("stat").len();
    let digest = algorithm.file(&path).expect("digest");
    edit_manifest(dir, |m| {
        m["files"][rel] = serde_json::json!({"size": size, "digest": digest});
    });
}

/// Rewrites one file of a checkpoint with `content`, and its size and digest in the manifest.
pub fn forge(dir: &Path, rel: &str, content: &[u8]) {
    std::fs::write(dir.join(rel), content).expect("write the forged file");
    redigest(dir, rel);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(dir: &Path, files: &[(&str, &[u8])]) {
        let mut listed = serde_json::Map::new();
        for (rel, data) in files {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, data).expect("write");
            listed.insert(
                (*rel).to_owned(),
                serde_json::json!({"size": data.len(), "digest": blake3::hash(data).to_hex().to_string()}),
            );
        }
        let m = serde_json::json!({
            "format": FORMAT, "version": 4, "created_unix": 1, "digest_algorithm": "blake3",
            "pod": {"sandbox_id": "s", "name": "p", "namespace": "default"},
            "host": {"criu_version": "4", "runc_version": "1", "kernel": "6", "arch": "x86_64"},
            "containers": [], "files": listed,
        });
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).expect("json")).expect("write");
    }

    #[test]
    fn verify_takes_exactly_what_is_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        checkpoint(dir.path(), &[("containers/a/x", b"hello"), ("host/y", b"")]);
        verify(dir.path()).expect("whole");

        std::fs::write(dir.path().join("containers/a/x"), b"hellp").expect("flip");
        assert!(verify(dir.path()).expect_err("damaged").contains("digest"));
        forge(dir.path(), "containers/a/x", b"other content");
        verify(dir.path()).expect("forged consistently");

        std::fs::write(dir.path().join("extra"), b"").expect("extra");
        assert!(verify(dir.path()).expect_err("unlisted").contains("not listed"));
        std::fs::remove_file(dir.path().join("extra")).expect("rm");
        std::fs::create_dir(dir.path().join("empty")).expect("mkdir");
        assert!(verify(dir.path())
            .expect_err("empty dir")
            .contains("no listed file"));
        std::fs::remove_dir(dir.path().join("empty")).expect("rmdir");

        std::fs::remove_file(dir.path().join("host/y")).expect("rm");
        assert!(verify(dir.path()).is_err(), "a listed file missing");
    }

    #[test]
    fn sha256_digests_are_those_of_sha256sum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").expect("write");
        assert_eq!(
            Algorithm::Sha256.file(&path).expect("digest"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
