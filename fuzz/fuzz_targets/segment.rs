//! The object decoder on arbitrary bytes: never panics; anything accepted
//! re-encodes to an object that decodes to the same content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walstream::segment;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = segment::decode(data) {
        let again = segment::decode(&segment::encode(&s.header, &s.pages)).unwrap();
        assert_eq!(again.header, s.header);
        assert_eq!(again.pages, s.pages);
    }
});
