"""The capture's write-ahead rule for the backing directory, and recovery after a power cut.

The capture runs here in this process, on a real backing directory and
journal, without a mount: each test calls ``record()`` as a handler does
and then does the op on BACKING itself. A power cut is the journal cut back
to what was durable, BACKING kept as it is, and a new boot id.
"""

from __future__ import annotations

import os
import stat
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from repl.activity import EXTENT
from repl.apply import apply
from repl.faults import ENV_BOOT_ID
from repl.primary import capture as capture_module
from repl.primary import recovery, unsynced
from repl.primary.capture import Capture
from repl.primary.unsynced import SYNCFS_FROM
from repl.tree import Tree
from store import libc
from store.journal import Journal
from store.notes import Note, NoteKind
from store.records import Op, Record
from tests.powercut.harness import simulator

MODE = stat.S_IFREG | 0o644


@pytest.fixture
def boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the capture reads the boot id from; ``reboot`` changes it."""
    path = tmp_path / "boot_id"
    path.write_text("first boot\n")
    monkeypatch.setenv(ENV_BOOT_ID, str(path))
    return path


def reboot(boot: Path) -> None:
    boot.write_text(f"{uuid.uuid4()}\n")


@contextmanager
def capturing(backing: Path, journal: Path, replicating: bool = True) -> Iterator[Capture]:
    """A capture over *backing*, recovered as the daemon does before it serves."""
    j, tree = Journal(journal), Tree(backing)
    try:
        capture = Capture(j, tree, secondaries=["beta:7070"] if replicating else ())
        recovery.recover(capture)
        yield capture
    finally:
        tree.close()
        j.close()


def power_cut(journal: Path, durable: int) -> None:
    """Everything the journal's log held past *durable* is lost (BACKING keeps all)."""
    (segment,) = sorted(journal.glob("*.log"))
    with open(segment, "r+b") as f:
        f.truncate(durable - int(segment.stem, 16))


def open_set(journal: Path) -> list[Record]:
    j = Journal(journal, read_only=True)
    try:
        return list(j.records(j.set))
    finally:
        j.close()


# --- the write-ahead rule ------------------------------------------------------------


def test_capture_record_ok_note_durable_before_the_op(tmp_path: Path, boot: Path) -> None:
    (tmp_path / "b").mkdir()
    with capturing(tmp_path / "b", tmp_path / "j") as capture:
        journal = capture.journal
        before = journal.end
        capture.record(Op.CREATE, path=b"f", mode=MODE, uid=0, gid=0)
        assert journal.notes == [Note(NoteKind.NAME, b"f")]
        assert before < journal.durable < journal.end, \
            "the note is durable before the op, the op's record need not be"
        durable = journal.durable
        capture.record(Op.UNLINK, path=b"f")  # covered by the note: no flush
        capture.write(b"g", 0, b"x")
        assert journal.notes == [Note(NoteKind.NAME, b"f"), Note(NoteKind.DATA, b"g", 0, EXTENT)]
        assert durable < journal.durable
        durable = journal.durable
        capture.write(b"g", 100, b"y")
        assert journal.durable == durable


def test_capture_record_ok_move_syncs_durable_writes_under_it(tmp_path: Path,
                                                               boot: Path) -> None:
    """A rename or unlink first syncs the files written since BACKING's last sync
    whose records may be durable: recovery after a power cut skips those records
    once a NAME note is above them."""
    with simulator(tmp_path / "lower", tmp_path / "disk") as sim:
        backing = sim.mountpoint / "b"
        backing.mkdir()
        with capturing(backing, tmp_path / "j") as capture:
            for name, flush in ((b"kept", False), (b"synced", True)):
                (backing / name.decode()).write_bytes(b"")
                capture.write(name, 0, b"data")
                os.truncate(backing / name.decode(), 0)
                with open(backing / name.decode(), "r+b") as f:
                    f.write(b"data")
                if flush:
                    capture.journal.sync()
                pending = sim.pending()["files"]
                capture.record(Op.RENAME, path=name, path2=name + b"2")
                os.rename(backing / name.decode(), backing / (name + b"2").decode())
                if flush:
                    assert sim.pending()["files"] == pending - 1, "synced before the rename"
                else:
                    assert sim.pending()["files"] == pending, \
                        "not durable, no flush under way: its next flush syncs BACKING first"


def test_capture_record_ok_flags_backing_sync_under_a_name_note(tmp_path: Path,
                                                                  boot: Path) -> None:
    """Records under a NAME note are skipped by recovery after a power cut, so the
    flush that makes one durable syncs BACKING first. The namespace op that made the
    note asked for that already; a record under it asks again, for a flush whose
    BACKING sync began before it (another thread's: here its flag is cleared by hand,
    as that sync does when it ends)."""
    backing = tmp_path / "b"
    (backing / "d").mkdir(parents=True)
    (backing / "plain").write_bytes(b"")
    with capturing(backing, tmp_path / "j") as capture:
        capture.record(Op.RENAME, path=b"d", path2=b"e")
        os.rename(backing / "d", backing / "e")
        (backing / "e" / "f").write_bytes(b"x")
        for path, flags in ((b"plain", False), (b"e/f", True)):
            capture.unsynced.namespace_changed = False
            capture.write(path, 0, b"x")
            end = capture.journal.end
            capture.wait_durable(end)
            assert (capture.backing_at >= end) is flags


# --- recovery ------------------------------------------------------------------------


def test_capture_recover_ok_power_cut_resends_what_the_journal_lost(tmp_path: Path,
                                                                     boot: Path) -> None:
    backing, journal = tmp_path / "b", tmp_path / "j"
    backing.mkdir()
    (backing / "old").write_bytes(b"o" * 100)
    with capturing(backing, journal) as capture:
        capture.close_set()
        capture.backing_sync.sync()
        capture.journal.sync()
        capture.record(Op.CREATE, path=b"new", mode=MODE, uid=os.getuid(), gid=os.getgid())
        (backing / "new").write_bytes(b"")
        capture.write(b"new", 0, b"made after the last flush")
        (backing / "new").write_bytes(b"made after the last flush")
        capture.write(b"old", 10, b"AHEAD")
        with open(backing / "old", "r+b") as f:
            f.seek(10)
            f.write(b"AHEAD")
        capture.record(Op.SETXATTR, path=b"old", name=b"user.k", data=b"v")
        os.setxattr(backing / "old", "user.k", b"v")
        durable = capture.journal.durable
    power_cut(journal, durable)
    reboot(boot)
    with capturing(backing, journal) as capture:
        assert capture.overflow, "the open set stays open until the secondary caught up"
        assert capture.journal.notes == []
        assert dict(capture.resync.dirty.files.items()) == {b"old": [(0, 100)]}, \
            "new is sent whole"
    records = open_set(journal)
    assert (Op.SETXATTR, b"old") not in [(r.op, r.path) for r in records[:-4]], \
        "the setxattr's own record was lost with the power"
    assert [(r.op, r.path) for r in records[-4:]] == [
        (Op.PRUNE, b"new"), (Op.FILE, b"new"), (Op.TRUNCATE, b"old"),
        (Op.SETXATTR, b"old")]
    assert records[-3].data == b"made after the last flush"
    assert (records[-2].size, records[-1].data) == (100, b"v")
    assert (backing / "old").read_bytes()[10:15] == b"AHEAD", "BACKING is not rolled back"


def test_capture_recover_ok_same_boot_resends_nothing(tmp_path: Path, boot: Path) -> None:
    """A crash of the daemon alone loses nothing of BACKING: the journal is enough."""
    backing, journal = tmp_path / "b", tmp_path / "j"
    backing.mkdir()
    with capturing(backing, journal) as capture:
        capture.record(Op.CREATE, path=b"f", mode=MODE, uid=os.getuid(), gid=os.getgid())
        (backing / "f").write_bytes(b"")
        assert capture.journal.notes
    with capturing(backing, journal) as capture:
        assert not capture.overflow
        assert capture.journal.notes == []
    assert Op.PRUNE not in [r.op for r in open_set(journal)]


@pytest.mark.parametrize("rebooted", [False, True])
def test_capture_recover_ok_records_under_a_name_note(tmp_path: Path, boot: Path,
                                                      rebooted: bool) -> None:
    """After a power cut, a durable record under a NAME note is not replayed: the path
    may name another file by then, and is resent whole as BACKING holds it. After a
    crash of the daemon alone, every record is replayed."""
    backing, journal = tmp_path / "b", tmp_path / "j"
    backing.mkdir()
    ids = {"uid": os.getuid(), "gid": os.getgid()}
    with capturing(backing, journal) as capture:
        capture.record(Op.MKDIR, path=b"d", mode=stat.S_IFDIR | 0o755, **ids)
        (backing / "d").mkdir()
        capture.record(Op.CREATE, path=b"d/f", mode=MODE, **ids)
        capture.write(b"d/f", 0, b"journaled")
        (backing / "d" / "f").write_bytes(b"journaled")
        capture.journal.sync()
        # A rename and a create that the d's note covered reached BACKING, and their
        # records were lost: "d/f" names another file now.
        (backing / "d" / "f").write_bytes(b"another file")
        durable = capture.journal.durable
    power_cut(journal, durable)
    if rebooted:
        reboot(boot)
    with capturing(backing, journal) as capture:
        assert capture.overflow is rebooted
    resent = [(r.op, r.path) for r in open_set(journal)][-3:]
    if rebooted:
        assert (backing / "d" / "f").read_bytes() == b"another file"
        assert resent == [(Op.PRUNE, b"d"), (Op.MKDIR, b"d"), (Op.FILE, b"d/f")]
    else:
        assert (backing / "d" / "f").read_bytes() == b"journaledile"
        assert (Op.PRUNE, b"d") not in resent


def test_capture_recover_ok_without_a_secondary_forgets_the_base(tmp_path: Path,
                                                                boot: Path) -> None:
    backing, journal = tmp_path / "b", tmp_path / "j"
    backing.mkdir()
    with capturing(backing, journal, replicating=False) as capture:
        capture.journal.base = 0
        capture.record(Op.CREATE, path=b"f", mode=MODE, uid=os.getuid(), gid=os.getgid())
        (backing / "f").write_bytes(b"")
    reboot(boot)
    with capturing(backing, journal, replicating=False) as capture:
        assert capture.journal.base is None, "the next secondary gets an initial sync"
        assert not capture.overflow


def test_capture_sync_backing_ok_clean_stop_leaves_no_notes(tmp_path: Path,
                                                           boot: Path) -> None:
    backing, journal = tmp_path / "b", tmp_path / "j"
    backing.mkdir()
    with capturing(backing, journal) as capture:
        capture.write(b"f", 0, b"x")
        capture.write(b"f", 1, b"y")
        capture.backing_sync.sync()
        assert capture.journal.notes, "a file written lately, and again, keeps its note"
        capture.write(b"f", 2, b"z")
        capture.backing_sync.sync(final=True)
        assert capture.journal.notes == []
    reboot(boot)
    with capturing(backing, journal) as capture:
        assert not capture.overflow, "a clean stop: nothing to resend"


def test_capture_closer_ok_waits_an_interval_while_the_set_stays_open(
        tmp_path: Path, boot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over budget the open set stays open; the closer tries again an interval
    later, not at once (it spun, taking the lock, for as long as that lasted)."""
    backing = tmp_path / "b"
    backing.mkdir()
    (backing / "f").write_bytes(b"")
    with capturing(backing, tmp_path / "j") as capture:
        capture.set_interval = 0.05
        capture.resync.begin_overflow()
        capture.record(Op.UTIMES, path=b"f", atime_ns=1, mtime_ns=1)
        tries: list[int] = []
        close_set = capture.close_set
        monkeypatch.setattr(capture, "close_set",
                            lambda: (tries.append(close_set()), tries[-1])[1])

        async def closing() -> None:
            with trio.move_on_after(0.5):
                await capture._closer()

        trio.run(closing)
        assert not capture.journal.set_is_empty, "the set stayed open"
        assert 1 <= len(tries) <= 20


def write_files(capture: Capture, backing: Path, count: int) -> None:
    """*count* new files written as a write handler does: journaled, then tracked."""
    for i in range(count):
        capture.write(b"f%d" % i, 0, b"data")
        fd = os.open(backing / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"data")
            capture.track(fd)
        finally:
            os.close(fd)


def test_capture_sync_backing_ok_many_files_one_syncfs(tmp_path: Path, boot: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SYNCFS_FROM changed files, a BACKING sync is one syncfs, not an fsync a
    file (each fsync flushes the disk's cache)."""
    calls: list[str] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(unsynced, "syncfs",
                        lambda fd: (calls.append("syncfs"), libc.syncfs(fd))[1])
    backing = tmp_path / "b"
    backing.mkdir()
    with capturing(backing, tmp_path / "j") as capture:
        for count, expected in ((SYNCFS_FROM - 1, ["fsync"] * (SYNCFS_FROM - 1)),
                                (SYNCFS_FROM, ["syncfs"])):
            write_files(capture, backing, count)
            calls.clear()
            capture.backing_sync.sync()
            assert calls == expected


def test_capture_sync_backing_ok_fuse_backing_fsyncs_each_file(tmp_path: Path,
                                                                boot: Path) -> None:
    """A FUSE filesystem's daemon is never told of a syncfs: BACKING there is synced
    one fsync a file, however many changed."""
    with simulator(tmp_path / "lower", tmp_path / "disk") as sim:
        backing = sim.mountpoint / "b"
        backing.mkdir()
        with capturing(backing, tmp_path / "j") as capture:
            write_files(capture, backing, SYNCFS_FROM * 2)
            assert sim.pending()["files"] == SYNCFS_FROM * 2
            capture.backing_sync.sync()
            assert sim.pending()["files"] == 0


def test_capture_recover_ok_power_cut_sends_no_user_xattr_op_for_a_symlink(
        tmp_path: Path, boot: Path) -> None:
    """An xattr note on a name that is a symlink by the cut (user xattrs live on files
    and directories only) sends nothing: a REMOVEXATTR of it is EPERM on the replica,
    which would retry the set forever."""
    backing, journal = tmp_path / "b", tmp_path / "j"
    backing.mkdir()
    (backing / "l").symlink_to("elsewhere")
    (backing / "f").write_bytes(b"")
    with capturing(backing, journal) as capture:
        capture.close_set()
        capture.backing_sync.sync()
        capture.journal.sync()
        for path in (b"l", b"f"):
            capture.void(capture.record(Op.REMOVEXATTR, path=path, name=b"user.k"))
        durable = capture.journal.durable
    power_cut(journal, durable)
    reboot(boot)
    with capturing(backing, journal):
        pass
    sent = [(r.op, r.path) for r in open_set(journal) if r.op == Op.REMOVEXATTR]
    assert sent == [(Op.REMOVEXATTR, b"f")], "the file's note is sent, the symlink's is not"


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_capture_recover_ok_power_cut_resends_a_linked_node_as_one_inode(
        tmp_path: Path, boot: Path, kind: str) -> None:
    """A symlink or a fifo with two names, one of them noted, is resent as one inode:
    made under its first name and linked to the other, as the primary has it."""
    backing, journal = tmp_path / "b", tmp_path / "j"
    backing.mkdir()
    if kind == "symlink":
        (backing / "s").symlink_to("elsewhere")
    else:
        os.mkfifo(backing / "s")
    with capturing(backing, journal) as capture:
        capture.close_set()
        capture.backing_sync.sync()
        capture.journal.sync()
        capture.record(Op.LINK, path=b"s", path2=b"t")
        os.link(backing / "s", backing / "t", follow_symlinks=False)
        durable = capture.journal.durable
    power_cut(journal, durable)
    reboot(boot)
    with capturing(backing, journal):
        pass
    made = Op.SYMLINK if kind == "symlink" else Op.MKNOD
    resent = [(r.op, r.path, r.path2) for r in open_set(journal)
              if r.op in (Op.PRUNE, made, Op.LINK)]
    assert resent == [(Op.PRUNE, b"s", b""), (made, b"s", b""), (Op.PRUNE, b"t", b""),
                      (Op.LINK, b"s", b"t")]


def test_capture_recover_ok_power_cut_resends_a_file_linked_into_a_noted_directory(
        tmp_path: Path, boot: Path) -> None:
    """A noted directory holds a second name of a file named outside it too: the file
    is resent as one inode, both names linked to it."""
    backing, journal = tmp_path / "b", tmp_path / "j"
    backing.mkdir()
    (backing / "g").write_bytes(b"one file, two names")
    ids = {"uid": os.getuid(), "gid": os.getgid()}
    with capturing(backing, journal) as capture:
        capture.close_set()
        capture.backing_sync.sync()
        capture.journal.sync()
        capture.record(Op.MKDIR, path=b"d", mode=stat.S_IFDIR | 0o755, **ids)
        (backing / "d").mkdir()
        capture.record(Op.LINK, path=b"g", path2=b"d/f")
        os.link(backing / "g", backing / "d" / "f")
        durable = capture.journal.durable
    power_cut(journal, durable)
    reboot(boot)
    with capturing(backing, journal):
        pass
    made = [(r.op, r.path, r.path2) for r in open_set(journal)
            if r.op in (Op.FILE, Op.LINK)]
    assert made in ([(Op.FILE, b"d/f", b""), (Op.LINK, b"d/f", b"g")],
                    [(Op.FILE, b"g", b""), (Op.LINK, b"g", b"d/f")])


def test_capture_restates_times_ok_notes_the_change(tmp_path: Path, boot: Path) -> None:
    """A times change the set's close restates needs no record, but the activity log
    notes it all the same: BACKING may hold it after a power cut."""
    backing = tmp_path / "b"
    backing.mkdir()
    (backing / "f").write_bytes(b"")
    with capturing(backing, tmp_path / "j") as capture:
        assert not capture.restates_times(b"f"), "not touched in the open set"
        capture.write(b"f", 0, b"x")
        assert Note(NoteKind.ATTR, b"f") not in capture.journal.notes
        assert capture.restates_times(b"f")
        assert Note(NoteKind.ATTR, b"f") in capture.journal.notes
        assert capture.journal.durable == capture.journal.end, "noted before the change"


def test_capture_checkpoint_ok_over_budget_waits_only_for_a_set_that_will_close(
        tmp_path: Path, boot: Path) -> None:
    """Over budget, a checkpoint names the open set, which the resync closes; but an
    open set that holds nothing, with no written range waiting, never closes: the
    checkpoint names the set before it (a checkpoint that named it waited forever)."""
    backing = tmp_path / "b"
    backing.mkdir()
    with capturing(backing, tmp_path / "j") as capture:
        capture.write(b"f", 0, b"x")
        (backing / "f").write_bytes(b"x")
        closed = trio.run(capture.checkpoint)
        capture.resync.begin_overflow()
        assert trio.run(capture.checkpoint) == closed, "nothing is pending"
        capture.write(b"f", 1, b"y")  # over budget: a dirty range, not a record
        assert capture.journal.set_is_empty and capture.resync.dirty
        assert trio.run(capture.checkpoint) == closed + 1, "the resync closes the open set"


# --- the flusher's tick ----------------------------------------------------------------


async def test_flusher_ok_ticks_fast_while_it_finds_records_slowly_when_idle(
        tmp_path: Path, boot: Path, autojump_clock: trio.abc.Clock) -> None:
    """Records are flushed within OPEN_FLUSH_SECONDS while they keep coming, so the
    sender ships a set as it is written; a flusher that found none for
    IDLE_AFTER_SECONDS ticks every IDLE_FLUSH_SECONDS, so an idle daemon sleeps."""
    (tmp_path / "backing").mkdir()
    with capturing(tmp_path / "backing", tmp_path / "journal") as capture:
        flushes: list[float] = []
        flush = trio.Event()

        async def durable() -> None:  # in trio's thread: the times stay the mock clock's
            nonlocal flush
            flushes.append(trio.current_time())
            capture.wait_durable(capture.journal.end)
            flush.set()
            flush = trio.Event()

        capture.durable = durable  # type: ignore[method-assign]

        async def flushed(count: int) -> float:
            if len(flushes) < count:
                await flush.wait()
            assert len(flushes) == count
            return flushes[-1]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(capture._flusher)
            capture.record(Op.MKDIR, path=b"a", mode=stat.S_IFDIR | 0o755, uid=0, gid=0)
            first = await flushed(1)
            assert first == pytest.approx(capture_module.IDLE_FLUSH_SECONDS, abs=0.002)
            capture.record(Op.MKDIR, path=b"b", mode=stat.S_IFDIR | 0o755, uid=0, gid=0)
            busy = await flushed(2) - first
            assert busy <= capture_module.OPEN_FLUSH_SECONDS + 0.002, "a tick that found records"
            await trio.sleep(capture_module.IDLE_AFTER_SECONDS + 1.05)  # between two ticks
            asked = trio.current_time()
            capture.record(Op.MKDIR, path=b"c", mode=stat.S_IFDIR | 0o755, uid=0, gid=0)
            idle = await flushed(3) - asked
            assert capture_module.OPEN_FLUSH_SECONDS < idle <= capture_module.IDLE_FLUSH_SECONDS
            nursery.cancel_scope.cancel()


def test_capture_resend_ok_keeps_set_id_bits(tmp_path: Path, boot: Path) -> None:
    """A resent file's owner goes before its mode: applied the other way round, the
    chown clears the set-id bits the mode gives."""
    backing, replica = tmp_path / "b", tmp_path / "r"
    for root in (backing, replica):
        root.mkdir()
        (root / "f").write_bytes(b"#!/bin/sh\n")
    os.chmod(backing / "f", 0o4750)
    with capturing(backing, tmp_path / "j") as capture:
        capture.resync.resend([Note(NoteKind.ATTR, b"f")])
        capture.journal.sync()
    tree = Tree(replica)
    try:
        for record in open_set(tmp_path / "j"):
            if record.op in (Op.CHOWN, Op.CHMOD):
                apply(tree, record)
    finally:
        tree.close()
    assert stat.S_IMODE(os.stat(replica / "f").st_mode) == 0o4750


def test_capture_resend_ok_keeps_a_file_capability(tmp_path: Path, boot: Path) -> None:
    """A resent file's extended attributes go after its owner, whatever the order of
    the notes: a chown removes a file capability (security.capability)."""
    backing, replica = tmp_path / "b", tmp_path / "r"
    cap = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # v2, effective, CAP_NET_RAW
    for root in (backing, replica):
        root.mkdir()
        (root / "f").write_bytes(b"#!/bin/sh\n")
    os.setxattr(backing / "f", "security.capability", cap)
    with capturing(backing, tmp_path / "j") as capture:
        capture.resync.resend([Note(NoteKind.XATTR, b"f", name=b"security.capability"),
                               Note(NoteKind.ATTR, b"f")])
        capture.journal.sync()
    tree = Tree(replica)
    try:
        for record in open_set(tmp_path / "j"):
            if record.op in (Op.CHOWN, Op.CHMOD, Op.SETXATTR):
                apply(tree, record)
    finally:
        tree.close()
    assert os.getxattr(replica / "f", "security.capability") == cap


def test_capture_void_ok_a_failed_write_has_its_times_restated(tmp_path: Path,
                                                                boot: Path) -> None:
    """A write that fails (ENOSPC) moves the file's times on BACKING all the same (the
    kernel stamps them before it looks for room): its void leaves no write, and the
    close restates the times BACKING has, or the replica keeps the old ones."""
    backing = tmp_path / "b"
    backing.mkdir()
    (backing / "f").write_bytes(b"old")
    with capturing(backing, tmp_path / "j") as capture:
        capture.close_set()
        with pytest.raises(OSError), capture.applying(Op.WRITE, b"f", offset=3, data=b"x"):
            os.utime(backing / "f", ns=(1, 2_000_000_000))  # what the failed write stamped
            raise OSError(28, "No space left on device")
        closed = capture.close_set()
        records = list(capture.journal.records(closed))
    assert [(r.op, r.path) for r in records if r.op != Op.SYNC] == \
        [(Op.VOID, b""), (Op.UTIMES, b"f")]
    assert records[1].mtime_ns == 2_000_000_000
