//! Segments: the unit of continuous shipping.
//!
//! A segment holds one or more whole transactions read from the WAL, reduced
//! to the newest version of each page they wrote, plus the database size after
//! the last of them. Segments of a generation are numbered 0, 1, 2, ... and
//! their positions chain: each one's `first_position` equals the previous
//! one's `last_position`, so a restore can prove it has not skipped anything.
//! Batching many commits into one segment is what keeps request counts (and
//! costs) low under load without adding latency when the database is idle.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::format::{self, FormatError};
use crate::wal::WalCursor;

pub const MAGIC: &[u8; 8] = b"WSSEGMNT";

/// Where in the source WAL an object ends, so a restarted walstream can prove
/// that the WAL on disk continues exactly where the replica stops.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct WalPoint {
    pub salt1: u32,
    pub salt2: u32,
    pub offset: u64,
    pub checksum1: u32,
    pub checksum2: u32,
    pub big_endian: bool,
}

impl WalPoint {
    pub fn from_cursor(c: &WalCursor) -> WalPoint {
        WalPoint {
            salt1: c.salt1,
            salt2: c.salt2,
            offset: c.offset,
            checksum1: c.checksum.0,
            checksum2: c.checksum.1,
            big_endian: c.big_endian,
        }
    }

    pub fn to_cursor(&self, page_size: u32) -> WalCursor {
        WalCursor {
            salt1: self.salt1,
            salt2: self.salt2,
            offset: self.offset,
            checksum: (self.checksum1, self.checksum2),
            page_size,
            big_endian: self.big_endian,
        }
    }
}

/// The JSON header of a segment object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegmentHeader {
    pub generation: String,
    pub index: u64,
    /// Position (WAL frames shipped in this generation) before the segment.
    pub first_position: u64,
    /// Position after the segment.
    pub last_position: u64,
    pub page_size: u32,
    /// Database size in pages after the last transaction.
    pub db_pages: u32,
    /// When walstream read the last transaction (Unix milliseconds).
    pub timestamp_ms: i64,
    pub transactions: u64,
    /// Number of pages in the body.
    pub page_count: u64,
    /// WAL position just after the last commit frame in the segment.
    pub wal: WalPoint,
    /// Compaction level: 0 for a segment as shipped, 1.. for a merge of
    /// consecutive lower-level objects (see FORMAT.md, "Compaction").
    #[serde(default, skip_serializing_if = "is_zero")]
    pub level: u8,
    /// Index of the last segment this object covers (`index` for level 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_index: Option<u64>,
    /// Smallest database size (pages) at any commit inside the object; pages
    /// above it were truncated away and must be cut before the body is
    /// applied. Absent: `db_pages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_db_pages: Option<u32>,
    /// Time of the first segment covered (level 1 and up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_timestamp_ms: Option<i64>,
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

impl SegmentHeader {
    pub fn last_index(&self) -> u64 {
        self.last_index.unwrap_or(self.index)
    }

    pub fn min_db_pages(&self) -> u32 {
        self.min_db_pages.unwrap_or(self.db_pages)
    }

    pub fn first_timestamp_ms(&self) -> i64 {
        self.first_timestamp_ms.unwrap_or(self.timestamp_ms)
    }
}

/// A decoded segment.
#[derive(Debug)]
pub struct Segment {
    pub header: SegmentHeader,
    pub pages: BTreeMap<u32, Vec<u8>>,
}

/// Encodes a segment; the body is `page_count` records of a big-endian u32
/// page number followed by the page.
pub fn encode(header: &SegmentHeader, pages: &BTreeMap<u32, Vec<u8>>) -> Vec<u8> {
    encode_with(header, pages, None)
}

/// [`encode`], sealed with `keys` when they encrypt (see `encryption`).
pub fn encode_with(
    header: &SegmentHeader,
    pages: &BTreeMap<u32, Vec<u8>>,
    keys: Option<&crate::encryption::Keys>,
) -> Vec<u8> {
    // Pages stream straight into the compressor: no uncompressed copy.
    format::encode_with(MAGIC, header, Vec::new(), keys, |w| {
        for (pgno, page) in pages {
            debug_assert_eq!(page.len(), header.page_size as usize);
            w.write_all(&pgno.to_be_bytes())?;
            w.write_all(page)?;
        }
        Ok(())
    })
    .expect("encoding to memory cannot fail")
}

/// Merges consecutive objects (in order, positions chaining) into one of
/// `level`: the newest version of each page, with pages dropped whenever a
/// later commit truncated the database below them, so that applying the
/// result (cut to `min_db_pages`, write the pages, set the size to
/// `db_pages`) leaves exactly the bytes applying each input in turn would.
pub fn merge(parts: Vec<Segment>, level: u8) -> Result<Segment, String> {
    let mut m = Merger::default();
    for p in parts {
        m.push(p)?;
    }
    m.finish(level)
}

/// A merge fed one object at a time, so that compaction holds only the
/// distinct pages of its bucket, never every object in it.
#[derive(Default)]
pub struct Merger {
    first: Option<SegmentHeader>,
    last: Option<SegmentHeader>,
    pages: BTreeMap<u32, Vec<u8>>,
    min_db_pages: u32,
    transactions: u64,
}

impl Merger {
    /// Adds the next object; it must follow the previous one exactly.
    pub fn push(&mut self, p: Segment) -> Result<(), String> {
        let h = &p.header;
        match (&self.first, &self.last) {
            (Some(first), Some(prev)) => {
                if h.generation != first.generation || h.page_size != first.page_size {
                    return Err(format!(
                        "segment {} is from another generation or page size",
                        h.index
                    ));
                }
                if h.index != prev.last_index() + 1 || h.first_position != prev.last_position {
                    return Err(format!(
                        "segment {} does not follow {} (position {} vs {})",
                        h.index,
                        prev.last_index(),
                        h.first_position,
                        prev.last_position
                    ));
                }
            }
            _ => {
                self.first = Some(h.clone());
                self.min_db_pages = u32::MAX;
            }
        }
        // An input that is itself a merge cuts first, then writes.
        self.pages.retain(|&pgno, _| pgno <= h.min_db_pages());
        let (db_pages, min_db_pages) = (h.db_pages, h.min_db_pages());
        self.transactions += h.transactions;
        self.last = Some(p.header);
        for (pgno, page) in p.pages {
            if pgno <= db_pages {
                self.pages.insert(pgno, page);
            }
        }
        self.pages.retain(|&pgno, _| pgno <= db_pages);
        self.min_db_pages = self.min_db_pages.min(min_db_pages);
        Ok(())
    }

    /// The merged object, at compaction `level`.
    pub fn finish(self, level: u8) -> Result<Segment, String> {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return Err("nothing to merge".into());
        };
        let header = SegmentHeader {
            generation: first.generation.clone(),
            index: first.index,
            first_position: first.first_position,
            last_position: last.last_position,
            page_size: first.page_size,
            db_pages: last.db_pages,
            timestamp_ms: last.timestamp_ms,
            transactions: self.transactions,
            page_count: self.pages.len() as u64,
            wal: last.wal,
            level,
            last_index: Some(last.last_index()),
            min_db_pages: Some(self.min_db_pages),
            first_timestamp_ms: Some(first.first_timestamp_ms()),
        };
        Ok(Segment {
            header,
            pages: self.pages,
        })
    }
}

/// A verified segment whose pages stay where decompression put them.
///
/// Restore writes tens of thousands of pages; taking each straight from the
/// decompressed body instead of copying it into a map of its own saves a
/// copy and an allocation per page.
#[derive(Debug)]
pub struct SegmentBody {
    pub header: SegmentHeader,
    body: Vec<u8>,
}

impl SegmentBody {
    /// The pages, by ascending page number (checked when decoded).
    pub fn pages(&self) -> impl Iterator<Item = (u32, &[u8])> {
        self.body
            .chunks_exact(self.header.page_size as usize + 4)
            .map(|rec| (u32::from_be_bytes(rec[0..4].try_into().unwrap()), &rec[4..]))
    }

    pub fn into_segment(self) -> Segment {
        let pages = self.pages().map(|(n, p)| (n, p.to_vec())).collect();
        Segment {
            header: self.header,
            pages,
        }
    }
}

/// SQLite's page sizes: a power of two from 512 to 65536.
pub fn check_page_size(ps: u32) -> Result<(), FormatError> {
    if (512..=65536).contains(&ps) && ps.is_power_of_two() {
        Ok(())
    } else {
        Err(FormatError::Header(format!("bad page size {ps}")))
    }
}

/// Decodes and fully verifies a segment.
pub fn decode(data: &[u8]) -> Result<Segment, FormatError> {
    decode_body(data).map(SegmentBody::into_segment)
}

/// Decodes and fully verifies a segment, leaving its pages in the body.
pub fn decode_body(data: &[u8]) -> Result<SegmentBody, FormatError> {
    decode_body_with(data, None)
}

/// [`decode_body`], opening an encrypted body with `keys`.
pub fn decode_body_with(
    data: &[u8],
    keys: Option<&crate::encryption::Keys>,
) -> Result<SegmentBody, FormatError> {
    let (header, body): (SegmentHeader, Vec<u8>) =
        format::decode_with(MAGIC, "segment", data, keys, |h: &SegmentHeader| {
            check_page_size(h.page_size)?;
            let ps = h.page_size as u64;
            h.page_count
                .checked_mul(ps + 4)
                .ok_or_else(|| FormatError::Header(format!("page count {}", h.page_count)))
        })?;
    let seg = SegmentBody { header, body };
    // Records are sorted by page number (FORMAT.md); a page twice or out of
    // order is a corrupt object, not one to guess about.
    let mut previous = 0u32;
    for (pgno, _) in seg.pages() {
        if pgno == 0 {
            return Err(FormatError::Body("page number 0".into()));
        }
        if pgno == previous {
            return Err(FormatError::Body(format!("page {pgno} appears twice")));
        }
        if pgno < previous {
            return Err(FormatError::Body(format!(
                "page {pgno} comes after page {previous}"
            )));
        }
        previous = pgno;
    }
    Ok(seg)
}
