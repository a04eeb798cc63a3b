"""glibc malloc thresholds pinned above the relay's chunk size, unless the operator set their own."""

from __future__ import annotations

import ctypes.util

import pytest

from regproxy import malloc


def test_thresholds_leave_room_for_several_chunks_and_stay_within_glibc_limits() -> None:
    """mmap threshold at least 4 MiB and four chunks, capped at glibc's 32 MiB; trim four times that."""
    assert malloc.thresholds(256 << 10) == (4 << 20, 16 << 20)
    assert malloc.thresholds(2 << 20) == (8 << 20, 32 << 20)
    assert malloc.thresholds(64 << 20) == (32 << 20, 128 << 20)


@pytest.mark.parametrize("name", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_an_operators_own_malloc_settings_win(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """With a MALLOC_* or GLIBC_TUNABLES variable set, nothing is pinned."""
    monkeypatch.setenv(name, "1")
    assert malloc.pin_thresholds(256 << 10) is False


def test_pinned_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    """On glibc (this Debian) mallopt accepts both thresholds."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert ctypes.util.find_library("c") is not None
    assert malloc.pin_thresholds(256 << 10) is True
