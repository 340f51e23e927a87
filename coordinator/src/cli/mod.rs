//! The `podsnap` commands, one file per group: `dump.rs` (dump, migrate), `restore.rs`,
//! `store.rs` (list, rm, inspect), `registry.rs` (push, pull), `receive.rs` (receive, and
//! migrate --to-node), `node.rs` (node install,
//! uninstall, status). `args.rs` holds the command line; `run` builds what every command
//! shares ([`Context`]) and dispatches.

pub(crate) mod args;
mod dump;
pub(crate) mod logging;
mod node;
mod receive;
mod registry;
mod restore;
mod store;

use std::path::PathBuf;

use anyhow::Context as _;
use podsnap_checkpoint::config::NodeConfig;
use podsnap_coordinator::dump::DumpRequest;
use podsnap_coordinator::pod;

use args::{Cli, Command};

/// What every command but `node` works with.
pub(crate) struct Context {
    pub(crate) runtime: tokio::runtime::Runtime,
    /// One file for the shim and the CLI (PODSNAP_CONFIG or /etc/podsnap/config.toml).
    pub(crate) config: NodeConfig,
    pub(crate) checkpoint_root: PathBuf,
    pub(crate) runtime_endpoint: String,
    /// containerd's socket.
    pub(crate) address: PathBuf,
}

impl Context {
    /// A dump of this node (`dump` and `migrate`).
    pub(crate) fn dump_request(
        &self,
        namespace: String,
        pod_name: String,
        tcp_established: bool,
        timeout: Option<u64>,
    ) -> DumpRequest {
        DumpRequest {
            runtime_endpoint: self.runtime_endpoint.clone(),
            address: self.address.clone(),
            checkpoint_root: self.checkpoint_root.clone(),
            namespace,
            pod: pod_name,
            dir: None,
            stop: false,
            tcp_established,
            handler: pod::HANDLER.to_owned(),
            timeout: timeout.map(std::time::Duration::from_secs),
            carry_volumes: None,
            hold_network: false,
            serve_dir: None,
        }
    }
}

pub(crate) fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let command = match cli.command {
        Command::Node(command) => return node::run(&runtime, cli.runtime_endpoint, command),
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
    let ctx = Context {
        runtime,
        config,
        checkpoint_root,
        runtime_endpoint,
        address: cli.address.clone(),
    };
    match command {
        Command::Node(_) => unreachable!("handled above"),
        Command::Dump(args) => dump::dump(&ctx, args),
        Command::Migrate(args) => dump::migrate(&ctx, args),
        Command::Receive(args) => receive::run(&ctx, args),
        Command::Drain(args) => receive::drain(&ctx, args),
        Command::Restore(args) => restore::run(ctx, args),
        Command::List(args) => store::list(&ctx, args),
        Command::Rm { names } => store::rm(&ctx, names),
        Command::Inspect { dir, output } => store::inspect(&ctx, dir, output),
        Command::Push {
            dir,
            reference,
            zstd_level,
        } => registry::push(&ctx, dir, reference, zstd_level),
        Command::Pull {
            reference,
            dir,
            for_namespace,
        } => registry::pull(&ctx, reference, dir, for_namespace),
    }
}
