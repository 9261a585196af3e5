"""The primary daemon: its options, the links to its secondaries, and run_primary,
which composes the journal, capture, the senders and the mount, and serves the
control socket (checkpoint, status, freeze, fence, add_secondary).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from fs.inodes import Inodes
from fs.mount import check_mountpoint, lift_dirty_limit, mount, serve_requests, terminate_on_signal
from fs.primary import PrimaryFS
from fs.prune import MAX_INODES, Pruner
from repl import control, histograms, metrics
from repl.config import check_apart, parse_address
from repl.errors import UsageError
from repl.fc.link import FcipDialer
from repl.fc.names import is_fcip
from repl.fc.names import parse_url as parse_fcip_url
from repl.iscsi import chap
from repl.iscsi.link import IscsiDialer
from repl.iscsi.names import is_iscsi, parse_url
from repl.link import Dialer, tcp_dialer, transport
from repl.primary import recovery
from repl.primary.capture import (
    DEFAULT_JOURNAL_MAX,
    DEFAULT_SET_BYTES,
    DEFAULT_SET_INTERVAL,
    Capture,
)
from repl.primary.fanout import Fanout
from repl.primary.semisync import FSYNC_TIMEOUT, Semisync
from repl.primary.sender import COMPRESS_LEVEL, STALL_SECONDS, Sender
from repl.sdnotify import notify
from repl.secondary.run import default_state_dir, journal_of, note_journal, tree_lock
from repl.tls import link_credentials
from repl.tree import Tree
from repl.version import VERSION
from store.errors import ReplfsError
from store.journal import Journal
from store.journal import exists as journal_exists

log = logging.getLogger("replfs.primary")


@dataclass
class PrimaryConfig:
    backing: Path
    mountpoint: Path
    journal: Path | None = None
    set_interval: float = DEFAULT_SET_INTERVAL
    set_bytes: int = DEFAULT_SET_BYTES
    journal_max: int = DEFAULT_JOURNAL_MAX
    secondaries: list[str] = field(default_factory=list)  # HOST:PORT or iscsi://...
    streams: int = 4
    scramble: int | None = None  # seed: shuffle records across streams (testing aid)
    stall_seconds: float = STALL_SECONDS
    tls: Path | None = None  # DIR/NAME: this node's certificate, key and CA (repl/tls.py)
    peers: list[str] = field(default_factory=list)  # names their certificates carry
    insecure: bool = False  # plain TCP to a loopback secondary
    metrics: str | None = None  # HOST:PORT to serve Prometheus metrics on
    compress_level: int = COMPRESS_LEVEL  # zstd level of shipped records; 0: uncompressed
    max_rate: int | None = None  # bytes a second on the wire to the secondary, at most
    chap: Path | None = None  # the CHAP secrets of an iscsi:// secondary (repl/iscsi/chap.py)
    dynamic: bool = False  # secondaries are added at run time (a cluster's primary)
    fenced: bool = False  # refuse changes until told otherwise (a cluster's primary)
    fsync: str = "local"  # "remote" or "received": an fsync also waits for the secondaries
    fsync_timeout: float = FSYNC_TIMEOUT  # ... at most this long, then not for a stalled one
    max_inodes: int = MAX_INODES  # the mount's table of inodes the kernel knows, near this


def _make_sender(cfg: PrimaryConfig, capture: Capture, node: str
                 ) -> Callable[[str, str | None], Sender]:
    """How the primary makes the Sender of one secondary address: its link (replfs
    frames over TLS or TCP, iSCSI or FCIP) and the options of *cfg*.

    Raises UsageError for options that do not fit the address (checked at start
    for every address given, and for each one added later).
    """
    secrets = chap.load(cfg.chap) if cfg.chap is not None else None

    def make(address: str, peer: str | None) -> Sender:
        scsi = is_iscsi(address) or is_fcip(address)
        dialer: Dialer
        if scsi:
            _parse_scsi(address)
            if secrets is None:
                raise UsageError(f"{_kind(address)} secondary needs --chap FILE, the CHAP "
                                 "secrets (make them with 'replfs chap FILE')")
            dialer = (IscsiDialer(address, secrets, node) if is_iscsi(address)
                      else FcipDialer(address, secrets, node))
            log.info("replicating to %s over %s, CHAP as %s: authenticated, not encrypted",
                     address, transport(address), secrets.initiator_name)
        else:
            host, port = parse_address(address)
            creds = link_credentials(cfg.tls, peer or _peer_of(cfg, address), cfg.insecure,
                                     host)
            dialer = tcp_dialer(host, port, creds)
            if creds is None:
                log.warning("INSECURE (--insecure): replicating to %s over plain TCP, "
                            "nobody authenticated, nothing encrypted", address)
        return Sender(capture.journal, dialer, streams=cfg.streams, scramble=cfg.scramble,
                      stall_seconds=cfg.stall_seconds, settled=capture.lock,
                      # one record, one SCSI WRITE: no compression over SCSI
                      compress_level=0 if scsi else cfg.compress_level,
                      max_rate=cfg.max_rate, framed=not scsi)

    return make


def _peer_of(cfg: PrimaryConfig, address: str) -> str | None:
    """The name the certificate of the secondary at *address* must carry: the --peer
    given in the same place as its --secondary (one --peer serves them all)."""
    if not cfg.peers:
        return None
    if len(cfg.peers) == 1:
        return cfg.peers[0]
    return cfg.peers[cfg.secondaries.index(address)]


def _check_links(cfg: PrimaryConfig) -> None:
    """The link options fit the secondaries given; else UsageError."""
    scsi = [a for a in cfg.secondaries if is_iscsi(a) or is_fcip(a)]
    frames = [a for a in cfg.secondaries if a not in scsi]
    if not cfg.secondaries and not cfg.dynamic and (cfg.tls or cfg.peers or cfg.insecure
                                                    or cfg.max_rate or cfg.chap
                                                    or cfg.fsync != "local"):
        raise UsageError("--tls, --peer, --insecure, --chap, --max-rate and --fsync remote "
                         "or received are for the link to a secondary: they need "
                         "--secondary HOST:PORT")
    if len(set(cfg.secondaries)) < len(cfg.secondaries):
        raise UsageError("a --secondary is given twice")
    if scsi and not frames and (cfg.tls or cfg.peers or cfg.insecure):
        raise UsageError(f"{_kind(scsi[0])} secondary is authenticated with CHAP "
                         "(--chap FILE), not --tls, --peer or --insecure")
    if cfg.chap and not scsi and not cfg.dynamic:
        raise UsageError("--chap is for an iscsi:// or fcip:// secondary")
    if len(cfg.peers) > 1 and len(cfg.peers) != len(cfg.secondaries):
        raise UsageError(f"{len(cfg.peers)} --peer for {len(cfg.secondaries)} --secondary: "
                         "give one --peer per --secondary, in the same order (or one for "
                         "all)")
    for address in scsi:
        _parse_scsi(address)
    if scsi and cfg.chap is None:
        raise UsageError(f"{_kind(scsi[0])} secondary needs --chap FILE, the CHAP secrets "
                         "(make them with 'replfs chap FILE')")
    if cfg.chap is not None:
        chap.load(cfg.chap)
    for address in frames:  # before anything is made: a refused start leaves nothing
        link_credentials(cfg.tls, _peer_of(cfg, address), cfg.insecure,
                         parse_address(address)[0])


def _kind(address: str) -> str:
    return "an iscsi://" if is_iscsi(address) else "an fcip://"


def _parse_scsi(address: str) -> None:
    """Check an iscsi:// or fcip:// address; UsageError if it is not one."""
    if is_iscsi(address):
        parse_url(address)
    else:
        parse_fcip_url(address)


async def run_primary(cfg: PrimaryConfig) -> None:
    """Serve the primary mount of ``cfg.backing`` at ``cfg.mountpoint`` until unmounted
    or signalled: the journal and capture, recovery, a sender per secondary, the mount,
    the control socket and metrics, in that order; a clean stop closes the set."""
    backing, mountpoint = cfg.backing, cfg.mountpoint
    if not backing.is_dir():
        raise UsageError(f"backing directory {backing} does not exist or is not a directory")
    check_mountpoint(mountpoint)
    journal_dir = cfg.journal or default_state_dir(backing) / "journal"
    check_apart(("the backing directory", backing), ("the mountpoint", mountpoint),
                ("the journal", journal_dir))
    _check_links(cfg)
    scrape = await metrics.listen(cfg.metrics) if cfg.metrics else []
    os.umask(0)
    with tree_lock(backing):  # one daemon a tree, whatever journal each was given
        kept = journal_of(backing)
        if journal_exists(kept) and os.path.realpath(kept) != os.path.realpath(journal_dir):
            raise UsageError(f"the journal of {backing} is {kept}; give --journal {kept}, or "
                             f"move it to {journal_dir} first (a new journal would start "
                             "the tree over, and its secondaries with it)")
        journal = Journal(journal_dir)
        note_journal(backing, journal.path)  # a journal elsewhere: said beside the tree
        tree = Tree(backing)
        capture = Capture(journal, tree, set_interval=cfg.set_interval, set_bytes=cfg.set_bytes,
                          journal_max=cfg.journal_max, secondaries=cfg.secondaries)
        try:
            note = recovery.recover(capture)
            if note:
                log.info("recovered the journal: %s", note)
            remote = (Semisync(cfg.fsync_timeout, receipts=cfg.fsync == "received")
                      if cfg.fsync != "local" else None)
            fanout = Fanout(capture, _make_sender(cfg, capture, journal.identity.node),
                            cfg.secondaries, remote)
            capture.on_durable = fanout.notify
            inodes = Inodes(str(backing), limit=cfg.max_inodes)
            operations = PrimaryFS(inodes, capture, remote)
            if cfg.fenced:
                operations.fence()  # until the node that runs us says its lease holds
            sock = control.socket_path(mountpoint)  # before mounting: it may stat the mountpoint
            where = os.path.realpath(mountpoint)  # so does this
            mount(operations, mountpoint)
            lift_dirty_limit(where)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(capture.run)
                    await nursery.start(fanout.run)
                    await nursery.start(control.serve, sock,
                                        _requests(capture, fanout, operations, cfg))
                    if scrape:
                        registry = metrics.registry(lambda: metrics.primary_metrics(
                                                        capture, list(fanout.senders.values()),
                                                        operations.requests.snapshot(),
                                                        operations.remote),
                                                    histograms.FSYNC_SECONDS,
                                                    histograms.SET_BYTES)
                        await nursery.start(metrics.serve, scrape, registry)
                        log.info("metrics on http://%s/metrics", metrics.where(scrape))
                    await nursery.start(terminate_on_signal)
                    log.info("serving %s at %s (journal %s, set %d)", backing, mountpoint,
                             journal.path, journal.set)  # its control requests too, from now
                    notify("READY=1", f"STATUS=serving {backing} at {mountpoint}")
                    await serve_requests(Pruner(inodes, operations.lock))
                    nursery.cancel_scope.cancel()
            finally:
                pyfuse3.close(unmount=True)
                inodes.close()
            try:
                closed = capture.close_set()
                capture.backing_sync.sync(final=True)  # a clean stop: nothing to replay or resend
            except OSError as exc:  # a full disk, past the journal's reserve
                log.error("unmounted %s; closing the last set failed (%s): the next start "
                          "replays the journal", mountpoint, exc.strerror)
            else:
                log.info("unmounted %s; last set %d", mountpoint, closed)
        finally:
            tree.close()
            journal.close()


def _requests(capture: Capture, fanout: Fanout, operations: PrimaryFS, cfg: PrimaryConfig
              ) -> dict[str, control.Handler]:
    """The primary's control requests (repl/control.py), by name."""
    async def checkpoint(request: dict[str, Any]) -> dict[str, Any]:
        """Close a set; with ``wait`` seconds, also wait for the secondaries to apply it."""
        set_id = await capture.checkpoint()
        reply: dict[str, Any] = {"set": set_id}
        if request.get("wait") and fanout:
            error = await fanout.applied_within(set_id, float(request["wait"]))
            if error:
                reply["error"] = error
        return reply

    async def freeze(request: dict[str, Any]) -> dict[str, Any]:
        """Hold changes, close a set and wait for the secondaries to apply it.

        The mount stays frozen until the client closes its connection.
        """
        operations.freeze()
        try:
            set_id = await capture.checkpoint()
            reply: dict[str, Any] = {"set": set_id, "backing": str(cfg.backing)}
            if fanout:
                error = await fanout.applied_within(set_id, float(request.get("wait", 60)))
                if error:
                    operations.thaw()
                    return {"error": error}
        except BaseException:
            operations.thaw()
            raise
        reply[control.UNTIL_CLOSED] = operations.thaw
        return reply

    async def fence(request: dict[str, Any]) -> dict[str, Any]:
        """Refuse every change with EROFS from time.monotonic() ``until`` on (now if not
        given; null: never): a cluster's primary writes while its lease holds, and
        is given a new deadline at each renewal (repl/cluster/node.py), sent at
        time.monotonic() ``renewed``."""
        until, renewed = request.get("until", 0.0), request.get("renewed")
        operations.fence(math.inf if until is None else float(until),
                         None if renewed is None else float(renewed))
        return {"fenced": operations.fenced}

    async def add_secondary(request: dict[str, Any]) -> dict[str, Any]:
        """Replicate to one more secondary (a cluster's node that joined)."""
        peer = request.get("peer")
        try:
            return {"added": await fanout.add(str(request["address"]),
                                              str(peer) if peer is not None else None)}
        except ReplfsError as exc:
            return {"error": f"cannot replicate to {request['address']}: {exc}"}

    async def status(_: dict[str, Any]) -> dict[str, Any]:
        j = capture.journal
        out: dict[str, Any] = {
            "role": "primary", "version": VERSION, "mountpoint": str(cfg.mountpoint),
            "journal": str(j.path),
            "cluster": j.identity.cluster, "node": j.identity.node,
            "generation": j.identity.generation, "open_set": j.set, "open_set_ops": j.seq,
            "last_closed_set": j.set - 1, "journal_bytes": j.bytes,
            "journal_max": capture.journal_max,
            "journal_disk_free": j.disk_free(), "journal_reserve_in_use": j.reserve_in_use,
            "mode": ("initial sync" if capture.resync.syncing else
                     "overflow" if capture.overflow else "streaming"),
            "fenced": operations.fenced,
            "fsync": cfg.fsync,
            "requests": operations.requests.snapshot(),
            "inodes": len(operations.inodes.nodes),  # the kernel knows (fs/prune.py)
        }
        if capture.overflow:
            resync = capture.resync
            out |= {"dirty_files": len(resync.dirty.files), "dirty_bytes": resync.dirty.total(),
                    "resync_done_bytes": resync.progress_done,
                    "resync_total_bytes": resync.progress_total}
        if operations.remote is not None:
            out["fsync_local_only"] = operations.remote.local_only
        blocks = fanout.status()
        if blocks:
            out["secondaries"] = blocks
        if len(blocks) == 1:
            out |= blocks[0]  # one secondary: its keys at the top, as before there were more
        return out

    return {"checkpoint": checkpoint, "status": status, "freeze": freeze, "fence": fence,
            "add_secondary": add_secondary}
