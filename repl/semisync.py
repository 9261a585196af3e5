"""``--fsync remote``: an fsync also waits until the secondary has staged its set.

An fsync through the primary returns once its set is durable in the journal
(repl/capture.py). With ``--fsync remote`` (DRBD's protocol B) it returns
only once the secondary has also acknowledged every record of that set as
staged, that is durable on the secondary's disk, not necessarily applied
(promote applies it): the data an fsync returned for survives the loss of
the whole primary.

Only while the secondary is *in step*: connected, and caught up with what
was closed when it connected (or when it last fell out of step). An fsync
does not wait for a secondary that is gone or catching up (after an outage,
a restart, an initial sync): its replica could not take over without that
backlog anyway, and the application goes on at local speed, as DRBD goes on
with a disconnected peer. An fsync that waits ``timeout`` seconds for a
connected secondary stops waiting, and the secondary is out of step until it
has caught up again. Each fsync that returned without the secondary is
counted (``local_only``), and each change of step is logged.

Two threads meet here: the sender (trio) reports sessions, records shipped
and records staged; request threads wait in ``wait_staged()``. A condition
(one lock) holds the few values they share.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

log = logging.getLogger("replfs.fsync")

FSYNC_TIMEOUT = 5.0  # DRBD waits 6 s for a peer's answer before it drops the peer


class Semisync:
    def __init__(self, timeout: float = FSYNC_TIMEOUT) -> None:
        self.timeout = timeout
        self.in_step = False
        self.local_only = 0  # fsyncs that returned without the secondary's staging
        self.waiting = 0  # fsyncs waiting for it now: the sender ships at once
        # Wakes the sender's feeder when an fsync starts waiting (any thread).
        self.hurry: Callable[[], None] = lambda: None
        self._cond = threading.Condition()
        self._connected = False
        self._unstaged: OrderedDict[int, int] = OrderedDict()  # set -> records in flight
        self._whole = 0  # the last set whose every record was shipped (or applied)
        self._catch_up_to: int | None = None  # in step once staged through this set
        self._ever = False  # was in step once (for the log's words)

    # --- the sender's side (trio) ---------------------------------------------------

    def connected(self, applied: int, last_closed: int) -> None:
        """A session began with a secondary that applied *applied*; it is in step once
        it staged everything closed now (*last_closed*)."""
        with self._cond:
            self._connected = True
            self._unstaged.clear()
            self._whole = applied
            self._catch_up_to = last_closed
            self._check()

    def disconnected(self) -> None:
        with self._cond:
            self._connected = False
            self._unstaged.clear()
            self._catch_up_to = None
            if self.in_step:
                log.warning("fsync remote: the secondary is gone; fsyncs return once "
                            "durable here, until it is back and has caught up")
            self._set(False)

    def shipped(self, records: Iterable[tuple[int, int, bool]]) -> None:
        """Records went out: (set, seq, whether it is the set's SYNC), in stream order."""
        with self._cond:
            for set_id, _, last in records:
                self._unstaged[set_id] = self._unstaged.get(set_id, 0) + 1
                if last:
                    self._whole = set_id

    def staged(self, keys: Iterable[tuple[int, int]]) -> None:
        """The secondary acknowledged these records (set, seq) as staged."""
        with self._cond:
            for set_id, _ in keys:
                left = self._unstaged.get(set_id)
                if left is None:
                    continue
                if left > 1:
                    self._unstaged[set_id] = left - 1
                else:
                    del self._unstaged[set_id]
            self._check()
            self._cond.notify_all()

    def _staged_through(self) -> int:
        """The last set staged whole: everything before the first set with records in
        flight, and shipped whole."""
        if self._unstaged:
            return min(next(iter(self._unstaged)) - 1, self._whole)
        return self._whole

    def _check(self) -> None:
        if (self._connected and self._catch_up_to is not None
                and self._staged_through() >= self._catch_up_to):
            self._catch_up_to = None
            log.info("fsync remote: the secondary has staged every closed set; fsyncs "
                     "wait for it %s", "again" if self._ever else "from now on")
            self._ever = True
            self._set(True)

    def _set(self, in_step: bool) -> None:
        self.in_step = in_step
        self._cond.notify_all()

    # --- the request threads' side ------------------------------------------------------

    def wait_staged(self, set_id: int) -> bool:
        """Block until the secondary has staged *set_id* (closed and durable here).

        Returns False at once if the secondary is not in step, or once it stays so
        for ``timeout`` seconds (then it is out of step until it caught up), or
        goes: the fsync then returns on local durability alone, and is counted.
        """
        with self._cond:
            if self.in_step and self._staged_through() < set_id:
                self.waiting += 1
                try:
                    self.hurry()
                    self._cond.wait_for(lambda: not self.in_step
                                        or self._staged_through() >= set_id, self.timeout)
                finally:
                    self.waiting -= 1
                if self.in_step and self._staged_through() < set_id:
                    log.warning("fsync remote: the secondary did not stage set %d within "
                                "%gs; fsyncs return once durable here, until it has caught "
                                "up", set_id, self.timeout)
                    self._catch_up_to = set_id
                    self._set(False)
            if self.in_step:
                return True
            self.local_only += 1
            return False

    def count_local(self) -> None:
        """An fsync returned without waiting, over the journal's budget (its data is
        in the dirty map, sent with the resync)."""
        with self._cond:
            self.local_only += 1
