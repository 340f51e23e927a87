//! `podsnap push DIR REF`: layers, the config, the OCI manifest and its signature.

use std::collections::BTreeMap;
use std::path::PathBuf;

use oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;
use oci_client::{Client, Reference};
use podsnap_checkpoint::config::RegistryPolicy;
use podsnap_checkpoint::format::manifest::{Manifest, MANIFEST};

use crate::error::{Error, Result};

use super::*;

/// `podsnap push DIR REF`.
#[derive(Debug, Clone)]
pub struct PushRequest {
    pub dir: PathBuf,
    pub reference: String,
    pub policy: RegistryPolicy,
    /// How the configuration is named in errors.
    pub config_name: String,
    pub zstd_level: i32,
    /// The checkpoint was written (and every file digested) by this process's dump just now:
    /// its listing is checked, its digests are not computed a second time. A checkpoint named
    /// on the command line is verified whole first.
    pub just_dumped: bool,
    /// Layers already built and uploaded while the dump finished ([`EarlyPush`]), by part: used
    /// as they are when the part holds the same files.
    pub prebuilt: BTreeMap<String, Prebuilt>,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushOutcome {
    /// `registry/repository@sha256:...`
    pub pushed: String,
    pub digest: String,
    pub layers: usize,
    /// Layers the registry did not have.
    pub uploaded: usize,
    pub uploaded_bytes: u64,
    /// The signing key's id (`None`: pushed unsigned, as the configuration allows).
    pub signed_by: Option<String>,
    /// Layers uploaded while the dump was still finishing.
    pub early: usize,
}

/// What the push loop gets for a part: a layer to upload, or one uploaded already.
pub(super) enum Ready {
    Built(Layer),
    Uploaded { part: String, digest: String, size: u64 },
}

pub(super) fn layer_descriptor(part: &str, digest: &str, size: u64) -> serde_json::Value {
    descriptor(
        LAYER_MEDIA_TYPE,
        digest,
        size,
        Some(BTreeMap::from([(PART_ANNOTATION.to_owned(), part.to_owned())])),
    )
}

pub(super) fn registry_error(
    what: &str,
    reference: &str,
) -> impl FnOnce(oci_client::errors::OciDistributionError) -> Error {
    let what = what.to_owned();
    let reference = reference.to_owned();
    move |e| refused(format!("{what} ({reference}): {e}"))
}

/// Uploads a blob from a file unless the registry has it; true when it was uploaded.
pub(super) async fn upload_file(client: &Client, image: &Reference, layer: Layer) -> Result<bool> {
    let whole = image.whole();
    if client
        .blob_exists(image, &layer.digest)
        .await
        .map_err(registry_error("checking for a layer", &whole))?
    {
        return Ok(false);
    }
    let file = tokio::fs::File::from_std(layer.file);
    let stream = futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(oci_client::errors::OciDistributionError::IoError(e)), file)),
        }
    });
    client
        .push_blob_stream(image, stream, &layer.digest, Some(layer.size))
        .await
        .map_err(registry_error(&format!("uploading part {}", layer.part), &whole))?;
    Ok(true)
}

pub(super) async fn upload_bytes(
    client: &Client,
    image: &Reference,
    data: Vec<u8>,
    digest: &str,
) -> Result<()> {
    let whole = image.whole();
    if !client
        .blob_exists(image, digest)
        .await
        .map_err(registry_error("checking for a blob", &whole))?
    {
        client
            .push_blob(image, data, digest)
            .await
            .map_err(registry_error("uploading a blob", &whole))?;
    }
    Ok(())
}

pub(super) fn descriptor(
    media_type: &str,
    digest: &str,
    size: u64,
    annotations: Option<BTreeMap<String, String>>,
) -> serde_json::Value {
    let mut d = serde_json::json!({ "mediaType": media_type, "digest": digest, "size": size });
    if let Some(a) = annotations {
        d["annotations"] = serde_json::json!(a);
    }
    d
}

pub(super) async fn push_manifest(client: &Client, image: &Reference, body: &[u8]) -> Result<()> {
    client
        .push_manifest_raw(
            image,
            body.to_vec(),
            http::HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE),
        )
        .await
        .map_err(registry_error("uploading the manifest", &image.whole()))?;
    Ok(())
}

/// Pushes the checkpoint at `request.dir` to `request.reference`, signed with the node's key.
pub async fn push(request: &PushRequest) -> Result<PushOutcome> {
    let policy = &request.policy;
    let image = checked_reference(&request.reference, policy, &request.config_name)?;
    let key = match &policy.signing_key {
        Some(path) => Some(load_signing_key(path)?),
        None if policy.allow_unsigned => {
            log::warn!(
                "pushing {} unsigned: no [registry] signing_key",
                request.reference
            );
            None
        }
        None => {
            return Err(refused(format!(
            "no [registry] signing_key in {}: pushed checkpoints are signed (or set allow_unsigned = true)",
            request.config_name
        )))
        }
    };
    let dir = request.dir.clone();
    let just_dumped = request.just_dumped;
    let manifest = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            if just_dumped {
                Manifest::load_listed(&dir)
            } else {
                Manifest::load_verified(&dir)
            }
        }
    })
    .await
    .map_err(|e| refused(format!("verifying {}: {e}", request.dir.display())))??;
    let config_bytes = std::fs::read(dir.join(MANIFEST)).map_err(Error::io("read", dir.join(MANIFEST)))?;
    let config_digest = sha256_digest(&config_bytes);
    let credentials = docker_auth(image.registry()).await?;
    let client = client_for(&image, policy);
    client
        .auth(&image, &credentials.auth, oci_client::RegistryOperation::Push)
        .await
        .map_err(registry_error("authenticating", &request.reference))
        .map_err(tried(&credentials))?;

    let mut descriptors = Vec::new();
    let (mut uploaded, mut uploaded_bytes, mut early) = (0, 0, 0);
    // Compression runs one layer ahead of the upload: the next part is compressed while the
    // last one goes to the registry (at most two compressed layers on disk at once).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Ready>>(1);
    let compressor = tokio::task::spawn_blocking({
        let (dir, level, parts) = (dir.clone(), request.zstd_level, parts(&manifest));
        let prebuilt = request.prebuilt.clone();
        move || {
            for (part, files) in parts {
                let layer = match prebuilt.get(&part) {
                    Some(p) if p.files == files => Ok(Ready::Uploaded {
                        part,
                        digest: p.digest.clone(),
                        size: p.size,
                    }),
                    _ => build_layer(&dir, &part, &files, level).map(Ready::Built),
                };
                let failed = layer.is_err();
                if tx.blocking_send(layer).is_err() || failed {
                    break; // the upload stopped (its error says why), or this layer failed
                }
            }
        }
    });
    while let Some(layer) = rx.recv().await {
        let layer = match layer {
            Ok(Ready::Built(layer)) => layer,
            Ok(Ready::Uploaded { part, digest, size }) => {
                descriptors.push(layer_descriptor(&part, &digest, size));
                early += 1;
                continue;
            }
            Err(e) => {
                drop(rx);
                let _ = compressor.await;
                return Err(e);
            }
        };
        descriptors.push(layer_descriptor(&layer.part, &layer.digest, layer.size));
        let size = layer.size;
        let part = layer.part.clone();
        if upload_file(&client, &image, layer)
            .await
            .map_err(tried(&credentials))?
        {
            log::info!("{}: uploaded part {part} ({size} bytes)", request.reference);
            uploaded += 1;
            uploaded_bytes += size;
        } else {
            log::info!("{}: part {part} is already in the registry", request.reference);
        }
    }
    compressor
        .await
        .map_err(|e| refused(format!("compressing the layers: {e}")))?;
    let config_size = config_bytes.len() as u64;
    upload_bytes(&client, &image, config_bytes, &config_digest)
        .await
        .map_err(tried(&credentials))?;
    let layers = descriptors.len();
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_IMAGE_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, &config_digest, config_size, None),
        "layers": descriptors,
        "annotations": {
            "io.podsnap.checkpoint.pod": podsnap_checkpoint::node::store::pod_of(&manifest),
            "org.opencontainers.image.created": manifest.created_unix.to_string(),
        },
    }))
    .map_err(|e| refused(format!("encoding the manifest: {e}")))?;
    let digest = sha256_digest(&body);
    push_manifest(&client, &image, &body)
        .await
        .map_err(tried(&credentials))?;

    let signed_by = match key {
        Some(key) => {
            let blob = sign(&key, &digest);
            let sig_bytes =
                serde_json::to_vec(&blob).map_err(|e| refused(format!("encoding the signature: {e}")))?;
            let sig_digest = sha256_digest(&sig_bytes);
            let sig_size = sig_bytes.len() as u64;
            upload_bytes(&client, &image, sig_bytes, &sig_digest).await?;
            let empty_digest = sha256_digest(EMPTY_BLOB);
            upload_bytes(&client, &image, EMPTY_BLOB.to_vec(), &empty_digest).await?;
            let sig_manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_IMAGE_MEDIA_TYPE,
                "artifactType": SIGNATURE_MEDIA_TYPE,
                "config": descriptor(EMPTY_MEDIA_TYPE, &empty_digest, EMPTY_BLOB.len() as u64, None),
                "layers": [descriptor(SIGNATURE_MEDIA_TYPE, &sig_digest, sig_size, None)],
            }))
            .map_err(|e| refused(format!("encoding the signature manifest: {e}")))?;
            let sig_ref = Reference::with_tag(
                image.registry().to_owned(),
                image.repository().to_owned(),
                signature_tag(&digest),
            );
            push_manifest(&client, &sig_ref, &sig_manifest).await?;
            Some(blob.key)
        }
        None => None,
    };
    Ok(PushOutcome {
        pushed: format!("{}/{}@{digest}", image.registry(), image.repository()),
        digest,
        layers,
        uploaded,
        uploaded_bytes,
        signed_by,
        early,
    })
}
