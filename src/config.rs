//! Configuration files.
//!
//! walstream reads Litestream's YAML format so that an existing
//! `litestream.yml` works unchanged (`dbs:` with `replicas:` or the single
//! `replica:` form, `${VAR}`/`$VAR` expansion), plus a few keys of its own.
//! Keys Litestream knows but walstream does not use are accepted; keys nobody
//! knows are an error naming the key and its line, because a typo in a backup
//! tool's config should not silently fall back to a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::defaults;
pub use crate::storage::target::{ReplicaTarget, S3Target};
pub use crate::units::{parse_duration, parse_size};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    match s {
        None => Ok(None),
        Some(s) => parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// A size in bytes: a number, or a number with a unit (`KB`, `MB`, `GB` in
/// powers of 1000; `KiB`, `MiB`, `GiB` in powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(t) => parse_size(&t)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LoggingConfig {
    pub level: Option<String>,
    pub r#type: Option<String>,
    pub stderr: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GlobalSnapshotConfig {
    #[serde(default, deserialize_with = "duration")]
    pub interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub retention: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub dbs: Vec<DbConfig>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub addr: Option<String>,
    /// The control API's Unix socket (see `control`).
    pub socket: Option<PathBuf>,
    /// Bearer token that opens the control API on `addr` too.
    pub control_token: Option<String>,
    pub exec: Option<String>,
    pub logging: Option<LoggingConfig>,
    pub mcp_addr: Option<String>,
    pub snapshot: Option<GlobalSnapshotConfig>,
    /// Compaction levels, finest first (default 5m, 1h).
    pub levels: Option<Vec<LevelConfig>>,
    /// `/readyz` allows this much time past a replica's sync-interval since
    /// its last complete sync (default 10s).
    #[serde(default, deserialize_with = "duration")]
    pub ready_lag: Option<Duration>,
    /// After SIGINT/SIGTERM/SIGHUP (or the application's exit), how long the
    /// last shipment may take before the process exits anyway (default 10s).
    #[serde(default, deserialize_with = "duration")]
    pub shutdown_timeout: Option<Duration>,
    /// How often a running daemon logs a summary line per database that
    /// shipped something (default 1m).
    #[serde(default, deserialize_with = "duration")]
    pub summary_interval: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LevelConfig {
    #[serde(default, deserialize_with = "duration")]
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DbConfig {
    pub path: Option<PathBuf>,
    /// Replicate every database in this directory (instead of `path`).
    pub dir: Option<PathBuf>,
    /// With `dir`: file name pattern, e.g. `*.db` (default `*`).
    pub pattern: Option<String>,
    /// With `dir`: include subdirectories.
    pub recursive: Option<bool>,
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
    pub replica: Option<ReplicaConfig>,
    pub meta_path: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration")]
    pub monitor_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub checkpoint_interval: Option<Duration>,
    pub min_checkpoint_page_count: Option<u64>,
    pub max_checkpoint_page_count: Option<u64>,
    pub truncate_page_n: Option<u64>,
    #[serde(default, deserialize_with = "duration")]
    pub busy_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub snapshot_interval: Option<Duration>,
    /// Make this database its replicas' new state even where it is behind
    /// them (see `lineage`).
    pub takeover: Option<bool>,
}

/// `age:` of a replica (see `encryption`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgeConfig {
    #[serde(default)]
    pub recipients: Vec<String>,
    #[serde(default)]
    pub identities: Vec<String>,
}

/// `lease:` of a replica (see `lease`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LeaseConfig {
    #[serde(default, deserialize_with = "duration")]
    pub ttl: Option<Duration>,
    pub wait: Option<bool>,
    pub required: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReplicaConfig {
    pub name: Option<String>,
    pub r#type: Option<String>,
    pub url: Option<String>,
    pub path: Option<String>,
    pub bucket: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub force_path_style: Option<bool>,
    pub skip_verify: Option<bool>,
    #[serde(default, deserialize_with = "duration")]
    pub sync_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub snapshot_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub retention: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub retention_check_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub validation_interval: Option<Duration>,
    /// Bytes of page data this replica may hold while its storage fails
    /// before it is detached (a new generation follows when it recovers).
    pub max_pending: Option<ByteSize>,
    /// The replica's lease (one writer at a time).
    pub lease: Option<LeaseConfig>,
    pub part_size: Option<u64>,
    pub concurrency: Option<u64>,
    pub sse: Option<String>,
    pub storage_class: Option<String>,
    pub sse_c_key: Option<String>,
    pub sse_kms_key_id: Option<String>,
    /// Client-side encryption (see `encryption`): Litestream 0.3's keys.
    pub age: Option<AgeConfig>,
}

/// A validated configuration, with defaults filled in.
#[derive(Debug, Clone)]
pub struct Settings {
    pub dbs: Vec<DbSettings>,
    /// Directories whose databases are all replicated.
    pub dirs: Vec<DirSettings>,
    pub addr: Option<String>,
    /// The control socket, if configured (else the default, see `control`).
    pub socket: Option<PathBuf>,
    /// Opens the control API on `addr` (Bearer auth).
    pub control_token: Option<String>,
    /// The config file's directory (a fallback place for the socket).
    pub config_dir: Option<PathBuf>,
    pub exec: Option<String>,
    pub log_level: Option<String>,
    pub log_format: LogFormat,
    pub ready_lag: Duration,
    /// How long the last shipment may take once a stop begins.
    pub shutdown_timeout: Duration,
    /// See `report`.
    pub summary_interval: Duration,
    /// Compaction levels' intervals, finest first.
    pub levels: Vec<Duration>,
}

impl Settings {
    /// Settings for one database given on the command line.
    pub fn single(db: DbSettings) -> Settings {
        Settings {
            dbs: vec![db],
            dirs: Vec::new(),
            addr: None,
            socket: None,
            control_token: None,
            config_dir: None,
            exec: None,
            log_level: None,
            log_format: LogFormat::Text,
            ready_lag: defaults::READY_LAG,
            shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
            summary_interval: defaults::SUMMARY_INTERVAL,
            levels: default_levels(),
        }
    }
}

/// Compaction every 5 minutes, then every hour.
pub fn default_levels() -> Vec<Duration> {
    defaults::LEVELS.to_vec()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A `dir:` entry: every database below `dir` whose file name matches
/// `pattern`, each replicated like `template` with its path relative to `dir`
/// appended to every replica's location.
#[derive(Debug, Clone)]
pub struct DirSettings {
    pub dir: PathBuf,
    pub pattern: glob::Pattern,
    pub recursive: bool,
    pub template: DbSettings,
}

impl DirSettings {
    /// The settings for the database at `db` (a path below `dir`).
    pub fn for_db(&self, db: &Path) -> Option<DbSettings> {
        let rel = db.strip_prefix(&self.dir).ok()?;
        let mut s = self.template.clone();
        s.path = db.to_path_buf();
        for r in &mut s.replicas {
            r.target = r.target.join(rel);
        }
        Some(s)
    }
}

#[derive(Debug, Clone)]
pub struct DbSettings {
    pub path: PathBuf,
    pub replicas: Vec<ReplicaSettings>,
    pub monitor_interval: Duration,
    pub checkpoint_interval: Duration,
    pub min_checkpoint_page_count: u64,
    pub max_checkpoint_page_count: u64,
    pub snapshot_interval: Duration,
    pub busy_timeout: Duration,
    /// Start new generations from this database even where it is behind
    /// its replica (`--takeover`, `takeover: true`).
    pub takeover: bool,
}

impl DbSettings {
    pub fn with_defaults(path: PathBuf, replicas: Vec<ReplicaSettings>) -> DbSettings {
        DbSettings {
            path,
            replicas,
            monitor_interval: defaults::MONITOR_INTERVAL,
            checkpoint_interval: defaults::CHECKPOINT_INTERVAL,
            min_checkpoint_page_count: defaults::MIN_CHECKPOINT_PAGE_COUNT,
            max_checkpoint_page_count: defaults::MAX_CHECKPOINT_PAGE_COUNT,
            snapshot_interval: defaults::SNAPSHOT_INTERVAL,
            busy_timeout: defaults::BUSY_TIMEOUT,
            takeover: false,
        }
    }
}

/// One replica of one database: where it lives and how often it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSettings {
    pub target: ReplicaTarget,
    /// The replica's `name` in the config (Litestream's `-replica` picks a
    /// replica by it); `None`: its type (`file` or `s3`) stands for it.
    pub name: Option<String>,
    /// Minimum time between two uploads.
    pub sync_interval: Duration,
    /// Every point this far back stays restorable (default 24h).
    pub retention: Duration,
    /// How often retention (and compaction) runs (default 1h).
    pub retention_check_interval: Duration,
    /// How often the daemon verifies the replica (default: never).
    pub validation_interval: Option<Duration>,
    /// How often a snapshot is stored (default: the database's, 24h).
    pub snapshot_interval: Duration,
    /// See `defaults::MAX_PENDING`.
    pub max_pending: u64,
    pub lease: crate::lease::LeaseOptions,
    /// Client-side encryption keys (see `encryption`).
    pub age: Option<crate::encryption::AgeSettings>,
}

impl ReplicaSettings {
    /// The name that `-replica` matches: the configured name, else the
    /// type, as in Litestream.
    pub fn name(&self) -> &str {
        match (&self.name, &self.target) {
            (Some(n), _) => n,
            (None, ReplicaTarget::File { .. }) => "file",
            (None, ReplicaTarget::S3(_)) => "s3",
        }
    }

    /// Defaults per backend (see `defaults`).
    pub fn new(target: ReplicaTarget) -> ReplicaSettings {
        let sync_interval = match &target {
            ReplicaTarget::S3(s3) => s3.sync_interval.unwrap_or(defaults::S3_SYNC_INTERVAL),
            ReplicaTarget::File { .. } => defaults::FILE_SYNC_INTERVAL,
        };
        ReplicaSettings {
            target,
            name: None,
            sync_interval,
            retention: defaults::RETENTION,
            retention_check_interval: defaults::RETENTION_CHECK_INTERVAL,
            validation_interval: None,
            snapshot_interval: defaults::SNAPSHOT_INTERVAL,
            max_pending: defaults::MAX_PENDING,
            lease: crate::lease::LeaseOptions::default(),
            age: None,
        }
    }
}

/// Expands `${VAR}` and `$VAR` as Litestream does (Go's os.ExpandEnv);
/// `$$` is a literal `$`. Unlike Go, a variable that is not set is an
/// error naming it and its line: expanded to nothing, it silently turned
/// `/backups/$HOST/app` into `/backups//app`.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split_inclusive('\n').enumerate() {
        expand_line(line, &lookup, &mut out).map_err(|var| {
            format!(
                "line {}: environment variable {var} is not set (set it, write $$ for a literal $, or pass -no-expand-env)",
                n + 1
            )
        })?;
    }
    Ok(out)
}

/// Expands one line into `out`; `Err` names the first unset variable.
fn expand_line(
    text: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), String> {
    let mut chars = text.char_indices().peekable();
    let bytes = text.as_bytes();
    // A YAML comment is not expanded.
    let comment = text
        .find(" #")
        .map(|i| i + 1)
        .or_else(|| text.trim_start().starts_with('#').then_some(0))
        .unwrap_or(text.len());
    while let Some((i, c)) = chars.next() {
        if c != '$' || i >= comment {
            out.push(c);
            continue;
        }
        let get = |name: &str, shown: String| lookup(name).ok_or(shown);
        match bytes.get(i + 1) {
            Some(b'$') => {
                chars.next();
                out.push('$');
            }
            Some(b'{') => {
                if let Some(end) = text[i + 2..].find('}') {
                    let name = &text[i + 2..i + 2 + end];
                    out.push_str(&get(name, format!("${{{name}}}"))?);
                    while let Some(&(j, _)) = chars.peek() {
                        if j > i + 2 + end {
                            break;
                        }
                        chars.next();
                    }
                } else {
                    out.push('$');
                }
            }
            Some(b) if b.is_ascii_alphabetic() || *b == b'_' => {
                let len = text[i + 1..]
                    .bytes()
                    .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                    .count();
                let name = &text[i + 1..i + 1 + len];
                out.push_str(&get(name, format!("${name}"))?);
                for _ in 0..len {
                    chars.next();
                }
            }
            _ => out.push('$'),
        }
    }
    Ok(())
}

/// serde_yaml reports unknown top-level keys without a line, and errors
/// from nested values at the line of the enclosing mapping. Find the real
/// line of the key or value at fault and say it.
fn locate(text: &str, message: &str) -> String {
    let between = |m: &str, open: &str, close: char| -> Option<String> {
        let start = m.find(open)? + open.len();
        let len = m[start..].find(close)?;
        Some(m[start..start + len].to_string())
    };
    let strip_location = |m: &str| -> String {
        match m.rfind(" at line ") {
            Some(i) => m[..i].to_string(),
            None => m.to_string(),
        }
    };
    // serde_yaml's line, when it gives one, is at or before the real one.
    let from: usize = between(message, " at line ", ' ')
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let lines = || {
        text.lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l))
            .skip(from - 1)
    };
    let key_of = |line: &str| -> Option<String> {
        let t = line.trim_start().trim_start_matches("- ").trim_start();
        t.split_once(':').map(|(k, _)| k.trim().to_string())
    };
    if let Some(key) = between(message, "unknown field `", '`') {
        if let Some((n, _)) = lines().find(|(_, l)| key_of(l).as_deref() == Some(key.as_str())) {
            let base = strip_location(message);
            return format!("{base} (unknown key `{key}` at line {n})");
        }
    }
    if let Some(value) = between(message, "invalid duration \"", '"') {
        let found = lines().find(|(_, l)| {
            l.split_once(':')
                .is_some_and(|(_, v)| v.trim().trim_matches(|c| c == '"' || c == '\'') == value)
        });
        if let Some((n, l)) = found {
            let key = key_of(l).unwrap_or_default();
            let detail = message
                .find("invalid duration")
                .map(|i| strip_location(&message[i..]))
                .unwrap_or_else(|| message.to_string());
            return format!("{detail} for {key} at line {n}");
        }
    }
    message.to_string()
}

impl Config {
    /// Reads `path`, expands environment variables (unless `expand` is
    /// false: Litestream's `-no-expand-env`) and parses it.
    pub fn load(path: &Path, expand: bool) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let text = if expand {
            expand_env(&text, |k| std::env::var(k).ok()).map_err(|message| ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            })?
        } else {
            text
        };
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: locate(text, &e.to_string().replace('\n', " ")),
        })
    }

    /// Validates the configuration and fills in defaults. Relative paths
    /// (databases, directories, directory replicas) are taken relative to
    /// the directory of the config file at `path`, as a config file is
    /// read from anywhere (a service's working directory is rarely the
    /// config's).
    pub fn settings(&self, path: &Path) -> Result<Settings, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let base = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let resolve = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        if self.dbs.is_empty() {
            return Err(invalid("no databases configured (dbs is empty)".into()));
        }
        let mut dbs = Vec::new();
        let mut dirs = Vec::new();
        for (i, db) in self.dbs.iter().enumerate() {
            let at = format!("dbs[{i}]");
            let db_path = match (&db.path, &db.dir) {
                (Some(p), None) => resolve(p),
                (None, Some(d)) => resolve(d),
                (Some(_), Some(_)) => {
                    return Err(invalid(format!("{at}: give either path or dir, not both")))
                }
                (None, None) => return Err(invalid(format!("{at}: missing path (or dir)"))),
            };
            if db.dir.is_none() && (db.pattern.is_some() || db.recursive.is_some()) {
                return Err(invalid(format!(
                    "{at}: pattern and recursive only apply with dir"
                )));
            }
            let replicas: Vec<&ReplicaConfig> = match (&db.replica, db.replicas.is_empty()) {
                (Some(_), false) => {
                    return Err(invalid(format!("{at}: replica and replicas are both set")))
                }
                (Some(r), true) => vec![r],
                (None, false) => db.replicas.iter().collect(),
                (None, true) => return Err(invalid(format!("{at}: no replica configured"))),
            };
            let mut s = DbSettings::with_defaults(db_path, Vec::new());
            if let Some(v) = db.monitor_interval {
                s.monitor_interval = v.max(Duration::from_millis(10));
            }
            if let Some(v) = db.checkpoint_interval {
                s.checkpoint_interval = v;
            }
            if let Some(v) = db.min_checkpoint_page_count {
                s.min_checkpoint_page_count = v;
            }
            if let Some(v) = db.max_checkpoint_page_count.or(db.truncate_page_n) {
                s.max_checkpoint_page_count = v;
            }
            if let Some(v) = db.busy_timeout {
                s.busy_timeout = v;
            }
            if let Some(v) = db.takeover {
                s.takeover = v;
            }
            if s.max_checkpoint_page_count < s.min_checkpoint_page_count {
                return Err(invalid(format!(
                    "{at}: max-checkpoint-page-count ({}) is below min-checkpoint-page-count ({})",
                    s.max_checkpoint_page_count, s.min_checkpoint_page_count
                )));
            }
            let global_snapshot = self.snapshot.clone().unwrap_or_default();
            // The database's own interval (or the global one) is every
            // replica's default; a replica's own wins for that replica only.
            let db_snapshot_interval = db.snapshot_interval.or(global_snapshot.interval);
            if let Some(v) = db_snapshot_interval {
                s.snapshot_interval = v;
            }
            for (j, r) in replicas.iter().enumerate() {
                let rat = format!("{at}.replicas[{j}]");
                let target = match self
                    .replica_target(r)
                    .map_err(|m| invalid(format!("{rat}: {m}")))?
                {
                    ReplicaTarget::File { path } => ReplicaTarget::File {
                        path: resolve(&path),
                    },
                    t => t,
                };
                let mut rs = ReplicaSettings::new(target);
                rs.name = r.name.clone();
                if let Some(v) = r.sync_interval {
                    rs.sync_interval = v;
                }
                if let Some(v) = r.retention.or(global_snapshot.retention) {
                    if v.is_zero() {
                        return Err(invalid(format!("{rat}: retention must be positive")));
                    }
                    rs.retention = v;
                }
                if let Some(v) = r.retention_check_interval {
                    rs.retention_check_interval = v.max(Duration::from_millis(100));
                }
                rs.validation_interval = r.validation_interval.filter(|v| !v.is_zero());
                if let Some(a) = &r.age {
                    let age = crate::encryption::AgeSettings {
                        recipients: a.recipients.clone(),
                        identities: a
                            .identities
                            .iter()
                            .map(|i| {
                                // Identity files relative to the config.
                                if i.trim().starts_with("AGE-SECRET-KEY-") {
                                    i.clone()
                                } else {
                                    resolve(Path::new(i)).display().to_string()
                                }
                            })
                            .collect(),
                    };
                    if age.recipients.is_empty() && age.identities.is_empty() {
                        return Err(invalid(format!(
                            "{rat}: age needs recipients (to encrypt) or identities (to decrypt)"
                        )));
                    }
                    crate::encryption::Keys::parse(&age)
                        .map_err(|e| invalid(format!("{rat}: age: {e}")))?;
                    rs.age = Some(age);
                }
                if let Some(l) = &r.lease {
                    if let Some(ttl) = l.ttl {
                        if ttl < Duration::from_secs(1) {
                            return Err(invalid(format!("{rat}: lease ttl must be at least 1s")));
                        }
                        rs.lease.ttl = ttl;
                    }
                    rs.lease.wait = l.wait.unwrap_or(rs.lease.wait);
                    rs.lease.required = l.required.unwrap_or(rs.lease.required);
                }
                if let Some(v) = &r.max_pending {
                    if v.0 == 0 {
                        return Err(invalid(format!("{rat}: max-pending must be positive")));
                    }
                    rs.max_pending = v.0;
                }
                rs.snapshot_interval = r
                    .snapshot_interval
                    .or(db_snapshot_interval)
                    .unwrap_or(s.snapshot_interval);
                if rs.snapshot_interval.is_zero() {
                    return Err(invalid(format!(
                        "{rat}: snapshot-interval must be positive"
                    )));
                }
                s.replicas.push(rs);
            }
            if s.snapshot_interval.is_zero() {
                return Err(invalid(format!("{at}: snapshot-interval must be positive")));
            }
            if db.dir.is_some() {
                let pattern = db.pattern.as_deref().unwrap_or("*");
                let pattern = glob::Pattern::new(pattern)
                    .map_err(|e| invalid(format!("{at}: pattern {pattern:?}: {e}")))?;
                dirs.push(DirSettings {
                    dir: s.path.clone(),
                    pattern,
                    recursive: db.recursive.unwrap_or(false),
                    template: s,
                });
            } else {
                dbs.push(s);
            }
        }
        let logging = self.logging.clone().unwrap_or_default();
        let log_format = match logging.r#type.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(format!(
                    "logging.type {other:?} is not text or json"
                )))
            }
        };
        if let Some(exec) = &self.exec {
            crate::exec::split(exec).map_err(|e| invalid(e.to_string()))?;
        }
        if let Some(addr) = &self.addr {
            crate::server::parse_addr(addr).map_err(|e| invalid(e.to_string()))?;
        }
        let levels = match &self.levels {
            None => default_levels(),
            Some(ls) => ls
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    l.interval
                        .ok_or_else(|| invalid(format!("levels[{i}]: missing interval")))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        crate::compact::validate_levels(&levels).map_err(invalid)?;
        Ok(Settings {
            levels,
            dbs,
            dirs,
            addr: self.addr.clone(),
            socket: self.socket.as_deref().map(resolve),
            control_token: match &self.control_token {
                Some(t) if t.len() < 16 => {
                    return Err(invalid(
                        "control-token must be at least 16 characters".into(),
                    ))
                }
                t => t.clone(),
            },
            config_dir: Some(base.clone()),
            exec: self.exec.clone(),
            log_level: logging.level,
            log_format,
            ready_lag: self.ready_lag.unwrap_or(defaults::READY_LAG),
            shutdown_timeout: self.shutdown_timeout.unwrap_or(defaults::SHUTDOWN_TIMEOUT),
            summary_interval: self
                .summary_interval
                .filter(|d| !d.is_zero())
                .unwrap_or(defaults::SUMMARY_INTERVAL),
        })
    }

    fn replica_target(&self, r: &ReplicaConfig) -> Result<ReplicaTarget, String> {
        // Ignoring this would store in the clear what the user asked to
        // have encrypted.
        if r.sse_c_key.is_some() {
            return Err("sse-c-key (customer-provided keys) is not supported: walstream would store this replica without it (remove it, or use sse: aws:kms)".into());
        }
        let mut target = match (&r.url, r.r#type.as_deref()) {
            (Some(url), _) => ReplicaTarget::parse_url(url)?,
            (None, None | Some("file")) => {
                let p = r.path.as_ref().ok_or("missing url or path")?;
                ReplicaTarget::File {
                    path: PathBuf::from(p),
                }
            }
            (None, Some("s3")) => ReplicaTarget::S3(Box::new(S3Target::new(
                r.bucket.as_deref().ok_or("s3 replica needs a bucket")?,
                r.path.as_deref().unwrap_or_default(),
            ))),
            (None, Some(other)) => {
                return Err(format!(
                    "unsupported replica type {other:?} (supported: file, s3)"
                ))
            }
        };
        if let ReplicaTarget::S3(s) = &mut target {
            if r.endpoint.is_some() {
                s.endpoint = r.endpoint.clone();
            }
            if r.region.is_some() {
                s.region = r.region.clone();
            }
            if let Some(v) = r.force_path_style {
                s.force_path_style = v;
            }
            if let Some(v) = r.skip_verify {
                s.skip_verify = v;
            }
            if let Some(sse) = &r.sse {
                if sse != "AES256" && sse != "aws:kms" {
                    return Err(format!("unsupported sse {sse:?} (use AES256 or aws:kms)"));
                }
                s.sse = Some(sse.clone());
            }
            s.sse_kms_key_id = r.sse_kms_key_id.clone();
            s.storage_class = r.storage_class.clone();
            if let Some(p) = r.part_size {
                if p < 5 << 20 {
                    return Err(format!("part-size {p} is below the S3 minimum of 5 MiB"));
                }
                s.part_size = Some(p as usize);
            }
            if let Some(c) = r.concurrency {
                s.concurrency = Some(c.max(1) as usize);
            }
            s.access_key_id = r
                .access_key_id
                .clone()
                .or_else(|| self.access_key_id.clone());
            s.secret_access_key = r
                .secret_access_key
                .clone()
                .or_else(|| self.secret_access_key.clone());
        }
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        let p = Path::new("test.yml");
        Config::parse(text, p)?.settings(p)
    }

    #[test]
    fn each_replica_keeps_its_own_snapshot_interval_and_max_pending() {
        let s = parse(
            "snapshot:\n  interval: 6h\ndbs:\n  - path: /a.db\n    replicas:\n      - path: /r1\n        snapshot-interval: 1h\n        max-pending: 256MiB\n      - path: /r2\n      - path: /r3\n        max-pending: 1000000\n  - path: /b.db\n    snapshot-interval: 2h\n    replicas:\n      - path: /r4\n",
        )
        .unwrap();
        let r = &s.dbs[0].replicas;
        // The first replica's interval is its own, not every replica's.
        assert_eq!(r[0].snapshot_interval, Duration::from_secs(3600));
        assert_eq!(r[1].snapshot_interval, Duration::from_secs(6 * 3600));
        assert_eq!(r[2].snapshot_interval, Duration::from_secs(6 * 3600));
        assert_eq!(r[0].max_pending, 256 << 20);
        assert_eq!(r[1].max_pending, defaults::MAX_PENDING);
        assert_eq!(r[2].max_pending, 1_000_000);
        assert_eq!(
            s.dbs[1].replicas[0].snapshot_interval,
            Duration::from_secs(2 * 3600)
        );
        for (text, needle) in [
            ("max-pending: 0", "max-pending must be positive"),
            ("max-pending: 12 parsecs", "unknown unit"),
            ("max-pending: lots", "invalid size"),
        ] {
            let e = parse(&format!(
                "dbs:\n  - path: /a.db\n    replicas:\n      - path: /r1\n        {text}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn litestream_examples() {
        let s = parse(
            "dbs:\n  - path: /var/lib/app.db\n    replicas:\n      - url: s3://bucket/app?endpoint=http://127.0.0.1:9000&forcePathStyle=true\n      - type: s3\n        bucket: b2\n        path: /db/\n        region: us-east-1\n        sync-interval: 1s\n  - path: other.db\n    replica:\n      path: /backups/other\n",
        )
        .unwrap();
        assert_eq!(s.dbs.len(), 2);
        let ReplicaTarget::S3(a) = &s.dbs[0].replicas[0].target else {
            panic!()
        };
        assert_eq!(a.bucket, "bucket");
        assert_eq!(a.prefix, "app");
        assert_eq!(a.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(a.force_path_style);
        let ReplicaTarget::S3(b) = &s.dbs[0].replicas[1].target else {
            panic!()
        };
        assert_eq!((b.bucket.as_str(), b.prefix.as_str()), ("b2", "db"));
        assert_eq!(s.dbs[0].replicas[0].sync_interval, Duration::from_secs(1));
        assert_eq!(
            s.dbs[1].replicas[0].sync_interval,
            Duration::from_millis(25)
        );
        assert_eq!(
            s.dbs[1].replicas[0].target,
            ReplicaTarget::File {
                path: "/backups/other".into()
            }
        );
        assert_eq!(s.dbs[1].snapshot_interval, Duration::from_secs(86400));
    }

    #[test]
    fn s3_options() {
        let s = parse("dbs:\n  - path: a.db\n    replica:\n      type: s3\n      bucket: b\n      sse: aws:kms\n      sse-kms-key-id: k1\n      storage-class: STANDARD_IA\n      part-size: 10485760\n      concurrency: 3\n      sync-interval: 250ms\n").unwrap();
        assert_eq!(
            s.dbs[0].replicas[0].sync_interval,
            Duration::from_millis(250)
        );
        let ReplicaTarget::S3(t) = &s.dbs[0].replicas[0].target else {
            panic!()
        };
        assert_eq!(t.sse.as_deref(), Some("aws:kms"));
        assert_eq!(t.sse_kms_key_id.as_deref(), Some("k1"));
        assert_eq!(t.storage_class.as_deref(), Some("STANDARD_IA"));
        assert_eq!((t.part_size, t.concurrency), (Some(10 << 20), Some(3)));
        let s =
            parse("dbs:\n  - path: a.db\n    replica:\n      path: /r\n      sync-interval: 1s\n")
                .unwrap();
        assert_eq!(s.dbs[0].replicas[0].sync_interval, Duration::from_secs(1));
        let e = parse("dbs:\n  - path: a.db\n    replica:\n      type: s3\n      bucket: b\n      sse: rot13\n").unwrap_err();
        assert!(e.to_string().contains("rot13"));
    }

    #[test]
    fn env_expansion() {
        let env = |k: &str| match k {
            "A" => Some("x".to_string()),
            "B_2" => Some("y".to_string()),
            _ => None,
        };
        assert_eq!(expand_env("${A}/$B_2/$$/z", env).unwrap(), "x/y/$/z");
        assert_eq!(expand_env("cost: 5$", env).unwrap(), "cost: 5$");
        // Comments are not expanded.
        assert_eq!(
            expand_env("# $NOPE\na: 1 # ${NOPE}\n", env).unwrap(),
            "# $NOPE\na: 1 # ${NOPE}\n"
        );
        let e = expand_env("a: 1\npath: /backups/$HOSTX/app\n", env).unwrap_err();
        assert!(
            e.starts_with("line 2: environment variable $HOSTX is not set"),
            "{e}"
        );
        let e = expand_env("bucket: ${BUCKET}", env).unwrap_err();
        assert!(e.contains("${BUCKET}"), "{e}");
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let p = Path::new("/etc/walstream/app.yml");
        let text = "dbs:\n  - path: data/app.db\n    replicas:\n      - path: ../backups/app\n      - url: s3://b/app\n  - dir: tenants\n    replica:\n      path: /abs/rep\n";
        let s = Config::parse(text, p).unwrap().settings(p).unwrap();
        assert_eq!(s.dbs[0].path, Path::new("/etc/walstream/data/app.db"));
        assert_eq!(
            s.dbs[0].replicas[0].target.to_string(),
            "file:///etc/walstream/../backups/app"
        );
        assert_eq!(s.dirs[0].dir, Path::new("/etc/walstream/tenants"));
        assert_eq!(
            s.dirs[0].template.replicas[0].target.to_string(),
            "file:///abs/rep"
        );
    }

    #[test]
    fn unknown_keys_name_key_and_line() {
        let e = parse("dbs:\n  - path: a.db\n    replica:\n      path: /r\n      bogus: 1\n")
            .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("bogus") && m.contains("line 5"), "{m}");
        let e = parse("dbz: []\n").unwrap_err().to_string();
        assert!(e.contains("dbz") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn bad_duration_names_value_and_line() {
        let e = parse(
            "dbs:\n  - path: a.db\n    monitor-interval: fast\n    replica:\n      path: /r\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fast") && e.contains("line 3"), "{e}");
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    }

    #[test]
    fn semantic_errors() {
        for (text, needle) in [
            ("dbs: []\n", "no databases"),
            ("dbs:\n  - replica:\n      path: /r\n", "missing path"),
            ("dbs:\n  - path: a.db\n", "no replica"),
            ("dbs:\n  - path: a.db\n    replica:\n      path: /r\n    replicas:\n      - path: /s\n", "both"),
            ("dbs:\n  - path: a.db\n    replica:\n      type: gcs\n", "gcs"),
            ("dbs:\n  - path: a.db\n    min-checkpoint-page-count: 10\n    max-checkpoint-page-count: 5\n    replica:\n      path: /r\n", "max-checkpoint"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn urls_and_display_hide_secrets() {
        assert_eq!(
            ReplicaTarget::parse_url("file:///x/y").unwrap(),
            ReplicaTarget::File {
                path: "/x/y".into()
            }
        );
        assert_eq!(
            ReplicaTarget::parse_url("rel/dir").unwrap(),
            ReplicaTarget::File {
                path: "rel/dir".into()
            }
        );
        assert!(ReplicaTarget::parse_url("gcs://b/p").is_err());
        let s = parse("secret-access-key: SUPERSECRET\ndbs:\n  - path: a.db\n    replica:\n      type: s3\n      bucket: bk\n").unwrap();
        let t = &s.dbs[0].replicas[0].target;
        assert!(!format!("{t} {t:?}").contains("SUPERSECRET"));
        let ReplicaTarget::S3(s3) = t else { panic!() };
        assert_eq!(s3.secret_access_key.as_deref(), Some("SUPERSECRET"));
    }

    #[test]
    fn shutdown_timeout() {
        let s = parse("dbs:\n  - path: a.db\n    replica:\n      path: /r\n").unwrap();
        assert_eq!(s.shutdown_timeout, Duration::from_secs(10));
        let s = parse("shutdown-timeout: 2s\ndbs:\n  - path: a.db\n    replica:\n      path: /r\n")
            .unwrap();
        assert_eq!(s.shutdown_timeout, Duration::from_secs(2));
        let e =
            parse("shutdown-timeout: soon\ndbs:\n  - path: a.db\n    replica:\n      path: /r\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("soon") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn example_config_parses() {
        let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/walstream.yml"));
        let c = Config::load(p, true).unwrap();
        c.settings(p).unwrap();
    }
}
