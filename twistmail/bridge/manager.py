"""The bridge's queue manager: drains QTMSINQ and minds QTMSBSSQ.

Woken by inotify when an envelope is renamed into QTMSINQ, and by a periodic
rescan as well, because inotify can lose events without telling (TWISTED.md
§6): a lost wake-up only delays.  At start, and at every rescan, it runs the
queue's recovery (abandoned spool files, orphan bodies, unreadable
envelopes).  Messages are processed oldest first by the QMSF jobs (IBM's
NBRMSFJOB, :mod:`twistmail.bridge.msfjobs`), each message by one job at a
time; one a job could not finish stays queued for the next rescan, and one
on which its job died MAX_JOB_ENDS times (END_WAITS apart) is set aside in
corrupt/ (7Y).  One
a job answered FAIL for is tried again after growing waits (FAIL_WAITS), and
set aside only once they are used up.
Mail parked on QTMSBSSQ goes back to QTMSINQ, oldest first, once storage
use is under the threshold again (7M).

Settings honoured: ``[storage] threshold`` (through the storage probe).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from twistmail.bridge import deletes
from twistmail.bridge.msfjobs import JobEnded, JobFailed, JobLost, JobSilent, NoRoom
from twistmail.interfaces import CORRUPT, QTMSBSSQ, QTMSINQ

RESCAN_EVERY = 5.0  # seconds
#: The longest time between two recoveries.  Recovery waits for a moment no
#: QMSF job is busy; under steady load there may be none, and then the jobs
#: are given nothing new until the busy ones finish (milliseconds).
RECOVER_EVERY = 60.0  # seconds
MAX_JOB_ENDS = 3  # a message its QMSF job died on this many times is set aside
#: Seconds before a message its QMSF job died on is tried again, after the
#: first death and the second.  A job killed from outside (an administrator,
#: the OOM killer) seldom holds the same message three times when the tries
#: are apart, and a message that kills every job still goes after 70 s.
END_WAITS = (10.0, 60.0)
#: Kills of a job silent on the message (STEP_LIMIT each) before it is set
#: aside: a stalled disk stops every job alike, and must stall half an hour
#: before the messages in hand go; one message that wedges its job each
#: time costs a job's CPU for as long.
MAX_SILENT_ENDS = 6
#: A message its QMSF job answered FAIL for (the queue's file system full or
#: gone read-only; a mailbox that cannot take mail only defers its recipient)
#: waits this long before each new try: the administrator has about an hour
#: and a half to mend it before it is set aside.
FAIL_WAITS = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
#: Seconds between tries of a message the disk had no room for (a FULL answer).
NO_ROOM_WAIT = 30.0


class QueueManager:
    log = Logger()

    def __init__(self, reactor: Any, queue: Any, jobs: Any, journal: Any,
                 storage_full: Callable[[], bool]) -> None:
        self.reactor = reactor
        self.queue = queue
        self.jobs = jobs
        jobs.on_free = self._pump
        self.journal = journal
        self.storage_full = storage_full
        self.todo: collections.deque[str] = collections.deque()
        self.known: set[str] = set()  # queued or in progress
        self.running = 0
        self.scanning = False
        self.recovering = False
        self.recovery_due = False  # no new work for the jobs: recovery runs once they are done
        self.recovered_at = float("-inf")
        #: Fires once the first rescan, with its recovery, is done.
        self.ready: defer.Deferred = defer.Deferred()
        self.rescan_loop: task.LoopingCall | None = None
        self.notifier: Any = None
        self.processed = 0
        #: Messages whose QMSF job died while processing them, and how often.
        self.job_ends: collections.Counter[str] = collections.Counter()
        self.silent_ends: collections.Counter[str] = collections.Counter()
        #: Messages a job failed on: how often, and no new try before when.
        self.fails: dict[str, tuple[int, float]] = {}
        self.no_room: str | None = None  # why the disk refused the last try, until one works
        #: Whether the log said mail waits on QTMSBSSQ (storage over the threshold).
        self.parking_said = False
        self.claims_resumed = False  # see _delete_parked
        self.again: set[str] = set()  # messages whose job died with its launcher: next at once

    def start(self) -> defer.Deferred:
        """Watch and rescan; the Deferred fires once the first recovery is done.

        Recovery must not race the bridge's other movers of queued mail, so
        the outbound side starts only then.
        """
        self._watch()
        self.rescan_loop = task.LoopingCall(self.rescan)
        self.rescan_loop.clock = self.reactor
        self.rescan_loop.start(RESCAN_EVERY, now=True)
        return self.ready

    def stop(self) -> None:
        if self.rescan_loop is not None and self.rescan_loop.running:
            self.rescan_loop.stop()
        if self.notifier is not None:
            self.notifier.loseConnection()

    def _watch(self) -> None:
        try:
            from twisted.internet import inotify
        except ImportError:  # not Linux: the rescan alone drives the queue
            return
        notifier = inotify.INotify(self.reactor)
        notifier.startReading()
        notifier.watch(
            FilePath(str(self.queue.queue_dir(QTMSINQ))),
            mask=inotify.IN_MOVED_TO,
            callbacks=[self._notified],
        )
        self.notifier = notifier

    def _notified(self, _watch: Any, path: FilePath, _mask: int) -> None:
        name = path.basename()
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if name.endswith((".json", ".msg")):  # an envelope file, or a packed message
            self._add(name.rsplit(".", 1)[0])
            self._pump()

    def rescan(self) -> Any:
        """Recover debris, release parked mail, pick up anything a wake-up missed."""
        if self.scanning:
            return None
        if self.running and self.reactor.seconds() - self.recovered_at >= RECOVER_EVERY:
            self.recovery_due = True  # the last job to finish starts it
            return None
        self.scanning = True
        # Recovery must not race a job's moves, so it runs only while none
        # is busy, and no job gets a message until it is done.
        self.recovering = self.running == 0
        if self.recovering:
            self.recovery_due = False
        d = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._scan, self.recovering
        )
        d.addCallback(self._scanned)
        d.addErrback(lambda f: self.log.failure("queue rescan failed", f))
        d.addBoth(self._scan_done)
        return d

    def _scan(self, recover: bool) -> list[str]:
        report = self.queue.recover() if recover else None
        if report is not None and not report.clean:
            self.journal.write("7X", "7X RCV queue recovery", **report.counts())
            for queue_id in report.unfinished():
                if self.queue.find(queue_id) is None:
                    # Its writer died before the message was queued (its 97,
                    # if written, came before the rename): the last word on it.
                    self.journal.write("7X", f"7X RCV {queue_id} never queued", queue_id,
                                       removed="unfinished message")
            for item in report.corrupt:
                self.journal.write("7Y", f"7Y CRP {item.id}", item.id, queue=CORRUPT,
                                   reason=item.reason)
        self._release_parked()
        return self.queue.list(QTMSINQ)

    def _delete_parked(self) -> None:
        """``wrkq --delete`` of parked mail (see ``deletes``): this thread alone
        moves it out of QTMSBSSQ; the first time, a killed bridge's half-done
        deletions are finished first."""
        if not self.claims_resumed:
            self.claims_resumed = True
            for qid, where in deletes.claims(self.queue.root):
                if where == QTMSBSSQ:
                    deletes.resume(self.queue, self.journal, qid, where, "7N")
        for qid in deletes.asked(self.queue.root):
            try:
                if self.queue.find(qid) == QTMSBSSQ:
                    deletes.delete(self.queue, self.journal, qid, QTMSBSSQ, "7N")
            except Exception:  # asked for again at the next rescan; the others go on
                self.log.failure("deleting message {qid} failed", qid=qid)

    def _release_parked(self) -> None:
        self._delete_parked()
        parked = self.queue.list(QTMSBSSQ)
        for qid in parked:
            if self.storage_full():
                if not self.parking_said:  # the journal has a 7L per message
                    self.parking_said = True
                    self.log.warn("storage is over [storage] threshold: mail waits on "
                                  "{q} and the SMTP server answers 452 4.3.1", q=QTMSBSSQ)
                return
            self.queue.move(qid, QTMSBSSQ, QTMSINQ)
            self.journal.write("7M", f"7M FSSQ {QTMSBSSQ}", qid, queue=QTMSBSSQ)
        # All released, or none left to (deleted by hand) with room again.
        if self.parking_said and (parked or not self.storage_full()):
            self.parking_said = False
            self.log.info("storage is under [storage] threshold again: the mail on {q} "
                          "is delivered", q=QTMSBSSQ)

    def _scanned(self, ids: list[str]) -> None:
        for qid in set(self.fails).difference(ids):
            del self.fails[qid]  # gone from QTMSINQ meanwhile
        for qid in ids:
            self._add(qid)
        self._pump()

    def _scan_done(self, _: Any) -> None:
        self.scanning = False
        if self.recovering:
            self.recovered_at = self.reactor.seconds()
            if not self.ready.called:
                self.ready.callback(None)
        self.recovering = False
        if self.recovery_due and not self.running:
            self.rescan()
        self._pump()

    def _add(self, qid: str) -> None:
        waiting = self.fails.get(qid)
        if waiting is not None and waiting[1] > self.reactor.seconds():
            return  # tried again at a rescan once its wait is over
        if qid not in self.known:
            self.known.add(qid)
            self.todo.append(qid)

    def _pump(self) -> None:
        while self.todo and not (self.recovering or self.recovery_due) and self.jobs.free():
            qid = self.todo.popleft()
            self.running += 1
            d = self.jobs.process(qid)
            d.addCallbacks(self._done, self._failed, callbackArgs=(qid,), errbackArgs=(qid,))
            d.addBoth(self._finished, qid)

    def _failed(self, failure: Any, qid: str) -> Any:
        if failure.check(JobLost):
            # Its job died with the launcher (logged there): nothing to hold
            # against the message, which goes to the next job at once.
            self.again.add(qid)
            return None
        if failure.check(NoRoom):
            # The disk, not the message: it waits for room, however long,
            # and is never set aside for it.  Said once, not per message.
            count = self.fails.get(qid, (0, 0.0))[0]
            self.fails[qid] = (count, self.reactor.seconds() + NO_ROOM_WAIT)
            if self.no_room is None:
                self.log.warn("delivery waits for disk room: {why}; each message is tried "
                              "again every {wait:.0f}s", why=failure.getErrorMessage(),
                              wait=NO_ROOM_WAIT)
            self.no_room = failure.getErrorMessage()
            return None
        if failure.check(JobFailed):
            count = self.fails.get(qid, (0, 0.0))[0] + 1
            if count <= len(FAIL_WAITS):
                wait = FAIL_WAITS[count - 1]
                self.fails[qid] = (count, self.reactor.seconds() + wait)
                self.log.error("processing {qid} failed; it stays queued, next try in "
                               "{wait:.0f}s: {why}", qid=qid, wait=wait,
                               why=failure.getErrorMessage())
                return None
            reason = (f"its QMSF job failed on it {count} times over "
                      f"{sum(FAIL_WAITS) / 60:.0f} minutes")
        else:
            counts, limit, what = self.job_ends, MAX_JOB_ENDS, "ended"
            if failure.check(JobSilent):
                counts, limit, what = self.silent_ends, MAX_SILENT_ENDS, "stopped answering"
            if failure.check(JobEnded):
                counts[qid] += 1
            if counts[qid] < limit:
                wait = 0.0
                if what == "ended":
                    wait = END_WAITS[min(counts[qid], len(END_WAITS)) - 1]
                    count = self.fails.get(qid, (0, 0.0))[0]
                    self.fails[qid] = (count, self.reactor.seconds() + wait)
                self.log.error("processing {qid} failed; it stays queued, next try in "
                               "{wait:.0f}s: {why}", qid=qid, wait=wait,
                               why=failure.getErrorMessage())
                return None
            reason = f"its QMSF job {what} on it {limit} times"
        self.log.error("processing {qid} failed; it is set aside: {why}", qid=qid,
                       why=failure.getErrorMessage())
        # A message that kills the job that takes it would do so for ever,
        # taking a job start each time: it goes to corrupt/ for the
        # administrator instead (wrkq --queue corrupt).
        self.job_ends.pop(qid, None)
        self.silent_ends.pop(qid, None)
        self.fails.pop(qid, None)
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      self.queue.set_aside, QTMSINQ, qid, reason)

        def set_aside(item: Any) -> None:
            if item is not None:
                self.journal.write("7Y", f"7Y CRP {qid}", qid, queue=CORRUPT, reason=reason)

        d.addCallback(set_aside)
        d.addErrback(lambda f: self.log.failure("setting {qid} aside failed", f, qid=qid))
        return d

    def _done(self, result: Any, qid: str) -> None:
        self.job_ends.pop(qid, None)  # done, or gone: its counts are of no use now
        self.silent_ends.pop(qid, None)
        self.fails.pop(qid, None)
        if self.no_room is not None:
            self.log.info("delivery goes on: the disk has room again")
            self.no_room = None

    def _finished(self, result: Any, qid: str) -> None:
        self.running -= 1
        self.known.discard(qid)
        if qid in self.again:
            self.again.discard(qid)
            self._add(qid)
        self.processed += 1
        if self.recovery_due and not self.running:
            self.rescan()
        self._pump()
