//! The one interface between walstream and where replicas live.
//!
//! Everything the engine and restore need from storage is four operations on
//! flat keys (`a/b/c`): put a whole object, get it, list keys under a prefix,
//! delete. Keeping the interface this small is what lets a directory, memory
//! and S3 back the same engine, and lets one conformance suite
//! (`tests/common/conformance.rs`) hold every backend to the same contract:
//!
//! * `put` is atomic: readers see the old object, or the whole new one, never a
//!   part of it, even if the process dies mid-write.
//! * `get` of a missing key is `StorageError::NotFound`.
//! * `list` is recursive, sorted by key, and never shows temporary objects.
//! * `delete` of a missing key succeeds.
//!
//! Leases (`lease`) need more, conditional on an object's version, which a
//! backend may not offer (then `StorageError::Unsupported`): `create_new`
//! and `create_new_file` (only if absent: a lease holder creates every
//! object this way, so a process that lost its lease cannot overwrite what
//! the next holder wrote), `get_versioned`, and `replace_if` (only if
//! unchanged since that version).

pub mod file;
pub mod memory;
pub mod metered;
pub mod s3;
pub mod target;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

pub use file::FileStorage;
pub use memory::MemoryStorage;
pub use metered::Metered;
pub use s3::S3Storage;

/// An object found by `list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// When the storage last wrote the object, by the storage's own clock
    /// (a file's mtime, set by the kernel; S3's `LastModified`, set by the
    /// server), in ms since the epoch. Retention measures age with it, so a
    /// writer whose clock is off cannot make recent objects look old.
    pub modified_ms: Option<i64>,
}

/// Errors from a storage backend. Every variant names the object or location.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {key} not found in {location}")]
    NotFound { location: String, key: String },
    #[error("{op} {key} in {location}: {source}")]
    Io {
        op: &'static str,
        location: String,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {key} in {location}: this storage does not support conditional writes")]
    Unsupported {
        op: &'static str,
        location: String,
        key: String,
    },
    #[error("{op} {key} in {location}: {message}")]
    Backend {
        op: &'static str,
        location: String,
        key: String,
        message: String,
    },
}

impl StorageError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }
}

/// An object's version for conditional writes (S3: its ETag).
pub type Version = String;

/// The outcome of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conditional {
    /// Written; the object's new version.
    Done(Version),
    /// Not written: the object exists (`create_new`) or changed or is gone
    /// (`replace_if`).
    Conflict,
}

/// A place objects are stored.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Stores `data` under `key`, atomically replacing any existing object.
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StorageError>;
    /// Returns the whole object.
    async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError>;
    /// All objects whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError>;
    /// Removes an object; removing a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
    /// Where this storage is, for messages (never includes credentials).
    fn location(&self) -> String;

    /// Stores the file at `path` under `key`. Backends that can, stream it, so
    /// objects of any size (snapshots of large databases) need bounded memory.
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let data = self.read_source(key, path).await?;
        self.put(key, data).await
    }

    /// The object's path on the local filesystem, when the backend keeps
    /// objects as plain files: restore then reads large objects in place
    /// instead of copying them first.
    fn local_path(&self, _key: &str) -> Option<std::path::PathBuf> {
        None
    }

    /// Stores `data` under `key` only if no object is there.
    async fn create_new(&self, key: &str, _data: Vec<u8>) -> Result<Conditional, StorageError> {
        Err(self.unsupported("create", key))
    }

    /// Stores the file at `path` under `key` only if no object is there.
    async fn create_new_file(&self, key: &str, path: &Path) -> Result<Conditional, StorageError> {
        let data = self.read_source(key, path).await?;
        self.create_new(key, data).await
    }

    /// The object and its version.
    async fn get_versioned(&self, key: &str) -> Result<(Vec<u8>, Version), StorageError> {
        Err(self.unsupported("get", key))
    }

    /// Replaces the object at `key` only if its version is still `version`.
    async fn replace_if(
        &self,
        key: &str,
        _data: Vec<u8>,
        _version: &str,
    ) -> Result<Conditional, StorageError> {
        Err(self.unsupported("replace", key))
    }

    /// The file to upload under `key`, read whole (backends that stream
    /// do not call this).
    async fn read_source(&self, key: &str, path: &Path) -> Result<Vec<u8>, StorageError> {
        tokio::fs::read(path)
            .await
            .map_err(|source| StorageError::Io {
                op: "read upload source for",
                location: self.location(),
                key: key.to_string(),
                source,
            })
    }

    fn unsupported(&self, op: &'static str, key: &str) -> StorageError {
        StorageError::Unsupported {
            op,
            location: self.location(),
            key: key.to_string(),
        }
    }

    /// The replica's encryption keys (see `encryption`): objects are
    /// sealed and opened with them as they are encoded and decoded.
    fn keys(&self) -> Option<std::sync::Arc<crate::encryption::Keys>> {
        None
    }

    /// Downloads an object into a new file at `path`, returning its size.
    async fn get_file(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        let data = self.get(key).await?;
        tokio::fs::write(path, &data)
            .await
            .map_err(|source| StorageError::Io {
                op: "write download of",
                location: self.location(),
                key: key.to_string(),
                source,
            })?;
        Ok(data.len() as u64)
    }
}

pub use target::{ReplicaTarget, S3Target};

pub type DynStorage = Arc<dyn Storage>;

/// Opens the backend a replica target names. Nothing is contacted yet.
pub async fn open(target: &ReplicaTarget) -> DynStorage {
    match target {
        ReplicaTarget::File { path } => Arc::new(FileStorage::new(path.clone())),
        ReplicaTarget::S3(s3) => {
            if s3.skip_verify {
                tracing::warn!(replica = %target, "skip-verify is not supported; TLS certificates are verified");
            }
            Arc::new(S3Storage::new(s3).await)
        }
    }
}
