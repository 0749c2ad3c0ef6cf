"""WRKQ: what is in the mail queues, like Postfix's ``mailq``; HLDDSTQ, RLSDSTQ.

Works on the files under ``<datadir>/queue`` (setting ``system.datadir``)
and never talks to the daemon, so an administrator can look at the queues,
and hold them, while the appliance is down or busy.  Listing writes
nothing; the bridge picks up a hold, a release, a released message or a
message to delete within a second.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from twistmail.bridge import deletes
from twistmail.cli.base import Failure, app, cli, usage_error
from twistmail.cli.output import emit_table
from twistmail.durable import fsync_dir
from twistmail.interfaces import (
    CORRUPT,
    HOLD,
    QTMSBSSQ,
    QTMSINQ,
    QTMSOUTQ,
    QTMSRTQ1,
    QTMSRTQ2,
    QUARANTINE,
    QUEUES,
)
from twistmail.queue import PENDING, FileQueue, QueueEntry, Recipient

COLUMNS = (
    ("id", "id"),
    ("queue", "queue"),
    ("age", "age"),
    ("size", "size"),
    ("originator", "from"),
    ("recipients", "to"),
    ("state", "state"),
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


def _human_wait(seconds: float) -> str:
    """A time to come, to the nearest of its largest unit: a retry due in 86,397 s
    is "in 1d", not "in 23h" (as an age would read)."""
    for unit, size, within in (("d", 86400, 60), ("h", 3600, 60), ("m", 60, 0.5)):
        if seconds >= size - within:
            return f"{round(seconds / size)}{unit}"
    return f"{max(1, round(seconds))}s"


def _recipient(r: Recipient) -> str:
    """The address, with why it waits (mailq's "(reason)") or how it ended."""
    if r.state != PENDING:
        return f"{r.address} ({r.state})"
    if r.last_error:
        why = " ".join(r.last_error.split())
        return f"{r.address} ({why[:77] + '...' if len(why) > 80 else why})"
    return r.address


def _next_try(when: float | None, now: float) -> str:
    if when is None:
        return ""
    return "due" if when <= now else f"in {_human_wait(when - now)}"


def state_of(entry: QueueEntry, now: float, held: bool, stopped: bool = False,
             deleting: bool = False) -> str:
    """One word for where a message stands, as mailq's markers say it."""
    queue = entry.queue
    if entry.error is not None or queue == CORRUPT:
        return "damaged"  # set aside for the administrator
    if deleting and queue in deletes.DELETABLE:
        return "deleting"  # wrkq --delete asked; the bridge has yet to act on it
    if queue == QTMSOUTQ:
        if held:
            return "held"  # HLDDSTQ
        if stopped:
            return "stopped"  # no bridge to send it: ENDMSF, or the daemon down
        if entry.next_try is not None and entry.next_try > now and not entry.early:
            return "waiting"  # for the next mail transfer (MAILXFRINT)
        return "sending"
    return {QTMSINQ: "arrived", QTMSRTQ1: "retry", QTMSRTQ2: "retry",
            QTMSBSSQ: "parked", QUARANTINE: "quarantined", HOLD: "held"}.get(queue, "")


def table_row(entry: QueueEntry, now: float, held: bool = False,
              stopped: bool = False, deleting: bool = False) -> dict[str, Any]:
    if entry.error is not None and entry.originator is None:
        originator = "(unreadable)"  # why: on a line of its own below the table
    else:
        originator = entry.originator or "<>"
    return {
        "id": entry.id,
        "queue": entry.queue,
        "age": human_age(entry.age),
        "size": entry.size,
        "originator": originator,
        "recipients": ", ".join(_recipient(r) for r in entry.recipients),
        "state": state_of(entry, now, held, stopped, deleting),
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


@contextmanager
def _readable(what: str) -> Iterator[None]:
    """File errors as one line: queues are mode 0700, readable only by the daemon's user."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise Failure(f"{what}: {e.strerror or e}{where}") from None


def _spool(listing: bool = False) -> FileQueue:
    """The queues of this configuration, never created here: a wrong datadir is said.

    A listing of queues that do not exist yet is simply empty.
    """
    settings = app().settings
    spool = FileQueue.for_settings(settings, create=False)
    if not listing and not spool.root.is_dir():
        raise Failure(f"no mail queues in {spool.root}: the appliance has not run with "
                      f"datadir {settings.datadir}")
    return spool


@cli.command("wrkq")
@click.option(
    "--queue",
    "queue",
    metavar="Q",
    help=f"Only this queue (any case): {', '.join(QUEUES)}.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--release", metavar="ID",
              help="Release a message in quarantine or corrupt/ for delivery.")
@click.option("--delete", metavar="ID", multiple=True,
              help="Delete a message on QTMSOUTQ, QTMSRTQ1, QTMSRTQ2, QTMSBSSQ, in "
              "quarantine or in corrupt/ (repeatable); ALL with --queue: all of that queue.")
@click.option("--retry", is_flag=True,
              help="Try the remote mail on QTMSRTQ1 and QTMSRTQ2 now (the try does not "
              "count).")
def wrkq(queue: str | None, as_json: bool, release: str | None,
         delete: tuple[str, ...], retry: bool) -> None:
    """List queued messages: id, queue, age, size, originator, recipients, attempts, next try.

    With --release or --delete, act on one message kept for the administrator:
    in quarantine (kept there by a content filter with FTRACN *KEEP; released,
    it skips the filters) or in corrupt/ (set aside by the bridge; released,
    it goes back to QTMSINQ once its envelope and body can be read).

    --delete also takes a message waiting to be sent (QTMSOUTQ, QTMSRTQ1,
    QTMSRTQ2) or parked (QTMSBSSQ): the bridge deletes it, without a notice,
    within seconds; one being sent at that moment, when that attempt ends
    (what it delivered stays delivered).  --delete ALL --queue QTMSRTQ2
    deletes everything waiting there, as postsuper -d ALL deferred does.

    --retry, once what made the mail fail is mended, tries the remote mail on
    the retry queues now, as postqueue -f does, and as an ETRN would: a try
    that fails again uses no retry up.
    """
    if sum((release is not None, bool(delete), retry)) > 1:
        usage_error("--release, --delete and --retry: give one of them")
    if queue is not None and (release is not None or retry or (
            delete and not any(d.strip().upper() == "ALL" for d in delete))):
        usage_error("--queue: only to list one queue, or with --delete ALL; allowed: "
                    "wrkq --queue Q, wrkq --delete ALL --queue Q")
    if as_json and (release is not None or delete or retry):
        # What an action says is a sentence, not a listing: --json would be ignored.
        usage_error("--json: only for the listing; allowed: wrkq [--queue Q] --json")
    if retry:
        _retry_now()
        return
    if release is not None:
        _release(release)
        return
    if delete:
        _delete(list(delete), queue)
        return
    from twistmail.bridge.outbound import held_parts
    from twistmail.bridge.status import bridge_running, smtp_ended

    name = queue_name(queue) if queue is not None else None
    now = time.time()
    with _readable("the queues cannot be read"):
        spool = _spool(listing=True)
        entries = list(spool.entries(name, now=now))
        # ENDTCPSVR *SMTP holds outbound mail as HLDDSTQ does.
        held = bool(held_parts(spool.root)) or smtp_ended(spool.root.parent / "run")
        stopped = not bridge_running(spool.root.parent / "run", time.time())
        deleting = deletes.pending(spool.root)
    if as_json:
        emit_table(({**e.to_dict(), "state": state_of(e, now, held, stopped, e.id in deleting)}
                    for e in entries), COLUMNS, as_json=True)
        return
    emit_table((table_row(e, now, held, stopped, e.id in deleting) for e in entries), COLUMNS,
               as_json=False, empty="(no messages)")
    click.echo(totals_line(entries, name))
    for e in entries:  # set aside: say why, readable or not
        if e.error is not None:
            click.echo(f"{e.id} set aside: {e.error}")


def _checked_id(option: str, qid: str) -> str:
    from twistmail.queue import is_queue_id

    if not is_queue_id(qid):
        usage_error(f"{option}: {qid!r} is not a queue id; allowed: the id wrkq shows")
    return qid


def _release(qid: str) -> None:
    _checked_id("--release", qid)
    with _readable(f"--release {qid}"):
        spool = _spool()
        for queue in (QUARANTINE, CORRUPT):
            with _locked(spool.queue_dir(queue)):
                if qid in spool.list(queue):
                    _act_on_kept(spool, queue, qid, "--release", True)
                    return
        where = spool.find(qid)
    # An id that names nothing --release can take is a bad value, as
    # DLTUSRPF's of a profile that does not exist.
    if where is None:
        usage_error(f"--release: message {qid} is in no queue; allowed: a message in "
                    "quarantine or corrupt/")
    usage_error(f"--release: message {qid} is on {where}; allowed: a message in "
                "quarantine or corrupt/")


def _retry_now() -> None:
    from twistmail.bridge.outbound import held_parts, request_retry
    from twistmail.bridge.status import bridge_running, smtp_ended

    with _readable("--retry"):
        spool = _spool()
        waiting = len(spool.list(QTMSRTQ1)) + len(spool.list(QTMSRTQ2))
        if not waiting:
            click.echo(f"no messages on {QTMSRTQ1} or {QTMSRTQ2}")
            return
        request_retry(spool.root)
        run = spool.root.parent / "run"
        held = held_parts(spool.root) or smtp_ended(run)
        running = bridge_running(run, time.time())
    many = waiting > 1
    what = f"{waiting} message{'s' if many else ''} on the retry queues"
    they, are = ("they", "are") if many else ("it", "is")
    if not running:
        click.echo(f"{what}: the bridge is not running; {they} {are} tried when it starts "
                   "(strmsf)")
    elif held:
        click.echo(f"{what}: {they} {are} put back on {QTMSOUTQ}, where outbound delivery is "
                   "held (hlddstq, or endtcpsvr *SMTP) until it is released")
    else:
        click.echo(f"{what}: {they} {are} tried now")


#: The queues --delete takes a message from.
DELETE_FROM = (*deletes.DELETABLE, QUARANTINE, CORRUPT)


def _delete(given: list[str], queue: str | None) -> None:
    """Delete messages: those kept for the administrator here, the bridge's by the bridge."""
    if any(g.strip().upper() == "ALL" for g in given):
        if len(given) > 1:
            usage_error("--delete: ALL goes alone; allowed: ALL with --queue, or message ids")
        if queue is None:
            usage_error(f"--delete ALL: --queue is needed; allowed: {', '.join(DELETE_FROM)}")
        name = queue_name(queue)
        if name not in DELETE_FROM:
            usage_error(f"--queue: {name} cannot be emptied with --delete ALL; allowed: "
                        f"{', '.join(DELETE_FROM)}")
        with _readable(f"--delete ALL --queue {name}"):
            ids = _spool().list(name)
        if not ids:
            click.echo(f"no messages on {name}")
            return
    else:
        ids = list(dict.fromkeys(_checked_id("--delete", g) for g in given))
    one = len(ids) == 1
    problems: list[str] = []
    by_bridge: list[tuple[str, str]] = []
    deleted = 0
    later: list[str] = []
    from twistmail.journal import Journal

    with _readable("--delete"):
        spool = _spool()
        journal = Journal.from_settings(app().settings, f"WRKQ/{os.getpid()}")
        # Each kept queue is listed once, under its lock: a spam run leaves
        # tens of thousands there, and a listing per message took minutes.
        with _locked(spool.queue_dir(QUARANTINE)), _locked(spool.queue_dir(CORRUPT)):
            kept = {q: set(spool.list(q)) for q in (QUARANTINE, CORRUPT)}
            others = []
            for qid in ids:
                queue_of = next((q for q in kept if qid in kept[q]), None)
                if queue_of is None:
                    others.append(qid)
                    continue
                _act_on_kept(spool, queue_of, qid, "--delete", False, journal, quiet=not one)
                deleted += 1
        for qid in others:
            where = spool.find(qid)
            if where in deletes.DELETABLE:
                by_bridge.append((qid, where))
            elif where is None:
                problems.append(f"message {qid} is in no queue")
            else:
                problems.append(f"message {qid} is on {where}")
        if by_bridge:
            by_it, not_deleted, later = _delete_by_bridge(spool, by_bridge, one)
            deleted += by_it
            problems += not_deleted
    if deleted and not one:
        click.echo(f"{deleted} message{'s' if deleted > 1 else ''} deleted")
    for line in later:
        click.echo(line)
    if not problems:
        return
    # Ids that name nothing --delete can take are bad values (exit 2); a
    # deletion the bridge could not make is a failure (exit 1).
    fail = Failure if any("was not deleted" in p for p in problems) else click.UsageError
    if len(ids) == 1:
        [problem] = problems
        allowed = "" if "was not deleted" in problem else \
            f"; allowed: a message in {', '.join(deletes.DELETABLE)}, quarantine or corrupt/"
        raise fail(f"--delete: {problem}{allowed}")
    shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
    raise fail(f"--delete: {len(problems)} of {len(ids)} messages not deleted: {shown}")


#: How long wrkq --delete waits for the bridge's next answer.
DELETE_WAIT = 10.0


def _delete_by_bridge(spool: FileQueue, items: list[tuple[str, str]],
                      one: bool) -> tuple[int, list[str], list[str]]:
    """Ask the bridge, which alone moves these messages, and wait for its answers;
    return how many it deleted, what it did not, and what it deletes later."""
    from twistmail.bridge.status import bridge_running

    for qid, _ in items:
        deletes.request(spool.root, qid)
    if not bridge_running(spool.root.parent / "run", time.time()):
        if one:
            qid, where = items[0]
            click.echo(f"message {qid} on {where}: the bridge is not running; it deletes the "
                       "message when it starts (strmsf)")
        else:
            click.echo(f"{len(items)} messages: the bridge is not running; it deletes them "
                       "when it starts (strmsf)")
        return 0, [], []
    waiting = dict(items)
    deleted = 0
    problems = []
    heard = time.monotonic()
    while waiting and time.monotonic() - heard < DELETE_WAIT:
        for qid, where in list(waiting.items()):
            state = deletes.outcome(spool.root, qid)
            if state == "asked":
                continue
            heard = time.monotonic()
            del waiting[qid]
            if state == "done":
                deleted += 1
                if one:
                    click.echo(f"message {qid} deleted")
            else:
                problems.append(f"message {qid} was not deleted: it left {where} meanwhile "
                                "(delivered, returned or set aside); dspjrn tells which")
        if waiting:
            time.sleep(0.1)
    parked = sum(1 for where in waiting.values() if where == QTMSBSSQ)
    sending = len(waiting) - parked
    if one and waiting:
        [(qid, where)] = waiting.items()
        if parked:
            click.echo(f"message {qid} on {where}: the bridge deletes it at its next look at "
                       f"{where}")
        else:
            click.echo(f"message {qid} is being sent now; the bridge deletes it when this "
                       "attempt ends (what it delivers meanwhile stays delivered)")
        return deleted, problems, []
    later = []
    if sending:
        later.append(f"{sending} more being sent now: the bridge deletes each when its "
                     "attempt ends (what it delivers meanwhile stays delivered)")
    if parked:
        later.append(f"{parked} more on {QTMSBSSQ}: the bridge deletes them at its next look "
                     f"at {QTMSBSSQ}")
    return deleted, problems, later


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One administrator's action on quarantine (or corrupt/) at a time.

    The bridge never touches a message kept there; two commands at once
    could (a release and a delete of one id would bring back an envelope
    whose body the delete removed).
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _act_on_kept(spool: FileQueue, queue: str, qid: str, option: str, release: bool,
                 journal: Any = None, quiet: bool = False) -> None:
    from twistmail.journal import Journal

    if journal is None:
        journal = Journal.from_settings(app().settings, f"WRKQ/{os.getpid()}")
    code, where = ("OW", "quarantine") if queue == QUARANTINE else ("7Z", "corrupt/")
    if not release:
        spool.remove(queue, qid)
        journal.write(code, f"{code} DLT {qid}", qid, action="deleted by the administrator")
        if not quiet:
            click.echo(f"message {qid} deleted from {where}")
        return
    try:
        env = spool.load(queue, qid)
    except ValueError as e:  # the bridge set it aside for this: it stays
        raise Failure(f"{option}: message {qid} cannot be released, its envelope cannot be "
                      f"read ({e}); it stays in {where}") from None
    if not spool.body_path(qid, queue).exists():
        raise Failure(f"{option}: message {qid} cannot be released, its body is gone; "
                      f"it stays in {where}")
    if spool.body_damage(queue, env) is not None:
        # Cut short: what is left goes, as the administrator asks; the
        # envelope takes its size so that the bridge does not set it aside again.
        left = os.stat(spool.body_path(qid, queue)).st_size
        trace = min(env.trace, left)  # cut inside its trace fields: none of the message is left
        size = left - trace
        click.echo(f"message {qid}: its body is {size} bytes, {env.size} when it was "
                   "received; released as it is")
        env = env.evolve(size=size, trace=trace)
    held_by = spool.find(qid)  # the first queue that holds it: QUEUES has these two last
    if held_by != queue:
        raise Failure(f"{option}: message {qid} cannot be released, {held_by} holds a "
                      f"message with that id")
    # A quarantined message skips the filters that kept it; one from corrupt/ does not.
    note = {"released": time.time()} if queue == QUARANTINE else {"restored": time.time()}
    spool.move(qid, queue, QTMSINQ, env.note(note))
    journal.write(code, f"{code} REL {qid}", qid, action="released by the administrator")
    click.echo(f"message {qid} released to {QTMSINQ}")


def _dstq(dstq: str, pty: str) -> tuple[Path, str]:
    """The queue root (where the hold flags are) and the canonical priority."""
    from twistmail.bridge.outbound import HOLD_FLAGS

    if dstq.strip().upper() != "QSMTPQ":
        usage_error(f"--dstq: {dstq!r} is not a distribution queue here; allowed: QSMTPQ "
                    "(the queue SMTP delivers from)")
    part = pty.strip().upper()
    if part not in HOLD_FLAGS:
        usage_error(f"--pty: {pty!r} is not allowed; allowed: {', '.join(HOLD_FLAGS)}")
    return _spool().root, part


@cli.command()
@click.option("--dstq", default="QSMTPQ", show_default=True, help="Distribution queue: QSMTPQ")
@click.option("--pty", default="*NORMAL", show_default=True, help="*NORMAL or *HIGH")
def hlddstq(dstq: str, pty: str) -> None:
    """Hold outbound delivery (HLDDSTQ): mail stays queued and visible in wrkq.

    SMTP mail has no SNADS priority: holding either part holds it all, until
    every held part is released.
    """
    from twistmail.bridge.outbound import hold_flag

    root, part = _dstq(dstq, pty)
    flag = hold_flag(root, part)
    with _readable(f"QSMTPQ {part} not held"):
        if flag.exists():
            click.echo(f"QSMTPQ {part} was held already: outbound mail stays queued until "
                       "rlsdstq")
            return
        flag.touch()
        fsync_dir(root)  # a hold that a power loss undoes would send mail
    click.echo(f"QSMTPQ {part} held: outbound mail stays queued until rlsdstq")


@cli.command()
@click.option("--dstq", default="QSMTPQ", show_default=True, help="Distribution queue: QSMTPQ")
@click.option("--pty", default="*NORMAL", show_default=True, help="*NORMAL or *HIGH")
def rlsdstq(dstq: str, pty: str) -> None:
    """Release outbound delivery held with hlddstq (RLSDSTQ).

    With a mail transfer interval (MAILXFRINT) it also sends the mail waiting
    for the next scheduled transfer now, with ETRN when ETRNCLT is *YES.
    """
    from twistmail.bridge.outbound import held_parts, hold_flag, request_transfer
    from twistmail.bridge.status import smtp_ended

    root, part = _dstq(dstq, pty)
    with _readable(f"QSMTPQ {part} not released"):
        flag = hold_flag(root, part)
        was_held = flag.exists()
        flag.unlink(missing_ok=True)
        fsync_dir(root)
        still = held_parts(root)
        if still:
            click.echo(f"QSMTPQ {part} released; {' and '.join(still)} still held: "
                       "outbound mail stays queued until rlsdstq --pty " + still[0])
            return
        if smtp_ended(root.parent / "run"):
            click.echo("QSMTPQ released; the SMTP server is ended (ENDTCPSVR): outbound mail "
                       "stays queued until strtcpsvr --server *SMTP")
            return
        if app().settings.smtp.mailxfrint:
            request_transfer(root)
            click.echo("QSMTPQ released: a mail transfer starts now, or as soon as the "
                       "appliance runs")
        elif was_held:
            click.echo("QSMTPQ released: outbound delivery resumes")
        else:
            click.echo(f"QSMTPQ {part} was not held: outbound delivery goes on")
