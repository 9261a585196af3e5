"""The record decoders, fuzzed: every value they can be given from a peer or from disk.

A record comes from a peer (a RECORD frame) and from disk (the journal, the
staging store); keys, set ids, intents, set states, dirty ranges and the
activity log's notes come from disk. For each decoder: valid values
round-trip, and any bytes at all, random or a valid encoding damaged (with
its checksum made valid again, so the damage reaches the parser), either
decode to a valid value that encodes back to the same bytes, or raise
RecordError; never another error, and never an allocation the input's size
does not pay for.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.errors import RecordError
from store.notes import Note, NoteKind, decode_notes, encode_notes
from store.records import (
    MAX_OFFSET,
    MAX_SEQ,
    Record,
    decode_intent,
    decode_key,
    decode_ranges,
    decode_set,
    encode_intent,
    encode_key,
    encode_ranges,
    encode_set,
)
from store.setstate import SetState
from tests.fuzz import bounded, mutated
from tests.store.specs import reseal
from tests.store.strategies import records
from tests.support import ROOT

# The checked-in corpus, good and corrupt records alike (tests/testdata/records).
_golden = st.sampled_from(sorted((ROOT / "tests" / "testdata" / "records").glob("*.bin"))
                          ).map(Path.read_bytes)
u64 = st.integers(0, (1 << 64) - 1)


def decodes_or_refuses(raw: bytes) -> Record | None:
    """Record.decode(raw), None if refused; a decoded record re-encodes to *raw*, and
    decoding without the data (the receiver's) refuses the same bytes and keeps the rest."""
    try:
        record = bounded(Record.decode, raw)
    except RecordError:
        with pytest.raises(RecordError):
            Record.decode(raw, data=False)
        return None
    assert record.encode() == raw, "two encodings of one record"
    assert Record.decode(raw, data=False) == replace(record, data=b"")
    return record


# --- Record -----------------------------------------------------------------------


@given(records())
def test_record_decode_ok_round_trip(record: Record) -> None:
    raw = record.encode()
    assert Record.decode(raw) == record
    assert Record.decode(memoryview(raw)) == record
    assert Record.decode(raw, data=False) == replace(record, data=b"")


@given(st.binary(max_size=256))
def test_record_decode_fuzz_random_bytes(raw: bytes) -> None:
    decodes_or_refuses(raw)


@given(st.binary(max_size=256))
def test_record_decode_fuzz_random_bytes_sealed(raw: bytes) -> None:
    """Random bodies with a valid checksum: the damage reaches the field parser."""
    decodes_or_refuses(reseal(raw))


@given((_golden | records().map(Record.encode)).flatmap(mutated), st.booleans())
def test_record_decode_fuzz_mutated(raw: bytes, seal: bool) -> None:
    decodes_or_refuses(reseal(raw[:-8]) if seal and len(raw) >= 8 else raw)


# --- keys, set ids, intents, dirty ranges -------------------------------------------


@given(u64, st.integers(0, (1 << 32) - 1))
def test_record_key_ok_round_trip(set_id: int, seq: int) -> None:
    assert decode_key(encode_key(set_id, seq)) == (set_id, seq)


@given(st.binary(max_size=32))
def test_record_key_fuzz(raw: bytes) -> None:
    try:
        set_id, seq = bounded(decode_key, raw)
    except RecordError:
        assert len(raw) != 12
        return
    assert encode_key(set_id, seq) == raw


@given(u64)
def test_record_set_ok_round_trip(set_id: int) -> None:
    assert decode_set(encode_set(set_id)) == set_id


@given(st.binary(max_size=32))
def test_record_set_fuzz(raw: bytes) -> None:
    try:
        set_id = bounded(decode_set, raw)
    except RecordError:
        assert len(raw) != 8
        return
    assert encode_set(set_id) == raw


@given(u64, u64)
def test_record_intent_ok_round_trip(a: int, b: int) -> None:
    assert decode_intent(encode_intent(a, b)) == (a, b)


@given(st.binary(max_size=32))
def test_record_intent_fuzz(raw: bytes) -> None:
    try:
        a, b = bounded(decode_intent, raw)
    except RecordError:
        assert len(raw) != 16
        return
    assert encode_intent(a, b) == raw


@given(st.lists(st.tuples(u64, u64), max_size=8))
def test_record_ranges_ok_round_trip(ranges: list[tuple[int, int]]) -> None:
    assert decode_ranges(encode_ranges(ranges)) == ranges


@given(st.binary(max_size=64))
def test_record_ranges_fuzz(raw: bytes) -> None:
    try:
        ranges = bounded(decode_ranges, raw)
    except RecordError:
        return
    assert encode_ranges(ranges) == raw


# --- set states ----------------------------------------------------------------------


@st.composite
def set_states(draw: st.DrawFn) -> SetState:
    state = SetState()
    for seq in draw(st.lists(st.integers(0, 200), max_size=40)):
        state.mark(seq)
    if draw(st.booleans()):
        state.sync_seen, state.count = True, draw(st.integers(0, 200))
        state.check_complete()
    return state


@given(set_states())
def test_set_state_ok_round_trip(state: SetState) -> None:
    assert SetState.decode(state.encode()) == state


def _use(state: SetState) -> None:
    """What the staging store does with a state it read, short of marking new seqs."""
    state.received()
    state.check_complete()
    state.has(MAX_SEQ - 1)


@given(st.binary(max_size=64) | set_states().map(SetState.encode).flatmap(mutated))
def test_set_state_fuzz(raw: bytes) -> None:
    """A set state read from disk, damaged: refused, or using it costs what its bytes
    hold, whatever op count they claim."""
    try:
        state = bounded(SetState.decode, raw)
    except RecordError:
        return
    assert state.count < MAX_SEQ
    bounded(lambda _: _use(state), raw)
    assert SetState.decode(state.encode()) == state


# --- the activity log's notes ---------------------------------------------------------

_paths = st.lists(st.sampled_from([b"a", b"b\xc3\xa9", b"c" * 255, b"d"]), min_size=1,
                  max_size=4).map(b"/".join)


@st.composite
def notes(draw: st.DrawFn) -> Note:
    kind = draw(st.sampled_from(NoteKind))
    if kind == NoteKind.DATA:
        start = draw(st.integers(0, MAX_OFFSET - 1))
        return Note(kind, draw(_paths), start, draw(st.integers(start + 1, MAX_OFFSET)))
    if kind == NoteKind.XATTR:
        return Note(kind, draw(_paths), name=draw(st.binary(min_size=1, max_size=255)
                                                  .filter(lambda n: b"\0" not in n)))
    return Note(kind, draw(_paths))


_notes_golden = st.sampled_from(sorted((ROOT / "tests" / "testdata" / "notes").glob("*.bin"))
                                ).map(Path.read_bytes)


def notes_decode_or_refuse(raw: bytes) -> None:
    try:
        decoded = bounded(decode_notes, raw)
    except RecordError:
        return
    assert encode_notes(decoded) == raw, "two encodings of one batch of notes"


@given(st.lists(notes(), max_size=8))
def test_notes_ok_round_trip(batch: list[Note]) -> None:
    assert decode_notes(encode_notes(batch)) == batch


@given(st.binary(max_size=256))
def test_notes_decode_fuzz_random_bytes(raw: bytes) -> None:
    notes_decode_or_refuse(raw)


@given((_notes_golden | st.lists(notes(), max_size=4).map(encode_notes)).flatmap(mutated))
def test_notes_decode_fuzz_mutated(raw: bytes) -> None:
    notes_decode_or_refuse(raw)
