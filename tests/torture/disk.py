"""A primary whose disk fills up (the primary_enospc fault).

BACKING and its journal (beside it) are on a tmpfs of their own. The fault
shrinks the tmpfs to what it holds and a little more, so the workload soon
meets ENOSPC, and grows it back after a while: the primary must go on
serving, journal what frees space, close sets, write what the kernel took
before (the journal's reserve), and lose nothing it acknowledged; the
replica must still match BACKING at every set.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from tests.support import tmpfs

ROOMY = "1g"  # RAM-backed, but a run writes tens of MiB
LEFT = 64 << 10  # room left when it fills: far less than the journal's reserve
FILL_TRIES = 20  # the workload writes meanwhile: a size below what it then holds is refused


class PrimaryDisk:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.full = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._mounted = tmpfs(path, ROOMY)

    def __enter__(self) -> PrimaryDisk:
        self._mounted.__enter__()
        return self

    def _resize(self, size: str, check: bool = True) -> bool:
        """Remount the tmpfs at *size*; False if refused and not *check*: a tmpfs holding
        more than that (EINVAL)."""
        done = subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)],
                              check=check, capture_output=not check)
        return done.returncode == 0

    def fill(self, seconds: float) -> None:
        """Leave LEFT bytes free (what the tmpfs holds now, and no more) for *seconds*,
        whatever the run does meanwhile (it may wait for the primary: a new replica's
        initial sync)."""
        with self._lock:
            for _ in range(FILL_TRIES):  # what it holds may grow past LEFT before the remount
                st = os.statvfs(self.path)
                if self._resize(str((st.f_blocks - st.f_bfree) * st.f_frsize + LEFT),
                                check=False):
                    break
            else:
                raise RuntimeError(f"could not shrink {self.path} in {FILL_TRIES} tries")
            self.full = True
        self._timer = threading.Timer(seconds, self.grow)
        self._timer.start()

    def grow(self) -> None:
        with self._lock:
            if self.full:
                self._resize(ROOMY)
                self.full = False

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._mounted.__exit__(None, None, None)
