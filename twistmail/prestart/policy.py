"""The prestart job rules of CHGPJE, as pure functions.

Everything the pool decides (start more jobs, end idle ones, reject or queue
a program start request, stop an entry that cannot boot) is decided here from
a snapshot, the entry's CHGPJE values and the time.  The Twisted runtime in
``twistmail.prestart.pool`` only carries the actions out, so every rule can
be tested exhaustively without processes or a reactor.

The rules (DESIGN.md §3):

* Start: INLJOBS jobs; the pool never holds fewer live jobs than INLJOBS
  while it is active, which is also how crashed and used-up jobs are replaced.
* Grow: when the available jobs (idle or starting) less the waiting requests
  fall below THRESHOLD, ADLJOBS more start - as many batches as it takes to
  reach THRESHOLD again, so the rules reach a fixed point; never above MAXJOBS.
* Reuse: an idle job that has served MAXUSE sessions is ended.
* Shrink: once per trim interval, idle jobs that have been idle a whole
  interval are ended, half the surplus at a time, never below INLJOBS and
  never so far that growth would start again at once.
* Lowered MAXJOBS: idle jobs above it are ended; busy jobs never are.
* At most ``max_starting`` jobs start at once; each one ready lets the next go.
* Boot failures: a job that dies before it is ready delays the next start
  (doubling back-off); after ``boot_failure_limit`` in a row the entry stops.
* Waiting: with WAIT *YES a request without a free job waits in a bounded
  FIFO and is rejected after ``wait_limit`` seconds; with WAIT *NO it is
  rejected at once, and so are those still waiting when WAIT becomes *NO.
"""

from __future__ import annotations

import enum
import math

import attrs

from twistmail.config import PrestartEntry


class JobState(enum.Enum):
    STARTING = "STARTING"  # spawned, not yet ready
    IDLE = "IDLE"  # waiting for work (IBM's PSRW)
    BUSY = "BUSY"  # serving a session (RUN)
    ENDING = "ENDING"  # told to end (END)


class Admission(enum.Enum):
    HANDOFF = "handoff"
    QUEUE = "queue"
    REJECT = "reject"


@attrs.frozen
class Limits:
    """Pool timings that are not CHGPJE values (``[prestart]`` settings)."""

    trim_interval: float = 30.0
    wait_limit: float = 30.0
    queue_limit: int = 128
    boot_failure_limit: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    #: Jobs starting at once.  INLJOBS 9999 asks for thousands of jobs: all
    #: requested together they would queue at the launcher past the start
    #: limit, and each job's start is cheap only while a few run at a time.
    max_starting: int = 32

    def backoff(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))


@attrs.frozen
class JobView:
    id: int
    state: JobState
    uses: int = 0
    since: float = 0.0  # when the job entered its current state


@attrs.frozen
class EntryView:
    """What the pool looks like at one moment."""

    active: bool = True
    jobs: tuple[JobView, ...] = ()
    waiting: tuple[float, ...] = ()  # enqueue times, oldest first
    boot_failures: int = 0  # in a row
    last_boot_failure: float = 0.0
    last_trim: float = 0.0


@attrs.frozen
class Actions:
    start: int = 0
    end: tuple[int, ...] = ()  # ids of idle jobs to end
    end_reasons: tuple[str, ...] = ()  # one reason per id in ``end``
    reject: int = 0  # how many of the oldest waiting requests to reject
    fail: bool = False  # stop the entry: it cannot boot jobs
    trimmed: bool = False  # a trim check ran (the runtime records the time)
    wake_at: float | None = None  # when to decide again even if nothing happens


def _usable_idle(job: JobView, entry: PrestartEntry) -> bool:
    return job.state is JobState.IDLE and (entry.maxuse is None or job.uses < entry.maxuse)


def admit(view: EntryView, entry: PrestartEntry, limits: Limits) -> Admission:
    """What to do with a program start request (an accepted connection)."""
    if not view.active:
        return Admission.REJECT
    if any(_usable_idle(j, entry) for j in view.jobs) and not view.waiting:
        return Admission.HANDOFF
    if entry.wait == "*NO" or len(view.waiting) >= limits.queue_limit:
        return Admission.REJECT
    return Admission.QUEUE


def accepting(view: EntryView, entry: PrestartEntry, limits: Limits) -> bool:
    """Whether the listeners should accept: False leaves clients in the kernel backlog."""
    if not view.active or entry.wait == "*NO":
        return True  # a refusal from the controller beats a silent wait
    return len(view.waiting) < limits.queue_limit


def decide(view: EntryView, entry: PrestartEntry, limits: Limits, now: float) -> Actions:
    """The actions that bring the pool in line with its rules at ``now``."""
    if not view.active:
        return Actions()
    if view.boot_failures >= limits.boot_failure_limit:
        return Actions(fail=True, reject=len(view.waiting))

    # The controller decides after nearly every event, over every job: one
    # pass sorts them out, and the rarer rules look only at what they need.
    cap = math.inf if entry.maxjobs is None else entry.maxjobs
    maxuse = entry.maxuse
    live: list[JobView] = []
    idle: list[JobView] = []  # idle and not used up
    starting = 0
    ending: dict[int, str] = {}
    for j in view.jobs:
        state = j.state
        if state is JobState.ENDING:
            continue
        live.append(j)
        if state is JobState.IDLE:
            if maxuse is not None and j.uses >= maxuse:
                ending[j.id] = "maxuse"  # used-up jobs end as soon as they are idle
            else:
                idle.append(j)
        elif state is JobState.STARTING:
            starting += 1
    used_up = len(ending)

    def available() -> int:
        # Idle or starting, not ending: every ending but MAXUSE's is an idle job.
        return len(idle) + starting - (len(ending) - used_up) - len(view.waiting)

    # Above a lowered MAXJOBS: end idle jobs, most recently idle first.
    excess = len(live) - len(ending) - cap
    if excess > 0:
        for j in sorted(idle, key=lambda j: -j.since):
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
        # Surplus is what has stayed idle a whole interval beyond THRESHOLD:
        # jobs ADLJOBS started a moment ago are the spare the rule just asked for.
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
    spare = available()
    while entry.adljobs and spare + start < entry.threshold and start < room:
        start = min(start + entry.adljobs, room)
    start = int(min(start, max(0, limits.max_starting - starting)))
    if start and view.boot_failures:
        resume = view.last_boot_failure + limits.backoff(view.boot_failures)
        if now < resume:
            start = 0
            wake.append(resume)

    # Requests that waited too long; under WAIT *NO (CHGPJE'd while some
    # waited) none may wait, so those no idle job is about to take go now.
    reject = sum(1 for t in view.waiting if now >= t + limits.wait_limit)
    if entry.wait == "*NO":
        kept_idle = len(idle) - (len(ending) - used_up)
        reject = max(reject, len(view.waiting) - kept_idle)
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
