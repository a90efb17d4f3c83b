//! `walstream generations`, `snapshots` and `segments`: what a replica
//! holds, one line per object or generation.

use std::process::ExitCode;

use anyhow::Result;
use chrono::DateTime;
use serde_json::{json, Value};

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

pub async fn generations(target: Target, json: bool) -> Result<ExitCode> {
    let replica = replica_of(&target).await?;
    list_generations(&replica, json).await
}

/// Rows for `--json`: printed as one array at the end.
#[derive(Default)]
struct JsonRows(Option<Vec<Value>>);

impl JsonRows {
    fn new(json: bool) -> JsonRows {
        JsonRows(json.then(Vec::new))
    }

    fn on(&self) -> bool {
        self.0.is_some()
    }

    fn push(&mut self, v: Value) {
        if let Some(rows) = &mut self.0 {
            rows.push(v);
        }
    }

    fn print(self) -> Result<ExitCode> {
        if let Some(rows) = self.0 {
            outln!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Ok(ExitCode::SUCCESS)
    }
}

pub async fn snapshots(target: Target, generation: Option<String>, json: bool) -> Result<ExitCode> {
    let replica = replica_of(&target).await?;
    let mut rows = JsonRows::new(json);
    if !rows.on() {
        outln!(
            "{:<22} {:>8} {:>12} {:<25}",
            "generation",
            "index",
            "size",
            "created"
        );
    }
    for g in replica.generations().await? {
        if generation.as_ref().is_some_and(|id| *id != g.id) {
            continue;
        }
        for (index, ms, size) in &g.snapshots {
            if rows.on() {
                rows.push(json!({"generation": g.id, "index": index, "size": size, "created": fmt_ms(*ms)}));
            } else {
                outln!("{:<22} {:>8} {:>12} {:<25}", g.id, index, size, fmt_ms(*ms));
            }
        }
    }
    rows.print()
}

/// Segments as shipped and, where compaction merged them, the merged
/// objects that now hold them (level 1 and up), in index order.
pub async fn segments(target: Target, generation: Option<String>, json: bool) -> Result<ExitCode> {
    let replica = replica_of(&target).await?;
    let mut out = JsonRows::new(json);
    if !out.on() {
        outln!(
            "{:<22} {:>8} {:>8} {:>6} {:>12} {:<25}",
            "generation",
            "index",
            "last",
            "level",
            "size",
            "created"
        );
    }
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
            if out.on() {
                out.push(json!({
                    "generation": g.id, "index": first, "last": last, "level": level,
                    "size": size, "created": (!created.is_empty()).then_some(created),
                }));
                continue;
            }
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
    out.print()
}

pub fn fmt_ms(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

async fn list_generations(replica: &Replica, json: bool) -> Result<ExitCode> {
    let mut out = JsonRows::new(json);
    if !out.on() {
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
    }
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
        if out.on() {
            out.push(json!({
                "generation": g.id, "first_position": first, "last_position": last,
                "snapshots": g.snapshots.len(), "segments": g.segments.len(),
                "compacted": g.compacted.len(), "start": fmt_ms(start), "end": fmt_ms(end),
                "continues": follows,
            }));
            continue;
        }
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
    out.print()
}
