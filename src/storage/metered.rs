//! Counting requests on the way to any backend.
//!
//! The engine never knows which backend it talks to, so request metrics are
//! taken here, around the trait, rather than inside each backend: the same
//! counts for a directory, memory or S3.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use super::{DynStorage, ObjectMeta, Storage, StorageError};
use crate::metrics::ReplicaStatus;

#[derive(Debug)]
pub struct Metered {
    inner: DynStorage,
    status: Arc<ReplicaStatus>,
}

impl Metered {
    pub fn wrap(inner: DynStorage, status: Arc<ReplicaStatus>) -> DynStorage {
        Arc::new(Metered { inner, status })
    }

    fn count<T>(&self, kind: &str, r: Result<T, StorageError>) -> Result<T, StorageError> {
        // A missing object is an answer, not a failed request.
        let ok = match &r {
            Ok(_) => true,
            Err(e) => e.is_not_found(),
        };
        self.status.request(kind, ok);
        r
    }
}

#[async_trait]
impl Storage for Metered {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StorageError> {
        let r = self.inner.put(key, data).await;
        self.count("put", r)
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let r = self.inner.get(key).await;
        self.count("get", r)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let r = self.inner.list(prefix).await;
        self.count("list", r)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let r = self.inner.delete(key).await;
        self.count("delete", r)
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let r = self.inner.put_file(key, path).await;
        self.count("put", r)
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.inner.local_path(key)
    }

    fn keys(&self) -> Option<std::sync::Arc<crate::encryption::Keys>> {
        self.inner.keys()
    }

    async fn get_file(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        let r = self.inner.get_file(key, path).await;
        self.count("get", r)
    }
}
