"""Mounting and serving a mount: the checks before, the options, the kernel's share of
dirty pages, the request threads, and stopping on a signal. The daemons that mount
are composed in fs/primary_daemon.py and fs/standby_daemon.py.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import threading
from pathlib import Path

import pyfuse3
import trio

from fs.prune import Pruner
from repl.errors import UsageError
from repl.sdnotify import notify
from store.libc import mounts

log = logging.getLogger("replfs.primary")  # the name its lines have always carried

# Threads serving FUSE requests. An fsync waits for the disk in its thread,
# and a change waits in its thread while the mount is frozen (verify): with
# two, the other goes on meanwhile. One at a time waits for requests, without
# the GIL; another wakes only once it has spent 1 ms on one (pyfuse3's handoff).
WORKERS = int(os.environ.get("RP_WORKERS", "2"))
# How long a thread that served a request looks for the next one before it sleeps.
# On a virtual machine waking a thread on an idle CPU is slow: an application's
# requests that follow one another (a new file's LOOKUP, CREATE, WRITE, RELEASE)
# are taken up without that wait. One thread at a time, and only while requests come.
SPIN_SECONDS = float(os.environ.get("RP_SPIN_US", "50")) / 1e6
_pruning: tuple[Pruner, threading.Thread] | None = None  # of the mount being served


def check_mountpoint(mountpoint: Path) -> None:
    """Raise UsageError unless *mountpoint* is a directory replfs can mount on."""
    try:
        is_dir = stat.S_ISDIR(os.stat(mountpoint).st_mode)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a FUSE mount whose daemon died
            raise UsageError(f"{mountpoint} is the mount of a daemon that is gone; unmount it "
                             f"first (fusermount3 -u {mountpoint})") from None
        is_dir = False
    if not is_dir:
        raise UsageError(f"mountpoint {mountpoint} does not exist or is not a directory; "
                         "create it with mkdir")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is already a mountpoint; unmount it first "
                         f"(fusermount3 -u {mountpoint})")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing; load the fuse module (modprobe fuse) "
                         "or run where FUSE is available")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UsageError("no permission to open /dev/fuse; run as root or join the fuse group")


def mount_options() -> set[str]:
    options = set(pyfuse3.default_options) | {"fsname=replfs", "subtype=replfs"}
    if os.geteuid() == 0:
        options.add("allow_other")
    return options


def mount(operations: pyfuse3.Operations, mountpoint: Path, *, read_only: bool = False
          ) -> None:
    """Mount *operations* at *mountpoint*; UsageError if the kernel refuses."""
    options = mount_options() | ({"ro"} if read_only else set())
    try:
        with os.scandir(mountpoint) as entries:
            if next(entries, None) is not None:
                log.warning("%s is not empty: what it holds is hidden while replfs serves it",
                            mountpoint)
    except OSError:
        pass  # what was wrong with it, the mount says
    try:
        pyfuse3.init(operations, str(mountpoint), options)
    except RuntimeError:
        raise UsageError(f"could not mount {mountpoint} (see the fuse message above); "
                         "check permissions and that it is not in use") from None


def lift_dirty_limit(where: str) -> None:
    """Let the kernel keep this mount's dirty pages as it keeps a disk's.

    The kernel holds a FUSE mount to a strict 1 % of the dirty page limit (about
    48 MB on a 24 GiB host), as its daemon may be any user's and never write back:
    past that a writer waits for each page to reach the daemon, and random writes
    over a large file cost a request a page. replfs runs as root and writes back
    like a disk, so its mount gets a disk's share. *where* is the mountpoint's real
    path, taken before mounting: the mount is found by its device in
    /proc/self/mountinfo, since a stat of it would wait for a daemon that does not
    serve yet.
    """
    devices = [device for point, device in mounts() if point == where]
    if not devices:
        return
    bdi = Path("/sys/class/bdi") / devices[-1]
    try:
        (bdi / "strict_limit").write_text("0")
        (bdi / "max_ratio").write_text("100")
    except OSError as exc:
        log.warning("the kernel keeps %s to its FUSE share of dirty pages: %s", where, exc)


async def serve_requests(pruner: Pruner | None = None) -> None:
    """Serve FUSE requests from WORKERS threads until unmounted; returns then, with
    *pruner* (fs/prune.py) run in a thread of its own meanwhile.

    Cancelled, it stops the threads (pyfuse3.terminate) and returns once they
    are done. A handler that raised (other than FUSEError) stops them too, and
    its exception propagates here.
    """
    global _pruning
    done = threading.Event()

    async def stop_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            if not done.is_set():
                _terminate()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_cancel)
        if pruner is not None:
            _pruning = (pruner, threading.Thread(target=pruner.run, name="prune", daemon=True))
            _pruning[1].start()
        try:
            await trio.to_thread.run_sync(pyfuse3.main_threads, WORKERS, SPIN_SECONDS)
        finally:
            done.set()
            nursery.cancel_scope.cancel()
            _stop_pruning()  # unmounted: a drop under way fails at once


def _terminate() -> None:
    """Stop the request threads, the pruner first: a drop it has under way may wait
    for a request in flight, which only the request threads can answer."""
    _stop_pruning()
    pyfuse3.terminate()


def _stop_pruning() -> None:
    """Stop the pruner and wait for it: it notifies the session, which the caller of
    ``serve_requests`` closes next."""
    global _pruning
    if _pruning is not None:
        pruner, thread = _pruning
        pruner.stop()
        thread.join(timeout=10)
        if thread.is_alive():  # a request it waits for will never be answered
            log.warning("the kernel did not let go of the pruning thread; exiting anyway")
        _pruning = None


async def terminate_on_signal(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                              ) -> None:
    """Stop serving on SIGINT or SIGTERM; started once they are caught."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("got %s, unmounting", signal.Signals(signum).name)
            notify("STOPPING=1")
            _terminate()
            return
