"""The dirty map: which files changed where, while the journal is over budget.

When the secondary stays away so long that the journal would pass its
budget, the primary stops journaling write data and records here, per
path, the byte ranges that changed. Namespace ops are still journaled
(they are small), and the map follows them: a rename moves the paths under
it, an unlink forgets the path. When the secondary is back, the ranges are
read from the backing directory into the still-open data set, which then
closes: the replica jumps from one whole set to the next.

Every change to the map is an entry of the journal's log (store/journal.py),
so it survives a crash of the primary as far as the journal does; the map
itself is kept in memory.
"""

from __future__ import annotations

from typing import Protocol

from store.records import is_under


class Store(Protocol):
    """Where the map's changes are kept: the journal."""

    dirty: dict[bytes, list[tuple[int, int]]]

    def put_dirty(self, path: bytes, ranges: list[tuple[int, int]]) -> None: ...

    def clear_dirty(self) -> None: ...


def merge(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """*ranges* (sorted, disjoint) with [start, end) added."""
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        if e < start or s > end:
            out.append((s, e))
        else:
            start, end = min(s, start), max(e, end)
    out.append((start, end))
    return sorted(out)


class DirtyMap:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.files = store.dirty  # as the journal read it at open

    def __bool__(self) -> bool:
        return bool(self.files)

    def total(self) -> int:
        """Bytes the map holds dirty, over every file."""
        return sum(e - s for ranges in self.files.values() for s, e in ranges)

    def add(self, path: bytes, start: int, end: int) -> None:
        ranges = self.files[path] = merge(self.files.get(path, []), start, end)
        self.store.put_dirty(path, ranges)

    def forget(self, path: bytes) -> list[tuple[int, int]]:
        """Drop *path* and everything under it; returns the ranges *path* had."""
        had = self.files.get(path, [])
        for p in [p for p in self.files if is_under(p, path)]:
            del self.files[p]
            self.store.put_dirty(p, [])
        return had

    def move(self, moves: dict[bytes, bytes]) -> None:
        """Rename: every path under a key of *moves* moves under its value."""
        renamed: dict[bytes, list[tuple[int, int]]] = {}
        for p in list(self.files):
            for src, dst in moves.items():
                if is_under(p, src):
                    renamed[dst + p[len(src):]] = self.files.pop(p)
                    self.store.put_dirty(p, [])
                    break
        self.files.update(renamed)
        for p, ranges in renamed.items():
            self.store.put_dirty(p, ranges)

    def next_chunk(self, max_bytes: int) -> tuple[bytes, int, int] | None:
        """Some dirty (path, start, end) of at most *max_bytes*, still in the map."""
        for path, ranges in self.files.items():
            start, end = ranges[0]
            return path, start, min(end, start + max_bytes)
        return None

    def remove(self, path: bytes, start: int, end: int) -> None:
        """[start, end) of *path* is clean again."""
        left: list[tuple[int, int]] = []
        for s, e in self.files.get(path, []):
            if s < start:
                left.append((s, min(e, start)))
            if e > end:
                left.append((max(s, end), e))
        if left:
            self.files[path] = left
        else:
            self.files.pop(path, None)
        self.store.put_dirty(path, left)

    def clear(self) -> None:
        self.files.clear()
        self.store.clear_dirty()
