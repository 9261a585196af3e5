"""The staging store reading back values that are not what it wrote.

Every value the secondary keeps in its staging store (the identity, the
applied, syncing and marker meta keys, each set's state, each record and
its key) is planted damaged in a real store, and every way of reading it
runs: each returns, or raises a StoreError (RecordError for a value that
does not decode), which the daemon reports in one line.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from store.errors import StoreError
from store.records import Op, Record, encode_key, encode_set
from store.staging import Staging
from tests.fuzz import mutated

# Where a value lives: (database, key), and a valid value to damage.
SET = 3
_RECORD = Record(Op.WRITE, SET, 0, path=b"f", data=b"staged")
PLACES: dict[str, tuple[bytes, bytes, bytes]] = {
    "identity": (b"meta", b"identity", json.dumps(
        {"node": "a0", "cluster": "c1", "generation": 2, "history": []}).encode()),
    "applied": (b"meta", b"applied", encode_set(SET - 1)),
    "syncing": (b"meta", b"syncing", encode_set(SET)),
    "marker": (b"meta", b"marker", encode_key(SET, 0) + bytes(16)),
    "set-state": (b"sets", encode_set(SET), bytes.fromhex("010000000103")),
    "record": (b"records", _RECORD.key, _RECORD.encode()),
    "record-key": (b"records", b"", _RECORD.encode()),  # the key is what gets damaged
}


def _read_everything(staging: Staging) -> None:
    """Every way the secondary reads its staging store."""
    staging.applied  # noqa: B018
    staging.syncing  # noqa: B018
    staging.marker()
    staging.sets()
    staging.state(SET)
    list(staging.records(SET))
    staging.applicable_through()
    staging.last_reset(SET)
    staging.stage([Record(Op.SYNC, SET, 1, count=1), _RECORD])
    staging.drop_partial()
    staging.finish(SET)


@given(st.sampled_from(sorted(PLACES)).flatmap(
    lambda place: st.tuples(st.just(place), mutated(PLACES[place][2]) | st.binary(max_size=40))))
def test_staging_fuzz_damaged_value(case: tuple[str, bytes]) -> None:
    place, raw = case
    db_name, key, _ = PLACES[place]
    with tempfile.TemporaryDirectory() as where:
        path = Path(where) / "staging"
        Staging(path).close()
        staging = Staging(path)
        with staging.env.begin(write=True) as txn:
            db = staging.env.open_db(db_name, txn=txn)
            if place == "record-key":
                key, raw = raw or b"\0", PLACES[place][2]
            txn.put(key, raw, db=db)
        staging.close()
        try:
            staging = Staging(path)  # reads the identity
        except StoreError:
            return
        try:
            _read_everything(staging)
        except StoreError:
            pass
        finally:
            staging.close()
