//! The storage contract on the backends that need no server: memory and a
//! directory (S3 runs the same suite in `tests/s3.rs`).

mod common;

use walstream::storage::file::FileStorage;
use walstream::storage::memory::MemoryStorage;

#[tokio::test]
async fn memory_storage_keeps_the_contract() {
    common::conformance::run(&MemoryStorage::new()).await;
}

#[tokio::test]
async fn directory_storage_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    common::conformance::run(&FileStorage::new(dir.path().join("replica"))).await;
    // No temporary files are left behind.
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            assert!(!e.file_name().to_string_lossy().starts_with('.'));
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
}
