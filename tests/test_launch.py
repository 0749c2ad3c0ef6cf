"""The bridge's end is reported when it exits, whoever still holds its output pipes;
a launcher's once its pipes close, when its jobs, which share them, are gone too."""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from twistmail.prestart.launch import ChildOutput, ForkServer

#: The child forks a grandchild that keeps the child's stdout and stderr (as
#: the jobs a launcher forks do), stops it, and exits.
CHILD = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
print(pid, flush=True)
"""


class ChildEndTests(unittest.TestCase):
    async def test_the_end_is_reported_while_a_stopped_grandchild_holds_the_pipes(self):
        ended: defer.Deferred = defer.Deferred()
        out = ChildOutput("QTSMTPBRSR", lambda reason: ended.callback(None), at_exit=True)
        lines, closed = _spawn(out)
        ended.addTimeout(10, reactor)
        try:
            await ended  # it used to wait for the grandchild to go
        finally:
            await _until(lambda: lines)
            os.kill(int(lines[0]), signal.SIGKILL)
            await closed  # the pipes close with the grandchild


def _spawn(out: ChildOutput) -> tuple[list[str], defer.Deferred]:
    """Run CHILD under ``out``: the lines it writes, and a Deferred of its pipes' end."""
    lines: list[str] = []
    out._emit = lambda fd, line: lines.append(line.decode())  # type: ignore[method-assign]
    closed: defer.Deferred = defer.Deferred()
    last = out.processEnded
    out.processEnded = lambda reason: (last(reason), closed.callback(None))
    reactor.spawnProcess(out, sys.executable, [sys.executable, "-c", CHILD],
                         env=dict(os.environ))
    return lines, closed


async def _until(condition, limit: float = 10.0) -> None:
    from twisted.internet.task import deferLater

    waited = 0.0
    while not condition() and waited < limit:
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


class LauncherEndTests(unittest.TestCase):
    async def test_a_launchers_end_waits_for_its_jobs_which_its_pool_supervises(self):
        """Reported at its exit, its jobs were dropped from their pool at once,
        and a stopped one was never asked for a sign of life again."""
        ended: list[object] = []
        out = ChildOutput("QZMFLNCH", ended.append)
        lines, closed = _spawn(out)
        await _until(lambda: lines)
        await _until(lambda: False, 1.0)  # the child has exited by now
        self.assertEqual(ended, [])  # its job still holds the pipes
        os.kill(int(lines[0]), signal.SIGKILL)
        await closed
        self.assertEqual(len(ended), 1)


class _Server(ForkServer):
    """A ForkServer that starts nothing: what the shares ask of it is noted."""

    def __init__(self) -> None:
        super().__init__(reactor, ("QTMSSRCP", "QTPOPSRVP"))
        self.stops = 0
        self.spawned: list[str] = []

    @property
    def pid(self) -> int | None:
        return 1234

    def spawn_job(self, pgm, config_path, channel, on_started, on_ended):  # noqa: ANN001
        self.spawned.append(pgm)

    def stop(self) -> defer.Deferred:
        self.stops += 1
        return defer.succeed(None)


class LauncherShareTests(unittest.TestCase):
    def test_the_launcher_ends_with_the_last_pool_that_used_it(self):
        server = _Server()
        smtp, pop = server.share(), server.share()
        smtp.spawn_job("QTMSSRCP", "cfg", None, None, None)
        pop.spawn_job("QTPOPSRVP", "cfg", None, None, None)
        self.assertEqual(server.spawned, ["QTMSSRCP", "QTPOPSRVP"])
        smtp.stop()  # ENDPJ of SMTP: POP still uses it
        self.assertEqual(server.stops, 0)
        pop.stop()
        self.assertEqual(server.stops, 1)
        pop.spawn_job("QTPOPSRVP", "cfg", None, None, None)  # STRPJ: in use again
        smtp.stop()
        self.assertEqual(server.stops, 1)

    def test_wrkactjob_lists_it_once(self):
        server = _Server()
        smtp, pop = server.share(), server.share()
        self.assertEqual((smtp.pid, pop.pid), (None, None))  # nothing started yet
        pop.spawn_job("QTPOPSRVP", "cfg", None, None, None)
        self.assertEqual((smtp.pid, pop.pid), (None, 1234))
        smtp.spawn_job("QTMSSRCP", "cfg", None, None, None)
        self.assertEqual((smtp.pid, pop.pid), (1234, None))

    def test_an_entry_is_told_whether_another_started_one_uses_it(self):
        server = _Server()
        smtp, pop = server.share(), server.share()
        self.assertFalse(smtp.serves_others())
        pop.serving = lambda: True
        self.assertTrue(smtp.serves_others())
        self.assertFalse(pop.serves_others())
        self.assertFalse(ForkServer(reactor, ("QTMSCCLCP",)).serves_others())


class LauncherFailTests(unittest.TestCase):
    def test_a_program_that_cannot_start_is_a_boot_failure_and_a_full_table_is_not(self):
        import socket

        from twisted.internet.error import ProcessTerminated

        from twistmail.prestart.launch import ForkedProcess, ForkFailed, _Launcher

        launcher = _Launcher(reactor)
        ended: list = []
        for _ in range(2):
            a, b = socket.socketpair()
            b.close()
            launcher.pending.append((ForkedProcess(lambda pid: None, ended.append), a))
        launcher.lineReceived(b"FAIL cannot import twistmail.pop3.server: ImportError()")
        launcher.lineReceived(b"FAIL fork: Resource temporarily unavailable")
        self.assertFalse(ended[0].check(ForkFailed))
        self.assertTrue(ended[0].check(ProcessTerminated))
        self.assertTrue(ended[1].check(ForkFailed))


class AdoptTests(unittest.TestCase):
    def test_a_launcher_dead_before_it_is_adopted_is_passed_over(self):
        """Its pool waited on its closed channel until the bridge restarted."""
        import socket
        import time

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        theirs.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a zombie: exited, not reaped yet
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        server = ForkServer(reactor, ("QTMSCCLCP",))
        server.adopt(pid, ours)
        self.assertIsNone(server._current)  # the first start spawns a new one
