"""``bin/bench``'s workloads: what each target runs, in a fresh directory of its own.

Timed workloads run for a fixed time and count what they did; the file
writers write a fixed volume. Each returns a ``Result``: its figure, any
extra figures (fsync latencies), and how many application calls did the
work (for the FUSE requests per call). ``Plan`` sizes them (``FULL``, or
``QUICK`` for ``--quick``).
"""

from __future__ import annotations

import os
import random
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bench_reads

MiB = 1 << 20
MB = 1e6

READS = bench_reads.ReadPlan(big=256 * MiB, seconds=2.0, rounds=3)


@dataclass(frozen=True)
class Plan:
    seq_bytes: int  # seq_write volume
    rand_file: int  # rand4k_write file size
    seconds: float  # each timed workload
    lag_seconds: float  # checkpoint round trips under load
    outage_bytes: int  # written while the secondary is down
    stat_files: int = 2_000
    dir_entries: int = 10_000
    rounds: int = 3  # each figure is the median of this many runs
    reads: bench_reads.ReadPlan = READS


FULL = Plan(seq_bytes=512 * MiB, rand_file=256 * MiB, seconds=5.0, lag_seconds=20.0,
            outage_bytes=1024 * MiB)
QUICK = Plan(seq_bytes=64 * MiB, rand_file=32 * MiB, seconds=0.5, lag_seconds=3.0,
             outage_bytes=128 * MiB, dir_entries=2_000, rounds=1,
             reads=bench_reads.ReadPlan(big=32 * MiB, seconds=0.5, rounds=1))


@dataclass
class Result:
    value: float
    extra: dict[str, float] = field(default_factory=dict)
    ops: int = 0  # the application's calls that did the work: a write(2), a file, a commit
    written: int = 0  # the bytes it wrote, for the disk's bytes per byte (seq_write)


def now() -> float:
    return time.perf_counter()


# A create costs 10-60 us on this kind of disk when nothing was removed lately.
SLOW_CREATE_US = 60.0
PROBE_FILES = 200
SETTLE_SECONDS = 330.0  # an inode freed 300 s ago is reused again, dirty or not


def create_cost(d: Path) -> float:
    """Microseconds one empty file's creation takes in new directory *d* (kept)."""
    d.mkdir()
    start = now()
    for i in range(PROBE_FILES):
        os.close(os.open(d / f"p{i:04}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (now() - start) / PROBE_FILES * 1e6


def fresh_inodes(tmp: Path, say: Callable[[str], None]) -> dict[str, float]:
    """Wait until creating a file costs what the disk makes it cost, at most
    SETTLE_SECONDS, before anything is measured; returns the probe's figures.

    An ext4 without a journal does not reuse an inode freed in the last 60 s
    (300 s while its inode table block is dirty): every create walks past each
    such inode whose table block the buffer cache holds. After a few thousand
    files were removed (a previous run's cleanup, the tests) a create costs up
    to 1 ms instead of 20 us, and every create-bound figure, native ones
    first, would measure that walk. Only the clock ends it: a sync before
    each probe keeps the blocks clean between creates, but each create
    dirties one again.
    """
    first = cost = create_cost(tmp / "probe.0")
    if cost > SLOW_CREATE_US:
        say(f"creating a file takes {cost:,.0f} us (inodes removed lately, see "
            f"bench_workloads.fresh_inodes): waiting up to {SETTLE_SECONDS:.0f} s")
    began = now()
    while cost > SLOW_CREATE_US and now() - began < SETTLE_SECONDS:
        os.sync()
        time.sleep(10)  # the kernel's window runs out; nothing to wait on but the clock
        cost = create_cost(tmp / f"probe.{now() - began:.0f}")
        say(f"  {now() - began:.0f} s: {cost:,.0f} us")
    return {"create_us": cost, **({"create_us_before": first} if first > SLOW_CREATE_US
                                  else {})}


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def write_file(path: Path, size: int, fsync: bool = True) -> None:
    chunk = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // MiB):
            os.write(fd, chunk)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def entries(root: Path, count: int) -> list[str]:
    """A directory of *count* empty files, made once per target: stat and readdir share it."""
    directory = root / "entries"
    paths = [f"{directory}/e{i:06}" for i in range(count)]
    if not directory.exists():
        directory.mkdir()
        for path in paths:
            os.mknod(path, stat.S_IFREG | 0o644)
    return paths


# --- workloads: each works in its own fresh directory --------------------------------

def seq_write(d: Path, plan: Plan) -> Result:
    start = now()
    write_file(d / "seq", plan.seq_bytes)
    return Result(plan.seq_bytes / MB / (now() - start), ops=plan.seq_bytes // MiB,
                  written=plan.seq_bytes)


def rand4k_write(d: Path, plan: Plan) -> Result:
    path = d / "rand"
    write_file(path, plan.rand_file)  # prefilled and fsynced, not timed
    rng = random.Random(4096)
    blocks = plan.rand_file // 4096
    block = os.urandom(4096)
    done = 0
    start = now()
    deadline = start + plan.seconds
    fd = os.open(path, os.O_WRONLY)
    try:
        while now() < deadline:
            for _ in range(256):
                os.pwrite(fd, block, rng.randrange(blocks) * 4096)
            done += 256
        os.fsync(fd)  # the write-back of the cached pages is part of the cost
    finally:
        os.close(fd)
    return Result(done * 4096 / MB / (now() - start), ops=done)


def fsync4k(d: Path, plan: Plan) -> Result:
    block = os.urandom(4096)
    latencies: list[float] = []
    fd = os.open(d / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start = now()
    deadline = start + plan.seconds
    try:
        while now() < deadline:
            os.write(fd, block)
            before = now()
            os.fsync(fd)
            latencies.append(now() - before)
    finally:
        os.close(fd)
    elapsed = now() - start
    return Result(len(latencies) * 4096 / MB / elapsed,
                  {"p50_us": percentile(latencies, 50) * 1e6,
                   "p99_us": percentile(latencies, 99) * 1e6}, ops=len(latencies))


def small_files(d: Path, plan: Plan) -> Result:
    block = os.urandom(4096)
    count = 0
    start = now()
    deadline = start + plan.seconds
    while now() < deadline:
        for _ in range(32):
            fd = os.open(f"{d}/f{count:07}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, block)
            os.close(fd)
            count += 1
    return Result(count / (now() - start), ops=count)


def stat_files(d: Path, plan: Plan) -> Result:
    paths = entries(d.parent, plan.dir_entries)[: plan.stat_files]
    count = 0
    start = now()
    deadline = start + plan.seconds
    while now() < deadline:
        for path in paths:
            os.stat(path)
        count += len(paths)
    return Result(count / (now() - start), ops=count)


def readdir(d: Path, plan: Plan) -> Result:
    directory = Path(entries(d.parent, plan.dir_entries)[0]).parent
    count = 0
    start = now()
    deadline = start + plan.seconds
    while now() < deadline:
        if len(os.listdir(directory)) != plan.dir_entries:
            raise RuntimeError(f"readdir of {directory} lost entries")
        count += 1
    return Result(count / (now() - start), ops=count)


def sqlite_commits(d: Path, plan: Plan) -> Result:
    db = sqlite3.connect(d / "bench.db", isolation_level=None)  # autocommit: one insert, one commit
    try:
        db.execute("pragma journal_mode=wal")
        db.execute("pragma synchronous=full")
        db.execute("create table t(id integer primary key, v blob)")
        value = os.urandom(100)
        count = 0
        start = now()
        deadline = start + plan.seconds
        while now() < deadline:
            db.execute("insert into t(v) values (?)", (value,))
            count += 1
        elapsed = now() - start
    finally:
        db.close()
    return Result(count / elapsed, ops=count)


Workload = Callable[[Path, Plan], Result]
WORKLOADS: list[tuple[str, str, Workload]] = [
    ("seq_write", "MB/s", seq_write),
    ("rand4k_write", "MB/s", rand4k_write),
    ("fsync4k", "MB/s", fsync4k),
    ("small_files", "files/s", small_files),
    ("stat", "stats/s", stat_files),
    ("readdir", "dirs/s", readdir),
    ("sqlite_commits", "commits/s", sqlite_commits),
]
