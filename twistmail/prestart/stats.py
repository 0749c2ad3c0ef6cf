"""DSPACTPJ statistics of one prestart entry, time-weighted like IBM's.

Averages are integrals over time divided by the elapsed time since the entry
started or the statistics were last reset, so a burst of one second does not
weigh like a busy hour.  The runtime calls :meth:`PoolStats.observe` whenever
a count changes.
"""

from __future__ import annotations

import attrs


@attrs.define
class _Gauge:
    current: int = 0
    peak: int = 0
    area: float = 0.0  # integral of current over time

    def advance(self, dt: float) -> None:
        self.area += self.current * dt

    def set(self, value: int) -> None:
        self.current = value
        self.peak = max(self.peak, value)

    def reset(self) -> None:
        self.peak = self.current
        self.area = 0.0


@attrs.define
class PoolStats:
    started: float
    last: float = attrs.field(default=None)
    jobs: _Gauge = attrs.field(factory=_Gauge)
    in_use: _Gauge = attrs.field(factory=_Gauge)
    waiting: _Gauge = attrs.field(factory=_Gauge)
    accepted: int = 0
    rejected: int = 0
    waits: int = 0
    wait_total: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.last is None:
            self.last = self.started

    def observe(self, now: float, jobs: int, in_use: int, waiting: int) -> None:
        """Record new current counts at ``now``."""
        dt = max(0.0, now - self.last)
        for g in (self.jobs, self.in_use, self.waiting):
            g.advance(dt)
        self.last = now
        self.jobs.set(jobs)
        self.in_use.set(in_use)
        self.waiting.set(waiting)

    def record_accept(self, waited: float | None = None) -> None:
        self.accepted += 1
        if waited is not None:
            self.waits += 1
            self.wait_total += waited

    def record_reject(self) -> None:
        self.rejected += 1

    def reset(self, now: float) -> None:
        self.observe(now, self.jobs.current, self.in_use.current, self.waiting.current)
        self.started = now
        for g in (self.jobs, self.in_use, self.waiting):
            g.reset()
        self.accepted = self.rejected = self.waits = 0
        self.wait_total = 0.0

    def report(self, now: float) -> dict[str, float | int]:
        self.observe(now, self.jobs.current, self.in_use.current, self.waiting.current)
        elapsed = now - self.started

        def avg(g: _Gauge) -> float:
            return g.area / elapsed if elapsed > 0 else float(g.current)

        return {
            "elapsed": round(elapsed, 3),
            "jobs_current": self.jobs.current,
            "jobs_average": round(avg(self.jobs), 2),
            "jobs_peak": self.jobs.peak,
            "in_use_current": self.in_use.current,
            "in_use_average": round(avg(self.in_use), 2),
            "in_use_peak": self.in_use.peak,
            "waiting_current": self.waiting.current,
            "waiting_average": round(avg(self.waiting), 2),
            "waiting_peak": self.waiting.peak,
            "average_wait": round(self.wait_total / self.accepted, 4) if self.accepted else 0.0,
            "accepted": self.accepted,
            "rejected": self.rejected,
        }
