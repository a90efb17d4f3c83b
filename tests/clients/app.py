#!/usr/bin/env python3
"""An application that is not walstream: the workloads of tests/real_clients.rs.

Every database access goes through a "backend" that is some other SQLite than
walstream's bundled one:

  module:sqlite3     Python's own sqlite3 module (the system SQLite for
                     /usr/bin/python3 on Debian)
  module:pysqlite3   PyPI pysqlite3-binary (a recent SQLite, statically linked)
  shell:PATH         the sqlite3 command-line shell at PATH, one shell process
                     per connection, statements written to its stdin

Usage: app.py BACKEND DB COMMAND [ARGS...]. COMMAND is one of the functions
in COMMANDS below. Exits non-zero, with the error on stderr, when the
application sees any error: a real application would have failed too.
Prints one summary line on stdout.
"""

import os
import random
import re
import subprocess
import sys
import time

BUSY_MS = 10000
ROW_BYTES = 1000


# ---------------------------------------------------------------- backends


def module(name):
    if name == "sqlite3":
        import sqlite3 as m
    elif name == "pysqlite3":
        import pysqlite3.dbapi2 as m
    else:
        raise SystemExit(f"unknown module backend {name!r}")
    return m


class ModuleConn:
    """A DB-API connection in autocommit mode: BEGIN/COMMIT are explicit."""

    def __init__(self, mod, db, busy_ms):
        self.c = mod.connect(db, isolation_level=None, timeout=busy_ms / 1000)
        self.run(f"PRAGMA busy_timeout={busy_ms}")

    def run(self, sql, params=()):
        return [tuple(r) for r in self.c.execute(sql, params).fetchall()]

    def close(self):
        self.c.close()


def literal(v):
    if v is None:
        return "NULL"
    if isinstance(v, (bytes, bytearray)):
        return "X'" + bytes(v).hex() + "'"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    raise TypeError(type(v))


SHELL_ERROR = re.compile(r"^(Parse error|Runtime error|Error)")


class ShellConn:
    """One sqlite3 shell process: a connection that lives as long as it."""

    def __init__(self, shell, db, busy_ms):
        self.p = subprocess.Popen(
            [shell, "-batch", db],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.failed = False  # the shell exits 1 once any statement failed
        self.run(f".timeout {busy_ms}")

    def run(self, sql, params=()):
        parts = sql.split("?")
        assert len(parts) == len(params) + 1, sql
        text = parts[0] + "".join(literal(p) + s for p, s in zip(params, parts[1:]))
        if not text.startswith("."):
            text += ";"
        self.p.stdin.write(text + "\n.print __END__\n")
        self.p.stdin.flush()
        rows, errors = [], []
        while True:
            line = self.p.stdout.readline()
            if line == "":
                raise RuntimeError(f"sqlite3 shell exited during {sql!r}: {errors}")
            line = line.rstrip("\n")
            if line == "__END__":
                break
            if SHELL_ERROR.match(line):
                errors.append(line)
            else:
                rows.append(tuple(line.split("|")))
        if errors:
            self.failed = True
            raise RuntimeError(f"sqlite3 shell: {sql[:80]!r}: {' '.join(errors)}")
        return rows

    def close(self):
        self.p.stdin.close()
        rest = self.p.stdout.read()
        if self.p.wait() != (1 if self.failed else 0) or rest.strip():
            raise RuntimeError(f"sqlite3 shell exit {self.p.returncode}: {rest!r}")


class Backend:
    def __init__(self, spec, db):
        self.spec, self.db = spec, db
        kind, _, arg = spec.partition(":")
        if kind == "module":
            mod = module(arg)
            self.connect_raw = lambda busy: ModuleConn(mod, db, busy)
            self.version = f"{arg} module, Python {sys.version.split()[0]}, SQLite {mod.sqlite_version}"
        elif kind == "shell":
            self.connect_raw = lambda busy: ShellConn(arg, db, busy)
            out = subprocess.run([arg, "--version"], capture_output=True, text=True).stdout
            self.version = f"sqlite3 shell {arg}, SQLite {' '.join(out.split()[:2])}"
        else:
            raise SystemExit(f"unknown backend {spec!r}")

    def connect(self, busy_ms=BUSY_MS, pragmas=()):
        c = self.connect_raw(busy_ms)
        for p in pragmas:
            c.run(p)
        return c


# ------------------------------------------------------------- workloads


def insert_txn(c, rng, rows=3, begin="BEGIN"):
    c.run(begin)
    for _ in range(rows):
        c.run(
            "INSERT INTO t(k, v, w) VALUES (?, ?, ?)",
            (rng.randrange(1000), rng.randbytes(ROW_BYTES), f"w{rng.getrandbits(32)}"),
        )
    c.run("COMMIT")


def mixed_txn(c, rng, begin="BEGIN"):
    """Inserts, an update and sometimes a delete."""
    c.run(begin)
    for _ in range(1 + rng.randrange(4)):
        c.run(
            "INSERT INTO t(k, v, w) VALUES (?, ?, ?)",
            (rng.randrange(1000), rng.randbytes(ROW_BYTES), f"w{rng.getrandbits(32)}"),
        )
    c.run("UPDATE t SET w = ? WHERE k = ?", (f"u{rng.getrandbits(32)}", rng.randrange(1000)))
    if rng.randrange(4) == 0:
        c.run("DELETE FROM t WHERE k = ?", (rng.randrange(1000),))
    c.run("COMMIT")


def cmd_version(b, args):
    print(b.version)


def cmd_init(b, args):
    """Creates the database in WAL mode with a table and a few rows."""
    page_size = int(args[0]) if args else 4096
    c = b.connect()
    c.run(f"PRAGMA page_size={page_size}")
    mode = c.run("PRAGMA journal_mode=WAL")[0][0]
    assert mode == "wal", mode
    c.run("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, k INTEGER, v BLOB, w TEXT)")
    c.run("CREATE INDEX IF NOT EXISTS t_k ON t(k)")
    rng = random.Random(1)
    for _ in range(10):
        insert_txn(c, rng, rows=5)
    c.close()
    print(f"init: {b.version}")


def cmd_per_txn(b, args):
    """A connection per transaction: open, BEGIN, a few rows, COMMIT, close."""
    n, seed = int(args[0]), int(args[1]) if len(args) > 1 else 2
    rng = random.Random(seed)
    for i in range(n):
        c = b.connect()
        insert_txn(c, rng, rows=1 + rng.randrange(4), begin=rng.choice(["BEGIN", "BEGIN IMMEDIATE"]))
        c.close()
    print(f"per_txn: {n} transactions, each its own connection")


def cmd_writer(b, args):
    """One writer process: `per_txn` or `long` lived connection, N transactions."""
    style, n, seed = args[0], int(args[1]), int(args[2])
    pragmas = [f"PRAGMA synchronous={args[3]}"] if len(args) > 3 else []
    rng = random.Random(seed)
    c = None
    for i in range(n):
        if c is None:
            c = b.connect(pragmas=pragmas)
        mixed_txn(c, rng, begin=rng.choice(["BEGIN", "BEGIN IMMEDIATE"]))
        if style == "per_txn":
            c.close()
            c = None
    if c is not None:
        c.close()


def cmd_reader(b, args):
    """A pool reader: query_only, synchronous=NORMAL, read transactions until
    the stop file appears. Checks that what it sees only grows."""
    stop, seed = args[0], int(args[1])
    rng = random.Random(seed)
    c = b.connect(pragmas=["PRAGMA query_only=1", "PRAGMA synchronous=NORMAL"])
    last, reads = 0, 0
    while not os.path.exists(stop):
        c.run("BEGIN")
        (count, mx) = c.run("SELECT count(*), max(id) FROM t")[0]
        count, mx = int(count), int(mx or 0)
        rows = c.run("SELECT id, length(v) FROM t WHERE id >= ? ORDER BY id LIMIT 5", (rng.randrange(mx + 1),))
        if rng.randrange(3) == 0:
            time.sleep(0.005)  # hold the read transaction a little
        c.run("COMMIT")
        assert count >= last, f"reader saw rows shrink: {last} -> {count}"
        assert all(int(r[1]) == ROW_BYTES for r in rows), rows
        last, reads = count, reads + 1
        # A query_only connection must refuse writes.
        if reads % 50 == 1:
            try:
                c.run("INSERT INTO t(k) VALUES (0)")
            except Exception as e:  # noqa: BLE001 (each SQLite raises its own type)
                assert "readonly" in str(e) or "read-only" in str(e) or "query_only" in str(e), e
            else:
                raise AssertionError("query_only connection accepted a write")
    c.close()
    print(f"reader {seed}: {reads} read transactions, last count {last}")


def spawn(b, *args):
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), b.spec, b.db, *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
    )


def wait_all(procs):
    failed = []
    for p in procs:
        out, _ = p.communicate()
        if out.strip():
            print(out.strip())
        if p.returncode != 0:
            failed.append(p.args[3:])
    if failed:
        raise SystemExit(f"worker processes failed: {failed}")


def cmd_three_writers(b, args):
    """Three writer processes at once: one connection per transaction, two long-lived."""
    n = int(args[0])
    wait_all(
        [
            spawn(b, "writer", "per_txn", n, 11),
            spawn(b, "writer", "long", n, 12),
            spawn(b, "writer", "long", n, 13),
        ]
    )
    print(f"three_writers: 3 processes x {n} transactions")


def cmd_pool(b, args):
    """One writer plus four query_only readers, synchronous=NORMAL everywhere."""
    n = int(args[0])
    stop = b.db + ".stop-readers"
    if os.path.exists(stop):
        os.unlink(stop)
    readers = [spawn(b, "reader", stop, 20 + i) for i in range(4)]
    time.sleep(0.2)
    writer = spawn(b, "writer", "long", n, 21, "NORMAL")
    try:
        wait_all([writer])
    finally:
        open(stop, "w").close()
    wait_all(readers)
    print(f"pool: 1 writer x {n} transactions, 4 readers")


def cmd_vacuum(b, args):
    """Deletes, auto_vacuum switched to INCREMENTAL (by VACUUM),
    incremental_vacuum, and full VACUUMs, between inserts."""
    rounds = int(args[0])
    rng = random.Random(4)
    vacuums = incremental = 0
    for r in range(rounds):
        c = b.connect()
        for _ in range(8):
            insert_txn(c, rng, rows=4)
        c.run("DELETE FROM t WHERE id % 3 = ?", (r % 3,))
        if r == 1:
            c.run("PRAGMA auto_vacuum=INCREMENTAL")
            c.run("VACUUM")
            vacuums += 1
            mode = c.run("PRAGMA auto_vacuum")[0][0]
            assert str(mode) == "2", f"auto_vacuum is {mode}"
        elif r % 4 == 3:
            c.run("VACUUM")
            vacuums += 1
        elif r > 1:
            c.run(f"PRAGMA incremental_vacuum({rng.randrange(1, 40)})")
            incremental += 1
        c.close()
    free = b.connect().run("PRAGMA freelist_count")[0][0]
    print(f"vacuum: {rounds} rounds, {vacuums} VACUUMs, {incremental} incremental_vacuum, freelist {free}")


def cmd_checkpoints(b, args):
    """App-run PASSIVE, RESTART and TRUNCATE checkpoints between writes.
    RESTART and TRUNCATE wait for readers (walstream is one): the first of
    each waits with the app's full busy timeout (so that it can complete),
    the others with 100 ms, and may report busy, as they would in an app."""
    n = int(args[0])
    rng = random.Random(6)
    c = b.connect()
    results = {}
    waited = []
    modes = ["PASSIVE", "RESTART", "TRUNCATE"]
    for i in range(n):
        mixed_txn(c, rng)
        if i % 5 == 4:
            k = i // 5
            mode = modes[k % 3]
            patient = k in (1, 2)
            c.run(f"PRAGMA busy_timeout={BUSY_MS if patient else 100}")
            t = time.monotonic()
            busy, log, done = c.run(f"PRAGMA wal_checkpoint({mode})")[0]
            if patient:
                waited.append(f"{mode} {'busy' if int(busy) else 'done'} after {time.monotonic() - t:.2f}s")
            c.run(f"PRAGMA busy_timeout={BUSY_MS}")
            key = f"{mode}:{'busy' if int(busy) else 'done'}"
            results[key] = results.get(key, 0) + 1
    c.close()
    print(f"checkpoints: {n} transactions, {sorted(results.items())}; with a {BUSY_MS} ms busy timeout: {', '.join(waited)}")


def cmd_page_size_online(b, args):
    """Tries the page-size change while walstream runs: leaving WAL mode needs
    the only connection to the database, so with walstream holding its lock it
    must fail (busy); if it succeeds the lock was lost, and the replica must
    still restore to the result."""
    new = int(args[0])
    c = b.connect(busy_ms=300)
    try:
        mode = c.run("PRAGMA journal_mode=DELETE")[0][0]
    except Exception as e:  # noqa: BLE001
        mode = f"refused ({e})"
    if mode == "delete":
        c.run(f"PRAGMA page_size={new}")
        c.run("VACUUM")
        c.run("PRAGMA journal_mode=WAL")
    elif mode == "wal":
        mode = "refused (journal_mode stayed wal)"
    ps = c.run("PRAGMA page_size")[0][0]
    c.close()
    print(f"page_size_online: leaving WAL mode while walstream runs: {mode}; page_size now {ps}")


def cmd_page_size_offline(b, args):
    """journal_mode=DELETE, page_size=N, VACUUM, journal_mode=WAL: how a WAL
    database changes page size (SQLite cannot while in WAL mode)."""
    new = int(args[0])
    c = b.connect()
    assert c.run("PRAGMA journal_mode=DELETE")[0][0] == "delete"
    c.run(f"PRAGMA page_size={new}")
    c.run("VACUUM")
    assert c.run("PRAGMA journal_mode=WAL")[0][0] == "wal"
    ps = int(c.run("PRAGMA page_size")[0][0])
    assert ps == new, f"page_size is {ps}, wanted {new}"
    c.close()
    print(f"page_size_offline: page size now {ps}")


def cmd_short_lived(b, args):
    """Writer processes that each commit a couple of transactions and exit,
    so that their SQLite closes the last connection it knows of (and, if it
    can take the EXCLUSIVE lock, checkpoints and deletes the WAL); the next
    process writes on. Counts how often the WAL vanished."""
    rounds = int(args[0])
    rng = random.Random(8)
    wal = b.db + "-wal"
    vanished = 0
    for r in range(rounds):
        wait_all([spawn(b, "writer", "long", 2, 100 + r)])
        if not os.path.exists(wal):
            vanished += 1
        time.sleep(rng.uniform(0.02, 0.15))
    print(f"short_lived: {rounds} writer processes exited; WAL deleted after {vanished} of them")


def cmd_issue16(b, args):
    """The smallest reproduction of issue 16: three connections in sequence,
    300 autocommit inserts each."""
    rng = random.Random(16)
    for i in range(3):
        c = b.connect()
        for j in range(300):
            c.run("INSERT INTO t(k, v) VALUES (?, ?)", (j, rng.randbytes(ROW_BYTES)))
        c.close()
    print("issue16: 3 connections x 300 inserts")


COMMANDS = {name[4:]: f for name, f in globals().items() if name.startswith("cmd_")}


def main():
    if len(sys.argv) < 4 or sys.argv[3] not in COMMANDS:
        raise SystemExit(f"usage: app.py BACKEND DB {{{'|'.join(COMMANDS)}}} [ARGS...]")
    spec, db, cmd = sys.argv[1:4]
    COMMANDS[cmd](Backend(spec, db), sys.argv[4:])


if __name__ == "__main__":
    main()
