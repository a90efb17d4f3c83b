//! `walstream verify`: prove a replica restores, and (with a database from
//! the config) that it equals the live database.

use std::process::ExitCode;

use anyhow::{Context, Result};

use super::list::fmt_ms;
use super::out::outln;
use super::target::{check_exists, resolve_target, Target};

pub async fn run(target: Target, json: bool) -> Result<ExitCode> {
    let resolved = resolve_target(&target).await?;
    check_exists(&resolved.target)?;
    let (replica, db) = (resolved.replica, resolved.db);
    let tmp = tempfile::tempdir().context("create a temporary directory")?;
    let report = walstream::verify::verify(&replica, db.as_deref(), tmp.path()).await?;
    let code = if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if json {
        let v = serde_json::json!({
            "replica": replica.location(),
            "ok": report.ok(),
            "generations": report.generations,
            "objects": report.objects,
            "faults": report.faults,
            "not_compared": report.not_compared,
            "restored": report.restored.as_ref().map(|(g, pos, ms)| serde_json::json!({
                "generation": g, "position": pos, "time": fmt_ms(*ms),
            })),
            "compared_with": db.as_ref().filter(|_| report.compared_at.is_some()),
            "compared_at_wal_offset": report.compared_at,
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(code);
    }
    for f in &report.faults {
        outln!("fault: {f}");
    }
    if let Some(m) = &report.not_compared {
        outln!("fault: {m}");
    }
    outln!(
        "{} generations, {} objects checked in {}",
        report.generations,
        report.objects,
        replica.location()
    );
    if let Some((g, pos, ms)) = &report.restored {
        outln!(
            "restored generation {g} to position {pos} ({}): integrity ok",
            fmt_ms(*ms)
        );
    }
    if let (Some(at), Some(db)) = (report.compared_at, &db) {
        outln!("content equals {} at WAL offset {at}", db.display());
    }
    if report.ok() {
        outln!("ok");
        Ok(ExitCode::SUCCESS)
    } else {
        outln!("FAILED");
        Ok(ExitCode::FAILURE)
    }
}
