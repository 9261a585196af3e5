"""The primary's secondaries: one Sender each, side by side.

Each secondary has a Sender of its own (repl/primary/sender.py): its own session,
streams, window, place in the journal, lag and stall watchdog, each in its
own tasks, so a slow or absent one never holds the others back, and the
application waits for none of them (capture only wakes them). What the
journal keeps, and for which of them, is repl/primary/retention.py.

Secondaries are named by their address as ``--secondary`` gives it; a
cluster's primary (repl/cluster/node.py) adds them as nodes join.

``--fsync remote`` meets several secondaries here: each Sender reports what
its secondary staged to a Peer of its own (repl/primary/semisync.py), and an fsync
waits until every secondary *in step* staged its set. A gone or stalled one
is not waited for (after the timeout, for a stalled one) until it caught up,
as with one secondary: a set an fsync returned for is on every secondary
that was in step then.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from repl.link import FrameDialer, transport
from repl.primary.semisync import Semisync
from repl.primary.sender import Sender

if TYPE_CHECKING:
    from repl.primary.capture import Capture

log = logging.getLogger("replfs.fanout")


class Fanout:
    def __init__(self, capture: Capture, make_sender: Callable[[str, str | None], Sender],
                 addresses: Iterable[str], remote: Semisync | None = None) -> None:
        """*make_sender* makes the Sender of one address (its dialer, its options), given
        the name its certificate must carry if not the one configured; *remote*, with
        --fsync remote, is where the fsyncs wait for the secondaries."""
        self.capture = capture
        self._make = make_sender
        self.remote = remote
        self.senders: dict[str, Sender] = {}
        self._nursery: trio.Nursery | None = None
        for address in addresses:
            self._wire(address)

    def __bool__(self) -> bool:
        return bool(self.senders)

    def _wire(self, address: str, peer: str | None = None) -> Sender:
        sender = self._make(address, peer)
        sender.on_applied = functools.partial(self.capture.caught_up, address)
        sender.bring_up = functools.partial(self.capture.bring_up, address)
        sender.walk = self.capture.walk
        sender.dropped = functools.partial(self.capture.retention.is_dropped, address)
        if self.remote is not None:
            sender.semisync = self.remote.add(address)
        self.senders[address] = sender
        return sender

    def notify(self) -> None:
        """New records are durable in the journal: wake every sender that waits for
        them (called by capture, from the thread that flushed)."""
        for sender in list(self.senders.values()):  # add() may add one meanwhile, in trio
            sender.notify()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Replicate to every secondary, and to those added later, until cancelled."""
        async with trio.open_nursery() as nursery:
            for sender in list(self.senders.values()):
                await nursery.start(sender.run)
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def add(self, address: str, peer: str | None = None) -> bool:
        """Replicate to *address* too (once run() started), whose certificate names
        *peer*. False if it already is."""
        assert self._nursery is not None, "add() before run() started"
        if address in self.senders:
            return False
        sender = self._wire(address, peer)  # checks the address before it pins anything
        self.capture.add_secondary(address)
        await self._nursery.start(sender.run)
        log.info("replicating to %s too (%d secondaries)", address, len(self.senders))
        return True

    def _caught_up(self, set_id: int) -> bool:
        connected = [s for s in self.senders.values() if s.status.connected]
        return bool(connected) and all(s.status.applied >= max(set_id, s.sync_set)
                                       for s in connected)

    async def wait_applied(self, set_id: int) -> None:
        """Return once every connected secondary's replica holds *set_id* or a later
        set, with at least one connected; while none is, keep waiting."""
        while not self._caught_up(set_id):
            async with trio.open_nursery() as nursery:
                for sender in self.senders.values():
                    nursery.start_soon(_first_of, sender.applied_event, nursery.cancel_scope)

    async def applied_within(self, set_id: int, seconds: float) -> str | None:
        """Wait for the connected secondaries to apply *set_id*; say why not, if not."""
        with trio.move_on_after(seconds):
            await self.wait_applied(set_id)
            return None
        connected = [s for s in self.senders.values() if s.status.connected]
        if not connected:
            return f"set {set_id} closed, but no secondary is connected after {seconds:g}s"
        behind = ", ".join(f"{s.address} at {s.status.applied}" for s in connected
                           if s.status.applied < set_id)
        return f"set {set_id} closed, but not every secondary applied it after " \
               f"{seconds:g}s: {behind}"

    def status(self) -> list[dict[str, Any]]:
        """One block per secondary, for ``replfs status``."""
        return [self.block(sender) for sender in self.senders.values()]

    def block(self, sender: Sender) -> dict[str, Any]:
        j, st = self.capture.journal, sender.status
        dialer = sender.dialer
        creds = dialer.creds if isinstance(dialer, FrameDialer) else None
        out: dict[str, Any] = {
            "secondary": sender.address, "connected": st.connected,
            "transport": transport(sender.address),
            "insecure": isinstance(dialer, FrameDialer) and creds is None,
            "tls_name": creds.name if creds else None,
            "tls_peer": creds.peer if creds else None,
            "streams": st.streams, "peer": st.peer_node,
            "last_shipped": list(st.shipped), "last_applied": st.applied,
            "lag_sets": j.set - 1 - st.applied,
            "lag_bytes": j.bytes_after(st.applied),
            "lag_seconds": round(self.capture.lag_seconds(st.applied), 3),
            "inflight_bytes": st.inflight_bytes, "sent_bytes": st.sent_bytes,
            "sent_wire_bytes": st.sent_wire_bytes, "compressing": st.compressing,
            "max_rate": sender.bucket.rate if sender.bucket else None,
            "rate_limited_seconds": round(sender.bucket.waited, 3) if sender.bucket else 0.0,
            "stalled": st.stalled, "errors": st.errors,
        }
        if sender.semisync is not None:
            out["fsync_in_step"] = sender.semisync.in_step
        return out | self.capture.retention.status(sender.address)


async def _first_of(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
