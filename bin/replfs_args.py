"""replfs's command line: each subcommand's flags, read over the command's section
of ``--config FILE``, and a failure said in one line on stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from fs.prune import MAX_INODES
from repl import config, tls
from repl.config import address, count, iqn, level, positive, secondary_address, size
from repl.iscsi.names import DEFAULT_IQN
from repl.primary.semisync import FSYNC_TIMEOUT
from repl.primary.sender import COMPRESS_LEVEL
from repl.protocol import MAX_STREAMS

DESCRIPTION = "replfs: replicate a directory to standby hosts in crash-consistent data sets."


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


class Version(argparse.Action):
    """``--version``: print ``version()`` and exit. Worked out only when asked (it
    loads pyfuse3 and libfuse)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> NoReturn:
        print(version())
        raise SystemExit(0)


def version() -> str:
    """What runs, as a bug report wants it: replfs's version, the link's protocol and the
    journal's record format, and the Python, pyfuse3 and libfuse it runs on."""
    import platform

    import pyfuse3

    from repl.protocol import PROTOCOL_VERSION
    from repl.version import VERSION
    from store.records import FORMAT_VERSION

    return (f"replfs {VERSION} (link protocol {PROTOCOL_VERSION}, record format "
            f"{FORMAT_VERSION}; Python {platform.python_version()}, pyfuse3 "
            f"{pyfuse3.__version__}, libfuse {libfuse_version()})")


def libfuse_version() -> str:
    """The version of the libfuse this process loaded with pyfuse3 (bin/_bootstrap.sh may
    have built one newer than the system's), or "unknown"."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/libfuse3.so" in line}
    for path in sorted(paths):
        pkgversion = ctypes.CDLL(path).fuse_pkgversion
        pkgversion.restype = ctypes.c_char_p
        return str(pkgversion().decode())
    return "unknown"


def build_parser() -> Parser:
    parser = Parser(prog="replfs", description=DESCRIPTION)
    parser.add_argument("--version", action=Version,
                        help="print the versions of replfs and of what it runs on, and exit")
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

    def inodes_option(p: Parser) -> None:
        p.add_argument("--max-inodes", type=count, default=MAX_INODES, metavar="N",
                       help="keep the mount's table of files the kernel knows near N: past "
                            "it, the kernel forgets those looked up first (looked up again "
                            f"when used); about 400 bytes each (default {MAX_INODES})")

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
    p.add_argument("--fsync", choices=("local", "received", "remote"), default="local",
                   help="when an fsync returns: once durable here (local, the default), or "
                        "also received (received: in its memory, DRBD's protocol B) or "
                        "staged on its disk (remote) by every secondary that is connected "
                        "and caught up")
    p.add_argument("--fsync-timeout", type=positive, default=FSYNC_TIMEOUT,
                   metavar="SECONDS",
                   help="with --fsync remote or received, how long an fsync waits for a secondary "
                        "before fsyncs go on without it until it catches up "
                        f"(default {FSYNC_TIMEOUT:g})")
    inodes_option(p)
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
    inodes_option(p)
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
    p.add_argument("--fsync", choices=("local", "received", "remote"), default="local",
                   help="as a primary: when an fsync returns, as replfs primary --fsync "
                        "(received, remote: also received, staged by every node in step)")
    p.add_argument("--fsync-timeout", type=positive, default=FSYNC_TIMEOUT,
                   metavar="SECONDS",
                   help="as a primary with --fsync remote or received: as replfs primary "
                        f"--fsync-timeout (default {FSYNC_TIMEOUT:g})")
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
    inodes_option(p)
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
    p.add_argument("--outdated", action="store_true",
                   help="a replica catching up (a sync of what it missed under way): "
                        "promote it at the last set it applied whole, losing the rest")
    p.add_argument("--force", action="store_true",
                   help="promote even while a primary is connected to this secondary "
                        "(it then goes on as a second primary until it is stopped)")

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
