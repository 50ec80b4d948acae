//! Uploading a task's output files through the server: the [`Uploader`]
//! seam, its gRPC implementation (one `AgentGateway.Upload` stream per file,
//! streamed in fixed-size chunks), and the per-task upload loop with its
//! retry and give-up rules.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use adce_proto::dial::AuthChannel;
use adce_proto::v1::agent_gateway_client::AgentGatewayClient;
use adce_proto::v1::{UploadChunk, UploadHeader, upload_chunk};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::Error;
use crate::backoff::BackoffPolicy;
use crate::collect::OutputFile;

/// Size of each data message of an upload stream.
pub const UPLOAD_CHUNK_BYTES: usize = 256 * 1024;
/// How many times one file is tried when the failure is transient.
pub const UPLOAD_ATTEMPTS: u32 = 4;
/// Chunks read ahead of the network.
const READ_AHEAD_CHUNKS: usize = 2;

/// What the server confirmed for one upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadReceipt {
    /// The key written.
    pub key: String,
    /// Bytes written.
    pub size: u64,
    /// Hex SHA-256 of the bytes written.
    pub sha256: String,
}

/// Sends one file to the lake under a lease.
///
/// Errors are classified as [`Error::UploadRefused`] (skip this key),
/// [`Error::LeaseGone`] (stop), transient ([`Error::is_transient`], retry) or
/// anything else (give up).
pub trait Uploader: Send + Sync + 'static {
    /// Uploads the file at `path` as object `key` for `lease_id`.
    fn upload(
        &self,
        lease_id: &str,
        key: &str,
        path: &Path,
    ) -> impl Future<Output = Result<UploadReceipt, Error>> + Send;
}

/// Uploads through `AgentGateway.Upload` on a channel to the server.
#[derive(Debug, Clone)]
pub struct GrpcUploader {
    client: AgentGatewayClient<AuthChannel>,
    agent_id: String,
}

impl GrpcUploader {
    /// An uploader over `channel` (typically a lazily connected channel that
    /// reconnects by itself, carrying the agent's token) for the agent
    /// `agent_id`, which holds the leases.
    pub fn new(channel: AuthChannel, agent_id: String) -> Self {
        Self {
            client: AgentGatewayClient::new(channel),
            agent_id,
        }
    }
}

impl Uploader for GrpcUploader {
    async fn upload(&self, lease_id: &str, key: &str, path: &Path) -> Result<UploadReceipt, Error> {
        let local = |what: &str, error: std::io::Error| {
            Error::UploadFailed(format!("cannot {what} {}: {error}", path.display()))
        };
        let file = open_regular(path)
            .await
            .map_err(|error| local("open", error))?;
        let size = file
            .metadata()
            .await
            .map_err(|error| local("stat", error))?
            .len();
        let (chunks, receiver) = mpsc::channel(READ_AHEAD_CHUNKS);
        let header = UploadChunk {
            kind: Some(upload_chunk::Kind::Header(UploadHeader {
                lease_id: lease_id.to_owned(),
                key: key.to_owned(),
                size,
                agent_id: self.agent_id.clone(),
            })),
        };
        chunks
            .send(header)
            .await
            .map_err(|_| Error::UploadFailed("upload stream closed before its header".into()))?;
        let reader = tokio::spawn(stream_file(file, size, chunks));
        let outcome = self
            .client
            .clone()
            .upload(ReceiverStream::new(receiver))
            .await;
        // The reader has finished when the call consumed the whole stream;
        // when the call ended early it is stopped here.
        reader.abort();
        if let Ok(Err(error)) = reader.await {
            return Err(local("read", error));
        }
        match outcome {
            Ok(reply) => {
                let reply = reply.into_inner();
                Ok(UploadReceipt {
                    key: reply.key,
                    size: reply.size,
                    sha256: reply.sha256,
                })
            }
            Err(status) => Err(Error::from_upload_status(key, &status)),
        }
    }
}

/// Opens `path` for reading only if it is a regular file and not a symbolic
/// link, so an output file swapped for a link after it was listed (by a
/// process that outlived its scraper) is not followed out of the output
/// directory.
async fn open_regular(path: &Path) -> std::io::Result<tokio::fs::File> {
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .await?;
    if !file.metadata().await?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Sends exactly `size` bytes of `file` as data chunks. A file that shrank
/// under the agent is an error (the stream then ends short, which the server
/// rejects by its size check); a file that grew is cut at `size`.
async fn stream_file<R>(
    file: R,
    size: u64,
    chunks: mpsc::Sender<UploadChunk>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut reader = file.take(size);
    let mut sent: u64 = 0;
    while sent < size {
        let mut buffer = vec![0_u8; UPLOAD_CHUNK_BYTES];
        let mut filled = 0;
        while filled < buffer.len() {
            let read = reader.read(&mut buffer[filled..]).await?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        if filled == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("file shrank to {sent} bytes while uploading {size}"),
            ));
        }
        buffer.truncate(filled);
        sent += filled as u64;
        let chunk = UploadChunk {
            kind: Some(upload_chunk::Kind::Data(buffer)),
        };
        if chunks.send(chunk).await.is_err() {
            // The call ended; its status says why.
            return Ok(());
        }
    }
    Ok(())
}

/// How retries of one file are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UploadRetry {
    /// Delay between attempts.
    pub backoff: BackoffPolicy,
    /// Attempts per file, at least 1.
    pub attempts: u32,
}

impl Default for UploadRetry {
    fn default() -> Self {
        Self {
            backoff: BackoffPolicy {
                initial: Duration::from_millis(500),
                ..BackoffPolicy::default()
            },
            attempts: UPLOAD_ATTEMPTS,
        }
    }
}

/// What happened to a task's uploads.
#[derive(Debug, Default)]
pub struct UploadReport {
    /// Keys the server accepted, in upload order.
    pub uploaded: Vec<String>,
    /// Keys the server refused, with the reason, for the task's log.
    pub warnings: Vec<String>,
    /// The failure that stopped the uploads, with the key it happened on.
    pub failure: Option<(String, Error)>,
}

/// Uploads `files` one after the other.
///
/// A refused key is recorded as a warning and skipped; a transient failure is
/// retried per [`UploadRetry`]; a lease that is no longer live or a failure
/// that persists stops the uploads.
pub async fn upload_all<U: Uploader>(
    uploader: &U,
    lease_id: &str,
    files: &[OutputFile],
    retry: UploadRetry,
) -> UploadReport {
    let mut report = UploadReport::default();
    for file in files {
        let mut failures: u32 = 0;
        loop {
            match uploader.upload(lease_id, &file.key, &file.path).await {
                Ok(receipt) => {
                    tracing::debug!(
                        lease = lease_id,
                        key = %receipt.key,
                        size = receipt.size,
                        sha256 = %receipt.sha256,
                        "uploaded"
                    );
                    report.uploaded.push(file.key.clone());
                    break;
                }
                Err(error @ Error::UploadRefused { .. }) => {
                    tracing::warn!(lease = lease_id, key = %file.key, %error, "upload refused");
                    report.warnings.push(error.to_string());
                    break;
                }
                Err(error) if error.is_transient() && failures + 1 < retry.attempts.max(1) => {
                    let delay = retry.backoff.delay(failures);
                    failures += 1;
                    tracing::warn!(
                        lease = lease_id,
                        key = %file.key,
                        %error,
                        attempt = failures,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "upload failed, retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    tracing::warn!(lease = lease_id, key = %file.key, %error, "upload failed");
                    report.failure = Some((file.key.clone(), error));
                    return report;
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;

    /// A scripted uploader: pops the next outcome per key, succeeds when the
    /// script for a key is empty, and records every call.
    #[derive(Default)]
    struct Scripted {
        script: Mutex<HashMap<String, Vec<Error>>>,
        calls: Mutex<Vec<String>>,
    }

    impl Scripted {
        fn with(script: Vec<(&str, Vec<Error>)>) -> Self {
            let script = script
                .into_iter()
                .map(|(key, errors)| (key.to_owned(), errors))
                .collect();
            Self {
                script: Mutex::new(script),
                calls: Mutex::default(),
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls
                .lock()
                .map(|calls| calls.clone())
                .unwrap_or_default()
        }
    }

    impl Uploader for Scripted {
        async fn upload(
            &self,
            _lease: &str,
            key: &str,
            _path: &Path,
        ) -> Result<UploadReceipt, Error> {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(key.to_owned());
            }
            let next = self
                .script
                .lock()
                .ok()
                .and_then(|mut script| script.get_mut(key).and_then(|errors| errors.pop()));
            match next {
                Some(error) => Err(error),
                None => Ok(UploadReceipt {
                    key: key.to_owned(),
                    size: 1,
                    sha256: String::new(),
                }),
            }
        }
    }

    fn files(keys: &[&str]) -> Vec<OutputFile> {
        keys.iter()
            .map(|key| OutputFile {
                key: (*key).to_owned(),
                path: PathBuf::from("/unused").join(key),
            })
            .collect()
    }

    fn fast_retry() -> UploadRetry {
        UploadRetry {
            backoff: BackoffPolicy {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(2),
                jitter: 0.0,
            },
            attempts: 3,
        }
    }

    #[tokio::test]
    async fn refused_keys_are_warnings_and_the_rest_still_upload() {
        let uploader = Scripted::with(vec![(
            "b",
            vec![Error::UploadRefused {
                key: "b".into(),
                message: "not an expected key".into(),
            }],
        )]);
        let report = upload_all(&uploader, "L1", &files(&["a", "b", "c"]), fast_retry()).await;
        assert_eq!(report.uploaded, ["a", "c"]);
        assert_eq!(
            report.warnings,
            ["server refused key `b`: not an expected key"]
        );
        assert!(report.failure.is_none());
    }

    #[tokio::test]
    async fn transient_failures_are_retried_a_bounded_number_of_times() {
        let transient = || Error::UploadTransient("Unavailable: down".into());
        // Two transient failures then success: within 3 attempts.
        let uploader = Scripted::with(vec![("a", vec![transient(), transient()])]);
        let report = upload_all(&uploader, "L1", &files(&["a"]), fast_retry()).await;
        assert_eq!(report.uploaded, ["a"]);
        assert_eq!(uploader.calls(), ["a", "a", "a"]);

        // Three transient failures exhaust the attempts; later files are not tried.
        let uploader = Scripted::with(vec![("a", vec![transient(), transient(), transient()])]);
        let report = upload_all(&uploader, "L1", &files(&["a", "b"]), fast_retry()).await;
        assert!(report.uploaded.is_empty());
        assert_eq!(uploader.calls(), ["a", "a", "a"]);
        let (key, error) = report.failure.expect("gave up");
        assert_eq!(key, "a");
        assert!(error.is_transient());
    }

    #[tokio::test]
    async fn a_dead_lease_stops_uploading_at_once() {
        let uploader = Scripted::with(vec![("b", vec![Error::LeaseGone("expired".into())])]);
        let report = upload_all(&uploader, "L1", &files(&["a", "b", "c"]), fast_retry()).await;
        assert_eq!(report.uploaded, ["a"]);
        assert_eq!(uploader.calls(), ["a", "b"]);
        assert!(matches!(report.failure, Some((ref key, Error::LeaseGone(_))) if key == "b"));
    }

    #[tokio::test]
    async fn file_is_streamed_in_fixed_chunks_of_exactly_its_size() {
        let data: Vec<u8> = (0..(UPLOAD_CHUNK_BYTES * 2 + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        let (tx, mut rx) = mpsc::channel(8);
        let size = data.len() as u64;
        let producer = tokio::spawn({
            let data = data.clone();
            async move { stream_file(&data[..], size, tx).await }
        });
        let mut received = Vec::new();
        let mut sizes = Vec::new();
        while let Some(chunk) = rx.recv().await {
            let Some(upload_chunk::Kind::Data(bytes)) = chunk.kind else {
                panic!("only data chunks expected");
            };
            sizes.push(bytes.len());
            received.extend(bytes);
        }
        assert!(matches!(producer.await, Ok(Ok(()))));
        assert_eq!(sizes, [UPLOAD_CHUNK_BYTES, UPLOAD_CHUNK_BYTES, 10]);
        assert_eq!(received, data);
    }

    #[tokio::test]
    async fn a_file_shorter_than_announced_is_an_error() {
        let (tx, mut rx) = mpsc::channel(8);
        let producer = tokio::spawn(async move { stream_file(&b"abc"[..], 10, tx).await });
        while rx.recv().await.is_some() {}
        let result = producer.await.expect("task ran");
        assert_eq!(
            result.expect_err("short").kind(),
            std::io::ErrorKind::UnexpectedEof
        );
    }

    #[tokio::test]
    async fn only_regular_files_are_opened_and_links_are_not_followed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("data.json");
        std::fs::write(&file, b"{}")?;
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink("/etc/passwd", &link)?;
        assert!(open_regular(&file).await.is_ok());
        assert!(open_regular(&link).await.is_err());
        assert!(open_regular(dir.path()).await.is_err());
        Ok(())
    }

    #[test]
    fn statuses_are_classified() {
        let classify = |status| Error::from_upload_status("k", &status);
        assert!(matches!(
            classify(tonic::Status::invalid_argument("no")),
            Error::UploadRefused { .. }
        ));
        assert!(matches!(
            classify(tonic::Status::failed_precondition("gone")),
            Error::LeaseGone(_)
        ));
        assert!(matches!(
            classify(tonic::Status::not_found("gone")),
            Error::LeaseGone(_)
        ));
        assert!(classify(tonic::Status::unavailable("down")).is_transient());
        assert!(matches!(
            classify(tonic::Status::internal("disk full")),
            Error::UploadFailed(_)
        ));
    }
}
