//! `walstream databases`: the databases a config replicates and where each
//! goes (Litestream's `databases`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Result};

use super::out::outln;
use super::target::{config_path, load_settings, DEFAULT_CONFIGS};

pub fn run(config: Option<PathBuf>) -> Result<ExitCode> {
    let (cfg, _) = config_path(config.as_deref(), &DEFAULT_CONFIGS).ok_or_else(|| {
        anyhow!(
            "no config file: give --config FILE, set WALSTREAM_CONFIG or LITESTREAM_CONFIG, or create {}",
            DEFAULT_CONFIGS.join(" or ")
        )
    })?;
    let settings = load_settings(&cfg)?;
    outln!("{:<50} replicas", "path");
    for db in &settings.dbs {
        let replicas: Vec<String> = db.replicas.iter().map(|r| r.target.to_string()).collect();
        outln!("{:<50} {}", db.path.display(), replicas.join(", "));
    }
    for d in &settings.dirs {
        let found = walstream::daemon::scan(d).unwrap_or_default();
        if found.is_empty() {
            outln!(
                "{:<50} (no database yet)",
                format!("{}/{}", d.dir.display(), d.pattern)
            );
        }
        for db in found {
            let replicas: Vec<String> = db.replicas.iter().map(|r| r.target.to_string()).collect();
            outln!("{:<50} {}", db.path.display(), replicas.join(", "));
        }
    }
    Ok(ExitCode::SUCCESS)
}
