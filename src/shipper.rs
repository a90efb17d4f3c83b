//! One replica of one database: where its generation stands, what it holds
//! that is not stored yet, and when it uploads.
//!
//! The database's [`crate::source::Source`] reads each committed transaction
//! from the WAL once and hands it to every shipper as a shared [`Batch`]. A
//! shipper holds batches in memory until its own `sync-interval` says upload
//! (or one segment's worth is held), then stores them as numbered segments of
//! its generation. It never touches SQLite: the worker gives it batches and
//! snapshot files, so everything here runs on in-memory storage in tests.
//!
//! Invariant, while a shipper is *attached*: its shipped position followed by
//! its held batches ends exactly where the source reads next. Because every
//! attached shipper holds what it has not stored, the source may move its
//! read lock (and let the WAL be checkpointed and rewound) without waiting for
//! any replica. Memory is what bounds a replica whose storage keeps failing:
//! past `max-pending` held bytes it drops what it holds and *detaches*; the
//! worker then starts a new generation for it, from a fresh snapshot, once its
//! storage answers again. Until then it costs the database nothing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::error::{Error, IoContext, Result};
use crate::generation::Manifest;
use crate::metrics::{ReplicaStatus, State};
use crate::replica::Replica;
use crate::segment::{SegmentHeader, WalPoint};
use crate::snapshot::SnapshotHeader;
use crate::wal::{self, WalCursor};

/// Distinct page bytes in one segment at most (a batch is cut at a commit
/// boundary once it holds this much): bounds the memory of one upload.
pub const MAX_SEGMENT_BYTES: u64 = 4 << 20;

/// Default `max-pending`: how many bytes of page data a replica may hold
/// while its storage fails before it is detached (see the module doc).
pub const DEFAULT_MAX_PENDING: u64 = 64 << 20;

/// Longest wait between two upload attempts of a failing replica.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Tunables of one replica.
#[derive(Debug, Clone)]
pub struct ShipperOptions {
    /// Minimum time between two uploads (the first commit after a quiet
    /// spell ships at once).
    pub sync_interval: Duration,
    pub snapshot_interval: Duration,
    /// Held bytes past which a failing replica is detached.
    pub max_pending: u64,
    /// First wait after a failed upload; doubles up to 30 s.
    pub retry_after: Duration,
}

impl Default for ShipperOptions {
    fn default() -> Self {
        ShipperOptions {
            sync_interval: Duration::ZERO,
            snapshot_interval: Duration::from_secs(24 * 3600),
            max_pending: DEFAULT_MAX_PENDING,
            retry_after: Duration::from_secs(1),
        }
    }
}

/// Whole transactions read from the WAL, and the WAL position after them.
#[derive(Debug)]
pub struct Batch {
    pub committed: wal::Committed,
    pub end: WalCursor,
}

/// Where a generation's shipping stands, kept in memory so the hot path
/// never lists.
#[derive(Debug, Clone)]
pub struct Shipping {
    pub generation: String,
    pub next_index: u64,
    /// WAL frames stored in the generation.
    pub position: u64,
    /// WAL position up to which everything is stored; `None` while the WAL
    /// is empty (truncated, or not yet written).
    pub cursor: Option<WalCursor>,
    pub last_snapshot_ms: i64,
    /// Position of the last snapshot this process stored, if any.
    pub snapshot_position: Option<u64>,
}

/// Segments to store, in order, built from the front of what is held. Owns
/// what it needs, so the uploads of several replicas run concurrently.
pub struct Upload {
    replica: Replica,
    segments: Vec<(SegmentHeader, Arc<Batch>, usize)>,
}

/// What an [`Upload`] achieved: the bytes of each segment stored, in order,
/// and the error that stopped it, if any.
pub struct Uploaded {
    stored: Vec<u64>,
    error: Option<Error>,
    started: Instant,
}

impl Upload {
    pub async fn run(&self) -> Uploaded {
        let started = Instant::now();
        let mut stored = Vec::new();
        for (header, batch, _) in &self.segments {
            match self
                .replica
                .put_segment(header, &batch.committed.pages)
                .await
            {
                Ok(bytes) => stored.push(bytes),
                Err(e) => {
                    return Uploaded {
                        stored,
                        error: Some(e),
                        started,
                    }
                }
            }
        }
        Uploaded {
            stored,
            error: None,
            started,
        }
    }
}

pub struct Shipper {
    replica: Replica,
    status: Arc<ReplicaStatus>,
    opts: ShipperOptions,
    state: Option<Shipping>,
    held: VecDeque<Arc<Batch>>,
    held_bytes: u64,
    last_upload: Option<Instant>,
    /// `Some(reason)` while detached: the next start begins a new generation
    /// for this reason, and nothing is held until then.
    restart: Option<String>,
    /// A failing replica is not tried again before this.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Every event about this replica is logged inside it (the replica as a
    /// structured field of the span, the database in the event).
    span: tracing::Span,
}

impl Shipper {
    pub fn new(replica: Replica, status: Arc<ReplicaStatus>, opts: ShipperOptions) -> Shipper {
        let backoff = opts.retry_after;
        Shipper {
            replica,
            status: status.clone(),
            opts,
            state: None,
            held: VecDeque::new(),
            held_bytes: 0,
            last_upload: None,
            restart: None,
            retry_at: None,
            backoff,
            span: tracing::info_span!("ship", replica = %status.replica),
        }
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    pub fn status(&self) -> &Arc<ReplicaStatus> {
        &self.status
    }

    pub fn options(&self) -> &ShipperOptions {
        &self.opts
    }

    pub fn state(&self) -> Option<&Shipping> {
        self.state.as_ref()
    }

    /// Receives batches, and its shipped position plus what it holds ends
    /// where the source reads next.
    pub fn attached(&self) -> bool {
        self.state.is_some() && self.restart.is_none()
    }

    /// Why the next start begins a new generation, while detached.
    pub fn restart_reason(&self) -> Option<&str> {
        self.restart.as_deref()
    }

    /// Detaches: nothing more goes into the current generation, and the next
    /// start begins a new one for `reason`.
    pub fn force_new_generation(&mut self, reason: String) {
        self.held.clear();
        self.held_bytes = 0;
        self.restart = Some(reason);
    }

    /// Page bytes held and not yet stored.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    pub fn holds_anything(&self) -> bool {
        !self.held.is_empty()
    }

    /// Takes a batch the source read. Past `max-pending` everything held is
    /// dropped and the shipper detaches (see the module doc).
    pub fn hold(&mut self, batch: Arc<Batch>) {
        let span = self.span.clone();
        let _span = span.enter();
        if !self.attached() {
            return;
        }
        self.held_bytes += batch.committed.page_bytes();
        self.held.push_back(batch);
        if self.held_bytes > self.opts.max_pending {
            let reason = format!(
                "the replica fell more than max-pending ({} bytes) behind",
                self.opts.max_pending
            );
            tracing::warn!(
                db = %self.status.db,
                replica = %self.status.replica,
                held = self.held_bytes,
                "{reason}; dropping what it holds, a new generation follows once its storage answers"
            );
            self.force_new_generation(reason);
        }
    }

    /// With nothing held, the stored position is where the source reads
    /// next (after a truncation or a rewind with nothing new, that is not
    /// where the last batch ended).
    pub fn caught_up(&mut self, source_cursor: Option<WalCursor>) {
        if self.held.is_empty() && self.restart.is_none() {
            if let Some(st) = self.state.as_mut() {
                st.cursor = source_cursor;
            }
        }
    }

    /// Whether a retry of a failed attempt may happen at `now`.
    pub fn may_try(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| now >= t)
    }

    /// Whether what is held should go up now: a segment's worth is held, or
    /// the sync-interval since the last upload has passed.
    pub fn due(&self, now: Instant) -> bool {
        !self.held.is_empty()
            && self.may_try(now)
            && (self.held_bytes >= MAX_SEGMENT_BYTES || self.spacing_left(now).is_zero())
    }

    /// What is left of the sync-interval since the last upload.
    pub fn spacing_left(&self, now: Instant) -> Duration {
        self.last_upload.map_or(Duration::ZERO, |t| {
            self.opts
                .sync_interval
                .saturating_sub(now.saturating_duration_since(t))
        })
    }

    /// When this shipper next wants a round, if it holds anything or must
    /// restart: its retry time, or the end of its sync-interval.
    pub fn wants_round_in(&self, now: Instant) -> Option<Duration> {
        if self.held.is_empty() && self.restart.is_none() && self.state.is_some() {
            return None;
        }
        let retry = self
            .retry_at
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        Some(retry.max(if self.held.is_empty() {
            Duration::ZERO
        } else {
            self.spacing_left(now)
        }))
    }

    /// Segments for everything held (`force`) or for what is due, built from
    /// the front of the held batches, each at most `MAX_SEGMENT_BYTES` of
    /// distinct pages unless one batch alone is larger.
    pub fn plan(&self, page_size: u32, now: Instant, force: bool) -> Option<Upload> {
        if !self.attached() || self.held.is_empty() || !(force || self.due(now)) {
            return None;
        }
        let st = self.state.as_ref().expect("attached");
        let (mut index, mut position) = (st.next_index, st.position);
        let mut segments = Vec::new();
        let mut i = 0;
        while i < self.held.len() {
            let mut take = 1;
            let mut bytes = self.held[i].committed.page_bytes();
            while i + take < self.held.len() {
                let next = self.held[i + take].committed.page_bytes();
                if bytes + next > MAX_SEGMENT_BYTES {
                    break;
                }
                bytes += next;
                take += 1;
            }
            let batch = if take == 1 {
                self.held[i].clone()
            } else {
                let mut c = wal::Committed::default();
                for b in self.held.range(i..i + take) {
                    c.append(b.committed.clone());
                }
                Arc::new(Batch {
                    committed: c,
                    end: self.held[i + take - 1].end,
                })
            };
            let c = &batch.committed;
            let header = SegmentHeader {
                generation: st.generation.clone(),
                index,
                first_position: position,
                last_position: position + c.frames,
                page_size,
                db_pages: c.db_pages,
                timestamp_ms: Utc::now().timestamp_millis(),
                transactions: c.transactions,
                page_count: c.pages.len() as u64,
                wal: WalPoint::from_cursor(&batch.end),
                level: 0,
                last_index: None,
                // A commit inside the segment shrank the database: pages
                // above that size must be cut before the body is applied.
                min_db_pages: (c.min_db_pages < c.db_pages).then_some(c.min_db_pages),
                first_timestamp_ms: None,
            };
            index += 1;
            position = header.last_position;
            segments.push((header, batch, take));
            i += take;
        }
        Some(Upload {
            replica: self.replica.clone(),
            segments,
        })
    }

    /// Applies what an upload from `plan` achieved: advances the stored
    /// position past every stored segment and drops their batches; on an
    /// error, backs off (the rest stays held). Returns the error.
    pub fn uploaded(&mut self, upload: Upload, outcome: Uploaded) -> Option<Error> {
        let span = self.span.clone();
        let _span = span.enter();
        self.last_upload = Some(outcome.started);
        for ((header, batch, take), bytes) in upload.segments.iter().zip(&outcome.stored) {
            for _ in 0..*take {
                let b = self.held.pop_front().expect("planned from what is held");
                self.held_bytes -= b.committed.page_bytes();
            }
            self.status.shipped_segment(*bytes);
            tracing::debug!(
                db = %self.status.db,
                replica = %self.status.replica,
                generation = %header.generation,
                index = header.index,
                position = header.last_position,
                transactions = header.transactions,
                pages = header.page_count,
                bytes,
                "shipped segment"
            );
            let st = self.state.as_mut().expect("attached");
            st.cursor = Some(batch.end);
            st.position = header.last_position;
            st.next_index = header.index + 1;
        }
        self.note_shipped();
        match outcome.error {
            None => {
                self.succeeded();
                None
            }
            Some(e) => {
                self.failed(&e, "upload failed");
                Some(e)
            }
        }
    }

    /// Records a failed attempt (upload, snapshot, start): backs off.
    pub fn failed(&mut self, e: &Error, what: &str) {
        let span = self.span.clone();
        let _span = span.enter();
        self.status.set_state(State::Failing);
        tracing::warn!(
            db = %self.status.db,
            replica = %self.status.replica,
            error = %e,
            retry_in = ?self.backoff,
            "{what}, will retry"
        );
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn succeeded(&mut self) {
        self.retry_at = None;
        self.backoff = self.opts.retry_after;
    }

    /// Tells the status how far the current generation is stored.
    pub fn note_shipped(&self) {
        if let Some(st) = &self.state {
            self.status.set_shipped(&st.generation, st.position);
        }
    }

    /// Records a round after which this replica has everything committed
    /// before `began` (ms), if it does: attached and holding nothing.
    pub fn synced(&self, began: i64, wal_len: u64) {
        if self.attached() && self.held.is_empty() && self.retry_at.is_none() {
            let position = self.state.as_ref().map_or(0, |s| s.position);
            self.status.set_state(State::Replicating);
            self.status.synced(began, wal_len, position);
        }
    }

    /// Whether a periodic snapshot is due: a snapshot is an image at the
    /// stored position, so not while anything is held. When nothing was
    /// stored since the last one, the last one still stands and only its
    /// time is renewed.
    pub fn snapshot_due(&mut self, now_ms: i64) -> bool {
        if !self.attached() || !self.held.is_empty() || !self.may_try(Instant::now()) {
            return false;
        }
        let st = self.state.as_mut().expect("attached");
        if now_ms - st.last_snapshot_ms < self.opts.snapshot_interval.as_millis() as i64 {
            return false;
        }
        if st.snapshot_position == Some(st.position) {
            st.last_snapshot_ms = now_ms;
            return false;
        }
        true
    }

    /// The header of a snapshot at the stored position.
    pub fn snapshot_header(&self, page_size: u32, db_pages: u32, now_ms: i64) -> SnapshotHeader {
        let st = self.state.as_ref().expect("started");
        SnapshotHeader {
            generation: st.generation.clone(),
            index: st.next_index,
            position: st.position,
            page_size,
            db_pages,
            timestamp_ms: now_ms,
            wal: st.cursor.as_ref().map(WalPoint::from_cursor),
        }
    }

    /// Stores a snapshot file written for `header` (from `snapshot_header`,
    /// or from `begin_generation`'s manifest).
    pub async fn put_snapshot(
        &self,
        header: &SnapshotHeader,
        path: &std::path::Path,
    ) -> Result<u64> {
        self.replica.put_snapshot_file(header, path).await
    }

    /// Records a stored snapshot.
    pub fn snapshot_stored(&mut self, header: &SnapshotHeader, bytes: u64) {
        let span = self.span.clone();
        let _span = span.enter();
        self.status.shipped_snapshot(bytes);
        tracing::info!(
            db = %self.status.db,
            replica = %self.status.replica,
            generation = %header.generation,
            index = header.index,
            db_pages = header.db_pages,
            bytes,
            "stored snapshot"
        );
        if let Some(st) = self.state.as_mut() {
            st.last_snapshot_ms = header.timestamp_ms;
            st.snapshot_position = Some(header.position);
        }
        self.succeeded();
    }

    /// Stores the manifest and the first snapshot of a new generation, and
    /// attaches at `cursor` (where the snapshot's image ends and the source
    /// reads next). Until both are stored the shipper stays as it was.
    pub async fn begin_generation(
        &mut self,
        manifest: &Manifest,
        snapshot: &SnapshotHeader,
        path: &std::path::Path,
        cursor: Option<WalCursor>,
    ) -> Result<()> {
        self.replica.put_manifest(manifest).await?;
        let bytes = self.replica.put_snapshot_file(snapshot, path).await?;
        tracing::info!(
            parent: &self.span,
            db = %self.status.db,
            replica = %self.replica.location(),
            generation = %manifest.generation,
            reason = %manifest.reason,
            "starting new generation"
        );
        self.held.clear();
        self.held_bytes = 0;
        self.restart = None;
        self.state = Some(Shipping {
            generation: manifest.generation.clone(),
            next_index: 0,
            position: 0,
            cursor,
            last_snapshot_ms: 0,
            snapshot_position: None,
        });
        self.snapshot_stored(snapshot, bytes);
        self.note_shipped();
        Ok(())
    }

    /// Attaches to a generation found by `find_resume` whose end the WAL
    /// provably continues at `cursor`, holding `gap` (the transactions
    /// between the generation's end and where the source reads next).
    pub fn resume(&mut self, state: Shipping, gap: Vec<Arc<Batch>>) {
        let span = self.span.clone();
        let _span = span.enter();
        tracing::info!(
            db = %self.status.db,
            replica = %self.replica.location(),
            generation = %state.generation,
            position = state.position,
            "resuming generation"
        );
        self.state = Some(state);
        self.restart = None;
        self.held.clear();
        self.held_bytes = 0;
        for b in gap {
            self.held_bytes += b.committed.page_bytes();
            self.held.push_back(b);
        }
        self.note_shipped();
    }

    /// The newest generation of the replica and where it ends, if it can be
    /// continued by a database of `page_size`: `Ok(Err(reason))` when a new
    /// generation is needed. Whether the WAL continues it is for the caller
    /// to check (against `Shipping::cursor`).
    pub async fn find_resume(
        &self,
        page_size: u32,
    ) -> Result<std::result::Result<Shipping, String>> {
        if let Some(reason) = &self.restart {
            return Ok(Err(reason.clone()));
        }
        let gens = self.replica.generations().await?;
        let Some(g) = gens.iter().rev().find(|g| !g.snapshots.is_empty()) else {
            return Ok(Err("no generation in replica".into()));
        };
        let &(snap_index, snap_ms, _) = g.snapshots.last().expect("non-empty");
        // The newest object after the snapshot: a plain segment, or a merged
        // object once compaction has replaced the plain ones.
        let last_plain = g.segments.last().map(|&(i, _)| i);
        let last_merged = g
            .compacted
            .iter()
            .max_by_key(|c| (c.last, c.level))
            .copied();
        let newest = match (last_plain, last_merged) {
            (Some(i), Some(c)) if c.last > i => Some(Err(c)),
            (Some(i), _) => Some(Ok(i)),
            (None, Some(c)) => Some(Err(c)),
            (None, None) => None,
        }
        .filter(|n| {
            let last = match n {
                Ok(i) => *i,
                Err(c) => c.last,
            };
            last + 1 >= snap_index
        });
        let (point, found_page_size, position, next_index) = match newest {
            Some(n) => {
                let got = match n {
                    Ok(i) => self.replica.get_segment(&g.id, i).await,
                    Err(c) => self.replica.get_compacted(&g.id, &c).await,
                };
                let seg = match got {
                    Ok(seg) => seg,
                    // A torn or foreign newest object proves nothing about
                    // where the replica ends: start over rather than
                    // continue after it.
                    Err(e @ (Error::Corrupt { .. } | Error::BadObject { .. })) => {
                        tracing::warn!(parent: &self.span, error = %e, "newest object of the replica is unreadable");
                        return Ok(Err(format!("newest object is unreadable: {e}")));
                    }
                    Err(e) => return Err(e),
                };
                (
                    Some(seg.header.wal),
                    seg.header.page_size,
                    seg.header.last_position,
                    seg.header.last_index() + 1,
                )
            }
            None => {
                let tmp = tempfile::NamedTempFile::new()
                    .io_ctx("create temporary file in", &std::env::temp_dir())?;
                let (h, _) = self
                    .replica
                    .get_snapshot_file(&g.id, snap_index, snap_ms, tmp.path())
                    .await?;
                (h.wal, h.page_size, h.position, snap_index)
            }
        };
        if found_page_size != page_size {
            return Ok(Err(format!(
                "page size changed from {found_page_size} to {page_size}"
            )));
        }
        let Some(point) = point else {
            return Ok(Err(format!(
                "generation {} ends before any WAL was written",
                g.id
            )));
        };
        Ok(Ok(Shipping {
            generation: g.id.clone(),
            next_index,
            position,
            cursor: Some(point.to_cursor(page_size)),
            last_snapshot_ms: snap_ms,
            snapshot_position: None,
        }))
    }
}
