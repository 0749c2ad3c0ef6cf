"""The mail transfer scheduler: MAILXFRINT, the seed's dial-up SMTP scheduler.

IBM i can hold outbound mail and send it in batches, every "mail transfer
interval" minutes, for a system that reaches its ISP over a dial-up link;
with ETRNCLT it also asks the ISP, on each of those connections, to send
the mail it holds for us.  This module only keeps the time: it calls
``transfer`` every ``minutes`` minutes, counted from when the schedule
started (as IBM's scheduler starts with SMTP) or from the last transfer.
What a transfer does is the outbound manager's business.

0 minutes means no schedule: mail is delivered as soon as it is queued.
A live change (CHGSMTPA MAILXFRINT) keeps the last transfer as the origin,
so lowering the interval can make the next transfer due at once, and
raising it postpones the next one.  ``clock`` is any ``IReactorTime``, so
tests drive it with ``twisted.internet.task.Clock``.

With ``state`` (a file), the time of the last transfer outlives the bridge:
a bridge restarted between two transfers keeps the rhythm instead of
counting a whole interval from its own start, and one that was down when a
transfer fell due makes it at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

MINUTE = 60.0


class TransferSchedule:
    def __init__(self, clock: Any, minutes: int, transfer: Callable[[], None],
                 state: Path | None = None) -> None:
        self.clock = clock
        self.minutes = minutes
        self.transfer = transfer
        self.state = state
        self.origin: float | None = None  # start, or the last transfer
        self.call: Any = None

    @property
    def active(self) -> bool:
        return self.minutes > 0

    @property
    def next_at(self) -> float | None:
        """When the next scheduled transfer is (clock seconds), or None without one."""
        if self.call is None or not self.call.active():
            return None
        return self.call.getTime()

    def start(self) -> None:
        now = self.clock.seconds()
        last = self._last_transfer()
        self.origin = last if last is not None and last <= now else now
        self._arm()

    def stop(self) -> None:
        self._cancel()
        self.origin = None

    def configure(self, minutes: int) -> None:
        """A new interval, applied to the running schedule."""
        if minutes == self.minutes:
            return
        self.minutes = minutes
        if self.origin is not None:
            self._arm()

    def _arm(self) -> None:
        self._cancel()
        if not self.active or self.origin is None:
            return
        delay = max(0.0, self.origin + self.minutes * MINUTE - self.clock.seconds())
        self.call = self.clock.callLater(delay, self._fire)

    def _cancel(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def _fire(self) -> None:
        self.call = None
        self.origin = self.clock.seconds()
        self._remember(self.origin)
        self._arm()
        self.transfer()

    def _last_transfer(self) -> float | None:
        if self.state is None:
            return None
        try:
            return float(self.state.read_text().strip())
        except (OSError, ValueError):
            return None

    def _remember(self, when: float) -> None:
        """Best effort: a lost time only shifts the rhythm, it loses no mail."""
        if self.state is None:
            return
        tmp = self.state.with_name(self.state.name + ".tmp")
        try:
            tmp.write_text(f"{when:.3f}\n")
            os.replace(tmp, self.state)
        except OSError:
            pass
