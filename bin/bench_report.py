"""``bin/bench``'s output: the figures of every round reduced to medians and ranges
(``report``, the JSON object), and the table printed from them (``table``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import bench_reads
from bench_workloads import WORKLOADS, Plan, Result

JOURNAL_MAX = "4G"
TARGETS = ("native", "replfs", "replfs_replicated", "replfs_remote")
TRANSPORTS = {"frames": "TLS", "iscsi": "iSCSI", "fcip": "FCIP"}


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


# Figures per op or per byte, shown for each target that has them (no ratio): digits.
PER_OP = {"requests_per_op": 2, "cpu_us_per_op": 0, "disk_bytes_per_byte": 2}


def report(results: dict[str, dict[str, list[Result]]], plan: Plan,
           replication: dict[str, float], reads: dict[str, Any], warnings: list[str]
           ) -> dict[str, Any]:
    """The JSON object of a run: each workload's medians, ranges and ratios, the
    replication figures, the standby's reads and the warnings."""
    workloads: dict[str, Any] = {}
    for key, unit, _ in WORKLOADS:
        runs = results[key]
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
            if name in PER_OP:
                continue
            per = {t: round(statistics.median(r.extra[name] for r in runs[t]), 1)
                   for t in TARGETS}
            entry[name] = per
            entry[name + "_range"] = {t: [round(min(r.extra[name] for r in runs[t]), 1),
                                          round(max(r.extra[name] for r in runs[t]), 1)]
                                      for t in TARGETS}
            entry[name.removesuffix("_us") + "_ratio"] = (
                round(per["native"] / per["replfs_replicated"], 4)
                if per["replfs_replicated"] else None)
        for name, digits in PER_OP.items():
            per_target = {t: round(statistics.median(r.extra[name] for r in runs[t]), digits)
                          for t in TARGETS if runs[t] and all(name in r.extra for r in runs[t])}
            if per_target:
                entry[name] = per_target
        if key == "stat":
            entry["files"] = plan.stat_files
        if key == "readdir":
            entry["entries"] = plan.dir_entries
        workloads[key] = entry
    return {"workloads": workloads,
            "replication": {k: round(v, 3) for k, v in replication.items()},
            "standby_reads": reads, "warnings": warnings}


def table(out: dict[str, Any]) -> str:
    rounds = out["machine"].get("rounds", 1)

    def spread(ranges: dict[str, list[float]]) -> tuple[str, ...]:
        return tuple(f"{ranges[t][0]:,.0f}-{ranges[t][1]:,.0f}" for t in TARGETS)

    rows: list[tuple[str, ...]] = [("workload", "unit", "native", "replfs", "replicated",
                                    f"fsync {out['machine'].get('fsync', 'remote')}",
                                    "ratio")]
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
        if "cpu_us_per_op" in entry:
            cpu = entry["cpu_us_per_op"]
            rows.append(("  daemons' CPU", "µs/op", "",
                         *(f"{cpu[t]:,.0f}" if t in cpu else "" for t in TARGETS[1:]), ""))
        if "disk_bytes_per_byte" in entry:
            disk = entry["disk_bytes_per_byte"]
            rows.append(("  disk writes", "B/B",
                         *(f"{disk[t]:.2f}" if t in disk else "" for t in TARGETS), ""))
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
                 f"Python {m['python']}, {m['fs_type']} at {m['tmp_dir']}, "
                 f"a file created in {m['create_us']:,.0f} us"
                 + (f" ({m['create_us_before']:,.0f} before waiting for removed inodes)"
                    if "create_us_before" in m else ""))
    if out["replication"]:
        lines.append("")
        lines.append(f"replication over {TRANSPORTS[m.get('transport', 'frames')]} (secondary "
                     f"on loopback, primary --journal-max {JOURNAL_MAX})")
        for key, value in out["replication"].items():
            shown = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
            lines.append(f"  {key:<26} {shown:>14}")
    if out["standby_reads"]:
        lines.append("")
        lines.extend(bench_reads.table(out["standby_reads"]))
    lines.extend(f"warning: {text}" for text in out["warnings"])
    return "\n".join(lines)
