"""User profiles and the system distribution directory from the shell.

CRTUSRPRF, CHGUSRPRF, DLTUSRPRF, DSPUSRPRF and ADDDIRE, CHGDIRE, RMVDIRE,
WRKDIRE work directly on ``<datadir>/directory.sqlite`` (see
``twistmail.directory``), so they need no running daemon and take effect for
the next SMTP or POP session at once.  Honours ``system.datadir``,
``system.local_domains`` and ``system.hostname`` through
``SqliteDirectory.from_settings``.  A refused value is one line naming the
option, exit 2; a database that cannot be used is one line, exit 1.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from twistmail import directory as dirmod
from twistmail.cli.base import (
    app,
    cli,
    nothing_to_change,
    open_directory,
    stdin_text,
    usage_error,
    value_of,
)
from twistmail.cli.output import emit_record, emit_table
from twistmail.directory import DirectoryEntry, DirectoryError, SqliteDirectory
from twistmail.interfaces import (
    HOLD,
    QTMSBSSQ,
    QTMSINQ,
    QTMSOUTQ,
    QTMSRTQ1,
    QTMSRTQ2,
    QUARANTINE,
)
from twistmail.maildir import DELETED_PREFIX, owner_lock
from twistmail.queue import FileQueue
from twistmail.settingtypes import Choice

STATUS = Choice(dirmod.STATUSES)
MSFSRVLVL = Choice(dirmod.SERVICE_LEVELS)
PREFADR = Choice(dirmod.PREFERRED_ADDRESSES)

#: Directory fields whose option has another name.
OPTION_OF_FIELD = {"userid": "usrid", "address": "usrid", "system_address": "usrid"}

PROFILE_LABELS = (
    ("usrprf", "User profile"),
    ("status", "Status"),
    ("text", "Text description"),
    ("created", "Created (UTC)"),
    ("password_none", "Password is *NONE"),
    ("entries", "Directory entries"),
    ("smtp", "SMTP address"),
    ("mailbox", "Mailbox"),
)
DIRE_COLUMNS = (
    ("userid", "User ID"),
    ("address", "Address"),
    ("usrd", "Description"),
    ("user", "User profile"),
    ("msfsrvlvl", "Mail service level"),
    ("prefadr", "Preferred address"),
    ("smtp", "SMTP name"),
)


def _password(raw: str | None, change: bool = False) -> str | None:
    """``-`` reads the password from standard input, keeping it out of ``ps``.

    The special values are IBM's: *NONE leaves the profile without a password
    (it receives mail but cannot sign on), *SAME (CHGUSRPRF) keeps it.
    *USRPRF, IBM's default (the profile name as its password), is refused:
    it is the first password anyone tries.
    """
    if raw is None:
        return None
    text = stdin_text("--password") if raw == "-" else raw  # the same words, either way
    word = text.strip().upper()
    if word == "*NONE":
        return dirmod.NO_PASSWORD
    if word == "*SAME" and change:
        return None
    if word in dirmod.SPECIAL_PASSWORDS:
        shown = "*USRPRF" if word == "*USRPRF" else repr(text.strip())
        usage_error(f"--password: {shown} is not allowed; allowed: a password, *NONE (no "
                    f"sign-on){', *SAME' if change else ''}, or - to read it from standard "
                    "input")
    return text


def _text(raw: str | None, change: bool = False) -> str | None:
    """TEXT's special values: *BLANK is no text, *SAME (a change) keeps it."""
    if raw is None:
        return None
    word = raw.strip().upper()
    if word == "*BLANK":
        return ""
    if word == "*SAME":
        if change:
            return None
        usage_error("--text: '*SAME' is not allowed for a new profile; allowed: a text "
                    "description, or *BLANK")
    return raw


def _usrprf_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--usrprf", required=True, help="User profile name, 1-10 characters.")(f)


def _usrid_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--usrid",
        nargs=2,
        required=True,
        metavar="USERID ADDRESS",
        help="User ID and address, 1-8 characters each; *ANY *ANY is the catch-all.",
    )(f)


def _entry_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = (
        click.option("--usrd", help="Description of the entry (up to 50 characters); "
                     "adddire needs it."),
        click.option("--user", help="User profile of the entry, or *NONE."),
        click.option(
            "--msfsrvlvl",
            help="Mail service level: *SYSMS (POP mailbox) or *USRIDX (SNADS). "
            "adddire's default: *USRIDX (*SYSMS for *ANY *ANY, which takes no other).",
        ),
        click.option(
            "--prefadr",
            help="Preferred address: *SMTP or *USRID. adddire's default: *USRID.",
        ),
        click.option("--smtpuser", help="SMTP user name (the part before @), or *NONE."),
        click.option(
            "--smtpdomain", help="SMTP domain; default: the first local domain, or *NONE."
        ),
    )
    for option in reversed(options):
        f = option(f)
    return f


def _entry_fields(change: bool, **given: str | None) -> dict[str, Any]:
    """The options given, with the choice values checked as settings are;
    *SAME, in a change, is an option not given."""
    fields = {k: v for k, v in given.items() if v is not None}
    for key, value in list(fields.items()):
        if value.strip().upper() == "*SAME":
            if not change:
                usage_error(f"--{key}: '*SAME' is not allowed when adding an entry; allowed: "
                            "a value, or leave the option out for its default")
            del fields[key]
    if "msfsrvlvl" in fields:
        fields["msfsrvlvl"] = value_of("--msfsrvlvl", MSFSRVLVL, fields["msfsrvlvl"])
    if "prefadr" in fields:
        fields["prefadr"] = value_of("--prefadr", PREFADR, fields["prefadr"])
    return fields


def _entry_row(entry: DirectoryEntry) -> dict[str, Any]:
    return {
        "userid": entry.userid,
        "address": entry.address,
        "usrd": entry.usrd,
        "user": entry.user,
        "msfsrvlvl": entry.msfsrvlvl,
        "prefadr": entry.prefadr,
        "smtpuser": entry.smtpuser,
        "smtpdomain": entry.smtpdomain,
        "smtp": entry.smtp_name,
    }


def _profile_record(d: SqliteDirectory, profile: dirmod.UserProfile) -> dict[str, Any]:
    entries = [e for e in d.entries() if e.user == profile.usrprf]
    return {
        "usrprf": profile.usrprf,
        "status": profile.status,
        "text": profile.text,
        "created": profile.created,
        "password_none": "*YES" if profile.password_none else "*NO",
        "entries": [f"{e.userid} {e.address}" for e in entries],
        "smtp": d.smtp_address(profile.usrprf),
        "mailbox": str(d.mailbox(profile.usrprf)),
    }


# -- user profiles ------------------------------------------------------------


@cli.command("crtusrprf")
@_usrprf_option
@click.option("--password", required=True,
              help="Password for POP and SMTP sign-on; - reads stdin; *NONE: no sign-on.")
@click.option("--text", default="", help="Text description (up to 50 characters), or *BLANK.")
@click.option("--status", default=dirmod.ENABLED, show_default=True, help="*ENABLED or *DISABLED.")
def crtusrprf(usrprf: str, password: str, text: str, status: str) -> None:
    """Create a user profile and enroll it as a POP mail user."""
    status = value_of("--status", STATUS, status)
    with open_directory("the directory", OPTION_OF_FIELD) as d:
        name = dirmod.profile_name(usrprf)
        new = d.get_profile(name) is None  # else create_profile says it exists
        left = dirmod.messages_in(d.mailbox(name)) if new else 0
        if left:  # a new SAM must not be handed the mail of one deleted before
            usage_error(f"--usrprf: {name} has a mailbox left by an earlier profile of that "
                        f"name, with {left} message{'s' if left != 1 else ''} "
                        f"({d.mailbox(name).parent}); allowed: a name without one (move or "
                        "remove that mailbox first)")
        waiting = _queued_for({f"{name.lower()}@{d.local_domains[0]}"}) \
            if new and d.local_domains and "@" not in name else 0
        if waiting:  # accepted for an earlier profile of that name, not yet delivered
            usage_error(f"--usrprf: {waiting} queued message{'s are' if waiting != 1 else ' is'}"
                        f" for {name.lower()}@{d.local_domains[0]}, the address {name} would "
                        "get, accepted before it existed; allowed: a name no queued mail is "
                        "for (it goes back to its sender at its next try, which wrkq shows; "
                        "the bridge must be running: strmsf)")
        profile = d.create_profile(usrprf, _password(password) or "",
                                   text=_text(text) or "", status=status)
        record = _profile_record(d, profile)
        own = None if record["smtp"] is not None else next(
            (e for e in d.entries() if e.user == profile.usrprf), None)
    record["entries"] = ", ".join(record["entries"])
    emit_record(record, PROFILE_LABELS, as_json=False)
    if own is not None:  # enrolled, but with no SMTP name: say why
        why = ("no local domain is set ([system] local_domains)" if not d.local_domains
               else f"'@' is in no SMTP local part, so {profile.usrprf.lower()} is none")
        click.echo(f"No SMTP address: {why}; mail reaches the profile once its entry has "
                   f"one: chgdire --usrid {own.userid} {own.address} --prefadr '*SMTP' "
                   "--smtpuser NAME")


@cli.command("chgusrprf")
@_usrprf_option
@click.option("--password", help="New password; - reads stdin; *NONE: no sign-on; *SAME.")
@click.option("--status", help="*ENABLED or *DISABLED, or *SAME.")
@click.option("--text", help="Text description (up to 50 characters), *BLANK or *SAME.")
def chgusrprf(usrprf: str, password: str | None, status: str | None, text: str | None) -> None:
    """Change a user profile's password, status or text."""
    if password is None and status is None and text is None:
        with open_directory("the directory", OPTION_OF_FIELD) as d:
            if d.get_profile(dirmod.profile_name(usrprf)) is None:  # as IBM i checks first
                raise DirectoryError("usrprf", dirmod.profile_name(usrprf), "does not exist")
        nothing_to_change("give at least one of --password, --status, --text")
    if status is not None and status.strip().upper() == "*SAME":
        status = None
    if status is not None:
        status = value_of("--status", STATUS, status)
    password, text = _password(password, change=True), _text(text, change=True)
    with open_directory("the directory", OPTION_OF_FIELD) as d:
        profile = d.change_profile(usrprf, password=password, status=status, text=text)
        same = password is None and status is None and text is None
        click.echo(f"User profile {profile.usrprf} {'unchanged (*SAME)' if same else 'changed'}.")


OWNOBJOPT = ("*NODLT", "*DLT")


@cli.command("dltusrprf")
@_usrprf_option
@click.option("--ownobjopt", default="*NODLT", show_default=True,
              help="What the profile owns (its mailbox with mail, its certificate store): "
              "*NODLT keeps the profile while it owns any; *DLT deletes them with it.")
def dltusrprf(usrprf: str, ownobjopt: str) -> None:
    """Delete a user profile and its directory entries (DLTUSRPRF).

    As on IBM i, a profile that owns objects is not deleted unless
    OWNOBJOPT(*DLT) says to delete them too: a profile created later under
    the same name would otherwise be handed the mail of the one deleted.
    """
    option = ownobjopt.strip().upper()
    if option not in OWNOBJOPT:
        why = "is IBM's but not supported here" if option.startswith("*CHGOWN") \
            else "is not allowed"
        usage_error(f"--ownobjopt: {ownobjopt!r} {why}; allowed: {', '.join(OWNOBJOPT)}")
    with open_directory("the directory", OPTION_OF_FIELD) as d:
        name = dirmod.profile_name(usrprf)
        if d.get_profile(name) is None:
            raise DirectoryError("usrprf", name, "does not exist")
        home = d.mailbox(name).parent
        # Deliveries into its mailbox finish first, and none starts until the
        # profile and its mailbox are gone: what is owned is what is deleted.
        with owner_lock(home.parent, name, exclusive=True):
            owned = _owned(d, name)
            if owned and option == "*NODLT":
                usage_error(f"--ownobjopt: {name} owns {' and '.join(o for o, _ in owned)}, "
                            "so it is not deleted with *NODLT; allowed: *DLT, which deletes "
                            "them with the profile")
            entries = [e for e in d.entries() if e.user == name]
            addresses = {e.smtp_name for e in entries if e.smtp_name}
            d.delete_profile(name)
            # Out of the way at once (an empty mailbox goes in any case), and
            # removed once deliveries may go on: a big one takes a while.  What
            # a kill leaves of it, the bridge's sweep removes (DELETED_PREFIX).
            tomb = home.with_name(f"{DELETED_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                home.rename(tomb)
            except FileNotFoundError:
                tomb = None
            except OSError as e:  # a mount point, say: the profile is gone, its mail stays
                tomb = None
                click.echo(f"note: its mailbox {home} could not be removed: {e.strerror}",
                           err=True)
    waiting = _queued_for(addresses)
    for _, path in owned:
        if path != home:
            shutil.rmtree(path, ignore_errors=True)
    if tomb is not None:
        shutil.rmtree(tomb, ignore_errors=True)
        if tomb.exists():  # a file that will not go: nobody's mail, but on the disk
            click.echo(f"note: its mailbox could not all be removed ({tomb}); the bridge "
                       "tries again every hour, or remove it by hand", err=True)
    gone = f" with {' and '.join(o for o, _ in owned)}" if owned else ""
    click.echo(f"User profile {name} deleted{gone}.")
    routing = [e for e in entries if _routes_for_others(e)]
    if routing:
        # They go with it (their USER was it), and mail that other addresses
        # relied on them for is no longer routed: said, not found out later.
        click.echo("Removed with it, so they route no more mail: " + ", ".join(
            f"{e.userid} {e.address}" + (f" ({e.smtp_name})" if e.smtp_name else "")
            for e in routing) + ".")
    if waiting:
        if waiting == 1:
            click.echo("1 queued message for its addresses is no longer its: a catch-all "
                       "entry (*ANY) takes it, or it goes back to its sender (wrkq lists it).")
        else:
            click.echo(f"{waiting} queued messages for its addresses are no longer its: a "
                       "catch-all entry (*ANY) takes them, or they go back to their senders "
                       "(wrkq lists them).")


def _routes_for_others(entry: Any) -> bool:
    """The catch-all, or the postmaster's or NONDELIVERY's address: an entry
    that takes mail meant for others than the profile itself."""
    local = (entry.smtp_name or "").partition("@")[0].lower()
    return entry.userid == "*ANY" or local in ("postmaster", "nondelivery")


#: The queues a local recipient waits on: QTMSOUTQ too, where one deferred
#: (a full mailbox) goes along with its message's remote recipients.
LOCAL_QUEUES = (QTMSINQ, QTMSBSSQ, QTMSRTQ1, QTMSRTQ2, QTMSOUTQ, HOLD, QUARANTINE)


def _queued_for(addresses: set[str]) -> int:
    """Messages waiting with a recipient among ``addresses`` not yet done with."""
    spool = FileQueue.for_settings(app().settings, create=False)
    wanted = {a.lower() for a in addresses}
    if not wanted or not spool.root.is_dir():
        return 0
    return sum(1 for q in LOCAL_QUEUES for e in spool.entries(q)
               if any(r.address.lower() in wanted and not r.done for r in e.recipients))


def _owned(d: Any, name: str) -> list[tuple[str, Path]]:
    """What a profile owns that outlives it: its mail, its certificate store;
    as (what, where)."""
    out = []
    box = d.mailbox(name)
    mail = dirmod.messages_in(box)
    if mail:
        out.append((f"a mailbox with {mail} message{'s' if mail != 1 else ''} ({box.parent})",
                    box.parent))
    certs = app().settings.datadir / "certs" / name
    if certs.exists():
        out.append((f"a certificate store ({certs})", certs))
    return out


@cli.command("dspusrprf")
@_usrprf_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def dspusrprf(usrprf: str, as_json: bool) -> None:
    """Display a user profile with its directory entries and SMTP address."""
    if _nothing_enrolled():
        usage_error(DirectoryError("usrprf", dirmod.profile_name(usrprf),
                                   "does not exist").said("--usrprf"))
    with open_directory("the directory", OPTION_OF_FIELD) as d:
        name = dirmod.profile_name(usrprf)
        profile = d.get_profile(name)
        if profile is None:
            raise DirectoryError("usrprf", name, "does not exist")
        record = _profile_record(d, profile)
    if not as_json:
        record["entries"] = ", ".join(record["entries"])
    emit_record(record, PROFILE_LABELS, as_json)


def _nothing_enrolled() -> bool:
    """No directory yet: a listing says so without making one, or a datadir
    mistyped in the settings would be made, and listed empty, without a word
    that it is not the appliance's.  One lost beside mailboxes is said to be."""
    path = app().settings.datadir / dirmod.FILENAME
    return not path.exists() and dirmod.lost(path) is None


USRPRF_COLUMNS = (
    ("usrprf", "User profile"),
    ("status", "Status"),
    ("smtp", "SMTP address"),
    ("text", "Text description"),
)


@cli.command("wrkusrprf")
@click.option("--json", "as_json", is_flag=True, help="A JSON array of profiles.")
def wrkusrprf(as_json: bool) -> None:
    """List the user profiles, with their status and SMTP address (WRKUSRPRF)."""
    rows = []
    if not _nothing_enrolled():
        with open_directory("the directory", OPTION_OF_FIELD) as d:
            rows = [{"usrprf": p.usrprf, "status": p.status,
                     "smtp": d.smtp_address(p.usrprf) or "", "text": p.text,
                     "created": p.created} for p in d.profiles()]
    emit_table(rows, USRPRF_COLUMNS, as_json, empty="(no user profiles)")


# -- directory entries --------------------------------------------------------


@cli.command("adddire")
@_usrid_option
@_entry_options
def adddire(usrid: tuple[str, str], **options: str | None) -> None:
    """Add an entry to the system distribution directory."""
    fields = _entry_fields(False, **options)
    if "usrd" not in fields:
        usage_error("--usrd: required (a description of up to 50 characters)")
    if usrid[0].strip().upper() == usrid[1].strip().upper() == "*ANY":
        fields.setdefault("msfsrvlvl", dirmod.SYSMS)  # the only level a catch-all takes
    with open_directory("the directory", OPTION_OF_FIELD) as d:
        entry = d.add_entry(DirectoryEntry(userid=usrid[0], address=usrid[1], **fields))
        click.echo(f"Directory entry {entry.userid} {entry.address} added.")
        _say_not_local(d, entry)
    _say_queued(d, None, entry)


@cli.command("chgdire")
@_usrid_option
@_entry_options
def chgdire(usrid: tuple[str, str], **options: str | None) -> None:
    """Change an entry of the system distribution directory."""
    given = any(v is not None for v in options.values())
    fields = _entry_fields(True, **options)
    if not given:
        with open_directory("the directory", OPTION_OF_FIELD) as d:
            if d.get_entry(*usrid) is None:  # as IBM i checks first
                raise DirectoryError("usrid", f"{usrid[0]} {usrid[1]}".upper(),
                                     "is not in the directory")
        nothing_to_change(
            "give at least one of --usrd, --user, --msfsrvlvl, --prefadr, --smtpuser, --smtpdomain"
        )
    with open_directory("the directory", OPTION_OF_FIELD) as d:
        before = d.get_entry(usrid[0], usrid[1])
        entry = d.change_entry(usrid[0], usrid[1], **fields)
        click.echo(f"Directory entry {entry.userid} {entry.address} "
                   f"{'changed' if fields else 'unchanged (*SAME)'}.")
        if before is not None and before.smtp_name != entry.smtp_name:
            _say_not_local(d, entry)
    _say_queued(d, before, entry)


@cli.command("rmvdire")
@_usrid_option
def rmvdire(usrid: tuple[str, str]) -> None:
    """Remove an entry: no more mail is delivered for it."""
    with open_directory("the directory", OPTION_OF_FIELD) as d:
        entry = d.get_entry(usrid[0], usrid[1])
        d.remove_entry(usrid[0], usrid[1])
        click.echo(f"Directory entry {usrid[0].upper()} {usrid[1].upper()} removed.")
    _say_queued(d, entry, None)
    if entry is not None and entry.msfsrvlvl == dirmod.USRIDX and entry.userid != "*ANY":
        store = d.snads_store(entry.userid)
        if left := dirmod.messages_in(store):
            click.echo(f"Its SNADS store keeps {left} distribution{'s' if left != 1 else ''} "
                       f"({store.parent}); no entry can take user ID {entry.userid} again "
                       "until it is moved or removed.")


def _local_name(d: Any, entry: DirectoryEntry | None) -> str | None:
    """The entry's SMTP name, lower-cased, when it is in a local domain."""
    name = entry.smtp_name if entry is not None else None
    if name and name.rpartition("@")[2].lower() in d.local_domains:
        return name.lower()
    return None


def _say_not_local(d: Any, entry: DirectoryEntry) -> None:
    """An SMTP name outside the local domains is allowed (IBM i keeps such
    names), but no mail for it is delivered here: said, not found out later."""
    if entry.smtp_name and _local_name(d, entry) is None:
        click.echo(f"note: {entry.smtp_name} is in no local domain ([system] local_domains: "
                   f"{', '.join(d.local_domains) or 'none'}), so mail to it is not "
                   "delivered to this entry")


def _say_queued(d: Any, before: DirectoryEntry | None, after: DirectoryEntry | None) -> None:
    """Queued mail is resolved again when it is delivered: an SMTP name an
    entry gains takes the mail already waiting for it, one it loses no longer
    reaches it, and one whose entry now names another mailbox goes there.
    Said, as dltusrprf and crtusrprf say it.  Only local names count: mail
    for others is relayed, whatever the directory says."""
    lost, gained = _local_name(d, before), _local_name(d, after)
    entry = before or after
    assert entry is not None
    name = f"{entry.userid} {entry.address}"
    if lost == gained:
        if (lost and before is not None and after is not None
                and (before.user, before.msfsrvlvl) != (after.user, after.msfsrvlvl)):
            waiting = _queued_for({lost})
            one = waiting == 1
            if waiting:
                where = (f"{after.user}'s mailbox" if after.msfsrvlvl == dirmod.SYSMS
                         and after.user else f"the SNADS store of {after.userid}")
                click.echo(f"{waiting} queued message{'' if one else 's'} for {lost} "
                           f"{'goes' if one else 'go'} to {where} now (wrkq lists "
                           f"{'it' if one else 'them'}).")
        return
    if lost and (waiting := _queued_for({lost})):
        one = waiting == 1
        click.echo(f"{waiting} queued message{'' if one else 's'} for {lost} "
                   f"{'no longer reaches' if one else 'no longer reach'} {name}: another "
                   f"entry or a catch-all (*ANY) takes {'it' if one else 'them'}, or "
                   f"{'it goes back to its sender' if one else 'they go back to their senders'}"
                   f" (wrkq lists {'it' if one else 'them'}).")
    if gained and (waiting := _queued_for({gained})):
        one = waiting == 1
        click.echo(f"{waiting} queued message{'' if one else 's'} for {gained}, accepted "
                   f"before {name} had that name, {'is' if one else 'are'} delivered to it "
                   f"(wrkq lists {'it' if one else 'them'}).")


@cli.command("wrkdire")
@click.option("--json", "as_json", is_flag=True, help="JSON array of entries.")
def wrkdire(as_json: bool) -> None:
    """List the system distribution directory."""
    rows = []
    if not _nothing_enrolled():
        with open_directory("the directory", OPTION_OF_FIELD) as d:
            rows = [_entry_row(e) for e in d.entries()]
    emit_table(rows, DIRE_COLUMNS, as_json, empty="(no directory entries)")
