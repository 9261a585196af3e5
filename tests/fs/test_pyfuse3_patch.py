"""pyfuse3 as bin/_bootstrap.sh builds it: main_threads() serves a mount from threads.

A stock pyfuse3 has no main_threads (bin/pyfuse3-threads.patch adds it), and
these tests fail on one. The tiny file system below runs in its own process
(this module run with -m), so a loop that never returns cannot hang the run.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pyfuse3
import pytest
import trio

from tests.support import ROOT, unmount

HELLO = b"hello from a worker thread\n" * 200
HELLO_INO, PAIR_INO, TID_INO, WORKERS_INO = (pyfuse3.ROOT_INODE + i for i in (1, 2, 3, 4))
NAMES = {b"hello": HELLO_INO, b"pair": PAIR_INO}
WAIT = 30.0  # seconds; only ever reached when something is broken


class TinyFS(pyfuse3.Operations):
    """Two files whose handlers finish without suspending, and two trap names.

    ``hello`` holds HELLO. A read of ``pair`` answers only once two reads of it
    are in the daemon at the same time, with the name of the thread that
    served it. Looking up ``stop`` calls pyfuse3.terminate(); looking up
    ``suspend`` awaits trio, which main_threads() cannot serve. The size of
    ``tid``, never cached, is the native id of the thread that looked it up
    (the high 32 bits) and how many times that thread had slept (the low ones);
    the size of ``workers``, how many times the workers slept in all.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pair = threading.Barrier(2, timeout=WAIT)

    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o755, 2
        elif inode in (HELLO_INO, PAIR_INO):
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_size = len(HELLO) if inode == HELLO_INO else 0
        elif inode == TID_INO:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_size = threading.get_native_id() << 32 | sleeps("thread-self")
            attr.entry_timeout = attr.attr_timeout = 0
        elif inode == WORKERS_INO:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_size = sum(sleeps(f"self/task/{t.native_id}") for t in threading.enumerate()
                               if t.name.startswith("pyfuse3-worker-")
                               and t.native_id is not None)  # (one still starting)
            attr.entry_timeout = attr.attr_timeout = 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name in NAMES:
            return await self.getattr(NAMES[name])
        if name == b"tid":
            return await self.getattr(TID_INO)
        if name == b"workers":
            return await self.getattr(WORKERS_INO)
        if name == b"stop":
            pyfuse3.terminate()
        elif name == b"suspend":
            await trio.lowlevel.checkpoint()
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.FileHandleT:
        return inode

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        for i, (name, inode) in enumerate(sorted(NAMES.items())):
            if i >= start_id and not pyfuse3.readdir_reply(
                    token, name, await self.getattr(inode), i + 1):
                return

    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # direct_io: every read of pair reaches the daemon, none is served from the cache
        return pyfuse3.FileInfo(fh=inode, direct_io=inode == PAIR_INO)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        if fh == HELLO_INO:
            return HELLO[off:off + size]
        try:
            self.pair.wait()
        except threading.BrokenBarrierError:
            raise pyfuse3.FUSEError(errno.EIO) from None
        return threading.current_thread().name.encode()

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    # The handlers the patch adds answer with what they were given, so the test can
    # tell every argument arrived.

    async def lseek(self, fh: pyfuse3.FileHandleT, off: int, whence: int) -> int:
        return off * 10 + whence

    async def fallocate(self, fh: pyfuse3.FileHandleT, mode: pyfuse3.FlagT, off: int,
                        length: int) -> None:
        if (fh, mode, off, length) != (HELLO_INO, 1, 2, 3):
            raise pyfuse3.FUSEError(errno.EINVAL)
        raise pyfuse3.FUSEError(errno.EDQUOT)

    async def copy_file_range(self, fh_in: pyfuse3.FileHandleT, off_in: int,
                              fh_out: pyfuse3.FileHandleT, off_out: int, length: int,
                              flags: pyfuse3.FlagT) -> int:
        if (fh_in, fh_out, length, flags) != (HELLO_INO, PAIR_INO, 100, 0):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return off_in + off_out


def serve(mountpoint: str, spin: float) -> None:
    pyfuse3.init(TinyFS(), mountpoint, set(pyfuse3.default_options))
    print("mounted", flush=True)
    try:
        pyfuse3.main_threads(2, spin)
        print("main_threads returned", flush=True)
    finally:
        pyfuse3.close(unmount=True)


@contextmanager
def served(mount: Path, spin: float = 0.0) -> Iterator[subprocess.Popen[str]]:
    """TinyFS mounted at *mount* by ``main_threads(2, spin)`` in a child process."""
    mount.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", __name__, str(mount), str(spin)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline()
        assert first == "mounted\n", first + proc.stdout.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        unmount(mount)


def finish(proc: subprocess.Popen[str]) -> str:
    """Wait for the daemon to exit by itself; what it printed."""
    out, _ = proc.communicate(timeout=WAIT)
    return out


def in_mount_table(mount: Path) -> bool:
    with open("/proc/self/mounts", "rb") as table:
        return any(line.split()[1] == os.fsencode(os.path.realpath(mount)) for line in table)


def read_pair(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, 4096, 0)
    finally:
        os.close(fd)


def test_pyfuse3_is_the_patched_build() -> None:
    assert hasattr(pyfuse3, "main_threads"), (
        "pyfuse3 was not built with bin/pyfuse3-threads.patch; bin/test rebuilds .venv")


def test_main_threads_serves_reads_from_two_threads_until_unmounted(tmp_path: Path) -> None:
    """Two reads at once, each waiting for the other, are both served: the
    sleeping worker takes over once the first has run the handoff time."""
    mount = tmp_path / "m"
    with ThreadPoolExecutor(2) as pool, served(mount) as proc:
        assert sorted(os.listdir(mount)) == ["hello", "pair"]
        assert (mount / "hello").read_bytes() == HELLO
        assert (mount / "hello").stat().st_size == len(HELLO)

        # Two reads at once: each one waits in the daemon for the other.
        reads = [pool.submit(read_pair, mount / "pair") for _ in range(2)]
        served_by = {read.result(timeout=WAIT) for read in reads}
        assert len(served_by) == 2, served_by
        assert all(name.startswith(b"pyfuse3-worker-") for name in served_by)

        subprocess.run(["fusermount3", "-u", str(mount)], check=True, timeout=WAIT)
        out = finish(proc)
    assert proc.returncode == 0, out
    assert "main_threads returned" in out


def test_fallocate_copy_file_range_lseek_reach_their_handlers(tmp_path: Path) -> None:
    mount = tmp_path / "m"
    with served(mount):
        hello = os.open(mount / "hello", os.O_RDWR)
        pair = os.open(mount / "pair", os.O_WRONLY)
        try:
            assert os.lseek(hello, 7, os.SEEK_DATA) == 7 * 10 + os.SEEK_DATA
            assert os.lseek(hello, 8, os.SEEK_HOLE) == 8 * 10 + os.SEEK_HOLE
            with pytest.raises(OSError) as failed:
                os.posix_fallocate(hello, 2, 3)  # mode 0: EINVAL from the handler
            assert failed.value.errno == errno.EINVAL
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate64.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                         ctypes.c_int64)
            assert libc.fallocate64(hello, 1, 2, 3) == -1
            assert ctypes.get_errno() == errno.EDQUOT
            assert os.copy_file_range(hello, pair, 100, 30, 4) == 34
        finally:
            os.close(pair)
            os.close(hello)


def test_new_handlers_default_to_enosys() -> None:
    """The kernel's answer to ENOSYS is its behaviour without a handler."""
    ops = pyfuse3.Operations()
    for call in (ops.fallocate(1, 0, 0, 1), ops.copy_file_range(1, 0, 2, 0, 1, 0),
                 ops.lseek(1, 0, os.SEEK_DATA)):
        with pytest.raises(pyfuse3.FUSEError) as failed:
            call.send(None)
        assert failed.value.errno == errno.ENOSYS


def test_terminate_in_a_handler_stops_every_worker(tmp_path: Path) -> None:
    mount = tmp_path / "m"
    with served(mount) as proc:
        with pytest.raises(FileNotFoundError):
            os.stat(mount / "stop")
        out = finish(proc)
        assert proc.returncode == 0, out
        assert "main_threads returned" in out
        assert not in_mount_table(mount), "close() after main_threads() unmounts"


def test_a_handler_that_suspends_fails_with_eio_and_stops_the_loop(tmp_path: Path) -> None:
    mount = tmp_path / "m"
    with served(mount) as proc:
        with pytest.raises(OSError) as raised:
            os.stat(mount / "suspend")
        assert raised.value.errno == errno.EIO
        out = finish(proc)
    assert proc.returncode == 1, out
    assert "RuntimeError: fuse_lookup_async suspended" in out


def sleeps(task: str) -> int:
    """How many times *task* (a path under /proc) went to sleep so far."""
    with open(f"/proc/{task}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


def work(seconds: float) -> None:
    """Keep this thread busy for *seconds* (a CPU that idles would sleep)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


@pytest.mark.parametrize("spin", [0.0, 0.9])
def test_main_threads_spin_takes_the_next_request_without_sleeping(
        tmp_path: Path, spin: float) -> None:
    """With *spin*, the worker that served a request takes the next one, which
    the application sends as soon as it has the answer, without sleeping in
    between; without, it sleeps before each one. With *spin*, the other worker
    sleeps on too: a quick request wakes no worker that does not take it."""
    mount = tmp_path / "m"
    served_by: list[tuple[int, int]] = []
    with served(mount, spin):
        before = os.stat(mount / "workers").st_size
        for _ in range(300):
            served_by.append(divmod(os.stat(mount / "tid").st_size, 1 << 32))
            work(0.0005)  # what an application does between two calls
        slept = os.stat(mount / "workers").st_size - before
    # a request served by the thread that served the one before, which never slept since
    awake = sum(1 for before, after in itertools.pairwise(served_by) if before == after)
    if spin:
        assert awake >= 250, served_by
        # (a worker held up past the handoff time, preempted, wakes the other: twice)
        assert slept <= 100, (slept, served_by)
    else:
        assert awake <= 30, served_by


if __name__ == "__main__":
    serve(sys.argv[1], float(sys.argv[2]))
