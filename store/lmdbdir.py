"""An LMDB environment in a directory that one daemon holds exclusively.

The staging store is such a directory: a LOCK file that names the holding
pid, and an environment whose commits flush the disk once (their pages) and
whose callers ``env.sync()`` where a commit must be durable (its meta page).

LMDB reads through a shared map of its file, and every page it reads stays
mapped; py-lmdb also reads each value a cursor passes, deleting too. A
backlog streamed once would count whole in the daemon's resident memory.
So the pages are let go of after every RELEASE_BYTES that went through the
store, counting each commit as COMMIT_BYTES, and after deletions (they stay in
the page cache; a read maps them again).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import lmdb

from store.errors import JournalLocked, StoreError
from store.libc import MADV_DONTNEED, madvise
from store.private import FILE_MODE, private_dir

MAP_SIZE = 1 << 40  # address space only: the file grows with what is stored
RELEASE_BYTES = 8 << 20
# A commit writes the pages it changed to new places (copy on write), so the next
# reads map fresh pages even where nothing new was stored: count each as this much.
COMMIT_BYTES = 256 << 10


class LmdbDir:
    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = private_dir(path)
        self._lock_fd = lock_dir(self.path / "LOCK")
        for name in ("data.mdb", "lock.mdb"):  # made by an older replfs, maybe 0644
            if (self.path / name).exists():
                os.chmod(self.path / name, FILE_MODE)
        try:
            # Each commit flushes the pages it wrote before it writes its meta page
            # (which it does not flush): a power cut leaves the last commit or the
            # one before it, never a meta page over pages the disk did not get.
            # sync() makes the last commit durable too.
            self.env = lmdb.open(str(self.path), map_size=MAP_SIZE, max_dbs=4, sync=True,
                                 metasync=False, readahead=False, mode=FILE_MODE)
        except lmdb.Error as exc:
            os.close(self._lock_fd)
            raise StoreError(f"open {what} {self.path}: {exc}") from exc
        self._map = _mapping_of(self.path / "data.mdb")
        self._read = 0

    def passed(self, nbytes: int) -> None:
        """Count *nbytes* written or read; let go of the map's pages past RELEASE_BYTES.

        Safe while other threads read: a page let go of is mapped again when read.
        """
        self._read += nbytes
        if self._read >= RELEASE_BYTES:
            self.release()

    def release(self) -> None:
        """Let go of every page of the map (a few µs when few are mapped)."""
        self._read = 0
        if self._map is not None:
            madvise(self._map[0], self._map[1], MADV_DONTNEED)

    def delete_run(self, txn: lmdb.Transaction, db: lmdb._Database, start: bytes,
                   stop: Callable[[bytes], bool]) -> int:
        """Delete keys from *start* on until *stop(key)*; returns how many.

        The cursor reads each value it lands on, so the pages are let go of
        every RELEASE_BYTES or so (judged by the values' average size).
        """
        info = txn.stat(db)
        size = (info["leaf_pages"] + info["overflow_pages"]) * info["psize"]
        every = max(1, RELEASE_BYTES * max(1, info["entries"]) // max(1, size))
        cursor = txn.cursor(db=db)
        deleted = 0
        if cursor.set_range(start):
            while cursor.key() and not stop(bytes(cursor.key())):
                cursor.delete()
                deleted += 1
                if deleted % every == 0:
                    self.release()
        self.release()
        return deleted

    def db_bytes(self, db: lmdb._Database) -> int:
        """Bytes the pages of *db* take."""
        with self.env.begin() as txn:
            info = txn.stat(db)
        pages = info["branch_pages"] + info["leaf_pages"] + info["overflow_pages"]
        return int(pages * info["psize"])

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()
        os.close(self._lock_fd)


def lock_dir(path: Path, what: str | None = None) -> int:
    """Take the exclusive lock *path* (a LOCK file) of its directory, or of *what* if
    given, or say which daemon holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise JournalLocked(
            f"{what or path.parent} is in use by another replfs daemon (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _mapping_of(path: Path) -> tuple[int, int] | None:
    """(address, length) of this process's map of *path*, from /proc/self/maps."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 5 and fields[3] == dev and fields[4] == str(st.st_ino):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                return start, end - start
    return None
