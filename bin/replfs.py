"""replfs: replicate a directory to standby hosts in crash-consistent data sets.

The command-line front: parses arguments, wires fs/, repl/ and store/
together, and turns every expected failure into one line on stderr and a
non-zero exit.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fs.mount import PrimaryConfig, run_primary, run_secondary_standby, run_standby
from repl import config, control, tls
from repl.config import address, count, iqn, level, positive, secondary_address, size
from repl.iscsi import chap
from repl.iscsi.names import DEFAULT_IQN
from repl.promote import promote
from repl.protocol import MAX_STREAMS
from repl.secondary import default_state_dir, pause, resume, run_secondary, staging_dir_of
from repl.semisync import FSYNC_TIMEOUT
from repl.sender import COMPRESS_LEVEL
from repl.verify import verify
from store import libc
from store.dump import dump
from store.errors import ReplfsError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see '{self.prog} --help')", code=2)


def fail(message: str, code: int = 1) -> NoReturn:
    """Say *message* in one line on stderr (an event, with --log-format json); exit."""
    handlers = logging.getLogger().handlers
    if handlers and isinstance(handlers[0].formatter, JsonLines):
        logging.getLogger("replfs").error("%s", message)
    else:
        print(f"replfs: {message}", file=sys.stderr)
    raise SystemExit(code)


class JsonLines(logging.Formatter):
    """A log record as one JSON object on one line, with stable keys: ``time`` (UTC,
    ISO 8601), ``level``, ``logger``, ``msg``, and ``error`` (a traceback, only for an
    unexpected failure)."""

    def format(self, record: logging.LogRecord) -> str:
        event = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(
                     timespec="milliseconds").replace("+00:00", "Z"),
                 "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            event["error"] = self.formatException(record.exc_info)
        return json.dumps(event)


def build_parser() -> Parser:
    parser = Parser(prog="replfs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    parser.set_defaults(parser=parser)

    def staging_option(p: Parser) -> None:
        p.add_argument("--staging", type=Path, metavar="DIR",
                       help="staging directory (default: .REPLICA.replfs/staging beside REPLICA)")

    def command(name: str, help: str, within: argparse._SubParsersAction[Parser] = sub
                ) -> Parser:
        p: Parser = within.add_parser(name, help=help, description=help)
        p.set_defaults(parser=p, needed=[])  # errors name the subcommand's --help
        return p

    def positional(p: Parser, name: str, metavar: str, **kw: object) -> None:
        """A positional the config file may give instead (checked once both are read)."""
        p.add_argument(name, type=Path, metavar=metavar, nargs="?", **kw)  # type: ignore[arg-type]
        p.set_defaults(needed=[*p.get_default("needed"), name])

    def log_options(p: Parser) -> None:
        p.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
        p.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="one line per event: readable text, or one JSON object with "
                            "the keys time, level, logger, msg (and error) (default text)")

    def chap_option(p: Parser) -> None:
        p.add_argument("--chap", type=Path, metavar="FILE",
                       help="CHAP secrets for iSCSI and FCIP, mode 0600, the same file on "
                            "both hosts (make it with 'replfs chap FILE')")

    def metrics_option(p: Parser) -> None:
        p.add_argument("--metrics", type=address, metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics")

    def link_options(p: Parser, other: str, many: bool = False) -> None:
        p.add_argument("--tls", type=Path, metavar="DIR/NAME",
                       help="TLS as node NAME: DIR/NAME.pem, DIR/NAME.key and DIR/ca.pem "
                            "(see 'replfs tls')")
        if many:
            p.add_argument("--peer", metavar="NAME", action="append",
                           help=f"the node the {other}'s certificate must name (with --tls)"
                                + ("; one per --secondary, in the same order"
                                   if other == "secondary" else "; several: any of them"))
        else:
            p.add_argument("--peer", metavar="NAME",
                           help=f"the node the {other}'s certificate must name (with --tls)")
        p.add_argument("--insecure", action="store_true",
                       help="plain TCP, nobody authenticated, nothing encrypted: loopback only")

    p = command("primary", "mount BACKING at MOUNTPOINT and journal every change")
    positional(p, "backing", "BACKING")
    positional(p, "mountpoint", "MOUNTPOINT")
    p.add_argument("--journal", type=Path, metavar="DIR",
                   help="journal directory (default: .BACKING.replfs/journal beside BACKING)")
    p.add_argument("--set-interval", type=positive, default=1.0, metavar="SECONDS",
                   help="close a data set at least this often (default 1)")
    p.add_argument("--set-bytes", type=size, default=64 << 20, metavar="N",
                   help="close a data set once it holds this much (default 64M)")
    p.add_argument("--journal-max", type=size, default=1 << 30, metavar="N",
                   help="journal budget; past it, a dirty map stands in (default 1G)")
    p.add_argument("--secondary", type=secondary_address, metavar="HOST:PORT",
                   action="append",
                   help="replicate to this secondary: HOST:PORT (replfs frames over TLS), "
                        "iscsi://HOST:PORT/IQN (iSCSI, with --chap) or fcip://HOST:PORT "
                        "(Fibre Channel over FCIP, with --chap); give it once for each "
                        "secondary")
    link_options(p, "secondary", many=True)
    chap_option(p)
    p.add_argument("--streams", type=count, default=4, metavar="N",
                   help=f"parallel TCP streams to the secondary (default 4, at most "
                        f"{MAX_STREAMS})")
    p.add_argument("--compress-level", type=level, default=COMPRESS_LEVEL, metavar="N",
                   help="zstd level (1-19) of the records sent, where the secondary takes "
                        f"them; 0 sends them uncompressed (default {COMPRESS_LEVEL})")
    p.add_argument("--max-rate", type=size, metavar="BYTES/s",
                   help="send at most this many bytes a second to the secondary, e.g. 10M "
                        "(default: no cap)")
    p.add_argument("--stall-seconds", type=positive, default=10.0, metavar="SECONDS",
                   help="report a stall after a backlog makes no progress this long (default 10)")
    p.add_argument("--fsync", choices=("local", "remote"), default="local",
                   help="when an fsync returns: once durable here (local, the default), or "
                        "also staged by every secondary that is connected and caught up "
                        "(remote)")
    p.add_argument("--fsync-timeout", type=positive, default=FSYNC_TIMEOUT,
                   metavar="SECONDS",
                   help="with --fsync remote, how long an fsync waits for a secondary "
                        "before fsyncs go on without it until it catches up "
                        f"(default {FSYNC_TIMEOUT:g})")
    metrics_option(p)
    p.add_argument("--scramble", type=int, metavar="SEED", help=argparse.SUPPRESS)
    # Run by `replfs node`: changes wait for its lease, secondaries are added as they join.
    p.add_argument("--fenced", action="store_true", help=argparse.SUPPRESS)
    log_options(p)

    p = command("secondary", "receive data sets into REPLICA")
    positional(p, "replica", "REPLICA")
    p.add_argument("--listen", type=address, metavar="HOST:PORT",
                   help="address to accept the primary on, replfs frames (port 0 picks a "
                        "free one); this, --iscsi or --fcip is required")
    p.add_argument("--iscsi", type=address, metavar="HOST:PORT",
                   help="also (or only) serve the replica's staging as an iSCSI target here "
                        "(3260 is iSCSI's port), with --chap")
    p.add_argument("--iqn", type=iqn, default=DEFAULT_IQN, metavar="IQN",
                   help=f"the iSCSI target's name (default {DEFAULT_IQN})")
    p.add_argument("--fcip", type=address, metavar="HOST:PORT",
                   help="also (or only) serve the replica's staging as a Fibre Channel (FCP) "
                        "target over FCIP here (3225 is FCIP's port), with --chap")
    staging_option(p)
    link_options(p, "primary", many=True)
    chap_option(p)
    p.add_argument("--rejoin", action="store_true",
                   help="REPLICA is an old primary's tree: follow the new primary, sending "
                        "only what diverged and keeping its own changes aside")
    p.add_argument("--mount", type=Path, metavar="MOUNTPOINT",
                   help="also serve the read-only standby view of REPLICA at MOUNTPOINT, "
                        "cached by the kernel (whole data sets only, as with replfs mount)")
    metrics_option(p)
    log_options(p)

    p = command("node", "serve this host's node of a cluster: the primary or a standby, as "
                        "an etcd lease decides")
    p.add_argument("--name", metavar="NAME", help="this node's name (its certificate's)")
    positional(p, "data", "DATA")
    positional(p, "mount", "MOUNTPOINT")
    p.add_argument("--listen", type=address, metavar="HOST:PORT",
                   help="where this node's secondary listens for the primary")
    p.add_argument("--advertise", type=address, metavar="HOST:PORT",
                   help="where the other nodes reach it (default: --listen)")
    p.add_argument("--etcd", metavar="URL", action="append",
                   help="an etcd client URL, e.g. http://10.0.0.9:2379 (give each)")
    p.add_argument("--cluster", default="replfs", metavar="NAME",
                   help="the cluster's name: its keys are under /replfs/NAME/ (default replfs)")
    p.add_argument("--tls", type=Path, metavar="DIR/NAME",
                   help="TLS as this node: DIR/NAME.pem, DIR/NAME.key and DIR/ca.pem")
    p.add_argument("--peer", metavar="NAME", action="append",
                   help="a node it accepts besides those registered in etcd (give each)")
    p.add_argument("--insecure", action="store_true",
                   help="plain TCP, nobody authenticated, nothing encrypted: loopback only")
    p.add_argument("--lease-ttl", type=positive, default=10.0, metavar="SECONDS",
                   help="the lease's time to live: a dead primary is replaced within about "
                        "this (default 10)")
    p.add_argument("--set-interval", type=positive, default=1.0, metavar="SECONDS",
                   help="as a primary: close a data set at least this often (default 1)")
    p.add_argument("--journal-max", type=size, default=1 << 30, metavar="N",
                   help="as a primary: the journal's budget (default 1G)")
    log_options(p)

    p = command("cluster", "look at a cluster of nodes")
    cluster_sub = p.add_subparsers(dest="cluster_command", required=True, parser_class=Parser)
    p = command("status", "the members, the primary, each node's applied set and lag",
                cluster_sub)
    p.add_argument("--etcd", metavar="URL", action="append",
                   help="an etcd client URL (give each)")
    p.set_defaults(needed=["etcd"])
    p.add_argument("--cluster", default="replfs", metavar="NAME",
                   help="the cluster's name (default replfs)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("mount", "mount a read-only view of REPLICA that shows whole data sets only "
                         "(uncached; see secondary --mount)")
    positional(p, "replica", "REPLICA")
    positional(p, "mountpoint", "MOUNTPOINT")
    staging_option(p)
    log_options(p)

    p = command("verify", "compare a primary with its replica at one data set boundary")
    positional(p, "primary", "MOUNTPOINT|DIR")
    positional(p, "replica", "REPLICA")
    p.add_argument("--wait", type=positive, default=60.0, metavar="SECONDS",
                   help="how long the secondary may take to apply the checkpoint (default 60)")

    p = command("promote", "make REPLICA the new primary's tree (after the primary died)")
    positional(p, "replica", "REPLICA")
    staging_option(p)
    p.add_argument("--journal", type=Path, metavar="DIR",
                   help="the new primary's journal (default: .REPLICA.replfs/journal)")

    for name, text in (("pause", "hold REPLICA (and its standby mount) at its current set"),
                       ("resume", "let REPLICA apply data sets again")):
        p = command(name, text)
        positional(p, "replica", "REPLICA")
        staging_option(p)
        if name == "pause":
            p.add_argument("--timeout", type=positive, default=60.0, metavar="SECONDS",
                           help="give up waiting for a set being applied (default 60)")

    p = command("checkpoint", "close a data set now and print its id")
    positional(p, "mountpoint", "MOUNTPOINT")
    p.add_argument("--wait", type=positive, metavar="SECONDS",
                   help="also wait until the secondary has applied it")

    p = command("status", "show a running daemon's state")
    positional(p, "target", "MOUNTPOINT|REPLICA")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("demo", "run a primary and a secondary on loopback through a crash")
    p.add_argument("--transport", choices=("frames", "iscsi", "fcip"), default="frames",
                   help="replfs frames over TLS (default), iSCSI with mutual CHAP, or Fibre "
                        "Channel over FCIP with DH-CHAP")
    p.add_argument("--cluster", action="store_true",
                   help="three nodes and an etcd instead: the primary killed, another "
                        "elected")

    p = command("tls", "make the cluster's CA and the nodes' certificates")
    tls_sub = p.add_subparsers(dest="tls_command", required=True, parser_class=Parser)
    p = command("init", "make the cluster's CA in DIR: ca.pem and ca.key", tls_sub)
    positional(p, "dir", "DIR")
    p = command("issue", "make NAME.pem and NAME.key in DIR, signed by its CA", tls_sub)
    positional(p, "dir", "DIR")
    p.add_argument("name", metavar="NAME", nargs="?", help="the node's name, e.g. its host name")
    p.set_defaults(needed=["dir", "name"])
    p.add_argument("--days", type=int, default=tls.DEFAULT_DAYS, metavar="N",
                   help=f"how long it is valid (default {tls.DEFAULT_DAYS})")

    p = command("chap", "make a CHAP secrets file (0600) for --chap (iSCSI, FCIP)")
    positional(p, "file", "FILE")
    p.add_argument("--initiator", default="alpha", metavar="NAME",
                   help="the primary's CHAP name (default alpha)")
    p.add_argument("--target", default="beta", metavar="NAME",
                   help="the secondary's CHAP name (default beta)")

    p = command("dump", "print the records of a journal readably")
    positional(p, "path", "PATH")

    for path, leaf in config.leaves(parser):
        leaf.set_defaults(command_path=path)
        leaf.add_argument("--config", type=Path, metavar="FILE",
                          help="read options from this TOML file's section for the command "
                               "(flags win; see docs/replfs.toml)")

    p = command("config", "check a config file")
    config_sub = p.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    p = command("check", "check every section of FILE without starting anything", config_sub)
    p.add_argument("file", type=Path, metavar="FILE")
    return parser


def keep_large_buffers() -> None:
    """Let glibc reuse freed buffers of write size instead of giving each back.

    A record carries up to 1 MiB of write data. By default glibc maps every
    buffer that large afresh and unmaps it when freed, so each copy of it
    pays a page fault per 4 KiB: ten times the cost of the copy. Kept in the
    heap (with at most 8 MiB of free heap held back), they are reused.
    """
    libc.mallopt(libc.M_MMAP_THRESHOLD, 4 << 20)
    libc.mallopt(libc.M_TRIM_THRESHOLD, 8 << 20)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, over the command's section of ``--config FILE`` if given."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "config", None) is not None:
        path = args.command_path
        try:
            values = config.section(args.config, config.load(args.config), path, args.parser)
        except config.ConfigError as exc:
            fail(str(exc))
        # A list given on the command line replaces the file's (argparse would add to it).
        given = {a.dest: getattr(args, a.dest) for a in args.parser._actions
                 if isinstance(a, argparse._AppendAction) and getattr(args, a.dest)}
        args.parser.set_defaults(**values)
        args, extra = parser.parse_known_args(argv)
        for dest, value in given.items():
            setattr(args, dest, value)
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    missing = [(a.option_strings or [a.metavar])[0] for a in args.parser._actions
               if a.dest in args.needed and getattr(args, a.dest) is None]
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)} "
                          f"(on the command line or in [{'.'.join(args.command_path)}] of "
                          "--config FILE)")
    return args


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
                fsync_timeout=args.fsync_timeout))
        elif args.command == "secondary":
            if args.listen is None and args.iscsi is None and args.fcip is None:
                args.parser.error("the following arguments are required: --listen, --iscsi "
                                  "or --fcip (on the command line or in [secondary] of "
                                  "--config FILE)")
            if args.mount:
                trio.run(run_secondary_standby, args.replica, args.mount, args.listen,
                         args.staging, args.tls, args.peer, args.insecure, args.rejoin,
                         args.metrics, args.iscsi, args.iqn, args.chap, args.fcip)
            else:
                trio.run(functools.partial(
                    run_secondary, args.replica, args.listen, args.staging, args.tls,
                    args.peer, args.insecure, args.rejoin, args.metrics, iscsi=args.iscsi,
                    iqn=args.iqn, chap_file=args.chap, fcip=args.fcip))
        elif args.command == "node":
            from repl.node import NodeConfig, run_node

            if args.name is None or args.listen is None:
                args.parser.error("the following arguments are required: --name and --listen "
                                  "(on the command line or in [node] of --config FILE)")
            trio.run(run_node, NodeConfig(
                args.name, args.data, args.mount, args.listen, args.etcd or [],
                cluster=args.cluster, advertise=args.advertise, tls=args.tls,
                insecure=args.insecure, peers=args.peer or [], lease_ttl=args.lease_ttl,
                set_interval=args.set_interval, journal_max=args.journal_max))
        elif args.command == "cluster":
            from repl.members import render
            from repl.members import show as cluster_status

            out = trio.run(cluster_status, args.etcd, args.cluster)
            print(json.dumps(out) if args.json else render(out))
        elif args.command == "mount":
            trio.run(run_standby, args.replica, args.mountpoint, args.staging)
        elif args.command == "verify":
            return 1 if verify(args.primary, args.replica, sys.stdout, args.wait) else 0
        elif args.command == "promote":
            staging = staging_dir_of(args.replica, args.staging)
            journal = args.journal or default_state_dir(args.replica) / "journal"
            started = time.monotonic()
            done = trio.run(promote, args.replica, staging, journal)
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
    if args.tls_command == "init":
        cert = tls.init_ca(args.dir)
        print(f"made the cluster's CA: {cert} and {cert.with_suffix('.key')} (keep ca.key "
              "on this host only)")
        print(f"next, for each node: replfs tls issue {args.dir} NAME")
    else:
        cert = tls.issue(args.dir, args.name, days=args.days)
        print(f"made {cert} and {cert.with_suffix('.key')}, valid for {args.days} days")
        print(f"copy them and {args.dir / 'ca.pem'} to {args.name}, into a directory only "
              f"root can read; its daemon takes --tls THATDIR/{args.name}")


def ask(target: Path, cmd: str, **fields: object) -> dict[str, object]:
    path = control.socket_path(target)
    timeout = 30.0 + float(fields.get("wait") or 0)  # type: ignore[arg-type]
    try:
        reply = control.request(path, cmd, timeout=timeout, **fields)
    except OSError:
        fail(f"no replfs daemon is serving {target}; start one with 'replfs primary'")
    if "error" in reply:
        fail(str(reply["error"]))
    return reply


if __name__ == "__main__":
    sys.exit(main())
