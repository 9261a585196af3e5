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

_KEY = b"identity"


@dataclass
class Identity:
    node: str
    cluster: str | None = None
    generation: int = 1
    # One entry per promotion: {"generation", "node", "first_set"}.
    history: list[dict[str, Any]] = field(default_factory=list)


def load(env: lmdb.Environment, db: lmdb._Database, *, make_cluster: bool) -> Identity:
    """Read the identity, creating what is missing (node id; cluster id if asked)."""
    with env.begin(write=True) as txn:
        raw = txn.get(_KEY, db=db)
        ident = Identity(**json.loads(raw)) if raw else Identity(node=secrets.token_hex(8))
        if make_cluster and ident.cluster is None:
            ident.cluster = secrets.token_hex(8)
        txn.put(_KEY, json.dumps(asdict(ident)).encode(), db=db)
    return ident


def save(env: lmdb.Environment, db: lmdb._Database, ident: Identity) -> None:
    with env.begin(write=True) as txn:
        txn.put(_KEY, json.dumps(asdict(ident)).encode(), db=db)
