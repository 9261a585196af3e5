"""The secondary's staging store: records by (set, seq), set bitmaps, the apply log.

This is the claims' target VLUN. Records of any open set arrive in any
order and are staged at once; each set's SetState (bitmap, SYNC seen,
complete flag) changes in the same LMDB transaction as its records, so
after a crash the complete flag is exactly as true as the staged records
(claims 20, 21). Callers ``sync()`` before acknowledging what they staged.

The apply log is ``applied`` (the last set applied to the replica), a meta
key, and the marker (the namespace op about to run in the set being applied,
with its intent; see repl/apply.py for the redo rule), a file beside the
store rewritten in place (store/marker.py). A commit that finishes a set or
resets the replica moves the store's marker ``generation``: the marker left
from before is void.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from store import identity
from store.hold import interrupted, is_rejoining, lost_to_power, set_rejoining
from store.lmdbdir import COMMIT_BYTES, MAP_SIZE, LmdbDir
from store.marker import CLEARED, Marker
from store.private import FILE_MODE
from store.records import KEY_SIZE, Op, Record, decode_key, decode_set, encode_key, encode_set
from store.setstate import SetState

_APPLIED = b"applied"
_MARKER = b"marker"  # where an older replfs kept the marker
_GENERATION = b"marker-generation"
MARKER = "MARKER"  # the marker's file, in the staging directory
_SYNCING = b"syncing"
_REJOIN = b"rejoin"
_SCRATCH = b"scratch"  # the sync under way started from a replica with no set to show
_SHOWS = b"shows"  # the set a replica in a sync of paths holds whole (see ``reset_to``)
_RESET = b"reset/"  # + set id -> the key of the set's last RESET, noted as it is staged
# Applied sets are kept this long (the last HISTORY_SETS, while their records take at
# most HISTORY_BYTES): promoted, this node hands them to the secondaries that had not
# yet staged them all (repl/secondary/promote.py), and a replica that applied sets a new primary
# never had can say which paths they touched (repl/secondary/rejoin.py). A few seconds of sets
# at one a second; the bytes bound the disk they take under a heavy writer.
HISTORY_SETS = 16
HISTORY_BYTES = 32 << 20


@dataclass
class Staged:
    """What one ``stage()`` call did."""

    keys: list[tuple[int, int]] = field(default_factory=list)  # newly staged or already held
    duplicates: int = 0
    stale: int = 0  # records of sets already applied
    completed: list[int] = field(default_factory=list)


class Staging(LmdbDir):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, "staging")
        self._records = self.env.open_db(b"records")
        self._sets = self.env.open_db(b"sets")
        self._meta = self.env.open_db(b"meta")
        self.identity = identity.load(self.env, self._meta, make_cluster=False)
        self._marker_fd = os.open(self.path / MARKER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                  FILE_MODE)
        with self.env.begin(write=True) as txn:
            raw = txn.get(_GENERATION, db=self._meta)
            self._generation = decode_set(raw) if raw else 0
            old = txn.get(_MARKER, db=self._meta)
            if old is not None:  # left by an older replfs: it moves to the file
                set_id, seq = decode_key(old[:KEY_SIZE])
                self._write_marker(Marker(self._generation, set_id, seq,
                                          bytes(old[KEY_SIZE:]) or None).encode())
                txn.delete(_MARKER, db=self._meta)
        # Moves whenever staged sets not yet applied are erased or replaced (a reset, a
        # primary's restart, a rejoin): what was read of them before may be gone.
        self.epoch = 0

    def save_identity(self) -> None:
        identity.save(self.env, self._meta, self.identity)

    # --- staging ------------------------------------------------------------------

    @property
    def applied(self) -> int:
        with self.env.begin() as txn:
            raw = txn.get(_APPLIED, db=self._meta)
        return decode_set(raw) if raw else 0

    def stage(self, records: list[Record], raws: list[bytes] | None = None) -> Staged:
        """Stage *records* in one transaction; duplicates and stale ones are dropped.

        *raws*, if given, are the records' encodings as they arrived (decoding them
        checked them): those bytes are staged, not the records encoded again."""
        out = Staged()
        states: dict[int, SetState] = {}
        with self.env.begin(write=True) as txn:
            raw = txn.get(_APPLIED, db=self._meta)
            applied = decode_set(raw) if raw else 0
            for at, record in enumerate(records):
                if record.set <= applied:
                    out.stale += 1
                    continue
                state = states.get(record.set)
                if state is None:
                    raw = txn.get(encode_set(record.set), db=self._sets)
                    state = states[record.set] = SetState.decode(raw) if raw else SetState()
                out.keys.append((record.set, record.seq))
                if not state.mark(record.seq):
                    out.duplicates += 1
                    continue
                value = raws[at] if raws is not None else record.encode()
                txn.put(record.key, value, db=self._records)
                self.passed(len(value))
                if record.op == Op.SYNC:
                    state.sync_seen, state.count = True, record.count
                elif record.op == Op.RESET:
                    where = _RESET + encode_set(record.set)
                    noted = txn.get(where, db=self._meta)
                    if noted is None or decode_key(noted)[1] < record.seq:
                        txn.put(where, record.key, db=self._meta)
            for set_id, state in states.items():
                was_complete = state.complete
                if state.check_complete() and not was_complete:
                    out.completed.append(set_id)
                txn.put(encode_set(set_id), state.encode(), db=self._sets)
        self.passed(COMMIT_BYTES)
        return out

    def sync(self) -> None:
        """Make everything staged durable. Blocking; call it from a thread."""
        self.env.sync(True)

    def state(self, set_id: int) -> SetState | None:
        with self.env.begin() as txn:
            raw = txn.get(encode_set(set_id), db=self._sets)
        return SetState.decode(raw) if raw else None

    def sets(self) -> dict[int, SetState]:
        """The sets staged and not yet applied, whole or not."""
        with self.env.begin() as txn:
            raw = txn.get(_APPLIED, db=self._meta)
            applied = decode_set(raw) if raw else 0
            return {decode_set(k): SetState.decode(v) for k, v in txn.cursor(db=self._sets)
                    if decode_set(k) > applied}

    def history(self) -> list[int]:
        """The applied sets still kept, oldest first: a run with no gap that ends at the
        last one applied (empty if that one is not kept). See HISTORY_SETS."""
        with self.env.begin() as txn:
            raw = txn.get(_APPLIED, db=self._meta)
            applied = decode_set(raw) if raw else 0
            kept = {decode_set(k) for k in txn.cursor(db=self._sets).iternext(values=False)}
        run = []
        while applied in kept:
            run.append(applied)
            applied -= 1
        return run[::-1]

    def records(self, set_id: int, start_seq: int = 0, *, data: bool = True,
                view: bool = False) -> Iterator[Record]:
        """The staged records of *set_id* from *start_seq* on, in seq order; without
        their data (checked, not copied) if *data* is False, their data a view of
        the staged bytes with *view* (see ``Record.decode``)."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._records)
            if not cursor.set_range(encode_key(set_id, start_seq)):
                return
            for key, value in cursor:
                if decode_key(key)[0] != set_id:
                    return
                self.passed(len(value))
                yield Record.decode(value, data=data, view=view)

    def applicable_through(self) -> int:
        """The last set the applier can reach: complete sets after `applied`, no gap.

        Read in one transaction, so it never sees a set gone but `applied` not moved.
        """
        with self.env.begin() as txn:
            raw = txn.get(_APPLIED, db=self._meta)
            applied = decode_set(raw) if raw else 0
            while True:
                raw = txn.get(encode_set(applied + 1), db=self._sets)
                if raw is None or not SetState.decode(raw).complete:
                    return applied
                applied += 1

    def drop_unapplied(self, keep_before: int = 0) -> list[int]:
        """Erase the sets staged and not applied, but the complete ones before
        *keep_before*: they came from a primary that is no longer followed, and only
        those the new one shares with it stay. Returns the ids erased."""
        dropped = [s for s, state in self.sets().items()
                   if s >= keep_before or not state.complete]
        with self.env.begin(write=True) as txn:
            for set_id in dropped:
                self._delete_set(txn, set_id)
        self.epoch += 1  # once committed: a read before it may have seen them still
        return dropped

    def drop_partial(self) -> list[int]:
        """Erase every set that is not complete (claim 27). Returns their ids."""
        dropped = [s for s, state in self.sets().items() if not state.complete]
        with self.env.begin(write=True) as txn:
            for set_id in dropped:
                self._delete_set(txn, set_id)
        self.epoch += 1
        return dropped

    def _delete_through(self, txn: lmdb.Transaction, last: int) -> None:
        """Delete every set up to *last* (set keys sort in set order)."""
        for key in list(txn.cursor(db=self._sets).iternext(values=False)):
            if decode_set(bytes(key)) > last:
                return
            self._delete_set(txn, decode_set(bytes(key)))

    def _delete_set(self, txn: lmdb.Transaction, set_id: int) -> None:
        self.delete_run(txn, self._records, encode_key(set_id, 0),
                        lambda key: decode_key(key)[0] != set_id)
        txn.delete(encode_set(set_id), db=self._sets)
        txn.delete(_RESET + encode_set(set_id), db=self._meta)

    # --- apply log -------------------------------------------------------------------

    def set_marker(self, record: Record, intent: bytes | None) -> None:
        """Note that *record* (a namespace op) is about to run (no flush: see
        store/marker.py)."""
        self._write_marker(Marker(self._generation, record.set, record.seq, intent).encode())

    def clear_marker(self) -> None:
        self._write_marker(CLEARED)

    def _write_marker(self, raw: bytes) -> None:
        if os.pwrite(self._marker_fd, raw, 0) != len(raw):
            raise OSError(f"short write of the marker in {self.path}")

    def marker(self) -> tuple[int, int, bytes | None] | None:
        """The op marked as about to run, if any (of this generation)."""
        found = Marker.decode(os.pread(self._marker_fd, 1 << 20, 0))
        if found is None or found.generation != self._generation:
            return None
        return found.set, found.seq, found.intent

    def _void_marker(self, txn: lmdb.Transaction) -> int:
        """In *txn*: the marker written so far is void once it commits. Returns the
        generation to take then."""
        txn.put(_GENERATION, encode_set(self._generation + 1), db=self._meta)
        return self._generation + 1

    @property
    def syncing(self) -> int | None:
        """The initial sync's set while the replica waits for it; None when consistent."""
        with self.env.begin() as txn:
            raw = txn.get(_SYNCING, db=self._meta)
        return decode_set(raw) if raw else None

    @property
    def from_scratch(self) -> bool:
        """The sync under way began on a replica with no set to show: nothing applied
        yet, or in the middle of another such sync. Nothing is lost to a reader if the
        replica is torn until the sync is whole."""
        with self.env.begin() as txn:
            return txn.get(_SCRATCH, db=self._meta) is not None

    def reset_to(self, set_id: int) -> None:
        """An initial sync begins at *set_id*: forget older sets, wait for that one."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(_APPLIED, db=self._meta)
            syncing = txn.get(_SYNCING, db=self._meta) is not None
            # A sync that replaces one under way shows what that one would have.
            if not raw or not decode_set(raw) or (syncing and txn.get(_SCRATCH, db=self._meta)):
                txn.put(_SCRATCH, b"1", db=self._meta)
            else:
                txn.delete(_SCRATCH, db=self._meta)
            if not syncing and raw and decode_set(raw) and txn.get(_REJOIN, db=self._meta) is None:
                # The replica holds that set whole until the sync's set applies (a sync
                # of paths applies whole), which ``applied`` no longer says.
                txn.put(_SHOWS, raw, db=self._meta)
            elif not syncing:
                txn.delete(_SHOWS, db=self._meta)
            self._delete_through(txn, set_id - 1)
            txn.put(_APPLIED, encode_set(set_id - 1), db=self._meta)
            txn.put(_SYNCING, encode_set(set_id), db=self._meta)
            generation = self._void_marker(txn)
            txn.delete(_REJOIN, db=self._meta)  # the set that undoes the divergence is coming
        self._generation = generation
        self.env.sync(True)
        self.epoch += 1

    @property
    def shows(self) -> int | None:
        """The set a replica in a sync of paths holds whole meanwhile (the last it applied
        before the sync began, on this lineage), or None: no sync, or one from scratch,
        or a rejoin's, or after a crash tore it (``interrupted``)."""
        with self.env.begin() as txn:
            raw = txn.get(_SHOWS, db=self._meta)
            if (raw is None or txn.get(_SYNCING, db=self._meta) is None
                    or txn.get(_SCRATCH, db=self._meta) is not None):
                return None
        return decode_set(raw)

    def abandon_sync(self, shows: int) -> list[int]:
        """Give up the sync under way: the replica is at set *shows* (``shows``) again,
        and every set staged since is erased. Returns their ids."""
        dropped = self.drop_unapplied()
        with self.env.begin(write=True) as txn:
            txn.put(_APPLIED, encode_set(shows), db=self._meta)
            for key in (_SYNCING, _SCRATCH, _SHOWS):
                txn.delete(key, db=self._meta)
        self.env.sync(True)
        self.epoch += 1
        return dropped

    def start_rejoin(self, shared: int, divergence: bytes) -> None:
        """An old primary becomes this secondary: at *shared*, plus what it changed since.

        The divergence (JSON) is offered to the new primary at every handshake
        until its set arrives (``reset_to``).
        """
        with self.env.begin(write=True) as txn:
            txn.put(_APPLIED, encode_set(shared), db=self._meta)
            txn.put(_REJOIN, divergence, db=self._meta)
            # Not a consistent replica until the new primary's set arrives and applies.
            txn.put(_SYNCING, encode_set(shared + 1), db=self._meta)
            txn.delete(_SHOWS, db=self._meta)
        self.env.sync(True)
        self.epoch += 1

    @property
    def rejoin(self) -> bytes | None:
        with self.env.begin() as txn:
            raw = txn.get(_REJOIN, db=self._meta)
        return bytes(raw) if raw is not None else None

    def last_reset(self, set_id: int) -> int:
        """The seq of the last RESET in *set_id* (0 if none): its records before it are moot."""
        seq = self.reset_seq(set_id)
        return seq if seq is not None else 0

    def reset_seq(self, set_id: int) -> int | None:
        """The seq of the last RESET staged in *set_id*, None if none is.

        Noted as the set is staged: the set is not read for it (an initial sync's set
        is as large as the tree)."""
        with self.env.begin() as txn:
            raw = txn.get(_RESET + encode_set(set_id), db=self._meta)
        return decode_key(raw)[1] if raw else None

    def staged_run(self, set_id: int, seq: int) -> int:
        """The first seq at or after *seq* that *set_id* has not staged: its records
        from *seq* up to there arrived, with no gap."""
        state = self.state(set_id)
        return state.run_end(seq) if state is not None else seq

    def finish(self, set_id: int) -> None:
        """Record *set_id* applied and drop the marker, durably; the applied sets are
        kept a while (HISTORY_SETS), older ones dropped."""
        keep = HISTORY_SETS if self.db_bytes(self._records) <= HISTORY_BYTES else 0
        with self.env.begin(write=True) as txn:
            txn.put(_APPLIED, encode_set(set_id), db=self._meta)
            generation = self._void_marker(txn)
            raw = txn.get(_SYNCING, db=self._meta)
            synced = raw is not None and decode_set(raw) <= set_id
            if synced:
                txn.delete(_SYNCING, db=self._meta)
                txn.delete(_SCRATCH, db=self._meta)
                txn.delete(_SHOWS, db=self._meta)
            self._delete_through(txn, set_id - keep)
        self._generation = generation
        self.env.sync(True)
        if synced:
            set_rejoining(self.path, False)  # a rejoin's set, if it was one, is applied

    def close(self) -> None:
        os.close(self._marker_fd)
        super().close()

    def size(self) -> int:
        return self.db_bytes(self._records)


def read_applied(staging_dir: Path) -> int:
    """The last set applied to the replica, read without disturbing (or waiting for) a
    running daemon that holds the store open."""
    raw = _read_meta(staging_dir, _APPLIED)
    return decode_set(raw) if raw else 0


def read_syncing(staging_dir: Path) -> int | None:
    """The initial sync's set while the replica has no consistent set yet, else None."""
    raw = _read_meta(staging_dir, _SYNCING)
    return decode_set(raw) if raw else None


def read_shows(staging_dir: Path) -> int | None:
    """``Staging.shows``, read without disturbing (or waiting for) a running daemon
    (see ``whole_in_sync``)."""
    if read_syncing(staging_dir) is None or _read_meta(staging_dir, _SCRATCH):
        return None
    raw = _read_meta(staging_dir, _SHOWS)
    return decode_set(raw) if raw else None


def whole_in_sync(staging_dir: Path, shows: int | None) -> int | None:
    """*shows* (``Staging.shows``, ``read_shows``) if the replica holds that set whole
    still: not torn by a crash since (APPLYING), nor an old primary's (REJOINING).
    What promote --outdated promotes it at."""
    if shows is None or is_rejoining(staging_dir) or interrupted(staging_dir) is not None:
        return None
    return shows


@dataclass(frozen=True)
class Standing:
    """What a replica holds, as an election compares it (repl/cluster/election.py)."""

    generation: int
    applied: int
    complete: int  # the last set promote would reach: complete sets after applied, no gap
    # No consistent set: an initial sync, a rejoin not yet done, or a batch a power cut
    # of this host tore, which only the primary's resend of its paths mends.
    syncing: bool
    cluster: str | None


def open_reader(staging_dir: Path) -> lmdb.Environment:
    """The staging store at *staging_dir*, opened read-only beside the daemon that
    writes it. Mapped as large as the writer maps it: a reader mapped only as large as
    the data was when it opened fails its next transaction (MDB_MAP_RESIZED) once the
    writer grew the data past that."""
    return lmdb.open(str(staging_dir), readonly=True, lock=True, max_dbs=4, map_size=MAP_SIZE)


def read_standing(staging_dir: Path) -> Standing | None:
    """The standing of the replica whose staging is at *staging_dir* (None if there is
    none), read without disturbing (or waiting for) a daemon that holds it open.
    A replica torn by a power cut counts as syncing even before its secondary has
    started and asked the primary for the torn batch's paths
    (repl/secondary/applier.py): an election must not pick it."""
    if not (staging_dir / "data.mdb").exists():
        return None
    env = open_reader(staging_dir)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            sets = env.open_db(b"sets", txn=txn, create=False)
            raw = txn.get(_APPLIED, db=meta)
            applied = complete = decode_set(raw) if raw else 0
            while (raw := txn.get(encode_set(complete + 1), db=sets)) is not None \
                    and SetState.decode(raw).complete:
                complete += 1
            ident = identity.parse(txn.get(identity.KEY, db=meta), make_cluster=False)
            syncing = txn.get(_SYNCING, db=meta) is not None
        syncing = syncing or lost_to_power(staging_dir) is not None
        return Standing(ident.generation, applied, complete, syncing, ident.cluster)
    finally:
        env.close()


def _read_meta(staging_dir: Path, key: bytes) -> bytes | None:
    if not (staging_dir / "data.mdb").exists():
        return None
    env = open_reader(staging_dir)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            raw = txn.get(key, db=meta)
        return bytes(raw) if raw is not None else None
    finally:
        env.close()
