//! Pod checkpoints as signed OCI artifacts in a registry: `podsnap push DIR REF` and
//! `podsnap pull REF DIR`.
//!
//! ```text
//! REF (tag or digest) -> OCI image manifest  application/vnd.oci.image.manifest.v1+json
//!   artifactType   application/vnd.podsnap.checkpoint.v1
//!   config         the checkpoint's manifest.json       application/vnd.podsnap.checkpoint.config.v1+json
//!   layers         one tar+zstd per part                application/vnd.podsnap.checkpoint.layer.v1.tar+zstd
//!                  annotation io.podsnap.checkpoint.part = containers/<name> | volumes/<v>.tar | pod-and-host
//! <repository>:sha256-<hex of the manifest digest>.sig -> OCI image manifest
//!   artifactType   application/vnd.podsnap.checkpoint.signature.v1+json
//!   config         the empty descriptor ({}, application/vnd.oci.empty.v1+json)
//!   layers         one signature blob                   application/vnd.podsnap.checkpoint.signature.v1+json
//!                  {"manifest": "sha256:...", "key": "<hex SHA-256 of the raw 32-byte public key>",
//!                   "signature": "<hex of the 64-byte ed25519 signature>"}
//! ```
//!
//! The signed message is `podsnap.io/checkpoint-signature/v1 ` followed by the manifest digest
//! (`sha256:<hex>`). The manifest digest covers the config (the checkpoint's manifest.json, which
//! holds the size and digest of every file a restore reads) and every layer's digest, so one
//! signature covers the whole checkpoint.
//!
//! Each layer holds the part's files only (regular files, mode 0600, owner 0:0, mtime 0, in
//! path order), so an unchanged part compresses to the same blob and is not uploaded again.
//!
//! A pull refuses a registry the node configuration does not allow before any network call,
//! verifies the signature against the trusted keys before it downloads a layer, checks the
//! node's restore policy against the checkpoint's manifest (the config blob) when it pulls for
//! a restore ([`RestoreCheck`]: a pod that may not restore the checkpoint gets nothing of it
//! pulled), then streams
//! each layer through the zstd decoder into a staging directory inside the checkpoint root
//! (`.<name>.tmp-<pid>`, 0700, files 0600): only regular files the checkpoint's manifest lists,
//! in the part the layer claims, of exactly the listed size (a GNU long name of at most 64 KiB
//! names one; any other kind of entry is refused before its data is read). The staging directory must pass
//! [`Manifest::load_verified`] (every file's digest, nothing unlisted) before it is renamed
//! into place; on any failure it is removed.

use std::collections::BTreeMap;

use podsnap_checkpoint::format::manifest::Manifest;
use sha2::{Digest, Sha256};

use crate::error::Error;

/// `artifactType` of a checkpoint's OCI manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.podsnap.checkpoint.v1";
/// Media type of the config blob: the checkpoint's manifest.json.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.podsnap.checkpoint.config.v1+json";
/// Media type of a layer: a tar of one part of the checkpoint, zstd-compressed.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.podsnap.checkpoint.layer.v1.tar+zstd";
/// Media type (and artifact type) of a signature.
pub const SIGNATURE_MEDIA_TYPE: &str = "application/vnd.podsnap.checkpoint.signature.v1+json";
/// The layer annotation naming the part a layer holds.
pub const PART_ANNOTATION: &str = "io.podsnap.checkpoint.part";
/// The part holding everything outside `containers/` and `volumes/` (pod/, host/).
pub const POD_AND_HOST_PART: &str = "pod-and-host";
/// What precedes the manifest digest in the signed message.
pub const SIGNED_PREFIX: &str = "podsnap.io/checkpoint-signature/v1 ";
/// The default zstd level: 1. Checkpoint memory compresses almost as well as at 3 (3% more
/// bytes on the heap-like bench memory) for three quarters of the CPU (`layer_compression`:
/// 916 against 689 MiB/s), and on a node with few cores to spare the compression is much of a
/// migration's downtime (`migration_downtime`: push 0.87x, downtime 0.87x of level 3's).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_BLOB: &[u8] = b"{}";
/// The largest OCI manifest (checkpoint or signature) read.
const MAX_OCI_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// The largest signature blob read.
const MAX_SIGNATURE_BYTES: usize = 64 * 1024;
/// The longest name a layer's long-name entry may give (checkpoint paths are far shorter).
const MAX_LONG_NAME_BYTES: u64 = 64 * 1024;
/// The largest key file read.
const MAX_KEY_BYTES: u64 = 64 * 1024;

/// The part of the checkpoint a file (path relative to the checkpoint) belongs to.
pub fn part_of(path: &str) -> String {
    let mut it = path.splitn(3, '/');
    match (it.next(), it.next(), it.next()) {
        (Some("containers"), Some(name), Some(_)) => format!("containers/{name}"),
        (Some("volumes"), Some(file), None) => format!("volumes/{file}"),
        _ => POD_AND_HOST_PART.to_owned(),
    }
}

/// The checkpoint's files grouped by part, each part's files in path order.
pub fn parts(manifest: &Manifest) -> BTreeMap<String, Vec<String>> {
    let mut parts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for path in manifest.files.keys() {
        parts.entry(part_of(path)).or_default().push(path.clone());
    }
    parts
}

/// [`parts`] of the checkpoint in `dir`, once every digest is checked.
pub fn parts_in(dir: &std::path::Path) -> crate::Result<BTreeMap<String, Vec<String>>> {
    Ok(parts(&Manifest::load_verified(dir)?))
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn refused(message: impl Into<String>) -> Error {
    Error::Registry(message.into())
}

mod auth;
mod early;
mod layer;
mod pull;
mod push;
mod sign;
mod unpack;

pub use auth::*;
pub use early::*;
pub use layer::*;
pub use pull::*;
pub use push::*;
pub use sign::*;
pub(crate) use unpack::ListedFile;
use unpack::*;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
