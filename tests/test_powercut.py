"""The power-cut simulator: what an fsync keeps, what a cut drops, and that LMDB and
SQLite run on it as on a disk."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import lmdb
import pytest

from tests.powercut.harness import Simulator, simulator
from tests.powercut.pending import PAGE


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    with simulator(tmp_path / "lower", tmp_path / "mnt") as running:
        yield running


def test_powercut_cut_drops_unsynced_writes(sim: Simulator) -> None:
    m, lower = sim.mountpoint, sim.lower
    (lower / "old").write_bytes(b"durable")
    with open(m / "old", "ab") as f:
        f.write(b" and more" * 1000)
    (m / "new").write_bytes(b"x" * 10_000)  # close(2) makes nothing durable
    assert (m / "new").read_bytes() == b"x" * 10_000
    assert os.stat(m / "old").st_size == 7 + 9000
    assert sim.pending() == {"files": 2, "pages": 3 + 3}
    assert sim.cut() == {"files": 2, "pages": 6, "kept": 0}
    assert (lower / "old").read_bytes() == b"durable", "the size went back too"
    assert (lower / "new").read_bytes() == b"", "created at once, its data lost"


@pytest.mark.parametrize("flush", [os.fsync, os.fdatasync])
def test_powercut_fsync_ok(sim: Simulator, flush: object) -> None:
    m, lower = sim.mountpoint, sim.lower
    before = os.stat(m).st_mtime_ns
    with open(m / "f", "wb") as f:
        f.write(b"kept" * 3000)
        f.flush()
        mtime = os.fstat(f.fileno()).st_mtime_ns
        flush(f.fileno())  # type: ignore[operator]
        f.write(b"lost")
    assert os.stat(lower / "f").st_mtime_ns == mtime, "the mtime of the write, not the sync"
    sim.cut()
    assert (lower / "f").read_bytes() == b"kept" * 3000
    assert os.stat(lower).st_mtime_ns >= before


def test_powercut_syncfs_keeps_nothing(sim: Simulator) -> None:
    """syncfs(2) and sync(2) never reach a plain FUSE daemon (the kernel sends
    FUSE_SYNCFS to virtiofs only): a caller that wants data kept fsyncs each file."""
    import ctypes

    (sim.mountpoint / "f").write_bytes(b"synced by syncfs, not by fsync")
    fd = os.open(sim.mountpoint, os.O_RDONLY)
    try:
        assert ctypes.CDLL(None, use_errno=True).syncfs(fd) == 0
    finally:
        os.close(fd)
    assert sim.pending() == {"files": 1, "pages": 1}
    sim.cut()
    assert (sim.lower / "f").read_bytes() == b""


def test_powercut_truncate_and_extend_ok(sim: Simulator) -> None:
    m, lower = sim.mountpoint, sim.lower
    durable = bytes(range(256)) * 40  # 10240 bytes
    (lower / "f").write_bytes(durable)
    (lower / "g").write_bytes(durable)
    with open(m / "f", "r+b") as f:
        f.truncate(100)
        f.truncate(8000)
        f.seek(5000)
        f.write(b"w" * 10)
    want = durable[:100] + bytes(4900) + b"w" * 10 + bytes(2990)
    assert (m / "f").read_bytes() == want
    with open(m / "g", "r+b") as g:
        g.truncate(5000)
        os.fsync(g.fileno())
        g.truncate(0)
    sim.cut()
    assert (lower / "f").read_bytes() == durable
    assert (lower / "g").read_bytes() == durable[:5000]
    sim.start()
    with open(m / "f", "r+b") as f:
        f.truncate(100)
        f.truncate(8000)
        f.seek(5000)
        f.write(b"w" * 10)
        f.flush()
        os.fsync(f.fileno())
    assert (lower / "f").read_bytes() == want


def test_powercut_fallocate_ok(sim: Simulator) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate64.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    m, lower = sim.mountpoint, sim.lower
    durable = b"d" * 20_000
    (lower / "f").write_bytes(durable)
    fd = os.open(m / "f", os.O_RDWR)
    try:
        assert libc.fallocate64(fd, 3, 1000, 5000) == 0  # punch a hole
        assert libc.fallocate64(fd, 0x10, 19_000, 3000) == 0  # zero a range, grow
        assert libc.fallocate64(fd, 0, 0, 30_000) == 0  # grow
        want = b"d" * 1000 + bytes(5000) + b"d" * 13_000 + bytes(11_000)
        assert os.pread(fd, 40_000, 0) == want
        assert libc.fallocate64(fd, 0x8, 0, 4096) == -1  # collapse: refused
        assert ctypes.get_errno() == 95
    finally:
        os.close(fd)
    sim.cut()
    assert (lower / "f").read_bytes() == durable
    sim.start()
    fd = os.open(m / "f", os.O_RDWR)
    assert libc.fallocate64(fd, 3, 1000, 5000) == 0
    os.fsync(fd)
    os.close(fd)
    assert (lower / "f").read_bytes() == b"d" * 1000 + bytes(5000) + b"d" * 14_000


def test_powercut_rename_of_pending_data_ok(sim: Simulator) -> None:
    """The rename reaches the disk at once, the data it was meant to publish does not:
    an editor's save without fsync leaves an empty file after a power cut."""
    m, lower = sim.mountpoint, sim.lower
    (lower / "config").write_bytes(b"old")
    (m / "config.tmp").write_bytes(b"new, never synced")
    os.rename(m / "config.tmp", m / "config")
    (m / "kept.tmp").write_bytes(b"synced before the rename")
    with open(m / "kept.tmp", "rb+") as f:
        os.fsync(f.fileno())
    os.rename(m / "kept.tmp", m / "kept")
    assert (m / "config").read_bytes() == b"new, never synced"
    sim.cut()
    assert sorted(os.listdir(lower)) == ["config", "kept"]
    assert (lower / "config").read_bytes() == b""
    assert (lower / "kept").read_bytes() == b"synced before the rename"


def test_powercut_hard_links_share_pending_data_ok(sim: Simulator) -> None:
    m, lower = sim.mountpoint, sim.lower
    (m / "a").write_bytes(b"")
    os.link(m / "a", m / "b")
    (m / "a").write_bytes(b"through a")
    assert (m / "b").read_bytes() == b"through a"
    with open(m / "b", "rb") as f:
        os.fsync(f.fileno())  # read-only handle, the file's data all the same
    sim.cut()
    assert (lower / "a").read_bytes() == b"through a"
    assert os.stat(lower / "a").st_nlink == 2


def _pages_workload(m: Path) -> None:
    for name, count in (("a", 40), ("b", 25)):
        with open(m / name, "wb") as f:
            f.write(b"".join(bytes([i + 1]) * PAGE for i in range(count)))


def _kept_pages(lower: Path) -> dict[str, list[int]]:
    out = {}
    for name in ("a", "b"):
        data = (lower / name).read_bytes()
        out[name] = [data[i] for i in range(0, len(data), PAGE)]
    return out


def test_powercut_cut_seeded_subset_is_deterministic(tmp_path: Path) -> None:
    results = []
    for run, seed in enumerate((11, 11, 12)):
        with simulator(tmp_path / f"lower{run}", tmp_path / "mnt") as sim:
            _pages_workload(sim.mountpoint)
            counts = sim.cut(keep=0.5, seed=seed)
            results.append((counts, _kept_pages(sim.lower)))
    (counts, kept), same, other = results
    assert same == (counts, kept)
    assert other[1] != kept
    assert 0 < counts["kept"] < counts["pages"] == 65
    for name, pages in kept.items():
        # A kept page holds its own bytes; a lost one zeros (the inode kept the size)
        # or nothing at all (it did not); never another page's.
        assert all(p in (0, i + 1) for i, p in enumerate(pages)), (name, pages)


def test_powercut_cut_keep_all_ok(sim: Simulator) -> None:
    _pages_workload(sim.mountpoint)
    assert sim.cut(keep=1.0) == {"files": 2, "pages": 65, "kept": 65}
    assert _kept_pages(sim.lower) == {"a": list(range(1, 41)), "b": list(range(1, 26))}


def test_powercut_clean_stop_writes_everything_ok(sim: Simulator) -> None:
    (sim.mountpoint / "f").write_bytes(b"unmounted cleanly")
    sim.stop()
    assert (sim.lower / "f").read_bytes() == b"unmounted cleanly"


# Commits rows through an LMDB environment opened as the journal is (sync=False),
# syncs after the first SYNCED, and prints each count once committed.
LMDB_WRITER = r"""
import lmdb, sys
env = lmdb.open(sys.argv[1], map_size=1 << 30, sync=False, metasync=False, readahead=False)
for i in range(int(sys.argv[2])):
    with env.begin(write=True) as txn:
        txn.put(b"%06d" % i, (b"%d" % i) * (1 + i % 300))
    if i + 1 == int(sys.argv[3]):
        env.sync(True)
    print(i + 1, flush=True)
input()  # keeps the environment open until killed
"""


def _lmdb_rows(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_powercut_lmdb_synced_state_survives(sim: Simulator, keep: float) -> None:
    """An LMDB environment (shared read map of data.mdb, pwrite, fdatasync) works
    through the mount, another process reads what it committed through its own map,
    and a cut leaves the state of its last sync (all of it, kept whole)."""
    env_dir = sim.mountpoint / "env"
    env_dir.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", LMDB_WRITER, str(env_dir), "3000", "2000"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    for line in writer.stdout:
        if int(line) == 3000:
            break
    want = {b"%06d" % i: (b"%d" % i) * (1 + i % 300) for i in range(3000)}
    reader = lmdb.open(str(env_dir), readonly=True)
    try:
        with reader.begin() as txn:
            assert {bytes(k): bytes(v) for k, v in txn.cursor()} == want
    finally:
        reader.close()
    sim.freeze()
    writer.kill()
    writer.wait()
    sim.cut(keep=keep)
    rows = _lmdb_rows(sim.lower / "env")
    synced = 3000 if keep == 1.0 else 2000
    assert rows == {k: v for k, v in want.items() if int(k) < synced}


# Commits transactions in WAL mode with synchronous=FULL; prints each one's number
# once its COMMIT returned.
SQLITE_WRITER = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("pragma journal_mode=wal")
db.execute("pragma synchronous=full")
db.execute("create table if not exists t (id integer primary key, body blob)")
i = 0
while True:
    i += 1
    db.execute("begin")
    db.execute("insert into t values (?, ?)", (i, bytes([i % 256]) * (100 + i * 37 % 9000)))
    if i % 5 == 0:
        db.execute("delete from t where id = ?", (i - 3,))
    db.execute("commit")
    print(i, flush=True)
"""


def _sqlite_rows(path: Path) -> tuple[str, list[int]]:
    with closing(sqlite3.connect(path)) as db:
        check = db.execute("pragma integrity_check").fetchone()[0]
        return check, [row[0] for row in db.execute("select id from t order by id")]


def _committed(count: int) -> list[int]:
    return [i for i in range(1, count + 1) if not (i + 3 <= count and (i + 3) % 5 == 0)]


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_powercut_sqlite_wal_acknowledged_commits_survive(sim: Simulator, keep: float) -> None:
    writer = subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(sim.mountpoint / "db")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert writer.stdout is not None
    acknowledged = 0
    for line in writer.stdout:
        acknowledged = int(line)
        if acknowledged == 150:
            break
    sim.freeze()  # the power goes off in the middle of a later transaction
    writer.kill()
    writer.wait()
    acknowledged = max([acknowledged, *map(int, writer.stdout.read().split())])
    sim.cut(keep=keep, seed=acknowledged)
    check, rows = _sqlite_rows(sim.lower / "db")
    assert check == "ok"
    # Every acknowledged commit is there; the one under way when the power went may be.
    assert rows in (_committed(acknowledged), _committed(acknowledged + 1))
