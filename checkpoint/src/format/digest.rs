//! Digests of a checkpoint's files: the algorithms a manifest may name, per file and over a
//! stream.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fs::read::read_full;

/// A file's size and content digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    /// Hex, of the manifest's [`DigestAlgorithm`] (`sha256` in version 1 manifests).
    #[serde(alias = "sha256")]
    pub digest: String,
}

/// The digest algorithm of a checkpoint's files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigestAlgorithm {
    /// Version 1 checkpoints.
    #[default]
    Sha256,
    /// What this code writes.
    Blake3,
}

impl DigestAlgorithm {
    /// The algorithm new checkpoints are written with.
    pub const WRITTEN: DigestAlgorithm = DigestAlgorithm::Blake3;
    /// The names a manifest may give.
    pub const KNOWN: [&'static str; 2] = ["sha256", "blake3"];

    /// The name a manifest gives it.
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Blake3 => "blake3",
        }
    }

    /// The hex digest of the file at `path`.
    pub fn file(self, path: &Path) -> std::io::Result<String> {
        match self {
            DigestAlgorithm::Sha256 => sha256_file(path),
            DigestAlgorithm::Blake3 => blake3_file(path),
        }
    }

    /// The display name in messages.
    pub(crate) fn shown(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "SHA-256",
            DigestAlgorithm::Blake3 => "BLAKE3",
        }
    }
}

/// The SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The BLAKE3 digest of a file, hex: read in large blocks, each hashed on every core (rayon),
/// so one large file (a container's memory) is not left to one core.
pub fn blake3_file(path: &Path) -> std::io::Result<String> {
    /// Below this a block is hashed on the calling thread (splitting costs more than it saves).
    const PARALLEL_FROM: usize = 256 * 1024;
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        if n >= PARALLEL_FROM {
            h.update_rayon(&buf[..n]);
        } else {
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// A file's digest computed over its bytes as they pass (a pull checks each file as it writes
/// it instead of reading the checkpoint again).
pub enum StreamDigest {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl StreamDigest {
    pub fn new(algorithm: DigestAlgorithm) -> Self {
        match algorithm {
            DigestAlgorithm::Sha256 => StreamDigest::Sha256(Sha256::new()),
            DigestAlgorithm::Blake3 => StreamDigest::Blake3(Box::default()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        /// Below this a block is hashed on the calling thread.
        const PARALLEL_FROM: usize = 256 * 1024;
        match self {
            StreamDigest::Sha256(h) => h.update(bytes),
            StreamDigest::Blake3(h) if bytes.len() >= PARALLEL_FROM => {
                h.update_rayon(bytes);
            }
            StreamDigest::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// Hex, as the manifest lists it.
    pub fn finish(self) -> String {
        match self {
            StreamDigest::Sha256(h) => hex::encode(h.finalize()),
            StreamDigest::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}
