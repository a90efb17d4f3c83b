//! Compaction: old history as a few large objects instead of many small ones.
//!
//! Segments are shipped per commit (or per sync-interval), so a day of writes
//! can be tens of thousands of objects, and a restore that has to download
//! each of them slows down as they pile up. Compaction merges them in levels:
//! level 1 holds one object per closed time bucket of `levels[0]` (say 5
//! minutes) of plain segments, level 2 one per bucket of `levels[1]` (say an
//! hour) of level-1 objects, and so on. A merged object keeps only the newest
//! version of each page (see `segment::merge`), and its key carries its range
//! and time, so restore plans from a listing alone.
//!
//! Finer objects are deleted once a coarser object covers them and they are
//! older than the coarser level's interval: point-in-time restore is exact
//! within the newest `levels[0]`, to `levels[0]` within the newest
//! `levels[1]`, and so on. Buckets never span a snapshot, so a restore that
//! starts from any snapshot finds objects starting exactly there.
//!
//! Crash safety: a merged object is stored before anything it covers is
//! deleted, and restore prefers the coarser object wherever both exist, so an
//! interrupted compaction leaves a replica that restores exactly as before.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::error::Result;
use crate::generation::layout;
use crate::replica::{Compacted, GenerationListing, Replica};
use crate::segment::{Merger, Segment};

/// What a compaction pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Merged objects written, per level (index 0 = level 1).
    pub created: Vec<usize>,
    /// Objects deleted because a coarser one covers them.
    pub deleted: usize,
}

/// Checks that levels grow and nest (each a multiple of the one below).
pub fn validate_levels(levels: &[Duration]) -> std::result::Result<(), String> {
    for (i, l) in levels.iter().enumerate() {
        if l.as_millis() == 0 {
            return Err(format!("levels[{i}]: interval must be positive"));
        }
        if i > 0 {
            let prev = levels[i - 1].as_millis();
            if l.as_millis() <= prev || l.as_millis() % prev != 0 {
                return Err(format!(
                    "levels[{i}]: interval {:?} must be a larger multiple of {:?}",
                    l,
                    levels[i - 1]
                ));
            }
        }
    }
    Ok(())
}

/// Runs one compaction pass over every generation of `replica`.
pub async fn compact(replica: &Replica, levels: &[Duration], now_ms: i64) -> Result<Report> {
    let mut report = Report {
        created: vec![0; levels.len()],
        deleted: 0,
    };
    for g in replica.generations().await? {
        if g.snapshots.is_empty() {
            continue;
        }
        compact_generation(replica, &g, levels, now_ms, &mut report).await?;
    }
    Ok(report)
}

/// An object of some level as an input to the next.
#[derive(Debug, Clone, Copy)]
struct Input {
    first: u64,
    last: u64,
    /// Known from the key for merged objects; read from the object for plain
    /// segments.
    timestamp_ms: Option<i64>,
    compacted: Option<Compacted>,
}

async fn compact_generation(
    replica: &Replica,
    g: &GenerationListing,
    levels: &[Duration],
    now_ms: i64,
    report: &mut Report,
) -> Result<()> {
    let splits: BTreeSet<u64> = g.snapshots.iter().map(|s| s.0).collect();
    let mut listing = g.clone();
    // A plain segment downloaded to learn its time and not merged yet (the
    // first of the next bucket): at most one object is held besides the
    // merge in progress.
    let mut held: Option<Segment> = None;
    for (li, interval) in levels.iter().enumerate() {
        let level = li as u8 + 1;
        let width = interval.as_millis() as i64;
        let grace = (width / 2).min(10_000);
        let inputs: Vec<Input> = if level == 1 {
            let covered = |i: u64| {
                listing
                    .compacted
                    .iter()
                    .any(|c| c.first <= i && i <= c.last)
            };
            listing
                .segments
                .iter()
                .filter(|s| !covered(s.0))
                .map(|s| Input {
                    first: s.0,
                    last: s.0,
                    timestamp_ms: None,
                    compacted: None,
                })
                .collect()
        } else {
            let covered = |c: &Compacted| {
                listing
                    .compacted
                    .iter()
                    .any(|d| d.level >= level && d.first <= c.first && c.last <= d.last)
            };
            listing
                .compacted
                .iter()
                .filter(|c| c.level == level - 1 && !covered(c))
                .map(|c| Input {
                    first: c.first,
                    last: c.last,
                    timestamp_ms: Some(c.timestamp_ms),
                    compacted: Some(*c),
                })
                .collect()
        };
        let mut k = 0;
        while k < inputs.len() {
            let ts0 = time_of(replica, &g.id, &inputs[k], &mut held).await?;
            let bucket_end = (ts0.div_euclid(width) + 1) * width;
            if now_ms < bucket_end + grace {
                break; // this and everything after it is too recent
            }
            // The run: consecutive inputs in the same bucket, not crossing a
            // snapshot, each folded into the merge as soon as it is read.
            let mut merger = Merger::default();
            let bad = |input: &Input, m: String| replica.bad(&input_key(&g.id, input), &m);
            let first = load(replica, &g.id, &inputs[k], &mut held).await?;
            merger.push(first).map_err(|m| bad(&inputs[k], m))?;
            let mut end = k;
            while end + 1 < inputs.len()
                && inputs[end + 1].first == inputs[end].last + 1
                && !splits.contains(&inputs[end + 1].first)
                && time_of(replica, &g.id, &inputs[end + 1], &mut held).await? < bucket_end
            {
                end += 1;
                let next = load(replica, &g.id, &inputs[end], &mut held).await?;
                merger.push(next).map_err(|m| bad(&inputs[end], m))?;
            }
            let merged = merger.finish(level).map_err(|m| bad(&inputs[k], m))?;
            let (key, bytes) = replica.put_compacted(&merged).await?;
            tracing::debug!(
                key,
                bytes,
                inputs = end - k + 1,
                pages = merged.header.page_count,
                "compacted"
            );
            listing.compacted.push(Compacted {
                level,
                first: merged.header.index,
                last: merged.header.last_index(),
                timestamp_ms: merged.header.timestamp_ms,
                size: bytes,
            });
            report.created[li] += 1;
            k = end + 1;
        }
        // Finer objects older than this level's interval, now covered.
        let mut deletes: Vec<String> = Vec::new();
        if level == 1 {
            let mut gone = BTreeSet::new();
            for &(index, _) in &listing.segments {
                // The covering object's time bounds this segment's.
                let cover = listing
                    .compacted
                    .iter()
                    .find(|c| c.first <= index && index <= c.last);
                if cover.is_some_and(|c| now_ms - c.timestamp_ms > width) {
                    deletes.push(layout::segment(&g.id, index));
                    gone.insert(index);
                }
            }
            listing.segments.retain(|s| !gone.contains(&s.0));
        } else {
            let old: Vec<Compacted> = listing
                .compacted
                .iter()
                .filter(|c| {
                    c.level == level - 1
                        && now_ms - c.timestamp_ms > width
                        && listing
                            .compacted
                            .iter()
                            .any(|d| d.level >= level && d.first <= c.first && c.last <= d.last)
                })
                .copied()
                .collect();
            for c in &old {
                deletes.push(layout::compacted(
                    &g.id,
                    c.level,
                    c.first,
                    c.last,
                    c.timestamp_ms,
                ));
            }
            listing.compacted.retain(|c| !old.contains(c));
        }
        for key in &deletes {
            replica.delete(key).await?;
            report.deleted += 1;
        }
    }
    Ok(())
}

fn input_key(generation: &str, input: &Input) -> String {
    match &input.compacted {
        Some(c) => layout::compacted(generation, c.level, c.first, c.last, c.timestamp_ms),
        None => layout::segment(generation, input.first),
    }
}

/// Reads an input, taking it from `held` when it was downloaded already.
async fn load(
    replica: &Replica,
    generation: &str,
    input: &Input,
    held: &mut Option<Segment>,
) -> Result<Segment> {
    match &input.compacted {
        Some(c) => replica.get_compacted(generation, c).await,
        None => match held.take() {
            Some(s) if s.header.index == input.first => Ok(s),
            _ => replica.get_segment(generation, input.first).await,
        },
    }
}

/// The time of an input: from the key for merged objects; a plain segment is
/// downloaded and kept in `held` for the merge.
async fn time_of(
    replica: &Replica,
    generation: &str,
    input: &Input,
    held: &mut Option<Segment>,
) -> Result<i64> {
    if let Some(t) = input.timestamp_ms {
        return Ok(t);
    }
    if let Some(s) = held.as_ref().filter(|s| s.header.index == input.first) {
        return Ok(s.header.timestamp_ms);
    }
    let s = replica.get_segment(generation, input.first).await?;
    let t = s.header.timestamp_ms;
    *held = Some(s);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_must_nest() {
        let s = Duration::from_secs;
        assert!(validate_levels(&[s(300), s(3600)]).is_ok());
        assert!(validate_levels(&[s(300), s(200)]).is_err());
        assert!(validate_levels(&[s(300), s(400)]).is_err());
        assert!(validate_levels(&[Duration::ZERO]).is_err());
    }
}
