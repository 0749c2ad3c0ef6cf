"""The prestart pool rules (CHGPJE semantics) of ``twistmail.prestart.policy``."""

from __future__ import annotations

import functools
import math

import attrs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from twistmail.config import PrestartEntry
from twistmail.prestart.policy import (
    Actions,
    Admission,
    EntryView,
    JobState,
    JobView,
    Limits,
    accepting,
    admit,
    decide,
)

IDLE, BUSY, STARTING, ENDING = JobState.IDLE, JobState.BUSY, JobState.STARTING, JobState.ENDING

#: IBM's SMTP tuning example: INLJOBS 4, THRESHOLD 2, ADLJOBS 2, MAXJOBS 20.
SEED = PrestartEntry(inljobs=4, threshold=2, adljobs=2, maxjobs=20, maxuse=200, wait="*YES")
#: IBM's ADDPJE example: INLJOBS 15, THRESHOLD 5, ADLJOBS 10, WAIT *NO.
ADDPJE = PrestartEntry(inljobs=15, threshold=5, adljobs=10, maxjobs=None, wait="*NO")
LIMITS = Limits()

PROPERTY = settings(max_examples=300, deadline=None)


# -- helpers -------------------------------------------------------------


def pool(
    busy: int = 0,
    idle: int = 0,
    starting: int = 0,
    ending: int = 0,
    *,
    uses: int = 0,
    since: float = 0.0,
    first_id: int = 1,
) -> tuple[JobView, ...]:
    """Jobs numbered from ``first_id``: the busy ones, then idle, starting, ending."""
    states = [BUSY] * busy + [IDLE] * idle + [STARTING] * starting + [ENDING] * ending
    return tuple(
        JobView(id=first_id + n, state=s, uses=uses, since=since) for n, s in enumerate(states)
    )


def run(
    jobs: tuple[JobView, ...] = (),
    entry: PrestartEntry = SEED,
    limits: Limits = LIMITS,
    now: float = 0.0,
    **kw: object,
) -> Actions:
    """``decide`` at ``now``; the last trim is ``now`` unless given, so no trim runs."""
    kw.setdefault("last_trim", now)
    return decide(EntryView(jobs=tuple(jobs), **kw), entry, limits, now)


def reasons(actions: Actions) -> dict[int, str]:
    assert len(actions.end) == len(actions.end_reasons)
    return dict(zip(actions.end, actions.end_reasons, strict=True))


def live(jobs: tuple[JobView, ...] | list[JobView]) -> list[JobView]:
    return [j for j in jobs if j.state is not ENDING]


def available(jobs: list[JobView]) -> int:
    return sum(1 for j in jobs if j.state in (IDLE, STARTING))


def cap(entry: PrestartEntry) -> float:
    return math.inf if entry.maxjobs is None else entry.maxjobs


def used_up(job: JobView, entry: PrestartEntry) -> bool:
    return job.state is IDLE and entry.maxuse is not None and job.uses >= entry.maxuse


def failing(view: EntryView, limits: Limits) -> bool:
    return view.boot_failures >= limits.boot_failure_limit


def resume_at(view: EntryView, limits: Limits) -> float:
    return view.last_boot_failure + limits.backoff(view.boot_failures)


def in_backoff(view: EntryView, limits: Limits, now: float) -> bool:
    return view.boot_failures > 0 and now < resume_at(view, limits)


def apply(view: EntryView, actions: Actions, now: float) -> EntryView:
    """The pool after the runtime carried ``actions`` out at ``now``."""
    ended = set(actions.end)
    jobs = [attrs.evolve(j, state=ENDING, since=now) if j.id in ended else j for j in view.jobs]
    next_id = max((j.id for j in view.jobs), default=0) + 1
    jobs += [JobView(id=next_id + n, state=STARTING, since=now) for n in range(actions.start)]
    return attrs.evolve(
        view,
        active=view.active and not actions.fail,
        jobs=tuple(jobs),
        waiting=view.waiting[actions.reject :],
        last_trim=now if actions.trimmed else view.last_trim,
    )


# -- strategies ----------------------------------------------------------


STATES = [IDLE, BUSY, IDLE, STARTING, ENDING]


@functools.cache
def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


MAYBE = st.booleans()
YESNO = st.sampled_from(["*YES", "*NO"])


@st.composite
def entries(draw: st.DrawFn) -> PrestartEntry:
    """CHGPJE values that pass ``PrestartEntry.check``; MAXJOBS, MAXUSE sometimes *NOMAX."""
    maxjobs = None if draw(MAYBE) else draw(ints(1, 30))
    top = 30 if maxjobs is None else maxjobs
    inljobs = draw(ints(1, min(top, 20)))
    entry = PrestartEntry(
        strjobs=draw(YESNO),
        inljobs=inljobs,
        threshold=draw(ints(1, inljobs)),
        adljobs=draw(ints(0, min(top, 10))),
        maxjobs=maxjobs,
        maxuse=None if draw(MAYBE) else draw(ints(1, 5)),
        wait=draw(YESNO),
    )
    entry.check("QTMSSRCP")
    return entry


LIMIT_SETS = st.builds(
    Limits,
    trim_interval=st.integers(1, 60).map(float),
    wait_limit=st.integers(1, 60).map(float),
    queue_limit=st.integers(1, 8),
    boot_failure_limit=st.integers(1, 6),
    backoff_base=st.sampled_from([0.25, 0.5, 1.0]),
    backoff_max=st.sampled_from([2.0, 30.0]),
    max_starting=st.integers(1, 40),
)


@st.composite
def scenarios(
    draw: st.DrawFn, any_state: bool = False
) -> tuple[EntryView, PrestartEntry, Limits, float]:
    """A pool snapshot at ``now``, all times in [0, now] on a quarter-second grid.

    Unless ``any_state``, the entry is active and its boot failures stay below
    the limit.
    """
    entry, limits = draw(entries()), draw(LIMIT_SETS)
    quarters = draw(ints(0, 800))
    now = quarters / 4

    def at(byte: int) -> float:
        return (byte * quarters // 255) / 4

    size = 3 * draw(ints(0, 40))
    raw = draw(st.binary(min_size=size, max_size=size))
    jobs = tuple(
        JobView(
            id=n + 1, state=STATES[raw[i] % len(STATES)], uses=raw[i + 1] % 7, since=at(raw[i + 2])
        )
        for n, i in enumerate(range(0, len(raw) - 2, 3))
    )
    most = 7 if any_state else limits.boot_failure_limit - 1
    view = EntryView(
        active=draw(MAYBE) if any_state else True,
        jobs=jobs,
        waiting=tuple(sorted(at(b) for b in draw(st.binary(max_size=10)))),
        boot_failures=0 if most < 1 or draw(MAYBE) else draw(ints(1, most)),
        last_boot_failure=max(0.0, now - draw(ints(0, 160)) / 4),
        last_trim=at(draw(ints(0, 255))),
    )
    return view, entry, limits, now


Scenario = tuple[EntryView, PrestartEntry, Limits, float]


# -- start and growth ----------------------------------------------------


def test_seed_starts_inljobs() -> None:
    assert run() == Actions(start=4, wake_at=30.0)


def test_seed_three_busy_of_four_starts_two_more() -> None:
    assert run(pool(busy=3, idle=1)).start == 2


def test_seed_two_busy_of_four_starts_nothing() -> None:
    a = run(pool(busy=2, idle=2))
    assert a.start == 0 and a.end == () and a.reject == 0


def test_seed_all_busy_starts_adljobs() -> None:
    assert run(pool(busy=4)).start == 2


def test_starting_jobs_count_as_available() -> None:
    assert run(pool(busy=4, starting=2)).start == 0
    assert run(pool(busy=4, starting=1)).start == 2


def test_ending_jobs_do_not_count() -> None:
    assert run(pool(idle=2, ending=5)).start == 2


def test_growth_stops_at_maxjobs() -> None:
    assert run(pool(busy=18, idle=1)).start == 1
    assert run(pool(busy=19)).start == 1
    assert run(pool(busy=20)).start == 0
    assert run(pool(busy=18, starting=2)).start == 0


def test_growth_without_maxjobs_is_unbounded() -> None:
    entry = attrs.evolve(SEED, maxjobs=None)
    assert run(pool(busy=500), entry).start == 2


def test_adljobs_zero_never_grows_past_inljobs() -> None:
    entry = attrs.evolve(SEED, adljobs=0)
    assert run(pool(busy=4), entry).start == 0
    assert run(pool(busy=2), entry).start == 2


def test_waiting_requests_count_against_available() -> None:
    assert run(pool(busy=2, idle=2), waiting=(0.0,)).start == 2
    assert run(pool(busy=2, idle=4), waiting=(0.0, 0.0)).start == 0


def test_addpje_example_four_free_starts_ten() -> None:
    assert run(pool(busy=11, idle=4), ADDPJE).start == 10


def test_addpje_example_five_free_starts_nothing() -> None:
    assert run(pool(busy=10, idle=5), ADDPJE).start == 0


def test_addpje_example_no_job_free_rejects_the_request() -> None:
    view = EntryView(jobs=pool(busy=15))
    assert admit(view, ADDPJE, LIMITS) is Admission.REJECT
    assert accepting(view, ADDPJE, LIMITS) is True


def test_addpje_example_free_job_takes_the_request() -> None:
    view = EntryView(jobs=pool(busy=14, idle=1))
    assert admit(view, ADDPJE, LIMITS) is Admission.HANDOFF


def test_crashed_jobs_are_replaced() -> None:
    assert run(pool(idle=2)).start == 2
    assert run(pool(idle=1)).start == 3
    assert run(pool(busy=3)).start == 1 + 2


def test_inljobs_raised_live_starts_the_difference() -> None:
    entry = attrs.evolve(SEED, inljobs=8)
    assert run(pool(idle=4), entry).start == 4


# -- MAXUSE --------------------------------------------------------------


def test_idle_job_at_maxuse_is_ended_and_replaced() -> None:
    entry = attrs.evolve(SEED, maxuse=3)
    jobs = pool(idle=3) + pool(idle=1, uses=3, first_id=4)
    a = run(jobs, entry)
    assert reasons(a) == {4: "maxuse"}
    assert a.start == 1


def test_idle_job_past_maxuse_is_ended() -> None:
    entry = attrs.evolve(SEED, maxuse=3)
    assert reasons(run(pool(idle=5, uses=7), entry)) == {i: "maxuse" for i in range(1, 6)}


def test_busy_job_at_maxuse_is_not_ended() -> None:
    entry = attrs.evolve(SEED, maxuse=3)
    a = run(pool(busy=1, uses=3) + pool(idle=3, first_id=2), entry)
    assert a.end == ()


def test_job_below_maxuse_is_kept() -> None:
    entry = attrs.evolve(SEED, maxuse=3)
    assert run(pool(idle=4, uses=2), entry).end == ()


def test_maxuse_nomax_never_ends() -> None:
    entry = attrs.evolve(SEED, maxuse=None)
    assert run(pool(idle=4, uses=10**6), entry).end == ()


def test_maxuse_never_ends_starting_or_ending_jobs() -> None:
    entry = attrs.evolve(SEED, maxuse=1)
    a = run(pool(starting=4, ending=2, uses=5), entry)
    assert a.end == ()


# -- lowered MAXJOBS -----------------------------------------------------


def test_lowered_maxjobs_ends_idle_jobs_most_recent_first() -> None:
    entry = attrs.evolve(SEED, maxjobs=4)
    jobs = pool(busy=3) + tuple(JobView(id=4 + n, state=IDLE, since=float(n)) for n in range(3))
    a = run(jobs, entry, now=10.0)
    assert reasons(a) == {6: "maxjobs", 5: "maxjobs"}
    assert a.end == (6, 5)
    assert a.start == 0


def test_lowered_maxjobs_never_ends_busy_jobs() -> None:
    entry = attrs.evolve(SEED, maxjobs=4)
    a = run(pool(busy=6), entry)
    assert a == Actions(wake_at=30.0)


def test_lowered_maxjobs_ends_only_the_idle_ones() -> None:
    entry = attrs.evolve(SEED, maxjobs=4)
    a = run(pool(busy=5, idle=1, starting=1), entry)
    assert reasons(a) == {6: "maxjobs"}
    assert a.start == 0


def test_lowered_maxjobs_counts_maxuse_endings() -> None:
    entry = attrs.evolve(SEED, maxjobs=4, maxuse=2)
    jobs = pool(busy=3) + pool(idle=1, uses=2, first_id=4) + pool(idle=1, first_id=5)
    assert reasons(run(jobs, entry)) == {4: "maxuse"}


# -- trimming ------------------------------------------------------------


def test_trim_ends_half_the_surplus_oldest_first() -> None:
    jobs = tuple(JobView(id=n + 1, state=IDLE, since=float(n)) for n in range(10))
    a = run(jobs, now=100.0, last_trim=60.0)
    assert a.trimmed
    assert reasons(a) == {1: "trim", 2: "trim", 3: "trim"}
    assert a.start == 0
    assert a.wake_at == 130.0


def test_trim_half_of_a_large_surplus() -> None:
    a = run(pool(idle=20), now=100.0, last_trim=0.0)
    assert list(reasons(a).values()) == ["trim"] * 8


def test_trim_at_least_one() -> None:
    a = run(pool(idle=5), now=100.0, last_trim=0.0)
    assert reasons(a) == {1: "trim"}
    assert a.wake_at is None


def test_trim_never_below_inljobs() -> None:
    a = run(pool(idle=4), now=100.0, last_trim=0.0)
    assert a.trimmed
    assert a.end == ()
    assert a.wake_at is None


def test_trim_with_surplus_left_wakes_after_trim_interval() -> None:
    a = run(pool(idle=6), now=100.0, last_trim=0.0)
    assert len(a.end) == 1
    assert a.wake_at == 100.0 + LIMITS.trim_interval


def test_trim_keeps_threshold_available() -> None:
    assert run(pool(busy=6, idle=2), now=100.0, last_trim=0.0).end == ()
    assert len(run(pool(busy=6, idle=3), now=100.0, last_trim=0.0).end) == 1
    assert len(run(pool(busy=6, idle=4), now=100.0, last_trim=0.0).end) == 1


def test_trim_counts_waiting_requests() -> None:
    a = run(pool(idle=8), now=100.0, last_trim=0.0, waiting=(99.0,) * 5)
    assert reasons(a) == {1: "trim"}
    assert run(pool(idle=8), now=100.0, last_trim=0.0, waiting=(99.0,) * 6).end == ()


def test_trim_only_after_trim_interval() -> None:
    a = run(pool(idle=10), now=100.0, last_trim=80.0)
    assert not a.trimmed
    assert a.end == ()
    assert a.wake_at == 110.0


def test_trim_exactly_at_trim_interval() -> None:
    a = run(pool(idle=10), now=100.0, last_trim=70.0)
    assert a.trimmed
    assert len(a.end) == 3


def test_trim_only_jobs_idle_a_whole_interval() -> None:
    jobs = pool(idle=8, since=0.0) + pool(idle=2, since=90.0, first_id=9)
    a = run(jobs, now=100.0, last_trim=0.0)
    assert a.trimmed
    assert reasons(a) == {1: "trim", 2: "trim", 3: "trim"}  # half of 8 idle less THRESHOLD


def test_jobs_adljobs_just_started_are_no_surplus() -> None:
    """Two sessions took two of three idle jobs and ADLJOBS started two more:
    the trim a moment later ended the one old idle job (3 -> 5 -> 4)."""
    entry = attrs.evolve(SEED, inljobs=3, threshold=2, adljobs=2, maxjobs=7)
    jobs = pool(busy=2) + pool(idle=1, first_id=3) + pool(idle=2, since=97.3, first_id=4)
    a = run(jobs, entry, now=100.0, last_trim=0.0)
    assert a.trimmed and a.end == () and a.start == 0


def test_trim_with_no_job_idle_long_enough() -> None:
    a = run(pool(idle=10, since=90.0), now=100.0, last_trim=0.0)
    assert a.trimmed
    assert a.end == ()
    assert a.wake_at == 130.0


def test_trim_never_ends_busy_or_starting_jobs() -> None:
    a = run(pool(busy=10, starting=10), now=100.0, last_trim=0.0)
    assert a.trimmed and a.end == ()


def test_trim_after_maxuse_endings_stays_at_inljobs() -> None:
    entry = attrs.evolve(SEED, maxuse=3)
    jobs = pool(idle=2, uses=3) + pool(idle=3, first_id=3)
    a = run(jobs, entry, now=100.0, last_trim=0.0)
    assert reasons(a) == {1: "maxuse", 2: "maxuse"}
    assert a.start == 1


# -- boot failures -------------------------------------------------------


def test_backoff_doubles_up_to_its_maximum() -> None:
    assert [LIMITS.backoff(n) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert LIMITS.backoff(20) == LIMITS.backoff_max
    assert LIMITS.backoff(-1) == 0.0


def test_backoff_suppresses_starts_and_wakes_at_resume() -> None:
    a = run(now=10.5, boot_failures=2, last_boot_failure=10.0)
    assert a.start == 0
    assert a.wake_at == 11.0


def test_backoff_over_starts_again() -> None:
    assert run(now=11.0, boot_failures=2, last_boot_failure=10.0).start == 4
    assert run(now=10.5, boot_failures=1, last_boot_failure=10.0).start == 4


def test_backoff_does_not_stop_ending_or_rejecting() -> None:
    entry = attrs.evolve(SEED, maxuse=1)
    jobs = pool(idle=1, uses=1)
    a = run(jobs, entry, now=40.0, boot_failures=3, last_boot_failure=39.0, waiting=(0.0,))
    assert a.start == 0
    assert reasons(a) == {1: "maxuse"}
    assert a.reject == 1
    assert a.wake_at == 41.0


def test_backoff_without_anything_to_start_sets_no_wake() -> None:
    a = run(pool(idle=4), now=10.5, boot_failures=2, last_boot_failure=10.0)
    assert a.start == 0
    assert a.wake_at == 10.5 + LIMITS.trim_interval


def test_boot_failure_limit_fails_the_entry_and_rejects_all_waiting() -> None:
    a = run(pool(busy=2), now=50.0, boot_failures=5, waiting=(49.0, 49.5, 50.0))
    assert a == Actions(fail=True, reject=3)


def test_one_below_the_boot_failure_limit_does_not_fail() -> None:
    a = run(now=50.0, boot_failures=4, last_boot_failure=0.0)
    assert not a.fail
    assert a.start == 4


# -- waiting requests ----------------------------------------------------


def test_waiting_requests_expire_after_wait_limit() -> None:
    a = run(pool(busy=20), now=32.0, waiting=(0.0, 5.0, 20.0))
    assert a.reject == 1
    assert a.wake_at == 35.0


def test_waiting_request_expires_exactly_at_wait_limit() -> None:
    a = run(pool(busy=20), now=30.0, waiting=(0.0, 0.5))
    assert a.reject == 1
    assert a.wake_at == 30.5


def test_all_waiting_requests_expired() -> None:
    a = run(pool(busy=20), now=100.0, waiting=(0.0, 1.0, 2.0))
    assert a.reject == 3
    assert a.wake_at == 130.0


def test_waiting_requests_go_when_wait_becomes_no() -> None:
    # CHGPJE WAIT(*NO) while clients wait: they are refused, not kept 30 s.
    a = run(pool(busy=20), ADDPJE, now=10.0, waiting=(9.0, 9.5))
    assert a.reject == 2
    a = run(pool(busy=19, idle=1), ADDPJE, now=10.0, waiting=(9.0, 9.5))
    assert a.reject == 1  # the one the idle job is about to take stays


def test_fresh_waiting_request_wakes_at_its_expiry() -> None:
    a = run(pool(busy=20), now=10.0, waiting=(10.0,))
    assert a.reject == 0
    assert a.wake_at == 40.0


# -- inactive entry ------------------------------------------------------


def test_inactive_entry_does_nothing() -> None:
    view = EntryView(
        active=False,
        jobs=pool(idle=10, uses=999),
        waiting=(0.0,),
        boot_failures=99,
        last_trim=0.0,
    )
    assert decide(view, SEED, LIMITS, 1000.0) == Actions()


# -- admit and accepting -------------------------------------------------


def view_of(*jobs: JobView, waiting: int = 0, active: bool = True) -> EntryView:
    return EntryView(active=active, jobs=tuple(jobs), waiting=(0.0,) * waiting)


def test_admit_hands_off_to_an_idle_job() -> None:
    assert admit(view_of(*pool(busy=3, idle=1)), SEED, LIMITS) is Admission.HANDOFF


def test_admit_queues_when_no_job_is_free() -> None:
    assert admit(view_of(*pool(busy=4)), SEED, LIMITS) is Admission.QUEUE
    assert admit(view_of(*pool(busy=4, starting=2)), SEED, LIMITS) is Admission.QUEUE


def test_admit_queues_at_maxjobs() -> None:
    assert admit(view_of(*pool(busy=20)), SEED, LIMITS) is Admission.QUEUE


def test_admit_queues_behind_waiting_requests() -> None:
    view = view_of(*pool(busy=3, idle=1), waiting=1)
    assert admit(view, SEED, LIMITS) is Admission.QUEUE


def test_admit_rejects_with_wait_no() -> None:
    entry = attrs.evolve(SEED, wait="*NO")
    assert admit(view_of(*pool(busy=4)), entry, LIMITS) is Admission.REJECT
    assert admit(view_of(*pool(busy=4, idle=1)), entry, LIMITS) is Admission.HANDOFF


def test_admit_rejects_when_the_queue_is_full() -> None:
    limits = Limits(queue_limit=2)
    assert admit(view_of(*pool(busy=4), waiting=1), SEED, limits) is Admission.QUEUE
    assert admit(view_of(*pool(busy=4), waiting=2), SEED, limits) is Admission.REJECT
    assert admit(view_of(*pool(busy=4), waiting=3), SEED, limits) is Admission.REJECT


def test_admit_rejects_when_inactive() -> None:
    assert admit(view_of(*pool(idle=4), active=False), SEED, LIMITS) is Admission.REJECT


def test_admit_does_not_use_an_idle_job_at_maxuse() -> None:
    entry = attrs.evolve(SEED, maxuse=3)
    view = view_of(*pool(busy=3), *pool(idle=1, uses=3, first_id=4))
    assert admit(view, entry, LIMITS) is Admission.QUEUE
    assert admit(view, attrs.evolve(entry, wait="*NO"), LIMITS) is Admission.REJECT
    view = view_of(*pool(busy=3), *pool(idle=1, uses=2, first_id=4))
    assert admit(view, entry, LIMITS) is Admission.HANDOFF


def test_admit_never_hands_off_to_starting_or_ending_jobs() -> None:
    view = view_of(*pool(starting=2, ending=2))
    assert admit(view, SEED, LIMITS) is Admission.QUEUE


def test_accepting_false_only_with_wait_yes_and_a_full_queue() -> None:
    limits = Limits(queue_limit=2)
    assert accepting(view_of(waiting=1), SEED, limits) is True
    assert accepting(view_of(waiting=2), SEED, limits) is False
    assert accepting(view_of(waiting=3), SEED, limits) is False
    no = attrs.evolve(SEED, wait="*NO")
    assert accepting(view_of(waiting=2), no, limits) is True
    assert accepting(view_of(waiting=2, active=False), SEED, limits) is True


# -- fixed point ---------------------------------------------------------


def test_seed_pool_start_reaches_a_fixed_point() -> None:
    view = EntryView(last_trim=0.0)
    a = decide(view, SEED, LIMITS, 0.0)
    assert a.start == 4
    assert decide(apply(view, a, 0.0), SEED, LIMITS, 0.0).start == 0


def test_growth_with_waiting_requests_reaches_a_fixed_point() -> None:
    view = EntryView(jobs=pool(busy=4), waiting=(1.0, 1.0, 1.0), last_trim=1.0)
    first = decide(view, SEED, LIMITS, 1.0)
    assert first.start == 6  # one job per waiting request, then THRESHOLD available
    second = decide(apply(view, first, 1.0), SEED, LIMITS, 1.0)
    assert second.start == 0


def test_growth_with_small_adljobs_reaches_a_fixed_point() -> None:
    entry = attrs.evolve(SEED, threshold=4, adljobs=1)
    view = EntryView(jobs=pool(busy=4), last_trim=0.0)
    first = decide(view, entry, LIMITS, 0.0)
    assert first.start == 4  # batches of ADLJOBS until THRESHOLD is available again
    assert decide(apply(view, first, 0.0), entry, LIMITS, 0.0).start == 0


@pytest.mark.parametrize(
    "kw",
    [
        {"waiting": (0.1,), "last_trim": 4.1},
        {"last_trim": 0.1},
    ],
    ids=["wait_limit", "trim_interval"],
)
def test_wake_at_is_later_than_now_at_float_boundaries(kw: dict[str, object]) -> None:
    limits = Limits(wait_limit=4.0, trim_interval=4.0)
    a = decide(EntryView(jobs=pool(busy=20), **kw), SEED, limits, 4.1)
    assert a.wake_at is None or a.wake_at > 4.1


# -- properties ----------------------------------------------------------
#
# Each check states one rule for one decision; the tests below run groups of
# them over the same generated snapshots.


def check_start_within_maxjobs(view: EntryView, entry: PrestartEntry, a: Actions) -> None:
    remaining = len(live(view.jobs)) - len(a.end)
    assert a.start >= 0
    assert a.start == 0 or remaining + a.start <= cap(entry)


def check_end_names_existing_idle_jobs_once(view: EntryView, a: Actions) -> None:
    by_id = {j.id: j for j in view.jobs}
    assert len(a.end) == len(set(a.end)) == len(a.end_reasons)
    for job_id, why in zip(a.end, a.end_reasons, strict=True):
        assert job_id in by_id
        assert by_id[job_id].state is IDLE
        assert why in ("maxuse", "maxjobs", "trim")


def check_maxuse_ends_the_used_up_idle_jobs(
    view: EntryView, entry: PrestartEntry, a: Actions
) -> None:
    got = {i for i, why in reasons(a).items() if why == "maxuse"}
    assert got == {j.id for j in view.jobs if used_up(j, entry)}


def check_lowered_maxjobs_ends_idle_jobs_most_recent_first(
    view: EntryView, entry: PrestartEntry, a: Actions
) -> None:
    why = reasons(a)
    kept = [j for j in live(view.jobs) if not used_up(j, entry)]
    usable_idle = [j for j in kept if j.state is IDLE]
    ended = [j for j in usable_idle if why.get(j.id) == "maxjobs"]
    assert len(ended) == max(0, min(len(usable_idle), len(kept) - cap(entry)))
    others = [j for j in usable_idle if why.get(j.id) != "maxjobs"]
    if ended and others:
        assert min(j.since for j in ended) >= max(j.since for j in others)


def check_no_start_in_backoff(
    view: EntryView, entry: PrestartEntry, limits: Limits, now: float, a: Actions
) -> None:
    if not in_backoff(view, limits, now):
        return
    assert a.start == 0
    if decide(attrs.evolve(view, boot_failures=0), entry, limits, now).start:
        assert a.wake_at is not None and a.wake_at <= resume_at(view, limits)


def check_live_jobs_stay_at_inljobs(
    view: EntryView, entry: PrestartEntry, limits: Limits, now: float, a: Actions
) -> None:
    if in_backoff(view, limits, now):
        return
    after = len(live(view.jobs)) - len(a.end) + a.start
    assert after >= min(entry.inljobs, cap(entry)) or a.start == starts_allowed(view, limits)


def check_growth_below_threshold(
    view: EntryView, entry: PrestartEntry, limits: Limits, now: float, a: Actions
) -> None:
    if in_backoff(view, limits, now):
        return
    ended = set(a.end)
    remaining = [j for j in live(view.jobs) if j.id not in ended]
    base = max(0, entry.inljobs - len(remaining))
    room = max(0, cap(entry) - len(remaining))
    short = available(remaining) - len(view.waiting)
    allowed = starts_allowed(view, limits)
    if short + min(room, base) < entry.threshold and entry.adljobs:
        # whole ADLJOBS batches until THRESHOLD is available again, within MAXJOBS
        batches = -(-(entry.threshold - short - base) // entry.adljobs)
        assert a.start == min(room, base + batches * entry.adljobs, allowed)
        assert a.start in (room, allowed) or short + a.start >= entry.threshold
    else:
        assert a.start == min(room, base, allowed)


def starts_allowed(view: EntryView, limits: Limits) -> int:
    """How many more may start while the jobs already starting are under way."""
    starting = sum(1 for j in live(view.jobs) if j.state is JobState.STARTING)
    return max(0, limits.max_starting - starting)


def check_trim(
    view: EntryView, entry: PrestartEntry, limits: Limits, now: float, a: Actions
) -> None:
    why = reasons(a)
    assert a.trimmed == (now - view.last_trim >= limits.trim_interval)
    trimmed = [j for j in view.jobs if why.get(j.id) == "trim"]
    if not a.trimmed:
        assert trimmed == []
        return
    # The pool the trim works on: live jobs less those ended for MAXUSE or MAXJOBS.
    before = [j for j in live(view.jobs) if why.get(j.id, "trim") == "trim"]
    eligible = [j for j in before if j.state is IDLE and now - j.since >= limits.trim_interval]
    # Only jobs idle a whole interval are surplus: ones just started are the spare.
    surplus = min(
        len(before) - entry.inljobs,
        len(eligible) - len(view.waiting) - entry.threshold,
    )
    quota = max(1, surplus // 2) if surplus > 0 else 0
    assert len(trimmed) == min(quota, len(eligible))
    if not trimmed:
        return
    assert all(j in eligible for j in trimmed)
    spared = [j for j in eligible if j not in trimmed]
    if spared:
        assert max(j.since for j in trimmed) <= min(j.since for j in spared)
    after = [j for j in live(view.jobs) if j.id not in why]
    assert len(after) >= entry.inljobs
    assert available(after) - len(view.waiting) >= entry.threshold
    assert a.start == 0


def check_waiting_requests_expire(
    view: EntryView, entry: PrestartEntry, limits: Limits, now: float, a: Actions
) -> None:
    expired = sum(1 for t in view.waiting if now - t >= limits.wait_limit)
    if entry.wait == "*NO":
        idle = sum(1 for j in view.jobs
                   if j.state is IDLE and not used_up(j, entry) and j.id not in a.end)
        expired = max(expired, len(view.waiting) - idle)
    assert a.reject == expired
    if a.reject < len(view.waiting):
        assert a.wake_at is not None
        assert a.wake_at <= view.waiting[a.reject] + limits.wait_limit


def check_wake_at_after_now(now: float, a: Actions) -> None:
    assert a.wake_at is None or a.wake_at > now


@PROPERTY
@given(scenarios())
def test_prop_start_end_reject_and_wake(s: Scenario) -> None:
    view, entry, limits, now = s
    a = decide(view, entry, limits, now)
    check_start_within_maxjobs(view, entry, a)
    check_end_names_existing_idle_jobs_once(view, a)
    check_maxuse_ends_the_used_up_idle_jobs(view, entry, a)
    check_lowered_maxjobs_ends_idle_jobs_most_recent_first(view, entry, a)
    check_waiting_requests_expire(view, entry, limits, now, a)
    check_wake_at_after_now(now, a)


@PROPERTY
@given(scenarios())
def test_prop_inljobs_growth_and_backoff(s: Scenario) -> None:
    view, entry, limits, now = s
    a = decide(view, entry, limits, now)
    check_no_start_in_backoff(view, entry, limits, now, a)
    check_live_jobs_stay_at_inljobs(view, entry, limits, now, a)
    check_growth_below_threshold(view, entry, limits, now, a)


@PROPERTY
@given(scenarios())
def test_prop_trim(s: Scenario) -> None:
    view, entry, limits, now = s
    check_trim(view, entry, limits, now, decide(view, entry, limits, now))


@PROPERTY
@given(scenarios(any_state=True))
def test_prop_second_decide_at_the_same_time(s: Scenario) -> None:
    view, entry, limits, now = s
    first = decide(view, entry, limits, now)
    after = apply(view, first, now)
    second = decide(after, entry, limits, now)
    if first.fail:
        assert not after.active and second == Actions()
        return
    assert second.end == ()
    assert second.reject == 0
    assert not second.trimmed
    assert not second.fail
    assert second.start == 0  # the rules reach their fixed point in one decision
    for _ in range(100):
        a = decide(after, entry, limits, now)
        if a.start == 0 and a.end == () and a.reject == 0 and not a.fail:
            return
        after = apply(after, a, now)
    pytest.fail("no fixed point after 100 decisions at the same time")


@PROPERTY
@given(scenarios())
@example(
    s=(
        EntryView(jobs=pool(busy=4), waiting=(1.0, 1.0, 1.0), last_trim=1.0),
        SEED,
        LIMITS,
        1.0,
    )
)
def test_prop_second_decide_starts_nothing(s: Scenario) -> None:
    view, entry, limits, now = s
    first = decide(view, entry, limits, now)
    assert decide(apply(view, first, now), entry, limits, now).start == 0


@PROPERTY
@given(scenarios(any_state=True))
def test_prop_inactive_failing_admit_and_accepting(s: Scenario) -> None:
    view, entry, limits, now = s
    a = decide(view, entry, limits, now)
    if not view.active:
        assert a == Actions()
    elif failing(view, limits):
        assert a == Actions(fail=True, reject=len(view.waiting))
    else:
        assert not a.fail
    check_wake_at_after_now(now, a)

    usable = any(
        j.state is IDLE and (entry.maxuse is None or j.uses < entry.maxuse) for j in view.jobs
    )
    got = admit(view, entry, limits)
    if not view.active:
        assert got is Admission.REJECT
    elif usable and not view.waiting:
        assert got is Admission.HANDOFF
    elif entry.wait == "*NO" or len(view.waiting) >= limits.queue_limit:
        assert got is Admission.REJECT
    else:
        assert got is Admission.QUEUE
    full = view.active and entry.wait == "*YES" and len(view.waiting) >= limits.queue_limit
    assert accepting(view, entry, limits) is not full
    if full:
        assert got is Admission.REJECT
