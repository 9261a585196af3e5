"""``bin/bench``: what replfs costs, workload by workload, against the native filesystem.

Every workload runs on four targets, in one temporary directory on one
disk: a native directory, a replfs primary mount with no secondary, a
primary mount replicating to a live secondary on loopback, and one with
``--fsync remote`` replicating to a secondary of its own (an fsync waits
for the secondary's staging). The full run goes round the targets three
times, interleaved, and reports the median of each figure, with the range
of the rounds under it: this machine's disk and CPU move by 2-3x from
minute to minute. The table gives each figure and the ratio
replicated/native (native/replicated for latencies). Then, with the
secondary: lag from a set's close to its apply (``checkpoint --wait``
round trips under a steady writer), the catch-up
rate after an outage, peak memory of both daemons, and journal bytes per
application byte. Last, the standby's reads (bin/bench_reads.py): the
secondary's cached standby mount against the replica directory, idle and
while sets arrive.

Timed workloads run for a fixed time and count what they did; the file
writers write a fixed volume (``--quick``: smaller volumes, shorter times,
a directory of 2,000 entries instead of 10,000). MB is 10^6 bytes. The replicating primary
runs with ``--journal-max 4G`` so the outage stays in the journal and the
catch-up measures journal streaming, not a resync.

``--only fsync4k,sqlite_commits`` runs just those workloads (and skips the
replication figures and the standby's reads); ``--rounds N`` sets how many
times round the targets.

Everything is removed afterwards, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_reads
from demo import Proc, links

from repl import control
from store import libc

HERE = Path(__file__).resolve().parent
REPLFS = [sys.executable, str(HERE / "replfs.py")]
MiB = 1 << 20
MB = 1e6
JOURNAL_MAX = "4G"
TARGETS = ("native", "replfs", "replfs_replicated", "replfs_remote")


READS = bench_reads.ReadPlan(big=256 * MiB, seconds=2.0, rounds=3)


@dataclass(frozen=True)
class Plan:
    seq_bytes: int  # seq_write volume
    rand_file: int  # rand4k_write file size
    seconds: float  # each timed workload
    lag_seconds: float  # checkpoint round trips under load
    outage_bytes: int  # written while the secondary is down
    stat_files: int = 2_000
    dir_entries: int = 10_000
    rounds: int = 3  # each figure is the median of this many runs
    reads: bench_reads.ReadPlan = READS


FULL = Plan(seq_bytes=512 * MiB, rand_file=256 * MiB, seconds=5.0, lag_seconds=20.0,
            outage_bytes=1024 * MiB)
QUICK = Plan(seq_bytes=64 * MiB, rand_file=32 * MiB, seconds=0.5, lag_seconds=3.0,
             outage_bytes=128 * MiB, dir_entries=2_000, rounds=1,
             reads=bench_reads.ReadPlan(big=32 * MiB, seconds=0.5, rounds=1))


@dataclass
class Result:
    value: float
    extra: dict[str, float] = field(default_factory=dict)
    ops: int = 0  # the application's calls that did the work: a write(2), a file, a commit


def now() -> float:
    return time.perf_counter()


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def syncfs(path: Path) -> None:
    """Write back everything dirty on the filesystem holding *path*."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc.syncfs(fd)
    finally:
        os.close(fd)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def write_file(path: Path, size: int, fsync: bool = True) -> None:
    chunk = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // MiB):
            os.write(fd, chunk)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def entries(root: Path, count: int) -> list[str]:
    """A directory of *count* empty files, made once per target: stat and readdir share it."""
    directory = root / "entries"
    paths = [f"{directory}/e{i:06}" for i in range(count)]
    if not directory.exists():
        directory.mkdir()
        for path in paths:
            os.mknod(path, stat.S_IFREG | 0o644)
    return paths


# --- workloads: each works in its own fresh directory --------------------------------

def seq_write(d: Path, plan: Plan) -> Result:
    start = now()
    write_file(d / "seq", plan.seq_bytes)
    return Result(plan.seq_bytes / MB / (now() - start), ops=plan.seq_bytes // MiB)


def rand4k_write(d: Path, plan: Plan) -> Result:
    path = d / "rand"
    write_file(path, plan.rand_file)  # prefilled and fsynced, not timed
    rng = random.Random(4096)
    blocks = plan.rand_file // 4096
    block = os.urandom(4096)
    done = 0
    start = now()
    deadline = start + plan.seconds
    fd = os.open(path, os.O_WRONLY)
    try:
        while now() < deadline:
            for _ in range(256):
                os.pwrite(fd, block, rng.randrange(blocks) * 4096)
            done += 256
    finally:
        os.close(fd)  # a FUSE close writes back the cached pages: part of the cost
    return Result(done * 4096 / MB / (now() - start), ops=done)


def fsync4k(d: Path, plan: Plan) -> Result:
    block = os.urandom(4096)
    latencies: list[float] = []
    fd = os.open(d / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start = now()
    deadline = start + plan.seconds
    try:
        while now() < deadline:
            os.write(fd, block)
            before = now()
            os.fsync(fd)
            latencies.append(now() - before)
    finally:
        os.close(fd)
    elapsed = now() - start
    return Result(len(latencies) * 4096 / MB / elapsed,
                  {"p50_us": percentile(latencies, 50) * 1e6,
                   "p99_us": percentile(latencies, 99) * 1e6}, ops=len(latencies))


def small_files(d: Path, plan: Plan) -> Result:
    block = os.urandom(4096)
    count = 0
    start = now()
    deadline = start + plan.seconds
    while now() < deadline:
        for _ in range(32):
            fd = os.open(f"{d}/f{count:07}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, block)
            os.close(fd)
            count += 1
    return Result(count / (now() - start), ops=count)


def stat_files(d: Path, plan: Plan) -> Result:
    paths = entries(d.parent, plan.dir_entries)[: plan.stat_files]
    count = 0
    start = now()
    deadline = start + plan.seconds
    while now() < deadline:
        for path in paths:
            os.stat(path)
        count += len(paths)
    return Result(count / (now() - start), ops=count)


def readdir(d: Path, plan: Plan) -> Result:
    directory = Path(entries(d.parent, plan.dir_entries)[0]).parent
    count = 0
    start = now()
    deadline = start + plan.seconds
    while now() < deadline:
        if len(os.listdir(directory)) != plan.dir_entries:
            raise RuntimeError(f"readdir of {directory} lost entries")
        count += 1
    return Result(count / (now() - start), ops=count)


def sqlite_commits(d: Path, plan: Plan) -> Result:
    db = sqlite3.connect(d / "bench.db", isolation_level=None)  # autocommit: one insert, one commit
    try:
        db.execute("pragma journal_mode=wal")
        db.execute("pragma synchronous=full")
        db.execute("create table t(id integer primary key, v blob)")
        value = os.urandom(100)
        count = 0
        start = now()
        deadline = start + plan.seconds
        while now() < deadline:
            db.execute("insert into t(v) values (?)", (value,))
            count += 1
        elapsed = now() - start
    finally:
        db.close()
    return Result(count / elapsed, ops=count)


Workload = Callable[[Path, Plan], Result]
WORKLOADS: list[tuple[str, str, Workload]] = [
    ("seq_write", "MB/s", seq_write),
    ("rand4k_write", "MB/s", rand4k_write),
    ("fsync4k", "MB/s", fsync4k),
    ("small_files", "files/s", small_files),
    ("stat", "stats/s", stat_files),
    ("readdir", "dirs/s", readdir),
    ("sqlite_commits", "commits/s", sqlite_commits),
]


# --- daemons --------------------------------------------------------------------------

class Daemon(Proc):
    """A replfs daemon (bin/demo.py's Proc) whose peak memory the bench follows."""

    def __init__(self, name: str, args: list[str], log: Path, ready: str) -> None:
        super().__init__(name, args, log, ready, own_group=True)
        self.peak_kib = 0  # VmHWM, the highest over every run of this daemon

    def memory(self, key: str) -> int:
        """One figure of /proc/PID/status (VmHWM, RssAnon...) in KiB; 0 once it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                    if line.startswith(f"{key}:"):
                        return int(line.split()[1])
        return 0

    def peak_mib(self) -> float:
        """Peak resident memory so far (VmHWM), in MiB. It counts mapped LMDB pages too."""
        self.peak_kib = max(self.peak_kib, self.memory("VmHWM"))
        return self.peak_kib / 1024

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.peak_mib()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def unmount(mount: Path) -> None:
    if os.path.ismount(mount):
        subprocess.run(["fusermount3", "-u", "-z", str(mount)], capture_output=True)


def ask(target: Path, cmd: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
    reply = control.request(control.socket_path(target), cmd, timeout=timeout, **fields)
    if "error" in reply:
        raise RuntimeError(f"replfs {cmd} {target}: {reply['error']}")
    return reply


def requests(mount: Path | None) -> dict[str, int]:
    """The FUSE requests *mount*'s daemon served so far, by handler (none for native)."""
    return {} if mount is None else dict(ask(mount, "status")["requests"])


def checkpoint(mount: Path, wait: float = 600.0) -> int:
    """Close a set and wait until the secondary applied it (``replfs checkpoint --wait``)."""
    return int(ask(mount, "checkpoint", timeout=wait + 30, wait=wait)["set"])


# --- the run ------------------------------------------------------------------------

class Bench:
    def __init__(self, plan: Plan, tmp: Path, only: list[str] | None = None) -> None:
        self.plan = plan
        self.tmp = tmp
        self.only = only  # the workloads to run (None: all, and the replication figures)
        self.daemons: list[Daemon] = []
        self.mounts: list[Path] = []
        self.results: dict[str, dict[str, list[Result]]] = {
            key: {target: [] for target in TARGETS} for key, _, _ in WORKLOADS}
        self.replication: dict[str, float] = {}
        self.reads: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.primary_tls, self.secondary_tls = links(tmp)  # TLS, as replfs runs by default

    def daemon(self, name: str, args: list[str], ready: str) -> Daemon:
        daemon = Daemon(name, args, self.tmp / f"{name}.log", ready)
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def primary(self, name: str, *extra: str) -> tuple[Daemon, Path]:
        backing, mount = self.tmp / f"{name}-backing", self.tmp / f"{name}-mnt"
        backing.mkdir()
        mount.mkdir()
        self.mounts.append(mount)
        return self.daemon(name, ["primary", str(backing), str(mount), *extra], "serving"), mount

    def secondary(self, port: int = 0, name: str = "secondary") -> tuple[Daemon, int]:
        """A secondary; the first serves its cached standby mount at TMP/standby too."""
        replica, standby = self.tmp / "replica", self.tmp / "standby"
        extra = ["--mount", str(standby)]
        if name == "secondary":
            standby.mkdir(exist_ok=True)
            if standby not in self.mounts:
                self.mounts.append(standby)
        else:
            replica, extra = self.tmp / f"{name}-replica", []
        daemon = self.daemon(name, ["secondary", str(replica), "--listen",
                                    f"127.0.0.1:{port}", *extra, *self.secondary_tls],
                             "listening on")
        port = int(daemon.tail().split("listening on 127.0.0.1:")[-1].split()[0])
        return daemon, port

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)
            say(f"  warning: {text}")

    def settle(self, mount: Path | None, replicated: bool) -> None:
        """Let one workload's write-back (and replication) finish before the next starts."""
        if mount is not None:
            try:
                syncfs(mount)
            except OSError as exc:
                self.warn(f"syncfs of the replfs mount failed: {exc.strerror}")
            if replicated:
                checkpoint(mount)
        syncfs(self.tmp)

    def workloads(self, target: str, root: Path, mount: Path | None = None,
                  replicated: bool = False, round_: int = 0) -> None:
        for key, unit, run in WORKLOADS:
            if self.only is not None and key not in self.only:
                continue
            d = root / f"{key}.{round_}"
            d.mkdir()
            began = now()
            served = requests(mount)
            result = run(d, self.plan)
            self.settle(mount, replicated)
            if mount is not None and result.ops:
                served = {op: n - served.get(op, 0) for op, n in requests(mount).items()}
                result.extra["requests_per_op"] = sum(served.values()) / result.ops
            self.results[key][target].append(result)
            extra = "".join(f"  {k} {v:,.{1 if k == 'requests_per_op' else 0}f}"
                            for k, v in result.extra.items())
            say(f"  {target:<18} {key:<15} {result.value:>12,.1f} {unit}{extra}"
                f"  ({now() - began:.1f}s)")
            if mount is not None and result.ops:
                say("    requests per op: " + ", ".join(
                    f"{op} {n / result.ops:.2f}" for op, n in
                    sorted(served.items(), key=lambda item: -item[1]) if n))

    def run(self) -> None:
        native = self.tmp / "native"
        native.mkdir()
        say(f"native directory {native}")
        alone, alone_mount = self.primary("replfs")
        say(f"replfs primary at {alone_mount}, no secondary")
        sec, port = self.secondary()
        pri, mount = self.primary("replicated", "--secondary", f"127.0.0.1:{port}",
                                  "--journal-max", JOURNAL_MAX, *self.primary_tls)
        say(f"replfs primary at {mount}, replicating to 127.0.0.1:{port} over TLS")
        remote_sec, remote_port = self.secondary(name="secondary-remote")
        remote, remote_mount = self.primary(
            "remote", "--secondary", f"127.0.0.1:{remote_port}", "--fsync", "remote",
            "--journal-max", JOURNAL_MAX, *self.primary_tls)
        say(f"replfs primary at {remote_mount}, --fsync remote to 127.0.0.1:{remote_port}")
        checkpoint(mount, 60)
        checkpoint(remote_mount, 60)
        for round_ in range(self.plan.rounds):
            if self.plan.rounds > 1:
                say(f"round {round_ + 1} of {self.plan.rounds}")
            self.workloads("native", native, round_=round_)
            self.workloads("replfs", alone_mount, alone_mount, round_=round_)
            self.workloads("replfs_replicated", mount, mount, replicated=True, round_=round_)
            self.workloads("replfs_remote", remote_mount, remote_mount, replicated=True,
                           round_=round_)
        if ask(remote_mount, "status")["fsync_local_only"]:
            self.warn("some fsyncs of the --fsync remote primary did not wait for its "
                      "secondary (it was behind or gone)")
        self.replication["rss_primary_alone_MiB"] = alone.peak_mib()
        for daemon in (alone, remote, remote_sec):
            daemon.stop()
        unmount(alone_mount)
        unmount(remote_mount)
        if self.only is not None:
            return
        say("standby reads: the secondary's cached standby mount against the replica "
            "directory")
        self.reads = bench_reads.run(mount, self.tmp / "replica", self.tmp / "standby",
                                     self.plan.reads, checkpoint, say)
        self.lag(mount)
        sec = self.outage(mount, sec, port)
        self.replication |= {  # RssAnon at the end leaves out the mapped LMDB pages VmHWM counts
            "rss_primary_MiB": pri.peak_mib(), "rss_secondary_MiB": sec.peak_mib(),
            "rss_primary_anon_end_MiB": pri.memory("RssAnon") / 1024,
            "rss_secondary_anon_end_MiB": sec.memory("RssAnon") / 1024,
        }

    def lag(self, mount: Path) -> None:
        """Checkpoint round trips (close -> applied on the secondary) under a steady writer."""
        stop = threading.Event()
        failed: list[BaseException] = []
        samples: list[float] = []
        files: list[int] = []
        d = mount / "lag"
        d.mkdir()

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
                    samples.append(float(ask(mount, "status")["lag_seconds"]))

        threads = [threading.Thread(target=writer, daemon=True),
                   threading.Thread(target=sampler, daemon=True)]
        for t in threads:
            t.start()
        trips: list[float] = []
        start = now()
        deadline = start + self.plan.lag_seconds
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
        self.replication |= {
            "lag_p50_ms": percentile(trips, 50) * 1e3, "lag_p99_ms": percentile(trips, 99) * 1e3,
            "lag_round_trips": len(trips), "lag_load_MBps": load,
            "status_lag_p50_ms": percentile(samples, 50) * 1e3 if samples else 0.0,
            "status_lag_p99_ms": percentile(samples, 99) * 1e3 if samples else 0.0,
        }
        say(f"  lag: {len(trips)} checkpoint round trips, p50 "
            f"{self.replication['lag_p50_ms']:.0f} ms, p99 {self.replication['lag_p99_ms']:.0f} ms")

    def outage(self, mount: Path, sec: Daemon, port: int) -> Daemon:
        """Write with the secondary down, restart it, time the catch-up; measure the journal."""
        checkpoint(mount)
        before = int(ask(mount, "status")["journal_bytes"])
        sec.stop()
        d = mount / "outage"
        d.mkdir()
        size = self.plan.outage_bytes
        start = now()
        for n in range(max(1, size // (64 * MiB))):
            write_file(d / f"o{n:03}", min(size, 64 * MiB), fsync=False)
        closed = int(ask(mount, "checkpoint")["set"])
        written = now() - start
        status = ask(mount, "status")
        journal = int(status["journal_bytes"]) - before
        say(f"  secondary down: wrote {size / MB:.0f} MB in {written:.1f}s, journal grew "
            f"{journal / MB:.0f} MB ({status['lag_sets']} sets behind, mode {status['mode']})")
        new, _ = self.secondary(port)
        started = now()
        while not ask(mount, "status").get("connected"):
            if now() - started > 60:
                raise RuntimeError("the primary did not reconnect to the restarted secondary")
            time.sleep(0.02)
        connected = now()
        applied = checkpoint(mount)
        done = now()
        new.peak_kib = max(new.peak_kib, sec.peak_kib)  # report the peak of both runs
        self.replication |= {
            "catchup_MBps": size / MB / (done - connected),
            "catchup_seconds": done - connected, "reconnect_seconds": connected - started,
            "outage_write_MBps": size / MB / written, "outage_bytes": float(size),
            "journal_bytes_per_byte": journal / size,
        }
        say(f"  catch-up to set {applied} (closed {closed}): {done - connected:.1f}s after "
            f"reconnecting ({connected - started:.1f}s after the restart), "
            f"{self.replication['catchup_MBps']:.0f} MB/s")
        return new

    def cleanup(self) -> None:
        for daemon in self.daemons:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                daemon.stop()
        for mount in self.mounts:
            unmount(mount)
        if any(os.path.ismount(m) for m in self.mounts):
            say(f"bench: something is still mounted; left {self.tmp} in place")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --- output -------------------------------------------------------------------------

def machine(tmp: Path) -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split()
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "cpu": cpu,
            "memory_MiB": int(meminfo[meminfo.index("MemTotal:") + 1]) // 1024,
            "kernel": platform.release(), "python": platform.python_version(),
            "fs_type": fs_type(tmp), "tmp_dir": str(tmp.parent)}


def fs_type(path: Path) -> str:
    """The type of the filesystem holding *path*, from /proc/self/mountinfo."""
    real, best, kind = os.path.realpath(path), "", "?"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        point = fields.split()[4].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, rest.split()[0]
    return kind


def report(bench: Bench) -> dict[str, Any]:
    workloads: dict[str, Any] = {}
    for key, unit, _ in WORKLOADS:
        runs = bench.results[key]
        if not all(runs.values()):
            continue
        got = {t: statistics.median(r.value for r in runs[t]) for t in TARGETS}
        native, replicated = got["native"], got["replfs_replicated"]
        entry: dict[str, Any] = {"unit": unit, **{t: round(got[t], 2) for t in TARGETS},
                                 "ratio": round(replicated / native, 4) if native else None,
                                 "range": {t: [round(min(r.value for r in runs[t]), 2),
                                               round(max(r.value for r in runs[t]), 2)]
                                           for t in TARGETS}}
        for name in runs["native"][0].extra:
            per = {t: round(statistics.median(r.extra[name] for r in runs[t]), 1)
                   for t in TARGETS}
            entry[name] = per
            entry[name + "_range"] = {t: [round(min(r.extra[name] for r in runs[t]), 1),
                                          round(max(r.extra[name] for r in runs[t]), 1)]
                                      for t in TARGETS}
            entry[name.removesuffix("_us") + "_ratio"] = (
                round(per["native"] / per["replfs_replicated"], 4)
                if per["replfs_replicated"] else None)
        served = {t: round(statistics.median(r.extra["requests_per_op"] for r in runs[t]), 2)
                  for t in TARGETS[1:] if all("requests_per_op" in r.extra for r in runs[t])}
        if served:
            entry["requests_per_op"] = served
        if key == "stat":
            entry["files"] = bench.plan.stat_files
        if key == "readdir":
            entry["entries"] = bench.plan.dir_entries
        workloads[key] = entry
    return {"workloads": workloads,
            "replication": {k: round(v, 3) for k, v in bench.replication.items()},
            "standby_reads": bench.reads, "warnings": bench.warnings}


def table(out: dict[str, Any]) -> str:
    rounds = out["machine"].get("rounds", 1)

    def spread(ranges: dict[str, list[float]]) -> tuple[str, ...]:
        return tuple(f"{ranges[t][0]:,.0f}-{ranges[t][1]:,.0f}" for t in TARGETS)

    rows: list[tuple[str, ...]] = [("workload", "unit", "native", "replfs", "replicated",
                                    "fsync remote", "ratio")]
    for key, entry in out["workloads"].items():
        rows.append((key, entry["unit"], *(f"{entry[t]:,.1f}" for t in TARGETS),
                     f"{entry['ratio']:.3f}"))
        if rounds > 1:
            rows.append(("  range", "", *spread(entry["range"]), ""))
        for name in ("p50_us", "p99_us"):
            if name in entry:
                rows.append((f"  fsync {name[:3]}", "µs", *(f"{entry[name][t]:,.0f}"
                                                           for t in TARGETS),
                             f"{entry[name[:3] + '_ratio']:.3f}"))
                if rounds > 1:
                    rows.append(("    range", "", *spread(entry[name + "_range"]), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("ratio: replicated / native (latencies: native / replicated)"
                 + (f"; medians of {rounds} rounds, range: the lowest and highest round"
                    if rounds > 1 else ""))
    w = out["workloads"]
    if "stat" in w and "readdir" in w:
        lines.append(f"stat: {w['stat']['files']:,} files; readdir: a directory of "
                     f"{w['readdir']['entries']:,} entries")
    m = out["machine"]
    lines.append(f"machine: {m['cores']} cores, {m['memory_MiB']} MiB, Linux {m['kernel']}, "
                 f"Python {m['python']}, {m['fs_type']} at {m['tmp_dir']}")
    if out["replication"]:
        lines.append("")
        lines.append(f"replication (secondary on loopback, primary --journal-max {JOURNAL_MAX})")
        for key, value in out["replication"].items():
            shown = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
            lines.append(f"  {key:<26} {shown:>14}")
    if out["standby_reads"]:
        lines.append("")
        lines.extend(bench_reads.table(out["standby_reads"]))
    lines.extend(f"warning: {text}" for text in out["warnings"])
    return "\n".join(lines)


_interrupted = threading.Event()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if not _interrupted.is_set():  # once: a second Ctrl-C must not cut the cleanup short
        _interrupted.set()
        raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volumes, under a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", metavar="W1,W2", help="run only these workloads ("
                        + ", ".join(key for key, _, _ in WORKLOADS)
                        + "), without the replication figures")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="times round the targets (default 3, 1 with --quick)")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or ()) - {key for key, _, _ in WORKLOADS})
    if unknown:
        parser.error(f"no such workload: {', '.join(unknown)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    tmp = Path(tempfile.mkdtemp(prefix="replfs-bench-"))
    bench = Bench(plan, tmp, only)
    started = now()
    try:
        info = machine(tmp)
        bench.run()
    except KeyboardInterrupt:
        say("\nbench: interrupted; cleaning up")
        return 130
    except (OSError, RuntimeError, sqlite3.Error, ValueError) as exc:
        if _interrupted.is_set():
            say("\nbench: interrupted; cleaning up")
            return 130
        say(f"\nbench: failed: {exc}")
        if not isinstance(exc, RuntimeError):  # not one of ours: say where
            traceback.print_exc()
        for daemon in bench.daemons:
            say(f"--- last lines of the {daemon.name} log ---\n{daemon.tail()}")
        return 1
    finally:
        bench.cleanup()
    out = {"machine": info, **report(bench)}
    out["machine"]["bench_seconds"] = round(now() - started, 1)
    out["machine"]["mode"] = "quick" if args.quick else "full"
    out["machine"]["rounds"] = plan.rounds
    print(json.dumps(out, indent=2) if args.json else table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
