//! Where a database stands in its replicas' histories, so that a stale copy
//! cannot silently become a replica's newest state.
//!
//! A node started from last week's disk image, or a second database given
//! the same replica by mistake, looks to the replicator like any database
//! whose WAL does not continue the replica's newest generation: a new
//! generation would start, and restore would return that copy instead of
//! the primary's state. What tells the two apart is a small record kept
//! beside the database (`PATH-walstream-lineage`, never in it), per replica:
//! the generation and the segment index up to which the database's content
//! includes that replica's history.
//!
//! * `replicate` records, before each upload, what the upload will reach
//!   (the frames are already in the database's own WAL, so the database
//!   holds them even if the upload never lands, or lands and the process
//!   dies before it hears so).
//! * `restore` records the generation and index it restored to; a
//!   follower's position file (see `follow`) says the same of its copy.
//!
//! A replicator that must start a new generation in a replica which already
//! has one accepts the database only if its record reaches the replica's
//! newest generation's end (it holds everything the replica holds). A copy
//! of the disk taken earlier has an older record and is refused, naming
//! both, unless `--takeover` says it is the new truth. A database with no
//! record (first run with this version, or restored by another tool) is
//! accepted with a warning when the replica's newest generation was
//! written for the same database path, and refused when it belongs to
//! another database.

use std::collections::BTreeMap;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use chrono::DateTime;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::generation::Manifest;

/// How far a database's content includes one replica's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mark {
    pub generation: String,
    /// The first segment index of that generation the database does not
    /// (provably) hold.
    pub next_index: u64,
    pub position: u64,
}

/// `PATH-walstream-lineage`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Record {
    /// Format of this file (1).
    version: u32,
    /// By replica location (`file:///...`, `s3://bucket/prefix`).
    replicas: BTreeMap<String, Mark>,
}

/// The record's path for the database at `db`.
pub fn path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-walstream-lineage");
    PathBuf::from(p)
}

fn read(db: &Path) -> Result<Option<Record>> {
    let path = path(db);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).io_ctx("read", &path),
    };
    let r: Record = serde_json::from_slice(&data).map_err(|e| {
        Error::Invalid(format!(
            "{} is not a walstream lineage record ({e}); remove it to treat the database as never replicated",
            path.display()
        ))
    })?;
    if r.version != 1 {
        return Err(Error::Invalid(format!(
            "{} has version {}, this walstream reads 1",
            path.display(),
            r.version
        )));
    }
    Ok(Some(r))
}

/// The database's mark for the replica at `location`, if recorded.
pub fn mark(db: &Path, location: &str) -> Result<Option<Mark>> {
    Ok(read(db)?.and_then(|mut r| r.replicas.remove(location)))
}

/// Records marks of one database, rewriting its record in place when a mark
/// moves (a few hundred bytes; no rename, no fsync: a kill leaves the last
/// write, and a machine crash at worst an older mark, which errs towards
/// refusing).
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    file: Option<std::fs::File>,
    record: Record,
}

impl Recorder {
    pub fn open(db: &Path) -> Recorder {
        let record = match read(db) {
            Ok(Some(r)) => r,
            Ok(None) => Record::default(),
            Err(e) => {
                tracing::warn!(error = %e, "lineage record unreadable; starting a new one");
                Record::default()
            }
        };
        Recorder {
            path: path(db),
            file: None,
            record: Record {
                version: 1,
                ..record
            },
        }
    }

    /// Records that the database holds `location`'s history up to `mark`.
    pub fn record(&mut self, location: &str, mark: Mark) -> Result<()> {
        if self.record.replicas.get(location) == Some(&mark) {
            return Ok(());
        }
        self.record.replicas.insert(location.to_string(), mark);
        self.write()
    }

    fn write(&mut self) -> Result<()> {
        let data = serde_json::to_vec_pretty(&self.record).expect("record serializes");
        let path = self.path.clone();
        if self.file.is_none() {
            self.file = Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .io_ctx("open", &path)?,
            );
        }
        let f = self.file.as_mut().expect("opened");
        let r = f
            .rewind()
            .and_then(|()| f.write_all(&data))
            .and_then(|()| f.set_len(data.len() as u64));
        if r.is_err() {
            self.file = None;
        }
        r.io_ctx("write", &path)
    }
}

/// Records, after a restore into `output`, that it holds `location`'s
/// history up to `mark` (so replicating it continues the replica with no
/// `--takeover`).
pub fn restored(output: &Path, location: &str, mark: Mark) -> Result<()> {
    let mut r = Recorder {
        path: path(output),
        file: None,
        record: Record {
            version: 1,
            ..Default::default()
        },
    };
    r.record(location, mark)
}

/// The newest generation of a replica, as a replicator found it at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tip {
    pub generation: String,
    /// The first segment index after everything stored in it.
    pub next_index: u64,
    pub position: u64,
    /// Time of its newest object (the writer's clock).
    pub timestamp_ms: i64,
}

/// Whether the database at `db` may start a new generation in the replica
/// at `location`, whose newest generation is `tip` (with its manifest, if
/// any). `followed`: the point a follower's copy reached (its position
/// file). Refuses a database that does not hold everything the replica
/// holds, unless `takeover`.
pub fn check(
    db: &Path,
    location: &str,
    tip: &Tip,
    manifest: Option<&Manifest>,
    followed: Option<&crate::generation::Lineage>,
    takeover: bool,
) -> Result<()> {
    // The record, or a follower's position: whichever reaches the tip.
    let followed = followed.map(|f| Mark {
        generation: f.generation.clone(),
        next_index: f.next_index,
        position: f.position,
    });
    let recorded = mark(db, location)?;
    let reaches = |m: &Mark| m.generation == tip.generation && m.next_index >= tip.next_index;
    let mark = match (recorded, followed) {
        (Some(r), Some(f)) if !reaches(&r) && reaches(&f) => Some(f),
        (r, f) => r.or(f),
    };
    let when = DateTime::from_timestamp_millis(tip.timestamp_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    let writer = manifest
        .map(|m| {
            format!(
                ", written for {}{}",
                m.database,
                m.hostname
                    .as_deref()
                    .map(|h| format!(" on {h}"))
                    .unwrap_or_default()
            )
        })
        .unwrap_or_default();
    let newest = format!(
        "replica {location}'s newest generation {} reaches segment {} (position {}, {when}{writer})",
        tip.generation,
        tip.next_index.saturating_sub(1),
        tip.position
    );
    let db_name = db.display();
    let refusal = match &mark {
        Some(m) if reaches(m) => return Ok(()),
        Some(m) => format!(
            "database {db_name} is not the newest state of its replica: it holds generation {} up to segment {} (position {}), but {newest}. It looks like an older copy (a disk restored from an image, a node that was down); restore the replica to get the newest state, or pass --takeover (`takeover: true`) to make this database the replica's new state",
            m.generation,
            m.next_index.saturating_sub(1),
            m.position
        ),
        None => match manifest {
            Some(m) if !same_database(&m.database, db) => format!(
                "replica {location} belongs to database {} ({newest}); database {db_name} needs a replica of its own (or pass --takeover to replace that history with this database)",
                m.database
            ),
            _ => {
                if !takeover {
                    tracing::warn!(db = %db_name, replica = %location, newest = %newest, "no lineage record beside the database (first run of this version, or restored by another tool): taking it as the replica's new state");
                }
                return Ok(());
            }
        },
    };
    if takeover {
        tracing::warn!(db = %db_name, replica = %location, "takeover: {refusal}; starting a new generation from this database anyway");
        return Ok(());
    }
    Err(Error::Invalid(refusal))
}

fn same_database(recorded: &str, db: &Path) -> bool {
    let abs = |p: &Path| {
        std::fs::canonicalize(p)
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    abs(Path::new(recorded)) == abs(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tip(generation: &str, next_index: u64) -> Tip {
        Tip {
            generation: generation.into(),
            next_index,
            position: next_index * 10,
            timestamp_ms: 0,
        }
    }

    #[test]
    fn a_database_must_hold_what_its_replica_holds() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let loc = "file:///replica";
        let mut r = Recorder::open(&db);
        r.record(
            loc,
            Mark {
                generation: "g1".into(),
                next_index: 5,
                position: 50,
            },
        )
        .unwrap();
        // Up to date, or ahead (an upload that never landed): accepted.
        check(&db, loc, &tip("g1", 5), None, None, false).unwrap();
        check(&db, loc, &tip("g1", 3), None, None, false).unwrap();
        // The replica moved on, in the same generation or a newer one.
        let e = check(&db, loc, &tip("g1", 9), None, None, false).unwrap_err();
        assert!(e.to_string().contains("--takeover"), "{e}");
        assert!(check(&db, loc, &tip("g2", 1), None, None, false).is_err());
        check(&db, loc, &tip("g2", 1), None, None, true).unwrap();
        // Another replica: no mark; the manifest's database decides.
        let m = Manifest {
            generation: "g7".into(),
            started_at: chrono::Utc::now(),
            reason: String::new(),
            page_size: 4096,
            database: "/elsewhere/other.db".into(),
            hostname: None,
            walstream_version: String::new(),
            follows: None,
            previous: None,
            epoch: None,
            encrypted: false,
        };
        let e = check(&db, "s3://b/x", &tip("g7", 2), Some(&m), None, false).unwrap_err();
        assert!(e.to_string().contains("/elsewhere/other.db"), "{e}");
        let mine = Manifest {
            database: db.display().to_string(),
            ..m
        };
        check(&db, "s3://b/x", &tip("g7", 2), Some(&mine), None, false).unwrap();
        // A follower's copy that reached the end.
        let f = crate::generation::Lineage {
            generation: "g7".into(),
            next_index: 2,
            position: 20,
        };
        check(&db, "s3://b/y", &tip("g7", 2), None, Some(&f), false).unwrap();
        assert!(check(&db, "s3://b/y", &tip("g7", 4), None, Some(&f), false).is_err());
        // The record survives reopening.
        assert_eq!(mark(&db, loc).unwrap().unwrap().next_index, 5);
    }
}
