//! `podsnap pull REF DIR`: policy, signature and restore checks first, then the layers into a
//! staging directory that is verified before it is renamed into place.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use oci_client::manifest::{OciDescriptor, OCI_IMAGE_MEDIA_TYPE};
use oci_client::{Client, Reference};
use podsnap_checkpoint::config::{RegistryPolicy, RestorePolicy};
use podsnap_checkpoint::format::manifest::{Manifest, MANIFEST, MAX_MANIFEST_BYTES};
use serde::Deserialize;

use crate::error::{Error, Result};

use super::*;

/// `podsnap pull REF DIR`.
#[derive(Debug, Clone)]
pub struct PullRequest {
    pub reference: String,
    /// A checkpoint name inside the root, or a path directly inside it; must not exist.
    pub dest: PathBuf,
    pub checkpoint_root: PathBuf,
    pub policy: RegistryPolicy,
    pub config_name: String,
    /// Pulling for a restore: the restore policy checked before any layer is downloaded.
    pub restore_check: Option<RestoreCheck>,
}

/// Who a checkpoint is pulled for: checked against its manifest, before any layer is pulled.
#[derive(Debug, Clone)]
pub struct RestoreCheck {
    /// The namespace of the pod to restore; the checkpoint's own when `None` (a CLI restore
    /// that names none).
    pub namespace: Option<String>,
    /// The node's restore policy.
    pub policy: RestorePolicy,
}

impl RestoreCheck {
    /// Whether the restore may take the checkpoint of `manifest` (named `reference`): the
    /// namespace rules of the node's restore policy.
    fn check(&self, manifest: &Manifest, reference: &str, config_name: &str) -> Result<()> {
        let source = manifest.pod.namespace.as_deref();
        let target = self.namespace.as_deref().or(source).unwrap_or_default();
        podsnap_checkpoint::trust::policy::check_namespace(&self.policy, source, target, config_name)
            .map_err(|v| podsnap_checkpoint::Error::refused(reference, v).into())
    }
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullOutcome {
    pub dir: PathBuf,
    pub digest: String,
    pub layers: usize,
    pub bytes: u64,
    /// The trusted key that verified it (`None`: unsigned or untrusted, as the configuration allows).
    pub verified_by: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ArtifactManifest {
    pub(super) schema_version: u32,
    #[serde(default)]
    pub(super) media_type: Option<String>,
    #[serde(default)]
    pub(super) artifact_type: Option<String>,
    pub(super) config: OciDescriptor,
    pub(super) layers: Vec<OciDescriptor>,
}

pub(super) fn parse_artifact(bytes: &[u8], what: &str) -> Result<ArtifactManifest> {
    let m: ArtifactManifest = serde_json::from_slice(bytes)
        .map_err(|e| refused(format!("{what} is not an OCI image manifest: {e}")))?;
    if m.schema_version != 2 || m.media_type.as_deref().is_some_and(|t| t != OCI_IMAGE_MEDIA_TYPE) {
        return Err(refused(format!("{what} is not an OCI image manifest (schema 2)")));
    }
    Ok(m)
}

/// The destination inside the checkpoint root: a name, or a path whose parent is the root.
pub(super) fn destination(root: &Path, dest: &Path) -> Result<(PathBuf, String)> {
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.starts_with('.'))
        .ok_or_else(|| refused(format!("{}: not a checkpoint name", dest.display())))?
        .to_owned();
    podsnap_checkpoint::format::names::validate_name(&name)
        .map_err(|e| refused(format!("{}: not a checkpoint name: {e}", dest.display())))?;
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        let same = match (std::fs::canonicalize(parent), std::fs::canonicalize(root)) {
            (Ok(a), Ok(b)) => a == b,
            _ => parent == root,
        };
        if !same {
            return Err(refused(format!(
                "{}: a pulled checkpoint goes into the node's checkpoint root {}; give a name, or a path directly inside it",
                dest.display(),
                root.display()
            )));
        }
    }
    Ok((root.join(&name), name))
}

/// Downloads a small blob whole, capped, digest-checked.
pub(super) async fn fetch_small(
    client: &Client,
    image: &Reference,
    desc: &OciDescriptor,
    cap: usize,
    what: &str,
) -> Result<Vec<u8>> {
    if desc.size < 0 || desc.size as u64 > cap as u64 {
        return Err(refused(format!("{what} is {} bytes, more than {cap}", desc.size)));
    }
    let mut stream = client
        .pull_blob_stream(image, desc)
        .await
        .map_err(registry_error(&format!("downloading {what}"), &image.whole()))?;
    let mut data = Vec::new();
    while let Some(chunk) = stream.stream.next().await {
        let chunk = chunk.map_err(|e| refused(format!("downloading {what} ({}): {e}", image.whole())))?;
        data.extend_from_slice(&chunk);
        if data.len() > cap {
            return Err(refused(format!("{what} is larger than {cap} bytes")));
        }
    }
    if sha256_digest(&data) != desc.digest {
        return Err(refused(format!(
            "{what} does not match its digest {}",
            desc.digest
        )));
    }
    Ok(data)
}

/// Pulls `request.reference` into the node's checkpoint root.
pub async fn pull(request: &PullRequest) -> Result<PullOutcome> {
    let policy = &request.policy;
    let image = checked_reference(&request.reference, policy, &request.config_name)?;
    let (dest, name) = destination(&request.checkpoint_root, &request.dest)?;
    if dest.symlink_metadata().is_ok() {
        return Err(refused(format!("{} already exists", dest.display())));
    }
    let trusted = policy
        .trusted_keys
        .iter()
        .map(|p| load_trusted_key(p))
        .collect::<Result<Vec<_>>>()?;
    if trusted.is_empty() && !policy.allow_unsigned {
        return Err(refused(format!(
            "no [registry] trusted_keys in {}: a pulled checkpoint must verify against a trusted key \
             (or set allow_unsigned = true)",
            request.config_name
        )));
    }
    let credentials = docker_auth(image.registry()).await?;
    let auth = &credentials.auth;
    let client = client_for(&image, policy);
    let whole = request.reference.clone();
    let (bytes, _) = client
        .pull_manifest_raw(&image, auth, &[OCI_IMAGE_MEDIA_TYPE])
        .await
        .map_err(registry_error("fetching the manifest", &whole))
        .map_err(tried(&credentials))?;
    if bytes.len() > MAX_OCI_MANIFEST_BYTES {
        return Err(refused(format!(
            "the manifest of {whole} is larger than {MAX_OCI_MANIFEST_BYTES} bytes"
        )));
    }
    let digest = sha256_digest(&bytes);
    if let Some(wanted) = image.digest() {
        if wanted != digest {
            return Err(refused(format!("the manifest of {whole} has digest {digest}")));
        }
    }
    // The signature first: nothing else is downloaded for an untrusted checkpoint.
    let verified_by = match check_signature(&client, &image, auth, &digest, &trusted).await {
        Ok(key) => Some(key),
        Err(reason) if policy.allow_unsigned => {
            log::warn!("{whole}: pulling an unverified checkpoint ({reason}), as allow_unsigned permits");
            None
        }
        Err(reason) => {
            return Err(refused(format!(
                "{whole} ({digest}) is refused: {reason}; pulled checkpoints must be signed by a key in \
                 [registry] trusted_keys of {}",
                request.config_name
            )))
        }
    };
    let oci = parse_artifact(&bytes, &format!("the manifest of {whole}"))?;
    if oci.artifact_type.as_deref().is_some_and(|t| t != ARTIFACT_TYPE)
        || oci.config.media_type != CONFIG_MEDIA_TYPE
    {
        return Err(refused(format!(
            "{whole} is not a podsnap checkpoint (config {})",
            oci.config.media_type
        )));
    }
    let config = fetch_small(
        &client,
        &image,
        &oci.config,
        MAX_MANIFEST_BYTES as usize,
        "the checkpoint manifest",
    )
    .await?;
    let manifest = Manifest::parse(&config)?;
    // Whom it is for, before any layer: a pod that may not restore it gets nothing of it.
    if let Some(check) = &request.restore_check {
        check.check(&manifest, &whole, &request.config_name)?;
    }
    let expected = parts(&manifest);
    let mut claimed = BTreeSet::new();
    for layer in &oci.layers {
        let part = layer.annotations.as_ref().and_then(|a| a.get(PART_ANNOTATION));
        match part {
            Some(p)
                if layer.media_type == LAYER_MEDIA_TYPE
                    && expected.contains_key(p)
                    && claimed.insert(p.clone()) => {}
            _ => {
                return Err(refused(format!(
                    "{whole}: layer {} is not one part of the checkpoint ({} {:?})",
                    layer.digest, layer.media_type, part
                )))
            }
        }
    }
    if claimed.len() != expected.len() {
        return Err(refused(format!(
            "{whole}: the layers do not hold every part of the checkpoint"
        )));
    }

    // Staging inside the root, 0700; removed unless it is renamed into place.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&request.checkpoint_root)
        .map_err(Error::io("create the checkpoint root", &request.checkpoint_root))?;
    let staging = request
        .checkpoint_root
        .join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(Error::io("create a staging directory", &staging))?;
    let guard = Staging(Some(staging.clone()));
    write_new(&staging.join(MANIFEST), &config)?;
    let manifest = std::sync::Arc::new(manifest);
    // Layers download and unpack at once; each file's digest is checked as it is written, so
    // the staged checkpoint is not read again: what is left is the listing (every listed file
    // there, nothing else).
    // Every unpacker is waited for, failed or not, before the staging directory may go.
    let mut total = 0;
    for unpacked in futures::future::join_all(
        oci.layers
            .iter()
            .map(|layer| unpack_layer(&client, &image, layer, &staging, manifest.clone())),
    )
    .await
    {
        total += unpacked?;
    }
    let staged = staging.clone();
    tokio::task::spawn_blocking(move || Manifest::load_listed(&staged))
        .await
        .map_err(|e| refused(format!("checking the pulled checkpoint: {e}")))??;
    std::fs::rename(&staging, &dest).map_err(Error::io("move the pulled checkpoint into place", &dest))?;
    guard.keep();
    // Every file's digest was checked as it was written: sealed, a restore does not read them
    // all again (`podsnap_checkpoint::trust::seal`).
    let seals = Path::new(podsnap_checkpoint::trust::seal::SEAL_DIR);
    if let Err(e) = podsnap_checkpoint::trust::seal::record(seals, &dest, &manifest) {
        log::warn!("{e}");
    }
    Ok(PullOutcome {
        dir: dest,
        digest,
        layers: oci.layers.len(),
        bytes: total,
        verified_by,
    })
}

/// Removes a staging directory on drop unless kept.
pub(super) struct Staging(Option<PathBuf>);

impl Staging {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                log::warn!("removing {}: {e}", dir.display());
            }
        }
    }
}

/// Writes a new private file (0600, created exclusively, never through a symlink).
pub(crate) fn write_new(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(Error::io("create a checkpoint file", path))?;
    f.write_all(data)
        .map_err(Error::io("write a checkpoint file", path))
}
