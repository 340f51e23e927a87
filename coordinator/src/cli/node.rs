//! `podsnap node install|uninstall|status`: podsnap's runtime on this node.

use std::path::Path;

use anyhow::Context;

use super::args::NodeCommand;

/// `podsnap node ...`.
pub(crate) fn run(
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
