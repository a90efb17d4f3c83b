//! The source database as walstream sees it: a file it opens (never writes
//! rows into), a WAL beside it, and read transactions it uses as locks.
//!
//! walstream's read transaction is what keeps SQLite from resetting the WAL
//! over frames that are not shipped yet: while any reader uses the WAL no
//! writer may rewind it, and a reader that started when the WAL was fully
//! checkpointed ("read mark 0") blocks every checkpoint from copying frames
//! into the database file. See `replicate` for how the lock is moved forward
//! without a gap.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{config::DbConfig, Connection, OpenFlags};

use crate::error::{Error, IoContext, Result, SqlContext};
use crate::wal::{self, WalCursor};

/// Path of the WAL file of `db`.
pub fn wal_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

/// Checks that the directory holding `db` exists and can be read. A missing
/// database file is fine (it is waited for); a missing directory is not.
pub fn check_directory(db: &Path) -> Result<()> {
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let meta = std::fs::metadata(&dir).map_err(|e| Error::Database {
        path: db.to_path_buf(),
        message: if e.kind() == ErrorKind::NotFound {
            format!("directory {} does not exist", dir.display())
        } else {
            format!("cannot access directory {}: {e}", dir.display())
        },
    })?;
    if !meta.is_dir() {
        return Err(Error::Database {
            path: db.to_path_buf(),
            message: format!("{} is not a directory", dir.display()),
        });
    }
    std::fs::read_dir(&dir).io_ctx("read directory", &dir)?;
    Ok(())
}

/// Opens a connection walstream uses for locking and checkpointing. It never
/// creates the file and never checkpoints on close (so stopping walstream
/// leaves the WAL in place and a restart can prove continuity).
pub fn open_connection(db: &Path, busy_timeout: Duration) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(db, flags).db_ctx(db)?;
    conn.busy_timeout(busy_timeout).db_ctx(db)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .db_ctx(db)?;
    Ok(conn)
}

/// Puts the database in WAL mode if it is not already, and returns its page
/// size. Refuses a database whose journal mode cannot be changed.
pub fn ensure_wal(conn: &Connection, db: &Path) -> Result<u32> {
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                Error::Database {
                    path: db.to_path_buf(),
                    message: format!("cannot check or switch to WAL mode: {e}"),
                }
            }
            _ => sql_message(db, e),
        })?;
    if !mode.eq_ignore_ascii_case("wal") {
        let new: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| Error::Database {
                path: db.to_path_buf(),
                message: format!("cannot switch journal mode from {mode} to WAL: {e}"),
            })?;
        if !new.eq_ignore_ascii_case("wal") {
            return Err(Error::Database {
                path: db.to_path_buf(),
                message: format!("cannot switch journal mode from {mode} to WAL (still {new})"),
            });
        }
        tracing::info!(db = %db.display(), from = %mode, "switched database to WAL mode");
    }
    let page_size: u32 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .db_ctx(db)?;
    Ok(page_size)
}

fn sql_message(db: &Path, e: rusqlite::Error) -> Error {
    Error::Database {
        path: db.to_path_buf(),
        message: e.to_string(),
    }
}

/// Starts a read transaction and makes SQLite actually take its read lock.
pub fn begin_read(conn: &Connection, db: &Path) -> Result<()> {
    conn.execute_batch("BEGIN DEFERRED").db_ctx(db)?;
    let r = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
        r.get::<_, i64>(0)
    });
    if let Err(e) = r {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(sql_message(db, e));
    }
    Ok(())
}

/// Ends the read transaction started by `begin_read`.
pub fn end_read(conn: &Connection, db: &Path) -> Result<()> {
    if !conn.is_autocommit() {
        conn.execute_batch("COMMIT").db_ctx(db)?;
    }
    Ok(())
}

/// Result of `PRAGMA wal_checkpoint`.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointResult {
    pub busy: bool,
    pub log_frames: i64,
    pub checkpointed: i64,
}

pub fn checkpoint(conn: &Connection, db: &Path, mode: &str) -> Result<CheckpointResult> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok(CheckpointResult {
            busy: r.get::<_, i64>(0)? != 0,
            log_frames: r.get(1)?,
            checkpointed: r.get(2)?,
        })
    })
    .db_ctx(db)
}

/// What a snapshot image consists of: the database size and the WAL pages
/// that override the database file (bounded by the WAL, not the database).
pub struct ImagePlan {
    pub db_pages: u32,
    page_size: u32,
    wal_pages: std::collections::BTreeMap<u32, Vec<u8>>,
}

/// Plans the database image as of `cursor` (or of the database file alone
/// when there is no WAL): WAL frames up to the cursor override the database
/// file. The caller must hold a read transaction whose snapshot is at or
/// before `cursor`, so the checkpointer cannot change any page that will be
/// read from the database file.
pub fn image_plan(db: &Path, page_size: u32, cursor: Option<&WalCursor>) -> Result<ImagePlan> {
    let (wal_pages, wal_db_pages) = match cursor {
        Some(c) if c.offset > wal::WAL_HEADER_SIZE => {
            let wal_path = wal_path(db);
            let mut f = File::open(&wal_path).io_ctx("open", &wal_path)?;
            let header = wal::read_header(&mut f)
                .io_ctx("read", &wal_path)?
                .filter(|h| h.salt1 == c.salt1 && h.salt2 == c.salt2)
                .ok_or_else(|| Error::Database {
                    path: wal_path.clone(),
                    message: "WAL changed while taking a snapshot".into(),
                })?;
            let (committed, end) = wal::read_committed(&mut f, &header.start(), Some(c.offset))
                .io_ctx("read", &wal_path)?;
            if end != *c {
                return Err(Error::Database {
                    path: wal_path,
                    message: "WAL no longer matches the shipped position".into(),
                });
            }
            (committed.pages, Some(committed.db_pages))
        }
        _ => (Default::default(), None),
    };
    let db_pages = match wal_db_pages {
        Some(n) => n,
        None => {
            let mut file = File::open(db).io_ctx("open", db)?;
            let len = file.metadata().io_ctx("stat", db)?.len();
            header_db_pages(&mut file, page_size, len).io_ctx("read", db)?
        }
    };
    Ok(ImagePlan {
        db_pages,
        page_size,
        wal_pages,
    })
}

impl ImagePlan {
    /// Streams the image, page by page, into `out`.
    pub fn write_to(&self, db: &Path, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let ps = self.page_size as usize;
        let file = File::open(db)?;
        let len = file.metadata()?.len();
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut page = vec![0u8; ps];
        for pgno in 1..=self.db_pages {
            let at = (pgno as u64 - 1) * ps as u64;
            // Keep the reader in step even for pages taken from the WAL.
            page.fill(0);
            if at < len {
                let n = (len - at).min(ps as u64) as usize;
                reader.read_exact(&mut page[..n])?;
            }
            match self.wal_pages.get(&pgno) {
                Some(p) => out.write_all(p)?,
                None => out.write_all(&page)?,
            }
        }
        Ok(())
    }
}

/// Database size in pages from the file header when it is valid, else from
/// the file length.
fn header_db_pages(file: &mut File, page_size: u32, file_len: u64) -> std::io::Result<u32> {
    let by_len = (file_len / page_size as u64) as u32;
    if file_len < 100 {
        return Ok(by_len);
    }
    let mut h = [0u8; 100];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut h)?;
    let change = wal::be32(&h[24..28]);
    let size = wal::be32(&h[28..32]);
    let valid_for = wal::be32(&h[92..96]);
    if size > 0 && change == valid_for && size <= by_len {
        Ok(size)
    } else {
        Ok(by_len)
    }
}
