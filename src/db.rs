//! The source database as walstream sees it: a file it opens (never writes
//! rows into), a WAL beside it, and read transactions it uses as locks.
//!
//! walstream's read transaction is what keeps SQLite from resetting the WAL
//! over frames that are not shipped yet: while any reader uses the WAL no
//! writer may rewind it, and a reader that started when the WAL was fully
//! checkpointed ("read mark 0") blocks every checkpoint from copying frames
//! into the database file. See `replicate` for how the lock is moved forward
//! without a gap.
//!
//! That protection also rests on the SHARED lock SQLite keeps on the
//! database file (a POSIX lock): without it another process's last
//! connection takes the EXCLUSIVE lock when it closes, checkpoints, and
//! deletes the WAL. Closing any descriptor of the file drops all of the
//! process's POSIX locks on it, so the file is opened once per process, by
//! `DbFile`, and everything that reads it or connects to it goes through
//! that one handle (see `DbFile` for the rule).

use std::collections::HashMap;
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
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

/// (device, inode) of a file: what POSIX locks are attached to.
pub type FileId = (u64, u64);

/// The id of the file `path` names now.
pub fn file_id(path: &Path) -> Result<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).io_ctx("stat", path)?;
    Ok((m.dev(), m.ino()))
}

/// Every open database file of the process, by file id. Opening and
/// closing descriptors happens only under this lock (see `DbFile`).
fn registry() -> MutexGuard<'static, HashMap<FileId, Arc<OpenFile>>> {
    static OPEN: OnceLock<Mutex<HashMap<FileId, Arc<OpenFile>>>> = OnceLock::new();
    OPEN.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

struct OpenFile {
    path: PathBuf,
    id: FileId,
    file: File,
    /// Descriptors of the same file opened by a lost race in `DbFile::open`
    /// (the path pointed elsewhere when it was looked up). Closing them would
    /// drop the locks too, so they live as long as `file`.
    spare: Mutex<Vec<File>>,
}

/// The process's one descriptor of a database file, shared by everything in
/// walstream that reads it.
///
/// POSIX advisory locks belong to the process and the file, not to the
/// descriptor: closing *any* descriptor of the database file drops every
/// lock the process holds on it, including the SHARED lock of walstream's
/// own SQLite connections (sqlite.org/howtocorrupt.html, section 2.2).
/// Another process's SQLite could then take the EXCLUSIVE lock when its last
/// connection closes, checkpoint, and delete the WAL under walstream's read
/// transaction: the replica would get pages that never belonged together.
///
/// Hence the rule, for every contributor: **nothing in walstream opens a
/// database file except `DbFile::open`, every read of its pages goes through
/// `DbFile::read_exact_at`, and every SQLite connection to it is made by
/// `DbFile::connect`** (which keeps a handle alive for as long as the
/// connection lives). The descriptor is closed only when the last handle
/// goes, under the registry's lock, so no new handle or connection to the
/// same file can appear in between. WAL files carry no SQLite locks and may
/// be opened directly; `-shm` files must never be opened.
pub struct DbFile {
    /// `Some` until dropped (taken in `drop`, to be closed under the lock).
    open: Option<Arc<OpenFile>>,
}

impl DbFile {
    /// Opens `path` read-only, or returns another handle to the descriptor
    /// the process already holds for the same file.
    pub fn open(path: &Path) -> Result<DbFile> {
        let mut reg = registry();
        if let Ok(id) = file_id(path) {
            if let Some(open) = reg.get(&id) {
                return Ok(DbFile {
                    open: Some(open.clone()),
                });
            }
        }
        let file = File::open(path).io_ctx("open", path)?;
        let id = {
            use std::os::unix::fs::MetadataExt;
            let m = file.metadata().io_ctx("stat", path)?;
            (m.dev(), m.ino())
        };
        if let Some(open) = reg.get(&id) {
            // The name moved onto a file already held since the lookup.
            open.spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(file);
            return Ok(DbFile {
                open: Some(open.clone()),
            });
        }
        let open = Arc::new(OpenFile {
            path: path.to_path_buf(),
            id,
            file,
            spare: Mutex::new(Vec::new()),
        });
        reg.insert(id, open.clone());
        Ok(DbFile { open: Some(open) })
    }

    fn inner(&self) -> &OpenFile {
        self.open.as_ref().expect("open until dropped")
    }

    /// The path the file was opened by.
    pub fn path(&self) -> &Path {
        &self.inner().path
    }

    /// (device, inode) of the open file.
    pub fn id(&self) -> FileId {
        self.inner().id
    }

    /// Current length of the file.
    pub fn file_len(&self) -> std::io::Result<u64> {
        Ok(self.inner().file.metadata()?.len())
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.inner().file.read_exact_at(buf, offset)
    }

    /// Opens a connection walstream uses for locking and checkpointing. It
    /// never creates the file and never checkpoints on close (so stopping
    /// walstream leaves the WAL in place and a restart can prove
    /// continuity). Fails with `Error::Replaced` if the path no longer names
    /// this file.
    pub fn connect(&self, busy_timeout: Duration) -> Result<DbConn> {
        let db = self.path();
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(db, flags).db_ctx(db)?;
        // No lookaside memory: SQLite gives every connection 120 KiB of it
        // up front for small allocations, which walstream's two statements
        // per round never need, and which would be most of the memory of
        // an idle database.
        // SAFETY: the handle is valid and no statement has run on it yet
        // (lookaside can only be changed before any memory is taken from it);
        // a null buffer with a size of 0 turns lookaside off.
        unsafe {
            rusqlite::ffi::sqlite3_db_config(
                conn.handle(),
                rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
                std::ptr::null_mut::<std::ffi::c_void>(),
                0 as std::ffi::c_int,
                0 as std::ffi::c_int,
            );
        }
        let conn = DbConn {
            conn,
            _file: self.clone(),
        };
        if file_id(db)? != self.id() {
            return Err(Error::Replaced {
                path: db.to_path_buf(),
            });
        }
        conn.busy_timeout(busy_timeout).db_ctx(db)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .db_ctx(db)?;

        Ok(conn)
    }
}

impl Clone for DbFile {
    fn clone(&self) -> DbFile {
        DbFile {
            open: self.open.clone(),
        }
    }
}

impl Drop for DbFile {
    fn drop(&mut self) {
        let mut reg = registry();
        let open = self.open.take().expect("dropped once");
        // This handle and the registry's entry are the last references: no
        // connection of the process uses the file any more. Close it while
        // holding the lock, before anyone can open and lock it again.
        if Arc::strong_count(&open) == 2 {
            reg.remove(&open.id);
        }
        drop(open);
    }
}

/// A walstream connection to a source database. It keeps the database's
/// `DbFile` open for as long as it lives (the connection is dropped first).
pub struct DbConn {
    conn: Connection,
    _file: DbFile,
}

impl std::ops::Deref for DbConn {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// Process-wide SQLite settings for a process that holds connections to
/// many databases: no page-cache memory allocated up front. By default every
/// connection takes 20 pages' worth (about 86 KiB at 4 KiB pages) on its
/// first statement, which walstream's connections (a schema read to take
/// the lock, checkpoints, which bypass the cache) never use: with two
/// connections per database that was most of an idle database's memory.
/// Takes effect only before SQLite's first connection in the process; later
/// it does nothing.
pub fn configure_sqlite() {
    // SAFETY: sqlite3_config with SQLITE_CONFIG_PAGECACHE, a null buffer and
    // zero sizes only sets the initial page-cache allocation to none; before
    // initialization it cannot race (main calls it first), after it SQLite
    // refuses with SQLITE_MISUSE and changes nothing.
    unsafe {
        rusqlite::ffi::sqlite3_config(
            rusqlite::ffi::SQLITE_CONFIG_PAGECACHE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0 as std::ffi::c_int,
            0 as std::ffi::c_int,
        );
    }
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
pub fn image_plan(db: &DbFile, page_size: u32, cursor: Option<&WalCursor>) -> Result<ImagePlan> {
    let (wal_pages, wal_db_pages) = match cursor {
        Some(c) if c.offset > wal::WAL_HEADER_SIZE => {
            let wal_path = wal_path(db.path());
            let mut f = File::open(&wal_path).io_ctx("open", &wal_path)?;
            let header = wal::read_header(&mut f)
                .io_ctx("read", &wal_path)?
                .filter(|h| h.salt1 == c.salt1 && h.salt2 == c.salt2)
                .ok_or_else(|| Error::ContinuityLost {
                    path: db.path().to_path_buf(),
                    reason: "the WAL changed under walstream's read lock while taking a snapshot"
                        .into(),
                })?;
            let (committed, end) = wal::read_committed(&mut f, &header.start(), Some(c.offset))
                .io_ctx("read", &wal_path)?;
            if end != *c {
                return Err(Error::ContinuityLost {
                    path: db.path().to_path_buf(),
                    reason: format!(
                        "the WAL no longer holds the shipped frames (ends at offset {}, shipped up to {})",
                        end.offset, c.offset
                    ),
                });
            }
            (committed.pages, Some(committed.db_pages))
        }
        _ => (Default::default(), None),
    };
    let db_pages = match wal_db_pages {
        Some(n) => n,
        None => header_db_pages(db, page_size).io_ctx("read", db.path())?,
    };
    Ok(ImagePlan {
        db_pages,
        page_size,
        wal_pages,
    })
}

/// Pages read from the database file at a time while streaming an image.
const IMAGE_CHUNK: u64 = 1 << 20;

impl ImagePlan {
    /// Streams the image, page by page, into `out`.
    pub fn write_to(&self, db: &DbFile, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let ps = self.page_size as u64;
        let len = db.file_len()?;
        let per_chunk = (IMAGE_CHUNK / ps).max(1);
        let mut buf = vec![0u8; (per_chunk * ps) as usize];
        let mut pgno = 1u64;
        while pgno <= self.db_pages as u64 {
            let n = per_chunk.min(self.db_pages as u64 - pgno + 1);
            let at = (pgno - 1) * ps;
            let chunk = &mut buf[..(n * ps) as usize];
            // Pages past the end of the file (only in the WAL) read as zeros
            // here and come from the WAL below.
            let have = len.saturating_sub(at).min(n * ps) as usize;
            db.read_exact_at(&mut chunk[..have], at)?;
            chunk[have..].fill(0);
            for (i, page) in chunk.chunks_exact(ps as usize).enumerate() {
                match self.wal_pages.get(&((pgno + i as u64) as u32)) {
                    Some(p) => out.write_all(p)?,
                    None => out.write_all(page)?,
                }
            }
            pgno += n;
        }
        Ok(())
    }
}

/// Database size in pages from the file header when it is valid, else from
/// the file length.
fn header_db_pages(db: &DbFile, page_size: u32) -> std::io::Result<u32> {
    let file_len = db.file_len()?;
    let by_len = (file_len / page_size as u64) as u32;
    if file_len < 100 {
        return Ok(by_len);
    }
    let mut h = [0u8; 100];
    db.read_exact_at(&mut h, 0)?;
    let change = wal::be32(&h[24..28]);
    let size = wal::be32(&h[28..32]);
    let valid_for = wal::be32(&h[92..96]);
    if size > 0 && change == valid_for && size <= by_len {
        Ok(size)
    } else {
        Ok(by_len)
    }
}
