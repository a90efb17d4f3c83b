//! walstream: continuous replication of SQLite databases to a directory or
//! S3-compatible storage, and exact restores from it.
//!
//! Module map (one concept each):
//! * [`wal`] parses SQLite's WAL and proves continuity with its checksums;
//! * [`db`] holds the one descriptor of a database file and its connections;
//! * [`source`] is one replicated database: its read lock, the WAL read once,
//!   checkpoints; [`shipper`] is one replica of it: generations, uploads,
//!   pacing, back-off; [`replicate`] is the worker that feeds the first to
//!   the second, as [`segment`]s;
//! * [`checkpoint`] checkpoints on the application's behalf without stalling it;
//! * [`snapshot`], [`segment`], [`generation`] and [`format`] define what is
//!   stored (see FORMAT.md);
//! * [`replica`] maps those onto object keys in a [`storage`] backend;
//! * [`restore`] rebuilds a database from a replica; [`compact`] merges old
//!   segments so restores stay fast, [`retention`] prunes what no restore
//!   needs, and [`verify`] proves a replica restores;
//! * [`config`] reads Litestream-compatible YAML configuration;
//! * [`daemon`] runs many replicators in one process, with [`exec`] for a
//!   wrapped application, [`watch`] for shared file notifications, and
//!   [`metrics`] and [`server`] for what operators watch, and [`shutdown`]
//!   for ending on time.

pub mod checkpoint;
pub mod compact;
pub mod config;
pub mod control;
pub mod daemon;
pub mod db;
pub mod defaults;
pub mod encryption;
pub mod error;
pub mod exec;
pub mod fdlimit;
pub mod follow;
pub mod format;
pub mod generation;
pub mod lease;
pub mod lineage;
pub mod metrics;
pub mod replica;
pub mod replicate;
pub mod report;
pub mod restore;
pub mod retention;
pub mod segment;
pub mod server;
pub mod shipper;
pub mod shutdown;
pub mod snapshot;
pub mod source;
pub mod storage;
pub mod units;
pub mod verify;
pub mod wal;
pub mod watch;

pub use error::{Error, Result};
