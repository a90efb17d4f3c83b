//! The directory backend (`file:///path` or a plain path).
//!
//! Objects are files under the root directory, one per key. A put writes a
//! hidden temporary file in the target directory, fsyncs it, renames it into
//! place and fsyncs the directory, so a crash leaves either the old object or
//! the complete new one; temporary files are never listed.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{Conditional, ObjectMeta, Storage, StorageError};

/// Directory objects have no versions: an exclusive create either made the
/// file or found one.
fn created(done: bool) -> Conditional {
    if done {
        Conditional::Done(String::new())
    } else {
        Conditional::Conflict
    }
}

#[derive(Debug, Clone)]
pub struct FileStorage {
    root: PathBuf,
}

impl FileStorage {
    pub fn new(root: impl Into<PathBuf>) -> FileStorage {
        FileStorage { root: root.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".." || c.starts_with('.'))
        {
            return Err(StorageError::Backend {
                op: "resolve",
                location: self.location(),
                key: key.to_string(),
                message: "invalid object key".into(),
            });
        }
        Ok(self.root.join(key))
    }

    fn io(&self, op: &'static str, key: &str, source: std::io::Error) -> StorageError {
        if source.kind() == ErrorKind::NotFound && op == "get" {
            return StorageError::NotFound {
                location: self.location(),
                key: key.to_string(),
            };
        }
        StorageError::Io {
            op,
            location: self.location(),
            key: key.to_string(),
            source,
        }
    }
}

enum Source<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// Writes the object through a temporary file. `exclusive`: only if no
/// object is there (a hard link, which fails when the name exists, instead
/// of a rename, which replaces it); returns whether it was written.
fn put_blocking(path: &Path, data: Source<'_>, exclusive: bool) -> std::io::Result<bool> {
    let dir = path.parent().expect("object path has a parent");
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{:08x}", rand::random::<u32>()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        match data {
            Source::Bytes(b) => f.write_all(b)?,
            Source::File(src) => {
                std::io::copy(&mut std::fs::File::open(src)?, &mut f)?;
            }
        }
        f.sync_all()?;
        if exclusive {
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => std::fs::remove_file(&tmp)?,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    std::fs::remove_file(&tmp)?;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        } else {
            std::fs::rename(&tmp, path)?;
        }
        std::fs::File::open(dir)?.sync_all()?;
        Ok(true)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn mtime_ms(m: &std::fs::Metadata) -> Option<i64> {
    let t = m.modified().ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64)
}

fn list_blocking(root: &Path, prefix: &str) -> std::io::Result<Vec<ObjectMeta>> {
    // Start at the deepest directory named by the prefix.
    let (dir_part, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
    let start = if dir_part.is_empty() {
        root.to_path_buf()
    } else {
        root.join(dir_part)
    };
    let mut out = Vec::new();
    match std::fs::metadata(root) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
        Ok(m) if !m.is_dir() => {
            return Err(std::io::Error::new(
                ErrorKind::NotADirectory,
                "replica path is not a directory",
            ))
        }
        Ok(_) => {}
    }
    let mut stack = vec![start];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::NotADirectory => {
                continue
            }
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let ft = entry.file_type()?;
            let path = entry.path();
            let key = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .replace(std::path::MAIN_SEPARATOR, "/");
            if ft.is_dir() {
                let as_dir = format!("{key}/");
                if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                    stack.push(path);
                }
            } else if ft.is_file() && key.starts_with(prefix) {
                let m = entry.metadata()?;
                out.push(ObjectMeta {
                    key,
                    size: m.len(),
                    modified_ms: mtime_ms(&m),
                });
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

#[async_trait]
impl Storage for FileStorage {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StorageError> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || put_blocking(&path, Source::Bytes(&data), false))
            .await
            .expect("put task")
            .map(|_| ())
            .map_err(|e| self.io("put", key, e))
    }

    async fn create_new(&self, key: &str, data: Vec<u8>) -> Result<Conditional, StorageError> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || put_blocking(&path, Source::Bytes(&data), true))
            .await
            .expect("put task")
            .map(created)
            .map_err(|e| self.io("put", key, e))
    }

    async fn create_new_file(&self, key: &str, src: &Path) -> Result<Conditional, StorageError> {
        let path = self.path(key)?;
        let src = src.to_path_buf();
        tokio::task::spawn_blocking(move || put_blocking(&path, Source::File(&src), true))
            .await
            .expect("put task")
            .map(created)
            .map_err(|e| self.io("put", key, e))
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let path = self.path(key)?;
        tokio::fs::read(&path)
            .await
            .map_err(|e| self.io("get", key, e))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let root = self.root.clone();
        let p = prefix.to_string();
        tokio::task::spawn_blocking(move || list_blocking(&root, &p))
            .await
            .expect("list task")
            .map_err(|e| self.io("list", prefix, e))
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("delete", key, e)),
        }
    }

    fn location(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn put_file(&self, key: &str, src: &Path) -> Result<(), StorageError> {
        let path = self.path(key)?;
        let src = src.to_path_buf();
        tokio::task::spawn_blocking(move || put_blocking(&path, Source::File(&src), false))
            .await
            .expect("put task")
            .map(|_| ())
            .map_err(|e| self.io("put", key, e))
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.path(key).ok().filter(|p| p.is_file())
    }

    async fn get_file(&self, key: &str, dest: &Path) -> Result<u64, StorageError> {
        let path = self.path(key)?;
        tokio::fs::copy(&path, dest)
            .await
            .map_err(|e| self.io("get", key, e))
    }
}
