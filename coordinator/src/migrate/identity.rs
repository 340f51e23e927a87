//! This node's migration key and the keys of the nodes it trusts (`[migration] key` and
//! `peers` of the node configuration).
//!
//! Keys are read as the registry's keys are: the private key as ed25519 PKCS#8 PEM (`openssl
//! genpkey -algorithm ed25519`), the peers' as SubjectPublicKeyInfo PEM (`openssl pkey -pubout`).
//! The private key must be a regular file of this user, unreadable by group and others: it lets
//! whoever holds it receive pods, memory included, from every node that lists it.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use podsnap_checkpoint::config::MigrationPolicy;

use super::error::{Error, Result};
use crate::oci::key_id;

/// The largest key file read.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// This node's key.
pub struct Identity {
    signing: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// This node's identity from a key held in memory.
    pub fn from_signing_key(signing: SigningKey) -> Identity {
        let key_id = key_id(&signing.verifying_key());
        Identity { signing, key_id }
    }

    /// Reads the private key file (PKCS#8 PEM) and checks who may read it.
    pub fn load(path: &Path) -> Result<Identity> {
        let (file, meta) = open_key_file(path)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.mode() & 0o077 != 0 || meta.uid() != euid {
            return Err(bad_key(
                path,
                format!(
                    "is readable by others (owner uid {}, mode {:o}): it must belong to uid {euid} \
                     and be readable by it alone (chown {euid} {}; chmod 600 {})",
                    meta.uid(),
                    meta.mode() & 0o7777,
                    path.display(),
                    path.display()
                ),
            ));
        }
        let text = read_capped(file, path)?;
        let signing = SigningKey::from_pkcs8_pem(&text).map_err(|e| {
            bad_key(
                path,
                format!(
                    "is not an ed25519 private key in PKCS#8 PEM ({e}); make one with `openssl \
                     genpkey -algorithm ed25519 -out {}`",
                    path.display()
                ),
            )
        })?;
        Ok(Identity::from_signing_key(signing))
    }

    /// The key id (hex SHA-256 of the raw public key).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key.
    pub fn public_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The private key.
    pub(super) fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The public key as SubjectPublicKeyInfo DER (what a raw-public-key handshake presents).
    pub(super) fn spki_der(&self) -> Result<Vec<u8>> {
        self.signing
            .verifying_key()
            .to_public_key_der()
            .map(|doc| doc.as_bytes().to_vec())
            .map_err(|e| Error::Config {
                config: "this node's key".into(),
                reason: format!("cannot encode the public key: {e}"),
            })
    }
}

/// One trusted peer key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerKey {
    /// The raw 32-byte ed25519 public key.
    pub key: VerifyingKey,
    /// Its id (hex SHA-256 of the raw key).
    pub key_id: String,
    /// The file it was read from (`None`: given in memory).
    pub file: Option<PathBuf>,
}

/// The keys of the nodes pods may move to and from.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    keys: Vec<PeerKey>,
}

impl Peers {
    /// Peers from keys held in memory (a weak key is refused).
    pub fn from_keys(keys: impl IntoIterator<Item = VerifyingKey>) -> Result<Peers> {
        let mut peers = Peers::default();
        for key in keys {
            peers.add(key, None)?;
        }
        Ok(peers)
    }

    /// Reads every peer file (SubjectPublicKeyInfo PEM).
    pub fn load(paths: &[PathBuf]) -> Result<Peers> {
        let mut peers = Peers::default();
        for path in paths {
            let (file, _) = open_key_file(path)?;
            let text = read_capped(file, path)?;
            let key = VerifyingKey::from_public_key_pem(&text).map_err(|e| {
                let hint = if text.contains("PRIVATE KEY") {
                    format!(
                        "it holds a private key: list the node's public key instead (`openssl \
                         pkey -in {} -pubout`), and keep the private key on its node",
                        path.display()
                    )
                } else {
                    format!("not an ed25519 public key in PEM ({e})")
                };
                bad_key(path, hint)
            })?;
            peers.add(key, Some(path.clone()))?;
        }
        Ok(peers)
    }

    fn add(&mut self, key: VerifyingKey, file: Option<PathBuf>) -> Result<()> {
        let key_id = key_id(&key);
        if key.is_weak() {
            let name = file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| format!("key {key_id}"));
            return Err(Error::Config {
                config: name,
                reason: "a weak (small-order) ed25519 key: anyone can sign for it".into(),
            });
        }
        if !self.keys.iter().any(|k| k.key == key) {
            self.keys.push(PeerKey { key, key_id, file });
        }
        Ok(())
    }

    /// The listed peer with this raw key.
    pub fn find(&self, key: &VerifyingKey) -> Option<&PeerKey> {
        self.keys.iter().find(|k| &k.key == key)
    }

    /// Every listed peer.
    pub fn keys(&self) -> &[PeerKey] {
        &self.keys
    }

    /// Whether no peer is listed (then every peer is refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The identity and peers of `[migration]`; `config` names the configuration in errors.
pub fn load(policy: &MigrationPolicy, config: &str) -> Result<(Identity, Peers)> {
    let Some(key) = &policy.key else {
        return Err(Error::Config {
            config: config.to_owned(),
            reason: "no key: set [migration] key to this node's ed25519 private key (PKCS#8 \
                     PEM, `openssl genpkey -algorithm ed25519`) and list the nodes it exchanges \
                     pods with in [migration] peers"
                .into(),
        });
    };
    if policy.peers.is_empty() {
        return Err(Error::Config {
            config: config.to_owned(),
            reason: "no peers: list the public key files of the nodes this node exchanges pods \
                     with in [migration] peers (every other node is refused)"
                .into(),
        });
    }
    Ok((Identity::load(key)?, Peers::load(&policy.peers)?))
}

/// The key of a raw-public-key handshake: the raw ed25519 key in a SubjectPublicKeyInfo.
pub(super) fn key_from_spki(spki: &[u8]) -> std::result::Result<VerifyingKey, String> {
    VerifyingKey::from_public_key_der(spki).map_err(|e| {
        format!(
            "it presented a key that is not ed25519 ({e}; SubjectPublicKeyInfo SHA-256 {})",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(spki))
        )
    })
}

fn bad_key(path: &Path, reason: String) -> Error {
    Error::Config {
        config: format!("key file {}", path.display()),
        reason,
    }
}

fn open_key_file(path: &Path) -> Result<(File, std::fs::Metadata)> {
    let io = |source| Error::KeyFile {
        context: "cannot read the key file",
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(bad_key(path, "is not a regular file".into()));
    }
    Ok((file, meta))
}

fn read_capped(file: File, path: &Path) -> Result<String> {
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|source| Error::KeyFile {
            context: "cannot read the key file",
            path: path.to_path_buf(),
            source,
        })?;
    if text.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(bad_key(
            path,
            format!("is larger than {MAX_KEY_FILE_BYTES} bytes"),
        ));
    }
    Ok(text)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use ed25519_dalek::pkcs8::EncodePrivateKey;

    use super::*;

    /// A fixed test key.
    pub(crate) fn signing_key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    /// Writes the private key (mode 0600) and the public key of `seed` into `dir`.
    pub(crate) fn write_keys(dir: &Path, name: &str, seed: u8) -> (PathBuf, PathBuf) {
        let key = signing_key(seed);
        let private = dir.join(format!("{name}.pem"));
        let public = dir.join(format!("{name}.pub"));
        let pem = key
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .expect("pkcs8 pem");
        std::fs::write(&private, pem.as_bytes()).expect("write the private key");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let public_pem = key
            .verifying_key()
            .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .expect("spki pem");
        std::fs::write(&public, public_pem).expect("write the public key");
        (private, public)
    }

    #[test]
    fn keys_load_and_their_ids_are_the_registry_key_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a_key, a_pub) = write_keys(dir.path(), "a", 1);
        let (_, b_pub) = write_keys(dir.path(), "b", 2);
        let policy = MigrationPolicy {
            key: Some(a_key),
            peers: vec![b_pub.clone(), a_pub],
            peer_timeout_seconds: None,
        };
        let (identity, peers) = load(&policy, "test.toml").expect("loads");
        assert_eq!(identity.key_id(), key_id(&signing_key(1).verifying_key()));
        assert_eq!(peers.keys().len(), 2);
        let b = peers.find(&signing_key(2).verifying_key()).expect("b is listed");
        assert_eq!(b.file.as_deref(), Some(b_pub.as_path()));
        assert_eq!(b.key_id.len(), 64);
        assert!(peers.find(&signing_key(3).verifying_key()).is_none());
    }

    #[test]
    fn bad_key_files_are_refused_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a_key, a_pub) = write_keys(dir.path(), "a", 1);
        let policy = |key: Option<PathBuf>, peers: Vec<PathBuf>| MigrationPolicy {
            key,
            peers,
            peer_timeout_seconds: None,
        };
        let err = load(&policy(None, vec![a_pub.clone()]), "c.toml").expect_err("no key");
        assert!(err.to_string().contains("no key"), "{err}");
        let err = load(&policy(Some(a_key.clone()), vec![]), "c.toml").expect_err("no peers");
        assert!(err.to_string().contains("no peers"), "{err}");

        std::fs::set_permissions(&a_key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = Identity::load(&a_key).expect_err("group-readable");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&a_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Identity::load(&a_key).expect("0600 loads");

        let err = Peers::load(std::slice::from_ref(&a_key)).expect_err("a private key as peer");
        assert!(err.to_string().contains("-pubout"), "{err}");
        let err = Identity::load(&a_pub).expect_err("a public key as own key");
        assert!(
            err.to_string().contains("chmod") || err.to_string().contains("PKCS#8"),
            "{err}"
        );
        let garbage = dir.path().join("garbage.pub");
        std::fs::write(&garbage, "hello").expect("write");
        let err = Peers::load(&[garbage]).expect_err("garbage");
        assert!(err.to_string().contains("not an ed25519 public key"), "{err}");
        let err = Peers::load(&[dir.path().join("missing.pub")]).expect_err("missing");
        assert!(err.to_string().contains("missing.pub"), "{err}");
        let err = Peers::load(&[dir.path().to_path_buf()]).expect_err("a directory");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn a_weak_peer_key_is_refused() {
        // The identity point: small order, a signature by "anyone" verifies (non-strictly).
        let mut raw = [0u8; 32];
        raw[0] = 1;
        let weak = VerifyingKey::from_bytes(&raw).expect("decodes");
        let err = Peers::from_keys([weak]).expect_err("weak");
        assert!(err.to_string().contains("weak"), "{err}");
    }
}
