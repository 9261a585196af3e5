"""The inodes the kernel knows, kept near a bound.

The kernel holds a FUSE inode as long as it caches a name of it, and keeps
names until memory runs short: a walk of a million files through a mount
leaves a million inodes known, and the mount's table (fs/inodes.py) a node
for each, about 400 bytes. Past ``limit`` nodes, the names of the files
looked up first are dropped from the kernel's cache (a notification, as the
standby's cache drops what a set changes, fs/kernel_cache.py): the kernel
forgets each inode it does not use otherwise (and its cached pages), its
FORGET removes the node, and the next use of the file costs a LOOKUP again.
It is what memory pressure does to the kernel's cache anyway.

Not dropped: directories (a process's working directory whose name is
dropped has none any more: getcwd fails) and files with open handles (their
names in /proc would read "(deleted)"). Both are few, and in use.
"""

from __future__ import annotations

import errno
import logging
import threading

import pyfuse3

from fs.inodes import Inodes

log = logging.getLogger("replfs.primary")
MAX_INODES = 100_000  # about 45 MiB of nodes; the kernel's own share is its business


class Pruner:
    """Drops the kernel's names of the files first looked up while ``inodes`` holds
    more than its limit, from a thread of its own (``run``) that holds no lock while
    the kernel drops them: a drop waits for the lookups in flight in the directory,
    which may be waiting for *lock*."""

    def __init__(self, inodes: Inodes, lock: threading.RLock) -> None:
        self.inodes = inodes
        self.lock = lock
        self._stopping = False
        self.dropped = 0  # names dropped, for the log and the tests

    def run(self) -> None:
        inodes = self.inodes
        while True:
            inodes.crowded.wait()
            if self._stopping:
                return
            with self.lock:
                inodes.crowded.clear()
                names = inodes.surplus()
            if not self.dropped:
                log.info("the kernel knows more than %d inodes through the mount "
                         "(--max-inodes): it is asked to forget the files looked up first",
                         inodes.limit)
            for parent, name in names:
                if self._stopping:
                    return
                try:
                    pyfuse3.invalidate_entry(parent, name)
                    self.dropped += 1
                except OSError as exc:
                    if exc.errno != errno.ENOENT:  # the kernel had dropped it already
                        log.debug("dropping the kernel's name %r in %d: %s", name, parent, exc)

    def stop(self) -> None:
        """Make ``run`` return (before the session it notifies is closed)."""
        self._stopping = True
        self.inodes.crowded.set()
