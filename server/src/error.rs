//! The server's one error type and its single mapping to `tonic::Status`.

use crate::lake::LakeError;
use crate::model::CorruptPartition;

/// Everything that can go wrong inside the server library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state store failed; the scheduler stops so state can be recovered.
    #[error("state store: {0}")]
    Store(#[from] rusqlite::Error),
    /// The lake failed.
    #[error(transparent)]
    Lake(#[from] LakeError),
    /// The request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or refers to something it may not.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is valid but the state does not allow it (e.g. a lease that is no longer live).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something with the request's identity already exists (an agent id
    /// that another live connection uses).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is too large.
    #[error("{0}")]
    TooLarge(String),
    /// A component the request needs has stopped (the server is shutting down).
    #[error("{0} has stopped")]
    Stopped(&'static str),
    /// Anything else, with context.
    #[error("{0}")]
    Internal(String),
}

impl From<CorruptPartition> for Error {
    fn from(e: CorruptPartition) -> Self {
        Error::Internal(e.to_string())
    }
}

/// A result with the server's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::NotFound(_) => tonic::Status::not_found(message),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            Error::AlreadyExists(_) => tonic::Status::already_exists(message),
            Error::TooLarge(_) => tonic::Status::resource_exhausted(message),
            Error::Stopped(_) => tonic::Status::unavailable(message),
            Error::Lake(LakeError::InvalidKey { .. }) => tonic::Status::invalid_argument(message),
            Error::Lake(LakeError::TooLarge { .. }) => tonic::Status::resource_exhausted(message),
            Error::Store(_) | Error::Lake(_) | Error::Internal(_) => {
                tonic::Status::internal(message)
            }
        }
    }
}
