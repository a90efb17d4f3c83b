//! Retention: deleting what no restore inside the window needs.
//!
//! Every point in time from `now - retention` to now must stay restorable,
//! and so must the newest state even when it is older than the window (an
//! idle database must not lose its only backup). For each generation this
//! keeps the newest snapshot at or before the window's start and everything
//! after it; a generation that ended before the window (the next one started
//! before it) goes entirely, unless it is the newest restorable one.
//!
//! Age is measured by the storage's clock where the backend gives one (a
//! file's mtime, S3's `LastModified`): "now" is the newest object's time,
//! and an object's age is how long before that the storage wrote it. So a
//! writer whose clock runs hours ahead cannot make the last hours look
//! older than the window, and one whose clock jumped cannot either; the
//! times in keys (the writer's clock) are used only where the storage
//! gives none. Erring this way keeps more, never less.
//!
//! Deletion order makes an interrupted prune harmless: within a generation,
//! snapshots go before the segments they need (so no snapshot is ever left
//! pointing at a deleted segment), segments and merged objects go oldest
//! first (so what remains after the kept snapshot stays contiguous), and a
//! generation's manifest goes last.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use crate::error::Result;
use crate::generation::{self, layout};
use crate::replica::{GenerationListing, Replica};

/// The keys to delete, in the order they must be deleted. `stored`: when
/// the storage wrote each object (its clock), where known; then `now_ms`
/// is not used, the newest of those times is "now".
pub fn plan(
    gens: &[GenerationListing],
    retention: Duration,
    now_ms: i64,
    stored: &HashMap<String, i64>,
) -> Vec<String> {
    let now_ms = stored.values().copied().max().unwrap_or(now_ms);
    let window_start = now_ms - retention.as_millis() as i64;
    let start_ms = |g: &GenerationListing| {
        stored
            .get(&layout::manifest(&g.id))
            .copied()
            .or_else(|| generation::id_time(&g.id).map(|t| t.timestamp_millis()))
            .unwrap_or(i64::MAX)
    };
    let snapshot_ms = |g: &GenerationListing, s: &(u64, i64, u64)| {
        stored
            .get(&layout::snapshot(&g.id, s.0, s.1))
            .copied()
            .unwrap_or(s.1)
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
                .find(|s| snapshot_ms(g, s) <= window_start)
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
    let (gens, stored) = replica.generations_stored().await?;
    if let Some(&newest) = stored.values().max() {
        let behind = newest - now_ms;
        if behind > CLOCK_WARNING.as_millis() as i64 {
            tracing::warn!(
                behind_s = behind / 1000,
                "this host's clock is behind the storage's (an object is dated after now): retention goes by the storage's clock; the times in new object keys and --timestamp go by this host's"
            );
        }
    }
    let deletes = plan(&gens, retention, now_ms, &stored);
    for key in &deletes {
        replica.delete(key).await?;
    }
    if !deletes.is_empty() {
        tracing::info!(deleted = deletes.len(), "retention pruned old objects");
    }
    Ok(deletes.len())
}

/// A difference between this host's clock and the storage's worth a warning.
const CLOCK_WARNING: Duration = Duration::from_secs(300);

/// Notices jumps of the system clock: its advance against the monotonic
/// clock's since the last look. Retention does not depend on it (it goes by
/// the storage's clock), but key times and `--timestamp` do.
#[derive(Debug)]
pub struct ClockWatch {
    wall: SystemTime,
    mono: Instant,
}

impl Default for ClockWatch {
    fn default() -> Self {
        ClockWatch {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }
}

impl ClockWatch {
    /// The jump since the last look (ms, positive: forwards), if larger
    /// than `limit`.
    pub fn jumped(&mut self, limit: Duration) -> Option<i64> {
        self.jumped_at(SystemTime::now(), Instant::now(), limit)
    }

    fn jumped_at(&mut self, wall: SystemTime, mono: Instant, limit: Duration) -> Option<i64> {
        let ms = |d: Result<Duration, std::time::SystemTimeError>| match d {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        };
        let wall_ms = ms(wall.duration_since(self.wall));
        let mono_ms = mono.duration_since(self.mono).as_millis() as i64;
        self.wall = wall;
        self.mono = mono;
        let jump = wall_ms - mono_ms;
        (jump.unsigned_abs() as u128 > limit.as_millis()).then_some(jump)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_jumps_are_noticed() {
        let mut w = ClockWatch::default();
        let (wall, mono) = (w.wall, w.mono);
        let limit = Duration::from_secs(60);
        let step = Duration::from_secs(10);
        assert_eq!(w.jumped_at(wall + step, mono + step, limit), None);
        let two_h = Duration::from_secs(7200);
        assert_eq!(
            w.jumped_at(wall + step * 2 + two_h, mono + step * 2, limit),
            Some(7_200_000)
        );
        assert_eq!(
            w.jumped_at(wall + step * 3, mono + step * 3, limit),
            Some(-7_200_000)
        );
    }

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
    fn ages_go_by_the_storages_clock() {
        let (h, m) = (3_600_000, 60_000);
        // One generation: snapshots at -3h and -40min by a correct clock,
        // then resumed by a writer two hours ahead (a snapshot it dated
        // +2h, written now).
        let real_now = 100 * h;
        let g = gen(
            real_now - 3 * h,
            &[
                (0, real_now - 3 * h),
                (3, real_now - 40 * m),
                (6, real_now + 2 * h),
            ],
            9,
        );
        let mut stored = HashMap::new();
        for (i, t) in [(0, real_now - 3 * h), (3, real_now - 40 * m), (6, real_now)] {
            let s = g.snapshots.iter().find(|s| s.0 == i).unwrap();
            stored.insert(layout::snapshot(&g.id, i, s.1), t);
        }
        let gens = [g];
        // By the writer's clock (+2h), a 1h window starts at +1h: snapshot
        // 0 and segments 0..3 would go, which a restore to -50min needs.
        let by_writer = plan(
            &gens,
            Duration::from_secs(3600),
            real_now + 2 * h,
            &HashMap::new(),
        );
        assert_eq!(by_writer.len(), 1 + 3, "{by_writer:?}");
        // By the storage's clock the window starts at -1h: all stays.
        assert!(plan(&gens, Duration::from_secs(3600), real_now + 2 * h, &stored).is_empty());
    }

    #[test]
    fn keeps_the_chain_from_the_newest_snapshot_before_the_window() {
        let h = 3_600_000;
        // Generation A (ended at 10h), B (started 10h, snapshots at 10h and 20h).
        let a = gen(0, &[(0, 0)], 5);
        let b = gen(10 * h, &[(0, 10 * h), (7, 20 * h)], 10);
        let d = plan(
            &[a.clone(), b.clone()],
            Duration::from_secs(3600),
            24 * h,
            &HashMap::new(),
        );
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
        assert!(plan(
            &[a, b],
            Duration::from_secs(48 * 3600),
            24 * h,
            &HashMap::new()
        )
        .is_empty());
    }

    #[test]
    fn never_deletes_the_newest_chain() {
        let h = 3_600_000;
        let only = gen(0, &[(0, 0), (3, h)], 6);
        let d = plan(
            std::slice::from_ref(&only),
            Duration::from_secs(1),
            100 * h,
            &HashMap::new(),
        );
        assert_eq!(d.len(), 1 + 3, "{d:?}");
        // A newer generation without a snapshot yet does not count.
        let starting = gen(99 * h, &[], 0);
        let d = plan(
            &[only, starting],
            Duration::from_secs(1),
            100 * h,
            &HashMap::new(),
        );
        assert_eq!(d.len(), 1 + 3, "{d:?}");
    }
}
