//! The process's budget of open files.
//!
//! Every replicated database keeps a few descriptors open for as long as it
//! is replicated (see `FDS_PER_DATABASE`), so the open-file limit caps how
//! many databases one process can take. Running into the limit halfway must
//! not make every database fail at random (each round opens the WAL, each
//! upload a file): a database is only started while its descriptors fit
//! with `RESERVE` to spare, and the first one that does not is reported once,
//! with the limit, the count in use and what to raise. The others go on.

use std::path::Path;

/// Descriptors one replicated database holds: walstream's own handle on the
/// database file, the database and WAL files of each of its two
/// connections, and the shared-memory file.
pub const FDS_PER_DATABASE: u64 = 6;

/// Descriptors kept free for what every database opens briefly (the WAL
/// read by a round, snapshot files, uploads, listings) and for the process
/// itself (sockets, notifications, logs).
pub const RESERVE: u64 = 128;

#[derive(Debug)]
pub struct FdBudget {
    limit: u64,
    /// Descriptors open when the budget was made.
    base: u64,
    databases: u64,
    /// Whether running out was reported since the last database started.
    reported: bool,
}

impl FdBudget {
    /// Raises the soft limit to the hard one (as Go's runtime does for
    /// Litestream) and starts counting from the descriptors open now.
    pub fn raised() -> FdBudget {
        FdBudget::with_limit(raise_open_file_limit(), open_now())
    }

    pub fn with_limit(limit: u64, base: u64) -> FdBudget {
        FdBudget {
            limit,
            base,
            databases: 0,
            reported: false,
        }
    }

    /// Descriptors the started databases are expected to hold, with what was
    /// open at the start.
    pub fn in_use(&self) -> u64 {
        self.base + self.databases * FDS_PER_DATABASE
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Takes the descriptors of one more database if they fit; otherwise
    /// reports (once until a database fits again) and refuses.
    pub fn admit(&mut self, db: &Path) -> bool {
        if self.in_use() + FDS_PER_DATABASE + RESERVE <= self.limit {
            self.databases += 1;
            self.reported = false;
            return true;
        }
        if !self.reported {
            self.reported = true;
            tracing::error!(
                db = %db.display(),
                limit = self.limit,
                in_use = self.in_use(),
                databases = self.databases,
                "open file limit reached: {} of {} descriptors in use by {} databases; {} and any further databases are not replicated until walstream runs with a higher limit (ulimit -n, or LimitNOFILE= for a systemd unit; each database needs {FDS_PER_DATABASE}, and {RESERVE} are kept spare)",
                self.in_use(),
                self.limit,
                self.databases,
                db.display()
            );
        }
        false
    }
}

/// Raises the soft open-file limit to the hard one; returns the soft limit
/// in force after.
fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return u64::MAX;
        }
        if lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            let mut raised = lim;
            raised.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                tracing::debug!(from = old, to = lim.rlim_max, "raised open file limit");
                return raised.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

/// Descriptors open in this process now.
fn open_now() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(16, |d| d.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn databases_are_admitted_while_their_descriptors_fit() {
        let per = FDS_PER_DATABASE;
        let mut b = FdBudget::with_limit(10 + RESERVE + 3 * per, 10);
        for i in 0..3 {
            assert!(b.admit(Path::new(&format!("{i}.db"))), "{i}");
        }
        assert_eq!(b.in_use(), 10 + 3 * per);
        assert!(!b.admit(Path::new("3.db")));
        assert!(!b.admit(Path::new("4.db")));
        assert_eq!(b.in_use(), 10 + 3 * per, "refused ones take nothing");
    }
}
