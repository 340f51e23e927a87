//! Reads bounded by size: a file read whole only below a cap, a buffer filled fully.

use std::io::Read;
use std::path::Path;

/// Reads a whole file after checking its size against `cap` (on the open file: no race).
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len > cap {
        return Err(std::io::Error::other(format!("{len} bytes, more than {cap}")));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(cap + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > cap {
        return Err(std::io::Error::other(format!("more than {cap} bytes")));
    }
    Ok(buf)
}

/// Reads until `buf` is full or the reader ends; returns how much was read.
pub fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match f.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}
