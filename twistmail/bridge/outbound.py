"""The bridge's outbound side: QTMSOUTQ, the retry queues and the client jobs.

Messages on QTMSOUTQ are split by destination domain; each (message,
domain) goes to a QTMSCCLCP client job from the bridge's own prestart pool
in a task.  At most ``CONNECTIONS_PER_DOMAIN`` tasks run per domain (the
"connection matrix"); a message whose domain is full waits on QTMSOUTQ (86).
While messages wait for a domain, a task carries up to ``BATCH`` of them
(one destination each), sent one after the other on one connection, so the
cost of handing a task to a job and of its answer is shared; with few
waiting, a task carries one.  When every task of a message has answered,
the bridge settles it:

* delivered recipients are done (the job journaled 88/82);
* permanently failed ones get one nondelivery notice (83, then 87 and the
  notice through QTMSINQ);
* temporarily failed ones make the message wait on QTMSRTQ1 for RTYMIN
  (count, minutes), then on QTMSRTQ2 for RTYDAY or RTYHOUR (8C, 8D); due
  mail goes back to QTMSOUTQ (8E, 8F); when the retries are used up the
  remaining recipients fail (83) and get a notice.  Local recipients whose
  mailbox could not take the message (RETRY, see ``inbound``) wait with
  them, and their message goes back to QTMSINQ instead.

State is per recipient, so a partial success retries only the failed ones.

A destination none of whose servers answers (every one refuses the
connection or never greets, or its DNS fails for now: the client job's
answer says so) is not tried by one waiting message after another, each
waiting out the same timeouts: a backlog of thousands for a host that
never answers took hours to go round once.  Once one task finds it so,
the destination takes no new task until its other tasks have answered;
if none of them reached it either, the messages still waiting for it
alone go to the retry queues at once, as tried (8U, then 8C or 8D), as
Postfix defers the mail of a dead destination.  A message whose retries
that try would use up is not held back: no message is returned without
a real try.  Messages that arrive later are tried as usual, so each
arrival probes whether it is back.  One task whose server greeted, even
with 421 (a server that turns away connections beyond its limit), or
broke off later, clears the doubt: that server is up.
``hlddstq QSMTPQ`` (a flag file) stops dispatching; mail stays queued.

With a mail transfer interval (MAILXFRINT, the seed's dial-up scheduler,
kept by ``schedule.TransferSchedule``) mail on QTMSOUTQ waits for the next
scheduled transfer (8W; its envelope's next try says when, for ``wrkq``);
at each transfer (8X) everything waiting goes, and with ETRNCLT a client
job asks the mail router to send what it holds for each local domain
(8Y).  ``rlsdstq QSMTPQ`` makes a transfer happen at once (a request
file), and an ETRN from a *ETRNSVR host sends that node's mail at once.

QTMSOUTQ is scanned every second, and within ``KICK_DELAY`` of a change
inotify reports: a message renamed into it, the queue released (the hold
flag removed), a transfer or an ETRN flush asked for.  A lost event only
delays a message to the next scan, or to the next read of a queue the
scans leave alone (see below).  While ``REFILL_AT`` or more messages
already wait for a connection, a new message asks for no scan of its own:
the scan comes when the waiting ones run low, or at the next second.

The retry queues are read only when something on them can be due: each
read notes the earliest next try it leaves there, and the bridge lowers
that mark as it moves a message in, since it alone puts mail there.  With
thousands of messages waiting out a destination that is down, reading
them every second took a quarter of a CPU.  An ETRN flush, a change of
settings and, every ``REREAD`` seconds, a plain reread (a file put
there by hand, a clock set back) read them too.  In the same way, while
``hlddstq`` holds the queue, QTMSOUTQ is read again only when inotify
reports an arrival, or after ``REREAD`` seconds; and while ``REFILL_AT``
or more messages wait for their connections, only when something changed
there (an arrival, a due retry moved there, a task no job ran, a message
freed while a scan ran, new settings) or after ``REREAD`` seconds.

The bridge alone moves messages between these queues, one message at a
time, in worker threads.  Settings honoured: ``[smtp] rtymin rtyday
rtyhour mailxfrint etrnclt mailrouter`` and ``[system] local_domains``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import task, threads
from twisted.logger import Logger
from twisted.python import failure

from twistmail.bridge import deletes
from twistmail.bridge.nondelivery import EXHAUSTED, Failure, queue_notice
from twistmail.bridge.schedule import TransferSchedule
from twistmail.interfaces import CORRUPT, QTMSBSSQ, QTMSINQ, QTMSOUTQ, QTMSRTQ1, QTMSRTQ2
from twistmail.journal import time_text
from twistmail.queue import DELIVERED, EARLY, FAILED, PENDING, RETRY, Envelope

SCAN_EVERY = 1.0  # seconds
KICK_DELAY = 0.05  # seconds from a change inotify reports to the scan it asks for
#: Messages waiting for a connection below which a new arrival is scanned for
#: at once; above it, arrivals wait for the refill (each scan reads the queue).
REFILL_AT = 64
CONNECTIONS_PER_DOMAIN = 4
#: Most messages one task carries.  A client job killed in the middle of a
#: task leaves all of them to be tried again, so the ones it had already
#: delivered are sent twice: the batch stays small.
BATCH = 8
#: When writing a task's outcome for a message fails (a full or read-only
#: disk), the outcome is kept and written again after this delay, doubling
#: up to RECORD_RETRY_MAX; meanwhile the message is not sent again.
RECORD_RETRY = 5.0  # seconds
RECORD_RETRY_MAX = 300.0
#: Seconds after which a queue the scans leave alone is read all the same:
#: the retry queues, QTMSOUTQ while held (see the module docstring).
REREAD = 60.0
#: HLDDSTQ's flag file for each priority part of QSMTPQ.  SMTP mail carries no
#: SNADS priority, so a hold of either part holds it all: the seed holds both,
#: and releasing one must not send what the other still holds.
HOLD_FLAGS = {"*NORMAL": "QSMTPQ.held", "*HIGH": "QSMTPQ.held-high"}
TRANSFER_REQUEST = "QSMTPQ.transfer"
RETRY_REQUEST = "QSMTPQ.retry"  # wrkq --retry: what waits on the retry queues goes now
TRANSFER_STATE = "QSMTPQ.lastxfr"  # when the last MAILXFRINT transfer was
_SIGNAL_FILES = (*HOLD_FLAGS.values(), TRANSFER_REQUEST, RETRY_REQUEST)


def hold_flag(queue_root: Path, pty: str = "*NORMAL") -> Path:
    return queue_root / HOLD_FLAGS[pty]


def held_parts(queue_root: Path) -> list[str]:
    """The priorities of QSMTPQ that HLDDSTQ holds."""
    return [pty for pty in HOLD_FLAGS if hold_flag(queue_root, pty).exists()]


def request_transfer(queue_root: Path) -> None:
    """RLSDSTQ: ask the bridge for a mail transfer now, not at the next scheduled one."""
    (queue_root / TRANSFER_REQUEST).touch()


def _transfer_requested(queue_root: Path) -> bool:
    return _taken(queue_root / TRANSFER_REQUEST)


def request_retry(queue_root: Path) -> None:
    """``wrkq --retry``: ask the bridge to try the remote recipients waiting on the
    retry queues now, as an ETRN for every destination would (the try does not count)."""
    (queue_root / RETRY_REQUEST).touch()


def _taken(request: Path) -> bool:
    try:
        request.unlink()
    except FileNotFoundError:
        return False
    return True


@attrs.frozen
class _Found:
    """What one scan of QTMSOUTQ found: work to dispatch, messages to settle."""

    work: list[tuple[Envelope, dict[str, list[str]]]] = attrs.Factory(list)
    settle: list[str] = attrs.Factory(list)
    transfer: bool = False  # a mail transfer (MAILXFRINT) happened in this scan
    held: bool = False  # HLDDSTQ held the queue: nothing was looked at
    unchanged: bool = False  # nothing changed since the last scan: the backlog stands
    delete: tuple[str, ...] = ()  # messages on QTMSOUTQ wrkq --delete asked for
    deleted: tuple[str, ...] = ()  # messages the scan deleted from the retry queues


def request_flush(queue_root: Path, node: str) -> None:
    """ETRN: ask the bridge to make the mail for ``node`` due now (a request file).

    ``@domain`` (RFC 1985 section 3) is the domain and every subdomain of it;
    a plain name is that node alone.
    """
    d = queue_root / "etrn"
    d.mkdir(mode=0o700, exist_ok=True)  # as private as the queues beside it
    at = "@" if node.startswith("@") else ""
    (d / (at + node.lstrip("@").lower().strip(".").replace("/", "_"))).touch()


def _flush_requests(queue_root: Path) -> set[str]:
    d = queue_root / "etrn"
    nodes = set()
    try:
        for f in d.iterdir():
            nodes.add(f.name)
            f.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    return nodes


class OutboundManager:
    log = Logger()

    def __init__(self, reactor: Any, settings: Any, queue: Any, directory: Any,
                 journal: Any, pool: Any) -> None:
        self.reactor = reactor
        self.settings = settings
        self.queue = queue
        self.directory = directory
        self.journal = journal
        self.pool = pool
        pool.task_done = self._result
        pool.task_refused = self._refused
        pool.task_lost = self._lost
        pool.task_part = self._part
        self.tasks: dict[int, tuple[str, list[str]]] = {}  # token -> (domain, queue ids)
        #: Outcomes (JSON, read only if the task is lost) of messages of a running
        #: task, told before its RESULT (PART).
        self.parts: dict[int, dict[str, bytes]] = {}
        self.open: dict[str, set[str]] = {}  # queue id -> domains still running
        #: The envelope a one-destination message was started with: its result
        #: is written from it, without reading the file again.
        self.started: dict[str, Envelope] = {}
        self.per_domain: collections.Counter[str] = collections.Counter()
        self.full_noted: dict[str, set[str]] = {}  # queue id -> domains journaled full (86)
        self.recording: collections.Counter[str] = collections.Counter()  # outcomes being written
        self.busy: set[str] = set()  # messages being settled or scanned
        #: Outcomes whose writing failed, by message: the call that writes them again.
        self.record_retries: dict[str, Any] = {}
        #: Messages of a task whose client job ended in the middle: each goes
        #: alone next time, so a message that kills jobs takes no other with it.
        self.alone: set[str] = set()
        #: Messages for several destinations one of whose tasks no job ran:
        #: once the others answer, they wait on QTMSOUTQ for the next scan,
        #: not in a retry queue with an attempt counted.
        self.untried: set[str] = set()
        self.loop: task.LoopingCall | None = None
        self.scanning = False
        # Envelope updates of one message, one at a time; messages in parallel.
        self._locks = [threading.Lock() for _ in range(64)]
        self.refused_early: set[int] = set()  # tokens refused before submit_task returned
        #: Destinations the last answered task could not reach, with why, while
        #: their other tasks still run: they take no new task meanwhile.
        self.failing: dict[str, str] = {}
        self.etrn_tasks: set[int] = set()  # tokens of ETRN tasks (ETRNCLT) not answered yet
        self.schedule = TransferSchedule(reactor, settings.smtp.mailxfrint, self._scheduled,
                                         state=queue.root / TRANSFER_STATE)
        self.transfer_due = False  # a scheduled transfer waits for the next scan
        self.released: set[str] = set()  # messages a transfer let go, not yet dispatched
        #: Messages the last scan found ready, oldest first, waiting for connections,
        #: and the same by destination, so a freed connection finds its next message
        #: without walking the whole backlog.
        self.backlog: dict[str, tuple[Envelope, dict[str, list[str]]]] = {}
        self.by_domain: dict[str, collections.deque[str]] = {}
        #: Messages started or settled since the running scan began: its view of
        #: them is out of date.
        self.touched: set[str] = set()
        #: Envelopes the scans have read, by queue and id, with the version they had.
        self._seen: dict[str, dict[str, tuple[tuple[int, ...], Envelope]]] = {}
        #: For each retry queue: the earliest next try its last read left there,
        #: the earliest one moved in since that read began (0: read it at the
        #: next scan), and when that read was (``time.monotonic``).
        self._retry_wake = {QTMSRTQ1: 0.0, QTMSRTQ2: 0.0}
        self._retry_floor = {QTMSRTQ1: 0.0, QTMSRTQ2: 0.0}
        self._retry_read_at = {QTMSRTQ1: -math.inf, QTMSRTQ2: -math.inf}
        self._retry_lock = threading.Lock()
        self._kick: Any = None  # the scan a change asked for, pending
        self.refill = False  # messages arrived while enough waited: scan when few are left
        self._arrival = 0  # inotify's mask for a message renamed into QTMSOUTQ
        self.scan_again = False  # a change arrived while a scan ran
        self.notifier: Any = None
        #: Something changed on QTMSOUTQ since the last read of it began (a
        #: message arrived, a task was not run), and when that read was
        #: (``time.monotonic``): see ``_due``.
        self._outq_changed = True
        self._outq_read_at = -math.inf
        self.smtp_ended = False  # ENDTCPSVR *SMTP: nothing leaves, the client jobs end
        self._claims_resumed = False  # deletions a killed bridge left: finished at the first scan

    def start(self) -> None:
        self._drop_stale_request()
        self.schedule.start()
        self._watch()
        self.loop = task.LoopingCall(self.scan)
        self.loop.clock = self.reactor
        self.loop.start(SCAN_EVERY, now=True)

    def stop(self) -> None:
        self.schedule.stop()
        for call in self.record_retries.values():
            if call.active():
                call.cancel()  # the message is still on QTMSOUTQ: sent again after the start
        self.record_retries.clear()
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        if self._kick is not None and self._kick.active():
            self._kick.cancel()
        if self.notifier is not None:
            self.notifier.loseConnection()
            self.notifier = None

    def _watch(self) -> None:
        try:
            from twisted.internet import inotify
        except ImportError:  # not Linux: the scans every second alone find the work
            return
        from twisted.python.filepath import FilePath

        notifier = inotify.INotify(self.reactor)
        notifier.startReading()
        root = self.queue.root
        self._arrival = inotify.IN_MOVED_TO
        notifier.watch(FilePath(str(self.queue.queue_dir(QTMSOUTQ))), mask=inotify.IN_MOVED_TO,
                       callbacks=[self._changed])
        notifier.watch(FilePath(str(root)), callbacks=[self._changed],
                       mask=inotify.IN_DELETE | inotify.IN_CREATE | inotify.IN_ATTRIB)
        (root / "etrn").mkdir(mode=0o700, exist_ok=True)
        notifier.watch(FilePath(str(root / "etrn")), mask=inotify.IN_CREATE | inotify.IN_ATTRIB,
                       callbacks=[self._changed])
        (root / deletes.DIRECTORY).mkdir(mode=0o700, exist_ok=True)
        notifier.watch(FilePath(str(root / deletes.DIRECTORY)), mask=inotify.IN_CREATE,
                       callbacks=[self._changed])
        self.notifier = notifier

    def _changed(self, _watch: Any, path: Any, mask: int) -> None:
        name = path.basename()
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if path.dirname() == str(self.queue.root) and name not in _SIGNAL_FILES:
            return  # a queue directory or a state file: not ours to act on
        if mask & self._arrival:
            self._outq_changed = True
        if mask & self._arrival and len(self.backlog) >= REFILL_AT:
            # A scan reads every envelope in the queue: one per arriving
            # message kept the bridge scanning without a pause under load,
            # while the connections had work waiting anyway.
            self.refill = True
            return
        self.kick()

    def kick(self) -> None:
        """Something on the outbound side changed: scan within KICK_DELAY."""
        if self._kick is None or not self._kick.active():
            self._kick = self.reactor.callLater(KICK_DELAY, self._kicked)

    def _kicked(self) -> None:
        if self.scanning:
            self.scan_again = True
        else:
            self.scan()

    def configure(self, settings: Any) -> None:
        """New settings (SIGHUP after CHGSMTPA): the interval applies at once."""
        self.settings = settings
        self.schedule.configure(settings.smtp.mailxfrint)
        self._drop_stale_request()
        self._lower_retry_wake(QTMSRTQ1, 0.0)  # RTYMIN, RTYDAY, RTYHOUR may have changed
        self._lower_retry_wake(QTMSRTQ2, 0.0)
        self._outq_changed = True  # MAILXFRINT may have let go what waited for a transfer

    def _drop_stale_request(self) -> None:
        if not self.schedule.active:  # everything goes at once: nothing left to ask for
            (self.queue.root / TRANSFER_REQUEST).unlink(missing_ok=True)

    @property
    def held(self) -> bool:
        return self.smtp_ended or bool(held_parts(self.queue.root))

    def smtp_server(self, started: bool) -> None:
        """STRTCPSVR/ENDTCPSVR *SMTP: the client jobs start or end with the server.

        Mail waits queued meanwhile, as under HLDDSTQ.  Deliveries under way
        end as ENDPJ *CNTRLD ends them: each finishes, within the end delay.
        """
        self.smtp_ended = not started
        if started and not self.pool.active:
            self.pool.start()
            self.kick()
        elif not started and self.pool.active:
            self.pool.end("*CNTRLD", float(self.settings.prestart.end_delay),
                          reason="endtcpsvr")

    # -- scanning --------------------------------------------------------------

    def _scheduled(self) -> None:
        """The mail transfer interval is up: the next scan sends what waits."""
        self.transfer_due = True
        self.scan()

    def scan(self) -> Any:
        if self.scanning:
            return None
        self.scanning = True
        self.touched = set()
        # A transfer that falls due while HLDDSTQ holds the queue waits for
        # the release: holding delays the batch, it does not drop it.
        transfer = self.transfer_due and not self.held
        if transfer:
            self.transfer_due = False
        next_at = self.schedule.next_at if self.schedule.active else None
        if next_at is None:
            self.released.clear()
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._due,
                                      transfer, next_at, frozenset(self.released))
        d.addCallback(self._dispatch, transfer)
        d.addErrback(lambda f: self.log.failure("outbound scan failed", f))

        def done(_: Any) -> None:
            self.scanning = False
            if self.scan_again:
                self.scan_again = False
                self.kick()

        return d.addBoth(done)

    def _due(self, transfer: bool, next_at: float | None,
             released: frozenset[str]) -> _Found:
        """The scan's work in its thread: deletions asked for first, then ``_due_work``."""
        outq, deleted = self._deletes()
        found = self._due_work(transfer, next_at, released)
        if outq or deleted:
            found = attrs.evolve(found, delete=tuple(outq), deleted=tuple(deleted))
        return found

    def _deletes(self) -> tuple[list[str], list[str]]:
        """Act on ``wrkq --delete`` (see ``deletes``): return the ids on
        QTMSOUTQ, and those deleted from the retry queues.

        A message on a retry queue goes now: only a scan moves it from there,
        and this one has not begun to.  One on QTMSOUTQ is left to
        ``_dispatch``, in the reactor's thread, which knows whether it is
        being sent.  One on its way through QTMSINQ (a retry due for its
        local recipients) is asked for again at the next scan, and so is
        one parked on QTMSBSSQ, which the queue manager deletes.  One that
        went where the administrator acts on it alone (set aside, quarantined)
        is not deleted: it is answered as gone.  The first scan finishes the
        deletions a killed bridge left half done, before anything moves.
        """
        outq: list[str] = []
        deleted: list[str] = []
        root = self.queue.root
        if not self._claims_resumed:
            self._claims_resumed = True
            for qid, where in deletes.claims(root):
                if where in deletes.OUTBOUND:
                    with self._lock(qid):
                        deletes.resume(self.queue, self.journal, qid, where, "8Z")
                    deleted.append(qid)
        for qid in deletes.asked(root):
            try:
                with self._lock(qid):
                    where = self.queue.find(qid)
                    if where == QTMSOUTQ:
                        outq.append(qid)
                    elif self._delete(qid, where):
                        deleted.append(qid)
            except Exception:  # asked for again at the next scan; the others go on
                self.log.failure("deleting message {qid} failed", qid=qid)
        return outq, deleted

    def _delete_unless_sending(self, qid: str) -> None:
        """Delete a message on QTMSOUTQ that no task holds; one that a task
        holds, or whose outcome is being written, is asked for again at the
        next scan, after its attempt: what that delivered stays delivered."""
        if qid in self.open or qid in self.busy or self.recording[qid] or \
                qid in self.record_retries:
            return
        self.busy.add(qid)  # no task, settling or scan takes it meanwhile
        self.touched.add(qid)
        self.backlog.pop(qid, None)

        def over(_: Any) -> None:
            self.busy.discard(qid)
            self._forget_deleted(qid)

        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      self._delete_locked, qid)
        d.addErrback(lambda f: self.log.failure("deleting message {qid} failed", f, qid=qid))
        d.addBoth(over)

    def _forget_deleted(self, qid: str) -> None:
        """What the bridge kept about a message: nothing of it is left to send."""
        self.released.discard(qid)
        self.alone.discard(qid)
        self.untried.discard(qid)
        self.full_noted.pop(qid, None)
        self.started.pop(qid, None)

    def _delete_locked(self, qid: str) -> None:
        with self._lock(qid):
            self._delete(qid, self.queue.find(qid))

    def _delete(self, qid: str, where: str | None) -> bool:
        """Delete ``qid`` (its lock held), or say it left the queues it can be
        deleted from; True when it was deleted here."""
        if where is None:
            where = self.queue.find(qid)  # or it was moving back meanwhile (QTMSBSSQ)
        if where in deletes.OUTBOUND:
            deletes.delete(self.queue, self.journal, qid, where, "8Z")
            return True
        if where not in (QTMSINQ, QTMSBSSQ):  # delivered, returned or set aside meanwhile
            deletes.answer_gone(self.queue.root, qid)
        return False

    def _due_work(self, transfer: bool, next_at: float | None,
                  released: frozenset[str]) -> _Found:
        """Return due retries to QTMSOUTQ; the work waiting there, by domain.

        Also the messages on QTMSOUTQ with nothing left to send (a crash
        between the last result and settling), to be settled now.  With a
        schedule (``next_at``), only a transfer (``transfer``, or one asked
        for with RLSDSTQ), an earlier transfer (``released``) or an ETRN for
        its node lets a message go; the others wait for ``next_at``.
        """
        now = time.time()
        flush = _flush_requests(self.queue.root)
        # wrkq --retry: an ETRN for every destination, from the administrator.
        retry_all = _taken(self.queue.root / RETRY_REQUEST)
        early: set[str] = set()  # what it sent early, let past a MAILXFRINT schedule
        seen: dict[str, dict[str, tuple[tuple[int, ...], Envelope]]] = {}
        for source, code in ((QTMSRTQ1, "8E"), (QTMSRTQ2, "8F")):
            if not flush and not retry_all and not self._retry_read_due(source, now):
                seen[source] = self._seen.get(source, {})
                continue
            with self._retry_lock:  # what moves in from now on lowers the floor again
                self._retry_floor[source] = math.inf
            self._retry_read_at[source] = time.monotonic()
            try:
                # Read after the reset: new settings (``configure``) lower the floor again.
                longest = self._longest_waits()[source]
                self._retry_wake[source] = self._move_due(source, code, now, longest, flush,
                                                          seen, early if retry_all else None)
            except BaseException:
                self._lower_retry_wake(source, 0.0)  # read again at the next scan
                if retry_all:
                    request_retry(self.queue.root)  # asked for again: nothing was lost
                raise
        if self.held:
            # Nothing goes, but the envelopes are read now, while there is
            # time: the release then dispatches at once, not after reading
            # the whole backlog (a file unchanged since is not read again).
            # Mail with nothing to send (a local recipient deferred) still
            # goes on to the retry queues: the hold is of the sending.
            # Each arrival is read once: a held backlog of thousands, read
            # every second, took a quarter of a CPU.
            if self._outq_unchanged():
                seen[QTMSOUTQ] = self._seen.get(QTMSOUTQ, {})
                self._seen = seen
                return _Found(settle=[], held=True)
            self._outq_changed = False  # what arrives from now on is read next time
            self._outq_read_at = time.monotonic()
            with self._outq_read():
                settle = [qid for qid, version in self.queue.versions(QTMSOUTQ)
                          if self._nothing_to_send(qid, version, seen)]
            self._seen = seen
            return _Found(settle=settle, held=True)
        # A transfer asked for while there is no schedule stays asked for: the
        # bridge may not have read the interval the asker saw yet.
        transfer = next_at is not None and (_transfer_requested(self.queue.root) or transfer)
        if next_at is None and not flush and self._outq_unchanged() and \
                len(self.backlog) >= REFILL_AT:
            # A backlog waiting for its connections (a slow destination, a
            # large mailing) stands as the last read left it: reading it
            # again every second took half a CPU for a backlog of 20000.
            seen[QTMSOUTQ] = self._seen.get(QTMSOUTQ, {})
            self._seen = seen
            return _Found(unchanged=True)
        self._outq_changed = False  # what changes from now on is read next time
        self._outq_read_at = time.monotonic()
        with self._outq_read():
            found = self._read_outq(transfer, next_at, released | early, flush, seen)
        self._seen = seen
        return found

    def _read_outq(self, transfer: bool, next_at: float | None, released: frozenset[str],
                   flush: set[str], seen: dict[str, dict[str, tuple[tuple[int, ...], Envelope]]],
                   ) -> _Found:
        work, settle = [], []
        for qid, version in self.queue.versions(QTMSOUTQ):
            if qid in self.open or qid in self.busy:
                continue
            env = self._load(QTMSOUTQ, qid, version, seen)
            if env is None:
                continue
            groups: dict[str, list[str]] = {}
            for r in env.recipients:
                if r.state == PENDING:
                    domain = r.address.rpartition("@")[2].lower().rstrip(".")
                    groups.setdefault(domain, []).append(r.address)
            if not groups:
                settle.append(qid)
            elif next_at is None or transfer or qid in released or (flush and any(
                    _in_node(a, flush) for rcpts in groups.values() for a in rcpts)):
                if len(groups) > 1:
                    # Its tasks run side by side and each result rewrites the
                    # envelope, which unpacks a packed message: unpack it now,
                    # so every task reads the body where it stays, in data/.
                    with self._lock(qid):
                        self.queue.unpack(QTMSOUTQ, qid)
                work.append((env, groups))
            else:
                self._wait_for_transfer(env, next_at)
        if transfer:
            self.journal.write("8X", f"8X XFR {len(work)}", messages=len(work))
        return _Found(work, settle, transfer)

    def _nothing_to_send(self, qid: str, version: tuple[int, ...],
                         seen: dict[str, dict[str, tuple[tuple[int, ...], Envelope]]]) -> bool:
        env = self._load(QTMSOUTQ, qid, version, seen)
        return env is not None and qid not in self.open and qid not in self.busy and \
            not any(r.state == PENDING for r in env.recipients)

    @contextlib.contextmanager
    def _outq_read(self) -> Iterator[None]:
        """A read of QTMSOUTQ that fails leaves it to be read again at the next scan."""
        try:
            yield
        except BaseException:
            self._outq_changed = True
            raise

    def _move_due(self, source: str, code: str, now: float, longest: float,
                  flush: set[str], seen: dict[str, dict[str, tuple[tuple[int, ...], Envelope]]],
                  early: set[str] | None = None) -> float:
        """Move what is due on a retry queue on; return the earliest next try left there.

        ``early`` (``wrkq --retry``): every message with a remote recipient goes
        now, as for an ETRN that names its destination; its id is added there.
        """
        wake = math.inf
        for qid, version in self.queue.versions(source):
            env = self._load(source, qid, version, seen)
            if env is None:
                continue
            # A wait longer than its queue ever gives (the clock was set
            # back, or RTYMIN lowered) ends now, not after the difference.
            due = env.next_try is None or env.next_try <= now or env.next_try - now > longest
            asked = early is not None and any(r.state == PENDING for r in env.recipients)
            if not due and not asked and not (flush and any(
                    r.state == PENDING and _in_node(r.address, flush) for r in env.recipients)):
                wake = min(wake, env.next_try)
                continue
            if asked and early is not None:
                early.add(qid)
            # A deferred local recipient is the bridge's to deliver:
            # through QTMSINQ, which forwards the remote ones again.
            # An ETRN sends the remote ones now, from QTMSOUTQ, where
            # it lets them go past a MAILXFRINT schedule.
            local_waits = any(r.state == RETRY for r in env.recipients)
            to = QTMSINQ if due and local_waits else QTMSOUTQ
            # Sent early for an ETRN: the try does not count, and the
            # message keeps its place in the retries (its local recipients
            # are not even tried).  Otherwise each ETRN used a retry up,
            # and a few returned the mail in seconds, before the time a
            # delay notice had promised.
            self.queue.move(qid, source, to, None if due else env.note({EARLY: True}))
            if to == QTMSOUTQ:
                self._outq_changed = True  # read now, not when inotify tells
            self.journal.write(code, f"{code} {'TIQ' if to == QTMSINQ else 'TOQ'} {to}",
                               qid, queue=source, to=to)
        return wake

    def _outq_unchanged(self) -> bool:
        """Whether QTMSOUTQ is as its last read found it, as far as inotify tells."""
        return self.notifier is not None and not self._outq_changed and \
            time.monotonic() - self._outq_read_at < REREAD

    def _retry_read_due(self, queue: str, now: float) -> bool:
        """Whether a scan must read ``queue`` (a retry queue): something there may be due."""
        with self._retry_lock:
            wake = min(self._retry_wake[queue], self._retry_floor[queue])
        return now >= wake or time.monotonic() - self._retry_read_at[queue] >= REREAD

    def _lower_retry_wake(self, queue: str, next_try: float) -> None:
        """A message moved into ``queue`` to be tried at ``next_try`` (after the move)."""
        with self._retry_lock:
            self._retry_floor[queue] = min(self._retry_floor[queue], next_try)

    def _load(self, queue: str, qid: str, version: tuple[int, ...],
              seen: dict[str, dict[str, tuple[tuple[int, ...], Envelope]]]) -> Envelope | None:
        """The envelope, read again only if its file changed since the last scan.

        Scans run every second; a queue of thousands of waiting messages
        must not be parsed every second.  ``version`` comes from the scan's
        listing of the queue (``IQueue.versions``).  A message that cannot
        be read (its envelope damaged, its body gone) goes to corrupt/ (7Y):
        recovery leaves these queues to their reader.
        """
        known = self._seen.get(queue, {}).get(qid)
        if known is not None and known[0] == version:
            env = known[1]
        else:
            try:
                env = self.queue.load(queue, qid)
            except KeyError:
                return None
            except ValueError as e:
                self._set_aside(queue, qid, f"unreadable envelope: {e}")
                return None
            damage = self.queue.body_damage(queue, env)
            if damage is not None:
                self._set_aside(queue, qid, damage)
                return None
        seen.setdefault(queue, {})[qid] = (version, env)
        return env

    def _set_aside(self, queue: str, qid: str, reason: str) -> None:
        if self.queue.set_aside(queue, qid, reason) is not None:
            self.journal.write("7Y", f"7Y CRP {qid}", qid, queue=CORRUPT, reason=reason)

    def _wait_for_transfer(self, env: Envelope, next_at: float) -> None:
        """MAILXFRINT: the message waits on QTMSOUTQ; its next try is the transfer."""
        if env.next_try == next_at:
            return
        with self._lock(env.id):
            try:
                env = self.queue.load(QTMSOUTQ, env.id)
            except (KeyError, ValueError):
                return
            self.queue.update(QTMSOUTQ, env.evolve(next_try=next_at))
        self.journal.write("8W", f"8W WAIT {QTMSOUTQ}", env.id, queue=QTMSOUTQ,
                           next_try=time_text(next_at),
                           mailxfrint=self.settings.smtp.mailxfrint)

    def _dispatch(self, found: _Found, asked: bool = False) -> None:
        work, settle = found.work, found.settle
        for qid in found.deleted:
            self._forget_deleted(qid)
        for qid in found.delete:
            self._delete_unless_sending(qid)
        if asked and found.held:
            self.transfer_due = True  # held since the scan began: the transfer waits
        if found.transfer:
            self._issue_etrn()
            # What this transfer lets go stays let go until it is started,
            # even if the queue is held before it can be.
            self.released.update(env.id for env, _ in work)
        if found.unchanged:
            self._start_ready(list(self.by_domain))
            return
        stale = self.touched
        for qid in settle:
            if qid not in self.open and qid not in self.busy and qid not in stale:
                self._settle(qid)
        # The scan's list replaces the backlog: what left QTMSOUTQ meanwhile
        # (deleted, held) is gone from it, and what was started or settled
        # while it ran is not taken from its out-of-date view.
        self.backlog = {env.id: (env, groups) for env, groups in work if env.id not in stale}
        if any(env.id in stale for env, _ in work):
            # Freed again meanwhile (a task refused at once), or settled: the
            # next scan reads the queue, and does not take the backlog as it stands.
            self._outq_changed = True
        if not found.held:  # forget what has left QTMSOUTQ (deleted, settled)
            self.released &= self.backlog.keys() | self.open.keys() | self.busy | stale
        self.by_domain = {}
        for qid, (_, groups) in self.backlog.items():
            for domain in groups:
                self.by_domain.setdefault(domain, collections.deque()).append(qid)
        self._start_ready(self.by_domain, note_waiting=True)

    def _start_ready(self, domains: Any, note_waiting: bool = False) -> None:
        """Start the backlog messages of ``domains`` that have free connections, oldest first.

        Runs after each scan for every destination, and whenever a task ends
        for its destination, so a connection is used again at once instead of
        at the next scan.  A message starts only when all its destinations
        have a free connection.  ``note_waiting`` (after a scan) journals the
        messages left waiting; the per-task calls do not walk them again.
        """
        if self.held:
            return
        # After a scan of a large backlog every message left waiting writes
        # an 86: one journal write for all of them.
        with self.journal.batch():
            self._start_domains(domains, note_waiting)
        if self.refill and len(self.backlog) < REFILL_AT:
            self.refill = False
            self.kick()

    def _start_domains(self, domains: Any, note_waiting: bool) -> None:
        # A task the pool refuses at once (WAIT *NO, or its queue of waiting
        # requests full) frees its connection again: without a stop, one call
        # turned a whole backlog into refused tasks, and left all of it to
        # the next scan.
        taken = True
        for domain in list(domains):
            waiting = self.by_domain.get(domain)
            skipped: list[str] = []
            while taken and waiting and self._free(domain):
                pending = self._next_waiting(waiting)
                if pending is None:
                    continue
                env, groups = pending
                if len(groups) == 1:
                    taken = self._start_batch(domain, env, waiting)
                    continue
                full = [d for d in groups if not self._free(d)]
                if full:
                    self._note_full(env.id, full)
                    skipped.append(env.id)  # it waits for its other destination
                    continue
                taken = self._start(env, groups)
            if waiting and note_waiting:
                for qid in waiting:
                    if qid in self.backlog:
                        self._note_full(qid, [domain])
            if skipped and waiting is not None:
                waiting.extendleft(reversed(skipped))
            if not waiting:
                self.by_domain.pop(domain, None)

    def _free(self, domain: str) -> int:
        """Connections ``domain`` has free; none while its last answer says it is unreachable."""
        if domain in self.failing:
            return 0
        return max(0, CONNECTIONS_PER_DOMAIN - self.per_domain[domain])

    def _next_waiting(self, waiting: collections.deque[str]) -> Any:
        """The next backlog entry of a destination's queue, or None if it is stale."""
        qid = waiting.popleft()
        pending = self.backlog.get(qid)
        if pending is None:
            return None  # started by another destination, or gone
        if qid in self.open or qid in self.busy:
            del self.backlog[qid]
            return None
        return pending

    def _start_batch(self, domain: str, env: Envelope, waiting: collections.deque[str]) -> bool:
        """Start ``env`` with the next one-destination messages waiting for ``domain``.

        The waiting messages are spread over the free connections, so a
        short backlog still uses them all: a task carries more than one
        message only when more wait than connections are free.
        """
        free = self._free(domain)
        size = 1 if env.id in self.alone or self._last_try(env) else \
            min(BATCH, -(-(len(waiting) + 1) // free))
        batch = [env]
        while len(batch) < size and waiting:
            pending = self._next_waiting(waiting)
            if pending is None:
                continue
            # A message for several destinations goes alone, when all of them
            # are free; so does one whose last task ended with its job, and
            # one on its last try (tried even after a failure, it would wait
            # out the timeouts of a dead host after the others of its task).
            if len(pending[1]) > 1 or pending[0].id in self.alone or self._last_try(pending[0]):
                waiting.appendleft(pending[0].id)
                break
            batch.append(pending[0])
        for e in batch:
            self._open(e, (domain,))
            self.started[e.id] = e
        return self._submit(domain, [(e, self.backlog.pop(e.id)[1][domain]) for e in batch])

    def _note_full(self, qid: str, domains: list[str]) -> None:
        """Journal 86 once per message and destination while it waits for a connection."""
        noted = self.full_noted.setdefault(qid, set())
        for domain in domains:
            if domain not in noted:
                noted.add(domain)
                reason = "connection matrix full" if domain not in self.failing else \
                    "no server answered the last task; its other tasks decide"
                self.journal.write("86", f"86 TOQ {QTMSOUTQ}", qid, domain=domain,
                                   reason=reason)
        if self.schedule.active:
            self.released.add(qid)  # it goes as soon as a slot is free

    def _start(self, env: Envelope, groups: dict[str, list[str]]) -> bool:
        """A message with several destinations: one task for each, all at once."""
        del self.backlog[env.id]
        self._open(env, groups)
        return all([self._submit(domain, [(env, rcpts)]) for domain, rcpts in groups.items()])

    def _open(self, env: Envelope, domains: Any) -> None:
        qid = env.id
        self.touched.add(qid)
        self.released.discard(qid)
        self.alone.discard(qid)
        self.open[qid] = set(domains)

    def _submit(self, domain: str, messages: list[tuple[Envelope, list[str]]]) -> bool:
        """One task: ``messages`` (with their recipients in ``domain``) on one connection.

        False when the pool refused it at once."""
        self.per_domain[domain] += 1
        # "last": this try would use its retries up, so it is made whatever
        # befalls the message before it on the connection: none is returned untried.
        line = json.dumps({"queue": QTMSOUTQ, "domain": domain, "messages": [
            {"id": env.id, "recipients": rcpts, "send": _sending(env, rcpts),
             "last": self._last_try(env)}
            for env, rcpts in messages]}).encode()
        token = self.pool.submit_task(line, domain)
        self.tasks[token] = (domain, [env.id for env, _ in messages])
        if token in self.refused_early:
            self.refused_early.discard(token)
            self._not_run(token)
            return False
        return True

    def _issue_etrn(self) -> None:
        """ETRNCLT: on each mail transfer, ask the mail router for our domains' mail."""
        s = self.settings.smtp
        if s.etrnclt != "*YES":
            return
        nodes = list(self.settings.system.local_domains)
        router = (s.mailrouter or "").strip()
        if not router or router.upper() == "*NONE":
            self.journal.write("8Y", "8Y ETRN skipped: no MAILROUTER", nodes=nodes,
                               reason="ETRNCLT *YES but no mail router to send ETRN to")
            return
        line = json.dumps({"kind": "etrn", "router": router, "nodes": nodes}).encode()
        token = self.pool.submit_task(line, router)  # the job journals the replies (8Y)
        if token in self.refused_early:
            self.refused_early.discard(token)
            self._etrn_refused(nodes)
        else:
            self.etrn_tasks.add(token)

    def _etrn_refused(self, nodes: list[str]) -> None:
        self.journal.write("8Y", "8Y ETRN not issued: no client job", nodes=nodes,
                           reason="no QTMSCCLCP job took the ETRN task")

    # -- results -----------------------------------------------------------------

    def _refused(self, request: Any) -> None:
        """No client job ran the task (the entry ended, the wait ran out): later.

        A task can be refused while ``submit_task`` is still running, before
        its token is known here; that token is remembered and let go then.
        """
        if request.token in self.tasks:
            self._not_run(request.token)
        elif request.token in self.etrn_tasks:
            self.etrn_tasks.discard(request.token)
            self._etrn_refused(json.loads(request.task)["nodes"])
        else:
            self.refused_early.add(request.token)

    def _not_run(self, token: int) -> None:
        """The task's messages wait on QTMSOUTQ for the next scan, unchanged.

        A mail transfer (MAILXFRINT) let them go: they stay let go, and do
        not wait for the next transfer.
        """
        entry = self._forget(token)
        if entry is not None:
            self._outq_changed = True
            self._judged(entry[0])
            for qid in entry[1]:
                self._not_begun(qid)

    def _not_begun(self, qid: str) -> None:
        """A message a task did not begin waits on QTMSOUTQ, no try counted."""
        self._outq_changed = True  # it is work for the next scan again
        if qid in self.open:
            self.untried.add(qid)  # its other destinations' outcomes do not settle it
        else:
            self.started.pop(qid, None)
            if self.schedule.active:
                self.released.add(qid)

    def _lost(self, request: Any) -> None:
        """The client job ended in the middle of the task (it crashed, it was killed).

        The messages the job said were done (PART) keep their outcomes.  The
        job tells those before it begins the next, so only the one after the
        last told may have been under way: whether the next hop took it is
        unknown, so each of its recipients counts as a temporary failure and
        is tried again later: at least once, never lost.  It goes alone next
        time: should it be what ends the jobs, it takes no other message with
        it again (to be sent twice, and bounced once its retries are used
        up).  Those after it were not begun: they go again, no try counted.
        """
        task = json.loads(request.task)
        if request.token in self.etrn_tasks:
            self.etrn_tasks.discard(request.token)
            self._etrn_refused(task.get("nodes", []))
            return
        text = "4.3.0 the SMTP client job ended during delivery"
        told = self.parts.get(request.token, {})
        sent = task.get("messages", ())
        under_way = 1 + max((i for i, m in enumerate(sent) if m["id"] in told), default=-1)
        messages = []
        for i, m in enumerate(sent):
            outcome = _told(told.get(m["id"]), m["id"])
            if outcome is not None:  # done before the job ended: kept as the job told it
                messages.append(outcome)
                continue
            if i > under_way:
                messages.append({"id": m["id"], "not_begun": True})
                continue
            self.alone.add(m["id"])
            messages.append({"id": m["id"], "results": [
                {"address": a, "status": "temporary", "code": 451, "text": text}
                for a in m["recipients"]]})
        self._result(request.token, json.dumps({"messages": messages}).encode())

    def _part(self, token: int, qid: str, outcome: bytes) -> None:
        """One message of a running task is done; kept until the task's end."""
        if token in self.tasks:
            self.parts.setdefault(token, {})[qid] = outcome

    def _forget(self, token: int) -> tuple[str, list[str]] | None:
        self.parts.pop(token, None)
        entry = self.tasks.pop(token, None)
        if entry is None:
            return None
        domain, qids = entry
        self.per_domain[domain] -= 1
        if self.per_domain[domain] <= 0:
            del self.per_domain[domain]
        for qid in qids:
            domains = self.open.get(qid)
            if domains is not None:
                domains.discard(domain)
                if not domains:
                    del self.open[qid]
        return entry

    def _result(self, token: int, line: bytes) -> None:
        """A task's outcome: its connection is free at once, then the envelopes are written.

        The next messages for the destination start before these outcomes
        are on disk: the connection matrix counts connections, and this one
        is closed.  When it was a message's last task (and no other outcome
        of it is still being written), writing the outcome and settling the
        message are one step: one envelope read, and the envelope is written
        once, by the move to a retry queue, or not at all when the message
        is done.  The messages of one task are written in one trip to a
        worker thread.
        """
        self.etrn_tasks.discard(token)
        entry = self._forget(token)
        if entry is None:
            return
        domain, qids = entry
        answer = _answer(line)
        why = _unreachable(answer)
        if why is None:
            self.failing.pop(domain, None)  # a server was there
        else:
            self.failing[domain] = why
            self._judged(domain)
        self._start_ready((domain,))
        by_id = _outcomes(answer)  # a message without one is tried again
        items = []
        for qid in qids:
            if by_id.get(qid, {}).get("not_begun") is True:  # its job was ending
                self._not_begun(qid)
                continue
            last = qid not in self.open and not self.recording[qid] and qid not in self.untried
            known = self.started.pop(qid, None) if last else None  # one task: always its last
            items.append((qid, by_id.get(qid, {}), last, known))
        self._write_outcomes(items)

    def _judged(self, domain: str) -> None:
        """When no task of a destination found unreachable runs any more, hold its mail back."""
        if domain in self.failing and not self.per_domain[domain]:
            self._hold_back(domain, self.failing.pop(domain))

    def _hold_back(self, domain: str, why: str) -> None:
        """No server of ``domain`` answered: what waits for it alone is retried later.

        Each message goes to the retry queues as a task's temporary failure
        would send it, with its try counted.  Two kinds wait for their
        connection, as before: a message for several destinations (its
        other destinations are not held back with it), and one whose
        retries this try would use up (it is returned only after a real try).
        """
        waiting = self.by_domain.get(domain)
        if not waiting or self.held:
            return
        text = f"4.4.1 not tried: no server of {domain} answered just now ({why})"
        kept: collections.deque[str] = collections.deque()
        items = []
        for qid in waiting:
            pending = self.backlog.get(qid)
            if pending is None or qid in self.open or qid in self.busy:
                self.backlog.pop(qid, None)
                continue  # started by another destination, or gone
            env, groups = pending
            if len(groups) > 1 or self._last_try(env):
                kept.append(qid)
                continue
            del self.backlog[qid]
            self.touched.add(qid)  # the running scan's view of it is out of date
            results = [{"address": a, "status": "temporary", "code": 451, "text": text}
                       for a in groups[domain]]
            items.append((qid, {"id": qid, "results": results}, True, env))
        if kept:
            self.by_domain[domain] = kept
        else:
            self.by_domain.pop(domain, None)
        if items:
            self.journal.write("8U", f"8U UNR {domain}", domain=domain, messages=len(items),
                               reason=why)
            self._write_outcomes(items)

    def _write_outcomes(self, items: list[tuple[str, dict[str, Any], bool, Envelope | None]]
                        ) -> None:
        """Write outcomes (and settle each message whose last they are) in a worker thread."""
        for qid, *_ in items:
            self.recording[qid] += 1
            self.busy.add(qid)
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      self._record_all, items)

        def recorded(failures: Any) -> None:
            failed = dict(failures or ())
            for item in items:
                why = failed.get(item[0])
                if why is None:
                    self._recorded(item[0], item[2])
                else:
                    self._record_later(item, why, RECORD_RETRY)

        d.addErrback(lambda f: self.log.failure("recording delivery results failed", f))
        d.addCallback(recorded)

    def _recorded(self, qid: str, last: bool) -> None:
        self.recording[qid] -= 1
        self.touched.add(qid)
        if self.recording[qid]:
            return  # another outcome of it is still being written
        del self.recording[qid]
        self.busy.discard(qid)
        if last:
            self.full_noted.pop(qid, None)
        elif qid in self.untried:
            if qid not in self.open:
                self.untried.discard(qid)  # its outcomes are written: the next scan sends it
        elif qid not in self.open:
            self._settle(qid)

    def _record_later(self, item: tuple[str, dict[str, Any], bool, Envelope | None],
                      why: failure.Failure, delay: float) -> None:
        """Writing an outcome failed: keep it and write it again later.

        The message stays busy meanwhile.  Free, the next scan would find
        its envelope as the task found it and send it again, to recipients
        already delivered too, every second for as long as the disk refuses.
        """
        qid = item[0]
        self.log.failure("recording the delivery result of {qid} failed; trying again in "
                         "{delay:.0f}s", why, qid=qid, delay=delay)

        def again() -> None:
            self.record_retries.pop(qid, None)
            d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                          self._record_all, [item])

            def done(failures: Any) -> None:
                if failures:
                    self._record_later(item, failures[0][1], min(2 * delay, RECORD_RETRY_MAX))
                else:
                    self._recorded(qid, item[2])

            d.addCallback(done)
            d.addErrback(lambda f: self.log.failure("recording {qid} failed", f, qid=qid))

        self.record_retries[qid] = self.reactor.callLater(delay, again)

    def _record_all(self, items: list[tuple[str, dict[str, Any], bool, Envelope | None]]
                    ) -> list[tuple[str, failure.Failure]]:
        """``_record`` for each message of a task; one's error does not stop the others.

        A message removed meanwhile (DLTQ, ``wrkq --delete``) has nothing to write.
        """
        failures = []
        for qid, result, last, known in items:
            try:
                self._record(qid, result, last, known)
            except KeyError:
                if self.queue.find(qid) is not None:
                    failures.append((qid, failure.Failure()))
            except Exception:
                failures.append((qid, failure.Failure()))
        return failures

    def _record(self, qid: str, result: dict[str, Any], last: bool,
                known: Envelope | None = None) -> None:
        """Write one task's per-recipient outcomes into the envelope (and settle the last)."""
        with self._lock(qid):
            env = self._with_outcomes(qid, result, known)
            if last:
                self._settle_locked(qid, env)
            else:
                self.queue.update(QTMSOUTQ, env)

    def _with_outcomes(self, qid: str, result: dict[str, Any],
                       env: Envelope | None = None) -> Envelope:
        if env is None:
            env = self.queue.load(QTMSOUTQ, qid)
        outcome = {r["address"]: r for r in result.get("results", [])}
        now = time.time()
        recipients = []
        for r in env.recipients:
            o = outcome.get(r.address)
            if o is None or r.state != PENDING:
                recipients.append(r)
            elif o["status"] == "delivered":
                recipients.append(r.evolve(state=DELIVERED, delivered_at=now,
                                           attempts=r.attempts + 1, mta=_mta(o)))
            elif o["status"] == "permanent":
                recipients.append(r.evolve(state=FAILED, attempts=r.attempts + 1,
                                           last_error=f"{o['code']} {o['text']}", mta=_mta(o)))
            else:
                recipients.append(r.evolve(attempts=r.attempts + 1,
                                           last_error=f"{o['code']} {o['text']}", mta=_mta(o)))
        env = env.with_recipients(recipients)
        if result.get("dsn") is False:
            # The next hop takes no DSN: SUCCESS requests end here, as "relayed".
            relayed = [Failure(a, "2.0.0", f"{o['code']} {o['text']}", "relayed")
                       for a, o in outcome.items() if o["status"] == "delivered"]
            if relayed:
                queue_notice(self.queue, self.directory, self.journal,
                             self.settings.hostname, env, relayed, self.queue.body_path(qid))
        return env

    def _settle(self, qid: str) -> None:
        self.busy.add(qid)
        self.full_noted.pop(qid, None)
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      self._settle_message, qid)
        d.addErrback(lambda f: self.log.failure("settling {qid} failed", f, qid=qid))

        def settled(_: Any) -> None:
            self.busy.discard(qid)
            self.touched.add(qid)

        d.addBoth(settled)

    def _settle_message(self, qid: str) -> None:
        """All tasks of a message have answered: notice, retry queue, or done."""
        with self._lock(qid):
            self._settle_locked(qid)

    def _lock(self, qid: str) -> threading.Lock:
        return self._locks[hash(qid) % len(self._locks)]

    def _settle_locked(self, qid: str, env: Envelope | None = None) -> None:
        if env is None:
            try:
                env = self.queue.load(QTMSOUTQ, qid)
            except KeyError:
                return
        # Remote recipients that failed for now, and local ones deferred (RETRY).
        pending = [r for r in env.recipients if r.state in (PENDING, RETRY)]
        # A try an ETRN asked for before the retry was due is not counted:
        # what is left keeps its place in the retries.
        early = [h for h in env.history if isinstance(h, dict) and EARLY in h]
        if early:
            env = env.evolve(history=tuple(h for h in env.history if h not in early))
        attempts = env.attempts if early else env.attempts + 1
        target = self._retry_target(attempts) if pending else None
        if pending and target is None:
            # Retries used up: what is left fails now.
            env = env.with_recipients(
                r.evolve(state=FAILED, last_error=(r.last_error or "4.4.7 retries exhausted")
                         + EXHAUSTED) if r.state in (PENDING, RETRY) else r
                for r in env.recipients)
            pending = []
        noticed = {a for h in env.history if isinstance(h, dict) for a in h.get("noticed", ())}
        failed_now = [r for r in env.recipients if r.state == FAILED
                      and r.address not in noticed]
        if failed_now:
            for r in failed_now:
                # A3 for a local mailbox that never took it (see inbound).
                code = "83" if r.resolved in (None, "remote") else "A3"
                self.journal.write(code, f"{code} U {r.address}", qid, recipient=r.address,
                                   reason=r.last_error)
            failures = [Failure(r.address, _status(r.last_error), r.last_error or "failed")
                        for r in failed_now]
            queue_notice(self.queue, self.directory, self.journal, self.settings.hostname,
                         env, failures, self.queue.body_path(qid),
                         responsible=self.settings.smtp.nfydlvry,
                         announce=lambda: self.journal.write("87", f"87 TIQ notice {qid}", qid))
            env = env.note({"noticed": [r.address for r in failed_now]})
        if pending:
            queue_name, code, delay = target
            if not (early and env.next_try is not None):
                env = env.evolve(attempts=attempts, next_try=time.time() + delay)
            delay_noticed = any(isinstance(h, dict) and h.get("delay_noticed")
                                for h in env.history)
            if queue_name == QTMSRTQ2 and not delay_noticed:
                # Once, as the message enters the second-level retries; not
                # at each of them (RTYDAY/RTYHOUR may be many).
                count, unit = self._second_level()
                until = time.time() + count * unit  # its last try; a failure after it
                delayed = [Failure(r.address, _delayed_status(r.last_error),
                                   r.last_error or "still being retried", "delayed",
                                   retry_until=until)
                           for r in pending]
                queue_notice(self.queue, self.directory, self.journal,
                             self.settings.hostname, env, delayed, self.queue.body_path(qid))
                env = env.note({"delay_noticed": True})
            self.queue.move(qid, QTMSOUTQ, queue_name, env)
            self._lower_retry_wake(queue_name, env.next_try if env.next_try is not None else 0.0)
            # The reply or local error of each recipient says why it waits.
            self.journal.write(code, f"{code} TRQ {queue_name}", qid, queue=queue_name,
                               attempts=attempts, next_try=time_text(env.next_try),
                               recipients=[r.address for r in pending],
                               errors={r.address: r.last_error for r in pending})
        else:
            # Relayed mail a crash brought back would be relayed again, as
            # after a crash in any MTA; a notice sent twice is worse, so a
            # removal after one must hold.
            notice = bool(failed_now) or any(r.notify and "SUCCESS" in r.notify
                                             for r in env.recipients)
            self.queue.remove(QTMSOUTQ, qid, durable=notice)

    def _longest_waits(self) -> dict[str, float]:
        """The longest wait each retry queue gives now, with a minute to spare."""
        s = self.settings.smtp
        second = max(86400.0 * s.rtyday[1], 3600.0 * s.rtyhour[1])
        return {QTMSRTQ1: 60.0 * s.rtymin[1] + 60.0, QTMSRTQ2: second + 60.0}

    def _last_try(self, env: Envelope) -> bool:
        """Whether this try would use the message's retries up (an early one does not)."""
        if any(isinstance(h, dict) and EARLY in h for h in env.history):
            return False
        return self._retry_target(env.attempts + 1) is None

    def _retry_target(self, attempts: int) -> tuple[str, str, float] | None:
        """Where a message waits after its ``attempts``-th try, or None when used up."""
        s = self.settings.smtp
        first_count, first_minutes = s.rtymin
        if attempts <= first_count:
            return QTMSRTQ1, "8C", 60.0 * first_minutes
        second_count, second_unit = self._second_level()
        if attempts <= first_count + second_count:
            return QTMSRTQ2, "8D", second_unit
        return None

    def _second_level(self) -> tuple[int, float]:
        """The second-level retries: how many, and the seconds between them."""
        s = self.settings.smtp
        return (s.rtyday[0], 86400.0 * s.rtyday[1]) if s.rtyday[0] \
            else (s.rtyhour[0], 3600.0 * s.rtyhour[1])


def _delayed_status(error: str | None) -> str:
    """A delay notice's status: the reply's own, in class 4 (4.5.3 stays 4.5.3)."""
    status = _status(error)
    return "4" + status[1:] if status.startswith("5.") else status


def _mta(outcome: dict[str, Any]) -> str | None:
    """The server a recipient's outcome came from; None when it is our own words."""
    mta = outcome.get("mta")
    return mta if isinstance(mta, str) and mta else None


def _told(outcome: bytes | None, qid: str) -> dict[str, Any] | None:
    """A message's outcome as its job told it (PART), if it can be read as one."""
    if outcome is None:
        return None
    try:
        told = json.loads(outcome)
    except ValueError:
        return None
    return told if isinstance(told, dict) and told.get("id") == qid else None


def _answer(line: bytes) -> dict[str, Any]:
    """A task's answer line, or an empty answer when it is not a JSON object."""
    try:
        answer = json.loads(line)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _unreachable(answer: dict[str, Any]) -> str | None:
    """Why no server of the task's destination answered, if its answer says so."""
    why = answer.get("unreachable")
    return why if isinstance(why, str) and why else None


def _outcomes(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A task's answer by message; an entry that makes no sense is left out alone.

    The first entry of a message counts, should a job name it twice.
    """
    entries = answer.get("messages")
    by_id: dict[str, dict[str, Any]] = {}
    for m in entries if isinstance(entries, list) else ():
        if isinstance(m, dict) and isinstance(m.get("id"), str) and isinstance(
                m.get("results", []), list):
            by_id.setdefault(m["id"], m)
    return by_id


def _sending(env: Envelope, rcpts: list[str]) -> dict[str, Any]:
    """What a client job puts on MAIL and RCPT, so it need not read the envelope.

    None of it changes while the message is queued; the scan read it already.
    """
    wanted = set(rcpts)
    return {"originator": env.originator, "ret": env.ret, "envid": env.envid,
            "recipients": [[r.address, r.notify, r.orcpt] for r in env.recipients
                           if r.address in wanted], "trace": env.trace}


def _in_node(address: str, nodes: set[str]) -> bool:
    """Whether ETRN ``nodes`` cover the address: ``@name`` with its subdomains."""
    domain = address.rpartition("@")[2].lower().rstrip(".")
    return any(domain == n.lstrip("@") or (n.startswith("@") and domain.endswith("." + n[1:]))
               for n in nodes)


def _status(error: str | None) -> str:
    """The enhanced status code of a recorded reply (``451 4.3.0 ...``) or of our own
    words (``4.4.1 ...``), for the notice; without one, the reply's class (``451 Try
    later`` is 4.0.0), else 5.0.0.

    A temporary code stays temporary when the retries run out: the failure
    reports what the last try said, as the delay notice did (and Postfix).
    Only the word where RFC 3463 puts it counts, in the class of the reply.
    """
    words = (error or "").split()
    if words and len(words[0]) == 3 and words[0].isdigit():
        reply, words = words[0], words[1:]
    else:
        reply = ""
    if words:
        parts = words[0].split(".")
        if (len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in ("2", "4", "5")
                and (not reply or reply[0] == parts[0])):
            return words[0]
    return f"{reply[0]}.0.0" if reply[:1] in ("2", "4", "5") else "5.0.0"
