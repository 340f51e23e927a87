//! The shim's errors, mapped once to ttrpc status codes.

use containerd_shim::protos::ttrpc;

/// What a task API call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0} is not implemented by the podsnap shim")]
    Unimplemented(&'static str),
    #[error("{context}: {source}")]
    Runtime {
        context: String,
        #[source]
        source: podsnap_runtime::Error,
    },
    #[error(transparent)]
    Checkpoint(Box<podsnap_checkpoint::Error>),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps a runtime error with what the shim was doing, e.g. "create container abc".
    pub fn runtime(context: impl Into<String>) -> impl FnOnce(podsnap_runtime::Error) -> Error {
        let context = context.into();
        move |source| match source {
            podsnap_runtime::Error::NotFound(what) => Error::NotFound(what),
            source => Error::Runtime { context, source },
        }
    }

    fn code(&self) -> ttrpc::Code {
        match self {
            Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            Error::Checkpoint(e) => match **e {
                podsnap_checkpoint::Error::InvalidCheckpoint { .. } => ttrpc::Code::INVALID_ARGUMENT,
                podsnap_checkpoint::Error::Refused { .. } => ttrpc::Code::PERMISSION_DENIED,
                podsnap_checkpoint::Error::Config { .. }
                | podsnap_checkpoint::Error::RootfsChanges { .. }
                | podsnap_checkpoint::Error::DumpRefused { .. } => ttrpc::Code::FAILED_PRECONDITION,
                _ => ttrpc::Code::UNKNOWN,
            },
            Error::Runtime { .. } | Error::Internal(_) => ttrpc::Code::UNKNOWN,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

impl From<podsnap_checkpoint::Error> for Error {
    fn from(e: podsnap_checkpoint::Error) -> Self {
        Error::Checkpoint(Box::new(e))
    }
}

impl From<containerd_shim::Error> for Error {
    fn from(e: containerd_shim::Error) -> Self {
        Error::Internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_reach_containerd() {
        let e: ttrpc::Error = Error::Unimplemented("Checkpoint").into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED);
                assert_eq!(s.message(), "Checkpoint is not implemented by the podsnap shim");
            }
            other => panic!("unexpected {other:?}"),
        }
        let e: ttrpc::Error = Error::NotFound("container x".into()).into();
        assert!(matches!(e, ttrpc::Error::RpcStatus(s) if s.code() == ttrpc::Code::NOT_FOUND));
    }
}
