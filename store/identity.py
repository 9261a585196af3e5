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

_KEY = b"identity"


@dataclass
class Identity:
    node: str
    cluster: str | None = None
    generation: int = 1
    # One entry per promotion: {"generation", "node", "first_set"}.
    history: list[dict[str, Any]] = field(default_factory=list)


def parse(raw: bytes | None, *, make_cluster: bool) -> Identity:
    """The identity stored as *raw*, or a new one; a cluster id is made if asked."""
    ident = Identity(**json.loads(raw)) if raw else Identity(node=secrets.token_hex(8))
    if make_cluster and ident.cluster is None:
        ident.cluster = secrets.token_hex(8)
    return ident


def dumps(ident: Identity) -> bytes:
    return json.dumps(asdict(ident)).encode()


def load(env: lmdb.Environment, db: lmdb._Database, *, make_cluster: bool) -> Identity:
    """Read the identity, creating what is missing (node id; cluster id if asked)."""
    with env.begin(write=True) as txn:
        ident = parse(txn.get(_KEY, db=db), make_cluster=make_cluster)
        txn.put(_KEY, dumps(ident), db=db)
    return ident


def save(env: lmdb.Environment, db: lmdb._Database, ident: Identity) -> None:
    with env.begin(write=True) as txn:
        txn.put(_KEY, dumps(ident), db=db)
