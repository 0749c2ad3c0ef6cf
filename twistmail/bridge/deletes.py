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
the command can tell the two apart.  A deleter claims a request before it
deletes (``<id>.<queue>.deleting``): two readers never answer one request
two ways, and one killed in the middle leaves its claim to be finished at
the next start.  Requests outlive a restart: one made while the bridge is
down is acted on when it starts.
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
CLAIMED = ".deleting"
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


def _claim(queue_root: Path, qid: str, where: str) -> Path:
    return queue_root / DIRECTORY / f"{qid}.{where}{CLAIMED}"


def claims(queue_root: Path) -> list[tuple[str, str]]:
    """The deletions a process claimed and did not finish: (id, queue) pairs.

    Read once at the start, by the side that deletes from that queue: while
    the bridge runs, a claim is a deletion under way.
    """
    try:
        names = os.listdir(queue_root / DIRECTORY)
    except OSError:
        return []
    found = []
    for name in names:
        if name.endswith(CLAIMED):
            qid, _, where = name[:-len(CLAIMED)].partition(".")
            if is_queue_id(qid) and where in DELETABLE:
                found.append((qid, where))
    return found


def delete(queue: Any, journal: Any, qid: str, where: str, code: str,
           claimed: bool = False) -> None:
    """Delete ``qid`` from ``where``, journal it as ``code`` and answer the request.

    The request is claimed first (renamed ``<id>.<queue>.deleting``): a
    request claimed is never answered "gone" by another reader, and a
    process killed in the middle leaves the claim for ``resume``.  The
    caller alone moves the message out of ``where`` meanwhile.
    """
    claim = _claim(queue.root, qid, where)
    if not claimed:
        try:
            os.replace(queue.root / DIRECTORY / qid, claim)
        except FileNotFoundError:
            return  # answered meanwhile
    try:
        env: Envelope | None = queue.load(where, qid)
    except (KeyError, ValueError):  # unreadable: deleted all the same, as asked
        env = None
    try:
        queue.remove(where, qid)
    except KeyError:  # it moved on meanwhile: asked for again where it went
        os.replace(claim, queue.root / DIRECTORY / qid)
        return
    _deleted(journal, qid, where, code, env)
    claim.unlink(missing_ok=True)


def resume(queue: Any, journal: Any, qid: str, where: str, code: str) -> None:
    """Finish a deletion a killed process claimed.

    Nothing moves a message out of ``where`` before its deleter has resumed
    its claims, so a message no longer there is the one this claim deleted.
    """
    found = queue.find(qid)
    if found == where:
        delete(queue, journal, qid, where, code, claimed=True)
    elif found is None:
        _deleted(journal, qid, where, code, None)
        _claim(queue.root, qid, where).unlink(missing_ok=True)
    else:  # cannot be; asked for again rather than lost
        os.replace(_claim(queue.root, qid, where), queue.root / DIRECTORY / qid)


def _deleted(journal: Any, qid: str, where: str, code: str, env: Envelope | None) -> None:
    waiting = [] if env is None else \
        [r.address for r in env.recipients if r.state in (PENDING, RETRY)]
    about = {} if env is None else {"originator": env.originator, "recipients": waiting}
    journal.write(code, f"{code} DLT {where}", qid, queue=where, **about,
                  action="deleted by the administrator")


def pending(queue_root: Path) -> set[str]:
    """The messages asked for and not yet deleted (for ``wrkq``, which writes nothing)."""
    try:
        names = os.listdir(queue_root / DIRECTORY)
    except OSError:
        return set()
    return {name.partition(".")[0] for name in names if not name.endswith(GONE)}


def answer_gone(queue_root: Path, qid: str) -> None:
    """The message left the queues before it was deleted: ``<id>.gone``.

    Only an unclaimed request is answered so: one claimed is being deleted.
    """
    d = queue_root / DIRECTORY
    try:
        os.replace(d / qid, d / (qid + GONE))
    except FileNotFoundError:
        pass


def outcome(queue_root: Path, qid: str) -> str:
    """For the command: "asked" (still waiting), "gone" (answer read and cleared) or "done"."""
    d = queue_root / DIRECTORY
    if (d / qid).exists() or any(_claim(queue_root, qid, q).exists() for q in DELETABLE):
        return "asked"
    try:
        (d / (qid + GONE)).unlink()
    except FileNotFoundError:
        return "done"
    return "gone"
