"""The activity log: which notes an op needs, which cover it, which a reset keeps."""

from __future__ import annotations

from typing import Any

import pytest

from repl import activity
from repl.activity import EXTENT, ActivityLog, divergence, name_roots
from repl.diverge import END
from store.notes import Note, NoteKind
from store.records import Op

NAME, DATA, ATTR, XATTR = NoteKind.NAME, NoteKind.DATA, NoteKind.ATTR, NoteKind.XATTR


def noted(log: ActivityLog, op: Op, at: int, **fields: Any) -> list[Note]:
    """What *op* needs, journaled at once (as capture does once they are durable)."""
    notes = log.need(op, fields, at)
    log.add(notes, at)
    return notes


def test_activity_need_ok_namespace_ops_note_every_name_they_change() -> None:
    log = ActivityLog()
    assert log.need(Op.CREATE, {"path": b"d/f"}, 0) == [Note(NAME, b"d/f")]
    assert log.need(Op.LINK, {"path": b"a", "path2": b"b"}, 0) == [Note(NAME, b"b")]
    assert log.need(Op.RENAME, {"path": b"a", "path2": b"c/b"}, 0) == [
        Note(NAME, b"a"), Note(NAME, b"c/b")]
    assert log.need(Op.RMDIR, {"path": b"d"}, 0) == [Note(NAME, b"d")]


def test_activity_need_ok_covered_by_own_name() -> None:
    log = ActivityLog()
    noted(log, Op.CREATE, 10, path=b"db-journal")
    assert log.need(Op.UNLINK, {"path": b"db-journal"}, 20) == []
    assert log.names[b"db-journal"].last_ns_use == 20


def test_activity_need_ok_young_directory_covers_what_is_made_in_it() -> None:
    log = ActivityLog()
    noted(log, Op.MKDIR, 1, path=b"new")
    assert log.need(Op.CREATE, {"path": b"new/a/b"}, 2) == []
    assert log.need(Op.WRITE, {"path": b"new/a/b", "offset": 0, "data": b"x"}, 3) == []
    assert log.need(Op.CHMOD, {"path": b"new/a/b"}, 4) == []
    assert log.need(Op.CREATE, {"path": b"newer"}, 5) == [Note(NAME, b"newer")]


def test_activity_need_ok_old_directory_covers_nothing_under_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    log = ActivityLog()
    noted(log, Op.MKDIR, 1, path=b"d")
    monkeypatch.setattr(activity.time, "monotonic",
                        lambda: log.names[b"d"].made + activity.NAME_COVER_SECONDS + 1)
    assert log.need(Op.CREATE, {"path": b"d/f"}, 2) == [Note(NAME, b"d/f")]
    assert log.need(Op.RMDIR, {"path": b"d"}, 3) == [], "its own name, whatever its age"


def test_activity_need_ok_name_covers_data_only_in_the_epoch_of_its_namespace_op() -> None:
    log = ActivityLog()
    noted(log, Op.CREATE, 1, path=b"f")
    write = {"path": b"f", "offset": 0, "data": b"x"}
    assert log.need(Op.WRITE, write, 12) == []
    log.reset(10)
    assert b"f" in log.names, "a write after the sync began used it: it stays"
    assert log.need(Op.WRITE, write, 11) == [Note(DATA, b"f", 0, EXTENT)], \
        "a file made before BACKING's last sync gets notes of its own"


def test_activity_need_ok_data_by_extent() -> None:
    log = ActivityLog()
    assert noted(log, Op.WRITE, 1, path=b"f", offset=EXTENT - 1, data=b"ab") == [
        Note(DATA, b"f", 0, 2 * EXTENT)]
    assert log.need(Op.WRITE, {"path": b"f", "offset": 5, "data": b"x" * EXTENT}, 2) == []
    assert log.need(Op.FALLOCATE, {"path": b"f", "offset": 3 * EXTENT, "length": 1}, 3) == [
        Note(DATA, b"f", 3 * EXTENT, 4 * EXTENT)]
    assert log.need(Op.WRITE, {"path": b"f", "offset": 0, "data": b""}, 4) == []


def test_activity_need_ok_notes_ahead_of_a_file_written_in_order() -> None:
    """Each note costs a journal flush before the write: a file written in order gets
    notes as far ahead as it wrote in a row, so 256 MiB written 1 MiB at a time
    waits for 7 flushes, not 64; a write elsewhere gets only its own extent."""
    log = ActivityLog()
    flushes = [offset for offset in range(0, 256 << 20, 1 << 20)
               if noted(log, Op.WRITE, 1, path=b"f", offset=offset, data=b"x" * (1 << 20))]
    assert [offset // EXTENT for offset in flushes] == [0, 1, 3, 7, 15, 31, 63]
    assert log.notes() == [Note(DATA, b"f", 0, 127 * EXTENT)]
    assert noted(log, Op.WRITE, 1, path=b"f", offset=200 * EXTENT, data=b"x") == [
        Note(DATA, b"f", 200 * EXTENT, 201 * EXTENT)]


def test_activity_need_ok_truncate_notes_to_the_end() -> None:
    log = ActivityLog()
    assert noted(log, Op.TRUNCATE, 1, path=b"f", size=EXTENT + 5) == [
        Note(DATA, b"f", EXTENT, END)]
    assert log.need(Op.WRITE, {"path": b"f", "offset": 100 * EXTENT, "data": b"x"}, 2) == []
    assert log.need(Op.TRUNCATE, {"path": b"f", "size": 1 << 40}, 3) == []
    assert log.need(Op.TRUNCATE, {"path": b"f", "size": 0}, 4) == [Note(DATA, b"f", 0, END)]


def test_activity_need_ok_attributes() -> None:
    log = ActivityLog()
    assert noted(log, Op.CHMOD, 1, path=b"") == [Note(ATTR, b"")]
    assert log.need(Op.UTIMES, {"path": b""}, 2) == []
    assert noted(log, Op.SETXATTR, 3, path=b"f", name=b"user.a") == [
        Note(XATTR, b"f", name=b"user.a")]
    assert log.need(Op.REMOVEXATTR, {"path": b"f", "name": b"user.a"}, 4) == []
    assert log.need(Op.REMOVEXATTR, {"path": b"f", "name": b"user.b"}, 5) == [
        Note(XATTR, b"f", name=b"user.b")]


def test_activity_under_name_ok() -> None:
    log = ActivityLog([Note(NAME, b"a/b")])
    assert log.under_name(b"a/b") and log.under_name(b"a/b/c/d")
    assert not log.under_name(b"a") and not log.under_name(b"a/bc")


def test_activity_under_name_ok_deep_path() -> None:
    deep = b"/".join([b"d"] * 500)
    log = ActivityLog([Note(NAME, deep[:99])])
    assert log.under_name(deep + b"/f")
    assert not ActivityLog([Note(NAME, b"e")]).under_name(deep)


def test_activity_reset_ok_keeps_a_file_changed_lately(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    clock = [1000.0]
    monkeypatch.setattr(activity.time, "monotonic", lambda: clock[0])
    log = ActivityLog()
    noted(log, Op.WRITE, 1, path=b"hot", offset=0, data=b"x")
    noted(log, Op.WRITE, 2, path=b"cold", offset=0, data=b"x")
    noted(log, Op.CHMOD, 3, path=b"cold")
    noted(log, Op.WRITE, 4, path=b"hot", offset=1, data=b"x")  # its note covers it
    assert log.reset(10) == [Note(DATA, b"hot", 0, EXTENT)], \
        "a file changed once lets its notes go: each reset journals every note kept"
    clock[0] += activity.RETAIN_SECONDS / 2
    assert log.need(Op.WRITE, {"path": b"hot", "offset": 1, "data": b"y"}, 11) == []
    assert log.reset(20) is None, "nothing dropped or added: nothing to journal"
    clock[0] += activity.RETAIN_SECONDS / 2
    assert log.reset(30) is None, "hot is kept: written again"
    clock[0] += activity.RETAIN_SECONDS
    assert log.reset(40) == []


def test_activity_reset_ok_always_keeps_what_an_op_after_the_sync_began_used() -> None:
    log = ActivityLog()
    noted(log, Op.WRITE, 15, path=b"f", offset=0, data=b"x")
    noted(log, Op.RENAME, 15, path=b"a", path2=b"b")
    assert log.reset(10, retain=False) == [Note(NAME, b"a"), Note(NAME, b"b"),
                                           Note(DATA, b"f", 0, EXTENT)]
    assert log.reset(16, retain=False) == []


def test_activity_reset_ok_young_directory_noted_again_once_a_sync(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A NAME note goes at the first reset no op needed it for; the next name made
    under a young directory notes the directory again, not the name."""
    log = ActivityLog()
    noted(log, Op.MKDIR, 1, path=b"d")
    made = log.names[b"d"].made
    assert log.need(Op.CREATE, {"path": b"d/f"}, 2) == []
    log.reset(10)
    assert b"d" not in log.names
    assert noted(log, Op.CREATE, 11, path=b"d/g") == [Note(NAME, b"d")]
    assert log.names[b"d"].made == made, "as young as it was"
    assert log.need(Op.RENAME, {"path": b"d/g", "path2": b"d/h"}, 12) == []
    assert log.need(Op.WRITE, {"path": b"d/h", "offset": 0, "data": b"x"}, 13) == []
    log.reset(20)
    assert noted(log, Op.WRITE, 21, path=b"d/h", offset=0, data=b"x") == [
        Note(DATA, b"d/h", 0, EXTENT)], "a write covers nothing made: it gets its own note"
    monkeypatch.setattr(activity.time, "monotonic",
                        lambda: made + activity.NAME_COVER_SECONDS + 1)
    log.reset(30)
    assert log.need(Op.CREATE, {"path": b"d/i"}, 31) == [Note(NAME, b"d/i")]


def test_activity_reset_ok_name_kept_while_an_op_after_the_sync_began_used_it() -> None:
    log = ActivityLog()
    noted(log, Op.MKDIR, 1, path=b"d")
    assert log.need(Op.CREATE, {"path": b"d/f"}, 12) == []
    log.reset(10)
    assert b"d" in log.names


def test_activity_notes_ok_compacted() -> None:
    log = ActivityLog()
    for offset in (0, EXTENT, 5 * EXTENT, 2 * EXTENT):
        noted(log, Op.WRITE, 1, path=b"f", offset=offset, data=b"x")
    assert log.notes() == [Note(DATA, b"f", 0, 3 * EXTENT), Note(DATA, b"f", 5 * EXTENT,
                                                                  6 * EXTENT)]
    assert ActivityLog(log.notes()).notes() == log.notes()


def test_activity_name_roots_ok() -> None:
    notes = [Note(NAME, b"a/b"), Note(NAME, b"a"), Note(NAME, b"c/d"), Note(DATA, b"e", 0, 1)]
    assert name_roots(notes) == [b"a", b"c/d"]


def test_activity_divergence_ok() -> None:
    div = divergence([Note(NAME, b"a"), Note(XATTR, b"x", name=b"user.k"),
                      Note(DATA, b"f", 0, 10), Note(DATA, b"f", 5, 20), Note(ATTR, b"g")])
    assert div.content == {b"a", b"x"}
    assert div.ranges == {b"f": [(0, 20)], b"g": []}
