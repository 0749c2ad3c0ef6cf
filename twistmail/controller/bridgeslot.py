"""Supervision of the bridge process (the mail server framework).

The controller keeps one bridge running while MSF is started (STRMSF): it is
restarted when it dies, at once if it had run for a while, with a doubling
delay if it keeps dying right after start (procmon's rule).  ENDMSF stops it
with SIGTERM, then SIGKILL after the delay.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from twistmail.bridge.msf import JOB_NAME as MSF_JOB
from twistmail.bridge.msf import NBRMSFJOB
from twistmail.bridge.status import read_status
from twistmail.prestart import launch

MIN_DELAY = 1.0
MAX_DELAY = 60.0
HEALTHY_AFTER = 5.0  # a bridge that lived this long restarts without delay
JOB_NAME = "QTSMTPBRSR"


class BridgeSlot:
    log = Logger()

    def __init__(self, reactor: Any, config_path: str, journal: Any,
                 lock_fd: int | None = None) -> None:
        self.reactor = reactor
        self.lock_fd = lock_fd  # the state directory's lock: the bridge holds it too
        self.config_path = config_path
        self.journal = journal
        self.wanted = False
        self.nbrmsfjob = NBRMSFJOB
        self.process: Any = None
        self.pid: int | None = None
        self.started_at = 0.0
        self.delay = MIN_DELAY
        self.restarts = 0
        self._restart_call: Any = None
        self._ended: defer.Deferred | None = None

    @property
    def status(self) -> str:
        if self.process is not None:
            return "RUN" if self.wanted else "END"
        return "RESTARTING" if self.wanted else "ENDED"

    def start(self, nbrmsfjob: int = NBRMSFJOB) -> None:
        """STRMSF; NBRMSFJOB holds until the next STRMSF, restarts included."""
        self.nbrmsfjob = nbrmsfjob
        self.wanted = True
        self.delay = MIN_DELAY
        if self.process is None and self._restart_call is None:
            self._spawn()

    def stop(self, option: str = "*CNTRLD", delay: float = 30.0) -> defer.Deferred:
        """ENDMSF: returns a Deferred that fires when the bridge is gone."""
        self.wanted = False
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        if self.process is None:
            return defer.succeed(None)
        ended = self._ended
        self._signal("TERM")
        kill = self.reactor.callLater(
            0.0 if option == "*IMMED" else delay, self._signal, "KILL"
        )
        ended.addBoth(lambda r: kill.cancel() if kill.active() else None)
        waiter: defer.Deferred = defer.Deferred()
        ended.addBoth(lambda r: waiter.callback(None))
        return waiter

    def _spawn(self) -> None:
        self._restart_call = None
        self._ended = defer.Deferred()
        output = launch.ChildOutput(JOB_NAME, self._exited, at_exit=True)
        self.started_at = self.reactor.seconds()
        # A reload (SIGHUP) before the bridge has its handler would end it:
        # it is born with SIGHUP blocked, and unblocks it once it listens.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self.process = launch.spawn(
                self.reactor, JOB_NAME, "twistmail.bridge.main",
                ["--config", self.config_path, "--nbrmsfjob", str(self.nbrmsfjob),
                 "--parent", str(os.getpid())], output, keep_fd=self.lock_fd,
            )
        except OSError as e:
            hint = ""
            if e.errno in (errno.EACCES, errno.EPERM):  # a Python only root may run, say
                hint = f" (this user must be allowed to run {sys.executable})"
            self.log.error("cannot start the bridge: {e!r}{hint}", e=e, hint=hint)
            self.process = None
            self._schedule_restart("not started")
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.pid = self.process.pid

    def _exited(self, reason: Any) -> None:
        self.process = None
        pid, self.pid = self.pid, None
        ended, self._ended = self._ended, None
        if self.wanted:
            self.restarts += 1
            self._journal("JK", f"JK CRASH {JOB_NAME}/{pid}", pid=pid, exit=str(reason.value))
            for job in _jobs_of(Path(self.config_path).parent, pid):
                # They die with it (SIGKILL), and it cannot say so any more:
                # JK for a QMSF job as the bridge writes it, JC for a pool's.
                code = "JK" if job["job"] == MSF_JOB else "JC"
                self._journal(code, f"{code} CRASH {job['job']}/{job['pid']}", pid=job["pid"],
                              pgm=job.get("pgm") or None,
                              cause=f"its bridge ({JOB_NAME}) ended")
            self._schedule_restart(launch.exit_text(reason))
        else:
            self._journal("JN", f"JN END {JOB_NAME}/{pid}", pid=pid)
        if ended is not None:
            ended.callback(None)

    def _schedule_restart(self, how: str) -> None:
        lived = self.reactor.seconds() - self.started_at
        if lived >= HEALTHY_AFTER:
            self.delay = MIN_DELAY
            wait = 0.0
        else:
            wait = self.delay
            self.delay = min(MAX_DELAY, self.delay * 2)
        self.log.warn("bridge ended ({how}); restarting in {wait:.1f}s", how=how, wait=wait)
        self._restart_call = self.reactor.callLater(wait, self._spawn)

    def _signal(self, sig: str) -> None:
        launch.send_signal(self.process, sig)

    def _journal(self, code: str, esd: str, **fields: Any) -> None:
        if self.journal is not None:
            self.journal.write(code, esd, **fields)


def _jobs_of(run_dir: Path, pid: int | None) -> list[dict[str, Any]]:
    """The client and QMSF jobs the bridge ``pid`` listed last (not their launchers)."""
    status = read_status(run_dir) or {}
    if pid is None or status.get("pid") != pid:
        return []  # another bridge's, or none written yet
    return [j for j in status.get("jobs") or ()
            if isinstance(j, dict) and isinstance(j.get("pid"), int)
            and j.get("job") != launch.ForkServer.NAME]
