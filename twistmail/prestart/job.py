"""A prestart job: one long-lived process that serves one session at a time.

Started by the controller with the job end of a UNIX socketpair as fd 3.  It
adopts each socket passed over that channel, serves the session on it (TLS
first for the implicit-TLS listeners), and says FREE when the session ends.
It exits when told END while idle, after its session when told END while
busy, at SIGTERM, and by itself when the channel closes (the controller is
gone) - with PR_SET_PDEATHSIG as a second line of defence.

Run as ``python -m twistmail.prestart.job --pgm QTMSSRCP --config PATH``.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from twistmail import config as configmod
from twistmail import tlsconfig
from twistmail.lifeline import (
    die_with_parent,
    log_to_stderr,
    return_large_blocks,
    stop_once_on_sigterm,
)
from twistmail.prestart import channel
from twistmail.protocols.writenow import write_now

CHANNEL_FD = 3
#: Seconds a shutdown waits for the session's last replies to leave (a message
#: being queued gets its 250 before the 421); below the controller's KILL_AFTER.
SHUTDOWN_WAIT = 4.0
IMPLICIT_TLS = {"smtps", "pop3s"}
#: Why adopting a socket fails when its client has gone already.
CLIENT_GONE = {errno.ENOTCONN, errno.ECONNRESET}


@implementer(IFileDescriptorReceiver)
class JobChannel(LineOnlyReceiver):
    """The job's end of the control channel."""

    delimiter = channel.DELIMITER
    MAX_LENGTH = channel.MAX_LINE

    def __init__(self, job: Job) -> None:
        self.job = job
        self.fds: list[int] = []

    def connectionMade(self) -> None:
        self.sendLine(b"READY")

    def sendLine(self, line: bytes) -> None:
        """At once when the channel is idle: ACK and FREE then cost no extra turn."""
        write_now(self.transport, line + self.delimiter)

    def sendLines(self, lines: list[bytes]) -> None:
        write_now(self.transport, b"".join(line + self.delimiter for line in lines))

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.fds.append(descriptor)

    def lineReceived(self, line: bytes) -> None:
        verb, args = channel.parse(line)
        if verb == "FD" and self.fds:
            token, listener, family = args[0], args[1], int(args[2])
            # The greeting first: acknowledged first, the controller woke and
            # took the CPU before it (a fifth of the sessions/s one at a time).
            # Nothing is read from the client before the ACK is out, so one
            # whose job dies unacknowledged with nothing sent to it is handed
            # on untouched (see Pool._channel_lost).
            served = self.job.serve(self.fds.pop(0), listener, family)
            self.sendLine(b"ACK " + token.encode("ascii"))
            if not served:
                self.job.done()
        elif verb == "END":
            self.job.end_requested()
        elif verb == "CFG":
            self.job.reconfigure()
        elif verb == "CUT":
            self.job.cut_off()
        elif verb == "TASK" and args:
            self.job.run_task(args[0], line.split(b" ", 2)[2])
        elif verb == "PING":  # the reactor runs: the job is alive
            self.sendLine(b"PONG")

    def connectionLost(self, reason: object = None) -> None:
        self.job.channel_lost()


class Job:
    def __init__(self, reactor: Any, pgm: str, settings: configmod.Settings,
                 source: str | None = None) -> None:
        self.reactor = reactor
        self.pgm = pgm
        self.settings = settings
        self.source = source or str(settings.path)  # read again at each CFG
        self.sessions = 0
        self.ending = False
        self.stopping = False
        self.channel: JobChannel | None = None
        self.deliverer: Any = None
        self._retired: list[Any] = []  # deliverers a reload replaced, closed once idle
        #: One per task being delivered, fired once its RESULT is out.
        self._told: set[defer.Deferred] = set()
        self.journal: Any = None
        self._directory: Any = None
        self.tls_options: Any = None
        self._earlier: list[Factory] = []  # replaced at a reload while serving a session
        self.factories = self._factories()

    def _journal(self, name: str) -> Any:
        """The job's one journal: a reload reconfigures it rather than opening another."""
        from twistmail.journal import Journal

        if self.journal is None:
            self.journal = Journal.from_settings(self.settings, name)
        else:
            self.journal.configure(self.settings)
        return self.journal

    def directory(self) -> Any:
        """The job's one directory, kept across reloads: each has a connection
        in every pool thread, which a new one per reload left open (two file
        descriptors and some memory per reload).  Its file and domains are
        [system] settings, which only a restart changes."""
        from twistmail.directory import SqliteDirectory

        if self._directory is None:
            self._directory = SqliteDirectory.from_settings(self.settings)
        return self._directory

    def _factories(self, reload: bool = False) -> dict[str, Factory]:
        """The listeners' factories.  At a reload the TLS pair is loaded at
        once, so one that cannot serve keeps the old settings (SettingError)."""
        if self.pgm == "QTPOPSRVP":
            return self._pop_factories(reload)
        if self.pgm == "QTMSCCLCP":
            old, self.deliverer = self.deliverer, self._deliverer()
            if old is not None:
                self._retired.append(old)
                self._close_retired()
            return {}
        return self._smtp_factories(reload)

    def _deliverer(self) -> Any:
        from twistmail.queue import FileQueue
        from twistmail.smtp.delivery import Deliverer

        s = self.settings
        journal = self._journal(f"QTSMTPCLTP/{os.getpid()}")
        return Deliverer(self.reactor, s, FileQueue.for_settings(s), self.directory(), journal)

    def _close_retired(self) -> None:
        """A deliverer a reload replaced keeps a resolver that re-reads
        resolv.conf every minute for ever, and kept SMTP connections: closed
        once no task uses it (each reload leaked a resolver before)."""
        if self._told:
            return
        retired, self._retired = self._retired, []
        for old in retired:
            old.resolver.close()
            old.sessions.close_all()

    def run_task(self, token: str, payload: bytes) -> None:
        """An SMTP client job's work: deliver, report RESULT, then FREE."""
        self.sessions += 1
        prefix = b"PART " + token.encode("ascii") + b" "

        def part(outcome: bytes) -> None:
            if self.channel is not None:
                self.channel.sendLine(prefix + outcome)

        d = self.deliverer.run(payload, part)
        told = defer.Deferred()  # once its RESULT is out: a shutdown waits for it
        self._told.add(told)

        def finished(result: Any) -> Any:
            self._told.discard(told)
            self._close_retired()
            return result

        def reported(result: Any) -> Any:
            told.callback(None)
            return result

        d.addBoth(finished)
        d.addCallback(lambda result: self.done(b"RESULT " + token.encode("ascii") + b" " + result))
        d.addBoth(reported)

    @staticmethod
    def _tls(inner: Factory, options: Any) -> Factory:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return TLSMemoryBIOFactory(options, False, inner)

    def _tls_options(self, settings: configmod.Settings, reload: bool) -> Any:
        options = tlsconfig.JobOptions(settings)
        if reload:
            options.load()
        self.tls_options = options
        return options

    def _pop_factories(self, reload: bool) -> dict[str, Factory]:
        from twistmail.auth import mailbox_portal
        from twistmail.maildir import MaildirStore
        from twistmail.pop3.server import POP3Factory

        s = self.settings
        journal = self._journal(f"QTPOPSRVP/{os.getpid()}")
        directory = self.directory()
        store = MaildirStore(s.datadir / "mailboxes", s.hostname)
        portal = mailbox_portal(self.reactor, directory, store)
        options = self._tls_options(s, reload)
        out: dict[str, Factory] = {}
        for name in ("pop3", "pop3s"):
            factory = POP3Factory(
                reactor=self.reactor, hostname=s.hostname, portal=portal,
                directory=directory, journal=journal, inacttimo=s.pop.inacttimo,
                msgsplit_kb=s.pop.msgsplit, alwssl=s.pop.alwssl, tls_options=options,
                alwplainauth=s.pop.alwplainauth == "*YES",
                implicit_tls=name in IMPLICIT_TLS, on_done=self.done,
                on_auth_failure=self.auth_failed,
            )
            out[name] = self._tls(factory, options) if name in IMPLICIT_TLS else factory
        return out

    def _smtp_factories(self, reload: bool) -> dict[str, Factory]:
        from twistmail.queue import FileQueue
        from twistmail.smtp.backend import QueueBackend
        from twistmail.smtp.server import SMTPFactory

        s = self.settings
        journal = self._journal(f"{configmod.PROGRAMS[self.pgm]['job']}/{os.getpid()}")
        backend = QueueBackend(
            self.reactor, s, self.directory(), FileQueue.for_settings(s), journal
        )
        options = self._tls_options(s, reload)
        out: dict[str, Factory] = {}
        for name in ("smtp", "submission", "smtps"):
            factory = SMTPFactory(
                backend,
                self.reactor,
                maxmsgsize=s.smtp.maxmsgsize,
                maxrcpt=s.smtp.maxrcpt,
                inacttimo=s.smtp.inacttimo,
                alwbarelf=s.smtp.alwbarelf == "*YES",
                mime8bit=s.smtp.mime8bit == "*YES",
                on_done=self.done,
                listener=name,
                tls_options=options,
                implicit_tls=name in IMPLICIT_TLS,
                alwauth=s.smtp.alwauth,
                authmech=s.smtp.authmech,
                alwplainauth=s.smtp.alwplainauth == "*YES",
                maxerrors=s.limits.maxerrors,
                on_auth_failure=self.auth_failed,
                vfyfromusr=s.smtp.vfyfromusr_in_effect,
                etrnsvr=s.smtp.etrnsvr == "*YES",
                dsn=s.smtp.nfydlvry is not None,
            )
            out[name] = self._tls(factory, options) if name in IMPLICIT_TLS else factory
        return out

    def auth_failed(self, ip: str) -> None:
        """Tell the controller, which counts failures per address (MAXAUTHFAIL)."""
        if self.channel is not None:
            self.channel.sendLine(b"AUTHFAIL " + ip.encode("ascii", "replace"))

    def reconfigure(self) -> None:
        """Re-read the settings file; sessions from now on use the new values."""
        try:
            settings = configmod.load(self.source)
        except (configmod.SettingError, OSError) as e:
            print(f"settings not reloaded, keeping the old ones: {e}", file=sys.stderr)
            return
        old, self.settings = self.settings, settings
        previous = self.factories
        try:
            self.factories = self._factories(reload=True)
        except configmod.SettingError as e:  # a TLS pair changed on disk and unusable
            self.settings = old
            print(f"settings not reloaded, keeping the old ones: {e}", file=sys.stderr)
            return
        # A session under way keeps the settings it began with, and its
        # factory: a shutdown notice, a CUT or the wait for its last reply
        # must still find it.
        self._earlier = [f for f in (*previous.values(), *self._earlier)
                         if _live(_current(f))]

    def serve(self, fd: int, listener: str, family: int) -> bool:
        """Adopt the passed socket; False when it could not be served."""
        self.sessions += 1
        if listener in IMPLICIT_TLS and not tlsconfig.usable(self.tls_options):
            os.close(fd)  # said once in the log; the client sees the connection close
            return False
        try:
            # Twisted makes its copy non-blocking, which is the same flag.
            self.reactor.adoptStreamConnection(fd, family, self.factories[listener])
        except Exception as e:
            # A client that reset its connection before its session began is
            # gone, and nothing is to be looked at: it must not fill the log
            # with warnings at its will.
            if getattr(e, "errno", None) not in CLIENT_GONE:
                print(f"cannot adopt connection: {e!r}", file=sys.stderr)
            return False
        finally:
            os.close(fd)
        return True

    def _session(self, closing: bool = False) -> Any:
        """The session being served (a job serves one at a time), or None; with
        ``closing``, one that is closing and whose connection is not gone yet."""
        for factory in (*self.factories.values(), *self._earlier):
            session = _current(factory)
            if session is None or session.transport is None:
                continue
            if (session.closing and not session.lost) if closing else not session.closing:
                return session
        return None

    def cut_off(self) -> None:
        """The controller says the client's address used up MAXAUTHFAIL."""
        session = self._session()
        if session is not None:
            session.cut_off()

    def done(self, result: bytes | None = None) -> None:
        """A session or task is over: a task's RESULT line and FREE go in one write."""
        self.sessions -= 1
        lines = [] if result is None else [result]
        last = self.ending and self.sessions <= 0
        # A job on its way out (SIGTERM, its launcher gone) takes nothing more:
        # a FREE would have the controller hand it clients it never serves.
        if not last and not self.stopping:
            lines.append(channel.free_line())
        if lines and self.channel is not None:
            self.channel.sendLines(lines)
        if last:
            self.stop()

    def end_requested(self) -> None:
        self.ending = True
        if self.sessions <= 0:
            self.stop()

    def channel_lost(self) -> None:
        self.channel = None
        self.stop()

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            if self.deliverer is not None:  # kept SMTP connections get their QUIT
                d = self.deliverer.sessions.close_all()
                d.addBoth(lambda _: self.reactor.stop())
            else:
                self.reactor.stop()

    def shutting_down(self) -> defer.Deferred | None:
        """Tell the client; the reactor's shutdown waits (a while) for a reply due first."""
        self.stopping = True
        if self._told:
            # A client job: the message under way finishes (its reply is due;
            # cut off, it would be sent again although the next hop has it),
            # the others of its task are left to the bridge.
            for deliverer in (self.deliverer, *self._retired):
                deliverer.winding_down = True
            d = defer.DeferredList(list(self._told), consumeErrors=True)
            d.addTimeout(SHUTDOWN_WAIT, self.reactor)
            return d.addErrback(lambda _: None)
        session = self._session()
        if session is not None:  # ended while serving (ENDPJ's delay is over, a shutdown)
            d = session.shutdown_notice()
        else:
            # A session that closed a moment ago (QUIT that freed the job, which
            # was to end with it) may still have its last reply in the TLS
            # layer: the reactor's shutdown would drop it.
            session = self._session(closing=True)
            d = session.wait_gone() if session is not None else None
        if d is None:
            return None
        d.addTimeout(SHUTDOWN_WAIT, self.reactor)
        return d.addErrback(lambda _: None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twistmail-job")
    parser.add_argument("--pgm", required=True, choices=sorted(configmod.PROGRAMS))
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    return run(args.pgm, args.config)


def run(pgm: str, config: str, settings: configmod.Settings | None = None) -> int:
    """What a launcher runs in the forked job (a parser there cost each job a
    millisecond); ``settings``: those at ``config``, already read by it."""
    die_with_parent()
    return_large_blocks()
    log_to_stderr(f"{configmod.PROGRAMS[pgm]['job']}/{os.getpid()}")
    if settings is None:
        settings = configmod.load(config)

    from twisted.internet import reactor

    job = Job(reactor, pgm, settings, config)
    reactor.addSystemEventTrigger("before", "shutdown", job.shutting_down)
    stop_once_on_sigterm(reactor)
    chan = JobChannel(job)
    job.channel = chan
    reactor.adoptStreamConnection(CHANNEL_FD, socket.AF_UNIX, _OneProtocol(chan))
    os.close(CHANNEL_FD)
    reactor.run()
    return 0


def _current(factory: Factory) -> Any:
    """The session a listener's factory built last (TLS: its wrapped factory's)."""
    return getattr(getattr(factory, "wrappedFactory", factory), "current", None)


def _live(session: Any) -> bool:
    return session is not None and session.transport is not None and not session.lost


class _OneProtocol(Factory):
    def __init__(self, proto: JobChannel) -> None:
        self.proto = proto

    def buildProtocol(self, addr: object) -> JobChannel:
        return self.proto


if __name__ == "__main__":
    sys.exit(main())
