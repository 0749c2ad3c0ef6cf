"""DSPJRN and CHGJRN for the QZMF journal.

Both work on the files under ``<datadir>/journal`` and never talk to the
daemon, so an administrator can trace a message while the appliance is down.
``dspjrn --outfile`` writes CSV as IBM's DSPJRN OUTPUT(*OUTFILE) writes a
database file: one row per entry, ready for a spreadsheet or SQL.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from twistmail import journal
from twistmail.cli.base import Failure, app, cli, usage_error, value_of
from twistmail.cli.output import emit_table, table_row
from twistmail.identity import as_invoker
from twistmail.settingtypes import Choice

COLUMNS = (
    ("seq", "seq"),
    ("time", "time (UTC)"),
    ("code", "code"),
    ("job", "job"),
    ("msgid", "msgid"),
    ("esd", "esd"),
)
CSV_COLUMNS = ("seq", "ts", "code", "job", "msgid", "esd")
OUTPUT = Choice(("*", "*OUTFILE"))
GENERATED = Choice(("*GEN",))


def _journal_option(f: Any) -> Any:
    return click.option(
        "--jrn",
        default=journal.JOURNAL,
        show_default=True,
        metavar="QZMF",
        help="The journal (only QZMF, the mail server framework's journal).",
    )(f)


def _check_jrn(value: str) -> None:
    name = value.strip().upper()
    if name not in (journal.JOURNAL, f"QUSRSYS/{journal.JOURNAL}"):
        usage_error(f"--jrn: {value!r} is not allowed; allowed: {journal.JOURNAL}")


def _directory() -> Path:
    return journal.journal_directory(app().settings)


#: IBM's ENTTYP for every QZMF entry (log entry), and its default: all entries.
_EVERY_ENTRY = ("LG", "*ALL")


def _codes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    try:
        # Commas, or blanks as in a CL list; an empty item between commas is named.
        patterns = [p for part in text.split(",") for p in part.split() or [part]]
        named = [p for p in patterns if p.upper() not in _EVERY_ENTRY]
        checked = journal.check_code_patterns(named, known=journal.CODES) if named else []
        if len(named) < len(patterns):
            return None  # every entry, whatever else is named with it (once it is valid)
        return checked
    except ValueError as e:
        usage_error(f"--code: {e}")


def _time(option: str, text: str | None, end_of_day: bool = False) -> datetime | None:
    if text is None:
        return None
    try:
        return journal.parse_time(text, end_of_day=end_of_day)
    except ValueError as e:
        usage_error(f"{option}: {e}")


def _short_time(entry: dict[str, Any]) -> str:
    """``2024-05-01 10:30:00.123``: milliseconds are enough next to the seq."""
    ts = str(entry.get("ts", ""))
    return ts.replace("T", " ")[:23]


def _table_row(entry: dict[str, Any]) -> dict[str, Any]:
    row = {k: entry.get(k) for k, _ in COLUMNS}
    row["time"] = _short_time(entry)
    return row


#: The columns of ``dspjrn --follow``, which cannot size them from rows it
#: has yet to see: wide enough for a job name (QTSMTPSRVP/4194304) and a
#: queue id, as the table that ``dspjrn`` prints sizes them.
FOLLOW_WIDTHS = {"time": 23, "code": 4, "job": 18, "msgid": 22}


def _follow_row(cells: dict[str, Any], seq_width: int) -> str:
    return table_row(cells, COLUMNS, {**FOLLOW_WIDTHS, "seq": seq_width})


def _seq_width(directory: Path) -> int:
    """The seq column as wide as the last seq: it grows past the rows the widths come from."""
    return max(len("seq"), len(str(journal.last_seq(directory))))


def _write_csv(path: str, entries: Iterable[dict[str, Any]]) -> int:
    """The OUTFILE: fixed columns, then the structured fields as one JSON column."""
    count = 0
    try:
        with as_invoker():
            # O_NONBLOCK: a named pipe with no reader is refused (ENXIO) rather
            # than waited on; one being read, /dev/null, a terminal are written.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:  # the name given is the mistake: a directory that is not there...
        why = ("is a named pipe that nothing reads" if e.errno == errno.ENXIO
               else f"cannot be written: {e.strerror or e}")
        usage_error(f"--outfile: {path!r} {why}; allowed: a file the invoking user may "
                    "write, in a directory that exists")
    os.set_blocking(fd, True)
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.ftruncate(fd, 0)  # written anew, as OUTMBR(*REPLACE)
    f = open(fd, "w", newline="", encoding="utf-8")
    try:
        with f:
            out = csv.writer(f)
            out.writerow([*CSV_COLUMNS, "fields"])
            for entry in entries:
                rest = {k: v for k, v in entry.items() if k not in CSV_COLUMNS}
                row = [entry.get(k) for k in CSV_COLUMNS]
                out.writerow([*row, json.dumps(rest, ensure_ascii=False) if rest else ""])
                count += 1
    except OSError as e:
        raise Failure(f"--outfile: cannot write {path!r}: {e.strerror or e}") from None
    return count


#: Entries ``dspjrn --follow`` shows from before it started, without --from.
FOLLOW_LAST = 10


def _follow(entries: Iterator[dict[str, Any]], as_json: bool, seq_width: int) -> None:
    """The entries as they come: JSON lines, or the rows of ``dspjrn``'s table."""
    try:
        if not as_json:
            click.echo(_follow_row(dict(COLUMNS), seq_width))
        for entry in entries:
            if as_json:
                click.echo(json.dumps(entry, ensure_ascii=False))
            else:
                click.echo(_follow_row(_table_row(entry), seq_width))
    except KeyboardInterrupt:
        pass


@cli.command("dspjrn")
@_journal_option
@click.option("--follow", is_flag=True,
              help="Keep printing new entries as they are written; without --from, "
                   f"the last {FOLLOW_LAST} of the receiver being written first, as tail -f.")
@click.option("--code", "code_text", metavar="PATTERNS",
              help="Entry codes, e.g. 9S,8*,J* (LG or *ALL: all).")
@click.option("--msgid", metavar="ID", help="Only the entries of this queue id.")
@click.option("--from", "from_text", metavar="T",
              help="From this time, in UTC as the journal shows it (ISO 8601, with an "
                   "offset for local time; MMDDYY [HHMMSS]; or -10m, -2h).")
@click.option("--to", "to_text", metavar="T",
              help="Up to this time, in UTC (as --from).")
@click.option("--json", "as_json", is_flag=True, help="JSON (JSON lines with --follow).")
@click.option("--outfile", metavar="F.csv", help="Write the entries to a CSV file.")
@click.option("--output", default=None,
              help="* (shown) or *OUTFILE (written to --outfile), as DSPJRN OUTPUT; "
                   "*OUTFILE when --outfile is given.")
def dspjrn(
    jrn: str,
    follow: bool,
    code_text: str | None,
    msgid: str | None,
    from_text: str | None,
    to_text: str | None,
    as_json: bool,
    outfile: str | None,
    output: str | None,
) -> None:
    """Display the QZMF journal (DSPJRN JRN(QZMF)); works with the daemon down."""
    _check_jrn(jrn)
    if output is not None:
        output = value_of("--output", OUTPUT, output)
    if output == "*OUTFILE" and outfile is None:
        usage_error("--output: *OUTFILE needs --outfile; allowed: *, or *OUTFILE with --outfile")
    if output == "*" and outfile is not None:
        usage_error("--outfile: only with --output *OUTFILE; allowed: --output * without "
                    "--outfile, or --outfile with --output *OUTFILE (or no --output)")
    if msgid is not None:
        from twistmail.queue import is_queue_id

        # An id copied in capitals is the same id; anything else matched
        # nothing, silently, as if the message had no entries.
        if not is_queue_id(msgid.strip().lower()):
            usage_error(f"--msgid: {msgid!r} is not a queue id; allowed: a queue id as wrkq "
                        "and the journal show it (22 characters 0-9, a-f)")
        msgid = msgid.strip().lower()
    codes = _codes(code_text)
    since = _time("--from", from_text)
    until = _time("--to", to_text, end_of_day=True)
    if outfile is not None and (follow or as_json):
        usage_error("--outfile: not allowed with --follow or --json; allowed: one output")
    if since is not None and until is not None and until < since:
        usage_error(f"--to: {to_text!r} is before --from; allowed: a time after --from")
    selection = {"codes": codes, "msgid": msgid, "since": since, "until": until}
    directory = _directory()
    if follow:
        _follow(journal.follow(directory, **selection, last=FOLLOW_LAST,
                               gone=lambda text: click.echo(f"dspjrn: {text}", err=True)),
                as_json, _seq_width(directory) + 2)
        return
    entries = journal.read_entries(directory, **selection)
    if outfile is not None:
        count = _write_csv(outfile, entries)
        click.echo(f"{count} entries written to {os.path.abspath(outfile)}")
        return
    rows = entries if as_json else (_table_row(e) for e in entries)
    emit_table(rows, COLUMNS, as_json, empty="(no journal entries)", stream=True,
               least={"seq": _seq_width(directory)})


@cli.command("chgjrn")
@_journal_option
@click.option("--jrnrcv", default="*GEN", show_default=True,
              help="*GEN: the next receiver, named by the system.")
def chgjrn(jrn: str, jrnrcv: str) -> None:
    """Attach a new journal receiver (CHGJRN JRNRCV(*GEN)) and print its name."""
    _check_jrn(jrn)
    value_of("--jrnrcv", GENERATED, jrnrcv)
    directory = _directory()
    jr = journal.Journal.from_settings(app().settings, f"CHGJRN/{os.getpid()}")
    try:
        name = jr.new_receiver()
    except OSError as e:
        raise Failure(f"cannot attach a new receiver in {directory}: {e.strerror or e}") from None
    finally:
        jr.close()
    click.echo(name)


@cli.command("dltjrnrcv")
@click.option("--jrnrcv", required=True, metavar="NAME",
              help=f"A detached receiver: its file name ({journal.receiver_name(3)}) or "
              f"number (3); {journal.JOURNAL}* deletes every detached one.")
def dltjrnrcv(jrnrcv: str) -> None:
    """Delete journal receivers no longer attached (DLTJRNRCV).

    The attached receiver stays: CHGJRN first to detach it.  With
    [journal] keep_receivers the oldest go by themselves.
    """
    directory = _directory()
    present = {n: p.name for n, p in journal.receivers(directory)}
    if not present:
        raise Failure(f"no journal receivers in {directory}")
    wanted = _receiver_numbers(jrnrcv.strip(), present)
    jr = journal.Journal(directory, f"DLTJRNRCV/{os.getpid()}")
    try:
        gone, attached, kept = jr.delete_detached(wanted)
    except OSError as e:
        raise Failure(f"cannot delete receivers in {directory}: {e.strerror or e}") from None
    finally:
        jr.close()
    if kept is not None and not gone and wanted is not None:  # named, and kept
        raise Failure(f"{kept} is kept: it holds the last sequence number, and the attached "
                      f"receiver {attached} holds no entry yet")
    if wanted is not None and not gone:
        usage_error(f"--jrnrcv: {jrnrcv!r} is the attached receiver; allowed: a detached one "
                    "(chgjrn attaches a new receiver)")
    click.echo(f"Deleted {len(gone)} receiver{'s' if len(gone) != 1 else ''}"
               + (f": {', '.join(gone)}" if gone else "") + f"; attached: {attached}"
               + (f"; kept {kept}: it holds the last sequence number" if kept else ""))


def _receiver_numbers(text: str, present: dict[int, str]) -> list[int] | None:
    """The receiver numbers NAME means; None for every detached one (QZMF*)."""
    if text.upper() == f"{journal.JOURNAL}*":
        return None
    m = re.fullmatch(rf"(?:{journal.JOURNAL}\.?)?0*(\d+)(?:\.jsonl)?", text, re.I)
    if m is None or int(m.group(1)) not in present:
        names = sorted(present.values())
        have = f"{names[0]} to {names[-1]}" if len(names) > 1 else ", ".join(names) or "none"
        usage_error(f"--jrnrcv: {text!r} is not a receiver here; allowed: a receiver's name "
                    f"or number ({have}), or {journal.JOURNAL}*")
    return [int(m.group(1))]
