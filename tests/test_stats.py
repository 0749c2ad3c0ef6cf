"""DSPACTPJ statistics of ``twistmail.prestart.stats``: time-weighted like IBM's."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twistmail.prestart.stats import PoolStats

PROPERTY = settings(max_examples=300, deadline=None)


def test_new_statistics_are_empty() -> None:
    stats = PoolStats(started=100.0)
    assert stats.last == 100.0
    assert stats.report(100.0) == {
        "elapsed": 0.0,
        "jobs_current": 0,
        "jobs_average": 0.0,
        "jobs_peak": 0,
        "in_use_current": 0,
        "in_use_average": 0.0,
        "in_use_peak": 0,
        "waiting_current": 0,
        "waiting_average": 0.0,
        "waiting_peak": 0,
        "average_wait": 0.0,
        "accepted": 0,
        "rejected": 0,
    }


def test_explicit_last_is_kept() -> None:
    assert PoolStats(started=10.0, last=12.0).last == 12.0


def test_average_is_time_weighted() -> None:
    stats = PoolStats(started=0.0)
    stats.observe(0.0, 2, 0, 0)
    stats.observe(10.0, 4, 0, 0)
    r = stats.report(20.0)
    assert r["elapsed"] == 20.0
    assert r["jobs_average"] == 3.0
    assert r["jobs_current"] == 4
    assert r["jobs_peak"] == 4


def test_short_burst_weighs_little() -> None:
    stats = PoolStats(started=0.0)
    stats.observe(0.0, 1, 0, 0)
    stats.observe(99.0, 11, 0, 0)
    stats.observe(100.0, 1, 0, 0)
    r = stats.report(100.0)
    assert r["jobs_average"] == 1.1
    assert r["jobs_peak"] == 11
    assert r["jobs_current"] == 1


def test_unequal_intervals() -> None:
    stats = PoolStats(started=0.0)
    stats.observe(0.0, 4, 0, 0)
    stats.observe(30.0, 8, 0, 0)
    assert stats.report(40.0)["jobs_average"] == 5.0


def test_counts_before_the_first_observation_are_zero() -> None:
    stats = PoolStats(started=0.0)
    stats.observe(10.0, 4, 2, 1)
    r = stats.report(20.0)
    assert r["jobs_average"] == 2.0
    assert r["in_use_average"] == 1.0
    assert r["waiting_average"] == 0.5


def test_in_use_and_waiting_are_separate_gauges() -> None:
    stats = PoolStats(started=0.0)
    stats.observe(0.0, 4, 1, 0)
    stats.observe(5.0, 4, 3, 2)
    stats.observe(10.0, 6, 0, 0)
    r = stats.report(20.0)
    assert r["jobs_average"] == 5.0
    assert r["in_use_average"] == 1.0
    assert r["waiting_average"] == 0.5
    assert (r["jobs_peak"], r["in_use_peak"], r["waiting_peak"]) == (6, 3, 2)
    assert (r["jobs_current"], r["in_use_current"], r["waiting_current"]) == (6, 0, 0)


def test_peaks_keep_the_highest_value() -> None:
    stats = PoolStats(started=0.0)
    for t, n in enumerate([3, 9, 2, 7, 1]):
        stats.observe(float(t), n, n // 2, n // 3)
    r = stats.report(5.0)
    assert (r["jobs_peak"], r["in_use_peak"], r["waiting_peak"]) == (9, 4, 3)
    assert (r["jobs_current"], r["in_use_current"], r["waiting_current"]) == (1, 0, 0)


def test_no_elapsed_time_reports_the_current_counts() -> None:
    stats = PoolStats(started=5.0)
    stats.observe(5.0, 3, 2, 1)
    r = stats.report(5.0)
    assert r["elapsed"] == 0.0
    assert (r["jobs_average"], r["in_use_average"], r["waiting_average"]) == (3.0, 2.0, 1.0)


def test_several_observations_at_one_time_weigh_nothing() -> None:
    stats = PoolStats(started=0.0)
    stats.observe(0.0, 2, 0, 0)
    stats.observe(10.0, 50, 0, 0)
    stats.observe(10.0, 2, 0, 0)
    r = stats.report(20.0)
    assert r["jobs_average"] == 2.0
    assert r["jobs_peak"] == 50


def test_report_can_be_repeated() -> None:
    stats = PoolStats(started=0.0)
    stats.observe(0.0, 2, 1, 0)
    stats.observe(10.0, 4, 1, 0)
    assert stats.report(20.0) == stats.report(20.0)
    assert stats.report(30.0)["jobs_average"] == pytest.approx((20 + 80) / 30, abs=0.005)


def test_clock_going_back_adds_no_time() -> None:
    stats = PoolStats(started=0.0)
    stats.observe(10.0, 2, 0, 0)
    stats.observe(5.0, 6, 0, 0)
    assert stats.last == 5.0
    assert stats.jobs.area == 0.0
    stats.observe(10.0, 6, 0, 0)
    assert stats.jobs.area == 30.0


def test_accepted_and_rejected_counts() -> None:
    stats = PoolStats(started=0.0)
    for _ in range(3):
        stats.record_accept()
    stats.record_accept(waited=2.0)
    for _ in range(2):
        stats.record_reject()
    r = stats.report(1.0)
    assert r["accepted"] == 4
    assert r["rejected"] == 2


def test_average_wait_time() -> None:
    stats = PoolStats(started=0.0)
    stats.record_accept(waited=1.0)
    stats.record_accept(waited=3.0)
    assert stats.report(1.0)["average_wait"] == 2.0
    assert stats.waits == 2
    assert stats.wait_total == 4.0


def test_average_wait_counts_immediate_handoffs_as_no_wait() -> None:
    stats = PoolStats(started=0.0)
    stats.record_accept(waited=1.0)
    stats.record_accept(waited=3.0)
    stats.record_accept()
    stats.record_accept()
    assert stats.report(1.0)["average_wait"] == 1.0
    assert stats.waits == 2


def test_average_wait_ignores_rejected_requests() -> None:
    stats = PoolStats(started=0.0)
    stats.record_accept(waited=0.5)
    stats.record_reject()
    stats.record_reject()
    assert stats.report(1.0)["average_wait"] == 0.5


def test_average_wait_is_rounded_to_a_tenth_of_a_millisecond() -> None:
    stats = PoolStats(started=0.0)
    for w in (0.1, 0.2, 0.2):
        stats.record_accept(waited=w)
    assert stats.report(1.0)["average_wait"] == 0.1667


def test_waited_zero_is_a_wait_of_zero() -> None:
    stats = PoolStats(started=0.0)
    stats.record_accept(waited=0.0)
    assert stats.waits == 1
    assert stats.report(1.0)["average_wait"] == 0.0


def test_reset_restarts_the_statistics() -> None:
    stats = PoolStats(started=0.0)
    stats.observe(0.0, 10, 8, 5)
    stats.observe(10.0, 4, 1, 0)
    stats.record_accept(waited=2.0)
    stats.record_accept()
    stats.record_reject()
    stats.reset(20.0)
    assert stats.started == 20.0
    r = stats.report(20.0)
    assert r["elapsed"] == 0.0
    assert (r["jobs_peak"], r["in_use_peak"], r["waiting_peak"]) == (4, 1, 0)
    assert (r["jobs_current"], r["in_use_current"], r["waiting_current"]) == (4, 1, 0)
    assert (r["jobs_average"], r["in_use_average"], r["waiting_average"]) == (4.0, 1.0, 0.0)
    assert (r["accepted"], r["rejected"], r["average_wait"]) == (0, 0, 0.0)
    assert stats.waits == 0 and stats.wait_total == 0.0


def test_averages_after_reset_cover_only_the_time_since() -> None:
    stats = PoolStats(started=0.0)
    stats.observe(0.0, 100, 100, 100)
    stats.observe(50.0, 2, 1, 0)
    stats.reset(60.0)
    stats.observe(70.0, 4, 3, 2)
    r = stats.report(80.0)
    assert r["elapsed"] == 20.0
    assert r["jobs_average"] == 3.0
    assert r["in_use_average"] == 2.0
    assert r["waiting_average"] == 1.0
    assert (r["jobs_peak"], r["in_use_peak"], r["waiting_peak"]) == (4, 3, 2)


def test_peaks_after_reset_grow_again() -> None:
    stats = PoolStats(started=0.0)
    stats.observe(0.0, 9, 0, 0)
    stats.observe(1.0, 3, 0, 0)
    stats.reset(2.0)
    assert stats.report(2.0)["jobs_peak"] == 3
    stats.observe(3.0, 5, 0, 0)
    stats.observe(4.0, 2, 0, 0)
    assert stats.report(5.0)["jobs_peak"] == 5


def test_counts_after_reset_start_from_zero() -> None:
    stats = PoolStats(started=0.0)
    stats.record_accept(waited=9.0)
    stats.record_reject()
    stats.reset(1.0)
    stats.record_accept(waited=1.0)
    stats.record_reject()
    r = stats.report(2.0)
    assert (r["accepted"], r["rejected"], r["average_wait"]) == (1, 1, 1.0)


# -- properties ----------------------------------------------------------

STEPS = st.binary(max_size=4 * 20).map(
    lambda raw: [
        (raw[i] % 41, raw[i + 1] % 51, raw[i + 2] % 51, raw[i + 3] % 51)
        for i in range(0, len(raw) - 3, 4)
    ]
)
ACCEPTS = st.binary(max_size=30).map(lambda raw: [None if b < 64 else b - 64 for b in raw])


def replay(steps: list[tuple[int, int, int, int]], start: float = 0.0) -> PoolStats:
    """Observations ``dt`` quarter seconds apart; returns the stats."""
    stats = PoolStats(started=start)
    t = start
    for dt, jobs, in_use, waiting in steps:
        t += dt / 4
        stats.observe(t, jobs, in_use, waiting)
    return stats


def expected_averages(
    steps: list[tuple[int, int, int, int]], end: float, start: float = 0.0
) -> tuple[float, float, float]:
    areas = [0.0, 0.0, 0.0]
    current = (0, 0, 0)
    t = start
    for dt, *counts in steps:
        for i in range(3):
            areas[i] += current[i] * dt / 4
        t += dt / 4
        current = tuple(counts)
    for i in range(3):
        areas[i] += current[i] * (end - t)
    elapsed = end - start
    return tuple(a / elapsed if elapsed else float(c) for a, c in zip(areas, current, strict=True))


@PROPERTY
@given(STEPS, st.integers(0, 40))
def test_prop_averages_peaks_and_currents(steps: list, tail: int) -> None:
    stats = replay(steps)
    end = stats.last + tail / 4
    r = stats.report(end)
    averages = expected_averages(steps, end)
    names = ("jobs", "in_use", "waiting")
    for i, name in enumerate(names):
        assert r[name + "_average"] == pytest.approx(averages[i], abs=0.005 + 1e-9)
        values = [s[1 + i] for s in steps]
        assert r[name + "_peak"] == max(values, default=0)
        assert r[name + "_current"] == (values[-1] if values else 0)
        assert r[name + "_average"] <= r[name + "_peak"]
    assert r["elapsed"] == pytest.approx(end, abs=0.0005)


@PROPERTY
@given(STEPS, STEPS, st.integers(0, 40))
def test_prop_reset_forgets_the_past(before: list, after: list, tail: int) -> None:
    stats = replay(before)
    reset_at = stats.last
    stats.record_accept(waited=1.0)
    stats.record_reject()
    last = (stats.jobs.current, stats.in_use.current, stats.waiting.current)
    stats.reset(reset_at)
    fresh = PoolStats(started=reset_at)
    fresh.observe(reset_at, *last)
    t = reset_at
    for dt, jobs, in_use, waiting in after:
        t += dt / 4
        stats.observe(t, jobs, in_use, waiting)
        fresh.observe(t, jobs, in_use, waiting)
    end = t + tail / 4
    assert stats.report(end) == fresh.report(end)


@PROPERTY
@given(ACCEPTS, st.integers(0, 10))
def test_prop_counts_and_average_wait(accepts: list, rejects: int) -> None:
    stats = PoolStats(started=0.0)
    for w in accepts:
        stats.record_accept(waited=None if w is None else w / 4)
    for _ in range(rejects):
        stats.record_reject()
    r = stats.report(1.0)
    assert r["accepted"] == len(accepts)
    assert r["rejected"] == rejects
    waited = [w / 4 for w in accepts if w is not None]
    assert stats.waits == len(waited)
    expected = sum(waited) / len(accepts) if accepts else 0.0
    assert r["average_wait"] == pytest.approx(expected, abs=0.00005 + 1e-9)
