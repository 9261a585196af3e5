"""The primary's end of an iSCSI link: a session per stream (see repl/scsi/link.py for
how frames become SCSI commands)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from repl.iscsi import chap
from repl.iscsi.initiator import open_session
from repl.iscsi.names import parse_url
from repl.link import Link
from repl.scsi.link import InitiatorLink


class IscsiDialer:
    """Opens iSCSI sessions to ``iscsi://HOST:PORT/IQN`` with mutual CHAP."""

    def __init__(self, url: str, secrets_: chap.Secrets, node: str) -> None:
        self.host, self.port, self.iqn = parse_url(url)
        self.address = url
        self.secrets = secrets_
        self.initiator_iqn = f"iqn.2025-01.io.replfs:primary.{node}"

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Link]:
        async with open_session(self.host, self.port, self.secrets, self.initiator_iqn,
                                self.iqn) as initiator, trio.open_nursery() as nursery:
            yield InitiatorLink(initiator, nursery)
            nursery.cancel_scope.cancel()
