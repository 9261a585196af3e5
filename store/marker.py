"""The apply log's marker: the namespace op about to run, in a file of its own.

The applier notes each namespace op before it runs it (repl/apply.py's redo
rule). That is one write per create, rename or unlink applied, so it is a
file rewritten in place, not an LMDB commit (which flushes the disk: see
store/lmdbdir.py). Like the replica's changes it guards, it is durable
once the batch is (the applier's syncfs); a crash of the daemon keeps it
in the page cache.

The file holds::

    u32 length            of what follows, up to the checksum
    u64 generation        the staging store's, when the marker was written
    12 bytes              the record's key (set, seq)
    ... intent            what an exchange expects to swap (may be empty)
    u64 checksum          xxh3_64 of all the above

A marker from another generation is stale: the staging store moves its
generation in the same commit that finishes a set or resets the replica, so
a marker left behind by a crash just after that commit is not mistaken for
one of the sets that follow.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from store.records import KEY_SIZE, decode_key, encode_key

_HEAD = struct.Struct(">IQ")  # length, generation
_CHECKSUM = struct.Struct(">Q")
CLEARED = bytes(_HEAD.size)  # written over a marker: no op is marked (length 0)


@dataclass(frozen=True, slots=True)
class Marker:
    generation: int
    set: int
    seq: int
    intent: bytes | None

    def encode(self) -> bytes:
        body = (_HEAD.pack(_HEAD.size - 4 + KEY_SIZE + len(self.intent or b""),
                           self.generation)
                + encode_key(self.set, self.seq) + (self.intent or b""))
        return body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))

    @classmethod
    def decode(cls, buf: bytes) -> Marker | None:
        """The marker at the head of *buf* (what follows it is left over from a longer
        one), or None if there is none or it is torn (a power cut mid-write)."""
        if len(buf) < _HEAD.size + KEY_SIZE + _CHECKSUM.size:
            return None
        length, generation = _HEAD.unpack_from(buf)
        end = 4 + length
        if length < _HEAD.size - 4 + KEY_SIZE or end + _CHECKSUM.size > len(buf):
            return None
        (want,) = _CHECKSUM.unpack_from(buf, end)
        if xxhash.xxh3_64_intdigest(buf[:end]) != want:
            return None
        set_id, seq = decode_key(buf[_HEAD.size : _HEAD.size + KEY_SIZE])
        return cls(generation, set_id, seq, bytes(buf[_HEAD.size + KEY_SIZE : end]) or None)
