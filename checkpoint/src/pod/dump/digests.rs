//! The digests of a checkpoint's files, taken on every core (rayon), and their modes made
//! private.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::manifest::{DigestAlgorithm, FileDigest, MANIFEST};
use crate::fs::private::make_private;

/// Size and digest of every regular file under `dir` (but the manifest), in parallel. Every
/// directory under `dir` is made 0700 and every file 0600 on the way: they are this dump's
/// output, and CRIU writes its images 0644.
pub(super) async fn digest_tree(
    dir: &Path,
    prehashed: &HashMap<PathBuf, crate::pod::dump::prehash::Prehashed>,
) -> Result<BTreeMap<String, FileDigest>> {
    let mut paths = Vec::new();
    let mut early = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .map_err(|e| Error::io("list the checkpoint", &d, e))?
            .flatten()
        {
            let p = e.path();
            let ft = e
                .file_type()
                .map_err(|err| Error::io("stat a checkpoint file", &p, err))?;
            if ft.is_dir() {
                make_private(&p, 0o700)?;
                stack.push(p);
            } else if ft.is_file() && p != dir.join(MANIFEST) {
                make_private(&p, 0o600)?;
                match prehashed.get(&p).filter(|h| h.holds_for(&p)) {
                    Some(h) => {
                        let rel = p.strip_prefix(dir).unwrap_or(&p).to_string_lossy().into_owned();
                        early.push((rel, h.digest.clone()));
                    }
                    None => paths.push(p),
                }
            }
        }
    }
    // Largest first, one file per task over rayon's pool (a worker per core; BLAKE3 hashes a
    // large file's blocks on the same pool).
    paths.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
    let root = dir.to_path_buf();
    let digested = tokio::task::spawn_blocking(move || {
        paths
            .par_iter()
            .with_max_len(1)
            .map(|p| {
                let size = std::fs::metadata(p)
                    .map_err(|e| Error::io("stat a checkpoint file", p, e))?
                    .len();
                let digest = DigestAlgorithm::WRITTEN
                    .file(p)
                    .map_err(|e| Error::io("digest a checkpoint file", p, e))?;
                let rel = p.strip_prefix(&root).unwrap_or(p).to_string_lossy().into_owned();
                Ok((rel, FileDigest { size, digest }))
            })
            .collect::<Result<Vec<_>>>()
    })
    .await
    .map_err(|e| Error::io("digest task", dir, std::io::Error::other(e)))??;
    let mut files: BTreeMap<String, FileDigest> = early.into_iter().collect();
    files.extend(digested);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_file_of_a_dump_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tempdir");
        let criu = t.path().join("containers/app/criu");
        std::fs::create_dir_all(&criu).expect("mkdir");
        std::fs::set_permissions(&criu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::write(criu.join("core-1.img"), b"x").expect("write");
        std::fs::set_permissions(criu.join("core-1.img"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let files = digest_tree(t.path(), &HashMap::new()).await.expect("digests");
        assert_eq!(files.len(), 1);
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&criu.join("core-1.img")), 0o600);
        assert_eq!(mode(&criu), 0o700);
    }

    #[tokio::test]
    async fn the_manifest_is_not_digested_and_names_are_relative() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(t.path().join("a/b")).expect("mkdir");
        std::fs::write(t.path().join("a/b/f"), b"hello").expect("write");
        std::fs::write(t.path().join(MANIFEST), b"{}").expect("write");
        let files = digest_tree(t.path(), &HashMap::new()).await.expect("digests");
        assert_eq!(files.keys().collect::<Vec<_>>(), ["a/b/f"]);
        assert_eq!(files["a/b/f"].size, 5);
        assert_eq!(
            files["a/b/f"].digest,
            DigestAlgorithm::WRITTEN
                .file(&t.path().join("a/b/f"))
                .expect("digest")
        );
    }

    #[tokio::test]
    async fn many_files_of_many_sizes_get_each_its_own_digest() {
        let t = tempfile::tempdir().expect("tempdir");
        for i in 0..64usize {
            let dir = t.path().join(format!("containers/c{}", i % 4));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join(format!("f{i}")), vec![i as u8; i * 1000]).expect("write");
        }
        let files = digest_tree(t.path(), &HashMap::new()).await.expect("digests");
        assert_eq!(files.len(), 64);
        for (rel, f) in &files {
            let p = t.path().join(rel);
            assert_eq!(f.size, std::fs::metadata(&p).expect("stat").len(), "{rel}");
            assert_eq!(
                f.digest,
                DigestAlgorithm::WRITTEN.file(&p).expect("digest"),
                "{rel}"
            );
        }
    }
}
