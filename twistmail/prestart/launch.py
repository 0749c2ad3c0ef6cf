"""How a child process of the appliance is started.

The bridge and the launcher start with :func:`spawn` (exec of a fresh
interpreter).  Prestart jobs, and the bridge's QMSF jobs, start through a
:class:`ForkServer`: the launcher process
(:mod:`twistmail.prestart.forkserver`) has done the imports once and forks
each job from itself, which costs milliseconds instead of half a second of
CPU.  A child gets the other end of a UNIX socketpair as fd 3 when
``channel`` is given; its stdout and stderr come back to the controller's log.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.process import registerReapProcessHandler, unregisterReapProcessHandler
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger, LogLevel
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from twistmail.prestart import forkserver

CHILD_CHANNEL_FD = 3
#: The level in a line of a child's Twisted log: ``<time> [<namespace>#<level>] ...``.
_CHILD_LEVEL = re.compile(r"\S+ \[[^\]\s]*#(debug|info|warn|error|critical)\] ")


class ChildOutput(ProcessProtocol):
    """Logs what a child writes and reports its end."""

    log = Logger()

    def __init__(self, name: str, on_ended: Any, at_exit: bool = False) -> None:
        self.name = name
        self.on_ended = on_ended
        #: Report the end when the process exits, not once its output pipes
        #: close (which the processes it forks share until they are gone).
        self.at_exit = at_exit
        self.pid: int | None = None
        self._partial = {1: b"", 2: b""}
        self._levels: dict[int, LogLevel] = {}
        self._reported = False

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buf = self._partial.get(fd, b"") + data
        *lines, self._partial[fd] = buf.split(b"\n")
        for line in lines:
            self._emit(fd, line)
        if len(self._partial[fd]) > 8192:
            self._emit(fd, self._partial[fd])
            self._partial[fd] = b""

    def _emit(self, fd: int, line: bytes) -> None:
        """Logged at the level the child logged it at, so a filter by level sees
        its errors: a line of its log names it, a continuation (tab) keeps the
        one before's, and anything else it wrote to stderr is a warning."""
        text = line.decode("utf-8", "replace").rstrip()
        if not text:
            return
        named = _CHILD_LEVEL.match(text)
        if named:
            self._levels[fd] = LogLevel.levelWithName(named.group(1))
        elif not text.startswith("\t"):
            self._levels[fd] = LogLevel.warn if fd == 2 else LogLevel.info
        self.log.emit(self._levels.get(fd, LogLevel.info), "{name}/{pid}: {text}",
                      name=self.name, pid=self.pid, text=text)

    def processExited(self, reason: Any) -> None:
        """With ``at_exit`` (the bridge), the end is reported as the process
        exits: the processes it forks keep copies of its pipes, and a stopped
        one kept its supervisor from seeing the end (a dead bridge was not
        restarted).  A launcher's end waits for its pipes: its jobs hold
        them, and their pool supervises them (and kills a stopped one)
        until they are gone."""
        if self.at_exit:
            self._report(reason)

    def processEnded(self, reason: Any) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._emit(fd, rest)
                self._partial[fd] = b""
        self._report(reason)

    def _report(self, reason: Any) -> None:
        if not self._reported:
            self._reported = True
            self.on_ended(reason)


class _Prebuilt(Factory):
    def __init__(self, proto: Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: object) -> Protocol:
        return self.proto


def _socketpair_for(reactor: Any, channel: Protocol) -> socket.socket:
    """Connect ``channel`` to one end of a new socketpair; returns the other end."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent_end.setblocking(False)
    reactor.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX, _Prebuilt(channel))
    parent_end.close()
    return child_end


def spawn(
    reactor: Any,
    name: str,
    module: str,
    args: list[str],
    output: ChildOutput,
    channel: Protocol | None = None,
    keep_fd: int | None = None,
) -> Any:
    """Start ``python -m module args``; returns the process transport.

    ``keep_fd`` is passed on as the child's fd 3 (when it has no channel).
    """
    child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
    if keep_fd is not None:
        child_fds[CHILD_CHANNEL_FD] = keep_fd
    child_end = None
    if channel is not None:
        child_end = _socketpair_for(reactor, channel)
        child_fds[CHILD_CHANNEL_FD] = child_end.fileno()
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    try:
        return reactor.spawnProcess(
            output,
            sys.executable,
            [sys.executable, "-m", module, *args],
            env=env,
            childFDs=child_fds,
        )
    finally:
        if child_end is not None:
            child_end.close()


class ForkFailed(ProcessTerminated):
    """The launcher could not fork the job: the system is short of processes
    or memory for now.  Nothing is wrong with the job's program."""


class LauncherGone(ProcessTerminated):
    """The job ended because its launcher did, or never started: not a fault of its own.

    The pool does not count such a job as a boot failure: one launcher's death
    takes every job it was forking, and that must not stop the entry.
    """

    def __init__(self) -> None:
        super().__init__(None, signal.SIGTERM, None)

    def __str__(self) -> str:
        return "the job launcher ended"


def send_signal(process: Any, sig: str | int) -> None:
    """Signal a child unless it has gone already: its end is reported by itself."""
    if process is None:
        return
    try:
        process.signalProcess(sig)
    except (ProcessExitedAlready, OSError):
        pass


def exit_reason(status: int) -> Failure:
    """A wait status as the Failure Twisted gives ``processEnded``."""
    if os.WIFSIGNALED(status):
        return Failure(ProcessTerminated(None, os.WTERMSIG(status), status))
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if code == 0:
        return Failure(ProcessDone(status))
    return Failure(ProcessTerminated(code, None, status))


class ForkedProcess:
    """A job forked by the launcher: the part of a process transport the pool uses.

    The pid is known only when the launcher answers; a signal sent before
    that is delivered as soon as it is known.
    """

    def __init__(self, on_started: Callable[[int], None],
                 on_ended: Callable[[Failure], None]) -> None:
        self.pid: int | None = None
        self.ended = False
        self._on_started = on_started
        self._on_ended = on_ended
        self._signals: list[int] = []

    def signalProcess(self, sig: str | int) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        num = sig if isinstance(sig, int) else getattr(signal, f"SIG{sig}")
        if self.pid is None:
            self._signals.append(num)
        else:
            os.kill(self.pid, num)

    def started(self, pid: int) -> None:
        self.pid = pid
        for num in self._signals:
            try:
                os.kill(pid, num)
            except OSError:
                pass
        self._signals.clear()
        self._on_started(pid)

    def exited(self, reason: Failure) -> None:
        if not self.ended:
            self.ended = True
            self._on_ended(reason)


class _OwnChild:
    """A child this process forked without the reactor: reaped by it all the same.

    The reactor's SIGCHLD handling reaps every process registered with
    ``registerReapProcessHandler``, and then its end is reported like a
    spawned process's.
    """

    def __init__(self, pid: int, on_ended: Callable[[Failure], None]) -> None:
        self.pid: int | None = pid
        self._on_ended = on_ended
        registerReapProcessHandler(pid, self)

    def reapProcess(self) -> None:
        assert self.pid is not None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: its status is lost
            pid, status = self.pid, 0
        if pid:
            unregisterReapProcessHandler(self.pid, self)
            self.processEnded(status)

    def processEnded(self, status: int) -> None:
        self.pid = None
        self._on_ended(exit_reason(status))

    def signalProcess(self, sig: str | int) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        os.kill(self.pid, sig if isinstance(sig, int) else getattr(signal, f"SIG{sig}"))


class _Launcher(LineOnlyReceiver):
    """One launcher process: its channel, and the jobs it has forked."""

    delimiter = b"\n"
    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pending: collections.deque[tuple[ForkedProcess, socket.socket]] = (
            collections.deque())
        self.live: dict[int, ForkedProcess] = {}
        self.closed = False  # the channel has ended: no more answers will come
        self.answered = False  # it has forked a job: it can start
        self.on_closed: Callable[[], None] = lambda: None
        self.ended: defer.Deferred = defer.Deferred()
        self.process: Any = None

    @classmethod
    def spawned(cls, reactor: Any, programs: tuple[str, ...]) -> _Launcher:
        """A new launcher process that preloads ``programs``."""
        launcher = cls(reactor)
        output = ChildOutput(ForkServer.NAME, launcher._process_ended)
        launcher.process = spawn(reactor, ForkServer.NAME, "twistmail.prestart.forkserver",
                                 list(programs), output, channel=launcher)
        return launcher

    @classmethod
    def adopted(cls, reactor: Any, pid: int, channel: socket.socket) -> _Launcher:
        """A launcher this process forked itself (:func:`forkserver.fork_launcher`)."""
        launcher = cls(reactor)
        channel.setblocking(False)
        reactor.adoptStreamConnection(channel.fileno(), socket.AF_UNIX, _Prebuilt(launcher))
        channel.close()
        launcher.process = _OwnChild(pid, launcher._process_ended)
        return launcher

    def fork(self, pgm: str, config_path: str, job: ForkedProcess, channel: Protocol) -> None:
        child_end = _socketpair_for(self.reactor, channel)
        # The descriptor and its request line go out in the same turn; our
        # copy is closed when the launcher answers, so it has it by then.
        self.transport.sendFileDescriptor(child_end.fileno())
        self.sendLine(f"SPAWN {pgm} {config_path}".encode())
        self.pending.append((job, child_end))

    def lineReceived(self, line: bytes) -> None:
        parts = line.split()
        if parts[:1] == [b"PID"] and len(parts) == 2 and self.pending:
            job, child_end = self.pending.popleft()
            child_end.close()
            self.answered = True
            pid = int(parts[1])
            self.live[pid] = job
            job.started(pid)
        elif parts[:1] == [b"EXIT"] and len(parts) == 3:
            job = self.live.pop(int(parts[1]), None)
            if job is not None:
                job.exited(exit_reason(int(parts[2])))
        elif parts[:1] == [b"FAIL"] and self.pending:
            job, child_end = self.pending.popleft()
            child_end.close()
            why = line[5:].decode("utf-8", "replace")
            self.log.error("the job launcher could not start a job: {why}", why=why)
            # Out of processes or memory is for now; a program that cannot
            # be imported is a boot failure, which stops the entry in the end.
            failed = ForkFailed if why.startswith(forkserver.SHORTAGE) else ProcessTerminated
            job.exited(Failure(failed(70, None, None)))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """The launcher has gone (or is going): no PID will answer what is pending.

        This is known at once, while the end of the process is reported only
        when its output pipes close, which its jobs share until they are gone.
        """
        super().connectionLost(reason)
        if self.closed:
            return
        self.closed = True
        # A launcher that never forked a job may have failed to start: that
        # is one boot failure (the first request's), so a broken installation
        # still stops the entry after a few launchers, while a launcher
        # killed under a burst of starts does not count once per request.
        failed_start = not self.answered
        pending, self.pending = self.pending, collections.deque()
        for job, child_end in pending:
            child_end.close()
            why = ProcessTerminated(70, None, None) if failed_start else LauncherGone()
            failed_start = False
            job.exited(Failure(why))
        self.on_closed()

    def stop(self) -> defer.Deferred:
        """Close the channel (the launcher exits), then KILL if it lingers."""
        if self.transport is not None:
            self.transport.loseConnection()
        kill = self.reactor.callLater(5.0, self._kill)
        self.ended.addBoth(lambda r: kill.cancel() if kill.active() else None)
        waiter: defer.Deferred = defer.Deferred()
        self.ended.addBoth(lambda r: waiter.callback(None))
        return waiter

    def _kill(self) -> None:
        send_signal(self.process, "KILL")

    def _process_ended(self, reason: Any) -> None:
        """The launcher has ended, and its jobs with it.

        A spawned launcher is reported once its output pipes close, which its
        jobs share: they are gone too.  An adopted one is reported when it is
        reaped; its jobs end at once by PR_SET_PDEATHSIG, and whatever they
        had in hand is handled again (every step can be repeated).
        """
        if self.transport is not None:
            self.transport.loseConnection()
        self.connectionLost(reason)  # in case the channel's end was not seen yet
        live, self.live = self.live, {}
        if live:
            self.log.warn("the job launcher ended ({reason}); its {n} jobs ended with it",
                          reason=reason.value, n=len(live))
        for job in live.values():
            job.exited(Failure(LauncherGone()))
        self.ended.callback(None)


class ForkServer:
    """Starts prestart jobs as forks of a preloaded launcher process.

    The launcher is started on the first request, and again after it died or
    was stopped; jobs it had forked are then reported ended (they die with it).
    """

    NAME = "QZMFLNCH"

    def __init__(self, reactor: Any, programs: tuple[str, ...]) -> None:
        self.reactor = reactor
        self.programs = programs
        self._current: _Launcher | None = None
        self._shares: list[LauncherShare] = []

    def share(self) -> LauncherShare:
        """A pool's handle on this launcher, which other pools use as well."""
        share = LauncherShare(self)
        self._shares.append(share)
        return share

    def _release(self) -> defer.Deferred:
        """Stop the launcher once none of the pools sharing it uses it."""
        if any(share.in_use for share in self._shares):
            return defer.succeed(None)
        return self.stop()

    def adopt(self, pid: int, channel: socket.socket) -> None:
        """Use a launcher forked by this process until it ends; then start them as usual."""
        launcher = _Launcher.adopted(self.reactor, pid, channel)
        if launcher.closed:  # dead already, and reaped: the first job starts a new one
            return
        launcher.on_closed = lambda: self._gone(launcher)
        self._current = launcher

    @property
    def pid(self) -> int | None:
        """The launcher's pid while it runs (WRKACTJOB lists it)."""
        return None if self._current is None else self._current.process.pid

    def spawn_job(self, pgm: str, config_path: str, channel: Protocol,
                  on_started: Callable[[int], None],
                  on_ended: Callable[[Failure], None]) -> ForkedProcess:
        """Ask for a job running ``pgm``; its channel is connected to ``channel``."""
        if self._current is None:
            launcher = _Launcher.spawned(self.reactor, self.programs)
            launcher.on_closed = lambda: self._gone(launcher)
            self._current = launcher
        job = ForkedProcess(on_started, on_ended)
        self._current.fork(pgm, config_path, job, channel)
        return job

    def stop(self) -> defer.Deferred:
        """End the launcher once the pool's jobs are gone; a later request starts a new one."""
        launcher, self._current = self._current, None
        return defer.succeed(None) if launcher is None else launcher.stop()

    def kill(self) -> None:
        """KILL a launcher that stopped answering; the next request starts a new one."""
        if self._current is not None:
            self._current._kill()

    def serves_others(self) -> bool:
        """Another pool's jobs run through this launcher now (never: it has one pool)."""
        return False

    def _gone(self, launcher: _Launcher) -> None:
        if self._current is launcher:
            self._current = None


class LauncherShare:
    """One pool's use of a launcher that several pools share.

    The controller's pools share one: what their jobs import (Twisted,
    OpenSSL, our modules) is nearly all the same, and each launcher started
    cost a third of a second of CPU.  It ends when the last pool using it
    has ended (ENDPJ, ENDTCPSVR); its death ends the jobs of every pool,
    and each pool replaces its own.
    """

    def __init__(self, server: ForkServer) -> None:
        self.server = server
        #: Jobs were asked for since the pool last let the launcher go.
        self.in_use = False
        #: Whether the pool using this share is started (its pool sets it).
        self.serving: Callable[[], bool] = lambda: False

    @property
    def pid(self) -> int | None:
        """The launcher's pid, for the first pool using it: WRKACTJOB lists it once."""
        users = [share for share in self.server._shares if share.in_use]
        return self.server.pid if users and users[0] is self else None

    def spawn_job(self, pgm: str, config_path: str, channel: Protocol,
                  on_started: Callable[[int], None],
                  on_ended: Callable[[Failure], None]) -> ForkedProcess:
        self.in_use = True
        return self.server.spawn_job(pgm, config_path, channel, on_started, on_ended)

    def stop(self) -> defer.Deferred:
        """This pool's jobs are gone: the launcher ends if no other pool uses it."""
        self.in_use = False
        return self.server._release()

    def kill(self) -> None:
        """A launcher that stopped answering serves no pool: KILL it for all."""
        self.server.kill()

    def serves_others(self) -> bool:
        """Another pool sharing the launcher is started: its jobs would die with it."""
        return any(share.serving() for share in self.server._shares if share is not self)


def exit_text(reason: Any) -> str:
    """How a process ended, for a log line: ``exit 1``, ``signal 9``."""
    value = getattr(reason, "value", None)
    if isinstance(value, ProcessDone):
        return "exit 0"
    sig = getattr(value, "signal", None)
    if sig:
        return f"signal {sig}"
    return f"exit {getattr(value, 'exitCode', '?')}"
