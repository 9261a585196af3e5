"""Room kept on the journal's disk for what must get through when it fills.

When the filesystem that holds the journal (and BACKING, beside it) fills
up, three things must still work. The writes the kernel took into its cache
before must reach BACKING and the journal: under the writeback cache a
write(2) returns before the daemon sees it, so a write refused at writeback
is a write the application was told it made, and an application that goes
on from there (SQLite's checkpoint does) leaves its files inconsistent. What
frees space (an unlink, a truncate, a punched hole) must be journaled, or
nobody could delete a file through the mount. And a set must close (its
times, its SYNC) and the daemon note its own state.

So the log holds a file beside its segments, allocated while there is room:
1/16 of the filesystem, between 1 and 64 MiB (``reserve_bytes``). A *spare*
entry (any but those that take new room at the application's own call:
``Journal.append``) that finds the disk full gives the reserve up and is
written in the room it leaves, and so is BACKING's side of its op. While the
reserve is given up, the other entries fail with ENOSPC, an fsync does too
(``room``: the application learns at its next fsync, and what it wrote is not
lost for it), and each of them first tries to allocate the reserve again. A
disk too full for the reserve when the log opens starts without it, as if
given up, and a log closed cleanly gives its room back. The log says when the
reserve goes and when it comes back, once a QUIET_SECONDS at most. On a
copy-on-write filesystem (btrfs) freeing the reserve may not give an
overwrite the room it needs; the reserve only makes it likely there.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path

from store.private import FILE_MODE

MIN_BYTES = 1 << 20
MAX_BYTES = 64 << 20  # the writes the kernel holds for the mount, and more
NAME = "reserve"
QUIET_SECONDS = 60.0  # a reserve given up again within this is not logged again

log = logging.getLogger("replfs.journal")


def disk_full(exc: OSError) -> bool:
    """Whether *exc* says the disk (or the user's quota on it) has no room left."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_free(path: str | os.PathLike[str]) -> int:
    """Bytes free for a user's files on the disk of *path* (status, metrics)."""
    return shutil.disk_usage(path).free


def reserve_bytes(directory: Path) -> int:
    """The reserve's size for a log in *directory*: 1/16 of its filesystem, bounded."""
    st = os.statvfs(directory)
    return max(MIN_BYTES, min(MAX_BYTES, st.f_blocks * st.f_frsize // 16))


class Reserve:
    """The reserve file of the log in *directory* (see the module comment)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / NAME
        self.size = reserve_bytes(directory)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        self.held = False
        self._quiet_until = 0.0
        self._said = True  # the reserve's last loss was logged: its return is too
        if not self._allocate():
            log.warning("the disk of the journal %s has less than %d MiB free: until it "
                        "has, changes that take room and fsyncs fail with ENOSPC",
                        directory, self.size >> 20)

    def _allocate(self) -> bool:
        try:
            os.posix_fallocate(self._fd, 0, self.size)
        except OSError as exc:
            if not disk_full(exc):
                raise
            os.ftruncate(self._fd, 0)  # what a failed allocation took, back
            return False
        self.held = True
        return True

    def room(self) -> bool:
        """Whether the reserve is held, or can be allocated again now."""
        if self.held:
            return True
        if not self._allocate():
            return False
        if self._said:
            log.info("the disk of the journal %s has room again: changes are taken",
                     self.path.parent)
        return True

    def admit(self) -> None:
        """Before an entry that is not spare: raise ENOSPC while the reserve is given
        up and cannot be allocated again."""
        if not self.room():
            raise OSError(errno.ENOSPC, "no space left on the journal's disk (its reserve "
                          "is kept for writes already made and changes that free space)")

    def give_up(self) -> bool:
        """A spare entry found the disk full: free the reserve for it. False if it was
        given up already (nothing more to free)."""
        if not self.held:
            return False
        os.ftruncate(self._fd, 0)
        self.held = False
        now = time.monotonic()
        self._said = now >= self._quiet_until
        if not self._said:
            return True
        self._quiet_until = now + QUIET_SECONDS
        log.warning("the disk of the journal %s is full: its reserve of %d MiB is in use, "
                    "and changes that take room and fsyncs fail with ENOSPC until there "
                    "is room again", self.path.parent, self.size >> 20)
        return True

    def close(self) -> None:
        """The log closes (a clean stop): its disk gets the room back until the next
        open allocates the reserve again."""
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)
