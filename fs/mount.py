"""Run the primary: recover the journal, mount, serve until unmounted or signalled."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from fs.inodes import Inodes
from fs.primary import PrimaryFS
from repl import control
from repl.capture import Capture
from repl.tree import Tree
from store.errors import ReplfsError
from store.journal import Journal

log = logging.getLogger("replfs.primary")


class UsageError(ReplfsError):
    """Bad input from the user: said in one line, nothing touched."""


def default_state_dir(tree: str | os.PathLike[str]) -> Path:
    """Where a tree's journal and staging live unless told: beside it, hidden."""
    path = Path(os.path.realpath(tree))
    return path.parent / f".{path.name}.replfs"


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
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


async def run_primary(backing: Path, mountpoint: Path, journal_dir: Path | None,
                      set_interval: float, set_bytes: int) -> None:
    if not backing.is_dir():
        raise UsageError(f"backing directory {backing} does not exist or is not a directory")
    check_mountpoint(mountpoint)
    if Path(os.path.realpath(mountpoint)) == Path(os.path.realpath(backing)):
        raise UsageError("the mountpoint cannot be the backing directory itself")
    os.umask(0)
    journal = Journal(journal_dir or default_state_dir(backing) / "journal")
    tree = Tree(backing)
    capture = Capture(journal, tree, set_interval=set_interval, set_bytes=set_bytes)
    try:
        note = capture.recover()
        if note:
            log.info("recovered the journal: %s", note)
        inodes = Inodes(str(backing))
        operations = PrimaryFS(inodes, capture)
        sock = control.socket_path(mountpoint)  # before mounting: it stats the mountpoint
        try:
            pyfuse3.init(operations, str(mountpoint), mount_options())
        except RuntimeError:
            raise UsageError(f"could not mount {mountpoint} (see the fuse message above); "
                             "check permissions and that it is not in use") from None
        log.info("serving %s at %s (journal %s, set %d)", backing, mountpoint, journal.path,
                 journal.set)
        try:
            await _serve(capture, mountpoint, sock)
        finally:
            pyfuse3.close(unmount=True)
            inodes.close()
        closed = capture.close_set()
        log.info("unmounted %s; last set %d", mountpoint, closed)
    finally:
        tree.close()
        journal.close()


async def _serve(capture: Capture, mountpoint: Path, sock: Path) -> None:
    async def checkpoint(_: dict[str, Any]) -> dict[str, Any]:
        return {"set": await capture.checkpoint()}

    async def status(_: dict[str, Any]) -> dict[str, Any]:
        j = capture.journal
        return {"role": "primary", "mountpoint": str(mountpoint), "journal": str(j.path),
                "open_set": j.set, "open_set_ops": j.seq, "last_closed_set": j.set - 1,
                "journal_bytes": j.size()}

    async with trio.open_nursery() as nursery:
        await nursery.start(capture.run)
        await nursery.start(control.serve, sock,
                            {"checkpoint": checkpoint, "status": status})
        nursery.start_soon(_terminate_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("got %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
