//! Snapshots: a complete, consistent copy of the database at a position.
//!
//! A restore starts from a snapshot and applies the segments after it, so a
//! snapshot bounds restore time. One is taken when a generation starts and then
//! on `snapshot-interval` (never on every restart, which is what turns a cheap
//! restart into a full database upload). A snapshot is identified by the index
//! of the first segment that follows it: snapshot `n` equals the state after
//! segments `0..n` of its generation.
//!
//! The image is built page by page from the database file and the WAL frames up
//! to the snapshot position, while walstream's read transaction keeps the
//! checkpointer from changing any page it reads (see `replicate`).

use serde::{Deserialize, Serialize};

use crate::format::{self, FormatError};
use crate::segment::WalPoint;

pub const MAGIC: &[u8; 8] = b"WSSNAPSH";

/// The JSON header of a snapshot object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotHeader {
    pub generation: String,
    /// Index of the first segment that applies on top of this snapshot.
    pub index: u64,
    /// Position (WAL frames shipped in the generation) of the snapshot.
    pub position: u64,
    pub page_size: u32,
    pub db_pages: u32,
    /// When the snapshot was taken (Unix milliseconds).
    pub timestamp_ms: i64,
    /// WAL position the snapshot corresponds to (`None`: the WAL was empty).
    pub wal: Option<WalPoint>,
}

/// Encodes a snapshot whose body is the raw database image.
pub fn encode(header: &SnapshotHeader, image: &[u8]) -> Vec<u8> {
    format::encode(MAGIC, header, image)
}

/// Decodes and fully verifies a snapshot, returning the database image.
pub fn decode(data: &[u8]) -> Result<(SnapshotHeader, Vec<u8>), FormatError> {
    let (header, body): (SnapshotHeader, Vec<u8>) = format::decode(MAGIC, "snapshot", data)?;
    let expected = header.db_pages as u64 * header.page_size as u64;
    if body.len() as u64 != expected {
        return Err(FormatError::Body(format!(
            "image is {} bytes, expected {expected}",
            body.len()
        )));
    }
    Ok((header, body))
}

/// Reads only the header, without verifying the checksum.
pub fn decode_header(data: &[u8]) -> Result<SnapshotHeader, FormatError> {
    format::decode_header_unverified(MAGIC, "snapshot", data)
}
