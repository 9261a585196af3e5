"""The batch marker: torn for readers only when a crash cut its ops short."""

from __future__ import annotations

from pathlib import Path

import pytest

from store.hold import (
    APPLYING,
    ENV_BOOT_ID,
    clear_applying,
    interrupted,
    lost_to_power,
    mark_applied,
    mark_applying,
    torn,
)


def test_torn_ok_none_without_a_batch(tmp_path: Path) -> None:
    assert torn(tmp_path) is None and interrupted(tmp_path) is None


def test_torn_err_ops_under_way(tmp_path: Path) -> None:
    """With the apply lock held, a batch still marked as applying was cut short."""
    mark_applying(tmp_path, 3, 5)
    assert torn(tmp_path) == (3, 5)
    assert interrupted(tmp_path) == (3, 5)


def test_torn_ok_ops_done_on_this_boot(tmp_path: Path) -> None:
    """Applied but not durable yet: whole for readers, still to redo for the applier."""
    mark_applying(tmp_path, 3, 5)
    mark_applied(tmp_path, 3, 5)
    assert torn(tmp_path) is None
    assert interrupted(tmp_path) == (3, 5)
    clear_applying(tmp_path)
    assert interrupted(tmp_path) is None


def test_torn_err_ops_done_on_another_boot(tmp_path: Path) -> None:
    """A reboot may have lost what the page cache held: torn until the redo."""
    (tmp_path / APPLYING).write_text("3 5 00000000-0000-0000-0000-000000000000\n")
    assert torn(tmp_path) == (3, 5)


def test_torn_err_marker_of_one_set(tmp_path: Path) -> None:
    (tmp_path / APPLYING).write_text("7\n")
    assert torn(tmp_path) == (7, 7) and interrupted(tmp_path) == (7, 7)


def test_applying_rewritten_in_place_never_removed(tmp_path: Path) -> None:
    """A batch rewrites APPLYING where it is, the same size: no file made and removed,
    and nothing of a longer mark is left behind by a shorter one."""
    mark_applied(tmp_path, 1000, 2000)
    inode = (tmp_path / APPLYING).stat().st_ino
    clear_applying(tmp_path)
    assert interrupted(tmp_path) is None
    mark_applying(tmp_path, 3, 4)
    assert interrupted(tmp_path) == (3, 4) and torn(tmp_path) == (3, 4)
    clear_applying(tmp_path)
    st = (tmp_path / APPLYING).stat()
    assert st.st_ino == inode and st.st_size == 128 and st.st_mode & 0o777 == 0o600


def test_lost_to_power_ok_none_on_this_boot(tmp_path: Path) -> None:
    """A batch begun or done on this boot: a crash of the daemon, mended by the redo."""
    assert lost_to_power(tmp_path) is None
    mark_applying(tmp_path, 3, 5)
    assert lost_to_power(tmp_path) is None
    mark_applied(tmp_path, 3, 5)
    assert lost_to_power(tmp_path) is None


@pytest.mark.parametrize("done", [False, True])
def test_lost_to_power_err_begun_on_another_boot(tmp_path: Path, done: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Begun, or even done, on a boot before this one and never made durable: the
    replica's disk kept what it kept of the batch."""
    boot = tmp_path / "boot_id"
    boot.write_text("first-boot\n")
    monkeypatch.setenv(ENV_BOOT_ID, str(boot))
    mark_applying(tmp_path, 3, 5)
    if done:
        mark_applied(tmp_path, 3, 5)
    boot.write_text("second-boot\n")
    assert lost_to_power(tmp_path) == (3, 5)
    assert torn(tmp_path) == (3, 5) and interrupted(tmp_path) == (3, 5)


def test_lost_to_power_err_boot_unknown(tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine whose boot cannot be read: a batch never made durable may have met a
    power cut, so it is resent rather than redone."""
    monkeypatch.setenv(ENV_BOOT_ID, str(tmp_path / "no-such-file"))
    mark_applying(tmp_path, 3, 5)
    assert lost_to_power(tmp_path) == (3, 5)
    clear_applying(tmp_path)
    assert lost_to_power(tmp_path) is None


def test_lost_to_power_ok_none_from_an_older_replfs(tmp_path: Path) -> None:
    """An older replfs wrote no boot while a batch was under way: redone as it was."""
    (tmp_path / APPLYING).write_text("3 5\n")
    assert lost_to_power(tmp_path) is None and torn(tmp_path) == (3, 5)
