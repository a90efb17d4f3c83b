//! A compile-time switch for the tests that need moto's S3 server
//! (tests/s3.rs): with `WALSTREAM_MOTO_SERVER` set, as `.ci/run` does, they
//! run; without it, `cargo test` lists them as ignored and says why, rather
//! than reporting `ok` for tests that ran nothing.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(moto)");
    println!("cargo::rerun-if-env-changed=WALSTREAM_MOTO_SERVER");
    if std::env::var_os("WALSTREAM_MOTO_SERVER").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=moto");
    }
}
