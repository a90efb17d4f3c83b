//! An in-memory backend: the reference implementation of the storage contract
//! and a fast stand-in for unit tests of code above storage.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Conditional, ObjectMeta, Storage, StorageError, Version};

#[derive(Debug, Default)]
pub struct MemoryStorage {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Versions of objects written by conditional writes (a counter).
    versions: Mutex<BTreeMap<String, u64>>,
}

impl MemoryStorage {
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StorageError> {
        self.objects.lock().unwrap().insert(key.to_string(), data);
        *self
            .versions
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default() += 1;
        Ok(())
    }

    async fn create_new(&self, key: &str, data: Vec<u8>) -> Result<Conditional, StorageError> {
        let mut objects = self.objects.lock().unwrap();
        if objects.contains_key(key) {
            return Ok(Conditional::Conflict);
        }
        objects.insert(key.to_string(), data);
        let mut versions = self.versions.lock().unwrap();
        let v = versions.entry(key.to_string()).or_default();
        *v += 1;
        Ok(Conditional::Done(v.to_string()))
    }

    async fn get_versioned(&self, key: &str) -> Result<(Vec<u8>, Version), StorageError> {
        let data = self.get(key).await?;
        let v = self.versions.lock().unwrap().get(key).copied().unwrap_or(0);
        Ok((data, v.to_string()))
    }

    async fn replace_if(
        &self,
        key: &str,
        data: Vec<u8>,
        version: &str,
    ) -> Result<Conditional, StorageError> {
        let mut objects = self.objects.lock().unwrap();
        let mut versions = self.versions.lock().unwrap();
        let current = versions.get(key).copied().unwrap_or(0).to_string();
        if !objects.contains_key(key) || current != version {
            return Ok(Conditional::Conflict);
        }
        objects.insert(key.to_string(), data);
        let v = versions.entry(key.to_string()).or_default();
        *v += 1;
        Ok(Conditional::Done(v.to_string()))
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        self.objects
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .ok_or_else(|| StorageError::NotFound {
                location: self.location(),
                key: key.to_string(),
            })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
                modified_ms: None,
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }

    fn location(&self) -> String {
        "memory://".to_string()
    }
}
