//! The library's error type. Every variant names the file, key or object at
//! fault so that the CLI can print one line a user can act on.

use std::path::PathBuf;

use crate::format::FormatError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("object {key} in replica {location} is encrypted with age: reading it needs an identity (the replica's `age: identities`, or --age-identity FILE)")]
    Encrypted { location: String, key: String },
    #[error("object {key} in {location} is corrupt: {source}")]
    Corrupt {
        location: String,
        key: String,
        #[source]
        source: FormatError,
    },
    #[error("object {key} in {location}: {message}")]
    BadObject {
        location: String,
        key: String,
        message: String,
    },
    #[error("missing object {key} in {location}: {message}")]
    Missing {
        location: String,
        key: String,
        message: String,
    },
    #[error("no generations found in replica {location}")]
    NoGeneration { location: String },
    #[error("database {path}: {message}")]
    Database { path: PathBuf, message: String },
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The database's name now points at another file: replication of this
    /// file must start over.
    #[error("database {}: the file was replaced by another one", path.display())]
    Replaced { path: PathBuf },
    /// What walstream holds no longer provably matches the database (its
    /// own connection reports corruption, or the WAL changed in a way its
    /// read lock rules out): nothing more may be shipped into the current
    /// generation; replication starts over with a new one.
    #[error("database {}: continuity lost: {reason}", path.display())]
    ContinuityLost { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    /// At shutdown, some replicas did not receive everything committed (each
    /// is named in its own log line).
    #[error("{count} of {total} replicas did not receive everything committed before stopping")]
    NotShipped { count: usize, total: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds the path and operation to an I/O error.
pub trait IoContext<T> {
    fn io_ctx(self, op: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_ctx(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Adds the database path to a SQLite error.
pub trait SqlContext<T> {
    fn db_ctx(self, path: &std::path::Path) -> Result<T>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    fn db_ctx(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Sqlite {
            path: path.to_path_buf(),
            source,
        })
    }
}
