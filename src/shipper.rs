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

use crate::defaults;
use crate::error::{Error, Result};
use crate::generation::Manifest;
use crate::lineage::{Mark, Tip};
use crate::metrics::{ReplicaStatus, State};
use crate::replica::Replica;
use crate::segment::{SegmentHeader, WalPoint};
use crate::snapshot::SnapshotHeader;
use crate::wal::{self, WalCursor};

/// Distinct page bytes in one segment at most (a batch is cut at a commit
/// boundary once it holds this much): bounds the memory of one upload.
pub const MAX_SEGMENT_BYTES: u64 = 4 << 20;

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
            snapshot_interval: defaults::SNAPSHOT_INTERVAL,
            max_pending: defaults::MAX_PENDING,
            retry_after: defaults::MONITOR_INTERVAL,
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
    /// What the replica holds once this upload has landed.
    pub fn reaches(&self) -> Option<Mark> {
        let (h, _, _) = self.segments.last()?;
        Some(Mark {
            generation: h.generation.clone(),
            next_index: h.last_index() + 1,
            position: h.last_position,
        })
    }

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
    /// The newest generation id in the replica as last listed, or the one
    /// this shipper began since: a new generation's id sorts after it.
    newest_seen: Option<String>,
    /// The replica's newest restorable generation as found at start-up
    /// (see `lineage`), `None` in an empty replica.
    tip: Option<Tip>,
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
            newest_seen: None,
            tip: None,
        }
    }

    /// The newest generation id this shipper knows of in its replica.
    pub fn newest_seen(&self) -> Option<&str> {
        self.newest_seen.as_deref()
    }

    /// The replica's newest generation found at start-up.
    pub fn tip(&self) -> Option<&Tip> {
        self.tip.as_ref()
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
        self.note_pending();
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
        self.note_pending();
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
        if self.held.is_empty()
            && self.restart.is_none()
            && self.state.is_some()
            && self.retry_at.is_none()
        {
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
        self.note_pending();
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
        self.status.set_error(format!("{what}: {e}"));
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
    pub fn synced(&self, began: i64, began_mono: u64, wal_len: u64) {
        if self.attached() && self.held.is_empty() && self.retry_at.is_none() {
            let position = self.state.as_ref().map_or(0, |s| s.position);
            self.status.set_state(State::Replicating);
            self.status.synced(began, wal_len, position);
            self.status.synced_mono(began_mono);
        }
    }

    /// Tells the status how much is read and not yet stored.
    fn note_pending(&self) {
        self.status
            .set_pending(self.held.iter().map(|b| b.committed.frames).sum());
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
        self.newest_seen = Some(manifest.generation.clone());
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
        &mut self,
        page_size: u32,
    ) -> Result<std::result::Result<Shipping, String>> {
        if let Some(reason) = &self.restart {
            return Ok(Err(reason.clone()));
        }
        let gens = self.replica.generations().await?;
        self.newest_seen = gens.last().map(|g| g.id.clone());
        let Some(g) = gens.iter().rev().find(|g| !g.snapshots.is_empty()) else {
            return Ok(Err("no generation in replica".into()));
        };
        // Until the newest object is read: the snapshot is its end.
        self.tip = Some(Tip {
            generation: g.id.clone(),
            next_index: g.snapshots.last().map_or(0, |s| s.0),
            position: 0,
            timestamp_ms: g.snapshots.last().map_or(0, |s| s.1),
        });
        // Encryption turned on or off since: a new generation, so that no
        // generation mixes plain and encrypted objects.
        let encrypted = g.has_manifest
            && self
                .replica
                .get_manifest(&g.id)
                .await?
                .is_some_and(|m| m.encrypted);
        if encrypted != self.replica.encrypts() {
            return Ok(Err(format!(
                "encryption was turned {} since generation {}",
                if encrypted { "off" } else { "on" },
                g.id
            )));
        }
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
                // Its header only: the body may be encrypted to keys this
                // process does not hold (see `encryption`).
                let key = match n {
                    Ok(i) => crate::generation::layout::segment(&g.id, i),
                    Err(c) => crate::generation::layout::compacted(
                        &g.id,
                        c.level,
                        c.first,
                        c.last,
                        c.timestamp_ms,
                    ),
                };
                let got = self
                    .replica
                    .get_header::<SegmentHeader>(&key, crate::segment::MAGIC, "segment")
                    .await
                    .and_then(|header| {
                        let (first, last) = match n {
                            Ok(i) => (i, i),
                            Err(c) => (c.first, c.last),
                        };
                        if header.generation == g.id
                            && header.index == first
                            && header.last_index() == last
                        {
                            Ok(crate::segment::Segment {
                                header,
                                pages: Default::default(),
                            })
                        } else {
                            Err(self.replica.bad(&key, "header does not match its key"))
                        }
                    });
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
                self.tip = Some(Tip {
                    generation: g.id.clone(),
                    next_index: seg.header.last_index() + 1,
                    position: seg.header.last_position,
                    timestamp_ms: seg.header.timestamp_ms,
                });
                (
                    Some(seg.header.wal),
                    seg.header.page_size,
                    seg.header.last_position,
                    seg.header.last_index() + 1,
                )
            }
            None => {
                let key = crate::generation::layout::snapshot(&g.id, snap_index, snap_ms);
                let h: SnapshotHeader = self
                    .replica
                    .get_header(&key, crate::snapshot::MAGIC, "snapshot")
                    .await?;
                if let Some(t) = &mut self.tip {
                    t.position = h.position;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryStorage;
    use crate::storage::{ObjectMeta, Storage, StorageError};
    use std::sync::atomic::{AtomicBool, Ordering};

    const PS: u32 = 4096;

    /// In-memory storage whose writes fail while `down` is set.
    #[derive(Debug, Default)]
    struct Flaky {
        inner: MemoryStorage,
        down: AtomicBool,
    }

    #[async_trait::async_trait]
    impl Storage for Flaky {
        async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StorageError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StorageError::Backend {
                    op: "put",
                    location: self.location(),
                    key: key.into(),
                    message: "down".into(),
                });
            }
            self.inner.put(key, data).await
        }
        async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.inner.delete(key).await
        }
        fn location(&self) -> String {
            "memory://flaky".into()
        }
    }

    fn cursor(frames: u64) -> WalCursor {
        WalCursor {
            salt1: 1,
            salt2: 2,
            offset: wal::WAL_HEADER_SIZE + frames * (wal::FRAME_HEADER_SIZE + PS as u64),
            checksum: (frames as u32, 7),
            page_size: PS,
            big_endian: false,
        }
    }

    /// One transaction of `pages` distinct pages (numbered from `first`),
    /// ending at WAL frame `end`.
    fn batch(first: u32, pages: u32, end: u64) -> Arc<Batch> {
        let mut c = wal::Committed {
            frames: pages as u64,
            db_pages: first + pages - 1,
            min_db_pages: first + pages - 1,
            transactions: 1,
            ..Default::default()
        };
        for p in first..first + pages {
            c.pages.insert(p, vec![p as u8; PS as usize]);
        }
        Arc::new(Batch {
            committed: c,
            end: cursor(end),
        })
    }

    /// A shipper that started a generation (manifest and a one-page
    /// snapshot at WAL frame 0) on `storage`.
    fn attached(storage: Arc<Flaky>, opts: ShipperOptions) -> Shipper {
        let replica = Replica::new(storage);
        let mut s = Shipper::new(replica, ReplicaStatus::detached("app.db", "mem"), opts);
        let id = crate::generation::new_id();
        let manifest = Manifest {
            generation: id.clone(),
            started_at: Utc::now(),
            reason: "test".into(),
            page_size: PS,
            database: "app.db".into(),
            hostname: None,
            walstream_version: "test".into(),
            follows: None,
            previous: None,
            epoch: None,
            encrypted: false,
        };
        let header = SnapshotHeader {
            generation: id,
            index: 0,
            position: 0,
            page_size: PS,
            db_pages: 1,
            timestamp_ms: Utc::now().timestamp_millis(),
            wal: Some(WalPoint::from_cursor(&cursor(0))),
        };
        let tmp = tempfile::NamedTempFile::new().unwrap();
        crate::snapshot::write_file(&header, tmp.path(), |w| w.write_all(&[0u8; PS as usize]))
            .unwrap();
        rt().block_on(s.begin_generation(&manifest, &header, tmp.path(), Some(cursor(0))))
            .unwrap();
        s
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    fn upload(s: &mut Shipper, force: bool) -> Option<Option<Error>> {
        let u = s.plan(PS, Instant::now(), force)?;
        let out = rt().block_on(u.run());
        Some(s.uploaded(u, out))
    }

    #[test]
    fn held_batches_go_up_as_one_numbered_segment() {
        let storage = Arc::new(Flaky::default());
        let mut s = attached(storage.clone(), ShipperOptions::default());
        s.hold(batch(1, 2, 2));
        s.hold(batch(2, 3, 5));
        assert!(s.due(Instant::now()));
        assert!(upload(&mut s, false).unwrap().is_none());
        let st = s.state().unwrap();
        assert_eq!((st.next_index, st.position), (1, 5));
        assert_eq!(st.cursor, Some(cursor(5)));
        assert!(!s.holds_anything());
        let seg = rt()
            .block_on(s.replica().get_segment(&st.generation, 0))
            .unwrap();
        assert_eq!(seg.header.first_position, 0);
        assert_eq!(seg.header.last_position, 5);
        assert_eq!(seg.header.transactions, 2);
        // Page 2 of the later transaction wins.
        assert_eq!(seg.pages.len(), 4);
        assert_eq!(seg.pages[&2][0], 2);
        assert_eq!(seg.header.wal, WalPoint::from_cursor(&cursor(5)));
    }

    #[test]
    fn a_sync_interval_spaces_uploads_unless_a_segment_is_held() {
        let storage = Arc::new(Flaky::default());
        let opts = ShipperOptions {
            sync_interval: Duration::from_secs(3600),
            ..Default::default()
        };
        let mut s = attached(storage, opts);
        s.hold(batch(1, 1, 1));
        // The first commit after a quiet spell ships at once.
        assert!(upload(&mut s, false).is_some());
        s.hold(batch(2, 1, 2));
        assert!(!s.due(Instant::now()));
        assert!(s.plan(PS, Instant::now(), false).is_none());
        assert!(s.wants_round_in(Instant::now()).unwrap() > Duration::from_secs(3000));
        // A segment's worth held goes up at once.
        let pages = (MAX_SEGMENT_BYTES / PS as u64) as u32;
        s.hold(batch(3, pages, 2 + pages as u64));
        assert!(s.due(Instant::now()));
        assert!(upload(&mut s, false).unwrap().is_none());
        assert_eq!(s.state().unwrap().position, 2 + pages as u64);
        // At shutdown everything goes, whatever the interval.
        s.hold(batch(1, 1, 3 + pages as u64));
        assert!(upload(&mut s, true).unwrap().is_none());
        assert!(!s.holds_anything());
    }

    #[test]
    fn a_failing_replica_holds_then_detaches_past_max_pending() {
        let storage = Arc::new(Flaky::default());
        let opts = ShipperOptions {
            max_pending: 10 * PS as u64,
            retry_after: Duration::from_millis(1),
            ..Default::default()
        };
        let mut s = attached(storage.clone(), opts);
        storage.down.store(true, Ordering::SeqCst);
        s.hold(batch(1, 4, 4));
        assert!(upload(&mut s, false).unwrap().is_some());
        // Nothing was lost: the batch is still held, and the position stands.
        assert_eq!(s.held_bytes(), 4 * PS as u64);
        assert_eq!(s.state().unwrap().position, 0);
        assert_eq!(s.status().state(), State::Failing);
        s.hold(batch(5, 4, 8));
        assert!(s.attached());
        s.hold(batch(9, 4, 12));
        // Past max-pending: detached, holding nothing, and the next start
        // begins a new generation saying why.
        assert!(!s.attached());
        assert_eq!(s.held_bytes(), 0);
        s.hold(batch(13, 1, 13));
        assert_eq!(s.held_bytes(), 0, "a detached replica holds nothing");
        assert!(s.restart_reason().unwrap().contains("max-pending"));
        let found = rt().block_on(s.find_resume(PS)).unwrap();
        assert!(found.unwrap_err().contains("max-pending"));
        assert!(s.plan(PS, Instant::now(), true).is_none());
    }

    #[test]
    fn failed_uploads_resume_where_they_stopped() {
        let storage = Arc::new(Flaky::default());
        let opts = ShipperOptions {
            retry_after: Duration::from_millis(1),
            ..Default::default()
        };
        let mut s = attached(storage.clone(), opts);
        s.hold(batch(1, 1, 1));
        assert!(upload(&mut s, false).unwrap().is_none());
        storage.down.store(true, Ordering::SeqCst);
        s.hold(batch(2, 1, 2));
        assert!(upload(&mut s, false).unwrap().is_some());
        s.hold(batch(3, 1, 3));
        storage.down.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        assert!(upload(&mut s, false).unwrap().is_none());
        let st = s.state().unwrap().clone();
        assert_eq!((st.next_index, st.position), (2, 3));
        // A new shipper on the same storage (a restart) finds exactly where
        // it ends: the next index, the position, the WAL point.
        let mut fresh = Shipper::new(
            Replica::new(storage.clone()),
            ReplicaStatus::detached("app.db", "mem"),
            ShipperOptions::default(),
        );
        let found = rt().block_on(fresh.find_resume(PS)).unwrap().unwrap();
        assert_eq!(found.generation, st.generation);
        assert_eq!((found.next_index, found.position), (2, 3));
        assert_eq!(found.cursor, Some(cursor(3)));
        // Another page size cannot continue it.
        let other = rt().block_on(fresh.find_resume(PS * 2)).unwrap();
        assert!(other.unwrap_err().contains("page size"));
    }
}
