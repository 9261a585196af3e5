"""The bandwidth cap (--max-rate): a token bucket on the sender."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from repl.pacing import BURST_SECONDS, TokenBucket
from tests.support import primary, secondary, status, until

RATE = 1 << 20  # 1 MiB/s
MEASURE_SECONDS = 5.0


async def test_token_bucket_take_ok_rate_holds(autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket(1000)
    assert bucket.chunk == 100
    started = trio.current_time()
    for _ in range(50):
        await bucket.take(100)
    # The burst goes out at once, the rest at the rate.
    assert trio.current_time() - started == pytest.approx(5000 / 1000 - BURST_SECONDS)
    assert bucket.waited == pytest.approx(4.9)


async def test_token_bucket_take_ok_large_send_runs_into_debt(
        autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket(1000)
    started = trio.current_time()
    await bucket.take(3000)  # never refused, however large; paid for by waiting
    await bucket.take(1)
    assert trio.current_time() - started == pytest.approx(3001 / 1000 - BURST_SECONDS)


def test_token_bucket_err_rate() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0)


def test_sender_max_rate_ok_within_ten_percent(tmp_path: Path) -> None:
    """Over 5 s of a backlog, the bytes on the wire stay within 10 % of the cap, and the
    lag the cap causes shows in status."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}", "--max-rate", "1M"):
        until(lambda: status(mount), lambda st: st["connected"], what="connected")
        with open(mount / "big", "wb") as f:  # incompressible: compression cannot help
            for _ in range(12):
                f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        first = until(lambda: status(mount), lambda st: st["sent_wire_bytes"] > RATE // 2,
                      what="the backlog going out")
        first_at = time.monotonic()
        time.sleep(MEASURE_SECONDS)  # the span measured, not a wait for an event
        last = status(mount)
        rate = (last["sent_wire_bytes"] - first["sent_wire_bytes"]) / (
            time.monotonic() - first_at)
        print(f"max-rate 1M: sent {rate / RATE:.3f} of the cap over {MEASURE_SECONDS:g}s")
        assert abs(rate - RATE) < RATE / 10, f"{rate / RATE:.3f} of the cap"
        assert last["max_rate"] == RATE
        assert last["rate_limited_seconds"] > 3
        assert last["lag_seconds"] > 3 and last["lag_sets"] >= 1
