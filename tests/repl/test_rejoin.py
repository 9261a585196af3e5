"""An old primary's own changes, kept aside before it rejoins."""

from __future__ import annotations

from pathlib import Path

from repl.rejoin import keep_branch
from store.journal import Journal
from store.records import Note, NoteKind, Op


def test_rejoin_keep_branch_ok_with_what_the_activity_log_noted(tmp_path: Path) -> None:
    """A power cut may have left changes in the old primary's tree that its journal
    lost: the paths its activity log noted are its own changes too."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "journaled").write_bytes(b"in the journal")
    (tree / "ahead").write_bytes(b"on the disk, its record lost")
    journal = Journal(tmp_path / "journal")
    try:
        journal.append(Op.CREATE, path=b"journaled", mode=0o100644, uid=0, gid=0)
        journal.close_set()
        journal.add_notes([Note(NoteKind.NAME, b"ahead"),
                           Note(NoteKind.DATA, b"journaled", 0, 1 << 22)])
        ours, branch = keep_branch(journal, tree, tmp_path / "branches", 1)
    finally:
        journal.close()
    assert ours.content == {b"journaled", b"ahead"}
    assert ours.ranges == {b"journaled": [(0, 1 << 22)]}
    assert (branch / "tree" / "ahead").read_bytes() == b"on the disk, its record lost"
