//! The checkpoint layer's errors.

use std::path::PathBuf;

/// What can go wrong dumping or restoring.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// runc/CRIU failed to dump a container; the container was left as it was.
    #[error("checkpoint of container {id} failed: {source}{}", log_tail_text(.log_tail))]
    Dump {
        id: String,
        #[source]
        source: Box<podsnap_runtime::Error>,
        /// The last lines of CRIU's dump log.
        log_tail: Option<String>,
    },
    /// runc/CRIU failed to restore a container; nothing of it is left running.
    #[error("restore of container {id} failed: {source}{}", log_tail_text(.log_tail))]
    Restore {
        id: String,
        #[source]
        source: Box<podsnap_runtime::Error>,
        log_tail: Option<String>,
    },
    /// A checkpoint directory that is missing, incomplete, or not one of ours.
    #[error("invalid checkpoint at {path}: {reason}")]
    InvalidCheckpoint { path: PathBuf, reason: String },
    /// The node configuration file is missing (when named), unreadable or wrong.
    #[error("node configuration {path}: {reason}")]
    Config {
        path: PathBuf,
        reason: String,
        /// The file does not exist.
        missing: bool,
    },
    /// A restore that a rule of the restore policy forbids; nothing of it was created.
    #[error("restore from checkpoint {checkpoint:?} refused (rule: {rule}): {reason}")]
    Refused {
        checkpoint: String,
        rule: &'static str,
        reason: String,
    },
    /// A container whose file changes the dump cannot find (its rootfs is not an overlay with
    /// an upper directory podsnap can read): the dump is refused rather than lose them, and
    /// the pod left running.
    #[error("checkpoint of container {container} refused: its file changes cannot be captured: {reason}")]
    RootfsChanges { container: String, reason: String },
    /// A dump stopped by its deadline or by its caller giving up; the pod was left running as
    /// it was and no output remains.
    #[error("pod dump stopped: {reason}; every container was thawed and the partial output removed")]
    Stopped { reason: String },
    /// A dump asked for what the pod or the node does not allow (volumes to carry that are
    /// not there or too large): refused before anything was frozen.
    #[error("pod dump into {path} refused before anything was frozen: {reason}")]
    DumpRefused { path: PathBuf, reason: String },
    /// Not enough room for a dump: refused before anything was frozen.
    #[error("not enough space for the dump in {path}: {reason}")]
    NoSpace { path: PathBuf, reason: String },
    /// A checkpoint that pods restored from still need: it is not removed.
    #[error("checkpoint {name:?} is in use by {holders}: remove those pods first")]
    InUse {
        name: String,
        /// The pods holding it, e.g. `pod default/web (sandbox 0123456789abc)`.
        holders: String,
    },
    /// A name in the checkpoint root that is not a checkpoint (a folder of checkpoints, a
    /// symlink, a path leading out of the root, nothing at all).
    #[error("{name:?} is not a checkpoint in {}: {reason}", .root.display())]
    NotACheckpoint {
        name: String,
        root: PathBuf,
        reason: String,
    },
    /// A file operation failed.
    #[error("{context} ({path}): {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn log_tail_text(tail: &Option<String>) -> String {
    match tail {
        Some(t) if !t.is_empty() => format!("\n--- CRIU log (last lines) ---\n{t}"),
        _ => String::new(),
    }
}

/// Result of the checkpoint layer.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }
}

impl Error {
    /// The refusal of a restore from `checkpoint` for breaking `violation`.
    pub fn refused(checkpoint: impl Into<String>, violation: Violation) -> Self {
        Error::Refused {
            checkpoint: checkpoint.into(),
            rule: violation.rule,
            reason: violation.reason,
        }
    }
}

/// A rule a restore broke, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: &'static str,
    pub reason: String,
}

impl Violation {
    pub(crate) fn new(rule: &'static str, reason: impl Into<String>) -> Self {
        Self {
            rule,
            reason: reason.into(),
        }
    }
}
