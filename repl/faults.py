"""Test-only fault and observation points, off unless an environment variable asks.

Some faults cannot be produced on demand from outside: a kill between two
syscalls of an apply. The applier calls ``step()`` before each syscall-level
step; with ``REPLFS_FAULT_KILL_AT_APPLY_STEP=N`` the process SIGKILLs itself
at the Nth step, exactly as a crash there would.

The fault harness checks every sample of the replica against the primary's
tree at set boundaries: with ``REPLFS_TEST_SET_HASHES=FILE`` the primary
appends "set digest" to FILE each time it closes a set, the digest taken at
that very moment (repl.verify.tree_digest).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from store.libc import fd_path

ENV_KILL_AT_APPLY_STEP = "REPLFS_FAULT_KILL_AT_APPLY_STEP"
ENV_SET_HASHES = "REPLFS_TEST_SET_HASHES"


def set_hash_recorder() -> Callable[[int, int], None] | None:
    """A function (set id, backing root fd) -> None that logs the digest, if asked for."""
    target = os.environ.get(ENV_SET_HASHES)
    if not target:
        return None
    from repl.verify import tree_digest

    def record(set_id: int, root_fd: int) -> None:
        digest = tree_digest(os.fsdecode(fd_path(root_fd)))
        with open(target, "a") as out:
            out.write(f"{set_id} {digest}\n")

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
