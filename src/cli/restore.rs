//! `walstream restore`: rebuild a database from a replica, to the latest
//! state or to a point in time.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use tokio::signal::unix::{signal, SignalKind};
use walstream::config::ReplicaTarget;
use walstream::follow::FollowOptions;
use walstream::metrics::Metrics;
use walstream::shutdown::Shutdown;

use walstream::restore::{self, RestoreOptions, RestoreOutcome};

use super::out::outln;
use super::target::{check_exists, resolve_target, Target};

/// The restore command's arguments.
pub struct Restore {
    pub target: Target,
    /// `None`: in place, to the database's own path (a database from the
    /// config only), as Litestream does.
    pub output: Option<PathBuf>,
    /// Parallel downloads (Litestream's `-parallelism`).
    pub parallelism: Option<usize>,
    pub generation: Option<String>,
    pub timestamp: Option<DateTime<Utc>>,
    pub if_db_not_exists: bool,
    pub if_replica_exists: bool,
    /// `--follow` and its settings.
    pub follow: Option<Follow>,
}

/// `restore --follow`: keep the restored copy up to date.
pub struct Follow {
    pub interval: Option<Duration>,
    pub addr: Option<String>,
    pub ready_lag: Option<Duration>,
}

pub async fn run(args: Restore, dry_run: bool) -> Result<ExitCode> {
    let Restore {
        target,
        output,
        generation,
        timestamp,
        if_db_not_exists,
        if_replica_exists,
        parallelism,
        follow,
    } = args;
    if follow.is_some() && (generation.is_some() || timestamp.is_some()) {
        bail!("--follow follows the primary's newest state; it cannot be combined with --generation or --timestamp");
    }
    let resolved = resolve_target(&target).await?;
    let output = match (output, &resolved.db) {
        (Some(o), _) => o,
        (None, Some(db)) => db.clone(),
        (None, None) => bail!(
            "no output path: give -o FILE (restoring in place, without -o, needs a database from the config, and {} is a replica)",
            target.target
        ),
    };
    let (replica, concurrency) = (
        resolved.replica,
        parallelism.unwrap_or(resolved.concurrency).max(1),
    );
    if dry_run {
        outln!(
            "would restore {} from {} to {}",
            target.target,
            replica.location(),
            output.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Err(e) = check_exists(&resolved.target) {
        if if_replica_exists {
            tracing::info!(replica = %resolved.target, "replica does not exist, nothing restored");
            return Ok(ExitCode::SUCCESS);
        }
        return Err(e);
    }
    if let Some(f) = follow {
        return run_follow(
            replica,
            resolved.target,
            resolved.addr,
            output,
            concurrency,
            f,
        )
        .await;
    }
    keep_freed_memory();
    let progress: Option<Arc<dyn restore::Progress>> =
        std::io::IsTerminal::is_terminal(&std::io::stderr())
            .then(|| Arc::new(Bar::default()) as Arc<dyn restore::Progress>);
    let opts = RestoreOptions {
        concurrency,
        output: output.clone(),
        generation,
        timestamp,
        if_db_not_exists,
        if_replica_exists,
        progress,
    };
    match restore::restore(&replica, &opts).await? {
        RestoreOutcome::OutputExists => {
            tracing::info!(output = %output.display(), "output exists, nothing restored");
        }
        RestoreOutcome::NothingToRestore => {
            tracing::info!(replica = %replica.location(), "replica is empty, nothing restored");
        }
        RestoreOutcome::Restored {
            generation,
            snapshot_index,
            segments,
            position,
            next_index,
            db_pages,
            ..
        } => {
            tracing::info!(output = %output.display(), %generation, snapshot_index, segments, position, db_pages, "restored");
            // Replicating the copy to this replica then continues it (the
            // init-container pattern) without --takeover.
            let mark = walstream::lineage::Mark {
                generation,
                next_index,
                position,
            };
            if let Err(e) = walstream::lineage::restored(&output, &replica.location(), mark) {
                tracing::warn!(error = %e, "cannot record where the restored database came from; replicating it to this replica will need --takeover");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Restores, then follows until SIGTERM or SIGINT.
async fn run_follow(
    replica: walstream::replica::Replica,
    target: ReplicaTarget,
    config_addr: Option<String>,
    output: PathBuf,
    concurrency: usize,
    f: Follow,
) -> Result<ExitCode> {
    let stop = Shutdown::new();
    for kind in [SignalKind::terminate(), SignalKind::interrupt()] {
        let mut s = signal(kind).context("cannot install a signal handler")?;
        let stop = stop.clone();
        tokio::spawn(async move {
            s.recv().await;
            tracing::info!("signal received, stopping the follower");
            stop.begin(Duration::ZERO);
        });
    }
    let metrics = Arc::new(Metrics::new());
    let status = metrics.follower(
        &output.display().to_string(),
        &target.to_string(),
        f.ready_lag.unwrap_or(walstream::defaults::FOLLOW_READY_LAG),
    );
    if let Some(addr) = f.addr.or(config_addr) {
        walstream::server::serve(&addr, metrics.clone(), None).await?;
    }
    let interval = f.interval.unwrap_or(walstream::defaults::FOLLOW_INTERVAL);
    let watch = match &target {
        ReplicaTarget::File { path } => Some(path.clone()),
        ReplicaTarget::S3(_) => None,
    };
    let opts = FollowOptions {
        output,
        interval,
        discover_interval: if watch.is_some() {
            interval
        } else {
            interval * walstream::defaults::FOLLOW_DISCOVER_POLLS
        },
        watch,
        concurrency,
        status,
        stop,
    };
    walstream::follow::follow(&replica, &opts).await?;
    Ok(ExitCode::SUCCESS)
}

/// A follower runs for as long as its node and does one thing at a time;
/// glibc's default of an allocator arena per thread that ever allocated
/// (each keeping memory it freed) costs it resident memory for nothing.
/// Called before the runtime's threads exist.
pub fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// A restore is short-lived and passes object after object through buffers
/// of megabytes. By default glibc hands such buffers back to the kernel when
/// they are freed, and the next object faults fresh pages in again; keeping
/// freed memory for reuse costs nothing a restore would notice.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// A terminal progress bar for restore: bytes of objects applied, and
/// segments.
#[derive(Debug, Default)]
struct Bar {
    bar: std::sync::OnceLock<indicatif::ProgressBar>,
    segments: AtomicU64,
    /// Objects applied, the snapshot first.
    applied: AtomicU64,
}

impl restore::Progress for Bar {
    fn begin(&self, segments: u64, bytes: u64) {
        let bar = indicatif::ProgressBar::new(bytes);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "[{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}) {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("snapshot, 0/{segments} segments"));
        self.segments.store(segments, Ordering::Relaxed);
        let _ = self.bar.set(bar);
    }

    fn applied(&self, bytes: u64) {
        if let Some(bar) = self.bar.get() {
            let n = self.applied.fetch_add(1, Ordering::Relaxed);
            let total = self.segments.load(Ordering::Relaxed);
            bar.inc(bytes);
            bar.set_message(format!("{n}/{total} segments"));
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.get() {
            bar.finish_with_message("applied; checking integrity");
        }
    }
}
