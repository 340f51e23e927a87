//! The node configuration: one TOML file, read by the shim and by the CLI, that says where
//! checkpoints live, how pod dumps run, how many checkpoints the node keeps and who may restore
//! what.
//!
//! The file is `/etc/podsnap/config.toml`, or the one named by `PODSNAP_CONFIG`. A missing
//! default file means the defaults below; a missing file named by `PODSNAP_CONFIG`, an unknown
//! key, or a file that does not parse is an error (a typo must never widen the policy silently).
//!
//! ```toml
//! # Where checkpoints live (PODSNAP_CHECKPOINT_ROOT overrides it).
//! checkpoint_root = "/var/lib/podsnap/checkpoints"
//!
//! [dump]
//! # How long a pod dump may take before it is stopped (the pod thawed, the output removed);
//! # a pod's annotation podsnap.io/dump-deadline and the request's own deadline can shorten it.
//! deadline_seconds = 120
//! # Free space a dump must leave on the filesystem it writes to: a dump whose estimate would
//! # leave less is refused before anything is frozen, with the numbers (default 0).
//! reserve_bytes = 10737418240
//! # When the page images are digested: "early" (as CRIU writes them, in the idle scheduling
//! # class while the pod is frozen: the dump ends sooner) or "after-thaw" (the shortest frozen
//! # window). Default "early".
//! digests = "early"
//!
//! # Bounds on the checkpoint root, applied by the shim after each pod dump into the root
//! # (every dump path): the oldest checkpoints (by their manifest's created_unix) go first;
//! # never the checkpoint just written, never one in use by a restored pod (crate::node::lease).
//! # Each is optional: absent, unbounded.
//! [retention]
//! max_per_pod = 3                 # checkpoints kept per pod (namespace/name)
//! max_total_bytes = 53687091200   # size of all valid checkpoints of the root together
//! max_age_seconds = 604800        # older checkpoints are removed
//!
//! [restore]
//! # false: every restore on this node is refused.
//! enabled = true
//! # Only pods of these namespaces may restore (absent: every namespace).
//! namespaces = ["team-a", "team-b"]
//! # Host paths `podsnap restore` may bind-mount again (prefixes, compared by path component
//! # after `..` and symlinks are resolved; empty by default). The pod's own emptyDir volumes and
//! # termination logs need none: the restore makes them anew. The kubelet path (the restore
//! # annotation) mounts what kubelet asks and is not concerned.
//! host_paths = ["/srv/shared"]
//!
//! # A pod always may restore checkpoints taken in its own namespace. These add more:
//! # pods of namespace "team-b" may also restore checkpoints taken in "team-a";
//! # "*" as a key applies to every namespace.
//! [restore.allow_from]
//! team-b = ["team-a"]
//!
//! # Checkpoint transport (`podsnap push` / `podsnap pull`).
//! [registry]
//! # Registries (`host` or `host:port`) checkpoints may be pushed to and pulled from; a host
//! # without a port matches it on any port. Empty (the default): none.
//! allowed = ["127.0.0.1:5000", "registry.example.com"]
//! # Registries spoken to over plain HTTP (localhost, 127.0.0.1 and [::1] always are).
//! insecure = ["registry.lan:5000"]
//! # The node's ed25519 private key (PKCS#8 PEM) that signs what it pushes.
//! signing_key = "/etc/podsnap/signing.pem"
//! # Public keys (SubjectPublicKeyInfo PEM) a pulled checkpoint's signature must verify against.
//! trusted_keys = ["/etc/podsnap/trusted/node-a.pub"]
//! # true: push without a signing key and pull unsigned or untrusted checkpoints (a warning).
//! allow_unsigned = false
//!
//! # Live migration between nodes (`podsnap migrate --to-node`, `podsnap receive`, `podsnap
//! # drain`): each side proves itself with its key; only the listed peers are spoken to.
//! [migration]
//! # This node's ed25519 private key (PKCS#8 PEM, as `signing_key`; mode 0600 or stricter).
//! key = "/etc/podsnap/migration.pem"
//! # Public keys (SubjectPublicKeyInfo PEM) of the nodes this node exchanges pods with.
//! peers = ["/etc/podsnap/peers/node-b.pub"]
//! # A peer silent this long (no frame, heartbeats included) is lost; also bounds connecting
//! # and the handshake. Default 10, at most 3600.
//! peer_timeout_seconds = 10
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use std::time::Duration;

/// How long a pod dump may take unless the node configuration, the pod or the request says
/// otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);

/// The environment variable naming the node configuration file.
pub const CONFIG_ENV: &str = "PODSNAP_CONFIG";
/// The node configuration file unless `PODSNAP_CONFIG` names another.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/podsnap/config.toml";
/// Where checkpoints live unless the configuration or `PODSNAP_CHECKPOINT_ROOT` says otherwise.
pub const DEFAULT_CHECKPOINT_ROOT: &str = "/var/lib/podsnap/checkpoints";
/// The environment variable naming the node's checkpoint root (it wins over the file).
pub const CHECKPOINT_ROOT_ENV: &str = "PODSNAP_CHECKPOINT_ROOT";
/// The pod annotation naming the checkpoint a pod restores from (kubelet path).
pub const RESTORE_ANNOTATION: &str = "podsnap.io/restore-from";
/// Pod annotation (`"true"`) asking, on the node where its checkpoint was taken, for the pod's
/// address at the checkpoint (through `podsnap-cni-ipam`, see the README).
pub const KEEP_IP_ANNOTATION: &str = "podsnap.io/keep-ip";
/// Pod annotation (`"true"`) asking for a lazy restore: each container runs as soon as its
/// processes are back, and CRIU's lazy-pages daemon (userfaultfd) brings its memory back on
/// demand and in the background (see the README: what it costs if the daemon dies).
pub const LAZY_ANNOTATION: &str = "podsnap.io/restore-lazy";
/// Pod annotation (`CONTAINER: COMMAND ARGS...`) saying when a pod restored as one of a
/// group is ready for the next ordinal of its StatefulSet: the command, run in the container
/// (CRI ExecSync) until it exits 0. The readiness probe of the pod spec, which CRI does not
/// carry, written where `podsnap restore` can read it.
pub const READINESS_EXEC_ANNOTATION: &str = "podsnap.io/readiness-exec";
/// The largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The node configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Where checkpoints live.
    #[serde(default)]
    pub checkpoint_root: Option<PathBuf>,
    /// Who may restore what.
    #[serde(default)]
    pub restore: RestorePolicy,
    /// How pod dumps run.
    #[serde(default)]
    pub dump: DumpPolicy,
    /// Bounds on the checkpoint root.
    #[serde(default)]
    pub retention: RetentionPolicy,
    /// Which registries checkpoints travel through, and the keys that sign them.
    #[serde(default)]
    pub registry: RegistryPolicy,
    /// This node's identity for live migration and the nodes it trusts.
    #[serde(default)]
    pub migration: MigrationPolicy,
    /// The file this was read from (`None`: defaults, no file).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// How pod dumps run on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DumpPolicy {
    /// How long a pod dump may take; [`DEFAULT_DEADLINE`] when `None`.
    pub deadline_seconds: Option<u64>,
    /// Free space a dump must leave on its destination's filesystem (see
    /// the pod dump's pre-flight check); 0 by default.
    pub reserve_bytes: u64,
    /// How the pod's network is held still while it is dumped.
    pub network_lock: NetworkLock,
    /// When the page images are digested.
    pub digests: DigestTiming,
    /// The most a dump may carry of the pod's persistent volumes (`podsnap dump --volumes`),
    /// all together; [`DEFAULT_CARRY_VOLUMES_MAX_BYTES`] when `None`. Their content is archived
    /// while the pod is frozen, so this bounds that part of the frozen window too.
    pub carry_volumes_max_bytes: Option<u64>,
}

/// The default bound on the volumes a dump carries: 1 GiB.
pub const DEFAULT_CARRY_VOLUMES_MAX_BYTES: u64 = 1 << 30;

impl DumpPolicy {
    /// `carry_volumes_max_bytes`, or its default.
    pub fn carry_max_bytes(&self) -> u64 {
        self.carry_volumes_max_bytes
            .unwrap_or(DEFAULT_CARRY_VOLUMES_MAX_BYTES)
    }
}

/// When a pod dump digests its containers' page images (the bulk of a checkpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigestTiming {
    /// `early` when the node has a core to spare while the pod's CRIU runs dump (more online
    /// CPUs than containers dumped at once, the pause container not counted), else
    /// `after-thaw`: the followers of `early` run in the idle scheduling class and find no idle
    /// core when every one is dumping, so there they only add their own overhead to the frozen
    /// window (`pod_checkpoint`, 3 containers on 2 cores).
    #[default]
    Auto,
    /// As CRIU closes each one, in the idle scheduling class while the pod is frozen
    /// (the pod dump's prehash): the dump ends sooner, the frozen window may be a little longer.
    Early,
    /// All after the thaw: the shortest frozen window, the dump ends later.
    AfterThaw,
}

impl DigestTiming {
    /// Whether a dump of `containers` containers on a node of `cpus` online CPUs digests its
    /// page images as CRIU writes them.
    pub fn early(self, containers: usize, cpus: usize) -> bool {
        match self {
            DigestTiming::Auto => cpus > containers,
            DigestTiming::Early => true,
            DigestTiming::AfterThaw => false,
        }
    }
}

/// How a pod dump holds the pod's network still.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkLock {
    /// One lock for the pod's network namespace, from before the first freeze to after the last
    /// thaw (loopback passes: the pod is frozen together).
    #[default]
    Pod,
    /// No lock of podsnap's: each container's CRIU run locks only its own TCP connections,
    /// while it dumps them (podsnap's behaviour before the pod lock; for comparison).
    Container,
}

/// Checkpoint transport through OCI registries (`podsnap push` / `podsnap pull`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryPolicy {
    /// Registries (`host` or `host:port`) checkpoints may travel through; none by default.
    pub allowed: Vec<String>,
    /// Registries spoken to over plain HTTP besides localhost, 127.0.0.1 and `[::1]`.
    pub insecure: Vec<String>,
    /// The ed25519 private key (PKCS#8 PEM) that signs pushed checkpoints.
    pub signing_key: Option<PathBuf>,
    /// Public keys (SubjectPublicKeyInfo PEM) a pulled checkpoint's signature may verify against.
    pub trusted_keys: Vec<PathBuf>,
    /// Push unsigned and pull unsigned or untrusted checkpoints (with a warning).
    pub allow_unsigned: bool,
}

/// Whether `registry` (`host[:port]` as a reference names it) matches `entry` of a registry
/// list: equal (case-insensitive), or `entry` names the host alone and the registry is that
/// host on some port.
pub fn registry_matches(entry: &str, registry: &str) -> bool {
    let entry = entry.trim().trim_end_matches('/').to_ascii_lowercase();
    let registry = registry.to_ascii_lowercase();
    if entry.is_empty() {
        return false;
    }
    if entry == registry {
        return true;
    }
    let has_port = |s: &str| match s.rsplit_once(':') {
        // `[::1]:5000` has a port, `[::1]` has none.
        Some((_, port)) => !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !s.ends_with(']'),
        None => false,
    };
    !has_port(&entry)
        && has_port(&registry)
        && registry.rsplit_once(':').is_some_and(|(host, _)| host == entry)
}

impl RegistryPolicy {
    /// Whether checkpoints may travel through `registry`.
    pub fn allows(&self, registry: &str) -> bool {
        self.allowed.iter().any(|e| registry_matches(e, registry))
    }

    /// Whether `registry` is spoken to over plain HTTP: a loopback host, or listed insecure.
    pub fn is_insecure(&self, registry: &str) -> bool {
        let host = match registry.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !registry.ends_with(']') => {
                host
            }
            _ => registry,
        };
        matches!(
            host.to_ascii_lowercase().as_str(),
            "localhost" | "127.0.0.1" | "[::1]"
        ) || self.insecure.iter().any(|e| registry_matches(e, registry))
    }
}

/// Live migration between nodes: the node's own key and the keys of its peers. Read by the
/// coordinator only (the channel itself lives there); parsed here with the rest of the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationPolicy {
    /// This node's ed25519 private key (PKCS#8 PEM).
    pub key: Option<PathBuf>,
    /// Public keys (SubjectPublicKeyInfo PEM) of the nodes pods may move to and from.
    pub peers: Vec<PathBuf>,
    /// How long a peer may stay silent before it counts as lost; [`DEFAULT_PEER_TIMEOUT`] when
    /// `None`.
    pub peer_timeout_seconds: Option<u64>,
}

/// How long a migration peer may stay silent unless `[migration] peer_timeout_seconds` says.
pub const DEFAULT_PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest `[migration] peer_timeout_seconds` accepted.
pub const MAX_PEER_TIMEOUT_SECONDS: u64 = 3600;

impl MigrationPolicy {
    /// How long a peer may stay silent.
    pub fn peer_timeout(&self) -> std::time::Duration {
        self.peer_timeout_seconds
            .map(std::time::Duration::from_secs)
            .unwrap_or(DEFAULT_PEER_TIMEOUT)
    }

    fn check(&self) -> std::result::Result<(), String> {
        for path in self.key.iter().chain(&self.peers) {
            if !path.is_absolute() {
                return Err(format!(
                    "[migration] key file {} is not an absolute path",
                    path.display()
                ));
            }
        }
        if let Some(twice) = self
            .peers
            .iter()
            .enumerate()
            .find_map(|(i, p)| self.peers[..i].contains(p).then_some(p))
        {
            return Err(format!("[migration] peers lists {} twice", twice.display()));
        }
        if self.key.is_none() && !self.peers.is_empty() {
            return Err(
                "[migration] peers without a key: give this node's own ed25519 private key as \
                 [migration] key (PKCS#8 PEM, `openssl genpkey -algorithm ed25519`)"
                    .into(),
            );
        }
        match self.peer_timeout_seconds {
            Some(0) => Err("[migration] peer_timeout_seconds = 0: give at least 1".into()),
            Some(n) if n > MAX_PEER_TIMEOUT_SECONDS => Err(format!(
                "[migration] peer_timeout_seconds = {n} is more than {MAX_PEER_TIMEOUT_SECONDS}"
            )),
            _ => Ok(()),
        }
    }
}

/// Bounds on the checkpoint root (see [`crate::node::retention`]); each unbounded when `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionPolicy {
    /// Checkpoints kept per pod (`namespace/name`), at least 1.
    pub max_per_pod: Option<u64>,
    /// Size of every valid checkpoint of the root together.
    pub max_total_bytes: Option<u64>,
    /// Checkpoints older than this (by their manifest's `created_unix`) are removed.
    pub max_age_seconds: Option<u64>,
}

impl RetentionPolicy {
    /// No bound at all.
    pub fn unbounded(&self) -> bool {
        self == &RetentionPolicy::default()
    }
}

/// The pod annotation bounding a pod's dumps, in seconds (`"30"` or `"30s"`).
pub const DUMP_DEADLINE_ANNOTATION: &str = "podsnap.io/dump-deadline";

impl DumpPolicy {
    /// The deadline of a dump: the pod's annotation if it has one, else the node's, else the
    /// default; never longer than `request` (the caller's own deadline), when it has one.
    pub fn deadline(
        &self,
        annotation: Option<&str>,
        request: Option<std::time::Duration>,
    ) -> std::result::Result<std::time::Duration, String> {
        let pod = match annotation.map(str::trim).filter(|v| !v.is_empty()) {
            Some(v) => Some(
                v.trim_end_matches('s')
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{DUMP_DEADLINE_ANNOTATION}: {v:?} is not a number of seconds"))?,
            ),
            None => None,
        };
        let base = pod
            .or(self.deadline_seconds)
            .map(std::time::Duration::from_secs)
            .unwrap_or(DEFAULT_DEADLINE);
        Ok(match request {
            Some(r) if r < base => r,
            _ => base,
        })
    }
}

/// Who may restore what on this node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestorePolicy {
    /// Restores are allowed at all.
    pub enabled: bool,
    /// Only pods of these namespaces may restore; every namespace when `None`.
    pub namespaces: Option<Vec<String>>,
    /// Target namespace (or `*`) -> further source namespaces its pods may restore from.
    pub allow_from: BTreeMap<String, Vec<String>>,
    /// Host path prefixes whose bind mounts `podsnap restore` may make again (see
    /// [`crate::trust::policy::check_host_path`]); none by default.
    pub host_paths: Vec<PathBuf>,
}

impl Default for RestorePolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            namespaces: None,
            allow_from: BTreeMap::new(),
            host_paths: Vec::new(),
        }
    }
}

impl NodeConfig {
    /// Reads the node configuration: `PODSNAP_CONFIG` if set, else the default file if it
    /// exists, else the defaults.
    pub fn load() -> Result<NodeConfig> {
        match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            Some(path) => Self::read(Path::new(&path)),
            None => match Self::read(Path::new(DEFAULT_CONFIG_PATH)) {
                Err(Error::Config { missing: true, .. }) => Ok(NodeConfig::default()),
                other => other,
            },
        }
    }

    /// Reads and checks one configuration file.
    pub fn read(path: &Path) -> Result<NodeConfig> {
        let bad = |reason: String, missing: bool| Error::Config {
            path: path.to_path_buf(),
            reason,
            missing,
        };
        let meta = std::fs::metadata(path).map_err(|e| {
            let missing = e.kind() == std::io::ErrorKind::NotFound;
            bad(e.to_string(), missing)
        })?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(bad(format!("larger than {MAX_CONFIG_BYTES} bytes"), false));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string(), false))?;
        let mut config = Self::parse(&text).map_err(|reason| bad(reason, false))?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses configuration text.
    pub fn parse(text: &str) -> std::result::Result<NodeConfig, String> {
        let config: NodeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if config.retention.max_per_pod == Some(0) {
            return Err(
                "retention.max_per_pod = 0 would remove every checkpoint: give at least 1, or leave it out"
                    .into(),
            );
        }
        let registry = &config.registry;
        for key in registry.signing_key.iter().chain(&registry.trusted_keys) {
            if !key.is_absolute() {
                return Err(format!(
                    "registry key file {} is not an absolute path",
                    key.display()
                ));
            }
        }
        if let Some(bad) = registry
            .allowed
            .iter()
            .chain(&registry.insecure)
            .find(|e| e.trim().is_empty() || e.contains('/') || e.contains("://"))
        {
            return Err(format!(
                "registry {bad:?} is not a registry host (give host or host:port, no scheme or path)"
            ));
        }
        config.migration.check()?;
        if let Some(bad) = config.restore.host_paths.iter().find(|p| !p.is_absolute()) {
            return Err(format!(
                "restore.host_paths: {} is not an absolute path",
                bad.display()
            ));
        }
        if let Some(root) = &config.checkpoint_root {
            if !root.is_absolute() {
                return Err(format!(
                    "checkpoint_root {} is not an absolute path",
                    root.display()
                ));
            }
        }
        Ok(config)
    }

    /// The node's checkpoint root: `PODSNAP_CHECKPOINT_ROOT`, else the file's, else the default.
    pub fn checkpoint_root(&self) -> PathBuf {
        std::env::var_os(CHECKPOINT_ROOT_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| self.checkpoint_root.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CHECKPOINT_ROOT))
    }

    /// How the configuration is named in errors.
    pub fn describe(&self) -> String {
        match &self.source {
            Some(p) => p.display().to_string(),
            None => format!("the defaults ({DEFAULT_CONFIG_PATH} does not exist)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_allow_own_namespace_only() {
        let c = NodeConfig::parse("").expect("empty is defaults");
        assert!(c.restore.enabled);
        assert_eq!(c.restore.namespaces, None);
        assert!(c.restore.allow_from.is_empty());
    }

    #[test]
    fn registry_section_parses_and_matches() {
        let c = NodeConfig::parse(
            r#"
[registry]
allowed = ["127.0.0.1:5000", "Registry.Example.com"]
insecure = ["registry.lan"]
signing_key = "/etc/podsnap/signing.pem"
trusted_keys = ["/etc/podsnap/a.pub", "/etc/podsnap/b.pub"]
allow_unsigned = true
"#,
        )
        .expect("parses");
        let r = &c.registry;
        assert_eq!(r.signing_key, Some(PathBuf::from("/etc/podsnap/signing.pem")));
        assert_eq!(r.trusted_keys.len(), 2);
        assert!(r.allow_unsigned);
        assert!(r.allows("127.0.0.1:5000"));
        assert!(!r.allows("127.0.0.1:5001"), "a port given is the only port");
        assert!(!r.allows("127.0.0.1"));
        assert!(r.allows("registry.example.com"));
        assert!(
            r.allows("registry.example.com:443"),
            "a host alone matches any port"
        );
        assert!(!r.allows("evil.example.com"));
        assert!(!r.allows("registry.example.com.evil.net"));
        assert!(r.is_insecure("localhost:5000"));
        assert!(r.is_insecure("127.0.0.1:1234"));
        assert!(r.is_insecure("[::1]:5000"));
        assert!(r.is_insecure("registry.lan:5000"));
        assert!(!r.is_insecure("registry.example.com"));
        assert!(!r.is_insecure("localhost.example.com"));
    }

    #[test]
    fn registry_defaults_allow_nothing_and_typos_are_errors() {
        let c = NodeConfig::parse("").expect("defaults");
        assert!(!c.registry.allows("127.0.0.1:5000"));
        assert!(!c.registry.allow_unsigned);
        for bad in [
            "[registry]\nallowed_registries = [\"x\"]",
            "[registry]\nallow_unsigned = \"yes\"",
            "[registry]\nsigning_key = \"relative.pem\"",
            "[registry]\ntrusted_keys = [\"keys/a.pub\"]",
            "[registry]\nallowed = [\"https://registry.example.com\"]",
            "[registry]\nallowed = [\"registry.example.com/team\"]",
        ] {
            assert!(NodeConfig::parse(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn full_file_parses() {
        let c = NodeConfig::parse(
            r#"
checkpoint_root = "/srv/ckpt"
[restore]
enabled = false
namespaces = ["a", "b"]
[restore.allow_from]
b = ["a"]
"*" = ["shared"]
"#,
        )
        .expect("parses");
        assert_eq!(c.checkpoint_root, Some(PathBuf::from("/srv/ckpt")));
        assert!(!c.restore.enabled);
        assert_eq!(c.restore.allow_from["b"], ["a"]);
        assert_eq!(c.restore.allow_from["*"], ["shared"]);
        assert!(c.restore.host_paths.is_empty(), "no host path by default");
    }

    #[test]
    fn host_paths_are_absolute() {
        let c = NodeConfig::parse("[restore]\nhost_paths = [\"/srv/shared\", \"/etc/\"]\n").expect("parses");
        assert_eq!(
            c.restore.host_paths,
            [PathBuf::from("/srv/shared"), PathBuf::from("/etc/")]
        );
        let err = NodeConfig::parse("[restore]\nhost_paths = [\"srv\"]\n").expect_err("relative");
        assert!(err.contains("host_paths") && err.contains("srv"), "{err}");
        assert!(NodeConfig::parse("[restore]\nhost_paths = \"/srv\"\n").is_err());
    }

    #[test]
    fn dump_deadlines_come_from_the_pod_the_node_and_the_request() {
        use std::time::Duration;
        let node = NodeConfig::parse("[dump]\ndeadline_seconds = 60\n")
            .expect("parses")
            .dump;
        assert_eq!(node.deadline(None, None), Ok(Duration::from_secs(60)));
        assert_eq!(node.deadline(Some("30s"), None), Ok(Duration::from_secs(30)));
        assert_eq!(
            node.deadline(Some("30"), Some(Duration::from_secs(5))),
            Ok(Duration::from_secs(5))
        );
        assert_eq!(DumpPolicy::default().deadline(None, None), Ok(DEFAULT_DEADLINE));
        assert!(node.deadline(Some("soon"), None).is_err());
        assert!(node.deadline(Some("0"), None).is_err());
    }

    #[test]
    fn retention_and_the_reserve_are_optional_and_checked() {
        let c = NodeConfig::parse("").expect("defaults");
        assert!(c.retention.unbounded());
        assert_eq!(c.dump.reserve_bytes, 0);
        let c = NodeConfig::parse(
            "[dump]\nreserve_bytes = 1024\n[retention]\nmax_per_pod = 2\nmax_total_bytes = 4096\nmax_age_seconds = 60\n",
        )
        .expect("parses");
        assert_eq!(c.dump.reserve_bytes, 1024);
        assert_eq!(
            c.retention,
            RetentionPolicy {
                max_per_pod: Some(2),
                max_total_bytes: Some(4096),
                max_age_seconds: Some(60),
            }
        );
        assert!(!c.retention.unbounded());
        let err = NodeConfig::parse("[retention]\nmax_per_pod = 0\n").expect_err("zero");
        assert!(err.contains("max_per_pod"), "{err}");
        let err = NodeConfig::parse("[retention]\nmax_count = 2\n").expect_err("typo");
        assert!(err.contains("max_count"), "{err}");
        assert!(NodeConfig::parse("[dump]\nreserve_bytes = -1\n").is_err());
    }

    #[test]
    fn the_network_lock_is_the_pods_unless_asked() {
        assert_eq!(
            NodeConfig::parse("").expect("defaults").dump.network_lock,
            NetworkLock::Pod
        );
        let c = NodeConfig::parse("[dump]\nnetwork_lock = \"container\"\n").expect("parses");
        assert_eq!(c.dump.network_lock, NetworkLock::Container);
        assert!(NodeConfig::parse("[dump]\nnetwork_lock = \"none\"\n").is_err());
    }

    #[test]
    fn page_images_are_digested_early_only_with_a_core_to_spare() {
        let auto = NodeConfig::parse("").expect("defaults").dump.digests;
        assert_eq!(auto, DigestTiming::Auto);
        assert!(!auto.early(3, 2), "3 dumps on 2 cores: no idle core");
        assert!(!auto.early(2, 2), "as many dumps as cores: none idle");
        assert!(auto.early(1, 2));
        assert!(auto.early(3, 8));
        let c = NodeConfig::parse("[dump]\ndigests = \"after-thaw\"\n").expect("parses");
        assert_eq!(c.dump.digests, DigestTiming::AfterThaw);
        assert!(!c.dump.digests.early(1, 64));
        let c = NodeConfig::parse("[dump]\ndigests = \"early\"\n").expect("parses");
        assert!(c.dump.digests.early(8, 1));
        assert!(NodeConfig::parse("[dump]\ndigests = \"never\"\n").is_err());
    }

    #[test]
    fn typos_and_relative_roots_are_errors() {
        let err = NodeConfig::parse("[restore]\nenable = false\n").expect_err("typo");
        assert!(err.contains("enable"), "{err}");
        assert!(NodeConfig::parse("checkpoint_root = \"rel\"").is_err());
        assert!(NodeConfig::parse("[restore]\nnamespaces = \"a\"").is_err());
    }

    #[test]
    fn the_migration_section_parses_and_is_checked() {
        let c = NodeConfig::parse("").expect("defaults");
        assert_eq!(c.migration, MigrationPolicy::default());
        assert_eq!(c.migration.peer_timeout(), DEFAULT_PEER_TIMEOUT);
        let c = NodeConfig::parse(
            r#"
[migration]
key = "/etc/podsnap/migration.pem"
peers = ["/etc/podsnap/peers/b.pub", "/etc/podsnap/peers/c.pub"]
peer_timeout_seconds = 3
"#,
        )
        .expect("parses");
        let m = &c.migration;
        assert_eq!(m.key, Some(PathBuf::from("/etc/podsnap/migration.pem")));
        assert_eq!(m.peers.len(), 2);
        assert_eq!(m.peer_timeout(), std::time::Duration::from_secs(3));
        for (bad, says) in [
            ("[migration]\nkey = \"migration.pem\"", "not an absolute path"),
            (
                "[migration]\nkey = \"/k.pem\"\npeers = [\"peers/b.pub\"]",
                "peers/b.pub",
            ),
            ("[migration]\npeers = [\"/b.pub\"]", "without a key"),
            (
                "[migration]\nkey = \"/k.pem\"\npeers = [\"/b.pub\", \"/b.pub\"]",
                "twice",
            ),
            ("[migration]\npeer_timeout_seconds = 0", "at least 1"),
            ("[migration]\npeer_timeout_seconds = 86400", "more than 3600"),
            ("[migration]\npeer = [\"/b.pub\"]", "peer"),
            ("[migration]\npeers = \"/b.pub\"", "peers"),
        ] {
            let err = NodeConfig::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_named_file_must_exist() {
        let t = tempfile::tempdir().expect("tempdir");
        let err = NodeConfig::read(&t.path().join("nope.toml")).expect_err("missing");
        assert!(matches!(err, Error::Config { missing: true, .. }), "{err}");
        std::fs::write(t.path().join("c.toml"), "[restore]\nenabled = false\n").expect("write");
        let c = NodeConfig::read(&t.path().join("c.toml")).expect("read");
        assert!(!c.restore.enabled);
        assert_eq!(c.source, Some(t.path().join("c.toml")));
    }
}

#[cfg(test)]
mod proptests;
