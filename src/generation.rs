//! Generations: the unit of continuity in a replica.
//!
//! A generation is an unbroken history of one database: a snapshot taken when
//! it starts, then segments whose positions chain without gaps. Whenever
//! walstream cannot prove that the database only changed through WAL frames it
//! has read (first run, a WAL reset it did not see, a database changed while
//! walstream was down, a restored file) it starts a new generation rather than
//! risk a replica that restores to a state the database never had.
//!
//! Generation ids are 20 hex digits: 12 of milliseconds followed by 8
//! random ones, so sorting ids sorts generations. The milliseconds are the
//! start time, except that a new id is always greater than every id its
//! writer saw in the replica (a hybrid logical clock): sorting ids sorts
//! generations by lineage, whatever the writers' clocks said. A writer two
//! hours behind still makes the newest generation; one two hours ahead
//! pushes the ids after it two hours ahead too, but never reorders them.
//! Replicas written before this rule sort by start time, as they did.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Object key layout inside a replica (see FORMAT.md).
pub mod layout {
    /// Prefix holding all generations.
    pub const GENERATIONS: &str = "generations/";

    pub fn manifest(generation: &str) -> String {
        format!("{GENERATIONS}{generation}/generation.json")
    }

    pub fn snapshots_dir(generation: &str) -> String {
        format!("{GENERATIONS}{generation}/snapshots/")
    }

    /// Snapshot keys carry the snapshot time so that restarts and
    /// point-in-time restores can pick a snapshot without downloading any.
    pub fn snapshot(generation: &str, index: u64, timestamp_ms: i64) -> String {
        format!("{GENERATIONS}{generation}/snapshots/{index:016x}-{timestamp_ms:013}.snapshot")
    }

    /// Parses `<16 hex index>-<millis>.snapshot` at the end of a key.
    pub fn parse_snapshot(key: &str) -> Option<(u64, i64)> {
        let name = key.rsplit('/').next()?;
        let stem = name.strip_suffix(".snapshot")?;
        let (index, ms) = stem.split_once('-')?;
        if index.len() != 16 || ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((u64::from_str_radix(index, 16).ok()?, ms.parse().ok()?))
    }

    pub fn segments_dir(generation: &str) -> String {
        format!("{GENERATIONS}{generation}/segments/")
    }

    pub fn segment(generation: &str, index: u64) -> String {
        format!("{GENERATIONS}{generation}/segments/{index:016x}.segment")
    }

    pub fn compacted_dir(generation: &str) -> String {
        format!("{GENERATIONS}{generation}/compacted/")
    }

    /// A merged object of `level` covering segments `first..=last`, the last
    /// of which was read at `timestamp_ms`: everything restore and compaction
    /// plan with is in the key, so planning needs no downloads.
    pub fn compacted(
        generation: &str,
        level: u8,
        first: u64,
        last: u64,
        timestamp_ms: i64,
    ) -> String {
        format!(
            "{GENERATIONS}{generation}/compacted/{level}/{first:016x}-{last:016x}-{timestamp_ms:013}.segment"
        )
    }

    /// Parses `.../compacted/<level>/<first>-<last>-<millis>.segment`.
    pub fn parse_compacted(key: &str) -> Option<(u8, u64, u64, i64)> {
        let mut parts = key.rsplit('/');
        let name = parts.next()?;
        let level: u8 = parts.next()?.parse().ok()?;
        if parts.next()? != "compacted" || level == 0 {
            return None;
        }
        let stem = name.strip_suffix(".segment")?;
        let mut f = stem.split('-');
        let (first, last, ms) = (f.next()?, f.next()?, f.next()?);
        if first.len() != 16 || last.len() != 16 || f.next().is_some() {
            return None;
        }
        let first = u64::from_str_radix(first, 16).ok()?;
        let last = u64::from_str_radix(last, 16).ok()?;
        (first <= last).then_some(())?;
        Some((level, first, last, ms.parse().ok()?))
    }

    /// Parses `<16 hex>.<ext>` at the end of a key.
    pub fn parse_index(key: &str, ext: &str) -> Option<u64> {
        let name = key.rsplit('/').next()?;
        let hex = name.strip_suffix(ext)?.strip_suffix('.')?;
        if hex.len() != 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    }

    /// Extracts the generation id from a key under `generations/`.
    pub fn generation_of(key: &str) -> Option<&str> {
        let rest = key.strip_prefix(GENERATIONS)?;
        let id = rest.split('/').next()?;
        super::is_valid_id(id).then_some(id)
    }
}

/// Creates a new generation id for a generation starting now.
pub fn new_id() -> String {
    new_id_after(None)
}

/// A new generation id greater than `newest` (the newest id in the
/// replica), whatever this host's clock says.
pub fn new_id_after(newest: Option<&str>) -> String {
    let now = Utc::now().timestamp_millis().max(0) as u64;
    let after = newest
        .and_then(|id| u64::from_str_radix(id.get(0..12)?, 16).ok())
        .map_or(0, |ms| ms + 1);
    format!(
        "{:012x}{:08x}",
        now.max(after) & 0xffff_ffff_ffff,
        rand::random::<u32>()
    )
}

/// Whether `id` has the shape of a generation id.
pub fn is_valid_id(id: &str) -> bool {
    id.len() == 20
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Start time encoded in a generation id.
pub fn id_time(id: &str) -> Option<DateTime<Utc>> {
    let millis = i64::from_str_radix(id.get(0..12)?, 16).ok()?;
    DateTime::from_timestamp_millis(millis)
}

/// `generation.json`: written once when the generation starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub generation: String,
    pub started_at: DateTime<Utc>,
    /// Why the generation was started (first run, WAL reset not observed, ...).
    pub reason: String,
    pub page_size: u32,
    pub database: String,
    pub hostname: Option<String>,
    pub walstream_version: String,
    /// Set when the database was a follower's copy promoted to primary: the
    /// generation (of the replica it followed) and the point it had reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<Lineage>,
    /// The replica's newest generation when this one started (its end):
    /// the history this generation continues. `None` in a replica's first
    /// generation and in generations written before lineage was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Lineage>,
    /// The epoch of the lease this generation was written under (object
    /// leases; directory leases have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Whether the generation's object bodies are encrypted (see
    /// `encryption`); turning encryption on or off starts a new one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

/// A point in another generation: where a promoted follower's copy came
/// from, or the end of the generation a new one continues.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lineage {
    pub generation: String,
    /// The first segment of that generation the copy did not hold.
    pub next_index: u64,
    pub position: u64,
}

impl std::fmt::Display for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.generation, self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_parse() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = new_id();
        assert!(is_valid_id(&a) && is_valid_id(&b));
        assert!(a[..12] < b[..12]);
        // After an id from a clock two hours ahead: still after it.
        let ahead = format!(
            "{:012x}00000000",
            id_time(&b).unwrap().timestamp_millis() + 7_200_000
        );
        let c = new_id_after(Some(&ahead));
        assert!(c > ahead && is_valid_id(&c));

        let t = id_time(&a).unwrap();
        assert!((Utc::now() - t).num_seconds().abs() < 5);
        assert_eq!(
            layout::parse_index(&layout::segment(&a, 42), "segment"),
            Some(42)
        );
        assert_eq!(
            layout::generation_of(&layout::snapshot(&a, 1, 5)),
            Some(a.as_str())
        );
        assert_eq!(
            layout::parse_snapshot(&layout::snapshot(&a, 3, 1_700_000_000_123)),
            Some((3, 1_700_000_000_123))
        );
        assert_eq!(
            layout::parse_index("x/0000000000000001.snapshot.tmp", "snapshot"),
            None
        );
    }
}
