"""Nondelivery notices: RFC 3464 multipart/report messages built with ``email``.

The notice goes to the originator with a null reverse-path, so that a notice
about a notice can never be sent (RFC 5321 §6.1); a copy goes to the
NONDELIVERY user profile when one is enrolled, as IBM i does.  It carries a
human-readable part, the machine-readable ``message/delivery-status`` part,
and the headers of the original message (``text/rfc822-headers``, RFC 6522), never
the whole original, so a notice cannot be used to reflect large payloads.
"""

from __future__ import annotations

import email.utils
import hashlib
from email.message import EmailMessage, Message
from email.policy import SMTP
from pathlib import Path

import attrs

MAX_HEADERS = 64 * 1024


@attrs.frozen
class Failure:
    address: str
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str  # the reply or reason, one line


def notice_id(queue_id: str) -> str:
    """The queue id of the notice for ``queue_id``: the same on every attempt.

    A bridge that crashed after queueing a notice and before removing the
    original makes the notice again under the same id, and local delivery's
    idempotency (Maildir names derive from the queue id) keeps one copy.
    """
    digest = hashlib.sha256(b"ndn:" + queue_id.encode()).hexdigest()
    return queue_id[:16] + digest[:6]


def original_headers(body_path: Path) -> bytes:
    """The header block of the queued message (bounded)."""
    out = bytearray()
    with open(body_path, "rb") as f:
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
) -> bytes:
    """The notice as wire bytes (CRLF line ends)."""
    msg = EmailMessage()
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    msg["To"] = originator
    msg["Subject"] = "Undelivered Mail Returned to Sender"
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = f"<{notice_id(queue_id)}.ndn@{hostname}>"
    msg["Auto-Submitted"] = "auto-replied"
    if message_id:
        msg["In-Reply-To"] = message_id
        msg["References"] = message_id
    listing = "\n".join(f"  <{f.address}>: {f.diagnostic}" for f in failures)
    msg.set_content(
        f"This is the mail system at host {hostname}.\n\n"
        "Your message could not be delivered to one or more recipients.\n"
        "The administrator can trace it in the QZMF journal with\n"
        f"  twistmail dspjrn --msgid {queue_id}\n\n"
        f"{listing}\n"
    )
    msg.make_mixed()
    msg.replace_header(
        "Content-Type", 'multipart/report; report-type="delivery-status"'
    )
    msg.set_boundary(f"{queue_id}.ndn")
    msg.attach(_status_part(hostname, queue_id, arrival, failures))
    msg.attach(_headers_part(headers))
    return msg.as_bytes(policy=SMTP)


def _status_part(hostname: str, queue_id: str, arrival: float,
                 failures: list[Failure]) -> Message:
    per_message = _fields([
        ("Reporting-MTA", f"dns; {hostname}"),
        ("X-Twistmail-Queue-ID", queue_id),
        ("Arrival-Date", email.utils.formatdate(arrival, localtime=True)),
    ])
    part = Message()
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    part.attach(per_message)
    for f in failures:
        part.attach(_fields([
            ("Final-Recipient", f"rfc822; {f.address}"),
            ("Action", "failed"),
            ("Status", f.status),
            ("Diagnostic-Code", f"smtp; {_one_line(f.diagnostic)}"),
        ]))
    return part


def _fields(pairs: list[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in pairs:
        block[name] = value
    return block


def _headers_part(headers: bytes) -> Message:
    part = Message()
    part["Content-Type"] = "text/rfc822-headers"
    part["Content-Description"] = "Undelivered message headers"
    text = headers.decode("ascii", "replace").replace("\r\n", "\n")
    part.set_payload(text.replace("\n", "\r\n"))
    return part


def _one_line(text: str) -> str:
    return " ".join(text.split())[:900]
