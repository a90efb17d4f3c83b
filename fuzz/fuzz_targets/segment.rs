//! The object decoder on arbitrary bytes: never panics and never allocates
//! without bound; anything accepted re-encodes to an object that decodes to
//! the same content.
//!
//! Random bytes almost never carry a valid SHA-256 trailer, so each input is
//! also decoded with its trailer recomputed: that is what lets the fuzzer
//! reach the header JSON, the LZ4 frame and the page records behind the
//! checksum (a hostile or buggy writer can produce such objects too).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use walstream::segment;

fn check(data: &[u8]) {
    if let Ok(s) = segment::decode(data) {
        let again = segment::decode(&segment::encode(&s.header, &s.pages)).unwrap();
        assert_eq!(again.header, s.header);
        assert_eq!(again.pages, s.pages);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 32 {
        let mut fixed = data[..data.len() - 32].to_vec();
        let sum = Sha256::digest(&fixed);
        fixed.extend_from_slice(&sum);
        check(&fixed);
    }
});
