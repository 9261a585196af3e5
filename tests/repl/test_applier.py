"""The applier's batches: several complete sets under one sync, cut by a crash anywhere.

A crash (here: an exception at a fault point, with the staging store and the
replica left as they are, as after a kill) may fall between any two syscalls
of a batch. After a restart the replica must reach exactly the state at the
close of the last set, every op done once.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
import trio
import trio.testing

import repl.secondary.applier as applier_module
from repl.apply import OPEN_FILES, apply
from repl.diverge import Divergence
from repl.faults import ENV_BOOT_ID
from repl.secondary.applier import Applier
from repl.tree import Tree
from store.hold import ApplyLock, interrupted, mark_applying, set_hold, torn
from store.records import Op, Record
from store.staging import Staging
from tests.powercut.harness import simulator
from tests.repl.peers import acknowledged, open_raw, record_frame
from tests.support import diff, read_staging, secondary, snapshot, status, wait_applied

T = 1_700_000_000_000_000_000


def data_sets() -> list[list[Record]]:
    """Four sets whose replay goes wrong if any namespace op runs twice or not at all."""
    ops: list[list[tuple[Op, dict[str, object]]]] = [
        [(Op.MKDIR, {"path": b"d", "mode": 0o40755, "uid": 0, "gid": 0}),
         (Op.CREATE, {"path": b"d/a", "mode": 0o100644, "uid": 0, "gid": 0}),
         (Op.WRITE, {"path": b"d/a", "offset": 0, "data": b"one" * 100})],
        [(Op.WRITE, {"path": b"d/a", "offset": 3, "data": b"TWO"}),
         (Op.LINK, {"path": b"d/a", "path2": b"b"}),
         (Op.RENAME, {"path": b"d/a", "path2": b"c", "flags": 0}),
         (Op.WRITE, {"path": b"c", "offset": 0, "data": b"three"})],
        [(Op.TRUNCATE, {"path": b"b", "size": 7}),
         (Op.CHMOD, {"path": b"b", "mode": 0o600})],
        [(Op.UNLINK, {"path": b"c"}),
         (Op.CREATE, {"path": b"c", "mode": 0o100640, "uid": 0, "gid": 0}),
         (Op.RENAME, {"path": b"b", "path2": b"d/b", "flags": 0}),
         (Op.UTIMES, {"path": b"d/b", "atime_ns": T, "mtime_ns": T}),
         (Op.UTIMES, {"path": b"d", "atime_ns": T, "mtime_ns": T}),
         (Op.UTIMES, {"path": b"c", "atime_ns": T, "mtime_ns": T}),
         (Op.UTIMES, {"path": b"", "atime_ns": T, "mtime_ns": T})],
    ]
    return numbered(ops)


def sync_sets() -> list[list[Record]]:
    """The sets of data_sets(), but the third starts over from a RESET, as an initial
    sync does: the rest of that set commits no marker, and a crash in it must redo
    it from the RESET."""
    ops: list[list[tuple[Op, dict[str, object]]]] = [
        [(Op.RESET, {}),
         (Op.MKDIR, {"path": b"x", "mode": 0o40755, "uid": 0, "gid": 0}),
         (Op.FILE, {"path": b"x/f", "mode": 0o104755, "uid": 1, "gid": 2, "atime_ns": T,
                    "mtime_ns": T, "data": b"small" * 9}),
         (Op.FILE, {"path": b"g", "mode": 0o100600, "uid": 0, "gid": 0, "atime_ns": T,
                    "mtime_ns": T, "data": b""}),
         (Op.LINK, {"path": b"g", "path2": b"x/h"}),
         (Op.CREATE, {"path": b"big", "mode": 0o100644, "uid": 0, "gid": 0}),
         (Op.WRITE, {"path": b"big", "offset": 0, "data": b"B" * 5000}),
         (Op.RENAME, {"path": b"x/f", "path2": b"y", "flags": 0}),
         (Op.WRITE, {"path": b"y", "offset": 2, "data": b"ALL"}),
         (Op.UTIMES, {"path": b"big", "atime_ns": T, "mtime_ns": T}),
         (Op.UTIMES, {"path": b"y", "atime_ns": T, "mtime_ns": T}),
         (Op.UTIMES, {"path": b"x", "atime_ns": T, "mtime_ns": T}),
         (Op.UTIMES, {"path": b"", "atime_ns": T, "mtime_ns": T})],
        [(Op.UNLINK, {"path": b"g"}),
         (Op.FILE, {"path": b"g", "mode": 0o100640, "uid": 0, "gid": 0, "atime_ns": T,
                    "mtime_ns": T, "data": b"again"}),
         (Op.RENAME, {"path": b"y", "path2": b"x/y", "flags": 0}),
         (Op.UTIMES, {"path": b"x/y", "atime_ns": T, "mtime_ns": T}),
         (Op.UTIMES, {"path": b"x", "atime_ns": T, "mtime_ns": T}),
         (Op.UTIMES, {"path": b"", "atime_ns": T, "mtime_ns": T})],
    ]
    first = data_sets()[:2]
    return first + numbered(ops, start=len(first) + 1)


def reused_path_sets() -> list[list[Record]]:
    """Paths written, then made to name another file (removed and made again, their
    directory renamed and made again) and written again in the same set; and more
    files written in one set than the applier keeps open, each twice."""
    mode = {"mode": 0o100644, "uid": 0, "gid": 0}
    many = [b"m%03d" % i for i in range(OPEN_FILES + 6)]

    def times(*paths: bytes) -> list[tuple[Op, dict[str, object]]]:
        return [(Op.UTIMES, {"path": path, "atime_ns": T, "mtime_ns": T}) for path in paths]

    return numbered([
        [(Op.MKDIR, {"path": b"d", "mode": 0o40755, "uid": 0, "gid": 0}),
         (Op.CREATE, {"path": b"d/a", **mode}),
         (Op.WRITE, {"path": b"d/a", "offset": 0, "data": b"first"}),
         (Op.UNLINK, {"path": b"d/a"}),
         (Op.CREATE, {"path": b"d/a", **mode}),
         (Op.WRITE, {"path": b"d/a", "offset": 0, "data": b"second"}),
         (Op.RENAME, {"path": b"d", "path2": b"e", "flags": 0}),
         (Op.MKDIR, {"path": b"d", "mode": 0o40755, "uid": 0, "gid": 0}),
         (Op.CREATE, {"path": b"d/a", **mode}),
         (Op.WRITE, {"path": b"d/a", "offset": 0, "data": b"third"}),
         (Op.TRUNCATE, {"path": b"e/a", "size": 3}),
         *times(b"d/a", b"e/a", b"d", b"e", b"")],
        [*[(Op.CREATE, {"path": path, **mode}) for path in many],
         *[(Op.WRITE, {"path": path, "offset": 0, "data": path}) for path in many],
         *[(Op.WRITE, {"path": path, "offset": 4, "data": b"!"}) for path in many],
         *times(*many, b"")]])


def numbered(ops: list[list[tuple[Op, dict[str, object]]]],
             start: int = 1) -> list[list[Record]]:
    """Each list of ops as a set of records, from set *start* on, each ending in SYNC."""
    sets = []
    for set_id, set_ops in enumerate(ops, start=start):
        records = [Record(op, set_id, seq, **fields)  # type: ignore[arg-type]
                   for seq, (op, fields) in enumerate(set_ops)]
        sets.append([*records, Record(Op.SYNC, set_id, len(records), count=len(records))])
    return sets


def expected(tmp_path: Path, sets: list[list[Record]]) -> dict[str, object]:
    """The tree at the close of the last set, applied one record at a time."""
    root = tmp_path / "expected"
    root.mkdir(parents=True)
    with closing(Tree(root)) as tree:
        for record in [r for records in sets for r in records if r.op != Op.SYNC]:
            apply(tree, record)
    return snapshot(root)


class Crash(Exception):
    pass


def apply_all(staging: Staging, replica: Path, crash_at: int | None) -> int:
    """Apply every complete set as the daemon does, crashing at step *crash_at*."""
    applier = Applier(staging, replica)
    tree = Tree(replica)
    steps = 0

    def step(set_id: int, seq: int) -> None:
        nonlocal steps
        steps += 1
        if steps == crash_at:
            raise Crash

    applier.faults.step = step  # type: ignore[method-assign]
    try:
        while (last := staging.applicable_through()) > staging.applied:
            applier.apply_sets(tree, staging.applied + 1, last)
    finally:
        tree.close()
        applier.lock.close()
    return steps


def fresh(run: Path, sets: list[list[Record]]) -> tuple[Path, Staging]:
    """An empty replica and a staging store holding every set, complete."""
    replica = run / "replica"
    replica.mkdir(parents=True)
    staging = Staging(run / "staging")
    staging.stage([r for records in sets for r in records])
    return replica, staging


def test_batch_writes_through_open_files_to_what_each_path_names_then(
        tmp_path: Path) -> None:
    sets = reused_path_sets()
    replica, staging = fresh(tmp_path / "run", sets)
    with closing(staging):
        fds = len(os.listdir("/proc/self/fd"))
        apply_all(staging, replica, None)
        assert len(os.listdir("/proc/self/fd")) == fds, "no file left open"
        assert staging.applied == len(sets)
    assert (replica / "d/a").read_bytes() == b"third"
    assert (replica / "e/a").read_bytes() == b"sec"
    assert (replica / "m069").read_bytes() == b"m069!"
    assert not diff(snapshot(replica), expected(tmp_path, sets))


def test_batch_new_files_opened_once_with_exact_owner_mode_and_times(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file a set creates is written, owned, moded and timed through the fd its
    CREATE made: one open a file, and set-id bits kept (chmod after chown)."""
    paths = [b"n%02d" % i for i in range(10)]
    sets = numbered([[
        *[(Op.CREATE, {"path": p, "mode": 0o106750, "uid": 1234, "gid": 567}) for p in paths],
        *[(Op.WRITE, {"path": p, "offset": 0, "data": p * 100}) for p in paths],
        *[(Op.UTIMES, {"path": p, "atime_ns": T, "mtime_ns": T + 1}) for p in paths],
        (Op.UTIMES, {"path": b"", "atime_ns": T, "mtime_ns": T})]])
    opens: list[object] = []
    real_open = os.open

    def counting_open(path: object, *args: object, **kwargs: object) -> int:
        opens.append(path)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    replica, staging = fresh(tmp_path / "run", sets)
    monkeypatch.setattr(os, "open", counting_open)
    with closing(staging):
        apply_all(staging, replica, None)
    monkeypatch.undo()
    assert sorted(p for p in opens if p in paths) == paths  # type: ignore[type-var]
    for p in paths:
        st = os.stat(replica / p.decode())
        assert (st.st_mode, st.st_uid, st.st_gid) == (0o106750 | 0o100000, 1234, 567)
        assert (st.st_atime_ns, st.st_mtime_ns) == (T, T + 1)
        assert (replica / p.decode()).read_bytes() == p * 100
    assert not diff(snapshot(replica), expected(tmp_path, sets))


@pytest.mark.parametrize("make", [data_sets, sync_sets, reused_path_sets],
                         ids=["sets", "reset", "reused"])
def test_batch_cut_at_every_step_reaches_the_last_set(
        tmp_path: Path, make: Callable[[], list[list[Record]]]) -> None:
    sets = make()
    want = expected(tmp_path, sets)
    replica, staging = fresh(tmp_path / "clean", sets)
    with closing(staging):
        steps = apply_all(staging, replica, None)
    assert steps > 20, "every set and op is stepped through"
    for crash_at in range(1, steps + 1):
        run = tmp_path / f"run{crash_at}"
        replica, staging = fresh(run, sets)
        with closing(staging):  # the daemon is gone; what it committed stays
            with pytest.raises(Crash):
                apply_all(staging, replica, crash_at)
            assert interrupted(staging.path) is not None, "a cut batch reads as torn"
        with closing(Staging(run / "staging")) as staging:
            apply_all(staging, replica, None)
            assert staging.applied == len(sets)
        assert not diff(snapshot(replica), want), f"crash at step {crash_at}"


def test_batch_applies_every_waiting_set_with_one_sync(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sets = data_sets()
    syncs: list[int] = []
    monkeypatch.setattr("repl.secondary.footprint.syncfs", lambda fd: syncs.append(fd))
    replica, staging = fresh(tmp_path, sets)
    with closing(staging):
        apply_all(staging, replica, None)
        assert staging.applied == len(sets)
        assert staging.sets() == {}, "applied sets leave staging"
    assert len(syncs) == 1
    assert not diff(snapshot(replica), expected(tmp_path, sets))


def moved_dir_sets() -> list[list[Record]]:
    """A file written in a directory, then the directory renamed: its data is fsynced
    at its new path."""
    return numbered([
        [(Op.MKDIR, {"path": b"d", "mode": 0o40755, "uid": 0, "gid": 0}),
         (Op.CREATE, {"path": b"d/a", "mode": 0o100644, "uid": 0, "gid": 0}),
         (Op.WRITE, {"path": b"d/a", "offset": 0, "data": b"one" * 100})],
        [(Op.WRITE, {"path": b"d/a", "offset": 0, "data": b"TWO"}),
         (Op.UTIMES, {"path": b"d/a", "atime_ns": T, "mtime_ns": T}),
         (Op.RENAME, {"path": b"d", "path2": b"e", "flags": 0}),
         (Op.UTIMES, {"path": b"e", "atime_ns": T, "mtime_ns": T}),
         (Op.UTIMES, {"path": b"", "atime_ns": T, "mtime_ns": T})]])


@pytest.mark.parametrize("make", [data_sets, sync_sets, moved_dir_sets],
                         ids=["sets", "reset", "moved-dir"])
def test_batch_on_a_fuse_replica_is_kept_by_a_power_cut(
        tmp_path: Path, make: Callable[[], list[list[Record]]]) -> None:
    """A replica (and its staging) on a FUSE filesystem, the power-cut simulator's: a
    syncfs never reaches its daemon, so what the apply log says is applied must have
    been fsynced node by node to be there after the power goes."""
    sets = make()
    with simulator(tmp_path / "lower", tmp_path / "disk") as sim:
        replica, staging = fresh(sim.mountpoint, sets)
        with closing(staging):
            apply_all(staging, replica, None)
        sim.power_cut(keep=0.0)
        sim.start()
        with closing(Staging(sim.mountpoint / "staging")) as staging:
            assert staging.applied == len(sets)
        assert not diff(snapshot(replica), expected(tmp_path, sets))


async def test_applier_run_ok_finishes_a_cut_batch_while_held(tmp_path: Path) -> None:
    """A hold stops new sets, never the redo of a batch a crash cut short."""
    sets = data_sets()
    later = [Record(Op.WRITE, 5, 0, path=b"c", offset=0, data=b"later"),
             Record(Op.SYNC, 5, 1, count=1)]
    replica, staging = fresh(tmp_path / "run", sets)
    with closing(staging):
        with pytest.raises(Crash):
            apply_all(staging, replica, 12)  # in the second set of a four-set batch
        assert interrupted(staging.path) == (1, 4)
    with closing(Staging(tmp_path / "run" / "staging")) as staging:
        set_hold(staging.path, True)
        staging.stage(later)
        applier = Applier(staging, replica)
        async with trio.open_nursery() as nursery:
            await nursery.start(applier.run)
            with trio.fail_after(10):
                await applier.wait_applied(4)
            nursery.cancel_scope.cancel()
        assert staging.applied == 4, "held: the batch is finished, the next set waits"
        assert interrupted(staging.path) is None
    assert not diff(snapshot(replica), expected(tmp_path, sets))


def writes(count: int) -> list[list[Record]]:
    """*count* sets, each one write of a file the first set makes, and the times."""
    times: list[tuple[Op, dict[str, object]]] = [
        (Op.UTIMES, {"path": path, "atime_ns": T, "mtime_ns": T}) for path in (b"f", b"")]
    ops: list[list[tuple[Op, dict[str, object]]]] = [
        [(Op.CREATE, {"path": b"f", "mode": 0o100644, "uid": 0, "gid": 0}),
         (Op.WRITE, {"path": b"f", "offset": 0, "data": b"1"}), *times]]
    ops += [[(Op.WRITE, {"path": b"f", "offset": 0, "data": b"%d" % n}), *times]
            for n in range(2, count + 1)]
    return numbered(ops)


async def applied_one_by_one(tmp_path: Path, sets: list[list[Record]]) -> list[float]:
    """Stage *sets* one at a time, each as soon as the one before is applied; the trio
    time at which each was applied."""
    at: list[float] = []
    replica = tmp_path / "replica"
    replica.mkdir()
    with closing(Staging(tmp_path / "staging")) as staging:
        applier = Applier(staging, replica)
        async with trio.open_nursery() as nursery:
            await nursery.start(applier.run)
            for set_id, records in enumerate(sets, start=1):
                staging.stage(records)
                applier.notify()
                await applier.wait_applied(set_id)
                at.append(trio.current_time())
            nursery.cancel_scope.cancel()
    assert not diff(snapshot(replica), expected(tmp_path, sets))
    return at


# Virtual time that moves on to the next deadline only once trio has been idle for
# autojump_threshold real seconds (an apply in its thread counts as idle): a wait for
# the pace shows as virtual time, an apply quicker than that does not.
@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=30.0)  # no apply of one write is slower


@pytest.fixture
def quick_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.2)


async def test_applier_run_ok_a_set_alone_after_a_batch_starts_at_once(
        tmp_path: Path, patient_clock: trio.testing.MockClock) -> None:
    """The pace of batches (APPLY_INTERVAL) holds back a run of sets, not a set that
    comes alone soon after a batch: that one is applied without waiting (lag)."""
    at = await applied_one_by_one(tmp_path, writes(applier_module.APPLY_BURST))
    assert at[-1] - at[0] == 0, "a set alone waited for the pace"


async def test_applier_run_ok_a_run_of_sets_is_paced(
        tmp_path: Path, quick_clock: trio.testing.MockClock) -> None:
    """Sets that keep coming start batches at most every APPLY_INTERVAL on average,
    once the first APPLY_BURST went at once."""
    count = applier_module.APPLY_BURST + 4
    at = await applied_one_by_one(tmp_path, writes(count))
    assert at[-1] - at[0] >= (count - applier_module.APPLY_BURST - 1) * \
        applier_module.APPLY_INTERVAL * 0.99, at


async def test_applier_ok_tells_the_record_it_reached_while_a_set_takes_long(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a set is applied, the record reached is told every PROGRESS_SECONDS if it
    moved (the primary takes that as progress, not a stall); nothing once it is
    applied."""
    monkeypatch.setattr(applier_module, "PROGRESS_SECONDS", 0.05)
    replica, staging = fresh(tmp_path / "run", data_sets()[:1])
    told: list[tuple[int, int]] = []
    with closing(staging):
        applier = Applier(staging, replica, on_progress=lambda s, q: told.append((s, q)))

        def slow_disk(set_id: int, seq: int) -> None:
            time.sleep(0.2)  # each step of the apply takes this long

        applier.faults.step = slow_disk  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            await nursery.start(applier.run)
            with trio.fail_after(10):
                await applier.wait_applied(1)
            after = len(told)
            await trio.sleep(0.2)  # a few looks with nothing being applied
            nursery.cancel_scope.cancel()
    assert len(told) >= 2 and told == sorted(set(told)), told
    assert {set_id for set_id, _ in told} == {1}
    assert len(told) == after, "told after the set was applied"


def test_apply_sets_ok_readers_see_the_batch_while_it_is_synced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The apply lock goes once the ops are done: the sync waits for no reader, and
    no reader waits for the disk. The apply log says the batch once it is synced."""
    sets = data_sets()
    syncing, go = threading.Event(), threading.Event()

    def slow_syncfs(fd: int) -> None:
        syncing.set()
        assert go.wait(30)

    monkeypatch.setattr("repl.secondary.footprint.syncfs", slow_syncfs)
    replica, staging = fresh(tmp_path, sets)
    with closing(staging):
        thread = threading.Thread(target=apply_all, args=(staging, replica, None))
        thread.start()
        try:
            assert syncing.wait(30)
            with closing(ApplyLock(staging.path)) as lock, lock.shared(timeout=10):
                assert torn(staging.path) is None
                assert not diff(snapshot(replica), expected(tmp_path, sets))
                assert staging.applied == 0, "not in the apply log before the sync"
                assert interrupted(staging.path) == (1, 4), "a crash now is redone"
        finally:
            go.set()
            thread.join(30)
        assert staging.applied == len(sets)
        assert interrupted(staging.path) is None


def test_claim_24_gap_holds_back_later_complete_sets(tmp_path: Path) -> None:
    """A real secondary, fed by a raw client: set 2 lacks one record, so the complete
    sets 3 and 4 wait behind it while set 1 applies; the record that fills the gap
    alone brings the replica to set 4."""
    replica = tmp_path / "r"
    one = [Record(Op.CREATE, 1, 0, path=b"a", mode=0o100644),
           Record(Op.SYNC, 1, 1, count=1)]
    two = [Record(Op.WRITE, 2, 0, path=b"a", data=b"set two"),
           Record(Op.CREATE, 2, 1, path=b"b", mode=0o100644),
           Record(Op.SYNC, 2, 2, count=2)]
    three = [Record(Op.RENAME, 3, 0, path=b"b", path2=b"c"),
             Record(Op.SYNC, 3, 1, count=1)]
    four = [Record(Op.MKDIR, 4, 0, path=b"d", mode=0o40755),
            Record(Op.SYNC, 4, 1, count=1)]
    gap = two[1]
    early = [*four, *[r for r in two if r is not gap], *three]
    with secondary(replica) as sec:

        async def send(records: list[Record]) -> None:
            conn, _ = await open_raw(sec.port, "c1c1c1c1c1c1c1c1")
            await conn.send(*map(record_frame, records))
            assert sorted(await acknowledged(conn, len(records))) == sorted(
                (r.set, r.seq) for r in records)
            await conn.aclose()

        trio.run(send, early)
        trio.run(send, one)  # its apply comes after 3 and 4 were staged whole
        assert wait_applied(replica, 1) == 1, "no set past the gap"
        st = status(replica)
        assert (st["last_applied"], st["applicable_through"]) == (1, 1)
        assert (st["last_complete"], st["complete_waiting"]) == (4, 2)
        assert sorted(p.name for p in replica.iterdir()) == ["a"]
        assert (replica / "a").read_bytes() == b""

        trio.run(send, [gap])
        assert wait_applied(replica, 4) == 4
        assert sorted(p.name for p in replica.iterdir()) == ["a", "c", "d"]
        assert (replica / "a").read_bytes() == b"set two"
        # Nothing waits any more; applied sets stay a while (store/staging.py HISTORY).
        assert all(state.complete for state, _ in read_staging(replica).values())
        assert status(replica)["sets_in_flight"] == 0


def first_sync() -> list[Record]:
    """sync_sets()'s set from a RESET, as the first set of a new replica."""
    return [dataclasses.replace(r, set=1) for r in sync_sets()[2]]


def first_sync_again() -> list[Record]:
    """Set 1 again from a restarted primary: other records at the same places."""
    return numbered([[(Op.RESET, {}),
                      (Op.MKDIR, {"path": b"z", "mode": 0o40700, "uid": 0, "gid": 0}),
                      (Op.FILE, {"path": b"z/q", "mode": 0o100600, "uid": 0, "gid": 0,
                                 "atime_ns": T, "mtime_ns": T, "data": b"q"}),
                      (Op.UTIMES, {"path": b"z", "atime_ns": T, "mtime_ns": T}),
                      (Op.UTIMES, {"path": b"", "atime_ns": T, "mtime_ns": T})]])[0]


def new_replica(run: Path) -> tuple[Path, Staging, Applier, Tree]:
    """A new replica (with a stray file the RESET removes) waiting for sync set 1."""
    replica = run / "replica"
    replica.mkdir(parents=True)
    (replica / "stray").write_bytes(b"x")
    staging = Staging(run / "staging")
    staging.reset_to(1)
    return replica, staging, Applier(staging, replica), Tree(replica)


def test_sync_set_applied_as_it_arrives_then_finished_where_it_was(tmp_path: Path) -> None:
    """A new replica's sync set is applied as far as its records arrived without a gap,
    the replica marked torn meanwhile; once whole, the rest is applied from there, not
    again from the RESET: every record once."""
    records = first_sync()
    assert (records[0].op, records[5].op) == (Op.RESET, Op.CREATE)
    replica, staging, applier, tree = new_replica(tmp_path / "run")
    done: list[int] = []
    applier.faults.step = lambda set_id, seq: done.append(seq)  # type: ignore[method-assign]
    with closing(staging), closing(tree):
        assert applier.applies_as_arrived(1)
        staging.stage([r for r in records if r.seq != 5 and r.op != Op.SYNC])
        assert applier.apply_arrived(tree, 1)
        part = expected(tmp_path / "part", [records[:5]])  # times but the dirs': the set's
        assert snapshot(replica).keys() == part.keys() == {"", "x", "x/f", "g", "x/h"}
        assert interrupted(staging.path) == (1, 1), "torn until the set is whole"
        assert not applier.apply_arrived(tree, 1), "nothing past the gap"
        staging.stage([records[5], records[-1]])
        assert staging.applicable_through() == 1
        assert applier.apply_sets(tree, 1, 1)
        assert (staging.applied, staging.syncing, interrupted(staging.path)) == (1, None, None)
        assert sorted(s for s in done if s >= 0) == [r.seq for r in records], "each once"
    applier.lock.close()
    assert not diff(snapshot(replica), expected(tmp_path / "all", [records]))


def test_sync_set_applied_as_it_arrives_starts_over_if_staging_changed(
        tmp_path: Path) -> None:
    """Records applied as they arrived, then erased (a primary's restart: its set comes
    again, other records at the same places): the set is applied whole from its RESET."""
    records = first_sync()
    again = first_sync_again()
    replica, staging, applier, tree = new_replica(tmp_path / "run")
    with closing(staging), closing(tree):
        staging.stage(records[:6])
        assert applier.apply_arrived(tree, 1)
        staging.drop_partial()
        staging.stage(again)
        assert applier.apply_sets(tree, 1, 1)
    applier.lock.close()
    assert not diff(snapshot(replica), expected(tmp_path, [again]))


def test_sync_set_walked_again_as_it_arrives_applies_from_the_last_reset(
        tmp_path: Path) -> None:
    """A walk cut short and walked again in the same set: the records before the second
    RESET were journaled against the primary's whole tree (here an unlink of a file the
    first walk never reached), so once that RESET is staged, applying as it arrives and
    the whole set both go on from it, and the set is applied."""
    d = {"mode": 0o40755, "uid": 0, "gid": 0}
    f = {"mode": 0o100644, "uid": 0, "gid": 0, "atime_ns": T, "mtime_ns": T}
    records = numbered([[(Op.RESET, {}),
                         (Op.MKDIR, {"path": b"x", **d}),
                         (Op.FILE, {"path": b"x/a", **f, "data": b"a"}),
                         (Op.UNLINK, {"path": b"y/gone"}),
                         (Op.RESET, {}),
                         (Op.MKDIR, {"path": b"x", **d}),
                         (Op.FILE, {"path": b"x/a", **f, "data": b"a"}),
                         (Op.MKDIR, {"path": b"y", **d}),
                         (Op.FILE, {"path": b"y/b", **f, "data": b"b"})]])[0]
    replica, staging, applier, tree = new_replica(tmp_path / "run")
    with closing(staging), closing(tree):
        staging.stage(records[:3])
        assert applier.apply_arrived(tree, 1)
        staging.stage(records[3:])
        assert applier.apply_sets(tree, 1, 1)
        assert staging.applied == 1
    applier.lock.close()
    assert sorted(snapshot(replica)) == ["", "x", "x/a", "y", "y/b"]


def test_sync_set_as_it_arrives_failed_once_whole_is_retried_from_its_reset(
        tmp_path: Path) -> None:
    """An error in the rest of a set begun as it arrived (applied without markers): the
    retry applies it from its RESET, not from where applying as it arrived stopped (it
    found the names it had made already, and failed at every retry)."""
    records = first_sync()
    replica, staging, applier, tree = new_replica(tmp_path / "run")
    failed: list[int] = []

    def step(set_id: int, seq: int) -> None:
        if seq == 6 and not failed:
            failed.append(seq)
            raise OSError(errno.EIO, "once")

    with closing(staging), closing(tree):
        staging.stage([r for r in records if r.seq != 5])
        assert applier.apply_arrived(tree, 1)
        staging.stage([records[5]])
        applier.faults.step = step  # type: ignore[method-assign]
        assert applier.apply_sets(tree, 1, 1), "retried (EIO is transient), and whole"
        assert (failed, staging.applied) == ([6], 1)
    applier.lock.close()
    assert not diff(snapshot(replica), expected(tmp_path, [records]))


def test_sync_set_cut_as_it_arrives_waits_whole_after_a_restart(tmp_path: Path) -> None:
    """A crash while the set was applied as it arrived: after the restart the replica
    still reads as torn, nothing is redone of a set not yet whole (it would be recorded
    applied with records missing), and once whole it is applied from its RESET."""
    records = first_sync()
    replica, staging, applier, tree = new_replica(tmp_path / "run")
    steps = 0

    def step(set_id: int, seq: int) -> None:
        nonlocal steps
        steps += 1
        if steps == 4:
            raise Crash

    applier.faults.step = step  # type: ignore[method-assign]
    with closing(staging), closing(tree):
        staging.stage(records[:-1])
        with pytest.raises(Crash):
            applier.apply_arrived(tree, 1)
    applier.lock.close()
    with closing(Staging(tmp_path / "run" / "staging")) as staging:
        restarted = Applier(staging, replica)
        assert interrupted(staging.path) == (1, 1)
        assert restarted.redo_through is None, "no redo of a set not yet whole"
        staging.stage(records[-1:])
        restarted.lock.close()
        apply_all(staging, replica, None)
        assert staging.applied == 1
    assert not diff(snapshot(replica), expected(tmp_path, [records]))


def test_sync_set_over_a_whole_set_waits_whole(tmp_path: Path) -> None:
    """A sync over a replica that shows a whole set is applied only once whole: until
    then readers see the set they saw."""
    replica, staging = fresh(tmp_path / "run", data_sets()[:2])
    with closing(staging):
        apply_all(staging, replica, None)
        staging.reset_to(3)
        applier = Applier(staging, replica)
        staging.stage([Record(Op.RESET, 3, 0)])
        assert not applier.applies_as_arrived(3)
        applier.lock.close()


def test_sync_set_as_it_arrives_read_while_erased_starts_over(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """A step that reads the set while a primary's restart erases it (its transaction not
    yet committed) applies the old records: that progress is not kept, and the set that
    comes again is applied from its RESET."""
    records = first_sync()
    again = first_sync_again()
    replica, staging, applier, tree = new_replica(tmp_path / "run")
    erase = staging._delete_set
    stepped: list[bool] = []

    def erase_after_a_step(txn: object, set_id: int) -> None:
        stepped.append(applier.apply_arrived(tree, set_id))  # sees the set still there
        erase(txn, set_id)  # type: ignore[arg-type]

    with closing(staging), closing(tree):
        staging.stage(records[:6])
        monkeypatch.setattr(staging, "_delete_set", erase_after_a_step)
        staging.drop_partial()
        assert stepped == [True]
        monkeypatch.undo()
        staging.stage(again)
        assert applier.apply_sets(tree, 1, 1)
    applier.lock.close()
    assert not diff(snapshot(replica), expected(tmp_path, [again]))


def test_sync_set_reset_to_over_a_torn_replica_keeps_it_torn(tmp_path: Path) -> None:
    """A sync reset to while the replica is torn by another (applied in part as it
    arrived) leaves it torn until the new set is whole, also across a restart."""
    records = first_sync()
    replica, staging, applier, tree = new_replica(tmp_path / "run")
    with closing(staging), closing(tree):
        staging.stage(records[:6])
        assert applier.apply_arrived(tree, 1)
        applier._do_reset(2)
        assert interrupted(staging.path) == (2, 2)
        mark_applying(staging.path, 1, 1)  # killed after the reset, before the new mark
        restarted = Applier(staging, replica)
        assert interrupted(staging.path) == (2, 2)
        second = [dataclasses.replace(r, set=2) for r in records]
        staging.stage(second)
        assert restarted.apply_sets(tree, 2, 2)
        assert interrupted(staging.path) is None
        restarted.lock.close()
    applier.lock.close()
    assert not diff(snapshot(replica), expected(tmp_path, [second]))


async def test_sync_set_begun_as_it_arrives_is_finished_while_held(tmp_path: Path) -> None:
    """A hold does not stop a sync set the replica is torn by: once whole it is applied,
    as a redo is; then the hold keeps the next set out."""
    records = first_sync()
    replica, staging, applier, tree = new_replica(tmp_path / "run")
    tree.close()
    with closing(staging):
        staging.stage(records[:6])
        with closing(Tree(replica)) as first_tree:
            assert applier.apply_arrived(first_tree, 1)
        set_hold(staging.path, True)
        staging.stage([*records[6:], Record(Op.WRITE, 2, 0, path=b"y", offset=0, data=b"2"),
                       Record(Op.SYNC, 2, 1, count=1)])
        async with trio.open_nursery() as nursery:
            await nursery.start(applier.run)
            with trio.fail_after(10):
                await applier.wait_applied(1)
            nursery.cancel_scope.cancel()
        assert (staging.applied, interrupted(staging.path)) == (1, None)
    assert not diff(snapshot(replica), expected(tmp_path, [records]))


@pytest.mark.parametrize("files", [3, 40_000])
def test_power_lost_batch_asks_for_its_paths_or_past_a_hello_the_whole_tree(
        tmp_path: Path, files: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch begun on another boot is offered to the primary as the paths it touched;
    so many that the offer would not fit a HELLO answer, as the whole tree."""
    replica = tmp_path / "replica"
    replica.mkdir()
    boot = tmp_path / "boot_id"
    boot.write_text("before\n")
    monkeypatch.setenv(ENV_BOOT_ID, str(boot))
    with closing(Staging(tmp_path / "staging")) as staging:
        records = [Record(Op.CREATE, 1, seq, path=b"f%06d" % seq, mode=0o100644)
                   for seq in range(files)]
        staging.stage([*records, Record(Op.SYNC, 1, files, count=files)])
        mark_applying(staging.path, 1, 1)
        boot.write_text("after\n")
        Applier(staging, replica).lock.close()
        offer = staging.rejoin
        assert offer is not None and staging.syncing == 1
        assert staging.sets() == {}  # they come again, as the primary's set
        content = Divergence.from_json(json.loads(offer)).content
        assert content == ({b""} if files > 3 else {r.path for r in records})
