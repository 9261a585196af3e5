"""Text keys (RFC 7143, sections 6 and 13): the login's operational parameters.

A login or text PDU's data is ``key=value`` pairs, each ended by a NUL. Each
side offers values; the other answers with the result of the key's
function: the smaller of two numbers (MaxBurstLength), a boolean AND or OR
(ImmediateData, InitialR2T), the first of a list it takes (HeaderDigest).
MaxRecvDataSegmentLength is declared, not negotiated: each side says how
much it will receive in one PDU.

``OFFER`` is what replfs proposes, as initiator, and the most it accepts,
as target. Keys no one here knows are answered NotUnderstood.
"""

from __future__ import annotations

from dataclasses import dataclass

from repl.errors import ProtocolError

MAX_RECV = 256 << 10  # our MaxRecvDataSegmentLength: a 1 MiB record in four Data-Outs
MAX_BURST = 1 << 20  # a record's data in one R2T
FIRST_BURST = 64 << 10  # immediate data: records below this take one PDU and no R2T

OFFER: dict[str, str] = {
    "HeaderDigest": "None",
    "DataDigest": "None",
    "MaxConnections": "1",
    "InitialR2T": "Yes",
    "ImmediateData": "Yes",
    "MaxRecvDataSegmentLength": str(MAX_RECV),
    "MaxBurstLength": str(MAX_BURST),
    "FirstBurstLength": str(FIRST_BURST),
    "DefaultTime2Wait": "0",
    "DefaultTime2Retain": "0",
    "MaxOutstandingR2T": "1",
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
    "ErrorRecoveryLevel": "0",
}
_MIN = {"MaxConnections", "MaxBurstLength", "FirstBurstLength", "DefaultTime2Retain",
        "MaxOutstandingR2T", "ErrorRecoveryLevel"}
_MAX = {"DefaultTime2Wait"}
_OR = {"InitialR2T", "DataPDUInOrder", "DataSequenceInOrder"}
_AND = {"ImmediateData"}
_LIST = {"HeaderDigest", "DataDigest"}
_DECLARED = {"MaxRecvDataSegmentLength", "InitiatorName", "TargetName", "InitiatorAlias",
             "TargetAlias", "TargetAddress", "TargetPortalGroupTag", "SessionType"}
_RANGES = {"MaxRecvDataSegmentLength": (512, (1 << 24) - 1),
           "MaxBurstLength": (512, (1 << 24) - 1), "FirstBurstLength": (512, (1 << 24) - 1),
           "MaxConnections": (1, 65535), "MaxOutstandingR2T": (1, 65535),
           "DefaultTime2Wait": (0, 3600), "DefaultTime2Retain": (0, 3600),
           "ErrorRecoveryLevel": (0, 2)}
MAX_TEXT = 64 << 10  # a login's text, all PDUs of it together


def encode(pairs: dict[str, str]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs.items())


def decode(data: bytes) -> dict[str, str]:
    """The pairs in a text segment (in order). Raises ProtocolError if one is malformed."""
    pairs: dict[str, str] = {}
    for item in data.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise ProtocolError(f"text key without '=': {item[:40]!r}")
        try:
            pairs[key.decode()] = value.decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"text key not UTF-8: {item[:40]!r}") from None
    return pairs


def number(key: str, value: str) -> int:
    """A numerical value, within the key's range; else ProtocolError."""
    low, high = _RANGES.get(key, (0, (1 << 32) - 1))
    if not value.isdigit() or not low <= int(value) <= high:
        raise ProtocolError(f"{key}={value[:20]} is not a number from {low} to {high}")
    return int(value)


def answer(key: str, offered: str) -> str:
    """The target's answer to the initiator's offer of *key*, with OFFER as its own.

    Raises ProtocolError if the offer cannot be met (no digest of None).
    """
    ours = OFFER.get(key)
    if key in _LIST and ours is not None:
        if ours not in offered.split(","):
            raise ProtocolError(f"{key}={offered}: replfs takes only {ours}")
        return ours
    if ours is None or key not in _MIN | _MAX | _OR | _AND:
        return "NotUnderstood"
    if key in _OR | _AND:
        if offered not in ("Yes", "No"):
            raise ProtocolError(f"{key}={offered} is not Yes or No")
        both = (ours, offered)
        return ("Yes" if "Yes" in both else "No") if key in _OR else (
            "Yes" if both == ("Yes", "Yes") else "No")
    theirs = number(key, offered)
    return str(min(theirs, int(ours)) if key in _MIN else max(theirs, int(ours)))


def is_declarative(key: str) -> bool:
    return key in _DECLARED


@dataclass(frozen=True)
class Params:
    """What a login agreed on, as the data path needs it."""

    send_data: int = 8192  # the peer's MaxRecvDataSegmentLength (RFC default)
    recv_data: int = MAX_RECV
    first_burst: int = FIRST_BURST
    max_burst: int = MAX_BURST
    initial_r2t: bool = True
    immediate_data: bool = True


def agreed(results: dict[str, str], peer_recv: int) -> Params:
    """The Params from the negotiated *results* (RFC defaults for what is missing)
    and the peer's declared MaxRecvDataSegmentLength. Raises ProtocolError."""
    def num(key: str, default: int) -> int:
        value = results.get(key)
        return default if value in (None, "NotUnderstood") else number(key, value)

    params = Params(send_data=peer_recv, first_burst=num("FirstBurstLength", 65536),
                    max_burst=num("MaxBurstLength", 262144),
                    initial_r2t=results.get("InitialR2T", "Yes") != "No",
                    immediate_data=results.get("ImmediateData", "Yes") != "No")
    for digest in ("HeaderDigest", "DataDigest"):
        if results.get(digest, "None") != "None":
            raise ProtocolError(f"{digest}={results[digest]}: replfs sends no digests")
    if params.first_burst > params.max_burst:
        raise ProtocolError("FirstBurstLength over MaxBurstLength")
    return params
