//! The WAL parser on arbitrary files: never panics, and whatever it accepts
//! is a whole number of transactions within the file.
//!
//! Random bytes almost never carry valid salts and checksum chains, so each
//! input is also parsed after resealing: salts copied from the header into
//! every frame and all checksums recomputed. That is what lets the fuzzer
//! reach page numbers, commit markers and database sizes (a WAL that SQLite
//! wrote can hold any of those).
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use walstream::wal;

fn check(data: &[u8]) {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(data).unwrap();
    if let Ok(Some(h)) = wal::read_header(&mut f) {
        let start = h.start();
        if let Ok((c, end)) = wal::read_committed(&mut f, &start, None) {
            assert!(end.offset <= data.len() as u64);
            assert_eq!((end.offset - start.offset) % start.frame_size(), 0);
            assert!(c.pages.keys().all(|&p| p >= 1 && p <= c.db_pages));
            let _ = wal::verify_prefix(&mut f, &end);
        }
    }
}

fn be(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// Salts and checksums made valid, everything else as given.
fn reseal(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < 32 {
        return None;
    }
    let mut b = data.to_vec();
    let big_endian = be(&b, 0) & 1 == 1;
    let ps = match be(&b, 8) {
        1 => 65536,
        p if (512..=32768).contains(&p) && p.is_power_of_two() => p as usize,
        _ => return None,
    };
    let mut sum = wal::wal_checksum(big_endian, &b[0..24], (0, 0));
    b[24..28].copy_from_slice(&sum.0.to_be_bytes());
    b[28..32].copy_from_slice(&sum.1.to_be_bytes());
    let salts: [u8; 8] = b[16..24].try_into().unwrap();
    let mut at = 32;
    while at + 24 + ps <= b.len() {
        b[at + 8..at + 16].copy_from_slice(&salts);
        sum = wal::wal_checksum(big_endian, &b[at..at + 8], sum);
        sum = wal::wal_checksum(big_endian, &b[at + 24..at + 24 + ps], sum);
        b[at + 16..at + 20].copy_from_slice(&sum.0.to_be_bytes());
        b[at + 20..at + 24].copy_from_slice(&sum.1.to_be_bytes());
        at += 24 + ps;
    }
    Some(b)
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(b) = reseal(data) {
        check(&b);
    }
});
