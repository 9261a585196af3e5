"""Electing a cluster's primary through etcd, never two at once.

When the ``primary`` key is absent (the primary's lease expired, or the
cluster is new), every live node stands: it writes in its own node key what
it holds (the generation of its data, its last complete set, whether it can
be promoted at all) and the round it stands in (the generation it would
replace). Once every live node stood, or its patience ran out, each one
ranks those that stood the same way (repl/cluster/members.py ``Member.rank``: the
newest lineage, then the most sets complete, then the smallest name), and
only the first tries to take the key, with one etcd transaction:

    if primary.create_revision == 0 and generation.mod_revision == <as read>:
        put primary = {node, generation + 1, address} bound to its lease
        put generation = generation + 1

Two nodes can never both succeed: the first one's put makes the second one's
compare fail, and a round's generation can be taken once. The others wait
for the key to appear; if it does not within ELECTION_SECONDS (the winner
died meanwhile), they stand again.

A node whose lease expires loses its node key with it, and stands no more;
a node that cannot be promoted (a replica that never finished a sync, a new
node in a cluster that already has data) stands but is never ranked first.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing

import trio

from repl.cluster import members
from repl.cluster.etcd import Compare, Etcd, put_op
from repl.cluster.members import Leader, Member, View

log = logging.getLogger("replfs.election")

# How long the nodes wait for each other to stand, and then for the winner's key: the
# time a node takes to read its stores and write its key, with a wide margin.
ELECTION_SECONDS = 2.0


async def wait_change(etcd: Etcd, cluster: str, revision: int, seconds: float) -> None:
    """Return once a key of *cluster* changed after *revision*, or after *seconds*."""
    with trio.move_on_after(seconds):
        async with aclosing(etcd.watch(members.root(cluster), prefix=True,
                                       start_revision=revision + 1)) as changes:
            async for _ in changes:
                return


async def campaign(etcd: Etcd, cluster: str, lease: int, standing: Callable[[], Awaitable[Member]],
                   patience: float = ELECTION_SECONDS) -> View:
    """Stand until some node leads; returns the view in which one does (maybe this one).

    *standing* says what this node holds now (read afresh for each round). A live node
    that has not stood is waited for *patience* seconds: give the lease's TTL, so that
    only a node whose lease could have run out meanwhile is left out. One left out
    that held more sets than the winner loses them, and a checkpoint may have counted
    them (it waits for the secondaries connected).
    """
    while True:
        view = await members.read(etcd, cluster)
        if view.leader is not None:
            return view
        me = await standing()
        me.round, me.role = view.generation, "candidate"
        await etcd.put(members.node_key(cluster, me.name), me.encode(), lease)
        view = await _gather(etcd, cluster, view.generation, patience)
        if view.leader is not None or view.generation != me.round:
            continue
        stood = [m for m in view.members.values() if m.round == me.round and m.eligible]
        if not stood:
            log.warning("no node that stood can be promoted (none holds a consistent set); "
                        "waiting for one that can")
            await wait_change(etcd, cluster, view.revision, ELECTION_SECONDS)
            continue
        best = min(stood, key=Member.rank)
        if best.name == me.name:
            if await _take(etcd, cluster, lease, me, view, stood):
                return await members.read(etcd, cluster)
            continue
        log.info("election of generation %d: %s leads (complete set %d, generation %d); "
                 "waiting for it", view.generation + 1, best.name, best.complete,
                 best.generation)
        await _await_leader(etcd, cluster, view.revision)


async def _gather(etcd: Etcd, cluster: str, round_: int, patience: float) -> View:
    """Wait until every live node stood in *round_* (or a leader appeared, or the round
    moved on, or *patience* seconds passed); returns the view then.

    While none that stood holds data of the last generation granted (*round_*), the
    registered nodes not live yet are waited for too: after an outage of etcd itself
    every lease ran out, and the first node back may hold an older lineage than
    those of the last generation, which would lose what they had."""
    deadline = trio.current_time() + patience
    while True:
        view = await members.read(etcd, cluster)
        if view.leader is not None or view.generation != round_:
            return view
        waiting = [m.name for m in view.members.values() if m.round != round_]
        if not any(m.round == round_ and m.eligible and m.generation >= round_
                   for m in view.members.values()):
            waiting += [name for name in view.registered if name not in view.members]
        if not waiting:
            return view
        left = deadline - trio.current_time()
        if left <= 0:
            log.warning("election of generation %d goes on without %s (not standing after "
                        "%gs)", round_ + 1, ", ".join(sorted(waiting)), patience)
            return view
        await wait_change(etcd, cluster, view.revision, left)


async def _take(etcd: Etcd, cluster: str, lease: int, me: Member, view: View,
                stood: list[Member]) -> bool:
    """Try to take the primary key for the next generation; True if this node did."""
    generation = max(view.generation, *(m.generation for m in stood)) + 1
    won = await etcd.txn(
        [Compare(members.primary_key(cluster), "CREATE", 0),
         Compare(members.generation_key(cluster), "MOD", view.generation_revision)],
        [put_op(members.primary_key(cluster), Leader(me.name, generation, me.address).encode(),
                lease),
         put_op(members.generation_key(cluster), str(generation).encode())])
    if won:
        log.info("elected primary of generation %d (complete set %d; stood: %s)", generation,
                 me.complete, ", ".join(f"{m.name} {m.complete}" for m in sorted(stood,
                                                                                 key=Member.rank)))
    else:
        log.info("another node took the primary key first")
    return won


async def _await_leader(etcd: Etcd, cluster: str, revision: int) -> None:
    """Wait up to ELECTION_SECONDS for a leader to appear."""
    deadline = trio.current_time() + ELECTION_SECONDS
    while trio.current_time() < deadline:
        view = await members.read(etcd, cluster)
        if view.leader is not None:
            return
        await wait_change(etcd, cluster, max(revision, view.revision),
                          deadline - trio.current_time())
