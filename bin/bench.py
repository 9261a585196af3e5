"""``bin/bench``: what replfs costs, workload by workload, against the native filesystem.

Every workload runs on four targets, in one temporary directory on one
disk: a native directory, a replfs primary mount with no secondary, a
primary mount replicating to a live secondary on loopback, and one with
``--fsync remote`` replicating to a secondary of its own (an fsync waits
for the secondary's staging; ``--fsync received`` runs that one with
``--fsync received`` instead: an fsync waits for the secondary's receipt).
The full run goes round the targets three times, interleaved, and reports
the median of each figure, with the range of the rounds under it: this
machine's disk and CPU move by 2-3x from minute to minute. The table gives
each figure and the ratio replicated/native (native/replicated for
latencies). Then, with the secondary: lag from a set's close to its apply
(``checkpoint --wait`` round trips under a steady writer, and the lag under
an application that fsyncs 15 times a second: bin/bench_lag.py), the
catch-up rate after an outage, peak memory of both daemons, and journal bytes per
application byte. What the disk wrote is counted too (its block device's sectors
written): per byte of seq_write on each target (the replicated one writes each byte
to the journal, BACKING, the staging store and the replica, all on this one disk),
and per byte of the catch-up, with the disk's write rate meanwhile. Last, the
standby's reads (bin/bench_reads.py): the secondary's cached standby mount
against the replica directory, idle and while sets arrive.

Timed workloads run for a fixed time and count what they did; the file
writers write a fixed volume (``--quick``: smaller volumes, shorter times,
a directory of 2,000 entries instead of 10,000): bin/bench_workloads.py.
The figures and the table: bin/bench_report.py. MB is 10^6 bytes. The
replicating primary runs with ``--journal-max 4G`` so the outage stays in the journal and the
catch-up measures journal streaming, not a resync.

``--only fsync4k,sqlite_commits`` runs just those workloads (and skips the
replication figures and the standby's reads); ``--pipeline`` just the
replication figures; ``--rounds N`` sets how many times round the targets.

Before anything is measured, the bench waits (5.5 minutes at most) until
creating a file costs what the disk makes it cost: ext4 without a journal
makes creates slow for up to 5 minutes after many files were removed
(bench_workloads.fresh_inodes).
Everything is removed afterwards, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_lag
import bench_reads
from bench_report import JOURNAL_MAX, TARGETS, TRANSPORTS, machine, report, table
from bench_workloads import (
    FULL,
    MB,
    QUICK,
    WORKLOADS,
    MiB,
    Plan,
    Result,
    fresh_inodes,
    now,
    write_file,
)
from demo import Proc, links

from repl import control
from repl.iscsi import chap
from store import libc

HERE = Path(__file__).resolve().parent
REPLFS = [sys.executable, str(HERE / "replfs.py")]
IQN = "iqn.2025-01.io.replfs:bench"
DIGITS = {"requests_per_op": 1, "disk_bytes_per_byte": 2}  # in a round's line, else 0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def syncfs(path: Path) -> None:
    """Write back everything dirty on the filesystem holding *path*."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc.syncfs(fd)
    finally:
        os.close(fd)


def disk_written(path: Path) -> int | None:
    """Bytes the block device holding *path* has written since boot (None if it is
    not on one): what a workload costs the disk, the copies replication adds
    included (a journal, a staging store, a replica on the same disk)."""
    st = os.stat(path)
    try:
        fields = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
                      ).read_text().split()
    except OSError:
        return None
    return int(fields[6]) * 512  # sectors written, in the kernel's 512-byte units


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

    def cpu_seconds(self) -> float:
        """User and system CPU time used so far, all threads; 0 once it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return 0.0

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
    def __init__(self, plan: Plan, tmp: Path, transport: str = "frames",
                 only: list[str] | None = None, fsync: str = "remote") -> None:
        self.plan = plan
        self.tmp = tmp
        self.fsync = fsync  # the --fsync of the fourth target: remote or received
        self.transport = transport  # frames (over TLS), iscsi or fcip
        self.only = only  # the workloads to run (None: all, and the replication figures)
        self.daemons: list[Daemon] = []
        self.mounts: list[Path] = []
        self.results: dict[str, dict[str, list[Result]]] = {
            key: {target: [] for target in TARGETS} for key, _, _ in WORKLOADS}
        self.replication: dict[str, float] = {}
        self.reads: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.primary_tls, self.secondary_tls = links(tmp)  # TLS, as replfs runs by default
        if transport != "frames":
            chap.make(tmp / "chap.secret", "alpha", "beta")

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
        listen = {"frames": ["--listen", f"127.0.0.1:{port}", *self.secondary_tls],
                  "iscsi": ["--iscsi", f"127.0.0.1:{port}", "--iqn", IQN, *self.chap()],
                  "fcip": ["--fcip", f"127.0.0.1:{port}", *self.chap()]}[self.transport]
        daemon = self.daemon(name, ["secondary", str(replica), *listen, *extra],
                             "listening on")
        port = int(daemon.tail().split("listening on 127.0.0.1:")[-1].split()[0])
        return daemon, port

    def chap(self) -> list[str]:
        return ["--chap", str(self.tmp / "chap.secret")]

    def to_secondary(self, port: int) -> list[str]:
        """The primary's options to replicate to the secondary on *port*."""
        return {"frames": ["--secondary", f"127.0.0.1:{port}", *self.primary_tls],
                "iscsi": ["--secondary", f"iscsi://127.0.0.1:{port}/{IQN}", *self.chap()],
                "fcip": ["--secondary", f"fcip://127.0.0.1:{port}", *self.chap()]
                }[self.transport]

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
                  daemons: tuple[Daemon, ...] = (), round_: int = 0) -> None:
        """Run each workload in *root*, on *mount* served by *daemons* (the primary
        first, then its secondary, if any), or natively."""
        for key, unit, run in WORKLOADS:
            if self.only is not None and key not in self.only:
                continue
            d = root / f"{key}.{round_}"
            d.mkdir()
            began = now()
            served = requests(mount)
            cpu = [daemon.cpu_seconds() for daemon in daemons]
            disk = disk_written(self.tmp)
            result = run(d, self.plan)
            self.settle(mount, len(daemons) > 1)  # replicated: until the secondary applied it
            if result.written and disk is not None:
                # Written back and replicated by the end of the settle.
                result.extra["disk_bytes_per_byte"] = (
                    (disk_written(self.tmp) or disk) - disk) / result.written
            # What the daemons spent on the workload: its requests, and shipping and
            # applying what it wrote, until the settle's checkpoint came back.
            cpu = [daemon.cpu_seconds() - before
                   for daemon, before in zip(daemons, cpu, strict=True)]
            if mount is not None and result.ops:
                served = {op: n - served.get(op, 0) for op, n in requests(mount).items()}
                result.extra["requests_per_op"] = sum(served.values()) / result.ops
                result.extra["cpu_us_per_op"] = sum(cpu) / result.ops * 1e6
            self.results[key][target].append(result)
            extra = "".join(f"  {k} {v:,.{DIGITS.get(k, 0)}f}" for k, v in result.extra.items())
            say(f"  {target:<18} {key:<15} {result.value:>12,.1f} {unit}{extra}"
                f"  ({now() - began:.1f}s)")
            if len(cpu) > 1 and result.ops:
                say("    daemons' CPU per op: " + ", ".join(
                    f"{daemon.name} {seconds / result.ops * 1e6:,.0f} us"
                    for daemon, seconds in zip(daemons, cpu, strict=True)))
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
        pri, mount = self.primary("replicated", *self.to_secondary(port),
                                  "--journal-max", JOURNAL_MAX)
        say(f"replfs primary at {mount}, replicating to 127.0.0.1:{port} over "
            f"{TRANSPORTS[self.transport]}")
        remote_sec, remote_port = self.secondary(name="secondary-remote")
        remote, remote_mount = self.primary(
            "remote", *self.to_secondary(remote_port), "--fsync", self.fsync,
            "--journal-max", JOURNAL_MAX)
        say(f"replfs primary at {remote_mount}, --fsync {self.fsync} to "
            f"127.0.0.1:{remote_port}")
        checkpoint(mount, 60)
        checkpoint(remote_mount, 60)
        for round_ in range(self.plan.rounds):
            if self.plan.rounds > 1:
                say(f"round {round_ + 1} of {self.plan.rounds}")
            self.workloads("native", native, round_=round_)
            self.workloads("replfs", alone_mount, alone_mount, (alone,), round_=round_)
            self.workloads("replfs_replicated", mount, mount, (pri, sec), round_=round_)
            self.workloads("replfs_remote", remote_mount, remote_mount, (remote, remote_sec),
                           round_=round_)
        if ask(remote_mount, "status")["fsync_local_only"]:
            self.warn(f"some fsyncs of the --fsync {self.fsync} primary did not wait for its "
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
        self.outage_and_memory(pri, mount, sec, port)

    def pipeline(self) -> None:
        """The replication figures alone: a replicating primary, lag, catch-up, memory."""
        sec, port = self.secondary()
        pri, mount = self.primary("replicated", *self.to_secondary(port),
                                  "--journal-max", JOURNAL_MAX)
        checkpoint(mount, 60)
        rounds: list[dict[str, float]] = []
        for round_ in range(self.plan.rounds):
            say(f"round {round_ + 1} of {self.plan.rounds}")
            self.lag(mount)
            sec = self.outage_and_memory(pri, mount, sec, port)
            rounds.append(dict(self.replication))
        for key in rounds[0]:  # medians, and each figure's lowest and highest round
            values = [r[key] for r in rounds]
            self.replication[key] = statistics.median(values)
            if len(rounds) > 1 and key.endswith(("_ms", "_MBps", "_MiB")):
                self.replication[key + "_min"], self.replication[key + "_max"] = (
                    min(values), max(values))

    def outage_and_memory(self, pri: Daemon, mount: Path, sec: Daemon, port: int
                          ) -> Daemon:
        """The catch-up after an outage, then both daemons' peak memory: the new
        secondary."""
        sec = self.outage(mount, sec, port)
        self.replication |= {  # RssAnon at the end leaves out the mapped LMDB pages VmHWM counts
            "rss_primary_MiB": pri.peak_mib(), "rss_secondary_MiB": sec.peak_mib(),
            "rss_primary_anon_end_MiB": pri.memory("RssAnon") / 1024,
            "rss_secondary_anon_end_MiB": sec.memory("RssAnon") / 1024,
        }
        return sec

    def lag(self, mount: Path) -> None:
        """The lag figures (bin/bench_lag.py): under a steady writer, under fsyncs."""
        def lag_seconds() -> float:
            return float(ask(mount, "status")["lag_seconds"])

        self.replication |= bench_lag.steady(mount, self.plan.lag_seconds, checkpoint,
                                             lag_seconds, say)
        self.replication |= bench_lag.fsyncs(mount, self.plan.lag_seconds, lag_seconds, say)

    def outage(self, mount: Path, sec: Daemon, port: int) -> Daemon:
        """Write with the secondary down, restart it, time the catch-up; measure the journal."""
        checkpoint(mount)
        before = int(ask(mount, "status")["journal_bytes"])
        sec.stop()
        d = Path(tempfile.mkdtemp(prefix="outage.", dir=mount))
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
        disk = disk_written(self.tmp)
        applied = checkpoint(mount)
        done = now()
        if disk is not None:  # the disk's own pace: what the catch-up can reach on it
            written = (disk_written(self.tmp) or disk) - disk
            self.replication["catchup_disk_bytes_per_byte"] = written / size
            self.replication["catchup_disk_MBps"] = written / MB / (done - connected)
        new.peak_kib = max(new.peak_kib, sec.peak_kib)  # report the peak of both runs
        self.replication |= {
            "catchup_MBps": size / MB / (done - connected),
            "catchup_seconds": done - connected, "reconnect_seconds": connected - started,
            "outage_write_MBps": size / MB / written, "outage_bytes": float(size),
            "journal_bytes_per_byte": journal / size,
        }
        say(f"  catch-up to set {applied} (closed {closed}): {done - connected:.1f}s after "
            f"reconnecting ({connected - started:.1f}s after the restart), "
            f"{self.replication['catchup_MBps']:.0f} MB/s"
            + (f", {self.replication['catchup_disk_bytes_per_byte']:.2f} bytes written to "
               f"the disk a byte ({self.replication['catchup_disk_MBps']:.0f} MB/s)"
               if "catchup_disk_bytes_per_byte" in self.replication else ""))
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


# --- the command ------------------------------------------------------------------

_interrupted = threading.Event()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if not _interrupted.is_set():  # once: a second Ctrl-C must not cut the cleanup short
        _interrupted.set()
        raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volumes, under a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--transport", choices=TRANSPORTS, default="frames",
                        help="how the replicated target reaches its secondary: replfs frames "
                             "over TLS (default), iSCSI or FCIP (bin/bench_transports.py "
                             "compares the three)")
    parser.add_argument("--only", metavar="W1,W2", help="run only these workloads ("
                        + ", ".join(key for key, _, _ in WORKLOADS)
                        + "), without the replication figures")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="times round the targets (default 3, 1 with --quick)")
    parser.add_argument("--fsync", choices=("remote", "received"), default="remote",
                        help="the fourth target's --fsync (default remote)")
    parser.add_argument("--pipeline", action="store_true",
                        help="only the replication figures: lag, catch-up, peak memory")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else None
    if args.pipeline and only is not None:
        parser.error("--pipeline runs no workloads: leave out --only")
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
    bench = Bench(plan, tmp, args.transport, only, args.fsync)
    started = now()
    try:
        info = machine(tmp)
        info.update(fresh_inodes(tmp, say))
        if args.pipeline:
            bench.pipeline()
        else:
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
    out = {"machine": info, **report(bench.results, plan, bench.replication, bench.reads,
                                      bench.warnings)}
    out["machine"]["bench_seconds"] = round(now() - started, 1)
    out["machine"]["mode"] = "quick" if args.quick else "full"
    out["machine"]["rounds"] = plan.rounds
    out["machine"]["transport"] = args.transport
    out["machine"]["fsync"] = args.fsync
    print(json.dumps(out, indent=2) if args.json else table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
