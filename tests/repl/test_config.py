"""The config file: every flag expressible, flags win, bad input named in one line."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from repl import config
from tests.support import ROOT, replfs
from tests.test_cli import assert_one_line_error

EXAMPLE = ROOT / "docs" / "replfs.toml"


def cli() -> Any:
    """bin/replfs_args.py as a module, for replfs's parser and parse()."""
    spec = importlib.util.spec_from_file_location("replfs_args", ROOT / "bin" / "replfs_args.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample(key: str, action: argparse.Action) -> tuple[list[str], Any]:
    """A value for *action*: as command-line words, and as a TOML value."""
    if isinstance(action, argparse._StoreTrueAction):
        return [], True
    if action.choices is not None:
        value: Any = list(action.choices)[-1]
    elif action.type is Path:
        value = f"/x/{key}"
    elif action.type in (config.address, config.secondary_address):
        value = "127.0.0.1:7001"
    elif action.type is config.iqn:
        value = "iqn.2025-01.io.replfs:x"
    elif action.type in (int, config.count, config.level):
        value = 3
    elif action.type is config.positive:
        value = 2.5
    elif action.type is config.size:
        value = "2M"
    else:
        value = f"name-{key}"
    return [str(value)], value


def toml(section: tuple[str, ...], values: dict[str, Any]) -> str:
    def literal(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    return f"[{'.'.join(section)}]\n" + "".join(f"{k} = {literal(v)}\n"
                                               for k, v in values.items())


def comparable(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("parser", "config")}


def test_config_section_ok_every_flag_expressible(tmp_path: Path) -> None:
    module = cli()
    leaves = [(path, p) for path, p in config.leaves(module.build_parser())
              if "--config" in p._option_string_actions]
    assert {"primary", "secondary", "mount", "tls.issue"} <= {".".join(p) for p, _ in leaves}
    for path, parser in leaves:
        words, values = list(path), {}
        for key, action in config.keys(parser).items():
            value_words, values[key] = sample(key, action)
            words += value_words if not action.option_strings else [f"--{key}", *value_words]
        file = tmp_path / f"{'-'.join(path)}.toml"
        file.write_text(toml(path, values))
        from_flags = module.parse(words)
        from_file = module.parse([*path, "--config", str(file)])
        assert comparable(from_file) == comparable(from_flags), path


def test_config_section_ok_flags_win_and_paths_relative(tmp_path: Path) -> None:
    file = tmp_path / "etc" / "replfs.toml"
    file.parent.mkdir()
    file.write_text('[primary]\nbacking = "data"\nmountpoint = "/mnt/x"\nstreams = 2\n'
                    'set-bytes = "1M"\n')
    args = cli().parse(["primary", "--config", str(file), "--streams", "5", "/b"])
    assert (args.backing, args.mountpoint) == (Path("/b"), Path("/mnt/x"))
    assert (args.streams, args.set_bytes) == (5, 1 << 20)
    args = cli().parse(["primary", "--config", str(file)])
    assert args.backing == file.parent / "data"


def test_config_check_ok_example() -> None:
    result = replfs("config", "check", EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert "[primary], [secondary], [mount]" in result.stdout
    module = cli()
    primary = module.parse(["primary", "--config", str(EXAMPLE)])
    assert (primary.backing, primary.secondary, primary.peer, primary.set_bytes) == (
        Path("/srv/data"), ["beta:7070"], ["beta"], 64 << 20)
    secondary = module.parse(["secondary", "--config", str(EXAMPLE)])
    assert (secondary.replica, secondary.listen, secondary.peer) == (
        Path("/srv/data"), "0.0.0.0:7070", ["beta"])
    assert module.parse(["mount", "--config", str(EXAMPLE)]).mountpoint == Path("/mnt/standby")


@pytest.mark.parametrize(("text", "words"), [
    ("[primary]\nstreamz = 4\n", ["[primary]", "'streamz'", "allowed:", "set-interval"]),
    ("[primray]\n", ["'primray'", "sections are the commands", "secondary"]),
    ("[primary]\nstreams = \"4\"\n", ["[primary] streams", "must be an integer", "string"]),
    ("[primary]\nstreams = 0\n", ["[primary] streams", "at least 1"]),
    ("[primary]\ninsecure = 1\n", ["[primary] insecure", "true or false"]),
    ("[primary]\nset-bytes = \"lots\"\n", ["[primary] set-bytes", "not a size"]),
    ("[primary]\nset-interval = -1\n", ["[primary] set-interval", "positive"]),
    ("[secondary]\nlisten = \"nowhere\"\n", ["[secondary] listen", "HOST:PORT"]),
    ("[primary]\nbacking = [\"/a\"]\n", ["[primary] backing", "a string", "an array"]),
    ("primary = 3\n", ["[primary]", "table"]),
    ("[primary\n", ["not valid TOML", "line 1"]),
])
def test_config_check_err(tmp_path: Path, text: str, words: list[str]) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    assert_one_line_error(replfs("config", "check", file), str(file), *words)


def test_config_err_daemon_refuses_bad_file(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("[secondary]\nlisten = 7070\n")
    result = replfs("secondary", "--config", file)
    assert_one_line_error(result, str(file), "[secondary] listen", "must be a string")
    assert_one_line_error(replfs("secondary", "--config", tmp_path / "none.toml"),
                          "none.toml", "cannot read")
    file.write_text("[secondary]\nreplica = \"r\"\n")
    assert_one_line_error(replfs("secondary", "--config", file), "--listen", "[secondary]")
