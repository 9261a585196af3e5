"""Requests served by the mount's handlers, counted by handler name.

Each request thread counts into a Counter of its own, so counting takes no lock
on the request path; ``snapshot()`` adds them up (status, metrics, bin/bench's
requests per op).
"""

from __future__ import annotations

import threading
from collections import Counter


class RequestCounts:
    def __init__(self) -> None:
        self._mine = threading.local()
        self._every: list[Counter[str]] = []
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        """Count one request served by handler *name*, in this thread's counter."""
        counts: Counter[str] | None = getattr(self._mine, "counts", None)
        if counts is None:
            counts = self._mine.counts = Counter()
            with self._lock:
                self._every.append(counts)
        counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        """Requests served so far, by handler name."""
        total: Counter[str] = Counter()
        with self._lock:
            every = list(self._every)
        for counts in every:
            total.update(dict(counts))  # dict() copies in one step, under the GIL
        return dict(sorted(total.items()))
