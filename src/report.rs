//! What a running daemon says at info level without being asked: one
//! summary line per database a minute while it ships (segments, bytes, the
//! largest lag of its replicas), and one line when a replica falls behind
//! (its last complete sync is older than readiness allows) or catches up.
//! Without these a person reading the log cannot tell a working daemon
//! from a stuck one unless debug logging is on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::metrics::{Metrics, State};

/// How often replicas are checked for falling behind or catching up.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Logs until aborted (the daemon does when it is dropped); a summary every
/// `summary_every` (`summary-interval`, see `defaults::SUMMARY_INTERVAL`).
pub async fn run(metrics: Arc<Metrics>, summary_every: Duration) {
    // Per replica (by registration order): whether it was behind, and its
    // segment and byte counts at the last summary.
    let mut behind: Vec<bool> = Vec::new();
    let mut counted: Vec<(u64, u64)> = Vec::new();
    let mut next_summary = tokio::time::Instant::now() + summary_every;
    let mut tick = tokio::time::interval(CHECK_EVERY.min(summary_every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Utc::now().timestamp_millis();
        let replicas = metrics.replicas();
        behind.resize(replicas.len(), false);
        for (r, was) in replicas.iter().zip(behind.iter_mut()) {
            // A replica still starting has not fallen behind anything.
            if r.state() == State::Starting {
                continue;
            }
            match (r.not_ready(now), *was) {
                (Some(why), false) => {
                    tracing::warn!(db = %r.db, replica = %r.replica, reason = %why, "replica fell behind");
                    *was = true;
                }
                (None, true) => {
                    tracing::info!(db = %r.db, replica = %r.replica, "replica caught up");
                    *was = false;
                }
                _ => {}
            }
        }
        if tokio::time::Instant::now() < next_summary {
            continue;
        }
        next_summary += summary_every;
        // Per database: segments and bytes shipped since the last summary
        // (all replicas), and the largest lag.
        let mut per_db: BTreeMap<&str, (u64, u64, Duration, usize)> = BTreeMap::new();
        counted.resize(replicas.len(), (0, 0));
        for (r, before) in replicas.iter().zip(counted.iter_mut()) {
            let s = r.summary(now);
            let e = per_db.entry(r.db.as_str()).or_default();
            e.0 += s.segments - before.0;
            e.1 += s.bytes - before.1;
            e.2 = e.2.max(s.lag);
            e.3 += 1;
            *before = (s.segments, s.bytes);
        }
        for (db, (segments, bytes, lag, replicas)) in per_db {
            if segments > 0 || bytes > 0 {
                tracing::info!(
                    db,
                    replicas,
                    segments,
                    bytes,
                    lag_ms = lag.as_millis() as u64,
                    "shipped since the last summary"
                );
            }
        }
    }
}
