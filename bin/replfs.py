"""replfs: replicate a directory to standby hosts in crash-consistent data sets.

The command-line front: reads the arguments (replfs_args.py), wires fs/,
repl/ and store/ together, and turns every expected failure into one line on
stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replfs_args import JsonLines, build_parser, fail, parse

from fs.primary_daemon import PrimaryConfig, run_primary
from fs.standby_daemon import run_secondary_standby, run_standby
from repl import config, control
from repl.iscsi import chap
from repl.protocol import MAX_STREAMS
from repl.secondary.promote import promote
from repl.secondary.run import default_state_dir, pause, resume, run_secondary, staging_dir_of
from repl.verify import verify
from store import libc
from store.dump import dump
from store.errors import ReplfsError

# How long promote lets a primary that died a moment ago take to drop its streams.
CONNECTED_GRACE = 3.0


def keep_large_buffers() -> None:
    """Let glibc reuse freed buffers of write size instead of giving each back.

    A record carries up to 1 MiB of write data. By default glibc maps every
    buffer that large afresh and unmaps it when freed, so each copy of it
    pays a page fault per 4 KiB: ten times the cost of the copy. Kept in the
    heap (with at most 8 MiB of free heap held back), they are reused.
    """
    libc.mallopt(libc.M_MMAP_THRESHOLD, 4 << 20)
    libc.mallopt(libc.M_TRIM_THRESHOLD, 8 << 20)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    faulthandler.enable()  # a crash in C code leaves its Python stack in the log
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for chatty in ("httpx", "httpcore"):  # a line per etcd request otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if getattr(args, "log_format", "text") == "json":
        logging.getLogger().handlers[0].setFormatter(JsonLines())
        sys.excepthook = lambda kind, exc, tb: logging.getLogger("replfs").critical(
            "unexpected failure: %r", exc, exc_info=(kind, exc, tb))
    if args.command in ("primary", "secondary", "mount"):
        keep_large_buffers()
    try:
        if args.command == "primary":
            if not 1 <= args.streams <= MAX_STREAMS:
                args.parser.error(f"--streams must be from 1 to {MAX_STREAMS}")
            trio.run(run_primary, PrimaryConfig(
                args.backing, args.mountpoint, journal=args.journal,
                set_interval=args.set_interval, set_bytes=args.set_bytes,
                journal_max=args.journal_max, secondaries=args.secondary or [],
                streams=args.streams, scramble=args.scramble,
                stall_seconds=args.stall_seconds, tls=args.tls, peers=args.peer or [],
                insecure=args.insecure, metrics=args.metrics,
                compress_level=args.compress_level, max_rate=args.max_rate or None,
                chap=args.chap, dynamic=args.fenced, fenced=args.fenced, fsync=args.fsync,
                fsync_timeout=args.fsync_timeout, max_inodes=args.max_inodes))
        elif args.command == "secondary":
            if args.listen is None and args.iscsi is None and args.fcip is None:
                args.parser.error("the following arguments are required: --listen, --iscsi "
                                  "or --fcip (on the command line or in [secondary] of "
                                  "--config FILE)")
            if args.mount:
                trio.run(functools.partial(
                    run_secondary_standby, args.replica, args.mount, args.listen,
                    args.staging, args.tls, args.peer, args.insecure, args.rejoin,
                    args.metrics, args.iscsi, args.iqn, args.chap, args.fcip,
                    max_inodes=args.max_inodes))
            else:
                trio.run(functools.partial(
                    run_secondary, args.replica, args.listen, args.staging, args.tls,
                    args.peer, args.insecure, args.rejoin, args.metrics, iscsi=args.iscsi,
                    iqn=args.iqn, chap_file=args.chap, fcip=args.fcip))
        elif args.command == "node":
            from repl.cluster.node import NodeConfig, run_node

            if args.name is None or args.listen is None:
                args.parser.error("the following arguments are required: --name and --listen "
                                  "(on the command line or in [node] of --config FILE)")
            trio.run(run_node, NodeConfig(
                args.name, args.data, args.mount, args.listen, args.etcd or [],
                cluster=args.cluster, advertise=args.advertise, tls=args.tls,
                insecure=args.insecure, peers=args.peer or [], lease_ttl=args.lease_ttl,
                set_interval=args.set_interval, journal_max=args.journal_max,
                fsync=args.fsync, fsync_timeout=args.fsync_timeout))
        elif args.command == "cluster":
            from repl.cluster.members import render
            from repl.cluster.members import show as cluster_status

            out = trio.run(cluster_status, args.etcd, args.cluster)
            print(json.dumps(out) if args.json else render(out))
        elif args.command == "mount":
            trio.run(run_standby, args.replica, args.mountpoint, args.staging, args.max_inodes)
        elif args.command == "verify":
            return 1 if verify(args.primary, args.replica, sys.stdout, args.wait) else 0
        elif args.command == "promote":
            if not args.force and (peer := primary_connected(args.replica)) is not None:
                fail(f"the primary {peer} is connected to the secondary of {args.replica}: "
                     "promoting now would make two primaries; stop that primary (or cut it "
                     "off) first, or promote --force")
            staging = staging_dir_of(args.replica, args.staging)
            journal = args.journal or default_state_dir(args.replica) / "journal"
            started = time.monotonic()
            done = trio.run(functools.partial(promote, args.replica, staging, journal,
                                              outdated=args.outdated))
            print(f"promoted {args.replica} to generation {done.generation} in "
                  f"{time.monotonic() - started:.2f}s: applied sets "
                  f"{done.applied_from + 1}..{done.applied_to}"
                  if done.applied_to > done.applied_from else
                  f"promoted {args.replica} to generation {done.generation}: "
                  f"no staged set was waiting (at set {done.applied_to})")
            if done.dropped:
                print(f"dropped incomplete sets {done.dropped} (never whole on this node)")
            print(f"start it with: replfs primary {args.replica} MOUNTPOINT")
        elif args.command == "pause":
            print(pause(args.replica, args.staging, args.timeout))
        elif args.command == "resume":
            print(resume(args.replica, args.staging))
        elif args.command == "checkpoint":
            print(ask(args.mountpoint, "checkpoint", wait=args.wait)["set"])
        elif args.command == "status":
            reply = ask(args.target, "status")
            if args.json:
                print(json.dumps(reply))
            else:
                for key, value in reply.items():
                    print(f"{key.replace('_', ' ')}: {value}")
        elif args.command == "demo":
            if args.cluster:
                from demo_cluster import run as cluster_demo

                return cluster_demo()
            from demo import run as demo

            return demo(args.transport)
        elif args.command == "chap":
            chap.make(args.file, args.initiator, args.target)
            print(f"made {args.file}: copy it to both hosts (mode 0600) and pass --chap "
                  f"{args.file} to both daemons")
        elif args.command == "dump":
            dump(args.path, sys.stdout)
        elif args.command == "tls":
            tls_command(args)
        elif args.command == "config":
            sections = config.check(args.file, build_parser())
            print(f"{args.file}: ok ({', '.join(f'[{s}]' for s in sections) or 'empty'})")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as exc:
        why = expected(exc)
        if why is None:
            raise
        logging.getLogger("replfs").debug("failed", exc_info=exc)  # in full, with -v
        fail(why)
    return 0


def expected(exc: BaseException) -> str | None:
    """What to say, in one line, about a failure the user can act on; None for a bug
    (whose traceback is then logged).

    Expected: replfs's own errors, and an OSError on a named path (a journal,
    staging or certificate directory that cannot be made or used as given).
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]  # raised inside a nursery
    if isinstance(exc, ReplfsError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"cannot use {exc.filename}: {exc.strerror or exc}"
    return None


def tls_command(args: argparse.Namespace) -> None:
    from repl import tlsca  # cryptography, which no daemon loads

    if args.tls_command == "init":
        cert = tlsca.init_ca(args.dir)
        print(f"made the cluster's CA: {cert} and {cert.with_suffix('.key')} (keep ca.key "
              "on this host only)")
        print(f"next, for each node: replfs tls issue {args.dir} NAME")
    else:
        cert = tlsca.issue(args.dir, args.name, days=args.days)
        print(f"made {cert} and {cert.with_suffix('.key')}, valid for {args.days} days")
        print(f"copy them and {args.dir / 'ca.pem'} to {args.name}, into a directory only "
              f"root can read; its daemon takes --tls THATDIR/{args.name}")


def primary_connected(replica: Path) -> str | None:
    """The node of a primary connected to the secondary serving *replica*, if one still is
    after CONNECTED_GRACE seconds (a primary killed a moment ago drops its streams)."""
    deadline = time.monotonic() + CONNECTED_GRACE
    while True:
        try:
            st = control.request(control.socket_path(replica), "status", timeout=10)
        except (OSError, ValueError):
            return None  # no secondary running: promote goes on, or says why not
        if not st.get("connected_streams"):
            return None
        if time.monotonic() >= deadline:
            return str(st.get("peer") or "?")
        time.sleep(0.1)  # a status poll: the secondary has no event to wait on from here


def ask(target: Path, cmd: str, **fields: object) -> dict[str, object]:
    path = control.socket_path(target)
    timeout = 30.0 + float(fields.get("wait") or 0)  # type: ignore[arg-type]
    try:
        reply = control.request(path, cmd, timeout=timeout, **fields)
    except (FileNotFoundError, ConnectionRefusedError):
        fail(f"no replfs daemon is serving {target}; start one with 'replfs primary' or "
             "'replfs secondary'")
    except TimeoutError:
        fail(f"the replfs daemon serving {target} did not answer within {timeout:g}s "
             "(stopped, or stuck: see its log)")
    except OSError as exc:
        fail(f"cannot reach the replfs daemon serving {target}: {exc.strerror or exc}")
    except ValueError:
        fail(f"the replfs daemon serving {target} went away without an answer (see its log)")
    if "error" in reply:
        fail(str(reply["error"]))
    return reply


if __name__ == "__main__":
    sys.exit(main())
