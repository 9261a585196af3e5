"""Test-only fault and observation points, off unless an environment variable asks.

Some faults cannot be produced on demand from outside: a kill between two
syscalls of an apply. The applier calls ``step()`` before each syscall-level
step; with ``REPLFS_FAULT_KILL_AT_APPLY_STEP=N`` the process SIGKILLs itself
at the Nth step, exactly as a crash there would.

The fault harness checks every sample of the replica against the primary's
tree at set boundaries: with ``REPLFS_TEST_SET_HASHES=FILE`` the primary
appends "set digest" to FILE each time it closes a set, the digest taken at
that very moment (repl.verify.tree_digest), just before the set's SYNC is
journaled: a kill between the two leaves a digest of a set that never
closed (its id closes later, maybe with other contents: either is
accepted), never a closed set without one. With
``REPLFS_TEST_SET_TREES=DIR`` it also writes every entry's summary to
DIR/<set>, one "path-hex summary" a line.

A simulated power cut (tests/powercut) loses what the page cache held without
rebooting the machine: with ``REPLFS_TEST_BOOT_ID=FILE`` the primary reads
the boot id from FILE, which the simulator changes at each cut.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from store.hold import ENV_BOOT_ID as ENV_BOOT_ID  # the boot id, kept beside the hold
from store.hold import boot_id as boot_id
from store.libc import fd_path

ENV_KILL_AT_APPLY_STEP = "REPLFS_FAULT_KILL_AT_APPLY_STEP"
ENV_SET_HASHES = "REPLFS_TEST_SET_HASHES"
ENV_SET_TREES = "REPLFS_TEST_SET_TREES"


def set_hash_recorder() -> Callable[[int, int], None] | None:
    """A function (set id, backing root fd) -> None that logs the digest, if asked for."""
    target = os.environ.get(ENV_SET_HASHES)
    if not target:
        return None
    trees = os.environ.get(ENV_SET_TREES)
    from repl.verify import digest, walk

    def record(set_id: int, root_fd: int) -> None:
        entries = list(walk(os.fsdecode(fd_path(root_fd))))
        if trees:
            with open(os.path.join(trees, str(set_id)), "w") as out:
                for path, entry in entries:
                    out.write(f"{path.encode('utf-8', 'surrogateescape').hex()} {entry!r}\n")
        with open(target, "a") as out:
            out.write(f"{set_id} {digest(entries)}\n")

    return record


class ApplyFaults:
    def __init__(self) -> None:
        value = os.environ.get(ENV_KILL_AT_APPLY_STEP)
        self.kill_at = int(value) if value else None
        self.steps = 0

    def step(self, set_id: int, seq: int) -> None:
        if self.kill_at is None:
            return
        self.steps += 1
        if self.steps >= self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
