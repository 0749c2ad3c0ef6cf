"""Content filters (ADDSMTPLE *FTRSUBJECT, *FTRORIGIN, *FTRFILNAME, *FTRTYPE).

The seed's virus defence: a message whose subject, originator, or any
attachment's file name or MIME type matches a filter pattern is kept in
quarantine (FTRACN *KEEP) or discarded (*DISCARD).  Every MIME part is
examined, nested multiparts and attached messages included, because an
attachment hidden one level down is the usual trick.  Patterns and their
``*`` wildcards are matched by the directory (``filter_match``).

Synchronous: the bridge runs it in a worker thread with the message body.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email
import email.charset
import email.errors
import email.header
import email.message
import email.policy
import email.utils
import quopri
import re
from pathlib import Path
from typing import Any

import attrs

MAX_PARTS = 1000  # a message with more parts than this is not examined further


@attrs.frozen
class Match:
    type: str  # the list type, e.g. "*FTRFILNAME"
    pattern: str
    value: str


def examine(body_path: Path, originator: str, directory: Any, trace: int = 0) -> Match | None:
    """The first filter the message matches, or None; the message starts
    ``trace`` octets into the file (the envelope's ``trace``)."""
    lists = directory.filters()
    if not any(lists.values()):
        return None
    try:
        with open(body_path, "rb") as f:
            f.seek(trace)
            msg = email.message_from_binary_file(f, policy=email.policy.compat32)
        if lists.get("*FTRORIGIN"):
            for value in _origins(msg, originator):
                pattern = directory.filter_match("*FTRORIGIN", value)
                if pattern is not None:
                    return Match("*FTRORIGIN", pattern, value)
        for kind, value in _values(msg, lists, [0]):
            pattern = directory.filter_match(kind, value)
            if pattern is not None:
                return Match(kind, pattern, value)
    except (_Unexaminable, RecursionError) as e:
        # Past what is examined, an attachment could hide: kept, not let through.
        why = str(e) if isinstance(e, _Unexaminable) else "MIME parts nested too deep"
        return Match("*FTRTYPE", UNEXAMINED, why)
    return None


UNEXAMINED = "(not examined)"


class _Unexaminable(Exception):
    """More parts than are examined."""


def _origins(msg: Any, originator: str):
    # x@spam.test. is x@spam.test to every other part of the server.
    if originator:
        yield originator.rstrip(".")
    for _, addr in email.utils.getaddresses(msg.get_all("From", [])):
        if addr:
            yield addr.rstrip(".")


def _values(msg: Any, lists: dict[str, list[str]], seen: list[int]):
    for part in msg.walk():
        seen[0] += 1
        if seen[0] > MAX_PARTS:
            raise _Unexaminable(f"more than {MAX_PARTS} MIME parts")
        if lists.get("*FTRSUBJECT"):
            for subject in part.get_all("Subject", []):  # every copy: a first one can hide
                yield "*FTRSUBJECT", _text(subject)
        types = part.get_all("Content-Type", [])
        if len({_meaning(t) for t in types}) > 1 and (
                lists.get("*FTRTYPE") or lists.get("*FTRFILNAME")):
            # Readers differ on which one counts, and the other's parts
            # are what a filter would not see.
            raise _Unexaminable("a MIME part with conflicting Content-Type headers")
        if lists.get("*FTRTYPE"):
            for ctype in types or ["text/plain"]:
                yield "*FTRTYPE", _media_type(ctype)
        if lists.get("*FTRFILNAME"):
            for name in _file_names(part):
                yield "*FTRFILNAME", name
        inner = _encoded_message(part)
        if inner:
            yield from _values(email.message_from_bytes(inner, policy=email.policy.compat32),
                               lists, seen)


def _encoded_message(part: Any) -> bytes | None:
    """An attached message sent base64 or quoted-printable, decoded.

    RFC 2046 forbids encoding message/rfc822, so a parser takes the encoded
    text for the message and sees nothing of what it carries.
    """
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if part.get_content_type() != "message/rfc822" or cte not in ("base64", "quoted-printable"):
        return None
    payload = part.get_payload()
    if isinstance(payload, list):  # what the parser made of the encoded text
        raw = b"".join(m.as_bytes() for m in payload)
    else:
        raw = str(payload).encode("ascii", "replace")
    try:
        return base64.b64decode(raw) if cte == "base64" else quopri.decodestring(raw)
    except (ValueError, binascii.Error):
        return None


def _media_type(value: Any) -> str:
    """``application / x-msdownload (exe)`` is application/x-msdownload (RFC 2045 §5.1)."""
    text = str(value).split(";", 1)[0]
    while True:  # comments nest
        bare = _COMMENT.sub("", text)
        if bare == text:
            break
        text = bare
    return "".join(text.split()).lower()


_COMMENT = re.compile(r"\([^()]*\)")


def _meaning(value: Any) -> tuple[str, frozenset[tuple[str, str]]]:
    """What a Content-Type says: quotes, spacing and order aside, a boundary exact.

    Parameter values keep their case (a boundary is case-sensitive, RFC 2046
    §5.1.1), except the charset's, which is not (RFC 2045 §5.1).
    """
    holder = email.message.Message()
    holder["Content-Type"] = str(value)
    params = holder.get_params([], header="Content-Type")[1:]
    return _media_type(value), frozenset(
        (k.lower(), (v.lower() if k.lower() == "charset" else v) if isinstance(v, str)
         else repr(v)) for k, v in params)


def _file_names(part: Any):
    for header, param in (("Content-Disposition", "filename"), ("Content-Type", "name")):
        for value in part.get_all(header, []):
            holder = email.message.Message()
            holder[header] = value
            # Every copy of the parameter: a reader may take the last one.
            names = [holder.get_param(param, header=header)]
            names += [v for k, v in holder.get_params([], header=header)[1:]
                      if k.lower() == param]
            for name in names:
                if not name:
                    continue
                text = _text(name)
                yield text
                if text != text.rstrip(". "):
                    yield text.rstrip(". ")  # Windows drops trailing dots and spaces


def _text(value: Any) -> str:
    """Decoded header text (RFC 2047 / RFC 2231), whitespace folded.

    Decoded as a mail reader shows it, so that no spelling of a word slips
    past a filter: a charset with a language (RFC 2231 §5, ``utf-8*en``),
    one Python does not know and bytes its charset does not allow were each
    left encoded, and ``=?utf-8*en?b?SUxPVkVZT1U=?=`` did not match ILOVEYOU.
    """
    if isinstance(value, tuple):  # RFC 2231 parameter: (charset, language, text)
        value = email.utils.collapse_rfc2231_value(value)
    try:
        parts = email.header.decode_header(str(value))
    except (ValueError, email.errors.HeaderParseError):
        return " ".join(str(value).split())
    header = email.header.Header()
    for data, charset in parts:
        header.append(data, _charset(charset), errors="replace")
    return " ".join(str(header).split())


def _charset(name: str | None) -> str | None:
    """The charset to decode an encoded-word by: an unknown one as Latin-1,
    which shows its ASCII letters as they are."""
    if name is None:
        return None
    name = name.partition("*")[0]  # RFC 2231 §5: charset*language
    try:
        codecs.lookup(email.charset.Charset(name).input_codec or "us-ascii")
    except (LookupError, UnicodeError, ValueError):
        return "latin-1"
    return name
