"""``wrkq --delete`` of mail waiting in the bridge's queues: QTMSOUTQ, the retry
queues and QTMSBSSQ.

Mail for a destination that will never take it (a mistyped domain, the
backscatter of spam) waits there for days, and parked mail fills the disk
it waits for.  The bridge alone moves those messages and alone knows which
one a client job is sending, so the command does not touch them: it leaves
a request, a file named after the message in ``queue/delete/``, and the
bridge acts on it at its next scan (within a second for the outbound
queues, sooner when inotify tells; within a rescan for QTMSBSSQ).  A
message being sent is deleted when that attempt ends: what the attempt
delivered stays delivered.  The request then goes; one for a message that
left the queues meanwhile (delivered, returned) becomes ``<id>.gone``, so
the command can tell the two apart.  Requests outlive a restart: one made
while the bridge is down is acted on when it starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from twistmail.interfaces import QTMSBSSQ, QTMSOUTQ, QTMSRTQ1, QTMSRTQ2
from twistmail.queue import PENDING, RETRY, Envelope, is_queue_id

DIRECTORY = "delete"
GONE = ".gone"
#: The queues whose messages a request deletes: the outbound side's, and QTMSBSSQ's.
OUTBOUND = (QTMSOUTQ, QTMSRTQ1, QTMSRTQ2)
DELETABLE = (*OUTBOUND, QTMSBSSQ)
#: A ``.gone`` answer nobody read (the command was interrupted) is cleared after this.
KEEP_ANSWER = 3600.0


def request(queue_root: Path, qid: str) -> None:
    """Ask the bridge to delete message ``qid``."""
    d = queue_root / DIRECTORY
    d.mkdir(mode=0o700, exist_ok=True)  # as private as the queues beside it
    (d / (qid + GONE)).unlink(missing_ok=True)  # an earlier answer is not this one's
    (d / qid).touch()


def asked(queue_root: Path) -> list[str]:
    """The messages the administrator asked to delete, oldest request first.

    Clears the answers nobody read.  Names that are not queue ids (put there
    by hand) are ignored.
    """
    d = queue_root / DIRECTORY
    found = []
    now = time.time()
    try:
        with os.scandir(d) as it:
            for entry in it:
                name = entry.name
                try:
                    mtime = entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                if name.endswith(GONE):
                    if now - mtime > KEEP_ANSWER:
                        (d / name).unlink(missing_ok=True)
                elif is_queue_id(name):
                    found.append((mtime, name))
    except OSError:  # none asked for, or none readable: the queues go on all the same
        return []
    return [name for _, name in sorted(found)]


def delete(queue: Any, journal: Any, qid: str, where: str, code: str) -> None:
    """Delete ``qid`` from ``where``, journal it as ``code`` and answer the request.

    The caller alone moves the message out of ``where`` meanwhile.
    """
    try:
        env: Envelope | None = queue.load(where, qid)
    except (KeyError, ValueError):  # unreadable: deleted all the same, as asked
        env = None
    queue.remove(where, qid)
    waiting = [] if env is None else \
        [r.address for r in env.recipients if r.state in (PENDING, RETRY)]
    journal.write(code, f"{code} DLT {where}", qid, queue=where,
                  originator=None if env is None else env.originator,
                  recipients=waiting, action="deleted by the administrator")
    answer(queue.root, qid, deleted=True)


def pending(queue_root: Path) -> set[str]:
    """The messages asked for and not yet deleted (for ``wrkq``, which writes nothing)."""
    try:
        return {name for name in os.listdir(queue_root / DIRECTORY) if is_queue_id(name)}
    except OSError:
        return set()


def answer(queue_root: Path, qid: str, deleted: bool) -> None:
    """The request is done: the message was deleted, or had left the queues (``.gone``)."""
    d = queue_root / DIRECTORY
    if deleted:
        (d / qid).unlink(missing_ok=True)
    else:
        try:
            os.replace(d / qid, d / (qid + GONE))
        except FileNotFoundError:
            pass


def outcome(queue_root: Path, qid: str) -> str:
    """For the command: "asked" (still waiting), "gone" (answer read and cleared) or "done"."""
    d = queue_root / DIRECTORY
    if (d / qid).exists():
        return "asked"
    try:
        (d / (qid + GONE)).unlink()
    except FileNotFoundError:
        return "done"
    return "gone"
