//! `podsnap`: checkpoint a whole Kubernetes pod on this node and bring it back.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use podsnap_checkpoint::config::NodeConfig;
use podsnap_checkpoint::lease::LEASE_DIR;
use podsnap_checkpoint::store;
use podsnap_coordinator::containerd::DEFAULT_ADDRESS;
use podsnap_coordinator::dump::{dump, short, DumpRequest};
use podsnap_coordinator::progress;
use podsnap_coordinator::restore::{restore, RestoreRequest, DEFAULT_LOGS_DIR, DEFAULT_PODS_DIR};
use podsnap_coordinator::summary::human_bytes;
use podsnap_coordinator::{inspect, list, oci, pod};

#[derive(Debug, Parser)]
#[command(
    name = "podsnap",
    version,
    about = "Checkpoint and restore whole Kubernetes pods run by the podsnap runtime"
)]
struct Cli {
    /// CRI endpoint of the node's container runtime [default:
    /// unix:///run/containerd/containerd.sock; for `podsnap node`, the socket containerd's
    /// configuration names, under the host root].
    #[arg(long, global = true, env = "CONTAINER_RUNTIME_ENDPOINT")]
    runtime_endpoint: Option<String>,
    /// containerd's socket.
    #[arg(long, global = true, env = "CONTAINERD_ADDRESS", default_value = DEFAULT_ADDRESS)]
    address: PathBuf,
    /// The node's checkpoint root (where the shim looks for `podsnap.io/restore-from` names);
    /// else `checkpoint_root` of the node configuration, else /var/lib/podsnap/checkpoints.
    #[arg(long, global = true, env = "PODSNAP_CHECKPOINT_ROOT")]
    checkpoint_root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checkpoint every container of a pod at one instant.
    Dump(DumpArgs),
    /// Recreate a checkpointed pod (new sandbox, new IP), its containers restored in order.
    Restore(RestoreArgs),
    /// Move a pod off this node: dump it stopped at the snapshot, push the checkpoint to an OCI
    /// registry, and print the time each phase took (then `podsnap restore --from REF` on the
    /// target node).
    Migrate(MigrateArgs),
    /// Verify a checkpoint's digests and show what it holds.
    Inspect {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// List the checkpoints of the node's checkpoint root.
    List(ListArgs),
    /// Push a checkpoint to an OCI registry, signed with the node's key (`[registry]` of the
    /// node configuration): one zstd layer per container, per volume and for the rest; layers
    /// the registry already has are not uploaded again.
    Push {
        /// The checkpoint directory.
        dir: PathBuf,
        /// An image reference, e.g. `registry.example.com/checkpoints/web:v1`.
        reference: String,
        /// zstd compression level (1-19).
        #[arg(long, default_value_t = oci::DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: i32,
    },
    /// Pull a checkpoint from an OCI registry into the node's checkpoint root, after checking
    /// its signature against the trusted keys and every file's digest.
    Pull {
        /// An image reference (tag or digest).
        reference: String,
        /// The checkpoint's name in the checkpoint root (or a path directly inside the root);
        /// must not exist.
        dir: PathBuf,
        /// Pull it for a pod of this namespace to restore: the node's restore policy is
        /// checked against the checkpoint's manifest before any layer is downloaded (the
        /// shim's `oci://` restores pass the pod's namespace).
        #[arg(long, value_name = "NAMESPACE")]
        for_namespace: Option<String>,
    },
    /// Install podsnap on this node (shim, containerd drop-in, restart), remove it, or show it.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Remove checkpoints from the node's checkpoint root, by name (never one in use).
    Rm {
        /// Checkpoint names, as `podsnap list` shows them.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Install the shim and the CLI, register the `podsnap` runtime handler with containerd (a
    /// drop-in and one import), restart containerd if that changed anything and wait until CRI
    /// serves the handler; on any failure, put everything back.
    Install(NodeInstallArgs),
    /// Undo what `install` did (its record, /etc/podsnap/installed.json), restart containerd and
    /// wait until the handler is gone; refused while podsnap pods run unless --force.
    Uninstall {
        #[command(flatten)]
        host: NodeHostArgs,
        /// Uninstall even while pods of the podsnap handler run (their shims lose their binary).
        #[arg(long)]
        force: bool,
    },
    /// What is installed, the versions, and whether containerd serves the handler.
    Status {
        /// The host's root directory (`/host` in the DaemonSet).
        #[arg(long, default_value = "/")]
        host_root: PathBuf,
    },
}

#[derive(Debug, Args)]
struct NodeHostArgs {
    /// The host's root directory: every file is read and written under it (`/host` in the
    /// DaemonSet).
    #[arg(long, default_value = "/")]
    host_root: PathBuf,
    /// Shell command that restarts containerd, run in the host's namespaces (default: systemd's
    /// unit, over D-Bus or with systemctl).
    #[arg(long, value_name = "CMD")]
    restart_command: Option<String>,
    /// How long containerd may take to come back after a restart.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    timeout: u64,
}

#[derive(Debug, Args)]
struct NodeInstallArgs {
    #[command(flatten)]
    host: NodeHostArgs,
    /// containerd's configuration, as a host path (default: /etc/containerd/config.toml, or
    /// k3s's and RKE2's templates where they run).
    #[arg(long, value_name = "PATH")]
    containerd_config: Option<PathBuf>,
    /// Where the binaries to install are (default: this program's directory).
    #[arg(long, value_name = "DIR")]
    binaries: Option<PathBuf>,
    /// Where the shim and the CLI go on the host (on containerd's PATH).
    #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
    /// Also install podsnap-cni-ipam into this CNI plugin directory of the host.
    #[arg(long, value_name = "DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// Write this node configuration to /etc/podsnap/config.toml unless one is there.
    #[arg(long, value_name = "FILE")]
    node_config: Option<PathBuf>,
    /// Stay after the install; on SIGTERM (or SIGINT), uninstall (the DaemonSet's way).
    #[arg(long)]
    wait: bool,
    /// Label this Kubernetes node podsnap.io/runtime=ready once the handler is served (removed
    /// before the uninstall), with the pod's service account.
    #[arg(long, value_name = "NODE", requires = "wait", env = "PODSNAP_LABEL_NODE")]
    label_node: Option<String>,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Read every file of every checkpoint and check its digest.
    #[arg(long)]
    verify: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// A table that fits a terminal.
    Table,
    /// A JSON array, for scripts.
    Json,
}

#[derive(Debug, Args)]
struct DumpArgs {
    /// The pod's Kubernetes namespace.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The pod's name.
    #[arg(long)]
    pod: String,
    /// Where to write the checkpoint (must not exist, or be empty); default
    /// `<checkpoint root>/<namespace>-<pod>-<UTC time>`.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Leave the pod running after the dump (the default).
    #[arg(long, conflicts_with = "stop")]
    leave_running: bool,
    /// Stop the pod at the snapshot: its containers are killed while still frozen, so nothing
    /// runs after the checkpoint (for a move to another node).
    #[arg(long)]
    stop: bool,
    /// Restore established TCP connections too (they are closed on restore otherwise).
    #[arg(long)]
    tcp_established: bool,
    /// Give up after this many seconds: the pod is thawed and the output removed (the node's
    /// dump deadline, 120 s unless configured, applies either way).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Then push the checkpoint to this OCI reference (as `podsnap push`).
    #[arg(long, value_name = "REF")]
    push: Option<String>,
    /// zstd level of the pushed layers (1-19).
    #[arg(long, default_value_t = oci::DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19), requires = "push")]
    zstd_level: i32,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// The pod's Kubernetes namespace.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The pod's name.
    #[arg(long)]
    pod: String,
    /// Where to push the checkpoint (an image reference).
    #[arg(long, value_name = "REF")]
    to: String,
    /// Keep established TCP connections (they go on if the target gives the pod its address).
    #[arg(long)]
    tcp_established: bool,
    /// Give up on the dump after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// zstd level of the pushed layers (1-19).
    #[arg(long, default_value_t = oci::DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: i32,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// The checkpoint to restore; one outside the checkpoint root is brought into it for the
    /// restore (hard links, a copy only from another filesystem) and removed afterwards.
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    checkpoint_dir: Option<PathBuf>,
    /// Pull the checkpoint from this OCI reference into the checkpoint root first (as
    /// `podsnap pull`: allowed registries and signatures checked), then restore it.
    #[arg(long, value_name = "REF")]
    from: Option<String>,
    /// Namespace of the new pod (default: the checkpointed pod's).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Name of the new pod (default: the checkpointed pod's).
    #[arg(long)]
    name: Option<String>,
    /// kubelet's pod directories (emptyDir volumes are made under them).
    #[arg(long, default_value = DEFAULT_PODS_DIR)]
    pods_dir: PathBuf,
    /// kubelet's pod log directories.
    #[arg(long, default_value = DEFAULT_LOGS_DIR)]
    logs_dir: PathBuf,
    /// On the node where the checkpoint was taken, give the pod its address at the checkpoint
    /// (needs `podsnap-cni-ipam` in the node's CNI configuration; fails if it is taken), so
    /// connections kept with `--tcp-established` at the dump go on.
    #[arg(long)]
    keep_ip: bool,
    /// Restore lazily: each container runs as soon as its processes are back, and its memory
    /// follows from the checkpoint on demand and in the background (CRIU lazy pages,
    /// userfaultfd). The checkpoint stays in use until every page is back.
    #[arg(long)]
    lazy: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Node(_)) {
        // The installer's steps are worth seeing in a pod's log.
        init_logging();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podsnap: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What `dump_and_push` reports of its dump.
struct Dumped {
    took: std::time::Duration,
    frozen: std::time::Duration,
}

/// `podsnap dump`, then, with `push = Some((REF, level))`, `podsnap push` of the checkpoint it
/// wrote. Prints what each did; returns the dump's times and how long the push took.
fn dump_and_push(
    runtime: &tokio::runtime::Runtime,
    config: &NodeConfig,
    request: &DumpRequest,
    push: Option<(String, i32)>,
) -> anyhow::Result<(Dumped, Option<std::time::Duration>)> {
    // With a push, the container parts start uploading as soon as the dump announces them
    // (`<dest>.parts`), while it digests, writes the manifest and, with --stop, syncs.
    let mut request = request.clone();
    let early = match &push {
        Some((reference, zstd_level)) => {
            let dest = podsnap_coordinator::dump::destination(&request)?;
            request.dir = Some(dest.clone());
            let push = push_request(config, dest.clone(), reference.clone(), *zstd_level);
            let parts = Announcements::create(&dest)?;
            let early = runtime
                .block_on(oci::EarlyPush::start(&push, &dest, parts.0.clone()))
                .with_context(|| format!("push to {reference}"))?;
            Some((early, parts))
        }
        None => None,
    };
    let progress = progress::for_stderr();
    let outcome = runtime.block_on(dump(&request, progress.as_ref()));
    progress.finish();
    let prebuilt = match early {
        Some((early, parts)) => {
            let prebuilt = runtime.block_on(early.finish());
            drop(parts);
            prebuilt
        }
        None => Default::default(),
    };
    let outcome = outcome.with_context(|| format!("dump of pod {}/{}", request.namespace, request.pod))?;
    println!("{}", outcome.summary);
    println!(
        "took         {:.1?}{}",
        outcome.took,
        if request.stop { " (pod stopped)" } else { "" }
    );
    let dumped = Dumped {
        took: outcome.took,
        frozen: outcome.summary.frozen,
    };
    let Some((reference, zstd_level)) = push else {
        return Ok((dumped, None));
    };
    let started = std::time::Instant::now();
    // The dump has just written and digested every file of it: no second pass before the push.
    let mut push = push_request(config, outcome.summary.dir.clone(), reference, zstd_level);
    push.just_dumped = true;
    push.prebuilt = prebuilt;
    let pushed = push_checkpoint(runtime, &push)?;
    println!(
        "pushed       {} ({} layers, {} uploaded, {} of them during the dump)",
        pushed.pushed,
        pushed.layers,
        pushed.uploaded + pushed.early,
        pushed.early
    );
    Ok((dumped, Some(started.elapsed())))
}

/// `<dest>.parts`, where a dump announces its complete container parts; removed on drop.
struct Announcements(PathBuf);

impl Announcements {
    fn create(dest: &Path) -> anyhow::Result<Announcements> {
        let dir = podsnap_checkpoint::dump::parts_dir(dest);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing a stale {}", dir.display()))
            }
            _ => {}
        }
        podsnap_checkpoint::container::create_private_dir(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Announcements(dir))
    }
}

impl Drop for Announcements {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            log::warn!("removing {}: {e}", self.0.display());
        }
    }
}

/// A push of `dir` to `reference` under the node's `[registry]` rules.
fn push_request(config: &NodeConfig, dir: PathBuf, reference: String, zstd_level: i32) -> oci::PushRequest {
    oci::PushRequest {
        dir,
        reference,
        policy: config.registry.clone(),
        config_name: config.describe(),
        zstd_level,
        just_dumped: false,
        prebuilt: Default::default(),
    }
}

/// `podsnap push DIR REF`.
fn push_checkpoint(
    runtime: &tokio::runtime::Runtime,
    request: &oci::PushRequest,
) -> anyhow::Result<oci::PushOutcome> {
    runtime
        .block_on(oci::push(request))
        .with_context(|| format!("push {} to {}", request.dir.display(), request.reference))
}

/// Log lines (info and up, or `PODSNAP_LOG`'s level) on stderr.
fn init_logging() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.level() <= log::max_level()
        }
        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                eprintln!(
                    "podsnap: {}: {}",
                    record.level().as_str().to_lowercase(),
                    record.args()
                );
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: Stderr = Stderr;
    let level = std::env::var("PODSNAP_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// `podsnap node ...`.
fn run_node(
    runtime: &tokio::runtime::Runtime,
    endpoint: Option<String>,
    command: NodeCommand,
) -> anyhow::Result<()> {
    use podsnap_coordinator::node::{self, report};
    match command {
        NodeCommand::Install(args) => {
            let binaries = match args.binaries {
                Some(dir) => dir,
                None => std::env::current_exe()
                    .context("finding this program's directory")?
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            };
            let request = node::InstallRequest {
                host_root: args.host.host_root,
                containerd_config: args.containerd_config,
                restart_command: args.host.restart_command,
                runtime_endpoint: endpoint,
                binaries,
                bin_dir: args.bin_dir,
                cni_bin_dir: args.cni_bin_dir,
                node_config: args.node_config,
                timeout: std::time::Duration::from_secs(args.host.timeout),
            };
            if args.wait {
                let report = |line: &str| println!("{line}");
                return runtime
                    .block_on(node::daemon::run(&request, args.label_node.as_deref(), report))
                    .context("podsnap node install --wait");
            }
            let done = runtime
                .block_on(node::install(&request))
                .context("podsnap node install")?;
            println!("{}", report::installed(&done));
            Ok(())
        }
        NodeCommand::Uninstall { host, force } => {
            let request = node::UninstallRequest {
                host_root: host.host_root,
                restart_command: host.restart_command,
                runtime_endpoint: endpoint,
                force,
                timeout: std::time::Duration::from_secs(host.timeout),
            };
            let done = runtime
                .block_on(node::uninstall(&request))
                .context("podsnap node uninstall")?;
            println!("{}", report::uninstalled(&done));
            Ok(())
        }
        NodeCommand::Status { host_root } => {
            let status = runtime
                .block_on(node::status(&host_root, endpoint.as_deref()))
                .context("podsnap node status")?;
            println!("{status}");
            Ok(())
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let command = match cli.command {
        Command::Node(command) => return run_node(&runtime, cli.runtime_endpoint, command),
        other => other,
    };
    let runtime_endpoint = cli
        .runtime_endpoint
        .clone()
        .unwrap_or_else(|| "unix:///run/containerd/containerd.sock".to_owned());
    // One file for the shim and the CLI (PODSNAP_CONFIG or /etc/podsnap/config.toml).
    let config = NodeConfig::load()?;
    let checkpoint_root = cli
        .checkpoint_root
        .clone()
        .unwrap_or_else(|| config.checkpoint_root());
    // A dump of this node (`dump` and `migrate`).
    let dump_request =
        |namespace: String, pod_name: String, tcp_established: bool, timeout: Option<u64>| DumpRequest {
            runtime_endpoint: runtime_endpoint.clone(),
            address: cli.address.clone(),
            checkpoint_root: checkpoint_root.clone(),
            namespace,
            pod: pod_name,
            dir: None,
            stop: false,
            tcp_established,
            handler: pod::HANDLER.to_owned(),
            timeout: timeout.map(std::time::Duration::from_secs),
        };
    match command {
        Command::Node(_) => unreachable!("handled above"),
        Command::Dump(args) => {
            let mut request = dump_request(args.namespace, args.pod, args.tcp_established, args.timeout);
            request.dir = args.dir;
            request.stop = args.stop && !args.leave_running;
            let push = args.push.map(|r| (r, args.zstd_level));
            dump_and_push(&runtime, &config, &request, push).map(drop)
        }
        Command::Migrate(args) => {
            let mut request = dump_request(args.namespace, args.pod, args.tcp_established, args.timeout);
            request.stop = true;
            let started = std::time::Instant::now();
            let (dumped, pushed) = dump_and_push(
                &runtime,
                &config,
                &request,
                Some((args.to.clone(), args.zstd_level)),
            )?;
            println!(
                "phases       dump {:.2?} (frozen {:.2?}), push {:.2?}; {:.2?} in all",
                dumped.took,
                dumped.frozen,
                pushed.unwrap_or_default(),
                started.elapsed()
            );
            println!(
                "next         on the target node: podsnap restore --from {}",
                args.to
            );
            Ok(())
        }
        Command::Restore(args) => {
            let mut pulled_name = None;
            let checkpoint_dir = match (args.checkpoint_dir, args.from) {
                (Some(dir), None) => dir,
                (None, Some(reference)) => {
                    let name: String = format!(
                        "pulled-{}-{}",
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0),
                        std::process::id()
                    );
                    let pull = oci::PullRequest {
                        reference,
                        dest: PathBuf::from(&name),
                        checkpoint_root: checkpoint_root.clone(),
                        policy: config.registry.clone(),
                        config_name: config.describe(),
                        restore_check: Some(oci::RestoreCheck {
                            namespace: args.namespace.clone(),
                            policy: config.restore.clone(),
                        }),
                    };
                    let pulled = runtime
                        .block_on(oci::pull(&pull))
                        .with_context(|| format!("pull {}", pull.reference))?;
                    println!("pulled       {} ({})", pull.reference, pulled.digest);
                    pulled_name = Some(name);
                    pulled.dir
                }
                _ => anyhow::bail!("restore takes one of --checkpoint-dir and --from"),
            };
            let request = RestoreRequest {
                runtime_endpoint,
                checkpoint_root,
                checkpoint_dir,
                namespace: args.namespace,
                name: args.name,
                pods_dir: args.pods_dir,
                logs_dir: args.logs_dir,
                handler: pod::HANDLER.to_owned(),
                config,
                keep_ip: args.keep_ip,
                lazy: args.lazy,
            };
            let progress = progress::for_stderr();
            let restored = runtime.block_on(restore(&request, progress.as_ref()));
            progress.finish();
            if let (Err(_), Some(name)) = (&restored, &pulled_name) {
                // A refused or failed restore keeps nothing of what it pulled.
                if let Err(e) = store::remove(&request.checkpoint_root, name, Path::new(LEASE_DIR)) {
                    log::warn!("the pulled checkpoint {name} stays in the root: {e}");
                }
            }
            let pod =
                restored.with_context(|| format!("restore from {}", request.checkpoint_dir.display()))?;
            println!("pod          {}/{} (uid {})", pod.namespace, pod.name, pod.uid);
            println!("id           {}", pod.id);
            println!("ip           {}", if pod.ip.is_empty() { "-" } else { &pod.ip });
            for (name, id) in &pod.containers {
                println!("restored     {name} ({})", short(id));
            }
            for (name, id) in &pod.completed {
                println!("completed    {name} ({}): not run again", short(id));
            }
            for (name, id) in &pod.left_created {
                println!(
                    "created      {name} ({}): never started at the checkpoint, left created",
                    short(id)
                );
            }
            for image in &pod.images_pulled {
                println!("image pulled {image} (it was not on this node)");
            }
            match &pod.imported {
                Some(imported) => println!(
                    "checkpoint   {} (brought in as {}: {} files linked, {} copied; removed after the restore)",
                    request.checkpoint_dir.display(),
                    pod.checkpoint,
                    imported.linked,
                    imported.copied
                ),
                None => println!("checkpoint   {}", pod.checkpoint),
            }
            println!("took         {:.1?}", pod.took);
            Ok(())
        }
        Command::List(args) => {
            let progress = progress::for_stderr();
            let rows = list::list(
                &checkpoint_root,
                Path::new(LEASE_DIR),
                args.verify,
                progress.as_ref(),
            );
            progress.finish();
            let rows = rows.with_context(|| format!("list {}", checkpoint_root.display()))?;
            match args.output {
                Output::Table => println!("{}", list::table(&rows)),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).context("encode the list")?
                ),
            }
            Ok(())
        }
        Command::Rm { names } => {
            let mut refused = 0;
            for name in &names {
                match store::remove(&checkpoint_root, name, Path::new(LEASE_DIR)) {
                    Ok(removed) => println!(
                        "removed      {}{}",
                        removed.name,
                        match (&removed.pod, removed.bytes) {
                            (Some(pod), Some(bytes)) => format!(" (pod {pod}, {})", human_bytes(bytes)),
                            _ => " (broken)".to_owned(),
                        }
                    ),
                    Err(e) => {
                        eprintln!("podsnap: error: {e}");
                        refused += 1;
                    }
                }
            }
            if refused > 0 {
                anyhow::bail!("{refused} of {} checkpoints not removed", names.len());
            }
            Ok(())
        }
        Command::Push {
            dir,
            reference,
            zstd_level,
        } => {
            let pushed = push_checkpoint(&runtime, &push_request(&config, dir, reference, zstd_level))?;
            println!("pushed       {}", pushed.pushed);
            println!(
                "layers       {} ({} uploaded, {}; {} already in the registry)",
                pushed.layers,
                pushed.uploaded,
                human_bytes(pushed.uploaded_bytes),
                pushed.layers - pushed.uploaded
            );
            match &pushed.signed_by {
                Some(key) => println!("signed by    key {key}"),
                None => println!("signed by    nobody (allow_unsigned)"),
            }
            Ok(())
        }
        Command::Pull {
            reference,
            dir,
            for_namespace,
        } => {
            let request = oci::PullRequest {
                reference,
                dest: dir,
                checkpoint_root,
                policy: config.registry.clone(),
                config_name: config.describe(),
                restore_check: for_namespace.map(|namespace| oci::RestoreCheck {
                    namespace: Some(namespace),
                    policy: config.restore.clone(),
                }),
            };
            let pulled = runtime
                .block_on(oci::pull(&request))
                .with_context(|| format!("pull {}", request.reference))?;
            println!("pulled       {} ({})", request.reference, pulled.digest);
            println!("checkpoint   {}", pulled.dir.display());
            println!("layers       {} ({})", pulled.layers, human_bytes(pulled.bytes));
            match &pulled.verified_by {
                Some(key) => println!("verified by  trusted key {key}"),
                None => println!("verified by  nobody (allow_unsigned)"),
            }
            Ok(())
        }
        Command::Inspect { dir } => {
            let summary = inspect::inspect(&dir, &checkpoint_root)
                .with_context(|| format!("inspect {}", dir.display()))?;
            println!("{summary}");
            println!("digests      all {} verified", human_bytes(summary.bytes));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["podsnap", "dump", "--pod", "web", "--stop"]).expect("parses");
        assert!(matches!(cli.command, Command::Dump(DumpArgs { stop: true, .. })));
        assert!(
            Cli::try_parse_from(["podsnap", "dump", "--pod", "web", "--stop", "--leave-running"]).is_err()
        );
        let cli = Cli::try_parse_from(["podsnap", "list", "--verify", "-o", "json"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::List(ListArgs {
                verify: true,
                output: Output::Json
            })
        ));
        assert!(Cli::try_parse_from(["podsnap", "list", "-o", "yaml"]).is_err());
        assert!(Cli::try_parse_from(["podsnap", "rm"]).is_err(), "rm takes names");
        let cli = Cli::try_parse_from(["podsnap", "push", "/x", "reg/ckpt:1", "--zstd-level", "9"])
            .expect("parses");
        assert!(matches!(cli.command, Command::Push { zstd_level: 9, .. }));
        assert!(Cli::try_parse_from(["podsnap", "push", "/x", "reg/ckpt:1", "--zstd-level", "30"]).is_err());
        // The same levels, and the same default, for every command that pushes.
        let cli =
            Cli::try_parse_from(["podsnap", "migrate", "--pod", "p", "--to", "reg/ckpt:1"]).expect("parses");
        assert!(matches!(cli.command, Command::Migrate(a) if a.zstd_level == oci::DEFAULT_ZSTD_LEVEL));
        let migrate_30 = [
            "podsnap",
            "migrate",
            "--pod",
            "p",
            "--to",
            "r/c:1",
            "--zstd-level",
            "30",
        ];
        assert!(Cli::try_parse_from(migrate_30).is_err());
        let dump_0 = [
            "podsnap",
            "dump",
            "--pod",
            "p",
            "--push",
            "r/c:1",
            "--zstd-level",
            "0",
        ];
        assert!(Cli::try_parse_from(dump_0).is_err());
        assert!(
            Cli::try_parse_from(["podsnap", "pull", "reg/ckpt:1"]).is_err(),
            "pull takes a destination"
        );
        let cli = Cli::try_parse_from([
            "podsnap",
            "node",
            "install",
            "--host-root",
            "/host",
            "--restart-command",
            "x",
            "--wait",
            "--label-node",
            "n1",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Node(NodeCommand::Install(NodeInstallArgs { wait: true, ref label_node, .. }))
                if label_node.as_deref() == Some("n1")
        ));
        assert!(
            Cli::try_parse_from(["podsnap", "node", "install", "--label-node", "n1"]).is_err(),
            "labelling is for the DaemonSet's --wait"
        );
        let cli = Cli::try_parse_from(["podsnap", "node", "uninstall", "--force"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Node(NodeCommand::Uninstall { force: true, .. })
        ));
        let cli = Cli::try_parse_from(["podsnap", "rm", "a", "b/c"]).expect("parses");
        assert!(matches!(cli.command, Command::Rm { names } if names == ["a", "b/c"]));
    }
}
