"""An 8-bit message made 7-bit for a server that does not offer 8BITMIME.

RFC 6152 §3 leaves a client with 8-bit data for such a server two ways:
convert it to 7 bit, or return it.  Practically every server takes 8-bit
data, so returning it would turn away mail that would have arrived; the
client converts instead, as Postfix does for MIME mail.  Each leaf part
with 8-bit octets gets quoted-printable (text, which stays readable) or
base64 (anything else); every other part, header and boundary stays as
it was.  A body without MIME headers becomes a text/plain part with the
``unknown-8bit`` charset (RFC 1428), since its charset is not known.
Header fields with raw 8-bit octets (allowed only with SMTPUTF8) get
their non-ASCII words as RFC 2047 encoded words (UTF-8 when they decode
as such, else ``unknown-8bit``); the ASCII words around them, addresses
among them, stay readable.

The stdlib ``email`` package parses and writes the message; the
conversion only re-encodes payloads, so a part that is already 7-bit
goes out byte for byte as it came (line ends aside: CRLF throughout).
Signatures over the converted parts (DKIM body hashes, S/MIME over an
8-bit part) no longer verify, as with any converting relay.
"""

from __future__ import annotations

import binascii
import io
import re
from email import policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser

_READ = policy.compat32
#: Headers left unfolded as they came; 8-bit octets in them become encoded words.
_WRITE = policy.compat32.clone(cte_type="7bit", linesep="\r\n", max_line_length=0)


def to_7bit(data: bytes) -> bytes:
    """The message ``data`` with every 8-bit part re-encoded; all of it ASCII."""
    msg = BytesParser(policy=_READ).parsebytes(data)
    if msg.get("MIME-Version") is None and not msg.is_multipart():
        del msg["Content-Type"], msg["Content-Transfer-Encoding"]
        msg["MIME-Version"] = "1.0"
        msg["Content-Type"] = "text/plain; charset=unknown-8bit"
    for part in msg.walk():
        _encode_headers(part)
        _tidy_edges(part)
        if not part.is_multipart() and part.get_content_maintype() != "message":
            _encode(part)
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_WRITE).flatten(msg)
    return out.getvalue()


def _encode(part: Message) -> None:
    """Re-encode one leaf part whose payload holds 8-bit octets; leave others alone."""
    raw = part.get_payload(decode=False)
    if not isinstance(raw, str) or raw.isascii():
        return  # 7-bit already (a base64 or quoted-printable part among them)
    body = part.get_payload(decode=True)
    if part.get_content_maintype() == "text":
        encoded, cte = binascii.b2a_qp(body, istext=True).decode("ascii"), "quoted-printable"
    else:
        encoded, cte = _base64_lines(body), "base64"
    del part["Content-Transfer-Encoding"]
    part["Content-Transfer-Encoding"] = cte
    part.set_payload(encoded)


def _base64_lines(data: bytes) -> str:
    return "".join(binascii.b2a_base64(data[i:i + 57]).decode("ascii")
                   for i in range(0, len(data), 57))


def _encode_headers(part: Message) -> None:
    items = list(part.raw_items())  # as parsed: 8-bit octets as surrogates
    if all(value.isascii() for _, value in items):
        return
    for name in {name.lower() for name, _ in items}:
        del part[name]
    for name, value in items:  # the same order, and repeated fields stay repeated
        part[name] = value if value.isascii() else _encoded_words(value)


def _encoded_words(value: str) -> str:
    """``value`` (8-bit octets as surrogates) with its non-ASCII words as encoded words.

    Neighbouring non-ASCII words go in one encoded word with the space
    between them: a decoder drops the space between two encoded words.
    """
    tokens = re.split(r"(\s+)", value)
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i].isascii():
            out.append(tokens[i])
            i += 1
            continue
        j = i
        while j + 2 < len(tokens) and not tokens[j + 2].isascii() and "\n" not in tokens[j + 1]:
            j += 2
        out.append(_word("".join(tokens[i:j + 1])))
        i = j + 1
    return "".join(out)


def _word(text: str) -> str:
    raw = text.encode("utf-8", "surrogateescape")
    try:
        raw.decode("utf-8")
        charset = "utf-8"
    except UnicodeDecodeError:
        charset = "unknown-8bit"
    return f"=?{charset}?b?{binascii.b2a_base64(raw, newline=False).decode('ascii')}?="


def _tidy_edges(part: Message) -> None:
    """A multipart's preamble and epilogue are shown by no reader: 8-bit octets there go."""
    for name in ("preamble", "epilogue"):
        text = getattr(part, name, None)
        if text and not text.isascii():
            setattr(part, name, text.encode("ascii", "replace").decode("ascii"))
