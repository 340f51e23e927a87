//! References, registry policy, the client, and registry credentials (docker config, helpers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use podsnap_checkpoint::config::RegistryPolicy;
use serde::Deserialize;

use crate::error::{Error, Result};

use super::*;

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

pub(super) fn client_for(reference: &Reference, policy: &RegistryPolicy) -> Client {
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
pub(super) const HELPER_NOT_FOUND: &str = "credentials not found in native keychain";
/// How long a credential helper may take to answer.
pub(super) const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The largest answer read from a credential helper.
pub(super) const MAX_HELPER_BYTES: usize = 64 * 1024;

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
pub(super) fn is_docker_hub(host: &str) -> bool {
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
pub(super) fn key_registry(key: &str) -> String {
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
pub(super) struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
pub(super) struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// [`docker_auth`] on the config file `text` (read from `path`); credential helpers are run
/// from `helper_dir` when given, else found through `PATH`.
pub(super) async fn credentials_from(
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
pub(super) struct HelperAnswer {
    username: String,
    secret: String,
}

/// `docker-credential-<helper> get` for `server` (on its standard input): `(user, secret)`, or
/// `None` when it holds nothing for the server.
pub(super) async fn run_helper(
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
pub(super) fn tried(credentials: &Credentials) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::Registry(message) => {
            Error::Registry(format!("{message} (credentials tried: {})", credentials.source))
        }
        other => other,
    }
}
