//! `walstream generations`, `snapshots` and `segments`: what a replica
//! holds, one line per object or generation.

use std::process::ExitCode;

use anyhow::Result;
use chrono::DateTime;

use walstream::generation;
use walstream::replica::Replica;

use super::out::outln;
use super::target::{check_exists, resolve_target, Resolved, Target};

/// The replica a listing reads, which must exist.
async fn replica_of(target: &Target) -> Result<Replica> {
    let Resolved {
        replica, target, ..
    } = resolve_target(target).await?;
    check_exists(&target)?;
    Ok(replica)
}

pub async fn generations(target: Target) -> Result<ExitCode> {
    let replica = replica_of(&target).await?;
    list_generations(&replica).await
}

pub async fn snapshots(target: Target, generation: Option<String>) -> Result<ExitCode> {
    let replica = replica_of(&target).await?;
    outln!(
        "{:<22} {:>8} {:>12} {:<25}",
        "generation",
        "index",
        "size",
        "created"
    );
    for g in replica.generations().await? {
        if generation.as_ref().is_some_and(|id| *id != g.id) {
            continue;
        }
        for (index, ms, size) in &g.snapshots {
            outln!("{:<22} {:>8} {:>12} {:<25}", g.id, index, size, fmt_ms(*ms));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Segments as shipped and, where compaction merged them, the merged
/// objects that now hold them (level 1 and up), in index order.
pub async fn segments(target: Target, generation: Option<String>) -> Result<ExitCode> {
    let replica = replica_of(&target).await?;
    outln!(
        "{:<22} {:>8} {:>8} {:>6} {:>12} {:<25}",
        "generation",
        "index",
        "last",
        "level",
        "size",
        "created"
    );
    for g in replica.generations().await? {
        if generation.as_ref().is_some_and(|id| *id != g.id) {
            continue;
        }
        let mut rows: Vec<(u64, u64, u8, u64, String)> = g
            .segments
            .iter()
            .map(|&(index, size)| (index, index, 0, size, String::new()))
            .collect();
        rows.extend(
            g.compacted
                .iter()
                .map(|c| (c.first, c.last, c.level, c.size, fmt_ms(c.timestamp_ms))),
        );
        rows.sort_by_key(|r| (r.0, std::cmp::Reverse(r.2)));
        for (first, last, level, size, created) in rows {
            outln!(
                "{:<22} {:>8} {:>8} {:>6} {:>12} {:<25}",
                g.id,
                first,
                last,
                level,
                size,
                created
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn fmt_ms(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

async fn list_generations(replica: &Replica) -> Result<ExitCode> {
    outln!(
        "{:<22} {:>10} {:>10} {:>9} {:>9} {:>9}  {:<25} {:<25} {}",
        "generation",
        "first_pos",
        "last_pos",
        "snapshots",
        "segments",
        "compacted",
        "start",
        "end",
        "continues"
    );
    for g in replica.generations().await? {
        let start = generation::id_time(&g.id)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0);
        let (first, mut last, mut end) = (0u64, 0u64, g.snapshots.last().map_or(start, |s| s.1));
        match replica.generation_end(&g).await {
            Ok(Some(e)) => {
                last = e.position;
                end = end.max(e.timestamp_ms);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(generation = %g.id, error = %e, "cannot read the generation's newest object")
            }
        }
        // The history it continues: the generation a promoted follower's
        // copy followed, or the replica's newest when it started.
        let manifest = match g.has_manifest {
            true => match replica.get_manifest(&g.id).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(generation = %g.id, error = %e, "cannot read the generation's manifest");
                    None
                }
            },
            false => None,
        };
        // The start by the writer's clock (the id's time may be later: ids
        // also order by lineage, see `generation`).
        let start = manifest
            .as_ref()
            .map_or(start, |m| m.started_at.timestamp_millis());
        let follows = manifest
            .and_then(|m| m.follows.or(m.previous))
            .map(|l| l.to_string());
        outln!(
            "{:<22} {:>10} {:>10} {:>9} {:>9} {:>9}  {:<25} {:<25} {}",
            g.id,
            first,
            last,
            g.snapshots.len(),
            g.segments.len(),
            g.compacted.len(),
            fmt_ms(start),
            fmt_ms(end),
            follows.as_deref().unwrap_or("-")
        );
    }
    Ok(ExitCode::SUCCESS)
}
