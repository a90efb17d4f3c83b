//! `walstream replicate`: the daemon, from a config file or from a database
//! and replica URLs on the command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use walstream::config::{DbSettings, ReplicaSettings, ReplicaTarget, Settings};
use walstream::daemon::Daemon;
use walstream::metrics::Metrics;
use walstream::server;

use super::out::outln;
use super::target::{config_path, load_settings, DEFAULT_CONFIGS};

/// Prints what `replicate` would do with `settings`, touching nothing.
pub fn dry_run(settings: &Settings) -> ExitCode {
    for db in &settings.dbs {
        for r in &db.replicas {
            outln!("would replicate {} to {}", db.path.display(), r.target);
        }
    }
    for d in &settings.dirs {
        for r in &d.template.replicas {
            outln!(
                "would replicate {}/{} to {}",
                d.dir.display(),
                d.pattern,
                r.target
            );
        }
    }
    if let Some(exec) = &settings.exec {
        outln!("would run {exec}");
    }
    if let Some(addr) = &settings.addr {
        outln!("would serve metrics on {addr}");
    }
    ExitCode::SUCCESS
}

pub fn replicate_settings(
    config: Option<&Path>,
    db: Option<PathBuf>,
    replicas: &[String],
    exec: Option<String>,
    shutdown_timeout: Option<Duration>,
    takeover: bool,
) -> Result<Settings> {
    let mut settings = match (config, db) {
        (Some(cfg), None) => load_settings(cfg),
        (Some(_), Some(_)) => bail!("give either --config or a database and replica, not both"),
        (None, None) => match config_path(None, &DEFAULT_CONFIGS) {
            Some((cfg, _)) => load_settings(&cfg),
            None => bail!(
                "nothing to replicate: give --config FILE (or set WALSTREAM_CONFIG or LITESTREAM_CONFIG, or create {}), or a database path and a replica URL",
                DEFAULT_CONFIGS.join(" or ")
            ),
        },
        (None, Some(db)) => {
            if replicas.is_empty() {
                bail!(
                    "no replica given for {}: add a replica URL such as file:///var/backups/app",
                    db.display()
                );
            }
            // Absolute from here on: logs, metrics and a dry run name the
            // files walstream really uses.
            let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            let targets = replicas
                .iter()
                .map(|r| {
                    let t = match ReplicaTarget::parse_url(r) {
                        Ok(ReplicaTarget::File { path }) => {
                            Ok(ReplicaTarget::File { path: abs(&path) })
                        }
                        other => other,
                    };
                    t.map(ReplicaSettings::new)
                        .map_err(|e| anyhow!("replica {r}: {e}"))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Settings::single(DbSettings::with_defaults(abs(&db), targets)))
        }
    }?;
    if let Some(exec) = exec {
        walstream::exec::split(&exec).context("--exec")?;
        settings.exec = Some(exec);
    }
    if let Some(t) = shutdown_timeout {
        settings.shutdown_timeout = t;
    }
    if takeover {
        for db in &mut settings.dbs {
            db.takeover = true;
        }
        for d in &mut settings.dirs {
            d.template.takeover = true;
        }
    }
    Ok(settings)
}

/// Runs the daemon: metrics endpoint, every replicator, the application.
pub async fn run(settings: Settings) -> Result<ExitCode> {
    let metrics = Arc::new(Metrics::new());
    let (api, changes) = walstream::control::Api::new(settings.control_token.clone());
    let socket = api
        .serve(settings.socket.as_deref(), settings.config_dir.as_deref())
        .await?;
    if let Some(addr) = &settings.addr {
        server::serve(addr, metrics.clone(), Some(api.clone())).await?;
    }
    let mut daemon = Daemon::new(settings, metrics)?.with_control(api, changes);
    let result = async {
        daemon.start().await?;
        daemon.run().await
    }
    .await;
    if let Some(s) = socket {
        let _ = std::fs::remove_file(s);
    }
    Ok(ExitCode::from(result?))
}
