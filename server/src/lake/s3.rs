//! The S3 lake backend: objects live in a bucket under a key prefix. Owns the
//! S3 client set-up (credentials and region from the standard AWS chain,
//! retries, timeouts), the mapping between lake keys and S3 keys, streamed
//! listings, and uploads that become visible whole or not at all: a single
//! PutObject below the multipart threshold, otherwise a multipart upload that
//! is completed on commit and aborted on any failure, abort or drop. Also owns
//! [`S3Bucket`], the read-only [`ObjectSource`] view of a bucket that S3
//! Inventory reports are read from.
//!
//! An abort that cannot reach S3 (the process is killed mid-upload) leaves
//! an incomplete upload behind, whose parts S3 keeps (and bills) until it is
//! aborted. The lake sweeps for them itself: the first listing or probe after
//! opening, and then the first one after each [`SWEEP_INTERVAL`], aborts the
//! uploads under its prefix initiated more than `abort_incomplete_after` ago
//! ([`S3Lake::abort_incomplete_uploads`]). A bucket lifecycle rule
//! `AbortIncompleteMultipartUpload` remains a good backstop for what no lake
//! sweeps any more (a prefix that was moved).

use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use tracing::{debug, info, warn};

use super::{
    ByteReader, LIST_PAGE, Lake, LakeError, ObjectMeta, ObjectSource, ObjectWriter, PageSink,
    validate_key,
};
use crate::config;
use crate::model::{UnixMs, now_ms};

/// How many times one request is tried (5xx, SlowDown, throttling, timeouts).
const MAX_ATTEMPTS: u32 = 5;
/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a response's first byte may take.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one attempt may take (a whole part upload is one attempt).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one operation may take over all its attempts.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(900);
/// S3's smallest part size (every part but the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest part number.
const MAX_PARTS: i32 = 10_000;
/// The checksum sent with every write request and verified by S3.
const CHECKSUM: ChecksumAlgorithm = ChecksumAlgorithm::Crc32C;
/// The region used by [`S3Lake::with_static_credentials`] when the config has none.
const FALLBACK_REGION: &str = "us-east-1";
/// How often the lake sweeps for incomplete multipart uploads to abort. Only
/// a killed server leaves one, so once an hour is plenty; a sweep is one
/// ListMultipartUploads request per thousand open uploads (and an abort per
/// stale one), piggybacked on a listing or probe that runs anyway.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);
/// A sweep reads at most this many pages of open uploads (a thousand each);
/// the rest wait for the next sweep.
const MAX_SWEEP_PAGES: usize = 100;

/// A lake in an S3 (or S3-compatible) bucket under a key prefix.
#[derive(Debug, Clone)]
pub struct S3Lake {
    client: Client,
    bucket: String,
    /// Empty, or ends in exactly one `/`.
    prefix: String,
    multipart_threshold: u64,
    part_size: u64,
    /// Incomplete multipart uploads initiated longer ago are aborted by sweeps.
    abort_incomplete_after: Duration,
    /// When the next sweep is due, in ms since the Unix epoch (0: at the
    /// first listing or probe). Shared by every clone.
    next_sweep_ms: Arc<AtomicI64>,
}

impl S3Lake {
    /// Connects with credentials and region from the standard AWS chain
    /// (environment, profile, web identity, container and instance
    /// metadata), with the config's region, endpoint and addressing style
    /// taking precedence. Fails when no region can be found.
    pub async fn connect(cfg: &config::S3Lake) -> Result<S3Lake, LakeError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(retry_config())
            .timeout_config(timeout_config());
        if let Some(region) = &cfg.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(connect_error(
                &cfg.bucket,
                "no aws region: set lake.s3.region or AWS_REGION",
            ));
        }
        // The endpoint is S3's alone: the credential chain keeps its own
        // (STS for web identity, instance metadata).
        let mut s3 = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(cfg.force_path_style);
        if let Some(endpoint) = &cfg.endpoint {
            s3 = s3.endpoint_url(endpoint);
        }
        Ok(S3Lake::from_s3_config(s3.build(), cfg))
    }

    /// A lake with fixed credentials instead of the AWS chain (tests, and
    /// S3-compatible servers with their own keys). The region defaults to
    /// `us-east-1`.
    pub fn with_static_credentials(
        cfg: &config::S3Lake,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> S3Lake {
        let region = cfg.region.as_deref().unwrap_or(FALLBACK_REGION).to_string();
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region))
            .credentials_provider(Credentials::new(
                access_key_id,
                secret_access_key,
                None,
                None,
                "adce-static",
            ))
            .retry_config(retry_config())
            .timeout_config(timeout_config())
            .force_path_style(cfg.force_path_style);
        if let Some(endpoint) = &cfg.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        S3Lake::from_s3_config(builder.build(), cfg)
    }

    /// A lake from a complete client config; `cfg` gives the bucket, prefix
    /// and upload sizes (its region, endpoint and addressing are not used).
    pub fn from_s3_config(s3: aws_sdk_s3::Config, cfg: &config::S3Lake) -> S3Lake {
        S3Lake {
            client: Client::from_conf(s3),
            bucket: cfg.bucket.clone(),
            prefix: normalize_prefix(&cfg.prefix),
            multipart_threshold: cfg.multipart_threshold,
            part_size: cfg.multipart_part_size.max(MIN_PART_SIZE),
            abort_incomplete_after: cfg.abort_incomplete_after,
            next_sweep_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    /// The S3 client (shared by every clone).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The bucket.
    pub fn bucket_name(&self) -> &str {
        &self.bucket
    }

    /// The normalized key prefix: empty or ending in `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A read-only view of the whole bucket `name` through this lake's client,
    /// e.g. an S3 Inventory destination bucket.
    pub fn bucket(&self, name: &str) -> S3Bucket {
        S3Bucket::new(self.client.clone(), name, "")
    }

    fn s3_key(&self, key: &str) -> Result<String, LakeError> {
        s3_key(&self.prefix, key)
    }

    /// Aborts the incomplete multipart uploads of lake keys under the prefix
    /// that were initiated more than `abort_incomplete_after` before `now`
    /// (ms since the Unix epoch), and returns how many it aborted. Each abort
    /// is logged; one that fails is logged and skipped.
    pub async fn abort_incomplete_uploads(&self, now: UnixMs) -> Result<u64, LakeError> {
        let mut aborted = 0;
        let mut key_marker: Option<String> = None;
        let mut upload_id_marker: Option<String> = None;
        for _ in 0..MAX_SWEEP_PAGES {
            let mut request = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_id_marker.take());
            if !self.prefix.is_empty() {
                request = request.prefix(&self.prefix);
            }
            let page = request
                .send()
                .await
                .map_err(|err| sdk_error("list uploads under", &self.prefix, err))?;
            for upload in page.uploads() {
                let (Some(s3_key), Some(upload_id)) = (upload.key(), upload.upload_id()) else {
                    continue;
                };
                // Only the lake's own keys: nothing else under the prefix is
                // an upload this lake started.
                if lake_key(&self.prefix, s3_key).is_none() {
                    continue;
                }
                let Some(initiated) = upload.initiated().and_then(|t| t.to_millis().ok()) else {
                    continue;
                };
                if !is_stale(initiated, now, self.abort_incomplete_after) {
                    continue;
                }
                if self.abort_stale_upload(s3_key, upload_id, initiated).await {
                    aborted += 1;
                }
            }
            if !page.is_truncated().unwrap_or(false) {
                return Ok(aborted);
            }
            key_marker = page.next_key_marker().map(str::to_string);
            upload_id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && upload_id_marker.is_none() {
                return Ok(aborted);
            }
        }
        debug!(
            aborted,
            "sweep stopped after {MAX_SWEEP_PAGES} pages of uploads"
        );
        Ok(aborted)
    }

    /// Aborts one stale upload found by a sweep; whether it was aborted.
    async fn abort_stale_upload(&self, s3_key: &str, upload_id: &str, initiated: UnixMs) -> bool {
        let initiated = chrono::DateTime::from_timestamp_millis(initiated)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(s3_key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => {
                info!(
                    key = s3_key,
                    upload_id,
                    initiated,
                    "aborted an incomplete multipart upload left by an interrupted write"
                );
                true
            }
            // Gone in between (its writer finished or aborted it).
            Err(err) if is_not_found(&err) => false,
            Err(err) => {
                warn!(
                    key = s3_key,
                    upload_id,
                    initiated,
                    error = %DisplayErrorContext(&err),
                    "cannot abort an incomplete multipart upload"
                );
                false
            }
        }
    }

    /// Sweeps when a sweep is due (see [`SWEEP_INTERVAL`]); one caller of
    /// many concurrent ones claims it, the others go on at once. A failed
    /// sweep is logged and waits for the next interval: it never fails the
    /// listing or probe it rides on.
    async fn sweep_if_due(&self) {
        let now = now_ms();
        let due = self.next_sweep_ms.load(Ordering::Acquire);
        if now < due {
            return;
        }
        let interval = crate::model::duration_ms(SWEEP_INTERVAL);
        let next = now.saturating_add(interval);
        if self
            .next_sweep_ms
            .compare_exchange(due, next, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        match self.abort_incomplete_uploads(now).await {
            Ok(0) => debug!(lake = %self.describe(), "no stale multipart upload"),
            Ok(aborted) => {
                info!(lake = %self.describe(), aborted, "stale multipart uploads aborted")
            }
            Err(e) => warn!(
                lake = %self.describe(),
                error = %e,
                "sweeping for stale multipart uploads failed; trying again in an hour"
            ),
        }
    }
}

/// Whether an upload initiated at `initiated` (ms since the Unix epoch) is
/// older than `age` at `now`.
fn is_stale(initiated: UnixMs, now: UnixMs, age: Duration) -> bool {
    let age = crate::model::duration_ms(age);
    initiated < now.saturating_sub(age)
}

/// Normalizes a lake prefix: no leading or trailing `/` runs, then one `/`
/// appended unless empty (`raw`, `raw/` and `/raw//` all mean `raw/`).
pub fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

/// The S3 key of the lake key `key` under the normalized `prefix`; the key is
/// validated first so a hostile key never reaches a request.
pub fn s3_key(prefix: &str, key: &str) -> Result<String, LakeError> {
    validate_key(key)?;
    Ok(format!("{prefix}{key}"))
}

/// The lake key of the S3 key `s3_key` under `prefix`; `None` for keys
/// outside the prefix and for keys that are not valid lake keys (such as the
/// zero-byte "folder" markers consoles create).
pub fn lake_key<'a>(prefix: &str, s3_key: &'a str) -> Option<&'a str> {
    let key = s3_key.strip_prefix(prefix)?;
    validate_key(key).ok().map(|()| key)
}

fn retry_config() -> RetryConfig {
    RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS)
}

fn timeout_config() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

fn connect_error(bucket: &str, message: &str) -> LakeError {
    LakeError::Io {
        op: "connect",
        key: bucket.to_string(),
        source: std::io::Error::other(message.to_string()),
    }
}

fn millis(time: Option<&DateTime>) -> UnixMs {
    time.and_then(|t| t.to_millis().ok()).unwrap_or(0)
}

fn size_of(len: Option<i64>) -> u64 {
    len.and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

/// Whether a request failed because the object (or bucket) does not exist.
fn is_not_found<E>(err: &SdkError<E>) -> bool {
    err.raw_response()
        .is_some_and(|response| response.status().as_u16() == 404)
}

/// A lake error for a failed request, with the SDK's whole error chain.
fn sdk_error<E>(op: &'static str, key: &str, err: SdkError<E>) -> LakeError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let kind = if is_not_found(&err) {
        ErrorKind::NotFound
    } else if matches!(err, SdkError::TimeoutError(_)) {
        ErrorKind::TimedOut
    } else {
        ErrorKind::Other
    };
    LakeError::Io {
        op,
        key: key.to_string(),
        source: std::io::Error::new(kind, DisplayErrorContext(&err).to_string()),
    }
}

fn body_error(op: &'static str, key: &str, err: impl std::fmt::Display) -> LakeError {
    LakeError::Io {
        op,
        key: key.to_string(),
        source: std::io::Error::other(err.to_string()),
    }
}

/// Reads `key` of `bucket` whole: `None` when absent, `TooLarge` above
/// `max_bytes` (checked against the length before the body is read, and again
/// while it streams in). `key` names the object in errors.
async fn read_object(
    client: &Client,
    bucket: &str,
    s3_key: &str,
    key: &str,
    max_bytes: u64,
) -> Result<Option<Vec<u8>>, LakeError> {
    let output = match client.get_object().bucket(bucket).key(s3_key).send().await {
        Ok(output) => output,
        Err(err) if is_not_found(&err) => return Ok(None),
        Err(err) => return Err(sdk_error("get", key, err)),
    };
    let too_large = |size| LakeError::TooLarge {
        key: key.to_string(),
        size,
        limit: max_bytes,
    };
    let length = size_of(output.content_length());
    if length > max_bytes {
        return Err(too_large(length));
    }
    let mut body = output.body;
    let mut bytes = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| body_error("read", key, e))?;
        bytes.extend_from_slice(&chunk);
        if bytes.len() as u64 > max_bytes {
            return Err(too_large(bytes.len() as u64));
        }
    }
    Ok(Some(bytes))
}

#[async_trait]
impl Lake for S3Lake {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn list(&self, prefix: &str, pages: PageSink) -> Result<u64, LakeError> {
        self.sweep_if_due().await;
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut stream = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .page_size(LIST_PAGE as i32)
            .send();
        let mut sent = 0u64;
        while let Some(output) = stream.next().await {
            let output = output.map_err(|err| sdk_error("list", prefix, err))?;
            let page: Vec<ObjectMeta> = output
                .contents()
                .iter()
                .filter_map(|object| {
                    let key = lake_key(&self.prefix, object.key()?)?;
                    Some(ObjectMeta {
                        key: key.to_string(),
                        size: size_of(object.size()),
                        modified_ms: millis(object.last_modified()),
                    })
                })
                .collect();
            if page.is_empty() {
                continue;
            }
            let count = page.len() as u64;
            if pages.send(page).await.is_err() {
                // The consumer went away: more pages would go nowhere.
                debug!(prefix, sent, "listing consumer gone; listing stopped");
                return Ok(sent);
            }
            sent += count;
        }
        Ok(sent)
    }

    async fn stat(&self, key: &str) -> Result<Option<ObjectMeta>, LakeError> {
        let s3_key = self.s3_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&s3_key)
            .send()
            .await
        {
            Ok(head) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: size_of(head.content_length()),
                modified_ms: millis(head.last_modified()),
            })),
            Err(err) if is_not_found(&err) => Ok(None),
            Err(err) => Err(sdk_error("stat", key, err)),
        }
    }

    async fn get(&self, key: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, LakeError> {
        let s3_key = self.s3_key(key)?;
        read_object(&self.client, &self.bucket, &s3_key, key, max_bytes).await
    }

    async fn put(&self, key: &str) -> Result<Box<dyn ObjectWriter>, LakeError> {
        let s3_key = self.s3_key(key)?;
        Ok(Box::new(S3Writer {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            s3_key,
            key: key.to_string(),
            threshold: self.multipart_threshold,
            part_size: self.part_size,
            buffer: Vec::new(),
            size: 0,
            state: WriterState::Buffering,
        }))
    }

    async fn probe(&self) -> Result<(), LakeError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|err| sdk_error("probe", &self.bucket, err))?;
        // The server probes at start and every half minute: a lake that is
        // never listed (an inventory report without hot sources) is swept too.
        self.sweep_if_due().await;
        Ok(())
    }
}

/// Where an upload stands.
enum WriterState {
    /// Everything written so far is in the buffer, below the threshold.
    Buffering,
    /// A multipart upload is open; the buffer holds the next part's bytes.
    Multipart {
        upload_id: String,
        parts: Vec<CompletedPart>,
    },
    /// Committed, aborted or failed: nothing more may happen.
    Finished,
}

/// An object being uploaded.
struct S3Writer {
    client: Client,
    bucket: String,
    s3_key: String,
    key: String,
    threshold: u64,
    part_size: u64,
    buffer: Vec<u8>,
    size: u64,
    state: WriterState,
}

impl S3Writer {
    /// Opens the multipart upload once the buffer has passed the threshold.
    async fn start_multipart(&mut self) -> Result<(), LakeError> {
        let output = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.s3_key)
            .checksum_algorithm(CHECKSUM)
            .send()
            .await
            .map_err(|err| sdk_error("start upload of", &self.key, err))?;
        let Some(upload_id) = output.upload_id else {
            return Err(body_error(
                "start upload of",
                &self.key,
                "the response has no upload id",
            ));
        };
        debug!(key = %self.key, upload_id, "multipart upload started");
        self.state = WriterState::Multipart {
            upload_id,
            parts: Vec::new(),
        };
        Ok(())
    }

    /// Uploads `data` as the next part of the open multipart upload.
    async fn upload_part(&mut self, data: Vec<u8>) -> Result<(), LakeError> {
        let WriterState::Multipart { upload_id, parts } = &mut self.state else {
            return Err(body_error("upload part of", &self.key, "no upload is open"));
        };
        let part_number = i32::try_from(parts.len() + 1).unwrap_or(i32::MAX);
        if part_number > MAX_PARTS {
            return Err(body_error(
                "upload part of",
                &self.key,
                "more than 10000 parts: raise lake.s3.multipart_part_size",
            ));
        }
        let output = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.s3_key)
            .upload_id(upload_id.as_str())
            .part_number(part_number)
            .checksum_algorithm(CHECKSUM)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|err| sdk_error("upload part of", &self.key, err))?;
        let mut part = CompletedPart::builder()
            .part_number(part_number)
            .set_e_tag(output.e_tag().map(str::to_string));
        if let Some(checksum) = output.checksum_crc32_c() {
            part = part.checksum_crc32_c(checksum);
        }
        parts.push(part.build());
        Ok(())
    }

    /// Uploads full parts while more than a part is buffered, so the last
    /// part (sent on commit) is never empty.
    async fn flush_parts(&mut self) -> Result<(), LakeError> {
        while self.buffer.len() as u64 > self.part_size {
            let rest = self.buffer.split_off(self.part_size as usize);
            let part = std::mem::replace(&mut self.buffer, rest);
            self.upload_part(part).await?;
        }
        Ok(())
    }

    async fn write_inner(&mut self, chunk: &[u8]) -> Result<(), LakeError> {
        self.buffer.extend_from_slice(chunk);
        self.size += chunk.len() as u64;
        if matches!(self.state, WriterState::Buffering) && self.size > self.threshold {
            self.start_multipart().await?;
        }
        if matches!(self.state, WriterState::Multipart { .. }) {
            self.flush_parts().await?;
        }
        Ok(())
    }

    async fn commit_inner(&mut self) -> Result<(), LakeError> {
        let data = std::mem::take(&mut self.buffer);
        match &self.state {
            WriterState::Buffering => {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&self.s3_key)
                    .checksum_algorithm(CHECKSUM)
                    .body(ByteStream::from(data))
                    .send()
                    .await
                    .map_err(|err| sdk_error("put", &self.key, err))?;
            }
            WriterState::Multipart { .. } => {
                self.upload_part(data).await?;
                let WriterState::Multipart { upload_id, parts } = &self.state else {
                    return Err(body_error("commit", &self.key, "no upload is open"));
                };
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.s3_key)
                    .upload_id(upload_id.as_str())
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts.clone()))
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|err| sdk_error("complete upload of", &self.key, err))?;
            }
            WriterState::Finished => {
                return Err(body_error("commit", &self.key, "writer already finished"));
            }
        }
        Ok(())
    }

    /// Ends the writer; an open multipart upload is aborted.
    async fn abort_inner(&mut self) {
        self.buffer = Vec::new();
        if let WriterState::Multipart { upload_id, .. } =
            std::mem::replace(&mut self.state, WriterState::Finished)
        {
            abort_upload(&self.client, &self.bucket, &self.s3_key, &upload_id).await;
        }
    }
}

/// Aborts a multipart upload, logging (not returning) a failure: the caller
/// is already on a failure path.
async fn abort_upload(client: &Client, bucket: &str, s3_key: &str, upload_id: &str) {
    match client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(s3_key)
        .upload_id(upload_id)
        .send()
        .await
    {
        Ok(_) => debug!(key = s3_key, upload_id, "multipart upload aborted"),
        Err(err) => warn!(
            key = s3_key,
            upload_id,
            error = %DisplayErrorContext(&err),
            "aborting a multipart upload failed; the bucket's lifecycle rule must clean it up"
        ),
    }
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, chunk: &[u8]) -> Result<(), LakeError> {
        if matches!(self.state, WriterState::Finished) {
            return Err(body_error("write", &self.key, "writer already finished"));
        }
        let result = self.write_inner(chunk).await;
        if result.is_err() {
            self.abort_inner().await;
        }
        result
    }

    async fn commit(mut self: Box<Self>) -> Result<ObjectMeta, LakeError> {
        if let Err(err) = self.commit_inner().await {
            self.abort_inner().await;
            return Err(err);
        }
        self.state = WriterState::Finished;
        // PutObject and CompleteMultipartUpload do not return the stored
        // time; the clock at commit is within the request of it, and saves a
        // HeadObject per upload.
        Ok(ObjectMeta {
            key: std::mem::take(&mut self.key),
            size: self.size,
            modified_ms: now_ms(),
        })
    }

    async fn abort(mut self: Box<Self>) {
        self.abort_inner().await;
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        let WriterState::Multipart { upload_id, .. } =
            std::mem::replace(&mut self.state, WriterState::Finished)
        else {
            return;
        };
        // Neither committed nor aborted: abort in the background, best effort.
        let client = self.client.clone();
        let bucket = std::mem::take(&mut self.bucket);
        let s3_key = std::mem::take(&mut self.s3_key);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    abort_upload(&client, &bucket, &s3_key, &upload_id).await;
                });
            }
            Err(_) => warn!(
                key = s3_key,
                upload_id, "dropped writer outside a runtime; multipart upload left open"
            ),
        }
    }
}

/// A read-only view of a bucket (optionally under a prefix), e.g. where S3
/// Inventory delivers its reports. Keys are relative to the prefix.
#[derive(Debug, Clone)]
pub struct S3Bucket {
    client: Client,
    bucket: String,
    /// Empty, or ends in exactly one `/`.
    prefix: String,
}

impl S3Bucket {
    /// A view of `bucket` under `prefix` (normalized; empty for the whole bucket).
    pub fn new(client: Client, bucket: &str, prefix: &str) -> S3Bucket {
        S3Bucket {
            client,
            bucket: bucket.to_string(),
            prefix: normalize_prefix(prefix),
        }
    }

    /// The same bucket viewed under `prefix` instead.
    pub fn with_prefix(mut self, prefix: &str) -> S3Bucket {
        self.prefix = normalize_prefix(prefix);
        self
    }

    /// The S3 key of `key`, which may be a directory prefix ending in `/`.
    fn s3_key(&self, key: &str) -> Result<String, LakeError> {
        validate_key(key.strip_suffix('/').unwrap_or(key))?;
        Ok(format!("{}{key}", self.prefix))
    }
}

#[async_trait]
impl ObjectSource for S3Bucket {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, LakeError> {
        let full_prefix = if prefix.is_empty() {
            self.prefix.clone()
        } else {
            self.s3_key(prefix)?
        };
        let mut stream = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .delimiter("/")
            .into_paginator()
            .page_size(LIST_PAGE as i32)
            .send();
        let mut dirs = Vec::new();
        while let Some(output) = stream.next().await {
            let output = output.map_err(|err| sdk_error("list", prefix, err))?;
            dirs.extend(
                output
                    .common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix()?.strip_prefix(self.prefix.as_str()))
                    .map(str::to_string),
            );
        }
        dirs.sort();
        dirs.dedup();
        Ok(dirs)
    }

    async fn read(&self, key: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, LakeError> {
        let s3_key = self.s3_key(key)?;
        read_object(&self.client, &self.bucket, &s3_key, key, max_bytes).await
    }

    async fn open(&self, key: &str) -> Result<ByteReader, LakeError> {
        let s3_key = self.s3_key(key)?;
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&s3_key)
            .send()
            .await
            .map_err(|err| sdk_error("open", key, err))?;
        Ok(Box::pin(output.body.into_async_read()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_normalize_to_one_trailing_slash() {
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(normalize_prefix("/"), "");
        assert_eq!(normalize_prefix("raw"), "raw/");
        assert_eq!(normalize_prefix("raw/"), "raw/");
        assert_eq!(normalize_prefix("/raw//"), "raw/");
        assert_eq!(normalize_prefix("a/b"), "a/b/");
    }

    #[test]
    fn keys_map_under_the_prefix_and_back() {
        assert_eq!(s3_key("raw/", "nba/x.json").unwrap(), "raw/nba/x.json");
        assert_eq!(s3_key("", "nba/x.json").unwrap(), "nba/x.json");
        assert_eq!(lake_key("raw/", "raw/nba/x.json"), Some("nba/x.json"));
        assert_eq!(lake_key("", "nba/x.json"), Some("nba/x.json"));
        // Outside the prefix, and folder markers, are not lake objects.
        assert_eq!(lake_key("raw/", "other/nba/x.json"), None);
        assert_eq!(lake_key("raw/", "raw/nba/"), None);
        assert_eq!(lake_key("raw/", "raw/"), None);
    }

    #[test]
    fn hostile_keys_never_map_to_s3_keys() {
        for key in ["", "../x", "/abs", "a//b", "a\\b", "a\nb"] {
            assert!(
                matches!(s3_key("raw/", key), Err(LakeError::InvalidKey { .. })),
                "{key:?} was mapped"
            );
        }
    }

    #[test]
    fn uploads_are_stale_once_older_than_the_age() {
        let day = Duration::from_secs(24 * 3600);
        let now: UnixMs = 1_700_000_000_000;
        let day_ms = 24 * 3600 * 1000;
        assert!(is_stale(now - day_ms - 1, now, day));
        assert!(!is_stale(now - day_ms, now, day));
        assert!(!is_stale(now - 1000, now, day));
        // An upload from the future (clock skew) is never stale.
        assert!(!is_stale(now + 1000, now, day));
        assert!(!is_stale(0, now, Duration::MAX));
        assert!(is_stale(now - 1, now, Duration::ZERO));
    }

    #[test]
    fn part_size_is_at_least_the_s3_minimum() {
        let cfg = config::S3Lake {
            bucket: "b".into(),
            prefix: "raw".into(),
            region: None,
            endpoint: Some("http://127.0.0.1:1".into()),
            force_path_style: true,
            multipart_threshold: 1,
            multipart_part_size: 1024,
            list_concurrency: 1,
            abort_incomplete_after: config::DEFAULT_ABORT_INCOMPLETE_AFTER,
            inventory: None,
        };
        let lake = S3Lake::with_static_credentials(&cfg, "k", "s");
        assert_eq!(lake.part_size, MIN_PART_SIZE);
        assert_eq!(lake.prefix(), "raw/");
        assert_eq!(lake.describe(), "s3://b/raw/");
        assert_eq!(lake.bucket("reports").describe(), "s3://reports/");
    }
}
