"""The etcd client, against a real etcd: leases, keys, a compare-and-swap, a watch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from repl.cluster.etcd import Compare, Etcd, EtcdError, put_op
from tests.cluster import etcd_server
from tests.support import free_port


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with etcd_server(tmp_path) as etcd:
        yield etcd.url  # type: ignore[attr-defined]


async def test_etcd_keys_ok(url: str) -> None:
    etcd = Etcd([f"http://127.0.0.1:{free_port()}", url])  # the first one answers nothing
    try:
        assert await etcd.get("/t/a") == (None, 1)
        await etcd.put("/t/a", b"1")
        await etcd.put("/t/b", b'{"x": 2}')
        await etcd.put("/u", b"elsewhere")
        kvs, _ = await etcd.get_prefix("/t/")
        assert [(kv.key, kv.value) for kv in kvs] == [("/t/a", b"1"), ("/t/b", b'{"x": 2}')]
        assert kvs[1].json() == {"x": 2} and kvs[0].json() == {}
        await etcd.delete("/t/a")
        assert (await etcd.get("/t/a"))[0] is None
    finally:
        await etcd.aclose()


async def test_etcd_txn_ok_only_one_takes_a_key(url: str) -> None:
    etcd = Etcd([url])
    try:
        async def take(value: bytes) -> bool:
            return await etcd.txn([Compare("/t/k", "CREATE", 0)], [put_op("/t/k", value)])

        won = [False] * 5

        async def one(i: int) -> None:
            won[i] = await take(b"%d" % i)

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(one, i)
        assert won.count(True) == 1
        kv, _ = await etcd.get("/t/k")
        assert kv is not None and kv.value == b"%d" % won.index(True)
    finally:
        await etcd.aclose()


async def test_etcd_lease_ok_keys_go_with_it(url: str) -> None:
    etcd = Etcd([url])
    try:
        lease = await etcd.grant(5)
        assert await etcd.keepalive(lease) > 0
        revision = await etcd.put("/t/leased", b"x", lease)
        async with aclosing(etcd.watch("/t/", prefix=True, start_revision=revision + 1)
                            ) as changes:
            await etcd.revoke(lease)
            with trio.fail_after(10):
                async for events in changes:
                    assert [(e.deleted, e.kv.key) for e in events] == [(True, "/t/leased")]
                    break
        assert await etcd.keepalive(lease) == 0, "gone"
        assert (await etcd.get("/t/leased"))[0] is None
    finally:
        await etcd.aclose()


async def test_etcd_call_err_nobody_answers() -> None:
    etcd = Etcd([f"http://127.0.0.1:{free_port()}"])
    try:
        with pytest.raises(EtcdError, match="no etcd endpoint answered"):
            await etcd.grant(5)
    finally:
        await etcd.aclose()
