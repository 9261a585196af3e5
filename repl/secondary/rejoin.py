"""A node follows a new primary: an old primary rejoining, or a secondary re-pointed.

An old primary rejoins as a secondary of the new one, keeping what it alone
had. Before anything of its tree changes, the paths it changed after the
last set it shared with the new primary are copied, as they are, into a
branch beside the tree, with a manifest of sets and paths, and its old
journal (every record of those sets) is moved there too. Then the new
primary sends only what diverged (repl/diverge.py), and the branch stays
for an operator to inspect or apply by hand.

A secondary that hears from the primary of a newer generation (after a
failover) keeps the complete sets it staged that the two generations share
(those before the new generation's first set: the new primary has the same
ones) and drops the others. If it had already applied sets past that point
(sets the new primary never had: it was down during the election, or the
old primary reached it last), its replica diverged: it asks for the paths
those sets touched, the way an old primary does, from the applied sets its
staging still keeps, or the whole tree if it no longer has them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from repl.activity import divergence, power_lost
from repl.diverge import Divergence
from repl.errors import ProtocolError, Refused
from store.journal import Journal
from store.private import private_dir, write_private
from store.records import is_under
from store.staging import Staging

log = logging.getLogger("replfs.rejoin")


def fork_point(history: Any, generation: int) -> int:
    """The first set of the first generation after *generation*, from the new primary's
    history: every set before it, both sides share.

    Raises:
        ProtocolError: the history is not a list of {"generation", "first_set"} entries.
        Refused: it has no generation after ours.
    """
    if not isinstance(history, list):
        raise Refused("the primary sent no generation history; cannot rejoin it")
    newer = []
    for entry in history:
        gen = entry.get("generation") if isinstance(entry, dict) else None
        first = entry.get("first_set") if isinstance(entry, dict) else None
        if type(gen) is not int or type(first) is not int or not 1 <= first < 1 << 64:
            raise ProtocolError(f"the primary's generation history has a bad entry "
                                f"{entry!r:.100}")
        if gen > generation:
            newer.append(first)
    if not newer:
        raise Refused(f"the primary has no generation after ours ({generation}): it is not "
                      "the primary that replaced us; nothing to rejoin")
    return min(newer)


def keep_branch(journal: Journal, tree: Path, branches: Path, fork: int) -> tuple[Divergence,
                                                                                  Path]:
    """Copy our own changes since *fork* aside, with a manifest. Returns (what, where)."""
    records = list(journal.records(fork))
    ours = Divergence().add(records)
    # Over its budget, a primary journals no written bytes, only where they went (the
    # dirty map, store/dirty.py): those files are ours too.
    ours.update(Divergence(ranges=dict(journal.dirty.items())))
    if power_lost(journal):  # what the tree may hold that the journal lost, too
        ours.update(divergence(journal.notes))
    base = journal.base
    if base is None or base > fork - 1:
        # Sets after the fork were trimmed (another secondary, ahead of the promoted
        # one, had applied them): what they changed is known to no one.
        log.warning("this journal no longer holds every set since the fork (set %d): the "
                    "new primary sends the whole tree; the branch keeps only what the "
                    "journal still names", fork)
        ours.content.add(b"")
    if not ours.whole_tree:
        ours.follow_links(tree)
    gen = journal.identity.generation
    branch = branches / f"generation-{gen}-from-set-{fork}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Only we may enter the branch's tree, so the copies inside keep their own modes
    # (a directory others may write to among them).
    copies = private_dir(branch / "tree")
    paths = sorted({*ours.content, *ours.ranges} - {b""})  # a directory before its own
    whole: list[bytes] = []  # directories copied with all they hold
    for path in paths:
        src, dst = tree / os.fsdecode(path), copies / os.fsdecode(path)
        if (not os.path.lexists(src) or any(is_under(path, top) for top in whole)
                or not _reached(tree, path)):
            continue  # removed on our side (the journal in the branch says so), copied,
            # or no longer in the tree: a symlink on its way would lead out of it
        dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if src.is_dir() and not src.is_symlink():
            if path in ours.content:  # made, moved or its xattrs changed: all of it
                shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
                whole.append(path)
            else:  # its attributes alone: what changed under it is listed on its own
                dst.mkdir(mode=0o700, exist_ok=True)
                shutil.copystat(src, dst, follow_symlinks=False)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
    manifest = {
        "what": "changes this node made as primary that the new primary never received",
        "generation": gen, "node": journal.identity.node, "first_unshared_set": fork,
        "sets": sorted({r.set for r in records}), "records": len(records),
        "paths": [os.fsdecode(p) for p in paths],
        "how_to_use": "tree/ holds these paths as they were; journal/ holds every record "
                      "(replfs dump journal/); copy back what you want through the mount",
    }
    write_private(branch / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    log.warning("kept %d paths changed here after set %d (never replicated) in %s",
                len(paths), fork - 1, branch)
    return ours, branch


def _reached(tree: Path, path: bytes) -> bool:
    """Whether *path* in *tree* is reached through directories alone, no symlink: a
    path journaled before a directory on its way was replaced by a symlink would
    lead anywhere (read from there, written through the copy of that symlink)."""
    parent = tree
    for part in os.fsdecode(path).split("/")[:-1]:
        parent = parent / part
        if parent.is_symlink():
            return False
    return True


class Rejoin:
    """An old primary rejoining as a secondary: what its HELLO answer offers.

    *journal* is its old journal (None if there is none, or once it was kept in a
    branch). The first handshake keeps its own changes aside in a branch under
    *branches* (``keep_branch``), moves the journal there and starts the rejoin in
    *staging*; every handshake then offers what diverged, until the new primary's
    set arrives.
    """

    def __init__(self, staging: Staging, replica: Path, journal: Journal | None,
                 branches: Path) -> None:
        self.staging, self.replica, self.journal = staging, replica, journal
        self.branches = branches

    def hello(self, info: dict[str, Any]) -> dict[str, Any]:
        """The extra fields of our HELLO answer to a primary whose HELLO is *info*."""
        staging, journal = self.staging, self.journal
        if staging.rejoin is None and journal is not None:
            fork = fork_point(info.get("history"), journal.identity.generation)
            ours, branch = keep_branch(journal, self.replica, self.branches, fork)
            staging.start_rejoin(fork - 1, ours.with_links(self.replica).offer()[0])
            journal.close()
            shutil.move(journal.path, branch / "journal")  # from another disk, maybe
            self.journal = None
            log.info("rejoining after set %d; the new primary sends what diverged", fork - 1)
        raw = staging.rejoin
        return {"rejoin": json.loads(raw)} if raw is not None else {}

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()


def ask_for_paths(staging: Staging, sets: range | None, shared: int,
                  replica: str | os.PathLike[str] | None) -> str:
    """Ask the primary, at the next handshake, for every path the staged *sets* touched
    (None: the whole tree), with every name of the hard-linked files of *replica*, the
    tree (``with_links``): the unapplied sets are dropped, and a rejoin after set
    *shared* begins, whose sync set makes those paths the primary's. Returns what is
    asked, for the log."""
    ours = Divergence({b""}) if sets is None else Divergence().add(
        record for set_id in sets for record in staging.records(set_id))
    offer, asked = (ours.with_links(replica) if replica is not None else ours).offer()
    staging.drop_unapplied()
    staging.start_rejoin(shared, offer)
    return ("the whole tree" if asked.whole_tree else
            f"the {len(ours.content) + len(ours.ranges)} paths they touched")


def follow_generation(staging: Staging, history: Any, generation: int,
                      replica: Path | None = None) -> None:
    """Follow the primary of *generation*, newer than the staging's, whose generation
    history is *history* (its HELLO's): keep what the two lineages share, drop the
    rest, and if the replica applied sets past the fork, start a rejoin of them (with
    every name of the hard-linked files of *replica*, the tree: ``with_links``).

    The replica takes *history* as its own: promoted later, it must name every
    generation of the lineage its data has, not only its own, or a node of an older
    generation rejoining it would fork after sets it never had.
    """
    ident = staging.identity
    try:
        fork: int | None = fork_point(history, ident.generation)
    except (ProtocolError, Refused):
        fork = None  # no history to go by: keep nothing unapplied
    applied = staging.applied
    if staging.syncing is not None:
        # A sync from the last primary (an initial sync, or a rejoin's) never finished:
        # `applied` only stood for where that primary's sync set would take the replica,
        # and what the replica holds now is known to no one. The new primary sends it
        # all again.
        ask_for_paths(staging, None, applied if fork is None else min(applied, fork - 1), None)
        log.warning("the sync from the last primary did not finish: the primary of "
                    "generation %d sends the whole tree again", generation)
    elif fork is not None and applied >= fork and staging.rejoin is None:
        kept = staging.history()
        sets = range(fork, applied + 1) if kept and kept[0] <= fork else None  # None: gone
        what = ask_for_paths(staging, sets, fork - 1, replica)
        log.warning("this replica applied sets %d to %d, which the primary of generation "
                    "%d never had; it gets %s again", fork, applied, generation, what)
    else:
        dropped = staging.drop_unapplied(keep_before=fork or 0)
        if dropped:
            log.info("erased sets %s staged from the previous generation", dropped)
    log.info("following a new primary of generation %d (was %d)", generation,
             ident.generation)
    ident.generation = generation
    if fork is not None:  # the lineage this replica follows now, every generation of it
        ident.history = [dict(entry) for entry in history]
    staging.save_identity()
