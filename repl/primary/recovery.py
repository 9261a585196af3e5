"""Recovery after a crash: the backing directory made to agree with the journal.

Blocking, before the mount serves anything (fs/primary_daemon.py). The journal is the
durable copy and BACKING follows it lazily (repl/primary/capture.py): after a reboot
the records past ``backing_at`` are replayed into BACKING with the applier's
redo rule (repl/apply.py), and what the activity log (repl/activity.py)
noted, which BACKING may hold beyond the journal, is resent in the open set
(repl/primary/resync.py).

What a power cut leaves in BACKING beyond the journal (a page written back,
a name the filesystem committed, their records lost) is found by the
activity log: before an op touches BACKING, what it may change is noted
durably in the journal. After a reboot, recovery resends what the notes
name, and skips the records under a NAME note, which may not name their
file any more. So that skipping loses nothing an fsync returned, a record
under a NAME note makes the next flush sync BACKING first (as a namespace
op does), and an op that removes or moves a name first syncs the files
under it written since BACKING's last sync (repl/primary/unsynced.py).
"""

from __future__ import annotations

import logging

from repl import apply as applier
from repl.activity import ActivityLog, name_roots, note_boot, power_lost
from repl.primary.capture import Capture
from store.libc import syncfs
from store.notes import Note
from store.records import NAMESPACE_OPS, Op, Record, is_under

log = logging.getLogger("replfs.capture")


def recover(capture: Capture) -> str | None:
    """Make the backing directory agree with the journal after a crash, and resend
    what it may hold beyond it. Blocking; before the mount serves anything.

    1. After a reboot, the records past ``backing_at`` are replayed
       (``_replay``). After a crash of the daemon alone the page cache kept
       BACKING as every op left it, and nothing is replayed: the log holds
       records never flushed too, renames among them, and a replay by path
       across a rename that BACKING already holds writes into the wrong file.
       BACKING is synced whole instead (syncfs).
    2. The last record, if nothing was journaled after it, may never have
       reached BACKING: it is redone by the applier's redo rule; an op that
       fails again is voided, as it would have been. (Anything journaled
       after it shows its op ran: a handler journals, then does its op.)
    3. Notes in the activity log mean the daemon stopped uncleanly (a clean
       stop leaves none). If the machine rebooted since (the power went), the
       page cache went with it: BACKING may hold changes the journal lost,
       and records under a NAME note may not name their file any more. Those
       records are neither replayed nor redone, and what the notes name is
       resent (``_resend``). After a crash of the daemon alone nothing was
       lost, and nothing is resent.
    4. The open set, if it has ops and is not held open, is closed, with the
       UTIMES of every path it touched.

    Then what recovery replayed, and all the notes name, is synced in BACKING,
    ``backing_at`` moves to the end and the activity log starts empty.
    Returns a line saying what was done, or None if nothing was needed.
    """
    notes = list(capture.journal.notes)
    rebooted = power_lost(capture.journal)
    roots = name_roots(notes) if rebooted else []
    last = capture.journal.last()
    pending = (last is not None and last.op not in (Op.SYNC, Op.VOID)
               and capture.journal.is_last_entry(last))
    lines, synced = _replay(capture, roots) if rebooted else ([], set())
    if pending:
        assert last is not None
        if _under(last, roots):
            lines.append(f"left {last.op.name} at {last.set}/{last.seq} to the resend")
        else:
            lines.append(_redo(capture, last))
            synced.update((last.path, last.path2) if last.path2 else (last.path,))
    if capture.resync.sync_whole:
        capture.touched.all()  # an initial sync under way: its close restates every path
    for record in capture.journal.records(capture.journal.set):
        capture.touched.add(record)
    capture.touched.note(*capture.resync.dirty.files)
    whole = name_roots(notes)
    synced.update(n.path for n in notes if not any(is_under(n.path, r) for r in whole))
    if notes and rebooted:
        line, resent = _resend(capture, notes)
        lines.append(line)
        whole = sorted(set(whole) | set(resent))
    if capture.overflow and not capture.journal.set_is_empty:
        lines.append(f"set {capture.journal.set} stays open until the secondary has the "
                     "sets before it")
    elif not capture.journal.set_is_empty:
        lines.append(f"closed set {capture.close_set()}")
    # What the replica has or gets must be what a power cut leaves: sync it all.
    if not rebooted:
        syncfs(capture.backing.root_fd)
    for path in whole:
        capture.backing.sync(path)
    for path in synced:
        capture.backing.sync_node(path)
        capture.backing.sync_node(path.rpartition(b"/")[0])
    capture.backing_sync.note(capture.journal.end)
    note_boot(capture.journal)
    capture.activity = ActivityLog()
    capture.activity.reset(capture.backing_at)
    capture.journal.reset_notes([])
    capture.journal.sync()
    return "; ".join(lines) or None


def _replay(capture: Capture, roots: list[bytes]) -> tuple[list[str], set[bytes]]:
    """Bring BACKING to the journal's state: redo every record past ``backing_at``,
    but those under a NAME note's path (*roots*): such a path may name another
    file now, and is resent whole. Returns (what was done, the paths replayed).

    BACKING lost, or never got to disk, whatever a power cut took of what
    followed its last sync; the journal holds it (see the module comment).
    """
    if capture.overflow:
        return [], set()  # writes were not journaled: BACKING is the only copy of them
    count, failed, skipped, paths = 0, 0, 0, set()
    for _, _, raw, end in capture.journal.iter_raw(capture.journal.set_of(capture.backing_at)):
        if end - len(raw) < capture.backing_at:
            continue
        record = Record.decode(raw)
        if record.op in (Op.SYNC, Op.VOID, Op.RESET, Op.PRUNE):
            continue
        if _under(record, roots):
            skipped += 1
            continue
        try:
            if record.op in NAMESPACE_OPS:
                applier.redo(capture.backing, record, capture.journal.intent(record))
            else:
                applier.apply(capture.backing, record)
            count += 1
            paths.add(record.path)
            if record.op in (Op.RENAME, Op.LINK):
                paths.add(record.path2)
        except (OSError, ValueError) as exc:
            failed += 1
            log.warning("replay of %s at %d/%d failed: %s", record.op.name, record.set,
                        record.seq, exc)
    lines = []
    if count or failed:
        lines.append(f"replayed {count} records into the backing directory" + (
            f" ({failed} failed, see above)" if failed else ""))
    if skipped:
        lines.append(f"left {skipped} records under names a namespace op may have "
                     "changed to the resend")
    return lines, paths


def _redo(capture: Capture, last: Record) -> str:
    """Redo the journal's last record, which may never have reached BACKING."""
    if last.op in (Op.RESET, Op.PRUNE):
        # Instructions for a replica, never ops on this tree: a sync's snapshot
        # was under way; the next secondary to connect gets a new one.
        return f"a sync's snapshot was under way in set {last.set}; it starts again"
    try:
        if last.op in NAMESPACE_OPS:
            applier.redo(capture.backing, last, capture.journal.intent(last))
        else:
            applier.apply(capture.backing, last)
        capture.redone(last)  # the dirty map follows it, as it would have
        return f"redid {last.op.name} at {last.set}/{last.seq}"
    except OSError as exc:
        if last.op in NAMESPACE_OPS:
            capture.void(last)
            return f"voided {last.op.name} at {last.set}/{last.seq} ({exc.strerror})"
        # Its first run went through an open handle and most likely worked;
        # reaching the file again by name can fail where that did not.
        return f"kept {last.op.name} at {last.set}/{last.seq} ({exc.strerror})"


def _resend(capture: Capture, notes: list[Note]) -> tuple[str, list[bytes]]:
    """After a power cut: BACKING may hold changes the journal lost, at the paths
    *notes* name. They go to the secondary again, as BACKING holds them, in the
    open set, which stays open (as over budget) until the secondary has applied
    every set before it; then the dirty map's ranges are read into it and it
    closes (repl/primary/resync.py). Without a secondary the journal forgets which
    replica it could bring forward: the next secondary gets an initial sync.
    Returns (what was done, the paths resent whole).
    """
    if not capture.replicating:
        capture.journal.base = None
        return ("the backing directory may hold changes its journal lost, and there "
                "is no secondary to send them to: the next one gets an initial sync"), []
    entries, total, whole = capture.resync.resend(notes)
    return (f"the backing directory may hold changes its journal lost: {entries} "
            f"entries ({total / 1e6:.1f} MB) go to the secondary again in set "
            f"{capture.journal.set}"), whole


def _under(record: Record, roots: list[bytes]) -> bool:
    """Whether a path of *record* is at or under one of *roots*."""
    return any(is_under(record.path, top) or (bool(record.path2) and is_under(record.path2, top))
               for top in roots)
