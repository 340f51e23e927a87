//! Pod checkpoints as signed OCI artifacts in a registry: `podsnap push DIR REF` and
//! `podsnap pull REF DIR`.
//!
//! ```text
//! REF (tag or digest) -> OCI image manifest  application/vnd.oci.image.manifest.v1+json
//!   artifactType   application/vnd.podsnap.checkpoint.v1
//!   config         the checkpoint's manifest.json       application/vnd.podsnap.checkpoint.config.v1+json
//!   layers         one tar+zstd per part                application/vnd.podsnap.checkpoint.layer.v1.tar+zstd
//!                  annotation io.podsnap.checkpoint.part = containers/<name> | volumes/<v>.tar | pod-and-host
//! <repository>:sha256-<hex of the manifest digest>.sig -> OCI image manifest
//!   artifactType   application/vnd.podsnap.checkpoint.signature.v1+json
//!   config         the empty descriptor ({}, application/vnd.oci.empty.v1+json)
//!   layers         one signature blob                   application/vnd.podsnap.checkpoint.signature.v1+json
//!                  {"manifest": "sha256:...", "key": "<hex SHA-256 of the raw 32-byte public key>",
//!                   "signature": "<hex of the 64-byte ed25519 signature>"}
//! ```
//!
//! The signed message is `podsnap.io/checkpoint-signature/v1 ` followed by the manifest digest
//! (`sha256:<hex>`). The manifest digest covers the config (the checkpoint's manifest.json, which
//! holds the size and digest of every file a restore reads) and every layer's digest, so one
//! signature covers the whole checkpoint.
//!
//! Each layer holds the part's files only (regular files, mode 0600, owner 0:0, mtime 0, in
//! path order), so an unchanged part compresses to the same blob and is not uploaded again.
//!
//! A pull refuses a registry the node configuration does not allow before any network call,
//! verifies the signature against the trusted keys before it downloads a layer, checks the
//! node's restore policy against the checkpoint's manifest (the config blob) when it pulls for
//! a restore ([`RestoreCheck`]: a pod that may not restore the checkpoint gets nothing of it
//! pulled), then streams
//! each layer through the zstd decoder into a staging directory inside the checkpoint root
//! (`.<name>.tmp-<pid>`, 0700, files 0600): only regular files the checkpoint's manifest lists,
//! in the part the layer claims, of exactly the listed size (a GNU long name of at most 64 KiB
//! names one; any other kind of entry is refused before its data is read). The staging directory must pass
//! [`Manifest::load_verified`] (every file's digest, nothing unlisted) before it is renamed
//! into place; on any failure it is removed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use podsnap_checkpoint::config::{RegistryPolicy, RestorePolicy};
use podsnap_checkpoint::manifest::{
    read_full, safe_relative, Manifest, StreamDigest, MANIFEST, MAX_MANIFEST_BYTES,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// `artifactType` of a checkpoint's OCI manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.podsnap.checkpoint.v1";
/// Media type of the config blob: the checkpoint's manifest.json.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.podsnap.checkpoint.config.v1+json";
/// Media type of a layer: a tar of one part of the checkpoint, zstd-compressed.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.podsnap.checkpoint.layer.v1.tar+zstd";
/// Media type (and artifact type) of a signature.
pub const SIGNATURE_MEDIA_TYPE: &str = "application/vnd.podsnap.checkpoint.signature.v1+json";
/// The layer annotation naming the part a layer holds.
pub const PART_ANNOTATION: &str = "io.podsnap.checkpoint.part";
/// The part holding everything outside `containers/` and `volumes/` (pod/, host/).
pub const POD_AND_HOST_PART: &str = "pod-and-host";
/// What precedes the manifest digest in the signed message.
pub const SIGNED_PREFIX: &str = "podsnap.io/checkpoint-signature/v1 ";
/// The default zstd level: 1. Checkpoint memory compresses almost as well as at 3 (3% more
/// bytes on the heap-like bench memory) for three quarters of the CPU (`layer_compression`:
/// 916 against 689 MiB/s), and on a node with few cores to spare the compression is much of a
/// migration's downtime (`migration_downtime`: push 0.87x, downtime 0.87x of level 3's).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_BLOB: &[u8] = b"{}";
/// The largest OCI manifest (checkpoint or signature) read.
const MAX_OCI_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// The largest signature blob read.
const MAX_SIGNATURE_BYTES: usize = 64 * 1024;
/// The longest name a layer's long-name entry may give (checkpoint paths are far shorter).
const MAX_LONG_NAME_BYTES: u64 = 64 * 1024;
/// The largest key file read.
const MAX_KEY_BYTES: u64 = 64 * 1024;

/// The part of the checkpoint a file (path relative to the checkpoint) belongs to.
pub fn part_of(path: &str) -> String {
    let mut it = path.splitn(3, '/');
    match (it.next(), it.next(), it.next()) {
        (Some("containers"), Some(name), Some(_)) => format!("containers/{name}"),
        (Some("volumes"), Some(file), None) => format!("volumes/{file}"),
        _ => POD_AND_HOST_PART.to_owned(),
    }
}

/// The checkpoint's files grouped by part, each part's files in path order.
pub fn parts(manifest: &Manifest) -> BTreeMap<String, Vec<String>> {
    let mut parts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for path in manifest.files.keys() {
        parts.entry(part_of(path)).or_default().push(path.clone());
    }
    parts
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn refused(message: impl Into<String>) -> Error {
    Error::Registry(message.into())
}

// ---------------------------------------------------------------------------------------------
// References, policy, the client
// ---------------------------------------------------------------------------------------------

/// Parses an image reference and checks its registry is allowed (no network call).
pub fn checked_reference(reference: &str, policy: &RegistryPolicy, config: &str) -> Result<Reference> {
    let parsed = Reference::from_str(reference)
        .map_err(|e| refused(format!("{reference:?} is not an image reference: {e}")))?;
    let registry = parsed.registry();
    if !policy.allows(registry) {
        return Err(refused(format!(
            "registry {registry} (of {reference}) is not allowed on this node: add it to [registry] \
             allowed in {config}"
        )));
    }
    Ok(parsed)
}

fn client_for(reference: &Reference, policy: &RegistryPolicy) -> Client {
    let registry = reference.registry().to_owned();
    let protocol = if policy.is_insecure(&registry) {
        ClientProtocol::HttpsExcept(vec![registry])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        // One streamed PUT per layer: a chunked upload sends a PATCH request per chunk the
        // stream yields (hundreds for a layer of a few hundred MiB).
        use_monolithic_push: true,
        ..Default::default()
    })
}

/// Docker Hub's key in a Docker config file, whatever name a reference gives the Hub.
pub const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";
/// What a credential helper says when it holds nothing for a server.
const HELPER_NOT_FOUND: &str = "credentials not found in native keychain";
/// How long a credential helper may take to answer.
const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The largest answer read from a credential helper.
const MAX_HELPER_BYTES: usize = 64 * 1024;

/// Credentials for a registry, and what they are: the registry errors of a push or pull name
/// them (`anonymous: no entry for ... in ...`, `user "ci" from credential helper ...`), so an
/// operator sees which credentials a refusal answered.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub auth: RegistryAuth,
    pub source: String,
}

/// Credentials for `registry` (as a reference names it) from the Docker config file
/// (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`), found as docker finds them:
/// Docker Hub (`docker.io`, `index.docker.io`, `registry-1.docker.io`) under
/// `https://index.docker.io/v1/`, every other registry under `host[:port]` (a key written as a
/// URL, `https://host/v1/`, matches its host); a credential helper (`credHelpers` for this
/// registry, else `credsStore`) is asked with `docker-credential-<name> get`, and when it has
/// none the pull goes anonymous, as docker's does; else `auths` (`auth`, base64 `user:password`,
/// or `username`/`password`). Anonymous when there is no file or no entry.
pub async fn docker_auth(registry: &str) -> Result<Credentials> {
    let path = match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("config.json"),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".docker/config.json"),
            None => {
                return Ok(Credentials {
                    auth: RegistryAuth::Anonymous,
                    source: "anonymous: neither DOCKER_CONFIG nor HOME names a Docker config file".into(),
                })
            }
        },
    };
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Credentials {
                auth: RegistryAuth::Anonymous,
                source: format!("anonymous: there is no {}", path.display()),
            })
        }
        Err(e) => return Err(Error::io("read the Docker config file", &path)(e)),
    };
    credentials_from(&text, &path, registry, None)
        .await
        .map_err(|reason| refused(format!("{}: {reason}", path.display())))
}

/// Whether `host` names Docker Hub.
fn is_docker_hub(host: &str) -> bool {
    matches!(
        host.to_ascii_lowercase().as_str(),
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

/// The key Docker keeps `registry`'s credentials under.
pub fn docker_server_address(registry: &str) -> String {
    if is_docker_hub(registry) {
        DOCKER_HUB_SERVER.to_owned()
    } else {
        registry.to_owned()
    }
}

/// The registry a Docker config key names, compared case-insensitively, the Hub as one:
/// `https://host:5000/v1/` -> `host:5000`.
fn key_registry(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    if is_docker_hub(&host) {
        "docker.io".to_owned()
    } else {
        host
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// [`docker_auth`] on the config file `text` (read from `path`); credential helpers are run
/// from `helper_dir` when given, else found through `PATH`.
async fn credentials_from(
    text: &[u8],
    path: &Path,
    registry: &str,
    helper_dir: Option<&Path>,
) -> std::result::Result<Credentials, String> {
    let config: DockerConfig =
        serde_json::from_slice(text).map_err(|e| format!("not a Docker config file: {e}"))?;
    let server = docker_server_address(registry);
    let wanted = key_registry(&server);
    let shown = path.display();
    let helper = config
        .cred_helpers
        .get(&server)
        .or_else(|| {
            config
                .cred_helpers
                .iter()
                .find(|(key, _)| key_registry(key) == wanted)
                .map(|(_, helper)| helper)
        })
        .map(|helper| (helper.as_str(), "credHelpers"))
        .or(config.creds_store.as_deref().map(|helper| (helper, "credsStore")))
        .filter(|(helper, _)| !helper.is_empty());
    if let Some((helper, how)) = helper {
        let asked = format!("credential helper docker-credential-{helper} ({how} in {shown}) for {server}");
        return match run_helper(helper_dir, helper, &server).await? {
            Some((user, _)) if user == "<token>" => Err(format!(
                "{asked} answers with an identity token, which podsnap cannot use: store a user \
                 and password (or access token) instead"
            )),
            Some((user, secret)) => Ok(Credentials {
                source: format!("user {user:?} from {asked}"),
                auth: RegistryAuth::Basic(user, secret),
            }),
            None => Ok(Credentials {
                auth: RegistryAuth::Anonymous,
                source: format!("anonymous: {asked} has none"),
            }),
        };
    }
    let entry = config
        .auths
        .get_key_value(&server)
        .or_else(|| config.auths.iter().find(|(key, _)| key_registry(key) == wanted));
    let Some((key, entry)) = entry else {
        return Ok(Credentials {
            auth: RegistryAuth::Anonymous,
            source: format!("anonymous: no entry for {server} in {shown}"),
        });
    };
    let from = format!("auths.{key:?} of {shown}");
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| format!("{from}: auth is not base64: {e}"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| format!("{from}: auth is not UTF-8"))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| format!("{from}: auth is not user:password"))?;
        return Ok(Credentials {
            auth: RegistryAuth::Basic(user.to_owned(), password.to_owned()),
            source: format!("user {user:?} from {from}"),
        });
    }
    match (&entry.username, &entry.password, &entry.identitytoken) {
        (Some(u), Some(p), _) => Ok(Credentials {
            auth: RegistryAuth::Basic(u.clone(), p.clone()),
            source: format!("user {u:?} from {from}"),
        }),
        (_, _, Some(_)) => Err(format!(
            "{from} holds an identity token, which podsnap cannot use: log in with a user and \
             password (or access token)"
        )),
        _ => Ok(Credentials {
            auth: RegistryAuth::Anonymous,
            source: format!("anonymous: {from} holds no credentials"),
        }),
    }
}

/// What a credential helper's `get` answers.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// `docker-credential-<helper> get` for `server` (on its standard input): `(user, secret)`, or
/// `None` when it holds nothing for the server.
async fn run_helper(
    dir: Option<&Path>,
    helper: &str,
    server: &str,
) -> std::result::Result<Option<(String, String)>, String> {
    use tokio::io::AsyncWriteExt;
    let program = format!("docker-credential-{helper}");
    let who = format!("credential helper {program}");
    if helper.contains('/') {
        return Err(format!("{who}: a helper is named, not given by path"));
    }
    let mut cmd = tokio::process::Command::new(match dir {
        Some(dir) => dir.join(&program),
        None => PathBuf::from(&program),
    });
    cmd.arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("{who} could not run: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .await
            .map_err(|e| format!("{who}: writing the server: {e}"))?;
    }
    let out = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{who} did not answer within {HELPER_TIMEOUT:?}"))?
        .map_err(|e| format!("{who}: {e}"))?;
    let said = |bytes: &[u8]| {
        String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_HELPER_BYTES)])
            .trim()
            .to_owned()
    };
    if !out.status.success() {
        let (stdout, stderr) = (said(&out.stdout), said(&out.stderr));
        if stdout.contains(HELPER_NOT_FOUND) || stderr.contains(HELPER_NOT_FOUND) {
            return Ok(None);
        }
        return Err(format!("{who} failed ({}): {stdout} {stderr}", out.status));
    }
    if out.stdout.len() > MAX_HELPER_BYTES {
        return Err(format!("{who} answered more than {MAX_HELPER_BYTES} bytes"));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{who} answered something that is not its JSON: {e}"))?;
    if answer.username.is_empty() && answer.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some((answer.username, answer.secret)))
}

/// Adds the credentials tried to a registry error.
fn tried(credentials: &Credentials) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::Registry(message) => {
            Error::Registry(format!("{message} (credentials tried: {})", credentials.source))
        }
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Keys and signatures
// ---------------------------------------------------------------------------------------------

fn read_key_file(path: &Path) -> Result<String> {
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

// ---------------------------------------------------------------------------------------------
// Push
// ---------------------------------------------------------------------------------------------

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
enum Ready {
    Built(Layer),
    Uploaded { part: String, digest: String, size: u64 },
}

fn layer_descriptor(part: &str, digest: &str, size: u64) -> serde_json::Value {
    descriptor(
        LAYER_MEDIA_TYPE,
        digest,
        size,
        Some(BTreeMap::from([(PART_ANNOTATION.to_owned(), part.to_owned())])),
    )
}

/// A compressed layer in a temporary file.
struct Layer {
    part: String,
    file: File,
    digest: String,
    size: u64,
}

/// Counts and hashes what passes through.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
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
fn build_layer(dir: &Path, part: &str, files: &[String], level: i32) -> Result<Layer> {
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

fn registry_error(
    what: &str,
    reference: &str,
) -> impl FnOnce(oci_client::errors::OciDistributionError) -> Error {
    let what = what.to_owned();
    let reference = reference.to_owned();
    move |e| refused(format!("{what} ({reference}): {e}"))
}

/// Uploads a blob from a file unless the registry has it; true when it was uploaded.
async fn upload_file(client: &Client, image: &Reference, layer: Layer) -> Result<bool> {
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

async fn upload_bytes(client: &Client, image: &Reference, data: Vec<u8>, digest: &str) -> Result<()> {
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

fn descriptor(
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

async fn push_manifest(client: &Client, image: &Reference, body: &[u8]) -> Result<()> {
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
            "io.podsnap.checkpoint.pod": podsnap_checkpoint::store::pod_of(&manifest),
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

/// A layer built and uploaded while its dump was finishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prebuilt {
    /// The part's files it holds (relative to the checkpoint), sorted.
    pub files: Vec<String>,
    pub digest: String,
    pub size: u64,
}

/// Uploads the container parts a dump announces in `<dest>.parts`
/// ([`podsnap_checkpoint::dump::PartReady`]) while the dump still digests, writes the manifest
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
fn announced(
    parts: &Path,
    dest: &Path,
    seen: &mut BTreeSet<String>,
) -> Vec<podsnap_checkpoint::dump::PartReady> {
    let Ok(entries) = std::fs::read_dir(parts) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") || !seen.insert(name.clone()) {
            continue;
        }
        let ready = podsnap_checkpoint::manifest::read_capped(&entry.path(), MAX_MANIFEST_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<podsnap_checkpoint::dump::PartReady>(&b).map_err(|e| e.to_string())
            });
        match ready {
            Ok(r) if announcement_fits(&r, dest) => found.push(r),
            Ok(r) => log::warn!("{name}: {} is not a part of {}", r.part, dest.display()),
            Err(e) => log::warn!("{name}: {e}"),
        }
    }
    found
}

fn announcement_fits(r: &podsnap_checkpoint::dump::PartReady, dest: &Path) -> bool {
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

async fn early_layer(
    client: &Client,
    image: &Reference,
    ready: podsnap_checkpoint::dump::PartReady,
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

// ---------------------------------------------------------------------------------------------
// Pull
// ---------------------------------------------------------------------------------------------

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
        podsnap_checkpoint::policy::check_namespace(&self.policy, source, target, config_name)
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
struct ArtifactManifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    config: OciDescriptor,
    layers: Vec<OciDescriptor>,
}

fn parse_artifact(bytes: &[u8], what: &str) -> Result<ArtifactManifest> {
    let m: ArtifactManifest = serde_json::from_slice(bytes)
        .map_err(|e| refused(format!("{what} is not an OCI image manifest: {e}")))?;
    if m.schema_version != 2 || m.media_type.as_deref().is_some_and(|t| t != OCI_IMAGE_MEDIA_TYPE) {
        return Err(refused(format!("{what} is not an OCI image manifest (schema 2)")));
    }
    Ok(m)
}

/// The destination inside the checkpoint root: a name, or a path whose parent is the root.
fn destination(root: &Path, dest: &Path) -> Result<(PathBuf, String)> {
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.starts_with('.'))
        .ok_or_else(|| refused(format!("{}: not a checkpoint name", dest.display())))?
        .to_owned();
    podsnap_checkpoint::manifest::validate_name(&name)
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
async fn fetch_small(
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

/// Finds and checks the signature of the manifest `digest`.
async fn check_signature(
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
    // all again (`podsnap_checkpoint::seal`).
    let seals = Path::new(podsnap_checkpoint::seal::SEAL_DIR);
    if let Err(e) = podsnap_checkpoint::seal::record(seals, &dest, &manifest) {
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
struct Staging(Option<PathBuf>);

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

fn write_new(path: &Path, data: &[u8]) -> Result<()> {
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

/// A blocking reader over the chunks of an async download.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Streams one layer through the zstd decoder into `staging`; returns the compressed size.
async fn unpack_layer(
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
    let mut download = client
        .pull_blob_stream(image, layer)
        .await
        .map_err(registry_error(
            &format!("downloading part {part}"),
            &image.whole(),
        ))?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let expected = (layer.digest.clone(), layer.size.max(0) as u64);
    let staging = staging.to_path_buf();
    let unpacker = tokio::task::spawn_blocking({
        let part = part.clone();
        move || {
            unpack_stream(
                ChannelReader {
                    rx,
                    current: bytes::Bytes::new(),
                },
                &part,
                &staging,
                &manifest,
                expected,
            )
        }
    });
    while let Some(chunk) = download.stream.next().await {
        let failed = chunk.is_err();
        if tx.send(chunk).await.is_err() || failed {
            break; // the unpacker stopped (its error says why), or the download failed
        }
    }
    drop(tx);
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
fn unpack_stream(
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
            let rel = safe_relative(&name).map_err(|e| format!("entry {name:?}: {e}"))?;
            let listed = manifest
                .files
                .get(&name)
                .ok_or_else(|| format!("entry {name:?} is not a file of the checkpoint"))?;
            if part_of(&name) != part {
                return Err(format!("entry {name:?} belongs to part {}", part_of(&name)));
            }
            if entry.size() != listed.size {
                return Err(format!(
                    "entry {name:?} is {} bytes, the manifest lists {}",
                    entry.size(),
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
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| format!("creating {}: {e}", path.display()))?;
            let mut digest = StreamDigest::new(manifest.digest_algorithm);
            let mut copied = 0u64;
            loop {
                let n = read_full(&mut entry, &mut buf).map_err(|e| format!("entry {name:?}: {e}"))?;
                if n == 0 {
                    break;
                }
                digest.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                copied += n as u64;
            }
            if copied != listed.size {
                return Err(format!("entry {name:?} ends after {copied} bytes"));
            }
            let got = digest.finish();
            if !got.eq_ignore_ascii_case(&listed.digest) {
                return Err(format!(
                    "entry {name:?} has digest {got}, the manifest lists {}",
                    listed.digest
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_signature_verifies_only_for_its_manifest_and_a_trusted_key() {
        let digest = sha256_digest(b"manifest");
        let blob = sign(&key(1), &digest);
        let trusted = [key(2).verifying_key(), key(1).verifying_key()];
        assert_eq!(
            verify(&blob, &digest, &trusted),
            Ok(key_id(&key(1).verifying_key()))
        );
        // Another manifest.
        let other = sha256_digest(b"other");
        assert!(verify(&blob, &other, &trusted).is_err());
        let mut moved = blob.clone();
        moved.manifest = other.clone();
        assert!(verify(&moved, &other, &trusted)
            .expect_err("must be refused")
            .contains("does not verify"));
        // An unknown key.
        let err = verify(&blob, &digest, &[key(2).verifying_key()]).expect_err("must be refused");
        assert!(err.contains("not a trusted key"), "{err}");
        // A key id pointing at a trusted key, a signature made by another.
        let mut forged = sign(&key(3), &digest);
        forged.key = key_id(&key(1).verifying_key());
        assert!(verify(&forged, &digest, &trusted)
            .expect_err("must be refused")
            .contains("does not verify"));
        // Garbage.
        let mut garbage = blob.clone();
        garbage.signature = "zz".into();
        assert!(verify(&garbage, &digest, &trusted).is_err());
    }

    #[test]
    fn pem_keys_from_openssl_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let private = dir.path().join("k.pem");
        let public = dir.path().join("k.pub");
        let run = |args: &[&str]| {
            let s = std::process::Command::new("openssl")
                .args(args)
                .status()
                .expect("openssl");
            assert!(s.success(), "openssl {args:?}");
        };
        run(&[
            "genpkey",
            "-algorithm",
            "ed25519",
            "-out",
            private.to_str().expect("utf8"),
        ]);
        run(&[
            "pkey",
            "-in",
            private.to_str().expect("utf8"),
            "-pubout",
            "-out",
            public.to_str().expect("utf8"),
        ]);
        let sk = load_signing_key(&private).expect("private key");
        let pk = load_trusted_key(&public).expect("public key");
        assert_eq!(sk.verifying_key(), pk);
        assert!(load_signing_key(&public).is_err());
        assert!(load_trusted_key(&private).is_err());
    }

    #[test]
    fn parts_split_containers_volumes_and_the_rest() {
        assert_eq!(part_of("containers/web/criu/pages-1.img"), "containers/web");
        assert_eq!(part_of("containers/web/config.json"), "containers/web");
        assert_eq!(part_of("volumes/data.tar"), "volumes/data.tar");
        assert_eq!(part_of("pod/dev-shm.tar"), POD_AND_HOST_PART);
        assert_eq!(part_of("host/cpuinfo.img"), POD_AND_HOST_PART);
        assert_eq!(part_of("volumes/x/y"), POD_AND_HOST_PART);
        assert_eq!(signature_tag("sha256:ab"), "sha256-ab.sig");
    }

    #[test]
    fn only_announcements_of_the_dump_and_of_their_own_part_are_taken() {
        let dest = Path::new("/root/ckpt/web");
        let ready = |root: &str, part: &str, files: &[&str]| podsnap_checkpoint::dump::PartReady {
            root: PathBuf::from(root),
            part: part.to_owned(),
            files: files.iter().map(|f| (*f).to_owned()).collect(),
        };
        let app = ["containers/app/spec.dump", "containers/app/checkpoint/core-1.img"];
        assert!(announcement_fits(
            &ready("/root/ckpt/web", "containers/app", &app),
            dest
        ));
        assert!(announcement_fits(
            &ready("/root/ckpt/.web.tmp-77", "containers/app", &app),
            dest
        ));
        for (root, part, files) in [
            ("/etc", "containers/app", &app[..]),
            ("/root/ckpt/.other.tmp-77", "containers/app", &app[..]),
            ("/root/ckpt/web", "volumes/data.tar", &["volumes/data.tar"][..]),
            (
                "/root/ckpt/web",
                "containers/app",
                &["containers/db/spec.dump"][..],
            ),
            (
                "/root/ckpt/web",
                "containers/app",
                &["containers/app/../../etc/shadow"][..],
            ),
            ("/root/ckpt/web", "containers/app", &["/etc/shadow"][..]),
        ] {
            assert!(
                !announcement_fits(&ready(root, part, files), dest),
                "{root} {part} {files:?}"
            );
        }
    }

    /// [`credentials_from`] on `config`, helpers run from `helpers`.
    fn credentials(
        config: &str,
        registry: &str,
        helpers: Option<&Path>,
    ) -> std::result::Result<Credentials, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(credentials_from(
            config.as_bytes(),
            Path::new("/home/ci/.docker/config.json"),
            registry,
            helpers,
        ))
    }

    fn basic(c: &std::result::Result<Credentials, String>) -> Option<(String, String)> {
        match c {
            Ok(Credentials {
                auth: RegistryAuth::Basic(u, p),
                ..
            }) => Some((u.clone(), p.clone())),
            _ => None,
        }
    }

    fn pair(u: &str, p: &str) -> Option<(String, String)> {
        Some((u.to_owned(), p.to_owned()))
    }

    #[test]
    fn docker_config_credentials() {
        let text = r#"{"auths": {"https://reg.example.com/v1/": {"auth": "dXNlcjpwYXNz"},
            "127.0.0.1:5000": {"username": "a", "password": "b", "email": "x@y"}}}"#;
        assert_eq!(
            basic(&credentials(text, "reg.example.com", None)),
            pair("user", "pass")
        );
        assert_eq!(
            basic(&credentials(text, "Reg.Example.com", None)),
            pair("user", "pass")
        );
        assert_eq!(basic(&credentials(text, "127.0.0.1:5000", None)), pair("a", "b"));
        let other = credentials(text, "other", None).expect("anonymous");
        assert_eq!(other.auth, RegistryAuth::Anonymous);
        assert!(
            other
                .source
                .contains("no entry for other in /home/ci/.docker/config.json"),
            "{}",
            other.source
        );
        assert!(credentials(r#"{"auths": {"x": {"auth": "!!"}}}"#, "x", None).is_err());
        let token = credentials(r#"{"auths": {"x": {"identitytoken": "t"}}}"#, "x", None);
        assert!(token.expect_err("an identity token").contains("identity token"));
    }

    #[test]
    fn docker_hub_credentials_match_docker_io() {
        let text = r#"{"auths": {"https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"}}}"#;
        for registry in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            let c = credentials(text, registry, None);
            assert_eq!(basic(&c), pair("user", "pass"), "{registry}: {c:?}");
            assert!(
                c.expect("credentials")
                    .source
                    .contains("https://index.docker.io/v1/"),
                "{registry}"
            );
        }
        // A key written as a host also counts for the Hub.
        let text = r#"{"auths": {"docker.io": {"username": "u", "password": "p"}}}"#;
        assert_eq!(basic(&credentials(text, "docker.io", None)), pair("u", "p"));
    }

    /// A fake credential helper in `dir`: it knows `server` (user `user`, secret `secret`), and
    /// answers docker's "not found" for every other server.
    fn fake_helper(dir: &Path, name: &str, server: &str, user: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(format!("docker-credential-{name}"));
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread -r server\nif [ \"$server\" = \"{server}\" ]; then\n  \
                 printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"secret\"}}' \"$server\"\nelse\n  \
                 echo '{HELPER_NOT_FOUND}'; exit 1\nfi\n"
            ),
        )
        .expect("write the helper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn credential_helpers_are_asked_as_docker_asks_them() {
        let t = tempfile::tempdir().expect("tempdir");
        fake_helper(t.path(), "store", "https://index.docker.io/v1/", "hub-user");
        fake_helper(t.path(), "ecr", "1234.dkr.ecr.example.com", "AWS");
        fake_helper(t.path(), "tokens", "tokens.example.com", "<token>");
        let helpers = Some(t.path());
        let config = r#"{"credsStore": "store",
            "credHelpers": {"1234.dkr.ecr.example.com": "ecr", "tokens.example.com": "tokens"},
            "auths": {"https://index.docker.io/v1/": {"auth": "ZmlsZTpmaWxl"},
                      "plain.example.com": {"auth": "ZmlsZTpmaWxl"}}}"#;
        // The store (credsStore) wins over auths, for the Hub by its v1 address.
        let hub = credentials(config, "docker.io", helpers);
        assert_eq!(basic(&hub), pair("hub-user", "secret"), "{hub:?}");
        let source = hub.expect("credentials").source;
        assert!(
            source.contains("docker-credential-store (credsStore in /home/ci/.docker/config.json)"),
            "{source}"
        );
        // credHelpers names the helper of its registry.
        let ecr = credentials(config, "1234.dkr.ecr.example.com", helpers);
        assert_eq!(basic(&ecr), pair("AWS", "secret"), "{ecr:?}");
        assert!(ecr.expect("credentials").source.contains("credHelpers"));
        // A helper without credentials for the registry: anonymous, as docker goes, and said.
        let none = credentials(config, "plain.example.com", helpers).expect("anonymous");
        assert_eq!(none.auth, RegistryAuth::Anonymous);
        assert!(
            none.source.contains("docker-credential-store") && none.source.contains("has none"),
            "{}",
            none.source
        );
        // An identity token cannot be used: refused, not sent as something else.
        let token = credentials(config, "tokens.example.com", helpers).expect_err("a token");
        assert!(token.contains("identity token"), "{token}");
        // A helper that does not exist is an error naming it, not a silent anonymous pull.
        let missing =
            credentials(r#"{"credsStore": "nowhere"}"#, "docker.io", helpers).expect_err("no such helper");
        assert!(missing.contains("docker-credential-nowhere"), "{missing}");
    }

    #[test]
    fn registry_errors_say_which_credentials_were_tried() {
        let credentials = Credentials {
            auth: RegistryAuth::Anonymous,
            source: "anonymous: no entry for docker.io in /root/.docker/config.json".into(),
        };
        let e = tried(&credentials)(refused("fetching the manifest (docker.io/x/y:1): unauthorized"));
        assert!(
            e.to_string()
                .contains("credentials tried: anonymous: no entry for docker.io"),
            "{e}"
        );
    }

    #[test]
    fn a_signature_that_verifies_only_without_strictness_is_refused() {
        // The identity point as a public key (a weak key of small order), R the identity and
        // S = 0: [S]B = R + [k]A holds for every message, so a plain `verify` accepts it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).expect("the identity point decodes");
        let digest = sha256_digest(b"manifest");
        let forged = SignatureBlob {
            manifest: digest.clone(),
            key: key_id(&weak),
            signature: hex::encode({
                let mut s = [0u8; 64];
                s[..32].copy_from_slice(&identity);
                s
            }),
        };
        let err = verify(&forged, &digest, &[weak]).expect_err("a weak-key signature is refused");
        assert!(err.contains("does not verify"), "{err}");
    }

    #[test]
    fn a_registry_not_allowed_is_refused_by_name() {
        let policy = RegistryPolicy {
            allowed: vec!["127.0.0.1:5000".into()],
            ..Default::default()
        };
        assert!(checked_reference("127.0.0.1:5000/ckpt/web:1", &policy, "cfg").is_ok());
        let err = checked_reference("evil.example.com/ckpt/web:1", &policy, "cfg")
            .expect_err("must be refused")
            .to_string();
        assert!(
            err.contains("evil.example.com") && err.contains("not allowed"),
            "{err}"
        );
        assert!(checked_reference("not a ref", &policy, "cfg").is_err());
    }

    #[test]
    fn the_unpacker_refuses_what_the_manifest_does_not_list() {
        let mut files = BTreeMap::new();
        files.insert(
            "containers/web/a".to_owned(),
            podsnap_checkpoint::manifest::FileDigest {
                size: 3,
                digest: hex::encode(Sha256::digest(b"abc")),
            },
        );
        let layer = |entries: &[(&str, &[u8], tar::EntryType)]| {
            let mut b = tar::Builder::new(Vec::new());
            for (name, data, kind) in entries {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(*kind);
                h.set_size(data.len() as u64);
                h.set_mode(0o600);
                b.append_data(&mut h, name, *data).expect("append");
            }
            zstd::encode_all(&b.into_inner().expect("tar")[..], 1).expect("zstd")
        };
        let run = |blob: Vec<u8>,
                   part: &str,
                   files: &BTreeMap<String, podsnap_checkpoint::manifest::FileDigest>| {
            let staging = tempfile::tempdir().expect("tempdir");
            let m = test_manifest(files.clone());
            let d = sha256_digest(&blob);
            let n = blob.len() as u64;
            unpack_stream(&blob[..], part, staging.path(), &m, (d, n))
        };
        let good = layer(&[("containers/web/a", b"abc", tar::EntryType::Regular)]);
        assert!(run(good.clone(), "containers/web", &files).is_ok());
        assert!(run(good.clone(), "containers/db", &files)
            .expect_err("must be refused")
            .contains("belongs to part"));
        assert!(run(
            layer(&[("containers/web/b", b"abc", tar::EntryType::Regular)]),
            "containers/web",
            &files
        )
        .expect_err("must be refused")
        .contains("not a file of the checkpoint"));
        assert!(run(
            layer(&[("containers/web/a", b"abcd", tar::EntryType::Regular)]),
            "containers/web",
            &files
        )
        .expect_err("must be refused")
        .contains("bytes"));
        assert!(run(
            layer(&[("containers/web/a", b"", tar::EntryType::Symlink)]),
            "containers/web",
            &files
        )
        .expect_err("must be refused")
        .contains("not a regular file"));
        // The listed size, other bytes: refused by the file's digest as it is written.
        let err = run(
            layer(&[("containers/web/a", b"abd", tar::EntryType::Regular)]),
            "containers/web",
            &files,
        )
        .expect_err("must be refused");
        assert!(
            err.contains("has digest") && err.contains("the manifest lists"),
            "{err}"
        );
        // A blob that is not what its descriptor says.
        let staging = tempfile::tempdir().expect("tempdir");
        let m = test_manifest(files.clone());
        let err = unpack_stream(
            &good[..],
            "containers/web",
            staging.path(),
            &m,
            (sha256_digest(b"x"), good.len() as u64),
        )
        .expect_err("must be refused");
        assert!(err.contains("digest"), "{err}");
    }

    fn test_manifest(files: BTreeMap<String, podsnap_checkpoint::manifest::FileDigest>) -> Manifest {
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "format": podsnap_checkpoint::manifest::FORMAT,
            "version": podsnap_checkpoint::manifest::VERSION,
            "created_unix": 0,
            "pod": {"sandbox_id": "s", "name": "web", "namespace": "default", "uid": null, "hostname": null},
            "host": {"criu_version": "4.2.1", "runc_version": "1.1.5", "kernel": "6.18", "arch": "x86_64"},
            "tcp_established": false,
            "containers": [], "volumes": [], "files": {},
        }))
        .unwrap_or_else(|e| panic!("a manifest: {e}"));
        m.files = files;
        m
    }
}

#[cfg(test)]
mod proptests;
