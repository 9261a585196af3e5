"""The config file: every option of every command, in TOML, under the command's name.

A deployment is described in one file, for example::

    [primary]
    backing = "/srv/data"
    mountpoint = "/mnt/data"
    secondary = "beta:7070"

    [secondary]
    replica = "/srv/replica"
    listen = "0.0.0.0:7070"

``replfs primary --config FILE`` reads ``[primary]``; ``replfs tls issue
--config FILE`` reads ``[tls.issue]``. A key is an option's long name
without the dashes (``set-interval``) or a positional's name (``backing``);
a flag on the command line wins over the file. Relative paths in the file
are relative to the file's own directory.

What a key may hold is read off the command's parser (the value types
below, choices, flags), so the file and the flags cannot drift apart. Each
bad key, type or value is reported in one line that names the file, the
section, the key and what is allowed (ConfigError).
"""

from __future__ import annotations

import argparse
import errno
import itertools
import math
import os
import socket
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from repl.errors import UsageError
from repl.fc.names import is_fcip
from repl.fc.names import parse_url as parse_fcip_url
from repl.iscsi.names import check_iqn, is_iscsi, parse_url

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConfigError(UsageError):
    """The config file cannot be used as written."""


# The value types of the command line, shared with the file.

def size(text: str) -> int:
    """A size in bytes, at least 1: ``4096``, ``64M``, ``1GiB``."""
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if text and text[-1] in _UNITS:
            value = int(float(text[:-1]) * _UNITS[text[-1]])
        else:
            value = int(text)
    except (ValueError, OverflowError):  # OverflowError: inf or nan
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64M)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return value


def positive(text: str) -> float:
    """A number above zero (seconds, mostly)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def count(text: str) -> int:
    """A whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def level(text: str) -> int:
    """A compression level: 0 (off) to 19."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value <= 19:
        raise argparse.ArgumentTypeError(f"must be 0 (off) to 19: {text!r}")
    return value


def address(text: str) -> str:
    """HOST:PORT, returned as given once it parses (port 0 picks a free one)."""
    _, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (for example "
                                         "127.0.0.1:7070)")
    return text


def secondary_address(text: str) -> str:
    """HOST:PORT (replfs frames), iscsi://HOST:PORT/IQN or fcip://HOST:PORT; returned as
    given."""
    if is_iscsi(text) or is_fcip(text):
        try:
            parse_url(text) if is_iscsi(text) else parse_fcip_url(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return address(text)


def iqn(text: str) -> str:
    """An iSCSI name: iqn.YYYY-MM.reversed.domain[:anything]."""
    try:
        return check_iqn(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_apart(*dirs: tuple[str, Path]) -> None:
    """Raise UsageError unless no two of *dirs* ((role, path): "the mountpoint", m) are
    the same directory or one within the other. A mount over its own tree serves
    itself and hangs every caller; replfs's state inside a tree is replicated with it,
    and emptied by an initial sync; a tree inside the mountpoint is hidden by it."""
    named = [(f"{role} {path}", os.path.realpath(path)) for role, path in dirs]
    for (a, a_real), (b, b_real) in itertools.permutations(named, 2):
        if a_real == b_real:
            raise UsageError(f"{a} and {b} are the same directory; give each its own")
        if a_real.startswith(b_real.rstrip("/") + "/"):
            raise UsageError(f"{a} is inside {b}; put it elsewhere")


def cannot_bind(where: str, exc: OSError) -> str:
    """Why *where* (HOST:PORT) could not be bound, and what to do, in one line."""
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {where}: no such host ({exc.strerror}); give an address"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: not an address of this host"
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: the port is in use; pick another port or stop "
                "what uses it")
    return f"cannot listen on {where}: {exc.strerror or exc}"


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT as (host, port); an empty host is loopback. Raises UsageError."""
    try:
        address(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(str(exc)) from None
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


# What a TOML value may be, for each value type of the command line.
_TOML_TYPES: dict[Any, tuple[type, ...]] = {
    None: (str,), str: (str,), Path: (str,), address: (str,), secondary_address: (str,),
    iqn: (str,),
    int: (int,), count: (int,), level: (int,), positive: (int, float), size: (int, str),
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
           ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Each command that runs something, as (its path of names, its parser)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaves(sub, (*path, name))


def keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The keys a command's section may hold: its options and positionals, by key."""
    out = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest in ("help", "config"):
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        out[longs[0][2:] if longs else action.dest.replace("_", "-")] = action
    return out


def load(path: Path) -> dict[str, Any]:
    """The file's tables, parsed. Raises ConfigError if it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None


def section(path: Path, doc: dict[str, Any], command: tuple[str, ...],
            parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The values ``[command]`` of *doc* holds, by argparse dest, checked and converted.

    A missing section is empty. Raises ConfigError naming the first bad key.
    """
    name = ".".join(command)
    table: Any = doc
    for part in command:
        table = table.get(part, {}) if isinstance(table, dict) else None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table of keys")
    allowed = keys(parser)
    out = {}
    for key, value in table.items():
        action = allowed.get(key)
        if action is None:
            raise ConfigError(f"{path}: [{name}] unknown key {key!r}; allowed: "
                              f"{', '.join(allowed) or 'none'}")
        out[action.dest] = _value(path, f"[{name}] {key}", action, value)
    return out


def _value(path: Path, where: str, action: argparse.Action, value: Any) -> Any:
    """*value* as the command line would have it for *action*, or ConfigError."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{path}: {where}: {why}")

    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if type(value) is not bool:
            raise refuse(f"must be true or false, not {_kind(value)}")
        return value
    if isinstance(action, argparse._AppendAction):  # given once per value on the command line
        values = value if isinstance(value, list) else [value]
        return [_one(path, where, action, v) for v in values]
    return _one(path, where, action, value)


def _one(path: Path, where: str, action: argparse.Action, value: Any) -> Any:
    """One value as the command line would have it for *action*, or ConfigError."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{path}: {where}: {why}")

    wanted = _TOML_TYPES.get(action.type, (str,))
    if type(value) not in wanted:
        many = " (or an array of them)" if isinstance(action, argparse._AppendAction) else ""
        raise refuse(f"must be {' or '.join(_TYPE_NAMES[t] for t in wanted)}{many}, "
                     f"not {_kind(value)}")
    if action.choices is not None and value not in action.choices:
        raise refuse(f"{value!r} is not one of: {', '.join(map(str, action.choices))}")
    if action.type is Path:
        return path.parent / Path(value).expanduser()
    convert: Callable[[str], Any] = action.type or str  # type: ignore[assignment]
    try:
        return convert(str(value))
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise refuse(str(exc)) from None


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{_TYPE_NAMES.get(type(value), type(value).__name__)} ({value!r})"


def check(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """Validate every section of the file at *path*; returns the sections' names.

    Raises ConfigError for the first unknown section or bad key.
    """
    doc = load(path)
    commands = {c: p for c, p in leaves(parser) if "--config" in p._option_string_actions}
    found = []

    def visit(table: dict[str, Any], prefix: tuple[str, ...]) -> None:
        for key, value in table.items():
            here = (*prefix, key)
            if here in commands:
                section(path, doc, here, commands[here])
                found.append(".".join(here))
            elif isinstance(value, dict) and any(c[:len(here)] == here for c in commands):
                visit(value, here)
            else:
                known = sorted({".".join(c) for c in commands if c[:len(prefix)] == prefix})
                where = f"[{'.'.join(prefix)}] " if prefix else ""
                raise ConfigError(f"{path}: {where}unknown section or key {key!r}; "
                                  f"the sections are the commands: {', '.join(known)}")

    visit(doc, ())
    return found
