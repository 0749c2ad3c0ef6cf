"""The bridge process (QTSMTPBRSR with the mail server framework).

Started and supervised by the controller.  It drains QTMSINQ into the local
mailboxes, forwards remote recipients to QTMSOUTQ, writes nondelivery
notices, and parks mail on QTMSBSSQ while storage is short.  It ends at
SIGTERM (work in progress is resumed at the next start), and by itself if the
controller dies.

Run as ``python -m twistmail.bridge.main --config PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from twistmail import config as configmod
from twistmail.lifeline import die_with_parent, log_to_stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twistmail-bridge")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    # A CHGPJE/CHGSMTPA arriving while the bridge starts must neither end it
    # nor be lost: it is noted, and the settings are read again once running.
    reload_asked: list[int] = []
    signal.signal(signal.SIGHUP, lambda *_: reload_asked.append(1))
    die_with_parent()
    log_to_stderr()
    settings = configmod.load(args.config)

    from twisted.internet import reactor

    from twistmail.bridge.inbound import InboundProcessor
    from twistmail.bridge.manager import QueueManager
    from twistmail.directory import SqliteDirectory
    from twistmail.journal import Journal
    from twistmail.maildir import MaildirStore
    from twistmail.queue import FileQueue
    from twistmail.smtp.backend import storage_used_percent

    journal = Journal.from_settings(settings, f"QTSMTPBRSR/{os.getpid()}")
    journal.write("JM", "JM STR QTSMTPBRSR", pid=os.getpid())
    datadir = settings.datadir
    threshold = settings.storage.threshold
    probe = _Probe(lambda: storage_used_percent(datadir) > threshold)
    queue = FileQueue.for_settings(settings)
    processor = InboundProcessor(
        hostname=settings.hostname,
        queue=queue,
        directory=SqliteDirectory.from_settings(settings),
        mailboxes=MaildirStore(datadir / "mailboxes", settings.hostname),
        snads=MaildirStore(datadir / "snads", settings.hostname),
        journal=journal,
        storage_full=probe,
        ftracn=settings.smtp.ftracn,
        responsible=settings.smtp.nfydlvry,
    )
    manager = QueueManager(reactor, queue, processor, journal, probe)
    pool, outbound = _outbound(reactor, settings, queue, processor.directory)
    reactor.callWhenRunning(manager.start)
    reactor.callWhenRunning(pool.start)
    reactor.callWhenRunning(outbound.start)
    reactor.addSystemEventTrigger("before", "shutdown", manager.stop)
    reactor.addSystemEventTrigger("before", "shutdown", outbound.stop)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: pool.end("*CNTRLD", float(settings.prestart.end_delay),
                                               reason="shutdown"))
    status = _StatusFile(reactor, settings.datadir / "run" / "QTMSCCLCP.json", pool)
    reactor.callWhenRunning(status.start)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(
        _reload, args.config, pool, outbound, processor))
    if reload_asked:
        reactor.callWhenRunning(_reload, args.config, pool, outbound, processor)
    reactor.run()
    return 0


def _outbound(reactor, settings, queue, directory):  # noqa: ANN001, ANN202
    from twistmail.bridge.outbound import OutboundManager
    from twistmail.controller.service import limits_of
    from twistmail.journal import Journal
    from twistmail.prestart.pool import Pool

    pool = Pool(reactor, "QTMSCCLCP", settings.prestart.QTMSCCLCP, limits_of(settings),
                str(settings.path), Journal.from_settings(settings, f"QTSMTPBRSR/{os.getpid()}"),
                b"")
    outbound = OutboundManager(reactor, settings, queue, directory,
                               Journal.from_settings(settings, f"QTSMTPBRSR/{os.getpid()}"),
                               pool)
    return pool, outbound


def _reload(config_path: str, pool, outbound, processor) -> None:  # noqa: ANN001
    """SIGHUP from the controller: CHGPJE of QTMSCCLCP, CHGSMTPA, applied live."""
    from twistmail.controller.service import limits_of

    try:
        settings = configmod.load(config_path)
    except (configmod.SettingError, OSError) as e:
        print(f"settings not reloaded, keeping the old ones: {e}", file=sys.stderr)
        return
    pool.reconfigure(settings.prestart.QTMSCCLCP, limits_of(settings))
    pool.reload_jobs()
    outbound.configure(settings)
    processor.ftracn = settings.smtp.ftracn
    processor.responsible = settings.smtp.nfydlvry


class _StatusFile:
    """DSPACTPJ and WRKACTJOB of the client pool, for the controller to read.

    It also carries out DSPACTPJ RESET requests (``bridge.status``).
    """

    def __init__(self, reactor, path: Path, pool) -> None:  # noqa: ANN001
        self.reactor = reactor
        self.path = path
        self.pool = pool
        self.last_reset: dict | None = None

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
            data = {"report": self.pool.report(), "jobs": self.pool.listing(),
                    "at": time.time(), "reset": self.last_reset}
            tmp.write_text(json.dumps(data, default=str))
            os.replace(tmp, self.path)
        except Exception as e:  # the loop must go on: it is the only status there is
            print(f"cannot write {self.path}: {e!r}", file=sys.stderr)

    def remove(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


class _Probe:
    """Storage use, checked at most once a second (it is asked per message)."""

    def __init__(self, check) -> None:  # noqa: ANN001
        self.check = check
        self.at = 0.0
        self.full = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.at >= 1.0:
            self.at = now
            self.full = self.check()
        return self.full


if __name__ == "__main__":
    sys.exit(main())
