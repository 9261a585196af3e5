"""SQLite through the primary mount: every committed transaction survives, intact.

A database is what the data sets are for: each COMMIT ends in fsync, which
closes a set. The database must pass ``PRAGMA integrity_check`` and hold
exactly the committed rows through the mount, on the backing directory
after unmount, and in a tree rebuilt from the journal. It must also do so
at every set boundary along the way: a short set interval makes sets close
in the middle of transactions too, and there SQLite's own journal or WAL
must roll the partial transaction back, as after a crash, leaving exactly
the transactions committed before it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from repl.apply import apply
from repl.tree import Tree
from store.journal import Journal
from store.libc import syncfs
from store.records import Op
from tests.support import primary, replay

TRANSACTIONS = 300
DB = "app.db"


def body(i: int) -> bytes:
    """Row bodies from 32 bytes to past a page, so rows split pages and overflow."""
    return hashlib.sha256(str(i).encode()).digest() * (1 + (i * 37) % 150)


def expected() -> list[dict[int, str]]:
    """The rows (id -> body digest) after each count of ``transaction()``s committed."""
    rows: dict[int, str] = {}
    states = [dict(rows)]
    for i in range(1, TRANSACTIONS + 1):
        rows[i] = hashlib.sha256(body(i)).hexdigest()
        if i % 7 == 0 and i - 3 in rows:
            rows[i - 3] = hashlib.sha256(body(-i)).hexdigest()
        if i % 11 == 0:
            rows.pop(i - 5, None)
        states.append(dict(rows))
    return states


def transaction(db: sqlite3.Connection, i: int) -> None:
    db.execute("BEGIN")
    db.execute("INSERT INTO t (id, body) VALUES (?, ?)", (i, body(i)))
    if i % 7 == 0:
        db.execute("UPDATE t SET body = ? WHERE id = ?", (body(-i), i - 3))
    if i % 11 == 0:
        db.execute("DELETE FROM t WHERE id = ?", (i - 5,))
    db.execute("UPDATE meta SET committed = ?", (i,))
    db.execute("COMMIT")


def contents(path: Path) -> tuple[str, int, dict[int, str]]:
    """(integrity_check, committed count, rows) of the database at *path*."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
        (committed,) = db.execute("SELECT committed FROM meta").fetchone()
        rows = {i: hashlib.sha256(b).hexdigest()
                for i, b in db.execute("SELECT id, body FROM t ORDER BY id")}
    return check, committed, rows


def set_boundaries(journal: Path, replica: Path) -> Iterator[None]:
    """Replay *journal* into *replica*, pausing at the end of every data set."""
    j = Journal(journal)
    tree = Tree(replica)
    try:
        for record in j.records():
            apply(tree, record)
            if record.op == Op.SYNC:
                yield
    finally:
        tree.close()
        j.close()


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_primary_sqlite_transactions_ok(tmp_path: Path, journal_mode: str) -> None:
    backing, mount = tmp_path / "backing", tmp_path / "mount"
    backing.mkdir()
    want = expected()
    with primary(backing, mount, "--set-interval", "0.02"):
        with closing(sqlite3.connect(mount / DB, isolation_level=None)) as db:
            assert db.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0] == journal_mode
            db.execute("PRAGMA synchronous=FULL")
            db.executescript("""
                BEGIN;
                CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL);
                CREATE INDEX t_body ON t (body);
                CREATE TABLE meta (committed INTEGER NOT NULL);
                INSERT INTO meta VALUES (0);
                COMMIT;
            """)
            for i in range(1, TRANSACTIONS + 1):
                transaction(db, i)
            db.execute("BEGIN")
            db.execute("DELETE FROM t")
            db.execute("ROLLBACK")
            # A second connection, while the first is open (the WAL still holds frames).
            assert contents(mount / DB) == ("ok", TRANSACTIONS, want[TRANSACTIONS])
        assert contents(mount / DB) == ("ok", TRANSACTIONS, want[TRANSACTIONS])
    assert contents(backing / DB) == ("ok", TRANSACTIONS, want[TRANSACTIONS])

    journal = tmp_path / ".backing.replfs" / "journal"
    replica = tmp_path / "replica"
    replica.mkdir()
    assert replay(journal, replica) > 0
    assert contents(replica / DB) == ("ok", TRANSACTIONS, want[TRANSACTIONS])

    # Every set boundary is a state SQLite recovers from to a committed prefix.
    replica, scratch = tmp_path / "replica2", tmp_path / "scratch"
    replica.mkdir()
    scratch.mkdir()
    seen = []
    for _ in set_boundaries(journal, replica):
        if not (replica / DB).exists():
            continue
        for name in (DB, f"{DB}-journal", f"{DB}-wal", f"{DB}-shm"):
            (scratch / name).unlink(missing_ok=True)
            if (replica / name).exists() and not name.endswith("-shm"):  # rebuilt from the WAL
                shutil.copyfile(replica / name, scratch / name)
        try:
            check, committed, rows = contents(scratch / DB)
        except sqlite3.OperationalError as exc:
            assert "no such table" in str(exc)  # before the schema's first commit
            continue
        assert check == "ok"
        assert rows == want[committed]
        seen.append(committed)
    assert seen == sorted(seen) and seen[-1] == TRANSACTIONS
    assert len(set(seen)) > TRANSACTIONS // 2  # most commits closed a set of their own


def test_sqlite_close_then_syncfs_ok(tmp_path: Path) -> None:
    """Closing a WAL database deletes its -wal and -shm files; the kernel then flushes
    their times without a handle. That must not turn into a write-back error."""

    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    with primary(backing, mount):
        db = sqlite3.connect(mount / "x.db")
        db.execute("pragma journal_mode=wal")
        db.execute("create table t(x)")
        for i in range(20):
            db.execute("insert into t values (?)", (i,))
            db.commit()
        db.close()
        fd = os.open(mount, os.O_RDONLY)
        try:
            syncfs(fd)  # raises on failure
        finally:
            os.close(fd)
