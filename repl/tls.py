"""TLS on the replication links: the cluster's CA, node certificates, contexts, refusals.

Every link is TLS 1.3 with a certificate at both ends, each signed by the
cluster's CA (``replfs tls init DIR``, ``replfs tls issue DIR NAME``). A
certificate names one node: NAME is its subject's common name and its one
DNS subject alternative name.

The peer-name rule: each daemon is told, with ``--peer NAME``, the name of
the node at the other end of its link, and accepts the link only if the
other end's certificate is signed by the cluster's CA, valid now, and names
exactly that node. The primary checks the secondary's certificate as a TLS
client checks a server's host name (``--peer`` is the name it expects
instead of the address it dials); the secondary checks the primary's once
the handshake verified it, before reading a byte from it. Names are not
roles: after a failover the old secondary is the primary, and each side
names the other as before.

Certificates and keys are made by ``cryptography`` (repl/tlsca.py), links
run on the standard library's ``ssl``: nothing here does cryptography by
hand. A daemon checks its own credentials with ``ssl`` too, by a handshake
with itself in memory, and loads ``cryptography`` only to say why it refused
them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from repl.errors import UsageError

CA = "ca"
DEFAULT_DAYS = 3650  # a node certificate's life; a new one is one `replfs tls issue` away
# A host name's syntax: dot-separated labels of letters, digits and inner hyphens.
_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                   r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def check_name(name: str) -> str:
    """*name* if it can name a node (a host name, lower case, not "ca"), else UsageError."""
    if not _NAME.match(name) or name == CA:
        raise UsageError(f"{name!r} cannot name a node: use a host name (lower-case letters, "
                         "digits, '-' and '.'), other than 'ca'")
    return name


# --- a daemon's credentials -------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What a daemon's end of a link is: its certificate, and who the other end must be."""

    name: str  # this node, as its certificate names it
    peer: str  # the node the other end's certificate must name
    ca: Path
    cert: Path
    key: Path
    also: frozenset[str] = frozenset()  # a secondary's other acceptable primaries

    @property
    def accepted(self) -> list[str]:
        """Every name the other end's certificate may carry, sorted."""
        return sorted({self.peer, *self.also})

    def server_context(self) -> ssl.SSLContext:
        """For the secondary: TLS 1.3, a client certificate of the CA required."""
        ctx = self._context(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """For the primary: TLS 1.3, the server's certificate must name ``peer``."""
        ctx = self._context(ssl.PROTOCOL_TLS_CLIENT)  # checks the host name: server_hostname
        return ctx

    def _context(self, protocol: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.load_verify_locations(cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def credentials(prefix: Path, peer: str | None) -> Credentials:
    """The credentials ``--tls DIR/NAME --peer PEER`` name, checked; else UsageError.

    Reads DIR/NAME.pem, DIR/NAME.key and DIR/ca.pem. The key must be
    readable by its owner only, and the certificate must name NAME, be valid
    now and be signed by the CA beside it.
    """
    if prefix.suffix in (".pem", ".key"):  # the certificate or key named: its node meant
        prefix = prefix.with_suffix("")
    if prefix.is_dir():
        raise UsageError(f"--tls {prefix} is a directory; --tls takes DIR/NAME, for the "
                         f"node's DIR/NAME.pem and DIR/NAME.key: --tls {prefix}/NAME")
    directory, name = prefix.parent, prefix.name
    ca, cert, key = directory / f"{CA}.pem", directory / f"{name}.pem", directory / f"{name}.key"
    if peer is None:
        raise UsageError("--tls needs --peer NAME: the name in the certificate of the node "
                         "at the other end of the link")
    check_name(peer)
    for path in (ca, cert, key):
        if not path.is_file():
            raise UsageError(f"--tls {prefix}: {path} is missing; make the CA with 'replfs tls "
                             f"init {directory}' and a certificate with 'replfs tls issue "
                             f"{directory} {name}'")
    if os.stat(key).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{key} can be read by other users; run chmod 600 {key}")
    found = Credentials(name, peer, ca, cert, key)
    try:
        _handshake_with_itself(found)
    except (ssl.SSLError, OSError, ValueError) as exc:
        from repl import tlsca  # only to say why: a daemon does not keep cryptography

        raise UsageError(tlsca.refused(prefix, ca, cert, key, exc)) from None
    return found


def _handshake_with_itself(creds: Credentials) -> None:
    """A TLS handshake, in memory, from a client that trusts the CA and expects the
    node's name to a server that holds its certificate and key: what a peer
    checks of this node (signed by the CA, valid now, naming it; the key that
    goes with it). Raises the ssl (or OSError, ValueError) error it failed with."""
    client, server = creds.client_context(), creds._context(ssl.PROTOCOL_TLS_SERVER)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    ends = [client.wrap_bio(to_client, to_server, server_hostname=creds.name),
            server.wrap_bio(to_server, to_client, server_side=True)]
    done = [False, False]
    for _ in range(8):  # TLS 1.3 takes two flights each way; a stall is a failure
        for i, end in enumerate(ends):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        if all(done):
            return
    raise ssl.SSLError("the TLS handshake with itself did not finish")


def peer_names(peercert: Mapping[str, object]) -> list[str]:
    """The DNS names in a verified peer certificate, as ``SSLObject.getpeercert()`` gives it."""
    san = peercert.get("subjectAltName", ())
    assert isinstance(san, tuple)
    return [value for kind, value in san if kind == "DNS"]


# --- which links a daemon may open ----------------------------------------------------------

NEEDS_TLS = ("replication links need TLS: make a CA with 'replfs tls init DIR' and a "
             "certificate per node with 'replfs tls issue DIR NAME', then pass --tls DIR/NAME "
             "--peer OTHERNAME; or pass --insecure for plain TCP on loopback only")


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def link_credentials(prefix: Path | None, peer: str | None, insecure: bool,
                     host: str) -> Credentials | None:
    """The credentials for a link to or from *host*: None for plain TCP (``--insecure``).

    Raises UsageError (one line saying how to set TLS up) without ``--tls``
    and without ``--insecure``, with both, or with ``--insecure`` for a host
    that is not loopback.
    """
    if prefix is not None and insecure:
        raise UsageError("pass --tls or --insecure, not both")
    if insecure:
        if peer is not None:
            raise UsageError("--peer names the other end's certificate: it needs --tls, "
                             "not --insecure")
        if not is_loopback(host):
            raise UsageError(f"--insecure is for loopback only, and {host} is not loopback: "
                             "use --tls DIR/NAME --peer OTHERNAME (see 'replfs tls --help')")
        return None
    if prefix is None:
        raise UsageError(NEEDS_TLS)
    return credentials(prefix, peer)


# --- why a TLS handshake failed, in words ---------------------------------------------------

# OpenSSL's verify results that mean "not signed by a CA we trust".
_UNTRUSTED = {2, 7, 18, 19, 20, 21}  # unable to get issuer; bad signature; self-signed; ...
_EXPIRED, _NOT_YET_VALID, _HOSTNAME_MISMATCH = 10, 9, 62
# The alerts a client sends when it refused our certificate.
_REFUSED_OURS = {"SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA",
                 "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN"}


def refusal(exc: BaseException | None) -> tuple[str, str]:
    """Why the secondary refused a client's TLS handshake: (reason, text).

    *exc* is what the handshake raised (the cause of trio's BrokenResourceError).
    The reason is a short key counted in ``replfs status``.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, what = exc.verify_code, exc.verify_message
        if code == _EXPIRED:
            return "expired", "its certificate has expired"
        if code == _NOT_YET_VALID:
            return "not-yet-valid", "its certificate is not valid yet"
        if code in _UNTRUSTED:
            return "unknown-ca", f"its certificate is not signed by this cluster's CA ({what})"
        return "bad-certificate", f"its certificate is refused ({what})"
    if isinstance(exc, ssl.SSLEOFError):
        return "no-handshake", "it closed the link during the TLS handshake"
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no-certificate", "it sent no client certificate"
        if exc.reason in ("UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE"):
            return "tls-error", f"it does not speak TLS 1.3 ({exc.reason})"
        if exc.reason in _REFUSED_OURS:
            return "our-certificate", ("it refused this secondary's certificate "
                                       f"({exc.reason}; its log says why)")
        return "tls-error", f"TLS handshake failed ({exc.reason or exc})"
    return "no-handshake", f"the link broke during the TLS handshake ({exc!r})"


def client_refusal(exc: BaseException | None, peer: str) -> str:
    """Why the primary's TLS handshake with the secondary failed, in words."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == _HOSTNAME_MISMATCH:
            return f"TLS: the secondary's certificate does not name {peer!r} (--peer)"
        if code == _EXPIRED:
            return "TLS: the secondary's certificate has expired"
        if code in _UNTRUSTED:
            return ("TLS: the secondary's certificate is not signed by this cluster's CA "
                    f"({exc.verify_message})")
        return f"TLS: the secondary's certificate is refused ({exc.verify_message})"
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
        return ("TLS: the secondary closed the link during the handshake (is it running "
                "with --insecure? its log says why)")
    if isinstance(exc, ssl.SSLError):
        if exc.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                          "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"):
            return "TLS: the secondary does not speak TLS (is it running with --insecure?)"
        return f"TLS handshake failed ({exc.reason or exc})"
    return f"TLS handshake failed ({exc!r})"


def broken_record(exc: BaseException) -> str | None:
    """What broke an established TLS link, if a TLS record failed (not a mere close)."""
    cause = exc.__cause__
    if not isinstance(cause, ssl.SSLError) or isinstance(cause, ssl.SSLEOFError):
        return None
    return f"TLS record refused ({cause.reason or cause}): the link corrupted it"
