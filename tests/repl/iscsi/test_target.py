"""The iSCSI target and initiator against each other, in one process over loopback TCP:
what only iSCSI has (the target's name). What the FCP target passes too is in
tests/repl/scsi/test_target.py.
"""

from __future__ import annotations

import pytest

from repl.iscsi import login
from repl.iscsi.initiator import open_session
from tests.repl.scsi.transports import ISCSI, KEYS, idle


async def test_login_err_unknown_target() -> None:
    async with ISCSI.serving(idle) as port:
        with pytest.raises(login.LoginFailed, match="02/03"):
            async with open_session("127.0.0.1", port, KEYS, "iqn.2025-01.io.x:y",
                                    "iqn.2025-01.io.replfs:other"):
                pass
