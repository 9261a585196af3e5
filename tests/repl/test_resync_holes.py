"""The resync's reading of a file: its data and its holes, as SEEK_DATA/SEEK_HOLE show them."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from repl.primary.resync import pieces

BLOCK = 4096


@pytest.fixture
def sparse(tmp_path: Path) -> Iterator[int]:
    """A file of 40 blocks: data in blocks 0-1, 10 and 20-21, holes between and after."""
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    for block, count in ((0, 2), (10, 1), (20, 2)):
        os.pwrite(fd, b"x" * count * BLOCK, block * BLOCK)
    os.ftruncate(fd, 40 * BLOCK)
    os.fsync(fd)
    try:
        yield fd
    finally:
        os.close(fd)


def blocks(found: Iterator[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    return [(start // BLOCK, end // BLOCK, is_data) for start, end, is_data in found]


def test_resync_pieces_ok(sparse: int) -> None:
    assert blocks(pieces(sparse, 0, 40 * BLOCK)) == [
        (0, 2, True), (2, 10, False), (10, 11, True), (11, 20, False), (20, 22, True),
        (22, 40, False)]


def test_resync_pieces_ok_inside(sparse: int) -> None:
    """Cut to the range asked, starting in a hole or in data."""
    assert blocks(pieces(sparse, 5 * BLOCK, 21 * BLOCK)) == [
        (5, 10, False), (10, 11, True), (11, 20, False), (20, 21, True)]
    assert blocks(pieces(sparse, BLOCK, 3 * BLOCK)) == [(1, 2, True), (2, 3, False)]
    assert list(pieces(sparse, 7, 7)) == []


def test_resync_pieces_ok_filesystem_without_seek_data(sparse: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(fd: int, offset: int, whence: int) -> int:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(os, "lseek", refused)
    assert list(pieces(sparse, 100, 9000)) == [(100, 9000, True)]
