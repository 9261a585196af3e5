"""The primary's journal: every replicated op, in stream order, in LMDB.

Keys are (set, seq) so a cursor walks the stream in order. Every append is
its own LMDB write transaction, committed without fsync before the op
touches the backing directory: a killed daemon loses nothing that reached
the page cache, so at most the very last record can be journaled but not
applied, and recovery redoes exactly that one (Capture.recover in repl/capture.py). Durability
against power loss is bought once per commit point with ``sync()``, which
many fsyncs share (group commit).

Records stay until ``trim()``: the secondary reports a set applied, or the
journal runs over its budget with nobody to send to.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from store import identity
from store.errors import StoreError
from store.lmdbdir import COMMIT_BYTES, LmdbDir
from store.records import Op, Record, decode_key, decode_set, encode_key, encode_set

_NEXT_SET = b"next_set"
_INTENT = b"intent"
_BASE = b"base"


class Journal(LmdbDir):
    """An LMDB journal directory, held exclusively by one daemon."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, "journal")
        self._records = self.env.open_db(b"records")
        self._meta = self.env.open_db(b"meta")
        self.identity = identity.load(self.env, self._meta, make_cluster=True)
        self.set, self.seq = self._position()
        self.set_bytes = 0
        self.commits = 0
        self.bytes = self.size()  # kept current by append and trim, for the budget

    def _position(self) -> tuple[int, int]:
        """Where the next record goes: after the last one, or after the last trim."""
        with self.env.begin() as txn:
            raw = txn.get(_NEXT_SET, db=self._meta)
            next_set = decode_set(raw) if raw else 1
            cursor = txn.cursor(db=self._records)
            if not cursor.last():
                return next_set, 0
            set_id, seq = decode_key(cursor.key())
            if Record.decode(cursor.value()).op == Op.SYNC:
                return max(next_set, set_id + 1), 0
            return set_id, seq + 1

    def append(self, op: Op, intent: bytes | None = None, **fields: Any) -> Record:
        """Journal one op at the next (set, seq) and commit it (without fsync).

        Args:
            intent: what an exchange expects to swap, kept beside the record so
                recovery can tell whether it happened.
        """
        record = Record(op, self.set, self.seq, **fields)
        value = record.encode()
        with self.env.begin(write=True) as txn:
            txn.put(record.key, value, db=self._records)
            if intent is not None:
                txn.put(_INTENT, record.key + intent, db=self._meta)
        self.commits += 1
        self.passed(len(value) + COMMIT_BYTES)
        self.seq += 1
        self.set_bytes += len(value)
        self.bytes += len(value)
        return record

    def put(self, record: Record) -> None:
        """Overwrite a journaled record in place (a void, or a short write)."""
        with self.env.begin(write=True) as txn:
            txn.put(record.key, record.encode(), db=self._records)
        self.commits += 1

    def close_set(self) -> int:
        """Append the current set's SYNC record and start the next set. Returns the closed id."""
        closed = self.set
        self.append(Op.SYNC, count=self.seq)
        self.set, self.seq, self.set_bytes = closed + 1, 0, 0
        return closed

    @property
    def set_is_empty(self) -> bool:
        return self.seq == 0

    def sync(self) -> None:
        """Make every committed record durable. Blocking; call it from a thread."""
        self.env.sync(True)

    def last(self) -> Record | None:
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._records)
            return Record.decode(cursor.value()) if cursor.last() else None

    def intent(self, record: Record) -> bytes | None:
        """The intent stored with *record*, if it was the last one given one."""
        with self.env.begin() as txn:
            raw = txn.get(_INTENT, db=self._meta)
        if raw and raw[: len(record.key)] == record.key:
            return bytes(raw[len(record.key) :])
        return None

    def records(self, start_set: int = 0, start_seq: int = 0) -> Iterator[Record]:
        """Every record from (start_set, start_seq) on, in stream order."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._records)
            if not cursor.set_range(encode_key(start_set, start_seq)):
                return
            for value in cursor.iternext(keys=False, values=True):
                yield Record.decode(value)

    def read_raw(self, start_set: int, start_seq: int, max_bytes: int
                 ) -> list[tuple[int, int, bytes]]:
        """Up to about *max_bytes* of encoded records from (start_set, start_seq) on.

        Returns (set, seq, encoded record) tuples, for shipping without decoding.
        """
        out: list[tuple[int, int, bytes]] = []
        total = 0
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._records)
            if not cursor.set_range(encode_key(start_set, start_seq)):
                return out
            for key, value in cursor:
                set_id, seq = decode_key(key)
                out.append((set_id, seq, bytes(value)))
                total += len(value)
                if total >= max_bytes:
                    break
        self.passed(total)
        return out

    def trim(self, upto_set: int) -> int:
        """Drop every record of sets up to *upto_set*. Returns how many were dropped."""
        with self.env.begin(write=True) as txn:
            dropped = self.delete_run(txn, self._records, b"",
                                      lambda key: decode_key(key)[0] > upto_set)
            raw = txn.get(_NEXT_SET, db=self._meta)
            if not raw or decode_set(raw) <= upto_set:
                txn.put(_NEXT_SET, encode_set(upto_set + 1), db=self._meta)
            raw = txn.get(_BASE, db=self._meta)
            if raw and decode_set(raw) < upto_set:  # older replicas now need a full sync
                txn.put(_BASE, encode_set(upto_set), db=self._meta)
        self.commits += 1
        self.bytes = self.size()
        return dropped

    def start_generation(self, ident: identity.Identity, next_set: int) -> None:
        """Make this journal a new primary's: its identity, sets from *next_set* on."""
        if self.last() is not None:
            raise StoreError(f"journal {self.path} is not empty; a promoted node needs a "
                             "fresh one")
        self.identity = ident
        identity.save(self.env, self._meta, ident)
        self.put_meta(_NEXT_SET, encode_set(next_set))
        self.base = next_set - 1
        self.set, self.seq = next_set, 0

    @property
    def base(self) -> int | None:
        """The oldest applied set a replica may have and still follow this journal.

        None: no replica can (the journal began on a tree that was not empty),
        so a secondary needs an initial sync first.
        """
        raw = self.get_meta(_BASE)
        return decode_set(raw) if raw else None

    @base.setter
    def base(self, set_id: int | None) -> None:
        self.put_meta(_BASE, b"" if set_id is None else encode_set(set_id))

    def first_set(self) -> int | None:
        """The oldest set still journaled."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._records)
            return decode_key(cursor.key())[0] if cursor.first() else None

    def get_meta(self, key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            raw = txn.get(key, db=self._meta)
        return bytes(raw) if raw is not None else None

    def put_meta(self, key: bytes, value: bytes | None) -> None:
        """Set (or with None, delete) a small meta value, committed at once."""
        with self.env.begin(write=True) as txn:
            if value is None:
                txn.delete(key, db=self._meta)
            else:
                txn.put(key, value, db=self._meta)

    def count(self) -> int:
        """Records in the journal."""
        with self.env.begin() as txn:
            return int(txn.stat(self._records)["entries"])

    def size(self) -> int:
        """Bytes the records take in the journal's pages."""
        return self.db_bytes(self._records)
