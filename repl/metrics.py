"""Prometheus metrics on ``--metrics HOST:PORT``: what status shows, as series to scrape.

Every name is here (the histograms' in repl/histograms.py, which the code
that observes them imports), and follows Prometheus's conventions:
``replfs_`` first, the base unit last (``_seconds``, ``_bytes``), ``_total``
on counters. Gauges and counters are read at scrape time from the objects
``replfs status`` reads, so the two never disagree; histograms are observed
where their events happen (an fsync in a FUSE request thread, a set closed,
a batch of sets applied; prometheus-client's histograms take a lock).

The endpoint is a small HTTP/1.1 responder run by trio on the daemon's own
thread: a scrape reads the daemon's state between two of its steps, never
in the middle of one. It answers ``GET /metrics`` and nothing else, and
holds no secret: bind it to loopback or a management network.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from repl.config import cannot_bind, parse_address
from repl.errors import UsageError
from repl.version import VERSION
from store.hold import is_held
from store.reserve import disk_free

if TYPE_CHECKING:
    from pathlib import Path

    from repl.primary.capture import Capture
    from repl.primary.semisync import Semisync
    from repl.primary.sender import Sender
    from repl.secondary.applier import Applier
    from repl.secondary.receiver import Receiver
    from store.identity import Identity
    from store.staging import Staging

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what every Prometheus reads
REQUEST_SECONDS = 10.0  # a scraper that has not sent its request by then is dropped
MAX_REQUEST = 8192
FAILED = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n"
          b"Connection: close\r\n\r\n")
log = logging.getLogger("replfs.metrics")


def gauge(name: str, doc: str, value: float, **labels: str) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def counter(name: str, doc: str, value: float, **labels: str) -> Metric:
    """A counter; its sample is *name* + ``_total``."""
    family = CounterMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _info(role: str, ident: Identity) -> Iterator[Metric]:
    yield gauge("replfs_node_info", "This daemon: its role, node, cluster and replfs "
                "version (always 1)", 1, role=role, node=ident.node,
                cluster=ident.cluster or "", version=VERSION)
    yield gauge("replfs_generation", "The cluster generation this node follows or leads",
                ident.generation)


def primary_metrics(capture: Capture, senders: list[Sender],
                    requests: Mapping[str, int], remote: Semisync | None = None
                    ) -> Iterable[Metric]:
    """The primary's gauges and counters, as of now; *requests* are the mount's, by
    handler (fs/counts.py); *remote*, with --fsync remote, where the fsyncs wait for
    the secondaries. The series of a secondary carry its address as the label
    ``secondary``, one sample per secondary."""
    j = capture.journal
    yield from _info("primary", j.identity)
    yield gauge("replfs_last_closed_set", "The last data set closed", j.set - 1)
    yield gauge("replfs_open_set_records", "Records in the data set still open", j.seq)
    yield gauge("replfs_journal_bytes", "Bytes the journal's records take", j.bytes)
    yield gauge("replfs_journal_records", "Records in the journal", j.count())
    yield gauge("replfs_journal_max_bytes", "The journal's budget (--journal-max)",
                capture.journal_max)
    yield gauge("replfs_journal_disk_free_bytes", "Bytes free on the journal's disk",
                j.disk_free())
    yield gauge("replfs_journal_reserve_in_use", "1 while the journal's disk is full: its "
                "reserve in use, fsyncs and new files failing with ENOSPC",
                int(j.reserve_in_use))
    yield gauge("replfs_overflow", "1 while over the journal's budget (a dirty map stands "
                "in for the journal until a resync)", int(capture.overflow))
    yield gauge("replfs_initial_sync", "1 during an initial sync of a secondary",
                int(capture.resync.syncing is not None))
    yield gauge("replfs_resync_done_bytes", "Bytes of the running resync sent so far",
                capture.resync.progress_done if capture.overflow else 0)
    yield gauge("replfs_resync_total_bytes", "Bytes the running resync sends in all",
                capture.resync.progress_total if capture.overflow else 0)
    served = CounterMetricFamily("replfs_fuse_requests", "FUSE requests the primary's mount "
                                 "served, by handler", labels=["op"])
    for op, count in requests.items():
        served.add_metric([op], count)
    yield served
    if remote is not None:
        yield counter("replfs_fsync_local_only", "fsyncs that returned with no secondary's "
                      "staging (--fsync remote, every secondary gone or behind)",
                      remote.local_only)
    if not senders:
        return
    per: list[tuple[str, str, bool, Callable[[Sender], float]]] = [
        ("replfs_secondary_connected", "1 while a session with the secondary is up", False,
         lambda s: int(s.status.connected)),
        ("replfs_secondary_dropped", "1 while the journal goes on without the secondary "
         "(past the budget; it gets what it missed when it is back)", False,
         lambda s: int(capture.retention.is_dropped(s.address))),
        ("replfs_connected_streams", "TCP streams of the replication session", False,
         lambda s: s.status.streams if s.status.connected else 0),
        ("replfs_last_shipped_set", "The data set of the last record sent", False,
         lambda s: s.status.shipped[0]),
        ("replfs_last_applied_set", "The last data set the secondary applied", False,
         lambda s: s.status.applied),
        ("replfs_lag_sets", "Closed data sets the secondary has not applied", False,
         lambda s: j.set - 1 - s.status.applied),
        ("replfs_lag_bytes", "Journal bytes the secondary has not applied", False,
         lambda s: j.bytes_after(s.status.applied)),
        ("replfs_lag_seconds", "How long the oldest closed set the secondary has not "
         "applied has waited", False, lambda s: capture.lag_seconds(s.status.applied)),
        ("replfs_inflight_bytes", "Record bytes sent and not yet staged", False,
         lambda s: s.status.inflight_bytes),
        ("replfs_stalled", "1 while a backlog makes no progress (--stall-seconds)", False,
         lambda s: int(s.status.stalled)),
        ("replfs_sent_bytes", "Record bytes sent, before compression", True,
         lambda s: s.status.sent_bytes),
        ("replfs_sent_wire_bytes", "Bytes of record frames put on the wire, after "
         "compression", True, lambda s: s.status.sent_wire_bytes),
        ("replfs_sessions", "Replication sessions started", True,
         lambda s: s.status.sessions),
        ("replfs_compressing", "1 while records go out zstd-compressed", False,
         lambda s: int(s.status.compressing)),
        ("replfs_max_rate_bytes_per_second", "The cap on bytes a second on the wire "
         "(--max-rate; 0: none)", False, lambda s: s.bucket.rate if s.bucket else 0),
        ("replfs_rate_limited_seconds", "Time the sender waited to stay under --max-rate",
         True, lambda s: s.bucket.waited if s.bucket else 0),
        ("replfs_replication_errors", "Sessions that failed or were refused", True,
         lambda s: s.status.error_count),
    ]
    if remote is not None:
        per.append(("replfs_fsync_remote_in_step", "1 while fsyncs wait for the secondary to "
                    "stage (--fsync remote) or receive (received) their set", False,
                    lambda s: int(s.semisync is not None and s.semisync.in_step)))
    for name, doc, is_counter, value in per:
        family: GaugeMetricFamily | CounterMetricFamily = (
            CounterMetricFamily(name, doc, labels=["secondary"]) if is_counter
            else GaugeMetricFamily(name, doc, labels=["secondary"]))
        for sender in senders:
            family.add_metric([sender.address], value(sender))
        yield family


def secondary_metrics(receiver: Receiver, applier: Applier, staging: Staging,
                      replica: Path) -> Iterable[Metric]:
    """The secondary's gauges and counters, as of now."""
    r = receiver.status
    yield from _info("secondary", staging.identity)
    yield gauge("replfs_connected_streams", "TCP streams from the primary",
                r.connected_streams)
    yield gauge("replfs_last_staged_set", "The data set of the last record staged",
                r.last_staged[0])
    yield gauge("replfs_last_complete_set", "The last data set staged whole",
                r.last_complete)
    yield gauge("replfs_last_applied_set", "The last data set applied to the replica",
                applier.applied)
    yield gauge("replfs_sets_in_staging", "Data sets in staging, whole or not",
                len(staging.sets()))
    yield gauge("replfs_staging_bytes", "Bytes the staging store takes", staging.size())
    yield gauge("replfs_staging_disk_free_bytes", "Bytes free on the staging store's disk",
                disk_free(staging.path))
    yield gauge("replfs_replica_disk_free_bytes", "Bytes free on the replica's disk",
                disk_free(replica))
    yield gauge("replfs_staging_failing", "1 while staging what arrives fails and is retried "
                "(a full disk, most often): nothing more is read meanwhile",
                int(r.staging_error is not None))
    yield gauge("replfs_held", "1 while the replica is paused (replfs pause)",
                int(is_held(staging.path)))
    yield gauge("replfs_initial_sync", "1 while the replica is rebuilt by an initial sync",
                int(staging.syncing is not None))
    yield gauge("replfs_apply_failing", "1 while applying a set fails and is retried",
                int(applier.error is not None))
    yield gauge("replfs_handshakes_in_progress", "Connections in their handshake",
                receiver.gate.in_progress)
    yield counter("replfs_received_records", "Records received", r.received)
    yield counter("replfs_received_bytes", "Record bytes received, after decompression",
                  r.received_bytes)
    yield counter("replfs_received_wire_bytes", "Bytes of record frames taken off the wire",
                  r.received_wire_bytes)
    yield counter("replfs_duplicate_records", "Records received again and dropped",
                  r.duplicates)
    yield counter("replfs_stale_records", "Records of sets already applied, dropped",
                  r.stale)
    yield counter("replfs_bad_frames", "Frames or records that failed their checks (the "
                  "stream was dropped)", r.bad_frames)
    refused = CounterMetricFamily("replfs_refused_connections",
                                  "Connections refused, by reason", labels=["reason"])
    for reason, n in sorted(r.refused_by.items()):
        refused.add_metric([reason], n)
    yield refused


class _Collector:
    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return list(self.families())


def registry(families: Callable[[], Iterable[Metric]], *histograms: Histogram
             ) -> CollectorRegistry:
    """A registry of *families* (read at each scrape), *histograms* and the process's
    own (CPU, memory, open files)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(families))
    for histogram in histograms:
        reg.register(histogram)
    ProcessCollector(registry=reg)
    return reg


async def listen(text: str) -> list[trio.SocketListener]:
    """Bind the metrics address HOST:PORT. Raises UsageError if it cannot be bound."""
    host, port = parse_address(text)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise UsageError(f"--metrics: {cannot_bind(text, exc)}") from None


def where(listeners: list[trio.SocketListener]) -> str:
    """HOST:PORT the first of *listeners* is bound to (the port chosen, for port 0)."""
    host, port = listeners[0].socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(listeners: list[trio.SocketListener], reg: CollectorRegistry, *,
                task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
                ) -> None:
    """Answer ``GET /metrics`` on *listeners* until cancelled; each connection gets one
    answer and is closed: a 500, logged with its traceback, if reading a series failed."""
    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await _answer(stream, reg)
            except trio.BrokenResourceError:
                pass  # the scraper went away
            except Exception:  # a failure of ours (a disk's statvfs): the scrape fails, not
                log.exception("answering a scrape failed")  # the daemon and its mount
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(FAILED)

    await trio.serve_listeners(answer, listeners, task_status=task_status)


async def _answer(stream: trio.SocketStream, reg: CollectorRegistry) -> None:
    with trio.move_on_after(REQUEST_SECONDS):
        head = b""
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            chunk = await stream.receive_some(MAX_REQUEST)
            if not chunk or len(head) > MAX_REQUEST:
                return
            head += chunk
        words = head.split(b"\r\n", 1)[0].split()
        path = words[1].split(b"?")[0] if len(words) >= 2 else b""
        if words[:1] == [b"GET"] and path == b"/metrics":
            code, kind, body = "200 OK", CONTENT_TYPE, generate_latest(reg)
        else:
            code, kind, body = ("404 Not Found", "text/plain; charset=utf-8",
                                b"replfs serves GET /metrics only\n")
        await stream.send_all(
            f"HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: "
            f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
