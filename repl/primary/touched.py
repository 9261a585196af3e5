"""Which paths a data set touched, followed through its renames.

Applying a set on the replica sets mtimes to the replica's clock. To make
the replica equal the primary at the set boundary, metadata included, the
primary ends every set with a UTIMES record for each path whose times the
set changed, carrying the times the backing directory shows at the close.
This module tracks those paths as records go by, moving them along with
renames so they name the files as they are at the close.
"""

from __future__ import annotations

from store.records import RENAME_EXCHANGE, Op, Record, is_under

_DATA_OPS = frozenset(
    {Op.WRITE, Op.TRUNCATE, Op.FALLOCATE, Op.CHMOD, Op.CHOWN, Op.SETXATTR, Op.REMOVEXATTR}
)
_NEW_NAME_OPS = frozenset({Op.CREATE, Op.MKDIR, Op.MKNOD, Op.SYMLINK, Op.FILE})


def parent_of(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]



class Touched:
    """The set of paths whose times the records seen so far changed."""

    def __init__(self) -> None:
        self.paths: set[bytes] = set()

    def add(self, record: Record) -> None:
        op, path, path2 = record.op, record.path, record.path2
        if op in _DATA_OPS:
            self.paths.add(path)
        elif op in _NEW_NAME_OPS:
            self.paths.update((path, parent_of(path)))
        elif op == Op.LINK:
            self.paths.update((path, path2, parent_of(path2)))
        elif op in (Op.UNLINK, Op.RMDIR):
            self.paths.discard(path)
            self.paths.add(parent_of(path))
        elif op == Op.RENAME:
            if record.flags & RENAME_EXCHANGE:
                self._move({path: path2, path2: path})
                self.paths.add(path)
            else:
                self.paths = {p for p in self.paths if not is_under(p, path2)}
                self._move({path: path2})
            self.paths.update((path2, parent_of(path), parent_of(path2)))

    def _move(self, moves: dict[bytes, bytes]) -> None:
        moved = set()
        for p in self.paths:
            for src, dst in moves.items():
                if is_under(p, src):
                    p = dst + p[len(src) :]
                    break
            moved.add(p)
        self.paths = moved

    def clear(self) -> None:
        self.paths.clear()
