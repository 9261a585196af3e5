"""The primary's iSCSI initiator: SCSI commands over one logged-in connection.

``Initiator`` keeps many commands outstanding on one connection: each takes
the next CmdSN, waits only while the target's window (MaxCmdSN) is closed,
and completes when its SCSI Response (or final Data-In) arrives, in
whatever order the target answers. A write sends what FirstBurstLength
allows as immediate data and the rest when the target asks for it (R2T),
in Data-Out PDUs no larger than the target's MaxRecvDataSegmentLength.

``open_session`` logs in (mutual CHAP) and runs the PDU reader; it is all
an interop test needs to drive a target such as tgtd, and what the
replication link (repl/scsi/link.py) is built on.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from repl.errors import ProtocolError, first_error
from repl.iscsi import chap, login, text
from repl.iscsi.pdu import F_FINAL, NO_TAG, Opcode, Pdu, PduStream, sn_lt, words
from repl.scsi import spc
from repl.scsi.link import Result, run_command

_R, _W, _SIMPLE = 0x40, 0x20, 0x01
_DATA_S = 0x01
LOGOUT_SECONDS = 1.0
LOGIN_SECONDS = 10.0  # a target that has not let us in by then is given up
# What ends a session: the link broke or closed, or the target broke the protocol.
ENDS = (ProtocolError, OSError, trio.BrokenResourceError, trio.EndOfChannel,
        trio.ClosedResourceError)


@dataclass
class _Task:
    itt: int
    data_out: bytes
    read: bytearray
    done: Callable[[Result | Exception], None]


class Initiator:
    """One session of one connection in the full-feature phase."""

    def __init__(self, pdus: PduStream, session: login.Session) -> None:
        self.pdus = pdus
        self.session = session
        self._cmd_sn = session.cmd_sn
        self._exp_cmd_sn = session.cmd_sn
        self._max_cmd_sn = session.max_cmd_sn
        self._exp_stat_sn = session.stat_sn
        self._window_moved = trio.Event()
        self._submit = trio.Lock()  # CmdSNs reach the wire in order
        self._tasks: dict[int, _Task] = {}
        self._next_itt = 1
        self._r2ts_in, self._r2ts = trio.open_memory_channel[Pdu](64)
        self.error: Exception | None = None
        self.ended = trio.Event()

    @property
    def outstanding(self) -> int:
        return len(self._tasks)

    async def submit(self, cdb: bytes, done: Callable[[Result | Exception], None], *,
                     data_out: bytes = b"", read: int = 0, lun: int = 0) -> None:
        """Send a command; *done* is called with its Result, or the error that ended the
        session. Returns once it is on the wire: it waits only for the window."""
        async with self._submit:
            while sn_lt(self._max_cmd_sn, self._cmd_sn):  # the window is closed
                if self.error is not None:
                    raise self.error
                self._window_moved = trio.Event()
                await self._window_moved.wait()
            if self.error is not None:
                raise self.error
            itt, self._next_itt = self._next_itt, self._next_itt % (NO_TAG - 1) + 1
            params = self.session.params
            first = data_out[: min(params.first_burst, params.send_data)] \
                if params.immediate_data else b""
            self._tasks[itt] = _Task(itt, data_out, bytearray(), done)
            pdu = Pdu(Opcode.SCSI_COMMAND, F_FINAL | _SIMPLE | (_W if data_out else 0)
                      | (_R if read else 0), lun=lun << 48, itt=itt,
                      ttt=len(data_out) or read, sn=self._cmd_sn, exp_sn=self._exp_stat_sn,
                      tail=cdb.ljust(16, b"\0"), data=first)
            self._cmd_sn = (self._cmd_sn + 1) & 0xFFFFFFFF
            await self.pdus.send(pdu)

    async def command(self, cdb: bytes, *, data_out: bytes = b"", read: int = 0,
                      lun: int = 0) -> Result:
        """Send a command and wait for its result. Raises what ended the session."""
        return await run_command(self, cdb, data_out=data_out, read=read, lun=lun)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Read PDUs and complete commands until the link ends; then every command
        still outstanding, and every later submit, gets the error. Never raises it."""
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._data_outs)
                while True:
                    await self._handle(await self.pdus.receive())
        except* ENDS as group:
            leaf = first_error(group)
            assert isinstance(leaf, Exception)
            self._fail(leaf)

    async def aclose(self) -> None:
        await self.pdus.aclose()

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self.ended.set()
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.done(exc)
        self._window_moved.set()

    def _window(self, pdu: Pdu) -> None:
        exp, most = pdu.exp_sn, pdu.words[0]
        if sn_lt(most, (exp - 1) & 0xFFFFFFFF):
            return  # RFC 7143 4.2.2.1: both ignored
        if sn_lt(self._exp_cmd_sn, exp):
            self._exp_cmd_sn = exp
        if sn_lt(self._max_cmd_sn, most):
            self._max_cmd_sn = most
            self._window_moved.set()

    async def _handle(self, pdu: Pdu) -> None:
        if pdu.opcode in (Opcode.SCSI_RESPONSE, Opcode.DATA_IN, Opcode.R2T, Opcode.NOP_IN,
                          Opcode.LOGOUT_RESPONSE, Opcode.TEXT_RESPONSE, Opcode.TASK_RESPONSE,
                          Opcode.REJECT, Opcode.ASYNC):
            self._window(pdu)
        if pdu.opcode == Opcode.SCSI_RESPONSE:
            self._stat(pdu)
            task = self._task(pdu)
            sense = None
            if pdu.b3 == spc.CHECK_CONDITION and len(pdu.data) >= 2:
                size = int.from_bytes(pdu.data[:2], "big")
                sense = spc.Sense.decode(pdu.data[2 : 2 + size])
            if pdu.b2 != 0:
                task.done(ProtocolError(f"the target could not complete the command "
                                        f"(iSCSI response {pdu.b2:#x})"))
            else:
                task.done(Result(pdu.b3, sense, bytes(task.read)))
        elif pdu.opcode == Opcode.DATA_IN:
            reading = self._tasks.get(pdu.itt)
            if reading is None:
                raise ProtocolError(f"Data-In for no command (ITT {pdu.itt:#x})")
            task = reading
            offset = pdu.words[2]
            if offset != len(task.read):
                raise ProtocolError(f"Data-In at offset {offset}, expected {len(task.read)}")
            task.read += pdu.data
            if pdu.flags & _DATA_S:
                self._stat(pdu)
                del self._tasks[pdu.itt]
                task.done(Result(pdu.b3, None, bytes(task.read)))
        elif pdu.opcode == Opcode.R2T:
            if pdu.itt not in self._tasks:
                raise ProtocolError(f"R2T for no command (ITT {pdu.itt:#x})")
            await self._r2ts_in.send(pdu)
        elif pdu.opcode == Opcode.NOP_IN:
            if pdu.itt != NO_TAG:
                self._stat(pdu)
            if pdu.ttt != NO_TAG:  # the target pings us: answer at once
                await self.pdus.send(Pdu(Opcode.NOP_OUT, F_FINAL, lun=pdu.lun, itt=NO_TAG,
                                         ttt=pdu.ttt, sn=self._cmd_sn,
                                         exp_sn=self._exp_stat_sn, immediate=True))
        elif pdu.opcode == Opcode.LOGOUT_RESPONSE:
            raise trio.EndOfChannel
        elif pdu.opcode == Opcode.REJECT:
            raise ProtocolError(f"the target rejected a PDU (reason {pdu.b2:#x})")
        elif pdu.opcode == Opcode.ASYNC:
            raise ProtocolError(f"the target sent asynchronous event {pdu.words[3] >> 24}")
        else:
            raise ProtocolError(f"unexpected {pdu.opcode.name} from the target")

    def _stat(self, pdu: Pdu) -> None:
        self._exp_stat_sn = (pdu.sn + 1) & 0xFFFFFFFF

    def _task(self, pdu: Pdu) -> _Task:
        task = self._tasks.pop(pdu.itt, None)
        if task is None:
            raise ProtocolError(f"a response for no command (ITT {pdu.itt:#x})")
        return task

    async def _data_outs(self) -> None:
        """Answer each R2T with the data it asks for, in PDUs the target takes."""
        async for r2t in self._r2ts:
            task = self._tasks.get(r2t.itt)
            if task is None:
                continue  # ended meanwhile
            _, _, offset, length = r2t.words
            if offset + length > len(task.data_out):
                raise ProtocolError(f"R2T for bytes {offset}+{length} of a "
                                    f"{len(task.data_out)}-byte write")
            chunk = self.session.params.send_data
            pdus = [Pdu(Opcode.DATA_OUT, F_FINAL if at + chunk >= offset + length else 0,
                        lun=r2t.lun, itt=r2t.itt, ttt=r2t.ttt, exp_sn=self._exp_stat_sn,
                        tail=words(0, sn, at, 0),
                        data=task.data_out[at : min(at + chunk, offset + length)])
                    for sn, at in enumerate(range(offset, offset + length, chunk))]
            await self.pdus.send(*pdus)

    async def logout(self) -> None:
        """Log out (close the session), if the target answers within LOGOUT_SECONDS."""
        with trio.move_on_after(LOGOUT_SECONDS):
            async with self._submit:
                itt, self._next_itt = self._next_itt, self._next_itt % (NO_TAG - 1) + 1
                await self.pdus.send(Pdu(Opcode.LOGOUT_REQUEST, F_FINAL, itt=itt,
                                         sn=self._cmd_sn, exp_sn=self._exp_stat_sn,
                                         immediate=True))
            await self.ended.wait()


def new_isid() -> int:
    """A random ISID (RFC 7143 11.12.5: type 2, random qualifier)."""
    return 0x80 << 40 | secrets.randbits(40)


@asynccontextmanager
async def open_session(host: str, port: int, secrets_: chap.Secrets, initiator: str,
                       target: str | None) -> AsyncIterator[Initiator]:
    """A logged-in session to *target* on *host*:*port* (discovery if None), its reader
    running; logged out and closed when the context exits. Raises trio.TooSlowError
    if the connect or the login take over LOGIN_SECONDS each."""
    with trio.fail_after(LOGIN_SECONDS):
        stream = await trio.open_tcp_stream(host, port)
    pdus = PduStream(stream, text.MAX_RECV)
    try:
        with trio.fail_after(LOGIN_SECONDS):
            session = await login.initiate(pdus, secrets_, initiator, target, new_isid())
        initiator_ = Initiator(pdus, session)
        async with trio.open_nursery() as nursery:
            await nursery.start(initiator_.run)
            try:
                yield initiator_
            finally:
                if initiator_.error is None:
                    await initiator_.logout()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)
