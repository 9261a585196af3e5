"""Room kept on the journal's disk for the entries that must get through when it fills.

When the filesystem that holds the journal fills up, a write through the
mount must fail with ENOSPC, as it would natively, but the daemon must still
be able to journal what frees space (an unlink, a truncate, a punched hole),
close a set (its times, its SYNC) and note its own state. Without room for
those, nobody could delete a file through the mount, and nothing written
before could be made a set and shipped.

So the log holds a file of RESERVE_BYTES beside its segments, allocated
while there is room. An entry that frees space or is the daemon's own (a
*spare* one) and finds the disk full gives the reserve up and is written in
the room it leaves; from then on every other entry fails with ENOSPC
until the reserve can be allocated again, which each of them tries first.
A disk too full for the reserve when the log opens starts without it, as if
given up. The log says when the reserve goes and when it comes back, once a
QUIET_SECONDS at most. On a copy-on-write filesystem (btrfs) freeing the reserve may not
give an overwrite the room it needs; the reserve only makes it likely there.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

from store.private import FILE_MODE

RESERVE_BYTES = 4 << 20  # far more than the spare entries of a set's close
NAME = "reserve"
QUIET_SECONDS = 60.0  # a reserve given up again within this is not logged again

log = logging.getLogger("replfs.journal")


class Reserve:
    """The reserve file of the log in *directory* (see the module comment)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        self.held = False
        self._quiet_until = 0.0
        self._said = True  # the reserve's last loss was logged: its return is too
        if not self._allocate():
            log.warning("the disk of the journal %s has less than %d MiB free: until it "
                        "has, changes fail with ENOSPC but those that free space",
                        directory, RESERVE_BYTES >> 20)

    def _allocate(self) -> bool:
        try:
            os.posix_fallocate(self._fd, 0, RESERVE_BYTES)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            os.ftruncate(self._fd, 0)  # what a failed allocation took, back
            return False
        self.held = True
        return True

    def admit(self) -> None:
        """Before an entry that takes space: raise ENOSPC while the reserve is given
        up and cannot be allocated again."""
        if self.held:
            return
        if self._allocate():
            if self._said:
                log.info("the disk of the journal %s has room again: changes are taken",
                         self.path.parent)
            return
        raise OSError(errno.ENOSPC, "no space left on the journal's disk (its reserve "
                      "is kept for changes that free space)")

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
                    "and changes fail with ENOSPC but those that free space",
                    self.path.parent, RESERVE_BYTES >> 20)
        return True

    def close(self) -> None:
        os.close(self._fd)
