"""The secondary's record of one data set's arrival, as staging keeps it.

Layout (big-endian): u8 flags (1: SYNC seen, 2: complete), u32 the set's op
count, then the bitmap: bit seq % 8 of byte seq // 8 set for each staged record.
A format module: it packs bytes, as ``store/records.py`` does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from store.errors import RecordError
from store.records import MAX_SEQ

_SET_STATE = struct.Struct(">BI")
_SYNC_SEEN = 1
_COMPLETE = 2


@dataclass(slots=True)
class SetState:
    """What the secondary has received of one data set (claims 4, 7, 20).

    ``bitmap`` has bit *seq* set for every staged record; the set is complete
    once its SYNC record was seen and every seq up to it is present.
    """

    sync_seen: bool = False
    count: int = 0
    complete: bool = False
    bitmap: bytearray = field(default_factory=bytearray)

    def mark(self, seq: int) -> bool:
        """Set *seq*'s bit. Returns False if it was already set (a duplicate)."""
        byte, bit = divmod(seq, 8)
        if byte >= len(self.bitmap):
            self.bitmap.extend(bytes(byte + 1 - len(self.bitmap)))
        if self.bitmap[byte] >> bit & 1:
            return False
        self.bitmap[byte] |= 1 << bit
        return True

    def has(self, seq: int) -> bool:
        byte, bit = divmod(seq, 8)
        return byte < len(self.bitmap) and bool(self.bitmap[byte] >> bit & 1)

    def run_end(self, seq: int) -> int:
        """The first seq at or after *seq* whose bit is not set."""
        bits = int.from_bytes(self.bitmap, "little") >> seq
        return seq + (~bits & (bits + 1)).bit_length() - 1

    def received(self) -> int:
        return int.from_bytes(self.bitmap, "little").bit_count()

    def check_complete(self) -> bool:
        """Set and return the complete flag: SYNC seen, seqs 0..count all present, no other.

        Costs the bitmap's size, never the count's: a count the bitmap cannot
        hold is not complete."""
        if (self.sync_seen and len(self.bitmap) * 8 > self.count
                and int.from_bytes(self.bitmap, "little") == (1 << self.count + 1) - 1):
            self.complete = True
        return self.complete

    def encode(self) -> bytes:
        flags = (_SYNC_SEEN if self.sync_seen else 0) | (_COMPLETE if self.complete else 0)
        return _SET_STATE.pack(flags, self.count) + bytes(self.bitmap)

    @classmethod
    def decode(cls, buf: bytes) -> SetState:
        if len(buf) < _SET_STATE.size:
            raise RecordError(f"set state of {len(buf)} bytes")
        flags, count = _SET_STATE.unpack_from(buf)
        if flags & ~(_SYNC_SEEN | _COMPLETE):
            raise RecordError(f"unknown set state flags {flags:#x}")
        if count >= MAX_SEQ:
            raise RecordError(f"set state with op count {count}")
        if len(buf) - _SET_STATE.size > MAX_SEQ // 8:
            raise RecordError(f"set state bitmap of {len(buf) - _SET_STATE.size} bytes")
        return cls(bool(flags & _SYNC_SEEN), count, bool(flags & _COMPLETE),
                   bytearray(buf[_SET_STATE.size :]))
