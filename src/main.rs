//! The `walstream` command line: thin glue from arguments and config files to
//! the library (one module per subcommand in `cli/`). Errors become one line
//! on stderr and a non-zero exit.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Result};
use chrono::{DateTime, Utc};
use clap::{CommandFactory, Parser, Subcommand};

use walstream::config::{LogFormat, Settings};

use cli::out::outln;
use cli::target::Target;

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
    /// Check the arguments and configuration, print what would be done, and
    /// exit without touching databases or storage (also
    /// `WALSTREAM_DRY_RUN=1`).
    #[arg(long, global = true)]
    dry_run: bool,
    /// Read config files as they are, without expanding $VAR and ${VAR}.
    #[arg(long, global = true)]
    no_expand_env: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replicate databases continuously until interrupted.
    Replicate {
        /// Config file (default: $WALSTREAM_CONFIG, $LITESTREAM_CONFIG,
        /// /etc/walstream.yml, /etc/litestream.yml, the first that is set or
        /// exists), unless a database and replica are given instead.
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
        /// Make the database its replicas' new state even where it is
        /// behind them (an older copy than the replica's newest generation):
        /// without it, such a database is refused.
        #[arg(long)]
        takeover: bool,
    },
    /// Restore a database from a replica.
    Restore {
        #[command(flatten)]
        target: Target,
        /// Where to write the restored database (default, for a database
        /// from the config: its own path, which must not exist).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
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
        /// Parallel downloads (default: the replica's concurrency, else 8
        /// for S3 and 4 for a directory).
        #[arg(long)]
        parallelism: Option<usize>,
        /// After restoring, keep applying what the primary ships until
        /// SIGTERM or SIGINT: a read replica any SQLite client may read.
        #[arg(short = 'f', long)]
        follow: bool,
        /// With --follow: how often storage is asked for the next segment
        /// (default 1s; a directory replica is also watched for changes).
        #[arg(long, value_parser = parse_duration_arg, requires = "follow")]
        follow_interval: Option<Duration>,
        /// With --follow: serve /metrics and /readyz here (default: `addr`
        /// of the config the database came from).
        #[arg(long, requires = "follow")]
        addr: Option<String>,
        /// With --follow: /readyz is ready while the follower caught up
        /// with the replica within this long (default 10s).
        #[arg(long, value_parser = parse_duration_arg, requires = "follow")]
        ready_lag: Option<Duration>,
    },
    /// List the databases in the config and their replicas.
    Databases {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Ask the running daemon (at the config's `addr`) what it is doing.
    Status {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Ask over HTTP at this address instead of the control socket.
        #[arg(long)]
        addr: Option<String>,
        /// The control API's JSON as is.
        #[arg(long)]
        json: bool,
        /// Only this database's lines.
        db: Option<PathBuf>,
    },
    /// Ask the running daemon to sync DB; with --wait, return once every
    /// transaction committed before the call is on every replica.
    Sync {
        /// Config file naming the daemon's control socket.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Wait until durable (exit 1 if not within --timeout).
        #[arg(long)]
        wait: bool,
        /// How long to wait (default 30s).
        #[arg(long, value_parser = parse_duration_arg)]
        timeout: Option<Duration>,
        /// Upload now instead of with the next scheduled upload.
        #[arg(long)]
        force: bool,
        /// The control API's JSON as is.
        #[arg(long)]
        json: bool,
        db: PathBuf,
    },
    /// Start replicating DB to the replica URLs in the running daemon.
    Register {
        #[arg(long)]
        config: Option<PathBuf>,
        db: PathBuf,
        replicas: Vec<String>,
    },
    /// Stop replicating DB in the running daemon (after shipping what is
    /// committed).
    Unregister {
        #[arg(long)]
        config: Option<PathBuf>,
        db: PathBuf,
    },
    /// List generations in a replica.
    Generations {
        #[command(flatten)]
        target: Target,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List snapshots in a replica.
    Snapshots {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        generation: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List segments in a replica (`wal` and `ltx` are Litestream's names).
    #[command(visible_aliases = ["wal", "ltx"])]
    Segments {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        generation: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Verify a replica: every object's checksum, each generation's
    /// continuity, a test restore with integrity check, and (when the target
    /// names a database in --config) the restored content against it.
    Verify {
        #[command(flatten)]
        target: Target,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the version.
    Version,
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
    walstream::db::configure_sqlite();
    let flags = cli::args::long_flags(&Cli::command());
    let cli = Cli::parse_from(cli::args::normalize(std::env::args_os().collect(), &flags));
    if matches!(cli.command, Command::Restore { follow: true, .. }) {
        // Before any thread allocates (see the function).
        cli::restore::one_malloc_arena();
    }
    if cli.no_expand_env {
        cli::target::EXPAND_ENV.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    // The config is read before logging starts so that its `logging:`
    // section applies; its errors are printed like any other.
    let settings = match &cli.command {
        Command::Replicate {
            config,
            db,
            replicas,
            exec,
            shutdown_timeout,
            takeover,
        } => match cli::replicate::replicate_settings(
            config.as_deref(),
            db.clone(),
            replicas,
            exec.clone(),
            *shutdown_timeout,
            *takeover,
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
    // The blocking pool runs database rounds (at most
    // `replicate::MAX_CONCURRENT_ROUNDS` at once) and directory storage
    // calls: its bound is what bounds the threads of a process replicating
    // thousands of databases.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
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

/// `--dry-run`, or `WALSTREAM_DRY_RUN` set to anything but empty or `0`.
fn dry_run(cli: &Cli) -> bool {
    cli.dry_run || std::env::var("WALSTREAM_DRY_RUN").is_ok_and(|v| !v.is_empty() && v != "0")
}

async fn run(cli: Cli, settings: Option<Settings>) -> Result<ExitCode> {
    let dry_run = dry_run(&cli);
    match cli.command {
        Command::Version => {
            outln!(
                "walstream {} (storage format {})",
                env!("CARGO_PKG_VERSION"),
                walstream::format::FORMAT_VERSION
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Replicate { .. } => {
            let settings = settings.expect("resolved in main");
            if dry_run {
                return Ok(cli::replicate::dry_run(&settings));
            }
            cli::replicate::run(settings).await
        }
        Command::Restore {
            target,
            output,
            generation,
            timestamp,
            if_db_not_exists,
            if_replica_exists,
            parallelism,
            follow,
            follow_interval,
            addr,
            ready_lag,
        } => {
            let args = cli::restore::Restore {
                target,
                output,
                generation,
                timestamp,
                if_db_not_exists,
                if_replica_exists,
                parallelism,
                follow: follow.then_some(cli::restore::Follow {
                    interval: follow_interval,
                    addr,
                    ready_lag,
                }),
            };
            cli::restore::run(args, dry_run).await
        }
        Command::Verify { target, json } => cli::verify::run(target, json).await,
        Command::Databases { config } => cli::databases::run(config),
        Command::Status {
            config,
            addr,
            json,
            db,
        } => cli::status::run(config, addr, db, json).await,
        Command::Sync {
            config,
            wait,
            timeout,
            force,
            json,
            db,
        } => cli::control::sync(config, db, wait, timeout, force, json).await,
        Command::Register {
            config,
            db,
            replicas,
        } => cli::control::register(config, db, replicas).await,
        Command::Unregister { config, db } => cli::control::unregister(config, db).await,
        Command::Generations { target, json } => cli::list::generations(target, json).await,
        Command::Snapshots {
            target,
            generation,
            json,
        } => cli::list::snapshots(target, generation, json).await,
        Command::Segments {
            target,
            generation,
            json,
        } => cli::list::segments(target, generation, json).await,
    }
}
