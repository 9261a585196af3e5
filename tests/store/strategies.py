"""Hypothesis strategies for valid records, built from the format's own rules."""

from __future__ import annotations

import stat

from hypothesis import strategies as st

from store.records import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FIELDS,
    KINDS,
    MAX_OFFSET,
    MAX_SEQ,
    ROOT_OPS,
    Op,
    Record,
)

_component = (st.binary(min_size=1, max_size=12)
              .map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))
              .filter(lambda b: b not in (b".", b"..")))
paths = st.lists(_component, min_size=1, max_size=4).map(b"/".join)
_no_nul = st.binary(max_size=64).map(lambda b: b.replace(b"\0", b"_"))
_names = st.binary(min_size=1, max_size=64).map(lambda b: b.replace(b"\0", b"_"))
_ints = {"u32": st.integers(0, (1 << 32) - 1), "u64": st.integers(0, (1 << 64) - 1),
         "i64": st.integers(-(1 << 63), (1 << 63) - 1)}
_offsets = st.integers(0, MAX_OFFSET >> 1)
_node_modes = st.tuples(st.sampled_from([stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK,
                                         stat.S_IFIFO, stat.S_IFSOCK]),
                        st.integers(0, 0o7777)).map(lambda t: t[0] | t[1])
_fallocate_modes = st.sampled_from([0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                                    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE])


_any_op = st.sampled_from(Op)
_any_set = st.integers(0, (1 << 64) - 1)
_any_seq = st.integers(0, MAX_SEQ - 1)


@st.composite
def records(draw: st.DrawFn, ops: st.SearchStrategy[Op] = _any_op,
            set_ids: st.SearchStrategy[int] = _any_set,
            seqs: st.SearchStrategy[int] = _any_seq) -> Record:
    """A record that ``validate()`` accepts, of any op, with every field it carries
    drawn within its rules."""
    op = draw(ops)
    seq = draw(seqs)
    values: dict[str, object] = {}
    for name in FIELDS[op]:
        kind = KINDS[name]
        if name == "path":
            values[name] = draw(paths | st.just(b"")) if op in ROOT_OPS else draw(paths)
        elif name == "path2":
            values[name] = draw(paths)
        elif name == "name":
            values[name] = draw(_names)
        elif name == "data":
            values[name] = draw(_no_nul if op == Op.SYMLINK else st.binary(max_size=64))
        elif name in ("offset", "size", "length"):
            values[name] = draw(_offsets)
        elif name == "count":
            values[name] = seq
        else:
            values[name] = draw(_ints[kind])
    if op == Op.RENAME:
        values["flags"] = draw(st.sampled_from([0, 1, 2]))
    elif op == Op.MKNOD:
        values["mode"] = draw(_node_modes)
    elif op == Op.FILE:
        values["mode"] = stat.S_IFREG | draw(st.integers(0, 0o7777))
    elif op == Op.FALLOCATE:
        values["flags"] = draw(_fallocate_modes)
        values["length"] = draw(st.integers(1, MAX_OFFSET >> 1))
    record = Record(op, draw(set_ids), seq, **values)  # type: ignore[arg-type]
    record.validate()
    return record
