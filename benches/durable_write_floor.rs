//! What one durable object costs this machine's kernel, without walstream.
//!
//! A directory replica makes each segment durable the way any careful writer
//! must: create a temporary file, write it, fsync it, rename it into place,
//! fsync the directory. This bench times that sequence alone, and beside it
//! the cheapest durable write there is (append to a file kept open, then
//! fdatasync), in CPU of this process per object (`getrusage`) and wall
//! time. It tells walstream's own cost per shipped object apart from the
//! floor that the disk and filesystem set: no replicator that makes every
//! commit durable on its own can use less CPU per commit than this.
//! `cargo bench --bench durable_write_floor` (`WALSTREAM_FLOOR_DIR` picks
//! the filesystem; default: the system temporary directory).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

const OBJECTS: usize = 2000;
/// About one compressed single-page segment with its header.
const SIZE: usize = 4600;

fn cpu_secs() -> f64 {
    // SAFETY: getrusage only fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

fn measure(name: &str, mut op: impl FnMut(usize)) {
    let (cpu, wall) = (cpu_secs(), Instant::now());
    for i in 0..OBJECTS {
        op(i);
    }
    let per = |s: f64| s / OBJECTS as f64 * 1e6;
    let cpu_us = per(cpu_secs() - cpu);
    println!(
        "| {name} | {cpu_us:.0} | {:.0} | {:.1} | {:.1} |",
        per(wall.elapsed().as_secs_f64()),
        cpu_us * 25.0 / 1000.0,
        cpu_us * 200.0 / 1000.0
    );
}

fn put(dir: &Path, i: usize, data: &[u8]) {
    let tmp = dir.join(format!(".{i:016x}.segment.tmp"));
    let mut f = File::create(&tmp).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, dir.join(format!("{i:016x}.segment"))).unwrap();
    File::open(dir).unwrap().sync_all().unwrap();
}

fn main() {
    let base = std::env::var_os("WALSTREAM_FLOOR_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(&base).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    println!(
        "## durable writes on {} ({OBJECTS} objects of {SIZE} bytes)",
        base.display()
    );
    println!("| sequence | CPU us/object | wall us/object | CPU ms/s at 25 objects/s | CPU ms/s at 200 objects/s |");
    println!("|---|---|---|---|---|");
    let objects = dir.path().join("objects");
    std::fs::create_dir(&objects).unwrap();
    measure("create, write, fsync, rename, fsync dir", |i| {
        put(&objects, i, &data)
    });
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("log"))
        .unwrap();
    measure("append, fdatasync", |_| {
        log.write_all(&data).unwrap();
        log.sync_data().unwrap();
    });
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    measure("create, write (no fsync)", |i| {
        std::fs::write(plain.join(format!("{i:016x}")), &data).unwrap()
    });
}
