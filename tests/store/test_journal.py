"""The primary journal: positions, restart, void/put, intents, trim, reading, the lock."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from store import wal
from store.errors import JournalLocked, RecordError, StoreError
from store.journal import Journal
from store.notes import Note, NoteKind
from store.records import RENAME_EXCHANGE, Op, Record, encode_intent
from store.wal import VECTOR_BYTES
from tests.support import ROOT, tmpfs


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    with opened(path) as j:
        yield j


def opened(path: Path) -> closing[Journal]:
    """The journal at *path*, open for one daemon's lifetime (reopen = a restart)."""
    return closing(Journal(path))


def write(j: Journal, n: int = 1) -> list[Record]:
    return [j.append(Op.WRITE, path=b"f", offset=i, data=b"x") for i in range(n)]


def positions(j: Journal) -> list[tuple[int, int, Op]]:
    return [(r.set, r.seq, r.op) for r in j.records()]


# --- positions -----------------------------------------------------------------


def test_journal_append_ok_dense_seqs(journal: Journal) -> None:
    assert (journal.set, journal.seq) == (1, 0)
    assert journal.set_is_empty
    records = write(journal, 3)
    assert [(r.set, r.seq) for r in records] == [(1, 0), (1, 1), (1, 2)]
    assert (journal.set, journal.seq) == (1, 3)
    assert not journal.set_is_empty
    assert list(journal.records()) == records


def test_journal_close_set_ok_starts_next_set(journal: Journal) -> None:
    write(journal, 2)
    assert journal.close_set() == 1
    assert (journal.set, journal.seq, journal.set_bytes) == (2, 0, 0)
    write(journal, 1)
    assert journal.close_set() == 2
    assert positions(journal) == [(1, 0, Op.WRITE), (1, 1, Op.WRITE), (1, 2, Op.SYNC),
                                  (2, 0, Op.WRITE), (2, 1, Op.SYNC)]
    assert [r.count for r in journal.records() if r.op == Op.SYNC] == [2, 1]


def test_journal_append_err_invalid_record(journal: Journal) -> None:
    write(journal, 1)
    with pytest.raises(RecordError, match=r"'\.\.' component"):
        journal.append(Op.UNLINK, path=b"../etc/passwd")
    assert (journal.set, journal.seq) == (1, 1), "a refused record takes no seq"
    assert len(list(journal.records())) == 1


# --- restart ---------------------------------------------------------------------


def test_journal_open_ok_fresh(path: Path) -> None:
    with opened(path):
        pass
    with opened(path) as j:
        assert (j.set, j.seq) == (1, 0)
        assert j.last() is None


def test_journal_open_ok_resumes_open_set(path: Path) -> None:
    with opened(path) as j:
        write(j, 2)
        j.close_set()
        write(j, 3)
    with opened(path) as j:
        assert (j.set, j.seq) == (2, 3)
        assert not j.set_is_empty
        assert (j.append(Op.UNLINK, path=b"f").set, j.seq) == (2, 4)


def test_journal_open_ok_after_sync(path: Path) -> None:
    with opened(path) as j:
        write(j, 2)
        j.close_set()
    with opened(path) as j:
        assert (j.set, j.seq) == (2, 0)
        assert j.set_is_empty


def test_journal_open_ok_after_trim_of_everything(path: Path) -> None:
    with opened(path) as j:
        write(j, 2)
        j.close_set()
        write(j, 1)
        j.close_set()
        assert j.trim(2) == 5
    for _ in range(2):  # the position survives restarts with no records at all
        with opened(path) as j:
            assert (j.set, j.seq) == (3, 0)
    with opened(path) as j:
        record = j.append(Op.UNLINK, path=b"f")
        assert (record.set, record.seq) == (3, 0)


def test_journal_open_ok_after_trim_with_open_set(path: Path) -> None:
    with opened(path) as j:
        write(j, 2)
        j.close_set()
        write(j, 2)
        j.trim(1)
    with opened(path) as j:
        assert (j.set, j.seq) == (2, 2)
        assert positions(j) == [(2, 0, Op.WRITE), (2, 1, Op.WRITE)]


def test_journal_open_ok_after_trim_of_older_set(path: Path) -> None:
    with opened(path) as j:
        for _ in range(3):
            write(j, 1)
            j.close_set()
        j.trim(1)
    with opened(path) as j:
        assert (j.set, j.seq) == (4, 0)


def test_journal_open_ok_after_trim_past_the_end(path: Path) -> None:
    with opened(path) as j:
        write(j, 1)
        j.close_set()
        j.trim(9)
    with opened(path) as j:
        assert (j.set, j.seq) == (10, 0)


# --- void and put -------------------------------------------------------------------


def test_journal_put_ok_void(path: Path) -> None:
    with opened(path) as j:
        first, second = write(j, 2)
        j.put(first.voided())
        assert positions(j) == [(1, 0, Op.VOID), (1, 1, Op.WRITE)]
        assert (j.set, j.seq) == (1, 2), "a void keeps its seq"
    with opened(path) as j:
        assert (j.set, j.seq) == (1, 2)
        assert list(j.records())[1] == second


def test_journal_put_ok_last_record_voided(path: Path) -> None:
    with opened(path) as j:
        (record,) = write(j, 1)
        j.put(record.voided())
        assert j.last() == Record(Op.VOID, 1, 0)
    with opened(path) as j:
        assert (j.set, j.seq) == (1, 1), "a voided last record still holds its seq"


def test_journal_put_ok_shortened_write(journal: Journal) -> None:
    record = journal.append(Op.WRITE, path=b"f", offset=10, data=b"abcdef")
    short = Record(Op.WRITE, record.set, record.seq, path=b"f", offset=10, data=b"abc")
    journal.put(short)
    assert list(journal.records()) == [short]


def test_journal_put_err_invalid(journal: Journal) -> None:
    (record,) = write(journal, 1)
    with pytest.raises(RecordError):
        journal.put(Record(Op.WRITE, record.set, record.seq, path=b"/abs", data=b"x"))
    assert list(journal.records()) == [record]


# --- intents ---------------------------------------------------------------------------


def exchange(j: Journal, intent: bytes | None) -> Record:
    return j.append(Op.RENAME, intent, path=b"a", path2=b"b", flags=RENAME_EXCHANGE)


def test_journal_intent_ok_own_record(path: Path) -> None:
    intent = encode_intent(11, 22)
    with opened(path) as j:
        before = write(j, 1)[0]
        record = exchange(j, intent)
        assert j.intent(record) == intent
        assert j.intent(before) is None
        after = write(j, 1)[0]
        assert j.intent(after) is None, "a later record without intent does not inherit it"
        assert j.intent(record) == intent
    with opened(path) as j:
        assert j.intent(record) == intent, "the intent survives a restart"


def test_journal_intent_ok_replaced_by_next(journal: Journal) -> None:
    first = exchange(journal, encode_intent(1, 2))
    second = exchange(journal, encode_intent(3, 4))
    assert journal.intent(first) is None, "only the last intent is kept"
    assert journal.intent(second) == encode_intent(3, 4)


def test_journal_intent_ok_same_seq_other_set(journal: Journal) -> None:
    record = exchange(journal, encode_intent(5, 6))
    journal.close_set()
    other = write(journal, 1)[0]
    assert (other.set, other.seq) == (record.set + 1, record.seq)
    assert journal.intent(other) is None


def test_journal_intent_ok_none_given(journal: Journal) -> None:
    record = exchange(journal, None)
    assert journal.intent(record) is None


# --- trim and reading -----------------------------------------------------------------


def test_journal_trim_ok(journal: Journal) -> None:
    for n in (2, 1, 3):
        write(journal, n)
        journal.close_set()
    write(journal, 1)
    assert journal.trim(0) == 0
    assert journal.trim(2) == 5
    assert {r.set for r in journal.records()} == {3, 4}
    assert journal.trim(2) == 0
    assert journal.trim(3) == 4
    assert positions(journal) == [(4, 0, Op.WRITE)]
    assert (journal.set, journal.seq) == (4, 1)


def test_journal_trim_ok_shrinks(journal: Journal) -> None:
    for _ in range(50):
        journal.append(Op.WRITE, path=b"f", offset=0, data=os.urandom(4096))
    journal.close_set()
    full = journal.size()
    assert full >= 50 * 4096
    journal.trim(1)
    assert journal.size() < full // 10


def test_journal_records_ok_from_start(journal: Journal) -> None:
    for _ in range(3):
        write(journal, 2)
        journal.close_set()
    everything = list(journal.records())
    assert len(everything) == 9
    assert list(journal.records(2)) == everything[3:]
    assert list(journal.records(2, 1)) == everything[4:]
    assert list(journal.records(2, 99)) == everything[6:], "past a set's end: the next set"
    assert list(journal.records(4)) == []
    assert list(journal.records(0, 0)) == everything


def test_journal_last_ok(journal: Journal) -> None:
    assert journal.last() is None
    write(journal, 2)
    journal.close_set()
    last = journal.last()
    assert last is not None
    assert (last.op, last.set, last.seq, last.count) == (Op.SYNC, 1, 2, 2)


def test_journal_read_raw_ok_durable_records_only(journal: Journal) -> None:
    """Shipping sees a record only once a sync made it durable: a power cut of the
    primary never takes back what a secondary holds."""
    write(journal, 2)
    journal.close_set()
    assert journal.read_raw(0, 0, 1 << 20) == []
    assert journal.sync() == journal.end == journal.durable
    assert [(s, q) for s, q, _ in journal.read_raw(0, 0, 1 << 20)] == [(1, 0), (1, 1), (1, 2)]
    write(journal, 1)
    assert len(journal.read_raw(0, 0, 1 << 20)) == 3


@pytest.mark.parametrize("size", [VECTOR_BYTES - 100, VECTOR_BYTES, (1 << 20) + 7])
def test_journal_append_ok_large_write_from_its_pieces(path: Path, size: int) -> None:
    """A large record goes to the log from its pieces, unjoined: the bytes read back,
    shipped and replayed after a restart are its encoding all the same."""
    data = os.urandom(size)
    with opened(path) as j:
        small = j.append(Op.WRITE, path=b"f", offset=0, data=b"x")
        large = j.append(Op.WRITE, path=b"d/f", offset=1 << 40, data=data)
        j.append(Op.TRUNCATE, path=b"f", size=3)
        j.close_set()
        j.sync()
        assert [raw for _, _, raw in j.read_raw(0, 0, 4 << 20)][:2] == [small.encode(),
                                                                         large.encode()]
    with opened(path) as j:
        replayed = list(j.records())
    assert replayed[1] == large
    assert [r.op for r in replayed] == [Op.WRITE, Op.WRITE, Op.TRUNCATE, Op.SYNC]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A filesystem of 12 MiB: the log's reserve (1 MiB) and a little more."""
    with tmpfs(tmp_path / "small", "12m") as where:
        yield where


def test_journal_append_err_full_disk_leaves_the_log_as_it_was(small_disk: Path) -> None:
    """A large write the disk has no room for raises ENOSPC and leaves nothing of
    itself behind: the journal takes the next record and reopens without it."""
    with opened(small_disk / "journal") as j:
        first = j.append(Op.WRITE, path=b"f", offset=0, data=b"x")
        with pytest.raises(OSError) as raised:
            j.append(Op.WRITE, path=b"f", offset=0, data=os.urandom(16 << 20))
        assert raised.value.errno == errno.ENOSPC
        after = j.append(Op.WRITE, path=b"f", offset=1, data=b"y")
        assert (after.set, after.seq) == (first.set, first.seq + 1)
    with opened(small_disk / "journal") as j:
        assert list(j.records()) == [first, after]


def fill(j: Journal) -> int:
    """Append writes (as a resync does: not spare) until the disk has no room even for a
    small one; how many went in."""
    count = 0
    for size in (1 << 18, 1 << 10, 0):
        while True:
            try:
                j.append(Op.WRITE, spare=False, path=b"big", offset=count, data=bytes(size))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            count += 1
            assert count < 20_000, "the disk never filled"
    return count


def test_journal_append_ok_full_disk_takes_what_frees_space(small_disk: Path) -> None:
    """On a full disk what frees space, the writes the kernel took and a set's close
    are still journaled, in the room the reserve leaves; what takes new room fails
    with ENOSPC until there is room again, even though the reserve's room is free, and
    the journal says it has none (an fsync fails); then the reserve is made again."""
    (small_disk / "ballast").write_bytes(bytes(6 << 20))  # room, to make outside the journal
    with opened(small_disk / "journal") as j:
        reserve = small_disk / "journal" / "reserve"
        assert reserve.stat().st_mode & 0o777 == 0o600
        assert reserve.stat().st_blocks * 512 >= 1 << 20
        assert fill(j) > 0
        gone = j.append(Op.UNLINK, path=b"d/" * 30 + b"big")  # larger than the last write
        assert reserve.stat().st_size == 0, "given up"
        took = j.append(Op.WRITE, path=b"f", offset=0, data=bytes(100_000))
        j.append(Op.UTIMES, path=b"", atime_ns=1, mtime_ns=2)
        closed = j.close_set()
        assert not j.room()
        with pytest.raises(OSError) as raised:
            j.append(Op.CREATE, path=b"new", mode=0o100644, uid=0, gid=0)
        assert raised.value.errno == errno.ENOSPC
        assert (j.set, j.seq) == (closed + 1, 0), "nothing of it journaled"
        (small_disk / "ballast").unlink()  # room, made outside the journal
        assert j.room()
        made = j.append(Op.CREATE, path=b"new", mode=0o100644, uid=0, gid=0)
        assert reserve.stat().st_blocks * 512 >= 1 << 20, "made again"
    assert reserve.stat().st_size == 0, "a clean close gives the room back"
    with opened(small_disk / "journal") as j:
        records = list(j.records())
        assert gone in records and took in records and made in records
        assert reserve.stat().st_blocks * 512 >= 1 << 20, "and the next open takes it"


# --- power cuts: the log ends at its last whole entry ------------------------------


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.log"))


@pytest.mark.parametrize("cut", ["torn-tail", "zeroed-page", "lost-size"])
def test_journal_open_ok_after_power_cut(path: Path, cut: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Whatever a cut did to the bytes after the last sync, the journal reopens at
    a prefix that holds every synced record, and appends go on from there. A log cut
    off in a damaged entry says so (on a disk that damaged it, it is the only word)."""
    with opened(path) as j:
        write(j, 3)
        j.close_set()
        synced = j.sync()
        for _ in range(20):
            j.append(Op.WRITE, path=b"g", offset=0, data=os.urandom(1000))
        size = j.end  # the file goes on in zeros written ahead (store/wal.py)
    (segment,) = segments(path)
    with open(segment, "r+b") as f:
        if cut == "torn-tail":
            f.truncate(size - 7)
        elif cut == "zeroed-page":  # a page in the middle of the unsynced tail never landed
            f.seek(synced + 4096)
            f.write(bytes(4096))
        else:  # the size reached the disk, the last pages did not: zeros
            f.truncate(synced)
            f.truncate(size)
    with opened(path) as j:
        found = positions(j)
        cut_off = [r.getMessage() for r in caplog.records if "was cut off" in r.getMessage()]
        assert cut_off == ([] if j.log.torn is None else
                           [f"the journal's log ended in a damaged or unfinished entry at "
                            f"position {j.log.torn} and was cut off there, in set 2: after a "
                            "power cut, that is what was never made durable; otherwise the "
                            "disk damaged it"])
        assert cut != "torn-tail" or cut_off
        assert found[:4] == [(1, 0, Op.WRITE), (1, 1, Op.WRITE), (1, 2, Op.WRITE),
                             (1, 3, Op.SYNC)]
        assert all(s == 2 and op == Op.WRITE for s, _, op in found[4:])
        assert len(found) < 24 or cut == "never"
        assert (j.set, j.seq) == (2, len(found) - 4)
        record = j.append(Op.UNLINK, path=b"h")
        j.sync()
    with opened(path) as j:
        assert j.last() == record, "the cut-off tail was removed, so new entries count"


def test_journal_open_ok_zeros_after_the_last_entry_are_its_end(path: Path) -> None:
    """Small entries go into zeros written ahead of them (store/wal.py): those zeros
    end the log cleanly, neither torn nor records, and stay for the next appends."""
    with opened(path) as j:
        write(j, 3)
        j.close_set()
        end = j.end
    (segment,) = segments(path)
    size = segment.stat().st_size
    assert size > end, "zeros were written ahead of the last entry"
    assert segment.read_bytes()[end:] == bytes(size - end)
    with opened(path) as j:
        assert positions(j) == [(1, 0, Op.WRITE), (1, 1, Op.WRITE), (1, 2, Op.WRITE),
                                (1, 3, Op.SYNC)]
        assert j.log.torn is None
        assert j.end == end
        assert segment.stat().st_size == size, "nothing was cut off"
        record = j.append(Op.UNLINK, path=b"h")
        assert segment.stat().st_size == size, "the entry went into the zeros"
    with opened(path) as j:
        assert j.last() == record


def test_journal_open_ok_segments_ending_in_zeros(path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment left for the next one ends in the zeros written ahead of it: the
    log goes on in the next segment, none is dropped."""
    monkeypatch.setattr("store.wal.SEGMENT_BYTES", 16 << 10)
    with opened(path) as j:
        for _ in range(8):
            j.append(Op.WRITE, path=b"f", offset=0, data=os.urandom(4000))
            j.close_set()
        written = positions(j)
    assert len(segments(path)) > 2
    assert all(s.stat().st_size > 16 << 10 for s in segments(path)), "each ends in zeros"
    with opened(path) as j:
        assert positions(j) == written
        assert j.log.torn is None


def test_journal_trim_ok_segments_leave_at_once_and_are_removed_aside(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trim takes the segments it empties out of the log at once (renamed, out of
    the caller's way); a thread removes them; one a stop left is removed at the
    next open, and never replayed."""
    monkeypatch.setattr("store.wal.SEGMENT_BYTES", 16 << 10)
    removing, remove = threading.Event(), wal._remove

    def gated(paths: list[Path]) -> None:
        if paths:
            removing.wait(10)
        remove(paths)

    monkeypatch.setattr("store.wal._remove", gated)
    with opened(path) as j:
        for _ in range(8):
            j.append(Op.WRITE, path=b"f", offset=0, data=os.urandom(4000))
            j.close_set()
        before = segments(path)
        j.trim(6)  # returns while the removal waits
        kept = segments(path)
        assert kept and len(kept) < len(before) and set(kept) < set(before)
        assert len(list(path.glob("*.dead"))) == len(before) - len(kept)
        removing.set()
        assert j.log.remover is not None
        j.log.remover.join(10)
        assert not list(path.glob("*.dead")), "removed"
        written = positions(j)
    assert written and min(set_id for set_id, _, _ in written) == 7
    leftover = path / f"{0:016x}.dead"
    leftover.write_bytes(before[0].name.encode())  # a stop before the thread removed it
    with opened(path) as j:
        assert positions(j) == written
    assert not leftover.exists()


def test_journal_notes_ok(path: Path) -> None:
    """Notes added after a reset add to it; a reset replaces all; a reopen reads them."""
    name, data = Note(NoteKind.NAME, b"d"), Note(NoteKind.DATA, b"f", 0, 1 << 22)
    with opened(path) as j:
        assert j.notes == []
        j.add_notes([name])
        j.reset_notes([data])
        j.add_notes([name, Note(NoteKind.ATTR, b"")])
    with opened(path) as j:
        assert j.notes == [data, name, Note(NoteKind.ATTR, b"")]
        j.reset_notes([])
    with opened(path) as j:
        assert j.notes == []


def test_journal_notes_ok_after_power_cut(path: Path) -> None:
    """A reset torn by a cut leaves the notes before it in force, never part of it."""
    with opened(path) as j:
        j.add_notes([Note(NoteKind.NAME, b"a")])
        synced = j.sync()
        j.reset_notes([Note(NoteKind.NAME, b"b"), Note(NoteKind.NAME, b"c")])
        size = j.end  # the file goes on in zeros written ahead (store/wal.py)
    (segment,) = segments(path)
    with open(segment, "r+b") as f:
        f.truncate(size - 1)
    with opened(path) as j:
        assert j.end == synced
        assert j.notes == [Note(NoteKind.NAME, b"a")]


def test_journal_is_last_entry_ok(journal: Journal) -> None:
    first, second = write(journal, 2)
    assert journal.is_last_entry(second) and not journal.is_last_entry(first)
    journal.add_notes([Note(NoteKind.NAME, b"x")])
    assert not journal.is_last_entry(second), "anything journaled after it counts"
    journal.put(second.voided())
    assert journal.is_last_entry(second.voided())
    assert not journal.is_last_entry(Record(Op.WRITE, 9, 0, path=b"f"))


def test_journal_open_ok_rotated_segments_keep_meta_and_dirty(path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Meta values, the dirty map and the notes are written again at each new
    segment's head, so trimming away the old segments loses none of them."""
    monkeypatch.setattr("store.wal.SEGMENT_BYTES", 16 << 10)
    with opened(path) as j:
        j.base = 0
        j.put_meta(b"overflow", b"1")
        j.put_dirty(b"d/f", [(0, 10), (20, 30)])
        j.reset_notes([Note(NoteKind.NAME, b"old")])
        j.add_notes([Note(NoteKind.DATA, b"f", 0, 4096)])
        for _ in range(8):
            j.append(Op.WRITE, path=b"f", offset=0, data=os.urandom(4000))
            j.close_set()
        assert len(segments(path)) > 2
        end = j.end
        j.trim(7)
        assert len(segments(path)) <= 2
        assert j.durable >= end, "what the dropped segments held is durable before they go"
        ident = j.identity
        j.sync()
    with opened(path) as j:
        assert positions(j) == [(8, 0, Op.WRITE), (8, 1, Op.SYNC)]
        assert (j.set, j.seq) == (9, 0)
        assert j.get_meta(b"overflow") == b"1"
        assert j.base == 7
        assert dict(j.dirty.items()) == {b"d/f": [(0, 10), (20, 30)]}
        assert j.notes == [Note(NoteKind.NAME, b"old"), Note(NoteKind.DATA, b"f", 0, 4096)]
        assert j.identity == ident


def test_journal_open_ok_read_only_changes_nothing(path: Path) -> None:
    with opened(path) as j:
        write(j, 2)
        j.sync()
        write(j, 1)
        end = j.end
    (segment,) = segments(path)
    with open(segment, "r+b") as f:
        f.truncate(end - 3)
    before = segment.read_bytes()
    reader = Journal(path, read_only=True)
    assert positions(reader) == [(1, 0, Op.WRITE), (1, 1, Op.WRITE)]
    reader.close()
    assert segment.read_bytes() == before, "the torn tail is left for the daemon to cut"
    with opened(path) as held:  # a live daemon holds it: a reader needs no lock
        reader = Journal(path, read_only=True)
        assert positions(reader) == positions(held)
        reader.close()


# --- the lock ------------------------------------------------------------------------


def test_journal_open_err_locked_in_process(journal: Journal) -> None:
    with pytest.raises(JournalLocked) as exc:
        Journal(journal.path)
    assert str(journal.path) in str(exc.value)
    assert str(exc.value).endswith(f"in use by another replfs daemon (pid {os.getpid()})")
    write(journal, 1)  # the holder is unaffected


HOLDER = """
import sys
import threading
sys.path.insert(0, sys.argv[1])
from store.journal import Journal
j = Journal(sys.argv[2])
print("ready", flush=True)
sys.stdin.read()
j.close()
"""


def test_journal_open_err_locked_by_other_process(path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        with pytest.raises(JournalLocked) as exc:
            Journal(path)
        message = str(exc.value)
        assert f"pid {proc.pid}" in message
        assert str(path) in message
        assert "\n" not in message
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(30) == 0
    with opened(path) as j:  # released when the holder exits
        write(j, 1)


def test_journal_open_ok_after_close(path: Path) -> None:
    with opened(path):
        pass
    with opened(path) as j:
        write(j, 1)


def test_journal_open_err_set_without_its_start(path: Path) -> None:
    """A set whose first records are nowhere (a segment removed by hand, or a damaged
    entry) is refused at open in one line, without making room for the missing ones."""
    from store.records import MAX_SEQ
    from store.wal import Kind, Log

    with opened(path) as j:
        write(j, 1)
    log = Log(path, lambda *_: None)
    log.append(Kind.RECORD, Record(Op.UNLINK, 2, MAX_SEQ - 1, path=b"f").encode())
    log.close()
    with pytest.raises(StoreError) as exc:
        Journal(path)
    assert "the records of set 2 begin in a segment that is gone" in str(exc.value)
