"""What an FCIP connection goes through before FCP, at both ends.

The secondary is a one-switch fabric with one FCP target; the primary is an
N_Port that reaches it through the FCIP connection::

    primary (initiator)                    secondary (fabric, target 01.01.00)
    FCIP special frame          ->
                                <-         its echo (Ch set: "my WWN is this")
    FLOGI to ff.ff.fe           ->
                                <-         LS_ACC from the F_Port, to the N_Port ID
                                           the fabric gives (01.02.xx)
    PLOGI to 01.01.00           ->
                                <-         LS_ACC: the target's names
    AUTH_Negotiate              ->         FC-SP-2 DH-CHAP, NULL DH group, each
                                <-         message an AUTH_ELS request in its own
                                <-         exchange, answered LS_ACC:
                                           DHCHAP_Challenge C1
    DHCHAP_Reply R1, C2         ->
                                <-         DHCHAP_Success R2, or AUTH_Reject
    DHCHAP_Success              ->
    PRLI (FCP, initiator)       ->
                                <-         LS_ACC (FCP, target)

Authentication: FCIP has none of its own (RFC 3821 leaves it to IPsec),
so the N_Ports authenticate each other as FC-SP-2 has them do, with the
``--chap`` secrets iSCSI uses: with the NULL DH group a DH-CHAP response
is CHAP's, R = H(T || secret || C), T the transaction identifier's low
byte, H MD5 or SHA-1. The primary answers C1 with the initiator's secret
and the secondary C2 with the target's: each end goes on only with a peer
that proved it knows the other secret. Until then the target accepts no
PRLI and no command.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from repl.errors import ProtocolError, Refused
from repl.fc import els, frame
from repl.fc.els import Auth, AuthMessage, Command, Login, Prli, Reject
from repl.fc.fcip import FcipStream, SpecialFrame
from repl.fc.frame import FcFrame, RCtl, Type
from repl.fc.names import F_PORT, TARGET_ID, Names, show
from repl.iscsi.chap import Secrets

log = logging.getLogger("replfs.fc")

HASHES = {els.SHA1: hashlib.sha1, els.MD5: hashlib.md5}  # in the order the primary offers
CHALLENGE_BYTES = 16
MAX_EXCHANGES = 256  # a session's exchanges open at once, as iSCSI's command window
_REQUEST_F_CTL = frame.FIRST_SEQUENCE | frame.END_SEQUENCE | frame.SEQUENCE_INITIATIVE
_REPLY_F_CTL = frame.EXCHANGE_RESPONDER | frame.LAST_SEQUENCE | frame.END_SEQUENCE


class LoginFailed(Refused):
    """A login the other end (or we) turned down."""


class Redirected(ProtocolError):
    """The acceptor's special frame named another fabric WWN: connect again with it."""

    def __init__(self, wwn: int) -> None:
        self.wwn = wwn
        super().__init__(f"the FCIP peer is fabric {show(wwn)}")


@dataclass
class Session:
    """What the logins leave for FCP, at either end."""

    local: int  # our N_Port ID
    remote: int  # the peer's
    port_name: int  # the peer's port name
    next_ox_id: int  # the next exchange we originate
    next_seq_id: int
    fabric: int = 0  # the peer's fabric WWN (from the special frames)


def response(hash_id: int, transaction: int, secret: bytes, challenge: bytes) -> bytes:
    """A DH-CHAP response in the NULL DH group: H(T || secret || C)."""
    return HASHES[hash_id](bytes([transaction & 0xFF]) + secret + challenge).digest()


class Els:
    """Link service exchanges on one connection, one at a time (the login phase)."""

    def __init__(self, link: FcipStream, local: int, remote: int) -> None:
        self.link = link
        self.local, self.remote = local, remote
        self._ox_id = 1
        self._seq_id = 0

    def session(self, port_name: int, fabric: int) -> Session:
        return Session(self.local, self.remote, port_name, self._ox_id, self._seq_id, fabric)

    def _seq(self) -> int:
        self._seq_id = (self._seq_id + 1) & 0xFF
        return self._seq_id

    async def request(self, payload: bytes, d_id: int | None = None) -> FcFrame:
        """Send an ELS request; return its LS_ACC. Raises LoginFailed on an LS_RJT,
        ProtocolError on anything but the reply."""
        ox_id, self._ox_id = self._ox_id, self._ox_id % 0xFFFE + 1
        await self.link.send(FcFrame(RCtl.ELS_REQUEST, self.remote if d_id is None else d_id,
                                     self.local, Type.ELS, _REQUEST_F_CTL, ox_id,
                                     seq_id=self._seq(), payload=payload))
        reply = await self.link.receive()
        if reply.r_ctl != RCtl.ELS_REPLY or reply.type != Type.ELS or reply.ox_id != ox_id:
            raise ProtocolError(f"expected the reply to {els.command(payload).name}, got "
                                f"R_CTL {reply.r_ctl:#04x} for OX_ID {reply.ox_id:#x}")
        if els.command(reply.payload) == Command.LS_RJT:
            raise LoginFailed(f"{els.command(payload).name} refused: "
                              f"{Reject.decode(reply.payload)}")
        if els.command(reply.payload) != Command.LS_ACC:
            raise ProtocolError("an ELS reply that is neither LS_ACC nor LS_RJT")
        return reply

    async def expect(self, *commands: Command) -> FcFrame:
        """The next frame, an ELS request of one of *commands*; anything else gets an
        LS_RJT (if it is a request) and ProtocolError."""
        got = await self.link.receive()
        if got.r_ctl == RCtl.ELS_REQUEST and got.type == Type.ELS:
            code = els.command(got.payload)
            if code in commands:
                return got
            await self.reply(got, Reject(els.UNABLE, els.LOGIN_REQUIRED).encode())
            raise ProtocolError(f"{code.name} where {'/'.join(c.name for c in commands)} "
                                "was due")
        raise ProtocolError(f"R_CTL {got.r_ctl:#04x} TYPE {got.type:#04x} where "
                            f"{'/'.join(c.name for c in commands)} was due")

    async def reply(self, request: FcFrame, payload: bytes = els.ACCEPT,
                    s_id: int | None = None, d_id: int | None = None) -> None:
        await self.link.send(FcFrame(
            RCtl.ELS_REPLY, request.s_id if d_id is None else d_id,
            request.d_id if s_id is None else s_id, Type.ELS, _REPLY_F_CTL, request.ox_id,
            request.ox_id, self._seq(), payload=payload))

    async def auth(self, message: Auth) -> None:
        """Send one AUTH_ELS message (a request of its own, answered LS_ACC)."""
        await self.request(message.encode())

    async def expect_auth(self, transaction: int, *messages: AuthMessage) -> Auth:
        """The peer's next AUTH_ELS message, accepted; ProtocolError if it is not one of
        *messages* of *transaction*, LoginFailed if it is an AUTH_Reject."""
        request = await self.expect(Command.AUTH)
        message = Auth.decode(request.payload)
        await self.reply(request)
        if message.message == AuthMessage.AUTH_REJECT:
            raise LoginFailed(f"authentication refused (AUTH_Reject {message.reason:#04x}/"
                              f"{message.explanation:#04x}): the secret is not the one the "
                              "peer has")
        if message.message not in messages or message.transaction != transaction:
            raise ProtocolError(f"{message.message.name} where "
                                f"{'/'.join(m.name for m in messages)} was due")
        return message

    async def refuse(self, transaction: int, explanation: int) -> None:
        """Send AUTH_Reject; the connection ends after it whatever the peer says."""
        try:
            await self.auth(Auth(AuthMessage.AUTH_REJECT, transaction, reason=els.AUTH_FAILURE,
                                 explanation=explanation))
        except (ProtocolError, LoginFailed):
            pass


async def initiate(link: FcipStream, keys: Secrets, ours: Names, known_wwn: int = 0
                   ) -> Session:
    """Log the primary's N_Port in to the secondary's target (see the module comment).

    Raises Redirected if the secondary's special frame names another fabric WWN
    than *known_wwn* (connect again with it), LoginFailed if it refused us or did
    not prove it knows the target's secret, ProtocolError if it broke the protocol.
    """
    nonce = secrets.randbits(64)
    sent = SpecialFrame(ours.fabric, 0, nonce, known_wwn)
    await link.send_special(sent)
    echo = await link.receive_special()
    if echo.changed and echo.nonce == nonce:
        raise Redirected(echo.destination_wwn)
    if echo != sent:
        raise ProtocolError("the FCIP special frame came back changed")
    conv = Els(link, frame.UNIDENTIFIED, frame.FABRIC)
    flogi = await conv.request(Login(Command.FLOGI, ours.port, ours.node).encode())
    if not Login.decode(flogi.payload).fabric:
        raise ProtocolError("FLOGI answered by a port that is no fabric")
    conv.local, conv.remote = flogi.d_id, TARGET_ID  # the N_Port ID the fabric gave us
    target = Login.decode((await conv.request(Login(Command.PLOGI, ours.port,
                                                    ours.node).encode())).payload)
    transaction = secrets.randbits(32)
    await conv.auth(Auth(AuthMessage.AUTH_NEGOTIATE, transaction, ours.port,
                         hashes=tuple(HASHES), groups=(els.NULL_DH,)))
    challenge = await conv.expect_auth(transaction, AuthMessage.DHCHAP_CHALLENGE)
    if challenge.hash not in HASHES or challenge.group != els.NULL_DH:
        await conv.refuse(transaction, els.INCORRECT_PAYLOAD)
        raise ProtocolError("the target chose a hash or DH group we did not offer")
    mine = secrets.token_bytes(CHALLENGE_BYTES)
    await conv.auth(Auth(AuthMessage.DHCHAP_REPLY, transaction, response=response(
        challenge.hash, transaction, keys.initiator_secret, challenge.challenge),
        challenge=mine))
    success = await conv.expect_auth(transaction, AuthMessage.DHCHAP_SUCCESS)
    if not hmac.compare_digest(success.response, response(
            challenge.hash, transaction, keys.target_secret, mine)):
        await conv.refuse(transaction, els.AUTHENTICATION_FAILED)
        raise LoginFailed("the secondary did not prove it knows the target's CHAP secret")
    await conv.auth(Auth(AuthMessage.DHCHAP_SUCCESS, transaction))
    accepted = Prli.decode((await conv.request(
        Prli(False, els.INITIATOR_FUNCTION | els.READ_XFER_RDY_DISABLED).encode())).payload)
    if accepted.response != els.REQUEST_EXECUTED or not accepted.functions & \
            els.TARGET_FUNCTION:
        raise LoginFailed(f"PRLI not executed (response {accepted.response:#x}) or the port "
                          "is no FCP target")
    return conv.session(target.port_name, known_wwn)


async def accept(link: FcipStream, keys: Secrets, ours: Names, assign: Callable[[], int]
                 ) -> Session:
    """Take a primary's logins as the secondary's fabric and target (see the module
    comment); *assign* gives the next N_Port ID. Raises Redirected if the primary
    named another fabric (its special frame was echoed with ours), LoginFailed if it
    failed to authenticate, ProtocolError if it broke the protocol."""
    special = await link.receive_special()
    echo = special.echo(ours.fabric)
    await link.send_special(echo)
    if echo.changed:
        raise Redirected(special.destination_wwn)
    conv = Els(link, frame.FABRIC, frame.UNIDENTIFIED)
    flogi = await conv.expect(Command.FLOGI)
    initiator = Login.decode(flogi.payload)
    local = assign()
    await conv.reply(flogi, Login(Command.LS_ACC, ours.fabric & ~(0xF << 56) | F_PORT << 56,
                                  ours.fabric, fabric=True).encode(), d_id=local)
    conv.local, conv.remote = TARGET_ID, local
    plogi = await conv.expect(Command.PLOGI)
    if plogi.s_id != local or plogi.d_id != TARGET_ID or \
            Login.decode(plogi.payload).port_name != initiator.port_name:
        await conv.reply(plogi, Reject(els.LOGICAL_ERROR).encode())
        raise ProtocolError("a PLOGI from another port or to another address")
    await conv.reply(plogi, Login(Command.LS_ACC, ours.port, ours.node).encode())
    negotiate = await conv.expect(Command.AUTH)
    offer = Auth.decode(negotiate.payload)
    await conv.reply(negotiate)
    transaction = offer.transaction
    hash_id = next((h for h in offer.hashes if h in HASHES), None)
    if offer.message != AuthMessage.AUTH_NEGOTIATE or hash_id is None or \
            els.NULL_DH not in offer.groups:
        await conv.refuse(transaction, els.MECHANISM_NOT_USABLE)
        raise LoginFailed("the primary offered no DH-CHAP we take (MD5 or SHA-1, NULL DH)")
    mine = secrets.token_bytes(CHALLENGE_BYTES)
    await conv.auth(Auth(AuthMessage.DHCHAP_CHALLENGE, transaction, ours.port, hash=hash_id,
                         group=els.NULL_DH, challenge=mine))
    reply = await conv.expect_auth(transaction, AuthMessage.DHCHAP_REPLY)
    if not hmac.compare_digest(reply.response, response(hash_id, transaction,
                                                        keys.initiator_secret, mine)):
        await conv.refuse(transaction, els.AUTHENTICATION_FAILED)
        raise LoginFailed(f"port {show(initiator.port_name)} does not know the initiator's "
                          "CHAP secret")
    proof = response(hash_id, transaction, keys.target_secret, reply.challenge) \
        if reply.challenge else b""
    await conv.auth(Auth(AuthMessage.DHCHAP_SUCCESS, transaction, response=proof))
    await conv.expect_auth(transaction, AuthMessage.DHCHAP_SUCCESS)
    prli = await conv.expect(Command.PRLI)
    if not Prli.decode(prli.payload).functions & els.INITIATOR_FUNCTION:
        await conv.reply(prli, Reject(els.UNABLE).encode())
        raise ProtocolError("a PRLI from a port that is no FCP initiator")
    await conv.reply(prli, Prli(True, els.TARGET_FUNCTION | els.READ_XFER_RDY_DISABLED,
                                els.REQUEST_EXECUTED).encode())
    log.debug("port %s logged in as %06x", show(initiator.port_name), local)
    return conv.session(initiator.port_name, special.source_wwn)
