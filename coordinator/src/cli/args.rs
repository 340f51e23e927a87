//! The command line: clap's structs for every command and its options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use podsnap_coordinator::containerd::DEFAULT_ADDRESS;
use podsnap_coordinator::oci;
use podsnap_coordinator::restore::{DEFAULT_LOGS_DIR, DEFAULT_PODS_DIR};

#[derive(Debug, Parser)]
#[command(
    name = "podsnap",
    version,
    about = "Checkpoint and restore whole Kubernetes pods run by the podsnap runtime"
)]
pub(crate) struct Cli {
    /// CRI endpoint of the node's container runtime [default:
    /// unix:///run/containerd/containerd.sock; for `podsnap node`, the socket containerd's
    /// configuration names, under the host root].
    #[arg(long, global = true, env = "CONTAINER_RUNTIME_ENDPOINT")]
    pub(crate) runtime_endpoint: Option<String>,
    /// containerd's socket.
    #[arg(long, global = true, env = "CONTAINERD_ADDRESS", default_value = DEFAULT_ADDRESS)]
    pub(crate) address: PathBuf,
    /// The node's checkpoint root (where the shim looks for `podsnap.io/restore-from` names);
    /// else `checkpoint_root` of the node configuration, else /var/lib/podsnap/checkpoints.
    #[arg(long, global = true, env = "PODSNAP_CHECKPOINT_ROOT")]
    pub(crate) checkpoint_root: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Checkpoint every container of a pod at one instant.
    Dump(DumpArgs),
    /// Recreate a checkpointed pod (new sandbox, new IP), its containers restored in order.
    Restore(RestoreArgs),
    /// Move a pod off this node. `--to REF`: dump it stopped at the snapshot, push the
    /// checkpoint to an OCI registry, and print the time each phase took (then `podsnap restore
    /// --from REF` on the target node). `--to-node HOST:PORT`: live, straight to another node
    /// running `podsnap receive` (mutual TLS with the keys of `[migration]`): the pod is frozen
    /// and dumped without its memory, restored on the target at once, and its memory follows
    /// from this node's CRIU while it runs there; resumed here if anything fails before the
    /// target runs it. `--copy`: its memory goes before the switch instead.
    Migrate(MigrateArgs),
    /// Receive pods that other nodes move here with `podsnap migrate --to-node` (or `drain`),
    /// several at once: each checkpoint is verified into the checkpoint root and restored
    /// through CRI as `podsnap restore` does. Only nodes whose keys are in `[migration] peers`
    /// are answered.
    Receive(ReceiveArgs),
    /// Move every pod of the `podsnap` runtime handler off this node to another node running
    /// `podsnap receive`, as `migrate --to-node` moves one, N at a time: a line per pod as it
    /// moves or fails, then a table (pod, downtime, bytes, result). A pod that cannot move is
    /// resumed and left running here; the exit status then says so.
    Drain(DrainArgs),
    /// Verify a checkpoint's digests and show what it holds.
    Inspect {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Output format (`json`: the verified manifest and whether the checkpoint is sealed).
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
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
pub(crate) enum NodeCommand {
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
pub(crate) struct NodeHostArgs {
    /// The host's root directory: every file is read and written under it (`/host` in the
    /// DaemonSet).
    #[arg(long, default_value = "/")]
    pub(crate) host_root: PathBuf,
    /// Shell command that restarts containerd, run in the host's namespaces (default: systemd's
    /// unit, over D-Bus or with systemctl).
    #[arg(long, value_name = "CMD")]
    pub(crate) restart_command: Option<String>,
    /// How long containerd may take to come back after a restart.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub(crate) timeout: u64,
}

#[derive(Debug, Args)]
pub(crate) struct NodeInstallArgs {
    #[command(flatten)]
    pub(crate) host: NodeHostArgs,
    /// containerd's configuration, as a host path (default: /etc/containerd/config.toml, or
    /// k3s's and RKE2's templates where they run).
    #[arg(long, value_name = "PATH")]
    pub(crate) containerd_config: Option<PathBuf>,
    /// Where the binaries to install are (default: this program's directory).
    #[arg(long, value_name = "DIR")]
    pub(crate) binaries: Option<PathBuf>,
    /// Where the shim and the CLI go on the host (on containerd's PATH).
    #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
    pub(crate) bin_dir: PathBuf,
    /// Also install podsnap-cni-ipam into this CNI plugin directory of the host.
    #[arg(long, value_name = "DIR")]
    pub(crate) cni_bin_dir: Option<PathBuf>,
    /// Write this node configuration to /etc/podsnap/config.toml unless one is there.
    #[arg(long, value_name = "FILE")]
    pub(crate) node_config: Option<PathBuf>,
    /// Stay after the install; on SIGTERM (or SIGINT), uninstall (the DaemonSet's way).
    #[arg(long)]
    pub(crate) wait: bool,
    /// Label this Kubernetes node podsnap.io/runtime=ready once the handler is served (removed
    /// before the uninstall), with the pod's service account.
    #[arg(long, value_name = "NODE", requires = "wait", env = "PODSNAP_LABEL_NODE")]
    pub(crate) label_node: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Read every file of every checkpoint and check its digest.
    #[arg(long)]
    pub(crate) verify: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub(crate) output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    /// A table that fits a terminal.
    Table,
    /// A JSON array, for scripts.
    Json,
}

#[derive(Debug, Args)]
pub(crate) struct DumpArgs {
    /// The pod's Kubernetes namespace.
    #[arg(long, short = 'n', default_value = "default")]
    pub(crate) namespace: String,
    /// The pod's name; given more than once, the pods are dumped at one instant into one group
    /// checkpoint (one directory per pod, `group.json` listing them).
    #[arg(long, required_unless_present = "selector")]
    pub(crate) pod: Vec<String>,
    /// Every ready pod of the namespace with this label (`KEY=VALUE`), dumped at one instant
    /// into one group checkpoint.
    #[arg(long, value_name = "KEY=VALUE", conflicts_with = "pod")]
    pub(crate) selector: Option<String>,
    /// Where to write the checkpoint (must not exist, or be empty); default
    /// `<checkpoint root>/<namespace>-<pod>-<UTC time>`.
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Leave the pod running after the dump (the default).
    #[arg(long, conflicts_with = "stop")]
    pub(crate) leave_running: bool,
    /// Stop the pod at the snapshot: its containers are killed while still frozen, so nothing
    /// runs after the checkpoint (for a move to another node).
    #[arg(long)]
    pub(crate) stop: bool,
    /// Restore established TCP connections too (they are closed on restore otherwise).
    #[arg(long)]
    pub(crate) tcp_established: bool,
    /// Carry persistent volumes in the checkpoint, their content captured at the dump instant
    /// and put back before the restore: `local` (every node-local volume: local PVs, host
    /// paths), or volume names separated by commas (a PV's name, `plugin/name`, a host path).
    /// Bounded by the node's `[dump] carry_volumes_max_bytes` (1 GiB by default).
    #[arg(long, value_name = "local|NAME,...")]
    pub(crate) volumes: Option<String>,
    /// Give up after this many seconds: the pod is thawed and the output removed (the node's
    /// dump deadline, 120 s unless configured, applies either way).
    #[arg(long, value_name = "SECONDS")]
    pub(crate) timeout: Option<u64>,
    /// Then push the checkpoint to this OCI reference (as `podsnap push`).
    #[arg(long, value_name = "REF")]
    pub(crate) push: Option<String>,
    /// zstd level of the pushed layers (1-19).
    #[arg(long, default_value_t = oci::DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19), requires = "push")]
    pub(crate) zstd_level: i32,
}

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// The pod's Kubernetes namespace.
    #[arg(long, short = 'n', default_value = "default")]
    pub(crate) namespace: String,
    /// The pod's name.
    #[arg(long)]
    pub(crate) pod: String,
    /// Where to push the checkpoint (an image reference).
    #[arg(
        long,
        value_name = "REF",
        required_unless_present_any = ["to_node", "listen"],
        conflicts_with_all = ["to_node", "listen"]
    )]
    pub(crate) to: Option<String>,
    /// Move the pod straight to the node listening there (`podsnap receive --listen`), live.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "listen")]
    pub(crate) to_node: Option<String>,
    /// Kubelet's path: listen here, print the pod's `podsnap://HOST:PORT/TICKET` and wait for
    /// the node where a pod annotated `podsnap.io/restore-from` with it is created; then move
    /// the pod there live.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) listen: Option<String>,
    /// With `--listen`: the HOST:PORT the printed reference names (the address the target
    /// reaches this node at), when it is not the address listened on.
    #[arg(long, value_name = "HOST:PORT", requires = "listen")]
    pub(crate) advertise: Option<String>,
    /// With `--listen`: how long to wait for the target to claim the pod (the pod runs on
    /// untouched meanwhile).
    #[arg(long, value_name = "SECONDS", requires = "listen")]
    pub(crate) wait: Option<u64>,
    /// With `--to-node`: not live. The pod is paused, dumped with its memory, sent and
    /// restored before the target runs it (its downtime grows with its memory); for nodes
    /// without userfaultfd.
    #[arg(long, requires = "to_node")]
    pub(crate) copy: bool,
    /// Keep established TCP connections (they go on if the target gives the pod its address).
    #[arg(long)]
    pub(crate) tcp_established: bool,
    /// Carry persistent volumes in the checkpoint (as `podsnap dump --volumes`).
    #[arg(long, value_name = "local|NAME,...")]
    pub(crate) volumes: Option<String>,
    /// Give up on the dump after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub(crate) timeout: Option<u64>,
    /// zstd level of the pushed layers (1-19).
    #[arg(long, default_value_t = oci::DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub(crate) zstd_level: i32,
}

#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    /// The node to move the pods to (`podsnap receive --listen` there).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) to_node: String,
    /// How many pods move at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) parallel: u16,
    /// Keep established TCP connections (they go on if the target gives a pod its address).
    #[arg(long)]
    pub(crate) tcp_established: bool,
    /// Give up on each pod's dump after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub(crate) timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub(crate) struct ReceiveArgs {
    /// The address to listen on (`HOST:PORT`, e.g. `0.0.0.0:7443`).
    #[arg(
        long,
        value_name = "HOST:PORT",
        required_unless_present = "from",
        conflicts_with = "from"
    )]
    pub(crate) listen: Option<String>,
    /// Exit after the first migration (its result is the exit status).
    #[arg(long, conflicts_with = "from")]
    pub(crate) once: bool,
    /// Kubelet's path (the shim runs it for a pod annotated `podsnap.io/restore-from:
    /// podsnap://...`): claim the pod from its source with this reference, put its checkpoint
    /// in the root as `--into`, print `received NAME` once it is there, then carry its memory
    /// until the source let go.
    #[arg(long, value_name = "podsnap://HOST:PORT/TICKET", requires_all = ["into", "sandbox", "for_namespace"])]
    pub(crate) from: Option<String>,
    /// With `--from`: the checkpoint's name in the root.
    #[arg(long, value_name = "NAME", requires = "from")]
    pub(crate) into: Option<String>,
    /// With `--from`: the sandbox id of the pod the memory goes to.
    #[arg(long, value_name = "ID", requires = "from")]
    pub(crate) sandbox: Option<String>,
    /// With `--from`: the pod's namespace (the restore policy is checked for it).
    #[arg(long, value_name = "NAMESPACE", requires = "from")]
    pub(crate) for_namespace: Option<String>,
    /// kubelet's pod directories (emptyDir volumes are made under them).
    #[arg(long, default_value = DEFAULT_PODS_DIR)]
    pub(crate) pods_dir: PathBuf,
    /// kubelet's pod log directories.
    #[arg(long, default_value = DEFAULT_LOGS_DIR)]
    pub(crate) logs_dir: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// The checkpoint to restore; one outside the checkpoint root is brought into it for the
    /// restore (hard links, a copy only from another filesystem) and removed afterwards.
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    pub(crate) checkpoint_dir: Option<PathBuf>,
    /// Pull the checkpoint from this OCI reference into the checkpoint root first (as
    /// `podsnap pull`: allowed registries and signatures checked), then restore it.
    #[arg(long, value_name = "REF")]
    pub(crate) from: Option<String>,
    /// Namespace of the new pod (default: the checkpointed pod's).
    #[arg(long, short = 'n')]
    pub(crate) namespace: Option<String>,
    /// Name of the new pod (default: the checkpointed pod's).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// kubelet's pod directories (emptyDir volumes are made under them).
    #[arg(long, default_value = DEFAULT_PODS_DIR)]
    pub(crate) pods_dir: PathBuf,
    /// kubelet's pod log directories.
    #[arg(long, default_value = DEFAULT_LOGS_DIR)]
    pub(crate) logs_dir: PathBuf,
    /// On the node where the checkpoint was taken, give the pod its address at the checkpoint
    /// (needs `podsnap-cni-ipam` in the node's CNI configuration; fails if it is taken), so
    /// connections kept with `--tcp-established` at the dump go on.
    #[arg(long)]
    pub(crate) keep_ip: bool,
    /// Restore lazily: each container runs as soon as its processes are back, and its memory
    /// follows from the checkpoint on demand and in the background (CRIU lazy pages,
    /// userfaultfd). The checkpoint stays in use until every page is back.
    #[arg(long)]
    pub(crate) lazy: bool,
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
        let cli = Cli::try_parse_from(["podsnap", "inspect", "-o", "json", "/x"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Inspect {
                output: Output::Json,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["podsnap", "push", "/x", "reg/ckpt:1", "--zstd-level", "9"])
            .expect("parses");
        assert!(matches!(cli.command, Command::Push { zstd_level: 9, .. }));
        assert!(Cli::try_parse_from(["podsnap", "push", "/x", "reg/ckpt:1", "--zstd-level", "30"]).is_err());
        // The same levels, and the same default, for every command that pushes.
        let cli =
            Cli::try_parse_from(["podsnap", "migrate", "--pod", "p", "--to-node", "b:7443"]).expect("parses");
        assert!(matches!(cli.command, Command::Migrate(a) if a.to_node.as_deref() == Some("b:7443")));
        assert!(
            Cli::try_parse_from(["podsnap", "migrate", "--pod", "p"]).is_err(),
            "--to or --to-node"
        );
        let cli = Cli::try_parse_from(["podsnap", "drain", "--to-node", "b:7443", "--parallel", "3"])
            .expect("parses");
        assert!(matches!(cli.command, Command::Drain(a) if a.to_node == "b:7443" && a.parallel == 3));
        let cli = Cli::try_parse_from(["podsnap", "drain", "--to-node", "b:7443"]).expect("parses");
        assert!(
            matches!(cli.command, Command::Drain(a) if a.parallel == 1),
            "one at a time by default"
        );
        assert!(Cli::try_parse_from(["podsnap", "drain", "--to-node", "b:7443", "--parallel", "0"]).is_err());
        assert!(
            Cli::try_parse_from(["podsnap", "drain"]).is_err(),
            "--to-node is required"
        );
        assert!(
            Cli::try_parse_from([
                "podsnap",
                "migrate",
                "--pod",
                "p",
                "--to",
                "r/c:1",
                "--to-node",
                "b:1"
            ])
            .is_err(),
            "not both"
        );
        let cli = Cli::try_parse_from(["podsnap", "receive", "--listen", "0.0.0.0:7443", "--once"])
            .expect("parses");
        assert!(
            matches!(cli.command, Command::Receive(a) if a.once && a.listen.as_deref() == Some("0.0.0.0:7443"))
        );
        assert!(
            Cli::try_parse_from(["podsnap", "receive"]).is_err(),
            "--listen or --from is required"
        );
        // Kubelet's path: the shim's `receive --from` takes its pod's name, sandbox and
        // namespace, and not --listen; `migrate --listen` takes no other target.
        let from = [
            "podsnap",
            "receive",
            "--from",
            "podsnap://a:1/0123456789abcdef0123456789abcdef",
            "--into",
            "live-x",
            "--sandbox",
            "x",
            "--for-namespace",
            "default",
        ];
        let cli = Cli::try_parse_from(from).expect("parses");
        assert!(
            matches!(cli.command, Command::Receive(a) if a.listen.is_none() && a.into.as_deref() == Some("live-x"))
        );
        assert!(
            Cli::try_parse_from(&from[..4]).is_err(),
            "--into, --sandbox, --for-namespace"
        );
        let mut both = from.to_vec();
        both.extend(["--listen", "0.0.0.0:1"]);
        assert!(Cli::try_parse_from(both).is_err(), "not --from and --listen");
        let cli = Cli::try_parse_from([
            "podsnap",
            "migrate",
            "--pod",
            "p",
            "--listen",
            "0.0.0.0:7443",
            "--wait",
            "5",
        ])
        .expect("parses");
        assert!(matches!(cli.command, Command::Migrate(a) if a.wait == Some(5) && a.to.is_none()));
        for other in [["--to-node", "b:1"], ["--to", "r/c:1"]] {
            let mut args = vec!["podsnap", "migrate", "--pod", "p", "--listen", "0.0.0.0:7443"];
            args.extend(other);
            assert!(Cli::try_parse_from(args).is_err(), "--listen and {other:?}");
        }
        // (`--wait` without `--listen` is refused by `migrate` itself: clap does not check
        // `requires` against an argument that conflicts with one given.)
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
