//! `podsnap node install | uninstall | status`: podsnap put on a node, and taken off it, without
//! ever leaving containerd with a broken configuration or a shim binary replaced under a running
//! pod.
//!
//! Every file operation is confined to the host root (`--host-root`: `/` on the node, `/host` in
//! the DaemonSet; [`host_root`]). The pieces, in the order an install uses them:
//! - [`discover`]: containerd's configuration (standard, k3s, RKE2), its version, imports, the
//!   runc runtime's cgroup driver, the CRI socket;
//! - [`dropin`]: the runtime's drop-in and the `imports` entry, edited with `toml_edit`, checked
//!   before they are written;
//! - [`transaction`]: every write atomic (new file, then rename), the old bytes kept for the
//!   rollback, copies of replaced files kept for the uninstall;
//! - [`restart`]: containerd restarted only if a file it reads changed (systemd over D-Bus,
//!   `systemctl` in the host's namespaces, or `--restart-command`);
//! - [`cri_state`]: the wait until CRI `Status` reports the `podsnap` handler (as `crictl info`
//!   shows it), and the running pods of that handler;
//! - [`record`]: `/etc/podsnap/installed.json`, what uninstall undoes ([`uninstall`]);
//! - [`status`]; [`kube`] and [`daemon`]: the DaemonSet's label on its node, and its wait for
//!   SIGTERM.

pub mod cri_state;
pub mod daemon;
pub mod discover;
pub mod dropin;
pub mod host_root;
pub mod install;
pub mod kube;
pub mod record;
pub mod report;
pub mod restart;
pub mod status;
pub mod transaction;
pub mod uninstall;

use std::path::PathBuf;

pub use install::{install, InstallRequest, Installed};
pub use status::{status, Status};
pub use uninstall::{uninstall, UninstallRequest, Uninstalled};

/// What installing or uninstalling can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// containerd's configuration (or the record) cannot be used as it is.
    #[error("{}: {reason}", .path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A file operation failed.
    #[error("{context} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The path as the installer sees it.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// containerd could not be restarted.
    #[error("restarting containerd: {0}")]
    Restart(String),
    /// containerd did not come back as wanted, or CRI does not answer.
    #[error("{0}")]
    NotReady(String),
    /// The request cannot be carried out as it is (running pods, missing binaries).
    #[error("{0}")]
    Refused(String),
    /// The Kubernetes API refused or failed a call.
    #[error("Kubernetes API: {0}")]
    Api(String),
    /// An install failed and was undone.
    #[error("{source}\nnothing of the install is left: {what}")]
    RolledBack {
        /// Why it failed.
        #[source]
        source: Box<Error>,
        /// What the rollback did.
        what: String,
    },
}

impl Error {
    /// Wraps a failed file operation.
    pub fn io(context: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            context,
            path,
            source,
        }
    }
}
