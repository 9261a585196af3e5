"""An old primary's own changes, kept aside before it rejoins."""

from __future__ import annotations

from pathlib import Path

import pytest

from repl.activity import note_boot
from repl.faults import ENV_BOOT_ID
from repl.rejoin import keep_branch
from store.journal import Journal
from store.records import Note, NoteKind, Op


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
