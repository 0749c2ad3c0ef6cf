"""Nondelivery notices: RFC 3464 multipart/report messages built with ``email``.

The notice goes to the originator with a null reverse-path, so that a notice
about a notice can never be sent (RFC 5321 §6.1); a copy goes to the
NONDELIVERY user profile when one is enrolled, as IBM i does.  It carries a
human-readable part, the machine-readable ``message/delivery-status`` part,
and the headers of the original message (``text/rfc822-headers``, RFC 6522).
The whole original comes back only in a failure notice whose sender asked
for it (DSN RET=FULL, honoured for clients that may relay), so a notice
cannot be used to reflect large payloads.
"""

from __future__ import annotations

import email
import email.errors
import email.policy
import email.utils
import hashlib
import quopri
import re
import time
from collections.abc import Callable, Iterable
from email.message import EmailMessage, Message
from email.policy import SMTP
from pathlib import Path
from typing import Any

import attrs

from twistmail.directory import nondelivery_address

#: What the retries add to the last reply of a recipient they gave up on.
EXHAUSTED = " (retries exhausted)"
MAX_HEADERS = 64 * 1024
#: Report fields are not folded: the email package breaks a long one right
#: after its name, and some readers of reports do not unfold.  900 + name < 998.
_WIRE = SMTP.clone(max_line_length=998)


@attrs.frozen
class Failure:
    address: str
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str  # the reply or reason, one line
    action: str = "failed"  # RFC 3464 Action: failed, delayed, delivered, relayed
    orcpt: str | None = None  # the client's ORCPT, "addr-type;address"
    mta: str | None = None  # the server whose reply ``diagnostic`` is, if any
    retry_until: float | None = None  # delayed: when the last try is due


#: How a report names the message it is about, by kind.
ABOUT = {"failed": "Undelivered message", "delayed": "Delayed message",
         "delivered": "Delivered message", "relayed": "Relayed message"}

#: What each kind of report says, and which NOTIFY keyword asks for it.
REPORTS = {
    "failed": ("Undelivered Mail Returned to Sender",
               "Your message could not be delivered to one or more recipients.", "FAILURE"),
    "delayed": ("Delayed Mail (still being retried)",
                "Your message has not been delivered yet to one or more recipients;\n"
                "the mail system keeps trying.", "DELAY"),
    "delivered": ("Successful Mail Delivery Report",
                  "Your message was delivered to the mailbox of the recipients below.",
                  "SUCCESS"),
    "relayed": ("Successful Mail Delivery Report",
                "Your message was passed to a mail system that does not report\n"
                "delivery status; no further notice will come from there.", "SUCCESS"),
}


def notice_id(queue_id: str, kind: str = "failed", addresses: Iterable[str] = (),
              attempts: int = 0) -> str:
    """The queue id of one notice about ``queue_id``: the same on every attempt to make it.

    A bridge that crashed after queueing a notice and before recording it
    makes the notice again under the same id, and local delivery's
    idempotency (Maildir names derive from the queue id) keeps one copy.
    Different notices about one message (a local user unknown at once, a
    remote one refused days later, a delay at each second-level retry) name
    other recipients or another attempt, so each has an id of its own.
    """
    tag = b"ndn" if kind == "failed" else kind.encode()
    event = "\n".join(sorted(addresses)) + f"\n{attempts}"
    digest = hashlib.sha256(tag + b":" + queue_id.encode() + b":" + event.encode()).hexdigest()
    return queue_id[:16] + digest[:6]


def original_headers(body_path: Path, trace: int = 0) -> bytes:
    """The header block of the queued message (bounded); it starts ``trace``
    octets into the file (the envelope's ``trace``)."""
    out = bytearray()
    with open(body_path, "rb") as f:
        f.seek(trace)
        for line in f:
            if line in (b"\r\n", b"\n") or len(out) + len(line) > MAX_HEADERS:
                break
            out += line
    return bytes(out)


def build_notice(
    *,
    hostname: str,
    queue_id: str,
    originator: str,
    arrival: float,
    failures: list[Failure],
    headers: bytes,
    message_id: str | None,
    full: bytes | None = None,
    envid: str | None = None,
    nid: str | None = None,
    withheld: bool = False,
) -> bytes:
    """The notice as wire bytes (CRLF line ends); ``nid`` is its own queue id.

    ``withheld``: RET=FULL asked for the message, too large to go back.
    """
    kind = failures[0].action if failures else "failed"
    nid = nid or notice_id(queue_id, kind, (f.address for f in failures))
    subject, intro, _ = REPORTS[kind]
    msg = EmailMessage()
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = f"<{nid}.ndn@{hostname}>"
    msg["Auto-Submitted"] = "auto-replied"
    # The fields that carry what the sender wrote go in as they are, not
    # through the email package: it decodes an encoded word (=?utf-8?q?...?=)
    # even inside a quoted local part or a message id.  A line break there
    # then either made the notice impossible (ValueError: the message stayed
    # queued for ever) or, in Python before 3.11.10, was written as it is
    # (CVE-2024-6923): header fields and a body of the sender's in a notice
    # from MAILER-DAEMON.
    own = [f"To: <{_header_text(originator)}>"]
    if message_id and _MESSAGE_ID.fullmatch(message_id) and "=?" not in message_id:
        own += [f"In-Reply-To: {message_id}", f"References: {message_id}"]
    own_fields = "".join(f"{line}\r\n" for line in own).encode("ascii")
    listing = "\n".join(f"  <{_printable(f.address)}>: {_printable(f.diagnostic)}"
                        for f in failures)
    msg.set_content(
        f"This is the mail system at host {hostname}.\n\n"
        f"{intro}\n"
        f"For help, write to the postmaster of {hostname} and quote the\n"
        f"queue id {queue_id}.\n\n"
        f"{listing}\n"
        + (f"\nThe message is larger than {MAX_RETURNED // (1024 * 1024)} MiB: only its"
           " header is returned.\n" if withheld else "")
    )
    msg.make_mixed()
    msg.replace_header(
        "Content-Type", 'multipart/report; report-type="delivery-status"'
    )
    boundary = f"{queue_id}.ndn"
    while full is not None and f"--{boundary}".encode() in full:  # the original goes in raw
        boundary += ".x"
    msg.set_boundary(boundary)
    msg.attach(_status_part(hostname, queue_id, arrival, failures, envid))
    if full is None:
        msg.attach(_headers_part(headers, ABOUT[kind]))
        return own_fields + msg.as_bytes(policy=_WIRE)
    original = _without_bcc(full)
    if not original.endswith(b"\r\n"):
        original += b"\r\n"
    marker = f"X-Twistmail-Returned: {nid}".encode()
    eightbit = not original.isascii()
    if eightbit:  # RFC 2045 §6.4: the multipart that holds an 8-bit part says so too
        msg["Content-Transfer-Encoding"] = "8bit"
    msg.attach(_message_part(marker + b"\r\n\r\n", ABOUT[kind], eightbit=eightbit))
    data = own_fields + msg.as_bytes(policy=_WIRE)
    # The original goes back byte for byte (its signatures still verify),
    # not as the email package would write it again.
    return data.replace(marker + b"\r\n\r\n", original, 1)


def _status_part(hostname: str, queue_id: str, arrival: float,
                 failures: list[Failure], envid: str | None = None) -> Message:
    per_message = _fields([
        *([("Original-Envelope-Id", _ascii_line(envid))] if envid else []),
        ("Reporting-MTA", f"dns; {hostname}"),
        ("X-Twistmail-Queue-ID", queue_id),
        ("Arrival-Date", email.utils.formatdate(arrival, localtime=True)),
    ])
    part = Message()
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    part.attach(per_message)
    now = email.utils.formatdate(localtime=True)
    for f in failures:
        original = ([("Original-Recipient", _ascii_line(f.orcpt, escaped=True))]
                    if f.orcpt else [])
        tried = [("Last-Attempt-Date", now)] if f.action in ("failed", "delayed") else []
        if f.retry_until is not None:  # RFC 3464 §2.3.8
            tried.append(("Will-Retry-Until", email.utils.formatdate(f.retry_until,
                                                                     localtime=True)))
        part.attach(_fields([
            *original,
            ("Final-Recipient", _address_field(f.address)),
            ("Action", f.action),
            ("Status", f.status),
            # RFC 3464 §2.3.5: an attempt to relay over SMTP names the server.
            *([("Remote-MTA", f"dns; {_ascii_line(f.mta)}")] if f.mta else []),
            ("Diagnostic-Code", _diagnostic(f.diagnostic, f.mta is not None)),
            *tried,
        ]))
    return part


def _diagnostic(text: str, remote: bool) -> str:
    """A reply a server sent as type ``smtp``, as it sent it; our own words (a
    refused connection, a local delivery, retries used up) as ``X-Twistmail``,
    as Postfix writes ``X-Postfix`` (RFC 3464 §2.3.6)."""
    line = _ascii_line(text)
    if remote and re.match(r"[2-5]\d\d(?:[ -]|$)", line):
        return f"smtp; {line.removesuffix(EXHAUSTED)}"
    return f"X-Twistmail; {line}"


def _fields(pairs: list[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in pairs:
        block[name] = value
    return block


_BCC = re.compile(rb"^(?:resent-)?bcc[ \t]*:.*(?:\r?\n[ \t].*)*(?:\r?\n|$)", re.I | re.M)


def _headers_part(headers: bytes, about: str) -> Message:
    """The original's header block, without Bcc: copies go to NONDELIVERY and NFYDLVRY.

    8-bit fields (a raw UTF-8 Subject, or bytes of no charset at all) go
    quoted-printable from the bytes themselves, so that the notice stays
    7-bit and a reader gets back the very bytes that were sent.
    """
    part = Message()
    part["Content-Description"] = f"{about} headers"
    headers = _BCC.sub(b"", headers).replace(b"\r\n", b"\n")
    if headers.isascii():
        part["Content-Type"] = "text/rfc822-headers"
        part.set_payload(headers.decode("ascii"))
        return part
    try:
        headers.decode("utf-8")
        part["Content-Type"] = 'text/rfc822-headers; charset="utf-8"'
    except UnicodeDecodeError:
        part["Content-Type"] = "text/rfc822-headers"
    part["Content-Transfer-Encoding"] = "quoted-printable"
    part.set_payload(quopri.encodestring(headers).decode("ascii"))
    return part


def _message_part(full: bytes, about: str, eightbit: bool = False) -> Message:
    """DSN RET=FULL: the whole original message (RFC 3462 message/rfc822).

    An 8-bit original is labelled so (RFC 2046 §5.2.1 allows no other
    encoding for it); a server without 8BITMIME gets its parts converted.
    """
    part = Message()
    part["Content-Type"] = "message/rfc822"
    part["Content-Description"] = about
    if eightbit:
        part["Content-Transfer-Encoding"] = "8bit"
    part.set_payload([email.message_from_bytes(full, policy=email.policy.compat32)])
    return part


def _without_bcc(full: bytes) -> bytes:
    """The message without its Bcc fields: copies go to NONDELIVERY and NFYDLVRY."""
    end = min((i for i in (full.find(b"\r\n\r\n"), full.find(b"\n\n")) if i >= 0),
              default=len(full))
    return _BCC.sub(b"", full[:end + 1]) + full[end + 1:]


MAX_RETURNED = 10 * 1024 * 1024


def _full_original(body: Path, trace: int) -> bytes | None:
    if body.stat().st_size - trace > MAX_RETURNED:
        return None  # too big to send back: the headers will do
    with open(body, "rb") as f:
        f.seek(trace)
        return f.read()


def _ascii_line(text: str, limit: int = 900, escaped: bool = False) -> str:
    """One line of printable ASCII for a report field: what is not is written
    \\x{HEX} (RFC 6533), so a remote reply cannot add a field or a control.
    ``escaped``: the text is in that form already (an ORCPT of type utf-8, as
    the client gave it): its backslashes stay as they are."""
    line = "".join(c if " " <= c <= "~" and (escaped or c != "\\") else f"\\x{{{ord(c):X}}}"
                   for c in " ".join(text.split()))
    if len(line) > limit:  # cut after escaping: an escape is up to ten characters
        line = line[:limit]
        start = line.rfind("\\x{")
        if start >= 0 and "}" not in line[start:]:
            line = line[:start]  # not an escape cut in two
    return line


#: A message id written back in In-Reply-To and References: printable ASCII, no space.
_MESSAGE_ID = re.compile(r"<[!-~]{1,900}>")


def _header_text(text: str) -> str:
    """An address for a header field as it is, when it is printable ASCII."""
    if text.isascii() and text.isprintable() and len(text) <= 900:
        return text
    return _ascii_line(text)


def _address_field(address: str) -> str:
    """Final-Recipient: ``rfc822;`` for an ASCII address, RFC 6533's ``utf-8;`` else."""
    if address.isascii() and address.isprintable():
        return f"rfc822; {address}"
    return f"utf-8; {_ascii_line(address)}"


def _printable(text: str) -> str:
    """Text for the human-readable part: any script, but no control character."""
    return "".join(c if c.isprintable() else " " for c in text)


def wants_notice(env: Any, address: str, keyword: str = "FAILURE") -> bool:
    """DSN NOTIFY (RFC 3461): without it, failures are reported; NEVER reports nothing."""
    for r in env.recipients:
        if r.address == address and r.notify:
            return keyword in r.notify
    return keyword == "FAILURE"


def queue_notice(queue: Any, directory: Any, journal: Any, hostname: str, env: Any,
                 failures: list[Failure], body: Path,
                 responsible: str | None = None,
                 announce: Callable[[], None] | None = None) -> str | None:
    """Queue one notice about ``failures`` in QTMSINQ; its queue id, or None.

    ``announce`` writes the caller's own journal entries for the notice
    first, and only when one is made (the bridge's 87).

    None when the message had a null reverse-path: a notice about a notice
    is never sent (7U).  The notice's id derives from the original's, so a
    repeated call after a crash makes the same message, not a second one.
    """
    from twistmail.interfaces import QTMSINQ
    from twistmail.queue import Envelope, Recipient

    kind = failures[0].action if failures else "failed"
    if not env.originator:
        if kind == "failed":  # 7U: an undeliverable notice deleted; other reports just go
            journal.write("7U", f"7U DEL {env.id}", env.id, reason="null reverse-path",
                          recipients=[f.address for f in failures])
        return None
    keyword = REPORTS[kind][2]
    unwanted = [f.address for f in failures if not wants_notice(env, f.address, keyword)]
    known = {r.address: r for r in env.recipients}
    failures = [attrs.evolve(f, orcpt=f.orcpt or getattr(known.get(f.address), "orcpt", None),
                             mta=f.mta or getattr(known.get(f.address), "mta", None))
                for f in failures if f.address not in unwanted]
    if unwanted and kind == "failed":
        journal.write("7U", f"7U DEL {env.id}", env.id, reason="DSN NOTIFY excludes FAILURE",
                      recipients=unwanted)
    if not failures:
        return None
    recipients = [env.originator]
    if kind == "failed":
        for copy in (nondelivery_address(directory), responsible):
            if copy and copy.lower() not in (r.lower() for r in recipients):
                recipients.append(copy)  # the seed's NONDELIVERY user; NFYDLVRY's person
    nid = notice_id(env.id, kind, (f.address for f in failures), env.attempts)
    fields = dict(hostname=hostname, queue_id=env.id, originator=env.originator,
                  arrival=env.received, failures=failures, message_id=env.message_id,
                  envid=env.envid, nid=nid)
    # RET asks for the whole message back on failure only (RFC 3461 §4.3):
    # success and delay reports carry headers.
    wanted = env.ret == "FULL" and kind == "failed"
    try:
        full = _full_original(body, env.trace) if wanted else None
        data = build_notice(headers=original_headers(body, env.trace), full=full,
                            withheld=wanted and full is None, **fields)
    except (ValueError, TypeError, LookupError, email.errors.MessageError):
        # Whatever of the original the email package cannot carry, the notice
        # goes without it: a notice that cannot be made would hold the message.
        data = build_notice(headers=b"", full=None, **fields)
    notice_env = Envelope(id=nid, originator="", recipients=tuple(
        Recipient(r) for r in recipients), received=time.time(), source="ndn",
        message_id=f"<{nid}.ndn@{hostname}>")
    try:
        spool = queue.new_spool(notice_env)
    except ValueError:
        return nid  # made by an earlier attempt and still queued

    def record() -> None:
        """Before the notice shows on QTMSINQ: its entries precede its delivery's."""
        if announce is not None:
            announce()
        if kind == "failed":
            journal.write("7P", f"7P UNDL {env.originator}", env.id, originator=env.originator)
        else:
            code = "7W" if kind == "delayed" else "7R"
            journal.write(code, f"{code} DSN {kind} {env.originator}", env.id, action=kind,
                          recipients=[f.address for f in failures])
        # The seed's 7P 7G and 7R 7G: the new notice's message id, with the original's.
        journal.write("7G", f"7G MSGID {nid}", env.id, notice=nid)
        # A nondelivery message is function A's (AP/A1/A2); a report of
        # delivery is inserted like the seed's COD (BR/B1/B2), so that a
        # query for AP counts bounces alone.
        made, by, to = ("AP", "A1", "A2") if kind == "failed" else ("BR", "B1", "B2")
        journal.write(made, f"{made} {'UNDL' if kind == 'failed' else 'COD'} {nid}", nid,
                      original=env.id, action=kind)
        journal.write(by, f"{by} O <>", nid, originator="")
        for r in recipients:
            journal.write(to, f"{to} R {r}", nid, recipient=r)
        journal.flush()

    with spool:
        spool.write(data)
        spool.commit(QTMSINQ, notice_env, before_publish=record)
    return nid
