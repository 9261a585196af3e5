"""iSCSI names and addresses: ``iscsi://HOST[:PORT]/IQN`` (RFC 7143 sections 4.2.7, 13.2)."""

from __future__ import annotations

import re

from repl.errors import UsageError

SCHEME = "iscsi://"
DEFAULT_PORT = 3260
DEFAULT_IQN = "iqn.2025-01.io.replfs:replica"
_IQN = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[^\s/]+)?|eui\.[0-9A-Fa-f]{16})$")


def is_iscsi(address: str) -> bool:
    return address.startswith(SCHEME)


def check_iqn(name: str) -> str:
    """*name* if it is an iqn. or eui. name; else UsageError."""
    if not _IQN.match(name):
        raise UsageError(f"{name!r} is not an iSCSI name (for example {DEFAULT_IQN})")
    return name


def parse_url(url: str) -> tuple[str, int, str]:
    """(host, port, target IQN) of ``iscsi://HOST[:PORT]/IQN``; else UsageError."""
    where, _, iqn = url.removeprefix(SCHEME).partition("/")
    host, sep, port = where.rpartition(":")
    if not sep:
        host, port = where, str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or not iqn:
        raise UsageError(f"{url!r} is not iscsi://HOST:PORT/IQN")
    return host.strip("[]"), int(port), check_iqn(iqn)
