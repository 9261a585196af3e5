"""Who a node is: its node id, the cluster it belongs to, and the generation.

Kept as one JSON value in a store's meta database. The node id is made the
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

_KEY = b"identity"


@dataclass
class Identity:
    node: str
    cluster: str | None = None
    generation: int = 1
    # One entry per promotion: {"generation", "node", "first_set"}.
    history: list[dict[str, Any]] = field(default_factory=list)


def load(env: lmdb.Environment, db: lmdb._Database, *, make_cluster: bool) -> Identity:
    """Read the identity, creating what is missing (node id; cluster id if asked).

    Raises:
        StoreError: the stored identity is not one this module wrote.
    """
    with env.begin(write=True) as txn:
        raw = txn.get(_KEY, db=db)
        ident = _decode(bytes(raw)) if raw else Identity(node=secrets.token_hex(8))
        if make_cluster and ident.cluster is None:
            ident.cluster = secrets.token_hex(8)
        txn.put(_KEY, json.dumps(asdict(ident)).encode(), db=db)
    return ident


def save(env: lmdb.Environment, db: lmdb._Database, ident: Identity) -> None:
    with env.begin(write=True) as txn:
        txn.put(_KEY, json.dumps(asdict(ident)).encode(), db=db)


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
