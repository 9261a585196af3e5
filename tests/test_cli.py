"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import threading
import tomllib
from pathlib import Path

import pyfuse3
import pytest

from repl import control
from repl.protocol import MAX_STREAMS, PROTOCOL_VERSION
from store.records import FORMAT_VERSION
from tests.support import REPLFS, Daemon, primary, replfs, secondary, state_dir

PROJECT_VERSION = tomllib.loads(
    (Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["version"]


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("replfs:")]
    assert len(ours) == 1, result.stderr
    for word in words:
        assert word in ours[0], ours[0]


def test_cli_err_unknown_flag(tmp_path: Path) -> None:
    result = replfs("primary", tmp_path, tmp_path, "--bogus")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "replfs: unrecognized arguments: --bogus (see 'replfs primary --help')"]


def test_cli_version_names_what_runs() -> None:
    """``--version`` names replfs's version, its formats, and the libfuse pyfuse3 loaded:
    the one the bootstrap built where the system's is older than 3.17."""
    result = replfs("--version")
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(rf"replfs {re.escape(PROJECT_VERSION)} \(link protocol "
                         rf"{PROTOCOL_VERSION}, record format {FORMAT_VERSION}; Python "
                         rf"{re.escape(platform.python_version())}, pyfuse3 "
                         rf"{re.escape(pyfuse3.__version__)}, libfuse (3)\.(\d+)\.\d+\)\n",
                         result.stdout)
    assert match is not None, result.stdout
    assert int(match[2]) >= 17  # HANDLE_KILLPRIV_V2 (fs/primary.py)


def test_cli_err_missing_command() -> None:
    assert_one_line_error(replfs(), "required")


def test_cli_err_bad_size(tmp_path: Path) -> None:
    assert_one_line_error(replfs("primary", tmp_path, tmp_path, "--set-bytes", "lots"),
                          "not a size")


@pytest.mark.parametrize(("streams", "says"), [
    ("0", "--streams: must be at least 1"),
    (str(MAX_STREAMS + 1), f"--streams must be from 1 to {MAX_STREAMS}")])
def test_cli_err_streams(tmp_path: Path, streams: str, says: str) -> None:
    """A secondary takes at most MAX_STREAMS streams of one primary: asking for more
    is refused before anything starts."""
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    assert_one_line_error(replfs("primary", tmp_path / "b", tmp_path / "m", "--secondary",
                                 "127.0.0.1:1", "--insecure", "--streams", streams), says)


def test_primary_err_backing_missing(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    assert_one_line_error(replfs("primary", tmp_path / "nope", tmp_path / "m"),
                          "backing directory", "does not exist")


def test_primary_err_mountpoint_missing(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    assert_one_line_error(replfs("primary", tmp_path / "b", tmp_path / "nope"),
                          "mountpoint", "mkdir")


def test_primary_err_already_mounted_and_journal_locked(tmp_path: Path) -> None:
    backing, mount, other = tmp_path / "b", tmp_path / "m", tmp_path / "m2"
    backing.mkdir()
    other.mkdir()
    with primary(backing, mount) as daemon:
        assert_one_line_error(replfs("primary", backing, mount), "already a mountpoint")
        assert_one_line_error(replfs("primary", backing, other),
                              "in use by another replfs daemon", f"pid {daemon.proc.pid}")
        assert not os.path.ismount(other)


def test_primary_err_no_dev_fuse(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    # A private mount namespace where /dev has no fuse device.
    script = 'mount -t tmpfs none /dev && exec "$@"'
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", *REPLFS,
                             "primary", str(tmp_path / "b"), str(tmp_path / "m")],
                            capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, "/dev/fuse is missing")


def test_primary_err_mount_not_permitted(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mount.mkdir()
    # Root without capabilities, and unable to gain them through setuid fusermount3.
    drop = ["setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"]
    result = subprocess.run([*drop, *REPLFS, "primary", str(backing), str(mount)],
                            capture_output=True, text=True, timeout=60)
    assert not os.path.ismount(mount)
    assert_one_line_error(result, "could not mount", str(mount))


def test_checkpoint_err_not_served(tmp_path: Path) -> None:
    assert_one_line_error(replfs("checkpoint", tmp_path), "no replfs daemon")


def test_cli_ok_finds_the_socket_of_a_stopped_primary_without_a_look_at_its_mount(
        tmp_path: Path) -> None:
    """A stopped (or stuck) primary: ``replfs status`` of its mount must reach the
    control socket, and time out there with a message. Finding the socket used to
    stat the mountpoint, which waits for ever for the daemon."""
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    (tmp_path / "link").symlink_to("m")
    with primary(backing, mount) as daemon:
        assert daemon.proc is not None
        want = control.socket_path(mount)
        (mount / "f").write_bytes(b"")  # the kernel's attributes of the root are stale now
        found: list[Path] = []
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            look = threading.Thread(target=lambda: found.extend(
                control.socket_path(m) for m in (mount, f"{mount}/", tmp_path / "link")),
                daemon=True)
            look.start()
            look.join(10)
            assert found == [want] * 3
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
            look.join(10)


def test_primary_warns_of_a_mountpoint_that_is_not_empty(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mount.mkdir()
    (mount / "hidden").write_bytes(b"")
    with primary(backing, mount) as daemon:
        assert not (mount / "hidden").exists()
    assert f"{mount} is not empty: what it holds is hidden" in daemon.log()


def test_checkpoint_prints_closed_set(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    with primary(backing, mount, "--set-interval", "3600"):
        (mount / "f").write_bytes(b"x")
        first = replfs("checkpoint", mount)
        (mount / "g").write_bytes(b"y")
        second = replfs("checkpoint", mount)
        empty = replfs("checkpoint", mount)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert int(second.stdout) == int(first.stdout) + 1
    assert int(empty.stdout) == int(second.stdout), "nothing new: no new set"


def test_cli_err_state_dirs_unusable(tmp_path: Path) -> None:
    backing, mount, afile = tmp_path / "b", tmp_path / "m", tmp_path / "afile"
    backing.mkdir()
    mount.mkdir()
    afile.write_text("")
    assert_one_line_error(replfs("primary", backing, mount, "--journal", afile),
                          "cannot use", "afile", "Not a directory")
    assert not os.path.ismount(mount)
    assert_one_line_error(replfs("secondary", tmp_path / "r", "--listen", "127.0.0.1:0",
                                 "--insecure", "--staging", afile / "staging"),
                          "cannot use", "afile")
    assert_one_line_error(replfs("tls", "init", afile / "ca"), "cannot use", "afile")


def test_cli_log_format_json_ok_one_event_a_line(tmp_path: Path) -> None:
    log = tmp_path / "sec.log"
    daemon = Daemon(["secondary", str(tmp_path / "r"), "--listen", "127.0.0.1:0",
                     "--insecure", "--log-format", "json"], log, "listening on")
    daemon.start()
    assert daemon.stop() == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(list(e) == ["time", "level", "logger", "msg"] for e in events), events
    assert {"warning", "info"} <= {e["level"] for e in events}
    assert any(e["msg"].startswith("listening on 127.0.0.1:") and
               e["logger"] == "replfs.secondary" for e in events), events
    assert all(e["time"].endswith("Z") and "T" in e["time"] for e in events)

    result = replfs("secondary", tmp_path / "r", "--listen", "127.0.0.1:0", "--log-format",
                    "json")
    assert result.returncode == 1
    (event,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert (event["level"], event["logger"]) == ("error", "replfs")
    assert "need TLS" in event["msg"]


def test_secondary_err_mount_missing(tmp_path: Path) -> None:
    """A standby mountpoint that is not there stops the secondary before it starts."""
    result = replfs("secondary", tmp_path / "r", "--listen", "127.0.0.1:0", "--insecure",
                    "--mount", tmp_path / "nope")
    assert_one_line_error(result, "mountpoint", "mkdir")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("args", "words"), [
    (["primary", "b", "b/sub"], ["the mountpoint", "is inside the backing directory"]),
    (["primary", "m/inner", "m"], ["the backing directory", "is inside the mountpoint"]),
    (["primary", "b", "m", "--journal", "b"], ["the backing directory", "the journal",
                                               "are the same directory"]),
    (["primary", "b", "m", "--journal", "b/j"], ["the journal", "inside the backing"]),
    (["primary", "b", "m", "--journal", "m/j"], ["the journal", "inside the mountpoint"]),
    (["secondary", "r", "--listen", "127.0.0.1:0", "--insecure", "--mount", "r"],
     ["the replica", "the mountpoint", "are the same directory"]),
    (["secondary", "r", "--listen", "127.0.0.1:0", "--insecure", "--staging", "r/s"],
     ["the staging store", "is inside the replica"]),
    (["mount", "r", "r"], ["the replica", "the mountpoint", "are the same directory"]),
])
def test_cli_err_trees_within_each_other(tmp_path: Path, args: list[str],
                                         words: list[str]) -> None:
    """A mount over (or under) its own tree would serve itself and hang every caller
    (even a kill -9 of its daemon); replfs's state inside a tree would be replicated
    with it. Refused before anything is made or mounted."""
    for name in ("b/sub", "m/inner", "r"):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
    before = sorted(tmp_path.rglob("*"))
    result = subprocess.run([*REPLFS, *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert_one_line_error(result, *words)
    assert not any(os.path.ismount(path) for path in before)
    assert sorted(tmp_path.rglob("*")) == before, "nothing made"


def test_cli_err_second_daemon_on_a_tree(tmp_path: Path) -> None:
    """One daemon a tree, whichever journal or staging store each is given: a second
    primary of BACKING, or a second secondary of REPLICA, is refused and changes
    nothing of the first's."""
    backing, mount, other, replica = (tmp_path / n for n in ("b", "m", "m2", "r"))
    backing.mkdir()
    other.mkdir()
    with primary(backing, mount) as daemon:
        result = replfs("primary", backing, other, "--journal", tmp_path / "j2")
        assert_one_line_error(result, str(backing), "in use by another replfs daemon",
                              f"pid {daemon.proc.pid}")
        assert not os.path.ismount(other)
        assert not (tmp_path / "j2").exists()
        assert not (state_dir(backing) / "journal-at").exists(), "the first's journal kept"
    with secondary(replica, "--insecure"):
        result = replfs("secondary", replica, "--listen", "127.0.0.1:0", "--insecure",
                        "--staging", tmp_path / "s2")
        assert_one_line_error(result, str(replica), "in use by another replfs daemon")
        assert json.loads(replfs("status", replica, "--json").stdout)["role"] == "secondary"


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--set-interval", "nan", "must be a positive number"),
    ("--set-interval", "inf", "must be a positive number"),
    ("--set-bytes", "infM", "not a size"),
    ("--set-bytes", "-5", "must be at least 1 byte"),
    ("--journal-max", "0", "must be at least 1 byte"),
])
def test_cli_err_numbers_out_of_range(tmp_path: Path, option: str, value: str,
                                      says: str) -> None:
    """A value no daemon can work with (nan spun the primary at 100 % CPU) is refused,
    on the command line and in a config file alike."""
    assert_one_line_error(replfs("primary", tmp_path, tmp_path / "m", option, value), says)
    conf = tmp_path / "replfs.toml"
    toml = value if value in ("nan", "inf") else f'"{value}"'  # TOML's own nan and inf
    conf.write_text(f"[primary]\n{option[2:]} = {toml}\n")
    assert_one_line_error(replfs("config", "check", conf), option[2:], says)


def test_cli_err_files_not_text(tmp_path: Path) -> None:
    """A config file or CHAP secrets file that is not text is one line, not a traceback."""
    junk = tmp_path / "junk"
    junk.write_bytes(b"\xff\xfe garbage")
    junk.chmod(0o600)
    assert_one_line_error(replfs("config", "check", junk), "not valid TOML", "UTF-8")
    assert_one_line_error(replfs("secondary", tmp_path / "r", "--iscsi", "127.0.0.1:0",
                                 "--chap", junk), "not a secrets file")
    assert_one_line_error(replfs("chap", tmp_path / "c", "--initiator", "a b"),
                          "must be one word")
    assert not (tmp_path / "c").exists()


def test_tls_init_err_on_a_file_leaves_it_as_it_was(tmp_path: Path) -> None:
    afile = tmp_path / "f"
    afile.write_text("data")
    afile.chmod(0o644)
    assert_one_line_error(replfs("tls", "init", afile), "cannot use", "Not a directory")
    assert afile.stat().st_mode & 0o777 == 0o644 and afile.read_text() == "data"


def test_primary_err_dead_mount_says_unmount_it(tmp_path: Path) -> None:
    """The mount of a primary killed with -9 stays, its daemon gone: a new primary there
    says how to unmount it, not 'Transport endpoint is not connected'."""
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    with primary(backing, mount) as daemon:
        daemon.kill()
        assert_one_line_error(replfs("primary", backing, mount), "daemon that is gone",
                              f"fusermount3 -u {mount}")
        subprocess.run(["fusermount3", "-u", str(mount)], check=True)


def test_cli_err_tls_names_a_directory_or_a_file(tmp_path: Path) -> None:
    """--tls takes DIR/NAME: a directory is refused in one line, and DIR/NAME.pem is
    taken as DIR/NAME (not DIR/NAME.pem.pem)."""
    args = ["secondary", tmp_path / "r", "--listen", "127.0.0.1:0", "--peer", "alpha"]
    assert_one_line_error(replfs(*args, "--tls", tmp_path), "is a directory",
                          f"--tls {tmp_path}/NAME")
    assert_one_line_error(replfs(*args, "--tls", tmp_path / "beta.pem"),
                          f"{tmp_path}/ca.pem is missing", f"issue {tmp_path} beta'")


def test_primary_err_another_journal_for_a_tree_that_has_one(tmp_path: Path) -> None:
    """A primary given --journal elsewhere for a tree whose journal is beside it (or the
    other way round) would start the tree over, in a new cluster: refused, naming it."""
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    with primary(backing, mount):
        (mount / "f").write_bytes(b"x")
    result = replfs("primary", backing, mount, "--journal", tmp_path / "j2")
    assert_one_line_error(result, f"the journal of {backing} is {state_dir(backing)}/journal",
                          f"--journal {state_dir(backing)}/journal")
    assert not (tmp_path / "j2").exists() and not os.path.ismount(mount)


@pytest.mark.parametrize(("etcd", "mount", "says"), [
    ("ftp://x:2379", "m", "not an etcd client URL"),
    ("localhost:2379", "m", "not an etcd client URL"),
    ("http://127.0.0.1:2379", "data/m", "is inside the data directory"),
])
def test_node_err_config_that_cannot_work(tmp_path: Path, etcd: str, mount: str,
                                          says: str) -> None:
    """A node whose etcd URL no client can use, or whose mount lies in its data, says so
    at once, instead of retrying (or restarting its daemon) every second for ever."""
    (tmp_path / "data" / "m").mkdir(parents=True)
    (tmp_path / "m").mkdir()
    result = subprocess.run([*REPLFS, "node", "--name", "alpha", "--etcd", etcd, "--insecure",
                             "--listen", "127.0.0.1:0", "data", mount], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, says)
