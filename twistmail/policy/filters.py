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

import email
import email.errors
import email.header
import email.policy
import email.utils
from pathlib import Path
from typing import Any

import attrs

MAX_PARTS = 1000  # a message with more parts than this is not examined further


@attrs.frozen
class Match:
    type: str  # the list type, e.g. "*FTRFILNAME"
    pattern: str
    value: str


def examine(body_path: Path, originator: str, directory: Any) -> Match | None:
    """The first filter the message matches, or None."""
    lists = directory.filters()
    if not any(lists.values()):
        return None
    with open(body_path, "rb") as f:
        msg = email.message_from_binary_file(f, policy=email.policy.compat32)
    for kind, value in _values(msg, originator, lists):
        pattern = directory.filter_match(kind, value)
        if pattern is not None:
            return Match(kind, pattern, value)
    return None


def _values(msg: Any, originator: str, lists: dict[str, list[str]]):
    if lists.get("*FTRORIGIN"):
        if originator:
            yield "*FTRORIGIN", originator
        for _, addr in email.utils.getaddresses(msg.get_all("From", [])):
            if addr:
                yield "*FTRORIGIN", addr
    for n, part in enumerate(msg.walk()):
        if n >= MAX_PARTS:
            break
        if lists.get("*FTRSUBJECT") and part.get("Subject") is not None:
            yield "*FTRSUBJECT", _text(part.get("Subject"))
        if lists.get("*FTRTYPE"):
            yield "*FTRTYPE", part.get_content_type()
        if lists.get("*FTRFILNAME"):
            for name in (part.get_filename(), part.get_param("name")):
                if name:
                    yield "*FTRFILNAME", _text(name)


def _text(value: Any) -> str:
    """Decoded header text (RFC 2047 / RFC 2231), whitespace folded."""
    if isinstance(value, tuple):  # RFC 2231 parameter: (charset, language, text)
        value = email.utils.collapse_rfc2231_value(value)
    try:
        decoded = str(email.header.make_header(email.header.decode_header(str(value))))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        decoded = str(value)
    return " ".join(decoded.split())
