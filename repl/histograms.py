"""The histograms, observed where their events happen (repl/metrics.py serves them).

A module of their own, below everything that observes them, so that the
capture, the applier and the FUSE handlers need not import the metrics
endpoint, which reads their objects.
"""

from __future__ import annotations

from prometheus_client import Histogram

FSYNC_SECONDS = Histogram(
    "replfs_fsync_seconds", "Time an fsync on the primary's mount took: the set closed, "
    "the file and the journal on disk", registry=None,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
SET_BYTES = Histogram(
    "replfs_set_size_bytes", "Bytes of records in each data set the primary closed",
    registry=None, buckets=tuple(float(4 ** n << 10) for n in range(9)))  # 1K .. 64M
APPLY_SECONDS = Histogram(
    "replfs_set_apply_seconds", "Time the secondary took to apply a batch of complete "
    "sets (one set when it keeps up) and sync the replica", registry=None,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
