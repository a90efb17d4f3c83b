//! Rebuilding a database from a replica.
//!
//! Restore picks a generation (the newest, or the one asked for), the newest
//! snapshot at or before the target time, and applies that generation's
//! segments in order. Every object is checksum-verified and the segment
//! positions must chain from the snapshot without a gap; a missing or corrupt
//! object stops the restore with an error naming it, because a database that
//! silently skipped a segment is worse than no database.
//!
//! The result is written to a temporary file beside the output and renamed
//! into place only after `PRAGMA integrity_check` says ok, so the output path
//! holds either nothing or a complete database. A restore refuses to start,
//! and again to rename, while a `-wal`, `-shm` or `-journal` lies beside the
//! output (SQLite would read it with the restored file), never replaces a
//! file that appeared at the output meanwhile, and first removes the
//! temporary files of earlier restores to the same output whose process is
//! gone.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, IoContext, Result, SqlContext};
use crate::generation::layout;
use crate::replica::{Compacted, GenerationListing, Replica};

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub output: PathBuf,
    pub generation: Option<String>,
    pub timestamp: Option<DateTime<Utc>>,
    /// Exit quietly if the output already exists.
    pub if_db_not_exists: bool,
    /// Exit quietly if the replica has nothing to restore.
    pub if_replica_exists: bool,
    /// Segments downloaded ahead of the one being applied (at least 1).
    pub concurrency: usize,
    /// Told how far the restore has come.
    pub progress: Option<Arc<dyn Progress>>,
}

/// Receives restore progress; the CLI draws a progress bar from it.
pub trait Progress: Send + Sync + std::fmt::Debug {
    /// The objects to read: the snapshot and `segments` segments, `bytes` in all.
    fn begin(&self, segments: u64, bytes: u64);
    /// One object (snapshot or segment) of `bytes` was applied.
    fn applied(&self, bytes: u64);
    fn finish(&self);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreOutcome {
    Restored {
        generation: String,
        snapshot_index: u64,
        segments: u64,
        position: u64,
        /// Index of the first segment not applied (what follows the state).
        next_index: u64,
        db_pages: u32,
        /// Where in the source's WAL the restored state ends.
        wal: Option<crate::segment::WalPoint>,
        /// The restored state's time (of the last object applied).
        timestamp_ms: i64,
    },
    /// `--if-db-not-exists` and the output exists.
    OutputExists,
    /// `--if-replica-exists` and the replica holds nothing.
    NothingToRestore,
}

/// Removes the temporary file (and any SQLite side files) unless disarmed.
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut p = self.path.as_os_str().to_owned();
                p.push(suffix);
                let _ = std::fs::remove_file(PathBuf::from(p));
            }
        }
    }
}

pub async fn restore(replica: &Replica, opts: &RestoreOptions) -> Result<RestoreOutcome> {
    let output = &opts.output;
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = output
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    if dir.is_dir() {
        remove_abandoned_temps(&dir, &name);
    }
    if output.exists() {
        if opts.if_db_not_exists {
            return Ok(RestoreOutcome::OutputExists);
        }
        return Err(Error::Invalid(format!(
            "output file {} already exists; refusing to overwrite it",
            output.display()
        )));
    }
    if !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "output directory {} does not exist",
            dir.display()
        )));
    }
    // Even with --if-db-not-exists: the database is missing, but what a
    // restore would leave is a file SQLite misreads.
    refuse_stale_side_files(output)?;

    let gens = replica.generations().await?;
    let target_ms = opts.timestamp.map(|t| t.timestamp_millis());
    if let (Some(t), None) = (target_ms, &opts.generation) {
        check_in_history(replica, &gens, t).await?;
    }
    let Some((gen, snap)) = choose(&gens, opts.generation.as_deref(), target_ms, replica)? else {
        if opts.if_replica_exists && opts.generation.is_none() {
            return Ok(RestoreOutcome::NothingToRestore);
        }
        return Err(
            match (gens.iter().any(|g| !g.snapshots.is_empty()), target_ms) {
                (false, _) => Error::NoGeneration {
                    location: replica.location(),
                },
                (true, Some(_)) => Error::Invalid(format!(
                    "replica {} has no snapshot at or before {}",
                    replica.location(),
                    opts.timestamp.unwrap().to_rfc3339()
                )),
                (true, None) => Error::Invalid("no usable generation".into()),
            },
        );
    };
    let (snap_index, snap_ms) = snap;
    let snap_bytes = gen
        .snapshots
        .iter()
        .find(|s| s.0 == snap_index && s.1 == snap_ms)
        .map_or(0, |s| s.2);
    let todo = plan(gen, snap_index, target_ms, replica)?;
    if let Some(p) = &opts.progress {
        p.begin(
            todo.len() as u64,
            snap_bytes + todo.iter().map(|s| s.size).sum::<u64>(),
        );
    }
    let progress = |bytes: u64| {
        if let Some(p) = &opts.progress {
            p.applied(bytes);
        }
    };

    let tmp = dir.join(format!(
        "{}{}",
        temp_prefix(&name, RESTORE_TEMP),
        std::process::id()
    ));
    let mut guard = TempGuard {
        path: tmp.clone(),
        armed: true,
    };

    // The snapshot is downloaded beside the output and streamed into it.
    let download = TempGuard {
        path: dir.join(format!(
            "{}{}",
            temp_prefix(&name, SNAPSHOT_TEMP),
            std::process::id()
        )),
        armed: true,
    };
    let (header, mut image) = replica
        .get_snapshot_file(&gen.id, snap_index, snap_ms, &download.path)
        .await?;
    let ps = header.page_size as u64;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .io_ctx("create", &tmp)?;
    let written = {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        // Never write more than the header admits (plus one byte to notice).
        let admitted = header.db_pages as u64 * ps + 1;
        let n = std::io::copy(&mut (&mut image).take(admitted), &mut w).map_err(|e| {
            Error::Corrupt {
                location: replica.location(),
                key: layout::snapshot(&gen.id, snap_index, snap_ms),
                source: crate::format::FormatError::Body(e.to_string()),
            }
        })?;
        w.flush().io_ctx("write", &tmp)?;
        n
    };
    drop(image);
    drop(download);
    progress(snap_bytes);
    if written != header.db_pages as u64 * ps {
        return Err(replica.bad(
            &layout::snapshot(&gen.id, snap_index, snap_ms),
            &crate::snapshot::size_fault(written, header.db_pages, header.page_size),
        ));
    }
    let mut db_pages = header.db_pages;
    let mut position = header.position;
    let mut wal_point = header.wal;
    let mut restored_ms = header.timestamp_ms;
    let mut applied = 0u64;
    let mut next_index = snap_index;
    // Download up to `concurrency` objects ahead; apply strictly in order.
    let mut pending = std::collections::VecDeque::new();
    let mut next_fetch = 0usize;
    let window = opts.concurrency.max(1);
    for step in &todo {
        while next_fetch < todo.len() && pending.len() < window {
            let (r, g, s) = (replica.clone(), gen.id.clone(), todo[next_fetch]);
            pending.push_back(tokio::spawn(async move {
                match s.compacted {
                    Some(c) => r.get_compacted_body(&g, &c).await,
                    None => r.get_segment_body(&g, s.first).await,
                }
            }));
            next_fetch += 1;
        }
        let seg = pending
            .pop_front()
            .expect("download scheduled")
            .await
            .map_err(|e| Error::Invalid(format!("segment download task failed: {e}")))??;
        let key = step.key(&gen.id);
        if let Some(t) = target_ms {
            if seg.header.timestamp_ms > t {
                break;
            }
        }
        if seg.header.first_position != position {
            return Err(replica.bad(
                &key,
                &format!(
                    "starts at position {} but the previous object ends at {position}",
                    seg.header.first_position
                ),
            ));
        }
        if seg.header.page_size as u64 != ps {
            return Err(replica.bad(&key, "page size differs from the snapshot's"));
        }
        // Pages above the smallest size inside the object were truncated
        // away (see segment::merge); for a plain segment this is its size.
        let cut = (seg.header.min_db_pages() as u64 * ps)
            .min(file.metadata().io_ctx("stat", &tmp)?.len());
        file.set_len(cut).io_ctx("truncate", &tmp)?;
        let last = seg.header.db_pages;
        let live = seg.pages().take_while(|&(pgno, _)| pgno <= last);
        write_pages(&file, live, ps).io_ctx("write", &tmp)?;
        db_pages = seg.header.db_pages;
        file.set_len(db_pages as u64 * ps)
            .io_ctx("truncate", &tmp)?;
        position = seg.header.last_position;
        wal_point = Some(seg.header.wal);
        restored_ms = seg.header.timestamp_ms;
        next_index = seg.header.last_index() + 1;
        progress(step.size);
        applied += 1;
        // Start writing back what is written so far, so that the final
        // fsync has little left to wait for (it still makes it durable).
        // SAFETY: a plain system call on an open descriptor.
        unsafe {
            libc::sync_file_range(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }
    file.set_len(db_pages as u64 * ps)
        .io_ctx("truncate", &tmp)?;
    if let Some(p) = &opts.progress {
        p.finish();
    }
    // The integrity check reads what is in the page cache while the data
    // goes to disk: the one is CPU, the other waiting, so they overlap.
    let (synced, checked) = std::thread::scope(|s| {
        let sync = s.spawn(|| file.sync_all());
        let checked = check_database(&tmp, header.page_size);
        (sync.join().expect("sync thread"), checked)
    });
    synced.io_ctx("sync", &tmp)?;
    checked?;
    drop(file);
    // Something may have appeared beside the output while this ran.
    refuse_stale_side_files(output)?;
    rename_no_replace(&tmp, output).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Invalid(format!(
                "output file {} appeared during the restore; refusing to overwrite it",
                output.display()
            ))
        } else {
            Error::Io {
                op: "rename into place",
                path: output.clone(),
                source: e,
            }
        }
    })?;
    guard.armed = false;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .io_ctx("sync", &dir)?;
    Ok(RestoreOutcome::Restored {
        generation: gen.id.clone(),
        snapshot_index: snap_index,
        segments: applied,
        position,
        next_index,
        db_pages,
        wal: wal_point,
        timestamp_ms: restored_ms,
    })
}

/// The files SQLite reads together with a database, and what each would do
/// to the restored one if an old one were left beside it.
const SIDE_FILES: [(&str, &str); 3] = [
    (
        "-wal",
        "an old write-ahead log, which SQLite would apply to the restored database",
    ),
    (
        "-shm",
        "an old WAL index, which SQLite would trust for the restored database",
    ),
    (
        "-journal",
        "an old rollback journal, which SQLite would roll back into the restored database",
    ),
];

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Refuses to restore to `output` while a `-wal`, `-shm` or `-journal` lies
/// beside it: the next SQLite open would read it together with the restored
/// file (an old WAL of the same database gives "Rowid out of order", another
/// database's WAL gives that database's rows). Nothing is moved or deleted:
/// only the user knows whether it still belongs to something.
fn refuse_stale_side_files(output: &Path) -> Result<()> {
    for (suffix, what) in SIDE_FILES {
        let side = with_suffix(output, suffix);
        match std::fs::symlink_metadata(&side) {
            Ok(_) => {
                return Err(Error::Invalid(format!(
                    "refusing to restore to {}: stale file {} lies beside it, {what}; \
                     move it away (or delete it), then restore again",
                    output.display(),
                    side.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).io_ctx("stat", &side),
        }
    }
    Ok(())
}

/// Kinds of temporary file a restore leaves beside its output while it runs
/// (each named `.NAME.walstream-KIND.PID`, the restore's also with SQLite's
/// side files during the integrity check).
const RESTORE_TEMP: &str = "restore";
const SNAPSHOT_TEMP: &str = "snapshot";

fn temp_prefix(name: &str, kind: &str) -> String {
    format!(".{name}.walstream-{kind}.")
}

/// Where this process downloads an object meant for `output` (beside it,
/// named so that a later restore removes it if this process dies first).
pub(crate) fn download_path(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    with_suffix(
        &output.with_file_name(temp_prefix(&name, SNAPSHOT_TEMP)),
        &std::process::id().to_string(),
    )
}

/// Removes, from `dir`, the temporary files of earlier restores to the
/// output named `name` whose process is gone (a restore killed with SIGKILL
/// cannot clean up after itself, and its file may be as large as the
/// database), saying so for each. Files of another live process are left
/// alone, and so is anything else: this is housekeeping, so a failure is a
/// warning. A restore run in another PID namespace on a shared directory
/// looks gone from here; if its file is removed, that restore fails with an
/// error (its file is no longer there to check or rename) rather than
/// writing anything wrong.
fn remove_abandoned_temps(dir: &Path, name: &str) {
    let prefixes = [
        temp_prefix(name, RESTORE_TEMP),
        temp_prefix(name, SNAPSHOT_TEMP),
    ];
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot look for temporary files of earlier restores");
            return;
        }
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = prefixes
            .iter()
            .find_map(|p| file_name.strip_prefix(p.as_str()))
        else {
            continue;
        };
        let digits = ["-wal", "-shm", "-journal"]
            .iter()
            .find_map(|s| rest.strip_suffix(s))
            .unwrap_or(rest);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(pid) = digits.parse::<libc::pid_t>() else {
            continue;
        };
        // A file named with this process's own id is left over as well: this
        // restore has not created its files yet. (In a container a restore
        // often runs as PID 1 every time; a killed one's file would then
        // block every later attempt, which creates its file exclusively.)
        if pid <= 0 || (pid as u32 != std::process::id() && !process_gone(pid)) {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                bytes = meta.len(),
                pid,
                "removed the temporary file of an earlier restore whose process is gone"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                path = %path.display(),
                bytes = meta.len(),
                error = %e,
                "cannot remove the temporary file of an earlier restore"
            ),
        }
    }
}

/// True when no process has this id (`kill(pid, 0)` fails with ESRCH). A
/// process of another user (EPERM) is alive.
fn process_gone(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`), in one
/// step where the filesystem can do that (`renameat2` with
/// `RENAME_NOREPLACE`), else by checking first.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let c_to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are NUL-terminated paths that live across the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(std::io::ErrorKind::AlreadyExists.into());
            }
            std::fs::rename(from, to)
        }
        _ => Err(e),
    }
}

/// Writes pages (numbered from 1, in ascending order) at their offsets, one
/// `pwritev` per run of consecutive page numbers: a restore writes tens of
/// thousands of pages, and one system call each was a fifth of its time.
fn write_pages<'a>(
    file: &File,
    pages: impl Iterator<Item = (u32, &'a [u8])>,
    page_size: u64,
) -> std::io::Result<()> {
    // IOV_MAX is 1024 on Linux.
    const MAX_RUN: usize = 1024;
    let mut run: Vec<&[u8]> = Vec::with_capacity(MAX_RUN);
    let mut run_start = 0u32;
    let flush = |start: u32, run: &mut Vec<&[u8]>| -> std::io::Result<()> {
        if run.is_empty() {
            return Ok(());
        }
        let offset = (start as u64 - 1) * page_size;
        let iov: Vec<libc::iovec> = run
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let total: usize = run.iter().map(|p| p.len()).sum();
        // SAFETY: every iovec points into a live page borrowed for this call.
        let n = unsafe {
            libc::pwritev(
                std::os::fd::AsRawFd::as_raw_fd(file),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if (n as usize) < total {
            // A short write (a full disk, a signal): finish page by page,
            // which reports the error if there is one.
            let mut done = n as usize;
            let mut at = offset;
            for p in run.iter() {
                let len = p.len();
                if done >= len {
                    done -= len;
                } else {
                    file.write_all_at(&p[done..], at + done as u64)?;
                    done = 0;
                }
                at += len as u64;
            }
        }
        run.clear();
        Ok(())
    };
    for (pgno, page) in pages {
        let contiguous = !run.is_empty() && pgno == run_start + run.len() as u32;
        if !contiguous || run.len() == MAX_RUN {
            flush(run_start, &mut run)?;
            run_start = pgno;
        }
        run.push(page);
    }
    flush(run_start, &mut run)
}

/// One object to apply: a segment, or a merged object covering
/// `first..=last`.
#[derive(Debug, Clone, Copy)]
struct Step {
    first: u64,
    size: u64,
    compacted: Option<Compacted>,
}

impl Step {
    fn key(&self, generation: &str) -> String {
        match &self.compacted {
            Some(c) => layout::compacted(generation, c.level, c.first, c.last, c.timestamp_ms),
            None => layout::segment(generation, self.first),
        }
    }
}

/// The objects to apply after the snapshot at `snap_index`: at each index,
/// the merged object reaching furthest whose time is within the target (its
/// time is in its key), else the plain segment (whose time is checked after
/// download). Fewer, larger objects for old history; exact granularity
/// wherever plain segments are still kept.
fn plan(
    gen: &GenerationListing,
    snap_index: u64,
    target_ms: Option<i64>,
    replica: &Replica,
) -> Result<Vec<Step>> {
    let segments: std::collections::BTreeMap<u64, u64> = gen.segments.iter().copied().collect();
    let last_known = gen
        .segments
        .iter()
        .map(|s| s.0)
        .chain(gen.compacted.iter().map(|c| c.last))
        .max();
    let mut steps = Vec::new();
    let mut i = snap_index;
    while last_known.is_some_and(|l| i <= l) {
        let merged = gen
            .compacted
            .iter()
            .filter(|c| c.first == i && target_ms.is_none_or(|t| c.timestamp_ms <= t))
            .max_by_key(|c| c.last);
        if let Some(c) = merged {
            steps.push(Step {
                first: i,
                size: c.size,
                compacted: Some(*c),
            });
            i = c.last + 1;
        } else if let Some(&size) = segments.get(&i) {
            steps.push(Step {
                first: i,
                size,
                compacted: None,
            });
            i += 1;
        } else if gen.compacted.iter().any(|c| c.first == i) {
            // Only merged objects newer than the target continue from here.
            break;
        } else {
            let next = segments
                .range(i..)
                .next()
                .map(|(&n, _)| n)
                .into_iter()
                .chain(
                    gen.compacted
                        .iter()
                        .filter(|c| c.first > i)
                        .map(|c| c.first),
                )
                .min()
                .unwrap_or(i);
            return Err(Error::Missing {
                location: replica.location(),
                key: layout::segment(&gen.id, i),
                message: format!("segments of generation {} jump from {i} to {next}", gen.id),
            });
        }
    }
    Ok(steps)
}

/// The span a replica can restore: from its oldest snapshot to the newest
/// object of its newest generation (ms since the epoch). `None`: nothing
/// to restore.
pub async fn history(replica: &Replica, gens: &[GenerationListing]) -> Result<Option<(i64, i64)>> {
    let with_snapshots = || gens.iter().filter(|g| !g.snapshots.is_empty());
    let Some(first) = with_snapshots()
        .filter_map(|g| g.snapshots.first())
        .map(|s| s.1)
        .min()
    else {
        return Ok(None);
    };
    let newest = with_snapshots().next_back().expect("one has snapshots");
    let mut last = newest.snapshots.last().map_or(first, |s| s.1);
    if let Some(end) = replica.generation_end(newest).await? {
        last = last.max(end.timestamp_ms);
    }
    Ok(Some((first, last)))
}

/// A point in time before the replica's history is an error that gives
/// the restorable span; one after its newest point restores the latest
/// state (nothing was shipped after it, so the database presumably stood
/// there still) and says so.
async fn check_in_history(replica: &Replica, gens: &[GenerationListing], t: i64) -> Result<()> {
    let Some((first, last)) = history(replica, gens).await? else {
        return Ok(());
    };
    let fmt = |ms: i64| {
        DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_else(|| ms.to_string())
    };
    if t < first {
        return Err(Error::Invalid(format!(
            "replica {} holds nothing as old as {}: it can restore from {} to {}",
            replica.location(),
            fmt(t),
            fmt(first),
            fmt(last)
        )));
    }
    if t > last {
        tracing::warn!(
            requested = %fmt(t),
            newest = %fmt(last),
            oldest = %fmt(first),
            "the requested time is after the newest point in the replica: restoring that newest point (the latest state shipped)"
        );
    }
    Ok(())
}

/// Picks the generation and the snapshot (index, timestamp) to start from.
fn choose<'a>(
    gens: &'a [GenerationListing],
    generation: Option<&str>,
    target_ms: Option<i64>,
    replica: &Replica,
) -> Result<Option<(&'a GenerationListing, (u64, i64))>> {
    let pick = |g: &GenerationListing| {
        g.snapshots
            .iter()
            .rev()
            .find(|(_, ms, _)| target_ms.is_none_or(|t| *ms <= t))
            .map(|&(i, ms, _)| (i, ms))
    };
    if let Some(id) = generation {
        let Some(g) = gens.iter().find(|g| g.id == id) else {
            return Err(Error::Invalid(format!(
                "generation {id} not found in replica {}",
                replica.location()
            )));
        };
        return Ok(pick(g).map(|s| (g, s)));
    }
    Ok(gens.iter().rev().find_map(|g| pick(g).map(|s| (g, s))))
}

/// Opens the restored file, checks integrity and page size, and leaves it in
/// WAL mode with no WAL file beside it.
fn check_database(path: &Path, page_size: u32) -> Result<()> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .db_ctx(path)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .db_ctx(path)?;
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .db_ctx(path)?;
    if result != "ok" {
        return Err(Error::Invalid(format!(
            "restored database failed integrity check: {result}"
        )));
    }
    let ps: u32 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .db_ctx(path)?;
    if ps != page_size || !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Invalid(format!(
            "restored database has page size {ps} and journal mode {mode}, expected {page_size} and wal"
        )));
    }
    conn.close().map_err(|(_, e)| e).db_ctx(path)?;
    Ok(())
}
