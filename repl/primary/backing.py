"""BACKING follows the journal: its lazy sync, and where the journal notes it.

The journal is the durable copy (repl/primary/capture.py); BACKING is synced
lazily: every BACKING_SYNC_SECONDS while it changes, as soon as
BACKING_SYNC_FILES files and directories changed, before a flush makes a
namespace op durable (the capture's ``wait_durable``), before the journal
stops taking write data (over budget) and at a clean stop. What a sync
covers is kept by repl/primary/unsynced.py. Each sync is noted in the journal
as ``backing_at``, the log position up to which BACKING is durable: recovery
replays the records past it (repl/primary/recovery.py), and the journal keeps
them until then, applied or not.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager
from typing import Any, Protocol

import trio

from repl.activity import ActivityLog
from repl.primary.unsynced import Unsynced, fsync_all
from store.journal import Journal
from store.records import decode_set, encode_set
from store.reserve import disk_full

log = logging.getLogger("replfs.capture")

BACKING_SYNC_SECONDS = 5.0  # BACKING is made durable at least this often while it changes
BACKING_AT = b"backing_at"  # the journal's log position up to which BACKING is durable


class Owner(Protocol):
    """What a BACKING sync needs of the capture that owns it."""

    @property
    def lock(self) -> AbstractContextManager[Any]:
        """Held around every change to the journal."""

    @property
    def activity(self) -> ActivityLog:
        """The notes of what ops may have changed on BACKING (repl/activity.py)."""

    def settle(self) -> None:
        """Account for the last op journaled (it succeeded)."""

    def followed(self) -> None:
        """``backing_at`` moved: drop what the journal no longer needs for BACKING."""


class BackingSync:
    """The syncs of BACKING behind *journal*, covering what *unsynced* holds."""

    def __init__(self, journal: Journal, unsynced: Unsynced, owner: Owner) -> None:
        self.journal = journal
        self.unsynced = unsynced
        self.owner = owner
        raw = journal.get_meta(BACKING_AT)
        self.at = decode_set(raw) if raw else journal.end  # ``backing_at``
        self._lock = threading.Lock()  # one sync at a time
        self._fsyncs_done = threading.Event()  # cleared while a sync fsyncs
        self._fsyncs_done.set()
        self._wanted = trio.Event()

    def want(self) -> None:
        """In trio: sync now, not at the next BACKING_SYNC_SECONDS."""
        self._wanted.set()

    def note(self, at: int) -> None:
        """BACKING is durable up to log position *at*: note it in the journal (durable
        with the journal's next flush; until then, recovery just replays more)."""
        self.at = at
        self.journal.put_meta(BACKING_AT, encode_set(at))

    def sync(self, *, final: bool = False) -> None:
        """Make BACKING durable as far as the journal goes now, and note that.

        Blocking; call it from a thread, without the owner's lock (it is taken
        around the bookkeeping, not the fsyncs). Syncs every file and directory
        changed since the last time. Then the activity log drops the notes no op
        used since (repl/activity.py); with *final* (a clean stop) it keeps none.
        """
        with self._lock:
            with self.owner.lock:
                self.owner.settle()
                at = self.journal.end
                changed, token = self.unsynced.take()
                self._fsyncs_done.clear()
            try:
                fsync_all(changed, self.unsynced.whole)
            finally:
                self._fsyncs_done.set()
            with self.owner.lock:
                self.unsynced.synced(token)
                if at > self.at:
                    self.note(at)
                    self.owner.followed()
                notes = self.owner.activity.reset(at, retain=not final)
                if notes is not None:  # after backing_at: durable only with it
                    self.journal.reset_notes(notes)

    def sync_held(self) -> None:
        """``sync`` with the owner's lock held throughout, so that nothing changes
        meanwhile (before the journal stops taking write data: the resync's
        ``begin_overflow``). A sync under way is let finish its fsyncs first (they
        need no lock)."""
        self._fsyncs_done.wait()
        changed, token = self.unsynced.take()
        fsync_all(changed, self.unsynced.whole)
        self.unsynced.synced(token)
        if self.journal.end > self.at:
            self.note(self.journal.end)

    async def run(self) -> None:
        """Sync BACKING every BACKING_SYNC_SECONDS while it changes, or sooner when
        wanted, until cancelled. A sync the full disk refused is tried again then."""
        while True:
            with trio.move_on_after(BACKING_SYNC_SECONDS):
                await self._wanted.wait()
            self._wanted = trio.Event()
            if self.unsynced.nodes or self.journal.end > self.at:
                try:
                    await trio.to_thread.run_sync(self.sync)
                except OSError as exc:
                    if not disk_full(exc):
                        raise
                    log.error("noting BACKING's sync in the journal failed (%s): tried "
                              "again in %gs", exc.strerror, BACKING_SYNC_SECONDS)
