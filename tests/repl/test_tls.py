"""replfs tls init/issue, the credentials the daemons take, and links whose two ends
disagree: each a clear one-line refusal, logged on both sides, nothing replicated."""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from repl import tls, tlsca
from repl.errors import UsageError
from tests.repl.peers import assert_one_line_error, wait_for_log
from tests.support import (
    PRIMARY,
    ROOT,
    SECONDARY,
    checkpoint,
    cluster_ca,
    diff,
    primary,
    replfs,
    secondary,
    snapshot,
    status,
    tls_args,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --- replfs tls ---------------------------------------------------------------------------


def test_tls_cli_init_issue_ok(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    made = replfs("tls", "init", ca)
    assert made.returncode == 0, made.stderr
    assert f"replfs tls issue {ca} NAME" in made.stdout
    issued = replfs("tls", "issue", ca, "db-1.example")
    assert issued.returncode == 0, issued.stderr
    assert "--tls THATDIR/db-1.example" in issued.stdout
    assert mode(ca) == 0o700
    assert {p.name: mode(p) for p in ca.iterdir()} == {
        "ca.pem": 0o600, "ca.key": 0o600, "db-1.example.pem": 0o600, "db-1.example.key": 0o600}
    node, root = cert(ca / "db-1.example.pem"), cert(ca / "ca.pem")
    node.verify_directly_issued_by(root)
    assert tlsca.names(node) == {"db-1.example"}
    usage = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    days = (node.not_valid_after_utc - node.not_valid_before_utc).days
    assert days == tls.DEFAULT_DAYS


def test_tls_cli_init_ok_existing_dir_made_private(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    ca.mkdir()
    os.chmod(ca, 0o755)
    assert replfs("tls", "init", ca).returncode == 0
    assert mode(ca) == 0o700


def test_tls_cli_init_err_exists(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    tlsca.init_ca(ca)  # what 'replfs tls init' does (test_tls_cli_init_issue_ok runs it)
    before = (ca / "ca.key").read_bytes()
    assert_one_line_error(replfs("tls", "init", ca), "holds a CA already")
    assert (ca / "ca.key").read_bytes() == before


def test_tls_cli_issue_err_no_ca(tmp_path: Path) -> None:
    assert_one_line_error(replfs("tls", "issue", tmp_path, "alpha"), "no CA in",
                          f"replfs tls init {tmp_path}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["ca", "Alpha", "a_b", "a-", "a..b", "", "x" * 64])
def test_tls_cli_issue_err_name(tmp_path: Path, name: str) -> None:
    ca = tmp_path / "ca"
    tlsca.init_ca(ca)
    assert_one_line_error(replfs("tls", "issue", ca, name), "cannot name a node")
    assert sorted(p.name for p in ca.iterdir()) == ["ca.key", "ca.pem"]


def test_tls_cli_issue_err_exists(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    tlsca.init_ca(ca)
    tlsca.issue(ca, "alpha")
    before = (ca / "alpha.key").read_bytes()
    assert_one_line_error(replfs("tls", "issue", ca, "alpha"), "has a certificate already")
    assert (ca / "alpha.key").read_bytes() == before


# --- the credentials a daemon takes --------------------------------------------------------


def own_ca(tmp_path: Path, *names: str) -> Path:
    ca = tmp_path / "ca"
    tlsca.init_ca(ca)
    for name in names:
        tlsca.issue(ca, name)
    return ca


def test_tls_credentials_ok(tmp_path: Path) -> None:
    ca = own_ca(tmp_path, "alpha")
    creds = tls.credentials(ca / "alpha", "beta")
    assert (creds.name, creds.peer) == ("alpha", "beta")
    assert creds.server_context().minimum_version == tls.ssl.TLSVersion.TLSv1_3


def test_tls_credentials_err_key_readable_by_others(tmp_path: Path) -> None:
    ca = own_ca(tmp_path, "alpha")
    os.chmod(ca / "alpha.key", 0o640)
    with pytest.raises(UsageError, match=r"alpha.key can be read by other users; run chmod 600"):
        tls.credentials(ca / "alpha", "beta")


def test_tls_credentials_err_expired(tmp_path: Path) -> None:
    ca = own_ca(tmp_path)
    tlsca.issue(ca, "alpha", days=1,
                valid_from=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3))
    with pytest.raises(UsageError, match=r"alpha.pem expired on .*remove it and .*alpha.key, "
                       r"then .*replfs tls issue"):
        tls.credentials(ca / "alpha", "beta")
    (ca / "alpha.pem").unlink()  # as the message says: issue refuses while they are there
    (ca / "alpha.key").unlink()
    tlsca.issue(ca, "alpha")
    assert tls.credentials(ca / "alpha", "beta").name == "alpha"


def test_tls_credentials_err_not_yet_valid(tmp_path: Path) -> None:
    ca = own_ca(tmp_path)
    tlsca.issue(ca, "alpha", valid_from=datetime.datetime.now(datetime.UTC)
                + datetime.timedelta(days=2))
    with pytest.raises(UsageError, match=r"alpha.pem is not valid until .* UTC; check this "
                                         "host's clock"):
        tls.credentials(ca / "alpha", "beta")


def test_tls_credentials_err_ca_of_another_cluster(tmp_path: Path) -> None:
    ca = own_ca(tmp_path, "alpha")
    other = tmp_path / "other"
    tlsca.init_ca(other)
    shutil.copy2(other / "ca.pem", ca / "ca.pem")
    with pytest.raises(UsageError, match="do not go together"):
        tls.credentials(ca / "alpha", "beta")


def test_tls_credentials_err_names_another_node(tmp_path: Path) -> None:
    ca = own_ca(tmp_path, "beta")
    for suffix in (".pem", ".key"):
        shutil.copy2(ca / f"beta{suffix}", ca / f"alpha{suffix}")
    with pytest.raises(UsageError, match=r"alpha.pem names \['beta'\], not 'alpha'"):
        tls.credentials(ca / "alpha", "beta")


def test_tls_credentials_err_key_of_another_node(tmp_path: Path) -> None:
    ca = own_ca(tmp_path, "alpha", "beta")
    shutil.copy2(ca / "beta.key", ca / "alpha.key")
    with pytest.raises(UsageError, match="do not go together"):
        tls.credentials(ca / "alpha", "beta")


def test_tls_credentials_ok_daemon_never_loads_cryptography(tmp_path: Path) -> None:
    """The daemons check their credentials with ssl alone: cryptography (about 10 MiB of
    a daemon's memory) is loaded by 'replfs tls' and to explain a refusal only."""
    ca = own_ca(tmp_path, "alpha")
    script = ("import sys; sys.path[:0] = [sys.argv[1] + '/bin', sys.argv[1]]\n"
              "import replfs, fs.primary_daemon, fs.standby_daemon, repl.secondary.run\n"
              "from pathlib import Path\n"
              "from repl import tls\n"
              "tls.credentials(Path(sys.argv[2]) / 'alpha', 'beta')\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'cryptography'}))\n")
    run = subprocess.run([sys.executable, "-c", script, str(ROOT), str(ca)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_tls_credentials_err_no_peer(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--tls needs --peer NAME"):
        tls.credentials(own_ca(tmp_path, "alpha") / "alpha", None)


def test_tls_credentials_err_missing(tmp_path: Path) -> None:
    ca = own_ca(tmp_path)
    with pytest.raises(UsageError, match=rf"{ca}/gamma.pem is missing; .*replfs tls issue {ca} "
                                         "gamma"):
        tls.credentials(ca / "gamma", "beta")


# --- daemons refuse to start without a choice ---------------------------------------------


def test_secondary_cli_err_no_tls(tmp_path: Path) -> None:
    replica = tmp_path / "r"
    result = replfs("secondary", replica, "--listen", "127.0.0.1:0", timeout=30)
    assert_one_line_error(result, "need TLS", "replfs tls init DIR", "replfs tls issue DIR NAME",
                          "--tls DIR/NAME", "--insecure", "loopback")
    assert not replica.exists()


def test_primary_cli_err_no_tls(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mount.mkdir()
    result = replfs("primary", backing, mount, "--secondary", "127.0.0.1:7070", timeout=30)
    assert_one_line_error(result, "need TLS", "replfs tls init DIR", "--insecure")
    assert not os.path.ismount(mount)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "m"], "nothing created"


@pytest.mark.parametrize("args,why", [
    (["--insecure", "--tls", "x/alpha"], "pass --tls or --insecure, not both"),
    (["--insecure", "--peer", "beta"], "--peer names the other end's certificate"),
])
def test_secondary_cli_err_link_options(tmp_path: Path, args: list[str], why: str) -> None:
    result = replfs("secondary", tmp_path / "r", "--listen", "127.0.0.1:0", *args, timeout=30)
    assert_one_line_error(result, why)


def test_primary_cli_err_insecure_not_loopback(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mount.mkdir()
    result = replfs("primary", backing, mount, "--secondary", "192.0.2.1:7070", "--insecure",
                    timeout=30)
    assert_one_line_error(result, "--insecure is for loopback only", "192.0.2.1")


def test_primary_cli_err_tls_without_secondary(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mount.mkdir()
    result = replfs("primary", backing, mount, *tls_args(PRIMARY, SECONDARY), timeout=30)
    assert_one_line_error(result, "need --secondary HOST:PORT")


# --- two ends that disagree ----------------------------------------------------------------


def mismatch(tmp_path: Path, secondary_link: list[str], primary_link: list[str],
             secondary_says: str, primary_says: str) -> None:
    """The secondary logs one refusal per attempt, *secondary_says*; the primary logs
    *primary_says*; the replica stays as it was and joins no cluster."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    replica.mkdir()
    (replica / "kept").write_bytes(b"already here")
    before = snapshot(replica)
    with secondary(replica, *secondary_link) as sec, primary(
            backing, mount, "--secondary", f"127.0.0.1:{sec.port}", *primary_link) as prim:
        (mount / "f").write_bytes(b"not for this secondary")
        line = wait_for_log(prim, f"refused by 127.0.0.1:{sec.port}: ")[0]
        assert line.endswith(f": {primary_says}"), line
        line = wait_for_log(sec, "refused connection from 127.0.0.1:")[0]
        assert line.endswith(secondary_says), line
        st = status(replica)
        assert (st["cluster"], st["received"], st["connected_streams"]) == (None, 0, 0)
        assert status(mount)["connected"] is False
    assert diff(before, snapshot(replica)) == []


def test_link_err_tls_primary_insecure_secondary(tmp_path: Path) -> None:
    mismatch(tmp_path, ["--insecure"], tls_args(PRIMARY, SECONDARY),
             "(tls-to-plain): it speaks TLS and this secondary plain TCP (--insecure): start "
             "both with --tls, or both with --insecure",
             "TLS: the secondary closed the link during the handshake (is it running with "
             "--insecure? its log says why)")


def test_link_err_insecure_primary_tls_secondary(tmp_path: Path) -> None:
    mismatch(tmp_path, tls_args(SECONDARY, PRIMARY), ["--insecure"],
             "(not-tls): plain TCP, not TLS (it sent b'REPLFS\\x00\\x01')",
             "this secondary accepts TLS only: start the primary with --tls DIR/NAME --peer "
             "NAME (see 'replfs tls --help')")


def test_link_err_secondary_not_the_named_peer(tmp_path: Path) -> None:
    """The primary expects gamma; the secondary's certificate names beta."""
    mismatch(tmp_path, tls_args(SECONDARY, PRIMARY), tls_args(PRIMARY, "gamma"),
             "(our-certificate): it refused this secondary's certificate "
             "(SSLV3_ALERT_BAD_CERTIFICATE; its log says why)",
             "TLS: the secondary's certificate does not name 'gamma' (--peer)")


def test_link_err_primary_not_the_named_peer(tmp_path: Path) -> None:
    """The secondary accepts only gamma; the primary's certificate names alpha."""
    mismatch(tmp_path, tls_args(SECONDARY, "gamma"), tls_args(PRIMARY, SECONDARY),
             f"(wrong-name): the certificate names {PRIMARY}, and this secondary accepts "
             "only gamma (--peer)",
             f"the certificate names {PRIMARY}, and this secondary accepts only gamma (--peer)")


def test_link_ok_insecure_says_so(tmp_path: Path) -> None:
    """Both ends on --insecure replicate, and say so loudly: in the log and in status."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica, "--insecure") as sec, primary(
            backing, mount, "--secondary", f"127.0.0.1:{sec.port}", "--insecure") as prim:
        (mount / "f").write_bytes(b"in the clear")
        checkpoint(mount)
        assert (replica / "f").read_bytes() == b"in the clear"
        for daemon, target in ((sec, replica), (prim, mount)):
            assert "INSECURE (--insecure): " in daemon.log()
            st = status(target)
            assert (st["insecure"], st["tls_name"], st["tls_peer"]) == (True, None, None)


def test_link_ok_tls_status(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}") as prim:
        (mount / "f").write_bytes(b"encrypted")
        checkpoint(mount)
        assert (replica / "f").read_bytes() == b"encrypted"
        assert (status(replica)["tls_name"], status(replica)["tls_peer"]) == (SECONDARY,
                                                                             PRIMARY)
        assert (status(mount)["tls_name"], status(mount)["tls_peer"]) == (PRIMARY, SECONDARY)
        assert status(mount)["insecure"] is status(replica)["insecure"] is False
        assert "INSECURE" not in sec.log() + prim.log()
        assert f"TLS as {SECONDARY}, accepting {PRIMARY}" in sec.log()
    assert cluster_ca().is_dir()
