"""An old primary's own changes kept aside before it rejoins; a secondary following a
newer generation keeps what the two share and asks again for what it went past."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from repl.activity import note_boot
from repl.faults import ENV_BOOT_ID
from repl.secondary.rejoin import follow_generation, fork_point, keep_branch
from store.journal import Journal
from store.notes import Note, NoteKind
from store.records import Op, Record
from store.staging import Staging


@pytest.mark.parametrize("rebooted", [True, False])
def test_rejoin_keep_branch_ok_with_what_the_activity_log_noted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rebooted: bool) -> None:
    """A power cut may have left changes in the old primary's tree that its journal
    lost: the paths its activity log noted are its own changes too. After a crash
    of the daemon alone, nothing was lost: only the journal counts."""
    boot = tmp_path / "boot_id"
    boot.write_text("the old primary's boot\n")
    monkeypatch.setenv(ENV_BOOT_ID, str(boot))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "journaled").write_bytes(b"in the journal")
    (tree / "ahead").write_bytes(b"on the disk, its record lost")
    journal = Journal(tmp_path / "journal")
    try:
        journal.base = 0  # its secondary's initial sync was set 1
        journal.append(Op.CREATE, path=b"journaled", mode=0o100644, uid=0, gid=0)
        journal.close_set()
        journal.add_notes([Note(NoteKind.NAME, b"ahead"),
                           Note(NoteKind.DATA, b"journaled", 0, 1 << 22)])
        note_boot(journal)
        if rebooted:
            boot.write_text("a later boot\n")
        ours, branch = keep_branch(journal, tree, tmp_path / "branches", 1)
    finally:
        journal.close()
    if rebooted:
        assert ours.content == {b"journaled", b"ahead"}
        assert ours.ranges == {b"journaled": [(0, 1 << 22)]}
        assert (branch / "tree" / "ahead").read_bytes() == b"on the disk, its record lost"
    else:
        assert (ours.content, ours.ranges) == ({b"journaled"}, {})
        assert not (branch / "tree" / "ahead").exists()


def test_rejoin_keep_branch_ok_with_the_dirty_map(tmp_path: Path) -> None:
    """Over its budget the old primary journaled no written bytes, only their ranges
    in the dirty map: those files diverged too, and are kept aside."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "wal").write_bytes(b"written past the budget")
    journal = Journal(tmp_path / "journal")
    try:
        journal.base = 0  # its secondary's initial sync was set 1
        journal.append(Op.CREATE, path=b"new", mode=0o100644, uid=0, gid=0)
        journal.put_dirty(b"wal", [(4, 11)])
        ours, branch = keep_branch(journal, tree, tmp_path / "branches", 1)
    finally:
        journal.close()
    assert ours.content == {b"new"}
    assert ours.ranges == {b"wal": [(4, 11)]}
    assert (branch / "tree" / "wal").read_bytes() == b"written past the budget"


def test_rejoin_keep_branch_ok_a_symlink_in_a_directory_made_whole(tmp_path: Path) -> None:
    """A directory the old primary made is copied aside whole; a symlink in it that
    the journal names too is not copied again (a symlink is not copied over one)."""
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "ln").symlink_to("target")
    journal = Journal(tmp_path / "journal")
    try:
        journal.base = 0
        journal.append(Op.MKDIR, path=b"d", mode=0o40755, uid=0, gid=0)
        journal.append(Op.SYMLINK, path=b"d/ln", uid=0, gid=0, data=b"target")
        ours, branch = keep_branch(journal, tree, tmp_path / "branches", 1)
    finally:
        journal.close()
    assert ours.content == {b"d", b"d/ln"}
    assert os.readlink(branch / "tree" / "d" / "ln") == "target"


def test_rejoin_keep_branch_ok_never_through_a_symlink(tmp_path: Path) -> None:
    """A path journaled when its directory was one, which a symlink to elsewhere
    replaced since: nothing is read from there, nor written through the symlink."""
    tree, elsewhere = tmp_path / "tree", tmp_path / "elsewhere"
    tree.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret").write_bytes(b"not the tree's")
    (tree / "d").symlink_to(elsewhere)
    journal = Journal(tmp_path / "journal")
    try:
        journal.base = 0
        journal.append(Op.CREATE, path=b"d/secret", mode=0o100644, uid=0, gid=0)
        journal.append(Op.SYMLINK, path=b"d", uid=0, gid=0, data=str(elsewhere).encode())
        _, branch = keep_branch(journal, tree, tmp_path / "branches", 1)
    finally:
        journal.close()
    assert os.readlink(branch / "tree" / "d") == str(elsewhere)  # the symlink as it was
    assert [p.name for p in elsewhere.iterdir()] == ["secret"]
    assert (elsewhere / "secret").read_bytes() == b"not the tree's"


def test_rejoin_keep_branch_ok_sets_trimmed_past_the_fork_ask_for_the_whole_tree(
        tmp_path: Path) -> None:
    """The old primary trimmed sets after the fork (a second secondary, ahead of the
    one promoted, applied them): what they changed is unknown, so the whole tree."""
    tree = tmp_path / "tree"
    tree.mkdir()
    journal = Journal(tmp_path / "journal")
    try:
        journal.base = 0
        for name in (b"one", b"two", b"three"):
            journal.append(Op.CREATE, path=name, mode=0o100644, uid=0, gid=0)
            journal.close_set()
        journal.trim(2)  # sets 1 and 2 gone; the promoted replica had applied set 1
        ours, _ = keep_branch(journal, tree, tmp_path / "branches", 2)
        assert ours.whole_tree
        ours, _ = keep_branch(journal, tree, tmp_path / "branches", 3)  # had applied 2
        assert (ours.content, ours.ranges) == ({b"three"}, {})
    finally:
        journal.close()


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


def test_follow_generation_ok_takes_the_lineage_so_a_later_rejoin_forks_right(
        staging: Staging) -> None:
    """Primaries take turns (a: 1, b: 2, a: 3): this replica follows a's generation 3,
    then is promoted to 4. b, back with generation 2's data, must fork at 3's first set
    (where a went on without b's last sets), not at 4's."""
    lineage = [{"generation": 1, "node": "a", "first_set": 1},
               {"generation": 2, "node": "b", "first_set": 5},
               {"generation": 3, "node": "a", "first_set": 9}]
    follow_generation(staging, lineage, 3)
    assert staging.identity.history == lineage
    staging.identity.generation = 4  # promoted, as repl/secondary/promote.py does
    staging.identity.history.append({"generation": 4, "node": "c", "first_set": 12})
    assert fork_point(staging.identity.history, 2) == 9


def test_follow_generation_ok_a_sync_never_finished_asks_for_the_whole_tree(
        staging: Staging) -> None:
    """The last primary's sync set (RESET_TO 6: the replica "applied" 5 until it
    arrives) never came whole. Its sets 4 and 5 stood in that sync, so the replica holds
    neither: a new primary forking at 6 must send everything, not go on from 5."""
    staging.stage(create(3, b"c"))
    staging.finish(3)
    staging.reset_to(6)
    staging.stage(create(6, b"f")[:1])  # partial: the primary died
    follow_generation(staging, [{"generation": 2, "node": "n2", "first_set": 6}], 2)
    assert json.loads(staging.rejoin or b"")["content"] == [""], "the whole tree"
    assert staging.syncing is not None, "no consistent set until it arrives"
    assert not staging.sets()


def test_follow_generation_ok_past_the_fork_asks_for_those_paths(staging: Staging) -> None:
    for set_id, name in ((3, b"c"), (4, b"d"), (5, b"e")):
        staging.stage(create(set_id, name))
        staging.finish(set_id)  # the replica applied 4 and 5, the new lineage has neither
    follow_generation(staging, HISTORY, 2)
    assert staging.applied == 3 and staging.syncing == 4
    assert json.loads(staging.rejoin or b"")["content"] == sorted(
        p.hex() for p in (b"d", b"e"))


def test_follow_generation_ok_past_the_fork_offers_every_linked_name(
        staging: Staging, tmp_path: Path) -> None:
    """The new primary may have written a file through a name it then removed: the
    replica offers every name of its hard-linked files too, so each is sent whole."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f8").write_bytes(b"x")
    os.link(tree / "f8", tree / "f11")
    (tree / "e").write_bytes(b"y")
    for set_id, name in ((3, b"c"), (4, b"d"), (5, b"e")):
        staging.stage(create(set_id, name))
        staging.finish(set_id)
    follow_generation(staging, HISTORY, 2, tree)
    assert json.loads(staging.rejoin or b"")["content"] == sorted(
        p.hex() for p in (b"d", b"e", b"f8", b"f11"))


def test_follow_generation_ok_past_the_fork_too_many_paths_is_the_whole_tree(
        staging: Staging) -> None:
    """Past the fork the replica applied more paths than its HELLO answer can offer:
    it asks for the whole tree instead of an answer the primary would refuse."""
    names = [b"%06d" % i + b"x" * 240 for i in range(2_200)]
    staging.stage([*(Record(Op.CREATE, 4, seq, path=name, mode=0o100644)
                     for seq, name in enumerate(names)),
                   Record(Op.SYNC, 4, len(names), count=len(names))])
    staging.finish(4)
    follow_generation(staging, HISTORY, 2)
    assert json.loads(staging.rejoin or b"")["content"] == [""]


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
