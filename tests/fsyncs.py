"""What a piece of code fsyncs, by path: the discipline of the queue and the Maildir."""

from __future__ import annotations

import os
from typing import Any


def record_fsyncs(monkeypatch: Any) -> list[str]:
    """Replace os.fsync by a recorder of what each call synced (needs /proc)."""
    calls: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls
