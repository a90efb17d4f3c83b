//! The `walstream` command line: thin glue from arguments and config files to
//! the library. Errors become one line on stderr and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

use walstream::config::{Config, DbSettings, LogFormat, ReplicaSettings, ReplicaTarget, Settings};
use walstream::daemon::Daemon;
use walstream::generation;
use walstream::metrics::Metrics;
use walstream::replica::Replica;
use walstream::restore::{self, RestoreOptions, RestoreOutcome};
use walstream::server;
use walstream::storage;

#[derive(Parser)]
#[command(
    name = "walstream",
    about = "Continuous replication of SQLite databases",
    disable_version_flag = true
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replicate databases continuously until interrupted.
    Replicate {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Database to replicate (instead of --config).
        db: Option<PathBuf>,
        /// Replica URLs (file:///dir or a plain directory path).
        replicas: Vec<String>,
        /// Run this application (split like a shell would, no shell) once
        /// replication has started; its signals are forwarded and its exit
        /// code becomes walstream's.
        #[arg(long)]
        exec: Option<String>,
        /// After SIGINT, SIGTERM or SIGHUP (or the application's exit), how
        /// long the last shipment may take before walstream exits anyway,
        /// non-zero if anything committed was not shipped (e.g. 10s, the
        /// default; overrides `shutdown-timeout` in the config).
        #[arg(long, value_parser = parse_duration_arg)]
        shutdown_timeout: Option<Duration>,
    },
    /// Restore a database from a replica.
    Restore {
        #[command(flatten)]
        target: Target,
        /// Where to write the restored database.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Restore this generation instead of the newest.
        #[arg(long)]
        generation: Option<String>,
        /// Restore the state as of this time (RFC 3339, e.g. 2026-11-24T10:00:00Z).
        #[arg(long, value_parser = parse_timestamp)]
        timestamp: Option<DateTime<Utc>>,
        /// Do nothing (exit 0) if the output file already exists.
        #[arg(long)]
        if_db_not_exists: bool,
        /// Do nothing (exit 0) if the replica holds nothing to restore.
        #[arg(long)]
        if_replica_exists: bool,
    },
    /// List generations in a replica.
    Generations {
        #[command(flatten)]
        target: Target,
    },
    /// List snapshots in a replica.
    Snapshots {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        generation: Option<String>,
    },
    /// List segments in a replica.
    #[command(alias = "wal")]
    Segments {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        generation: Option<String>,
    },
    /// Verify a replica: every object's checksum, each generation's
    /// continuity, a test restore with integrity check, and (when the target
    /// names a database in --config) the restored content against it.
    Verify {
        #[command(flatten)]
        target: Target,
    },
    /// Print the version.
    Version,
}

#[derive(Args)]
struct Target {
    /// Config file; the positional argument may then name a database in it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Replica URL or directory, or (with --config) a database path.
    target: String,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    walstream::config::parse_duration(s)
}

fn parse_timestamp(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("invalid RFC 3339 timestamp {s:?}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The config is read before logging starts so that its `logging:`
    // section applies; its errors are printed like any other.
    let settings = match &cli.command {
        Command::Replicate {
            config,
            db,
            replicas,
            exec,
            shutdown_timeout,
        } => match replicate_settings(
            config.as_deref(),
            db.clone(),
            replicas,
            exec.clone(),
            *shutdown_timeout,
        ) {
            Ok(s) => Some(s),
            Err(e) => return fail(e),
        },
        _ => None,
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| cli.log_level.clone())
        .or_else(|| settings.as_ref().and_then(|s| s.log_level.clone()))
        .unwrap_or_else(|| "info".into());
    let filter = match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(f) => f,
        Err(e) => return fail(anyhow!("invalid log level {filter:?}: {e}")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match settings.as_ref().map(|s| s.log_format) {
        Some(LogFormat::Json) => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        _ => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow!("cannot start runtime: {e}")),
    };
    let code = match rt.block_on(run(cli, settings)) {
        Ok(code) => code,
        Err(e) => fail(e),
    };
    // Not dropped: dropping a runtime waits for its blocking tasks, and a
    // replicator still stuck in storage or disk I/O when shutdown-timeout
    // ran out must not hold up the exit. Exiting ends every thread.
    std::mem::forget(rt);
    code
}

/// One line: the error and its causes, each cause once (library errors
/// already name their source in their own message).
fn fail(e: anyhow::Error) -> ExitCode {
    let mut msg = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !msg.contains(&s) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&s);
        }
    }
    eprintln!("walstream: error: {}", msg.replace('\n', " "));
    ExitCode::FAILURE
}

/// `WALSTREAM_DRY_RUN=1`: check arguments and configuration, print what would
/// be done, and exit without touching databases or storage.
fn dry_run() -> bool {
    std::env::var("WALSTREAM_DRY_RUN").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A restore is short-lived and passes object after object through buffers
/// of megabytes. By default glibc hands such buffers back to the kernel when
/// they are freed, and the next object faults fresh pages in again (page
/// faults were a seventh of a restore's CPU in a profile; this setting
/// takes 40% of them away). Keeping freed memory for reuse costs nothing a
/// restore would notice.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

async fn run(cli: Cli, settings: Option<Settings>) -> Result<ExitCode> {
    match cli.command {
        Command::Version => {
            println!(
                "walstream {} (storage format {})",
                env!("CARGO_PKG_VERSION"),
                walstream::format::FORMAT_VERSION
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Replicate { .. } => {
            let settings = settings.expect("resolved in main");
            if dry_run() {
                for db in &settings.dbs {
                    for r in &db.replicas {
                        println!("would replicate {} to {}", db.path.display(), r.target);
                    }
                }
                for d in &settings.dirs {
                    for r in &d.template.replicas {
                        println!(
                            "would replicate {}/{} to {}",
                            d.dir.display(),
                            d.pattern,
                            r.target
                        );
                    }
                }
                if let Some(exec) = &settings.exec {
                    println!("would run {exec}");
                }
                if let Some(addr) = &settings.addr {
                    println!("would serve metrics on {addr}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            replicate(settings).await
        }
        Command::Restore {
            target,
            output,
            generation,
            timestamp,
            if_db_not_exists,
            if_replica_exists,
        } => {
            let (replica, concurrency, _) = resolve_target(&target).await?;
            keep_freed_memory();
            if dry_run() {
                println!(
                    "would restore {} from {} to {}",
                    target.target,
                    replica.location(),
                    output.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
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
                    db_pages,
                    ..
                } => {
                    tracing::info!(output = %output.display(), %generation, snapshot_index, segments, position, db_pages, "restored");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { target } => {
            let (replica, _, db) = resolve_target(&target).await?;
            let tmp = tempfile::tempdir().context("create a temporary directory")?;
            let report = walstream::verify::verify(&replica, db.as_deref(), tmp.path()).await?;
            for f in &report.faults {
                println!("fault: {f}");
            }
            if let Some(m) = &report.not_compared {
                println!("fault: {m}");
            }
            println!(
                "{} generations, {} objects checked in {}",
                report.generations,
                report.objects,
                replica.location()
            );
            if let Some((g, pos, ms)) = &report.restored {
                println!(
                    "restored generation {g} to position {pos} ({}): integrity ok",
                    fmt_ms(*ms)
                );
            }
            if let (Some(at), Some(db)) = (report.compared_at, &db) {
                println!("content equals {} at WAL offset {at}", db.display());
            }
            if report.ok() {
                println!("ok");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("FAILED");
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Generations { target } => {
            let (replica, _, _) = resolve_target(&target).await?;
            list_generations(&replica).await
        }
        Command::Snapshots { target, generation } => {
            let (replica, _, _) = resolve_target(&target).await?;
            println!(
                "{:<22} {:>8} {:>12} {:<25}",
                "generation", "index", "size", "created"
            );
            for g in replica.generations().await? {
                if generation.as_ref().is_some_and(|id| *id != g.id) {
                    continue;
                }
                for (index, ms, size) in &g.snapshots {
                    println!("{:<22} {:>8} {:>12} {:<25}", g.id, index, size, fmt_ms(*ms));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Segments { target, generation } => {
            let (replica, _, _) = resolve_target(&target).await?;
            println!("{:<22} {:>8} {:>12}", "generation", "index", "size");
            for g in replica.generations().await? {
                if generation.as_ref().is_some_and(|id| *id != g.id) {
                    continue;
                }
                for (index, size) in &g.segments {
                    println!("{:<22} {:>8} {:>12}", g.id, index, size);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
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

fn fmt_ms(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

async fn list_generations(replica: &Replica) -> Result<ExitCode> {
    println!(
        "{:<22} {:>10} {:>10} {:>9} {:>9}  {:<25} {:<25}",
        "generation", "first_pos", "last_pos", "snapshots", "segments", "start", "end"
    );
    for g in replica.generations().await? {
        let start = generation::id_time(&g.id)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0);
        let (first, mut last, mut end) = (0u64, 0u64, g.snapshots.first().map_or(start, |s| s.1));
        if let Some(&(index, _)) = g.segments.last() {
            match replica.get_segment(&g.id, index).await {
                Ok(seg) => {
                    last = seg.header.last_position;
                    end = seg.header.timestamp_ms;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read last segment"),
            }
        }
        println!(
            "{:<22} {:>10} {:>10} {:>9} {:>9}  {:<25} {:<25}",
            g.id,
            first,
            last,
            g.snapshots.len(),
            g.segments.len(),
            fmt_ms(start),
            fmt_ms(end)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens the storage behind a replica target.
async fn open_replica(target: &ReplicaTarget) -> Result<Replica> {
    Ok(Replica::new(storage::open(target).await))
}

/// Parallel downloads for restore: the replica's `concurrency`, else 8.
fn restore_concurrency(target: &ReplicaTarget) -> usize {
    match target {
        ReplicaTarget::S3(s3) => s3.concurrency.unwrap_or(8),
        ReplicaTarget::File { .. } => 4,
    }
}

fn load_settings(path: &Path) -> Result<Settings> {
    let config = Config::load(path)?;
    Ok(config.settings(path)?)
}

/// Resolves the positional argument of restore/list commands to a replica.
/// Resolves the positional argument of restore/list/verify commands to a
/// replica (the database's first one when it names a database in the
/// config, including one under a `dir:` entry) and, then, the database.
async fn resolve_target(t: &Target) -> Result<(Replica, usize, Option<PathBuf>)> {
    if let Some(cfg) = &t.config {
        let settings = load_settings(cfg)?;
        let wanted = absolute(Path::new(&t.target));
        let db = settings
            .dbs
            .iter()
            .find(|d| absolute(&d.path) == wanted)
            .cloned()
            .or_else(|| {
                settings.dirs.iter().find_map(|d| {
                    let dir = absolute(&d.dir);
                    wanted.strip_prefix(&dir).ok()?;
                    let mut s = d.for_db(&dir.join(wanted.strip_prefix(&dir).ok()?))?;
                    s.path = PathBuf::from(&t.target);
                    Some(s)
                })
            });
        if let Some(db) = db {
            let first = db.replicas.first().ok_or_else(|| {
                anyhow!("database {} has no replica in {}", t.target, cfg.display())
            })?;
            let first = &first.target;
            return Ok((
                open_replica(first).await?,
                restore_concurrency(first),
                Some(db.path.clone()),
            ));
        }
    }
    let target =
        ReplicaTarget::parse_url(&t.target).map_err(|e| anyhow!("replica {}: {e}", t.target))?;
    Ok((
        open_replica(&target).await?,
        restore_concurrency(&target),
        None,
    ))
}

fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::canonicalize(dir)
                .map(|d| d.join(name))
                .unwrap_or_else(|_| p.to_path_buf())
        }
        _ => p.to_path_buf(),
    }
}

fn replicate_settings(
    config: Option<&Path>,
    db: Option<PathBuf>,
    replicas: &[String],
    exec: Option<String>,
    shutdown_timeout: Option<Duration>,
) -> Result<Settings> {
    let mut settings = match (config, db) {
        (Some(cfg), None) => load_settings(cfg),
        (Some(_), Some(_)) => bail!("give either --config or a database and replica, not both"),
        (None, None) => {
            bail!("nothing to replicate: give --config FILE or a database path and a replica URL")
        }
        (None, Some(db)) => {
            if replicas.is_empty() {
                bail!(
                    "no replica given for {}: add a replica URL such as file:///var/backups/app",
                    db.display()
                );
            }
            let targets = replicas
                .iter()
                .map(|r| {
                    ReplicaTarget::parse_url(r)
                        .map(ReplicaSettings::new)
                        .map_err(|e| anyhow!("replica {r}: {e}"))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Settings::single(DbSettings::with_defaults(db, targets)))
        }
    }?;
    if let Some(exec) = exec {
        walstream::exec::split(&exec).context("--exec")?;
        settings.exec = Some(exec);
    }
    if let Some(t) = shutdown_timeout {
        settings.shutdown_timeout = t;
    }
    Ok(settings)
}

/// Runs the daemon: metrics endpoint, every replicator, the application.
async fn replicate(settings: Settings) -> Result<ExitCode> {
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = &settings.addr {
        server::serve(addr, metrics.clone()).await?;
    }
    let mut daemon = Daemon::new(settings, metrics)?;
    daemon.start().await?;
    Ok(ExitCode::from(daemon.run().await?))
}
