"""Extended link services (FC-LS-3) an FCP exchange needs, and FC-SP's AUTH_ELS.

Each ELS payload opens with its command code in byte 0::

    FLOGI 0x04, PLOGI 0x03   a login: service parameters, 116 bytes
      4    common service parameters: FC-PH versions, buffer-to-buffer credit,
           common features (F_Port 0x1000 when a fabric answers), receive data
           field size, E_D_TOV
      20   port name, 24 node name (WWNs)
      36   class 1, 2, 3 and 4 service parameters, 16 bytes each: class 3 valid
           with its receive data field size; the others not valid
      100  vendor version level
    LS_ACC 0x02              the reply: as the request for a login (its own
                             parameters) or a PRLI; else just the code
    LS_RJT 0x01              word 1: 0, reason code, explanation, vendor unique
    PRLI 0x20                page length 16, payload length 20, one service
                             parameter page for TYPE 0x08 (FCP): establish image
                             pair; in the LS_ACC, the response code; in word 3
                             the FCP functions (initiator 0x20, target 0x10) and
                             READ FCP_XFER_RDY disabled (0x02)
    LOGO 0x05                the N_Port ID and port name logging out
    AUTH_ELS 0x90            FC-SP-2 authentication: flags, message code, protocol
                             version; message length; transaction identifier;
                             the message (``Auth``)

This module, frame.py, fcip.py and fcp.py are the only places in repl/fc
that pack bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from repl.errors import ProtocolError
from repl.fc.frame import DATA_FIELD


class Command(enum.IntEnum):
    LS_RJT = 0x01
    LS_ACC = 0x02
    PLOGI = 0x03
    FLOGI = 0x04
    LOGO = 0x05
    PRLI = 0x20
    AUTH = 0x90


def command(payload: bytes) -> Command:
    """The command code of an ELS payload. Raises ProtocolError if it is not one we
    know."""
    if len(payload) < 4:
        raise ProtocolError(f"an ELS payload of {len(payload)} bytes")
    try:
        return Command(payload[0])
    except ValueError:
        raise ProtocolError(f"ELS command {payload[0]:#04x} not supported") from None


ACCEPT = bytes([Command.LS_ACC, 0, 0, 0])  # the LS_ACC of requests that answer nothing more

# --- logins ----------------------------------------------------------------------------------

LOGIN_SIZE = 116
_LOGIN = struct.Struct(">B3x BBHHHHHI QQ 16s 16s 16s 16s 16s")
F_PORT = 0x1000  # common features: the reply comes from a fabric's F_Port
_CONTINUOUS_OFFSET = 0x8000  # common features: continuously increasing relative offset
_CLASS_VALID = 0x8000
_FC_PH = 0x20  # highest and lowest FC-PH version (FC-FS and later)
E_D_TOV = 2000  # ms
_CREDIT = 16  # buffer-to-buffer credit offered (FCIP's TCP window is the real one)


def _class3() -> bytes:
    """Class 3 service parameters: valid, sequential delivery, the data field size,
    255 concurrent sequences, one open sequence per exchange."""
    return struct.pack(">HHHHHHH2x", _CLASS_VALID | 0x0800, 0, 0, DATA_FIELD, 255, 0, 1)


@dataclass(frozen=True, slots=True)
class Login:
    """FLOGI, PLOGI, or the LS_ACC that accepts one: who the port is."""

    command: Command
    port_name: int
    node_name: int
    fabric: bool = False  # an F_Port's answer to FLOGI
    data_field: int = DATA_FIELD

    def encode(self) -> bytes:
        features = _CONTINUOUS_OFFSET | (F_PORT if self.fabric else 0)
        return _LOGIN.pack(self.command, _FC_PH, _FC_PH, _CREDIT, features, self.data_field,
                           255, 0xFE, E_D_TOV, self.port_name, self.node_name, bytes(16),
                           bytes(16), _class3(), bytes(16), bytes(16))

    @classmethod
    def decode(cls, payload: bytes) -> Login:
        """Raises ProtocolError if *payload* is not a login's service parameters."""
        if len(payload) < LOGIN_SIZE:
            raise ProtocolError(f"login parameters of {len(payload)} bytes")
        (code, _, _, _, features, data_field, _, _, _, port, node, _, _, class3, _, _) = \
            _LOGIN.unpack_from(payload)
        if code not in (Command.FLOGI, Command.PLOGI, Command.LS_ACC):
            raise ProtocolError(f"ELS {code:#04x} is not a login")
        if not int.from_bytes(class3[:2], "big") & _CLASS_VALID:
            raise ProtocolError("the port does not offer class 3")
        if not 256 <= data_field & 0x0FFF <= DATA_FIELD:
            raise ProtocolError(f"receive data field size {data_field & 0x0FFF} not usable")
        return cls(Command(code), port, node, bool(features & F_PORT), data_field & 0x0FFF)


# --- process login (FCP) ----------------------------------------------------------------------

_PRLI = struct.Struct(">BBH BBBB II I")
FCP_TYPE = 0x08
_ESTABLISH_IMAGE_PAIR = 0x20
REQUEST_EXECUTED = 0x01  # the LS_ACC's response code
INITIATOR_FUNCTION, TARGET_FUNCTION, READ_XFER_RDY_DISABLED = 0x20, 0x10, 0x02


@dataclass(frozen=True, slots=True)
class Prli:
    """A PRLI for FCP, or its LS_ACC: the FC-4 functions the port has."""

    accept: bool
    functions: int  # INITIATOR_FUNCTION or TARGET_FUNCTION, with READ_XFER_RDY_DISABLED
    response: int = 0  # the LS_ACC's response code

    def encode(self) -> bytes:
        flags = _ESTABLISH_IMAGE_PAIR | (self.response if self.accept else 0)
        return _PRLI.pack(Command.LS_ACC if self.accept else Command.PRLI, 16, 20, FCP_TYPE, 0,
                          flags, 0, 0, 0, self.functions)

    @classmethod
    def decode(cls, payload: bytes) -> Prli:
        """Raises ProtocolError unless *payload* is a PRLI (or its LS_ACC) for FCP."""
        if len(payload) < _PRLI.size:
            raise ProtocolError(f"a PRLI of {len(payload)} bytes")
        code, page, length, kind, _, flags, _, _, _, functions = _PRLI.unpack_from(payload)
        if code not in (Command.PRLI, Command.LS_ACC) or page != 16 or length != len(payload):
            raise ProtocolError("not a PRLI of one service parameter page")
        if kind != FCP_TYPE:
            raise ProtocolError(f"a PRLI for FC-4 type {kind:#04x}, not FCP")
        accept = code == Command.LS_ACC
        return cls(accept, functions, flags & 0x0F if accept else 0)


# --- rejects and logout -----------------------------------------------------------------------

LOGICAL_ERROR, UNABLE = 0x03, 0x09  # LS_RJT reason codes
NO_EXPLANATION, LOGIN_REQUIRED = 0x00, 0x1E
_REJECT = struct.Struct(">B3x xBBB")


@dataclass(frozen=True, slots=True)
class Reject:
    """LS_RJT: why a request was not accepted."""

    reason: int
    explanation: int = NO_EXPLANATION

    def encode(self) -> bytes:
        return _REJECT.pack(Command.LS_RJT, self.reason, self.explanation, 0)

    @classmethod
    def decode(cls, payload: bytes) -> Reject:
        if len(payload) < _REJECT.size or payload[0] != Command.LS_RJT:
            raise ProtocolError("not an LS_RJT")
        _, reason, explanation, _ = _REJECT.unpack_from(payload)
        return cls(reason, explanation)

    def __str__(self) -> str:
        return f"LS_RJT reason {self.reason:#04x}, explanation {self.explanation:#04x}"


_LOGO = struct.Struct(">B3x I Q")


def logo(port_id: int, port_name: int) -> bytes:
    return _LOGO.pack(Command.LOGO, port_id, port_name)


# --- FC-SP authentication (DH-CHAP) -----------------------------------------------------------


class AuthMessage(enum.IntEnum):
    AUTH_REJECT = 0x0A
    AUTH_NEGOTIATE = 0x0B
    DHCHAP_CHALLENGE = 0x10
    DHCHAP_REPLY = 0x11
    DHCHAP_SUCCESS = 0x12


DHCHAP = 1  # authentication protocol identifier
MD5, SHA1 = 5, 6  # hash identifiers
NULL_DH = 0  # the DH group with no exchange: DH-CHAP is then CHAP
_NAME_WWN = 1  # name tag: an 8-byte WWN
_HASH_LIST, _GROUP_LIST = 1, 2
AUTH_FAILURE, LOGICAL = 0x01, 0x02  # AUTH_Reject reason codes
MECHANISM_NOT_USABLE, AUTHENTICATION_FAILED, INCORRECT_PAYLOAD = 0x01, 0x05, 0x06
_AUTH_HEAD = struct.Struct(">BBBB I I")
_AUTH_VERSION = 0x01
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Auth:
    """One AUTH_ELS message; the fields its code uses (the rest stay empty):

    AUTH_Negotiate    name (the initiator's port name), hashes, groups
    DHCHAP_Challenge  name (the responder's), hash, group, challenge
    DHCHAP_Reply      response, challenge (the initiator's, to be answered)
    DHCHAP_Success    response (the responder's answer to it, or none)
    AUTH_Reject       reason, explanation
    """

    message: AuthMessage
    transaction: int
    name: int = 0
    hashes: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()
    hash: int = 0
    group: int = 0
    challenge: bytes = b""
    response: bytes = b""
    reason: int = 0
    explanation: int = 0
    _body: bytes = field(default=b"", repr=False, compare=False)

    def encode(self) -> bytes:
        body = self._message()
        return _AUTH_HEAD.pack(Command.AUTH, 0, self.message, _AUTH_VERSION, len(body),
                               self.transaction) + body

    def _message(self) -> bytes:
        name = struct.pack(">HHQ", _NAME_WWN, 8, self.name)
        if self.message == AuthMessage.AUTH_NEGOTIATE:
            params = (struct.pack(">HH", _HASH_LIST, len(self.hashes))
                      + b"".join(_U32.pack(h) for h in self.hashes)
                      + struct.pack(">HH", _GROUP_LIST, len(self.groups))
                      + b"".join(_U32.pack(g) for g in self.groups))
            return name + _U32.pack(1) + _U32.pack(4 + len(params)) + _U32.pack(DHCHAP) + params
        if self.message == AuthMessage.DHCHAP_CHALLENGE:
            return name + struct.pack(">II", self.hash, self.group) + _value(self.challenge) \
                + _value(b"")
        if self.message == AuthMessage.DHCHAP_REPLY:
            return _value(self.response) + _value(b"") + _value(self.challenge)
        if self.message == AuthMessage.DHCHAP_SUCCESS:
            return _value(self.response)
        return bytes([self.reason, self.explanation, 0, 0])  # AUTH_Reject

    @classmethod
    def decode(cls, payload: bytes) -> Auth:
        """Raises ProtocolError if *payload* is not an AUTH_ELS message we know."""
        if len(payload) < _AUTH_HEAD.size:
            raise ProtocolError(f"an AUTH_ELS of {len(payload)} bytes")
        code, _, message, version, length, transaction = _AUTH_HEAD.unpack_from(payload)
        if code != Command.AUTH or version != _AUTH_VERSION:
            raise ProtocolError(f"not an AUTH_ELS of version {_AUTH_VERSION}")
        body = _Reader(payload[_AUTH_HEAD.size :])
        if length != len(body.data):
            raise ProtocolError(f"AUTH_ELS message length {length}, {len(body.data)} bytes")
        try:
            kind = AuthMessage(message)
        except ValueError:
            raise ProtocolError(f"AUTH_ELS message {message:#04x} not supported") from None
        if kind == AuthMessage.AUTH_NEGOTIATE:
            name = body.name()
            if body.u32() != 1 or body.u32() < 4 or body.u32() != DHCHAP:
                raise ProtocolError("AUTH_Negotiate offers no DH-CHAP alone")
            lists: dict[int, tuple[int, ...]] = {}
            while body.data:
                tag, count = body.unpack(">HH")
                lists[tag] = tuple(body.u32() for _ in range(count))
            return cls(kind, transaction, name, lists.get(_HASH_LIST, ()),
                       lists.get(_GROUP_LIST, ()))
        if kind == AuthMessage.DHCHAP_CHALLENGE:
            name = body.name()
            hash_, group = body.unpack(">II")
            challenge = body.value()
            body.value()  # the DH value, empty in the NULL group
            return cls(kind, transaction, name, hash=hash_, group=group, challenge=challenge)
        if kind == AuthMessage.DHCHAP_REPLY:
            response = body.value()
            body.value()
            return cls(kind, transaction, response=response, challenge=body.value())
        if kind == AuthMessage.DHCHAP_SUCCESS:
            return cls(kind, transaction, response=body.value())
        reason, explanation = body.unpack(">BB2x")
        return cls(kind, transaction, reason=reason, explanation=explanation)


def _value(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


class _Reader:
    """Fields read off the front of an AUTH_ELS message; ProtocolError past its end."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def unpack(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        if len(self.data) < size:
            raise ProtocolError("AUTH_ELS message ends early")
        values = struct.unpack_from(fmt, self.data)
        self.data = self.data[size:]
        return values

    def u32(self) -> int:
        return self.unpack(">I")[0]

    def value(self) -> bytes:
        size = self.u32()
        if size > len(self.data):
            raise ProtocolError("AUTH_ELS value longer than its message")
        value, self.data = self.data[:size], self.data[size:]
        return value

    def name(self) -> int:
        tag, length = self.unpack(">HH")
        if tag != _NAME_WWN or length != 8:
            raise ProtocolError("an AUTH_ELS name that is not a WWN")
        return self.unpack(">Q")[0]
