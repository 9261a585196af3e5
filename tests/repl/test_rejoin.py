"""A secondary following the primary of a newer generation: what it keeps of what it
staged, and a replica that went past the fork asks for those paths again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from repl.rejoin import follow_generation
from store.records import Op, Record
from store.staging import Staging


@pytest.fixture
def staging(tmp_path: Path) -> Iterator[Staging]:
    with closing(Staging(tmp_path / "staging")) as s:
        s.identity.generation = 1
        s.save_identity()
        yield s


def create(set_id: int, name: bytes) -> list[Record]:
    return [Record(Op.CREATE, set_id, 0, path=name, mode=0o100644),
            Record(Op.SYNC, set_id, 1, count=1)]


HISTORY = [{"generation": 2, "node": "n2", "first_set": 4}]  # the new lineage forks at 4


def test_follow_generation_ok_keeps_shared_complete_sets(staging: Staging) -> None:
    staging.stage([*create(1, b"a"), *create(2, b"b"), *create(3, b"c"), *create(4, b"d")])
    staging.stage(create(5, b"e")[:1])  # partial
    staging.finish(1)
    follow_generation(staging, HISTORY, 2)
    assert sorted(staging.sets()) == [2, 3], "sets 2 and 3 are the new primary's too"
    assert staging.identity.generation == 2
    assert staging.rejoin is None


def test_follow_generation_ok_past_the_fork_asks_for_those_paths(staging: Staging) -> None:
    for set_id, name in ((3, b"c"), (4, b"d"), (5, b"e")):
        staging.stage(create(set_id, name))
        staging.finish(set_id)  # the replica applied 4 and 5, the new lineage has neither
    follow_generation(staging, HISTORY, 2)
    assert staging.applied == 3 and staging.syncing == 4
    assert json.loads(staging.rejoin or b"")["content"] == sorted(
        p.hex() for p in (b"d", b"e"))


def test_follow_generation_ok_past_the_fork_unknown_is_the_whole_tree(
        staging: Staging, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("store.staging.HISTORY_SETS", 0)
    for set_id, name in ((4, b"d"), (5, b"e")):
        staging.stage(create(set_id, name))
        staging.finish(set_id)
    follow_generation(staging, HISTORY, 2)
    assert json.loads(staging.rejoin or b"")["content"] == [""]


def test_follow_generation_ok_no_history_keeps_nothing_unapplied(staging: Staging) -> None:
    staging.stage(create(1, b"a"))
    follow_generation(staging, None, 2)
    assert staging.sets() == {} and staging.rejoin is None
