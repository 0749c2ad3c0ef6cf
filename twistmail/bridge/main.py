"""The bridge process (QTSMTPBRSR with the mail server framework).

Started and supervised by the controller.  For now it journals its start and
waits for work; it ends at SIGTERM, and by itself if the controller dies.

Run as ``python -m twistmail.bridge.main --config PATH``.
"""

from __future__ import annotations

import argparse
import os
import sys

from twistmail import config as configmod
from twistmail.lifeline import die_with_parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twistmail-bridge")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    die_with_parent()
    settings = configmod.load(args.config)

    from twisted.internet import reactor

    from twistmail.journal import Journal

    journal = Journal(
        settings.datadir / "journal",
        f"QTSMTPBRSR/{os.getpid()}",
        enabled=settings.smtp.journal == "*YES",
        receiver_size=settings.journal.receiver_size,
    )
    journal.write("JM", "JM STR QTSMTPBRSR", pid=os.getpid())
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
