//! Checkpointing on the application's behalf, without ever stalling it.
//!
//! Once frames are shipped they only cost disk space and read time in the
//! WAL, so walstream copies them back into the database file with PASSIVE
//! checkpoints (which never wait for anyone) once the WAL holds
//! `min-checkpoint-page-count` frames, and on `checkpoint-interval`.
//!
//! A PASSIVE checkpoint that completes lets the next writer rewind the WAL,
//! but never shrinks the file. When the file exceeds
//! `max-checkpoint-page-count` frames walstream asks for a TRUNCATE, but only
//! right after a PASSIVE checkpoint completed (so there is nothing left to
//! copy while it holds the write lock) and with no busy wait at all: if a
//! reader or writer is in the way it gives up at once and backs off. Litestream
//! users saw outages when a RESTART checkpoint queued behind a long read and
//! blocked every writer in the meantime; this design cannot do that.
//!
//! Safety: these checkpoints run while walstream holds a read transaction, so
//! a TRUNCATE can only succeed when every frame in the WAL has been read by
//! walstream (see `db`).

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::db;
use crate::error::{Result, SqlContext};

#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    pub min_pages: u64,
    pub max_pages: u64,
    pub interval: Duration,
    /// Busy timeout to restore on the connection after a TRUNCATE attempt.
    pub busy_timeout: Duration,
}

/// What the last checkpoint did, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Skipped,
    Passive { complete: bool },
    Truncated,
    TruncateBusy,
}

#[derive(Debug)]
pub struct Checkpointer {
    policy: CheckpointPolicy,
    last: Instant,
    truncate_ready: bool,
    truncate_backoff: Duration,
    truncate_not_before: Instant,
    /// Shipped frames when a PASSIVE checkpoint last completed: nothing to
    /// do until more are shipped.
    completed_at_frames: Option<u64>,
}

impl Checkpointer {
    pub fn new(policy: CheckpointPolicy) -> Checkpointer {
        Checkpointer {
            policy,
            last: Instant::now(),
            truncate_ready: false,
            truncate_backoff: Duration::from_secs(1),
            truncate_not_before: Instant::now(),
            completed_at_frames: None,
        }
    }

    /// Whether a TRUNCATE may be tried now (a PASSIVE checkpoint just
    /// completed with the WAL file over the limit, and no back-off pending).
    pub fn truncate_due(&self) -> bool {
        self.truncate_ready && Instant::now() >= self.truncate_not_before
    }

    /// Tries a TRUNCATE checkpoint without any busy wait; backs off if busy.
    pub fn truncate(&mut self, conn: &Connection, db_path: &Path) -> Result<Outcome> {
        let now = Instant::now();
        self.truncate_ready = false;
        conn.busy_timeout(Duration::ZERO).db_ctx(db_path)?;
        let r = db::checkpoint(conn, db_path, "TRUNCATE");
        conn.busy_timeout(self.policy.busy_timeout)
            .db_ctx(db_path)?;
        let r = r?;
        self.last = now;
        if r.busy {
            self.truncate_not_before = now + self.truncate_backoff;
            self.truncate_backoff =
                (self.truncate_backoff * 2).min(self.policy.interval.max(Duration::from_secs(1)));
            tracing::debug!(db = %db_path.display(), "TRUNCATE checkpoint busy, backing off");
            return Ok(Outcome::TruncateBusy);
        }
        self.truncate_backoff = Duration::from_secs(1);
        tracing::debug!(db = %db_path.display(), "TRUNCATE checkpoint done");
        Ok(Outcome::Truncated)
    }

    /// Runs whatever checkpoint is due. `shipped_frames` is the number of
    /// frames in the current WAL up to the shipped position; `file_frames` is
    /// the WAL file's size in frames. `conn` must not be in a transaction.
    pub fn run(
        &mut self,
        conn: &Connection,
        db_path: &Path,
        shipped_frames: u64,
        file_frames: u64,
    ) -> Result<Outcome> {
        let now = Instant::now();
        if self.truncate_ready
            && file_frames >= self.policy.max_pages
            && now >= self.truncate_not_before
        {
            return self.truncate(conn, db_path);
        }
        if self.completed_at_frames == Some(shipped_frames) && !self.truncate_ready {
            return Ok(Outcome::Skipped);
        }
        let due = now.duration_since(self.last) >= self.policy.interval;
        if shipped_frames == 0
            || (shipped_frames < self.policy.min_pages
                && !due
                && file_frames < self.policy.max_pages)
        {
            return Ok(Outcome::Skipped);
        }
        self.passive(conn, db_path, shipped_frames, file_frames)
    }

    /// Runs a PASSIVE checkpoint now, whatever the thresholds say.
    pub fn passive(
        &mut self,
        conn: &Connection,
        db_path: &Path,
        shipped_frames: u64,
        file_frames: u64,
    ) -> Result<Outcome> {
        let r = db::checkpoint(conn, db_path, "PASSIVE")?;
        self.last = Instant::now();
        let complete = !r.busy && r.log_frames >= 0 && r.log_frames == r.checkpointed;
        self.completed_at_frames = complete.then_some(shipped_frames);
        if complete && file_frames >= self.policy.max_pages {
            // Truncate on the next pass, after the read lock has moved forward.
            self.truncate_ready = true;
        }
        tracing::debug!(db = %db_path.display(), log = r.log_frames, checkpointed = r.checkpointed, "PASSIVE checkpoint");
        Ok(Outcome::Passive { complete })
    }
}
