"""The iSCSI login (RFC 7143, sections 6 and 11.12-11.13), both ends, with mutual CHAP.

A connection starts in the login phase: Login Requests and Responses carry
text keys through two stages, then the full-feature phase begins:

    security (CSG 0)      InitiatorName, TargetName, SessionType, AuthMethod=CHAP;
                          CHAP_A=5; CHAP_N/CHAP_R, and CHAP_I/CHAP_C for the
                          target to answer (mutual); the target answers CHAP_N/CHAP_R
    operational (CSG 1)   digests, burst lengths, R2T, immediate data (text.py)
    full feature (3)      the response that enters it carries the session's TSIH

replfs's initiator requires CHAP both ways: it refuses a target that does
not prove it knows the target's secret. The target requires the
initiator's CHAP and proves itself to any initiator that asks (replfs's
always does; some tools, such as iscsi-ls listing LUNs, do not). A
refused login gets a Login Response with a status class and detail
(02/01 authentication failure, 02/03 target not found), then the
connection closes.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass, field

from repl.errors import ProtocolError, Refused
from repl.iscsi import chap, text
from repl.iscsi.pdu import Opcode, Pdu, PduStream, words
from repl.iscsi.text import Params

log = logging.getLogger("replfs.iscsi")

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
T_TRANSIT, C_CONTINUE = 0x80, 0x40
PORTAL_GROUP = 1
CMD_WINDOW = 256  # commands a session may have outstanding (MaxCmdSN - ExpCmdSN + 1)
SUCCESS = (0, 0)
AUTH_FAILED = (0x02, 0x01)
NOT_FOUND = (0x02, 0x03)
MISSING = (0x02, 0x07)
_STATUS_TEXT = {AUTH_FAILED: "authentication failed", NOT_FOUND: "target not found",
                MISSING: "missing parameter", (0x02, 0x00): "initiator error",
                (0x03, 0x00): "target error"}


def flags(transit: bool, csg: int, nsg: int) -> int:
    return (T_TRANSIT if transit else 0) | csg << 2 | (nsg if transit else 0)


def stages(pdu: Pdu) -> tuple[bool, int, int]:
    """(transit, current stage, next stage) of a login PDU."""
    return bool(pdu.flags & T_TRANSIT), pdu.flags >> 2 & 3, pdu.flags & 3


class LoginFailed(Refused):
    """A login the other end (or we) turned down: its status class and detail."""

    def __init__(self, status: tuple[int, int], why: str) -> None:
        self.status = status
        super().__init__(f"iSCSI login refused ({status[0]:02x}/{status[1]:02x} "
                         f"{_STATUS_TEXT.get(status, 'error')}): {why}")


@dataclass
class Session:
    """What a login leaves for the full-feature phase, at either end."""

    params: Params
    isid: int
    tsih: int
    cmd_sn: int  # the initiator's next CmdSN (at the target: the next one expected)
    stat_sn: int  # the target's next StatSN (at the initiator: the next one expected)
    max_cmd_sn: int
    initiator: str = ""
    target: str = ""
    discovery: bool = False
    keys: dict[str, str] = field(default_factory=dict)


# --- the initiator ------------------------------------------------------------------------


async def initiate(pdus: PduStream, secrets_: chap.Secrets, initiator: str,
                   target: str | None, isid: int) -> Session:
    """Log in to *target* (a discovery session if None) as *initiator*, mutual CHAP.

    Raises LoginFailed if the target refused, or did not prove it knows the
    target's secret; ProtocolError if it broke the protocol.
    """
    cmd_sn, exp_stat_sn = 1, 0
    tsih = 0

    async def exchange(keys: dict[str, str], csg: int, nsg: int, transit: bool
                       ) -> tuple[Pdu, dict[str, str]]:
        nonlocal exp_stat_sn, tsih
        await pdus.send(Pdu(Opcode.LOGIN_REQUEST, flags(transit, csg, nsg),
                            lun=isid << 16, sn=cmd_sn, exp_sn=exp_stat_sn,
                            immediate=True, data=text.encode(keys)))
        reply = await pdus.receive()
        if reply.opcode != Opcode.LOGIN_RESPONSE:
            raise ProtocolError(f"expected a Login Response, got {reply.opcode.name}")
        status = (reply.words[1] >> 24, reply.words[1] >> 16 & 0xFF)
        if status != SUCCESS:
            raise LoginFailed(status, "the target said so")
        exp_stat_sn = (reply.sn + 1) & 0xFFFFFFFF
        tsih = reply.lun & 0xFFFF
        return reply, text.decode(reply.data)

    first = {"InitiatorName": initiator, "SessionType": "Discovery" if target is None
             else "Normal", **({"TargetName": target} if target else {}), "AuthMethod": "CHAP"}
    _, got = await exchange(first, SECURITY, OPERATIONAL, False)
    if got.get("AuthMethod") != "CHAP":
        raise LoginFailed(AUTH_FAILED, f"the target offers AuthMethod={got.get('AuthMethod')}")
    _, got = await exchange({"CHAP_A": chap.MD5}, SECURITY, OPERATIONAL, False)
    if got.get("CHAP_A") != chap.MD5 or "CHAP_I" not in got or "CHAP_C" not in got:
        raise LoginFailed(AUTH_FAILED, "the target sent no MD5 CHAP challenge")
    their_id, their_challenge = chap.identifier(got["CHAP_I"]), chap.decode_binary(got["CHAP_C"])
    our_id, our_challenge = chap.challenge()
    reply, got = await exchange({
        "CHAP_N": secrets_.initiator_name,
        "CHAP_R": chap.encode_binary(chap.response(their_id, secrets_.initiator_secret,
                                                   their_challenge)),
        "CHAP_I": str(our_id), "CHAP_C": chap.encode_binary(our_challenge)},
        SECURITY, OPERATIONAL, True)
    while not stages(reply)[0]:  # the target is not ready to move on yet
        reply, more = await exchange({}, SECURITY, OPERATIONAL, True)
        got |= more
    want = chap.response(our_id, secrets_.target_secret, our_challenge)
    if got.get("CHAP_N") != secrets_.target_name or not hmac.compare_digest(
            chap.decode_binary(got.get("CHAP_R", "0x")), want):
        raise LoginFailed(AUTH_FAILED, f"the target {got.get('CHAP_N')!r} did not prove it "
                          f"knows the secret of {secrets_.target_name!r}")
    offer = dict(text.OFFER) if target else {
        k: text.OFFER[k] for k in ("HeaderDigest", "DataDigest", "MaxRecvDataSegmentLength")}
    results: dict[str, str] = {}
    transit = stages(reply)
    while not (transit[0] and transit[2] == FULL_FEATURE):
        reply, got = await exchange(offer, OPERATIONAL, FULL_FEATURE, True)
        results |= got
        # Keys the target offered on its own are answered in the next request.
        offer = {k: text.answer(k, v) for k, v in got.items()
                 if k not in text.OFFER and not text.is_declarative(k)}
        transit = stages(reply)
    peer_recv = text.number("MaxRecvDataSegmentLength",
                            results.get("MaxRecvDataSegmentLength", "8192"))
    return Session(text.agreed(results, peer_recv), isid, tsih, cmd_sn, exp_stat_sn,
                   reply.words[0], initiator, target or "", target is None, results)


# --- the target ---------------------------------------------------------------------------


async def accept(pdus: PduStream, secrets_: chap.Secrets, target: str, tsih: int) -> Session:
    """Answer an initiator's login to *target* (or a discovery session): its CHAP, and ours
    if it asks (mutual).

    Returns the session once it enters the full-feature phase. Raises
    LoginFailed after telling the initiator why; ProtocolError if it broke
    the protocol.
    """
    stat_sn = secrets.randbelow(1 << 31)
    keys: dict[str, str] = {}
    results: dict[str, str] = {}
    challenge: tuple[int, bytes] | None = None
    authenticated = declared = False
    isid = cmd_sn = 0
    pending = b""

    async def respond(pdu: Pdu, transit: bool, csg: int, nsg: int, pairs: dict[str, str],
                      status: tuple[int, int] = SUCCESS, session: int = 0) -> None:
        nonlocal stat_sn
        await pdus.send(Pdu(Opcode.LOGIN_RESPONSE, flags(transit, csg, nsg),
                            lun=pdu.lun & ~0xFFFF | session, itt=pdu.itt, sn=stat_sn,
                            exp_sn=pdu.sn, data=text.encode(pairs),
                            tail=words(pdu.sn + CMD_WINDOW - 1, status[0] << 24 | status[1] << 16)))
        stat_sn = (stat_sn + 1) & 0xFFFFFFFF

    async def refuse(pdu: Pdu, status: tuple[int, int], why: str) -> LoginFailed:
        await respond(pdu, False, stages(pdu)[1], 0, {}, status)
        return LoginFailed(status, why)

    while True:
        pdu = await pdus.receive()
        if pdu.opcode != Opcode.LOGIN_REQUEST:
            raise ProtocolError(f"expected a Login Request, got {pdu.opcode.name}")
        transit, csg, nsg = stages(pdu)
        isid, cmd_sn = pdu.lun >> 16, pdu.sn
        pending += pdu.data
        if len(pending) > text.MAX_TEXT:
            raise ProtocolError("login text over 64 KiB")
        if pdu.flags & C_CONTINUE:
            await respond(pdu, False, csg, 0, {})
            continue
        got, pending = text.decode(pending), b""
        keys |= got
        reply: dict[str, str] = {}
        if csg == SECURITY:
            if "InitiatorName" not in keys:
                raise await refuse(pdu, MISSING, "no InitiatorName")
            discovery = keys.get("SessionType", "Normal") == "Discovery"
            if "AuthMethod" in got:
                if "CHAP" not in got["AuthMethod"].split(","):
                    raise await refuse(pdu, AUTH_FAILED, f"AuthMethod={got['AuthMethod']}: "
                                       "this target takes CHAP only")
                if not discovery and keys.get("TargetName") != target:
                    raise await refuse(pdu, NOT_FOUND, f"no target {keys.get('TargetName')!r} "
                                       f"here (this is {target})")
                reply = {"AuthMethod": "CHAP"}
                if not discovery:
                    reply["TargetPortalGroupTag"] = str(PORTAL_GROUP)
            elif "CHAP_A" in got:
                if chap.MD5 not in got["CHAP_A"].split(","):
                    raise await refuse(pdu, AUTH_FAILED, f"CHAP_A={got['CHAP_A']}: MD5 only")
                challenge = chap.challenge()
                reply = {"CHAP_A": chap.MD5, "CHAP_I": str(challenge[0]),
                         "CHAP_C": chap.encode_binary(challenge[1])}
            elif "CHAP_R" in got and challenge is not None:
                right = chap.response(challenge[0], secrets_.initiator_secret, challenge[1])
                if got.get("CHAP_N") != secrets_.initiator_name or not hmac.compare_digest(
                        chap.decode_binary(got["CHAP_R"]), right):
                    raise await refuse(pdu, AUTH_FAILED, f"CHAP_N={got.get('CHAP_N')!r} did "
                                       "not prove it knows the initiator's secret")
                if "CHAP_C" in got:  # mutual: the initiator wants us to prove ourselves
                    theirs = chap.decode_binary(got["CHAP_C"])
                    if theirs == challenge[1]:
                        raise await refuse(pdu, AUTH_FAILED, "it sent back our own challenge")
                    reply = {"CHAP_N": secrets_.target_name, "CHAP_R": chap.encode_binary(
                        chap.response(chap.identifier(got.get("CHAP_I", "")),
                                      secrets_.target_secret, theirs))}
                authenticated = True
            elif not got:
                pass  # an empty request: the initiator waits for our transit
            else:
                raise await refuse(pdu, AUTH_FAILED, f"unexpected keys {sorted(got)[:4]}")
        elif csg == OPERATIONAL:
            if not authenticated:
                raise await refuse(pdu, AUTH_FAILED, "it skipped the CHAP authentication")
            for key, value in got.items():
                if text.is_declarative(key):
                    continue
                try:
                    reply[key] = results[key] = text.answer(key, value)
                except ProtocolError as exc:
                    raise await refuse(pdu, (0x02, 0x00), str(exc)) from None
            if not declared:
                reply["MaxRecvDataSegmentLength"] = text.OFFER["MaxRecvDataSegmentLength"]
                declared = True
        else:
            raise ProtocolError(f"login in stage {csg}")
        go = transit and authenticated and nsg > csg
        if go and nsg == FULL_FEATURE:
            peer_recv = text.number("MaxRecvDataSegmentLength",
                                    keys.get("MaxRecvDataSegmentLength", "8192"))
            try:
                params = text.agreed(results, peer_recv)
            except ProtocolError as exc:
                raise await refuse(pdu, (0x02, 0x00), str(exc)) from None
            await respond(pdu, True, csg, nsg, reply, session=tsih)
            return Session(params, isid, tsih, cmd_sn, stat_sn,
                           cmd_sn + CMD_WINDOW - 1, keys["InitiatorName"], target,
                           keys.get("SessionType") == "Discovery", results)
        await respond(pdu, go, csg, nsg, reply)
