"""A QMSF job: one mail server framework job, one message at a time.

IBM's STRMSF starts NBRMSFJOB copies of the QMSF job, and each handles one
message at a time.  Here too: the bridge starts them as processes (forks of
its launcher, :mod:`twistmail.prestart.forkserver`), sends each
the id of a message in QTMSINQ on its channel (fd 3), and the job runs the
framework's steps on it (:class:`InboundProcessor`) and answers with one
line.  As processes, the jobs use every core; the bridge itself only
dispatches.

    bridge -> job:  <queue id>
    job -> bridge:  DONE <queue id> | GONE <queue id> | FAIL <queue id> <reason>
                    WORK   (still at work on the message: it has many recipients)

The job ends when the channel closes (the bridge ends it, ENDMSF *CNTRLD,
after the message in hand), and at once at SIGKILL, which the kernel sends
when its parent dies: every step can be repeated without a second copy, so
a message cut short is simply processed again.  SIGKILL, not SIGTERM: a
stopped job would keep a SIGTERM pending, and the daemon's lock with it.
SIGHUP reads the settings again before the next message (CHGSMTPA FTRACN,
NFYDLVRY).

Also runs as ``python -m twistmail.bridge.msf --config PATH``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from twistmail import config as configmod
from twistmail.lifeline import die_with_parent, name_process
from twistmail.storagefault import storage_fault

CHANNEL_FD = 3
JOB_NAME = "QMSF"
#: Seconds between WORK lines while one message takes long: well within the
#: bridge's limit (msfjobs.STEP_LIMIT), and none at all for most messages.
WORK_EVERY = 30.0
NBRMSFJOB = 3  # STRMSF's default: how many QMSF jobs the bridge runs


class StorageProbe:
    """Storage use, checked at most once a second (it is asked per message)."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self.check = check
        self.at = -1.0
        self.full = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if self.at < 0 or now - self.at >= 1.0:
            self.at = now
            self.full = self.check()
        return self.full


def storage_probe(settings: configmod.Settings) -> StorageProbe:
    """True while the file system of ``datadir`` is above ``[storage] threshold``."""
    from twistmail.smtp.backend import storage_used_percent

    datadir, threshold = settings.datadir, settings.storage.threshold
    return StorageProbe(lambda: storage_used_percent(datadir) > threshold)


def build_processor(settings: configmod.Settings, job: str) -> Any:
    from twistmail.bridge.inbound import InboundProcessor
    from twistmail.directory import SqliteDirectory
    from twistmail.journal import Journal
    from twistmail.maildir import MaildirStore
    from twistmail.queue import FileQueue

    datadir = settings.datadir
    return InboundProcessor(
        hostname=settings.hostname,
        queue=FileQueue.for_settings(settings),
        directory=SqliteDirectory.from_settings(settings),
        mailboxes=MaildirStore(datadir / "mailboxes", settings.hostname),
        snads=MaildirStore(datadir / "snads", settings.hostname),
        journal=Journal.from_settings(settings, job),
        storage_full=storage_probe(settings),
        ftracn=settings.smtp.ftracn,
        responsible=settings.smtp.nfydlvry,
    )


def answer(processor: Any, queue_id: str) -> bytes:
    """Process one message; the reply line for the bridge."""
    try:
        processor.process(queue_id)
    except KeyError:
        return f"GONE {queue_id}".encode()  # taken or moved already
    except Exception as e:
        fault = storage_fault(e)
        if fault is None:  # a full or read-only disk is said in the one line
            traceback.print_exc(file=sys.stderr)
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        # FULL: the disk, not the message; it waits for room without a count.
        verb = "FAIL" if fault is None else "FULL"
        return f"{verb} {queue_id} {reason}".encode("utf-8", "replace")
    return f"DONE {queue_id}".encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twistmail-msf")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    return run(JOB_NAME, args.config)


def run(pgm: str, config: str, settings: configmod.Settings | None = None) -> int:
    """What a launcher runs in the forked job; ``settings``: those at ``config``,
    already read by the launcher."""
    reload_asked: list[int] = []
    signal.signal(signal.SIGHUP, lambda *_: reload_asked.append(1))
    die_with_parent(sig=signal.SIGKILL)
    name_process(JOB_NAME)
    if settings is None:
        settings = configmod.load(config)
    processor = build_processor(settings, f"{JOB_NAME}/{os.getpid()}")
    channel = socket.socket(fileno=CHANNEL_FD)
    processor.progress = _Progress(channel)
    try:
        with channel.makefile("rb") as lines:
            for line in lines:
                queue_id = line.strip().decode("ascii", "replace")
                if not queue_id:
                    continue
                if reload_asked:
                    reload_asked.clear()
                    _reload(config, processor)
                processor.progress.start()
                channel.sendall(answer(processor, queue_id) + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        # The bridge is gone (ENDMSF *IMMED, killed): so is this job.  What it
        # did is in the queue; a message it had not answered for is taken
        # again by the next bridge, and makes no second copy.
        pass
    finally:
        # A job ends by os._exit (see forkserver), which runs no atexit.
        processor.queue.spares.flush()
    return 0


class _Progress:
    """WORK to the bridge, at most every WORK_EVERY seconds, so it does not take
    a job busy with a large delivery for a stopped one."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.start()

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= WORK_EVERY:
            self.last = now
            self.channel.sendall(b"WORK\n")

    def start(self) -> None:
        self.last = time.monotonic()


def _reload(config_path: Any, processor: Any) -> None:
    try:
        settings = configmod.load(config_path)
    except (configmod.SettingError, OSError) as e:
        print(f"settings not reloaded, keeping the old ones: {e}", file=sys.stderr)
        return
    processor.ftracn = settings.smtp.ftracn
    processor.responsible = settings.smtp.nfydlvry
    processor.storage_full = storage_probe(settings)  # CHGSMTPA/[storage] threshold
    processor.journal.configure(settings)


if __name__ == "__main__":
    sys.exit(main())
