//! `walstream generations`, `snapshots` and `segments`: what a replica
//! holds, one line per object or generation.

use std::process::ExitCode;

use anyhow::Result;
use chrono::DateTime;

use walstream::generation;
use walstream::replica::Replica;

use super::out::outln;
use super::target::{resolve_target, Target};

pub async fn generations(target: Target) -> Result<ExitCode> {
    let (replica, _, _) = resolve_target(&target).await?;
    list_generations(&replica).await
}

pub async fn snapshots(target: Target, generation: Option<String>) -> Result<ExitCode> {
    let (replica, _, _) = resolve_target(&target).await?;
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

pub async fn segments(target: Target, generation: Option<String>) -> Result<ExitCode> {
    let (replica, _, _) = resolve_target(&target).await?;
    outln!("{:<22} {:>8} {:>12}", "generation", "index", "size");
    for g in replica.generations().await? {
        if generation.as_ref().is_some_and(|id| *id != g.id) {
            continue;
        }
        for (index, size) in &g.segments {
            outln!("{:<22} {:>8} {:>12}", g.id, index, size);
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
        "{:<22} {:>10} {:>10} {:>9} {:>9}  {:<25} {:<25}",
        "generation",
        "first_pos",
        "last_pos",
        "snapshots",
        "segments",
        "start",
        "end"
    );
    for g in replica.generations().await? {
        let start = generation::id_time(&g.id)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0);
        let (first, mut last, mut end) = (0u64, 0u64, g.snapshots.first().map_or(start, |s| s.1));
        if let Some(&(index, _)) = g.segments.last() {
            match replica.get_segment(&g.id, index).await {
                Ok(seg) => {
                    last = seg.header.last_position;
                    end = seg.header.timestamp_ms;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read last segment"),
            }
        }
        outln!(
            "{:<22} {:>10} {:>10} {:>9} {:>9}  {:<25} {:<25}",
            g.id,
            first,
            last,
            g.snapshots.len(),
            g.segments.len(),
            fmt_ms(start),
            fmt_ms(end)
        );
    }
    Ok(ExitCode::SUCCESS)
}
