//! Every default value in one place: config parsing fills settings from
//! these, and the engine's option types start from them, so a default can
//! never differ between the config file and a library user.

use std::time::Duration;

/// Polling fallback when file notifications are missed.
pub const MONITOR_INTERVAL: Duration = Duration::from_secs(1);
/// A PASSIVE checkpoint at least this often.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);
/// A PASSIVE checkpoint once the WAL has this many frames.
pub const MIN_CHECKPOINT_PAGE_COUNT: u64 = 1000;
/// Above this many frames walstream tries to rewind the WAL (non-blocking
/// TRUNCATE, then a rewind under the write lock).
pub const MAX_CHECKPOINT_PAGE_COUNT: u64 = 10_000;
/// How long walstream's own lock requests wait.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// A full snapshot this often.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// `sync-interval` of a directory replica. Every upload is a durable file
/// (create, write, fsync, rename, fsync of the directory: most of a
/// millisecond of kernel CPU, see the `durable_write_floor` bench), so
/// batching for a few milliseconds costs little data at risk and saves most
/// of that CPU under load; the first commit after a quiet spell still ships
/// at once.
pub const FILE_SYNC_INTERVAL: Duration = Duration::from_millis(25);
/// `sync-interval` of an S3 replica: every upload is a billed request.
pub const S3_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Every point this far back stays restorable.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How often retention runs.
pub const RETENTION_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// Page data a replica whose storage fails may hold in memory before it is
/// detached (a new generation follows once its storage answers).
pub const MAX_PENDING: u64 = 64 << 20;

/// `/readyz` allows a replica this long past its sync-interval.
pub const READY_LAG: Duration = Duration::from_secs(10);
/// How long the last shipment may take after a stop is asked for.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Compaction levels, finest first.
pub const LEVELS: [Duration; 2] = [Duration::from_secs(300), Duration::from_secs(3600)];

/// How often a running daemon logs one line per database that shipped
/// something (`summary-interval`).
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// `restore --follow`: how often storage is asked for the next segment.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);
/// A follower of S3 looks for a new generation or for objects that replaced
/// the next segment (one LIST) after this many polls that did not find it;
/// a directory replica is listed at every such poll (it is cheap there).
pub const FOLLOW_DISCOVER_POLLS: u32 = 10;
/// `/readyz` of a follower: ready while it caught up this recently.
pub const FOLLOW_READY_LAG: Duration = Duration::from_secs(10);

/// A replica's lease (S3) lapses when its holder has not renewed it for
/// this long; it is renewed every third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// How long `POST /sync` (and `walstream sync --wait`) waits by default.
pub const SYNC_WAIT_TIMEOUT: Duration = Duration::from_secs(30);
