"""Test-only fault points, off unless an environment variable turns them on.

Some faults cannot be produced on demand from outside: a kill between two
syscalls of an apply. The applier calls ``step()`` before each syscall-level
step; with ``REPLFS_FAULT_KILL_AT_APPLY_STEP=N`` the process SIGKILLs itself
at the Nth step, exactly as a crash there would.
"""

from __future__ import annotations

import os
import signal

ENV_KILL_AT_APPLY_STEP = "REPLFS_FAULT_KILL_AT_APPLY_STEP"


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
