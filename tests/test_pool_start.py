"""A job that never says READY is ended after START_LIMIT and counts as a boot failure.

The pool's state machine on a Clock; the launcher seam is replaced by a
recorder (what the real launcher does is tested in test_forkserver.py).
"""

from __future__ import annotations

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure

from twistmail.config import PrestartEntry
from twistmail.prestart import launch
from twistmail.prestart import pool as poolmod
from twistmail.prestart.policy import Limits


@attrs.define
class Started:
    pid: int
    on_ended: object
    signals: list = attrs.field(factory=list)

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)
        if sig == "KILL":
            self.on_ended(Failure(ProcessTerminated(None, 9, None)))


class Recorder:
    def __init__(self) -> None:
        self.started: list[Started] = []

    def spawn_job(self, pgm, config_path, channel, on_started, on_ended) -> Started:
        job = Started(1000 + len(self.started), on_ended)
        self.started.append(job)
        on_started(job.pid)
        return job

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)


def started_pool(clock: Clock, inljobs: int = 1, launcher: Recorder | None = None
                 ) -> poolmod.Pool:
    """INLJOBS jobs wanted (one by default), their starts asked of the launcher."""
    entry = PrestartEntry(inljobs=inljobs, threshold=1, adljobs=1, maxjobs=inljobs + 2)
    p = poolmod.Pool(clock, "QTMSSRCP", entry, Limits(), "/dev/null", None, b"421\r\n")
    p.launcher = launcher or Recorder()
    p.start()
    clock.advance(0)
    return p


def test_a_job_that_hangs_before_ready_is_killed_and_replaced():
    clock = Clock()
    p = started_pool(clock)
    [hung] = p.launcher.started
    clock.advance(poolmod.START_LIMIT - 1)
    assert hung.signals == []  # still within the limit
    clock.advance(1)
    assert hung.signals == ["KILL"]
    assert p.boot_failures == 1  # it never got ready
    clock.advance(Limits().backoff(1) + 0.1)
    assert len(p.launcher.started) == 2  # a replacement, after the back-off


def test_a_ready_job_is_never_killed_by_the_start_limit():
    clock = Clock()
    p = started_pool(clock)
    [job] = p.jobs.values()
    p._job_ready(job)
    clock.advance(poolmod.START_LIMIT * 3)
    assert p.launcher.started[0].signals == []


def test_the_kill_after_endpj_spares_the_jobs_of_an_strpj_right_after():
    clock = Clock()
    p = started_pool(clock)
    [old] = p.jobs.values()
    p._job_ready(old)
    p.end("*IMMED", 0)
    [old_process] = p.launcher.started
    assert old_process.signals == ["TERM"]  # it ignores TERM, say, and lives on
    p.start()  # STRPJ before the KILL is due
    clock.advance(0)
    new_process = p.launcher.started[-1]
    clock.advance(poolmod.KILL_AFTER)
    assert old_process.signals == ["TERM", "KILL"]
    assert new_process.signals == []


def test_a_task_is_lost_only_when_the_job_channel_ends_without_its_result():
    clock = Clock()
    p = started_pool(clock)
    lost = []
    p.task_lost = lost.append
    [job] = p.jobs.values()
    p._job_ready(job)
    job.task = poolmod.Request(None, "task", "remote.test", 0.0, task=b"{}")
    # The launcher's EXIT may be read before the RESULT waiting on the channel.
    p._job_ended(job, Failure(ProcessTerminated(0, None, None)))
    assert lost == []
    job.chan.lineReceived(b"RESULT 1 {}")  # the RESULT is still taken
    job.chan.connectionLost()
    assert lost == []
    job.task = poolmod.Request(None, "task", "remote.test", 0.0, task=b"{}")
    job.chan.connectionLost()  # the channel ended with no RESULT: lost
    assert len(lost) == 1


def test_jobs_that_end_with_their_launcher_are_not_boot_failures():
    clock = Clock()
    p = started_pool(clock, inljobs=6)
    assert len(p.jobs) == 6
    for started in list(p.launcher.started):  # the launcher dies before any is READY
        started.on_ended(Failure(launch.LauncherGone()))
    assert p.boot_failures == 0
    clock.advance(0)
    assert p.status == "ACTIVE" and len(p.jobs) == 6  # replaced at once, no back-off


class Silent(Recorder):
    """A launcher that takes requests and never answers with a pid."""

    def __init__(self) -> None:
        super().__init__()
        self.killed = 0

    def spawn_job(self, pgm, config_path, channel, on_started, on_ended) -> Started:
        job = Started(0, on_ended)
        self.started.append(job)
        return job

    def kill(self) -> None:
        self.killed += 1

    def serves_others(self) -> bool:
        return False


def test_a_start_the_launcher_never_answered_kills_the_launcher():
    clock = Clock()
    p = started_pool(clock, launcher=Silent())
    clock.advance(poolmod.START_LIMIT)
    assert p.launcher.killed == 1
    assert p.launcher.started[0].signals == []  # no pid to signal: the launcher goes instead


def test_a_job_whose_channel_closed_is_never_handed_work():
    clock = Clock()
    p = started_pool(clock)
    [job] = p.jobs.values()
    p._job_ready(job)
    refused, lost = [], []
    p.task_refused, p.task_lost = refused.append, lost.append
    # Its channel ends (its launcher died, say) long before its end is reported.
    job.chan.connectionLost()
    clock.advance(0)
    token = p.submit_task(b"{}", "remote.test")
    assert job.task is None and job.uses == 0  # not handed to the closed channel
    assert [r.token for r in p.waiting] == [token] or refused
    replacement = [j for j in p.jobs.values() if j is not job]
    assert replacement  # the pool counts it gone and starts another
    p._job_ready(replacement[0])
    assert replacement[0].task is not None and replacement[0].task.token == token
    p._job_ended(job, Failure(launch.LauncherGone()))
    assert lost == [] and refused == []


def test_a_task_goes_to_the_job_that_last_served_its_destination():
    clock = Clock()
    p = started_pool(clock, inljobs=3)
    first, second, third = p.jobs.values()
    for job in (first, second, third):
        p._job_ready(job)
    p.task_done = lambda token, line: None
    p.submit_task(b"{}", "a.test")
    p.submit_task(b"{}", "b.test")
    by_destination = {j.last_destination: j for j in p.jobs.values() if j.task}
    for job in by_destination.values():  # both finish; b.test's job is freed last
        job.chan.lineReceived(b"RESULT %d {}" % job.task.token)
        p._job_free(job)
        clock.advance(1)
    p.submit_task(b"{}", "a.test")  # not the most recently freed job, but a.test's
    assert by_destination["a.test"].task is not None
    assert by_destination["b.test"].task is None


def test_the_most_recently_freed_usable_job_takes_the_next_request():
    clock = Clock()
    p = started_pool(clock, inljobs=3)
    p.task_done = lambda token, line: None
    first, second, third = p.jobs.values()
    for job in (first, second, third):
        p._job_ready(job)
        clock.advance(1)
    assert p._pick_idle() is third  # the last to become idle
    p.entry = attrs.evolve(p.entry, maxuse=5)
    third.uses = 5  # used up: it ends, it takes nothing more
    assert p._pick_idle() is second
    p._job_ended(second, Failure(ProcessTerminated(0, None, None)))
    assert p._pick_idle() is first
    token = p.submit_task(b"{}", "a.test")
    assert first.task is not None and first.task.token == token
    assert p._pick_idle() is None  # first is busy, second gone, third used up
    first.chan.lineReceived(b"RESULT %d {}" % token)
    first.chan.lineReceived(b"FREE")
    assert p._pick_idle() is first


class Exhausted(Recorder):
    """A launcher that cannot fork: the system is out of processes or descriptors."""

    def __init__(self, clock: Clock, error: OSError | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.error = error
        self.asked = 0
        self.short = True

    def spawn_job(self, pgm, config_path, channel, on_started, on_ended) -> Started:
        if not self.short:
            return super().spawn_job(pgm, config_path, channel, on_started, on_ended)
        self.asked += 1
        if self.error is not None:
            raise self.error
        self.clock.callLater(0, on_ended, Failure(launch.ForkFailed(70, None, None)))  # FAIL
        return Started(0, on_ended)


def test_a_shortage_of_descriptors_or_processes_never_stops_the_entry():
    """It is likeliest in the very flood that makes the pool grow; a stopped
    entry would refuse mail long after it, until STRPJ."""
    import errno

    for error in (OSError(errno.EMFILE, "Too many open files"), None):
        clock = Clock()
        launcher = Exhausted(clock, error)
        p = started_pool(clock, inljobs=6, launcher=launcher)
        events: list[dict] = []
        p.log = Logger(observer=events.append)
        if error is not None:
            assert launcher.asked == 1  # one failure per decision, not six
        for _ in range(20):
            clock.advance(Limits().backoff_max)
        assert p.status == "ACTIVE" and p.boot_failures < Limits().boot_failure_limit
        launcher.short = False
        clock.advance(Limits().backoff_max)
        assert len(p.jobs) == 6  # the shortage over, the pool fills up
        if error is not None:  # in a flood: one line when it starts (before the
            # observer came), none while it lasts, one when it ends
            said = [formatEvent(e) for e in events if "start" in e.get("log_format", "")]
            assert said == ["QTSMTPSRVP jobs start again, after 21 failed starts"], said


def test_a_free_that_crosses_its_end_does_not_make_a_job_idle_again():
    """A busy job told to end may have sent FREE before it read END: it ends,
    and no connection is handed to it."""
    clock = Clock()
    p = started_pool(clock, inljobs=1)
    [job] = p.jobs.values()
    p._job_ready(job)
    p.task_done = lambda token, line: None
    p.submit_task(b"{}", "a.test")
    assert job.state is poolmod.JobState.BUSY
    p._end_job(job, "endpj")
    assert job.state is poolmod.JobState.BUSY  # a busy job finishes first
    job.chan.lineReceived(b"RESULT %d {}" % job.task.token)
    p._job_free(job)
    assert job.state is poolmod.JobState.ENDING
    p.submit_task(b"{}", "b.test")
    assert job.task is None


class Hung(Silent):
    """A launcher that forked its jobs and then stopped answering: no EXIT ever comes."""

    def spawn_job(self, pgm, config_path, channel, on_started, on_ended) -> Started:
        job = Started(2000 + len(self.started), lambda failure: None)  # its end is not told
        self.started.append(job)
        on_started(job.pid)
        return job


class SharedHung(Hung):
    """The same, shared with another entry that is started."""

    def serves_others(self) -> bool:
        return True


@pytest.mark.parametrize(("launcher", "kills"), [(Hung, 1), (SharedHung, 0)])
def test_an_end_whose_jobs_are_never_reported_gone_kills_their_launcher(launcher, kills):
    """A stopped launcher kept ENDPJ, and the daemon's shutdown, waiting for ever.

    One that another started entry shares is spared: a job stuck in the
    kernel is not ended by the kill either, and the other entry's sessions
    must not be cut for it."""
    clock = Clock()
    p = started_pool(clock, launcher=launcher())
    [job] = p.jobs.values()
    p._job_ready(job)
    p.end("*CNTRLD", 1)
    clock.advance(1)
    assert p.launcher.started[0].signals == ["TERM"]
    clock.advance(poolmod.KILL_AFTER)
    assert p.launcher.started[0].signals == ["TERM", "KILL"] and p.launcher.killed == 0
    clock.advance(poolmod.KILL_AFTER)
    assert p.launcher.killed == kills


def test_a_launcher_forking_the_jobs_of_an_strpj_since_is_spared():
    clock = Clock()
    p = started_pool(clock, launcher=Hung())
    [job] = p.jobs.values()
    p._job_ready(job)
    p.end("*CNTRLD", 1)
    p.start()  # STRPJ: the same launcher forks the new jobs
    clock.advance(1 + 2 * poolmod.KILL_AFTER)
    assert p.launcher.killed == 0


def test_connections_waiting_from_an_address_at_maxauthfail_are_refused():
    """Each would have had one more try once a job took it."""
    import socket

    clock = Clock()
    p = started_pool(clock)
    [job] = p.jobs.values()
    p._job_ready(job)
    ours, theirs, others = [], [], []
    for peer in ("192.0.2.7", "192.0.2.7", "198.51.100.1"):
        a, b = socket.socketpair()
        (ours if peer == "192.0.2.7" else others).append(b)
        theirs.append(a)
        p.submit(a, "smtp", peer)
    assert len(p.waiting) == 2  # the first went to the job
    p.cut_sessions(lambda ip: ip, "192.0.2.7", b"421 4.7.0 too many\r\n")
    assert [r.peer for r in p.waiting] == ["198.51.100.1"]
    ours[1].settimeout(5)
    assert ours[1].recv(100) == b"421 4.7.0 too many\r\n" and ours[1].recv(100) == b""
    for s in (*ours, *others, *theirs):
        s.close()


def test_a_job_that_takes_no_handoff_is_killed_and_its_client_served_by_another():
    """A stopped or wedged job would keep the connection handed to it for ever."""
    import socket

    clock = Clock()
    p = started_pool(clock, inljobs=2)
    for job in list(p.jobs.values()):
        p._job_ready(job)
    a, b = socket.socketpair()
    p.submit(a, "smtp", "192.0.2.7")
    [stuck] = [j for j in p.jobs.values() if j.pending]
    clock.advance(poolmod.ACK_LIMIT - 1)
    assert all(s.signals == [] for s in p.launcher.started)  # still within the limit
    clock.advance(1)
    assert stuck.process.signals == ["KILL"]
    [other] = [j for j in p.jobs.values() if j.pending]
    assert other is not stuck and [r.sock for r in other.pending.values()] == [a]
    p._job_ack(other, next(iter(other.pending)))
    clock.advance(poolmod.ACK_LIMIT * 2)
    assert other.process.signals == []  # it took the connection in time
    a.close()
    b.close()


def test_a_busy_job_that_gives_no_sign_of_life_is_killed_and_its_task_lost():
    """A stopped or wedged client job would hold its messages for ever; a slow one answers."""
    clock = Clock()
    p = started_pool(clock)
    [job] = p.jobs.values()
    p._job_ready(job)
    sent: list[bytes] = []
    job.chan.send = sent.append
    lost: list[poolmod.Request] = []
    p.task_lost = lost.append
    token = p.submit_task(b'{"messages": []}', "example.net")
    assert job.task is not None and job.task.token == token
    clock.advance(poolmod.PING_AFTER)
    assert sent == [b"PING"]
    p._job_alive(job)  # PONG: a slow peer, a live job
    clock.advance(poolmod.PONG_LIMIT * 3)
    assert job.process.signals == []
    clock.advance(poolmod.PING_AFTER)
    assert sent == [b"PING", b"PING"]
    clock.advance(poolmod.PONG_LIMIT)
    assert job.process.signals == ["KILL"] and job.end_reason == "unresponsive"
    p._channel_closed(job)
    assert [r.token for r in lost] == [token]  # tried again, as after a crash


def test_a_session_job_is_asked_only_once_it_took_the_session_and_never_when_idle():
    import socket

    clock = Clock()
    p = started_pool(clock)
    [job] = p.jobs.values()
    p._job_ready(job)
    sent: list[bytes] = []
    job.chan.send = sent.append
    clock.advance(poolmod.PING_AFTER * 3)
    assert sent == []  # idle: nothing to ask
    a, b = socket.socketpair()
    p.submit(a, "smtp", "192.0.2.7")
    p._job_ack(job, next(iter(job.pending)))
    clock.advance(poolmod.PING_AFTER - 1)
    p._job_free(job)  # the session ended in time
    clock.advance(poolmod.PING_AFTER + poolmod.PONG_LIMIT)
    assert sent == [] and job.process.signals == []
    b.close()


def test_one_more_job_on_demand_stops_at_maxjobs():
    """STRTCPSVR *POP with POP running: one more job each time, up to MAXJOBS."""
    clock = Clock()
    p = started_pool(clock, inljobs=1)  # maxjobs 3
    assert p.start_one_more() and p.start_one_more()
    clock.advance(0)
    assert len(p.jobs) == 3
    assert not p.start_one_more()
    p.active = False
    assert not p.start_one_more()


def _ready(p: poolmod.Pool, clock: Clock) -> list[poolmod.Job]:
    from twisted.internet.testing import StringTransport

    jobs = list(p.jobs.values())
    for job in jobs:
        job.chan.makeConnection(StringTransport())
        job.chan.lineReceived(b"READY")
    clock.advance(0)
    return jobs


def test_jobs_that_fail_together_count_as_one_boot_failure():
    """Six jobs started at once, dead before READY in one bad moment, stopped
    the entry at once (five failures) with no back-off tried."""
    clock = Clock()
    p = started_pool(clock, inljobs=6)
    for started in list(p.launcher.started):
        started.on_ended(Failure(ProcessTerminated(70, None, None)))
    assert p.boot_failures == 1 and p.status == "ACTIVE"
    clock.advance(Limits().backoff(1) + 0.1)
    assert len(p.launcher.started) > 6  # tried again after the back-off
    # One started after that failure was seen counts again.
    newest = p.launcher.started[-1]
    newest.on_ended(Failure(ProcessTerminated(70, None, None)))
    assert p.boot_failures == 2


def test_an_entry_stopped_by_boot_failures_ends_the_jobs_it_has():
    """They sat idle, refused every connection, and kept STRPJ refused."""
    clock = Clock()
    p = started_pool(clock, inljobs=2)
    ready = _ready(p, clock)
    p.reconfigure(attrs.evolve(p.entry, inljobs=3), p.limits)
    clock.advance(0)
    p.boot_failures = Limits().boot_failure_limit - 1
    [new] = [s for s in p.launcher.started if s.pid not in {j.pid for j in ready}]
    new.on_ended(Failure(ProcessTerminated(70, None, None)))
    clock.advance(0)
    assert p.status == "FAILED"
    assert [(j.state, j.end_reason) for j in ready] == [
        (poolmod.JobState.ENDING, "failed")] * 2
    assert all(j.chan.transport.value().endswith(b"END\n") for j in ready)
    stops = []
    p.launcher.stop = lambda: stops.append(1)
    for j in ready:  # they exit: the launcher goes with the last (unless another entry uses it)
        j.process.on_ended(Failure(ProcessTerminated(0, None, None)))
    assert stops == [1]


def test_a_job_told_to_end_that_does_not_exit_is_killed():
    clock = Clock()
    p = started_pool(clock, inljobs=1)
    [job] = _ready(p, clock)
    p._end_job(job, "trim")
    [process] = p.launcher.started
    clock.advance(poolmod.END_LIMIT - 1)
    assert process.signals == []  # stopped, say: it never reads its END
    clock.advance(1)
    assert process.signals == ["KILL"] and job.id not in p.jobs


def test_a_job_that_frees_over_a_lowered_maxjobs_ends_instead_of_taking_a_waiting_request():
    """While requests waited, every freed job took the next one: MAXJOBS
    lowered under load was never reached while the load lasted."""
    clock = Clock()
    p = started_pool(clock, inljobs=2)
    jobs = _ready(p, clock)
    p.reconfigure(attrs.evolve(p.entry, maxjobs=2), p.limits)
    for n in range(4):  # two busy, two waiting
        p.submit_task(b"{}", f"d{n}.test")
    clock.advance(0)
    assert [j.state for j in jobs] == [poolmod.JobState.BUSY] * 2 and len(p.waiting) == 2
    p.reconfigure(attrs.evolve(p.entry, inljobs=1, threshold=1, maxjobs=1), p.limits)
    clock.advance(0)
    first = jobs[0]
    first.chan.lineReceived(b"RESULT %d {}" % 1)
    first.chan.lineReceived(b"FREE")
    clock.advance(0)
    assert first.state is poolmod.JobState.ENDING and first.end_reason == "maxjobs"
    assert len(p.waiting) == 2  # the other job takes the next one when it frees
    second = jobs[1]
    second.chan.lineReceived(b"RESULT %d {}" % 2)
    second.chan.lineReceived(b"FREE")
    clock.advance(0)
    assert second.state is poolmod.JobState.BUSY and len(p.waiting) == 1


def _busy_pair(clock: Clock) -> tuple[poolmod.Pool, list]:
    """INLJOBS 2, THRESHOLD 1, both jobs given a task: the rules want one more."""
    p = started_pool(clock, inljobs=2)
    p.monotonic = clock.seconds
    p.task_done = lambda token, line: None
    for job in list(p.jobs.values()):
        p._job_ready(job)
    clock.advance(1)
    tokens = [p.submit_task(b"{}", "a.test"), p.submit_task(b"{}", "b.test")]
    return p, [(j, t) for t in tokens for j in p.jobs.values() if j.task and j.task.token == t]


def _free(job, token: int, at: float) -> None:
    job.chan.lineReceived(b"RESULT %d {}" % token)
    job.chan.lineReceived(b"FREE %.6f" % at)


def test_growth_past_inljobs_counts_the_jobs_as_they_were_when_it_was_decided():
    """Under load the controller reads the channels a batch behind its jobs:
    a job it counts busy may have said FREE already, and growing on that
    count took a pool serving 16 clients to MAXJOBS."""
    clock = Clock()
    p, [(job, token), _] = _busy_pair(clock)
    decided = clock.seconds()
    clock.advance(0)  # the rules: none idle, below THRESHOLD
    assert len(p.launcher.started) == 2  # not before the channels are read
    _free(job, token, decided - 0.0005)  # said FREE before that: one was idle
    clock.advance(poolmod.GROWTH_RECHECK)
    assert len(p.launcher.started) == 2


def test_growth_past_inljobs_is_not_lost_when_a_session_ends_right_after():
    clock = Clock()
    p, [(job, token), _] = _busy_pair(clock)
    clock.advance(0)
    _free(job, token, clock.seconds() + 0.0005)  # busy when the rules counted
    clock.advance(poolmod.GROWTH_RECHECK)
    assert len(p.launcher.started) == 3  # ADLJOBS more, as THRESHOLD says


def test_growth_past_inljobs_starts_at_the_next_turn():
    clock = Clock()
    p, _ = _busy_pair(clock)
    clock.advance(0)
    assert len(p.launcher.started) == 2
    clock.advance(poolmod.GROWTH_RECHECK)
    assert len(p.launcher.started) == 3


def test_replacing_jobs_below_inljobs_is_never_put_off():
    clock = Clock()
    p = started_pool(clock, inljobs=2)
    for job in list(p.jobs.values()):
        p._job_ready(job)
    clock.advance(0)
    p._job_ended(next(iter(p.jobs.values())), Failure(ProcessTerminated(None, 9, None)))
    clock.advance(0)
    assert len(p.launcher.started) == 3


def test_growth_put_off_is_dropped_when_the_entry_ends_meanwhile():
    """ENDPJ (or the daemon's shutdown) within the turn of the check: no job
    may start on the ended entry; each would die with its launcher as a crash."""
    clock = Clock()
    p, _ = _busy_pair(clock)
    clock.advance(0)
    assert p._growth_check is not None
    p.end("*CNTRLD", 30)
    clock.advance(poolmod.GROWTH_RECHECK)
    assert len(p.launcher.started) == 2


def test_an_earlier_end_does_not_stop_the_launcher_under_jobs_started_since():
    """ENDPJ, STRPJ, ENDPJ: the first end's jobs gone, the newer ones still
    finish their sessions through the launcher."""
    clock = Clock()
    p = started_pool(clock, inljobs=1)
    [old] = _ready(p, clock)
    stops = []
    p.launcher.stop = lambda: stops.append(1)
    p.end("*CNTRLD", 30)
    p.start()
    clock.advance(0)
    newer = [j for j in p.jobs.values() if j is not old]
    assert newer
    p.end("*CNTRLD", 30)
    old.process.on_ended(Failure(ProcessTerminated(0, None, None)))
    assert stops == []
    for job in newer:
        job.process.on_ended(Failure(ProcessTerminated(0, None, None)))
    assert stops == [1]


def test_requests_waiting_when_the_entry_ends_are_told_it_ends_not_that_none_is_free():
    import socket

    clock = Clock()
    p = started_pool(clock)
    p.end_reply = b"421 4.3.2 shutting down\r\n"
    [job] = p.jobs.values()
    p._job_ready(job)
    pairs = [socket.socketpair() for _ in range(2)]
    for _ours, theirs in pairs:
        p.submit(theirs, "smtp", "192.0.2.7")
    assert len(p.waiting) == 1  # the first went to the job
    p.end("*IMMED", 0)
    waiter = pairs[1][0]
    waiter.settimeout(5)
    assert waiter.recv(100) == b"421 4.3.2 shutting down\r\n"
    for pair in pairs:
        for s in pair:
            s.close()


def test_a_change_of_other_settings_journals_no_change_of_the_entry():
    """config --apply of [prestart] wait_limit wrote JA CHG for every entry."""
    clock = Clock()
    p = started_pool(clock)
    written = []
    p._journal = lambda code, esd, **fields: written.append(code)
    p.reconfigure(p.entry, attrs.evolve(p.limits, wait_limit=5.0))
    assert written == []
    p.reconfigure(attrs.evolve(p.entry, maxjobs=p.entry.maxjobs + 1), p.limits)
    assert written == ["JA"]


def test_a_job_gone_before_its_pid_was_known_is_journaled_without_one():
    """JB BOOT QTSMTPSRVP/None: the launcher died before it said the pid."""
    clock = Clock()
    launcher = Recorder()
    launcher.spawn_job = lambda pgm, config_path, channel, on_started, on_ended: (
        launcher.started.append(Started(0, on_ended)) or launcher.started[-1])
    p = started_pool(clock, launcher=launcher)
    written = []
    p._journal = lambda code, esd, **fields: written.append(esd)
    launcher.started[0].on_ended(Failure(ProcessTerminated(None, 9, None)))
    assert written and all("None" not in esd for esd in written), written


def _tcp_pair():
    """A TCP connection's two ends: (the server's, the client's)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


def _two_ready_jobs_one_handed_a_connection(clock):
    p = started_pool(clock, inljobs=2)
    for job in list(p.jobs.values()):
        p._job_ready(job)
    ended = []
    p.session_ended = ended.append
    a, b = _tcp_pair()
    p.submit(a, "smtp", "192.0.2.7")
    [job] = [j for j in p.jobs.values() if j.pending]
    return p, job, ended, (a, b)


def _closed_by_the_job(job) -> None:
    from twisted.internet.error import ConnectionDone

    job.chan.connectionLost(Failure(ConnectionDone()))


def test_a_connection_whose_job_died_before_acknowledging_it_goes_to_another():
    """A job acknowledges before it says anything to the client: one whose
    channel ended, read to its end, with no ACK never began the session.
    Its client was closed unanswered; it is handed on, and counted once."""
    clock = Clock()
    p, dead, ended, (a, b) = _two_ready_jobs_one_handed_a_connection(clock)
    _closed_by_the_job(dead)  # killed: its channel ends first
    [other] = [j for j in p.jobs.values() if j.pending]
    assert other is not dead and [r.sock for r in other.pending.values()] == [a]
    dead.process.on_ended(Failure(ProcessTerminated(None, 9, None)))
    assert ended == []  # the client's session goes on, with the other job
    p._job_ack(other, next(iter(other.pending)))
    b.close()


@pytest.mark.parametrize("acked", [True, False])
def test_an_end_reported_before_the_channel_s_lines_leaves_them_the_last_word(acked):
    """The launcher's EXIT travels on another socket: read first, it took the
    connection for unserved while the job's ACK (and its greeting) were out,
    and a second job greeted the same client."""
    clock = Clock()
    p, dead, ended, (a, b) = _two_ready_jobs_one_handed_a_connection(clock)
    dead.process.on_ended(Failure(ProcessTerminated(None, 9, None)))
    assert not any(j.pending for j in p.jobs.values())  # nothing decided yet
    if acked:
        dead.chan.lineReceived(b"ACK %d" % next(iter(dead.pending)))
    _closed_by_the_job(dead)
    handed = [j for j in p.jobs.values() if j.pending]
    if acked:  # served by the dead job: its client's count ends with it
        assert handed == [] and ended == ["192.0.2.7"]
    else:
        assert len(handed) == 1 and ended == []
    b.close()


def test_a_client_the_dead_job_had_greeted_is_not_greeted_again():
    """The greeting goes out before the ACK: a job killed between the two had
    begun the session, which another job's greeting would garble."""
    clock = Clock()
    p, dead, ended, (a, b) = _two_ready_jobs_one_handed_a_connection(clock)
    a.send(b"220 mail.example.test ESMTP\r\n")
    _closed_by_the_job(dead)
    assert not any(j.pending for j in p.jobs.values())
    dead.process.on_ended(Failure(ProcessTerminated(None, 9, None)))
    assert ended == ["192.0.2.7"]
    b.settimeout(5)
    assert b.recv(100).startswith(b"220 ") and b.recv(100) == b""  # closed, as a crash is
    b.close()


def test_a_channel_dropped_from_this_end_hands_nothing_on():
    """Lines the job wrote may be left unread (an ACK among them)."""
    clock = Clock()
    from twisted.internet.testing import StringTransport

    p, job, ended, (a, b) = _two_ready_jobs_one_handed_a_connection(clock)
    job.chan.transport = StringTransport()
    job.chan.lineLengthExceeded(b"x")
    job.chan.connectionLost(Failure(ProcessTerminated(None, 9, None)))
    assert not any(j.pending for j in p.jobs.values())
    b.close()


def test_a_connection_to_an_entry_already_ended_is_not_told_the_server_shuts_down():
    import socket

    clock = Clock()
    p = started_pool(clock)
    p.end_reply = b"421 4.3.2 shutting down\r\n"
    p.end("*IMMED", 0)
    ours, theirs = socket.socketpair()
    p.submit(theirs, "smtp", "192.0.2.7")
    ours.settimeout(5)
    assert ours.recv(100) == b"421\r\n"  # the entry's refusal, as before
    ours.close()


def test_dspactpj_counts_no_client_that_left_while_waiting():
    """They were counted waiting until a job freed, however long that took."""
    clock = Clock()
    p = started_pool(clock)
    p.reconfigure(attrs.evolve(p.entry, maxjobs=1), p.limits)
    [job] = p.jobs.values()
    p._job_ready(job)
    ended = []
    p.session_ended = ended.append
    served, left, staying = _tcp_pair(), _tcp_pair(), _tcp_pair()
    for server, _ in (served, left, staying):
        p.submit(server, "smtp", "192.0.2.7")
    clock.advance(0)
    assert p.report()["waiting_current"] == 2
    left[1].close()
    assert p.report()["waiting_current"] == 1 and ended == ["192.0.2.7"]
    for pair in (served, staying):
        pair[1].close()
