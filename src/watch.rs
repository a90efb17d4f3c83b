//! File notifications, shared by every replicator in the process.
//!
//! One OS watcher per process rather than one per database: Linux allows a
//! user 128 inotify instances by default, and one process may replicate
//! hundreds of databases. Each directory is watched once; events are routed
//! to the replicators registered for the file they name. When notifications
//! are unavailable, registration fails and the replicator polls instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc::UnboundedSender as Sender;

/// Messages to a database's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Something changed on disk (or a test wants a round now).
    Wake,
    /// A wait for durability: a round as soon as the sync-interval allows,
    /// or an answer without one when nothing changed.
    Sync,
    /// A round now that uploads everything it holds, whatever the
    /// sync-interval says (`sync` with `force`).
    Force,
    /// Ship what is committed, then stop.
    Shutdown,
}

struct Target {
    id: u64,
    wake: Sender<Control>,
    armed: Arc<AtomicBool>,
}

type Targets = Arc<Mutex<HashMap<PathBuf, Vec<Target>>>>;

pub struct Watcher {
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    dirs: Mutex<HashMap<PathBuf, usize>>,
    targets: Targets,
    next_id: AtomicU64,
}

/// Keeps a file watched; dropping it stops the notifications.
pub struct Registration {
    watcher: Arc<Watcher>,
    file: PathBuf,
    dir: PathBuf,
    id: u64,
    /// Whether this registration counts towards its directory's watch.
    active: bool,
}

impl Watcher {
    pub fn new() -> Arc<Watcher> {
        let targets: Targets = Arc::default();
        let routes = targets.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            let Ok(ev) = res else { return };
            // The kernel's event queue overflowed: events were lost, so
            // every watched database looks again.
            if ev.need_rescan() {
                for t in routes.lock().unwrap().values().flatten() {
                    if t.armed.swap(false, Ordering::SeqCst) {
                        let _ = t.wake.send(Control::Wake);
                    }
                }
                return;
            }
            // Only writes, creation and removal matter. Access, open and
            // close events include walstream's own reads of the WAL and would
            // wake it in a loop.
            if !matches!(
                ev.kind,
                EventKind::Modify(_) | EventKind::Create(_) | EventKind::Remove(_)
            ) {
                return;
            }
            let routes = routes.lock().unwrap();
            for p in &ev.paths {
                for t in routes.get(p).into_iter().flatten() {
                    // One wake per round: the replicator re-arms before it
                    // reads the file.
                    if t.armed.swap(false, Ordering::SeqCst) {
                        let _ = t.wake.send(Control::Wake);
                    }
                }
            }
        };
        let watcher = match notify::recommended_watcher(handler) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "file notifications unavailable, polling");
                None
            }
        };
        Arc::new(Watcher {
            watcher: Mutex::new(watcher),
            dirs: Mutex::default(),
            targets,
            next_id: AtomicU64::new(1),
        })
    }

    /// Sends `Control::Wake` to `wake` when `file` is written, created or
    /// removed while `armed` is set (and clears it). `None` when the
    /// directory cannot be watched: the caller polls.
    pub fn watch(
        self: &Arc<Self>,
        file: &Path,
        wake: Sender<Control>,
        armed: Arc<AtomicBool>,
    ) -> Option<Registration> {
        let dir = file.parent().unwrap_or(Path::new("/")).to_path_buf();
        if !self.watch_dir(&dir) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.targets
            .lock()
            .unwrap()
            .entry(file.to_path_buf())
            .or_default()
            .push(Target { id, wake, armed });
        Some(Registration {
            watcher: self.clone(),
            file: file.to_path_buf(),
            dir,
            id,
            active: true,
        })
    }

    /// Counts one more user of `dir`'s OS watch, adding it for the first.
    fn watch_dir(&self, dir: &Path) -> bool {
        let mut dirs = self.dirs.lock().unwrap();
        let count = dirs.entry(dir.to_path_buf()).or_insert(0);
        if *count == 0 {
            let mut w = self.watcher.lock().unwrap();
            let Some(w) = w.as_mut() else {
                dirs.remove(dir);
                return false;
            };
            if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "file notifications unavailable, polling");
                dirs.remove(dir);
                return false;
            }
        }
        *count += 1;
        true
    }

    /// Counts one user of `dir`'s OS watch less, removing it after the last.
    fn unwatch_dir(&self, dir: &Path) {
        let mut dirs = self.dirs.lock().unwrap();
        if let Some(count) = dirs.get_mut(dir) {
            *count -= 1;
            if *count == 0 {
                dirs.remove(dir);
                if let Some(n) = self.watcher.lock().unwrap().as_mut() {
                    let _ = n.unwatch(dir);
                }
            }
        }
    }
}

impl Registration {
    /// Turns this file's notifications off or back on. The kernel queues an
    /// event for every write the application makes (two per WAL frame), and
    /// handling them cost more than polling does while a sync-interval
    /// spaces the uploads anyway; switched off, this registration no longer
    /// keeps its directory watched. Returns whether notifications are on.
    pub fn set_active(&mut self, on: bool) -> bool {
        if on != self.active {
            if on {
                self.active = self.watcher.watch_dir(&self.dir);
            } else {
                self.watcher.unwatch_dir(&self.dir);
                self.active = false;
            }
        }
        self.active
    }

    pub fn is_active(&self) -> bool {
        self.active
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let w = &self.watcher;
        {
            let mut targets = w.targets.lock().unwrap();
            if let Some(v) = targets.get_mut(&self.file) {
                v.retain(|t| t.id != self.id);
                if v.is_empty() {
                    targets.remove(&self.file);
                }
            }
        }
        if self.active {
            w.unwatch_dir(&self.dir);
        }
    }
}

/// Calls `on_event` for every event under `dirs` (each with whether to
/// watch it recursively), on notify's thread. `None` when a directory cannot
/// be watched (said in a warning): the caller polls. For watching whole
/// directories (a follower's replica, a daemon's `dir:` entries), where the
/// per-file routing of [`Watcher`] does not apply.
pub fn watch_dirs(
    dirs: &[(&Path, bool)],
    on_event: impl Fn(&notify::Event) + Send + 'static,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            on_event(&ev);
        }
    })
    .ok()?;
    for &(dir, recursive) in dirs {
        let mode = if recursive {
            notify::RecursiveMode::Recursive
        } else {
            notify::RecursiveMode::NonRecursive
        };
        if let Err(e) = w.watch(dir, mode) {
            tracing::warn!(dir = %dir.display(), error = %e, "file notifications unavailable, polling");
            return None;
        }
    }
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::sync::mpsc::UnboundedReceiver;

    fn recv_timeout(rx: &mut UnboundedReceiver<Control>, d: Duration) -> Option<Control> {
        let until = Instant::now() + d;
        loop {
            if let Ok(m) = rx.try_recv() {
                return Some(m);
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn routes_one_wake_per_arming_to_the_right_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a-wal"), dir.path().join("b-wal"));
        let w = Watcher::new();
        let (tx_a, mut rx_a) = tokio::sync::mpsc::unbounded_channel();
        let (tx_b, mut rx_b) = tokio::sync::mpsc::unbounded_channel();
        let armed_a = Arc::new(AtomicBool::new(true));
        let armed_b = Arc::new(AtomicBool::new(true));
        let _ra = w.watch(&a, tx_a, armed_a.clone()).unwrap();
        let rb = w.watch(&b, tx_b, armed_b.clone()).unwrap();
        for i in 0..5 {
            std::fs::write(&a, format!("{i}")).unwrap();
        }
        assert_eq!(
            recv_timeout(&mut rx_a, Duration::from_secs(5)),
            Some(Control::Wake)
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(rx_a.try_recv().is_err(), "one wake until re-armed");
        assert!(rx_b.try_recv().is_err(), "b was not written");
        armed_a.store(true, Ordering::SeqCst);
        std::fs::write(&a, "again").unwrap();
        assert_eq!(
            recv_timeout(&mut rx_a, Duration::from_secs(5)),
            Some(Control::Wake)
        );
        drop(rb);
        std::fs::write(&b, "x").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(rx_b.try_recv().is_err(), "unregistered");
    }

    #[test]
    fn an_inactive_registration_is_not_woken_until_turned_back_on() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a-wal");
        let w = Watcher::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let armed = Arc::new(AtomicBool::new(true));
        let mut r = w.watch(&a, tx, armed.clone()).unwrap();
        assert!(!r.set_active(false));
        assert!(w.dirs.lock().unwrap().is_empty(), "directory unwatched");
        std::fs::write(&a, "quiet").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(rx.try_recv().is_err(), "no wake while off");
        assert!(armed.load(Ordering::SeqCst));
        assert!(r.set_active(true));
        std::fs::write(&a, "loud").unwrap();
        assert_eq!(
            recv_timeout(&mut rx, Duration::from_secs(5)),
            Some(Control::Wake)
        );
        drop(r);
        assert!(w.dirs.lock().unwrap().is_empty(), "unwatched on drop");
    }
}
