//! Verification: proof that a replica restores, not just that uploads worked.
//!
//! Every object is downloaded and its checksum checked; every generation's
//! positions must chain from each snapshot through its segments and merged
//! objects without a gap; the newest state is restored to a temporary file
//! (which runs `PRAGMA integrity_check`); and, given the live database, the
//! restored pages are compared with the live database's pages as of the
//! restored WAL position, under a read transaction so no checkpoint can change
//! them meanwhile. Each problem is reported as one fault naming the object.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::db;
use crate::error::{Error, IoContext, Result};
use crate::generation::layout;
use crate::replica::{GenerationListing, Replica};
use crate::restore::{self, RestoreOptions, RestoreOutcome};
use crate::segment::WalPoint;
use crate::wal;

#[derive(Debug, Default)]
pub struct Report {
    pub generations: usize,
    pub objects: usize,
    /// One line per problem; empty when everything holds.
    pub faults: Vec<String>,
    /// (generation, position, time ms) of the restored newest state.
    pub restored: Option<(String, u64, i64)>,
    /// Set when the live database was compared: the WAL position compared at.
    pub compared_at: Option<u64>,
    /// Why the live database could not be compared (it kept moving, or the
    /// replica is behind): not a fault in the replica's objects.
    pub not_compared: Option<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.faults.is_empty() && self.not_compared.is_none()
    }
}

/// Verifies `replica`; with `live`, also compares the restored state with that
/// database. `tmp` is a directory for temporary files.
pub async fn verify(replica: &Replica, live: Option<&Path>, tmp: &Path) -> Result<Report> {
    let mut report = Report::default();
    let gens = replica.generations().await?;
    report.generations = gens.len();
    for g in &gens {
        check_generation(replica, g, tmp, &mut report).await;
    }
    // Restore the newest state; with a live database, retry a few times when
    // the database is ahead of the replica (walstream may be catching up).
    let attempts = if live.is_some() { 6 } else { 1 };
    for attempt in 0..attempts {
        let out = tmp.join(format!("verify-{}-{attempt}.db", std::process::id()));
        let opts = RestoreOptions {
            output: out.clone(),
            concurrency: 4,
            ..Default::default()
        };
        let outcome = match restore::restore(replica, &opts).await {
            Ok(o) => o,
            Err(e) => {
                report
                    .faults
                    .push(format!("restore of the newest state failed: {e}"));
                return Ok(report);
            }
        };
        let RestoreOutcome::Restored {
            generation,
            position,
            wal,
            timestamp_ms,
            ..
        } = outcome
        else {
            report.faults.push("nothing to restore".into());
            return Ok(report);
        };
        let at = format!("generation {generation}, position {position}");
        report.restored = Some((generation, position, timestamp_ms));
        let Some(db) = live else {
            let _ = std::fs::remove_file(&out);
            return Ok(report);
        };
        let result = compare_live(db, &out, wal);
        let _ = std::fs::remove_file(&out);
        match result? {
            Compared::Same(at) => {
                report.compared_at = Some(at);
                report.not_compared = None;
                return Ok(report);
            }
            Compared::Differs(m) => {
                report.faults.push(format!(
                    "{at}: restored state differs from {} at the same WAL position: {m}",
                    db.display()
                ));
                return Ok(report);
            }
            Compared::NotComparable(m) => {
                report.not_compared = Some(format!("{at}: {m}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(report)
}

/// Downloads and checks every object of one generation and their chaining.
async fn check_generation(replica: &Replica, g: &GenerationListing, tmp: &Path, r: &mut Report) {
    let mut fault = |key: String, m: String| r.faults.push(format!("{key}: {m}"));
    // index -> (first position, last position) of plain segments.
    let mut segs: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut page_size = None;
    let mut objects = 0;
    for &(index, ms, _) in &g.snapshots {
        objects += 1;
        let key = layout::snapshot(&g.id, index, ms);
        let path: PathBuf = tmp.join(format!("verify-snapshot-{}", std::process::id()));
        match replica.get_snapshot_file(&g.id, index, ms, &path).await {
            Ok((h, mut image)) => {
                let admitted = h.db_pages as u64 * h.page_size as u64 + 1;
                let n = std::io::copy(&mut (&mut image).take(admitted), &mut std::io::sink());
                match n {
                    Ok(n) if n == h.db_pages as u64 * h.page_size as u64 => {}
                    Ok(n) => fault(
                        key.clone(),
                        crate::snapshot::size_fault(n, h.db_pages, h.page_size),
                    ),
                    Err(e) => fault(key.clone(), e.to_string()),
                }
                if *page_size.get_or_insert(h.page_size) != h.page_size {
                    fault(
                        key.clone(),
                        "page size differs within the generation".into(),
                    );
                }
                if h.timestamp_ms != ms {
                    fault(key, "timestamp differs from its key".into());
                }
            }
            Err(e) => fault(key, e.to_string()),
        }
        let _ = std::fs::remove_file(&path);
    }
    for &(index, _) in &g.segments {
        objects += 1;
        match replica.get_segment(&g.id, index).await {
            Ok(s) => {
                if *page_size.get_or_insert(s.header.page_size) != s.header.page_size {
                    fault(
                        layout::segment(&g.id, index),
                        "page size differs within the generation".into(),
                    );
                }
                segs.insert(index, (s.header.first_position, s.header.last_position));
            }
            Err(e) => fault(layout::segment(&g.id, index), e.to_string()),
        }
    }
    let mut merged: Vec<(u64, u64, u64, u64, String)> = Vec::new();
    for c in &g.compacted {
        objects += 1;
        let key = layout::compacted(&g.id, c.level, c.first, c.last, c.timestamp_ms);
        match replica.get_compacted(&g.id, c).await {
            Ok(s) => merged.push((
                c.first,
                c.last,
                s.header.first_position,
                s.header.last_position,
                key,
            )),
            Err(e) => fault(key, e.to_string()),
        }
    }
    r.objects += objects;
    // Positions chain between neighbouring plain segments.
    let mut prev: Option<(u64, u64)> = None;
    for (&i, &(first, last)) in &segs {
        if let Some((pi, plast)) = prev {
            if pi + 1 == i && plast != first {
                fault(
                    layout::segment(&g.id, i),
                    format!("starts at position {first} but segment {pi} ends at {plast}"),
                );
            }
        }
        prev = Some((i, last));
    }
    // Where each index's history ends, from either kind of object.
    let end_before = |i: u64| -> Option<u64> {
        if i == 0 {
            return Some(0);
        }
        segs.get(&(i - 1))
            .map(|s| s.1)
            .or_else(|| merged.iter().find(|m| m.1 == i - 1).map(|m| m.3))
    };
    for m in &merged {
        if let Some(end) = end_before(m.0) {
            if end != m.2 {
                fault(
                    m.4.clone(),
                    format!(
                        "starts at position {} but the history before it ends at {end}",
                        m.2
                    ),
                );
            }
        }
        if let Some(&(_, last)) = segs.get(&m.1) {
            if last != m.3 {
                fault(
                    m.4.clone(),
                    format!(
                        "ends at position {} but segment {} ends at {last}",
                        m.3, m.1
                    ),
                );
            }
        }
    }
    // Every snapshot's history continues without a gap to the newest object.
    let newest = segs.keys().copied().chain(merged.iter().map(|m| m.1)).max();
    for &(index, ms, _) in &g.snapshots {
        let mut i = index;
        while newest.is_some_and(|n| i <= n) {
            if segs.contains_key(&i) {
                i += 1;
            } else if let Some(m) = merged.iter().filter(|m| m.0 == i).max_by_key(|m| m.1) {
                i = m.1 + 1;
            } else {
                fault(
                    layout::segment(&g.id, i),
                    format!(
                        "missing: the history after snapshot {} stops at segment {i}",
                        layout::snapshot(&g.id, index, ms)
                    ),
                );
                break;
            }
        }
    }
}

enum Compared {
    Same(u64),
    Differs(String),
    NotComparable(String),
}

/// Compares `restored` with the live database as of `restored_wal`.
fn compare_live(db: &Path, restored: &Path, restored_wal: Option<WalPoint>) -> Result<Compared> {
    let live = db::DbFile::open(db)?;
    let conn = live.connect(Duration::from_secs(5))?;
    db::begin_read(&conn, db)?;
    let result = (|| {
        let page_size: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(|e| Error::Sqlite {
                path: db.to_path_buf(),
                source: e,
            })?;
        let wal_path = db::wal_path(db);
        let live_end = match File::open(&wal_path) {
            Ok(mut f) => match wal::read_header(&mut f).io_ctx("read", &wal_path)? {
                Some(h) => Some(
                    wal::read_committed(&mut f, &h.start(), None)
                        .io_ctx("read", &wal_path)?
                        .1,
                ),
                None => None,
            },
            Err(_) => None,
        };
        let live_point = live_end.as_ref().map(WalPoint::from_cursor);
        // At the same WAL position the pages must be equal. At different
        // positions (the database moved on, or its WAL was checkpointed away
        // when the last connection closed) equal pages still prove a match,
        // but different ones prove nothing.
        let same_position = live_point == restored_wal;
        let not_comparable = || {
            Compared::NotComparable(format!(
                "the live database (WAL {}) is not at the replica's position (WAL {}): not caught up, content not compared",
                wal_at(live_point.map(|p| p.offset)),
                wal_at(restored_wal.map(|p| p.offset))
            ))
        };
        let plan = db::image_plan(&live, page_size, live_end.as_ref())?;
        let file = File::open(restored).io_ctx("open", restored)?;
        let restored_len = file.metadata().io_ctx("stat", restored)?.len();
        let mut cmp = Comparer {
            other: std::io::BufReader::with_capacity(1 << 20, file),
            offset: 0,
            first_diff: None,
            buf: Vec::new(),
        };
        plan.write_to(&live, &mut cmp).io_ctx("read", db)?;
        if !same_position && (cmp.offset != restored_len || cmp.first_diff.is_some()) {
            return Ok(not_comparable());
        }
        if cmp.offset != restored_len {
            return Ok(Compared::Differs(format!(
                "{} pages live, {} restored",
                cmp.offset / page_size as u64,
                restored_len / page_size as u64
            )));
        }
        if let Some(off) = cmp.first_diff {
            return Ok(Compared::Differs(format!(
                "page {} differs",
                off / page_size as u64 + 1
            )));
        }
        Ok(Compared::Same(live_end.map_or(0, |c| c.offset)))
    })();
    let _ = db::end_read(&conn, db);
    result
}

/// A writer that compares what it is given with a file, remembering the
/// first offset where they differ: pages are compared as the image is built,
/// without holding either database in memory.
struct Comparer {
    other: std::io::BufReader<File>,
    offset: u64,
    first_diff: Option<u64>,
    buf: Vec<u8>,
}

impl Write for Comparer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.resize(data.len(), 0);
        let mut got = 0;
        while got < data.len() {
            match self.other.read(&mut self.buf[got..])? {
                0 => break,
                n => got += n,
            }
        }
        if self.first_diff.is_none() && (got < data.len() || self.buf[..] != data[..]) {
            let at = data
                .iter()
                .zip(&self.buf[..got])
                .position(|(a, b)| a != b)
                .unwrap_or(got);
            self.first_diff = Some(self.offset + at as u64);
        }
        self.offset += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A WAL position for people: an offset, or that there was no WAL.
fn wal_at(offset: Option<u64>) -> String {
    match offset {
        Some(o) => format!("offset {o}"),
        None => "empty".into(),
    }
}
