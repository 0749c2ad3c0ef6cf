"""SNDDST for SNADS users: a distribution becomes a MIME note in the mail queues.

IBM i users enrolled with mail service level *USRIDX (OfficeVision-style
"SNADS" users) send mail with SNDDST TYPE(*LMSG) rather than a mail client.
:func:`send_distribution` does what SNDDST does for them: the sender is the
caller's own entry in the system distribution directory (IBM refuses
senders who are not enrolled), the recipients are directory user IDs
(TOUSRID) and Internet addresses (TOINTNET), each *PRI, *CC or *BCC, and
the description (DSTD) and long message (LONGMSG) become the Subject and a
text/plain UTF-8 body.  The finished note enters QTMSINQ through
:func:`twistmail.api.queue_message`, so the bridge delivers it exactly as
mail from the Send MIME Mail API.

Which recipients the headers name follows CHGDSTA KEEPRCP (``[snads]
keeprcp``): To always lists the *PRI recipients, Cc lists the *CC ones only
with *ALL, and *BCC recipients are never named, as the seed's "Setting up
headers to differentiate between recipients" describes.

A directory user ID with an SMTP name is sent to that address.  A *USRIDX
entry without one cannot be reached by an address, so the note is routed
as SNADS: stored straight into its distribution store
(``<datadir>/snads/<USERID>/Maildir``, journal 7O), the way IBM i keeps
local office mail out of the mail server framework (CHGDSTA USEMSFLCL *NO).

Journal: EH E1 E2 ET from ``queue_message``, then H1 (originator, size) and
one H2 per recipient, the SNADS switcher's entries for a note it switched
into the framework.  Settings honoured: ``[snads] keeprcp``,
``system.hostname``, ``system.datadir``, ``[smtp] journal``.
"""

from __future__ import annotations

import email.policy
import email.utils
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from email.headerregistry import Address, Group
from email.message import EmailMessage
from typing import Any

import attrs

from twistmail import directory as dirmod
from twistmail.api import BCC, CC, TO, Recipient, queue_message
from twistmail.mimebuild import same_fields
from twistmail.smtp.address import PathError, parse_mailbox

TYPES = ("*LMSG", "*MSG")
IBM_ONLY_TYPES = ("*DOC", "*FILE", "*IDP", "*DSTID")
KINDS = {"*PRI": TO, "*CC": CC, "*BCC": BCC}
IMPORTANCE = {"*NORMAL": None, "*LOW": "low", "*HIGH": "high"}
#: RFC 2156 Sensitivity values for SNDDST SENSITIV.
SENSITIVITY = {"*NONE": None, "*PERSONAL": "Personal", "*PRIVATE": "Private",
               "*CONFIDENTIAL": "Company-Confidential"}
MAX_RECIPIENTS = 300  # per list (TOUSRID, TOINTNET), as IBM's SNDDST
MAX_LONGMSG = 5000
MAX_MSG = 256
MAX_DSTD = 44
KEEP_ALL = "*ALL"

#: Headers without a charset of their own; bodies get quoted-printable or base64.
_POLICY = email.policy.SMTP.clone(cte_type="7bit")


class DistributionError(ValueError):
    """A SNDDST, QRYDST or RCVDST request refused; ``option`` names the CLI keyword.

    ``str()`` is the one line an administrator sees: the keyword, the value
    and what is allowed or how to fix it.
    """

    def __init__(self, option: str, value: Any, problem: str) -> None:
        self.option = option
        self.value = value
        self.problem = problem
        super().__init__(f"{option}: {value!r} {problem}")


@attrs.frozen
class Target:
    """One recipient: an SMTP address to queue, or a SNADS user ID to store into."""

    kind: str  # TO, CC or BCC (*PRI, *CC, *BCC)
    address: str | None = None  # SMTP address, when it has one
    entry: dirmod.DirectoryEntry | None = None  # the TOUSRID entry, if named so

    @property
    def label(self) -> str:
        if self.address is not None:
            return self.address
        assert self.entry is not None
        return f"{self.entry.userid} {self.entry.address}"


@attrs.frozen
class Sent:
    """What SNDDST did: the queue id (None when nothing was queued) and where it went."""

    message_id: str
    originator: str
    queue_id: str | None
    queued: tuple[str, ...]
    stored: tuple[str, ...]  # "USERID ADDRESS" of SNADS users stored into directly
    #: ("USERID ADDRESS", why) of SNADS users whose store refused it; the rest got it.
    not_stored: tuple[tuple[str, str], ...] = ()


def send_distribution(
    settings: Any,
    *,
    usrid: Sequence[str] | None = None,
    usrprf: str | None = None,
    type: str = "*LMSG",
    tousrid: Iterable[str | Sequence[str]] = (),
    tointnet: Iterable[str | Sequence[str]] = (),
    dstd: str,
    longmsg: str | None = None,
    msg: str | None = None,
    importance: str = "*NORMAL",
    sensitiv: str = "*NONE",
) -> Sent:
    """SNDDST: build the note and hand it to the mail server framework.

    The sender is the directory entry ``usrid`` (user ID, address) or the
    entry of user profile ``usrprf``.  Raises :class:`DistributionError`
    before anything is queued when a value is refused.
    """
    kind = _choice("--type", type, TYPES, IBM_ONLY_TYPES)
    importance = _choice("--importance", importance, tuple(IMPORTANCE))
    sensitiv = _choice("--sensitiv", sensitiv, tuple(SENSITIVITY))
    description = _description(dstd)
    body = _body(kind, msg, longmsg)
    users = _list("--tousrid", tousrid)
    internet = _list("--tointnet", tointnet)
    if not users and not internet:
        raise DistributionError("--tousrid", "*NONE", "and --tointnet *NONE: give at least one "
                                "recipient (USERID ADDRESS, or an Internet address)")
    with dirmod.SqliteDirectory.from_settings(settings) as directory:
        sender = sender_entry(directory, usrid, usrprf)
        originator = sender.smtp_name or (sender.user and directory.smtp_address(sender.user))
        if not originator:
            raise DistributionError(
                "--usrid", f"{sender.userid} {sender.address}",
                "has no SMTP name, which mail from it needs; give it one with "
                f"chgdire --usrid {sender.userid} {sender.address} --smtpuser NAME")
        targets = _dedupe([*(_user_target(directory, u) for u in users),
                           *(_internet_target(a) for a in internet)])
    keeprcp = settings.snads.keeprcp
    message_id = email.utils.make_msgid(domain=settings.hostname)
    note = _note(sender, originator, targets, keeprcp, description, body, importance, sensitiv,
                 message_id)
    return _send(settings, sender, originator, targets, note, message_id)


def sender_entry(directory: Any, usrid: Sequence[str] | None,
                 usrprf: str | None) -> dirmod.DirectoryEntry:
    """The directory entry a command acts for: USRID, or the entry of a user profile.

    A profile with several entries acts through its *USRIDX one, the
    entry that makes it a SNADS user.
    """
    if usrid and usrprf:
        raise DistributionError("--usrprf", usrprf, "cannot be given with --usrid; "
                                "name the user by one of them")
    if usrid:
        if len(usrid) != 2:
            raise DistributionError("--usrid", " ".join(usrid), "is not allowed; allowed: "
                                    "USERID ADDRESS")
        entry = directory.get_entry(usrid[0], usrid[1])
        if entry is None or entry.is_catchall:
            raise DistributionError("--usrid", " ".join(usrid).upper(), "is not in the system "
                                    "distribution directory; the user must be enrolled "
                                    "(adddire)")
        return entry
    if not usrprf:
        raise DistributionError("--usrid", "*CURRENT", "needs a user: give --usrid USERID "
                                "ADDRESS or --usrprf PROFILE")
    try:
        name = dirmod.profile_name(usrprf)
    except dirmod.DirectoryError:
        raise DistributionError("--usrprf", usrprf, "is not allowed; allowed: "
                                + dirmod.PROFILE_ALLOWED) from None
    mine = [e for e in directory.entries() if e.user == name and not e.is_catchall]
    if not mine:
        raise DistributionError("--usrprf", name, "has no entry in the system distribution "
                                "directory; the user must be enrolled (adddire --user)")
    # Its *USRIDX entry first; else the entry whose SMTP name the user's mail
    # carries (DSPUSRPRF's): one added only to route others' mail to its
    # mailbox (NONDELIVERY, postmaster) must not change who sends.
    own = (directory.smtp_address(name) or "").lower()
    mine.sort(key=lambda e: (e.msfsrvlvl != dirmod.USRIDX,
                             (e.smtp_name or "").lower() != own, e.userid != name[:8]))
    return mine[0]


def _choice(option: str, raw: Any, allowed: tuple[str, ...],
            unsupported: tuple[str, ...] = ()) -> str:
    value = raw.strip().upper() if isinstance(raw, str) else raw
    if value in allowed:
        return value
    why = "is IBM's but not supported here" if value in unsupported else "is not allowed"
    raise DistributionError(option, raw, f"{why}; allowed: {', '.join(allowed)}")


def _text(option: str, raw: Any, limit: int, required: bool = False) -> str:
    if not isinstance(raw, str) or (required and not raw.strip()):
        raise DistributionError(option, raw, f"is not allowed; allowed: 1-{limit} characters")
    if len(raw) > limit:
        raise DistributionError(option, f"({len(raw)} characters)",
                                f"is too long; allowed: up to {limit} characters")
    return raw


def _description(raw: Any) -> str:
    """DSTD, the note's Subject: one line of up to 44 characters, as IBM's DSTD."""
    text = _text("--dstd", raw, MAX_DSTD, required=True)
    if "\r" in text or "\n" in text:
        raise DistributionError("--dstd", raw, "is not allowed; allowed: one line of text")
    return text.strip()


def _body(kind: str, msg: str | None, longmsg: str | None) -> str:
    """The note's text: MSG alone for *MSG; MSG (if any), then LONGMSG, for *LMSG."""
    if msg is not None and msg.strip().upper() == "*NONE":
        msg = None
    if longmsg is not None and longmsg.strip().upper() == "*NONE":
        longmsg = None
    if msg is not None:
        msg = _text("--msg", msg, MAX_MSG, required=kind == "*MSG")
    if kind == "*MSG":
        if longmsg is not None:
            raise DistributionError("--longmsg", longmsg[:40], "is for --type *LMSG; with "
                                    "*MSG give the text in --msg")
        if msg is None:
            raise DistributionError("--msg", "*NONE", "is not allowed with --type *MSG; "
                                    f"allowed: 1-{MAX_MSG} characters")
        return msg
    if longmsg is None:
        raise DistributionError("--longmsg", "*NONE", "is not allowed with --type *LMSG; "
                                f"allowed: 1-{MAX_LONGMSG} characters")
    longmsg = _text("--longmsg", longmsg, MAX_LONGMSG, required=True)
    return longmsg if msg is None else f"{msg}\n\n{longmsg}"


def _list(option: str, raw: Iterable[str | Sequence[str]]) -> list[list[str]]:
    """Each list element as its words; *NONE alone means an empty list."""
    items = [r.split() if isinstance(r, str) else [str(w) for w in r] for r in raw]
    items = [i for i in items if i]
    if len(items) == 1 and [w.upper() for w in items[0]] == ["*NONE"]:
        return []
    if len(items) > MAX_RECIPIENTS:
        raise DistributionError(option, f"({len(items)} recipients)",
                                f"is too many; allowed: up to {MAX_RECIPIENTS}")
    return items


def _kind(option: str, words: list[str], value: str) -> str:
    kind = KINDS.get(words[0].upper()) if words else TO
    if kind is None:
        raise DistributionError(option, value, "has a bad recipient type; allowed: *PRI, "
                                "*CC, *BCC")
    return kind


def _user_target(directory: Any, words: list[str]) -> Target:
    value = " ".join(words)
    if len(words) not in (2, 3):
        raise DistributionError("--tousrid", value, "is not allowed; allowed: USERID ADDRESS "
                                "[*PRI|*CC|*BCC]")
    kind = _kind("--tousrid", words[2:], value)
    entry = directory.get_entry(words[0], words[1])
    if entry is None or entry.is_catchall:
        raise DistributionError("--tousrid", f"{words[0]} {words[1]}".upper(),
                                "is not in the system distribution directory")
    if entry.smtp_name is not None:
        return Target(kind, entry.smtp_name, entry)
    if entry.msfsrvlvl != dirmod.USRIDX:
        raise DistributionError(
            "--tousrid", f"{entry.userid} {entry.address}",
            "has no SMTP name to deliver to; give it one with "
            f"chgdire --usrid {entry.userid} {entry.address} --smtpuser NAME")
    return Target(kind, None, entry)


def _internet_target(words: list[str]) -> Target:
    value = " ".join(words)
    if len(words) not in (1, 2):
        raise DistributionError("--tointnet", value, "is not allowed; allowed: ADDRESS "
                                "[*PRI|*CC|*BCC]")
    kind = _kind("--tointnet", words[1:], value)
    try:
        address = str(parse_mailbox(words[0]))
    except PathError:
        raise DistributionError("--tointnet", words[0], "is not an Internet address; allowed: "
                                "user@domain") from None
    return Target(kind, address)


def _dedupe(targets: list[Target]) -> list[Target]:
    """One copy per recipient; named twice, the more visible type wins (*PRI over *CC ...)."""
    rank = {TO: 0, CC: 1, BCC: 2}
    best: dict[str, Target] = {}
    for t in targets:
        key = t.label.lower()
        if key not in best or rank[t.kind] < rank[best[key].kind]:
            best[key] = t
    return [best[k] for k in dict.fromkeys(t.label.lower() for t in targets)]


def _shown(t: Target) -> Address | Group:
    """How a recipient appears in To or Cc; a SNADS-only user as an empty named group."""
    if t.address is None:
        return Group(t.label)
    local, _, domain = t.address.rpartition("@")
    name = t.entry.usrd if t.entry is not None else ""
    return Address(display_name=name, username=local, domain=domain)


def _note(sender: dirmod.DirectoryEntry, originator: str, targets: list[Target], keeprcp: str,
          description: str, body: str, importance: str, sensitiv: str, message_id: str) -> bytes:
    """The MIME message, without any Bcc field; CRLF line ends."""
    note = EmailMessage(policy=_POLICY)
    local, _, domain = originator.rpartition("@")
    note["From"] = Address(display_name=sender.usrd, username=local, domain=domain)
    to = [_shown(t) for t in targets if t.kind == TO]
    cc = [_shown(t) for t in targets if t.kind == CC] if keeprcp == KEEP_ALL else []
    note["To"] = to or [Group("undisclosed-recipients")]
    if cc:
        note["Cc"] = cc
    note["Subject"] = description
    note["Date"] = email.utils.formatdate(time.time(), localtime=True)
    note["Message-ID"] = message_id
    if IMPORTANCE[importance]:
        note["Importance"] = IMPORTANCE[importance]
    if SENSITIVITY[sensitiv]:
        note["Sensitivity"] = SENSITIVITY[sensitiv]
    note.set_content(body, charset="utf-8")
    try:
        data = same_fields(note, note.as_bytes(), "--dstd")
    except ValueError:  # the folder refused a line break, or same_fields did
        raise DistributionError("--dstd", description, "is not allowed: a line break, also "
                                "an encoded one (=?...?=), in it or in a directory "
                                "entry's description (USRD)") from None
    _said_as_typed(note, data, description)
    return data


def _said_as_typed(note: EmailMessage, data: bytes, description: str) -> None:
    """The email package decodes text that looks like an encoded-word as it
    writes a field: a USRD of ``=?utf-8?q?Boss?= <ceo@example.test>`` made
    the sender "Boss <ceo@example.test>".  Refused, not sent as another text."""
    back = email.message_from_bytes(data, policy=email.policy.default)

    def names(message: Any) -> list[str]:
        return [a.display_name for field in ("From", "To", "Cc")
                if message[field] is not None for a in message[field].addresses]

    if ("=?" in description and str(back["Subject"]) != description) \
            or names(back) != names(note):
        raise DistributionError("--dstd", description, "is not allowed: text that looks like "
                                "an encoded-word (=?...?=), in it or in a directory entry's "
                                "description (USRD), would reach its reader decoded")


def _send(settings: Any, sender: dirmod.DirectoryEntry, originator: str,
          targets: list[Target], note: bytes, message_id: str) -> Sent:
    from twistmail.journal import Journal

    queued = [Recipient(t.address, t.kind) for t in targets if t.address is not None]
    stored = [t for t in targets if t.address is None]
    who = f"{sender.userid} {sender.address}"
    queue_id = None
    if queued:
        queue_id = queue_message(settings, originator, queued, note, program="SNDDST",
                                 via="SNDDST", usrprf=sender.user, origin=f"SNDDST {who}")
    journal = Journal.from_settings(settings, f"SNDDST/{os.getpid()}")
    dst_id = queue_id or _store_id()
    failed = _store(settings, journal, dst_id, originator, stored, note) if stored else {}
    if len(failed) == len(targets):
        raise OSError(next(iter(failed.values())))  # nothing went anywhere
    journal.write("H1", f"H1 O {originator} SIZE {len(note)}", dst_id, originator=originator,
                  userid=sender.userid, address=sender.address, size=len(note))
    for t in targets:
        if t.label not in failed:
            journal.write("H2", f"H2 R {t.label}", dst_id, recipient=t.label, kind=t.kind)
    return Sent(message_id, originator, queue_id, tuple(r.address for r in queued),
                tuple(t.label for t in stored if t.label not in failed),
                tuple(failed.items()))


def _store_id() -> str:
    from twistmail.queue import new_queue_id

    return new_queue_id()


def _store(settings: Any, journal: Any, dst_id: str, originator: str, stored: list[Target],
           note: bytes) -> dict[str, str]:
    """Route to SNADS users without an SMTP name: straight into their stores (7O).

    Each store on its own: one that fails does not take back what the
    others (or the queue) already hold; the failures are returned, by label.
    """
    from twistmail.maildir import MaildirStore

    store = MaildirStore(settings.datadir / "snads", settings.hostname)
    trace = (f"Return-Path: <{originator}>\r\n"
             f"Received: by {settings.hostname} (twistmail SNDDST) id {dst_id};\r\n"
             f"\t{email.utils.formatdate(time.time(), localtime=True)}\r\n").encode()
    failed: dict[str, str] = {}
    try:
        store.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = tempfile.NamedTemporaryFile(dir=store.root, prefix=".snddst.")
    except OSError as e:
        return {t.label: str(e) for t in stored}
    with tmp:
        tmp.write(note)
        tmp.flush()
        for index, t in enumerate(stored):
            assert t.entry is not None
            try:
                store.deliver(t.entry.userid, f"{dst_id}.S{index}", tmp.name, trace)
            except OSError as e:
                failed[t.label] = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
                continue
            journal.write("7O", f"7O TSDS {t.entry.userid} {t.entry.address}", dst_id,
                          recipient=t.label, userid=t.entry.userid, address=t.entry.address)
    return failed



def snads_user(directory: Any, usrid: Sequence[str] | None,
               usrprf: str | None) -> dirmod.DirectoryEntry:
    """The *USRIDX entry whose distribution store QRYDST or RCVDST works on."""
    entry = sender_entry(directory, usrid, usrprf)
    if entry.msfsrvlvl != dirmod.USRIDX:
        option, value = ("--usrid", f"{entry.userid} {entry.address}") if usrid else \
            ("--usrprf", entry.user)
        raise DistributionError(option, value, f"is a {entry.msfsrvlvl} user, whose mail is in "
                                "a POP mailbox; allowed: a *USRIDX (SNADS) user")
    return entry


def enrolled(directory: Any) -> dict[str, tuple[str, str]]:
    """SMTP name -> (address, user ID) of every entry that has one, for DSTIDs."""
    return {e.smtp_name.lower(): (e.address, e.userid) for e in directory.entries()
            if e.smtp_name is not None and not e.is_catchall}
