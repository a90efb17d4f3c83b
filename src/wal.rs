//! Reading SQLite's write-ahead log directly.
//!
//! walstream does not ask SQLite which frames are new: it parses the `-wal`
//! file itself (see <https://www.sqlite.org/fileformat2.html#walformat>) so it
//! can prove continuity. A frame is only trusted when its salts match the WAL
//! header and the cumulative checksum chain, which starts at the header and runs
//! through every earlier frame, matches. Only whole transactions are returned:
//! frames after the last valid commit frame belong to a transaction that is
//! still being written (or was rolled back) and are left for the next read.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

/// Size of the WAL file header.
pub const WAL_HEADER_SIZE: u64 = 32;
/// Size of each frame header.
pub const FRAME_HEADER_SIZE: u64 = 24;

const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;
const WAL_VERSION: u32 = 3_007_000;

/// The parsed 32-byte WAL header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    /// Checksum words are big-endian (magic 0x377f0683) or little-endian.
    pub big_endian: bool,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checksum: (u32, u32),
}

impl WalHeader {
    /// Parses and validates a header; `None` when the bytes are not a valid,
    /// complete WAL header (for example while SQLite is still writing it).
    pub fn parse(buf: &[u8]) -> Option<WalHeader> {
        if buf.len() < WAL_HEADER_SIZE as usize {
            return None;
        }
        let magic = be32(&buf[0..4]);
        let big_endian = match magic {
            MAGIC_LE => false,
            MAGIC_BE => true,
            _ => return None,
        };
        if be32(&buf[4..8]) != WAL_VERSION {
            return None;
        }
        let page_size = be32(&buf[8..12]);
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return None;
        }
        let checksum = (be32(&buf[24..28]), be32(&buf[28..32]));
        if wal_checksum(big_endian, &buf[0..24], (0, 0)) != checksum {
            return None;
        }
        Some(WalHeader {
            big_endian,
            page_size,
            checkpoint_seq: be32(&buf[12..16]),
            salt1: be32(&buf[16..20]),
            salt2: be32(&buf[20..24]),
            checksum,
        })
    }

    /// The cursor positioned at the first frame of this WAL.
    pub fn start(&self) -> WalCursor {
        WalCursor {
            salt1: self.salt1,
            salt2: self.salt2,
            offset: WAL_HEADER_SIZE,
            checksum: self.checksum,
            page_size: self.page_size,
            big_endian: self.big_endian,
        }
    }
}

/// A point in one WAL file: the byte offset just after a commit frame (or the
/// header) together with the running checksum there. Two cursors with equal
/// salts, offset and checksum describe exactly the same WAL prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalCursor {
    pub salt1: u32,
    pub salt2: u32,
    pub offset: u64,
    pub checksum: (u32, u32),
    pub page_size: u32,
    pub big_endian: bool,
}

impl WalCursor {
    /// Size of a frame (header plus page) in this WAL.
    pub fn frame_size(&self) -> u64 {
        FRAME_HEADER_SIZE + self.page_size as u64
    }

    /// Number of frames between the header and this cursor.
    pub fn frame_index(&self) -> u64 {
        (self.offset - WAL_HEADER_SIZE) / self.frame_size()
    }
}

/// Whole transactions read from a WAL, reduced to the newest version of each
/// page.
#[derive(Debug, Default, Clone)]
pub struct Committed {
    /// Newest version of every page written by the transactions read.
    pub pages: BTreeMap<u32, Vec<u8>>,
    /// Number of frames read (before reduction).
    pub frames: u64,
    /// Database size in pages after the last commit.
    pub db_pages: u32,
    /// Smallest database size after any commit read.
    pub min_db_pages: u32,
    /// Number of transactions read.
    pub transactions: u64,
}

impl Committed {
    /// Adds the transactions of `later`, read right after these, as if both
    /// had been read in one batch.
    pub fn append(&mut self, later: Committed) {
        if later.transactions == 0 {
            return;
        }
        if self.transactions == 0 {
            *self = later;
            return;
        }
        // Pages past the smallest database size of a later commit are dead.
        self.pages.retain(|&p, _| p <= later.min_db_pages);
        self.pages.extend(later.pages);
        self.frames += later.frames;
        self.min_db_pages = self.min_db_pages.min(later.min_db_pages);
        self.db_pages = later.db_pages;
        self.transactions += later.transactions;
    }

    /// Bytes of page data held (every page has the WAL's page size, so this
    /// costs nothing on the upload path).
    pub fn page_bytes(&self) -> u64 {
        self.pages
            .first_key_value()
            .map_or(0, |(_, p)| p.len() as u64 * self.pages.len() as u64)
    }
}

/// Computes SQLite's WAL checksum of `data` (a multiple of 8 bytes), continuing
/// from `init`.
pub fn wal_checksum(big_endian: bool, data: &[u8], init: (u32, u32)) -> (u32, u32) {
    debug_assert!(data.len() % 8 == 0);
    let (mut s1, mut s2) = init;
    for pair in data.chunks_exact(8) {
        let (x0, x1) = if big_endian {
            (be32(&pair[0..4]), be32(&pair[4..8]))
        } else {
            (le32(&pair[0..4]), le32(&pair[4..8]))
        };
        s1 = s1.wrapping_add(x0).wrapping_add(s2);
        s2 = s2.wrapping_add(x1).wrapping_add(s1);
    }
    (s1, s2)
}

/// Reads the WAL header from an open WAL file. `Ok(None)` when the file is
/// shorter than a header or the header is not (yet) valid.
pub fn read_header(file: &mut File) -> io::Result<Option<WalHeader>> {
    let len = file.metadata()?.len();
    if len < WAL_HEADER_SIZE {
        return Ok(None);
    }
    let mut buf = [0u8; WAL_HEADER_SIZE as usize];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut buf)?;
    Ok(WalHeader::parse(&buf))
}

/// Reads every whole, valid transaction after `cursor`, optionally stopping at
/// `limit` (a byte offset that must be a commit boundary). Returns the pages
/// and the cursor after the last commit frame read. When the chain is broken
/// or a transaction is incomplete, reading stops before it.
pub fn read_committed(
    file: &mut File,
    cursor: &WalCursor,
    limit: Option<u64>,
) -> io::Result<(Committed, WalCursor)> {
    read_batch(file, cursor, limit, u64::MAX)
}

/// How much of the WAL one read asks for: big enough that a syscall is
/// cheap next to the copy, small enough that the stale frames read past the
/// end of a rewound WAL cost little.
const READ_CHUNK: u64 = 64 * 1024;

/// Like `read_committed`, but stops at the first commit after which the
/// batch holds `max_bytes` of distinct pages, so the memory a batch needs
/// stays bounded when the application writes faster than a segment uploads.
/// Frames that rewrite a page already in the batch cost no memory and do not
/// count: a second of small commits to the same few pages stays one segment.
/// A single transaction is never split.
pub fn read_batch(
    file: &mut File,
    cursor: &WalCursor,
    limit: Option<u64>,
    max_bytes: u64,
) -> io::Result<(Committed, WalCursor)> {
    let len = file.metadata()?.len();
    let end = limit.map_or(len, |l| l.min(len));
    let frame_size = cursor.frame_size();
    let mut out = Committed::default();
    let mut committed_cursor = *cursor;
    if end < cursor.offset + frame_size {
        return Ok((out, committed_cursor));
    }
    file.seek(SeekFrom::Start(cursor.offset))?;
    // Read no further than `end`, in small chunks: a rewound WAL keeps its
    // size, so past the newest frame lie frames of an earlier pass (ended by
    // the salt check below), and filling a 1 MiB buffer with them on every
    // tick cost more than reading the frames being shipped.
    let want = end - cursor.offset;
    let chunk = READ_CHUNK.max(frame_size).min(want);
    let mut reader = io::BufReader::with_capacity(chunk as usize, Read::take(&mut *file, want));
    let mut pending: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut pending_frames = 0u64;
    let mut checksum = cursor.checksum;
    let mut offset = cursor.offset;
    let mut header = [0u8; FRAME_HEADER_SIZE as usize];
    while offset + frame_size <= end {
        reader.read_exact(&mut header)?;
        let mut page = vec![0u8; cursor.page_size as usize];
        reader.read_exact(&mut page)?;
        let pgno = be32(&header[0..4]);
        let commit = be32(&header[4..8]);
        if be32(&header[8..12]) != cursor.salt1 || be32(&header[12..16]) != cursor.salt2 {
            break;
        }
        let sum = wal_checksum(cursor.big_endian, &header[0..8], checksum);
        let sum = wal_checksum(cursor.big_endian, &page, sum);
        if sum != (be32(&header[16..20]), be32(&header[20..24])) || pgno == 0 {
            break;
        }
        checksum = sum;
        offset += frame_size;
        pending.push((pgno, page));
        pending_frames += 1;
        if commit != 0 {
            for (pgno, page) in pending.drain(..) {
                out.pages.insert(pgno, page);
            }
            // Pages past the end of a shrunken database are dead.
            if out.pages.last_key_value().is_some_and(|(&p, _)| p > commit) {
                out.pages.retain(|&p, _| p <= commit);
            }
            out.frames += pending_frames;
            pending_frames = 0;
            out.db_pages = commit;
            out.min_db_pages = if out.transactions == 0 {
                commit
            } else {
                out.min_db_pages.min(commit)
            };
            out.transactions += 1;
            committed_cursor.offset = offset;
            committed_cursor.checksum = checksum;
            if out.pages.len() as u64 * cursor.page_size as u64 >= max_bytes {
                break;
            }
        }
    }
    Ok((out, committed_cursor))
}

/// Verifies that `target` describes a prefix of the WAL in `file`: same salts,
/// and the checksum chain from the header reaches `target.offset` at a commit
/// frame with exactly `target.checksum`.
pub fn verify_prefix(file: &mut File, target: &WalCursor) -> io::Result<bool> {
    let Some(header) = read_header(file)? else {
        return Ok(false);
    };
    if header.salt1 != target.salt1
        || header.salt2 != target.salt2
        || header.page_size != target.page_size
    {
        return Ok(false);
    }
    if target.offset == WAL_HEADER_SIZE {
        return Ok(header.checksum == target.checksum);
    }
    let (_, cursor) = read_committed(file, &header.start(), Some(target.offset))?;
    Ok(cursor.offset == target.offset && cursor.checksum == target.checksum)
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn wal_db(dir: &std::path::Path) -> Connection {
        let conn = Connection::open(dir.join("t.db")).unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE t(x)").unwrap();
        conn
    }

    #[test]
    fn reads_transactions_written_by_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let conn = wal_db(dir.path());
        for i in 0..10 {
            conn.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
        let mut wal = File::open(dir.path().join("t.db-wal")).unwrap();
        let header = read_header(&mut wal).unwrap().expect("valid header");
        let (c, cursor) = read_committed(&mut wal, &header.start(), None).unwrap();
        assert_eq!(c.transactions, 11);
        assert_eq!(cursor.offset, wal.metadata().unwrap().len());
        assert!(verify_prefix(&mut wal, &cursor).unwrap());
        // A cursor with a wrong checksum is not a prefix.
        let mut bad = cursor;
        bad.checksum.0 ^= 1;
        assert!(!verify_prefix(&mut wal, &bad).unwrap());
        // Bounded batches stop at commit boundaries and resume exactly.
        let (b1, c1) = read_batch(&mut wal, &header.start(), None, 1).unwrap();
        assert_eq!(b1.transactions, 1);
        let (b2, c2) = read_batch(&mut wal, &c1, None, u64::MAX).unwrap();
        assert_eq!((b2.transactions, c2), (10, cursor));
        // Reading again from the end yields nothing new.
        let (c2, cursor2) = read_committed(&mut wal, &cursor, None).unwrap();
        assert_eq!(c2.transactions, 0);
        assert_eq!(cursor2, cursor);
    }

    #[test]
    fn stops_at_corrupted_frame() {
        let dir = tempfile::tempdir().unwrap();
        let conn = wal_db(dir.path());
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let path = dir.path().join("t.db-wal");
        let mut wal = File::open(&path).unwrap();
        let header = read_header(&mut wal).unwrap().unwrap();
        let (_, first) = read_committed(&mut wal, &header.start(), None).unwrap();
        conn.execute("INSERT INTO t VALUES (2)", []).unwrap();
        drop(wal);
        // Flip a byte inside the page of the frame after `first`.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = first.offset as usize + FRAME_HEADER_SIZE as usize + 100;
        bytes[at] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let mut wal = File::open(&path).unwrap();
        let (_, cursor) = read_committed(&mut wal, &header.start(), None).unwrap();
        assert_eq!(cursor, first);
    }

    #[test]
    fn checksum_matches_both_byte_orders() {
        let data: Vec<u8> = (0..64u8).collect();
        assert_ne!(
            wal_checksum(true, &data, (0, 0)),
            wal_checksum(false, &data, (0, 0))
        );
        let whole = wal_checksum(false, &data, (1, 2));
        let split = wal_checksum(false, &data[32..], wal_checksum(false, &data[..32], (1, 2)));
        assert_eq!(whole, split);
    }

    #[test]
    fn appended_batches_equal_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let conn = wal_db(dir.path());
        // Grow, shrink (VACUUM after a delete) and grow again, so that pages
        // of early transactions lie past a later, smaller database size.
        conn.execute_batch("CREATE TABLE b(v)").unwrap();
        for _ in 0..20 {
            conn.execute("INSERT INTO b VALUES (randomblob(3000))", [])
                .unwrap();
        }
        let grown: u32 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        conn.execute_batch("DELETE FROM b WHERE rowid > 5; VACUUM;")
            .unwrap();
        conn.execute("INSERT INTO b VALUES (randomblob(9000))", [])
            .unwrap();
        let mut wal = File::open(dir.path().join("t.db-wal")).unwrap();
        let start = read_header(&mut wal).unwrap().unwrap().start();
        let (whole, end) = read_committed(&mut wal, &start, None).unwrap();
        assert!(whole.db_pages < grown, "the database shrank in between");
        let mut parts = Committed::default();
        let mut at = start;
        loop {
            let (one, next) = read_batch(&mut wal, &at, None, 1).unwrap();
            if one.transactions == 0 {
                break;
            }
            parts.append(one);
            at = next;
        }
        assert_eq!(at, end);
        assert_eq!(parts.pages, whole.pages);
        assert_eq!(
            (
                parts.frames,
                parts.db_pages,
                parts.min_db_pages,
                parts.transactions
            ),
            (
                whole.frames,
                whole.db_pages,
                whole.min_db_pages,
                whole.transactions
            )
        );
        assert_eq!(parts.page_bytes(), whole.pages.len() as u64 * 4096);
    }
}
