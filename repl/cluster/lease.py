"""A node's etcd lease, kept alive, and the deadlines it sets on this host.

A node holds one lease: its ``nodes/<name>`` key and, while it leads, the
``primary`` key are bound to it (repl/cluster/members.py), so both vanish when the
node stops renewing it. It is renewed every TTL/3.

etcd expires a lease no sooner than TTL after it last renewed it, which is
no sooner than TTL after this host *sent* the last renewal that succeeded
(``renewed_at``, on this host's time.monotonic(), which every process of
the host shares: the primary daemon compares its fence with it). So, by this host's clock:

- a primary may write until ``renewed_at + TTL/2`` (``write_until``): if
  renewals stop coming back, it stops half a TTL before anyone else may
  lead (the mount answers EROFS: fs/passthrough.py ``fence``);
- the lease may be in force until ``renewed_at + TTL`` (``valid_until``);
  past it, it is presumed gone, and ``run`` raises LeaseLost.

Clocks of different hosts are never compared: only durations, as each host
measures them, which drift by far less than the margins here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import trio

from repl.cluster.etcd import Etcd, EtcdError
from repl.errors import ReplError

log = logging.getLogger("replfs.lease")

RETRY_SECONDS = 0.25  # after a renewal that failed, try again this soon (within TTL/6)


class LeaseLost(ReplError):
    """The lease expired, or may have: nothing bound to it can be trusted."""


class Lease:
    def __init__(self, etcd: Etcd, ttl: float,
                 on_renew: Callable[[], None] = lambda: None) -> None:
        """*on_renew* is called (in trio) after each renewal that succeeded."""
        self.etcd = etcd
        self.ttl = ttl
        self.id = 0
        self.renewed_at = -math.inf
        self.on_renew = on_renew

    @property
    def write_until(self) -> float:
        return self.renewed_at + self.ttl / 2

    @property
    def valid_until(self) -> float:
        return self.renewed_at + self.ttl

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Take a lease, then keep it alive; raises LeaseLost once it is (presumed) gone,
        EtcdError if none could be taken."""
        sent = time.monotonic()
        with trio.fail_after(self.ttl):
            self.id = await self.etcd.grant(max(1, math.ceil(self.ttl)))
        self.renewed_at = sent
        task_status.started()
        while True:
            # The renewal period (trio's clock is not time.monotonic(): durations only).
            await trio.sleep(max(0.0, self.renewed_at + self.ttl / 3 - time.monotonic()))
            await self._renew()

    async def _renew(self) -> None:
        """Renew once, trying again on failure until the lease is presumed gone."""
        failed = False
        while True:
            sent = time.monotonic()
            if sent >= self.valid_until:
                raise LeaseLost(f"lease {self.id:x} not renewed for {self.ttl:g}s: presumed "
                                "expired")
            left = None
            with trio.move_on_after(min(self.valid_until - sent, self.ttl / 3)):
                try:
                    left = await self.etcd.keepalive(self.id)
                except EtcdError as exc:
                    if not failed:  # once a renewal, not once a retry
                        log.warning("renewing lease %x failed: %s; trying again until it "
                                    "may have expired", self.id, exc)
                    failed = True
            if left == 0:
                raise LeaseLost(f"lease {self.id:x} expired in etcd")
            if left is not None:
                self.renewed_at = sent
                self.on_renew()
                return
            await trio.sleep(min(RETRY_SECONDS, self.ttl / 6))  # retry pacing
