//! Where a replica lives: a directory or an S3-compatible bucket and prefix,
//! as given in a config file or a replica URL. The storage backends are
//! opened from these (see `storage::open`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::units::parse_duration;

/// The replica URL schemes walstream reads (for error messages).
pub const SUPPORTED_SCHEMES: &str = "file://, s3://";

/// Where a replica lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaTarget {
    File { path: PathBuf },
    S3(Box<S3Target>),
}

#[derive(Clone, PartialEq, Eq)]
pub struct S3Target {
    pub bucket: String,
    /// Key prefix without leading or trailing slash.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub force_path_style: bool,
    pub skip_verify: bool,
    /// Server-side encryption: `AES256` or `aws:kms`.
    pub sse: Option<String>,
    pub sse_kms_key_id: Option<String>,
    pub storage_class: Option<String>,
    /// Multipart part size in bytes.
    pub part_size: Option<usize>,
    /// Parallel downloads during restore.
    pub concurrency: Option<usize>,
    /// Minimum time between two uploads (Litestream's `sync-interval`).
    pub sync_interval: Option<Duration>,
}

impl S3Target {
    pub fn new(bucket: &str, prefix: &str) -> S3Target {
        S3Target {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            force_path_style: false,
            skip_verify: false,
            sse: None,
            sse_kms_key_id: None,
            storage_class: None,
            part_size: None,
            concurrency: None,
            sync_interval: None,
        }
    }
}

impl std::fmt::Debug for S3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials, not even in debug output.
        f.debug_struct("S3Target")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("force_path_style", &self.force_path_style)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for ReplicaTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaTarget::File { path } => write!(f, "file://{}", path.display()),
            ReplicaTarget::S3(s) if s.prefix.is_empty() => write!(f, "s3://{}", s.bucket),
            ReplicaTarget::S3(s) => write!(f, "s3://{}/{}", s.bucket, s.prefix),
        }
    }
}

impl ReplicaTarget {
    /// The same kind of target one level down, at `rel` (a relative path).
    pub fn join(&self, rel: &Path) -> ReplicaTarget {
        match self {
            ReplicaTarget::File { path } => ReplicaTarget::File {
                path: path.join(rel),
            },
            ReplicaTarget::S3(s3) => {
                let mut s3 = s3.clone();
                let rel = rel.to_string_lossy();
                s3.prefix = if s3.prefix.is_empty() {
                    rel.to_string()
                } else {
                    format!("{}/{rel}", s3.prefix)
                };
                ReplicaTarget::S3(s3)
            }
        }
    }

    /// Parses `file:///dir`, a plain path, or
    /// `s3://bucket/prefix?endpoint=..&region=..&forcePathStyle=true`.
    pub fn parse_url(s: &str) -> Result<ReplicaTarget, String> {
        if let Some(rest) = s.strip_prefix("file://") {
            if rest.is_empty() {
                return Err("file:// URL has no path".into());
            }
            return Ok(ReplicaTarget::File {
                path: PathBuf::from(rest),
            });
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (loc, query) = rest.split_once('?').unwrap_or((rest, ""));
            let (bucket, prefix) = loc.split_once('/').unwrap_or((loc, ""));
            if bucket.is_empty() {
                return Err("s3:// URL has no bucket".into());
            }
            let mut t = S3Target::new(bucket, prefix);
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
                match k {
                    "endpoint" => t.endpoint = Some(v.to_string()),
                    "region" => t.region = Some(v.to_string()),
                    "forcePathStyle" | "force-path-style" => t.force_path_style = v == "true",
                    "skipVerify" | "skip-verify" => t.skip_verify = v == "true",
                    "syncInterval" | "sync-interval" => t.sync_interval = Some(parse_duration(v)?),
                    other => return Err(format!("unknown S3 URL parameter {other:?}")),
                }
            }
            return Ok(ReplicaTarget::S3(Box::new(t)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "unsupported replica scheme {scheme}:// (supported: {SUPPORTED_SCHEMES})"
            ));
        }
        // `s3:/bucket`, `file:/dir`: a URL with a slash missing, not a
        // directory named `s3:`.
        if let Some((scheme, rest)) = s.split_once(':') {
            let looks_like_scheme = !scheme.is_empty()
                && scheme.len() < 10
                && scheme.bytes().all(|b| b.is_ascii_alphanumeric())
                && !scheme.contains('/')
                && (rest.is_empty() || rest.starts_with('/'));
            if looks_like_scheme {
                let path = rest.trim_start_matches('/');
                return Err(format!(
                    "{s:?} is not a valid replica URL: write {scheme}://{path} (supported: {SUPPORTED_SCHEMES}, or a plain directory path)"
                ));
            }
        }
        if s.is_empty() {
            return Err("empty replica path".into());
        }
        Ok(ReplicaTarget::File {
            path: PathBuf::from(s),
        })
    }
}
