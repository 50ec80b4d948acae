//! The crate's one error type: invalid options and labels, connection,
//! credential and protocol failures, refused commands, and the classified
//! upload failures the runner acts on.

use std::path::PathBuf;

/// Everything that can go wrong in the agent library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options given to [`crate::run`] cannot work.
    #[error("invalid agent options: {0}")]
    InvalidOptions(String),
    /// The client settings (server address, token, TLS files) cannot be
    /// used to dial the server.
    #[error(transparent)]
    Dial(#[from] adce_proto::dial::DialError),
    /// The server refused the agent's credentials (UNAUTHENTICATED or
    /// PERMISSION_DENIED): retrying cannot help.
    #[error("the server refused the agent's token: {code:?}: {message}")]
    TokenRefused {
        /// The status code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// The program of an assignment is outside `--allow-command`.
    #[error(
        "command {program} is not allowed on this host{} (--allow-command {allowed})",
        .reason.as_ref().map(|reason| format!(": {reason}")).unwrap_or_default()
    )]
    CommandNotAllowed {
        /// The resolved program, or the program as given when it cannot
        /// be resolved.
        program: String,
        /// Why it could not be resolved, if so.
        reason: Option<String>,
        /// The allowed prefixes.
        allowed: String,
    },
    /// A `--labels` value is not a comma-separated list of `key=value` pairs.
    #[error("invalid label `{label}`: {reason}")]
    InvalidLabel {
        /// The offending `key=value` item.
        label: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A directory the agent needs could not be created or cleaned.
    #[error("cannot prepare directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another agent runs on the same work directory.
    #[error("work directory {} is in use by another agent (give each agent its own --work-dir)", .0.display())]
    WorkDirInUse(PathBuf),
    /// The transport to the server failed (connect, TLS, HTTP/2).
    #[error("cannot reach the server")]
    Transport(#[from] tonic::transport::Error),
    /// The server answered a call with an error status.
    #[error("server returned {:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The server broke the session protocol (e.g. no Welcome after Hello).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An assignment cannot be run as given (bad argv, env or lease id).
    #[error("invalid assignment: {0}")]
    InvalidAssignment(String),
    /// The server refused an uploaded key (INVALID_ARGUMENT), e.g. not an
    /// expected key of the lease; other files can still be uploaded.
    #[error("server refused key `{key}`: {message}")]
    UploadRefused {
        /// The refused key.
        key: String,
        /// The server's reason.
        message: String,
    },
    /// The lease is no longer live (FAILED_PRECONDITION / NOT_FOUND): no
    /// further upload for it can succeed.
    #[error("lease is no longer live: {0}")]
    LeaseGone(String),
    /// The upload failed in a way that may go away on retry (UNAVAILABLE,
    /// broken connection, ...).
    #[error("upload interrupted: {0}")]
    UploadTransient(String),
    /// The upload failed for good (local read error, unexpected server status).
    #[error("upload failed: {0}")]
    UploadFailed(String),
}

impl Error {
    /// Classifies a status returned by `AgentGateway.Upload` for `key`.
    pub fn from_upload_status(key: &str, status: &tonic::Status) -> Self {
        use tonic::Code;
        let message = status.message().to_owned();
        match status.code() {
            Code::InvalidArgument => Error::UploadRefused {
                key: key.to_owned(),
                message,
            },
            Code::FailedPrecondition | Code::NotFound => Error::LeaseGone(message),
            Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted => Error::UploadTransient(format!("{:?}: {message}", status.code())),
            code => Error::UploadFailed(format!("{code:?}: {message}")),
        }
    }

    /// A refusal of the agent's credentials, from the status that ended (or
    /// refused) a `Connect` call.
    pub fn token_refused(&self) -> Option<Error> {
        match self {
            Error::Status(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                Some(Error::TokenRefused {
                    code: status.code(),
                    message: status.message().to_owned(),
                })
            }
            _ => None,
        }
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::UploadTransient(_) | Error::Transport(_))
    }
}
