"""``replfs promote``: turn a standby's replica into the new primary's backing tree.

Applies every complete set still staged (in order), erases partial ones,
and starts a new generation, recorded with its history both in the staging
store (so an old primary of an older generation is refused from now on)
and in a fresh journal for the new primary, whose sets continue from the
last one applied.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from repl import control
from repl.errors import UsageError
from repl.secondary.applier import Applier
from repl.secondary.run import tree_lock
from repl.tree import Tree
from store.errors import JournalLocked
from store.hold import is_held, set_hold
from store.journal import Journal
from store.staging import Staging, whole_in_sync

log = logging.getLogger("replfs.promote")


@dataclass
class Promotion:
    generation: int
    applied_from: int
    applied_to: int
    dropped: list[int] = field(default_factory=list)


async def promote(replica: Path, staging_dir: Path, journal_dir: Path,
                  generation: int | None = None, cluster: str | None = None,
                  outdated: bool = False) -> Promotion:
    """Make *replica* a primary's tree, of *generation* (default: the next one), of
    *cluster* (a replica that never met a primary has none yet: given by a cluster
    of nodes, repl/cluster/node.py).

    The sets applied last (those staging still keeps, store/staging.py) go into the
    new journal as they were: a secondary that had staged fewer of them follows from
    there, instead of being sent the whole tree.

    A replica in the middle of a sync of the paths it missed (it was away past the
    journal's budget, or the primary resends what its power cut tore) holds the last
    set it applied before that sync whole: with *outdated* it is promoted there, and
    what the sync would have brought is lost (as DRBD's ``--force`` takes an
    outdated disk). Not a sync from scratch, nor a rejoin's, nor a replica a crash
    tore: those hold no set whole.

    Raises UsageError if it cannot be (no replica, a sync never finished, a set
    that fails to apply, *generation* not newer than the replica's).
    """
    if not replica.is_dir():
        raise UsageError(f"replica {replica} does not exist or is not a directory")
    if not (staging_dir / "data.mdb").exists():
        raise UsageError(f"{staging_dir} holds no staging store; is {replica} a replica?")
    wait = 30 if _stop_secondary(replica) else 0
    with tree_lock(replica, wait):  # no daemon may serve it meanwhile, whatever its store
        return _promote(replica, _open_staging(staging_dir, wait), journal_dir, generation,
                        cluster, outdated)


def _promote(replica: Path, staging: Staging, journal_dir: Path, generation: int | None,
             cluster: str | None, outdated: bool) -> Promotion:
    """``promote``, with *replica* locked and its *staging* store open (closed here)."""
    staging_dir = staging.path
    try:
        start = staging.applied
        if is_held(staging_dir):
            log.info("lifting the hold on %s to apply every complete set", replica)
            set_hold(staging_dir, False)
        applier = Applier(staging, replica)
        tree = Tree(replica)
        try:
            while (last := staging.applicable_through()) > applier.applied:
                try:
                    whole = applier.apply_sets(tree, applier.applied + 1, last, retry=False)
                except OSError as exc:
                    raise UsageError(f"applying sets {applier.applied + 1} to {last} failed: "
                                     f"{exc}; fix that and promote again") from None
                if not whole:
                    raise UsageError(f"{replica} was paused again during promote; "
                                     "resume it and promote again")
                applier.applied = staging.applied
        finally:
            tree.close()
            applier.lock.close()
        dropped = []
        if staging.syncing is not None:
            shows = whole_in_sync(staging_dir, staging.shows)
            if shows is None:
                raise UsageError(f"replica {replica} never finished its initial sync (or the "
                                 "primary's resend of what a power cut of this host tore), so "
                                 "it holds no consistent set; it cannot be promoted")
            if not outdated:
                raise UsageError(f"replica {replica} is catching up (a sync of what it "
                                 f"missed is under way); it holds set {shows} whole: "
                                 "promote --outdated takes it there, losing what came after")
            dropped = staging.abandon_sync(shows)
            applier.applied = start = shows
            log.warning("promoting %s at set %d, the last it applied whole: the sync under "
                        "way is given up, and what it would have brought is lost; a standby "
                        "further along is brought back to this set when it follows the new "
                        "primary", replica, shows)
        dropped += staging.drop_partial()
        ident = staging.identity
        if generation is not None and generation <= ident.generation:
            raise UsageError(f"generation {generation} is not newer than the replica's "
                             f"({ident.generation})")
        if cluster is not None and ident.cluster not in (None, cluster):
            raise UsageError(f"replica {replica} belongs to cluster {ident.cluster}, not "
                             f"{cluster}")
        journal = Journal(journal_dir)
        try:
            if journal.last() is not None:  # before the new generation is taken, not after
                raise UsageError(f"{replica} was promoted already: its journal {journal.path} "
                                 f"holds records; start it with 'replfs primary {replica} "
                                 "MOUNTPOINT'")
            ident.cluster = ident.cluster or cluster
            ident.generation = generation if generation is not None else ident.generation + 1
            ident.history.append({"generation": ident.generation, "node": ident.node,
                                  "first_set": applier.applied + 1})
            staging.save_identity()
            kept = staging.history()
            journal.start_generation(ident, next_set=applier.applied + 1,
                                     before=(r for s in kept for r in staging.records(s)))
        finally:
            journal.close()
        return Promotion(ident.generation, start, applier.applied, dropped)
    finally:
        staging.close()


def _open_staging(staging_dir: Path, wait: float) -> Staging:
    """Open the staging store, giving a secondary that is stopping *wait* seconds to let go."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return Staging(staging_dir)
        except JournalLocked as exc:
            if time.monotonic() > deadline:
                raise UsageError(f"{exc}; stop it first") from None
            time.sleep(0.05)  # the secondary we stopped is still closing its stores


def _stop_secondary(replica: Path) -> bool:
    """Ask a running secondary of *replica* to stop; True if one was running."""
    path = control.socket_path(replica)
    try:
        control.request(path, "shutdown", timeout=30)
    except (FileNotFoundError, ConnectionRefusedError):
        return False  # none running (a socket file left by a killed one answers nothing)
    except ValueError:
        pass  # it stopped before answering
    deadline = time.monotonic() + 30
    while path.exists():  # the daemon removes its socket as it exits
        if time.monotonic() > deadline:
            raise UsageError(f"the secondary serving {replica} did not stop; stop it and retry")
        time.sleep(0.05)
    return True
