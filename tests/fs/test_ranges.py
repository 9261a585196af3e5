"""fallocate, copy_file_range and SEEK_DATA/SEEK_HOLE through the primary mount.

Each scenario runs natively and through a mount (tests/fs/test_posix.py's
``both()``): what a program sees must be the same, and the trees, the
backing directory and a tree rebuilt from the journal must be equal. Holes
are compared as SEEK_DATA/SEEK_HOLE show them; st_blocks only where a
scenario can say what it must be (a preallocation, a punched hole), since
the two runs may allocate differently while the data is still cached.

One difference is deliberate (test_primary_seek_err_while_open_for_writing):
SEEK_DATA/SEEK_HOLE answer EINVAL while any handle has the file open for
writing, since the kernel asks without first writing back its cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import shutil
import subprocess
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import pytest

import fs.passthrough as fs_passthrough
import fs.primary as fs_primary
from fs.inodes import ROOT, Inodes
from fs.primary import COPY_MAX, PrimaryFS
from repl.primary.capture import Capture
from repl.tree import Tree
from store.journal import Journal
from store.records import Op
from tests.fs.test_posix import Probe, both, digest, read
from tests.support import diff, primary, replay, snapshot

KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE = 0x01, 0x02, 0x08, 0x10
MiB = 1 << 20
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate64.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself: os.posix_fallocate falls back to writing zeros."""
    if _libc.fallocate64(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def extents(path: Path) -> list[tuple[int, int]]:
    """The data extents SEEK_DATA and SEEK_HOLE show, through a read-only handle."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out, at = [], 0
        while True:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return out
                raise
            at = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, at))
    finally:
        os.close(fd)


def seek(fd: int, offset: int, whence: int) -> int | str:
    """Where lseek lands, or the errno name it fails with."""
    try:
        return os.lseek(fd, offset, whence)
    except OSError as exc:
        return errno.errorcode[exc.errno]


def first_hole(path: Path) -> tuple[int, int | str]:
    """Where the first hole starts, and where the data after it starts (or ENXIO)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = os.lseek(fd, 0, os.SEEK_HOLE)
        return start, seek(fd, start, os.SEEK_DATA)
    finally:
        os.close(fd)


def copy_all(fd_in: int, fd_out: int, count: int, off_in: int, off_out: int) -> int:
    """copy_file_range until *count* bytes are copied or the source ends, as callers
    must: any filesystem may copy less than asked."""
    total = 0
    while total < count:
        n = os.copy_file_range(fd_in, fd_out, count - total, off_in + total, off_out + total)
        if n == 0:
            break
        total += n
    return total


def pattern(size: int, seed: int) -> bytes:
    """The same bytes in both runs."""
    return random.Random(seed).randbytes(size)


# --- fallocate ----------------------------------------------------------------------


def fallocates(r: Path, p: Probe) -> None:
    data = pattern(16 * 1024, 1)
    (r / "f").write_bytes(data + b"tail")
    fd = os.open(r / "f", os.O_RDWR)
    p.outcome("grow", lambda: fallocate(fd, 0, 16_000, 20_000))
    p.note("grown", os.fstat(fd).st_size)
    p.outcome("preallocate", lambda: fallocate(fd, KEEP_SIZE, 0, MiB))
    st = os.fstat(fd)
    p.note("preallocated", (st.st_size, st.st_blocks * 512 >= MiB))
    p.outcome("punch", lambda: fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 4096, 8192))
    p.outcome("punch unaligned", lambda: fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 100, 50))
    p.outcome("punch past the end", lambda: fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 30_000, MiB))
    p.note("punched", (os.fstat(fd).st_size, os.fstat(fd).st_blocks * 512 < MiB))
    p.outcome("zero", lambda: fallocate(fd, ZERO_RANGE, 13_000, 1000))
    p.outcome("zero grows", lambda: fallocate(fd, ZERO_RANGE, 40_000, 2000))
    p.outcome("zero keeps size", lambda: fallocate(fd, ZERO_RANGE | KEEP_SIZE, 41_000, 9000))
    p.note("size", os.fstat(fd).st_size)
    p.outcome("punch without KEEP_SIZE", lambda: fallocate(fd, PUNCH_HOLE, 0, 1))
    p.outcome("no bytes", lambda: fallocate(fd, 0, 0, 0))
    p.outcome("negative offset", lambda: fallocate(fd, 0, -1, 1))
    os.close(fd)
    # Before anything reads it: ext4 counts cached pages over allocated-unwritten
    # blocks as data, and the two runs cache differently.
    p.note("extents", extents(r / "f"))
    data = read(r / "f")
    p.note("content", digest(data))
    p.note("reads zeros", (data[4096:4104], data[95:155], data[13_500:13_504]))

    ro = os.open(r / "f", os.O_RDONLY)
    p.outcome("read-only handle", lambda: fallocate(ro, 0, 0, 1))
    os.close(ro)
    os.link(r / "f", r / "g")
    fd = os.open(r / "g", os.O_WRONLY)
    fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, 4096)
    os.close(fd)
    p.note("through another name", read(r / "f")[:4])

    fd = os.open(r / "posix", os.O_WRONLY | os.O_CREAT, 0o644)
    os.posix_fallocate(fd, 0, 100_000)
    os.close(fd)
    p.note("posix_fallocate", (os.stat(r / "posix").st_size, extents(r / "posix")))


def test_primary_fallocate_ok(tmp_path: Path) -> None:
    with both(tmp_path, fallocates):
        pass


def test_primary_fallocate_err_modes_not_passed_through(tmp_path: Path) -> None:
    """COLLAPSE_RANGE (and insert, unshare) would move data: EOPNOTSUPP, as on a
    filesystem without them; the file stays as it was."""
    backing, mount = tmp_path / "backing", tmp_path / "mount"
    backing.mkdir()
    with primary(backing, mount):
        (mount / "f").write_bytes(pattern(8 * 4096, 2))
        fd = os.open(mount / "f", os.O_RDWR)
        try:
            try:
                fallocate(fd, COLLAPSE_RANGE, 0, 4096)
            except OSError as exc:
                assert exc.errno == errno.EOPNOTSUPP
            else:
                raise AssertionError("collapse passed through")
        finally:
            os.close(fd)
        assert (mount / "f").read_bytes() == pattern(8 * 4096, 2)


# --- copy_file_range --------------------------------------------------------------------


def copies(r: Path, p: Probe) -> None:
    big = pattern(9 * MiB + 123, 3)  # more than one request copies
    (r / "src").write_bytes(big)
    src = os.open(r / "src", os.O_RDONLY)
    dst = os.open(r / "dst", os.O_WRONLY | os.O_CREAT, 0o644)
    p.note("copy all", copy_all(src, dst, len(big), 0, 0))
    p.note("past its end", copy_all(src, dst, 5000, 100, 10 * MiB))
    p.note("source at its end", os.copy_file_range(src, dst, 100, len(big) + 5, 0))
    p.note("source ends first", copy_all(src, dst, 1000, len(big) - 10, 20))
    os.close(dst)
    p.note("dst", (os.stat(r / "dst").st_size, digest(read(r / "dst"))))

    same = os.open(r / "src", os.O_RDWR)
    p.note("within a file", copy_all(same, same, 4096, 0, len(big)))
    p.outcome("overlapping", lambda: os.copy_file_range(same, same, 4096, 0, 100))
    wronly = os.open(r / "src", os.O_WRONLY)
    p.outcome("from a write-only handle", lambda: os.copy_file_range(wronly, same, 1, 0, 0))
    append = os.open(r / "dst", os.O_WRONLY | os.O_APPEND)
    p.outcome("to an O_APPEND handle", lambda: os.copy_file_range(src, append, 1, 0, 0))
    p.outcome("to a read-only handle", lambda: os.copy_file_range(same, src, 1, 0, 0))
    for fd in (src, same, wronly, append):
        os.close(fd)
    p.note("src", (os.stat(r / "src").st_size, digest(read(r / "src"))))

    # cp finds the data with SEEK_DATA and copies it with copy_file_range.
    fd = os.open(r / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, pattern(5000, 4), 0)
    os.pwrite(fd, pattern(70_000, 5), 2 * MiB)
    os.ftruncate(fd, 5 * MiB)
    os.close(fd)
    subprocess.run(["cp", r / "sparse", r / "sparse-copy"], check=True)
    p.note("cp", (read(r / "sparse-copy") == read(r / "sparse"),
                  extents(r / "sparse-copy"), os.stat(r / "sparse-copy").st_blocks * 512 < MiB))


def test_primary_copy_file_range_ok(tmp_path: Path) -> None:
    with both(tmp_path, copies):
        pass
    # Copied by the daemon, not by the kernel through reads and writes (which it falls
    # back to without a handler, and which reach the daemon in smaller writes).
    journal = Journal(tmp_path / ".backing.replfs" / "journal")
    try:
        sizes = {len(r.data) for r in journal.records() if r.op == Op.WRITE}
    finally:
        journal.close()
    assert COPY_MAX in sizes


# --- SEEK_DATA and SEEK_HOLE ------------------------------------------------------------


def holes(r: Path, p: Probe) -> None:
    fd = os.open(r / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"a" * 5000, 0)
    os.pwrite(fd, b"b" * 100, MiB)
    os.pwrite(fd, b"c" * 10, 4 * MiB - 10)
    os.ftruncate(fd, 5 * MiB)
    os.close(fd)
    p.note("extents", extents(r / "sparse"))
    ro = os.open(r / "sparse", os.O_RDONLY)
    for at in (0, 4095, 5000, 8192, MiB, MiB + 50, 2 * MiB, 4 * MiB - 1, 5 * MiB - 1,
               5 * MiB, 6 * MiB):
        p.note(f"at {at}", (seek(ro, at, os.SEEK_DATA), seek(ro, at, os.SEEK_HOLE)))
    os.lseek(ro, 3 * MiB, os.SEEK_DATA)
    p.note("position follows", (os.lseek(ro, 0, os.SEEK_CUR), os.read(ro, 3)))
    os.close(ro)

    (r / "empty").write_bytes(b"")
    (r / "full").write_bytes(b"x" * 10_000)
    for name in ("empty", "full"):
        ro = os.open(r / name, os.O_RDONLY)
        p.note(name, [(seek(ro, at, os.SEEK_DATA), seek(ro, at, os.SEEK_HOLE))
                      for at in (0, 9_999, 10_000)])
        os.close(ro)


def test_primary_seek_data_hole_ok(tmp_path: Path) -> None:
    with both(tmp_path, holes):
        pass


def test_primary_seek_err_while_open_for_writing(tmp_path: Path) -> None:
    """While a handle has the file open for writing, the kernel's cache may hold data
    BACKING has not seen yet, which would read as holes: SEEK_DATA and SEEK_HOLE
    answer EINVAL ("not supported here") until it is closed, and never a hole that
    natively is data."""
    backing, mount = tmp_path / "backing", tmp_path / "mount"
    backing.mkdir()
    with primary(backing, mount):
        fd = os.open(mount / "f", os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, b"cached", MiB)
        ro = os.open(mount / "f", os.O_RDONLY)
        assert [seek(h, 0, w) for h in (fd, ro) for w in (os.SEEK_DATA, os.SEEK_HOLE)] == [
            "EINVAL"] * 4
        os.close(fd)
        assert (seek(ro, 0, os.SEEK_DATA), seek(ro, 0, os.SEEK_HOLE)) == (MiB, 0)
        os.close(ro)


# --- failures, in process ---------------------------------------------------------------
#
# A fallocate that fails part way, or a copy that copies less than it was asked:
# nothing real produces them on demand, so the handlers run here, in this process,
# against a backing directory, with the syscall replaced. Replaying the journal
# over the tree as it was must give the tree as it is.


def run(coro: Coroutine[Any, Any, T]) -> T:
    """A handler's coroutine run to its end, as main_threads() does: it never suspends."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("the handler suspended")


@contextlib.contextmanager
def in_process(tmp_path: Path) -> Iterator[tuple[PrimaryFS, Path]]:
    """A PrimaryFS over tmp_path/backing, unmounted; a copy of the backing directory as
    it was at the start goes to tmp_path/replica, and the journal is replayed onto it
    at the end."""
    backing, replica = tmp_path / "backing", tmp_path / "replica"
    shutil.copytree(backing, replica)
    journal, tree = Journal(tmp_path / "journal"), Tree(backing)
    inodes = Inodes(str(backing))
    try:
        capture = Capture(journal, tree)
        yield PrimaryFS(inodes, capture), backing
        capture.close_set()
    finally:
        inodes.close()
        tree.close()
        journal.close()
    replay(tmp_path / "journal", replica)
    assert diff(snapshot(backing, mtimes=False), snapshot(replica, mtimes=False)) == []


def opened(fs: PrimaryFS, name: bytes, flags: int) -> int:
    entry = run(fs.lookup(ROOT, name, None))  # type: ignore[arg-type]
    return run(fs.open(entry.st_ino, flags, None)).fh  # type: ignore[arg-type]


def test_primary_fallocate_ok_failed_part_way(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4 out of space keeps what it allocated so far, and the file grows that far;
    a zeroing may stop midway: the journal holds what a reader sees after it."""
    (tmp_path / "backing").mkdir()
    (tmp_path / "backing" / "f").write_bytes(pattern(64 * 1024, 6))

    def part_way(fd: int, mode: int, offset: int, length: int) -> None:
        if mode & ZERO_RANGE:
            os.pwrite(fd, bytes(1000), offset)
        os.ftruncate(fd, os.fstat(fd).st_size + 5000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with in_process(tmp_path) as (fs, backing):
        monkeypatch.setattr(fs_primary, "fallocate", part_way)
        fh = opened(fs, b"f", os.O_RDWR)
        for mode in (ZERO_RANGE, 0):
            with pytest.raises(pyfuse3.FUSEError) as failed:
                run(fs.fallocate(fh, mode, 100, 100_000))
            assert failed.value.errno == errno.ENOSPC
        run(fs.release(fh))
    assert (backing / "f").stat().st_size == 64 * 1024 + 10_000


def test_primary_copy_file_range_ok_short(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that copies less than it read journals only what it copied."""
    (tmp_path / "backing").mkdir()
    (tmp_path / "backing" / "src").write_bytes(pattern(10_000, 7))
    (tmp_path / "backing" / "dst").write_bytes(b"")
    real = os.copy_file_range

    def half(src: int, dst: int, count: int, off_in: int, off_out: int) -> int:
        return real(src, dst, count // 2, off_in, off_out)

    with in_process(tmp_path) as (fs, backing):
        monkeypatch.setattr(os, "copy_file_range", half)
        src, dst = opened(fs, b"src", os.O_RDONLY), opened(fs, b"dst", os.O_WRONLY)
        assert run(fs.copy_file_range(src, 0, dst, 100, 10_000, 0)) == 5000
        run(fs.release(src))
        run(fs.release(dst))
    assert (backing / "dst").stat().st_size == 5100


def test_primary_seek_ok_writer_released_meanwhile(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """close() returns before the kernel releases the handle: a SEEK_DATA that comes
    meanwhile, through another handle, waits for the release instead of refusing. The
    writer asking itself is refused at once."""
    (tmp_path / "backing").mkdir()
    fd = os.open(tmp_path / "backing" / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"data", MiB)
    os.close(fd)
    monkeypatch.setattr(fs_passthrough, "SEEK_WAIT", 60.0)
    with in_process(tmp_path) as (fs, _), ThreadPoolExecutor(1) as pool:
        writer, reader = opened(fs, b"f", os.O_RDWR), opened(fs, b"f", os.O_RDONLY)
        began = time.monotonic()
        with pytest.raises(pyfuse3.FUSEError) as refused:
            run(fs.lseek(writer, 0, os.SEEK_DATA))
        assert refused.value.errno == errno.EINVAL
        assert time.monotonic() - began < 1.0
        pending = pool.submit(lambda: run(fs.lseek(reader, 0, os.SEEK_DATA)))
        time.sleep(0.1)  # the seek waits meanwhile
        run(fs.release(writer))
        assert pending.result(timeout=10) == MiB
        run(fs.release(reader))
