"""Shared machinery of the property-based (hypothesis) tests of the decoders.

Every decoder that takes bytes from a peer or from disk is fed valid values
(they must round-trip), and arbitrary and mutated bytes: it must return a
valid value or raise the one error of its kind (``ProtocolError`` for the
wire, ``RecordError`` for the store), and never allocate much more than it
was given. ``bin/test`` runs a small, fixed set of cases (profile
``default``); ``bin/test --hypothesis-profile=deep`` runs many more, with
fresh random cases every time.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

T = TypeVar("T")

# The default run: a few seconds in all, the same cases every time (a failure is
# reproducible); the deep one: ten thousand fresh cases per property.
settings.register_profile("default", max_examples=100, deadline=None, derandomize=True,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=10_000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")

# What a decoder may allocate beyond a small multiple of its input: room for the
# objects it returns, never room for a length it read and did not check.
SLACK = 256 << 10


def bounded(decode: Callable[[bytes], T], raw: bytes, factor: int = 4) -> T:
    """``decode(raw)``, checking it allocated at most *factor* times *raw*'s size
    (plus SLACK) on the way, whether it returned or raised."""
    tracemalloc.start()
    try:
        return decode(raw)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= factor * len(raw) + SLACK, (
            f"decoding {len(raw)} bytes allocated {peak} bytes")


# Values that are lengths in some field, for mutations to plant: the edges of u8, u16,
# u32 and u64, and the bounds replfs checks against.
_BIG = [0, 1, 0x7F, 0xFF, 0x100, 0xFFFF, 0x1_0000, 0x7FFF_FFFF, 0xFFFF_FFFF,
        (1 << 63) - 1, (1 << 64) - 1]


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    """*raw* with one to four damages: a bit flipped, a byte set, bytes inserted or
    deleted, a cut, junk appended, or a big number written over a place (as a length
    field would hold)."""
    out = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out)))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "extend",
                                     "number"]))
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and at < len(out):
            out[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        elif kind == "cut":
            del out[at:]
        elif kind == "extend":
            out += draw(st.binary(min_size=1, max_size=32))
        elif kind == "number":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(_BIG)) % (1 << 8 * width)
            out[at : at + width] = value.to_bytes(width, "big")
    return bytes(out)
