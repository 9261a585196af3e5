"""Elections against a real etcd: the most advanced node takes the key, once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from repl.cluster import election, members
from repl.cluster.etcd import Etcd
from repl.cluster.members import Member, View
from tests.cluster import etcd_server


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with etcd_server(tmp_path) as etcd:
        yield etcd.url  # type: ignore[attr-defined]


async def run(url: str, stand: list[Member]) -> tuple[list[View], dict[str, int]]:
    """Every member of *stand* campaigns at once, each with its own lease; returns
    what each saw at the end, and the leases."""
    etcd = Etcd([url])
    leases = {m.name: await etcd.grant(30) for m in stand}
    for me in stand:  # registered, as a running node is before any election
        await etcd.put(members.node_key("t", me.name), me.encode(), leases[me.name])
    views: list[View] = []

    async def candidate(me: Member) -> None:
        async def standing() -> Member:
            return Member(me.name, me.address, generation=me.generation,
                          complete=me.complete, eligible=me.eligible)

        views.append(await election.campaign(etcd, "t", leases[me.name], standing))

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for me in stand:
                    nursery.start_soon(candidate, me)
    finally:
        await etcd.aclose()
    return views, leases


async def stand(views: list[View], etcd: Etcd, lease: int,
                standing: Callable[[], Awaitable[Member]]) -> None:
    """Campaign in cluster "t" with a patience of 10 s (a lease's TTL); the view it ends
    with goes to *views*."""
    views.append(await election.campaign(etcd, "t", lease, standing, patience=10.0))


async def test_campaign_ok_most_complete_wins_once(url: str) -> None:
    stand = [Member("a", "h:1", generation=3, complete=10),
             Member("b", "h:2", generation=3, complete=12),
             Member("c", "h:3", generation=3, complete=12),
             Member("d", "h:4", generation=2, complete=40),  # an older lineage
             Member("e", "h:5", generation=3, complete=99, eligible=False)]  # no whole set
    views, leases = await run(url, stand)
    leaders = {(v.leader.node, v.leader.generation) for v in views if v.leader}
    assert leaders == {("b", 4)}, "ties go to the smallest name; one generation past all"
    assert all(v.leader and v.leader.lease == leases["b"] for v in views)


async def test_campaign_ok_next_round_after_the_leader_goes(url: str) -> None:
    views, leases = await run(url, [Member("a", "h:1", generation=1, complete=5)])
    assert views[0].leader is not None and views[0].leader.generation == 2
    etcd = Etcd([url])
    try:
        await etcd.revoke(leases["a"])  # the leader's lease ends: its key goes
        assert (await members.read(etcd, "t")).leader is None
    finally:
        await etcd.aclose()
    views, _ = await run(url, [Member("b", "h:2", generation=1, complete=5)])
    assert views[0].leader is not None
    assert (views[0].leader.node, views[0].leader.generation) == ("b", 3)


async def test_campaign_ok_waits_for_a_live_node_slow_to_stand(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live node that stands late (its stores slow to read) is waited for up to the
    patience given (the lease's TTL), not left out: it may hold sets a checkpoint
    counted, which the winner must have."""
    monkeypatch.setattr(election, "ELECTION_SECONDS", 0.2)
    etcd = Etcd([url])
    try:
        leases = {name: await etcd.grant(30) for name in "ab"}
        for name in "ab":
            await etcd.put(members.node_key("t", name), Member(name, "h").encode(),
                           leases[name])

        async def quick() -> Member:
            return Member("a", "h:1", generation=1, complete=5)

        async def slow() -> Member:
            await trio.sleep(1.0)  # five times the time an election used to wait
            return Member("b", "h:2", generation=1, complete=9)

        views: list[View] = []

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stand, views, etcd, leases["a"], quick)
                nursery.start_soon(stand, views, etcd, leases["b"], slow)
    finally:
        await etcd.aclose()
    assert {v.leader.node for v in views if v.leader} == {"b"}, "the most complete wins"


async def test_campaign_ok_waits_for_registered_nodes_of_the_last_generation(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After an outage of etcd every lease ran out: the first node back holds data of
    generation 1 while generation 2 was granted since. It waits (up to the patience
    given) for the registered nodes not live yet, and the one of generation 2, back a
    moment later, wins: the first would have lost that generation's sets."""
    monkeypatch.setattr(election, "ELECTION_SECONDS", 0.2)
    etcd = Etcd([url])
    try:
        await etcd.put(members.generation_key("t"), b"2")
        for name in "ab":
            await etcd.put(members.member_key("t", name), b'{"address": "h"}')
        leases = {name: await etcd.grant(30) for name in "ab"}
        await etcd.put(members.node_key("t", "a"), Member("a", "h").encode(), leases["a"])

        async def stale() -> Member:
            return Member("a", "h:1", generation=1, complete=300)

        async def newest() -> Member:
            return Member("b", "h:2", generation=2, complete=264)

        views: list[View] = []

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stand, views, etcd, leases["a"], stale)
                await trio.sleep(1.0)  # b's node is back a second later
                await etcd.put(members.node_key("t", "b"), Member("b", "h").encode(),
                               leases["b"])
                nursery.start_soon(stand, views, etcd, leases["b"], newest)
    finally:
        await etcd.aclose()
    assert {(v.leader.node, v.leader.generation) for v in views if v.leader} == {("b", 3)}
