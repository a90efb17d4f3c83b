//! Compile-time switches for the tests that need a program from PyPI:
//! moto's S3 server (tests/s3.rs, `WALSTREAM_MOTO_SERVER`) and Litestream
//! itself (tests/litestream_compat.rs, `WALSTREAM_LITESTREAM_BIN`). With the
//! variable set, as `.ci/run` does, they run; without it, `cargo test` lists
//! them as ignored and says why, rather than reporting `ok` for tests that
//! ran nothing.
fn main() {
    for (var, cfg) in [
        ("WALSTREAM_MOTO_SERVER", "moto"),
        ("WALSTREAM_LITESTREAM_BIN", "litestream"),
    ] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        println!("cargo::rerun-if-env-changed={var}");
        if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
