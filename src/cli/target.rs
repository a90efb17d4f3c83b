//! The positional target of restore, listing and verify commands: a
//! replica URL or directory, or (with `--config`) a database in the config.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use clap::Args;

use walstream::config::{Config, ReplicaTarget, Settings};
use walstream::replica::Replica;
use walstream::storage;

#[derive(Args)]
pub struct Target {
    /// Config file; the positional argument may then name a database in it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Replica URL or directory, or (with --config) a database path.
    pub target: String,
}

/// Opens the storage behind a replica target.
pub async fn open_replica(target: &ReplicaTarget) -> Result<Replica> {
    Ok(Replica::new(storage::open(target).await))
}

/// Parallel downloads for restore: the replica's `concurrency`, else 8.
pub fn restore_concurrency(target: &ReplicaTarget) -> usize {
    match target {
        ReplicaTarget::S3(s3) => s3.concurrency.unwrap_or(8),
        ReplicaTarget::File { .. } => 4,
    }
}

pub fn load_settings(path: &Path) -> Result<Settings> {
    let config = Config::load(path)?;
    Ok(config.settings(path)?)
}

/// Resolves the positional argument of restore/list/verify commands to a
/// replica (the database's first one when it names a database in the
/// config, including one under a `dir:` entry) and, then, the database.
pub async fn resolve_target(t: &Target) -> Result<(Replica, usize, Option<PathBuf>)> {
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

pub fn absolute(p: &Path) -> PathBuf {
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
