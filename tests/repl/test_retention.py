"""What the journal keeps for several secondaries: a real journal and backing tree, the
secondaries' reports made by hand."""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path

import pytest

from repl.primary.capture import Capture
from repl.tree import Tree
from store.journal import Journal
from store.records import Op

BUDGET = 256 << 10


def writes(capture: Capture, name: bytes, count: int, applied_by: str | None = None) -> None:
    """*count* 20 KB writes to *name*, a set closed every third, which *applied_by*
    applies at once."""
    capture.record(Op.CREATE, path=name, mode=0o100644, uid=0, gid=0)
    (Path(os.fsdecode(capture.backing.proc_path(b""))) / os.fsdecode(name)).touch()
    for i in range(count):
        capture.write(name, i * 20_000, os.urandom(20_000))
        if i % 3 == 2:
            closed = capture.close_set()
            capture.backing_sync.sync()  # BACKING durable: the journal may trim
            if applied_by is not None:
                capture.caught_up(applied_by, closed)


def opened(tmp_path: Path) -> tuple[closing[Journal], closing[Tree]]:
    (tmp_path / "b").mkdir(exist_ok=True)
    return closing(Journal(tmp_path / "j")), closing(Tree(tmp_path / "b"))


def test_retention_ok_one_past_budget_is_dropped_alone(tmp_path: Path) -> None:
    j, t = opened(tmp_path)
    with j as journal, t as tree:
        capture = Capture(journal, tree, journal_max=BUDGET, secondaries=["a", "b"])
        capture.caught_up("a", 0)
        capture.caught_up("b", 0)
        writes(capture, b"f", 60, applied_by="a")  # 1.2 MB; b applies nothing
        assert not capture.overflow, "a is within the budget: no dirty map"
        assert capture.retention.is_dropped("b") and not capture.retention.is_dropped("a")
        assert journal.bytes < 2 * BUDGET, "trimmed to what a needs"
        missed = capture.retention.missed_since("b", 0)
        assert missed is not None and missed.roots() == [b"f"]


def test_retention_ok_a_file_whose_mode_alone_changed_is_missed(tmp_path: Path) -> None:
    """A change with no data (a chmod) while a secondary is past the budget is among
    what it missed: its sync sends the file's mode, owner and times."""
    j, t = opened(tmp_path)
    with j as journal, t as tree:
        capture = Capture(journal, tree, journal_max=BUDGET, secondaries=["a", "b"])
        capture.caught_up("a", 0)
        capture.caught_up("b", 0)
        writes(capture, b"f", 3, applied_by="a")
        shared = journal.set - 1
        capture.caught_up("b", shared)  # both have f
        capture.record(Op.CHMOD, path=b"f", mode=0o600)
        writes(capture, b"g", 60, applied_by="a")
        assert capture.retention.is_dropped("b")
        missed = capture.retention.missed_since("b", shared)
        assert missed is not None and missed.roots() == [b"g"]
        assert missed.only_ranges() == {b"f": [], b"": []}


def test_retention_ok_what_was_missed_survives_a_restart(tmp_path: Path) -> None:
    j, t = opened(tmp_path)
    with j as journal, t as tree:
        capture = Capture(journal, tree, journal_max=BUDGET, secondaries=["a", "b"])
        capture.caught_up("b", 0)
        writes(capture, b"f", 60, applied_by="a")
        capture.close_set()
    j, t = opened(tmp_path)
    with j as journal, t as tree:
        capture = Capture(journal, tree, journal_max=BUDGET, secondaries=["a", "b"])
        assert capture.retention.is_dropped("b")
        missed = capture.retention.missed_since("b", 0)
        assert missed is not None and missed.roots() == [b"f"]
        capture.retention.attach("b", journal.set - 1)  # brought up: it pins again
        assert not capture.retention.is_dropped("b")
        assert journal.meta_items(b"missed\0") == []


def test_retention_ok_too_much_missed_is_the_whole_tree(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr("repl.primary.retention.MISSED_PATHS", 3)
    j, t = opened(tmp_path)
    with j as journal, t as tree:
        capture = Capture(journal, tree, journal_max=BUDGET, secondaries=["a", "b"])
        capture.caught_up("b", 0)
        for name in (b"f", b"g", b"h", b"i"):
            writes(capture, name, 20, applied_by="a")
        assert capture.retention.missed_since("b", 0) is None, "a whole sync"


def test_retention_ok_all_past_budget_is_the_overflow(tmp_path: Path) -> None:
    j, t = opened(tmp_path)
    with j as journal, t as tree:
        capture = Capture(journal, tree, journal_max=BUDGET, secondaries=["a", "b"])
        writes(capture, b"f", 60)  # neither applies anything
        assert capture.overflow
        assert not capture.retention.is_dropped("a") and not capture.retention.is_dropped("b")
