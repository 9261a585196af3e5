"""Promote: the sets applied last go into the new journal, so a secondary that staged
fewer of them follows from there."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import pytest

from repl.errors import UsageError
from repl.secondary.promote import promote
from store.journal import Journal
from store.records import Op, Record
from store.staging import Staging


def create(set_id: int, name: bytes) -> list[Record]:
    return [Record(Op.CREATE, set_id, 0, path=name, mode=0o100644),
            Record(Op.SYNC, set_id, 1, count=1)]


def replica(tmp_path: Path) -> tuple[Path, Path]:
    tree, staging_dir = tmp_path / "r", tmp_path / "staging"
    tree.mkdir()
    with closing(Staging(staging_dir)) as staging:
        staging.identity.cluster = "c1"
        staging.save_identity()
        for set_id in (1, 2, 3):
            staging.stage(create(set_id, b"f%d" % set_id))
            staging.finish(set_id)  # applied (the files are not made: no applier here)
            (tree / f"f{set_id}").touch()
        staging.stage(create(4, b"f4"))  # complete, not applied: promote applies it
    return tree, staging_dir


async def test_promote_ok_applied_sets_go_to_the_new_journal(tmp_path: Path) -> None:
    tree, staging_dir = replica(tmp_path)
    done = await promote(tree, staging_dir, tmp_path / "journal", generation=7)
    assert (done.generation, done.applied_to) == (7, 4)
    with closing(Journal(tmp_path / "journal")) as journal:
        assert journal.set == 5 and journal.base == 0
        assert [(r.set, r.op) for r in journal.records()] == [
            (s, op) for s in (1, 2, 3, 4) for op in (Op.CREATE, Op.SYNC)]
        assert journal.identity.generation == 7
        assert journal.identity.history[-1]["first_set"] == 5


async def test_promote_err_generation_not_newer(tmp_path: Path) -> None:
    tree, staging_dir = replica(tmp_path)
    with pytest.raises(UsageError, match="not newer"):
        await promote(tree, staging_dir, tmp_path / "journal", generation=1)


async def test_promote_err_other_cluster(tmp_path: Path) -> None:
    tree, staging_dir = replica(tmp_path)
    with pytest.raises(UsageError, match="belongs to cluster c1"):
        await promote(tree, staging_dir, tmp_path / "journal", generation=2, cluster="c2")
