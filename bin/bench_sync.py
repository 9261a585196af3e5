"""``bin/bench --initial-sync``: a new standby of an existing tree, against a copy.

A tree of small files in 200 directories (100,000 files of 2 KiB; ``--files``
sets how many, ``--quick`` 10,000) is copied by ``rsync -a`` and by ``cp -a``
to fresh directories on the same disk, each timed up to the end of a
``syncfs`` (the copy is on disk). Then a replfs primary is started on a copy
of the tree with a fresh secondary, and the initial sync is timed from the
primary's start until ``replfs checkpoint --wait`` returns: the secondary
applied the whole tree and synced it. The rounds take turns (rsync, cp,
replfs), each round on fresh directories; the figures are printed round by
round, then the medians with the range of the rounds, and the ratio of replfs
to rsync. Peak resident memory of both daemons (VmHWM) is given too.

Nothing is removed until the end (then everything is, also on Ctrl-C or
failure): ext4 without a journal skips inodes freed in the last minute or
more when it makes a file, scanning past each one, and a copy made right
after 100,000 files were removed took three times as long (rsync -a 17.0 s
against 5.5-6.1 s). Each copy gets inodes no one just freed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import Daemon, ask, checkpoint, say, syncfs, unmount
from demo import links

DIRS = 200
FILE_BYTES = 2048


def make_tree(root: Path, files: int) -> None:
    """*files* files of FILE_BYTES in DIRS directories, on disk."""
    data = os.urandom(FILE_BYTES * 64)
    for d in range(DIRS):
        (root / f"d{d:03}").mkdir(parents=True)
    for n in range(files):
        at = (n * 97) % (len(data) - FILE_BYTES)
        with open(root / f"d{n % DIRS:03}" / f"f{n:07}", "wb") as f:
            f.write(data[at : at + FILE_BYTES])
    syncfs(root)


def timed_copy(command: list[str], dest: Path) -> float:
    """Run a copy, then sync the filesystem; seconds taken by both."""
    began = time.monotonic()
    subprocess.run(command, check=True)
    syncfs(dest)
    return time.monotonic() - began


def replfs_sync(tmp: Path, tree: Path, name: str) -> tuple[float, float, float, int]:
    """Start a secondary, then a primary on *tree* replicating to it; seconds until the
    secondary applied the whole tree, both daemons' peak memory (MiB) and the set."""
    primary_tls, secondary_tls = links(tmp / name)
    replica, mount = tmp / f"{name}-replica", tmp / f"{name}-mnt"
    mount.mkdir()
    sec = Daemon(f"{name}-secondary", ["secondary", str(replica), "--listen", "127.0.0.1:0",
                                       *secondary_tls], tmp / f"{name}-secondary.log",
                 "listening on")
    pri: Daemon | None = None
    sec.start()
    try:
        port = int(sec.tail().split("listening on 127.0.0.1:")[-1].split()[0])
        began = time.monotonic()
        pri = Daemon(f"{name}-primary", ["primary", str(tree), str(mount), "--secondary",
                                         f"127.0.0.1:{port}", *primary_tls],
                     tmp / f"{name}-primary.log", "serving")
        pri.start()
        checkpoint(mount, 3600)  # waits for the sync set, which begins once the secondary is in
        took = time.monotonic() - began
        applied = int(ask(replica, "status")["last_applied"])
        status = ask(mount, "status")
        if status.get("mode") != "streaming":
            raise RuntimeError(f"the primary is still in mode {status.get('mode')} after the "
                               "checkpoint")
        want, have = count_files(tree), count_files(replica)
        if have != want:
            raise RuntimeError(f"the checkpoint returned, but the replica holds {have:,} files "
                               f"of {want:,}")
        return took, pri.peak_mib(), sec.peak_mib(), applied
    finally:
        if pri is not None:
            pri.stop()
        sec.stop()
        unmount(mount)


def count_files(root: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench --initial-sync",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--initial-sync", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--files", type=int, metavar="N",
                        help="files in the tree (default 100,000; 10,000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a tree of 10,000 files")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="times round rsync, cp and replfs (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    files = args.files or (10_000 if args.quick else 100_000)
    if files < 1 or args.rounds < 1:
        parser.error("--files and --rounds must be at least 1")
    if shutil.which("rsync") is None:
        say("bench: rsync is not installed (apt-get install rsync)")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="replfs-bench-sync-"))
    st = os.statvfs(tmp)
    # A round keeps three copies (a 4 KiB block a file), the sync's journal and its
    # staging: about 20 KB a file. Nothing is removed before the end (the module's doc).
    need = files * (4096 + 20_000 * args.rounds)
    if st.f_bavail * st.f_frsize < need:
        os.rmdir(tmp)
        say(f"bench: {files:,} files for {args.rounds} round(s) need about {need / 1e9:.1f} GB "
            f"free in {tmp.parent}; it has {st.f_bavail * st.f_frsize / 1e9:.1f}")
        return 1
    figures: dict[str, list[float]] = {"rsync": [], "cp": [], "replfs": []}
    peaks: dict[str, list[float]] = {"primary": [], "secondary": []}
    try:
        tree = tmp / "tree"
        say(f"making a tree of {files:,} files of {FILE_BYTES} bytes in {DIRS} directories "
            f"in {tree}")
        make_tree(tree, files)
        for round_ in range(args.rounds):
            say(f"round {round_ + 1} of {args.rounds}")
            dest = tmp / f"rsync-{round_}"
            figures["rsync"].append(timed_copy(["rsync", "-a", f"{tree}/", str(dest)], dest))
            say(f"  rsync -a   {figures['rsync'][-1]:6.1f} s")
            dest = tmp / f"cp-{round_}"
            figures["cp"].append(timed_copy(["cp", "-a", str(tree), str(dest)], dest))
            say(f"  cp -a      {figures['cp'][-1]:6.1f} s")
            took, pri, sec, applied = replfs_sync(tmp, dest, f"replfs-{round_}")
            figures["replfs"].append(took)
            peaks["primary"].append(pri)
            peaks["secondary"].append(sec)
            say(f"  replfs     {took:6.1f} s  ({files / took:,.0f} files/s, applied as set "
                f"{applied}; peak memory primary {pri:.0f} MiB, secondary {sec:.0f} MiB)")
    except KeyboardInterrupt:
        say("\nbench: interrupted; cleaning up")
        return 130
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        say(f"\nbench: failed: {exc}")
        return 1
    finally:
        if any(os.path.ismount(m) for m in tmp.glob("*-mnt")):
            say(f"bench: something is still mounted; left {tmp} in place")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    ratio = statistics.median(figures["replfs"]) / statistics.median(figures["rsync"])
    if args.json:
        print(json.dumps({"files": files, "file_bytes": FILE_BYTES, "seconds": figures,
                          "peak_MiB": peaks, "replfs_over_rsync": round(ratio, 2)}, indent=2))
    else:
        print(f"initial sync of {files:,} files of {FILE_BYTES} bytes, {args.rounds} "
              f"round(s), medians (range):")
        for key in ("rsync", "cp", "replfs"):
            print(f"  {key:<8} {median_range(figures[key])}")
        print(f"  replfs / rsync -a: {ratio:.1f}x; peak memory primary "
              f"{max(peaks['primary']):.0f} MiB, secondary {max(peaks['secondary']):.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
