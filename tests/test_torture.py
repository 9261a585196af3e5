"""A short torture campaign in every test run, so CI guards the guarantee."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from repl.faults import ENV_SET_HASHES, ENV_SET_TREES, set_hash_recorder
from store.notes import Note, NoteKind
from tests.torture.__main__ import campaign
from tests.torture.power import PowerCuts
from tests.torture.run import POWER_CUT


def test_torture_short_campaign() -> None:
    seed = int(os.environ.get("REPLFS_TORTURE_SEED", "20261126"))
    out = io.StringIO()
    results = campaign(runs=3, seed=seed, minutes=None, seconds=4.0, out=out)
    assert len(results) == 3
    assert all(r.samples > 0 for r in results), out.getvalue()
    assert [r.error for r in results] == [None, None, None], out.getvalue()


def test_torture_power_cuts_short_campaign() -> None:
    out = io.StringIO()
    results = campaign(runs=2, seed=20261201, minutes=None, seconds=4.0, out=out,
                       power_cuts=True)
    assert [r.faults[POWER_CUT] for r in results] == [1, 1]
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
