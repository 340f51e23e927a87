//! One layer streamed from the registry through the zstd decoder into the staging directory,
//! each entry checked against the checkpoint's manifest before its data is read.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use podsnap_checkpoint::format::digest::StreamDigest;
use podsnap_checkpoint::format::manifest::Manifest;
use podsnap_checkpoint::format::names::safe_relative;
use podsnap_checkpoint::fs::read::read_full;
use sha2::{Digest, Sha256};

use crate::error::Result;

use super::*;

/// Streams one layer through the zstd decoder into `staging`; returns the compressed size.
pub(super) async fn unpack_layer(
    client: &Client,
    image: &Reference,
    layer: &OciDescriptor,
    staging: &Path,
    manifest: std::sync::Arc<Manifest>,
) -> Result<u64> {
    let part = layer
        .annotations
        .as_ref()
        .and_then(|a| a.get(PART_ANNOTATION))
        .cloned()
        .unwrap_or_default();
    let download = client
        .pull_blob_stream(image, layer)
        .await
        .map_err(registry_error(
            &format!("downloading part {part}"),
            &image.whole(),
        ))?;
    let expected = (layer.digest.clone(), layer.size.max(0) as u64);
    let staging = staging.to_path_buf();
    // The download read as a blocking `Read` on the unpacker's thread: dropped when the
    // unpacker stops, which ends the download.
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(download.stream));
    let unpacker = tokio::task::spawn_blocking({
        let part = part.clone();
        move || unpack_stream(reader, &part, &staging, &manifest, expected)
    });
    unpacker
        .await
        .map_err(|e| refused(format!("unpacking part {part}: {e}")))?
        .map_err(|reason| {
            refused(format!(
                "{}: part {part} ({}) is refused: {reason}",
                image.whole(),
                layer.digest
            ))
        })
}

/// Unpacks a layer's tar+zstd stream: regular files the manifest lists in this part, of their
/// listed size and digest (checked as they are written), each created once (0600, parents
/// 0700). Checks the compressed stream's digest and size at the end.
pub(super) fn unpack_stream(
    reader: impl Read,
    part: &str,
    staging: &Path,
    manifest: &Manifest,
    (digest, size): (String, u64),
) -> std::result::Result<u64, String> {
    let mut hashing = Hashing {
        inner: reader.take(size + 1),
        hasher: Sha256::new(),
        bytes: 0,
    };
    {
        let decoder = zstd::stream::Decoder::new(&mut hashing).map_err(|e| format!("zstd: {e}"))?;
        let mut archive = tar::Archive::new(decoder);
        let mut buf = vec![0u8; 1 << 20];
        // Raw entries: the tar reader would hold a long-name entry whole in memory, whatever its
        // size, before the layer's digest is known (a small compressed blob can expand to any
        // size); long names are read here, capped. A push writes GNU long names only.
        let mut long_name: Option<Vec<u8>> = None;
        for entry in archive.entries().map_err(|e| format!("tar: {e}"))?.raw(true) {
            let mut entry = entry.map_err(|e| format!("tar: {e}"))?;
            let kind = entry.header().entry_type();
            if kind == tar::EntryType::GNULongName {
                if long_name.is_some() || entry.size() > MAX_LONG_NAME_BYTES {
                    return Err(format!(
                        "a long name of {} bytes (at most {MAX_LONG_NAME_BYTES}, one per entry)",
                        entry.size()
                    ));
                }
                let mut name = Vec::new();
                entry
                    .read_to_end(&mut name)
                    .map_err(|e| format!("tar: a long name: {e}"))?;
                if name.last() == Some(&0) {
                    name.pop();
                }
                long_name = Some(name);
                continue;
            }
            let raw = match long_name.take() {
                Some(name) => name,
                None => entry.path_bytes().into_owned(),
            };
            let name = String::from_utf8(raw).map_err(|_| "an entry name is not UTF-8".to_owned())?;
            if kind != tar::EntryType::Regular {
                return Err(format!("entry {name:?} is a {kind:?}, not a regular file"));
            }
            safe_relative(&name).map_err(|e| format!("entry {name:?}: {e}"))?;
            if !manifest.files.contains_key(&name) {
                return Err(format!("entry {name:?} is not a file of the checkpoint"));
            }
            if part_of(&name) != part {
                return Err(format!("entry {name:?} belongs to part {}", part_of(&name)));
            }
            let mut out = ListedFile::create(staging, manifest, &name, entry.size())?;
            loop {
                let n = read_full(&mut entry, &mut buf).map_err(|e| format!("entry {name:?}: {e}"))?;
                if n == 0 {
                    break;
                }
                out.write(&buf[..n])?;
            }
            out.finish()?;
        }
        if long_name.is_some() {
            return Err("a long name describing no entry".into());
        }
        // What follows the archive's end inside the zstd frame is read and dropped.
        let mut decoder = archive.into_inner();
        std::io::copy(&mut (&mut decoder).take(1 << 20), &mut std::io::sink())
            .map_err(|e| format!("zstd: {e}"))?;
    }
    // The rest of the compressed stream, for its digest.
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| format!("download: {e}"))?;
    let got = format!("sha256:{}", hex::encode(hashing.hasher.finalize_reset()));
    if hashing.bytes != size {
        return Err(format!(
            "it is {} bytes, its descriptor says {size}",
            hashing.bytes
        ));
    }
    if got != digest {
        return Err(format!("its content has digest {got}, not {digest}"));
    }
    Ok(size)
}

/// One file of a checkpoint being written into a staging directory from a stream (a registry
/// layer, a migration): listed in the manifest, of the listed size, created once (0600,
/// `O_NOFOLLOW`, parents 0700), its digest checked at the end.
pub(crate) struct ListedFile {
    name: String,
    path: std::path::PathBuf,
    out: std::fs::File,
    digest: StreamDigest,
    listed_size: u64,
    listed_digest: String,
    written: u64,
}

impl ListedFile {
    /// Creates `name` (relative to the checkpoint) in `staging`, announced as `size` bytes.
    pub(crate) fn create(
        staging: &Path,
        manifest: &Manifest,
        name: &str,
        size: u64,
    ) -> std::result::Result<ListedFile, String> {
        let rel = safe_relative(name).map_err(|e| format!("entry {name:?}: {e}"))?;
        let listed = manifest
            .files
            .get(name)
            .ok_or_else(|| format!("entry {name:?} is not a file of the checkpoint"))?;
        if size != listed.size {
            return Err(format!(
                "entry {name:?} is {size} bytes, the manifest lists {}",
                listed.size
            ));
        }
        let path = staging.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(ListedFile {
            name: name.to_owned(),
            path,
            out,
            digest: StreamDigest::new(manifest.digest_algorithm),
            listed_size: listed.size,
            listed_digest: listed.digest.clone(),
            written: 0,
        })
    }

    /// Bytes still expected.
    pub(crate) fn remaining(&self) -> u64 {
        self.listed_size - self.written
    }

    /// Appends `data` (refused past the listed size).
    pub(crate) fn write(&mut self, data: &[u8]) -> std::result::Result<(), String> {
        if data.len() as u64 > self.remaining() {
            return Err(format!(
                "entry {:?} is longer than the {} bytes the manifest lists",
                self.name, self.listed_size
            ));
        }
        self.digest.update(data);
        self.out
            .write_all(data)
            .map_err(|e| format!("writing {}: {e}", self.path.display()))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Checks the size and the digest.
    pub(crate) fn finish(self) -> std::result::Result<(), String> {
        let name = &self.name;
        if self.written != self.listed_size {
            return Err(format!("entry {name:?} ends after {} bytes", self.written));
        }
        let got = self.digest.finish();
        if !got.eq_ignore_ascii_case(&self.listed_digest) {
            return Err(format!(
                "entry {name:?} has digest {got}, the manifest lists {}",
                self.listed_digest
            ));
        }
        Ok(())
    }
}
