"""``bin/bench``'s lag figures: how long a closed set waits for the secondary to
apply it, under two kinds of application.

- ``steady``: a writer that makes a 64 KiB file about every 10 ms and never
  fsyncs, and a ``checkpoint --wait`` every 0.2 s: the round trips from a
  set's close to its apply, and the primary's ``lag_seconds`` every 0.1 s.
- ``fsyncs``: an application that appends 4 KiB and fsyncs at random moments,
  FSYNC_RATE times a second on average (a Poisson process, seeded: the same
  moments every run), each fsync closing a set; the primary's
  ``lag_seconds`` every 10 ms: its mean, its p99 and the share of the
  samples in which a set was waiting. Sets that come alone at such a rate
  should not wait for the pace of the secondary's batches.
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench_workloads import MB, now, percentile

FSYNC_RATE = 15.0
Say = Callable[[str], None]


def steady(mount: Path, seconds: float, checkpoint: Callable[[Path, float], int],
           lag: Callable[[], float], say: Say) -> dict[str, float]:
    """Checkpoint round trips (close -> applied on the secondary) under a steady writer."""
    stop = threading.Event()
    failed: list[BaseException] = []
    samples: list[float] = []
    files: list[int] = []
    d = Path(tempfile.mkdtemp(prefix="lag.", dir=mount))

    def writer() -> None:  # a 64 KiB file about every 10 ms; close hands it to the daemon
        chunk = os.urandom(64 << 10)
        try:
            while not stop.wait(0.008):
                (d / f"w{len(files):06}").write_bytes(chunk)
                files.append(len(chunk))
        except OSError as exc:
            failed.append(exc)

    def sampler() -> None:
        while not stop.wait(0.1):
            with contextlib.suppress(OSError):
                samples.append(lag())

    threads = [threading.Thread(target=writer, daemon=True),
               threading.Thread(target=sampler, daemon=True)]
    for t in threads:
        t.start()
    trips: list[float] = []
    start = now()
    deadline = start + seconds
    try:
        time.sleep(0.5)
        while now() < deadline and not failed:
            before = now()
            checkpoint(mount, 60)
            trips.append(now() - before)
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    load = sum(files) / MB / (now() - start)
    if failed:
        raise failed[0]
    figures = {
        "lag_p50_ms": percentile(trips, 50) * 1e3, "lag_p99_ms": percentile(trips, 99) * 1e3,
        "lag_round_trips": len(trips), "lag_load_MBps": load,
        "status_lag_p50_ms": percentile(samples, 50) * 1e3 if samples else 0.0,
        "status_lag_p99_ms": percentile(samples, 99) * 1e3 if samples else 0.0,
    }
    say(f"  lag: {len(trips)} checkpoint round trips, p50 {figures['lag_p50_ms']:.0f} ms, "
        f"p99 {figures['lag_p99_ms']:.0f} ms")
    return figures


def fsyncs(mount: Path, seconds: float, lag: Callable[[], float], say: Say
           ) -> dict[str, float]:
    """The primary's lag while an application fsyncs FSYNC_RATE times a second."""
    stop = threading.Event()
    failed: list[BaseException] = []
    done: list[int] = []
    path = Path(tempfile.mkdtemp(prefix="fsyncs.", dir=mount)) / "log"

    def application() -> None:
        moments, block = random.Random(7), os.urandom(4096)
        try:
            with open(path, "ab") as f:
                while not stop.wait(moments.expovariate(FSYNC_RATE)):
                    f.write(block)
                    f.flush()
                    os.fsync(f.fileno())
                    done.append(1)
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=application, daemon=True)
    thread.start()
    samples: list[float] = []
    deadline = now() + seconds
    try:
        while now() < deadline and not failed:
            samples.append(lag() * 1e3)
            time.sleep(0.01)  # the sampling period, not a wait for an event
    finally:
        stop.set()
        thread.join(30)
    if failed:
        raise failed[0]
    figures = {
        "fsync_lag_mean_ms": statistics.mean(samples),
        "fsync_lag_p99_ms": percentile(samples, 99),
        "fsync_lag_waiting": sum(s > 0 for s in samples) / len(samples),
    }
    say(f"  lag under {FSYNC_RATE:.0f} fsyncs/s ({len(done)} in {seconds:.0f}s): mean "
        f"{figures['fsync_lag_mean_ms']:.1f} ms, p99 {figures['fsync_lag_p99_ms']:.0f} ms, "
        f"a set waiting {figures['fsync_lag_waiting']:.0%} of the time")
    return figures
