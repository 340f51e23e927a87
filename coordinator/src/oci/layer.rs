//! A part's layer: a reproducible tar of its files, zstd-compressed into a temporary file,
//! hashed while it is written.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

use super::*;

/// A compressed layer in a temporary file.
pub(super) struct Layer {
    pub(super) part: String,
    pub(super) file: File,
    pub(super) digest: String,
    pub(super) size: u64,
}

/// Counts and hashes what passes through.
pub(super) struct Hashing<W> {
    pub(super) inner: W,
    pub(super) hasher: Sha256,
    pub(super) bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Compresses one part of the checkpoint in `dir` as a push does (tar, zstd at `level` on every
/// core, into a temporary file); returns the compressed size. For benchmarks.
pub fn compressed_part_size(dir: &Path, part: &str, files: &[String], level: i32) -> Result<u64> {
    build_layer(dir, part, files, level).map(|l| l.size)
}

/// Builds one part's layer: a tar of its files with fixed metadata, zstd-compressed with every
/// core, into an unnamed temporary file.
pub(super) fn build_layer(dir: &Path, part: &str, files: &[String], level: i32) -> Result<Layer> {
    let tmp =
        tempfile::tempfile().map_err(Error::io("create a temporary layer file", std::env::temp_dir()))?;
    let mut out = Hashing {
        inner: std::io::BufWriter::new(tmp),
        hasher: Sha256::new(),
        bytes: 0,
    };
    let fail = |e: std::io::Error| refused(format!("compressing part {part} of {}: {e}", dir.display()));
    let mut encoder = zstd::stream::Encoder::new(&mut out, level).map_err(fail)?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    encoder.multithread(workers).map_err(fail)?;
    let mut builder = tar::Builder::new(encoder);
    for rel in files {
        let path = dir.join(rel);
        let file = File::open(&path).map_err(Error::io("read a checkpoint file", &path))?;
        let size = file
            .metadata()
            .map_err(Error::io("stat a checkpoint file", &path))?
            .len();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        header.set_mode(0o600);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        builder
            .append_data(&mut header, rel, file.take(size))
            .map_err(fail)?;
    }
    let encoder = builder.into_inner().map_err(fail)?;
    encoder.finish().map_err(fail)?;
    out.flush().map_err(fail)?;
    let digest = format!("sha256:{}", hex::encode(out.hasher.finalize()));
    let mut file = out.inner.into_inner().map_err(|e| fail(e.into_error()))?;
    file.seek(SeekFrom::Start(0)).map_err(fail)?;
    Ok(Layer {
        part: part.to_owned(),
        file,
        digest,
        size: out.bytes,
    })
}
