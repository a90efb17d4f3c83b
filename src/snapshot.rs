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

/// Streams a snapshot object into the file at `path`; `image` writes the
/// database image.
pub fn write_file(
    header: &SnapshotHeader,
    path: &std::path::Path,
    image: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let out = format::file_writer(path)?;
    let out = format::encode_to(MAGIC, header, out, image)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Verifies a snapshot object stored in a file and returns its header and a
/// reader of the database image.
pub fn open_file(
    path: &std::path::Path,
) -> Result<(SnapshotHeader, Box<dyn std::io::Read + Send>), FormatError> {
    open_file_with(path, None)
}

/// [`open_file`], opening an encrypted image with `keys`.
pub fn open_file_with(
    path: &std::path::Path,
    keys: Option<&crate::encryption::Keys>,
) -> Result<(SnapshotHeader, Box<dyn std::io::Read + Send>), FormatError> {
    format::decode_file_with(MAGIC, "snapshot", path, keys)
}

/// Why an image of `read` bytes does not match a header of `db_pages` pages
/// (readers stop one byte past the admitted size, so longer means "longer").
pub fn size_fault(read: u64, db_pages: u32, page_size: u32) -> String {
    if read > db_pages as u64 * page_size as u64 {
        format!("image is longer than the {db_pages} pages its header admits")
    } else {
        format!("image is {read} bytes, expected {db_pages} pages")
    }
}
