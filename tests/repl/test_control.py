"""The control socket: one JSON request, one JSON answer, whatever the handler does."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from repl import control


async def test_control_err_handler_fails_answers_and_serves_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A handler that raises (a bug, an OSError of the disk) gets its request an error
    answer, logged with the traceback, and the daemon serves the next request: serve()
    itself goes on, where trio would let the exception end it, and the daemon with it."""
    path = tmp_path / "control" / "c.sock"

    async def status(_: dict[str, Any]) -> dict[str, Any]:
        raise OSError(5, "Input/output error")

    async def checkpoint(_: dict[str, Any]) -> dict[str, Any]:
        return {"set": 7}

    with caplog.at_level(logging.ERROR, logger="replfs.control"):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, path,
                                {"status": status, "checkpoint": checkpoint})
            reply = await control.ask(path, "status")
            assert reply == {"error": "the daemon failed to answer status: "
                                      "OSError(5, 'Input/output error') (see its log)"}
            assert await control.ask(path, "checkpoint") == {"set": 7}
            nursery.cancel_scope.cancel()
    assert "the status request failed" in caplog.text
    assert "Traceback" in caplog.text
