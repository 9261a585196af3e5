"""Which paths a data set touched, followed through its renames.

Applying a set on the replica sets mtimes to the replica's clock. To make
the replica equal the primary at the set boundary, metadata included, the
primary ends every set with a UTIMES record for each path whose times the
set changed, carrying the times the backing directory shows at the close.
This module tracks those paths as records go by, moving them along with
renames so they name the files as they are at the close.

A set that sends the whole tree (an initial sync) sends each small file
whole, times included (a FILE record), and makes every directory, symlink
and node anew. Its close restates the times of every entry that is not a
regular file, walked then (``every_entry``), and of the regular files the
set touched past their entry: a large file's data, an op of the
application's. Its memory does not grow with the tree.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any

from repl.tree import Tree
from store.records import RENAME_EXCHANGE, Op, Record, is_under

_DATA_OPS = frozenset(
    {Op.WRITE, Op.TRUNCATE, Op.FALLOCATE, Op.CHMOD, Op.CHOWN, Op.SETXATTR, Op.REMOVEXATTR}
)
_NEW_NAME_OPS = frozenset({Op.CREATE, Op.MKDIR, Op.MKNOD, Op.SYMLINK, Op.FILE})
# In a set that sends the whole tree: entries the close restates anyway (all but
# regular files, their directories among them), or sent with their times (FILE).
_WALKED_OPS = frozenset({Op.MKDIR, Op.MKNOD, Op.SYMLINK, Op.FILE})


def parent_of(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def removed_name(op: Op, fields: dict[str, Any]) -> bytes | None:
    """The name *op* (its record's fields) removes, if any: unlinked, or replaced by a
    rename (if there is one there)."""
    if op == Op.UNLINK:
        return bytes(fields["path"])
    if op == Op.RENAME and not fields.get("flags", 0) & RENAME_EXCHANGE:
        return bytes(fields["path2"])
    return None


# Ops after which BACKING's file keeps the mtime the daemon last set on it, as far as the
# close is concerned: a write changes it, and the close sets it back (see ``mtimes``).
_KEEP_MTIME_OPS = frozenset(
    {Op.WRITE, Op.UTIMES, Op.CHMOD, Op.CHOWN, Op.SETXATTR, Op.REMOVEXATTR, Op.CREATE,
     Op.MKDIR, Op.MKNOD, Op.SYMLINK, Op.LINK, Op.RMDIR, Op.SYNC, Op.VOID}
)


class Touched:
    """The set of paths whose times the records seen so far changed; with
    ``everything``, also every entry that is not a regular file.

    ``mtimes`` holds the mtime the mount's kernel last sent for a regular file
    (``keep_mtime``), from set to set while each set touches the file: under the
    writeback cache the kernel keeps a written file's mtime itself and sends it
    with a SETATTR, so between two of those a write to BACKING's file moves its
    mtime to a time no reader saw. The close sets such a file's mtime back and
    restates it without asking BACKING for it (a question that costs a SETATTR
    at the next fsync: see store/libc.py ``stat_untimed``). Any op that may move
    the mtime otherwise, or a name, forgets them all (a file may have several
    names); a write keeps it: the kernel stamps the file at the write(2), which
    the daemon never sees, and sends the stamp if it moved."""

    def __init__(self) -> None:
        self.paths: set[bytes] = set()
        self.everything = False
        self.mtimes: dict[bytes, int] = {}

    def keep_mtime(self, path: bytes, mtime_ns: int) -> None:
        """The kernel set regular file *path*'s mtime to *mtime_ns* on BACKING."""
        self.mtimes[path] = mtime_ns

    def all(self) -> None:
        """The set sends the whole tree, from now on: its close restates the times of
        every entry but the regular files not noted since."""
        self.everything = True
        self.paths = set()
        self.mtimes.clear()

    def covers(self, path: bytes) -> bool:
        """Whether the close restates *path*'s times (False for an entry that is not a
        regular file in a set that sends the whole tree, though it does: a UTIMES of its
        own costs a record, not a wrong time)."""
        return path in self.paths

    def note(self, *paths: bytes) -> None:
        """*paths* were touched."""
        self.paths.update(paths)

    def add(self, record: Record) -> None:
        """*record* was journaled: note the paths it touched, following renames."""
        op, path, path2 = record.op, record.path, record.path2
        if self.mtimes and op not in _KEEP_MTIME_OPS:
            self.mtimes.clear()  # by any name: a file may have several
        if self.everything and op in _WALKED_OPS:
            return
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
        """The set closed. The mtimes of files it did not touch are forgotten: kept, they
        would grow with every file ever written, where a file written again soon, as
        by a database, stays."""
        self.mtimes = {p: m for p, m in self.mtimes.items() if p in self.paths}
        self.paths.clear()
        self.everything = False


_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def every_entry(backing: Tree, files: set[bytes]) -> Iterator[tuple[bytes, os.stat_result]]:
    """(path, lstat) of the root and of every entry under it that is not a regular
    file, and of the regular files among *files*; a directory at a time, names in
    sorted order, a symlink never followed. The other files are not stat'ed: the
    directory's entry types tell them apart. The tree must not change meanwhile (the
    capture's lock is held)."""
    yield b"", os.stat(backing.root_fd)
    pending = [b""]
    while pending:
        top = pending.pop()
        found = []
        fd = os.open(".", _DIR_READ, dir_fd=backing.dir_fd(top))
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    name = os.fsencode(entry.name)
                    path = top + b"/" + name if top else name
                    if not entry.is_file(follow_symlinks=False) or path in files:
                        found.append((name, path, entry.stat(follow_symlinks=False)))
        finally:
            os.close(fd)
        for _, path, st in sorted(found):
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                pending.append(path)
