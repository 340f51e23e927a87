//! The runtime layer's errors.

use std::path::PathBuf;

/// What went wrong below the shim: a runc invocation, a file, a kernel interface.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// runc ran and failed; `message` is what it reported (its log or stderr).
    #[error("runc {command} failed for {id}: {message}")]
    Runc {
        command: String,
        id: String,
        message: String,
    },
    /// runc could not be started at all.
    #[error("cannot run {binary}: {source}")]
    Launch {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    /// A file or directory operation failed.
    #[error("{context} ({path}): {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Sys {
        context: &'static str,
        #[source]
        source: nix::Error,
    },
    /// The bundle's config.json or another input is not what it must be.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// The container or process does not exist (any more).
    #[error("{0} not found")]
    NotFound(String),
}

/// Result of the runtime layer.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error with the path it concerns.
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }

    /// A system-call error.
    pub fn sys(context: &'static str, source: nix::Error) -> Self {
        Error::Sys { context, source }
    }
}
