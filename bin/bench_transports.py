"""``bin/bench_transports.py``: replication lag and throughput, transport by transport.

For each transport (replfs frames over TLS, iSCSI, Fibre Channel over FCIP)
a primary replicates to a secondary on loopback, as in bin/bench: the lag
is ``checkpoint --wait`` round trips under a steady writer (a 64 KiB file
about every 10 ms), the throughput the catch-up after the secondary was down
while the primary wrote (from the journal, records as fast as the link takes
them). The transports take turns, round after round, in one run on the same
disk and cores; every round is printed, then the median of each figure with
its lowest and highest.

    bin/bench --transports [--quick] [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import bench
from bench import Bench, checkpoint, say
from bench_report import JOURNAL_MAX, TRANSPORTS
from bench_workloads import Plan

FULL = Plan(seq_bytes=0, rand_file=0, seconds=0, lag_seconds=10.0, outage_bytes=256 << 20)
QUICK = Plan(seq_bytes=0, rand_file=0, seconds=0, lag_seconds=3.0, outage_bytes=64 << 20)
FIGURES = {"lag_p50_ms": "ms", "lag_p99_ms": "ms", "catchup_MBps": "MB/s",
           "reconnect_seconds": "s"}


def one(plan: Plan, tmp: Path, transport: str) -> dict[str, float]:
    """Lag and catch-up over *transport*, in a fresh pair of daemons."""
    run = Bench(plan, tmp, transport)
    try:
        sec, port = run.secondary()
        _, mount = run.primary("replicated", *run.to_secondary(port), "--journal-max",
                               JOURNAL_MAX)
        checkpoint(mount, 60)
        run.lag(mount)
        run.outage(mount, sec, port)
        return {key: run.replication[key] for key in FIGURES}
    finally:
        run.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench_transports",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=3, metavar="N",
                        help="rounds of all three transports (default 3; --quick: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, bench._interrupt)
    signal.signal(signal.SIGTERM, bench._interrupt)
    plan, rounds = (QUICK, 1) if args.quick else (FULL, args.rounds)
    base = Path(tempfile.mkdtemp(prefix="replfs-bench-transports-"))
    got: dict[str, list[dict[str, float]]] = {t: [] for t in TRANSPORTS}
    try:
        for round_ in range(rounds):
            for transport, name in TRANSPORTS.items():
                say(f"round {round_ + 1} of {rounds}: {name}")
                tmp = base / f"{transport}-{round_}"
                tmp.mkdir()
                figures = one(plan, tmp, transport)
                got[transport].append(figures)
                say("  " + ", ".join(f"{k} {v:,.1f}" for k, v in figures.items()))
    except KeyboardInterrupt:
        say("\nbench_transports: interrupted; cleaning up")
        return 130
    except (OSError, RuntimeError, ValueError) as exc:
        say(f"\nbench_transports: failed: {exc}")
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary = {t: {k: {"median": round(statistics.median(r[k] for r in runs), 2),
                       "low": round(min(r[k] for r in runs), 2),
                       "high": round(max(r[k] for r in runs), 2)} for k in FIGURES}
               for t, runs in got.items()}
    if args.json:
        print(json.dumps({"rounds": rounds, "outage_bytes": plan.outage_bytes,
                          "lag_seconds": plan.lag_seconds, "transports": summary}, indent=2))
        return 0
    print(f"\n{'transport':<10}" + "".join(f"{f'{k} ({u})':>28}" for k, u in FIGURES.items()))
    for transport, spread in summary.items():
        cells = [f"{v['median']:,.1f} ({v['low']:,.1f}-{v['high']:,.1f})"
                 for v in spread.values()]
        print(f"{TRANSPORTS[transport]:<10}" + "".join(f"{cell:>28}" for cell in cells))
    print(f"medians of {rounds} round(s), lowest-highest in brackets; catch-up of "
          f"{plan.outage_bytes >> 20} MiB written while the secondary was down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
