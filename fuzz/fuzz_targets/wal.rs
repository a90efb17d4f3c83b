//! The WAL parser on arbitrary files: never panics, and whatever it accepts
//! is a whole number of transactions within the file.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use walstream::wal;

fuzz_target!(|data: &[u8]| {
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
});
