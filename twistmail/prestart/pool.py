"""The prestart pool at run time: real job processes driven by the pure rules.

One :class:`Pool` per prestart entry (QTMSSRCP, QTPOPSRVP).  It hands each
accepted socket (a "program start request") to an idle job over the job's
socketpair, keeps its own copy until the job has acknowledged it, queues or
rejects requests when no job is free, and after every event asks
``twistmail.prestart.policy.decide`` what to start and end.  It journals job
starts, ends, crashes and rejections (function letter J).
"""

from __future__ import annotations

import array
import collections
import errno
import fcntl
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from twistmail.config import PROGRAMS, PrestartEntry
from twistmail.prestart import channel, launch
from twistmail.prestart.policy import (
    Admission,
    EntryView,
    JobState,
    JobView,
    Limits,
    accepting,
    admit,
    decide,
)
from twistmail.prestart.stats import PoolStats
from twistmail.protocols.writenow import send_descriptor_now, write_now

KILL_AFTER = 5.0  # seconds between SIGTERM and SIGKILL
#: Seconds a job told to end, and free, has to exit before it is killed: a
#: stopped or wedged one would stay outside MAXJOBS' count for ever.
END_LIMIT = 30.0
START_LIMIT = 30.0  # seconds a job may take to say READY; then it is killed (a boot failure)
#: Seconds an idle job may take to ACK a connection handed to it; then it is
#: taken for hung (stopped, wedged): killed, and the client goes to another job.
ACK_LIMIT = 10.0
#: Seconds a job may be busy with a session or task without a sign of life;
#: then it is asked for one (PING), and has PONG_LIMIT seconds to answer.
#: A stopped or wedged job would otherwise hold its slot, and a client job
#: its messages, for ever.  A slow peer is no such job: its reactor answers.
PING_AFTER = 60.0
PONG_LIMIT = 30.0
#: Why a start fails when the system is short of descriptors, processes or memory.
SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})
#: A request that waited this long for a job is journaled (JW).  Shorter
#: waits are the common case under load (the next connection arrives while
#: the last session's job is still saying FREE): DSPACTPJ counts them.
WAIT_NOTED = 1.0
#: Seconds after which growth past INLJOBS is decided again, to confirm it:
#: any wait lets the reactor poll the channels first.
GROWTH_RECHECK = 0.001


@attrs.define(eq=False)
class GrowthCheck:
    """A decision to grow past INLJOBS, waiting for the FREE lines said before it."""

    at: float  # monotonic, as the jobs' FREE lines
    now: float  # the reactor's time of the decision
    view: EntryView
    busy: dict[int, int]  # the jobs counted busy: id -> uses
    stale: set[int] = attrs.field(factory=set)  # of those, free already


@attrs.define(eq=False)
class Request:
    """A program start request: an accepted connection, or a task for a job.

    Server jobs get sockets (``sock``); SMTP client jobs get tasks (``task``,
    one JSON line naming a message and a destination).
    """

    sock: socket.socket | None
    listener: str
    peer: str
    accepted_at: float
    queued_at: float | None = None
    task: bytes | None = None
    token: int = 0  # set when the pool takes the request; a task's result carries it


@attrs.define(eq=False)
class Job:
    id: int
    state: JobState
    since: float
    started_at: float
    uses: int = 0
    pid: int | None = None
    process: Any = None
    chan: ControllerChannel | None = None
    peer: str | None = None
    ready: bool = False
    pending: dict[int, Request] = attrs.field(factory=dict)
    task: Request | None = None  # the task a client job is running, until its RESULT
    last_destination: str | None = None  # of its last task: it may keep a connection there
    timer: Any = None  # kills a job not READY within START_LIMIT, or not taking a handoff
    end_reason: str | None = None
    ended: defer.Deferred = attrs.field(factory=defer.Deferred)
    _view: JobView | None = None
    _view_key: tuple[Any, ...] = ()

    def view(self) -> JobView:
        key = (self.state, self.uses, self.since)
        if self._view is None or self._view_key != key:
            self._view = JobView(self.id, *key)
            self._view_key = key
        return self._view


class ControllerChannel(LineOnlyReceiver):
    """The controller's end of one job's socketpair."""

    delimiter = channel.DELIMITER
    MAX_LENGTH = channel.MAX_LINE

    def __init__(self, pool: Pool, job: Job) -> None:
        self.pool = pool
        self.job = job

    def lineReceived(self, line: bytes) -> None:
        verb, args = channel.parse(line)
        if verb == "READY":
            self.pool._job_ready(self.job)
        elif verb == "ACK" and args:
            self.pool._job_ack(self.job, int(args[0]))
        elif verb == "FREE":
            self.pool._job_free(self.job, _seconds(args))
        elif verb == "PONG":
            self.pool._job_alive(self.job)
        elif verb == "AUTHFAIL" and args:
            self.pool.auth_failed(args[0])
        elif verb == "RESULT" and len(args) >= 2:
            self.job.task = None
            self.pool.task_done(int(args[0]), line.split(b" ", 2)[2])
        elif verb == "PART" and len(args) >= 3:
            self.pool.task_part(int(args[0]), args[1], line.split(b" ", 3)[3])

    def sendLine(self, line: bytes) -> None:
        """At once when the channel is idle (a TASK line, END, CFG)."""
        write_now(self.transport, line + self.delimiter)

    def hand(self, token: int, request: Request) -> None:
        if request.sock is None:
            self.sendLine(b"TASK %d %s" % (token, request.task))
            return
        # The descriptor travels with the bytes of its line (TWISTED.md §1.4).
        line = channel.fd_line(token, request.listener, int(request.sock.family))
        send_descriptor_now(self.transport, request.sock.fileno(), line + self.delimiter)

    def send(self, line: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.sendLine(line)

    def send_end(self) -> None:
        if self.transport is not None and not self.lost:
            self.sendLine(b"END")

    lost = False
    #: Closed from this end: lines the job wrote may be left unread.
    dropped = False

    def lineLengthExceeded(self, line: bytes) -> None:
        self.dropped = True
        super().lineLengthExceeded(line)

    def drop(self) -> None:
        if self.transport is not None:
            self.dropped = True
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        # Ended by the job (EOF, or ECONNRESET when it died with our lines
        # unread): the kernel hands over what it wrote before either, and
        # the reactor reads before it writes, so no line of it went unread.
        self.pool._channel_closed(self.job, not self.dropped)


class Pool:
    """The jobs of one prestart entry."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        pgm: str,
        entry: PrestartEntry,
        limits: Limits,
        config_path: str,
        journal: Any,
        reject_reply: bytes,
        launcher: Any = None,
        end_reply: bytes | None = None,
    ) -> None:
        self.reactor = reactor
        #: Starts the jobs: preloaded with this program's modules only, unless
        #: a launcher other pools share is given.
        self.launcher = launcher or launch.ForkServer(reactor, (pgm,))
        if isinstance(self.launcher, launch.LauncherShare):
            self.launcher.serving = lambda: self.active
        self.pgm = pgm
        self.entry = entry
        self.limits = limits
        self.config_path = config_path
        self.journal = journal
        self.reject_reply = reject_reply
        #: For requests still waiting when the entry ends (not for those that
        #: come to an entry ended: ENDPJ is no shutdown).
        self.end_reply = end_reply or reject_reply
        self.job_name = PROGRAMS[pgm]["job"]
        self.active = False
        self.status = "ENDED"  # ACTIVE, ENDED, FAILED
        self.jobs: dict[int, Job] = {}
        self.waiting: collections.deque[Request] = collections.deque()
        self.boot_failures = 0
        self.last_boot_failure = 0.0
        #: When the last boot failure that counted was (None: none yet).
        self._boot_failure_seen: float | None = None
        #: Starts that failed for want of descriptors or processes, since one worked.
        self.failed_starts = 0
        self.last_trim = 0.0
        self.stats = PoolStats(started=reactor.seconds())
        self.accepting_changed: list[Callable[[bool], None]] = []
        #: Called with the client address when its session is over (or refused).
        self.session_ended: Callable[[str], None] = lambda ip: None
        #: Called with the client address when a job reports a failed sign-on.
        self.auth_failed: Callable[[str], None] = lambda ip: None
        #: Called with a task's token and the job's result line (client jobs).
        self.task_done: Callable[[int, bytes], None] = lambda token, result: None
        #: Called with a task's token, and the queue id and outcome (JSON) of one of
        #: its messages (PART).
        self.task_part: Callable[[int, str, bytes], None] = lambda token, qid, part: None
        #: Called with a task that no job will run (the entry ended, the wait ran out).
        self.task_refused: Callable[[Request], None] = lambda request: None
        #: Called with a task whose job ended before it gave a result.
        self.task_lost: Callable[[Request], None] = lambda request: None
        self._accepting = True
        self._next_id = 1
        self._next_token = 1
        self._timer: Any = None
        self._evaluating = False
        self._evaluation_due = False
        #: Growth past INLJOBS the rules asked for, checked once the channels were read.
        self._growth_check: GrowthCheck | None = None
        self.monotonic = time.monotonic  # the clock of the jobs' FREE lines
        #: Jobs in the order they became idle, the most recent last.  Entries
        #: of jobs that are no longer idle are dropped when met.
        self._idle: dict[int, Job] = {}

    # -- control -------------------------------------------------------

    def start(self) -> None:
        """STRPJ: start the entry's INLJOBS jobs."""
        if self.active:
            return
        now = self.reactor.seconds()
        self.active = True
        self.status = "ACTIVE"
        self.boot_failures = 0
        self.last_trim = now
        self.stats = PoolStats(started=now)
        self._journal("JP", f"JP STR {self.pgm}", pgm=self.pgm)
        self.evaluate()

    def end(self, option: str = "*CNTRLD", delay: float = 30.0, reason: str = "endpj") -> Any:
        """ENDPJ: end every job; returns a Deferred that fires when all are gone."""
        was_active = self.active
        self.active = False
        if self.status == "ACTIVE":
            self.status = "ENDED"
        self._cancel_timer()
        self._growth_check = None
        while self.waiting:
            self._reject(self.waiting.popleft(), "ended", self.end_reply)
        if was_active:
            self._journal("JQ", f"JQ END {self.pgm} {option}", pgm=self.pgm, option=option)
        targets = list(self.jobs.values())
        for job in targets:
            self._end_job(job, reason)
        ends = [j.ended for j in targets]
        if option == "*IMMED":
            self._terminate_all(targets)
        elif ends:
            call = self.reactor.callLater(delay, self._terminate_all, targets)
            done = defer.DeferredList(ends)
            done.addBoth(lambda r: call.cancel() if call.active() else None)
        self._update_accepting()
        return self._release_launcher_after(ends)

    def _release_launcher_after(self, ends: list[defer.Deferred]) -> defer.Deferred:
        """With its jobs gone the launcher goes too, unless another entry uses
        it or STRPJ came meanwhile; STRPJ starts a new one.  Jobs that STRPJ
        started, still finishing after a later ENDPJ, keep it: their own end
        lets it go."""
        done = defer.DeferredList(ends)
        done.addCallback(
            lambda _: None if self.active or self.jobs else self.launcher.stop())
        return done

    def reconfigure(self, entry: PrestartEntry, limits: Limits) -> None:
        """CHGPJE on a running entry: new values apply at once."""
        changed = entry != self.entry
        self.entry = entry
        self.limits = limits
        if self.active and changed:
            self._journal("JA", f"JA CHG {self.pgm}", pgm=self.pgm, **attrs.asdict(entry))
        self.evaluate()

    def cut_sessions(self, key: Callable[[str], str], client: str, refusal: bytes) -> None:
        """MAXAUTHFAIL was reached from ``client`` (by ``key``): each job serving
        it ends a session not signed on (CUT), and its connections still
        waiting for a job get ``refusal`` instead of one more try each."""
        for job in self.jobs.values():
            if job.state is JobState.BUSY and job.peer is not None and job.chan is not None \
                    and key(job.peer) == client:
                job.chan.send(b"CUT")
        if not self.waiting:
            return
        kept: collections.deque[Request] = collections.deque()
        for request in self.waiting:
            if request.sock is None or key(request.peer) != client:
                kept.append(request)
                continue
            self._refuse(request, refusal)
        self.waiting = kept
        self._update_accepting()

    def reload_jobs(self) -> None:
        """Tell every job to re-read the settings file (CHGSMTPA, CHGPOPA)."""
        for job in self.jobs.values():
            if job.chan is not None:
                job.chan.send(b"CFG")

    # -- requests ------------------------------------------------------

    def submit(self, sock: socket.socket, listener: str, peer: str) -> None:
        """A new connection for this entry (a program start request)."""
        self.submit_request(Request(sock, listener, peer, self.reactor.seconds()))

    def submit_task(self, task: bytes, destination: str) -> int:
        """A task for a client job; returns the token its result will carry."""
        request = Request(None, "task", destination, self.reactor.seconds(), task=task)
        self.submit_request(request)
        return request.token

    def submit_request(self, request: Request) -> None:
        request.token = self._next_token
        self._next_token += 1
        now = request.accepted_at
        idle = self._pick_idle(request.peer if request.sock is None else None)
        light = EntryView(active=self.active, jobs=(idle.view(),) if idle else (),
                          waiting=(0.0,) * len(self.waiting))
        decision = admit(light, self.entry, self.limits)
        if decision is Admission.HANDOFF:
            job = idle
            self.stats.record_accept()
            self._hand(job, request)
        elif decision is Admission.QUEUE:
            request.queued_at = now
            self.waiting.append(request)
        else:
            reason = "ended" if not self.active else "wait"
            self._reject(request, reason)
        self.evaluate()

    def room(self) -> int:
        """How many connections the listeners may take at once: one per idle
        job less the requests already waiting; all they can when the entry
        refuses anyway (ended)."""
        if not self.active:
            return 1 << 16
        return len(self._idle) - len(self.waiting)

    def _pick_idle(self, destination: str | None = None) -> Job | None:
        """The most recently freed job: it is warm, and the others stay idle
        long enough to be trimmed.  For a task, a job whose last task went to
        the same destination comes first: it may still hold the connection.

        Asked for every connection: the jobs are looked at from the most
        recently freed on, and the first usable one is nearly always it.
        """
        maxuse = self.entry.maxuse
        found = fallback = None
        stale = []
        for job in reversed(self._idle.values()):
            if job.state is not JobState.IDLE or self.jobs.get(job.id) is not job:
                stale.append(job.id)
            elif maxuse is not None and job.uses >= maxuse:
                continue
            elif destination is None or job.last_destination == destination:
                found = job
                break
            elif fallback is None:
                fallback = job
        for job_id in stale:
            del self._idle[job_id]
        return found or fallback

    def _now_idle(self, job: Job) -> None:
        job.state = JobState.IDLE
        job.since = self.reactor.seconds()
        self._idle.pop(job.id, None)
        self._idle[job.id] = job

    def _hand(self, job: Job, request: Request) -> None:
        token = request.token
        self._idle.pop(job.id, None)
        job.state = JobState.BUSY
        job.since = self.reactor.seconds()
        job.uses += 1
        job.peer = request.peer
        if request.sock is None:  # a task: its RESULT answers it, no ACK
            job.task = request
            job.last_destination = request.peer
            self._watch(job)
        else:
            job.pending[token] = request
            job.timer = self.reactor.callLater(ACK_LIMIT, self._ack_overdue, job)
        try:
            job.chan.hand(token, request)
        except Exception as e:  # the channel is gone; the job's end cleans up
            self.log.warn("handoff to job {pid} failed: {e!r}", pid=job.pid, e=e)

    def _reject(self, request: Request, reason: str, reply: bytes | None = None) -> None:
        self.stats.record_reject()
        if request.sock is None:
            self.task_refused(request)
            return
        self._refuse(request, reply or self.reject_reply)
        self._journal(
            "JR", f"JR REJ {request.peer}", ip=request.peer, pgm=self.pgm, reason=reason
        )

    def _refuse(self, request: Request, reply: bytes) -> None:
        """Answer a connection no job takes, and close it."""
        assert request.sock is not None
        self.session_ended(request.peer)
        if request.listener not in ("smtps", "pop3s"):  # plaintext is noise inside TLS
            try:
                request.sock.send(reply)
            except OSError:
                pass
        request.sock.close()

    def _dispatch(self) -> None:
        while self.waiting and self.active:
            first = self.waiting[0]
            job = self._pick_idle(first.peer if first.sock is None else None)
            if job is None:
                return
            request = self.waiting.popleft()
            if request.sock is not None and hung_up(request.sock):
                self._gave_up(request)
                continue
            now = self.reactor.seconds()
            waited = now - (request.queued_at or now)
            self.stats.record_accept(waited=waited)
            if waited >= WAIT_NOTED:
                self._journal("JW", f"JW WAIT {request.peer} {waited:.1f}s", ip=request.peer,
                              pgm=self.pgm, waited=round(waited, 3))
            self._hand(job, request)

    # -- job events ----------------------------------------------------

    def start_one_more(self) -> bool:
        """STRTCPSVR *POP with POP running: one more server job, as IBM i starts.

        False when the entry is not active or already at MAXJOBS.  Idle
        surplus is trimmed later by the usual rule.
        """
        cap = self.entry.maxjobs
        if not self.active or (cap is not None and len(self.jobs) >= cap):
            return False
        started = self._start_job()
        self.evaluate()
        return started

    def _start_job(self) -> bool:
        """Start one job; False when it could not be started (no more this turn)."""
        now = self.reactor.seconds()
        job = Job(id=self._next_id, state=JobState.STARTING, since=now, started_at=now)
        self._next_id += 1
        job.chan = ControllerChannel(self, job)
        try:
            job.process = self.launcher.spawn_job(
                self.pgm, self.config_path, job.chan,
                on_started=lambda pid: self._job_started(job, pid),
                on_ended=lambda reason: self._job_ended(job, reason),
            )
        except OSError as e:
            hint = ""
            if e.errno in (errno.EACCES, errno.EPERM):  # a Python only root may run, say
                hint = f" (this user must be allowed to run {sys.executable})"
            elif e.errno in SHORTAGES:
                # In a flood this comes many times a second: said once.
                hint = "; the failures that follow are counted until a job starts"
            if not (e.errno in SHORTAGES and self.failed_starts):
                self.log.error("cannot start a {name} job: {e!r}{hint}", name=self.job_name,
                               e=e, hint=hint)
            if e.errno in SHORTAGES:
                self.failed_starts += 1
                self._short_of_resources(now)
            else:
                self.boot_failures += 1
                self.last_boot_failure = now
            return False
        if self.failed_starts:
            self.log.info("{name} jobs start again, after {n} failed starts",
                          name=self.job_name, n=self.failed_starts)
            self.failed_starts = 0
        self.jobs[job.id] = job
        job.timer = self.reactor.callLater(START_LIMIT, self._start_overdue, job)
        return True

    def _short_of_resources(self, now: float) -> None:
        """Starts wait as after a boot failure, but a shortage never stops the entry.

        Out of descriptors or processes is most likely in the very flood
        that makes the pool grow; a stopped entry would refuse mail long
        after the flood, until STRPJ.
        """
        self.boot_failures = min(self.boot_failures + 1, self.limits.boot_failure_limit - 1)
        self.last_boot_failure = now

    def _start_overdue(self, job: Job) -> None:
        """A job that hangs before READY would count as available for ever."""
        job.timer = None
        if not job.ready and job.id in self.jobs:
            self.log.error("{name} job {pid} not ready after {s:.0f}s; ending it",
                           name=self.job_name, pid=job.pid, s=START_LIMIT)
            if job.pid is None:  # the launcher never answered: it is hung
                self.launcher.kill()
                return
            launch.send_signal(job.process, "KILL")

    def _job_started(self, job: Job, pid: int) -> None:
        job.pid = pid
        self._journal("JS", f"JS STR {self.job_name}/{pid}", pid=pid, pgm=self.pgm)

    def _job_ready(self, job: Job) -> None:
        _cancel(job)
        job.ready = True
        self._now_idle(job)
        self.boot_failures = 0
        if job.end_reason is not None:
            job.state = JobState.ENDING
            job.chan.send_end()
            self._await_end(job)
        self._dispatch()
        self.evaluate()

    def _ack_overdue(self, job: Job) -> None:
        """A job that takes no handoff would keep its client waiting for ever.

        An idle job answers at once; one that does not is stopped or wedged.
        It is killed first, so it cannot wake up and serve the connection as
        well, and its client is handed on: it is not refused for our fault.
        """
        job.timer = None
        if self.jobs.get(job.id) is not job or not job.pending:
            return
        taken = list(job.pending.values())
        job.pending.clear()
        job.peer = None  # the client's count goes with it to the next job
        self.log.error("{name} job {pid} took no connection in {s:.0f}s; ending it",
                       name=self.job_name, pid=job.pid, s=ACK_LIMIT)
        job.end_reason = "unresponsive"
        self._signal(job, "KILL")
        for request in taken:
            self.submit_request(request)

    def _job_ack(self, job: Job, token: int) -> None:
        _cancel(job)
        request = job.pending.pop(token, None)
        if request is not None and request.sock is not None:
            request.sock.close()
        self._watch(job)

    def _watch(self, job: Job) -> None:
        """Ask a busy job for a sign of life after PING_AFTER seconds."""
        if job.state is JobState.BUSY and not job.pending:
            _cancel(job)
            job.timer = self.reactor.callLater(PING_AFTER, self._ping, job)

    def _ping(self, job: Job) -> None:
        job.timer = None
        if self.jobs.get(job.id) is not job or job.state is not JobState.BUSY:
            return
        if job.chan is not None:
            job.chan.send(b"PING")
        job.timer = self.reactor.callLater(PONG_LIMIT, self._pong_overdue, job)

    def _job_alive(self, job: Job) -> None:
        self._watch(job)

    def _pong_overdue(self, job: Job) -> None:
        """A busy job that does not answer is stopped or wedged: it is killed.

        Its client's connection closes with it (nothing it did not
        acknowledge is kept); a task it held is lost, and its messages are
        tried again, as when a job crashes.
        """
        job.timer = None
        if self.jobs.get(job.id) is not job or job.state is not JobState.BUSY:
            return
        self.log.error("{name} job {pid} gave no sign of life in {s:.0f}s; ending it",
                       name=self.job_name, pid=job.pid, s=PING_AFTER + PONG_LIMIT)
        job.end_reason = "unresponsive"
        self._signal(job, "KILL")

    def _job_free(self, job: Job, at: float | None = None) -> None:
        """``at``: when the job said FREE (its monotonic clock), None if it did not say."""
        _cancel(job)
        check = self._growth_check
        if check is not None and at is not None and at < check.at \
                and check.busy.get(job.id) == job.uses:
            check.stale.add(job.id)  # free already when the rules counted it busy
        if job.peer is not None:
            self.session_ended(job.peer)
            job.peer = None
        if job.end_reason is not None:
            # Told to end while busy (its FREE may have crossed the END): it
            # ends now, and must not be handed another connection.
            job.state = JobState.ENDING
            self._await_end(job)
            return
        if job.state is JobState.ENDING:
            return
        self._now_idle(job)
        if self._over_maxjobs():
            # MAXJOBS lowered while every job was busy: a job that frees ends
            # instead of taking the next waiting request, or the pool would
            # stay above the limit for as long as requests wait.
            self._end_job(job, "maxjobs")
            self.evaluate()
            return
        self._dispatch()
        self.evaluate()

    def _over_maxjobs(self) -> bool:
        """Asked at every FREE: the jobs are walked only when they may be over."""
        cap = self.entry.maxjobs
        return cap is not None and len(self.jobs) > cap and sum(
            1 for j in self.jobs.values() if j.state is not JobState.ENDING) > cap

    def _await_end(self, job: Job) -> None:
        """A free job told to end: killed if it has not exited in END_LIMIT."""
        _cancel(job)
        job.timer = self.reactor.callLater(END_LIMIT, self._end_overdue, job)

    def _end_overdue(self, job: Job) -> None:
        job.timer = None
        if self.jobs.get(job.id) is job:
            self.log.error("{name} job {pid} told to end {s:.0f}s ago is still there; "
                           "killing it", name=self.job_name, pid=job.pid, s=END_LIMIT)
            self._signal(job, "KILL")

    def _channel_lost(self, job: Job, whole: bool) -> None:
        """What becomes of the connections handed to the job and not acknowledged.

        With its channel read to its end (``whole``: no ACK went unread)
        and nothing sent to the client, the job never began the session:
        it reads nothing from the client before its ACK, and the greeting,
        written before it, would show.  Another job takes such a connection,
        or it waits for one; a job killed an instant before its handoff left
        its client closed unanswered.  The others are closed, as a session
        the job served is.
        """
        taken = list(job.pending.values())
        job.pending.clear()
        if not taken:
            return
        again = [r for r in taken if whole and r.sock is not None and _untouched(r.sock)]
        for request in taken:
            if request not in again and request.sock is not None:
                request.sock.close()
        if not again:
            return
        _cancel(job)
        job.peer = None  # the client's count goes with it to the next job
        for request in again:
            self.submit_request(request)

    def _channel_closed(self, job: Job, whole: bool = False) -> None:
        """The job can take nothing more; it must not be picked while its end is awaited.

        The process's end may be reported much later (a dead launcher reports
        its jobs only when all of them are gone), and a request handed to a
        closed channel would be lost without a word.  Reported first, its end
        left what it was handed to be decided here.
        """
        self._channel_lost(job, whole)
        self._task_unanswered(job)
        if self.jobs.get(job.id) is not job:  # its end came first
            self._session_over(job)
        elif job.state is JobState.IDLE:
            job.state = JobState.ENDING
            self.evaluate()

    def _session_over(self, job: Job) -> None:
        if job.peer is not None:  # it died or ended during a session
            self.session_ended(job.peer)
            job.peer = None

    def _task_unanswered(self, job: Job) -> None:
        """The job's channel is closed with a task and no RESULT: the task is lost.

        Decided at the channel's end, not at the process's: the launcher's
        EXIT line travels on another socket and may be read before a RESULT
        still waiting on this one; nothing can follow the channel's end.
        """
        if job.task is not None:
            lost, job.task = job.task, None
            self.task_lost(lost)

    def _job_ended(self, job: Job, reason: Any) -> None:
        _cancel(job)
        self.jobs.pop(job.id, None)
        self._idle.pop(job.id, None)
        if not (job.pending and job.chan is not None and not job.chan.lost):
            self._channel_lost(job, whole=False)
            self._session_over(job)
        # else the launcher's EXIT came before the channel's end, which may
        # still hold an ACK: the channel's close decides (_channel_closed).
        now = self.reactor.seconds()
        pid = job.pid
        status = launch.exit_text(reason)
        name = self.job_name if pid is None else f"{self.job_name}/{pid}"
        if pid is None and reason.check(launch.LauncherGone):
            # Its launcher went before it said which process it was: if one
            # was forked, the closed channel tells it to exit.
            if job.chan is not None:
                job.chan.drop()
        elif job.end_reason is not None:
            self._journal("JE", f"JE END {name}", pid=pid, reason=job.end_reason, uses=job.uses,
                          pgm=self.pgm)
        elif not job.ready and reason.check(launch.ForkFailed):
            self._short_of_resources(now)
        elif not job.ready and not reason.check(launch.LauncherGone):
            seen = self._boot_failure_seen
            if seen is None or now >= seen + self.limits.backoff(self.boot_failures):
                # Failures within the back-off of the last one counted came
                # with it (jobs started together, one bad moment): they count
                # once, so the back-off is tried before the entry stops.
                self.boot_failures += 1
                self._boot_failure_seen = now
            self.last_boot_failure = now
            self._journal("JB", f"JB BOOT {name}", pid=pid, exit=status, pgm=self.pgm,
                          failures=self.boot_failures)
        else:
            # A job whose launcher died dies with it: say so, or only the log would.
            cause = {"cause": "its launcher (QZMFLNCH) ended"} if reason.check(
                launch.LauncherGone) else {}
            self._journal("JC", f"JC CRASH {name}", pid=pid, exit=status, uses=job.uses,
                          pgm=self.pgm, **cause)
            self.log.warn("{name} crashed ({status}{cause}); a new job replaces it as needed",
                          name=name, status=status,
                          cause=f"; {cause['cause']}" if cause else "")
        job.ended.callback(None)
        self.evaluate()

    # -- rules ---------------------------------------------------------

    def _view(self) -> EntryView:
        return EntryView(
            active=self.active,
            jobs=tuple(j.view() for j in self.jobs.values()),
            waiting=tuple(r.queued_at or 0.0 for r in self.waiting),
            boot_failures=self.boot_failures,
            last_boot_failure=self.last_boot_failure,
            last_trim=self.last_trim,
        )

    def evaluate(self) -> None:
        """Apply the rules once this reactor turn is over.

        Events come in bursts (a batch of accepts, a run of FREE lines), and
        the rules only need the state after the burst: deciding once per turn
        keeps the controller's cost per session flat as the pool grows.
        """
        self._update_accepting()
        if not self._evaluation_due:
            self._evaluation_due = True
            self.reactor.callLater(0, self._evaluate_now)

    def _evaluate_now(self) -> None:
        self._evaluation_due = False
        if self._evaluating:
            return
        self._evaluating = True
        try:
            self._evaluate()
        finally:
            self._evaluating = False
        self._observe()
        self._update_accepting()

    def _evaluate(self) -> None:
        now = self.reactor.seconds()
        view = self._view()
        actions = decide(view, self.entry, self.limits, now)
        if actions.trimmed:
            self.last_trim = now
        why = "wait" if self.entry.wait == "*NO" else "waitlimit"
        for _ in range(actions.reject):
            self._reject(self.waiting.popleft(), why)
        if actions.fail:
            self.active = False
            self.status = "FAILED"
            self._journal(
                "JF", f"JF FAIL {self.pgm}", pgm=self.pgm, failures=self.boot_failures,
                text=f"{self.pgm} stopped: {self.boot_failures} jobs in a row died before "
                "they were ready; see the log, then STRPJ",
            )
            self.log.error("prestart entry {pgm} stopped after {n} boot failures",
                           pgm=self.pgm, n=self.boot_failures)
            # As IBM i ends an entry's jobs when it stops it: the jobs that
            # did start would sit idle, refused work, and keep STRPJ refused.
            # Busy ones finish their session first.
            jobs = list(self.jobs.values())
            for job in jobs:
                self._end_job(job, "failed")
            self._release_launcher_after([job.ended for job in jobs])
            return
        for job_id, why in zip(actions.end, actions.end_reasons, strict=True):
            job = self.jobs.get(job_id)
            if job is not None:
                self._end_job(job, why)
        wake_at = actions.wake_at
        start = self._confirmed_growth(view, actions.start, now)
        for _ in range(start):
            if not self._start_job():
                # One failure per decision: the next start waits for the back-off.
                retry = self.last_boot_failure + self.limits.backoff(self.boot_failures)
                wake_at = retry if wake_at is None else min(wake_at, retry)
                break
        self._schedule(wake_at, now)

    def _confirmed_growth(self, view: EntryView, start: int, now: float) -> int:
        """How many jobs to start now, growth past INLJOBS checked first.

        Under load the controller reads the channels a batch behind its jobs:
        a job it counts busy may have said FREE already, and growing on that
        count took the pool of 16 clients to MAXJOBS (64).  So growth past
        INLJOBS with no request waiting is decided again at the next turn,
        when every FREE said before the first decision has been read: the
        rule then applies to the jobs as they were at that moment.
        """
        check, self._growth_check = self._growth_check, None
        if not self.active:
            return 0
        if start and (self.waiting or self.entry.inljobs > sum(
                1 for j in self.jobs.values() if j.state is not JobState.ENDING)):
            return start  # requests wait, or jobs are replaced: nothing to check
        grow = 0
        if check is not None:
            then = check.view
            if check.stale:
                then = attrs.evolve(then, jobs=tuple(
                    attrs.evolve(j, state=JobState.IDLE) if j.id in check.stale else j
                    for j in then.jobs))
            grow = decide(then, self.entry, self.limits, check.now).start
        if grow:
            jobs = [j for j in self.jobs.values() if j.state is not JobState.ENDING]
            room = self.limits.max_starting - sum(
                1 for j in jobs if j.state is JobState.STARTING)
            if self.entry.maxjobs is not None:
                room = min(room, self.entry.maxjobs - len(jobs))
            grow = max(0, min(grow, room))
        elif start:  # short by the count of this moment: checked in its turn
            busy = {j.id: j.uses for j in self.jobs.values() if j.state is JobState.BUSY}
            self._growth_check = GrowthCheck(self.monotonic(), now, view, busy)
            self.reactor.callLater(GROWTH_RECHECK, self.evaluate)
        return grow

    def _end_job(self, job: Job, reason: str) -> None:
        if job.end_reason is None:
            job.end_reason = reason
        if job.state is JobState.STARTING:
            return  # told at its READY
        if job.state is not JobState.BUSY:
            job.state = JobState.ENDING
            self._await_end(job)
        # A busy job finishes its session first: it is never killed by a rule.
        if job.chan is not None:
            job.chan.send_end()

    def _schedule(self, wake_at: float | None, now: float) -> None:
        if wake_at is None or not self.active:
            self._cancel_timer()
            return
        when = max(now, wake_at) + 0.001
        timer = self._timer
        if timer is not None and timer.active():
            # Most evaluations ask for the same moment (the next trim): keep
            # the call rather than cancel it and make another each session.
            if timer.getTime() != when:
                timer.reset(when - now)
            return
        self._timer = self.reactor.callLater(when - now, self.evaluate)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _observe(self) -> None:
        # Jobs on their way out (ended, or dead with their end not yet
        # reported) count no more, as for MAXJOBS: a crash's replacements
        # made the peak look above MAXJOBS.
        live = [j for j in self.jobs.values() if j.state is not JobState.ENDING]
        busy = sum(1 for j in live if j.state is JobState.BUSY)
        self.stats.observe(self.reactor.seconds(), len(live), busy, len(self.waiting))

    def _update_accepting(self) -> None:
        light = EntryView(active=self.active, waiting=(0.0,) * len(self.waiting))
        now_accepting = accepting(light, self.entry, self.limits)
        if now_accepting != self._accepting:
            self._accepting = now_accepting
            for cb in self.accepting_changed:
                cb(now_accepting)

    @property
    def is_accepting(self) -> bool:
        return self._accepting

    # -- shutdown ------------------------------------------------------

    def _terminate_all(self, targets: list[Job]) -> None:
        """TERM, then KILL, the jobs an ENDPJ ended: only those, so the jobs an
        STRPJ starts right after are spared."""
        targets = [j for j in targets if self.jobs.get(j.id) is j]
        for job in targets:
            self._signal(job, "TERM")
        if targets:
            self.reactor.callLater(KILL_AFTER, self._kill, targets)

    def _kill(self, targets: list[Job]) -> None:
        left = [j for j in targets if self.jobs.get(j.id) is j]
        for job in left:
            self._signal(job, "KILL")
        if left:
            self.reactor.callLater(KILL_AFTER, self._unreported, left)

    def _unreported(self, targets: list[Job]) -> None:
        """Killed jobs whose end nobody reported: their launcher no longer answers.

        A job's end comes as its launcher's EXIT line; a launcher that is
        stopped or hung would keep ENDPJ, and the daemon's shutdown, waiting
        for ever.  It is killed: its jobs are then reported ended with it.
        """
        if self.active:
            return  # STRPJ since: the launcher now forks the new jobs too; spare them
        if not any(self.jobs.get(j.id) is j for j in targets):
            return
        if self.launcher.serves_others():
            # A job stuck in the kernel (a hung disk) is not ended by killing
            # its launcher either: the other entry's sessions are not cut for it.
            self.log.error("{name} jobs killed {s:.0f}s ago are not reported ended; "
                           "their launcher serves another entry and is spared",
                           name=self.job_name, s=KILL_AFTER)
            return
        self.log.error("{name} jobs killed {s:.0f}s ago are not reported ended; "
                       "killing their launcher", name=self.job_name, s=KILL_AFTER)
        self.launcher.kill()

    def _signal(self, job: Job, sig: str) -> None:
        if job.end_reason is None:
            job.end_reason = "endpj"
        launch.send_signal(job.process, sig)

    # -- reports -------------------------------------------------------

    def _gave_up(self, request: Request) -> None:
        """The client gave up waiting: no job for it, and no count."""
        assert request.sock is not None
        self.session_ended(request.peer)
        request.sock.close()

    def report(self, reset: bool = False) -> dict[str, Any]:
        # Clients that left while waiting are dropped now, as a job freeing
        # would drop them: DSPACTPJ counts those still waiting.
        gone = [r for r in self.waiting if r.sock is not None and hung_up(r.sock)]
        for request in gone:
            self.waiting.remove(request)
            self._gave_up(request)
        if gone:
            self._observe()
            self._update_accepting()
        now = self.reactor.seconds()
        out: dict[str, Any] = {"pgm": self.pgm, "status": self.status}
        out.update(self.stats.report(now))
        if reset:
            self.stats.reset(now)
        return out

    def listing(self) -> list[dict[str, Any]]:
        status = {
            JobState.STARTING: "START",
            JobState.IDLE: "PSRW",
            JobState.BUSY: "RUN",
            JobState.ENDING: "END",
        }
        rows = []
        if self.launcher.pid is not None:
            # Listed before the jobs it forks; no program, as it serves no request.
            rows.append({"job": launch.ForkServer.NAME, "pgm": "", "pid": self.launcher.pid,
                         "status": "SELW", "uses": None, "peer": ""})
        rows.extend(
            {
                "job": self.job_name,
                "pgm": self.pgm,
                "pid": j.pid,
                # A busy job told to end finishes its session, ending (ENDPJ *CNTRLD).
                "status": "END" if j.end_reason is not None else status[j.state],
                "uses": j.uses,
                "peer": j.peer or "",
            }
            for j in sorted(self.jobs.values(), key=lambda j: j.id)
        )
        return rows

    def _journal(self, code: str, esd: str, **fields: Any) -> None:
        if self.journal is not None:
            self.journal.write(code, esd, **fields)


def _seconds(args: list[str]) -> float | None:
    try:
        return float(args[0])
    except (IndexError, ValueError):
        return None


def hung_up(sock: socket.socket) -> bool:
    """Whether the client of a waiting connection has closed it (or reset it).

    Clients say nothing before the greeting; data waiting is an early
    talker's, and its session goes on.
    """
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _untouched(sock: socket.socket) -> bool:
    """Nothing was ever sent on the TCP connection ``sock``, nor waits to be.

    Linux's TCP_INFO counts the data segments sent (tcpi_data_segs_out,
    since 4.6); SIOCOUTQ the bytes not yet acknowledged.  Unknown (another
    kernel, not TCP) counts as touched.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
        queued = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, queued)  # SIOCOUTQ
    except (OSError, AttributeError):
        return False
    if len(info) < 160:
        return False
    data_segs_out = struct.unpack_from("I", info, _DATA_SEGS_OUT)[0]
    return data_segs_out == 0 and queued[0] == 0


#: Where struct tcp_info holds tcpi_data_segs_out (linux/tcp.h).
_DATA_SEGS_OUT = 156


def _cancel(job: Job) -> None:
    if job.timer is not None and job.timer.active():
        job.timer.cancel()
    job.timer = None


