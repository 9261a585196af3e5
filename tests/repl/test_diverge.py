"""What a journal says two trees changed: content paths and written ranges."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from repl.diverge import END, Divergence
from repl.protocol import MAX_HELLO_FRAME
from store.records import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Op, Record


def rec(op: Op, path: bytes, **fields: Any) -> Record:
    record = Record(op, 1, 0, path=path, **fields)
    record.validate()
    return record


def test_divergence_add_ok_ranges() -> None:
    """Every op that changes bytes adds the range it changed, merged per file."""
    div = Divergence().add([
        rec(Op.WRITE, b"f", offset=10, data=b"abc"),
        rec(Op.FALLOCATE, b"f", flags=FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            offset=12, length=100),
        rec(Op.FALLOCATE, b"g", offset=4096, length=8192),
        rec(Op.TRUNCATE, b"h", size=7),
        rec(Op.CHMOD, b"i", mode=0o600),
    ])
    assert div.ranges == {b"f": [(10, 112)], b"g": [(4096, 12288)], b"h": [(7, END)],
                          b"i": []}
    assert div.content == set()


def test_divergence_add_ok_content() -> None:
    div = Divergence().add([rec(Op.UNLINK, b"a"), rec(Op.RENAME, b"b", path2=b"c"),
                            rec(Op.SETXATTR, b"d", name=b"user.k")])
    assert div.content == {b"a", b"b", b"c", b"d"}
    assert div.ranges == {}


def test_divergence_update_ok_keeps_a_file_without_ranges() -> None:
    """A file whose mode, owner or times alone changed has no range, and is still sent
    (a rejoin's offer updated with the primary's own records)."""
    offer = Divergence({b"a"}, {b"f": [(0, 10)]})
    offer.update(Divergence().add([rec(Op.UTIMES, b"g", atime_ns=1, mtime_ns=2),
                                   rec(Op.CHOWN, b"f", uid=1, gid=1),
                                   rec(Op.WRITE, b"f", offset=20, data=b"x")]))
    assert offer.ranges == {b"f": [(0, 10), (20, 21)], b"g": []}
    assert offer.only_ranges() == {b"f": [(0, 10), (20, 21)], b"g": []}
    assert Divergence().update(offer) == offer


def test_divergence_offer_ok_fits_a_hello_or_asks_for_the_whole_tree() -> None:
    """Offered in a HELLO answer, which the primary reads under MAX_HELLO_FRAME: past
    half of it the offer asks for the whole tree instead of being refused."""
    few = Divergence({b"a", b"b/c"})
    raw, asked = few.offer()
    assert asked is few and not asked.whole_tree
    assert Divergence.from_json(json.loads(raw)) == few
    many = Divergence({b"%06d" % i + b"x" * 240 for i in range(MAX_HELLO_FRAME // 2 // 480)})
    raw, asked = many.offer()
    assert asked.whole_tree and len(raw) < 100
    assert Divergence.from_json(json.loads(raw)).content == {b""}


def test_divergence_with_links_ok_every_name_of_a_linked_file(tmp_path: Path) -> None:
    """The primary wrote a file through a name it then removed: its records name only
    that one. The rejoining node offers every name of its linked files, so the other
    name is sent whole too."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "f8").write_bytes(b"x" * 4360)
    os.link(tmp_path / "c" / "f8", tmp_path / "f11")  # the name the write went through
    (tmp_path / "alone").write_bytes(b"y")
    (tmp_path / "d").mkdir()
    ours = Divergence().add([rec(Op.WRITE, b"f11", offset=4096, data=b"z" * 2090),
                             rec(Op.UNLINK, b"f11")])
    offered = ours.with_links(tmp_path)
    assert offered.content == {b"f11", b"c/f8"}
    assert ours.content == {b"f11"}, "a copy: the branch keeps what this node changed"
    assert Divergence({b""}).with_links(tmp_path).content == {b""}
