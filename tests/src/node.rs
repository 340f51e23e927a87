//! A private containerd: the node every integration test runs against.
//!
//! [`Node::start`] makes a directory `/tmp/podsnap-node-<pid>-<n>` (mode 0700) holding
//! everything of this instance:
//! ```text
//! config.toml          containerd config (version 3): CRI handlers podsnap and runc
//! containerd.sock      gRPC (CRI and containerd API); containerd.sock.ttrpc
//! containerd.log       containerd's output at debug level (shim logs land here too)
//! containerd.pid       so a later run can clean up after a killed test
//! root/ state/         containerd's root (another name if a test asks: NodeOptions) and state
//! cni/net.d/           the conflist (a bridge and a subnet of this instance)
//! cni/ipam/            host-local's allocations
//! certs.d/_default/    registry hosts: every pull goes to 127.0.0.1:9 and fails at once
//!                      (a test's own local registry is added beside it: `allow_registry`)
//! kubelet/             pod directories and logs, laid out like kubelet's
//! checkpoints/         the checkpoint root (containerd's and the shim's PODSNAP_CHECKPOINT_ROOT)
//! images/              the image archives imported into `k8s.io` and `default`
//! runc/runc            the node's runc (a link to [`NodeOptions::runc`]), first on containerd's
//!                      `PATH` after the test's own [`NodeOptions::path_prefix`]: every shim
//!                      (ours and the Go one) and teardown run it; a systemd node names it in
//!                      both CRI handlers' options (`BinaryName`) instead
//! systemd/             a systemd node's units, its start scripts and output ([`crate::systemd`])
//! ledger               netns paths, pod uids, the bridge: what teardown must remove
//! owner                the pid of the process that owns this node (and `keep`)
//! ```
//! Teardown ([`Node::teardown`], also run by `Drop`, also after a panic) removes all of it and
//! what lives outside the directory: pods, tasks, containerd, shims, runc state, mounts,
//! network namespaces, the bridge, pod cgroups. At start, nodes left by a killed test process
//! are torn down the same way.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::command::run_within;
use crate::cri::CriClient;
use crate::ctr::{Ctr, CRI_NAMESPACE, DEFAULT_NAMESPACE};
use crate::host;
use crate::prereq::{self, HostTools};
use crate::serial::{serial, SerialGuard};

/// Where node directories are made.
const NODE_PARENT: &str = "/tmp";
/// The prefix of a node directory's name.
const NODE_PREFIX: &str = "podsnap-node-";
/// How long containerd may take to answer CRI with runtime and network ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Where failed tests' containerd logs are copied.
pub const SAVED_LOGS_DIR: &str = "/tmp/podsnap-test-logs";

/// Log lines in panic messages are cut to this many characters (containerd prints whole specs).
const LOG_LINE_CUT: usize = 400;

static NODE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The `podsnap-workload` binary that goes into the images.
    pub workload_bin: PathBuf,
    /// Require our shim (and put its directory first on containerd's `PATH`). Defaults to true
    /// unless the handler under test is `runc`.
    pub podsnap_shim: bool,
    /// Leave the node running (and its directory) when the `Node` is dropped; the next node
    /// started on this host does not reap it. `teardown` still removes it.
    pub keep: bool,
    /// containerd's log level.
    pub log_level: String,
    /// TOML appended to containerd's config (e.g. one more CRI runtime for a benchmark).
    pub extra_config: String,
    /// More environment for containerd, and so for the shims it starts.
    pub extra_env: Vec<(String, String)>,
    /// Directories put first on containerd's (and the shims') `PATH`, e.g. a stand-in `criu`.
    pub path_prefix: Vec<PathBuf>,
    /// Run containerd (and so every shim, runc and CRIU it starts) in a private mount
    /// namespace with cgroup2 mounted on `/sys/fs/cgroup`: a cgroup v2 node on this hybrid
    /// machine (see ENVIRONMENT.md). No controller is available there: pair it with
    /// [`crate::runc_v2::RuncV2`], which drops the resource settings runc cannot write.
    pub cgroup2: bool,
    /// A node laid out like a host for `podsnap node install` ([`crate::host_node`]):
    /// containerd's configuration (in this style, without podsnap's runtime) is
    /// `<dir>/host/etc/containerd/config.toml` and containerd sees `<dir>/host/etc/containerd`
    /// and `<dir>/host/etc/podsnap` as `/etc/containerd` and `/etc/podsnap`; its socket is
    /// `<dir>/host/run/containerd/containerd.sock`; `<dir>/host/usr/local/bin` comes first on its
    /// `PATH`; the restart command [`Node::restart_command`] restarts it in place.
    pub host_root: Option<crate::host_node::ConfigStyle>,
    /// The name, in the node directory, of containerd's root directory (its snapshots, so the
    /// containers' overlay upper and lower directories): `root`, or a name with bytes the
    /// kernel escapes in mountinfo or that are not ASCII (TOML literal string: no `'`). A
    /// [`NodeOptions::host_root`] node keeps `root`.
    pub containerd_root: String,
    /// The runc the node runs ([`prereq::runc_under_test`] unless a test chooses another).
    pub runc: PathBuf,
    /// The systemd cgroup driver: systemd runs as the init of private namespaces
    /// ([`crate::systemd`]), containerd runs as its service, and both CRI handlers have
    /// `SystemdCgroup = true` and `BinaryName` (the node's runc, left off `PATH`, so a shim
    /// that ignored its options would run another runc). With [`NodeOptions::cgroup2`], the
    /// namespaces have cgroup2 alone.
    pub systemd: bool,
    /// The pod network allocates with host-local directly, not through podsnap's IPAM wrapper
    /// (a node where a restored pod cannot keep its address).
    pub plain_ipam: bool,
}

impl NodeOptions {
    /// Defaults for the handler under test ([`crate::handler`]).
    pub fn new(workload_bin: PathBuf) -> Self {
        Self {
            workload_bin,
            podsnap_shim: crate::handler() != "runc",
            keep: false,
            log_level: "debug".to_owned(),
            extra_config: String::new(),
            extra_env: Vec::new(),
            path_prefix: Vec::new(),
            cgroup2: false,
            host_root: None,
            containerd_root: "root".to_owned(),
            runc: prereq::runc_under_test(),
            systemd: false,
            plain_ipam: false,
        }
    }
}

/// The on-disk layout of a node directory.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    /// The node directory.
    pub dir: PathBuf,
}

impl NodeFiles {
    /// The host root of a [`NodeOptions::host_root`] node (`<dir>/host`).
    pub fn host_root(&self) -> PathBuf {
        self.dir.join("host")
    }
    /// Whether this is a [`NodeOptions::host_root`] node.
    pub fn is_host_root(&self) -> bool {
        self.host_root().is_dir()
    }
    /// containerd's config.
    pub fn config(&self) -> PathBuf {
        if self.is_host_root() {
            return self.host_root().join("etc/containerd/config.toml");
        }
        self.dir.join("config.toml")
    }
    /// containerd's gRPC socket.
    pub fn socket(&self) -> PathBuf {
        if self.is_host_root() {
            return self.host_root().join("run/containerd/containerd.sock");
        }
        self.dir.join("containerd.sock")
    }
    /// containerd's output.
    pub fn log(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }
    pub(crate) fn pid_file(&self) -> PathBuf {
        self.dir.join("containerd.pid")
    }
    fn ledger(&self) -> PathBuf {
        self.dir.join("ledger")
    }
    fn owner(&self) -> PathBuf {
        self.dir.join("owner")
    }
    /// The directory holding the node's `runc` (first on containerd's `PATH`).
    pub fn runc_dir(&self) -> PathBuf {
        self.dir.join("runc")
    }
    /// The node's runc, or `fallback` for a node made before it had one.
    fn runc_or(&self, fallback: &Path) -> PathBuf {
        let runc = self.runc_dir().join("runc");
        if runc.exists() {
            runc
        } else {
            fallback.to_path_buf()
        }
    }
    /// kubelet's root in this node (pods, logs).
    pub fn kubelet(&self) -> PathBuf {
        self.dir.join("kubelet")
    }
    /// The node's checkpoint root: containerd, and so the shim, get it as
    /// `PODSNAP_CHECKPOINT_ROOT`.
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }
    /// The node's podsnap configuration (restore policy): containerd, and so the shim, get it
    /// as `PODSNAP_CONFIG`. Empty (the defaults) unless a test writes it
    /// ([`crate::node::Node::set_podsnap_config`]); the shim reads it at every restore.
    pub fn podsnap_config(&self) -> PathBuf {
        self.dir.join("podsnap.toml")
    }

    /// Appends `kind value` to the ledger.
    fn record(&self, kind: &str, value: &str) -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.ledger())
            .context("opening the node ledger")?;
        writeln!(file, "{kind} {value}").context("writing the node ledger")
    }

    /// The ledger's values of one kind.
    fn recorded(&self, kind: &str) -> BTreeSet<String> {
        std::fs::read_to_string(self.ledger())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_once(' '))
            .filter(|(k, _)| *k == kind)
            .map(|(_, v)| v.to_owned())
            .collect()
    }

    fn containerd_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file()).ok()?.trim().parse().ok()
    }
}

/// A private containerd with CRI, CNI and our images.
pub struct Node {
    files: NodeFiles,
    name: String,
    tools: HostTools,
    options: NodeOptions,
    shim_dir: Option<PathBuf>,
    containerd: crate::host_node::Containerd,
    restart_service: Option<crate::host_node::RestartService>,
    /// The node's systemd ([`NodeOptions::systemd`]).
    systemd: Option<crate::systemd::Systemd>,
    /// How many times containerd was started (a systemd node names each run's unit).
    starts: u32,
    cri: Option<CriClient>,
    ctr: Ctr,
    bridge: String,
    subnet: String,
    torn_down: bool,
    _serial: Option<SerialGuard>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("dir", &self.files.dir)
            .field("bridge", &self.bridge)
            .field("subnet", &self.subnet)
            .finish()
    }
}

impl Node {
    /// Checks prerequisites, reaps nodes left by killed tests, then starts a node and imports
    /// the images. Waits for the host-wide lock first ([`crate::serial`]).
    ///
    /// # Panics
    /// When a prerequisite is missing or the node does not come up (with containerd's log tail).
    pub fn start(options: NodeOptions) -> Node {
        let guard = serial();
        reap_stale_nodes(&prereq::check_host());
        Self::start_holding(options, Some(guard))
    }

    /// Two nodes at once (a pod moving between nodes): their own roots, sockets, bridges and
    /// subnets, under one hold of the host-wide lock (the first node holds it; drop the second
    /// first, as `let (a, b) = ...` does).
    ///
    /// # Panics
    /// As [`Node::start`].
    pub fn start_pair(first: NodeOptions, second: NodeOptions) -> (Node, Node) {
        let a = Self::start(first);
        let b = Self::start_holding(second, None);
        (a, b)
    }

    /// Starts a node; the caller holds the host-wide lock (`guard`, or the node it runs beside)
    /// and has reaped stale nodes.
    fn start_holding(options: NodeOptions, guard: Option<SerialGuard>) -> Node {
        let tools = prereq::check_host();
        let shim_dir = (options.podsnap_shim && options.host_root.is_none()).then(|| {
            prereq::podsnap_shim(&options.workload_bin)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
        });
        assert!(
            options.workload_bin.is_file(),
            "the workload binary {} does not exist (cargo builds it for the tests: `cargo build \
             -p podsnap-tests --bins`)",
            options.workload_bin.display()
        );
        let counter = NODE_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{}-{counter}", std::process::id());
        let dir = Path::new(NODE_PARENT).join(format!("{NODE_PREFIX}{name}"));
        let files = NodeFiles { dir };
        let (bridge, subnet) = pick_network(&name);
        let ctr = Ctr::new(&tools.ctr, files.socket());
        let mut node = Node {
            files,
            name,
            tools,
            options,
            shim_dir,
            containerd: Default::default(),
            restart_service: None,
            systemd: None,
            starts: 0,
            cri: None,
            ctr,
            bridge,
            subnet,
            torn_down: false,
            _serial: guard,
        };
        if let Err(e) = node.bring_up() {
            let tail = node.log_tail(60);
            let problems = node.teardown();
            panic!(
                "the private containerd did not come up: {e:#}\n--- containerd.log (tail) ---\n\
                 {tail}\n--- teardown ---\n{problems:?}"
            );
        }
        node
    }

    fn bring_up(&mut self) -> Result<()> {
        let dir = self.files.dir.clone();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            self.files.owner(),
            format!(
                "{}{}\n",
                std::process::id(),
                if self.options.keep { " keep" } else { "" }
            ),
        )?;
        self.files.record("bridge", &self.bridge)?;
        for sub in [
            "root",
            self.options.containerd_root.as_str(),
            "state",
            "cni/net.d",
            "cni/ipam",
            "cni/bin",
            "kubelet",
            "checkpoints",
            "images",
            "opt",
            "runc",
        ] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::os::unix::fs::symlink(&self.options.runc, self.files.runc_dir().join("runc"))
            .context("linking the node's runc")?;
        let hosts_dir = dir.join("certs.d/_default");
        std::fs::create_dir_all(&hosts_dir)?;
        std::fs::write(
            hosts_dir.join("hosts.toml"),
            "# No registry is reachable from tests: every pull fails here, locally.\n\
             server = \"http://127.0.0.1:9\"\n",
        )?;
        // podsnap's IPAM wrapper (it hands a restored pod its address at the checkpoint when
        // asked), beside the node's CNI plugins.
        let ipam = self.options.workload_bin.with_file_name(crate::IPAM_PLUGIN);
        anyhow::ensure!(
            ipam.is_file(),
            "{} does not exist (build it: `cargo build -p podsnap-coordinator --bins`)",
            ipam.display()
        );
        std::os::unix::fs::symlink(&ipam, dir.join("cni/bin").join(crate::IPAM_PLUGIN))?;
        std::fs::write(dir.join("cni/net.d/10-podsnap.conflist"), self.cni_conflist())?;
        std::fs::write(self.files.podsnap_config(), "")?;
        if self.options.systemd {
            let files = self.files.clone();
            let record = move |kind: &str, value: &str| files.record(kind, value);
            self.systemd = Some(
                crate::systemd::Systemd::start(&dir, &self.name, self.options.cgroup2, &record)
                    .context("starting the node's systemd")?,
            );
        }
        let config = match self.options.host_root {
            Some(style) => {
                crate::host_node::lay_out(&self.files)?;
                // The socket is under the host root now.
                self.ctr = Ctr::new(&self.tools.ctr, self.files.socket());
                style.render(&self.files, &self.options.log_level, &self.cni_bin_dirs())
            }
            None => self.containerd_config(),
        };
        std::fs::write(
            self.files.config(),
            format!("{config}{}", self.options.extra_config),
        )?;
        self.spawn_containerd()?;
        if self.options.host_root.is_some() {
            self.restart_service = Some(crate::host_node::RestartService::start(
                &self.files,
                self.containerd.clone(),
                self.launcher(),
            )?);
        }
        self.wait_ready()?;
        let archives = crate::images::build(&self.options.workload_bin, &dir.join("images"))
            .context("building the test images")?;
        for namespace in [CRI_NAMESPACE, DEFAULT_NAMESPACE] {
            for archive in &archives {
                crate::images::import(&self.ctr, namespace, archive)?;
            }
        }
        eprintln!(
            "podsnap-tests: node {} up (containerd {}, bridge {}, subnet {}, handler {}, runc {} {})",
            self.files.dir.display(),
            self.files.socket().display(),
            self.bridge,
            self.subnet,
            crate::handler(),
            prereq::runc_version(&self.options.runc),
            self.options.runc.display()
        );
        Ok(())
    }

    /// The conflist: a bridge and host-local IPAM of this instance, behind podsnap's IPAM
    /// wrapper (the bridge passes it the pod's annotations). containerd itself adds the loopback
    /// network (the `loopback` plugin) to every pod.
    fn cni_conflist(&self) -> String {
        let ipam_dir = self.files.dir.join("cni/ipam");
        let host_local = serde_json::json!({
            "type": "host-local",
            "ranges": [[{ "subnet": self.subnet }]],
            "routes": [{ "dst": "0.0.0.0/0" }],
            "dataDir": ipam_dir,
        });
        let ipam = if self.options.plain_ipam {
            host_local
        } else {
            serde_json::json!({ "type": crate::IPAM_PLUGIN, "delegate": host_local })
        };
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("podsnap-{}", self.name),
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "capabilities": { "io.kubernetes.cri.pod-annotations": true },
                "ipam": ipam,
            }],
        })
        .to_string()
    }

    /// containerd 2.x config (version 3), keys as `containerd config default` prints them.
    fn containerd_config(&self) -> String {
        let dir = self.files.dir.display();
        let level = &self.options.log_level;
        let pause = crate::PAUSE_IMAGE;
        let cni_bin = prereq::CNI_BIN_DIR;
        format!(
            r#"# podsnap test node {name}
version = 3
root = '{dir}/{root}'
state = '{dir}/state'

[grpc]
  address = '{dir}/containerd.sock'

[ttrpc]
  address = '{dir}/containerd.sock.ttrpc'

[debug]
  level = '{level}'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{pause}'
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = '{dir}/certs.d'

  [plugins.'io.containerd.cri.v1.runtime']
    # This VM withholds CAP_SYS_RESOURCE: the pause container's -998 would fail in runc init.
    restrict_oom_score_adj = true
    enable_cdi = false
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
{runc_options}      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.podsnap]
        runtime_type = 'io.containerd.podsnap.v1'
        pod_annotations = ['podsnap.io/*']
        container_annotations = ['podsnap.io/*', 'io.kubernetes.container.restartCount']
{podsnap_options}    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['{dir}/cni/bin', '{cni_bin}']
      conf_dir = '{dir}/cni/net.d'
      max_conf_num = 1

  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'

  [plugins.'io.containerd.transfer.v1.local']
    config_path = '{dir}/certs.d'

  [plugins.'io.containerd.nri.v1.nri']
    disable = true

  [plugins.'io.containerd.internal.v1.opt']
    path = '{dir}/opt'
"#,
            name = self.name,
            root = self.options.containerd_root,
            runc_options = self.handler_options("runc"),
            podsnap_options = self.handler_options("podsnap"),
        )
    }

    /// A CRI handler's `options` table: on a systemd node, the systemd cgroup driver and the
    /// node's runc by path (the first `runc` of the test's own `PATH` directories, such as the
    /// v2 stand-in, else the node's runc); nothing otherwise.
    fn handler_options(&self, handler: &str) -> String {
        if !self.options.systemd {
            return String::new();
        }
        let runc = self
            .options
            .path_prefix
            .iter()
            .map(|d| d.join("runc"))
            .find(|p| p.exists())
            .unwrap_or_else(|| self.files.runc_dir().join("runc"));
        format!(
            "      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{handler}.options]\n\
             \x20       BinaryName = '{}'\n\
             \x20       SystemdCgroup = true\n",
            runc.display()
        )
    }

    /// The CNI plugin directories of this node's configuration.
    fn cni_bin_dirs(&self) -> String {
        format!(
            "'{}/cni/bin', '{}'",
            self.files.dir.display(),
            prereq::CNI_BIN_DIR
        )
    }

    /// How this node's containerd is started (also by the restart service).
    fn launcher(&self) -> crate::host_node::Launcher {
        let mut path = String::new();
        for dir in &self.options.path_prefix {
            let _ = write!(path, "{}:", dir.display());
        }
        if !self.options.systemd {
            let _ = write!(path, "{}:", self.files.runc_dir().display());
        }
        if let Some(dir) = &self.shim_dir {
            let _ = write!(path, "{}:", dir.display());
        }
        if self.options.host_root.is_some() {
            let _ = write!(
                path,
                "{}:",
                self.files.host_root().join("usr/local/bin").display()
            );
        }
        let _ = write!(
            path,
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            std::env::var("PATH").unwrap_or_default()
        );
        let mut env = vec![
            ("PATH".to_owned(), path),
            (
                "TMPDIR".to_owned(),
                self.files.dir.join("tmp").display().to_string(),
            ),
            (
                "PODSNAP_CHECKPOINT_ROOT".to_owned(),
                self.files.checkpoints().display().to_string(),
            ),
        ];
        // A host-root node's shim reads /etc/podsnap/config.toml, as on a host.
        if self.options.host_root.is_none() {
            env.push((
                "PODSNAP_CONFIG".to_owned(),
                self.files.podsnap_config().display().to_string(),
            ));
        }
        env.extend(self.options.extra_env.iter().cloned());
        crate::host_node::Launcher {
            containerd: self.tools.containerd.clone(),
            files: self.files.clone(),
            env,
            cgroup2: self.options.cgroup2,
            host_root: self.options.host_root.is_some(),
        }
    }

    fn spawn_containerd(&mut self) -> Result<()> {
        let launcher = self.launcher();
        if self.systemd.is_some() {
            return self.spawn_containerd_under_systemd(&launcher.env);
        }
        let child = launcher.spawn()?;
        *crate::host_node::lock(&self.containerd) = Some(child);
        Ok(())
    }

    /// Starts containerd as a transient service of the node's systemd, as containerd.service
    /// runs on a node (`Delegate=yes`: its shims' cgroups are its own; `KillMode=process`:
    /// stopping it leaves the shims), and records its host pid. Its output goes to the node's
    /// containerd.log.
    fn spawn_containerd_under_systemd(&mut self, env: &[(String, String)]) -> Result<()> {
        self.starts += 1;
        let systemd = self.systemd.as_ref().context("the node has no systemd")?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.files.dir.join("tmp"))
            .context("creating the node's TMPDIR")?;
        let unit = format!("podsnap-containerd-{}.service", self.starts);
        let log = self.files.log();
        let mut command = systemd.command("systemd-run");
        command
            .arg(format!("--unit={unit}"))
            .args(["--collect", "--quiet", "--property=DefaultDependencies=no"])
            .args(["--property=Delegate=yes", "--property=KillMode=process"])
            .arg(format!("--property=StandardOutput=append:{}", log.display()))
            .arg(format!("--property=StandardError=append:{}", log.display()));
        for (k, v) in env {
            command.arg(format!("--setenv={k}={v}"));
        }
        command
            .arg(&self.tools.containerd)
            .arg("--config")
            .arg(self.files.config());
        run_within(&mut command, Duration::from_secs(30)).context("systemd-run containerd")?;
        let config = self.files.config().to_string_lossy().into_owned();
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid = loop {
            let found = host::processes().into_iter().find(|(_, argv)| {
                argv.first().is_some_and(|a| a.ends_with("containerd")) && argv.contains(&config)
            });
            if let Some((pid, _)) = found {
                break pid;
            }
            if Instant::now() >= deadline {
                let state = systemd
                    .systemctl(&["status", "--no-pager", &unit])
                    .unwrap_or_else(|e| e.to_string());
                bail!("containerd did not start as {unit}: {state}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::fs::write(self.files.pid_file(), pid.to_string())?;
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let endpoint = format!("unix://{}", self.files.socket().display());
        let mut last_error = String::from("socket not created yet");
        loop {
            if let Some(child) = crate::host_node::lock(&self.containerd).as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("containerd exited during startup ({status})");
                }
            } else if !self.files.containerd_pid().is_some_and(host::alive) {
                bail!("containerd exited during startup");
            }
            if self.files.socket().exists() {
                match CriClient::connect(&endpoint) {
                    Ok(client) => match client.ready() {
                        Ok(true) => {
                            self.cri = Some(client);
                            return Ok(());
                        }
                        Ok(false) => last_error = "CRI runtime or network not ready".to_owned(),
                        Err(status) => last_error = format!("CRI Status: {status}"),
                    },
                    Err(e) => last_error = format!("{e:#}"),
                }
            }
            if Instant::now() >= deadline {
                bail!("containerd not ready after {READY_TIMEOUT:?}: {last_error}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `/sys/fs/cgroup` as containerd, its shims and runc see it (through containerd's root:
    /// on a [`NodeOptions::cgroup2`] node that is the private cgroup2 mount).
    pub fn cgroup_root(&self) -> PathBuf {
        match self.containerd_pid() {
            Some(pid) => PathBuf::from(format!("/proc/{pid}/root/sys/fs/cgroup")),
            None => PathBuf::from("/sys/fs/cgroup"),
        }
    }

    /// Connects the node's CRI client again and waits until CRI is ready (after containerd was
    /// restarted from outside the harness, e.g. by `podsnap node install`).
    pub fn reconnect(&mut self) -> Result<()> {
        self.cri = None;
        self.wait_ready()
    }

    /// The host root of a [`NodeOptions::host_root`] node (`--host-root` for the installer).
    pub fn host_root(&self) -> PathBuf {
        self.files.host_root()
    }

    /// The command that restarts a [`NodeOptions::host_root`] node's containerd in place
    /// (`--restart-command`): see [`crate::host_node`].
    pub fn restart_command(&self) -> String {
        crate::host_node::restart_script(&self.files)
            .display()
            .to_string()
    }

    /// The node directory.
    pub fn dir(&self) -> &Path {
        &self.files.dir
    }

    /// The node's files.
    pub fn files(&self) -> &NodeFiles {
        &self.files
    }

    /// Replaces the node's podsnap configuration (the shim reads it at every restore); returns
    /// it parsed, for the CLI's `RestoreRequest`.
    pub fn set_podsnap_config(&self, toml: &str) -> Result<podsnap_coordinator::NodeConfig> {
        let path = self.files.podsnap_config();
        std::fs::write(&path, toml)?;
        podsnap_coordinator::NodeConfig::read(&path).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Lets CRI pulls reach the registry at `host` (`127.0.0.1:PORT`, plain HTTP): every other
    /// registry stays unreachable.
    pub fn allow_registry(&self, host: &str) -> Result<()> {
        let dir = self.files.dir.join("certs.d").join(host);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
        Ok(())
    }

    /// This instance's short name (`<pid>-<n>`), unique on the host.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `base-<node name>`: container and pod names must be unique per run because some
    /// containerd paths are shared between instances.
    pub fn unique(&self, base: &str) -> String {
        format!("{base}-{}", self.name)
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> PathBuf {
        self.files.socket()
    }

    /// The CRI endpoint, `unix://...`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.files.socket().display())
    }

    /// The CRI client.
    ///
    /// # Panics
    /// After teardown.
    pub fn cri(&self) -> &CriClient {
        self.cri
            .as_ref()
            .expect("the node's CRI client exists between start and teardown")
    }

    /// `ctr` against this node.
    pub fn ctr(&self) -> &Ctr {
        &self.ctr
    }

    /// The runc this node runs (every shim finds it first on `PATH`).
    pub fn runc(&self) -> &Path {
        &self.options.runc
    }

    /// Its release (`runc --version`).
    pub fn runc_version(&self) -> prereq::RuncVersion {
        prereq::runc_version(&self.options.runc)
    }

    /// The host programs.
    pub fn tools(&self) -> &HostTools {
        &self.tools
    }

    /// The pod subnet of this node.
    pub fn subnet(&self) -> &str {
        &self.subnet
    }

    /// The CNI bridge of this node.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// containerd's pid.
    pub fn containerd_pid(&self) -> Option<u32> {
        if self.files.is_host_root() || self.systemd.is_some() {
            // Restarted in place, or a service of the node's systemd: whichever containerd the
            // pid file names.
            return std::fs::read_to_string(self.files.pid_file())
                .ok()
                .and_then(|p| p.trim().parse().ok());
        }
        crate::host_node::lock(&self.containerd).as_ref().map(Child::id)
    }

    /// The node's systemd ([`NodeOptions::systemd`]).
    pub fn systemd(&self) -> Option<&crate::systemd::Systemd> {
        self.systemd.as_ref()
    }

    /// Whether pods get the systemd cgroup driver's cgroup parents (a pod slice).
    pub fn systemd_cgroups(&self) -> bool {
        self.options.systemd
    }

    /// Shim processes of `binary` serving this node.
    pub fn shim_pids(&self, binary: &str) -> Vec<i32> {
        host::shim_pids(binary, &self.files.socket())
    }

    /// Records a pod's network namespace and uid so teardown removes them even if CRI cannot.
    pub fn record_pod(&self, uid: &str, netns: Option<&str>) -> Result<()> {
        self.files.record("pod-uid", uid)?;
        if let Some(netns) = netns {
            self.files.record("netns", netns)?;
        }
        Ok(())
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.files.log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|line| match line.char_indices().nth(LOG_LINE_CUT) {
                Some((cut, _)) => format!("{}...", &line[..cut]),
                None => (*line).to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// containerd's log lines that mention `needle`.
    pub fn log_grep(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(self.files.log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// Stops containerd (SIGTERM, then SIGKILL after 10 s) and starts it again with the same
    /// config. Shims and their containers keep running; containerd reconnects to them.
    pub fn restart_containerd(&mut self) -> Result<()> {
        self.cri = None;
        let old = crate::host_node::lock(&self.containerd).take();
        if let Some(mut child) = old {
            stop_process(&mut child, Duration::from_secs(10));
        } else if let Some(pid) = self.files.containerd_pid() {
            host::signal(pid, Signal::SIGTERM);
            if !host::wait_gone(&[pid], Duration::from_secs(10)).is_empty() {
                host::signal(pid, Signal::SIGKILL);
                host::wait_gone(&[pid], Duration::from_secs(5));
            }
        }
        self.spawn_containerd()?;
        self.wait_ready()
    }

    /// Copies containerd's log to [`SAVED_LOGS_DIR`] and returns the copy's path.
    pub fn save_log(&self, label: &str) -> Option<PathBuf> {
        std::fs::create_dir_all(SAVED_LOGS_DIR).ok()?;
        let target = Path::new(SAVED_LOGS_DIR).join(format!("{label}-{}-containerd.log", self.name));
        std::fs::copy(self.files.log(), &target).ok()?;
        Some(target)
    }

    /// Removes the node and everything it made; returns what could not be cleaned (empty when
    /// all went). Safe to call more than once.
    pub fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let cri = self.cri.take();
        if let Some(service) = self.restart_service.take() {
            service.stop();
        }
        let containerd = crate::host_node::lock(&self.containerd).take();
        let problems = clean_node(&self.files, &self.tools, cri.as_ref(), containerd);
        if let Some(systemd) = self.systemd.as_mut() {
            systemd.reap();
        }
        self._serial = None;
        problems
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        let panicking = std::thread::panicking();
        if panicking || std::env::var_os("PODSNAP_KEEP_LOGS").is_some() {
            if let Some(copy) = self.save_log(if panicking { "failed" } else { "kept" }) {
                eprintln!("podsnap-tests: containerd log saved to {}", copy.display());
            }
            if panicking {
                eprintln!("podsnap-tests: containerd.log tail:\n{}", self.log_tail(40));
            }
        }
        if self.options.keep && !panicking {
            eprintln!(
                "podsnap-tests: keeping node {} (containerd pid {:?}); remove it with a later \
                 teardown",
                self.files.dir.display(),
                self.containerd_pid()
            );
            // Detach: containerd keeps running in its own process group.
            if let Some(child) = crate::host_node::lock(&self.containerd).take() {
                std::mem::forget(child);
            }
            return;
        }
        let problems = self.teardown();
        if !problems.is_empty() {
            eprintln!("podsnap-tests: teardown left problems: {problems:#?}");
        }
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; reaps the child.
pub(crate) fn stop_process(child: &mut Child, grace: Duration) {
    let pid = i32::try_from(child.id()).unwrap_or(0);
    if pid > 0 {
        host::signal(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Picks a bridge name (15 characters at most) and a /24 in 10.0.0.0/8 that no route uses.
fn pick_network(name: &str) -> (String, String) {
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let used: BTreeSet<u32> = routes
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter_map(|hex| u32::from_str_radix(hex, 16).ok())
        .map(|dest| dest & 0x00ff_ffff)
        .collect();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().rotate_left(13);
    for attempt in 0u32..1000 {
        let value = seed.wrapping_add(attempt.wrapping_mul(7919));
        let second = 100 + (value >> 8) % 100;
        let third = value % 256;
        // /proc/net/route prints the destination little-endian: 10.b.c.0 -> 0x00c_b0a.
        let dest = (third << 16) | (second << 8) | 10;
        let bridge = format!("psn{:x}", value & 0xff_ffff);
        if !used.contains(&dest) && !host::link_exists(&bridge) {
            return (bridge, format!("10.{second}.{third}.0/24"));
        }
    }
    (
        format!("psn{}", name.replace('-', "")),
        "10.199.199.0/24".to_owned(),
    )
}

/// Tears down a node directory: pods through CRI, tasks and containers through ctr,
/// containerd, shims, runc leftovers, processes rooted in it, mounts, network namespaces, the
/// bridge, pod cgroups, and finally the directory. Returns what failed.
fn clean_node(
    files: &NodeFiles,
    tools: &HostTools,
    cri: Option<&CriClient>,
    containerd: Option<Child>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let socket = files.socket();
    let containerd_pid = containerd
        .as_ref()
        .and_then(|c| i32::try_from(c.id()).ok())
        .or_else(|| files.containerd_pid());
    let containerd_alive = containerd_pid.is_some_and(host::alive);
    // (namespace, id) of every pod and task seen: their shim sockets go at the end.
    let mut shim_ids: Vec<(String, String)> = Vec::new();

    // 1. Pods, through CRI (records each pod's netns first).
    if let Some(cri) = cri {
        match cri.pod_ids() {
            Ok(pods) => {
                for pod in pods {
                    shim_ids.push((CRI_NAMESPACE.to_owned(), pod.clone()));
                    if let Ok(Some(netns)) = cri.pod_netns(&pod) {
                        let _ = files.record("netns", &netns);
                    }
                    if let Err(status) = cri.stop_and_remove_pod(&pod) {
                        problems.push(format!("CRI stop/remove pod {pod}: {}", status.message()));
                    }
                }
            }
            Err(status) => problems.push(format!("CRI ListPodSandbox: {}", status.message())),
        }
    }

    // 2. Tasks and containers in every namespace, through ctr.
    if containerd_alive {
        let ctr = Ctr::new(&tools.ctr, &socket);
        let namespaces = ctr.list_ids(DEFAULT_NAMESPACE, "namespaces").unwrap_or_default();
        for namespace in namespaces {
            for task in ctr.list_ids(&namespace, "tasks").unwrap_or_default() {
                shim_ids.push((namespace.clone(), task.clone()));
                let _ = ctr.run(&namespace, &["tasks", "kill", "-a", "-s", "SIGKILL", &task]);
                let _ = ctr.run(&namespace, &["tasks", "delete", "-f", &task]);
            }
            for container in ctr.list_ids(&namespace, "containers").unwrap_or_default() {
                if let Err(e) = ctr.run(&namespace, &["containers", "rm", &container]) {
                    problems.push(format!("ctr containers rm {container}: {e}"));
                }
            }
        }
    }

    // 3. containerd.
    match containerd {
        Some(mut child) => stop_process(&mut child, Duration::from_secs(10)),
        None => {
            if let Some(pid) = containerd_pid.filter(|&p| is_our_containerd(p, files)) {
                host::signal(pid, Signal::SIGTERM);
                if !host::wait_gone(&[pid], Duration::from_secs(10)).is_empty() {
                    host::signal(pid, Signal::SIGKILL);
                    host::wait_gone(&[pid], Duration::from_secs(5));
                }
            }
        }
    }

    // 4. Shims of this instance.
    let shims = host::all_shim_pids(&socket);
    for &pid in &shims {
        host::signal(pid, Signal::SIGKILL);
    }
    for pid in host::wait_gone(&shims, Duration::from_secs(5)) {
        problems.push(format!("shim {pid} survived SIGKILL"));
    }
    for (namespace, id) in &shim_ids {
        let _ = std::fs::remove_file(host::shim_socket(&socket, namespace, id));
    }

    // 4b. A systemd node's systemd, with everything in its namespaces, then its cgroups.
    let systemd_pids: Vec<i32> = files
        .recorded("systemd")
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    let systemd_cgroups: Vec<PathBuf> = files.recorded("cgroup").iter().map(PathBuf::from).collect();
    problems.extend(crate::systemd::clean(&files.dir, &systemd_pids, &systemd_cgroups));

    // 5. runc containers whose bundle is in this node (with the node's own runc).
    problems.extend(delete_runc_leftovers(&files.runc_or(&tools.runc), &files.dir));

    // 6. Any process still rooted in this node's filesystem.
    let rooted = processes_rooted_under(&files.dir);
    for &pid in &rooted {
        host::signal(pid, Signal::SIGKILL);
    }
    for pid in host::wait_gone(&rooted, Duration::from_secs(5)) {
        problems.push(format!("process {pid} rooted in the node survived SIGKILL"));
    }

    // 7. Mounts.
    problems.extend(host::unmount_all_under(&files.dir));

    // 8. Network namespaces.
    for netns in files.recorded("netns") {
        if let Err(e) = host::remove_netns(Path::new(&netns)) {
            problems.push(e);
        }
    }

    // 9. The bridge.
    for bridge in files.recorded("bridge") {
        if host::link_exists(&bridge) {
            if let Err(e) = run_within(
                Command::new(&tools.ip).args(["link", "delete", &bridge]),
                Duration::from_secs(10),
            ) {
                problems.push(format!("removing bridge {bridge}: {e}"));
            }
        }
    }

    // 10. Pod cgroups (kubelet's job on a real node).
    for uid in files.recorded("pod-uid") {
        problems.extend(host::remove_pod_cgroups(&uid));
    }

    // 11. The directory.
    if let Err(e) = std::fs::remove_dir_all(&files.dir) {
        if files.dir.exists() {
            problems.push(format!("removing {}: {e}", files.dir.display()));
        }
    }
    problems
}

fn is_our_containerd(pid: i32, files: &NodeFiles) -> bool {
    let config = files.config().to_string_lossy().into_owned();
    host::cmdline(pid).is_some_and(|argv| argv.contains(&config))
}

/// `runc --root <root> delete --force` for every runc container (in any runc root of
/// [`host::RUNC_ROOT_PARENTS`]) whose bundle lies under `dir`.
fn delete_runc_leftovers(runc: &Path, dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let roots: Vec<PathBuf> = host::RUNC_ROOT_PARENTS
        .iter()
        .filter_map(|parent| std::fs::read_dir(parent).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .collect();
    for root in roots {
        let listing = run_within(
            Command::new(runc)
                .arg("--root")
                .arg(&root)
                .args(["list", "--format", "json"]),
            Duration::from_secs(20),
        );
        let Ok(listing) = listing else { continue };
        let Ok(serde_json::Value::Array(containers)) = serde_json::from_str::<serde_json::Value>(&listing)
        else {
            continue;
        };
        for container in containers {
            let id = container["id"].as_str().unwrap_or_default();
            let bundle = container["bundle"].as_str().unwrap_or_default();
            if id.is_empty() || !Path::new(bundle).starts_with(dir) {
                continue;
            }
            if let Err(e) = run_within(
                Command::new(runc)
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "--force", id]),
                Duration::from_secs(20),
            ) {
                problems.push(format!("runc delete --force {id}: {e}"));
            }
        }
    }
    problems
}

/// Processes whose root directory lies under `dir` (container processes of this node).
pub fn processes_rooted_under(dir: &Path) -> Vec<i32> {
    host::processes()
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/root"))
                .map(|root| root.starts_with(dir))
                .unwrap_or(false)
        })
        .collect()
}

/// Tears down node directories whose owner process is gone (a test killed before its `Drop`),
/// except nodes started with `keep`. Called with the host-wide lock held.
fn reap_stale_nodes(tools: &HostTools) {
    let Ok(entries) = std::fs::read_dir(NODE_PARENT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(NODE_PREFIX) || !entry.path().is_dir() {
            continue;
        }
        let files = NodeFiles { dir: entry.path() };
        let owner = std::fs::read_to_string(files.owner()).unwrap_or_default();
        let mut words = owner.split_whitespace();
        let owner_pid: Option<i32> = words.next().and_then(|p| p.parse().ok());
        let keep = words.any(|w| w == "keep");
        if keep || owner_pid.is_some_and(|p| host::alive(p) && p != own_pid()) {
            continue;
        }
        eprintln!(
            "podsnap-tests: reaping the node {} left by process {owner_pid:?}",
            files.dir.display()
        );
        let cri = files
            .containerd_pid()
            .filter(|&p| host::alive(p) && is_our_containerd(p, &files))
            .and_then(|_| CriClient::connect(&format!("unix://{}", files.socket().display())).ok());
        let problems = clean_node(&files, tools, cri.as_ref(), None);
        if !problems.is_empty() {
            eprintln!("podsnap-tests: reaping left problems: {problems:#?}");
        }
    }
}

fn own_pid() -> i32 {
    i32::try_from(std::process::id()).unwrap_or(0)
}

/// Tears down a node directory by path (`podsnap-demo --teardown DIR` for a kept node).
pub fn teardown_dir(dir: &Path) -> Vec<String> {
    let tools = prereq::check_host();
    let _guard = serial();
    let files = NodeFiles {
        dir: dir.to_path_buf(),
    };
    let cri = files
        .containerd_pid()
        .filter(|&p| host::alive(p) && is_our_containerd(p, &files))
        .and_then(|_| CriClient::connect(&format!("unix://{}", files.socket().display())).ok());
    clean_node(&files, &tools, cri.as_ref(), None)
}

/// Makes a directory with mode 0755 and its parents (kubelet's pod and log directories).
pub fn make_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Creates an empty file (kubelet's `/etc/hosts` and termination-log files).
pub fn make_file(path: &Path, content: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        make_dir(parent)?;
    }
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(content.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
