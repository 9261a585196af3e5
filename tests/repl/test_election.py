"""Elections against a real etcd: the most advanced node takes the key, once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from repl import election, members
from repl.etcd import Etcd
from repl.members import Member, View
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
