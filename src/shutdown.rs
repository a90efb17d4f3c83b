//! Ending on time: the process-wide stop request and its deadline.
//!
//! A stop is a *state*, not a message: once [`Shutdown::begin`] has run, every
//! replicator, every retry loop and every wait asks [`Shutdown::requested`]
//! before waiting again, so no loop can swallow the request and carry on.
//! The `Control::Shutdown` message a worker also gets only wakes it early.
//!
//! Every storage call of the daemon goes through [`Bounded`], which ends a
//! call still running at the deadline (a request the AWS SDK keeps retrying,
//! or one a dead server never answers) and fails new calls at once after it.
//! What cannot be cut this way (a blocking SQLite or file call) is bounded by
//! the daemon itself, which waits for its workers only until the deadline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::storage::{DynStorage, ObjectMeta, Storage, StorageError};

/// The stop request shared by the daemon and its workers.
#[derive(Debug)]
pub struct Shutdown {
    /// `None` until the stop begins; then when the last shipment must end.
    deadline: watch::Sender<Option<Instant>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            deadline: watch::Sender::new(None),
        }
    }
}

impl Shutdown {
    pub fn new() -> Arc<Shutdown> {
        Arc::new(Shutdown::default())
    }

    /// Starts the stop with `timeout` from now for the last shipment. Only
    /// the first call sets the deadline; every call returns it.
    pub fn begin(&self, timeout: Duration) -> Instant {
        let mut deadline = None;
        self.deadline.send_if_modified(|d| {
            let set = d.is_none();
            let at = *d.get_or_insert_with(|| Instant::now() + timeout);
            deadline = Some(at);
            set
        });
        deadline.expect("set above")
    }

    /// Whether a stop has begun.
    pub fn requested(&self) -> bool {
        self.deadline.borrow().is_some()
    }

    pub fn deadline(&self) -> Option<Instant> {
        *self.deadline.borrow()
    }

    /// Time left until the deadline (`None` before a stop began).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        self.remaining().is_some_and(|r| r.is_zero())
    }

    /// Resolves once a stop has begun.
    pub async fn begun(&self) {
        let mut rx = self.deadline.subscribe();
        while rx.borrow_and_update().is_none() {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves once a stop has begun and its deadline has passed.
    pub async fn expiry(&self) {
        let mut rx = self.deadline.subscribe();
        loop {
            let deadline = *rx.borrow_and_update();
            if let Some(d) = deadline {
                tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await;
                return;
            }
            if rx.changed().await.is_err() {
                // Cannot happen while `self` lives; never resolve.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A storage whose calls end by the shutdown deadline.
#[derive(Debug)]
pub struct Bounded {
    inner: DynStorage,
    stop: Arc<Shutdown>,
}

impl Bounded {
    pub fn wrap(inner: DynStorage, stop: Arc<Shutdown>) -> DynStorage {
        Arc::new(Bounded { inner, stop })
    }

    async fn bound<T>(
        &self,
        op: &'static str,
        key: &str,
        call: impl std::future::Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        if self.stop.expired() {
            return Err(self.cut(op, key));
        }
        tokio::select! {
            r = call => r,
            _ = self.stop.expiry() => Err(self.cut(op, key)),
        }
    }

    fn cut(&self, op: &'static str, key: &str) -> StorageError {
        StorageError::Backend {
            op,
            location: self.inner.location(),
            key: key.to_string(),
            message: "not done by the shutdown deadline (shutdown-timeout)".into(),
        }
    }
}

#[async_trait]
impl Storage for Bounded {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StorageError> {
        self.bound("put", key, self.inner.put(key, data)).await
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        self.bound("get", key, self.inner.get(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        self.bound("list", prefix, self.inner.list(prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.bound("delete", key, self.inner.delete(key)).await
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        self.bound("put", key, self.inner.put_file(key, path)).await
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.inner.local_path(key)
    }

    fn keys(&self) -> Option<std::sync::Arc<crate::encryption::Keys>> {
        self.inner.keys()
    }

    async fn get_file(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        self.bound("get", key, self.inner.get_file(key, path)).await
    }
    async fn create_new(
        &self,
        key: &str,
        data: Vec<u8>,
    ) -> Result<crate::storage::Conditional, StorageError> {
        self.bound("create", key, self.inner.create_new(key, data))
            .await
    }

    async fn create_new_file(
        &self,
        key: &str,
        path: &Path,
    ) -> Result<crate::storage::Conditional, StorageError> {
        self.bound("create", key, self.inner.create_new_file(key, path))
            .await
    }

    async fn get_versioned(
        &self,
        key: &str,
    ) -> Result<(Vec<u8>, crate::storage::Version), StorageError> {
        self.bound("get", key, self.inner.get_versioned(key)).await
    }

    async fn replace_if(
        &self,
        key: &str,
        data: Vec<u8>,
        version: &str,
    ) -> Result<crate::storage::Conditional, StorageError> {
        self.bound("replace", key, self.inner.replace_if(key, data, version))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    /// A storage whose puts never finish.
    #[derive(Debug)]
    struct Hang(MemoryStorage);

    #[async_trait]
    impl Storage for Hang {
        async fn put(&self, _: &str, _: Vec<u8>) -> Result<(), StorageError> {
            std::future::pending().await
        }
        async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
            self.0.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
            self.0.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.0.delete(key).await
        }
        fn location(&self) -> String {
            "hang".into()
        }
    }

    #[test]
    fn begin_is_sticky_and_keeps_the_first_deadline() {
        let s = Shutdown::new();
        assert!(!s.requested() && !s.expired() && s.remaining().is_none());
        let first = s.begin(Duration::from_secs(60));
        assert!(s.requested() && !s.expired());
        assert_eq!(s.begin(Duration::ZERO), first);
        assert_eq!(s.deadline(), Some(first));
    }

    #[tokio::test]
    async fn calls_end_at_the_deadline() {
        let stop = Shutdown::new();
        let s = Bounded::wrap(Arc::new(Hang(MemoryStorage::new())), stop.clone());
        // Before a stop nothing is cut.
        assert!(s.list("").await.unwrap().is_empty());
        let call = tokio::spawn({
            let s = s.clone();
            async move { s.put("k", vec![1]).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let began = Instant::now();
        stop.begin(Duration::from_millis(100));
        let e = call.await.unwrap().unwrap_err();
        assert!(began.elapsed() < Duration::from_secs(2));
        assert!(e.to_string().contains("shutdown-timeout"), "{e}");
        // After the deadline, calls fail at once.
        assert!(s.list("").await.is_err());
    }
}
