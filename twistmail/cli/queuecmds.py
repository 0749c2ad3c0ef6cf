"""WRKQ: what is in the mail queues, like Postfix's ``mailq``.

Reads the envelope files under ``<datadir>/queue`` (setting
``system.datadir``) and never talks to the daemon nor writes anything, so an
administrator can look at the queues while the appliance is down or busy.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from twistmail.cli.base import Failure, app, cli, usage_error
from twistmail.cli.output import emit_table
from twistmail.interfaces import QUEUES
from twistmail.queue import PENDING, FileQueue, QueueEntry, Recipient

COLUMNS = (
    ("id", "id"),
    ("queue", "queue"),
    ("age", "age"),
    ("size", "size"),
    ("originator", "from"),
    ("recipients", "to"),
    ("attempts", "attempts"),
    ("next_try", "next try"),
)
_BY_LOWER = {q.lower(): q for q in QUEUES}


def queue_name(value: str) -> str:
    """The queue's canonical name; administrators type QTMSINQ, qtmsinq or HOLD alike."""
    name = _BY_LOWER.get(value.strip().lower())
    if name is None:
        usage_error(f"--queue: {value!r} is not a queue; allowed: {', '.join(QUEUES)}")
    return name


def human_age(seconds: float) -> str:
    """The largest whole unit, as mailq users read it at a glance: 5s, 3m, 2h, 1d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _recipient(r: Recipient) -> str:
    return r.address if r.state == PENDING else f"{r.address} ({r.state})"


def _next_try(when: float | None, now: float) -> str:
    if when is None:
        return ""
    return "due" if when <= now else f"in {human_age(when - now)}"


def table_row(entry: QueueEntry, now: float) -> dict[str, Any]:
    if entry.error is not None:
        originator = f"(unreadable: {entry.error})"
    else:
        originator = entry.originator or "<>"
    return {
        "id": entry.id,
        "queue": entry.queue,
        "age": human_age(entry.age),
        "size": entry.size,
        "originator": originator,
        "recipients": ", ".join(_recipient(r) for r in entry.recipients),
        "attempts": entry.attempts,
        "next_try": _next_try(entry.next_try, now),
    }


def totals_line(entries: Iterable[QueueEntry], only: str | None = None) -> str:
    """``-- 3 messages, 12345 bytes: QTMSINQ 2, QTMSOUTQ 1`` (Postfix's mailq footer).

    With ``only`` that queue is named even when empty, so "0" is an answer.
    """
    count: Counter[str] = Counter()
    size = 0
    for e in entries:
        count[e.queue] += 1
        size += e.size
    queues = [only] if only is not None else [q for q in QUEUES if count[q]]
    per_queue = ", ".join(f"{q} {count[q]}" for q in queues)
    total = sum(count.values())
    head = f"-- {total} message{'' if total == 1 else 's'}, {size} bytes"
    return f"{head}: {per_queue}" if per_queue else head


@cli.command("wrkq")
@click.option(
    "--queue",
    "queue",
    metavar="Q",
    help=f"Only this queue (any case): {', '.join(QUEUES)}.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--release", metavar="ID", help="Release a quarantined message for delivery.")
@click.option("--delete", metavar="ID", help="Delete a quarantined message.")
def wrkq(queue: str | None, as_json: bool, release: str | None, delete: str | None) -> None:
    """List queued messages: id, queue, age, size, originator, recipients, attempts, next try.

    With --release or --delete, act on one message in quarantine (kept there by
    a content filter with FTRACN *KEEP); a released message skips the filters.
    """
    if release or delete:
        _quarantine_action(release, delete)
        return
    name = queue_name(queue) if queue is not None else None
    spool = FileQueue.for_settings(app().settings, create=False)
    now = time.time()
    entries = list(spool.entries(name, now=now))
    if as_json:
        emit_table((e.to_dict() for e in entries), COLUMNS, as_json=True)
        return
    emit_table((table_row(e, now) for e in entries), COLUMNS, as_json=False, empty="(no messages)")
    click.echo(totals_line(entries, name))


def _quarantine_action(release: str | None, delete: str | None) -> None:
    from twistmail.interfaces import QTMSINQ, QUARANTINE
    from twistmail.journal import Journal
    from twistmail.queue import is_queue_id

    if release and delete:
        usage_error("--release and --delete: give one of them")
    qid = release or delete
    option = "--release" if release else "--delete"
    if not is_queue_id(qid):
        usage_error(f"{option}: {qid!r} is not a queue id; allowed: the id wrkq shows")
    settings = app().settings
    spool = FileQueue.for_settings(settings, create=False)
    try:
        env = spool.load(QUARANTINE, qid)
    except KeyError:
        raise Failure(f"{option}: message {qid} is not in quarantine") from None
    journal = Journal.from_settings(settings, f"WRKQ/{os.getpid()}")
    if release:
        spool.move(qid, QUARANTINE, QTMSINQ, env.note({"released": time.time()}))
        journal.write("OW", f"OW REL {qid}", qid, action="released by the administrator")
        click.echo(f"message {qid} released to {QTMSINQ}")
    else:
        spool.remove(QUARANTINE, qid)
        journal.write("OW", f"OW DLT {qid}", qid, action="deleted by the administrator")
        click.echo(f"message {qid} deleted from quarantine")


def _dstq(dstq: str) -> Path:
    from twistmail.bridge.outbound import hold_flag

    if dstq.strip().upper() != "QSMTPQ":
        usage_error(f"--dstq: {dstq!r} is not a distribution queue here; allowed: QSMTPQ "
                    "(the queue SMTP delivers from)")
    return hold_flag(FileQueue.for_settings(app().settings).root)


@cli.command()
@click.option("--dstq", default="QSMTPQ", show_default=True, help="Distribution queue: QSMTPQ")
@click.option("--pty", default="*NORMAL", show_default=True, help="*NORMAL or *HIGH")
def hlddstq(dstq: str, pty: str) -> None:
    """Hold outbound delivery (HLDDSTQ): mail stays queued and visible in wrkq."""
    flag = _dstq(dstq)
    flag.touch()
    click.echo("QSMTPQ held: outbound mail stays queued until rlsdstq")


@cli.command()
@click.option("--dstq", default="QSMTPQ", show_default=True, help="Distribution queue: QSMTPQ")
@click.option("--pty", default="*NORMAL", show_default=True, help="*NORMAL or *HIGH")
def rlsdstq(dstq: str, pty: str) -> None:
    """Release outbound delivery held with hlddstq (RLSDSTQ).

    With a mail transfer interval (MAILXFRINT) it also sends the mail waiting
    for the next scheduled transfer now, with ETRN when ETRNCLT is *YES.
    """
    from twistmail.bridge.outbound import request_transfer

    flag = _dstq(dstq)
    flag.unlink(missing_ok=True)
    if app().settings.smtp.mailxfrint:
        request_transfer(flag.parent)
        click.echo("QSMTPQ released: a mail transfer starts now")
    else:
        click.echo("QSMTPQ released: outbound delivery resumes")
