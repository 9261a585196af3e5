"""A short torture campaign in every test run, so CI guards the guarantee."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from repl.faults import ENV_SET_HASHES, ENV_SET_TREES, set_hash_recorder
from repl.secondary.applier import Applier
from repl.tree import Tree
from repl.verify import tree_digest
from store.notes import Note, NoteKind
from store.records import Op, Record
from store.staging import Staging
from tests.torture.__main__ import campaign
from tests.torture.cluster import promoted_at, run_cluster
from tests.torture.power import PowerCuts, ReplicaPowerCuts
from tests.torture.run import POWER_CUT, REPLICA_POWER_CUT, in_step_at_death


def test_torture_short_campaign() -> None:
    seed = int(os.environ.get("REPLFS_TORTURE_SEED", "20261126"))
    out = io.StringIO()
    results = campaign(runs=3, seed=seed, minutes=None, seconds=4.0, out=out)
    assert len(results) == 3
    assert all(r.samples > 0 for r in results), out.getvalue()
    assert [r.error for r in results] == [None, None, None], out.getvalue()


def test_torture_cluster_run_ok_failovers_by_election(tmp_path: Path) -> None:
    """A run of three nodes on etcd whose seed cuts etcd off from every node, then the
    primary off from everything, then kills a standby (--fsync remote): each promoted
    tree is the tree at a set's close."""
    result = run_cluster(1501, 8.0, tmp_path)
    assert result.error is None, f"{result.error}; kept {result.kept}"
    assert result.faults == {"etcd_cut": 1, "primary_cut": 1, "standby_kill": 1}
    assert len(result.failover_seconds) >= 1


def test_promoted_at_ok_the_last_lead_taken(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    promoted = "10:00:01 replfs.node: promoted to generation 3 at set 227 (0 sets applied)\n"
    own = "10:00:02 replfs.node: leading again from its own journal, as generation 5\n"
    new = "10:00:00 replfs.node: a new cluster: /d is its first primary\n"
    for text, said in [(new, None), (new + promoted, 227), (new + promoted + own, None),
                       (new + promoted + own + promoted.replace("227", "300"), 300)]:
        log.write_text(text)
        assert promoted_at(log) == said, text


def test_in_step_at_death_ok_the_last_primary_process_last_word(tmp_path: Path) -> None:
    log = tmp_path / "primary.log"
    serving = "10:00:00 replfs.primary: serving b at m (journal j, set 1)\n"
    in_step = ("10:00:01 replfs.fsync: fsync remote: secondary 127.0.0.1:1 has staged every "
               "closed set; fsyncs wait for it from now on\n")
    gone = ("10:00:02 replfs.fsync: fsync remote: secondary 127.0.0.1:1 is gone; fsyncs do "
            "not wait for it until it is back and has caught up\n")
    for text, said in [("", False), (serving, False), (serving + in_step, True),
                       (serving + in_step + gone, False),
                       (serving + in_step + gone + in_step, True),
                       (serving + in_step + serving, False)]:  # restarted, not in step yet
        log.write_text(text)
        assert in_step_at_death(log) is said, text


def test_torture_power_cuts_short_campaign() -> None:
    out = io.StringIO()
    results = campaign(runs=2, seed=20261201, minutes=None, seconds=4.0, out=out,
                       power_cuts=True)
    assert [r.faults[POWER_CUT] for r in results] == [1, 1]
    assert sum(r.faults[REPLICA_POWER_CUT] for r in results) >= 1
    assert [r.error for r in results] == [None, None], out.getvalue()


def _tree_at_close(power: PowerCuts, set_id: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record BACKING's tree at *set_id*'s close as the primary does."""
    monkeypatch.setenv(ENV_SET_HASHES, str(power.hashes))
    monkeypatch.setenv(ENV_SET_TREES, str(power.trees))
    record = set_hash_recorder()
    assert record is not None
    fd = os.open(power.backing, os.O_RDONLY | os.O_DIRECTORY)
    try:
        record(set_id, fd)
    finally:
        os.close(fd)


def test_power_check_names_left_of_a_noted_unlink_ok(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A noted name of a file with two, gone after the cut, leaves the other name one
    link fewer: that is no difference; a change of the other name's bytes is."""
    power = PowerCuts(tmp_path, tmp_path / "hashes")
    power.backing.mkdir(parents=True)
    (power.backing / "a").write_bytes(b"data")
    os.link(power.backing / "a", power.backing / "b")
    _tree_at_close(power, 1, monkeypatch)
    (power.backing / "b").unlink()  # reached the disk; its UNLINK record did not
    notes = [Note(NoteKind.NAME, b"b")]
    assert power._differences(1, notes) == []
    (power.backing / "a").write_bytes(b"more")
    assert power._differences(1, notes) == ["a"]


def test_power_check_files_of_the_dirty_map_ok(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A file written over budget (named by the journal's dirty map, no note, no record)
    may hold more in BACKING than at the set's close: it is resent as it is."""
    power = PowerCuts(tmp_path, tmp_path / "hashes")
    power.backing.mkdir(parents=True)
    (power.backing / "wal").write_bytes(b"one")
    (power.backing / "db").write_bytes(b"one")
    _tree_at_close(power, 1, monkeypatch)
    (power.backing / "wal").write_bytes(b"one two")  # reached BACKING, synced
    assert power._differences(1, [], {b"wal"}) == []
    (power.backing / "db").write_bytes(b"two")
    assert power._differences(1, [], {b"wal"}) == ["db"]


def test_replica_power_check_ok(tmp_path: Path) -> None:
    """After the secondary's power cut the replica must be at the set its apply log
    says, and no earlier than the set it reported applied."""
    power = ReplicaPowerCuts(tmp_path)
    power.sim.start()
    try:
        power.replica.mkdir()
        staging = Staging(power.staging)
        staging.stage([Record(Op.CREATE, 1, 0, path=b"f", mode=0o100644, uid=0, gid=0),
                       Record(Op.WRITE, 1, 1, path=b"f", offset=0, data=b"one"),
                       Record(Op.SYNC, 1, 2, count=2)])
        applier, tree = Applier(staging, power.replica), Tree(power.replica)
        applier.apply_sets(tree, 1, 1)
        tree.close()
        applier.lock.close()
        staging.close()
        hashes = {1: {tree_digest(power.replica)}}
        power.sim.power_cut()
        power.boot(hashes)
        assert power.problems == []
        with open(power.replica / "f", "wb") as f:  # on the disk, not in set 1
            f.write(b"two")
            os.fsync(f.fileno())
        power.reported = 2
        power.sim.power_cut()
        power.boot(hashes)
        assert len(power.problems) == 2
        assert "it had reported 2 applied" in power.problems[0]
        assert "not the primary's tree at the close of set 1" in power.problems[1]
    finally:
        power.close()
