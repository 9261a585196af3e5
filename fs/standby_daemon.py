"""The standby daemons: the read-only view of a replica mounted on its own
(``replfs mount``), or served by the secondary that applies to it
(``replfs secondary --mount``), each with ``replfs status MOUNTPOINT``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from fs.inodes import Inodes
from fs.mount import check_mountpoint, mount, serve_requests, terminate_on_signal
from fs.prune import MAX_INODES, Pruner
from fs.standby import StandbyFS
from repl import control
from repl.config import check_apart
from repl.errors import UsageError
from repl.iscsi.names import DEFAULT_IQN
from repl.sdnotify import notify
from repl.secondary.run import (
    make_replica,
    old_primary_tree,
    run_secondary,
    staging_dir_of,
    staging_of_replica,
    tree_lock,
)
from repl.version import VERSION
from store.hold import ApplyLock, is_held, set_rejoining
from store.staging import read_applied, read_syncing

log = logging.getLogger("replfs.primary")  # the name its lines have always carried


async def run_standby(replica: Path, mountpoint: Path, staging: Path | None,
                      max_inodes: int = MAX_INODES) -> None:
    """Mount a read-only view of *replica* that only ever shows whole data sets.

    Nothing tells this process what a set changes, so the kernel caches nothing.
    """
    if not replica.is_dir():
        raise UsageError(f"replica {replica} does not exist or is not a directory")
    check_mountpoint(mountpoint)
    check_apart(("the replica", replica), ("the mountpoint", mountpoint),
                ("the staging store", staging_dir_of(replica, staging)))
    if old_primary_tree(replica):
        raise UsageError(f"{replica} is a primary's tree, not a replica: an old primary shows "
                         "the new primary's sets once it rejoins (replfs secondary --rejoin)")
    where = staging_of_replica(replica, staging)
    syncing = read_syncing(where)
    if syncing is not None:
        raise UsageError(f"replica {replica} is still in its initial sync (set {syncing}) and "
                         "has no consistent set to show yet; see replfs status on the primary")
    lock = ApplyLock(where)
    inodes = Inodes(str(replica), verify=True, limit=max_inodes)
    sock = control.socket_path(mountpoint)  # before mounting: it may stat the mountpoint
    try:
        operations = StandbyFS(inodes, lock, where)
        mount(operations, mountpoint, read_only=True)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(control.serve, sock,
                                    {"status": _status(replica, mountpoint, lock, where,
                                                       cached=False)})
                await nursery.start(terminate_on_signal)
                with lock.shared():
                    shown = read_applied(where)
                log.info("serving %s read-only at %s (standby, set %d)", replica, mountpoint,
                         shown)
                notify("READY=1", f"STATUS=serving {replica} read-only at {mountpoint}")
                await serve_requests(Pruner(inodes, operations.lock))
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)
    finally:
        inodes.close()
        lock.close()


async def run_secondary_standby(replica: Path, mountpoint: Path, listen: str | None,
                                staging: Path | None, tls: Path | None,
                                peer: str | list[str] | None, insecure: bool,
                                rejoin: bool = False,
                                metrics_at: str | None = None, iscsi: str | None = None,
                                iqn: str = DEFAULT_IQN, chap_file: Path | None = None,
                                fcip: str | None = None, max_inodes: int = MAX_INODES) -> None:
    """The secondary (repl/secondary/run.py), also serving the standby mount of its replica.

    In one process, the applier can drop the kernel's caches of what each batch
    touches before applying it (fs/kernel_cache.py), so the kernel caches the view.
    If the mount is unmounted from outside, replication goes on without it.
    """
    check_mountpoint(mountpoint)
    where = staging_dir_of(replica, staging)
    check_apart(("the replica", replica), ("the mountpoint", mountpoint),
                ("the staging store", where))
    make_replica(replica)
    with tree_lock(replica):  # run_secondary takes it again (it is re-entrant)
        lock = ApplyLock(where)
        if old_primary_tree(replica):
            set_rejoining(where, True)  # before the view is served; run_secondary says for sure
        inodes = Inodes(str(replica), verify=True, limit=max_inodes)
        operations = StandbyFS(inodes, lock, where, cached=True)
        cache = operations.cache
        assert cache is not None
        sock = control.socket_path(mountpoint)  # before mounting: it may stat the mountpoint
        served = False

        async def serve_view(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
            nonlocal served
            mount(operations, mountpoint, read_only=True)
            served = True
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(control.serve, sock,
                                        {"status": _status(replica, mountpoint, lock, where,
                                                           cached=True)})
                    log.info("serving %s read-only at %s (standby, cached)", replica,
                             mountpoint)
                    task_status.started()
                    await serve_requests(Pruner(inodes, operations.lock))
                    cache.unmounted()
                    log.info("unmounted %s; the secondary goes on without it", mountpoint)
            finally:
                cache.unmounted()

        try:
            await run_secondary(replica, listen, staging, tls, peer, insecure, rejoin,
                                metrics_at, invalidator=cache, view=serve_view, iscsi=iscsi,
                                iqn=iqn, chap_file=chap_file, fcip=fcip)
        finally:
            if served:  # closed once the applier is done: it drops the view's caches
                pyfuse3.close(unmount=True)
            inodes.close()
            lock.close()


def _status(replica: Path, mountpoint: Path, lock: ApplyLock, where: Path, cached: bool
            ) -> control.Handler:
    """``replfs status MOUNTPOINT`` for a standby mount. Served by the secondary (which
    holds the staging store open), it leaves the set shown to ``replfs status REPLICA``."""
    async def status(_: dict[str, Any]) -> dict[str, Any]:
        out = {"role": "standby mount", "version": VERSION, "replica": str(replica),
               "mountpoint": str(mountpoint), "held": is_held(where), "cached": cached}
        if not cached:
            with lock.shared():
                out["shows_set"] = read_applied(where)
        return out

    return status
