//! Standard output for listings: a reader that goes away (`walstream
//! segments URL | head -1`) ends the command quietly with success, as in
//! ripgrep, instead of a panic on the broken pipe.

/// `println!` that exits quietly when standard output is a closed pipe.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            $crate::cli::out::write_failed(e);
        }
    }};
}
pub(crate) use outln;

/// A write to standard output failed: a closed pipe ends the process with
/// success; anything else is reported.
pub fn write_failed(e: std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("walstream: error: writing to standard output: {e}");
    std::process::exit(1);
}
