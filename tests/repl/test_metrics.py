"""Prometheus metrics scraped from a live pair: known values, units, and every series the
shipped Grafana dashboard and alert rules use."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from repl import metrics
from repl.metrics import gauge
from repl.secondary.run import pause, resume
from repl.version import VERSION
from tests.support import (
    ROOT,
    Daemon,
    checkpoint,
    free_port,
    primary,
    replfs,
    secondary,
    status,
    until,
)
from tests.test_cli import assert_one_line_error

DASHBOARD = ROOT / "docs" / "grafana" / "replfs.json"
ALERTS = ROOT / "docs" / "prometheus" / "replfs-alerts.yml"
METRICS = ["--metrics", "127.0.0.1:0"]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_url(daemon: Daemon) -> str:
    daemon.wait_for("metrics on http://")
    return daemon.log().split("metrics on ")[-1].split()[0]


def scrape(url: str) -> Samples:
    """Every sample at *url*, by (name, labels)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str) -> float:
    """The one sample called *name*, whatever its labels."""
    found = [v for (n, _), v in samples.items() if n == name]
    assert len(found) == 1, (name, found)
    return found[0]


def used_by_docs() -> set[str]:
    """Every replfs series the dashboard's queries and the alert rules' expressions name."""
    exprs = [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
             for target in panel["targets"]]
    exprs += re.findall(r"^\s*expr:\s*(.+)$", ALERTS.read_text(), re.MULTILINE)
    names = {name for expr in exprs for name in re.findall(r"\breplfs_\w+", expr)}
    assert len(names) > 20, names
    return names


def test_metrics_scrape_ok_live_pair_with_known_lag(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    # Sets close only at an fsync or a checkpoint, never on the timer: under load a
    # file's pages written back after its checkpoint would close a fourth set.
    with secondary(replica, *METRICS) as sec, primary(
            backing, mount, "--secondary", f"127.0.0.1:{sec.port}", "--set-interval", "3600",
            *METRICS) as pri:
        pri_url, sec_url = metrics_url(pri), metrics_url(sec)
        with open(mount / "a", "wb") as f:
            f.write(os.urandom(100_000))
            os.fsync(f.fileno())
        held = checkpoint(mount)
        pause(replica, None)

        # Three sets closed that the paused replica does not apply: a known lag.
        before = time.monotonic()
        for n in range(3):
            (mount / f"f{n}").write_bytes(b"x" * 1000)
            last = checkpoint(mount, wait=0)
            if n == 0:
                after_first = time.monotonic()
        until(lambda: status(replica), lambda st: st["last_complete"] == last,
              what="the three sets staged whole")
        p, s = scrape(pri_url), scrape(sec_url)
        scraped_at = time.monotonic()
        st = status(mount)

        assert value(p, "replfs_lag_sets") == last - held == 3
        # Which code each daemon runs, for after an upgrade: in status and in metrics.
        for scraped, st_ in ((p, st), (s, status(replica))):
            info = [dict(labels) for name, labels in scraped if name == "replfs_node_info"]
            assert [i["version"] for i in info] == [VERSION] == [st_["version"]]
        assert value(p, "replfs_last_closed_set") == last == st["last_closed_set"]
        assert value(p, "replfs_last_applied_set") == held
        assert value(p, "replfs_journal_bytes") == st["journal_bytes"] > 3000
        assert value(p, "replfs_journal_disk_free_bytes") > 0
        assert value(p, "replfs_journal_reserve_in_use") == 0 == st["journal_reserve_in_use"]
        assert value(p, "replfs_lag_bytes") == st["journal_bytes"]
        assert value(p, "replfs_journal_records") >= 6  # three writes and three SYNCs
        assert value(p, "replfs_secondary_connected") == 1
        assert value(p, "replfs_connected_streams") == 4
        # Seconds, not milliseconds: the first unapplied set closed between two clocks.
        lag = value(p, "replfs_lag_seconds")
        assert scraped_at - after_first - 0.5 <= lag <= time.monotonic() - before + 0.5, lag
        # The fsync was timed in seconds; the sets were measured in bytes.
        assert value(p, "replfs_fsync_seconds_count") >= 1
        assert 0 < value(p, "replfs_fsync_seconds_sum") < 10
        assert value(p, "replfs_set_size_bytes_sum") >= 103_000
        assert value(p, "replfs_sent_bytes_total") >= 103_000
        assert value(p, "replfs_sent_wire_bytes_total") > 0

        assert value(s, "replfs_last_applied_set") == held
        assert value(s, "replfs_last_complete_set") == last
        assert value(s, "replfs_held") == 1
        assert value(s, "replfs_staging_failing") == 0
        sst = status(replica)
        for name, key in (("replfs_staging_disk_free_bytes", "staging_disk_free"),
                          ("replfs_replica_disk_free_bytes", "replica_disk_free")):
            # The same disk, read twice by the daemon and once here: a few writes apart.
            assert abs(value(s, name) - sst[key]) < 64 << 20, (name, value(s, name), sst)
            assert abs(sst[key] - shutil.disk_usage(replica).free) < 64 << 20
        assert value(s, "replfs_received_bytes_total") >= 103_000
        assert value(s, "replfs_set_apply_seconds_count") >= 1

        # A stranger at the secondary's door is refused, and counted by reason.
        with socket.create_connection(("127.0.0.1", sec.port)) as stranger:
            stranger.sendall(b"GET / HTTP/1.0\r\n\r\n")
            stranger.recv(100)
        until(lambda: status(replica)["refused"], lambda n: n >= 1, what="a refusal")
        s = scrape(sec_url)
        refused = {labels: v for (n, labels), v in s.items()
                   if n == "replfs_refused_connections_total"}
        assert sum(refused.values()) >= 1 and all(dict(k)["reason"] for k in refused)

        resume(replica, None)
        until(lambda: scrape(pri_url), lambda m: value(m, "replfs_lag_sets") == 0,
              what="no lag once resumed")
        assert value(scrape(pri_url), "replfs_lag_seconds") == 0

        # Every series the dashboard and the alert rules use is served.
        served = {name for name, _ in p} | {name for name, _ in s}
        missing = used_by_docs() - served
        assert not missing, f"the docs use series no daemon serves: {sorted(missing)}"

        try:
            urllib.request.urlopen(pri_url.replace("/metrics", "/"), timeout=10)
            raise AssertionError("/ answered")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404


def test_requests_counted_by_handler_in_status_and_metrics(tmp_path: Path) -> None:
    """Every request the mount serves is counted by its handler (fs/counts.py), the
    same in status and in the scrape: what bin/bench divides by ops."""
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    with primary(backing, mount, *METRICS) as pri:
        url = metrics_url(pri)
        before = status(mount)["requests"]
        for n in range(5):
            fd = os.open(mount / f"f{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.pwrite(fd, b"x" * 4096, 0)
            os.fsync(fd)
            os.close(fd)
        # The kernel sends RELEASE after close(2) has returned: wait for the last one.
        after = until(lambda: status(mount)["requests"],
                      lambda now: now.get("release", 0) - before.get("release", 0) >= 5,
                      timeout=10, what="the five releases counted")
        served = {dict(labels)["op"]: v for (n, labels), v in scrape(url).items()
                  if n == "replfs_fuse_requests_total"}
    grown = {op: after[op] - before.get(op, 0) for op in after}
    assert grown["create"] == 5 and grown["fsync"] == 5 and grown["release"] == 5
    assert grown["write"] >= 5  # the kernel may split a page's writeback, never join files
    assert set(served) == set(after) and all(served[op] >= after[op] for op in after)


def test_metrics_listen_err_port_busy(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    mount.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port()))
        busy.listen()
        port = busy.getsockname()[1]
        result = replfs("secondary", replica, "--listen", "127.0.0.1:0", "--insecure",
                        "--metrics", f"127.0.0.1:{port}")
        assert_one_line_error(result, f"--metrics: cannot listen on 127.0.0.1:{port}",
                              "in use")
        result = replfs("primary", backing, mount, "--metrics", f"127.0.0.1:{port}")
        assert_one_line_error(result, f"--metrics: cannot listen on 127.0.0.1:{port}")
        result = replfs("primary", backing, mount, "--metrics", "nosuchhost.invalid:9100")
        assert_one_line_error(result, "cannot listen on nosuchhost.invalid:9100: no such host")
        assert not os.path.ismount(mount)


class _StatvfsFailsOnce:
    """A collector whose disk's statvfs fails the first time it is read."""

    def __init__(self) -> None:
        self.failed = False

    def collect(self) -> Iterator[Metric]:
        if not self.failed:
            self.failed = True
            raise OSError(5, "Input/output error")
        yield gauge("replfs_journal_disk_free_bytes", "Bytes free", 4096)


async def test_metrics_scrape_err_series_fails_the_scrape_not_the_daemon(
        caplog: pytest.LogCaptureFixture) -> None:
    """Reading a series raised: that scrape gets a 500 (logged with the traceback), and
    the next one is served; trio would have let the exception end the daemon."""
    reg = CollectorRegistry()
    reg.register(_StatvfsFailsOnce())
    with caplog.at_level(logging.ERROR, logger="replfs.metrics"):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(metrics.serve, await metrics.listen("127.0.0.1:0"),
                                            reg)
            url = f"http://{metrics.where(listeners)}/metrics"

            def get() -> tuple[int, bytes]:
                try:
                    with urllib.request.urlopen(url, timeout=10) as reply:
                        return reply.status, reply.read()
                except urllib.error.HTTPError as exc:
                    return exc.code, b""

            assert (await trio.to_thread.run_sync(get))[0] == 500
            code, body = await trio.to_thread.run_sync(get)
            assert code == 200 and b"replfs_journal_disk_free_bytes 4096.0" in body
            nursery.cancel_scope.cancel()
    assert "answering a scrape failed" in caplog.text and "OSError" in caplog.text
