"""The programming interfaces for sending mail, as IBM i offers them.

``send_mime_mail`` mirrors the Send MIME Mail API (QtmmSendMail): the caller
writes a complete RFC 5322/MIME message to a file and names it with its
envelope; the mail server framework takes it from there and deletes the
file once it has taken it: here, as soon as the message is durably queued,
and only if the name still holds the file that was read.  The checks are the ones the seed's
troubleshooting chapter walks through (an absolute path, a readable file, the
CRLF blank line between header and body, good addresses), each failing with a
:class:`SendMailError` that says what to fix.

Settings honoured: ``[smtp] vfymsfmsg`` (the originator must be the calling
user's own SMTP address) and ``journal``.
"""

from __future__ import annotations

import email.utils
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from twistmail import config as configmod
from twistmail.identity import as_invoker
from twistmail.interfaces import QTMSINQ
from twistmail.smtp.address import PathError, parse_mailbox

TO, CC, BCC = "TO", "CC", "BCC"
KINDS = {TO: TO, CC: CC, BCC: BCC, "0": TO, "1": CC, "2": BCC}
MAX_HEADER = 1024 * 1024


class SendMailError(ValueError):
    """A request the API refuses; ``str()`` says what is wrong and how to fix it."""


@attrs.frozen
class Recipient:
    address: str
    kind: str = TO  # TO, CC or BCC (IBM's distribution types 0, 1, 2)


def send_mime_mail(
    path: str | os.PathLike[str],
    originator: str,
    recipients: Iterable[Recipient | tuple[str, str] | str],
    *,
    settings: Any = None,
    usrprf: str | None = None,
) -> str:
    """Queue the MIME message in ``path`` for delivery; returns its queue id.

    When this returns, the message is durably in QTMSINQ and the file is
    deleted (unless another file took its name meanwhile: that one is the
    caller's next message, not this one).
    """
    settings = settings or configmod.load()
    if usrprf is not None:  # it goes into the journal and the envelope: a name, or nothing
        from twistmail.directory import DirectoryError, profile_name

        try:
            usrprf = profile_name(usrprf)
        except DirectoryError as e:
            raise SendMailError(str(e)) from None
    with as_invoker():  # the caller's file, also when root's command acts as the daemon's user
        file = _check_file(path)
    sender = _check_address("originator", originator)
    rcpts = _distinct([_recipient(r) for r in recipients])
    if not rcpts:
        raise SendMailError("recipients: at least one recipient is needed")
    verify = settings.smtp.vfymsfmsg_in_effect == "*YES"
    if verify or usrprf is not None:
        from twistmail.directory import SqliteDirectory

        with SqliteDirectory.from_settings(settings) as directory:
            if usrprf is not None:  # named in the envelope and the journal: it must be one
                _caller(directory, usrprf)
            if verify:
                _verify_originator(directory, sender, usrprf)
    with as_invoker(), file.open("rb") as f:
        st = os.fstat(f.fileno())
        _check_limits(settings, rcpts, st.st_size)
        data = f.read()
    data = _crlf(data)
    _check_limits(settings, rcpts, len(data))  # again: LF line ends grew to CRLF
    _check_lines(data, file)
    head, body = _split(data, file)
    _check_fields(head, file)
    qid = queue_message(settings, sender, rcpts, _without_bcc(head) + b"\r\n" + body,
                        program="QTMMSNDM", via="Send MIME Mail API", usrprf=usrprf,
                        origin=str(file))
    try:
        with as_invoker():
            now = os.stat(file)  # through a symlink: the name goes if it still leads there
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(file)
    except OSError:
        pass  # gone already, or not ours to remove: the message is queued all the same
    return qid


def _crlf(data: bytes) -> bytes:
    """Every line end CRLF, as SMTP DATA stores a message: a file written on Unix
    ends its lines in LF, and POP would send more octets than its size says."""
    rest = data.replace(b"\r\n", b"")
    if b"\n" not in rest and b"\r" not in rest:
        return data
    return b"\r\n".join(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"))


def _distinct(rcpts: list[Recipient]) -> list[Recipient]:
    """One entry per address (domain compared without case), the most visible kind kept.

    An address named twice (To and Cc, say) gets the message once, as from SMTP.
    """
    order = {TO: 0, CC: 1, BCC: 2}
    best: dict[str, Recipient] = {}
    for r in rcpts:
        local, _, domain = r.address.rpartition("@")
        key = f"{local}@{domain.lower()}"
        if key not in best or order[r.kind] < order[best[key].kind]:
            best[key] = r
    return list(best.values())


def queue_message(settings: Any, sender: str, rcpts: list[Recipient], message: bytes, *,
                  program: str, via: str, usrprf: str | None, origin: str,
                  history: tuple[dict[str, str], ...] = ()) -> str:
    """Put a finished message durably on QTMSINQ with the EH, E1, E2, ET entries.

    The one way programs hand mail to the framework, so every API journals the
    same steps and adds the same trace header.  ``message`` must not carry Bcc
    fields any more.
    """
    from twistmail.journal import Journal
    from twistmail.queue import Envelope, FileQueue
    from twistmail.queue import Recipient as QueueRecipient

    queue = FileQueue.for_settings(settings)
    env = Envelope.new(
        sender, [QueueRecipient(r.address, kind=r.kind.lower()) for r in rcpts],
        source="api", auth=usrprf, history=history,
    )
    trace = (f"Received: by {settings.hostname} (twistmail {via}) id {env.id};\r\n"
             f"\t{email.utils.formatdate(time.time(), localtime=True)}\r\n").encode()
    message = _completed(message, env.id, settings.hostname)
    journal = Journal.from_settings(settings, f"{program}/{os.getpid()}")
    try:
        with queue.new_spool(env) as spool:
            spool.write(trace + message)

            def record() -> None:
                with journal.batch():
                    entries()

            def entries() -> None:
                journal.write("EH", f"EH TMSF {origin}", env.id, file=origin, usrprf=usrprf)
                journal.write("E1", f"E1 O {sender}", env.id, originator=sender)
                for r in rcpts:
                    journal.write("E2", f"E2 R {r.address}", env.id, recipient=r.address,
                                  kind=r.kind)
                journal.write("ET", f"ET SIZE {spool.size}", env.id, size=spool.size)

            return spool.commit(QTMSINQ, env, before_publish=record)
    finally:
        journal.close()  # a program sending thousands of notes keeps no descriptor


def _completed(message: bytes, qid: str, hostname: str) -> bytes:
    """The message with a Date and a Message-ID where it lacks one or has it empty.

    RFC 5322 §3.6 requires both, once; as a submission server adds them (RFC
    6409 §8.2, §8.3), the APIs do, like twistmail's SMTP server.
    """
    end = message.find(b"\r\n\r\n")
    cut = end + 2 if end >= 0 else len(message)
    head, rest = message[:cut], message[cut:]
    fields = _fields(head)
    added = ""
    for name, value in (("Date", email.utils.formatdate(time.time(), localtime=True)),
                        ("Message-ID", f"<{qid}@{hostname}>")):
        values = [v for n, v in fields if n == name.lower().encode()]
        if not any(values):
            added += f"{name}: {value}\r\n"
        if b"" in values:  # an empty copy, folded over blank continuations too
            head = re.sub(rb"(?im)^%s[ \t]*:[ \t]*\r\n(?:[ \t]+\r\n)*" % name.encode(),
                          b"", head)
    return added.encode() + head + rest


def _check_limits(settings: Any, rcpts: list[Recipient], size: int) -> None:
    """The limits SMTP clients meet (CHGSMTPA MAXMSGSIZE, MAXRCPT) hold for the APIs too."""
    if size > settings.smtp.maxmsgsize:
        raise SendMailError(f"message: {size} bytes is more than the {settings.smtp.maxmsgsize} "
                            "MAXMSGSIZE allows (CHGSMTPA)")
    if len(rcpts) > settings.smtp.maxrcpt:
        raise SendMailError(f"recipients: {len(rcpts)} is more than the "
                            f"{settings.smtp.maxrcpt} MAXRCPT allows (CHGSMTPA)")


def _check_file(path: str | os.PathLike[str]) -> Path:
    text = os.fspath(path)
    if not text.startswith("/"):
        raise SendMailError(f"file: {text!r} is not an absolute path; the MIME file's name "
                            "must start with / (for example /home/app/note.mime)")
    file = Path(text)
    if not file.is_file():
        raise SendMailError(f"file: {text} does not exist or is not a regular file")
    if not os.access(file, os.R_OK):
        raise SendMailError(f"file: {text} cannot be read by this user")
    return file


def _split(data: bytes, file: Path) -> tuple[bytes, bytes]:
    """Header block (with its last CRLF) and body, of a message with CRLF line ends.

    The blank line is required, also for a message without a body: without
    it, body text of the shape "Status: failed" would pass for header fields.
    """
    end = data.find(b"\r\n\r\n", 0, MAX_HEADER)
    if end < 0:
        raise SendMailError(
            f"file: {file} has no end of header: put an empty line between the header and "
            "the body (also when there is no body), as RFC 5322 section 2.1 requires")
    return data[: end + 2], data[end + 4:]


def _check_fields(head: bytes, file: Path) -> None:
    """Each line of the header is a field (``name:``) or folds the one before.

    Otherwise the file is no message: a first line folded onto nothing would
    fold into the fields added before it (Message-ID, Received), and text
    with no field at all would be sent as a body with only those fields.
    """
    for number, line in enumerate(head.split(b"\r\n")[:-1], 1):
        if line[:1] in (b" ", b"\t") and number > 1:
            continue
        if _FIELD.match(line) is None:
            shown = line[:60].decode("ascii", "replace")
            raise SendMailError(
                f"file: line {number} of {file} ({shown!r}) is not a header field "
                "(name: value) nor the continuation of one (RFC 5322 section 2.2); the "
                "file must be a whole message, its header first")


#: A field's name: printable US-ASCII but the colon (RFC 5322 §3.6.8), then ":".
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")

MAX_LINE = 998  # octets before the CRLF (RFC 5322 §2.1.1, RFC 5321 §4.5.3.1.6)


_LONG_LINE = re.compile(rb"[^\r\n]{%d}" % (MAX_LINE + 1))


def _check_lines(data: bytes, file: Path) -> None:
    """What the SMTP server refuses (550 5.6.0) the API refuses too: a line
    longer than a server must take would be refused, or cut, further on."""
    long = _LONG_LINE.search(data)
    if long is not None:
        start = data.rfind(b"\n", 0, long.start()) + 1
        end = data.find(b"\r\n", start)
        number = data.count(b"\n", 0, start) + 1
        raise SendMailError(
            f"file: line {number} of {file} has {(end if end >= 0 else len(data)) - start} "
            f"octets; allowed: at most {MAX_LINE} before its line end (RFC 5322 section "
            "2.1.1): encode the part (quoted-printable or base64)")


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """Each field's name (lower case) and value, unfolded.  A name may have spaces
    before its colon (RFC 5322 §4.5.3, as ``_check_fields`` and our SMTP server
    accept): the email package's parser stopped at such a line, and every field
    after it was taken as missing."""
    out: list[tuple[bytes, bytes]] = []
    for line in head.splitlines():
        if line[:1] in (b" ", b"\t"):
            if out:
                out[-1] = (out[-1][0], (out[-1][1] + b" " + line.strip()).strip())
            continue
        name, colon, value = line.partition(b":")
        if colon:
            out.append((name.strip().lower(), value.strip()))
    return out


def _without_bcc(head: bytes) -> bytes:
    """The header block without Bcc and Resent-Bcc fields (and their continuation lines).

    Lines may end in CRLF or a bare LF (a file written on Unix): either ends a field.
    """
    out, skipping = [], False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() in (b"bcc", b"resent-bcc")
        if not skipping:
            out.append(line)
    return b"".join(out)


def _check_address(what: str, address: str) -> str:
    try:
        return str(parse_mailbox(address.strip()))
    except (PathError, AttributeError):
        raise SendMailError(f"{what}: {address!r} is not an e-mail address "
                            "(user@domain)") from None


def _recipient(r: Recipient | tuple[str, str] | str) -> Recipient:
    if isinstance(r, str):
        r = Recipient(r)
    elif isinstance(r, tuple):
        r = Recipient(r[0], r[1])
    kind = KINDS.get(str(r.kind).upper().lstrip("*"))
    if kind is None:
        raise SendMailError(f"recipient type: {r.kind!r} is not allowed; allowed: TO, CC, BCC "
                            "(0, 1, 2)")
    return Recipient(_check_address("recipient", r.address), kind)


def _verify_originator(directory: Any, sender: str, usrprf: str | None) -> None:
    """VFYMSFMSG(*YES): the originator must be the calling user's own address."""
    if usrprf is None:
        raise SendMailError("usrprf: VFYMSFMSG is *YES, so the calling user profile must be "
                            "given; its SMTP address must be the originator")
    own = directory.smtp_address(usrprf)
    if own is None or own.lower() != sender.lower():
        raise SendMailError(f"originator: {sender} is not the SMTP address of user profile "
                            f"{usrprf.upper()} ({own or 'none'}), and VFYMSFMSG is *YES")


def _caller(directory: Any, usrprf: str) -> None:
    """The calling profile exists and may run a job."""
    if directory.get_profile(usrprf) is None:
        raise SendMailError(f"usrprf: {usrprf!r} does not exist")
    _not_disabled(directory, usrprf)


def _not_disabled(directory: Any, usrprf: str) -> None:
    """A disabled profile runs no job on IBM i, so it calls no API either."""
    profile = directory.get_profile(usrprf)
    if profile is not None and profile.status != "*ENABLED":
        raise SendMailError(f"usrprf: user profile {profile.usrprf} is {profile.status}; "
                            "enable it (chgusrprf --status *ENABLED) to send mail as it")


# -- Create and Send MIME E-mail (QtmsCreateSendEmail) -------------------------

#: NOTE0100's note security levels.
SECURITY_LEVELS = {0: "none", 1: "signed", 2: "encrypted", 3: "signed and encrypted"}


def create_send_email(
    recipients: Iterable[Recipient | tuple[str, str] | str],
    subject: str,
    body: str,
    attachments: Iterable[str | os.PathLike[str] | tuple[str | os.PathLike[str], str]] = (),
    security: int | str = 0,
    *,
    usrprf: str,
    password: str | None = None,
    settings: Any = None,
) -> str:
    """Build a MIME message, sign and/or encrypt it, and queue it; returns its queue id.

    Mirrors QtmsCreateSendEmail: the originator is not a parameter but the
    SMTP address of ``usrprf``'s directory entry; ``security`` is NOTE0100's
    level (0 none, 1 signed, 2 encrypted, 3 signed then encrypted), using the
    certificate store of ``usrprf`` opened with ``password``.  An attachment
    is a file path, or a (path, content type) pair; otherwise its type is
    guessed from its name.  Every check comes before anything is queued.
    """
    from twistmail import mimebuild

    if not isinstance(body, str):  # said before len() raises TypeError
        raise SendMailError(f"body: must be text (str), not {type(body).__name__}")
    settings = settings or configmod.load()
    level = _security(security)
    rcpts = _distinct([_recipient(r) for r in recipients])
    if not rcpts:
        raise SendMailError("recipients: at least one recipient is needed")
    sender, name = _originator(settings, usrprf)
    attachments = list(attachments)
    # Base64 makes 3 bytes 4 (and a line end each 76): refused before anything is read.
    _check_limits(settings, rcpts, len(body) + sum(
        mimebuild.attachment_size(a) * 4 // 3 for a in attachments))
    content = mimebuild.content_entity(body, mimebuild.attachment_parts(attachments))
    if level:
        content = mimebuild.secure(content, level, settings, name, password,
                                   [r.address for r in rcpts], sender=sender)
    head = mimebuild.header_block(sender, rcpts, subject, settings.hostname)
    _check_limits(settings, rcpts, len(head) + len(content))
    return queue_message(settings, sender, rcpts, head + content, program="QTMSCRTSNM",
                         via="Create and Send MIME E-mail API", usrprf=name,
                         origin="QtmsCreateSendEmail",
                         history=({"api": "QtmsCreateSendEmail",
                                   "security": SECURITY_LEVELS[level]},))


def _security(value: int | str) -> int:
    text = str(value).strip()
    if text not in {str(k) for k in SECURITY_LEVELS}:
        allowed = ", ".join(f"{k} ({v})" for k, v in SECURITY_LEVELS.items())
        raise SendMailError(f"security: {value!r} is not allowed; allowed: {allowed}")
    return int(text)


def _originator(settings: Any, usrprf: str) -> tuple[str, str]:
    """The calling profile's SMTP address, as QtmsCreateSendEmail looks it up."""
    from twistmail.directory import DirectoryError, SqliteDirectory, profile_name

    try:
        name = profile_name(usrprf)
    except DirectoryError as e:
        raise SendMailError(f"usrprf: {usrprf!r} {e.problem}") from None
    with SqliteDirectory.from_settings(settings) as directory:
        _caller(directory, name)
        address = directory.smtp_address(name)
    if address is None:
        raise SendMailError(
            f"usrprf: user profile {name} has no directory entry with an SMTP name, so the "
            f"message has no originator; add one (adddire ... --user {name} --smtpuser U "
            "--smtpdomain D)")
    return address, name
