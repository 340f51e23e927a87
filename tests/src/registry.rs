//! A local OCI registry for tests and benches: Debian's `docker-registry serve` on 127.0.0.1,
//! a free port and its own storage directory, killed (by its pid) and removed on drop; and what
//! a node needs to use it (an ed25519 key pair for podsnap's signatures, a containerd
//! `hosts.toml` so CRI pulls from it over plain HTTP).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the `podsnap` CLI at `binary` against `node` (its CRI and containerd sockets and its
/// checkpoint root), with the node configuration `config` and Docker credentials from
/// `docker_config`.
pub fn podsnap_on(
    binary: &Path,
    config: &Path,
    docker_config: &Path,
    node: &crate::node::Node,
    args: &[&str],
) -> std::process::Output {
    Command::new(binary)
        .args(args)
        .env("PODSNAP_CONFIG", config)
        .env("DOCKER_CONFIG", docker_config)
        .env("CONTAINER_RUNTIME_ENDPOINT", node.endpoint())
        .env("CONTAINERD_ADDRESS", node.address())
        .env("PODSNAP_CHECKPOINT_ROOT", node.files().checkpoints())
        .output()
        .expect("running podsnap")
}

/// Debian's `docker-registry` (installed by `packaging/install-deps.sh`).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A `docker-registry serve` of our own: killed (by its pid) and its directory removed on drop,
/// whether the test passed or not.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Registry {
    /// Starts a registry on a free port of 127.0.0.1 and waits until `/v2/` answers 200.
    ///
    /// # Panics
    /// When the binary is missing or the registry does not answer within 20 s (with its log).
    pub fn start() -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).is_file(),
            "{REGISTRY_BIN} is missing: install Debian's docker-registry (packaging/install-deps.sh does)"
        );
        let dir = tempfile::tempdir().expect("a registry directory");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            ),
        )
        .expect("registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let registry = Registry { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                    return registry;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer on 127.0.0.1:{port}: {}",
                registry.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:<port>`, the registry part of an image reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the registry wrote to its log (access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Blob uploads the registry has seen (each starts with a POST to `.../blobs/uploads/`).
    pub fn uploads(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"POST /v2/") && l.contains("/blobs/uploads/"))
            .count()
    }

    /// Blob uploads the registry has completed (the `PUT` that ends each).
    pub fn completed_uploads(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"PUT /v2/") && l.contains("/blobs/uploads/"))
            .count()
    }

    /// The registry's storage directory (its blobs and repositories).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry's storage keeps blob `digest` (`sha256:...`).
    pub fn blob(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An ed25519 key pair made with openssl in `dir`, as the README says: (private, public).
///
/// # Panics
/// When openssl fails.
pub fn key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub"));
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "ed25519",
            "-out",
            private.to_str().expect("utf8"),
        ],
        vec![
            "pkey",
            "-in",
            private.to_str().expect("utf8"),
            "-pubout",
            "-out",
            public.to_str().expect("utf8"),
        ],
    ] {
        let status = Command::new("openssl").args(&args).status().expect("openssl");
        assert!(status.success(), "openssl {args:?}");
    }
    (private, public)
}

/// What `podsnap restore --from` printed of the pod it made.
pub struct RestoredFrom {
    pub stdout: String,
    pub ip: String,
    pub id: String,
    pub uid: String,
}

impl RestoredFrom {
    /// The value of the output line starting with `key`.
    ///
    /// # Panics
    /// When no line starts with it.
    pub fn field(&self, key: &str) -> String {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {key:?} in {}", self.stdout))
    }
}

/// `podsnap restore` arguments restoring from `source` (`["--from", REF]` or
/// `["--checkpoint-dir", DIR]`) into the node's kubelet pod and log directories.
pub fn restore_args(node: &crate::node::Node, source: &[&str]) -> Vec<String> {
    let kubelet = node.files().kubelet();
    let (pods, logs) = (kubelet.join("pods"), kubelet.join("logs/pods"));
    let mut args = vec!["restore".to_owned()];
    args.extend(source.iter().map(|s| (*s).to_owned()));
    args.extend([
        "--pods-dir".to_owned(),
        pods.to_string_lossy().into_owned(),
        "--logs-dir".to_owned(),
        logs.to_string_lossy().into_owned(),
    ]);
    args
}

/// `podsnap restore --from REF` on `node` (`podsnap_on`), into kubelet's pod and log
/// directories of the node; the new pod is recorded for the node's teardown.
///
/// # Panics
/// When the restore fails or prints no pod.
pub fn restore_from(
    binary: &Path,
    config: &Path,
    docker_config: &Path,
    node: &crate::node::Node,
    reference: &str,
) -> RestoredFrom {
    restore_on(binary, config, docker_config, node, &["--from", reference])
}

/// `podsnap restore` from `source` (see [`restore_args`]) on `node`; the new pod is recorded
/// for the node's teardown.
///
/// # Panics
/// When the restore fails or prints no pod.
pub fn restore_on(
    binary: &Path,
    config: &Path,
    docker_config: &Path,
    node: &crate::node::Node,
    source: &[&str],
) -> RestoredFrom {
    let args = restore_args(node, source);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = podsnap_on(binary, config, docker_config, node, &args);
    assert!(
        out.status.success(),
        "restore {}: {}",
        source.join(" "),
        crate::command::output_text(&out)
    );
    let mut restored = RestoredFrom {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        ip: String::new(),
        id: String::new(),
        uid: String::new(),
    };
    restored.ip = restored.field("ip ");
    restored.id = restored.field("id ");
    restored.uid = restored
        .field("pod ")
        .rsplit_once("(uid ")
        .and_then(|(_, u)| u.strip_suffix(')'))
        .expect("the new pod's uid")
        .to_owned();
    let netns = node.cri().pod_netns(&restored.id).ok().flatten();
    node.record_pod(&restored.uid, netns.as_deref())
        .expect("record the restored pod");
    restored
}
