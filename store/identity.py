"""Who a node is: its node id, the cluster it belongs to, and the generation.

Kept as one JSON value in a store's meta data. The node id is made the
first time a store opens. A primary makes the cluster id at its first
start; a secondary adopts the cluster of the first primary it serves and
refuses any other afterwards.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb

from store.errors import StoreError

KEY = b"identity"  # its key in a store's meta


@dataclass
class Identity:
    node: str
    cluster: str | None = None
    generation: int = 1
    # One entry per promotion: {"generation", "node", "first_set"}.
    history: list[dict[str, Any]] = field(default_factory=list)


def parse(raw: bytes | None, *, make_cluster: bool) -> Identity:
    """The identity stored as *raw*, or a new one; a cluster id is made if asked.

    Raises:
        StoreError: the stored identity is not one this module wrote.
    """
    ident = _decode(bytes(raw)) if raw else Identity(node=secrets.token_hex(8))
    if make_cluster and ident.cluster is None:
        ident.cluster = secrets.token_hex(8)
    return ident


def dumps(ident: Identity) -> bytes:
    return json.dumps(asdict(ident)).encode()


def load(env: lmdb.Environment, db: lmdb._Database, *, make_cluster: bool) -> Identity:
    """Read the identity, creating what is missing (node id; cluster id if asked).

    Raises:
        StoreError: the stored identity is not one this module wrote.
    """
    with env.begin(write=True) as txn:
        ident = parse(txn.get(KEY, db=db), make_cluster=make_cluster)
        txn.put(KEY, dumps(ident), db=db)
    return ident


def save(env: lmdb.Environment, db: lmdb._Database, ident: Identity) -> None:
    with env.begin(write=True) as txn:
        txn.put(KEY, dumps(ident), db=db)


def _decode(raw: bytes) -> Identity:
    try:
        fields = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise StoreError("the stored node identity is not JSON") from None
    if not isinstance(fields, dict) or "node" not in fields or not set(fields) <= {
            "node", "cluster", "generation", "history"}:
        raise StoreError(f"the stored node identity has other fields: {raw[:200]!r}")
    ident = Identity(**fields)
    if (not isinstance(ident.node, str) or not isinstance(ident.cluster, str | None)
            or type(ident.generation) is not int or ident.generation < 1
            or not isinstance(ident.history, list)
            or not all(isinstance(h, dict) for h in ident.history)):
        raise StoreError(f"the stored node identity is malformed: {raw[:200]!r}")
    return ident
