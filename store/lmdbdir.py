"""An LMDB environment in a directory that one daemon holds exclusively.

The journal and the staging store are both such directories: a LOCK file
that names the holding pid, and an environment opened without fsync on
commit (callers sync at their commit points).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import lmdb

from store.errors import JournalLocked, StoreError

MAP_SIZE = 1 << 40  # address space only: the file grows with what is stored


class LmdbDir:
    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.path / "LOCK")
        try:
            self.env = lmdb.open(str(self.path), map_size=MAP_SIZE, max_dbs=4, sync=False,
                                 metasync=False, readahead=False)
        except lmdb.Error as exc:
            os.close(self._lock_fd)
            raise StoreError(f"open {what} {self.path}: {exc}") from exc

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


def _lock(path: Path) -> int:
    """Take the directory's exclusive lock, or say which daemon holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise JournalLocked(
            f"{path.parent} is in use by another replfs daemon (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
