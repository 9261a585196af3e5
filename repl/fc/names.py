"""FCIP addresses and the names of replfs's FC ports: ``fcip://HOST[:PORT]``, WWNs.

A port's world wide names are made from its node's replfs identity, so they
stay the same across restarts: NAA 3 ("locally assigned", FC-FS-3 section
19.3) with a role nibble and 56 bits of the node's hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from repl.errors import UsageError
from repl.fc.fcip import PORT

SCHEME = "fcip://"
FABRIC, NODE, PORT_NAME, F_PORT = 1, 2, 3, 4  # the roles a node's names are for
# The addresses the secondary's fabric gives out (domain 1): its target at area 1,
# each logged-in initiator at area 2, port 1 to 254 in turn.
TARGET_ID = 0x010100
INITIATORS = 0x010200


def is_fcip(address: str) -> bool:
    return address.startswith(SCHEME)


def parse_url(url: str) -> tuple[str, int]:
    """(host, port) of ``fcip://HOST[:PORT]`` (3225 if no port); else UsageError."""
    where = url.removeprefix(SCHEME).rstrip("/")
    host, sep, port = where.rpartition(":")
    if not sep or host.endswith(":"):  # no port, or an IPv6 address without brackets
        host, port = where, str(PORT)
    if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{url!r} is not fcip://HOST:PORT")
    return host.strip("[]"), int(port)


def wwn(node: str, role: int) -> int:
    """The WWN of *node*'s *role* (FABRIC, NODE, PORT_NAME or F_PORT)."""
    return 0x3 << 60 | role << 56 | xxhash.xxh64_intdigest(node.encode()) & ((1 << 56) - 1)


@dataclass(frozen=True)
class Names:
    """The WWNs of a node's FC entity: its fabric's (the FCIP entity's), its node's,
    its port's."""

    fabric: int
    node: int
    port: int

    @classmethod
    def of(cls, node: str) -> Names:
        return cls(wwn(node, FABRIC), wwn(node, NODE), wwn(node, PORT_NAME))


def show(name: int) -> str:
    """A WWN as FC tools print it: 30:12:ab:..."""
    return ":".join(f"{b:02x}" for b in name.to_bytes(8, "big"))


def show_id(port_id: int) -> str:
    """An N_Port ID as FC tools print it: 01.02.01"""
    return ".".join(f"{b:02x}" for b in port_id.to_bytes(3, "big"))
