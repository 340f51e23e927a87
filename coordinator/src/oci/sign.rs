//! Keys and signatures: loading keys, signing a manifest digest, verifying a signature blob.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

use super::*;

pub(super) fn read_key_file(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(Error::io("read a key file", path))?;
    let mut text = String::new();
    file.take(MAX_KEY_BYTES)
        .read_to_string(&mut text)
        .map_err(Error::io("read a key file", path))?;
    Ok(text)
}

/// Reads an ed25519 private key (PKCS#8 PEM, as `openssl genpkey -algorithm ed25519` writes).
pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
    SigningKey::from_pkcs8_pem(&read_key_file(path)?).map_err(|e| {
        refused(format!(
            "signing key {}: not an ed25519 private key in PKCS#8 PEM ({e})",
            path.display()
        ))
    })
}

/// Reads an ed25519 public key (SubjectPublicKeyInfo PEM, as `openssl pkey -pubout` writes).
pub fn load_trusted_key(path: &Path) -> Result<VerifyingKey> {
    VerifyingKey::from_public_key_pem(&read_key_file(path)?).map_err(|e| {
        refused(format!(
            "trusted key {}: not an ed25519 public key in PEM ({e})",
            path.display()
        ))
    })
}

/// A key's id: the hex SHA-256 of its raw 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The signature blob stored beside a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureBlob {
    /// The signed OCI manifest's digest (`sha256:<hex>`).
    pub manifest: String,
    /// [`key_id`] of the signing key.
    pub key: String,
    /// The ed25519 signature of [`SIGNED_PREFIX`] + `manifest`, hex.
    pub signature: String,
}

/// Signs a manifest digest.
pub fn sign(key: &SigningKey, manifest_digest: &str) -> SignatureBlob {
    let message = format!("{SIGNED_PREFIX}{manifest_digest}");
    SignatureBlob {
        manifest: manifest_digest.to_owned(),
        key: key_id(&key.verifying_key()),
        signature: hex::encode(key.sign(message.as_bytes()).to_bytes()),
    }
}

/// Checks a signature blob against `manifest_digest` and the trusted keys; returns the id of
/// the key that verified it, or why not.
pub fn verify(
    blob: &SignatureBlob,
    manifest_digest: &str,
    trusted: &[VerifyingKey],
) -> std::result::Result<String, String> {
    if blob.manifest != manifest_digest {
        return Err(format!(
            "the signature is for manifest {}, not {manifest_digest}",
            blob.manifest
        ));
    }
    let Some(key) = trusted.iter().find(|k| key_id(k) == blob.key) else {
        return Err(format!(
            "it is signed by key {}, which is not a trusted key",
            blob.key
        ));
    };
    let bytes: [u8; 64] = hex::decode(&blob.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("the signature is not 64 bytes of hex")?;
    let message = format!("{SIGNED_PREFIX}{manifest_digest}");
    // Strict: no weak (small-order) key or signature component, no malleated signature.
    key.verify_strict(message.as_bytes(), &Signature::from_bytes(&bytes))
        .map_err(|_| format!("the signature by key {} does not verify", blob.key))?;
    Ok(blob.key.clone())
}

/// The tag holding the signature of the manifest with `digest`.
pub fn signature_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1) + ".sig"
}

/// Finds and checks the signature of the manifest `digest`.
pub(super) async fn check_signature(
    client: &Client,
    image: &Reference,
    auth: &RegistryAuth,
    digest: &str,
    trusted: &[VerifyingKey],
) -> std::result::Result<String, String> {
    let sig_ref = Reference::with_tag(
        image.registry().to_owned(),
        image.repository().to_owned(),
        signature_tag(digest),
    );
    let (bytes, _) = client
        .pull_manifest_raw(&sig_ref, auth, &[OCI_IMAGE_MEDIA_TYPE])
        .await
        .map_err(|e| format!("no signature at {} ({e})", sig_ref.whole()))?;
    if bytes.len() > MAX_OCI_MANIFEST_BYTES {
        return Err("the signature manifest is too large".into());
    }
    let m = parse_artifact(&bytes, "the signature manifest").map_err(|e| e.to_string())?;
    let layer = m
        .layers
        .iter()
        .find(|l| l.media_type == SIGNATURE_MEDIA_TYPE)
        .ok_or("the signature manifest holds no signature")?;
    let blob = fetch_small(client, &sig_ref, layer, MAX_SIGNATURE_BYTES, "the signature")
        .await
        .map_err(|e| e.to_string())?;
    let blob: SignatureBlob =
        serde_json::from_slice(&blob).map_err(|e| format!("the signature is not readable: {e}"))?;
    verify(&blob, digest, trusted)
}
