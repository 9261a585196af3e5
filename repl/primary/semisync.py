"""``--fsync remote`` and ``received``: an fsync also waits for the secondaries in step.

An fsync through the primary returns once its set is durable in the journal
(repl/primary/capture.py). With ``--fsync remote`` it returns only once
every secondary *in step* has also acknowledged every record of that set as
staged, that is durable on that secondary's disk, not necessarily applied
(promote applies it): the data an fsync returned for survives the loss of
the whole primary on every secondary that was in step then, and any of them
may take over without losing it. With ``--fsync received`` (DRBD's protocol
B) it waits until those secondaries have received the set, read and checked,
not yet staged: in their memory, on its way to their disk (in a few
milliseconds). The primary's journal keeps it until a secondary applied it,
so a secondary's crash loses nothing; only the loss of the primary together
with a secondary's crash in those milliseconds can lose it there.

A secondary is in step while it is connected and caught up with what was
closed when it connected (or when it last fell out of step). An fsync does
not wait for one that is gone or catching up (after an outage, a restart,
an initial sync): its replica could not take over without that backlog
anyway, and the others (or the application, at local speed, if it is the
only one) go on, as DRBD goes on with a disconnected peer. An fsync that
waits ``timeout`` seconds for a connected secondary stops waiting for it,
and that secondary is out of step until it has caught up again; the others
are not held back by it after that. Each change of step is logged, and each
fsync that returned with no secondary's staging at all is counted
(``local_only``).

Each secondary's Sender reports to its own ``Peer`` (sessions, records
shipped, records staged); the request threads wait in ``wait_staged()``.
One condition (one lock) holds what the two sides share.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

log = logging.getLogger("replfs.fsync")

FSYNC_TIMEOUT = 5.0  # DRBD waits 6 s for a peer's answer before it drops the peer


class Waited(enum.Enum):
    """What an fsync's wait for the secondaries came to."""

    STAGED = "staged"  # a secondary in step staged (or received) its set
    DROPPED = "dropped"  # those in step, waited for, left step without it
    LOCAL = "local"  # none was in step: the primary's disk alone


class Semisync:
    def __init__(self, timeout: float = FSYNC_TIMEOUT, receipts: bool = False) -> None:
        """*receipts*: the fsyncs wait for the secondaries' receipts (``--fsync
        received``), not for their staging's sync (``--fsync remote``)."""
        self.timeout = timeout
        self.receipts = receipts
        self.local_only = 0  # fsyncs that returned with no secondary's staging
        self.peers: dict[str, Peer] = {}  # by address, as the fan-out names them
        self._cond = threading.Condition()

    def add(self, address: str) -> Peer:
        """The standing of the secondary at *address* (out of step until its sender
        connects and it has caught up)."""
        with self._cond:
            peer = self.peers[address] = Peer(self._cond, address, self.receipts)
            return peer

    def wait_staged(self, set_id: int, durable: Callable[[], None]) -> Waited:
        """Make *set_id* durable here (*durable*: the journal's flush), then block until
        every secondary in step has staged it (or received it, with receipts): STAGED
        if at least one has.

        From before the flush, every sender ships the set as soon as it is durable,
        without letting records gather. A secondary out of step is not waited for;
        one that stays in step without staging the set for ``timeout`` seconds is
        put out of step (until it has caught up) and the fsync returns without it.
        If no secondary staged the set (counted), the fsync returns on local
        durability alone: DROPPED if some were in step and left it meanwhile (gone,
        or silent past the timeout), LOCAL if none was.
        """
        with self._cond:
            peers = list(self.peers.values())
            for peer in peers:
                peer.waiting += 1
        try:
            durable()
            with self._cond:
                behind = [p for p in peers if p.in_step and not p.holds(set_id)]
                for peer in behind:
                    peer.hurry()
                if behind:
                    self._cond.wait_for(lambda: all(not p.in_step or p.holds(set_id)
                                                    for p in behind), self.timeout)
                for peer in behind:
                    if peer.in_step and not peer.holds(set_id):
                        peer.fall_behind(set_id, f"did not stage set {set_id} within "
                                                 f"{self.timeout:g}s")
                if any(p.in_step and p.holds(set_id) for p in self.peers.values()):
                    return Waited.STAGED
                self.local_only += 1
                return Waited.DROPPED if behind else Waited.LOCAL
        finally:
            with self._cond:
                for peer in peers:
                    peer.waiting -= 1

    def count_local(self, resync_set: int) -> None:
        """An fsync returned without waiting, over the journal's budget (its data is
        in the dirty map, sent with the resync that closes set *resync_set*, or in
        the sets closed before it): every secondary, in step, catching up or gone,
        is behind until it staged that set (logged, and in status, like any that
        fell behind)."""
        with self._cond:
            self.local_only += 1
            for peer in self.peers.values():
                peer.owe(resync_set)


class Peer:
    """Where one secondary stands for ``--fsync remote``: fed by its Sender (trio),
    read by the fsyncs waiting (request threads), under the condition of its
    Semisync."""

    def __init__(self, cond: threading.Condition, address: str, receipts: bool = False
                 ) -> None:
        self.address = address
        self.receipts = receipts  # a receipt will do (--fsync received), if it sends them
        self.in_step = False
        self.waiting = 0  # fsyncs waiting for this secondary now: its sender ships at once
        # Wakes the sender's feeder, if it lets records gather, when an fsync starts
        # waiting (any thread).
        self.hurry: Callable[[], None] = lambda: None
        self._cond = cond
        self._connected = False
        self._unstaged: OrderedDict[int, int] = OrderedDict()  # set -> records in flight
        self._whole = 0  # the last set whose every record was shipped (or applied)
        self._catch_up_to: int | None = None  # in step once staged through this set
        self._owed = 0  # an fsync returned without it, its data in this set's resync
        self._ever = False  # was in step once (for the log's words)

    # --- the sender's side (trio) ---------------------------------------------------

    def connected(self, applied: int, last_closed: int) -> None:
        """A session began with the secondary, which applied *applied*; it is in step
        once it staged everything closed now (*last_closed*), and the set of any fsync
        that returned without it over the journal's budget."""
        with self._cond:
            self._connected = True
            self._unstaged.clear()
            self._whole = applied
            self._catch_up_to = max(last_closed, self._owed)
            self._check()

    def disconnected(self) -> None:
        with self._cond:
            self._connected = False
            self._unstaged.clear()
            self._catch_up_to = None
            if self.in_step:
                log.warning("fsync remote: secondary %s is gone; fsyncs do not wait for it "
                            "until it is back and has caught up", self.address)
            self._set(False)

    def shipped(self, records: Iterable[tuple[int, int, bool]]) -> None:
        """Records went out: (set, seq, whether it is the set's SYNC), in stream order."""
        with self._cond:
            for set_id, _, last in records:
                self._unstaged[set_id] = self._unstaged.get(set_id, 0) + 1
                if last:
                    self._whole = set_id

    def staged(self, keys: Iterable[tuple[int, int]]) -> None:
        """The secondary acknowledged these records (set, seq) as staged (or, if
        receipts do and it sends them, as received), each once."""
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

    # --- under the condition --------------------------------------------------------

    def holds(self, set_id: int) -> bool:
        """The secondary staged *set_id* whole: it is before the first set with records
        in flight, and was shipped whole."""
        if self._unstaged:
            return min(next(iter(self._unstaged)) - 1, self._whole) >= set_id
        return self._whole >= set_id

    def owe(self, set_id: int) -> None:
        """An fsync returned without this secondary, its data in *set_id* (the set the
        resync closes): in step only once it staged that set."""
        if self._connected and self.holds(set_id):
            return  # staged already (the resync closed it meanwhile)
        self._owed = max(self._owed, set_id)
        if self.in_step:
            self.fall_behind(set_id, "is behind the journal's budget (its data goes to "
                             "the dirty map)")
        elif self._catch_up_to is not None:
            self._catch_up_to = max(self._catch_up_to, set_id)

    def fall_behind(self, set_id: int, why: str) -> None:
        """Out of step until it has staged *set_id*, for the reason *why* (logged)."""
        log.warning("fsync remote: secondary %s %s; fsyncs do not wait for it until it "
                    "has caught up", self.address, why)
        self._catch_up_to = set_id
        self._set(False)

    def _check(self) -> None:
        if (self._connected and self._catch_up_to is not None
                and self.holds(self._catch_up_to)):
            self._catch_up_to = None
            log.info("fsync remote: secondary %s has staged every closed set; fsyncs wait "
                     "for it %s", self.address, "again" if self._ever else "from now on")
            self._ever = True
            self._set(True)

    def _set(self, in_step: bool) -> None:
        self.in_step = in_step
        self._cond.notify_all()
