"""The primary's end of an FCIP link: an FCP session per stream (see repl/scsi/link.py
for how frames become SCSI commands)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from repl.fc.initiator import open_session
from repl.fc.names import Names, parse_url
from repl.iscsi.chap import Secrets
from repl.link import Link
from repl.scsi.link import InitiatorLink


class FcipDialer:
    """Opens FCP sessions over FCIP to ``fcip://HOST:PORT``, authenticated with DH-CHAP.

    The first connection learns the secondary's fabric WWN from its special
    frame; the next ones name it.
    """

    def __init__(self, url: str, keys: Secrets, node: str) -> None:
        self.host, self.port = parse_url(url)
        self.address = url
        self.keys = keys
        self.names = Names.of(node)
        self.fabric = 0

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Link]:
        async with open_session(self.host, self.port, self.keys, self.names,
                                self.fabric) as initiator, trio.open_nursery() as nursery:
            self.fabric = initiator.session.fabric
            yield InitiatorLink(initiator, nursery)
            nursery.cancel_scope.cancel()
