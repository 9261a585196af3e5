"""A cluster's keys in etcd, what each holds, and ``replfs cluster status``.

Under ``/replfs/<cluster>/``:

- ``primary``: the node that leads, ``{"node", "generation", "address"}``, bound
  to that node's lease: it vanishes when the lease expires (repl/cluster/election.py
  writes it, with a compare-and-swap);
- ``generation``: the last generation granted, a number (no lease: it only
  grows);
- ``id``: the replfs cluster id every node's stores carry (store/identity.py),
  set once by the first primary;
- ``members/<name>``: every node that ever joined, ``{"address"}``, with no lease:
  the primary replicates to each, up or down, so the journal keeps what a node
  that is down will need (until the budget: repl/primary/retention.py);
- ``nodes/<name>``: each live node, bound to its own lease, as a Member: its
  replication address, role, the generation its data follows, its last complete
  set and last applied set (the primary: its last closed set), and, during an
  election, the round it stands in.

Values are JSON. Nothing else in replfs knows these names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from repl.cluster.etcd import Etcd, EtcdError, KeyValue


def root(cluster: str) -> str:
    return f"/replfs/{cluster}/"


def primary_key(cluster: str) -> str:
    return root(cluster) + "primary"


def generation_key(cluster: str) -> str:
    return root(cluster) + "generation"


def id_key(cluster: str) -> str:
    return root(cluster) + "id"


def nodes_prefix(cluster: str) -> str:
    return root(cluster) + "nodes/"


def node_key(cluster: str, name: str) -> str:
    return nodes_prefix(cluster) + name


def member_key(cluster: str, name: str) -> str:
    return root(cluster) + "members/" + name


@dataclass
class Leader:
    node: str
    generation: int
    address: str
    lease: int = 0  # the lease its key is bound to (not stored in the value)

    def encode(self) -> bytes:
        return json.dumps({"node": self.node, "generation": self.generation,
                           "address": self.address}).encode()

    @classmethod
    def decode(cls, kv: KeyValue) -> Leader:
        value = kv.json()
        return cls(str(value.get("node", "")), _int(value.get("generation")),
                   str(value.get("address", "")), kv.lease)


@dataclass
class Member:
    name: str
    address: str  # where its secondary listens for the primary
    role: str = "starting"  # primary, secondary, candidate, stepping-down, starting
    generation: int = 0  # the generation of the data it holds
    complete: int = 0  # its last set with every set before it whole (applied or staged)
    applied: int = 0  # its last set applied (the primary: its last closed set)
    eligible: bool = True  # it holds a consistent set and can be promoted
    round: int = -1  # the election it stands in (the generation it would replace)
    extra: dict[str, Any] = field(default_factory=dict)  # what status shows besides

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, kv: KeyValue) -> Member:
        value = kv.json()
        name = kv.key.rsplit("/", 1)[-1]
        return cls(name, str(value.get("address", "")), str(value.get("role", "?")),
                   _int(value.get("generation")), _int(value.get("complete")),
                   _int(value.get("applied")), value.get("eligible") is not False,
                   _int(value.get("round"), -1),
                   value["extra"] if isinstance(value.get("extra"), dict) else {})

    def rank(self) -> tuple[int, int, str]:
        """Election order, best first when sorted: the newest lineage, then the most
        sets complete, then the name (smallest first)."""
        return (-self.generation, -self.complete, self.name)


@dataclass
class View:
    """The cluster as read in one go."""

    leader: Leader | None
    members: dict[str, Member]  # the live ones
    registered: dict[str, str]  # every node that joined, with its address
    generation: int  # the last granted
    generation_revision: int  # its key's mod revision (0: never written)
    revision: int  # the store's, when read


async def read(etcd: Etcd, cluster: str) -> View:
    kvs, revision = await etcd.get_prefix(root(cluster))
    leader, generation, gen_rev, members, registered = None, 0, 0, {}, {}
    for kv in kvs:
        if kv.key == primary_key(cluster):
            leader = Leader.decode(kv)
        elif kv.key == generation_key(cluster):
            generation, gen_rev = _int(kv.value.decode(errors="replace")), kv.mod_revision
        elif kv.key.startswith(nodes_prefix(cluster)):
            member = Member.decode(kv)
            members[member.name] = member
        elif kv.key.startswith(root(cluster) + "members/"):
            registered[kv.key.rsplit("/", 1)[-1]] = str(kv.json().get("address", ""))
    return View(leader, members, registered, generation, gen_rev, revision)


def _int(value: object, default: int = 0) -> int:
    try:
        return int(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError):
        return default


def status(view: View, cluster: str) -> dict[str, Any]:
    """What ``replfs cluster status`` shows: the primary, and each member with its lag
    behind the primary's last closed set."""
    head = None
    if view.leader is not None and view.leader.node in view.members:
        head = view.members[view.leader.node].applied
    members = []
    down = [Member(name, address, "down") for name, address in view.registered.items()
            if name not in view.members]
    for member in sorted([*view.members.values(), *down], key=lambda m: m.name):
        entry = asdict(member)
        entry.pop("round")
        entry.pop("extra")
        entry |= member.extra
        entry["lag_sets"] = (max(0, head - member.applied) if head is not None
                             and view.leader is not None and member.role != "down"
                             and member.name != view.leader.node else None)
        members.append(entry)
    return {"cluster": cluster,
            "primary": asdict(view.leader) if view.leader is not None else None,
            "generation": view.generation, "members": members}


def render(out: dict[str, Any]) -> str:
    """``status`` as text: one line for the primary, one per member."""
    leader = out["primary"]
    lines = [f"cluster {out['cluster']}: generation {out['generation']}, primary "
             + (f"{leader['node']} at {leader['address']}" if leader else "none (electing)")]
    for m in out["members"]:
        lag = "" if m["lag_sets"] is None else f", {m['lag_sets']} sets behind"
        lines.append(f"  {m['name']:<12} {m['role']:<13} {m['address']:<21} "
                     f"generation {m['generation']}, applied {m['applied']}, "
                     f"complete {m['complete']}{lag}")
    if not out["members"]:
        lines.append("  no member is registered")
    return "\n".join(lines)


async def show(endpoints: list[str], cluster: str) -> dict[str, Any]:
    """``replfs cluster status``: read the cluster's keys once. Raises EtcdError."""
    etcd = Etcd(endpoints)
    try:
        with trio.move_on_after(10):
            return status(await read(etcd, cluster), cluster)
        raise EtcdError(f"etcd at {', '.join(endpoints)} did not answer within 10s")
    finally:
        await etcd.aclose()
