"""An 8-bit message made 7-bit for a server that does not offer 8BITMIME.

RFC 6152 §3 leaves a client with 8-bit data for such a server two ways:
convert it to 7 bit, or return it.  Practically every server takes 8-bit
data, so returning it would turn away mail that would have arrived; the
client converts instead, as Postfix does for MIME mail.

The conversion touches as little as it can, working on the bytes: each
leaf part whose body holds 8-bit octets gets a new body, in
quoted-printable (text that is mostly ASCII, which stays readable) or
base64 (anything else), and a new Content-Transfer-Encoding field.  All
other bytes stay as they came: every header field, boundary lines,
7-bit parts.  The stdlib ``email`` package only reads each part's header
(type, boundary, charset, encoding); writing a part back through it would
fold, reorder and re-encode header fields.

* A message with no MIME header fields and an 8-bit body gets them: a
  text/plain body of the ``unknown-8bit`` charset (RFC 1428), since its
  charset is not known.  One with a Content-Type but no MIME-Version gets
  MIME-Version.
* A multipart whose boundary is missing, or never appears, is taken as
  text of ``unknown-8bit`` (a multipart entity may not be encoded).
* An embedded message (message/rfc822, message/global) is converted in
  turn; its label becomes 7bit when nothing 8-bit is left in it.
* Header fields are never changed: 8-bit header text is SMTPUTF8's
  business (RFC 6532), not 8BITMIME's, and is sent as it came.  So are
  8-bit octets in a preamble or epilogue, which no reader shows, after
  being replaced by "?".

Signatures over a converted part (DKIM body hashes, S/MIME over an 8-bit
part) no longer verify, as with any converting relay.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser

CRLF = b"\r\n"
#: Text with more 8-bit octets than this share goes in base64: in
#: quoted-printable each one takes three, and the message could outgrow the
#: server's SIZE.
QP_MAX_8BIT = 0.17
_HIGH = bytes(range(128, 256))
_BLANK = re.compile(rb"\r\n|\n")  # a header block's end: the first empty line
_NOT_ASCII_SAFE = ("utf-16", "utf-32", "ucs-2", "ucs-4")


def to_7bit(data: bytes) -> bytes:
    """The message ``data`` with the body of every 8-bit leaf part re-encoded."""
    return _entity(data, "text/plain", top=True)


def _entity(data: bytes, default_type: str, top: bool) -> bytes:
    head, blank, body = _split(data)
    if body.isascii():
        return data
    info = BytesHeaderParser(policy=policy.compat32).parsebytes(head)
    if default_type != "text/plain":
        info.set_default_type(default_type)
    add: list[bytes] = []
    if top and info.get("MIME-Version") is None:
        add.append(b"MIME-Version: 1.0")
        if info.get("Content-Type") is None and info.get("Content-Transfer-Encoding") is None:
            return _leaf(head, blank, body, info, add, relabel=True)
    ctype = info.get_content_type()
    if ctype.startswith("multipart/"):
        boundary = info.get_boundary()
        converted = _multipart(body, boundary, ctype == "multipart/digest") \
            if boundary else None
        if converted is None:
            return _leaf(head, blank, body, info, add, relabel=True)
        return _labelled(head, blank, converted, info, add)
    if ctype in ("message/rfc822", "message/global"):
        return _labelled(head, blank, _entity(body, "text/plain", top=True), info, add)
    return _leaf(head, blank, body, info, add, relabel=False)


def _split(data: bytes) -> tuple[bytes, bytes, bytes]:
    """Header block (with its last line end), the empty line, and the body."""
    first = _BLANK.match(data)
    if first is not None:  # no header fields at all
        return b"", first.group(), data[first.end():]
    for m in re.finditer(rb"(\r\n|\n)(\r\n|\n)", data):
        return data[:m.start(2)], m.group(2), data[m.end():]
    return data, b"", b""  # header fields only


def _multipart(body: bytes, boundary: str, digest: bool) -> bytes | None:
    """Each part converted, every delimiter line kept; None if the boundary never appears."""
    dash = b"--" + boundary.encode("ascii", "surrogateescape")
    delimiter = re.compile(rb"(?m)^" + re.escape(dash) + rb"(--)?[ \t]*(?:\r\n|\n|\Z)")
    found = list(delimiter.finditer(body))
    if not found:
        return None
    out = [_plain(body[:found[0].start()])]  # the preamble
    for i, m in enumerate(found):
        out.append(body[m.start():m.end()])
        if m.group(1):  # the close delimiter: the epilogue follows
            out.append(_plain(body[m.end():]))
            return b"".join(out)
        end = found[i + 1].start() if i + 1 < len(found) else len(body)
        part = body[m.end():end]
        # The line end before the next delimiter belongs to that delimiter.
        nl = b"\r\n" if part.endswith(b"\r\n") else b"\n" if part.endswith(b"\n") else b""
        if i + 1 == len(found):
            nl = b""  # no close delimiter: the part runs to the end
        content = part[:len(part) - len(nl)]
        out.append(_entity(content, "message/rfc822" if digest else "text/plain", top=False))
        out.append(nl)
    return b"".join(out)


def _plain(text: bytes) -> bytes:
    """A preamble or epilogue, shown by no reader: 8-bit octets become "?"."""
    return text if text.isascii() else bytes(b if b < 128 else 63 for b in text)


def _labelled(head: bytes, blank: bytes, body: bytes, info: Message,
              add: list[bytes]) -> bytes:
    """A composite entity with its converted body; labelled 7bit once nothing 8-bit is left."""
    drop = set()
    if _encoding(info) in ("8bit", "binary") and body.isascii():
        drop.add("content-transfer-encoding")
        add = [*add, b"Content-Transfer-Encoding: 7bit"]
    return _fields(head, drop, add) + (blank or CRLF) + body


def _leaf(head: bytes, blank: bytes, body: bytes, info: Message, add: list[bytes],
          relabel: bool) -> bytes:
    """One part's body, 8-bit, in quoted-printable or base64.

    ``relabel``: its type cannot stand (no MIME header fields, or a
    multipart without its boundary): text/plain of ``unknown-8bit``.
    """
    content = _decoded(body, _encoding(info))
    drop = {"content-transfer-encoding"}
    if relabel:
        drop.add("content-type")
        add = [*add, b"Content-Type: text/plain; charset=unknown-8bit"]
        text, charset = True, "unknown-8bit"
    else:
        text, charset = info.get_content_maintype() == "text", info.get_content_charset() or ""
    eight = len(content) - len(content.translate(None, _HIGH))
    if text and not charset.startswith(_NOT_ASCII_SAFE) and \
            eight <= QP_MAX_8BIT * max(1, len(content)):
        encoded, cte = binascii.b2a_qp(content, istext=True), b"quoted-printable"
    else:
        encoded, cte = CRLF.join(_base64_lines(content)), b"base64"
    add = [*add, b"Content-Transfer-Encoding: " + cte]
    return _fields(head, drop, add) + (blank or CRLF) + encoded


def _encoding(info: Message) -> str:
    """The Content-Transfer-Encoding named, without comments or spaces, in lower case."""
    value = str(info.get("Content-Transfer-Encoding", "7bit"))
    return value.split("(", 1)[0].strip().lower() or "7bit"


def _decoded(body: bytes, encoding: str) -> bytes:
    """The part's octets: a quoted-printable or base64 body holding 8-bit octets is decoded.

    Such a body is broken already; its 8-bit octets are taken as they are
    (quoted-printable) or dropped (base64 has no use for them).
    """
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding == "base64":
        try:
            return binascii.a2b_base64(body.translate(None, _HIGH))
        except binascii.Error:
            return body  # not base64 at all: its octets, as they are
    return body


def _base64_lines(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), 57):
        yield binascii.b2a_base64(data[i:i + 57], newline=False)


def _fields(head: bytes, drop: set[str], add: list[bytes]) -> bytes:
    """The header block without the fields named in ``drop`` and with ``add`` at its end."""
    if head and not head.endswith((b"\n", b"\r")):
        head += CRLF
    kept = []
    for field in re.split(rb"(?m)^(?![ \t])", head):
        name = field.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
        if field and name not in drop:
            kept.append(field)
    return b"".join(kept) + b"".join(a + CRLF for a in add)
