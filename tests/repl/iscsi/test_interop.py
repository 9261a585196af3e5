"""The iSCSI target and initiator against implementations no one here wrote.

- libiscsi's tools (Debian's libiscsi-bin) probe ``replfs secondary --iscsi``:
  iscsi-ls (discovery and LUNs), iscsi-inq (standard and VPD pages),
  iscsi-readcapacity16, and the iscsi-test-cu suites that apply to a LUN
  that takes only replfs records (SUITES; the others write or read blocks
  as a disk, reserve it, or use commands a replfs LUN does not have).
- The initiator logs in to tgtd (Debian's tgt), with mutual CHAP, and
  writes and reads a LUN there, through R2T, with many commands in flight.

bin/test installs both packages; a test skips only if its tool cannot be found.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from repl.iscsi import chap
from repl.iscsi.initiator import open_session
from repl.scsi import spc
from store.private import write_private
from tests.support import Daemon, free_port, until

IQN = "iqn.2025-01.io.replfs:interop"
SECRETS = chap.Secrets("alpha", b"initiator-secret-1", "beta", b"target-secret-2")
# The iscsi-test-cu suites that apply to the replfs LUN: iSCSI itself, and the commands
# an initiator issues first. Not run: the suites that write (Write*, Compare*, Prout*,
# Unmap, WriteSame...: the LUN takes replfs records only), and those of commands it
# does not implement (Prefetch, Verify, Sanitize, PreventAllow, Read6/12, ...).
SUITES = ["ALL.Inquiry", "ALL.TestUnitReady", "ALL.ReadCapacity10", "ALL.ReadCapacity16",
          "ALL.ModeSense6", "ALL.Read10", "ALL.Read16", "ALL.iSCSIcmdsn", "ALL.iSCSIdatasn",
          "ALL.iSCSIResiduals", "ALL.iSCSITMF"]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (bin/test installs libiscsi-bin and tgt)")
    return path


def secrets_file(where: Path) -> Path:
    path = where / "chap.secret"
    write_private(path, (f"initiator alpha {SECRETS.initiator_secret.decode()}\n"
                         f"target beta {SECRETS.target_secret.decode()}\n").encode())
    return path


@pytest.fixture
def target(tmp_path: Path) -> Iterator[str]:
    """A running ``replfs secondary --iscsi``; yields its libiscsi URL for LUN 0."""
    daemon = Daemon(["secondary", str(tmp_path / "r"), "--iscsi", "127.0.0.1:0", "--iqn", IQN,
                     "--chap", str(secrets_file(tmp_path))], tmp_path / "sec.log",
                    "listening on")
    daemon.start()
    port = int(daemon.log().split("listening on 127.0.0.1:")[-1].split()[0])
    try:
        yield (f"iscsi://alpha%{SECRETS.initiator_secret.decode()}@127.0.0.1:{port}/{IQN}/0"
               f"?target_user=beta&target_password={SECRETS.target_secret.decode()}")
    finally:
        daemon.stop()


def run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, errors="replace",
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_libiscsi_inq_ok(target: str) -> None:
    out = run(tool("iscsi-inq"), target)
    assert "Peripheral Device Type:DIRECT_ACCESS" in out and "Vendor:REPLFS" in out
    assert "CmdQue:1" in out
    pages = run(tool("iscsi-inq"), "-e", "1", "-c", "0", target)
    for page in ("0x80 UNIT_SERIAL_NUMBER", "0x83 DEVICE_IDENTIFICATION"):
        assert page in pages
    ident = run(tool("iscsi-inq"), "-e", "1", "-c", "131", target)
    assert f"Designator:[{IQN}]" in ident and "T10_VENDORT_ID" in ident


def test_libiscsi_readcapacity16_ok(target: str) -> None:
    out = run(tool("iscsi-readcapacity16"), target)
    assert f"RETURNED LOGICAL BLOCK ADDRESS:{spc.BLOCKS - 1}" in out
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in out


def test_libiscsi_ls_ok(target: str) -> None:
    """Discovery (SendTargets) with CHAP; the portal and the target are listed."""
    portal = target.split("/" + IQN)[0] + "?" + target.split("?")[1]
    out = run(tool("iscsi-ls"), portal)
    assert f"Target:{IQN}" in out and ",1" in out


def test_libiscsi_ls_err_wrong_secret(target: str) -> None:
    bad = target.replace(SECRETS.initiator_secret.decode(), "wrong-secret-00")
    result = subprocess.run([tool("iscsi-inq"), bad], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "Authentication failure" in result.stderr


def test_libiscsi_test_cu_ok(target: str) -> None:
    out = run(tool("iscsi-test-cu"), "-t", ",".join(SUITES), target)
    summary = next(line for line in out.splitlines() if line.strip().startswith("tests"))
    total, ran, passed, failed = (int(n) for n in summary.split()[1:5])
    assert failed == 0 and passed == ran == total > 40, out[-3000:]


@pytest.fixture
def tgtd(tmp_path: Path) -> Iterator[int]:
    """A tgtd on a free port with one 64 MiB LUN (LUN 1) and mutual CHAP; yields the port."""
    tgtd, tgtadm = tool("tgtd"), tool("tgtadm")
    # tgtd's control "port" names its unix socket (/var/run/tgtd/socket.N), N < 32768.
    port, control = free_port(), random.SystemRandom().randrange(1024, 32768)
    image = tmp_path / "lun.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    log = open(tmp_path / "tgtd.log", "wb")
    proc = subprocess.Popen([tgtd, "-f", "-C", str(control), "--iscsi",
                             f"portal=127.0.0.1:{port}"], stdout=log, stderr=log)
    admin = [tgtadm, "-C", str(control), "--lld", "iscsi"]
    try:
        until(lambda: proc.poll() is not None or subprocess.run(
            [*admin, "--op", "show", "--mode", "target"], capture_output=True).returncode == 0,
            bool, what="tgtd's control socket")
        assert proc.poll() is None, (tmp_path / "tgtd.log").read_text()
        for args in (["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN],
                     ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                      "-b", str(image)],
                     ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
                     ["--op", "new", "--mode", "account", "--user", "alpha", "--password",
                      SECRETS.initiator_secret.decode()],
                     ["--op", "new", "--mode", "account", "--user", "beta", "--password",
                      SECRETS.target_secret.decode()],
                     ["--op", "bind", "--mode", "account", "--tid", "1", "--user", "alpha"],
                     ["--op", "bind", "--mode", "account", "--tid", "1", "--user", "beta",
                      "--outgoing"]):
            subprocess.run([*admin, *args], check=True, capture_output=True)
        yield port
    finally:
        proc.kill()  # tgtd stops on SIGTERM only once every target is gone
        proc.wait(10)
        log.close()


async def test_initiator_tgtd_ok_write_read(tgtd: int) -> None:
    """Our initiator logs in to tgtd (mutual CHAP) and writes and reads its LUN: a 3 MiB
    write through R2T and Data-Out, and 64 writes in flight at once."""
    async with open_session("127.0.0.1", tgtd, SECRETS, "iqn.2025-01.io.replfs:primary",
                            IQN) as session:
        await session.command(spc.simple_cdb(spc.Op.TEST_UNIT_READY), lun=1)  # attention
        (await session.command(spc.simple_cdb(spc.Op.TEST_UNIT_READY), lun=1)).check("TUR")
        inquiry = (await session.command(spc.inquiry_cdb(), read=255, lun=1)).check("INQ")
        assert inquiry.data[8:16] == b"IET     "
        capacity = await session.command(spc.read_capacity16_cdb(), read=32, lun=1)
        assert spc.parse_read_capacity16(capacity.check("READ CAPACITY").data) == (
            (64 << 20) // 512, 512)
        data = os.urandom(3 << 20)
        blocks = len(data) // 512
        (await session.command(spc.cdb16(spc.Op.WRITE_16, 100, blocks), data_out=data,
                               lun=1)).check("WRITE")
        back = await session.command(spc.cdb16(spc.Op.READ_16, 100, blocks), read=len(data),
                                     lun=1)
        assert back.check("READ").data == data

        async def write(i: int) -> None:
            block = bytes([i]) * 4096
            (await session.command(spc.cdb16(spc.Op.WRITE_16, 10_000 + 8 * i, 8),
                                   data_out=block, lun=1)).check("WRITE")

        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(write, i)
        back = await session.command(spc.cdb16(spc.Op.READ_16, 10_000, 8 * 64),
                                     read=64 * 4096, lun=1)
        assert back.check("READ").data == b"".join(bytes([i]) * 4096 for i in range(64))
