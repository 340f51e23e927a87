//! Work of the dump running beside the freeze and the dumps: `criu cpuinfo dump`, what the
//! manifest records of the node, and the pod's addresses. Only the digests and the manifest
//! need them.

use std::path::PathBuf;
use std::sync::Arc;

use podsnap_runtime::launcher::Launcher;

use crate::error::{Error, Result};
use crate::format::manifest::HostInfo;

/// What the checkpoint records of the node and of the pod's network, read beside the dump.
pub(super) struct Recorded {
    pub(super) host: HostInfo,
    pub(super) ips: Vec<std::net::IpAddr>,
}

/// Work of the dump running beside it (`criu cpuinfo dump`, what the manifest records of the
/// node and the pod's addresses): awaited before the digests, aborted if the dump stops first.
pub(super) struct Beside(Option<tokio::task::JoinHandle<Result<Recorded>>>);

impl Beside {
    /// Nothing beside (unit tests of the phases before the finish).
    #[cfg(test)]
    pub(super) fn idle() -> Self {
        Beside(None)
    }

    /// Starts `criu cpuinfo dump` into `host_dir`, and reads what the checkpoint records of
    /// the node (runc and CRIU versions, with the `runc` binary) and of the pod's addresses
    /// (in `netns`).
    pub(super) fn start(
        launcher: Arc<dyn Launcher>,
        runc: PathBuf,
        netns: Option<PathBuf>,
        sandbox: String,
        host_dir: PathBuf,
    ) -> Self {
        Beside(Some(tokio::spawn(async move {
            let ips = async {
                match &netns {
                    Some(ns) => crate::pod::shared::netlock::addresses(launcher.as_ref(), ns)
                        .await
                        .unwrap_or_else(|e| {
                            log::warn!("pod {sandbox}: its addresses are not recorded: {e}");
                            Vec::new()
                        }),
                    None => Vec::new(),
                }
            };
            let (cpu, host, ips) = tokio::join!(
                crate::trust::identity::dump_cpuinfo(launcher.as_ref(), &host_dir),
                crate::trust::identity::this_node(launcher.as_ref(), &runc),
                ips
            );
            cpu.map(|()| Recorded { host, ips })
        })))
    }

    pub(super) async fn done(&mut self) -> Result<Recorded> {
        match self.0.take() {
            Some(task) => task
                .await
                .map_err(|e| Error::io("record the CPU features", "criu", std::io::Error::other(e)))?,
            None => Err(Error::io(
                "record the CPU features",
                "criu",
                std::io::Error::other("awaited twice"),
            )),
        }
    }
}

impl Drop for Beside {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}
