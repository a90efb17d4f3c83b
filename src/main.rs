//! The `walstream` command line: thin glue from arguments and config files to
//! the library. Errors become one line on stderr and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use tokio::runtime::Handle;

use walstream::config::{Config, DbSettings, ReplicaTarget, Settings};
use walstream::generation;
use walstream::replica::Replica;
use walstream::replicate::{Control, ReplicateOptions, Replicator};
use walstream::restore::{self, RestoreOptions, RestoreOutcome};
use walstream::storage::{DynStorage, FileStorage, S3Storage};

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

fn parse_timestamp(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("invalid RFC 3339 timestamp {s:?}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| cli.log_level.clone())
        .unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walstream: error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("walstream: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Version => {
            println!(
                "walstream {} (storage format {})",
                env!("CARGO_PKG_VERSION"),
                walstream::format::FORMAT_VERSION
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Replicate {
            config,
            db,
            replicas,
        } => {
            let settings = replicate_settings(config.as_deref(), db, replicas)?;
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
            let (replica, concurrency) = resolve_target(&target).await?;
            let opts = RestoreOptions {
                concurrency,
                output: output.clone(),
                generation,
                timestamp,
                if_db_not_exists,
                if_replica_exists,
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
                } => {
                    tracing::info!(output = %output.display(), %generation, snapshot_index, segments, position, db_pages, "restored");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generations { target } => {
            let (replica, _) = resolve_target(&target).await?;
            list_generations(&replica).await
        }
        Command::Snapshots { target, generation } => {
            let (replica, _) = resolve_target(&target).await?;
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
            let (replica, _) = resolve_target(&target).await?;
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
    let storage: DynStorage = match target {
        ReplicaTarget::File { path } => Arc::new(FileStorage::new(path.clone())),
        ReplicaTarget::S3(s3) => {
            if s3.skip_verify {
                tracing::warn!(replica = %target, "skip-verify is not supported; TLS certificates are verified");
            }
            Arc::new(S3Storage::new(s3).await)
        }
    };
    Ok(Replica::new(storage))
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
async fn resolve_target(t: &Target) -> Result<(Replica, usize)> {
    if let Some(cfg) = &t.config {
        let settings = load_settings(cfg)?;
        let wanted = absolute(Path::new(&t.target));
        if let Some(db) = settings.dbs.iter().find(|d| absolute(&d.path) == wanted) {
            let first = db.replicas.first().ok_or_else(|| {
                anyhow!("database {} has no replica in {}", t.target, cfg.display())
            })?;
            return Ok((open_replica(first).await?, restore_concurrency(first)));
        }
    }
    let target =
        ReplicaTarget::parse_url(&t.target).map_err(|e| anyhow!("replica {}: {e}", t.target))?;
    Ok((open_replica(&target).await?, restore_concurrency(&target)))
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
    replicas: Vec<String>,
) -> Result<Settings> {
    match (config, db) {
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
                .map(|r| ReplicaTarget::parse_url(r).map_err(|e| anyhow!("replica {r}: {e}")))
                .collect::<Result<Vec<_>>>()?;
            Ok(Settings {
                dbs: vec![DbSettings::with_defaults(db, targets)],
                addr: None,
                exec: None,
                log_level: None,
            })
        }
    }
}

fn options(db: &DbSettings, target: &ReplicaTarget) -> ReplicateOptions {
    let sync_interval = match target {
        // Uploads cost money on S3: batch for up to a second by default.
        ReplicaTarget::S3(s3) => s3.sync_interval.unwrap_or(Duration::from_secs(1)),
        ReplicaTarget::File { .. } => Duration::ZERO,
    };
    ReplicateOptions {
        sync_interval,
        db: db.path.clone(),
        monitor_interval: db.monitor_interval,
        checkpoint_interval: db.checkpoint_interval,
        min_checkpoint_page_count: db.min_checkpoint_page_count,
        max_checkpoint_page_count: db.max_checkpoint_page_count,
        snapshot_interval: db.snapshot_interval,
        busy_timeout: db.busy_timeout,
    }
}

/// Runs one replicator thread per (database, replica) until a signal or a
/// failure, then stops them all after a final shipment.
async fn replicate(settings: Settings) -> Result<ExitCode> {
    let (done_tx, mut done_rx) =
        tokio::sync::mpsc::unbounded_channel::<(String, walstream::Result<()>)>();
    let mut controls = Vec::new();
    let mut threads = Vec::new();
    for db in &settings.dbs {
        for target in &db.replicas {
            let replica = open_replica(target).await?;
            let opts = options(db, target);
            let (tx, rx) = mpsc::channel();
            controls.push(tx.clone());
            let done = done_tx.clone();
            let rt = Handle::current();
            let name = format!("{} -> {}", db.path.display(), target);
            threads.push(std::thread::spawn(move || {
                let result = (|| {
                    let Some(mut r) = Replicator::open(opts, replica, rt, &rx)? else {
                        return Ok(());
                    };
                    r.start()?;
                    r.run(rx, tx)
                })();
                let _ = done.send((name, result));
            }));
        }
    }
    drop(done_tx);
    let total = threads.len();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    let mut failed: Option<anyhow::Error> = None;
    let mut finished = 0;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, shipping and stopping"),
        _ = sigterm.recv() => tracing::info!("terminated, shipping and stopping"),
        Some((name, result)) = done_rx.recv() => {
            finished += 1;
            if let Err(e) = result {
                failed = Some(anyhow!(e).context(name));
            }
        }
    }
    for c in &controls {
        let _ = c.send(Control::Shutdown);
    }
    while finished < total {
        match done_rx.recv().await {
            Some((name, result)) => {
                finished += 1;
                if let Err(e) = result {
                    failed.get_or_insert(anyhow!(e).context(name));
                }
            }
            None => break,
        }
    }
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}
