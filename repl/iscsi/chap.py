"""CHAP (RFC 1994, as iSCSI uses it: RFC 7143 section 12.1.3) and its secrets file.

Both ends of an iSCSI link prove they know a secret without sending it:
one side sends an identifier I and a random challenge C, the other answers
MD5(I || secret || C) (CHAP_A=5). replfs does it both ways (mutual CHAP):
the primary proves it is the initiator the secondary expects, with the
initiator's secret, and the secondary proves it is the target the primary
expects, with the target's secret. A peer without the secret gets no
further than the login. CHAP authenticates the login only: what follows
is neither encrypted nor protected against a man in the middle who can
rewrite TCP (see the README).

The secrets file (``--chap FILE``, the same file on both hosts, mode 0600)::

    # replfs iSCSI secrets
    initiator alpha 3f8a...   (the primary's CHAP name and secret)
    target beta 91c2...       (the secondary's)

Secrets are at least 12 bytes (RFC 7143 asks for 96 bits), and the two differ.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from repl.errors import ProtocolError, UsageError
from store.private import write_private

MD5 = "5"  # CHAP_A: the one algorithm RFC 7143 requires
CHALLENGE_BYTES = 16
MIN_SECRET = 12


@dataclass(frozen=True)
class Secrets:
    initiator_name: str
    initiator_secret: bytes
    target_name: str
    target_secret: bytes


def load(path: Path) -> Secrets:
    """The secrets in *path*; UsageError if it is missing, readable by others or malformed."""
    try:
        mode = os.stat(path).st_mode
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--chap {path}: {exc.strerror}; make one with "
                         f"'replfs chap {path}'") from None
    except UnicodeDecodeError:
        raise UsageError(f"--chap {path}: not a secrets file (not UTF-8 text); make one "
                         f"with 'replfs chap FILE'") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{path} can be read by other users; run chmod 600 {path}")
    found: dict[str, tuple[str, bytes]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 3 or words[0] not in ("initiator", "target") or words[0] in found:
            raise UsageError(f"{path}:{number}: expected 'initiator NAME SECRET' or "
                             "'target NAME SECRET', once each")
        if len(words[2].encode()) < MIN_SECRET:
            raise UsageError(f"{path}:{number}: the secret must be at least {MIN_SECRET} bytes")
        found[words[0]] = (words[1], words[2].encode())
    if len(found) != 2:
        raise UsageError(f"{path}: needs an 'initiator NAME SECRET' and a 'target NAME "
                         "SECRET' line")
    (iname, isecret), (tname, tsecret) = found["initiator"], found["target"]
    if isecret == tsecret:
        raise UsageError(f"{path}: the initiator's and the target's secrets must differ")
    return Secrets(iname, isecret, tname, tsecret)


def make(path: Path, initiator: str, target: str) -> None:
    """Write a new secrets file at *path* (0600); UsageError if one is there."""
    for role, name in (("initiator", initiator), ("target", target)):
        if not name or not name.isprintable() or any(c.isspace() or c == "#" for c in name):
            raise UsageError(f"the {role}'s CHAP name {name!r} must be one word, without "
                             "spaces or '#'")
    if path.exists():
        raise UsageError(f"{path} exists already; it is kept as it is")
    write_private(path, (f"# replfs iSCSI CHAP secrets: the same file on both hosts\n"
                         f"initiator {initiator} {secrets.token_hex(16)}\n"
                         f"target {target} {secrets.token_hex(16)}\n").encode())


def challenge() -> tuple[int, bytes]:
    """A fresh (identifier, challenge)."""
    return secrets.randbelow(256), secrets.token_bytes(CHALLENGE_BYTES)


def response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """MD5(identifier || secret || challenge), RFC 1994 section 4.1."""
    return hashlib.md5(bytes([identifier]) + secret + challenge).digest()


def encode_binary(value: bytes) -> str:
    return "0x" + value.hex()


def decode_binary(text: str) -> bytes:
    """A binary value as iSCSI writes it: 0x hex or 0b base64. Raises ProtocolError."""
    try:
        if text[:2] in ("0x", "0X"):
            return bytes.fromhex(text[2:])
        if text[:2] in ("0b", "0B"):
            return base64.b64decode(text[2:], validate=True)
    except (ValueError, binascii.Error):
        pass
    raise ProtocolError(f"not a binary value: {text[:40]!r}")


def identifier(text: str) -> int:
    if not text.isdigit() or int(text) > 255:
        raise ProtocolError(f"CHAP_I={text[:20]} is not 0 to 255")
    return int(text)
