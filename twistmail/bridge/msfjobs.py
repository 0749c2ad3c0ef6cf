"""The bridge's QMSF jobs (STRMSF NBRMSFJOB): started, fed and kept running.

Each job is a process (:mod:`twistmail.bridge.msf`) that takes one message
at a time.  :meth:`MsfJobs.process` gives a message to an idle job, or
starts a job for it while there are fewer than NBRMSFJOB (the message waits
on the new job's channel while it boots), and returns a Deferred of the
answer.  Jobs start when there is mail, not with the bridge: an appliance
that receives nothing spends nothing on them.

A job that dies takes its message's Deferred down with :class:`JobEnded`
(the message stays in QTMSINQ and the next rescan offers it again).  Its
place is taken by the next message at once if it had run a while, after a
doubling delay if jobs keep dying right after their start, so a job that
cannot start does not spin.  Ending the jobs closes their channels: each
finishes the message in hand and exits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from twistmail.bridge.msf import JOB_NAME
from twistmail.prestart import launch
from twistmail.protocols.writenow import write_now

MIN_DELAY = 1.0
MAX_DELAY = 60.0
HEALTHY_AFTER = 5.0  # a job that lived this long is replaced without delay
END_WAIT = 30.0  # ENDMSF *CNTRLD's default delay: then the jobs are killed
#: Seconds a job may go without a word while it holds a message.  A message's
#: steps are short (one mailbox copy each), and a job busy with many says
#: WORK twice as often as this at least; a job silent longer is stopped or
#: wedged: it is killed, and its message offered again.
STEP_LIMIT = 300.0


class JobEnded(Exception):
    """The job ended before it answered; the message is still queued."""


class JobSilent(JobEnded):
    """The job was killed for holding the message without a word (stopped,
    wedged): as likely the disk's doing as the message's."""


class JobLost(JobEnded):
    """The job ended with its launcher, which forks every QMSF job, or never
    started: not the message's doing, so it is tried again at once and
    nothing is counted against it."""


class NoJobFree(Exception):
    """No job could take the message now; it stays queued."""


class JobFailed(Exception):
    """The job could not process the message; it stays queued."""


class NoRoom(JobFailed):
    """A full or read-only disk kept the job from processing the message."""


class _Channel(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, job: _Job) -> None:
        self.job = job

    def lineReceived(self, line: bytes) -> None:
        self.job.answered(line)

    def connectionLost(self, reason: object = None) -> None:
        self.job.channel_lost()


class _Job:
    def __init__(self, owner: MsfJobs) -> None:
        self.owner = owner
        self.channel = _Channel(self)
        self.process: Any = None
        self.pid: int | None = None  # kept after the end, for the journal
        self.started_at = owner.reactor.seconds()
        self.pending: tuple[str, defer.Deferred] | None = None
        self.processed = 0
        self.usable = True
        self.closing = False  # its channel is being closed by us: it ends by itself
        self.silent = False  # killed for holding a message without a word
        self.timer: Any = None
        self.ended: defer.Deferred = defer.Deferred()

    def send(self, queue_id: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending = (queue_id, d)
        self._watch()
        # At once: the channel is connected from the start, even while the job boots.
        write_now(self.channel.transport, queue_id.encode("ascii") + b"\n")
        return d

    def _watch(self) -> None:
        self._unwatch()
        self.timer = self.owner.reactor.callLater(STEP_LIMIT, self._silent)

    def _unwatch(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _silent(self) -> None:
        self.timer = None
        if self.pending is None:
            return
        self.owner.log.error("{job} said nothing for {s:.0f}s about {qid}; ending it",
                             job=self.name, s=STEP_LIMIT, qid=self.pending[0])
        self.silent = True
        self.kill()

    def answered(self, line: bytes) -> None:
        if line == b"WORK":
            if self.pending is not None:
                self._watch()
            return
        self._unwatch()
        verb, _, rest = line.decode("utf-8", "replace").partition(" ")
        queue_id, _, reason = rest.partition(" ")
        pending, self.pending = self.pending, None
        if pending is None or pending[0] != queue_id:
            self.owner.log.error("{job}: unexpected answer {line!r}", job=self.name, line=line)
            self.kill()
            if pending is not None:
                pending[1].errback(JobEnded(f"{self.name} answered out of turn"))
            return
        self.processed += 1
        d = pending[1]
        if verb == "DONE":
            d.callback(True)
        elif verb == "GONE":
            d.callback(None)
        elif verb == "FULL":
            d.errback(NoRoom(reason))
        else:
            d.errback(JobFailed(reason or line.decode("utf-8", "replace")))
        self.owner.job_free()

    @property
    def name(self) -> str:
        return f"{JOB_NAME}/{self.pid}" if self.pid is not None else f"{JOB_NAME} (starting)"

    def channel_lost(self) -> None:
        self.usable = False
        if not self.closing:
            self.kill()  # a job without its channel is of no use; its end is reported below

    def exited(self, reason: Any) -> None:
        self.usable = False
        self._unwatch()
        pending, self.pending = self.pending, None
        if pending is not None:
            # One that never started (the launcher failed to fork it, or died
            # first) never had the message either.
            kind = JobSilent if self.silent else \
                JobLost if self.pid is None or _launcher_gone(reason) else JobEnded
            pending[1].errback(kind(f"{self.name} ended while processing {pending[0]}"
                                    + (", giving no sign of life" if self.silent else "")))
        self.owner.job_ended(self, reason)
        self.ended.callback(None)

    def close(self) -> None:
        """No more messages: the job ends after the one in hand, whose answer still comes.

        Only our writing side closes: the job reads the end of its input
        once it has answered, and exits.
        """
        self.usable = False
        self.closing = True
        transport = self.channel.transport
        if transport is not None:
            shut = getattr(transport, "loseWriteConnection", transport.loseConnection)
            shut()

    def kill(self) -> None:
        self.signal("KILL")

    def signal(self, sig: str) -> None:
        launch.send_signal(self.process, sig)


def _launcher_gone(reason: Any) -> bool:
    check = getattr(reason, "check", None)
    return check is not None and check(launch.LauncherGone) is not None


class MsfJobs:
    log = Logger()

    def __init__(self, reactor: Any, config_path: str, count: int, journal: Any,
                 launcher: launch.ForkServer | None = None) -> None:
        self.reactor = reactor
        self.config_path = config_path
        self.launcher = launcher or launch.ForkServer(reactor, (JOB_NAME,))
        self.count = count
        self.journal = journal
        self.jobs: list[_Job] = []
        self.delay = MIN_DELAY
        self.not_before = 0.0  # no job starts before this (reactor seconds)
        self.stopping = False
        self.restarts = 0
        self._wake: Any = None
        #: Called when a job can take a message (one answered, or may start again).
        self.on_free: Callable[[], None] = lambda: None

    def free(self) -> int:
        """How many messages could be given to a job now (idle jobs and places to start one)."""
        idle = sum(1 for job in self.jobs if job.usable and job.pending is None)
        if not self.stopping and self.reactor.seconds() >= self.not_before:
            idle += max(0, self.count - len(self.jobs))
        return idle

    def process(self, queue_id: str) -> defer.Deferred:
        """Give the message to an idle job or a new one; fires True (done), None (gone)."""
        for job in self.jobs:
            if job.usable and job.pending is None:
                return job.send(queue_id)
        job = self._spawn() if self.free() else None
        if job is None:
            return defer.fail(NoJobFree("no QMSF job can take a message now"))
        return job.send(queue_id)

    def listing(self) -> list[dict[str, Any]]:
        """WRKACTJOB rows: the jobs' launcher, then RUN with a message in hand, DEQW waiting."""
        rows = []
        if self.launcher.pid is not None:
            rows.append({"job": launch.ForkServer.NAME, "pgm": "", "pid": self.launcher.pid,
                         "status": "SELW", "uses": None, "peer": ""})
        rows.extend({"job": JOB_NAME, "pgm": "", "pid": job.pid,
                     "status": "RUN" if job.pending else "DEQW", "uses": job.processed,
                     "peer": ""} for job in self.jobs)
        return rows

    def reload(self) -> None:
        """New settings: each job reads them again before its next message."""
        for job in self.jobs:
            job.signal("HUP")

    def stop(self) -> defer.Deferred:
        """ENDMSF: the jobs finish the messages in hand, then end (killed after END_WAIT)."""
        self.stopping = True
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        jobs = list(self.jobs)
        for job in jobs:
            job.close()
        if not jobs:
            return self.launcher.stop()
        kill = self.reactor.callLater(END_WAIT, lambda: [job.kill() for job in jobs])
        done = defer.DeferredList([job.ended for job in jobs])
        done.addBoth(lambda _: kill.cancel() if kill.active() else None)
        done.addBoth(lambda _: self.launcher.stop())
        return done

    # -- the jobs' lives ----------------------------------------------------

    def _spawn(self) -> _Job | None:
        job = _Job(self)

        def started(pid: int) -> None:
            job.pid = pid

        try:
            job.process = self.launcher.spawn_job(JOB_NAME, self.config_path, job.channel,
                                                  started, job.exited)
        except OSError as e:
            self.log.error("cannot start a QMSF job: {e!r}", e=e)
            self._hold_off(job)
            return None
        self.jobs.append(job)
        return job

    def job_free(self) -> None:
        self.on_free()

    def job_ended(self, job: _Job, reason: Any) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
        if self.stopping:
            self._journal("JN", f"JN END {job.name}", pid=job.pid)
            return
        self.restarts += 1
        why = {"reason": "unresponsive"} if job.silent else {}
        self._journal("JK", f"JK CRASH {job.name}", pid=job.pid, exit=str(reason.value), **why)
        self._hold_off(job)

    def _hold_off(self, job: _Job) -> None:
        """After a job's end: the next may start at once, or after a doubling delay."""
        lived = self.reactor.seconds() - job.started_at
        if lived >= HEALTHY_AFTER or job.processed:
            self.delay = MIN_DELAY
            wait = 0.0
        else:
            wait = self.delay
            self.delay = min(MAX_DELAY, self.delay * 2)
            self.log.warn("a QMSF job ended right after its start; next one in {wait:.1f}s",
                          wait=wait)
        self.not_before = self.reactor.seconds() + wait
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = self.reactor.callLater(wait, self.on_free)

    def _journal(self, code: str, esd: str, **fields: Any) -> None:
        if self.journal is not None:
            self.journal.write(code, esd, **fields)
