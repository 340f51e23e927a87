//! Layers built and uploaded while a dump is still finishing (`podsnap migrate`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use oci_client::{Client, Reference};
use podsnap_checkpoint::format::manifest::MAX_MANIFEST_BYTES;
use podsnap_checkpoint::format::names::safe_relative;

use crate::error::Result;

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prebuilt {
    /// The part's files it holds (relative to the checkpoint), sorted.
    pub files: Vec<String>,
    pub digest: String,
    pub size: u64,
}

/// Uploads the container parts a dump announces in `<dest>.parts`
/// ([`podsnap_checkpoint::format::layout::PartReady`]) while the dump still digests, writes the manifest
/// and (with `--stop`) syncs and stops the pod: compressed and uploaded one at a time, as
/// [`push`] would. What it could not do (the part changed, the staging directory was renamed
/// away first, an upload failed) is left to [`push`], which reuses only layers of exactly the
/// files the manifest lists. A pull checks every file's digest, whatever was uploaded.
pub struct EarlyPush {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<BTreeMap<String, Prebuilt>>,
}

impl EarlyPush {
    /// Checks the reference like [`push`] and starts watching `parts` (which the caller made).
    pub async fn start(request: &PushRequest, dest: &Path, parts: PathBuf) -> Result<EarlyPush> {
        let image = checked_reference(&request.reference, &request.policy, &request.config_name)?;
        let credentials = docker_auth(image.registry()).await?;
        let client = client_for(&image, &request.policy);
        client
            .auth(&image, &credentials.auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(registry_error("authenticating", &request.reference))
            .map_err(tried(&credentials))?;
        let (stop, mut stopping) = tokio::sync::watch::channel(false);
        let (level, dest) = (request.zstd_level, dest.to_path_buf());
        let task = tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            let mut done = BTreeMap::new();
            loop {
                let last = *stopping.borrow();
                for ready in announced(&parts, &dest, &mut seen) {
                    let part = ready.part.clone();
                    match early_layer(&client, &image, ready, level).await {
                        Ok(prebuilt) => {
                            log::info!("{}: uploaded part {part} during the dump", image.whole());
                            done.insert(part, prebuilt);
                        }
                        Err(e) => log::info!("part {part} is pushed after the dump: {e}"),
                    }
                }
                if last {
                    return done;
                }
                tokio::select! {
                    _ = stopping.changed() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                }
            }
        });
        Ok(EarlyPush { stop, task })
    }

    /// Stops watching (after one last look) and returns what was uploaded.
    pub async fn finish(self) -> BTreeMap<String, Prebuilt> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

/// The announcements in `parts` not seen yet, of a dump into `dest` (its staging directory
/// beside it, or itself) and naming only files of their own part.
pub(super) fn announced(
    parts: &Path,
    dest: &Path,
    seen: &mut BTreeSet<String>,
) -> Vec<podsnap_checkpoint::format::layout::PartReady> {
    let Ok(entries) = std::fs::read_dir(parts) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") || !seen.insert(name.clone()) {
            continue;
        }
        let ready = podsnap_checkpoint::fs::read::read_capped(&entry.path(), MAX_MANIFEST_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<podsnap_checkpoint::format::layout::PartReady>(&b)
                    .map_err(|e| e.to_string())
            });
        match ready {
            Ok(r) if announcement_fits(&r, dest) => found.push(r),
            Ok(r) => log::warn!("{name}: {} is not a part of {}", r.part, dest.display()),
            Err(e) => log::warn!("{name}: {e}"),
        }
    }
    found
}

pub(super) fn announcement_fits(r: &podsnap_checkpoint::format::layout::PartReady, dest: &Path) -> bool {
    let beside = r.root == dest
        || (r.root.parent() == dest.parent()
            && r.root.file_name().is_some_and(|n| {
                let staging = format!(".{}.tmp-", dest.file_name().unwrap_or_default().to_string_lossy());
                n.to_string_lossy().starts_with(&staging)
            }));
    beside
        && r.part.starts_with("containers/")
        && r.files
            .iter()
            .all(|f| safe_relative(f).is_ok() && part_of(f) == r.part)
}

pub(super) async fn early_layer(
    client: &Client,
    image: &Reference,
    ready: podsnap_checkpoint::format::layout::PartReady,
    level: i32,
) -> Result<Prebuilt> {
    let files = ready.files.clone();
    let layer =
        tokio::task::spawn_blocking(move || build_layer(&ready.root, &ready.part, &ready.files, level))
            .await
            .map_err(|e| refused(format!("compressing a layer: {e}")))??;
    let (digest, size) = (layer.digest.clone(), layer.size);
    upload_file(client, image, layer).await?;
    Ok(Prebuilt { files, digest, size })
}
