"""The ``transport`` fixture: each test of tests/repl/scsi runs over iSCSI and over FCIP."""

from __future__ import annotations

import pytest

from tests.repl.scsi.transports import TRANSPORTS, Transport


@pytest.fixture(params=TRANSPORTS, ids=str)
def transport(request: pytest.FixtureRequest) -> Transport:
    return request.param  # type: ignore[no-any-return]
