//! The lake: where objects live. Owns the `Lake` trait every backend
//! implements and object metadata; every key passes the model's key rules
//! (re-exported here for the lake's users) before it touches a backend. Only
//! the server writes the lake, and every write becomes visible atomically or
//! not at all.

pub mod inventory;
mod local;
mod s3;

use std::sync::Arc;

use async_trait::async_trait;

pub use local::{LocalDir, LocalLake, stale_temp_age};
pub use s3::{S3Bucket, S3Lake, SWEEP_INTERVAL};

use crate::model::{InvalidKey, UnixMs};
pub use crate::model::{MAX_KEY_LEN, validate_key};

/// What the lake knows about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key, relative to the lake's root or prefix, `/`-separated.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, in ms since the Unix epoch.
    pub modified_ms: UnixMs,
}

/// Errors of lake backends.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    /// The key is not a safe relative object key.
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given (debug-escaped when printed).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An object is larger than the reader accepts.
    #[error("object {key:?} is {size} bytes, above the limit of {limit} bytes")]
    TooLarge {
        /// The key.
        key: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// An I/O operation failed.
    #[error("lake {op} {key:?}: {source}")]
    Io {
        /// What was being done (`list`, `stat`, `write`, `rename`, ...).
        op: &'static str,
        /// The key or prefix involved.
        key: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A place objects are listed from and written to.
#[async_trait]
pub trait Lake: Send + Sync + 'static {
    /// A short description for status output, e.g. `local:/srv/lake`.
    fn describe(&self) -> String;

    /// Sends every object whose key starts with `prefix` (which need not end
    /// at a `/`) to `pages`, a page at a time, and returns how many it sent.
    /// Pages stream into the consumer so no listing is collected whole.
    async fn list(&self, prefix: &str, pages: PageSink) -> Result<u64, LakeError>;

    /// The object at `key`, if it exists.
    async fn stat(&self, key: &str) -> Result<Option<ObjectMeta>, LakeError>;

    /// Reads a whole object; `None` when it does not exist. Objects larger
    /// than `max_bytes` are refused with [`LakeError::TooLarge`].
    async fn get(&self, key: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, LakeError>;

    /// Starts writing the object at `key`; nothing is visible until `commit`.
    async fn put(&self, key: &str) -> Result<Box<dyn ObjectWriter>, LakeError>;

    /// Checks the lake can be reached (used by health and at start).
    async fn probe(&self) -> Result<(), LakeError>;
}

/// An object being written. Dropping it without `commit` discards it.
#[async_trait]
pub trait ObjectWriter: Send {
    /// Appends bytes.
    async fn write(&mut self, chunk: &[u8]) -> Result<(), LakeError>;
    /// Makes the object visible under its key, atomically, replacing any older one.
    async fn commit(self: Box<Self>) -> Result<ObjectMeta, LakeError>;
    /// Discards everything written; the key is left as it was.
    async fn abort(self: Box<Self>);
}

/// Read-only access to a store of files addressed by key: an S3 Inventory
/// destination bucket, or a directory standing in for one in tests.
#[async_trait]
pub trait ObjectSource: Send + Sync + 'static {
    /// A short description for log lines, e.g. `s3://reports/inv/`.
    fn describe(&self) -> String;

    /// The immediate "subdirectories" of `prefix` (which ends in `/` or is
    /// empty): each returned entry is a full prefix ending in `/`, sorted.
    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, LakeError>;

    /// Reads an object whole; `None` when absent; larger than `max_bytes`
    /// is [`LakeError::TooLarge`].
    async fn read(&self, key: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, LakeError>;

    /// Opens an object for a streaming read.
    async fn open(&self, key: &str) -> Result<ByteReader, LakeError>;
}

/// A streaming reader of an object's bytes.
pub type ByteReader = std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>;

/// Where listings send their pages.
pub type PageSink = tokio::sync::mpsc::Sender<Vec<ObjectMeta>>;

/// How many objects a listing page holds at most.
pub const LIST_PAGE: usize = 1000;

/// Lists `prefix` into a vector (for tests and small listings).
pub async fn list_all(lake: &dyn Lake, prefix: &str) -> Result<Vec<ObjectMeta>, LakeError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let listing = lake.list(prefix, tx);
    let collect = async {
        let mut out = Vec::new();
        while let Some(page) = rx.recv().await {
            out.extend(page);
        }
        out
    };
    let (listed, out) = tokio::join!(listing, collect);
    listed?;
    Ok(out)
}

impl From<InvalidKey> for LakeError {
    fn from(e: InvalidKey) -> Self {
        LakeError::InvalidKey {
            key: e.key,
            reason: e.reason,
        }
    }
}

/// A shared lake handle.
pub type SharedLake = Arc<dyn Lake>;
