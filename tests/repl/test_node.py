"""``replfs node``: three nodes and a real etcd; the primary killed, another elected, the
old one back as a standby."""

from __future__ import annotations

import errno
import functools
import os
import re
import time
from pathlib import Path

import pytest

from tests.cluster import (
    NAMES,
    TTL,
    Node,
    Partition,
    Watchdog,
    cluster_status,
    etcd_server,
    primary_of,
    standing,
    stop_all,
)
from tests.support import checkpoint, diff, snapshot, until, wait_applied

ELECTED = re.compile(r"elected primary of generation (\d+) \(complete set (\d+); stood: (.*)\)")
PROMOTED = re.compile(r"promoted to generation (\d+) at set (\d+)")


def write_files(mount: Path, prefix: str, count: int) -> dict[str, bytes]:
    files = {f"{prefix}{i}": os.urandom(2000 + 97 * i) for i in range(count)}
    for name, data in files.items():
        (mount / name).write_bytes(data)
    return files


def test_node_failover_ok_kill_primary(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as etcd:
        nodes = [Node(name, tmp_path, [etcd.url], "kill", fsync="remote")  # type: ignore[attr-defined]
                 for name in NAMES]
        try:
            for node in nodes:
                node.start()
            with Watchdog(nodes) as watch:
                old = standing(nodes)
                assert (old.role() or {}).get("fsync") == "remote", "the node's --fsync"
                survivors = [n for n in nodes if n is not old]
                kept = write_files(old.mount, "kept", 30)
                set_id = checkpoint(old.mount)  # every secondary applied it
                for node in survivors:
                    assert wait_applied(node.data, set_id) >= set_id
                status = cluster_status(etcd.url, "kill")  # type: ignore[attr-defined]
                assert {m["name"]: m["role"] for m in status["members"]} == {
                    n.name: "primary" if n is old else "secondary" for n in nodes}
                write_files(old.mount, "maybe", 10)  # in flight when it dies: maybe lost

                old.kill()
                killed = time.monotonic()
                new = primary_of(survivors, timeout=TTL + 30)
                (new.mount / "after").write_bytes(b"written on the new primary")
                took = time.monotonic() - killed
                assert took <= TTL + 5, f"a new primary served writes after {took:.1f}s"

                log = new.daemon.log()  # type: ignore[union-attr]
                elected = ELECTED.findall(log)
                promoted = PROMOTED.findall(log)
                assert elected and promoted, log
                at = int(promoted[-1][1])
                stood = dict(s.split() for s in elected[-1][2].split(", "))
                assert at >= max(int(c) for c in stood.values()), \
                    "every set any survivor had complete is in the new primary"
                for name, data in kept.items():
                    assert (new.mount / name).read_bytes() == data
                assert (new.role() or {}).get("fsync") == "remote"

                old.start()  # the old primary comes back: a standby of the new one
                until(old.role, lambda st: st is not None and st["role"] == "standby mount",
                      timeout=60, what="the old primary serving the standby view")
                until(old.replica_status, lambda st: st is not None, timeout=60,
                      what="the old primary's secondary answering")
                set_id = checkpoint(new.mount)
                for node in nodes:
                    if node is not new:
                        assert wait_applied(node.data, set_id) >= set_id
                        assert diff(snapshot(new.data), snapshot(node.data)) == []
            assert watch.violations == [], "never two writable primaries"
            assert [name for _, name in watch.primaries] == [old.name, new.name]
        finally:
            stop_all(nodes)


def test_node_partition_ok_primary_cut_from_etcd(tmp_path: Path) -> None:
    """The primary loses etcd, not its secondaries: it refuses changes before its lease
    can expire, another is elected, and never are two writable; what the secondaries
    had applied is all there; joined again, the old primary follows the new one."""
    with Partition(len(NAMES)) as net, etcd_server(tmp_path, net.host) as etcd:
        url = etcd.urls[-1]  # type: ignore[attr-defined]
        nodes = [Node(name, tmp_path, [url], "cut", host=net.address(i),
                      netns=net.names[i]) for i, name in enumerate(NAMES)]
        try:
            for node in nodes:
                node.start()
            with Watchdog(nodes) as watch:
                old = standing(nodes)
                index = nodes.index(old)
                kept = write_files(old.mount, "kept", 20)
                set_id = checkpoint(old.mount)
                survivors = [n for n in nodes if n is not old]
                for node in survivors:
                    assert wait_applied(node.data, set_id) >= set_id

                net.cut(index, net.host)
                cut = time.monotonic()
                until(old.role, lambda st: st is not None and bool(st["fenced"]),
                      timeout=TTL, what="the primary cut from etcd fenced")
                for name in ("refused", "refused-too"):
                    with pytest.raises(OSError) as refused:
                        (old.mount / name).write_bytes(b"no")
                    assert refused.value.errno == errno.EROFS
                assert old.daemon is not None
                old.daemon.wait_for("refusing changes (EROFS): fenced")
                assert old.daemon.log().count("refusing changes") == 1, "said once"
                new = primary_of(survivors, timeout=TTL + 30)
                serving = until(lambda: watch.first_writable(new.name, after=cut),
                                lambda t: t is not None, timeout=10, what="the checker's view")
                fenced = watch.last_writable(old.name)
                assert serving is not None and fenced < serving, (watch.timeline, cut)
                assert fenced - cut <= TTL / 2 + 0.5, "it fences half a TTL after its renewal"
                for name, data in kept.items():
                    assert (new.mount / name).read_bytes() == data

                net.join(index, net.host)  # back: it follows the new primary
                until(old.role, lambda st: st is not None and st["role"] == "standby mount",
                      timeout=60, what="the old primary a standby again")
                until(old.replica_status, lambda st: st is not None, timeout=60,
                      what="the old primary's secondary answering")
                set_id = checkpoint(new.mount)
                assert wait_applied(old.data, set_id) >= set_id
                assert diff(snapshot(new.data), snapshot(old.data)) == []
            assert watch.violations == [], "never two writable primaries"
        finally:
            stop_all(nodes)


KILLS = 20


@pytest.mark.slow
def test_node_failover_ok_many_kills(tmp_path: Path) -> None:
    """KILLS times: the primary killed (-9) while a writer goes on, another elected, the
    killed one back; every failover within TTL + 5 s, every checkpointed file kept.
    Prints the failover times (kill to the first write served)."""
    with etcd_server(tmp_path) as etcd:
        nodes = [Node(name, tmp_path, [etcd.url], "many") for name in NAMES]  # type: ignore[attr-defined]
        took: list[float] = []
        kept: dict[str, bytes] = {}
        try:
            for node in nodes:
                node.start()
            with Watchdog(nodes) as watch:
                for round_ in range(KILLS):
                    old = standing(nodes)
                    kept |= write_files(old.mount, f"r{round_}-", 5)
                    checkpoint(old.mount)
                    write_files(old.mount, f"lost{round_}-", 3)  # maybe not replicated
                    old.kill()
                    killed = time.monotonic()
                    new = primary_of([n for n in nodes if n is not old], timeout=TTL + 30)
                    (new.mount / f"after{round_}").write_bytes(b"x")
                    took.append(time.monotonic() - killed)
                    for name, data in kept.items():
                        assert (new.mount / name).read_bytes() == data, name
                    old.start()
            assert watch.violations == []
        finally:
            stop_all(nodes)
    took.sort()
    print(f"\nfailover (kill -9 to a write served), {len(took)} kills, TTL {TTL:g}s: "
          f"p50 {took[len(took) // 2]:.2f}s, max {took[-1]:.2f}s, min {took[0]:.2f}s; "
          f"all: {', '.join(f'{t:.2f}' for t in took)}")
    assert took[-1] <= TTL + 5


@pytest.mark.slow
def test_node_partition_ok_every_case(tmp_path: Path) -> None:
    """A secondary isolated, etcd cut from every node, the primary isolated from all:
    never two writable primaries, nothing checkpointed lost, all converge after."""
    with Partition(len(NAMES)) as net, etcd_server(tmp_path, net.host) as etcd:
        url = etcd.urls[-1]  # type: ignore[attr-defined]
        nodes = [Node(name, tmp_path, [url], "every", host=net.address(i),
                      netns=net.names[i]) for i, name in enumerate(NAMES)]
        kept: dict[str, bytes] = {}

        def differs(primary: Node, node: Node) -> list[str]:
            """How *node*'s replica differs from the primary's tree once it applied a set
            closed now. Another node's rejoin may still send a set of what diverged,
            which every replica applies, so an applier may be at work on it."""
            try:
                set_id = checkpoint(primary.mount)
                assert wait_applied(node.data, set_id) >= set_id
                return diff(snapshot(primary.data), snapshot(node.data))
            except OSError as exc:  # a name the applier replaces as it is read, or a
                return [str(exc)]  # node back from a cut that restarts its daemon

        def converged() -> Node:
            primary = standing(nodes, timeout=90)
            for node in nodes:
                if node is not primary:
                    until(functools.partial(differs, primary, node), lambda found: found == [],
                          timeout=60, what=f"{node.name}'s replica the primary's tree")
            for name, data in kept.items():
                assert (primary.mount / name).read_bytes() == data, name
            return primary

        try:
            for node in nodes:
                node.start()
            with Watchdog(nodes) as watch:
                primary = standing(nodes)
                kept |= write_files(primary.mount, "a", 10)
                checkpoint(primary.mount)

                # 1. a secondary isolated: the primary goes on writing.
                lone = next(i for i, n in enumerate(nodes) if n is not primary)
                net.isolate(lone)
                kept |= write_files(primary.mount, "b", 10)
                checkpoint(primary.mount)
                assert primary_of(nodes) is primary
                net.reconnect(lone)
                primary = converged()

                # 2. etcd cut from every node: nobody may write; then one leads again.
                for i in range(len(nodes)):
                    net.cut(i, net.host)
                until(lambda: [n.writable() for n in nodes], lambda w: not any(w),
                      timeout=TTL, what="no writable primary without etcd")
                for i in range(len(nodes)):
                    net.join(i, net.host)
                primary = converged()
                kept |= write_files(primary.mount, "c", 10)
                checkpoint(primary.mount)

                # 3. the primary isolated from everyone: another one leads.
                index = nodes.index(primary)
                net.isolate(index)
                new = primary_of([n for n in nodes if n is not primary], timeout=TTL + 30)
                kept |= write_files(new.mount, "d", 10)
                net.reconnect(index)
                converged()
            assert watch.violations == [], "never two writable primaries"
            print(f"\npartitions: {watch.samples} samples of every node's role, "
                  f"primaries in turn: {[name for _, name in watch.primaries]}")
        finally:
            stop_all(nodes)

