//! A replica: the typed view of one storage location holding generations,
//! snapshots and segments. The engine and restore speak in these terms; only
//! this module turns them into object keys and verified bytes.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::generation::{layout, Manifest};
use crate::segment::{self, Segment, SegmentBody, SegmentHeader};
use crate::snapshot::{self, SnapshotHeader};
use crate::storage::DynStorage;

/// What a listing of one generation found (keys only, nothing downloaded).
#[derive(Debug, Clone, Default)]
pub struct GenerationListing {
    pub id: String,
    pub has_manifest: bool,
    /// (index, timestamp ms, size) sorted by index.
    pub snapshots: Vec<(u64, i64, u64)>,
    /// (index, size) sorted by index.
    pub segments: Vec<(u64, u64)>,
    /// Merged objects (level 1 and up), sorted by level, then first index.
    pub compacted: Vec<Compacted>,
}

/// The end of a generation (see `Replica::generation_end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationEnd {
    /// Index of the last segment covered.
    pub index: u64,
    pub position: u64,
    pub timestamp_ms: i64,
}

/// A merged object as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Compacted {
    pub level: u8,
    pub first: u64,
    pub last: u64,
    pub timestamp_ms: i64,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct Replica {
    storage: DynStorage,
}

impl Replica {
    pub fn new(storage: DynStorage) -> Replica {
        Replica { storage }
    }

    pub fn location(&self) -> String {
        self.storage.location()
    }

    /// Lists every generation with its snapshots and segments, oldest first.
    /// This is one (paginated) LIST: used at start-up and by restore, never on
    /// the replication hot path.
    pub async fn generations(&self) -> Result<Vec<GenerationListing>> {
        let objects = self.storage.list(layout::GENERATIONS).await?;
        Ok(listing(objects))
    }

    /// The generations, and when the storage wrote each object of the
    /// replica (by its own clock; empty where the backend does not say).
    /// One LIST of the whole replica, the lease included.
    pub async fn generations_stored(
        &self,
    ) -> Result<(
        Vec<GenerationListing>,
        std::collections::HashMap<String, i64>,
    )> {
        let objects = self.storage.list("").await?;
        let stored = objects
            .iter()
            .filter_map(|o| Some((o.key.clone(), o.modified_ms?)))
            .collect();
        Ok((listing(objects), stored))
    }

    pub async fn put_manifest(&self, m: &Manifest) -> Result<()> {
        let data = serde_json::to_vec_pretty(m).expect("manifest serializes");
        self.storage
            .put(&layout::manifest(&m.generation), data)
            .await?;
        Ok(())
    }

    /// A generation's `generation.json`, `None` if it has none.
    pub async fn get_manifest(&self, generation: &str) -> Result<Option<Manifest>> {
        let key = layout::manifest(generation);
        match self.storage.get(&key).await {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| self.bad(&key, &format!("not a generation manifest: {e}"))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put_segment(
        &self,
        header: &SegmentHeader,
        pages: &BTreeMap<u32, Vec<u8>>,
    ) -> Result<u64> {
        let data = segment::encode_with(header, pages, self.storage.keys().as_deref());
        let len = data.len() as u64;
        self.storage
            .put(&layout::segment(&header.generation, header.index), data)
            .await?;
        Ok(len)
    }

    /// Uploads a snapshot object already written to `path`.
    pub async fn put_snapshot_file(&self, header: &SnapshotHeader, path: &Path) -> Result<u64> {
        let key = layout::snapshot(&header.generation, header.index, header.timestamp_ms);
        self.storage.put_file(&key, path).await?;
        Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
    }

    /// Downloads a snapshot into `dest` and verifies it; returns its header
    /// and a reader of the image.
    pub async fn get_snapshot_file(
        &self,
        generation: &str,
        index: u64,
        timestamp_ms: i64,
        dest: &Path,
    ) -> Result<(SnapshotHeader, Box<dyn std::io::Read + Send>)> {
        let key = layout::snapshot(generation, index, timestamp_ms);
        let local = self.storage.local_path(&key);
        let source = local.as_deref().unwrap_or(dest);
        if local.is_none() {
            self.storage
                .get_file(&key, dest)
                .await
                .map_err(|e| self.missing(&key, e))?;
        }
        let (header, image) = snapshot::open_file_with(source, self.storage.keys().as_deref())
            .map_err(|e| self.undecodable(&key, e))?;
        if header.generation != generation || header.index != index {
            return Err(self.bad(&key, "header does not match its key"));
        }
        Ok((header, image))
    }

    /// Downloads and verifies a segment, checking it is the one its key names.
    pub async fn get_segment(&self, generation: &str, index: u64) -> Result<Segment> {
        Ok(self
            .get_segment_body(generation, index)
            .await?
            .into_segment())
    }

    /// [`Replica::get_segment`], with the pages left in the body (restore).
    pub async fn get_segment_body(&self, generation: &str, index: u64) -> Result<SegmentBody> {
        let key = layout::segment(generation, index);
        self.get_verified(&key, |h| {
            h.generation == generation && h.index == index && h.level == 0
        })
        .await
    }

    /// A segment-format object (a segment, or a merged object) verified in a
    /// file rather than in memory, for objects of any size: read in place
    /// from a directory replica, else downloaded to `dest`. Returns its
    /// header and a reader of its page records; `None` if the object does
    /// not exist.
    pub async fn open_segment_file(
        &self,
        key: &str,
        dest: &Path,
        matches_key: impl Fn(&SegmentHeader) -> bool,
    ) -> Result<Option<(SegmentHeader, Box<dyn std::io::Read + Send>)>> {
        let source = match self.storage.local_path(key) {
            Some(p) => p,
            None => match self.storage.get_file(key, dest).await {
                Ok(_) => dest.to_path_buf(),
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e.into()),
            },
        };
        let corrupt = |e| self.undecodable(key, e);
        let (header, body) = crate::format::decode_file_with::<SegmentHeader>(
            segment::MAGIC,
            "segment",
            &source,
            self.storage.keys().as_deref(),
        )
        .map_err(corrupt)?;
        segment::check_page_size(header.page_size).map_err(corrupt)?;
        if !matches_key(&header) {
            return Err(self.bad(key, "header does not match its key"));
        }
        Ok(Some((header, body)))
    }

    /// Where a generation ends: the position after, and the time of, its
    /// newest object, whether a segment as shipped or a merged object that
    /// replaced it (compaction deletes merged segments, so the plain
    /// segments alone understate the end). `None` for a generation with
    /// snapshots only (it ends at its latest snapshot).
    pub async fn generation_end(&self, g: &GenerationListing) -> Result<Option<GenerationEnd>> {
        let last_segment = g.segments.last().map(|s| s.0);
        let last_merged = g.compacted.iter().max_by_key(|c| (c.last, c.level));
        let header = match (last_segment, last_merged) {
            (None, None) => return Ok(None),
            (Some(i), m) if m.is_none_or(|c| i > c.last) => {
                self.get_segment(&g.id, i).await?.header
            }
            (_, Some(c)) => self.get_compacted(&g.id, c).await?.header,
            (Some(_), None) => unreachable!("handled by the arm above"),
        };
        Ok(Some(GenerationEnd {
            index: header.last_index(),
            position: header.last_position,
            timestamp_ms: header.timestamp_ms,
        }))
    }

    /// Uploads a merged object (its header says level and range).
    pub async fn put_compacted(&self, seg: &Segment) -> Result<(String, u64)> {
        let h = &seg.header;
        let key = layout::compacted(
            &h.generation,
            h.level,
            h.index,
            h.last_index(),
            h.timestamp_ms,
        );
        let data = segment::encode_with(h, &seg.pages, self.storage.keys().as_deref());
        let len = data.len() as u64;
        self.storage.put(&key, data).await?;
        Ok((key, len))
    }

    /// Downloads and verifies a merged object against its key.
    pub async fn get_compacted(&self, generation: &str, c: &Compacted) -> Result<Segment> {
        Ok(self.get_compacted_body(generation, c).await?.into_segment())
    }

    /// [`Replica::get_compacted`], with the pages left in the body (restore).
    pub async fn get_compacted_body(&self, generation: &str, c: &Compacted) -> Result<SegmentBody> {
        let key = layout::compacted(generation, c.level, c.first, c.last, c.timestamp_ms);
        self.get_verified(&key, |h| {
            h.generation == generation
                && h.level == c.level
                && h.index == c.first
                && h.last_index() == c.last
                && h.timestamp_ms == c.timestamp_ms
        })
        .await
    }

    /// Downloads and decodes a segment-format object, checking that its
    /// header is the one its key names.
    async fn get_verified(
        &self,
        key: &str,
        matches_key: impl Fn(&SegmentHeader) -> bool,
    ) -> Result<SegmentBody> {
        let data = self.get(key).await?;
        let seg = segment::decode_body_with(&data, self.storage.keys().as_deref())
            .map_err(|e| self.undecodable(key, e))?;
        if !matches_key(&seg.header) {
            return Err(self.bad(key, "header does not match its key"));
        }
        Ok(seg)
    }

    /// An object that does not decode: corrupt, or encrypted to keys this
    /// process does not hold.
    fn undecodable(&self, key: &str, source: crate::format::FormatError) -> Error {
        match source {
            crate::format::FormatError::Encrypted => Error::Encrypted {
                location: self.location(),
                key: key.to_string(),
            },
            crate::format::FormatError::Decrypt(message) => Error::BadObject {
                location: self.location(),
                key: key.to_string(),
                message,
            },
            source => Error::Corrupt {
                location: self.location(),
                key: key.to_string(),
                source,
            },
        }
    }

    /// The verified header of the object at `key` (a segment-format object
    /// or a snapshot), its body unread: enough to resume after it, with no
    /// key to its (maybe encrypted) body.
    pub async fn get_header<H: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        magic: &[u8; 8],
        kind: &'static str,
    ) -> Result<H> {
        let tmp = tempfile::NamedTempFile::new()
            .map_err(|e| Error::Invalid(format!("cannot create a temporary file: {e}")))?;
        let source = match self.storage.local_path(key) {
            Some(p) => p,
            None => {
                self.storage
                    .get_file(key, tmp.path())
                    .await
                    .map_err(|e| self.missing(key, e))?;
                tmp.path().to_path_buf()
            }
        };
        crate::format::decode_file_header(magic, kind, &source)
            .map_err(|e| self.undecodable(key, e))
    }

    /// Whether new objects are encrypted (see `encryption`).
    pub fn encrypts(&self) -> bool {
        self.storage.keys().is_some_and(|k| k.encrypts())
    }

    /// Whether encrypted objects can be read: not encrypted, or an
    /// identity is at hand.
    pub fn decrypts(&self) -> bool {
        self.storage.keys().is_none_or(|k| k.decrypts())
    }

    /// Removes one object (missing is fine).
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.storage.delete(key).await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.storage
            .get(key)
            .await
            .map_err(|e| self.missing(key, e))
    }

    /// A listed object that is gone is a gap in the replica, not a storage
    /// failure: say so, naming it.
    fn missing(&self, key: &str, e: crate::storage::StorageError) -> Error {
        if e.is_not_found() {
            Error::Missing {
                location: self.location(),
                key: key.to_string(),
                message: "listed but not found".into(),
            }
        } else {
            e.into()
        }
    }

    pub fn bad(&self, key: &str, message: &str) -> Error {
        Error::BadObject {
            location: self.location(),
            key: key.to_string(),
            message: message.to_string(),
        }
    }
}

/// Groups listed objects by generation, oldest generation first.
fn listing(objects: Vec<crate::storage::ObjectMeta>) -> Vec<GenerationListing> {
    let mut gens: BTreeMap<String, GenerationListing> = BTreeMap::new();
    for obj in objects {
        let Some(id) = layout::generation_of(&obj.key) else {
            continue;
        };
        let g = gens
            .entry(id.to_string())
            .or_insert_with(|| GenerationListing {
                id: id.to_string(),
                ..Default::default()
            });
        if obj.key == layout::manifest(id) {
            g.has_manifest = true;
        } else if obj.key.starts_with(&layout::snapshots_dir(id)) {
            if let Some((index, ms)) = layout::parse_snapshot(&obj.key) {
                g.snapshots.push((index, ms, obj.size));
            }
        } else if obj.key.starts_with(&layout::segments_dir(id)) {
            if let Some(index) = layout::parse_index(&obj.key, "segment") {
                g.segments.push((index, obj.size));
            }
        } else if obj.key.starts_with(&layout::compacted_dir(id)) {
            if let Some((level, first, last, timestamp_ms)) = layout::parse_compacted(&obj.key) {
                g.compacted.push(Compacted {
                    level,
                    first,
                    last,
                    timestamp_ms,
                    size: obj.size,
                });
            }
        }
    }
    let mut out: Vec<_> = gens.into_values().collect();
    for g in &mut out {
        g.snapshots.sort();
        g.segments.sort();
        g.compacted.sort();
    }
    out
}
