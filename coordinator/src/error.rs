//! The coordinator's errors: one enum for pod lookup, dump, restore and inspect, so the binary
//! prints one clear message whatever failed.

use std::path::PathBuf;

use crate::containerd;
use crate::cri::CriConnectError;

/// What a coordinator operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CRI endpoint could not be reached.
    #[error(transparent)]
    CriConnect(#[from] CriConnectError),
    /// A CRI call failed.
    #[error("CRI {call} failed: {message} ({code:?})")]
    Cri {
        /// The call and what it was about, e.g. "RunPodSandbox webapp".
        call: String,
        code: tonic::Code,
        message: String,
    },
    /// containerd refused or failed a call (a failed pod dump lands here, with CRIU's log).
    #[error(transparent)]
    Containerd(#[from] containerd::Error),
    /// A checkpoint that is damaged, incomplete or not one of ours.
    #[error(transparent)]
    Checkpoint(#[from] Box<podsnap_checkpoint::Error>),
    /// The pod's shim (through containerd) refused or failed the dump: a busy pod, or a
    /// container CRIU could not dump (the message names it and quotes CRIU's log).
    #[error("dump of pod {pod} (sandbox {sandbox}) failed: {message}")]
    Dump {
        pod: String,
        sandbox: String,
        code: tonic::Code,
        message: String,
    },
    /// No ready sandbox with that name in that namespace.
    #[error("pod {namespace}/{name} not found: {detail}")]
    PodNotFound {
        namespace: String,
        name: String,
        detail: String,
    },
    /// Several ready sandboxes answer to one name.
    #[error("pod {namespace}/{name} is ambiguous: {count} ready sandboxes ({ids}); remove the stale ones")]
    PodAmbiguous {
        namespace: String,
        name: String,
        count: usize,
        ids: String,
    },
    /// The pod runs on another runtime handler: only podsnap's shim can checkpoint a pod.
    #[error(
        "pod {namespace}/{name} runs on runtime handler {handler:?}, not {wanted:?}: only pods with \
         runtimeClassName {wanted} can be dumped"
    )]
    WrongHandler {
        namespace: String,
        name: String,
        handler: String,
        wanted: String,
    },
    /// The request itself cannot be carried out (a non-empty destination, a missing image...).
    #[error("{0}")]
    Refused(String),
    /// Pushing a checkpoint to a registry or pulling one failed or was refused (the message names
    /// the reference and what to do).
    #[error("{0}")]
    Registry(String),
    /// A file operation failed.
    #[error("{context} {}: {source}", .path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Installing on or uninstalling from a node failed (`podsnap node`).
    #[error(transparent)]
    Node(#[from] crate::node::Error),
    /// A migration between nodes failed (the channel, the peer, or what it said).
    #[error(transparent)]
    Migration(#[from] crate::migrate::Error),
    /// A restore failed after it had created something; says what was removed and what not.
    #[error("{source}\n{cleanup}")]
    RolledBack {
        #[source]
        source: Box<Error>,
        /// What the rollback did, for the operator.
        cleanup: String,
    },
}

/// Result of the coordinator.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps a failed CRI call.
    pub fn cri(call: impl Into<String>) -> impl FnOnce(tonic::Status) -> Error {
        let call = call.into();
        move |status| Error::Cri {
            call,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

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

impl From<podsnap_checkpoint::Error> for Error {
    fn from(e: podsnap_checkpoint::Error) -> Self {
        Error::Checkpoint(Box::new(e))
    }
}
