"""SNDDST, QRYDST, RCVDST, CHGDSTA and DSPDSTA: mail for SNADS (*USRIDX) users.

SNDDST sends a distribution through the mail queues (``twistmail.snads``);
QRYDST lists and RCVDST takes the distributions in a user's store
(``twistmail.dststore``); CHGDSTA keeps its attributes in the ``[snads]``
section of the TOML file, where the next SNDDST reads them.  IBM i acts for
the signed-on user (USRID *CURRENT); here ``--usrid USERID ADDRESS`` or
``--usrprf PROFILE`` names that user's directory entry.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
from collections.abc import Callable
from typing import Any

import click

from twistmail import config as configmod
from twistmail.cli.base import (
    Failure,
    app,
    cli,
    nothing_to_change,
    open_directory,
    stdin_text,
    usage_error,
    value_of,
)
from twistmail.cli.output import emit_record, emit_table
from twistmail.durable import fsync_dir
from twistmail.identity import as_invoker

QRYDST_COLUMNS = (
    ("dstid", "Distribution ID"),
    ("sender", "Sender"),
    ("received", "Received"),
    ("status", "Status"),
    ("description", "Description"),
)
DSTA_LABELS = (("keeprcp", "Keep recipients (KEEPRCP)"),)


def _user_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--usrprf", help="The user profile acting (its directory entry).")(f)
    return click.option("--usrid", nargs=2, metavar="USERID ADDRESS",
                        help="The directory entry acting (IBM's USRID; *CURRENT is "
                        "--usrprf).")(f)


def _stdin_or(raw: str | None) -> str | None:
    """``-`` reads the text from standard input, for messages longer than a command line."""
    return stdin_text("--longmsg", whole=True) if raw == "-" else raw


@cli.command("snddst")
@click.option("--type", "type_", help="Information to be sent: *LMSG or *MSG.")
@click.option("--tousrid", multiple=True, metavar="'USERID ADDRESS [*PRI|*CC|*BCC]'",
              help="A directory user (repeatable, up to 300).")
@click.option("--tointnet", multiple=True, metavar="'ADDRESS [*PRI|*CC|*BCC]'",
              help="An Internet recipient (repeatable, up to 300).")
@click.option("--dstd", help="Description, the Subject (up to 44 characters).")
@click.option("--longmsg", help="The note for *LMSG (up to 5000 characters); - reads stdin.")
@click.option("--msg", help="Message (up to 256 characters): the note for *MSG, "
              "the first paragraph for *LMSG.")
@click.option("--importance", default="*NORMAL", show_default=True,
              help="*NORMAL, *LOW or *HIGH.")
@click.option("--sensitiv", default="*NONE", show_default=True,
              help="*NONE, *PERSONAL, *PRIVATE or *CONFIDENTIAL.")
@_user_options
def snddst(type_: str | None, tousrid: tuple[str, ...], tointnet: tuple[str, ...],
           dstd: str | None, longmsg: str | None, msg: str | None, importance: str,
           sensitiv: str, usrid: tuple[str, str] | None, usrprf: str | None) -> None:
    """Send a distribution (SNDDST) from a directory user to users and Internet addresses."""
    from twistmail.snads import TYPES, DistributionError, send_distribution

    if type_ is None:
        usage_error(f"--type: required ({', '.join(TYPES)})")
    if dstd is None:
        usage_error("--dstd: required (a description of 1-44 characters)")
    settings = app().settings
    try:
        sent = send_distribution(
            settings, usrid=usrid, usrprf=usrprf, type=type_, tousrid=tousrid,
            tointnet=tointnet, dstd=dstd, longmsg=_stdin_or(longmsg), msg=msg,
            importance=importance, sensitiv=sensitiv)
    except DistributionError as e:
        usage_error(str(e))
    except (OSError, sqlite3.Error) as e:
        raise Failure(f"the distribution could not be sent: {e}") from None
    if sent.queue_id is not None:
        n = len(sent.queued)
        click.echo(f"Distribution sent: queued as {sent.queue_id} for {n} "
                   f"recipient{'' if n == 1 else 's'}.")
    if sent.stored:
        click.echo("Distribution stored for " + ", ".join(sent.stored) + ".")
    if sent.not_stored:
        why = "; ".join(f"{label}: {reason}" for label, reason in sent.not_stored)
        raise Failure(f"the distribution could not be stored for {why}; the others have it, "
                      "so send it again only to these")


def _store_user(usrid: tuple[str, str] | None, usrprf: str | None) -> tuple[Any, Any]:
    """The *USRIDX entry acted for, and its users' distribution store."""
    from twistmail.dststore import DistributionStore
    from twistmail.snads import DistributionError, enrolled, snads_user

    with open_directory("the directory") as d:
        try:
            entry = snads_user(d, usrid, usrprf)
        except DistributionError as e:
            usage_error(str(e))
        names = enrolled(d)
    return entry, DistributionStore(app().settings.datadir / "snads", names)


@cli.command("qrydst")
@_user_options
@click.option("--option", default="*IN", show_default=True,
              help="*IN: the incoming distributions.")
@click.option("--json", "as_json", is_flag=True, help="JSON array of distributions.")
def qrydst(usrid: tuple[str, str] | None, usrprf: str | None, option: str,
           as_json: bool) -> None:
    """List a SNADS user's incoming distributions (QRYDST)."""
    from twistmail.dststore import MAX_SEQUENCE

    if option.strip().upper() != "*IN":
        why = "is IBM's but not supported here" if option.strip().upper() == "*OUT" \
            else "is not allowed"
        usage_error(f"--option: {option!r} {why}; allowed: *IN")
    entry, store = _store_user(usrid, usrprf)
    try:
        listing = store.query(entry.userid)
    except OSError as e:
        raise Failure(f"the distribution store of {entry.userid} cannot be read: {e}") from None
    rows = [d.record() for d in listing.distributions]
    emit_table(rows, QRYDST_COLUMNS, as_json,
               empty=f"(no distributions for {entry.userid} {entry.address})")
    if listing.waiting:
        n = listing.waiting
        why = ("the disk is full, so none can be kept; receive some (rcvdst) to make room"
               if listing.no_room else
               f"all {MAX_SEQUENCE} are in use; receive some (rcvdst) to list "
               f"{'them' if n > 1 else 'it'}")
        click.echo(f"{n} newer distribution{'s wait' if n > 1 else ' waits'} for an "
                   f"identifier: {why}", err=True)


@cli.command("rcvdst")
@click.option("--dstid", help="Distribution ID, as qrydst lists it.")
@_user_options
@click.option("--outfile", type=click.Path(),
              help="Write the message to this new file instead of standard output.")
@click.option("--keep", default="*NO", show_default=True,
              help="*NO removes the distribution once received; *YES keeps it.")
def rcvdst(dstid: str | None, usrid: tuple[str, str] | None, usrprf: str | None,
           outfile: str | None, keep: str) -> None:
    """Receive a distribution (RCVDST): print or write it, then remove it from the store."""
    from twistmail.dststore import UnknownDistribution, normalize_dstid

    if dstid is None:
        usage_error("--dstid: required (a distribution ID as qrydst lists it)")
    keep_it = keep.strip().upper()
    if keep_it not in ("*NO", "*YES"):
        usage_error(f"--keep: {keep!r} is not allowed; allowed: *NO, *YES")
    try:
        normalize_dstid(dstid)
    except ValueError as e:
        usage_error(f"--dstid: {e}")
    if outfile is not None and os.path.lexists(outfile):
        usage_error(f"--outfile: {outfile!r} already exists; allowed: the name of a new file")
    if outfile is not None and not os.path.isdir(os.path.dirname(os.path.abspath(outfile))):
        usage_error(f"--outfile: {outfile!r} is in no existing directory; allowed: a new file "
                    "in an existing directory")
    entry, store = _store_user(usrid, usrprf)
    try:
        with store.receive(entry.userid, dstid, keep=keep_it == "*YES") as (dist, data):
            _deliver(data, outfile)
    except UnknownDistribution as e:
        usage_error(f"--dstid: '{e.args[0]}' is not a distribution of {entry.userid} "
                    f"{entry.address}; qrydst lists them")
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise Failure(f"distribution not received: {e.strerror or e}{where}") from None
    if outfile is not None:
        click.echo(f"Distribution {dist.dstid} written to {outfile}"
                   + (" and kept." if keep_it == "*YES" else "."))


def _deliver(data: bytes, outfile: str | None) -> None:
    """The message as stored (CRLF line ends), to a new file or to standard output."""
    if outfile is not None:
        with as_invoker():  # the caller's file (see twistmail.identity)
            fd = os.open(outfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # Its name too, before KEEP *NO removes the distribution from the store.
            fsync_dir(os.path.dirname(os.path.abspath(outfile)))
        return
    out = sys.stdout
    if out is None:  # descriptor 1 closed: kept, and said
        raise OSError(errno.EBADF, "standard output is closed; use --outfile")
    binary = getattr(out, "buffer", None)
    out.flush()
    if binary is None:
        out.write(data.decode("utf-8", "replace"))
        out.flush()
        return
    # A reader that goes away mid-way can make write() return short, not
    # raise: the rest is written until it raises (EPIPE), so that the
    # distribution is removed only once all of it was handed on.
    view = memoryview(data)
    while view:
        written = binary.write(view)
        if not written:
            raise OSError(errno.EPIPE, "standard output took no more")
        view = view[written:]
    binary.flush()


@cli.command("chgdsta")
@click.option("--keeprcp", help="Recipients named in SNDDST's headers: *BCC, *ALL, *NONE "
              "(or *SAME).")
def chgdsta(keeprcp: str | None) -> None:
    """Change the distribution attributes (CHGDSTA); the next SNDDST uses them."""
    from twistmail import configedit
    from twistmail.settingtypes import SettingError

    if keeprcp is None:
        nothing_to_change("--keeprcp: give a value to change; allowed: *BCC, *ALL, *NONE")
    if keeprcp.strip().upper() == "*SAME":  # as chgusrprf and chgdire take it
        click.echo("Distribution attributes unchanged (*SAME).")
        return
    vtype = configmod.field_type(configmod.SnadsSettings, "keeprcp")
    value = value_of("--keeprcp", vtype, keeprcp)
    path = app().editable_path()
    try:
        configedit.set_values(path, {"snads.keeprcp": value})
    except SettingError as e:
        usage_error(f"--keeprcp: {e.value!r} is not allowed; allowed: {e.allowed}")
    except OSError as e:
        raise Failure(f"cannot write {path}: {e.strerror}") from None
    click.echo(f"Distribution attributes changed: KEEPRCP {value}.")


@cli.command("dspdsta")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def dspdsta(as_json: bool) -> None:
    """Display the distribution attributes (CHGDSTA's values)."""
    emit_record({"keeprcp": app().settings.snads.keeprcp}, DSTA_LABELS, as_json)
