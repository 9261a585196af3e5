"""Waking trio from the FUSE request threads, without a handoff per request.

The request threads append to the journal; trio's tasks (the sender, the
set closer) must hear of it. A call from another thread goes through
``TrioToken.run_sync_soon``, but only if none is pending: all the appends
that happen before trio runs the call share it (notify, don't queue).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import trio


class Waker:
    """Call *fn* (a trio-side function that must not block) from any thread.

    Made inside trio: calls from trio's own thread run *fn* at once; calls
    from other threads schedule one run of *fn* unless one is already
    scheduled and has not started yet.
    """

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self._pending = False

    def __call__(self) -> None:
        if threading.get_ident() == self._trio_thread:
            self.fn()
        elif not self._pending:
            self._pending = True
            try:
                self._token.run_sync_soon(self._run)
            except trio.RunFinishedError:
                pass  # trio is gone: nobody is left to wake

    def _run(self) -> None:
        self._pending = False  # first: a call from now on schedules another run
        self.fn()
