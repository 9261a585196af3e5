"""``replfs node``: one command per host; an etcd lease decides what it serves.

Every host of a cluster runs the same command. The node holds a lease
(repl/cluster/lease.py) and registers under it (repl/cluster/members.py). The node whose
lease holds the ``primary`` key serves ``mount`` read-write as the primary
and replicates to every other node; the others serve ``mount`` read-only
as the standby view of their replica, as secondaries. With no primary, the
nodes elect one (repl/cluster/election.py): the one with the most sets complete.

The node does not serve anything itself: it runs the primary daemon
(``replfs primary``) or the secondary daemon (``replfs secondary --mount``)
as a child process, which the kernel kills if the node dies, and switches
between them as the role changes:

- elected: stop the secondary, make the data a primary's (``promote``, or a
  new generation of its own journal), start the primary *fenced*: it
  refuses every change until told how long the lease allows writes, and is
  told again at every renewal (fs/passthrough.py ``fence``). If the renewals
  stop, it fences itself half a TTL after the last one went out, before etcd
  can expire the lease and another node can be elected; when the lease is
  presumed gone (a TTL after), the node kills it and follows the new
  primary, as an old primary rejoins (``--rejoin``: its own changes since
  are kept in a branch).
- following: the secondary listens; the primary's node dials it (nodes
  that join later are added to the running primary). After a failover it
  follows the new primary's generation (repl/secondary/rejoin.py).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from repl import control
from repl.cluster import election, members
from repl.cluster.child import Child, clear_dead_mount
from repl.cluster.etcd import Compare, Etcd, EtcdError, put_op
from repl.cluster.lease import Lease, LeaseLost
from repl.cluster.members import Leader, Member, View
from repl.config import check_apart
from repl.errors import Repeats, UsageError, first_error
from repl.primary.capture import DEFAULT_JOURNAL_MAX, DEFAULT_SET_INTERVAL
from repl.primary.semisync import FSYNC_TIMEOUT
from repl.sdnotify import notify
from repl.secondary.promote import promote
from repl.secondary.run import default_state_dir, journal_written, written_as_primary
from repl.tls import check_name
from store.errors import ReplfsError
from store.journal import Journal
from store.journal import exists as journal_exists
from store.staging import read_standing

log = logging.getLogger("replfs.node")

PUBLISH_SECONDS = 1.0  # a node's key says what it holds at least this often
DEFAULT_TTL = 10.0


@dataclass
class NodeConfig:
    name: str
    data: Path  # the tree: the primary's backing directory, or the replica
    mount: Path  # where applications see it (read-write, or the standby view)
    listen: str  # HOST:PORT the secondary listens on for the primary
    etcd: list[str]  # etcd's client URLs
    cluster: str = "replfs"
    advertise: str | None = None  # HOST:PORT the other nodes dial (default: listen)
    tls: Path | None = None
    insecure: bool = False
    peers: list[str] = field(default_factory=list)  # names accepted besides those registered
    lease_ttl: float = DEFAULT_TTL
    set_interval: float = DEFAULT_SET_INTERVAL
    journal_max: int = DEFAULT_JOURNAL_MAX
    fsync: str = "local"  # as a primary: replfs primary --fsync
    fsync_timeout: float = FSYNC_TIMEOUT


class Node:
    def __init__(self, cfg: NodeConfig, etcd: Etcd) -> None:
        self.cfg, self.etcd = cfg, etcd
        self.address = cfg.advertise or cfg.listen
        self.state = default_state_dir(cfg.data)
        self.child: Child | None = None
        self.lease: Lease | None = None
        self._renewed = trio.Event()
        self._etcd_errors = Repeats(log)  # etcd down: a line a minute, not one a second

    # --- the lease, and the roles it decides ---------------------------------------

    async def run(self) -> None:
        """Serve until cancelled, through lost leases and etcd outages."""
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    self.lease = Lease(self.etcd, self.cfg.lease_ttl, self._on_renew)
                    await nursery.start(self.lease.run)
                    await self.etcd.put(members.member_key(self.cfg.cluster, self.cfg.name),
                                        json.dumps({"address": self.address}).encode())
                    log.info("node %s of cluster %s: lease %x, %gs", self.cfg.name,
                             self.cfg.cluster, self.lease.id, self.cfg.lease_ttl)
                    self._etcd_errors.clear()
                    await self._roles()
            except* LeaseLost as group:
                log.warning("%s", first_error(group))
                if self.child is not None and self.child.role == "primary":
                    log.warning("stepping down: the primary stops (it refuses changes "
                                "since its lease ran short)")
                    await self._drop_child(kill=True)
            except* EtcdError as group:
                self._etcd_errors.warning(f"etcd: {first_error(group)}; trying again")
                await trio.sleep(1.0)  # retry pacing

    async def _roles(self) -> None:
        """Follow, lead or stand, as the cluster's keys say, until the lease is lost. An
        etcd call that fails is tried again: only the lease's loss ends a role."""
        while True:
            try:
                await self._role()
            except* EtcdError as group:
                self._etcd_errors.warning(f"etcd: {first_error(group)}; trying again")
            await trio.sleep(min(1.0, self.cfg.lease_ttl / 6))  # retry pacing

    async def _role(self) -> None:
        assert self.lease is not None
        while True:
            view = await members.read(self.etcd, self.cfg.cluster)
            leader = view.leader
            if leader is None:
                await election.campaign(self.etcd, self.cfg.cluster, self.lease.id,
                                        functools.partial(self._standing, view.generation),
                                        max(election.ELECTION_SECONDS, self.cfg.lease_ttl))
            elif leader.node != self.cfg.name:
                await self._follow(leader, view)
            elif leader.lease == self.lease.id:
                await self._lead(leader, view)
            else:
                log.info("the primary key is still this node's from before it restarted; "
                         "waiting for it to expire")
                await election.wait_change(self.etcd, self.cfg.cluster, view.revision,
                                           self.cfg.lease_ttl)

    # --- what this node holds ---------------------------------------------------------

    async def _standing(self, cluster_generation: int) -> Member:
        """What this node holds, for an election: read from its stores."""
        return await trio.to_thread.run_sync(self._read_standing, cluster_generation)

    def _read_standing(self, cluster_generation: int) -> Member:
        me = Member(self.cfg.name, self.address)
        path = self.state / "journal"
        if journal_exists(path):
            journal = Journal(path, read_only=True)
            try:
                if written_as_primary(journal):
                    me.generation = journal.identity.generation
                    me.complete = me.applied = journal.set - 1
                    return me
            finally:
                journal.close()
        standing = read_standing(self.state / "staging")
        if standing is not None:
            me.generation, me.applied = standing.generation, standing.applied
            me.complete, me.eligible = standing.complete, not standing.syncing
        else:  # a new node: it may start a new cluster, never take over one with data
            me.eligible = cluster_generation == 0
        return me

    async def _publish(self, role: str, **extra: Any) -> None:
        """Say in this node's key what it holds and does (for elections and status)."""
        assert self.lease is not None
        if role == "primary" and self.child is not None:
            try:
                st = await self.child.ask("status")
                me = Member(self.cfg.name, self.address, role, int(st["generation"]),
                            int(st["last_closed_set"]), int(st["last_closed_set"]),
                            extra={"fenced": st.get("fenced"), **extra})
            except (OSError, ValueError, KeyError, trio.TooSlowError, trio.BrokenResourceError):
                return
        else:
            standing = await trio.to_thread.run_sync(read_standing, self.state / "staging")
            me = Member(self.cfg.name, self.address, role, extra=extra)
            if standing is not None:
                me.generation, me.applied = standing.generation, standing.applied
                me.complete, me.eligible = standing.complete, not standing.syncing
        await self.etcd.put(members.node_key(self.cfg.cluster, self.cfg.name), me.encode(),
                            self.lease.id)

    # --- following ----------------------------------------------------------------------

    async def _follow(self, leader: Leader, view: View) -> None:
        """Serve as a secondary of *leader* until it leads no more."""
        names = self._names(view) | {leader.node}
        if self.child is None or self.child.role != "secondary" or not self.child.alive \
                or (self.cfg.tls is not None and leader.node not in self.child.accepts):
            await self._start_secondary(names)
        log.info("following %s (generation %d at %s)", leader.node, leader.generation,
                 leader.address)
        notify("READY=1", f"STATUS=secondary of {leader.node}, standby view at "
               f"{self.cfg.mount}")
        while True:
            await self._publish("secondary", primary=leader.node)
            await election.wait_change(self.etcd, self.cfg.cluster, view.revision,
                                       PUBLISH_SECONDS)
            view = await members.read(self.etcd, self.cfg.cluster)
            now = view.leader
            if now is None or (now.node, now.generation) != (leader.node, leader.generation):
                log.info("the primary %s is gone%s", leader.node,
                         f"; {now.node} leads now" if now else ": electing another")
                return
            assert self.child is not None
            if not self.child.alive:
                log.warning("the secondary daemon exited; starting it again")
                await self._start_secondary(names)

    def _names(self, view: View) -> set[str]:
        """The nodes whose certificates this node accepts: every one it knows of."""
        return (set(self.cfg.peers) | set(view.registered) | set(view.members)) \
            - {self.cfg.name}

    async def _start_secondary(self, names: set[str]) -> None:
        await self._drop_child()
        args = ["secondary", str(self.cfg.data), "--listen", self.cfg.listen,
                "--mount", str(self.cfg.mount), *self._link_args()]
        if self.cfg.tls is not None:
            for name in sorted(names) or [self.cfg.name]:
                args += ["--peer", name]
        if await trio.to_thread.run_sync(journal_written, self.state / "journal"):
            args.append("--rejoin")  # this node's tree has changes of its own as a primary
        self.child = Child("secondary", args, control.socket_path(self.cfg.data),
                           accepts=frozenset(names))
        await self.child.start()

    def _link_args(self) -> list[str]:
        if self.cfg.tls is not None:
            return ["--tls", str(self.cfg.tls)]
        return ["--insecure"] if self.cfg.insecure else []

    # --- leading ------------------------------------------------------------------------

    async def _lead(self, leader: Leader, view: View) -> None:
        """Serve as the primary until the lease is lost (LeaseLost) or the key is gone."""
        assert self.lease is not None
        if self.child is None or self.child.role != "primary" or not self.child.alive \
                or self.child.generation != leader.generation:
            await self._drop_child()
            try:
                await self._claim(leader.generation)
                await self._start_primary(view, leader.generation)
            except (ReplfsError, OSError) as exc:
                log.error("cannot serve as the primary: %s; letting another node lead", exc)
                await self.etcd.revoke(self.lease.id)
                raise LeaseLost("gave the lease up") from exc
        added = {a for name, a in view.registered.items() if name != self.cfg.name}
        log.info("leading as the primary of generation %d; replicating to %s",
                 leader.generation, ", ".join(sorted(added)) or "no one yet")
        notify("READY=1", f"STATUS=primary of generation {leader.generation}, serving "
               f"{self.cfg.mount}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fencer)
            while True:
                await self._publish("primary")
                await election.wait_change(self.etcd, self.cfg.cluster, view.revision,
                                           PUBLISH_SECONDS)
                view = await members.read(self.etcd, self.cfg.cluster)
                if view.leader is None or view.leader.lease != self.lease.id:
                    log.warning("the primary key is no longer this node's; stepping down")
                    await self._drop_child(kill=True)
                    nursery.cancel_scope.cancel()
                    return
                assert self.child is not None
                if not self.child.alive:
                    log.warning("the primary daemon exited; starting it again")
                    await self._start_primary(view, leader.generation)
                    added.clear()
                for name, address in view.registered.items():
                    if name != self.cfg.name and address not in added:
                        peer = {"peer": name} if self.cfg.tls is not None else {}
                        try:
                            reply = await self.child.ask("add_secondary", address=address,
                                                         **peer)
                        except (OSError, ValueError, trio.TooSlowError,
                                trio.BrokenResourceError) as exc:
                            log.warning("could not add %s: %r", name, exc)
                            continue  # the next round tries again
                        if "error" in reply:
                            log.warning("%s", reply["error"])
                        added.add(address)

    def _on_renew(self) -> None:
        self._renewed.set()

    async def _fencer(self) -> None:
        """At each renewal, tell the primary how long it may write (repl/cluster/lease.py)."""
        assert self.lease is not None
        while True:
            await self._renewed.wait()
            self._renewed = trio.Event()
            if self.child is not None and self.child.role == "primary" and self.child.alive:
                try:
                    await self._tell_fence()
                except (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError
                        ) as exc:
                    log.warning("could not extend the primary's fence: %r (it fences "
                                "itself when the last one passes)", exc)

    async def _claim(self, generation: int) -> None:
        """Make the data this node's, as the primary of *generation*."""
        journal_dir, staging_dir = self.state / "journal", self.state / "staging"
        if await trio.to_thread.run_sync(journal_written, self.state / "journal"):
            journal = Journal(journal_dir)
            try:
                journal.lead(generation, await self._cluster_id(journal.identity.cluster))
            finally:
                journal.close()
            log.info("leading again from its own journal, as generation %d", generation)
        elif (staging_dir / "data.mdb").exists():
            if journal_exists(journal_dir):  # only sets kept from a promotion before: stale
                shutil.rmtree(journal_dir)
            standing = read_standing(staging_dir)
            cluster = await self._cluster_id(standing.cluster if standing else None)
            done = await promote(self.cfg.data, staging_dir, journal_dir, generation, cluster)
            log.info("promoted to generation %d at set %d (%d sets applied%s)", generation,
                     done.applied_to, done.applied_to - done.applied_from,
                     f", incomplete sets {done.dropped} dropped" if done.dropped else "")
        else:
            journal = Journal(journal_dir)
            try:
                journal.lead(generation, await self._cluster_id(journal.identity.cluster))
                if not any(os.scandir(self.cfg.data)):
                    journal.base = 0  # an empty tree: new secondaries follow from set 1
            finally:
                journal.close()
            log.info("a new cluster: %s is its first primary", self.cfg.data)

    async def _cluster_id(self, mine: str | None) -> str:
        """The replfs cluster id of this cluster's stores, as etcd keeps it: the first
        primary's (*mine*, or a new one, if none is kept yet)."""
        key = members.id_key(self.cfg.cluster)
        await self.etcd.txn([Compare(key, "CREATE", 0)],
                            [put_op(key, (mine or secrets.token_hex(8)).encode())])
        kv, _ = await self.etcd.get(key)
        assert kv is not None
        return kv.value.decode()

    async def _start_primary(self, view: View, generation: int) -> None:
        assert self.lease is not None
        await self._drop_child()
        args = ["primary", str(self.cfg.data), str(self.cfg.mount), "--fenced",
                "--set-interval", str(self.cfg.set_interval),
                "--journal-max", str(self.cfg.journal_max), "--fsync", self.cfg.fsync,
                "--fsync-timeout", str(self.cfg.fsync_timeout), *self._link_args()]
        for name, address in sorted(view.registered.items()):
            if name != self.cfg.name:
                args += ["--secondary", address]
                if self.cfg.tls is not None:
                    args += ["--peer", name]
        self.child = Child("primary", args, control.socket_path(self.cfg.mount),
                           generation=generation)
        await self.child.start()
        await self._tell_fence()

    async def _tell_fence(self) -> None:
        """Tell the primary until when it may write, and when the renewal that says so
        was sent (repl/cluster/lease.py)."""
        assert self.child is not None and self.lease is not None
        await self.child.ask("fence", until=self.lease.write_until,
                             renewed=self.lease.renewed_at)

    # --- children ----------------------------------------------------------------------

    async def _drop_child(self, kill: bool = False) -> None:
        """Stop the daemon running (SIGKILL with *kill*), and clear a mount it left."""
        if self.child is not None:
            if kill:
                await self.child.kill()
            else:
                await self.child.stop()
            self.child = None
        await clear_dead_mount(self.cfg.mount)

    async def shutdown(self) -> None:
        """A clean stop: the daemon unmounts, and the lease goes at once (no wait for a
        failover)."""
        await self._drop_child()
        if self.lease is not None and self.lease.id:
            with trio.move_on_after(5):
                try:
                    await self.etcd.revoke(self.lease.id)
                except EtcdError:
                    pass  # it expires by itself


def check(cfg: NodeConfig) -> None:
    """The config can work; else UsageError, with nothing started."""
    check_name(cfg.name)
    check_name(cfg.cluster)
    if not cfg.etcd:
        raise UsageError("give etcd's client URLs: --etcd http://HOST:2379 (or etcd = [...] "
                         "in [node])")
    for url in cfg.etcd:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--etcd {url}: not an etcd client URL (http://HOST:2379, or "
                             "https://)")
    if cfg.tls is None and not cfg.insecure:
        raise UsageError("replication links need TLS (--tls DIR/NAME, the node's own "
                         "certificate, named as the node) or --insecure (loopback only)")
    if cfg.tls is not None and cfg.tls.name != cfg.name:
        raise UsageError(f"--tls {cfg.tls}: the node's certificate must carry its name, "
                         f"{cfg.name}")
    if cfg.lease_ttl < 2:
        raise UsageError("--lease-ttl must be at least 2 seconds (etcd's shortest lease)")
    if not cfg.data.is_dir():
        raise UsageError(f"data directory {cfg.data} does not exist or is not a directory")
    if not cfg.mount.is_dir():
        raise UsageError(f"mountpoint {cfg.mount} does not exist or is not a directory")
    check_apart(("the data directory", cfg.data), ("the mountpoint", cfg.mount))


async def run_node(cfg: NodeConfig) -> None:
    await clear_dead_mount(cfg.mount)  # a daemon of this node killed with it left it
    check(cfg)
    etcd = Etcd(cfg.etcd)
    node = Node(cfg, etcd)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            await node.run()
    finally:
        with trio.CancelScope(shield=True):
            await node.shutdown()
            await etcd.aclose()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("got %s, stopping", signal.Signals(signum).name)
            notify("STOPPING=1")
            scope.cancel()
            return
