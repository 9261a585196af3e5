"""The dirty map: which files changed where, while the journal is over budget.

When the secondary stays away so long that the journal would pass its
budget, the primary stops journaling write data and records here, per
path, the byte ranges that changed. Namespace ops are still journaled
(they are small), and the map follows them: a rename moves the paths under
it, an unlink forgets the path. When the secondary is back, the ranges are
read from the backing directory into the still-open data set, which then
closes: the replica jumps from one whole set to the next.

The map lives in the journal's LMDB environment so it survives a crash of
the primary; an in-memory copy serves the merging.
"""

from __future__ import annotations

import lmdb

from store.records import decode_ranges, encode_ranges, is_under


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
    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self._db = env.open_db(b"dirty")
        with env.begin() as txn:
            self.files: dict[bytes, list[tuple[int, int]]] = {
                bytes(k): decode_ranges(v) for k, v in txn.cursor(db=self._db)}

    def __bool__(self) -> bool:
        return bool(self.files)

    def bytes(self) -> int:
        return sum(e - s for ranges in self.files.values() for s, e in ranges)

    def add(self, path: bytes, start: int, end: int) -> None:
        ranges = self.files[path] = merge(self.files.get(path, []), start, end)
        with self.env.begin(write=True) as txn:
            txn.put(path, encode_ranges(ranges), db=self._db)

    def forget(self, path: bytes) -> list[tuple[int, int]]:
        """Drop *path* and everything under it; returns the ranges *path* had."""
        gone = [p for p in self.files if is_under(p, path)]
        with self.env.begin(write=True) as txn:
            for p in gone:
                txn.delete(p, db=self._db)
        had = self.files.get(path, [])
        for p in gone:
            del self.files[p]
        return had

    def move(self, moves: dict[bytes, bytes]) -> None:
        """Rename: every path under a key of *moves* moves under its value."""
        renamed: dict[bytes, list[tuple[int, int]]] = {}
        for p in list(self.files):
            for src, dst in moves.items():
                if is_under(p, src):
                    renamed[dst + p[len(src):]] = self.files.pop(p)
                    break
        with self.env.begin(write=True) as txn:
            txn.drop(self._db, delete=False)
            self.files.update(renamed)
            for p, ranges in self.files.items():
                txn.put(p, encode_ranges(ranges), db=self._db)

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
        with self.env.begin(write=True) as txn:
            if left:
                self.files[path] = left
                txn.put(path, encode_ranges(left), db=self._db)
            else:
                self.files.pop(path, None)
                txn.delete(path, db=self._db)

    def clear(self) -> None:
        with self.env.begin(write=True) as txn:
            txn.drop(self._db, delete=False)
        self.files.clear()
