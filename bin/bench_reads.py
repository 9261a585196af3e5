"""``bin/bench``'s standby reads: the secondary's cached standby mount against the
replica directory it shows, read natively, in the same run.

On a tree the replicated primary wrote (2,000 small files and one large
file), three figures, each taken on both targets in turns (so both see the
same machine), idle and then while about 100 sets a second arrive that
touch other files: stats of the 2,000
files, 4 KiB random reads of the large file once cached, and sequential
reads of it after a first pass. Then how long a set takes to show on the
standby once the replica directory shows it (a writer closes a set every
10 ms; a process watches each). Each round is printed; the figures are the
medians, with the spread of the ratio over the rounds.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
MB = 1e6
SET_INTERVAL = 0.01  # the load: a set closed every 10 ms, about 100 a second
LOAD_FILES = 16


@dataclass(frozen=True)
class ReadPlan:
    big: int  # the large file's size
    seconds: float  # each timed figure
    rounds: int
    files: int = 2_000


SLICES = 6  # each figure alternates between the two targets, so both see the same machine


def now() -> float:
    return time.perf_counter()


Step = Callable[[], float]  # does some work, returns how much (in the figure's unit)


def stats(root: Path, plan: ReadPlan) -> tuple[Step, Callable[[], None]]:
    paths = [f"{root}/reads/f{i:05}" for i in range(plan.files)]

    def step() -> float:
        for path in paths:
            os.stat(path)
        return len(paths)

    step()  # once, so both are cached
    return step, lambda: None


def random_reads(root: Path, plan: ReadPlan) -> tuple[Step, Callable[[], None]]:
    fd = os.open(root / "reads" / "big", os.O_RDONLY)
    while os.read(fd, MiB):  # a first pass caches it
        pass
    rng = random.Random(4096)
    blocks = plan.big // 4096

    def step() -> float:
        for _ in range(256):
            os.pread(fd, 4096, rng.randrange(blocks) * 4096)
        return 256

    return step, lambda: os.close(fd)


def sequential(root: Path, plan: ReadPlan) -> tuple[Step, Callable[[], None]]:
    """Whole passes over the large file (MB), after a first one."""
    buf = bytearray(MiB)

    def step() -> float:
        done = 0
        with open(root / "reads" / "big", "rb", buffering=0) as f:
            while n := f.readinto(buf):
                done += n
        return done / MB

    step()
    return step, lambda: None


FIGURES: list[tuple[str, str, Callable[[Path, ReadPlan], tuple[Step, Callable[[], None]]]]] = [
    ("stat", "stats/s", stats),
    ("rand4k_read", "reads/s", random_reads),
    ("seq_read_again", "MB/s", sequential),
]


def measure(make: Callable[[Path, ReadPlan], tuple[Step, Callable[[], None]]],
            roots: dict[str, Path], plan: ReadPlan) -> dict[str, float]:
    """The rate of *make*'s steps on each root, over SLICES turns each."""
    runners = {target: make(root, plan) for target, root in roots.items()}
    done = dict.fromkeys(roots, 0.0)
    spent = dict.fromkeys(roots, 0.0)
    try:
        for turn in range(SLICES):
            for target in (list(roots) if turn % 2 == 0 else list(reversed(roots))):
                step, start = runners[target][0], now()
                while now() - start < plan.seconds / SLICES:
                    done[target] += step()
                spent[target] += now() - start
    finally:
        for _, close in runners.values():
            close()
    return {target: done[target] / spent[target] for target in roots}


def prepare(mount: Path, plan: ReadPlan) -> None:
    """The tree the figures read, written through the primary."""
    d = mount / "reads"
    d.mkdir()
    for i in range(plan.files):
        (d / f"f{i:05}").write_bytes(b"x" * 100)
    chunk = os.urandom(MiB)
    with open(d / "big", "wb") as f:
        for _ in range(plan.big // MiB):
            f.write(chunk)
    (mount / "load").mkdir()


class Load:
    """A writer on the primary, in a process of its own (so it gets its share of the
    machine), closing a set every SET_INTERVAL with ``replfs checkpoint``. Each set
    writes ``tick``, which holds its number, and one in four also one of LOAD_FILES
    files of 4 KiB. ``rate``: sets a second, once stopped."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.rate = 0.0

    def __enter__(self) -> Load:
        self.proc = subprocess.Popen([sys.executable, __file__, "load", str(self.mount)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self

    def __exit__(self, *_: object) -> None:
        out, _err = self.proc.communicate(b"", timeout=60)  # end of input: stop
        if self.proc.returncode != 0:
            raise RuntimeError(f"the load writer failed (exit {self.proc.returncode})")
        sets, seconds = map(float, out.split())
        self.rate = sets / seconds


def _stop_at_end_of_input() -> threading.Event:
    """An event set once this process's input ends (its parent says stop)."""
    stop = threading.Event()

    def wait() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait, daemon=True).start()
    return stop


def _load(mount: Path) -> None:
    """The Load's process: write and close sets until its input ends."""
    from repl import control

    stop = _stop_at_end_of_input()
    block = os.urandom(4096)
    sets, started = 0, now()
    while not stop.wait(max(0.0, started + sets * SET_INTERVAL - now())):
        i = sets + 1
        if i % 4 == 0:
            (mount / "load" / f"w{i // 4 % LOAD_FILES:02}").write_bytes(block)
        (mount / "load" / "tick").write_bytes(b"%012d" % i)
        control.request(control.socket_path(mount), "checkpoint", timeout=30)
        sets = i
    print(sets, now() - started)


def visibility(mount: Path, replica: Path, standby: Path, seconds: float) -> list[float]:
    """Seconds from the replica directory showing each set's tick to the standby
    showing it, while the Load runs. A process watches each (a read of the standby
    waits while a set is applied, and must not hide the replica's moment); both
    take their times from one clock, the machine's monotonic one."""
    watchers = {root: subprocess.Popen([sys.executable, __file__, "watch", str(root)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                for root in (replica, standby)}
    with Load(mount):
        time.sleep(seconds)
    seen: dict[Path, dict[int, float]] = {}
    for root, proc in watchers.items():
        out, _ = proc.communicate(b"", timeout=60)  # end of input: stop
        seen[root] = {int(n): float(t) for n, t in map(bytes.split, out.splitlines())}
    return [at - seen[replica][n] for n, at in seen[standby].items() if n in seen[replica]]


def _watch(root: Path) -> None:
    """A visibility watcher's process: when each tick first shows under *root*."""
    stop = _stop_at_end_of_input()
    seen: dict[int, float] = {}
    while not stop.is_set():
        try:
            raw = (root / "load" / "tick").read_bytes()
        except FileNotFoundError:
            continue
        if len(raw) == 12:  # else the replica is between truncate and write
            seen.setdefault(int(raw), time.monotonic())
    for n, at in seen.items():
        print(n, at)


def run(mount: Path, replica: Path, standby: Path, plan: ReadPlan,
        checkpoint: Callable[[Path], int], say: Callable[[str], None]) -> dict[str, Any]:
    """The figures; *checkpoint* closes a set and waits until it is applied."""
    prepare(mount, plan)
    checkpoint(mount)
    results: dict[str, dict[str, list[float]]] = {}
    roots = {"native": replica, "standby": standby}
    for round_ in range(plan.rounds):
        for load in (False, True):
            for key, unit, make in FIGURES:
                name = f"{key}_{'load' if load else 'idle'}"
                got = results.setdefault(name, {"native": [], "standby": [], "sets_per_s": []})
                if load:
                    with Load(mount) as writer:
                        rates = measure(make, roots, plan)
                    got["sets_per_s"].append(writer.rate)
                else:
                    rates = measure(make, roots, plan)
                for target, rate in rates.items():
                    got[target].append(rate)
                extra = f"  ({got['sets_per_s'][-1]:.0f} sets/s)" if load else ""
                say(f"  round {round_ + 1}  {name:<20} native {rates['native']:>12,.0f}  "
                    f"standby {rates['standby']:>12,.0f} {unit}  ratio "
                    f"{rates['standby'] / rates['native']:.3f}{extra}")
    out: dict[str, Any] = {}
    for key, unit, _ in FIGURES:
        for phase in ("idle", "load"):
            got = results[f"{key}_{phase}"]
            ratios = [s / n for s, n in zip(got["standby"], got["native"], strict=True)]
            entry = {"unit": unit, "native": round(statistics.median(got["native"]), 1),
                     "standby": round(statistics.median(got["standby"]), 1),
                     "ratio": round(statistics.median(ratios), 4),
                     "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4)}
            if got["sets_per_s"]:
                entry["sets_per_s"] = round(statistics.median(got["sets_per_s"]), 1)
            out[f"{key}_{phase}"] = entry
    delays = visibility(mount, replica, standby, max(2.0, plan.seconds * 4))
    ordered = sorted(delays)
    out["visibility"] = {
        "sets": len(delays),
        "p50_ms": round(ordered[len(ordered) // 2] * 1e3, 2) if delays else None,
        "p99_ms": round(ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)] * 1e3, 2)
        if delays else None,
        "max_ms": round(ordered[-1] * 1e3, 2) if delays else None,
    }
    say(f"  visibility after apply: {len(delays)} sets, p50 {out['visibility']['p50_ms']} ms, "
        f"p99 {out['visibility']['p99_ms']} ms")
    return out


def table(reads: dict[str, Any]) -> list[str]:
    rows = [("standby read", "unit", "native", "standby", "ratio", "spread", "load")]
    for key, entry in reads.items():
        if key == "visibility":
            continue
        load = f"{entry['sets_per_s']:.0f} sets/s" if "sets_per_s" in entry else "idle"
        rows.append((key, entry["unit"], f"{entry['native']:,.1f}", f"{entry['standby']:,.1f}",
                     f"{entry['ratio']:.3f}", f"{entry['ratio_min']:.2f}-{entry['ratio_max']:.2f}",
                     load))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i in (0, 1, 6) else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    v = reads["visibility"]
    lines.append("ratio: the secondary's cached standby mount / the replica directory read "
                 "natively; spread: lowest-highest ratio over the rounds")
    lines.append(f"a set's visibility on the standby after the replica directory shows it: "
                 f"p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, max {v['max_ms']} ms "
                 f"({v['sets']} sets, one closed every {SET_INTERVAL * 1e3:.0f} ms)")
    return lines


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if sys.argv[1:2] == ["load"]:
        _load(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["watch"]:
        _watch(Path(sys.argv[2]))
