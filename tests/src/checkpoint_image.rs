//! A KEP-2008 container checkpoint archive (what CRI CheckpointContainer writes) pushed to a
//! registry as the OCI checkpoint image containerd's CRI restores from.
//!
//! containerd 2.1 CRI restores a container when CreateContainer's image is a local image whose
//! manifest (or index) carries the annotation `org.criu.checkpoint.container.name`: it mounts
//! the image's rootfs (the unpacked layer), reads `spec.dump`, `config.dump` and
//! `status.dump` there, pulls the checkpoint's base image by `config.dump`'s
//! `rootfsImageRef`, copies the layer's files into the new container's state directory and
//! runs `runc restore` from its `checkpoint/` at StartContainer. The image is what CRI-O's
//! docs build with buildah (`buildah add` of the archive, the annotation, `buildah commit`):
//! one layer whose files are the archive's. CheckpointContainer's archive is an uncompressed
//! tar of those files, so it is pushed as the layer blob itself, unchanged (the layer's
//! diff id is its digest):
//! ```text
//! manifest   application/vnd.oci.image.manifest.v1+json
//!            annotations: org.criu.checkpoint.container.name = <container>
//! config     {"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[<layer>]}}
//! layer      application/vnd.oci.image.layer.v1.tar: the archive file, byte for byte
//! ```

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

/// The annotation containerd's CRI (through checkpointctl's metadata) looks for.
pub const CHECKPOINT_NAME_ANNOTATION: &str = "org.criu.checkpoint.container.name";

const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// What [`push_archive`] pushed.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The manifest's digest.
    pub digest: String,
    /// Bytes uploaded (layer, config and manifest).
    pub bytes: u64,
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Pushes the checkpoint archive `archive` of container `container` to `reference` (a
/// registry on the loopback, reached over plain HTTP) as a checkpoint image; blocking, on a
/// runtime of its own (callers push several at once from threads).
pub fn push_archive(reference: &str, archive: &Path, container: &str) -> Result<Pushed> {
    let image: Reference = reference
        .parse()
        .with_context(|| format!("image reference {reference}"))?;
    let layer = std::fs::read(archive).with_context(|| format!("reading {}", archive.display()))?;
    let layer_digest = sha256(&layer);
    let layer_size = layer.len() as u64;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": layer_size }],
        "annotations": { CHECKPOINT_NAME_ANNOTATION: container },
    }))?;
    let bytes = layer_size + config.len() as u64 + manifest.len() as u64;
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![image.registry().to_owned()]),
        use_monolithic_push: true,
        ..Default::default()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        client
            .auth(
                &image,
                &RegistryAuth::Anonymous,
                oci_client::RegistryOperation::Push,
            )
            .await
            .map_err(|e| anyhow!("authenticating to {reference}: {e}"))?;
        client
            .push_blob(&image, layer, &layer_digest)
            .await
            .map_err(|e| anyhow!("uploading the archive of {container} to {reference}: {e}"))?;
        client
            .push_blob(&image, config, &config_digest)
            .await
            .map_err(|e| anyhow!("uploading the config to {reference}: {e}"))?;
        client
            .push_manifest_raw(
                &image,
                manifest.clone(),
                http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
            )
            .await
            .map_err(|e| anyhow!("uploading the manifest to {reference}: {e}"))?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(Pushed {
        digest: sha256(&manifest),
        bytes,
    })
}
