"""bin/torture: a randomized campaign that tries hard to break the guarantee."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tests.torture.cluster import KINDS as CLUSTER_KINDS
from tests.torture.cluster import ClusterResult, run_cluster
from tests.torture.run import KINDS, POWER_CUT, REPLICA_POWER_CUT, Result, run_one

RUN_SECONDS = 6.0


def run_seeds(runs: int, seed: int, minutes: float | None) -> Iterator[int]:
    """The seeds of a campaign's runs, drawn from *seed*: *runs* of them, or as many as
    begin within *minutes* (whichever is more)."""
    rng = random.Random(seed)
    deadline = time.monotonic() + minutes * 60 if minutes else None
    count = 0
    while count < runs or (deadline and time.monotonic() < deadline):
        if deadline and time.monotonic() >= deadline:
            break
        count += 1
        yield rng.randrange(1 << 32)


def fault_counts(faults: Counter[str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(faults.items())) or "none"


def campaign(runs: int, seed: int, minutes: float | None, seconds: float,
             out: object = sys.stdout, power_cuts: bool = False) -> list[Result]:
    base = Path(tempfile.gettempdir())
    results: list[Result] = []
    for run_seed in run_seeds(runs, seed, minutes):
        started = time.monotonic()
        result = run_one(run_seed, seconds, base, power_cuts=power_cuts)
        results.append(result)
        print(f"run {len(results):>4}  seed {run_seed:>10}  faults "
              f"{fault_counts(result.faults):<40} sets "
              f"{result.sets:>4}  samples {result.samples:>3}  holds {result.holds:>2}  "
              f"journal {result.journal_max or '1G':>4}  ops {result.ops:>5}  "
              f"{time.monotonic() - started:4.1f}s  "
              f"{'ok' if result.ok else 'VIOLATION'}", file=out, flush=True)  # type: ignore[arg-type]
        if not result.ok:
            print(f"  {result.error}\n  kept {result.kept}\n  replay: bin/torture --replay "
                  f"{run_seed}", file=out, flush=True)  # type: ignore[arg-type]
    return results


def cluster_campaign(runs: int, seed: int, minutes: float | None, seconds: float,
                     out: object = sys.stdout) -> list[ClusterResult]:
    """Runs of three nodes on etcd (tests/torture/cluster.py), as ``campaign``."""
    base = Path(tempfile.gettempdir())
    results: list[ClusterResult] = []
    for run_seed in run_seeds(runs, seed, minutes):
        started = time.monotonic()
        result = run_cluster(run_seed, seconds, base)
        results.append(result)
        took = ",".join(f"{t:.1f}" for t in result.failover_seconds) or "-"
        print(f"run {len(results):>4}  seed {run_seed:>10}  fsync {result.fsync:<6}  faults "
              f"{fault_counts(result.faults):<32} failovers {took:<14} sets "
              f"{result.sets:>4}  ops {result.ops:>5}  "
              f"{time.monotonic() - started:5.1f}s  {'ok' if result.ok else 'VIOLATION'}",
              file=out, flush=True)  # type: ignore[arg-type]
        if not result.ok:
            print(f"  {result.error}\n  kept {result.kept}\n  replay: bin/torture --cluster "
                  f"--replay {run_seed}", file=out, flush=True)  # type: ignore[arg-type]
    return results


def cluster_summary(results: list[ClusterResult], out: object = sys.stdout) -> None:
    faults: Counter[str] = Counter()
    for r in results:
        faults.update(r.faults)
    took = sorted(t for r in results for t in r.failover_seconds)
    print(f"\n{'runs':<20}{len(results)} ({sum(r.fsync == 'remote' for r in results)} "  # type: ignore[arg-type]
          "with --fsync remote)", file=out)
    for kind in CLUSTER_KINDS:
        print(f"{kind:<20}{faults[kind]}", file=out)  # type: ignore[arg-type]
    if took:
        print(f"{'failovers':<20}{len(took)}: kill or cut to a new primary p50 "  # type: ignore[arg-type]
              f"{took[len(took) // 2]:.1f}s, max {took[-1]:.1f}s; they lost "
              f"{sum(r.lost_commits for r in results)} SQLite commits acknowledged before "
              "the sets were applied elsewhere; "
              f"{sum(r.in_step_failovers for r in results)} with --fsync remote and a "
              "secondary in step, which may lose none; "
              f"{sum(r.own_journal for r in results)} to a node leading again from its own "
              "journal (its tree not compared with a set's)", file=out)
    print(f"{'role samples':<20}{sum(r.role_samples for r in results)} (never two "  # type: ignore[arg-type]
          "writable primaries)", file=out)
    print(f"{'sets':<20}{sum(r.sets for r in results)}", file=out)  # type: ignore[arg-type]
    print(f"{'violations':<20}{sum(not r.ok for r in results)}", file=out)  # type: ignore[arg-type]


def summary(results: list[Result], out: object = sys.stdout) -> None:
    faults: Counter[str] = Counter()
    for r in results:
        faults.update(r.faults)
    bad = [r for r in results if not r.ok]
    print(f"\n{'runs':<20}{len(results)}", file=out)  # type: ignore[arg-type]
    for kind in KINDS:
        print(f"{kind:<20}{faults[kind]}", file=out)  # type: ignore[arg-type]
    if faults["failover"]:
        print(f"{'':<20}(the failovers lost {sum(r.lost_commits for r in results)} SQLite "  # type: ignore[arg-type]
              "commits the old primary had acknowledged: the sets its secondary had not "
              "applied, as asynchronous replication allows; "
              f"{sum(r.outdated for r in results)} promoted a replica in a sync of paths "
              "at the set it held whole, --outdated; "
              f"{sum(r.in_step_failovers for r in results)} with --fsync remote or received "
              "and the secondary in step, which may lose none)", file=out)
    if faults[POWER_CUT]:
        print(f"{POWER_CUT:<20}{faults[POWER_CUT]} ({sum(r.pages_lost for r in results)} "  # type: ignore[arg-type]
              f"dirty pages dropped; {sum(r.unchecked for r in results)} left the journal "
              "in an open set, the tree not compared; after "
              f"{sum(r.resent for r in results)} the primary resent what its activity log "
              "noted, the rest of the tree compared)", file=out)
    if faults[REPLICA_POWER_CUT]:
        print(f"{REPLICA_POWER_CUT:<20}{faults[REPLICA_POWER_CUT]} "  # type: ignore[arg-type]
              f"({sum(r.replica_pages_lost for r in results)} dirty pages dropped; "
              f"{sum(r.replica_torn for r in results)} caught a batch not yet durable, the "
              "rest found the replica at the set its apply log says)", file=out)
    print(f"{'samples checked':<20}{sum(r.samples for r in results)}, through both standby "  # type: ignore[arg-type]
          f"mounts ({sum(r.cached_lost for r in results)} missed the cached one: the "
          "secondary serving it had died)", file=out)
    print(f"{'user holds':<20}{sum(r.holds for r in results)} "  # type: ignore[arg-type]
          f"({sum(r.refused for r in results)} pauses refused, none left a hold)", file=out)
    print(f"{'small journals':<20}{sum(1 for r in results if r.journal_max)} runs",  # type: ignore[arg-type]
          file=out)
    print(f"{'sets':<20}{sum(r.sets for r in results)}", file=out)  # type: ignore[arg-type]
    print(f"{'violations':<20}{len(bad)}", file=out)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torture", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, help="campaign seed (default: a fresh one)")
    parser.add_argument("--minutes", type=float, help="keep going for this long")
    parser.add_argument("--seconds", type=float, default=RUN_SECONDS, help="workload per run")
    parser.add_argument("--replay", type=int, metavar="RUN_SEED",
                        help="run exactly one run with this seed, and keep its directory")
    parser.add_argument("--power-cuts", action="store_true",
                        help="also cut the power of the primary's host once a run (BACKING and "
                        "its journal on a simulated disk that drops what was not fsynced), "
                        "and of the secondary's (its replica and staging on another)")
    parser.add_argument("--cluster", action="store_true",
                        help="runs of three `replfs node`s on etcd instead: kills of the "
                        "primary (a failover the nodes decide) and of standbys")
    args = parser.parse_args(argv)
    if args.cluster and args.power_cuts:
        parser.error("--cluster has no power cuts")
    if args.cluster and args.replay is not None:
        cluster = run_cluster(args.replay, args.seconds, Path(tempfile.gettempdir()),
                              keep=True)
        print(f"seed {args.replay}: {'ok' if cluster.ok else cluster.error}; "
              f"kept {cluster.kept}")
        return 0 if cluster.ok else 1
    if args.replay is not None:
        result = run_one(args.replay, args.seconds, Path(tempfile.gettempdir()), keep=True,
                         power_cuts=args.power_cuts)
        print(f"seed {args.replay}: {'ok' if result.ok else result.error}; kept {result.kept}")
        return 0 if result.ok else 1
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"torture campaign seed {seed}")
    if args.cluster:
        clusters = cluster_campaign(args.runs, seed, args.minutes, args.seconds)
        cluster_summary(clusters)
        return 0 if all(r.ok for r in clusters) else 1
    results = campaign(args.runs, seed, args.minutes, args.seconds,
                       power_cuts=args.power_cuts)
    summary(results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
