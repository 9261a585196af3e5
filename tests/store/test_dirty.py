"""The dirty map (store/dirty.py): its ranges follow the namespace, every change is
journaled, and the map lives in an index file, not in the daemon's memory."""

from __future__ import annotations

import errno
import stat
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.dirty import DirtyIndex, DirtyMap
from store.journal import DIRTY_INDEX, Journal
from tests.support import tmpfs


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal")
    try:
        yield j
    finally:
        j.close()


def contents(dirty: DirtyMap) -> dict[bytes, list[tuple[int, int]]]:
    return dict(dirty.files.items())


def test_dirty_add_ok_merges_ranges(journal: Journal) -> None:
    dirty = DirtyMap(journal)
    dirty.add(b"f", 0, 10)
    dirty.add(b"f", 20, 30)
    dirty.add(b"f", 5, 20)
    dirty.add(b"g", 100, 200)
    assert contents(dirty) == {b"f": [(0, 30)], b"g": [(100, 200)]}
    assert dirty.total() == 130 and len(dirty.files) == 2


def test_dirty_forget_ok_only_the_path_and_what_is_under_it(journal: Journal) -> None:
    dirty = DirtyMap(journal)
    for path in (b"d", b"d/f", b"d/e/g", b"d-x", b"d0", b"dd", b"c"):
        dirty.add(path, 0, 1)
    assert dirty.forget(b"d") == [(0, 1)]
    assert sorted(contents(dirty)) == [b"c", b"d-x", b"d0", b"dd"], \
        "names that only begin with d's bytes stay"
    assert dirty.total() == 4
    dirty.forget(b"")
    assert not dirty and dirty.total() == 0


def test_dirty_move_ok_renames_the_subtree(journal: Journal) -> None:
    dirty = DirtyMap(journal)
    dirty.add(b"a/x", 0, 1)
    dirty.add(b"a/y/z", 0, 2)
    dirty.add(b"a-b", 0, 3)
    dirty.move({b"a": b"q/a"})
    assert contents(dirty) == {b"q/a/x": [(0, 1)], b"q/a/y/z": [(0, 2)], b"a-b": [(0, 3)]}


def test_dirty_move_ok_exchange(journal: Journal) -> None:
    dirty = DirtyMap(journal)
    dirty.add(b"a/x", 0, 1)
    dirty.add(b"b/y", 0, 2)
    dirty.move({b"a": b"b", b"b": b"a"})
    assert contents(dirty) == {b"b/x": [(0, 1)], b"a/y": [(0, 2)]}


def test_dirty_next_chunk_ok_until_clean(journal: Journal) -> None:
    dirty = DirtyMap(journal)
    dirty.add(b"f", 0, 250)
    dirty.add(b"g", 10, 20)
    taken = []
    while (chunk := dirty.next_chunk(100)) is not None:
        taken.append(chunk)
        dirty.remove(*chunk)
    assert taken == [(b"f", 0, 100), (b"f", 100, 200), (b"f", 200, 250), (b"g", 10, 20)]
    assert not dirty and dirty.total() == 0


def test_dirty_open_ok_rebuilt_from_the_log(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    j = Journal(path)
    dirty = DirtyMap(j)
    dirty.add(b"d/f", 0, 10)
    dirty.add(b"d/g", 5, 8)
    dirty.move({b"d": b"e"})
    dirty.remove(b"e/f", 0, 4)
    j.sync()
    j.close()
    # A killed daemon leaves its index behind: it is made anew, never read.
    (path / DIRTY_INDEX).write_bytes(b"garbage")
    j = Journal(path)
    try:
        dirty = DirtyMap(j)
        assert contents(dirty) == {b"e/f": [(4, 10)], b"e/g": [(5, 8)]}
        assert dirty.total() == 9
    finally:
        j.close()
    assert not (path / DIRTY_INDEX).exists(), "closed: the index goes"


def test_dirty_index_ok_private(journal: Journal) -> None:
    mode = (journal.path / DIRTY_INDEX).stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_dirty_index_ok_read_only_journal_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    j = Journal(path)
    DirtyMap(j).add(b"f", 0, 10)
    j.sync()
    index = (path / DIRTY_INDEX).read_bytes()
    look = Journal(path, read_only=True)
    try:
        assert dict(look.dirty.items()) == {b"f": [(0, 10)]}
    finally:
        look.close()
    assert (path / DIRTY_INDEX).read_bytes() == index, "the live one's index is not touched"
    j.close()


def test_dirty_index_ok_memory_does_not_grow_with_the_map(tmp_path: Path) -> None:
    """A map of 100,000 files (an initial sync past the journal's budget) holds no
    Python object per file: in a dict it took about 20 MiB."""
    index = DirtyIndex(tmp_path / "index")
    try:
        tracemalloc.start()
        try:
            for i in range(100_000):
                index.put(b"d%03d/f%07d" % (i % 200, i), [(0, 2048)])
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(index) == 100_000 and index.bytes == 100_000 * 2048
        assert held < 1 << 20, f"{held} bytes of Python objects held for the map"
        assert sum(1 for _ in index.items()) == 100_000
    finally:
        index.close()


def test_dirty_index_err_full_disk_is_enospc_and_changes_nothing(tmp_path: Path) -> None:
    """SQLite's failure to write the index on a full disk is the ENOSPC its callers
    handle (a write over budget fails, a resync waits), with the index unchanged."""
    with tmpfs(tmp_path / "small", "256k") as small:
        index = DirtyIndex(small / DIRTY_INDEX)
        try:
            with pytest.raises(OSError) as raised:
                for n in range(100_000):
                    index.put(b"f%06d" % n, [(0, 1 + n)])
            assert raised.value.errno == errno.ENOSPC
            assert "dirty map" in str(raised.value)
            assert (index.count, index.bytes) == (n, sum(range(1, n + 1)))
            assert index.get(b"f%06d" % n) is None
        finally:
            index.close()
