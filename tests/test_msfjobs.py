"""The bridge's QMSF job set: answers, deaths, the delay before a new job, poison mail."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from appliance import base_sections, render_toml
from inline_reactor import Inline as _Inline
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import deferLater
from twisted.internet.testing import Clock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from twistmail import config as configmod
from twistmail.bridge.manager import (
    END_WAITS,
    FAIL_WAITS,
    MAX_JOB_ENDS,
    MAX_SILENT_ENDS,
    NO_ROOM_WAIT,
    RECOVER_EVERY,
    RESCAN_EVERY,
    QueueManager,
)
from twistmail.bridge.msfjobs import (
    JobEnded,
    JobFailed,
    JobLost,
    JobSilent,
    MsfJobs,
    NoRoom,
    _Job,
)
from twistmail.directory import SqliteDirectory
from twistmail.interfaces import CORRUPT, QTMSINQ
from twistmail.prestart.launch import LauncherGone
from twistmail.queue import Envelope, FileQueue


class Recorder:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []

    def write(self, code: str, esd: str, *args: object, **fields: object) -> None:
        self.entries.append((code, esd))


def make(count: int = 3) -> tuple[Clock, MsfJobs, list[_Job]]:
    """A job set whose new jobs are in-memory channels, not processes."""
    clock = Clock()
    jobs = MsfJobs(clock, "twistmail.toml", count, Recorder())
    started: list[_Job] = []

    def spawn() -> _Job:
        job = _Job(jobs)
        job.pid = 1000 + len(started)
        job.channel.makeConnection(StringTransport())
        jobs.jobs.append(job)
        started.append(job)
        return job

    jobs._spawn = spawn  # type: ignore[method-assign]
    return clock, jobs, started


def died(job: _Job) -> None:
    job.exited(Failure(ProcessTerminated(exitCode=1)))


def test_jobs_start_with_the_messages_and_answers_reach_their_deferreds():
    clock, jobs, started = make()
    assert jobs.free() == 3 and started == []  # nothing runs before there is mail
    freed = []
    jobs.on_free = lambda: freed.append(1)
    results = []
    jobs.process("Q1").addCallback(results.append)
    jobs.process("Q2").addCallback(results.append)
    assert len(started) == 2 and jobs.free() == 1
    assert started[0].channel.transport.value() == b"Q1\n"
    started[0].channel.dataReceived(b"DONE Q1\n")
    started[1].channel.dataReceived(b"GONE Q2\n")
    assert results == [True, None] and freed == [1, 1] and jobs.free() == 3
    jobs.process("Q3")  # an idle job takes it; no new one starts
    assert len(started) == 2
    failures = []
    jobs.process("Q4").addErrback(failures.append)
    started[1].channel.dataReceived(b"FAIL Q4 ValueError: no\n")
    assert failures[0].check(JobFailed) and not failures[0].check(NoRoom)
    jobs.process("Q5").addErrback(failures.append)
    started[1].channel.dataReceived(b"FULL Q5 OSError: disk full\n")
    assert failures[1].check(NoRoom) and "disk full" in str(failures[1].value)


def test_a_full_disk_is_answered_full_and_a_defect_fail():
    import errno

    from twistmail.bridge.msf import answer

    class Processor:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def process(self, queue_id: str) -> None:
            raise self.error

    assert answer(Processor(OSError(errno.ENOSPC, "No space left on device")), "Q1") \
        .startswith(b"FULL Q1 ")
    assert answer(Processor(ValueError("bad")), "Q2").startswith(b"FAIL Q2 ")


def test_a_job_that_dies_right_after_its_start_is_replaced_after_a_growing_delay():
    clock, jobs, started = make(count=1)
    lost = []
    jobs.process("Q1").addErrback(lost.append)
    died(started[0])
    assert lost[0].check(JobEnded)  # the message stays queued for the next rescan
    assert jobs.journal.entries == [("JK", "JK CRASH QMSF/1000")]
    assert jobs.free() == 0
    clock.advance(0.99)
    assert jobs.free() == 0
    clock.advance(0.01)
    assert jobs.free() == 1
    jobs.process("Q1").addErrback(lambda f: None)
    died(started[1])
    clock.advance(1.99)
    assert jobs.free() == 0  # twice as long the second time
    clock.advance(0.01)
    assert jobs.free() == 1


def test_a_job_that_holds_a_message_without_a_word_is_killed_and_the_message_kept():
    """A stopped or wedged job would hold its message, and its place, for ever."""
    from twistmail.bridge.msfjobs import STEP_LIMIT

    clock, jobs, started = make(count=1)
    lost = []
    jobs.process("Q1").addErrback(lost.append)
    [job] = started
    killed = []
    job.kill = lambda: killed.append(job.pid)  # type: ignore[method-assign]
    clock.advance(STEP_LIMIT - 1)
    job.channel.dataReceived(b"WORK\n")  # a message of many recipients, still going
    clock.advance(STEP_LIMIT - 1)
    assert killed == [] and job.pending is not None
    clock.advance(1)
    assert killed == [1000]
    died(job)
    assert lost[0].check(JobSilent)  # it stays queued, for the next rescan
    assert jobs.journal.entries == [("JK", "JK CRASH QMSF/1000")]


def test_an_answer_in_time_stops_the_watch():
    from twistmail.bridge.msfjobs import STEP_LIMIT

    clock, jobs, started = make(count=1)
    jobs.process("Q1")
    [job] = started
    job.kill = lambda: pytest.fail("killed")  # type: ignore[method-assign]
    job.channel.dataReceived(b"DONE Q1\n")
    clock.advance(STEP_LIMIT * 2)
    job.channel.dataReceived(b"WORK\n")  # late: nothing to watch
    clock.advance(STEP_LIMIT * 2)


def test_a_qmsf_job_says_work_only_when_a_message_takes_long(monkeypatch):
    import socket

    from twistmail.bridge import msf

    ours, theirs = socket.socketpair()
    now = [100.0]
    monkeypatch.setattr(msf.time, "monotonic", lambda: now[0])
    progress = msf._Progress(ours)
    progress.start()
    progress()
    now[0] += msf.WORK_EVERY - 1
    progress()
    now[0] += 1
    progress()
    progress()
    theirs.setblocking(False)
    assert theirs.recv(100) == b"WORK\n"
    ours.close()
    theirs.close()


def test_a_job_that_had_worked_is_replaced_at_once():
    clock, jobs, started = make(count=1)
    woken = []
    jobs.on_free = lambda: woken.append(1)
    jobs.process("Q1")
    started[0].channel.dataReceived(b"DONE Q1\n")
    jobs.process("Q2").addErrback(lambda f: None)
    died(started[0])
    assert jobs.free() == 1
    clock.advance(0)
    assert len(woken) == 2  # the answer, then the place that came free


def test_ending_closes_the_channels_and_waits_for_the_jobs():
    clock, jobs, started = make()
    lost = []
    jobs.process("Q1").addErrback(lost.append)
    ended = []
    jobs.stop().addCallback(ended.append)
    assert started[0].channel.transport.disconnecting and jobs.free() == 0
    assert ended == []
    started[0].exited(Failure(ProcessTerminated(exitCode=0)))
    assert len(ended) == 1 and lost[0].check(JobEnded)
    assert ("JN", "JN END QMSF/1000") in jobs.journal.entries


def scratch(case: unittest.TestCase) -> Path:
    """A temporary directory that goes with the test (trial's mktemp is under the cwd)."""
    path = Path(tempfile.mkdtemp(prefix="twistmail-test-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


class DyingJobs:
    """Jobs that take one message at a time and die on it when told to."""

    def __init__(self) -> None:
        self.pending: Deferred | None = None
        self.on_free = lambda: None

    def free(self) -> int:
        return 0 if self.pending else 1

    def process(self, queue_id: str) -> Deferred:
        self.pending = Deferred()
        return self.pending

    def die(self) -> None:
        d, self.pending = self.pending, None
        d.errback(JobEnded("QMSF/1 ended while processing it"))

    def fail(self) -> None:
        d, self.pending = self.pending, None
        d.errback(JobFailed("RecursionError: maximum recursion depth exceeded"))

    def silent(self) -> None:
        d, self.pending = self.pending, None
        d.errback(JobSilent("QMSF/1 ended while processing it, giving no sign of life"))

    def full(self) -> None:
        d, self.pending = self.pending, None
        d.errback(NoRoom("OSError: [Errno 28] No space left on device"))

    def lost(self) -> None:
        d, self.pending = self.pending, None
        d.errback(JobLost("QMSF/1 ended while processing it"))


def one_queued(case: unittest.TestCase) -> tuple:
    """A queue with one message, and a manager over jobs that answer when told."""
    fq = FileQueue(scratch(case) / "queue")
    with fq.new_spool(Envelope.new("jane@example.test", ("sam@example.test",))) as spool:
        spool.write(b"Subject: one\r\n\r\nbody\r\n")
        qid = spool.commit(QTMSINQ)
    jobs, journal = DyingJobs(), Recorder()
    return fq, qid, jobs, journal, QueueManager(reactor, fq, jobs, journal, lambda: False)


class PoisonMessageTests(unittest.TestCase):
    async def test_a_message_that_ends_its_job_three_times_is_set_aside(self) -> None:
        """Tried again at once, three SIGKILLs of busy jobs (an administrator,
        the OOM killer) set a sound message aside; the tries are now apart."""
        await self._set_aside_after(DyingJobs.die, MAX_JOB_ENDS, waits=END_WAITS,
                                    counted=False)

    async def test_a_message_on_which_jobs_stop_answering_is_set_aside_only_much_later(
            self) -> None:
        """A stalled disk stops every job: three kills for silence (15 minutes)
        set every message in hand aside, whole and sound."""
        await self._set_aside_after(DyingJobs.silent, MAX_SILENT_ENDS)

    async def test_a_message_its_job_fails_on_is_tried_after_growing_waits_then_set_aside(
            self) -> None:
        """Retried at every rescan for ever otherwise; three quick tries set a
        message aside whose mailbox the administrator could mend in minutes."""
        await self._set_aside_after(DyingJobs.fail, len(FAIL_WAITS) + 1, waits=FAIL_WAITS)

    async def _set_aside_after(self, outcome, attempts: int, waits: tuple = (),
                               counted: bool = True) -> None:
        fq, qid, jobs, journal, manager = one_queued(self)
        for attempt in range(attempts):
            self.assertEqual(fq.list(QTMSINQ), [qid], f"still queued before attempt {attempt}")
            if waits and attempt:
                count, not_before = manager.fails[qid]
                self.assertEqual((count, round(not_before - reactor.seconds())),
                                 (attempt if counted else 0, waits[attempt - 1]))
                manager._add(qid)  # a rescan before the wait is over: not tried
                self.assertEqual(list(manager.todo), [])
                manager.fails[qid] = (count, 0.0)  # the wait is over
            manager._add(qid)
            manager._pump()
            outcome(jobs)
            while manager.running:
                await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(fq.list(QTMSINQ), [])
        self.assertEqual(fq.list(CORRUPT), [qid])
        self.assertEqual(journal.entries, [("7Y", f"7Y CRP {qid}")])
        self.assertEqual((dict(manager.job_ends), manager.fails), ({}, {}))


class NoRoomTests(unittest.TestCase):
    async def test_a_message_the_disk_has_no_room_for_waits_and_is_never_set_aside(
            self) -> None:
        """A full disk for hours set every message aside as corrupt, one by one."""
        fq, qid, jobs, journal, manager = one_queued(self)
        for _ in range(len(FAIL_WAITS) + 3):
            if qid in manager.fails:
                manager.fails[qid] = (manager.fails[qid][0], 0.0)  # the wait is over
            manager._add(qid)
            manager._pump()
            jobs.full()
            while manager.running:
                await deferLater(reactor, 0.01, lambda: None)
            count, not_before = manager.fails[qid]
            self.assertEqual((count, round(not_before - reactor.seconds())), (0, NO_ROOM_WAIT))
        self.assertEqual(fq.list(QTMSINQ), [qid])
        self.assertEqual((fq.list(CORRUPT), journal.entries), ([], []))
        self.assertIsNotNone(manager.no_room)


class BusyJobs:
    """Two jobs that hold each message until told to finish it."""

    def __init__(self) -> None:
        self.pending: list[Deferred] = []
        self.on_free = lambda: None

    def free(self) -> int:
        return 2 - len(self.pending)

    def process(self, queue_id: str) -> Deferred:
        self.pending.append(Deferred())
        return self.pending[-1]

    def finish(self) -> None:
        self.pending.pop(0).callback(True)


def test_recovery_comes_at_least_every_minute_under_steady_load(tmp_path):
    """It waits for no job to be busy; under steady load the jobs get no new
    message until the busy ones finish.  The first recovery readies the bridge."""
    fq = FileQueue(tmp_path / "queue")
    for _ in range(5):  # never removed by these jobs: the load never ends
        with fq.new_spool(Envelope.new("jane@example.test", ("sam@example.test",))) as spool:
            spool.write(b"Subject: hi\r\n\r\nbody\r\n")
            spool.commit(QTMSINQ)
    clock, jobs, recoveries = _Inline(), BusyJobs(), []
    recover = fq.recover
    fq.recover = lambda: recoveries.append(clock.seconds()) or recover()  # type: ignore[method-assign]
    manager = QueueManager(clock, fq, jobs, Recorder(), lambda: False)
    manager._watch = lambda: None  # type: ignore[method-assign]
    assert manager.start().called and recoveries == [0]
    while clock.seconds() < RECOVER_EVERY:
        clock.advance(RESCAN_EVERY)
        assert len(jobs.pending) == 2  # always busy
        jobs.finish()
    assert recoveries == [0] and len(jobs.pending) == 1  # recovery due: nothing new
    jobs.finish()
    assert recoveries == [0, RECOVER_EVERY] and len(jobs.pending) == 2


class RealJobTests(unittest.TestCase):
    """A QMSF job process, started and ended as the bridge does."""

    async def test_ending_lets_the_job_finish_the_message_in_hand(self) -> None:
        root = scratch(self)
        config = root / "twistmail.toml"
        config.write_text(render_toml(base_sections(root / "var")))
        settings = configmod.load(config)
        SqliteDirectory.from_settings(settings).create_profile("SAM", "secret")
        fq = FileQueue.for_settings(settings)
        with fq.new_spool(Envelope.new("jane@example.test", ("sam@example.test",))) as spool:
            spool.write(b"Subject: last one\r\n\r\n" + b"x" * 76 * 4000 + b"\r\n")
            qid = spool.commit(QTMSINQ)
        journal = Recorder()
        jobs = MsfJobs(reactor, str(config), 1, journal)
        answer = jobs.process(qid)  # the job is still starting: the id waits on its channel
        ended = jobs.stop()  # ENDMSF right away
        self.assertTrue(await answer)
        await ended
        self.assertEqual(fq.list(QTMSINQ), [])
        maildir = root / "var" / "mailboxes" / "SAM" / "Maildir" / "new"
        [delivered] = list(maildir.iterdir())
        self.assertIn(b"Subject: last one", delivered.read_bytes())
        [(code, esd)] = journal.entries
        self.assertTrue(code == "JN" and esd.startswith("JN END QMSF/"), esd)


def test_a_reload_switches_the_journals_of_the_bridge_and_its_qmsf_jobs(tmp_path, monkeypatch):
    """CHGSMTPA JOURNAL(*NO) reaches every process that journals; so does a new
    storage threshold, which decides what is parked on QTMSBSSQ and released."""
    from types import SimpleNamespace

    from twistmail import config as configmod
    from twistmail.bridge import main as bridgemain
    from twistmail.bridge import msf
    from twistmail.controller.service import limits_of
    from twistmail.journal import Journal

    sections = base_sections(tmp_path / "var")
    sections["smtp"] = {"journal": "*NO"}
    sections["storage"] = {"threshold": 50}
    monkeypatch.setattr("twistmail.smtp.backend.storage_used_percent", lambda path: 60.0)
    config = tmp_path / "twistmail.toml"
    config.write_text(render_toml(sections))
    journals = [Journal(tmp_path / "journal", f"T/{n}") for n in range(4)]
    assert all(j.enabled for j in journals)
    manager = SimpleNamespace(storage_full=lambda: False)
    changed = []
    settings = configmod.load(config)
    pool = SimpleNamespace(reconfigure=lambda *a: changed.append(a), reload_jobs=lambda: None,
                           journal=journals[0], entry=settings.prestart.QTMSCCLCP,
                           limits=limits_of(settings))
    bridgemain._reload(str(config), pool,
                       SimpleNamespace(configure=lambda s: None, smtp_server=lambda on: None,
                                       journal=journals[1]),
                       SimpleNamespace(reload=lambda: None, journal=journals[2]),
                       manager)
    processor = SimpleNamespace(journal=journals[3], storage_full=lambda: False)
    msf._reload(str(config), processor)
    assert not any(j.enabled for j in journals)
    assert manager.storage_full() and processor.storage_full()
    assert changed == []  # the client pool's entry is as it was: no JA CHG QTMSCCLCP


def test_a_job_whose_bridge_is_gone_ends_without_a_traceback(tmp_path):
    """ENDMSF *IMMED or a killed bridge closes the channel while a job works:
    its answer then met a broken pipe, and every such end logged a traceback."""
    import os
    import socket
    import subprocess
    import sys

    config = tmp_path / "twistmail.toml"
    config.write_text(render_toml(base_sections(tmp_path / "var")))
    settings = configmod.load(config)
    SqliteDirectory.from_settings(settings).create_profile("SAM", "secret")
    with FileQueue.for_settings(settings).new_spool(
            Envelope.new("jane@example.test", ["sam@example.test"])) as spool:
        spool.write(b"Subject: hi\r\n\r\nhello\r\n")
        qid = spool.commit(QTMSINQ)
    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; from twistmail.bridge import msf\n"
         f"os.dup2({theirs.fileno()}, msf.CHANNEL_FD)\n"
         f"sys.exit(msf.main(['--config', {str(config)!r}]))"],
        pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE, env=env)
    theirs.close()
    ours.sendall(qid.encode() + b"\n")
    ours.close()  # gone before the answer
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0 and b"Traceback" not in err, err.decode()


class ParkingTests(unittest.TestCase):
    def test_mail_parked_for_storage_is_said_in_the_log_once_and_once_released(self) -> None:
        """Only the journal told (a 7L per message): an administrator reading
        the log for warnings saw nothing while every client got 452."""
        from twisted.logger import Logger, formatEvent

        from twistmail.interfaces import QTMSBSSQ

        fq = FileQueue(scratch(self) / "queue")
        for _ in range(2):
            with fq.new_spool(Envelope.new("jane@example.test", ("sam@example.test",))) as sp:
                sp.write(b"Subject: one\r\n\r\nbody\r\n")
                qid = sp.commit(QTMSINQ)
            fq.move(qid, QTMSINQ, QTMSBSSQ)
        full = {"now": True}
        manager = QueueManager(reactor, fq, DyingJobs(), Recorder(), lambda: full["now"])
        events: list[dict] = []
        manager.log = Logger(observer=events.append)
        for _ in range(3):
            manager._release_parked()
        full["now"] = False
        manager._release_parked()
        manager._release_parked()
        said = [formatEvent(e) for e in events]
        assert len(said) == 2, said
        assert "over [storage] threshold" in said[0] and "under" in said[1]
        assert fq.list(QTMSBSSQ) == [] and len(fq.list(QTMSINQ)) == 2
        # Parked mail deleted by hand, then room again: the next overload is said too.
        events.clear()
        full["now"] = True
        fq.move(qid, QTMSINQ, QTMSBSSQ)
        manager._release_parked()
        fq.remove(QTMSBSSQ, qid)
        full["now"] = False
        manager._release_parked()
        full["now"] = True
        fq.move(fq.list(QTMSINQ)[0], QTMSINQ, QTMSBSSQ)
        manager._release_parked()
        said = [formatEvent(e) for e in events]
        assert [("over" in x, "under" in x) for x in said] == [
            (True, False), (False, True), (True, False)], said

    def test_parked_mail_the_administrator_deletes_goes_while_storage_is_short(self) -> None:
        """wrkq --delete frees the disk the parked mail waits for."""
        from twistmail.bridge import deletes
        from twistmail.interfaces import QTMSBSSQ

        fq = FileQueue(scratch(self) / "queue")
        parked = []
        for _ in range(2):
            with fq.new_spool(Envelope.new("jane@example.test", ("sam@example.test",))) as sp:
                sp.write(b"Subject: big\r\n\r\nbody\r\n")
                parked.append(sp.commit(QTMSINQ))
            fq.move(parked[-1], QTMSINQ, QTMSBSSQ)
        journal = Recorder()
        manager = QueueManager(reactor, fq, DyingJobs(), journal, lambda: True)
        deletes.request(fq.root, parked[0])
        manager._release_parked()
        assert fq.list(QTMSBSSQ) == [parked[1]] and fq.list(QTMSINQ) == []
        assert deletes.outcome(fq.root, parked[0]) == "done"
        assert journal.entries == [("7N", "7N DLT QTMSBSSQ")]


class LauncherDeathTests(unittest.TestCase):
    def test_a_job_that_ends_with_its_launcher_loses_its_message_as_lost(self) -> None:
        _clock, jobs, started = make(1)
        lost: list = []
        jobs.process("Q1").addErrback(lost.append)
        started[0].pid = 1000
        started[0].exited(Failure(LauncherGone()))
        assert lost[0].check(JobLost)

    def test_a_job_that_never_started_loses_its_message_as_lost(self) -> None:
        """A fork that failed: three of them set a sound message aside."""
        _clock, jobs, started = make(1)
        lost: list = []
        jobs.process("Q1").addErrback(lost.append)
        started[0].pid = None
        started[0].exited(Failure(ProcessTerminated(70)))
        assert lost[0].check(JobLost)

    def test_a_started_job_that_dies_counts_against_its_message(self) -> None:
        _clock, jobs, started = make(1)
        lost: list = []
        jobs.process("Q1").addErrback(lost.append)
        started[0].pid = 1000
        started[0].exited(Failure(ProcessTerminated(signal=9)))
        assert lost[0].check(JobEnded) and not lost[0].check(JobLost)

    def test_its_message_goes_to_the_next_job_at_once_and_counts_nothing(self) -> None:
        """Killing the launcher stalled the messages in hand for END_WAITS."""
        fq, qid, jobs, journal, manager = one_queued(self)
        manager._add(qid)
        manager._pump()
        for _ in range(MAX_JOB_ENDS + 1):  # never set aside for it
            first = jobs.pending
            jobs.lost()
            assert jobs.pending is not None and jobs.pending is not first  # taken again
            assert (dict(manager.job_ends), manager.fails) == ({}, {})
        jobs.pending.callback(True)
        assert manager.running == 0 and fq.list(QTMSINQ) == [qid] and journal.entries == []
