"""The secondary's staging store, on real LMDB files: one test per claim it carries.

A "restart" is a real one: the store is closed and opened again, or a child
process stages and is SIGKILLed (nothing closed, nothing synced) before the
test opens the same directory.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from store.errors import JournalLocked, RecordError
from store.hold import ENV_BOOT_ID, mark_applying
from store.records import RENAME_EXCHANGE, Op, Record, encode_intent
from store.staging import MARKER, Staging, read_standing
from tests.support import ROOT


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "staging"


@pytest.fixture
def staging(path: Path) -> Iterator[Staging]:
    with opened(path) as s:
        yield s


def opened(path: Path) -> closing[Staging]:
    """The staging store at *path* for one daemon's lifetime (reopen = a restart)."""
    return closing(Staging(path))


def data_set(set_id: int, ops: int) -> list[Record]:
    """A whole data set: *ops* writes at seqs 0..ops-1, then its SYNC at seq *ops*."""
    writes = [Record(Op.WRITE, set_id, seq, path=b"f%d" % set_id, offset=seq * 10,
                     data=b"%d.%d" % (set_id, seq)) for seq in range(ops)]
    return [*writes, Record(Op.SYNC, set_id, ops, count=ops)]


def seqs(s: Staging, set_id: int) -> list[int]:
    return [r.seq for r in s.records(set_id)]


def killed_after_staging(path: Path, records: list[Record]) -> None:
    """Stage *records* in a child process that then dies by SIGKILL, store left open."""
    script = (
        "import os, signal, sys\n"
        "from store.records import Record\n"
        "from store.staging import Staging\n"
        "s = Staging(sys.argv[1])\n"
        "s.stage([Record.decode(bytes.fromhex(h)) for h in sys.argv[2:]])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path),
                             *(r.encode().hex() for r in records)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr


# --- claims --------------------------------------------------------------------------


def test_claim_4_bitmap_marks_received_records(staging: Staging) -> None:
    """Receipt is tracked by setting the record's seq bit in its set's bitmap."""
    records = data_set(5, 9)  # seqs 0..8 and the SYNC at 9: two bytes of bitmap
    staging.stage([records[0], records[2], records[9]])
    state = staging.state(5)
    assert state is not None
    assert [seq for seq in range(12) if state.has(seq)] == [0, 2, 9]
    assert bytes(state.bitmap) == bytes([0b0000_0101, 0b0000_0010])
    assert state.received() == 3
    staging.stage([records[8]])
    state = staging.state(5)
    assert state is not None and bytes(state.bitmap) == bytes([0b0000_0101, 0b0000_0011])


def test_claim_7_bitmap_decides_receipt_of_set(staging: Staging) -> None:
    """The set counts as received exactly when the bitmap holds the SYNC's seq and all below."""
    records = data_set(3, 4)  # writes 0..3, SYNC at 4
    assert staging.stage(records[:2]).completed == []
    assert staging.stage([records[4]]).completed == []  # SYNC seen, seqs 2 and 3 missing
    assert staging.stage([records[3]]).completed == []
    state = staging.state(3)
    assert state is not None and state.sync_seen and state.count == 4
    assert not state.complete
    assert staging.stage([records[2]]).completed == [3]  # the last hole filled
    state = staging.state(3)
    assert state is not None and state.complete
    assert seqs(staging, 3) == [0, 1, 2, 3, 4]


def test_claim_7_all_writes_without_sync_is_not_receipt(staging: Staging) -> None:
    records = data_set(3, 4)
    assert staging.stage(records[:4]).completed == []
    state = staging.state(3)
    assert state is not None and not state.sync_seen and not state.complete


def test_claim_11_overlapping_sets_staged_together(staging: Staging) -> None:
    """Records of several open sets arrive interleaved, in one batch and across batches."""
    one, two, three = data_set(1, 3), data_set(2, 2), data_set(3, 3)
    first = [one[1], two[0], three[3], one[0], two[2], three[0]]
    second = [one[3], three[2], two[1], one[2], three[1]]
    assert staging.stage(first).completed == []
    assert sorted(staging.stage(second).completed) == [1, 2, 3]
    assert seqs(staging, 1) == [0, 1, 2, 3]
    assert seqs(staging, 2) == [0, 1, 2]
    assert list(staging.records(3)) == three
    assert {n: s.complete for n, s in staging.sets().items()} == {1: True, 2: True, 3: True}


def test_claim_12_second_set_staged_before_first(staging: Staging) -> None:
    one, two = data_set(1, 2), data_set(2, 3)
    assert staging.stage(list(reversed(two))).completed == [2]
    assert staging.state(1) is None
    assert staging.stage(one[1:]).completed == []
    assert staging.stage(one[:1]).completed == [1]
    assert list(staging.records(1)) == one
    assert list(staging.records(2)) == two


def test_claim_20_complete_flag_set_in_same_transaction(path: Path) -> None:
    """The flag is set by the stage() that brings the last record, atomically with it."""
    records = data_set(1, 3)
    with opened(path) as staging:
        staging.stage(records[:3])  # every write, no SYNC yet
        state = staging.state(1)
        assert state is not None and not state.complete
        # One transaction: when staging fails part way, neither the SYNC nor the
        # flag it would have set is there.
        bad = Record(Op.WRITE, 1, 9, path=b"../outside", data=b"x")  # validate() refuses it
        with pytest.raises(RecordError, match=r"'\.\.' component"):
            staging.stage([records[3], bad])
        state = staging.state(1)
        assert state is not None and not state.sync_seen and not state.complete
        assert seqs(staging, 1) == [0, 1, 2]
        assert staging.stage([records[3]]).completed == [1]
    with opened(path) as staging:  # the flag survived the restart, beside its records
        state = staging.state(1)
        assert state is not None and state.complete and state.sync_seen and state.count == 3
        assert list(staging.records(1)) == records


def test_claim_21_complete_set_survives_restart(path: Path) -> None:
    """A set complete when the secondary was killed is kept, whole, to be applied."""
    killed_after_staging(path, data_set(1, 40) + data_set(2, 5)[:-1])
    with opened(path) as staging:
        assert staging.drop_partial() == [2]
        state = staging.state(1)
        assert state is not None and state.complete
        assert list(staging.records(1)) == data_set(1, 40)


def test_claim_27_partial_set_erased_on_restart(path: Path) -> None:
    """After a crash the partial set is erased, sent again, and completes from scratch."""
    one, two = data_set(1, 2), data_set(2, 6)
    killed_after_staging(path, [*one, two[0], two[3], two[6]])
    with opened(path) as staging:
        assert staging.drop_partial() == [2]
        assert staging.state(2) is None
        assert list(staging.records(2)) == []
        assert sorted(staging.sets()) == [1]
        # The primary retransmits the whole set; nothing counts as a duplicate.
        result = staging.stage(list(reversed(two)))
        assert (result.completed, result.duplicates) == ([2], 0)
        assert list(staging.records(2)) == two
        staging.finish(1)
        staging.finish(2)
        assert staging.applied == 2
        assert staging.sets() == {}


def test_staging_drop_partial_ok_nothing_partial(staging: Staging) -> None:
    staging.stage(data_set(1, 1))
    assert staging.drop_partial() == []
    assert sorted(staging.sets()) == [1]


def test_staging_drop_partial_ok_keeps_neighbours(staging: Staging) -> None:
    """Erasing set 2 leaves the records of sets 1 and 3 on either side of it."""
    staging.stage(data_set(1, 3) + data_set(2, 3)[:2] + data_set(3, 3))
    assert staging.drop_partial() == [2]
    assert list(staging.records(1)) == data_set(1, 3)
    assert list(staging.records(3)) == data_set(3, 3)


# --- duplicates and stale records ----------------------------------------------------


def test_staging_stage_ok_duplicates_dropped(staging: Staging) -> None:
    records = data_set(1, 3)
    staging.stage(records[:2])
    resent = Record(Op.WRITE, 1, 1, path=b"other", data=b"must not replace the first")
    result = staging.stage([records[0], resent, records[0], records[2]])
    assert result.duplicates == 3
    assert result.keys == [(1, 0), (1, 1), (1, 0), (1, 2)]  # all acknowledged
    assert list(staging.records(1)) == records[:3]  # the first copy stays


def test_staging_stage_ok_duplicate_of_complete_set(staging: Staging) -> None:
    staging.stage(data_set(1, 2))
    result = staging.stage(data_set(1, 2))
    assert (result.duplicates, result.completed) == (3, [])


def test_staging_stage_ok_stale_dropped(staging: Staging,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of sets already applied are counted and never staged again."""
    monkeypatch.setattr("store.staging.HISTORY_SETS", 0)  # applied sets go at once
    staging.stage(data_set(1, 1) + data_set(2, 1))
    staging.finish(1)
    staging.finish(2)
    result = staging.stage(data_set(1, 1) + data_set(2, 1)[:1] + data_set(3, 1)[:1])
    assert (result.stale, result.duplicates) == (3, 0)
    assert result.keys == [(3, 0)]
    assert sorted(staging.sets()) == [3]
    assert list(staging.records(1)) == list(staging.records(2)) == []


def test_staging_records_ok_start_seq(staging: Staging) -> None:
    staging.stage(data_set(4, 5) + data_set(5, 1))
    assert [r.seq for r in staging.records(4, 3)] == [3, 4, 5]
    assert [r.seq for r in staging.records(4, 6)] == []
    assert list(staging.records(9)) == []


def test_staging_stage_ok_raw_bytes_as_they_arrived(staging: Staging) -> None:
    """Given the encodings the records arrived in, those very bytes are staged (the
    receiver decoded them, which checked them), not the records encoded again."""
    record = Record(Op.UNLINK, 4, 0, path=b"a")
    arrived = Record(Op.UNLINK, 4, 0, path=b"b").encode()  # told apart on reading back
    staging.stage([record], [arrived])
    assert [r.path for r in staging.records(4)] == [b"b"]


def test_staging_last_reset_ok_noted_as_staged(path: Path) -> None:
    """The last RESET of a set, whatever order its records arrive in, kept across a
    restart and gone with the set."""
    resets = [Record(Op.RESET, 4, seq) for seq in (1, 7, 3)]
    with closing(Staging(path)) as staging:
        staging.stage([resets[0]])
        staging.stage(resets[1:])
        assert (staging.last_reset(4), staging.last_reset(5)) == (7, 0)
    with closing(Staging(path)) as staging:
        assert staging.last_reset(4) == 7
        staging.stage([Record(Op.SYNC, 4, 8, count=8)])
        assert staging.drop_unapplied() == [4]
        assert staging.last_reset(4) == 0


def test_staging_staged_run_ok_ends_at_the_first_gap(staging: Staging) -> None:
    """How far a set's records run without a gap from a seq: what may be applied of a
    sync set as it arrives."""
    records = data_set(2, 40)
    staging.stage([r for r in records if r.seq not in (3, 33)])
    assert [staging.staged_run(2, seq) for seq in (0, 3, 4, 33, 34, 41)] == [3, 3, 33, 33,
                                                                            41, 41]
    assert staging.staged_run(9, 5) == 5, "a set with nothing staged"


def test_staging_from_scratch_ok_only_without_a_set_to_show(path: Path) -> None:
    """A sync that begins on a replica that never had a set, or that was in the middle of
    another sync, begins from scratch; one over a replica at a whole set does not. The
    flag outlives a restart and goes once the sync is applied."""
    with closing(Staging(path)) as staging:
        staging.reset_to(3)  # a new replica: nothing applied yet
        assert staging.from_scratch
        staging.reset_to(5)  # a sync that replaces the one under way
        assert staging.from_scratch
    with closing(Staging(path)) as staging:
        assert staging.from_scratch
        staging.finish(5)
        assert not staging.from_scratch
        staging.reset_to(9)  # the replica shows set 5 until set 9 is whole
        assert not staging.from_scratch
        staging.reset_to(11)  # ... or until set 11 is, if it replaces set 9
        assert not staging.from_scratch


def test_staging_epoch_ok_moves_when_unapplied_sets_go(staging: Staging) -> None:
    """What was read of a set not yet applied may be gone once the epoch moved."""
    seen = [staging.epoch]
    for change in (lambda: staging.reset_to(2), staging.drop_partial,
                   staging.drop_unapplied, lambda: staging.start_rejoin(1, b"{}")):
        change()
        seen.append(staging.epoch)
    assert len(set(seen)) == len(seen)


# --- the apply log ---------------------------------------------------------------------


def test_staging_marker_ok(staging: Staging) -> None:
    assert staging.marker() is None
    rename = Record(Op.RENAME, 2, 7, path=b"a", path2=b"b")
    staging.set_marker(rename, None)
    assert staging.marker() == (2, 7, None)
    exchange = Record(Op.RENAME, 2, 9, path=b"a", path2=b"b", flags=RENAME_EXCHANGE)
    staging.set_marker(exchange, encode_intent(11, 12))
    assert staging.marker() == (2, 9, encode_intent(11, 12))


def test_staging_marker_ok_survives_restart(path: Path) -> None:
    with opened(path) as staging:
        staging.set_marker(Record(Op.UNLINK, 3, 1, path=b"x"), None)
    with opened(path) as staging:
        assert staging.marker() == (3, 1, None)


def test_staging_marker_ok_void_after_reset_to_also_after_restart(path: Path) -> None:
    with opened(path) as staging:
        staging.set_marker(Record(Op.UNLINK, 4, 2, path=b"x"), None)
        staging.reset_to(4)  # the same set again, from its RESET: not from seq 2
        assert staging.marker() is None
    with opened(path) as staging:
        assert staging.marker() is None
        staging.set_marker(Record(Op.UNLINK, 4, 5, path=b"y"), None)
        assert staging.marker() == (4, 5, None)


def test_staging_marker_ok_torn_is_none(path: Path) -> None:
    """A marker a power cut tore (half of it written over a longer one) marks nothing."""
    with opened(path) as staging:
        staging.set_marker(Record(Op.RENAME, 2, 9, path=b"a", path2=b"b",
                                  flags=RENAME_EXCHANGE), encode_intent(11, 12))
    raw = (path / MARKER).read_bytes()
    with opened(path) as staging:
        staging.set_marker(Record(Op.UNLINK, 3, 1, path=b"x"), None)
    torn = (path / MARKER).read_bytes()[:10] + raw[10:]
    (path / MARKER).write_bytes(torn)
    with opened(path) as staging:
        assert staging.marker() is None


def test_staging_marker_ok_from_an_older_replfs(path: Path) -> None:
    """A marker an older replfs committed in the store moves to the file."""
    with opened(path) as staging:
        meta = staging.env.open_db(b"meta")
        with staging.env.begin(write=True) as txn:
            txn.put(b"marker", Record(Op.UNLINK, 6, 3).key + b"intent", db=meta)
    with opened(path) as staging:
        assert staging.marker() == (6, 3, b"intent")
        with staging.env.begin() as txn:
            assert txn.get(b"marker", db=staging.env.open_db(b"meta")) is None


def test_staging_finish_ok_clears_marker(staging: Staging,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("store.staging.HISTORY_SETS", 0)  # applied sets go at once
    staging.stage(data_set(1, 2) + data_set(2, 2))
    staging.set_marker(Record(Op.UNLINK, 1, 1, path=b"x"), None)
    staging.finish(1)
    assert staging.marker() is None
    assert staging.applied == 1
    assert staging.state(1) is None and list(staging.records(1)) == []
    assert list(staging.records(2)) == data_set(2, 2)


def test_staging_applied_ok_survives_restart(path: Path) -> None:
    with opened(path) as staging:
        assert staging.applied == 0
        staging.stage(data_set(1, 1))
        staging.finish(1)
    with opened(path) as staging:
        assert staging.applied == 1


def test_staging_applied_ok_survives_kill(path: Path) -> None:
    """finish() syncs: a killed process keeps what it finished."""
    script = (
        "import os, signal, sys\n"
        "from store.records import Op, Record\n"
        "from store.staging import Staging\n"
        "s = Staging(sys.argv[1])\n"
        "s.stage([Record(Op.SYNC, 1, 0, count=0), Record(Op.SYNC, 2, 0, count=0)])\n"
        "s.finish(1)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    with opened(path) as staging:
        assert staging.applied == 1
        assert sorted(staging.sets()) == [2]


# --- the lock and identity ---------------------------------------------------------------


def test_staging_open_err_locked(staging: Staging, path: Path) -> None:
    held = re.escape(f"in use by another replfs daemon (pid {os.getpid()})")
    with pytest.raises(JournalLocked, match=held):
        Staging(path)
    assert staging.applied == 0  # the holder is untouched


def test_staging_open_ok_after_close(path: Path) -> None:
    with opened(path):
        pass
    with opened(path) as staging:
        assert staging.sets() == {}


def test_staging_identity_ok_survives_restart(path: Path) -> None:
    with opened(path) as staging:
        assert staging.identity.cluster is None  # a secondary adopts its first primary's
        node = staging.identity.node
        staging.identity.cluster = "c1"
        staging.save_identity()
    with opened(path) as staging:
        assert (staging.identity.node, staging.identity.cluster) == (node, "c1")


def test_setstate_check_complete_err_bit_beyond_count() -> None:
    """Seqs 0..count all present is not enough if another, stray one is there too."""
    from store.setstate import SetState

    state = SetState(sync_seen=True, count=2)
    for seq in (0, 1, 3):  # 2 missing, 3 stray: as many bits as a complete set
        state.mark(seq)
    assert not state.check_complete()
    state.mark(2)
    assert not state.check_complete(), "a seq past the SYNC is never complete"


def test_staging_history_ok_applied_sets_kept_a_while(staging: Staging,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("store.staging.HISTORY_SETS", 3)
    for set_id in range(1, 7):
        staging.stage(data_set(set_id, 2))
        staging.finish(set_id)
    assert staging.history() == [4, 5, 6], "the last HISTORY_SETS, up to the one applied"
    assert seqs(staging, 5) == [0, 1, 2], "their records too"
    assert staging.sets() == {}, "not as sets waiting to be applied"


def test_staging_history_ok_none_past_the_bytes(staging: Staging,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("store.staging.HISTORY_BYTES", 0)
    staging.stage(data_set(1, 2))
    staging.finish(1)
    assert staging.history() == []


def test_staging_drop_unapplied_ok_keeps_complete_sets_before(staging: Staging) -> None:
    for set_id in (1, 2, 3):
        staging.stage(data_set(set_id, 1))
    staging.stage(data_set(4, 2)[:1])  # partial
    assert staging.drop_unapplied(keep_before=3) == [3, 4]
    assert sorted(staging.sets()) == [1, 2]


def test_staging_read_standing_ok(path: Path) -> None:
    with opened(path) as s:
        s.identity.generation = 4
        s.save_identity()
        s.stage([*data_set(1, 1), *data_set(2, 1), *data_set(4, 1)])
        s.finish(1)
    standing = read_standing(path)  # beside nothing: the store is closed, and could be open
    assert standing is not None
    assert (standing.generation, standing.applied, standing.complete, standing.syncing) == (
        4, 1, 2, False), "complete: up to the gap before set 4"
    assert read_standing(path.parent / "none") is None


def test_staging_read_standing_err_torn_by_a_power_cut(path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch begun on a boot before this one, never made durable: the replica is
    torn, and an election must not pick it, even before its secondary started and
    asked the primary for the batch's paths."""
    boot = path.parent / "boot_id"
    boot.write_text("first-boot\n")
    monkeypatch.setenv(ENV_BOOT_ID, str(boot))
    with opened(path) as s:
        s.stage([*data_set(1, 1), *data_set(2, 1)])
        s.finish(1)
    mark_applying(path, 2, 2)
    standing = read_standing(path)
    assert standing is not None and not standing.syncing, "on the boot that applies it"
    boot.write_text("second-boot\n")
    standing = read_standing(path)
    assert standing is not None and (standing.applied, standing.syncing) == (1, True)


def test_staging_open_reader_ok_after_the_writer_grew_the_store(staging: Staging,
                                                                path: Path) -> None:
    """A reader opened beside the daemon (the node's read_standing, in another process)
    still reads after the daemon staged far more than the store held when it opened."""
    staging.stage(data_set(1, 1))
    script = (
        "import sys\n"
        "from store.staging import open_reader\n"
        "env = open_reader(sys.argv[1])\n"
        "print('open', flush=True)\n"
        "sys.stdin.readline()\n"
        "with env.begin() as txn:\n"
        "    print(txn.stat(env.open_db(b'meta', txn=txn, create=False))['entries'])\n"
    )
    reader = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stdout.readline() == "open\n"
    big = [Record(Op.WRITE, 2, seq, path=b"big", offset=seq << 20, data=bytes(1 << 20))
           for seq in range(32)]
    staging.stage([*big, Record(Op.SYNC, 2, 32, count=32)])
    out, err = reader.communicate("go\n", timeout=60)
    assert reader.returncode == 0, err  # MDB_MAP_RESIZED if mapped only as large as it was
    assert int(out) > 0
