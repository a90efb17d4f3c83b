//! The process's budget of open files.
//!
//! Every replicated database keeps a few descriptors open while it is open
//! (see `FDS_PER_DATABASE`), so the open-file limit caps how many databases
//! can be open at once. Running into the limit halfway must not make every
//! database fail at random (each round opens the WAL, each upload a file):
//! a database opens only with a permit from this budget, which keeps
//! `RESERVE` descriptors spare. When there are more databases than permits,
//! the ones without wait, the wait is reported once (with the limit, the
//! count in use and what to raise), and idle databases close theirs to make
//! room (see `Source::close_idle`): the budget tells them when someone
//! waits, and lets one idle database close per waiter.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Descriptors one open database holds: walstream's own handle on the
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
    /// How many databases may be open at once.
    capacity: usize,
    permits: Arc<Semaphore>,
    /// Databases waiting for a permit.
    waiting: AtomicUsize,
    /// Idle databases closing to make room (at most one per waiter).
    closing: AtomicUsize,
    /// Wakes idle databases when a database starts waiting.
    pressure: Notify,
    /// Whether waiting was reported (once per process: it says what to
    /// raise, which does not change).
    reported: AtomicBool,
}

/// A database's right to be open; dropping it gives the descriptors back.
#[derive(Debug)]
pub struct Permit {
    _permit: OwnedSemaphorePermit,
}

/// An idle database's claim to close for a waiter (see `FdBudget::claim`);
/// dropping it ends the claim.
#[derive(Debug)]
pub struct Claim {
    budget: Arc<FdBudget>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.budget.closing.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FdBudget {
    /// Raises the soft limit to the hard one (as Go's runtime does for
    /// Litestream) and starts counting from the descriptors open now.
    pub fn raised() -> Arc<FdBudget> {
        FdBudget::with_limit(raise_open_file_limit(), open_now())
    }

    pub fn with_limit(limit: u64, base: u64) -> Arc<FdBudget> {
        let capacity = (limit.saturating_sub(base + RESERVE) / FDS_PER_DATABASE).max(1) as usize;
        Arc::new(FdBudget {
            limit,
            base,
            capacity,
            permits: Arc::new(Semaphore::new(capacity)),
            waiting: AtomicUsize::new(0),
            closing: AtomicUsize::new(0),
            pressure: Notify::new(),
            reported: AtomicBool::new(false),
        })
    }

    /// How many databases may be open at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Descriptors the open databases are expected to hold, with what was
    /// open at the start.
    pub fn in_use(&self) -> u64 {
        let open = self.capacity - self.permits.available_permits();
        self.base + open as u64 * FDS_PER_DATABASE
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// A permit for `db` at once if one is free, else after waiting until
    /// an idle database closes (the first wait is reported).
    pub async fn acquire(self: &Arc<Self>, db: &Path) -> Permit {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Permit { _permit: p };
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        if !self.reported.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                db = %db.display(),
                limit = self.limit,
                in_use = self.in_use(),
                open = self.capacity,
                "open file limit reached: {} of {} descriptors in use by {} open databases; {} and any further databases wait until an idle one closes its connections (a commit to a closed database reopens it). Raise the limit (ulimit -n, or LimitNOFILE= for a systemd unit) to keep more open: each open database needs {FDS_PER_DATABASE}, and {RESERVE} are kept spare",
                self.in_use(),
                self.limit,
                self.capacity,
                db.display()
            );
        }
        let acquire = self.permits.clone().acquire_owned();
        tokio::pin!(acquire);
        let permit = loop {
            self.pressure.notify_waiters();
            // Asked again every second: an idle database that missed the
            // notification (it was busy) sees the next one.
            match tokio::time::timeout(std::time::Duration::from_secs(1), &mut acquire).await {
                Ok(p) => break p.expect("the semaphore is never closed"),
                Err(_) => continue,
            }
        };
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        Permit { _permit: permit }
    }

    /// Whether some database waits for a permit that no idle database has
    /// claimed to free yet.
    pub fn wanted(&self) -> bool {
        self.closing.load(Ordering::SeqCst) < self.waiting.load(Ordering::SeqCst)
    }

    /// Claims one waiter for an idle database about to close: `None` when
    /// every waiter already has one.
    pub fn claim(self: &Arc<Self>) -> Option<Claim> {
        let mut closing = self.closing.load(Ordering::SeqCst);
        loop {
            if closing >= self.waiting.load(Ordering::SeqCst) {
                return None;
            }
            match self.closing.compare_exchange(
                closing,
                closing + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    return Some(Claim {
                        budget: self.clone(),
                    })
                }
                Err(now) => closing = now,
            }
        }
    }

    /// Resolves when a database starts waiting (or asks again).
    pub async fn pressure(&self) {
        self.pressure.notified().await
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

    #[tokio::test]
    async fn databases_wait_for_descriptors_and_idle_ones_are_claimed_one_per_waiter() {
        let per = FDS_PER_DATABASE;
        let b = FdBudget::with_limit(10 + RESERVE + 3 * per, 10);
        assert_eq!(b.capacity(), 3);
        let mut held = Vec::new();
        for i in 0..3 {
            held.push(b.acquire(Path::new(&format!("{i}.db"))).await);
        }
        assert_eq!(b.in_use(), 10 + 3 * per);
        assert!(!b.wanted() && b.claim().is_none(), "nobody waits");
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.acquire(Path::new("3.db")).await });
        while !b.wanted() {
            tokio::task::yield_now().await;
        }
        let claim = b.claim().expect("one waiter, one claim");
        assert!(b.claim().is_none(), "one claim per waiter");
        assert!(!b.wanted());
        // The claimer closes: its permit goes to the waiter.
        held.pop();
        let _p = waiter.await.unwrap();
        drop(claim);
        assert!(!b.wanted() && b.claim().is_none());
        assert_eq!(b.in_use(), 10 + 3 * per);
    }
}
