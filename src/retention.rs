//! Retention: deleting what no restore inside the window needs.
//!
//! Every point in time from `now - retention` to now must stay restorable,
//! and so must the newest state even when it is older than the window (an
//! idle database must not lose its only backup). For each generation this
//! keeps the newest snapshot at or before the window's start and everything
//! after it; a generation that ended before the window (the next one started
//! before it) goes entirely, unless it is the newest restorable one.
//!
//! Deletion order makes an interrupted prune harmless: within a generation,
//! snapshots go before the segments they need (so no snapshot is ever left
//! pointing at a deleted segment), segments and merged objects go oldest
//! first (so what remains after the kept snapshot stays contiguous), and a
//! generation's manifest goes last.

use std::time::Duration;

use crate::error::Result;
use crate::generation::{self, layout};
use crate::replica::{GenerationListing, Replica};

/// The keys to delete, in the order they must be deleted.
pub fn plan(gens: &[GenerationListing], retention: Duration, now_ms: i64) -> Vec<String> {
    let window_start = now_ms - retention.as_millis() as i64;
    let start_ms = |g: &GenerationListing| {
        generation::id_time(&g.id).map_or(i64::MAX, |t| t.timestamp_millis())
    };
    let newest_restorable = gens.iter().rposition(|g| !g.snapshots.is_empty());
    let mut deletes = Vec::new();
    for (i, g) in gens.iter().enumerate() {
        let next_start = gens.get(i + 1).map(start_ms);
        let ended_before_window = next_start.is_some_and(|t| t <= window_start);
        if Some(i) == newest_restorable || !ended_before_window {
            if let Some(base) = g
                .snapshots
                .iter()
                .rev()
                .find(|s| s.1 <= window_start)
                .or(g.snapshots.first())
                .copied()
            {
                deletes.extend(
                    g.snapshots
                        .iter()
                        .filter(|s| (s.0, s.1) < (base.0, base.1))
                        .map(|s| layout::snapshot(&g.id, s.0, s.1)),
                );
                deletes.extend(older_chain(g, base.0));
            }
            continue;
        }
        // The whole generation: snapshots first, the chain, the manifest.
        deletes.extend(
            g.snapshots
                .iter()
                .map(|s| layout::snapshot(&g.id, s.0, s.1)),
        );
        deletes.extend(older_chain(g, u64::MAX));
        if g.has_manifest {
            deletes.push(layout::manifest(&g.id));
        }
    }
    deletes
}

/// Segments and merged objects entirely before index `before`, oldest first.
fn older_chain(g: &GenerationListing, before: u64) -> Vec<String> {
    let mut objects: Vec<(u64, u8, String)> = g
        .segments
        .iter()
        .filter(|s| s.0 < before)
        .map(|s| (s.0, 0, layout::segment(&g.id, s.0)))
        .chain(g.compacted.iter().filter(|c| c.last < before).map(|c| {
            (
                c.first,
                c.level,
                layout::compacted(&g.id, c.level, c.first, c.last, c.timestamp_ms),
            )
        }))
        .collect();
    objects.sort();
    objects.into_iter().map(|o| o.2).collect()
}

/// Deletes what `plan` says, in order. Returns the number of objects deleted.
pub async fn prune(replica: &Replica, retention: Duration, now_ms: i64) -> Result<usize> {
    let gens = replica.generations().await?;
    let deletes = plan(&gens, retention, now_ms);
    for key in &deletes {
        replica.delete(key).await?;
    }
    if !deletes.is_empty() {
        tracing::info!(deleted = deletes.len(), "retention pruned old objects");
    }
    Ok(deletes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(start_ms: i64, snapshots: &[(u64, i64)], segments: u64) -> GenerationListing {
        GenerationListing {
            id: format!("{start_ms:012x}00000000"),
            has_manifest: true,
            snapshots: snapshots.iter().map(|&(i, t)| (i, t, 1)).collect(),
            segments: (0..segments).map(|i| (i, 1)).collect(),
            compacted: Vec::new(),
        }
    }

    #[test]
    fn keeps_the_chain_from_the_newest_snapshot_before_the_window() {
        let h = 3_600_000;
        // Generation A (ended at 10h), B (started 10h, snapshots at 10h and 20h).
        let a = gen(0, &[(0, 0)], 5);
        let b = gen(10 * h, &[(0, 10 * h), (7, 20 * h)], 10);
        let d = plan(&[a.clone(), b.clone()], Duration::from_secs(3600), 24 * h);
        // A goes entirely, snapshots before segments, manifest last.
        let a_keys: Vec<&String> = d.iter().filter(|k| k.contains(&a.id)).collect();
        assert!(a_keys[0].contains("snapshots/"));
        assert!(a_keys.last().unwrap().ends_with("generation.json"));
        assert_eq!(a_keys.len(), 1 + 5 + 1);
        // B keeps the snapshot at 20h (the newest before 23h) and segments 7..
        let b_keys: Vec<&String> = d.iter().filter(|k| k.contains(&b.id)).collect();
        assert_eq!(b_keys.len(), 1 + 7, "{b_keys:?}");
        assert!(b_keys[0].contains("snapshots/0000000000000000"));
        assert!(b_keys[1..].iter().all(|k| k.contains("segments/")));
        // Oldest first.
        assert!(b_keys[1] < b_keys[2]);
        // A long window keeps everything in B and A (A overlaps it).
        assert!(plan(&[a, b], Duration::from_secs(48 * 3600), 24 * h).is_empty());
    }

    #[test]
    fn never_deletes_the_newest_chain() {
        let h = 3_600_000;
        let only = gen(0, &[(0, 0), (3, h)], 6);
        let d = plan(std::slice::from_ref(&only), Duration::from_secs(1), 100 * h);
        assert_eq!(d.len(), 1 + 3, "{d:?}");
        // A newer generation without a snapshot yet does not count.
        let starting = gen(99 * h, &[], 0);
        let d = plan(&[only, starting], Duration::from_secs(1), 100 * h);
        assert_eq!(d.len(), 1 + 3, "{d:?}");
    }
}
