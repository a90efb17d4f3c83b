//! The positional target of restore, listing and verify commands: a
//! replica URL or directory, or (with `--config`) a database in the config.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::Args;

use walstream::config::{Config, DbSettings, ReplicaTarget, Settings};
use walstream::replica::Replica;
use walstream::storage;

#[derive(Args)]
pub struct Target {
    /// Config file; the positional argument may then name a database in it
    /// (default: $WALSTREAM_CONFIG, $LITESTREAM_CONFIG, /etc/walstream.yml,
    /// /etc/litestream.yml, the first that is set or exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// With a database from the config: its replica with this name (or
    /// type, `file` or `s3`) instead of the first.
    #[arg(long)]
    pub replica: Option<String>,
    /// An age identity file (or `AGE-SECRET-KEY-1...`) to open an
    /// encrypted replica with; repeatable, tried in turn, added to the
    /// config's `age: identities`.
    #[arg(long = "age-identity", value_name = "FILE")]
    pub age_identity: Vec<String>,
    /// Replica URL or directory, or a database path from the config.
    pub target: String,
}

/// Where a config file comes from when `--config` is not given, in order:
/// the first variable that is set, else the first file that exists.
pub const CONFIG_VARS: [&str; 2] = ["WALSTREAM_CONFIG", "LITESTREAM_CONFIG"];
pub const DEFAULT_CONFIGS: [&str; 2] = ["/etc/walstream.yml", "/etc/litestream.yml"];

/// The config file to use: `explicit`, else the first of `CONFIG_VARS`
/// that is set, else the first of `defaults` that exists. The flag says
/// whether the user named it (explicit or by variable): a file merely
/// found at a default path is only used when it helps.
pub fn config_path(explicit: Option<&Path>, defaults: &[&str]) -> Option<(PathBuf, bool)> {
    if let Some(p) = explicit {
        return Some((p.to_path_buf(), true));
    }
    for var in CONFIG_VARS {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return Some((PathBuf::from(v), true));
        }
    }
    defaults
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .map(|p| (p, false))
}

/// Opens the storage behind a replica target, through its encryption
/// keys when it has any (see `walstream::encryption`).
pub async fn open_replica(
    target: &ReplicaTarget,
    age: Option<&walstream::encryption::AgeSettings>,
) -> Result<Replica> {
    let storage = walstream::encryption::Encrypted::wrap(storage::open(target).await, age)
        .map_err(|e| anyhow!("replica {target}: age: {e}"))?;
    Ok(Replica::new(storage))
}

/// The keys a command reads a replica with: the configured ones, plus
/// `--age-identity` files.
fn age_keys(
    configured: Option<&walstream::encryption::AgeSettings>,
    flags: &[String],
) -> Option<walstream::encryption::AgeSettings> {
    if flags.is_empty() {
        return configured.cloned();
    }
    let mut a = configured.cloned().unwrap_or_default();
    a.identities.extend(flags.iter().cloned());
    Some(a)
}

/// Parallel downloads for restore: the replica's `concurrency`, else 8.
pub fn restore_concurrency(target: &ReplicaTarget) -> usize {
    match target {
        ReplicaTarget::S3(s3) => s3.concurrency.unwrap_or(8),
        ReplicaTarget::File { .. } => 4,
    }
}

/// Whether environment variables in config files are expanded (Litestream's
/// `-no-expand-env` turns it off), set once from the command line.
pub static EXPAND_ENV: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

pub fn load_settings(path: &Path) -> Result<Settings> {
    let config = Config::load(path, EXPAND_ENV.load(std::sync::atomic::Ordering::Relaxed))?;
    Ok(config.settings(path)?)
}

/// A positional target, resolved.
pub struct Resolved {
    pub replica: Replica,
    pub target: ReplicaTarget,
    pub concurrency: usize,
    /// The database, when the target named one in the config.
    pub db: Option<PathBuf>,
    /// The config's `addr`, when the target named a database in one.
    pub addr: Option<String>,
}

/// The database `target` names in `settings` (also under a `dir:` entry).
pub fn find_db(settings: &Settings, target: &str) -> Option<DbSettings> {
    let wanted = absolute(Path::new(target));
    settings
        .dbs
        .iter()
        .find(|d| absolute(&d.path) == wanted)
        .cloned()
        .or_else(|| {
            settings.dirs.iter().find_map(|d| {
                let dir = absolute(&d.dir);
                let rel = wanted.strip_prefix(&dir).ok()?;
                if !d.pattern.matches_path(Path::new(rel.file_name()?)) {
                    return None;
                }
                d.for_db(&dir.join(rel))
            })
        })
}

/// Resolves the positional argument of restore/list/verify commands: a
/// replica URL (anything with `://`), a database from the config (its
/// first replica, or the one `--replica` names), or a replica directory.
/// With a config the user named, a path that is not one of its databases
/// is an error rather than a guess.
pub async fn resolve_target(t: &Target) -> Result<Resolved> {
    let is_url = t.target.contains("://");
    let config = if is_url {
        None
    } else {
        config_path(t.config.as_deref(), &DEFAULT_CONFIGS)
    };
    if let Some((cfg, named)) = config {
        let settings = load_settings(&cfg)?;
        match find_db(&settings, &t.target) {
            Some(db) => {
                let replica = match &t.replica {
                    None => db.replicas.first(),
                    Some(name) => db.replicas.iter().find(|r| r.name() == name),
                };
                let Some(replica) = replica else {
                    let names: Vec<&str> = db.replicas.iter().map(|r| r.name()).collect();
                    bail!(
                        "database {} has no replica named {:?} in {} (its replicas: {})",
                        t.target,
                        t.replica.as_deref().unwrap_or_default(),
                        cfg.display(),
                        names.join(", ")
                    );
                };
                let target = replica.target.clone();
                let age = age_keys(replica.age.as_ref(), &t.age_identity);
                return Ok(Resolved {
                    replica: open_replica(&target, age.as_ref()).await?,
                    concurrency: restore_concurrency(&target),
                    target,
                    db: Some(db.path.clone()),
                    addr: settings.addr.clone(),
                });
            }
            None if named && !Path::new(&t.target).is_dir() => {
                let mut known: Vec<String> = settings
                    .dbs
                    .iter()
                    .map(|d| d.path.display().to_string())
                    .collect();
                known.extend(
                    settings
                        .dirs
                        .iter()
                        .map(|d| format!("{}/{}", d.dir.display(), d.pattern)),
                );
                bail!(
                    "{} is not a database in {} (its databases: {}); to read a replica directory give it as file://{}",
                    t.target,
                    cfg.display(),
                    known.join(", "),
                    absolute(Path::new(&t.target)).display()
                );
            }
            None => {}
        }
    }
    if t.replica.is_some() {
        bail!(
            "--replica picks one of a configured database's replicas; {} is not a database in a config file",
            t.target
        );
    }
    let target =
        ReplicaTarget::parse_url(&t.target).map_err(|e| anyhow!("replica {}: {e}", t.target))?;
    let age = age_keys(None, &t.age_identity);
    Ok(Resolved {
        replica: open_replica(&target, age.as_ref()).await?,
        concurrency: restore_concurrency(&target),
        target,
        db: None,
        addr: None,
    })
}

/// An error unless a directory replica's directory exists: an empty
/// listing or "no generations" would hide a mistyped path.
pub fn check_exists(target: &ReplicaTarget) -> Result<()> {
    if let ReplicaTarget::File { path } = target {
        if !path.exists() {
            bail!(
                "replica {target} does not exist (no directory {})",
                path.display()
            );
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_prefers_the_flag_then_the_first_default_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("walstream.yml");
        let present = dir.path().join("litestream.yml");
        std::fs::write(&present, "dbs: []\n").unwrap();
        let defaults = [missing.to_str().unwrap(), present.to_str().unwrap()];
        let flag = Path::new("/x/c.yml");
        assert_eq!(
            config_path(Some(flag), &defaults),
            Some((flag.to_path_buf(), true))
        );
        // The variables come before the defaults; only checked where the
        // caller's environment sets neither.
        if CONFIG_VARS.iter().all(|v| std::env::var_os(v).is_none()) {
            assert_eq!(config_path(None, &defaults), Some((present.clone(), false)));
            assert_eq!(config_path(None, &defaults[..1]), None);
        }
    }
}
