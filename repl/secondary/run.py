"""Run the secondary: receive into staging, apply complete sets to the replica."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from repl import control, histograms, metrics
from repl.config import cannot_bind, check_apart, parse_address
from repl.errors import UsageError
from repl.fc import target as fc_target
from repl.fc.names import Names, show
from repl.iscsi import chap, target
from repl.iscsi.names import DEFAULT_IQN
from repl.sdnotify import notify
from repl.secondary.applier import Applier
from repl.secondary.footprint import Invalidator
from repl.secondary.gate import Gate
from repl.secondary.receiver import Receiver
from repl.secondary.rejoin import Rejoin
from repl.tls import link_credentials
from repl.version import VERSION
from store.errors import JournalLocked
from store.hold import ApplyLock, interrupted, is_held, set_hold, set_rejoining
from store.journal import Journal
from store.journal import exists as journal_exists
from store.lmdbdir import lock_dir
from store.private import DIR_MODE, check_private, private_dir, write_private
from store.reserve import disk_free
from store.staging import Staging, read_applied, read_syncing

log = logging.getLogger("replfs.secondary")


def default_state_dir(tree: str | os.PathLike[str]) -> Path:
    """Where a tree's journal and staging live unless told: beside it, hidden."""
    path = Path(os.path.realpath(tree))
    return path.parent / f".{path.name}.replfs"


JOURNAL_AT = "journal-at"  # beside a tree whose primary kept its journal elsewhere
_held: dict[str, list[int]] = {}  # a tree's real path -> [its lock's fd, holders]


@contextmanager
def tree_lock(tree: Path, wait: float = 0) -> Iterator[None]:
    """Hold *tree*'s lock (LOCK in its state directory, beside it) for the block: one
    daemon a tree, whichever journal or staging store each was given. Re-entrant in a
    process (a secondary that serves its standby mount takes it once for both).
    Raises UsageError if another process holds it (after *wait* seconds)."""
    key = os.path.realpath(tree)
    if key in _held:
        _held[key][1] += 1
    else:
        state = default_state_dir(tree)
        state.mkdir(mode=DIR_MODE, exist_ok=True)
        check_private(state)  # not its parent, the tree's: that is the user's to keep
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = lock_dir(state / "LOCK", what=str(tree))
                break
            except JournalLocked as exc:
                if time.monotonic() >= deadline:
                    raise UsageError(f"{exc}; stop it first") from None
                time.sleep(0.05)  # a daemon asked to stop is still letting go
        _held[key] = [fd, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if not _held[key][1]:
            os.close(_held.pop(key)[0])


def journal_of(tree: Path) -> Path:
    """Where the journal of a primary of *tree* is: beside it, or where a primary run
    with ``--journal DIR`` said (``note_journal``)."""
    state = default_state_dir(tree)
    path = state / "journal"
    if not journal_exists(path) and (state / JOURNAL_AT).exists():
        return Path((state / JOURNAL_AT).read_text().strip())
    return path


def note_journal(tree: Path, journal: Path) -> None:
    """Say beside *tree* where its primary keeps its journal, if not beside it: after a
    failover, the old primary's tree must be known for one (``journal_of``)."""
    state = default_state_dir(tree)
    note = state / JOURNAL_AT
    if Path(os.path.realpath(journal)) == Path(os.path.realpath(state / "journal")):
        note.unlink(missing_ok=True)
        return
    private_dir(state)
    write_private(note, os.path.realpath(journal).encode() + b"\n")


def _old_primary_journal(replica: Path, rejoin: bool) -> Journal | None:
    """The journal of an old primary whose tree *replica* is, opened for a rejoin.

    Refuses to serve such a tree as a plain replica: its own unreplicated
    changes would be overwritten without a trace.
    """
    path = journal_of(replica)
    if not journal_exists(path):
        return None
    journal = Journal(path)
    if not written_as_primary(journal):
        journal.close()
        return None  # a promoted node's journal that no primary ever wrote to
    if not rejoin:
        journal.close()
        raise UsageError(f"{replica} is a primary's tree (journal at {path}); to make it a "
                         "standby of the new primary pass --rejoin, which keeps its own "
                         "unreplicated changes aside")
    return journal


def old_primary_tree(replica: Path) -> bool:
    """Whether *replica* is a primary's tree (its journal, written to as a primary, is
    beside it)."""
    return journal_written(journal_of(replica))


def journal_written(path: Path) -> bool:
    """Whether *path* holds a journal a primary wrote to (``written_as_primary``):
    looked at only, whatever holds it."""
    if not journal_exists(path):
        return False
    journal = Journal(path, read_only=True)
    try:
        return written_as_primary(journal)
    finally:
        journal.close()


def written_as_primary(journal: Journal) -> bool:
    """True if a primary journaled changes of its own in *journal* (since its generation
    began), even if they are all trimmed now; not for a promoted node's journal that
    holds only the sets it kept from the primary before it (repl/secondary/promote.py)."""
    ident = journal.identity
    first = [h.get("first_set") for h in ident.history if h.get("generation") == ident.generation]
    start = first[0] if first and isinstance(first[0], int) else 1
    last = journal.last()
    if journal.set > start or (last is not None and last.set >= start):
        return True
    return not ident.history and journal.base is None  # a primary of a tree not empty


def staging_dir_of(replica: Path, staging: Path | None) -> Path:
    return staging or default_state_dir(replica) / "staging"


def staging_of_replica(replica: Path, staging: Path | None) -> Path:
    """The staging store of *replica*; raises UsageError if it is not a replica."""
    if not replica.is_dir():
        raise UsageError(f"replica {replica} does not exist")
    where = staging_dir_of(replica, staging)
    if not (where / "data.mdb").is_file():
        raise UsageError(f"{replica} is not a replica: no staging store at {where} "
                         "(a secondary makes one; give --staging if it is elsewhere)")
    return where


def pause(replica: Path, staging: Path | None, timeout: float = 60.0) -> int:
    """Hold the replica at its current set; returns that set once no set is being
    applied and the replica is whole.

    A replica a crash cut short in the middle of a set is whole again once the
    running secondary's redo finishes it (a hold never stops a redo): pause
    waits for that, then holds. Raises UsageError if no secondary is running to
    finish it, or if the replica is not whole within *timeout* seconds; a
    refused pause takes back the hold it placed.
    """
    where = staging_of_replica(replica, staging)
    held_before = is_held(where)
    set_hold(where, True)
    try:
        return _wait_whole(replica, where, time.monotonic() + timeout, timeout)
    except BaseException:
        if not held_before:
            set_hold(where, False)
        raise


def _wait_whole(replica: Path, where: Path, deadline: float, timeout: float) -> int:
    """The set the replica holds, once it is whole (see pause)."""
    lock = ApplyLock(where)
    try:
        while True:
            try:
                with lock.shared(max(0.0, deadline - time.monotonic())):
                    # A batch done on this boot but not yet recorded applied counts
                    # as not finished: the set returned is the one the apply log says.
                    cut = interrupted(where)
                    if cut is None:
                        return read_applied(where)
            except TimeoutError:
                raise UsageError(f"replica {replica} is in the middle of a set that has not "
                                 f"finished after {timeout:g}s (see replfs status {replica}); "
                                 "not paused") from None
            try:  # a running secondary finishes the torn batch, held or not
                control.request(control.socket_path(replica), "wait",
                                timeout=max(1.0, deadline - time.monotonic() + 5),
                                set=cut[0], seconds=max(0.0, deadline - time.monotonic()))
            except OSError:
                raise UsageError(f"replica {replica} was cut short in the middle of set "
                                 f"{cut[0]} by a crash and no secondary is running to finish "
                                 f"it; start replfs secondary {replica}, then pause") from None
            if time.monotonic() >= deadline:
                how = ("is in its initial sync, set" if cut[0] == read_syncing(where)
                       else "was cut short by a crash in the middle of set")
                raise UsageError(f"replica {replica} {how} {cut[0]}, and the secondary has "
                                 f"not finished it after {timeout:g}s (see replfs status "
                                 f"{replica}); not paused")
    finally:
        lock.close()


def resume(replica: Path, staging: Path | None) -> int:
    """Let applying go on; wakes a running secondary at once."""
    where = staging_of_replica(replica, staging)
    if not is_held(where):
        raise UsageError(f"replica {replica} is not paused")
    set_hold(where, False)
    try:
        control.request(control.socket_path(replica), "wake", timeout=5)
    except (OSError, ValueError):
        pass  # no daemon running, or one stopping: the next one to start sees no hold
    return read_applied(where)


async def _listen(host: str, port: int) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise UsageError(cannot_bind(f"{host}:{port}", exc)) from None


def _where(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"{host}:{port}"


async def _stop_on_signal(scope: trio.CancelScope, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    """Cancel *scope* on SIGINT or SIGTERM; started once they are caught."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("got %s, stopping", signal.Signals(signum).name)
            notify("STOPPING=1")
            scope.cancel()
            return


def make_replica(replica: Path) -> None:
    """Create the replica directory if it is missing (not its parents)."""
    if not replica.is_dir():
        if not replica.parent.is_dir():
            raise UsageError(f"replica {replica}: its parent directory does not exist")
        replica.mkdir()


async def run_secondary(replica: Path, listen: str | None, staging_dir: Path | None,
                        tls: Path | None, peer: str | list[str] | None, insecure: bool,
                        rejoin: bool = False, metrics_at: str | None = None,
                        invalidator: Invalidator | None = None,
                        view: Callable[..., Awaitable[None]] | None = None,
                        iscsi: str | None = None, iqn: str = DEFAULT_IQN,
                        chap_file: Path | None = None, fcip: str | None = None) -> None:
    """Serve *replica*: accept the primary on *listen* (replfs frames), with the TLS
    credentials ``--tls`` *tls* ``--peer`` *peer*, or over plain TCP on loopback
    (*insecure*), on *iscsi* as the iSCSI target *iqn* and on *fcip* as a Fibre Channel
    target over FCIP, both with the CHAP secrets in *chap_file*; serve Prometheus
    metrics on *metrics_at* (HOST:PORT) if given.

    *invalidator*: the kernel caches of a standby mount of the replica, which the
    applier drops as it applies sets (fs/kernel_cache.py); *view* serves that mount,
    started (``nursery.start``) once every check has passed and every port is bound,
    before anything is applied, and cancelled when the secondary stops.
    """
    if listen is None and (tls or peer or insecure):
        raise UsageError("--tls, --peer and --insecure are for --listen (replfs frames); "
                         "the iSCSI and FCIP targets are authenticated with --chap")
    if (iscsi is None and fcip is None) != (chap_file is None):
        raise UsageError("--iscsi or --fcip HOST:PORT and --chap FILE go together: those "
                         "targets accept only initiators that know the CHAP secret")
    host, port = parse_address(listen) if listen else ("", 0)
    peers = [peer] if isinstance(peer, str) else peer or []
    creds = link_credentials(tls, peers[0] if peers else None, insecure, host) \
        if listen else None
    if creds is not None and len(peers) > 1:  # a cluster's node: any of them may lead
        creds = dataclasses.replace(creds, also=frozenset(peers[1:]))
    secrets = chap.load(chap_file) if chap_file is not None else None
    scrape = await metrics.listen(metrics_at) if metrics_at else []
    check_apart(("the replica", replica),
                ("the staging store", staging_dir_of(replica, staging_dir)))
    make_replica(replica)
    os.umask(0)
    with tree_lock(replica):  # one daemon a tree, whatever staging store each was given
        old_journal = _old_primary_journal(replica, rejoin)
        staging = Staging(staging_dir_of(replica, staging_dir))
        if rejoin and old_journal is None and staging.rejoin is None:
            staging.close()
            raise UsageError(f"nothing to rejoin: {replica} holds no primary's journal; start it "
                             "without --rejoin")
        if old_journal is not None and staging.identity.cluster is None:
            # The same node, cluster and generation (a copy: a newer primary bumps ours).
            staging.identity = copy.deepcopy(old_journal.identity)
            staging.save_identity()
        # An old primary's tree shows no whole set until its rejoin's set is applied
        # (the standby mounts answer EIO); a sync under way keeps what it was begun as.
        if old_journal is not None or staging.rejoin is not None:
            set_rejoining(staging.path, True)
        elif staging.syncing is None:
            set_rejoining(staging.path, False)
        rejoining = Rejoin(staging, replica, old_journal, default_state_dir(replica) / "branches")
        try:
            dropped = staging.drop_partial()
            if dropped:
                log.info("erased partial sets %s; the primary sends them again", dropped)
            listeners = await _listen(host, port) if listen else []
            targets = await _listen(*parse_address(iscsi)) if iscsi else []
            fabric = await _listen(*parse_address(fcip)) if fcip else []
            bound = (listeners or targets or fabric)[0].socket.getsockname()
            receiver: Receiver
            applier = Applier(staging, replica, on_applied=lambda n: receiver.report_applied(n),
                              invalidator=invalidator,
                              on_progress=lambda s, q: receiver.report_applying(s, q))
            receiver = Receiver(staging, Gate(creds), on_complete=applier.notify,
                                on_reset=applier.reset_to, on_hello=rejoining.hello,
                                replica=replica)

            async def status(_: dict[str, Any]) -> dict[str, Any]:
                r = receiver.status
                sets = staging.sets()
                complete = [n for n, s in sets.items() if s.complete]
                return {
                    "role": "secondary", "version": VERSION, "replica": str(replica),
                    "listen": f"{host}:{bound[1]}" if listen else None,
                    "iscsi": _where(targets[0]) if targets else None, "iqn": iqn if iscsi else None,
                    "fcip": _where(fabric[0]) if fabric else None,
                    "cluster": staging.identity.cluster, "node": staging.identity.node,
                    "generation": staging.identity.generation,
                    "insecure": creds is None and bool(listen),
                    "tls_name": creds.name if creds else None,
                    "tls_peer": ", ".join(creds.accepted) if creds else None,
                    "connected_streams": r.connected_streams, "peer": r.peer_node,
                    "last_staged": list(r.last_staged), "last_complete": r.last_complete,
                    "last_applied": applier.applied, "applying": applier.applying,
                    "sets_in_flight": len(sets), "complete_waiting": len(complete),
                    "applicable_through": staging.applicable_through(),
                    "held": is_held(staging.path),
                    "syncing": staging.syncing is not None,
                    # In a sync of paths, the set the replica holds whole meanwhile (promote
                    # --outdated takes it there); last_applied is where the sync leads.
                    "holds_whole": staging.shows,
                    "received": r.received, "received_bytes": r.received_bytes,
                    "received_wire_bytes": r.received_wire_bytes,
                    "duplicates": r.duplicates, "stale": r.stale,
                    "bad_frames": r.bad_frames, "refused": r.refused,
                    "refused_by": r.refused_by, "handshakes": receiver.gate.in_progress,
                    "staging_bytes": staging.size(), "staging_error": r.staging_error,
                    "staging_disk_free": disk_free(staging.path),
                    "replica_disk_free": disk_free(replica),
                    "apply_error": applier.error,
                    "errors": r.errors,
                }

            async def wait(request: dict[str, Any]) -> dict[str, Any]:
                """Return once set ``set`` is applied (or after ``seconds``)."""
                with trio.move_on_after(float(request.get("seconds", 60))):
                    await applier.wait_applied(int(request["set"]))
                return {"applied": applier.applied}

            async with trio.open_nursery() as nursery:
                if view is not None:
                    await nursery.start(view)
                await nursery.start(applier.run)
                await nursery.start(receiver.serve, listeners)
                if targets and secrets is not None:
                    await nursery.start(target.serve, targets, secrets, iqn,
                                        staging.identity.node, receiver.serve_link)
                if fabric and secrets is not None:
                    await nursery.start(fc_target.serve, fabric, secrets, staging.identity.node,
                                        staging.identity.node, receiver.serve_link)
                async def wake(_: dict[str, Any]) -> dict[str, Any]:
                    applier.notify()
                    return {"applied": applier.applied}

                async def shutdown(_: dict[str, Any]) -> dict[str, Any]:
                    log.info("asked to stop (a promote, most likely)")
                    nursery.cancel_scope.cancel()
                    return {"applied": applier.applied}

                await nursery.start(control.serve, control.socket_path(replica),
                                    {"status": status, "wait": wait, "wake": wake,
                                     "shutdown": shutdown})
                if scrape:
                    registry = metrics.registry(
                        lambda: metrics.secondary_metrics(receiver, applier, staging, replica),
                        histograms.APPLY_SECONDS)
                    await nursery.start(metrics.serve, scrape, registry)
                    log.info("metrics on http://%s/metrics", metrics.where(scrape))
                await nursery.start(_stop_on_signal, nursery.cancel_scope)
                if creds is None and listen:
                    log.warning("INSECURE (--insecure): plain TCP, nobody authenticated, nothing "
                                "encrypted: anyone who can reach %s:%d can replace this replica",
                                bound[0], bound[1])
                ways = ([] if not listen else ["plain TCP, --insecure" if creds is None else
                                               f"TLS as {creds.name}, accepting "
                                               f"{', '.join(creds.accepted)}"])
                if targets and secrets is not None:
                    ways.append(f"iSCSI target {iqn} on {_where(targets[0])}, CHAP as "
                                f"{secrets.target_name}, accepting {secrets.initiator_name}, "
                                "not encrypted")
                if fabric and secrets is not None:
                    ways.append(f"FCP target {show(Names.of(staging.identity.node).port)} over "
                                f"FCIP on {_where(fabric[0])}, DH-CHAP accepting "
                                f"{secrets.initiator_name}, not encrypted")
                log.info("listening on %s:%d for the primary (%s); replica %s at set %d",
                         bound[0], bound[1], "; ".join(ways), replica, staging.applied)
                notify("READY=1", f"STATUS=listening on {bound[0]}:{bound[1]}, replica {replica}")
        finally:
            staging.close()
            rejoining.close()
