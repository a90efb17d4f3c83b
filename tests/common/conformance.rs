//! The storage contract (see `walstream::storage`) as executable checks,
//! run against every backend: memory and directory in `tests/storage.rs`,
//! S3 (s3s-fs and moto) in `tests/s3.rs`. Compiled for the tests only.

use walstream::storage::{Conditional, Storage, StorageError};

/// Runs every check against `s`, which must be empty. Panics on violation.
pub async fn run(s: &dyn Storage) {
    // Empty storage lists nothing and misses cleanly.
    assert!(
        s.list("").await.unwrap().is_empty(),
        "storage must start empty"
    );
    match s.get("a/missing").await {
        Err(StorageError::NotFound { key, .. }) => assert_eq!(key, "a/missing"),
        other => panic!("get of missing key: expected NotFound, got {other:?}"),
    }

    // Put / get round trip, including empty and binary objects.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    s.put("g/1/segments/b", big.clone()).await.unwrap();
    s.put("g/1/segments/a", b"alpha".to_vec()).await.unwrap();
    s.put("g/1/snapshots/a", Vec::new()).await.unwrap();
    s.put("g/2/x", b"x".to_vec()).await.unwrap();
    s.put("other", b"o".to_vec()).await.unwrap();
    assert_eq!(s.get("g/1/segments/b").await.unwrap(), big);
    assert_eq!(s.get("g/1/snapshots/a").await.unwrap(), Vec::<u8>::new());

    // Overwrite replaces the whole object.
    s.put("g/1/segments/a", b"a2".to_vec()).await.unwrap();
    assert_eq!(s.get("g/1/segments/a").await.unwrap(), b"a2");

    // List: recursive, sorted, prefix-filtered, sizes reported.
    let keys =
        |v: Vec<walstream::storage::ObjectMeta>| v.into_iter().map(|m| m.key).collect::<Vec<_>>();
    assert_eq!(
        keys(s.list("").await.unwrap()),
        [
            "g/1/segments/a",
            "g/1/segments/b",
            "g/1/snapshots/a",
            "g/2/x",
            "other"
        ]
    );
    assert_eq!(
        keys(s.list("g/1/").await.unwrap()),
        ["g/1/segments/a", "g/1/segments/b", "g/1/snapshots/a"]
    );
    assert_eq!(
        keys(s.list("g/1/seg").await.unwrap()),
        ["g/1/segments/a", "g/1/segments/b"]
    );
    assert!(s.list("nothing/").await.unwrap().is_empty());
    let listed = s.list("g/1/segments/b").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, big.len() as u64);

    // Delete, including of a missing key.
    s.delete("g/1/segments/a").await.unwrap();
    s.delete("g/1/segments/a").await.unwrap();
    assert!(s.get("g/1/segments/a").await.unwrap_err().is_not_found());
    for k in ["g/1/segments/b", "g/1/snapshots/a", "g/2/x", "other"] {
        s.delete(k).await.unwrap();
    }
    assert!(s.list("").await.unwrap().is_empty());

    // Files in and out, larger than one S3 multipart part.
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("src");
    let big: Vec<u8> = (0..(12u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&src, &big).unwrap();
    s.put_file("files/big", &src).await.unwrap();
    let dest = dir.path().join("dest");
    assert_eq!(
        s.get_file("files/big", &dest).await.unwrap(),
        big.len() as u64
    );
    assert!(
        std::fs::read(&dest).unwrap() == big,
        "get_file content differs"
    );
    assert!(s
        .get_file("files/missing", &dir.path().join("m"))
        .await
        .unwrap_err()
        .is_not_found());
    s.delete("files/big").await.unwrap();

    // Exclusive creation, of bytes and of files (large ones in parts): the
    // first wins, a second finds the object and changes nothing. Every
    // object a lease holder writes is created this way.
    assert!(matches!(
        s.create_new("excl/a", b"first".to_vec()).await.unwrap(),
        Conditional::Done(_)
    ));
    assert_eq!(
        s.create_new("excl/a", b"second".to_vec()).await.unwrap(),
        Conditional::Conflict
    );
    assert_eq!(s.get("excl/a").await.unwrap(), b"first");
    assert!(matches!(
        s.create_new_file("excl/big", &src).await.unwrap(),
        Conditional::Done(_)
    ));
    std::fs::write(&src, b"small").unwrap();
    assert_eq!(
        s.create_new_file("excl/big", &src).await.unwrap(),
        Conditional::Conflict
    );
    assert!(
        s.get("excl/big").await.unwrap() == big,
        "a refused exclusive create changed the object"
    );
    let listed = s.list("excl/").await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    if let Some(t) = listed[0].modified_ms {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((now - t).abs() < 60_000, "modified {t}, now {now}");
    }
    s.delete("excl/a").await.unwrap();
    s.delete("excl/big").await.unwrap();

    // Replacement only at the version read (If-Match), where supported.
    match s.create_new("excl/v", b"one".to_vec()).await.unwrap() {
        Conditional::Done(_) => {}
        Conditional::Conflict => panic!("excl/v existed"),
    }
    match s.get_versioned("excl/v").await {
        Ok((data, v1)) => {
            assert_eq!(data, b"one");
            let Conditional::Done(v2) = s.replace_if("excl/v", b"two".to_vec(), &v1).await.unwrap()
            else {
                panic!("replace at the current version refused");
            };
            assert_ne!(v1, v2);
            assert_eq!(
                s.replace_if("excl/v", b"three".to_vec(), &v1)
                    .await
                    .unwrap(),
                Conditional::Conflict,
                "replace at a stale version accepted"
            );
            assert_eq!(s.get("excl/v").await.unwrap(), b"two");
        }
        Err(StorageError::Unsupported { .. }) => {}
        Err(e) => panic!("get_versioned: {e}"),
    }
    s.delete("excl/v").await.unwrap();

    // Many keys (more than one S3 list page).
    for i in 0..1100 {
        s.put(&format!("many/{i:05}"), vec![1]).await.unwrap();
    }
    let listed = s.list("many/").await.unwrap();
    assert_eq!(listed.len(), 1100);
    assert!(listed.windows(2).all(|w| w[0].key < w[1].key));
    for m in listed {
        s.delete(&m.key).await.unwrap();
    }
}
