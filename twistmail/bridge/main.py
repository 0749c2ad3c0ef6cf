"""The bridge process (QTSMTPBRSR with the mail server framework).

Started and supervised by the controller.  It drains QTMSINQ into the local
mailboxes, forwards remote recipients to QTMSOUTQ, writes nondelivery
notices, and parks mail on QTMSBSSQ while storage is short: the queue
manager here hands each message to one of its QMSF job processes
(:mod:`twistmail.bridge.msf`), which do that work.  It also runs outbound
delivery with its QTMSCCLCP client jobs.  It ends at
SIGTERM (work in progress is resumed at the next start), and by itself if the
controller dies.  Its fd 3 is the state directory's lock, which it and its
QMSF jobs hold while they live (``twistmail.controller.datadirlock``).

Run as ``python -m twistmail.bridge.main --config PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from twistmail import config as configmod
from twistmail.bridge.msf import JOB_NAME, NBRMSFJOB
from twistmail.lifeline import die_with_parent, log_to_stderr, stop_once_on_sigterm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twistmail-bridge")
    parser.add_argument("--config", required=True)
    parser.add_argument("--nbrmsfjob", type=int, default=NBRMSFJOB)
    parser.add_argument("--parent", type=int, help="the controller's pid")
    args = parser.parse_args(argv)
    # A CHGPJE/CHGSMTPA arriving while the bridge starts must neither end it
    # nor be lost: it is noted, and the settings are read again once running.
    reload_asked: list[int] = []
    signal.signal(signal.SIGHUP, lambda *_: reload_asked.append(1))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # born blocked (bridgeslot)
    # SIGTERM: when the controller dies, the bridge ends in a controlled way
    # (END_DELAY and more); a new daemon waits for it (the state directory's lock).
    die_with_parent(args.parent)
    # The QMSF jobs hold the state directory's lock too (our fd 3): while one
    # still works, no new daemon starts on the same queues.  Forked before our
    # log is set up: a client job sets up its own.
    launcher = _fork_launcher((JOB_NAME,), keep_fd=_lock_fd())
    client_launcher = _fork_launcher(("QTMSCCLCP",))
    log_to_stderr()
    settings = configmod.load(args.config)

    from twisted.internet import reactor

    from twistmail.bridge.manager import QueueManager
    from twistmail.bridge.msf import storage_probe
    from twistmail.bridge.msfjobs import MsfJobs
    from twistmail.directory import SqliteDirectory
    from twistmail.journal import Journal
    from twistmail.queue import FileQueue

    journal = Journal.from_settings(settings, f"QTSMTPBRSR/{os.getpid()}")
    journal.write("JM", "JM STR QTSMTPBRSR", pid=os.getpid())
    queue = FileQueue.for_settings(settings)
    jobs = MsfJobs(reactor, args.config, args.nbrmsfjob, journal, _fork_server(reactor, launcher))
    manager = QueueManager(reactor, queue, jobs, journal, storage_probe(settings))
    pool, outbound = _outbound(reactor, settings, args.config, queue,
                               SqliteDirectory.from_settings(settings))
    if client_launcher is not None:
        pool.launcher.adopt(*client_launcher)
    run_dir = settings.datadir / "run"
    reactor.callWhenRunning(_client_jobs, outbound, pool, run_dir)
    # The outbound side moves queued mail too: it starts after the first recovery.
    reactor.callWhenRunning(lambda: manager.start().addBoth(lambda _: outbound.start()))
    reactor.addSystemEventTrigger("before", "shutdown", manager.stop)
    reactor.addSystemEventTrigger("before", "shutdown", jobs.stop)
    reactor.addSystemEventTrigger("before", "shutdown", outbound.stop)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: pool.end("*CNTRLD", float(settings.prestart.end_delay),
                                               reason="shutdown"))
    status = _StatusFile(reactor, settings.datadir / "run" / "QTMSCCLCP.json", pool, jobs)
    reactor.callWhenRunning(status.start)
    from twisted.internet import task

    sweep = task.LoopingCall(_sweep_mailboxes, settings.datadir)
    reactor.callWhenRunning(sweep.start, SWEEP_EVERY)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(
        _reload, args.config, pool, outbound, jobs, manager))
    if reload_asked:
        reactor.callWhenRunning(_reload, args.config, pool, outbound, jobs, manager)
    stop_once_on_sigterm(reactor)
    reactor.run()
    return 0


#: Seconds between sweeps of the mailboxes' tmp/ directories (the first at start).
SWEEP_EVERY = 3600.0


def _sweep_mailboxes(datadir: Path):  # noqa: ANN202
    """What killed deliveries left in tmp/ of POP mailboxes and SNADS stores,
    swept in a thread (a directory per profile)."""
    from twisted.internet import threads

    from twistmail.maildir import sweep_tmp

    def told(result: tuple[int, list[str]]) -> None:
        removed, problems = result
        if removed:
            print(f"removed {removed} files in mailboxes' tmp/ that deliveries ended "
                  "midway left there 36 hours ago or more", file=sys.stderr)
        if problems:
            print(f"sweeping the mailboxes' tmp/ passed over {len(problems)} it cannot look "
                  f"into: {'; '.join(problems[:3])}", file=sys.stderr)

    def failed(f: Any) -> None:
        print(f"sweeping the mailboxes' tmp/ failed: {f.getErrorMessage()}", file=sys.stderr)

    d = threads.deferToThread(sweep_tmp, [datadir / "mailboxes", datadir / "snads"])
    return d.addCallbacks(told, failed)


def _lock_fd() -> int | None:
    """fd 3, the controller's lock on the state directory, when it passed one."""
    try:
        os.fstat(3)
    except OSError:
        return None
    return 3


def _fork_launcher(programs: tuple[str, ...],
                  keep_fd: int | None = None) -> tuple[int, socket.socket] | None:
    """A jobs' launcher, forked now: no reactor and no thread exist yet.

    The QMSF jobs' launcher is forked first, so it does not carry what only
    the client jobs import.  Both cost no interpreter start of their own:
    exec'd, a launcher takes a quarter of a second of CPU for its imports,
    which the bridge has done anyway.  A launcher that dies later is
    replaced by an exec'd one, as usual.
    """
    from twistmail.prestart.forkserver import fork_launcher

    try:
        return fork_launcher(programs, keep_fd=keep_fd)
    except OSError as e:  # the jobs' launcher will be started the usual way
        print(f"cannot fork the {'/'.join(programs)} jobs' launcher: {e}", file=sys.stderr)
        return None


def _client_jobs(outbound, pool, run_dir: Path) -> None:  # noqa: ANN001
    """The client jobs start with the bridge unless ENDTCPSVR *SMTP holds them."""
    from twistmail.bridge.status import smtp_ended

    outbound.smtp_server(not smtp_ended(run_dir))
    if not pool.active:  # the launcher forked for them would wait for nothing
        pool.launcher.stop()


def _fork_server(reactor, launcher):  # noqa: ANN001, ANN202
    from twistmail.prestart.launch import ForkServer

    server = ForkServer(reactor, (JOB_NAME,))
    if launcher is not None:
        server.adopt(*launcher)
    return server


def _outbound(reactor, settings, config_path, queue, directory):  # noqa: ANN001, ANN202
    from twistmail.bridge.outbound import OutboundManager
    from twistmail.controller.service import limits_of
    from twistmail.journal import Journal
    from twistmail.prestart.pool import Pool

    pool = Pool(reactor, "QTMSCCLCP", settings.prestart.QTMSCCLCP, limits_of(settings),
                config_path, Journal.from_settings(settings, f"QTSMTPBRSR/{os.getpid()}"),
                b"")
    outbound = OutboundManager(reactor, settings, queue, directory,
                               Journal.from_settings(settings, f"QTSMTPBRSR/{os.getpid()}"),
                               pool)
    return pool, outbound


def _reload(config_path: str, pool, outbound, jobs, manager) -> None:  # noqa: ANN001
    """SIGHUP from the controller: CHGPJE of QTMSCCLCP, CHGSMTPA, applied live."""
    from twistmail.bridge.msf import storage_probe
    from twistmail.bridge.status import smtp_ended
    from twistmail.controller.service import limits_of

    try:
        settings = configmod.load(config_path)
    except (configmod.SettingError, OSError) as e:
        print(f"settings not reloaded, keeping the old ones: {e}", file=sys.stderr)
        return
    entry, limits = settings.prestart.QTMSCCLCP, limits_of(settings)
    if entry != pool.entry or limits != pool.limits:  # journaled (JA) only when changed
        pool.reconfigure(entry, limits)
    pool.reload_jobs()
    outbound.configure(settings)
    outbound.smtp_server(not smtp_ended(settings.datadir / "run"))
    jobs.reload()
    manager.storage_full = storage_probe(settings)  # [storage] threshold: park, release
    for journal in (jobs.journal, pool.journal, outbound.journal):
        journal.configure(settings)  # CHGSMTPA JOURNAL, receiver size


class _StatusFile:
    """DSPACTPJ and WRKACTJOB of the client pool and the QMSF jobs, for the controller.

    It also carries out DSPACTPJ RESET requests (``bridge.status``).
    """

    def __init__(self, reactor, path: Path, pool, msf) -> None:  # noqa: ANN001
        self.reactor = reactor
        self.path = path
        self.pool = pool
        self.msf = msf
        self.last_reset: dict | None = None
        self.failing: str | None = None  # the error told, until writing works again

    def start(self) -> None:
        from twisted.internet import task

        self.loop = task.LoopingCall(self.write)
        self.loop.clock = self.reactor
        self.loop.start(1.0, now=True)
        self.reactor.addSystemEventTrigger("after", "shutdown", self.remove)

    def write(self) -> None:
        from twistmail.bridge.status import take_reset_request

        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            token = take_reset_request(self.path.parent)
            if token is not None:
                self.last_reset = {"token": token, "report": self.pool.report(reset=True)}
            data = {"report": self.pool.report(),
                    "jobs": self.pool.listing() + self.msf.listing(),
                    "at": time.time(), "pid": os.getpid(), "reset": self.last_reset}
            tmp.write_text(json.dumps(data, default=str))
            os.replace(tmp, self.path)
        except Exception as e:  # the loop must go on: it is the only status there is
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # what a full disk cut short
            if repr(e) != self.failing:  # once, not every second of a full disk
                self.failing = repr(e)
                print(f"cannot write {self.path}: {e!r}", file=sys.stderr)
            return
        if self.failing is not None:
            self.failing = None
            print(f"{self.path} is written again", file=sys.stderr)

    def remove(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
