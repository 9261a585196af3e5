"""The resync loop in-process: a real journal, a real backing tree, virtual time.

Time is a MockClock that a ticker task moves on by TICK at every scheduling
round, so a step of the sync takes TICK of trio's time (0 to 2 ticks, as
trio runs the two tasks of a round in either order) whatever the load on
the machine: a sync of a few megabytes lasts long enough for its progress
lines to show, and their spacing, rate and ETA can be checked closely.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import closing
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from repl.primary import resync
from repl.primary.capture import Capture
from repl.tree import Tree
from store.journal import Journal

TICK = 0.05
FILES, SIZE = 200, 68 << 10  # a step per file (past SMALL_FILE: not sent whole)
LINE = re.compile(r"initial sync \[(#*) *\] ([\d.]+)/([\d.]+) MB ([\d.]+) MB/s ETA (\d+)s$")


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that moves only when told to (pytest-trio runs the test on it)."""
    return trio.testing.MockClock()


async def ticker(clock: trio.testing.MockClock) -> None:
    """Move time on by TICK at every scheduling round: about one step of the sync each."""
    while True:
        clock.jump(TICK)
        await trio.lowlevel.checkpoint()


class Lines(logging.Handler):
    """Each line logged, with the trio time and the bytes done at that moment."""

    def __init__(self, capture: Capture) -> None:
        super().__init__(logging.INFO)
        self.capture = capture
        self.seen: list[tuple[float, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        done = self.capture.resync.progress_done
        self.seen.append((trio.current_time(), done, record.getMessage()))


async def test_resync_run_ok_progress_rate_and_eta(tmp_path: Path,
                                                   clock: trio.testing.MockClock) -> None:
    backing = tmp_path / "b"
    backing.mkdir()
    for i in range(FILES):
        (backing / f"f{i}").write_bytes(os.urandom(SIZE))
    total = FILES * SIZE
    logger = logging.getLogger("replfs.resync")
    with closing(Journal(tmp_path / "journal")) as journal, closing(Tree(backing)) as tree:
        capture = Capture(journal, tree, secondaries=["beta:7070"])
        set_id = capture.resync.start_full_sync()
        await capture.walk()
        lines = Lines(capture)
        logger.addHandler(lines)
        level = logger.level
        logger.setLevel(logging.INFO)  # not .level =: that keeps isEnabledFor's cached answers
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(capture.resync.run)
                nursery.start_soon(ticker, clock)
                started = trio.current_time()
                # the secondary is at the set before the sync
                capture.caught_up("beta:7070", set_id - 1)
                while journal.set != set_id + 1:  # the sync's set closes (a step a round)
                    await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel()
        finally:
            logger.removeHandler(lines)
            logger.setLevel(level)
        assert journal.set == set_id + 1, "the sync's set closed"
        assert capture.resync.progress_done == total

    assert len(lines.seen) >= 3, lines.seen
    last_at, late = started, 4 * TICK  # the first line counts from a tick or two early
    for at, done, message in lines.seen:
        match = LINE.search(message)
        assert match is not None, message
        bar, shown_done, shown_total, rate, eta = match.groups()
        # A line once PROGRESS_EVERY has passed since the last: no sooner, and no later
        # than the step after (trio runs the two tasks in either order: 0 to 2 ticks).
        assert resync.PROGRESS_EVERY <= at - last_at < resync.PROGRESS_EVERY + late + 1e-9
        assert (float(shown_done), float(shown_total)) == (round(done / 1e6, 1),
                                                         round(total / 1e6, 1))
        assert len(bar) == int(30 * done / total)
        # The rate so far: bytes done over the time since the sync began (a tick or
        # two after `started`), rounded to 0.1 MB/s.
        fastest, slowest = done / (at - started - 2 * TICK), done / (at - started)
        assert slowest / 1e6 - 0.05 <= float(rate) <= fastest / 1e6 + 0.05
        # What is left, at that rate (whole seconds).
        left = (total - done) / 1e6
        assert left / (float(rate) + 0.05) - 0.5 <= int(eta) <= left / (float(rate) - 0.05) + 0.5
        last_at, late = at, 2 * TICK
