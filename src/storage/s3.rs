//! The S3 backend: AWS S3 and S3-compatible services (MinIO, R2, B2, ...).
//!
//! Requests go through aws-sdk-s3 with its standard retry strategy
//! (exponential backoff with jitter on throttling, 5xx, timeouts and dropped
//! connections). Request checksums are only sent when an operation requires
//! them: the SDK's default aws-chunked trailing checksums break uploads on
//! several S3-compatible services; walstream's own SHA-256 covers every object
//! end to end instead. Objects larger than the multipart threshold go up in
//! parts. Every request is counted by kind, because on S3 requests are what
//! users pay for.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, ServerSideEncryption, StorageClass,
};
use aws_sdk_s3::Client;

use super::target::S3Target;
use super::{Conditional, ObjectMeta, Storage, StorageError, Version};

/// Lets `get_err` read the HTTP status of a raw response.
trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// Requests made, by kind.
#[derive(Debug, Default)]
pub struct RequestCounts {
    pub put: AtomicU64,
    pub get: AtomicU64,
    pub list: AtomicU64,
    pub delete: AtomicU64,
}

impl RequestCounts {
    /// (put, get, list, delete)
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.put.load(Ordering::Relaxed),
            self.get.load(Ordering::Relaxed),
            self.list.load(Ordering::Relaxed),
            self.delete.load(Ordering::Relaxed),
        )
    }
}

/// Reads a response body into one buffer sized from the response's length:
/// collecting the chunks and then flattening them copied every download
/// twice more.
async fn read_body(
    mut out: aws_sdk_s3::operation::get_object::GetObjectOutput,
) -> Result<Vec<u8>, aws_sdk_s3::primitives::ByteStreamError> {
    // The length is the server's word: reserve at most 64 MiB up front.
    let expected = out.content_length().unwrap_or(0).clamp(0, 64 << 20) as usize;
    let mut buf = Vec::with_capacity(expected);
    while let Some(chunk) = out.body.try_next().await? {
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Objects above this size are uploaded in parts of `part_size`.
pub const DEFAULT_PART_SIZE: usize = 8 << 20;

#[derive(Clone)]
pub struct S3Storage {
    client: Client,
    bucket: String,
    /// Key prefix, empty or ending in `/`.
    prefix: String,
    location: String,
    part_size: usize,
    sse: Option<ServerSideEncryption>,
    sse_kms_key_id: Option<String>,
    storage_class: Option<StorageClass>,
    counts: Arc<RequestCounts>,
    /// Where requests go, for error messages: the endpoint URL, or AWS S3
    /// with its region.
    endpoint: String,
}

/// Where walstream looks for S3 credentials, in order (for the error that
/// says none were found).
pub const CREDENTIAL_SOURCES: &str = "the config (access-key-id and secret-access-key, on the replica or at the top level), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, LITESTREAM_ACCESS_KEY_ID and LITESTREAM_SECRET_ACCESS_KEY, the AWS profile (AWS_PROFILE, ~/.aws/credentials and ~/.aws/config), web identity (AWS_WEB_IDENTITY_TOKEN_FILE), container credentials and instance metadata";

/// Static credentials from the config, else, as Litestream does, from
/// `LITESTREAM_ACCESS_KEY_ID` and `LITESTREAM_SECRET_ACCESS_KEY` when
/// `AWS_ACCESS_KEY_ID` is not set; `None`: the AWS chain.
fn static_credentials(target: &S3Target) -> Option<(String, String)> {
    if let (Some(ak), Some(sk)) = (&target.access_key_id, &target.secret_access_key) {
        return Some((ak.clone(), sk.clone()));
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if var("AWS_ACCESS_KEY_ID").is_some() {
        return None;
    }
    Some((
        var("LITESTREAM_ACCESS_KEY_ID")?,
        var("LITESTREAM_SECRET_ACCESS_KEY")?,
    ))
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("location", &self.location)
            .finish()
    }
}

impl S3Storage {
    /// Builds a client for `target`. Credentials come from the target when
    /// given, else from the standard AWS chain (environment, profile, web
    /// identity, container and instance metadata).
    pub async fn new(target: &S3Target) -> S3Storage {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
        if let Some((ak, sk)) = static_credentials(target) {
            loader = loader.credentials_provider(Credentials::new(
                ak,
                sk,
                None,
                None,
                "walstream-config",
            ));
        }
        if let Some(r) = &target.region {
            loader = loader.region(Region::new(r.clone()));
        }
        let sdk = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(target.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(
                aws_sdk_s3::config::retry::RetryConfig::standard()
                    .with_max_attempts(4)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(60))
                    .build(),
            );
        if sdk.region().is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        let endpoint = match &target.endpoint {
            Some(ep) => ep.clone(),
            None => format!(
                "AWS S3 ({})",
                sdk.region().map_or("us-east-1", |r| r.as_ref())
            ),
        };
        if let Some(ep) = &target.endpoint {
            b = b.endpoint_url(ep.clone());
        }
        let prefix = if target.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", target.prefix.trim_matches('/'))
        };
        S3Storage {
            client: Client::from_conf(b.build()),
            bucket: target.bucket.clone(),
            location: format!("s3://{}/{}", target.bucket, prefix),
            prefix,
            part_size: target.part_size.unwrap_or(DEFAULT_PART_SIZE).max(5 << 20),
            sse: target.sse.as_deref().map(ServerSideEncryption::from),
            sse_kms_key_id: target.sse_kms_key_id.clone(),
            storage_class: target.storage_class.as_deref().map(StorageClass::from),
            counts: Arc::new(RequestCounts::default()),
            endpoint,
        }
    }

    pub fn counts(&self) -> Arc<RequestCounts> {
        self.counts.clone()
    }

    fn get_err<R: std::fmt::Debug + HasStatus + 'static>(
        &self,
        key: &str,
        e: SdkError<aws_sdk_s3::operation::get_object::GetObjectError, R>,
    ) -> StorageError {
        let missing = e.as_service_error().is_some_and(|s| s.is_no_such_key())
            || e.raw_response().is_some_and(|r| r.status_code() == 404);
        if missing {
            StorageError::NotFound {
                location: self.location.clone(),
                key: key.to_string(),
            }
        } else {
            self.err("get", key, e)
        }
    }

    async fn get_object(
        &self,
        key: &str,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, StorageError> {
        self.counts.get.fetch_add(1, Ordering::Relaxed);
        self.client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
            .map_err(|e| self.get_err(key, e))
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A PUT only if the object is absent (`version` `None`: `If-None-Match:
    /// *`) or still at `version` (`If-Match`).
    async fn put_conditional(
        &self,
        op: &'static str,
        key: &str,
        data: Vec<u8>,
        version: Option<&str>,
    ) -> Result<Conditional, StorageError> {
        if version.is_none() && data.len() > self.part_size {
            return self.put_multipart(key, data, true).await;
        }
        self.counts.put.fetch_add(1, Ordering::Relaxed);
        let put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.sse_kms_key_id.clone())
            .set_storage_class(self.storage_class.clone())
            .body(ByteStream::from(data));
        let put = match version {
            None => put.if_none_match("*"),
            Some(v) => put.if_match(v),
        };
        let out = put.send().await;
        self.conditional(op, key, out.map(|o| o.e_tag))
    }

    /// A conditional PUT's outcome: 412 (and 409, which S3 answers to a
    /// conditional write racing another) is a conflict, not a failure.
    fn conditional<E>(
        &self,
        op: &'static str,
        key: &str,
        out: Result<Option<String>, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
    ) -> Result<Conditional, StorageError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match out {
            Ok(etag) => Ok(Conditional::Done(etag.unwrap_or_default())),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                let code = e.code().map(str::to_string);
                if matches!(status, Some(412) | Some(409))
                    || matches!(
                        code.as_deref(),
                        Some("PreconditionFailed") | Some("ConditionalRequestConflict")
                    )
                {
                    Ok(Conditional::Conflict)
                } else {
                    Err(self.err(op, key, e))
                }
            }
        }
    }

    fn err<E, R>(&self, op: &'static str, key: &str, e: SdkError<E, R>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + 'static,
    {
        let message = describe(&e, &self.endpoint);
        StorageError::Backend {
            op,
            location: self.location.clone(),
            key: key.to_string(),
            message: message.replace('\n', " "),
        }
    }

    /// Multipart upload of an object already in memory (`exclusive`: only
    /// if no object is there, `If-None-Match: *` on its completion).
    async fn put_multipart(
        &self,
        key: &str,
        data: Vec<u8>,
        exclusive: bool,
    ) -> Result<Conditional, StorageError> {
        let part_size = self.part_size;
        let mut offset = 0;
        self.put_parts(key, exclusive, move || {
            let end = (offset + part_size).min(data.len());
            let part = (offset < end).then(|| data[offset..end].to_vec());
            offset = end;
            Ok(part)
        })
        .await
    }

    /// Multipart upload of parts taken one at a time from `next_part`, so
    /// only one part is held beyond what the caller holds.
    async fn put_parts(
        &self,
        key: &str,
        exclusive: bool,
        mut next_part: impl FnMut() -> std::io::Result<Option<Vec<u8>>> + Send,
    ) -> Result<Conditional, StorageError> {
        let full = self.key(key);
        self.counts.put.fetch_add(1, Ordering::Relaxed);
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.sse_kms_key_id.clone())
            .set_storage_class(self.storage_class.clone());
        create = create.content_type("application/octet-stream");
        let upload = create.send().await.map_err(|e| self.err("put", key, e))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_string();
        let result = async {
            let mut parts = Vec::new();
            let mut n = 0i32;
            while let Some(chunk) = next_part().map_err(|e| StorageError::Io {
                op: "read upload source for",
                location: self.location.clone(),
                key: key.to_string(),
                source: e,
            })? {
                n += 1;
                self.counts.put.fetch_add(1, Ordering::Relaxed);
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .body(ByteStream::from(chunk))
                    .send()
                    .await
                    .map_err(|e| self.err("put part of", key, e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .build(),
                );
            }
            self.counts.put.fetch_add(1, Ordering::Relaxed);
            let complete = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                );
            if exclusive {
                let out = complete.if_none_match("*").send().await;
                self.conditional("complete upload of", key, out.map(|o| o.e_tag))
            } else {
                complete
                    .send()
                    .await
                    .map(|o| Conditional::Done(o.e_tag.unwrap_or_default()))
                    .map_err(|e| self.err("complete upload of", key, e))
            }
        }
        .await;
        if !matches!(result, Ok(Conditional::Done(_))) {
            self.counts.delete.fetch_add(1, Ordering::Relaxed);
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }
}

/// Downloads whose body breaks off are tried this many times.
const BODY_ATTEMPTS: u32 = 4;

#[async_trait]
impl Storage for S3Storage {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StorageError> {
        if data.len() > self.part_size {
            return self.put_multipart(key, data, false).await.map(|_| ());
        }
        self.counts.put.fetch_add(1, Ordering::Relaxed);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.sse_kms_key_id.clone())
            .set_storage_class(self.storage_class.clone())
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.err("put", key, e))?;
        Ok(())
    }

    async fn create_new(&self, key: &str, data: Vec<u8>) -> Result<Conditional, StorageError> {
        self.put_conditional("create", key, data, None).await
    }

    async fn get_versioned(&self, key: &str) -> Result<(Vec<u8>, Version), StorageError> {
        let out = self.get_object(key).await?;
        let etag = out.e_tag.clone().unwrap_or_default();
        let body = read_body(out).await.map_err(|e| StorageError::Backend {
            op: "get",
            location: self.location.clone(),
            key: key.to_string(),
            message: e.to_string(),
        })?;
        Ok((body, etag))
    }

    async fn replace_if(
        &self,
        key: &str,
        data: Vec<u8>,
        version: &str,
    ) -> Result<Conditional, StorageError> {
        self.put_conditional("replace", key, data, Some(version))
            .await
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        // The SDK retries failed requests, but not a body cut short after the
        // response began: retry those here.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let out = self.get_object(key).await?;
            match read_body(out).await {
                Ok(body) => return Ok(body),
                Err(e) if attempt < BODY_ATTEMPTS => {
                    tracing::debug!(key, error = %e, "download interrupted, retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                }
                Err(e) => {
                    return Err(StorageError::Backend {
                        op: "get",
                        location: self.location.clone(),
                        key: key.to_string(),
                        message: e.to_string(),
                    })
                }
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let full = self.key(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            self.counts.list.fetch_add(1, Ordering::Relaxed);
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.err("list", prefix, e))?;
            for obj in page.contents() {
                let Some(k) = obj.key() else { continue };
                let Some(rel) = k.strip_prefix(&self.prefix) else {
                    continue;
                };
                out.push(ObjectMeta {
                    key: rel.to_string(),
                    size: obj.size().unwrap_or(0).max(0) as u64,
                    modified_ms: obj.last_modified().and_then(|t| t.to_millis().ok()),
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.counts.delete.fetch_add(1, Ordering::Relaxed);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
            .map_err(|e| self.err("delete", key, e))?;
        Ok(())
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        self.upload_file(key, path, false).await.map(|_| ())
    }

    async fn create_new_file(&self, key: &str, path: &Path) -> Result<Conditional, StorageError> {
        self.upload_file(key, path, true).await
    }

    async fn get_file(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        self.download_file(key, path).await
    }
}

impl S3Storage {
    /// Uploads a file, streaming it in parts when large.
    async fn upload_file(
        &self,
        key: &str,
        path: &Path,
        exclusive: bool,
    ) -> Result<Conditional, StorageError> {
        let io = |source| StorageError::Io {
            op: "read upload source for",
            location: self.location.clone(),
            key: key.to_string(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size <= self.part_size as u64 {
            let data = std::fs::read(path).map_err(io)?;
            if exclusive {
                return self.create_new(key, data).await;
            }
            return self
                .put(key, data)
                .await
                .map(|()| Conditional::Done(String::new()));
        }
        let mut file = std::fs::File::open(path).map_err(io)?;
        let part_size = self.part_size;
        self.put_parts(key, exclusive, move || {
            let mut buf = Vec::with_capacity(part_size);
            (&mut file).take(part_size as u64).read_to_end(&mut buf)?;
            Ok((!buf.is_empty()).then_some(buf))
        })
        .await
    }

    async fn download_file(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        let io = |source| StorageError::Io {
            op: "download",
            location: self.location.clone(),
            key: key.to_string(),
            source,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let out = self.get_object(key).await?;
            let expected = out.content_length().map(|n| n as u64);
            let mut file = tokio::fs::File::create(path).await.map_err(io)?;
            let mut body = out.body.into_async_read();
            let copied = tokio::io::copy(&mut body, &mut file).await;
            let short = |n: u64| expected.is_some_and(|e| e != n);
            match copied {
                Ok(n) if !short(n) => {
                    // Read back at once (restore, follow): durability is the
                    // output's business, not this download's.
                    tokio::io::AsyncWriteExt::flush(&mut file)
                        .await
                        .map_err(io)?;
                    return Ok(n);
                }
                Ok(_) | Err(_) if attempt < BODY_ATTEMPTS => {
                    tracing::debug!(key, "download interrupted, retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                }
                Ok(n) => {
                    return Err(io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("body ended after {n} of {} bytes", expected.unwrap_or(0)),
                    )))
                }
                Err(e) => return Err(io(e)),
            }
        }
    }
}

/// One line for a failed request: the service's code and message, with a
/// hint for the usual mistakes; or, when no answer came, what went wrong on
/// the way (no credentials, the endpoint unreachable, a timeout) without
/// the SDK's debug structure.
fn describe<E, R>(e: &SdkError<E, R>, endpoint: &str) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    if let Some(se) = e.as_service_error() {
        let code = se.code().unwrap_or("error");
        let hint = match code {
            "InvalidAccessKeyId" | "SignatureDoesNotMatch" => {
                " (check access-key-id and secret-access-key, or the AWS_* variables)"
            }
            "AccessDenied" => " (the credentials lack permission for this bucket or prefix)",
            "NoSuchBucket" => " (create the bucket, or check the bucket name and endpoint)",
            _ => "",
        };
        return format!("{code}: {}{hint}", se.message().unwrap_or("request failed"));
    }
    // The innermost causes say what happened; the outer ones only wrap.
    let mut causes = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        causes.push(c.to_string());
        cur = c.source();
    }
    let all = causes.join(": ").to_lowercase();
    if all.contains("credential") || all.contains("imds") || all.contains("identity") {
        return format!("no S3 credentials found; walstream looked in {CREDENTIAL_SOURCES}: set access-key-id and secret-access-key in the config, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY");
    }
    let root = causes
        .iter()
        .rev()
        .find(|c| !c.is_empty() && !c.contains("dispatch failure") && !c.contains("io error"))
        .cloned()
        .unwrap_or_default();
    match e {
        SdkError::TimeoutError(_) => format!("timed out talking to {endpoint}"),
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            format!("timed out talking to {endpoint}: {root}")
        }
        SdkError::DispatchFailure(_) => {
            format!("cannot reach {endpoint}: {root} (check the endpoint and the network)")
        }
        SdkError::ResponseError(_) => format!("unreadable response from {endpoint}: {root}"),
        _ => format!("request to {endpoint} failed: {root}"),
    }
}
