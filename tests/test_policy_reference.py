"""``decide`` against the plain one-pass-per-rule version it replaced.

The controller runs ``decide`` after nearly every event, so it sorts the
jobs out in one pass.  The version below states each rule on its own and
is kept as the reference: both must agree on every pool.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from test_policy import scenarios

from twistmail.config import PrestartEntry
from twistmail.prestart.policy import Actions, EntryView, JobState, JobView, Limits, decide


@settings(max_examples=2000, deadline=None)
@given(scenarios(any_state=True))
def test_decide_agrees_with_the_reference(s) -> None:
    view, entry, limits, now = s
    assert decide(view, entry, limits, now) == reference_decide(view, entry, limits, now)


def reference_decide(view: EntryView, entry: PrestartEntry, limits: Limits,
                     now: float) -> Actions:
    """``decide`` as it was first written: each rule a pass of its own."""
    if not view.active:
        return Actions()
    if view.boot_failures >= limits.boot_failure_limit:
        return Actions(fail=True, reject=len(view.waiting))

    cap = math.inf if entry.maxjobs is None else entry.maxjobs
    live = [j for j in view.jobs if j.state is not JobState.ENDING]
    ending: dict[int, str] = {}

    # Used-up jobs end as soon as they are idle.
    for j in live:
        if j.state is JobState.IDLE and entry.maxuse is not None and j.uses >= entry.maxuse:
            ending[j.id] = "maxuse"

    # Above a lowered MAXJOBS: end idle jobs, most recently idle first.
    idle = sorted(
        (j for j in live if j.state is JobState.IDLE and j.id not in ending),
        key=lambda j: -j.since,
    )
    excess = len(live) - len(ending) - cap
    for j in idle:
        if excess <= 0:
            break
        ending[j.id] = "maxjobs"
        excess -= 1

    # Gradual trimming of idle surplus.
    trimmed = False
    wake: list[float] = []
    if now >= view.last_trim + limits.trim_interval:
        trimmed = True
        remaining = len(live) - len(ending)
        old_idle = sorted(
            (
                j
                for j in live
                if j.state is JobState.IDLE
                and j.id not in ending
                and now >= j.since + limits.trim_interval
            ),
            key=lambda j: j.since,
        )
        surplus = min(remaining - entry.inljobs,
                      len(old_idle) - len(view.waiting) - entry.threshold)
        if surplus > 0:
            quota = max(1, surplus // 2)
            for j in old_idle[:quota]:
                ending[j.id] = "trim"
        if len(live) - len(ending) > entry.inljobs:
            wake.append(now + limits.trim_interval)
    else:
        wake.append(view.last_trim + limits.trim_interval)

    # Starting jobs: keep INLJOBS, grow past THRESHOLD, stay under MAXJOBS.
    remaining = len(live) - len(ending)
    room = max(0, cap - remaining)
    start = min(max(0, entry.inljobs - remaining), room)
    available = _available(live, ending) - len(view.waiting)
    while entry.adljobs and available + start < entry.threshold and start < room:
        start = min(start + entry.adljobs, room)
    starting = sum(1 for j in live if j.state is JobState.STARTING)
    start = int(min(start, max(0, limits.max_starting - starting)))
    if start and view.boot_failures:
        resume = view.last_boot_failure + limits.backoff(view.boot_failures)
        if now < resume:
            start = 0
            wake.append(resume)

    # Requests that waited too long.
    reject = sum(1 for t in view.waiting if now >= t + limits.wait_limit)
    if entry.wait == "*NO":  # none may wait: those no idle job that stays takes go
        staying_idle = sum(1 for j in live if j.state is JobState.IDLE and j.id not in ending)
        reject = max(reject, len(view.waiting) - staying_idle)
    if len(view.waiting) > reject:
        wake.append(view.waiting[reject] + limits.wait_limit)

    ids = tuple(ending)
    return Actions(
        start=start,
        end=ids,
        end_reasons=tuple(ending[i] for i in ids),
        reject=reject,
        trimmed=trimmed,
        wake_at=min(wake) if wake else None,
    )


def _available(live: list[JobView], ending: dict[int, str]) -> int:
    return sum(
        1
        for j in live
        if j.id not in ending and j.state in (JobState.IDLE, JobState.STARTING)
    )
