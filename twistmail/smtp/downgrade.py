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
  business (RFC 6532), not 8BITMIME's, and is sent as it came.  8-bit
  octets in a preamble or epilogue, which no reader shows, become "?".
* A header block ends where the email package ends it: at the empty
  line, or at the first line that is neither a field nor a continuation.
* Quoted-printable that would start a line with "--" at a soft line
  break, where a boundary could appear that was not there, gives way to
  base64.
* A message the conversion cannot take (more than ``MAX_DEPTH`` levels of
  nesting or ``MAX_PARTS`` parts, a bare CR in a header block, a boundary
  that is not ASCII) raises ``ValueError``: the caller sends it as it is.

Signatures over a converted part (DKIM body hashes, S/MIME over an 8-bit
part) no longer verify, as with any converting relay.
"""

from __future__ import annotations

import binascii
import codecs
import re
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser

CRLF = b"\r\n"
#: Text with more 8-bit octets than this share goes in base64: in
#: quoted-printable each one takes three, and the message could outgrow the
#: server's SIZE.
QP_MAX_8BIT = 0.17
#: Beyond these, converting costs more than it is worth (each level reads
#: its whole body again; each part's header is parsed): sent as it is.
MAX_DEPTH = 20
MAX_PARTS = 5000
_HIGH = bytes(range(128, 256))
_QUESTION_MARKS = bytes(range(128)) + b"?" * 128
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:|[ \t]")  # a header field, or a continuation


def to_7bit(data: bytes) -> bytes:
    """The message ``data`` with the body of every 8-bit leaf part re-encoded.

    ``data`` itself when its body holds no 8-bit octet; ValueError for a
    message it cannot take (see the module docstring).
    """
    pieces = to_7bit_pieces(data)
    return data if pieces is None else b"".join(pieces)


def to_7bit_pieces(data: bytes) -> list[bytes] | None:
    """The converted message as pieces to write one after the other; None if unchanged.

    Pieces, not one string: a large message is then never copied whole
    once more to join it, and its base64 lines are not each an object.
    """
    pieces = _entity(data, "text/plain", top=True, depth=0, parts=[0])
    return None if len(pieces) == 1 and pieces[0] is data else pieces


def _entity(data: bytes, default_type: str, top: bool, depth: int,
            parts: list[int]) -> list[bytes]:
    parts[0] += 1
    if depth > MAX_DEPTH or parts[0] > MAX_PARTS:
        raise ValueError(f"more than {MAX_DEPTH} levels or {MAX_PARTS} parts")
    head, blank, body = _split(data)
    if body.isascii():
        return [data]
    if re.search(rb"\r(?!\n)", head):
        raise ValueError("a bare CR in a header block")
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
        converted = _multipart(body, boundary, ctype == "multipart/digest", depth + 1, parts) \
            if boundary else None
        if converted is None:
            return _leaf(head, blank, body, info, add, relabel=True)
        return _labelled(head, blank, converted, info, add)
    if ctype in ("message/rfc822", "message/global"):
        inner = _entity(body, "text/plain", True, depth + 1, parts)
        return _labelled(head, blank, inner, info, add)
    if ctype in ("message/partial", "message/external-body"):
        return [data]  # may not be encoded (RFC 2046 5.2): it goes as it is
    return _leaf(head, blank, body, info, add, relabel=False)


def _split(data: bytes) -> tuple[bytes, bytes, bytes]:
    """Header block (with its last line end), the empty line, and the body.

    As the email package reads it: the block ends at the first empty line,
    or before the first line that is neither a field nor a continuation
    (then there is no empty line, and that line begins the body).
    """
    at = 0
    while at < len(data):
        end = data.find(b"\n", at)
        end = len(data) if end < 0 else end + 1
        line = data[at:end]
        if line in (b"\r\n", b"\n"):
            return data[:at], line, data[end:]
        if not _FIELD.match(line) or (at == 0 and line[:1] in (b" ", b"\t")):
            return data[:at], b"", data[at:]
        at = end
    return data, b"", b""  # header fields only


def _multipart(body: bytes, boundary: str, digest: bool, depth: int,
               parts: list[int]) -> list[bytes] | None:
    """Each part converted, every delimiter line kept; None if the boundary never appears."""
    if not boundary.isascii():
        raise ValueError("a boundary that is not ASCII")
    dash = b"--" + boundary.encode("ascii")
    delimiter = re.compile(rb"(?m)^" + re.escape(dash) + rb"(--)?[ \t]*(?:\r\n|\n|\Z)")
    found = list(delimiter.finditer(body))
    if not found:
        return None
    out = [_plain(body[:found[0].start()])]  # the preamble
    for i, m in enumerate(found):
        out.append(body[m.start():m.end()])
        if m.group(1):  # the close delimiter: the epilogue follows
            out.append(_plain(body[m.end():]))
            return out
        end = found[i + 1].start() if i + 1 < len(found) else len(body)
        part = body[m.end():end]
        # The line end before the next delimiter belongs to that delimiter.
        nl = b"\r\n" if part.endswith(b"\r\n") else b"\n" if part.endswith(b"\n") else b""
        if i + 1 == len(found):
            nl = b""  # no close delimiter: the part runs to the end
        content = part[:len(part) - len(nl)]
        out.extend(_entity(content, "message/rfc822" if digest else "text/plain", False,
                           depth, parts))
        out.append(nl)
    return out


def _plain(text: bytes) -> bytes:
    """A preamble or epilogue, shown by no reader: 8-bit octets become "?"."""
    return text.translate(_QUESTION_MARKS)


def _labelled(head: bytes, blank: bytes, body: list[bytes], info: Message,
              add: list[bytes]) -> list[bytes]:
    """A composite entity with its converted body; labelled 7bit once nothing 8-bit is left."""
    drop = set()
    if _encoding(info) in ("8bit", "binary") and all(p.isascii() for p in body):
        drop.add("content-transfer-encoding")
        add = [*add, b"Content-Transfer-Encoding: 7bit"]
    return [_fields(head, drop, add), blank or CRLF, *body]


def _leaf(head: bytes, blank: bytes, body: bytes, info: Message, add: list[bytes],
          relabel: bool) -> list[bytes]:
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
    encoded = None
    if text and _ascii_based(charset) and _count_8bit(content) <= QP_MAX_8BIT * max(
            1, len(content)):
        qp = binascii.b2a_qp(content, istext=True)
        if not re.search(rb"=\r?\n--", qp):  # a soft line break could make a boundary line
            encoded, cte = [qp], b"quoted-printable"
    if encoded is None:
        encoded, cte = _base64(content), b"base64"
    add = [*add, b"Content-Transfer-Encoding: " + cte]
    return [_fields(head, drop, add), blank or CRLF, *encoded]


def _count_8bit(content: bytes) -> int:
    """How many octets of ``content`` are 8-bit, a megabyte at a time (no copy of it all)."""
    step = 1 << 20
    return sum(len(c) - len(c.translate(None, _HIGH))
               for c in (content[i:i + step] for i in range(0, len(content), step)))


def _ascii_based(charset: str) -> bool:
    """Whether the charset keeps ASCII as ASCII (UTF-16 and UTF-32 do not)."""
    try:
        name = codecs.lookup(charset).name
    except (LookupError, ValueError):
        return not any(w in charset for w in ("16", "32", "ucs", "unicode"))
    return not name.startswith(("utf-16", "utf-32"))


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


def _base64(data: bytes) -> list[bytes]:
    """``data`` in base64 lines of 76 characters, CRLF between them, in pieces of 1024 lines."""
    step = 57 * 1024  # 57 octets make one line
    out = []
    for i in range(0, len(data), step):
        code = binascii.b2a_base64(data[i:i + step], newline=False)
        out += (CRLF.join(code[j:j + 76] for j in range(0, len(code), 76)), CRLF)
    return out[:-1]  # no line end after the last line


def _fields(head: bytes, drop: set[str], add: list[bytes]) -> bytes:
    """The header block without the fields named in ``drop`` and with ``add`` at its end.

    ``head`` is empty or ends with a line end (``_split`` cuts it at a line
    start; a message of header fields only has no 8-bit body to convert).
    """
    kept = []
    for field in re.split(rb"(?m)^(?![ \t])", head):
        name = field.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
        if field and name not in drop:
            kept.append(field)
    return b"".join(kept) + b"".join(a + CRLF for a in add)
