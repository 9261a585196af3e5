"""A failure that repeats at each retry is logged once a minute, with its count."""

from __future__ import annotations

import logging

import pytest

from repl import errors
from repl.errors import Repeats


def test_repeats_ok_same_failure_logged_once_until_quiet_time_passes(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    log = logging.getLogger("replfs.test")
    repeats = Repeats(log)
    with caplog.at_level(logging.WARNING, "replfs.test"):
        for _ in range(5):
            repeats.warning("link down")
        repeats.warning("refused")
        repeats.warning("refused")
        repeats.clear()  # it worked meanwhile: the next failure is news
        repeats.warning("refused")
        monkeypatch.setattr(errors, "REPEAT_LOG_SECONDS", 0.0)
        repeats.warning("refused")
        repeats.warning("refused")
    assert [r.getMessage() for r in caplog.records] == [
        "link down", "refused", "refused",
        "refused", "refused"]
    caplog.clear()
    monkeypatch.setattr(errors, "REPEAT_LOG_SECONDS", 60.0)
    with caplog.at_level(logging.WARNING, "replfs.test"):
        repeats.warning("refused")  # within the minute: counted
        repeats.warning("refused")
        monkeypatch.setattr(errors, "REPEAT_LOG_SECONDS", 0.0)
        repeats.warning("refused")
    assert [r.getMessage() for r in caplog.records] == [
        "refused (again, 2 times since it was last logged)"]
