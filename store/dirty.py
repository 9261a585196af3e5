"""The dirty map: which files changed where, while the journal is over budget.

When the secondary stays away so long that the journal would pass its
budget, the primary stops journaling write data and records here, per
path, the byte ranges that changed. Namespace ops are still journaled
(they are small), and the map follows them: a rename moves the paths under
it, an unlink forgets the path. When the secondary is back, the ranges are
read from the backing directory into the still-open data set, which then
closes: the replica jumps from one whole set to the next. An initial sync
puts here the files whose data did not go into the journal with the walk.

Every change to the map is an entry of the journal's log (store/journal.py),
so it survives a crash of the primary as far as the journal does. The map
itself is held in an SQLite file beside the log (``DirtyIndex``), not in
memory: an initial sync of a million files past the journal's budget holds
them all, and costs the daemon SQLite's page cache, not a Python object per
file. That file is only an index, made anew at every open from the log.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from store.private import write_private
from store.records import decode_ranges, encode_ranges

Ranges = list[tuple[int, int]]
CACHE_KIB = 4096  # SQLite's page cache for the index: the map's whole cost in memory
_PAGE = 1000  # rows read at a time by ``items()``


class DirtyIndex:
    """The dirty map's contents, path -> sorted disjoint [start, end) ranges, in an
    SQLite file at *path* (None: a temporary one, for a journal only looked at).

    Not durable, and need not be: the file is made anew here, and the journal fills
    it as it reads its log. Safe to use from several threads; ``count`` and
    ``bytes`` (of all the ranges) are kept as it changes.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            write_private(path, b"")  # a stale one emptied; ours alone whatever the umask
        self._db = sqlite3.connect(str(path) if path is not None else "",
                                   isolation_level=None, check_same_thread=False)
        # Its rollback journal in memory: a write that fails (a full disk) is undone,
        # where without one it left the file malformed. Not durable: made anew at open.
        for pragma in ("journal_mode=memory", "synchronous=off", "locking_mode=exclusive",
                       "temp_store=memory", f"cache_size=-{CACHE_KIB}"):
            self._db.execute(f"pragma {pragma}")
        self._db.execute("create table dirty (path blob primary key, ranges blob not null)"
                         " without rowid")
        self._lock = threading.Lock()
        self.count = 0
        self.bytes = 0

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def __iter__(self) -> Iterator[bytes]:
        return (path for path, _ in self.items())

    def get(self, path: bytes) -> Ranges | None:
        with self._lock:
            return self._get(path)

    def _get(self, path: bytes) -> Ranges | None:
        row = self._db.execute("select ranges from dirty where path = ?", (path,)).fetchone()
        return decode_ranges(row[0]) if row else None

    def put(self, path: bytes, ranges: Ranges) -> None:
        """Set *path*'s ranges; none removes it. Raises OSError (ENOSPC: its disk is
        full) with the index as it was."""
        with self._lock:
            old = self._get(path)
            with _as_os_error():
                if ranges:
                    self._db.execute("insert or replace into dirty values (?, ?)",
                                     (path, encode_ranges(ranges)))
                elif old is not None:
                    self._db.execute("delete from dirty where path = ?", (path,))
            if old is not None:
                self.count -= 1
                self.bytes -= _size(old)
            if ranges:
                self.count += 1
                self.bytes += _size(ranges)

    def clear(self) -> None:
        with self._lock, _as_os_error():
            self._db.execute("delete from dirty")
            self.count = self.bytes = 0

    def under(self, top: bytes) -> list[tuple[bytes, Ranges]]:
        """The paths that are *top* or inside it (b"" holds every path), with their ranges."""
        with self._lock:
            if not top:
                rows = self._db.execute("select path, ranges from dirty")
            else:  # "/" sorts just before "0": the paths inside *top* lie between
                rows = self._db.execute(
                    "select path, ranges from dirty where path = ? or (path > ? and path < ?)",
                    (top, top + b"/", top + b"0"))
            return [(path, decode_ranges(raw)) for path, raw in rows]

    def first(self) -> tuple[bytes, Ranges] | None:
        """Some path and its ranges (the first in byte order), or None when empty."""
        with self._lock:
            row = self._db.execute("select path, ranges from dirty order by path limit 1"
                                   ).fetchone()
            return (row[0], decode_ranges(row[1])) if row else None

    def items(self) -> Iterator[tuple[bytes, Ranges]]:
        """Every path and its ranges, in byte order, read a page at a time (the lock
        is not held between them)."""
        after: bytes | None = None
        while True:
            with self._lock:
                if after is None:
                    rows = self._db.execute("select path, ranges from dirty order by path "
                                            "limit ?", (_PAGE,)).fetchall()
                else:
                    rows = self._db.execute("select path, ranges from dirty where path > ? "
                                            "order by path limit ?", (after, _PAGE)).fetchall()
            for path, raw in rows:
                yield path, decode_ranges(raw)
            if len(rows) < _PAGE:
                return
            after = rows[-1][0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _size(ranges: Ranges) -> int:
    return sum(end - start for start, end in ranges)


@contextlib.contextmanager
def _as_os_error() -> Iterator[None]:
    """SQLite's failure to write the index, as the OSError its callers handle (a full
    disk: ENOSPC, as the journal's own appends raise)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        code = errno.ENOSPC if "full" in str(exc) else errno.EIO
        raise OSError(code, f"the dirty map's index: {exc}") from exc


class Store(Protocol):
    """Where the map's changes are kept: the journal."""

    dirty: DirtyIndex

    def put_dirty(self, path: bytes, ranges: Ranges) -> None: ...

    def clear_dirty(self) -> None: ...


def merge(ranges: Ranges, start: int, end: int) -> Ranges:
    """*ranges* (sorted, disjoint) with [start, end) added."""
    out: Ranges = []
    for s, e in ranges:
        if e < start or s > end:
            out.append((s, e))
        else:
            start, end = min(s, start), max(e, end)
    out.append((start, end))
    return sorted(out)


class DirtyMap:
    """The map's changes, each written to *store* (which updates its index)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.files = store.dirty  # as the journal read it at open

    def __bool__(self) -> bool:
        return bool(self.files)

    def total(self) -> int:
        """Bytes the map holds dirty, over every file."""
        return self.files.bytes

    def add(self, path: bytes, start: int, end: int) -> None:
        self.store.put_dirty(path, merge(self.files.get(path) or [], start, end))

    def forget(self, path: bytes) -> Ranges:
        """Drop *path* and everything under it; returns the ranges *path* had."""
        had: Ranges = []
        for p, ranges in self.files.under(path):
            if p == path:
                had = ranges
            self.store.put_dirty(p, [])
        return had

    def move(self, moves: dict[bytes, bytes]) -> None:
        """Rename: every path under a key of *moves* moves under its value."""
        renamed: dict[bytes, Ranges] = {}
        for src, dst in moves.items():
            for p, ranges in self.files.under(src):
                renamed[dst + p[len(src):]] = ranges
                self.store.put_dirty(p, [])
        for p, ranges in renamed.items():
            self.store.put_dirty(p, ranges)

    def next_chunk(self, max_bytes: int) -> tuple[bytes, int, int] | None:
        """Some dirty (path, start, end) of at most *max_bytes*, still in the map."""
        first = self.files.first()
        if first is None:
            return None
        path, ranges = first
        start, end = ranges[0]
        return path, start, min(end, start + max_bytes)

    def remove(self, path: bytes, start: int, end: int) -> bool:
        """[start, end) of *path* is clean again. True if all of *path* is."""
        left: Ranges = []
        for s, e in self.files.get(path) or []:
            if s < start:
                left.append((s, min(e, start)))
            if e > end:
                left.append((max(s, end), e))
        self.store.put_dirty(path, left)
        return not left

    def clear(self) -> None:
        self.store.clear_dirty()
