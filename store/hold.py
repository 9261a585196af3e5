"""The replica's hold and the lock around applying a set.

The applier takes ``apply_lock`` exclusively while it applies a batch of
sets; a reader that must see one whole set (each request of the standby
mount, ``replfs pause``) takes it shared. A hold is a file beside the staging
store, so it outlives any daemon: while it exists the applier starts no
new set, and staging keeps receiving. A hold never stops the redo of a
batch a crash cut short, nor an initial sync's set begun as it arrived:
until that is done the replica is not a whole set.

Beside it, APPLYING names the batch under way and the boot that applies
it, flushed before its first op, until the batch is durable (synced, and
recorded in the apply log). Once its ops are all done, the applier says so
there and lets the lock go before it syncs: the standby shows the batch
without waiting for the disk. A crash of the daemon leaves the page cache,
so the replica is whole then; a reboot may not have kept it, so on another
boot the batch reads as torn until the primary sent its paths again
(``lost_to_power``).
"""

from __future__ import annotations

import fcntl
import functools
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from store.private import FILE_MODE, private_dir, write_private

HOLD = "HOLD"
APPLY_LOCK = "APPLY.lock"
APPLYING = "APPLYING"
REJOINING = "REJOINING"  # the replica is an old primary's tree until its rejoin applies
_UNDER_WAY = "applying"  # APPLYING's last word while the batch's ops are under way
ENV_BOOT_ID = "REPLFS_TEST_BOOT_ID"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
_APPLYING_BYTES = 128  # two set ids and a boot id fit, with room


class ApplyLock:
    """A cross-process reader/writer lock on a file in the staging directory.

    flock() locks belong to the open file, not to a thread: the threads of one
    process that hold it shared are counted, and the lock goes when the last
    one lets go.
    """

    def __init__(self, staging_dir: Path) -> None:
        private_dir(staging_dir)
        self.fd = os.open(staging_dir / APPLY_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                          FILE_MODE)
        self._mutex = threading.Lock()
        self._readers = 0

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    @contextmanager
    def shared(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock shared; with *timeout*, raise TimeoutError past it."""
        with self._mutex:  # the first reader takes it; the others wait for it here
            if self._readers == 0:
                self._take_shared(timeout)
            self._readers += 1
        try:
            yield
        finally:
            with self._mutex:
                self._readers -= 1
                if self._readers == 0:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _take_shared(self, timeout: float | None) -> None:
        if timeout is None:
            fcntl.flock(self.fd, fcntl.LOCK_SH)
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError("the apply lock stayed taken") from None
                time.sleep(0.01)  # flock has no timed wait

    def close(self) -> None:
        os.close(self.fd)


def mark_applying(staging_dir: Path, first: int, last: int) -> None:
    """Say, beside the replica, that sets *first* to at most *last* are being applied
    on this boot; durably, before the batch's first op (see ``lost_to_power``)."""
    _write_applying(staging_dir, f"{first} {last} {_boot_id()} {_UNDER_WAY}", sync=True)


def mark_applied(staging_dir: Path, first: int, last: int) -> None:
    """Say that the ops of sets *first* to *last* are all done, on this boot; the
    batch is not durable yet."""
    _write_applying(staging_dir, f"{first} {last} {_boot_id()}")


def clear_applying(staging_dir: Path) -> None:
    """No batch under way. The file stays, blank: a batch costs no file made and removed."""
    if (staging_dir / APPLYING).exists():
        _write_applying(staging_dir, "")


def _write_applying(staging_dir: Path, text: str, *, sync: bool = False) -> None:
    """Overwrite APPLYING in place, always _APPLYING_BYTES long (blanks after *text*), so
    it keeps its size and blocks: no truncate, no new file (a sync flushes its data
    alone)."""
    data = text.encode().ljust(_APPLYING_BYTES - 1) + b"\n"
    path = staging_dir / APPLYING
    made = sync and not path.exists()  # then its directory entry is flushed too
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.pwrite(fd, data, 0)
        if sync:
            os.fsync(fd) if made else os.fdatasync(fd)
    finally:
        os.close(fd)
    if made:
        _sync_dir(staging_dir)


def interrupted(staging_dir: Path) -> tuple[int, int] | None:
    """The batch of sets (first, last) not yet durable, if any (ask with the apply
    lock held).

    With the lock held, no applier is at work on the replica, so sets still
    marked as being applied were cut short by a crash (the replica is torn
    until the secondary's redo finishes them), or are applied and being
    synced. Either way the apply log does not say them yet. The crash may have
    reached any set of the batch, so the redo applies all of them, held or not.
    """
    fields = _applying(staging_dir)
    return (fields[0], fields[1]) if fields else None


def torn(staging_dir: Path) -> tuple[int, int] | None:
    """The batch (first, last) a crash cut short, if the replica is torn by one (ask
    with the apply lock held): it is not if all its ops were done on this boot."""
    fields = _applying(staging_dir)
    if fields is None or (fields[2] == _boot_id() and not fields[3]):
        return None
    return fields[0], fields[1]


def lost_to_power(staging_dir: Path) -> tuple[int, int] | None:
    """The batch (first, last) begun on another boot and never made durable, if any
    (ask with the apply lock held): the host lost its power, or was reset, while it
    was applied or synced. The replica's filesystem may then have kept any part of
    the batch's ops, not only those before the marker, so a redo from the marker
    cannot mend it (the applier asks the primary for the paths instead).

    Where the boot cannot be known, a batch never made durable counts as lost to
    power, as the primary's recovery counts such a start (repl/activity.py): a
    resend where a redo would have done, never a redo where it would not."""
    fields, boot = _applying(staging_dir), boot_id()
    if fields is None or fields[2] is None or (boot and fields[2] == boot.decode(errors="replace")):
        return None
    return fields[0], fields[1]


def _applying(staging_dir: Path) -> tuple[int, int, str | None, bool] | None:
    """(first, last, the boot that wrote it, whether its ops are still under way)."""
    try:
        first, *rest = (staging_dir / APPLYING).read_text().split()
        return (int(first), int(rest[0] if rest else first),
                rest[1] if len(rest) > 1 else None,
                len(rest) != 2)  # (boot, "applying"), or an older replfs' (no boot)
    except (FileNotFoundError, ValueError):
        return None


def boot_id() -> bytes:
    """This boot of the machine (a new one after every reboot), or b"" if unknown.
    A test reboots a machine by naming a file that holds the id in ENV_BOOT_ID."""
    override = os.environ.get(ENV_BOOT_ID)
    return _read_boot_id(override) if override else _kernel_boot_id()


@functools.cache
def _kernel_boot_id() -> bytes:
    """The kernel's: it cannot change while this process lives (read once, not at each
    request of the standby mount, which asks ``torn()``)."""
    return _read_boot_id(BOOT_ID)


def _read_boot_id(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except OSError:
        return b""


def _boot_id() -> str:
    return boot_id().decode(errors="replace") or "unknown"


def is_held(staging_dir: Path) -> bool:
    return (staging_dir / HOLD).exists()


def is_rejoining(staging_dir: Path) -> bool:
    """Whether the replica is an old primary's tree until its rejoin's set is applied:
    it then holds no whole set of any primary's (it was cut off mid-set)."""
    return (staging_dir / REJOINING).exists()


def set_rejoining(staging_dir: Path, rejoining: bool) -> None:
    """Say so, or no longer (see ``is_rejoining``), durably: once the old primary's
    journal went aside into its branch, nothing else says it."""
    path = staging_dir / REJOINING
    if rejoining == path.exists():
        return
    if rejoining:
        private_dir(staging_dir)
        write_private(path, b"")
    else:
        path.unlink()
    _sync_dir(staging_dir)


def set_hold(staging_dir: Path, held: bool) -> None:
    """Create or remove the hold, durably."""
    private_dir(staging_dir)
    path = staging_dir / HOLD
    if held:
        write_private(path, b"")
    else:
        path.unlink(missing_ok=True)
    _sync_dir(staging_dir)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
