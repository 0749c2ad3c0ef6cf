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
import os
import sys
import time

from twistmail import config as configmod
from twistmail.lifeline import die_with_parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twistmail-bridge")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    die_with_parent()
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
    )
    manager = QueueManager(reactor, queue, processor, journal, probe)
    reactor.callWhenRunning(manager.start)
    reactor.addSystemEventTrigger("before", "shutdown", manager.stop)
    reactor.run()
    return 0


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
