"""Parsing the paths and parameters of MAIL FROM and RCPT TO (RFC 5321 §4.1.2).

Strict where laxness is a risk (no unbracketed paths, no control characters,
bounded lengths), lenient where real clients differ harmlessly (a space after
the colon, case of keywords, source routes, which are ignored as §C allows).
"""

from __future__ import annotations

import ipaddress
import re

import attrs

MAX_PATH = 256  # RFC 5321 §4.5.3.1.3
MAX_LOCAL = 64
MAX_DOMAIN = 255

_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_STRING = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*\.?"
_LITERAL = r"\[(?:[Ii][Pp][Vv]6:[0-9A-Fa-f:.]+|[0-9.]+)\]"  # RFC 5234: "IPv6:" in any case
_MAILBOX = re.compile(rf"^(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})$")
_ROUTE = re.compile(rf"^@{_DOMAIN}(?:,@{_DOMAIN})*:")
_PARAM = re.compile(r"^(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?$")


class PathError(ValueError):
    """A syntactically bad path or parameter: 501 (or 555 for parameters)."""


class AddressError(PathError):
    """The mailbox itself is bad: 501 with 5.1.7 (sender) or 5.1.3 (recipient)."""


@attrs.frozen
class Address:
    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def domain_key(self) -> str:
        return self.domain.lower().rstrip(".")


@attrs.frozen
class Command:
    """A parsed MAIL or RCPT argument: the path and its ESMTP parameters."""

    address: Address | None  # None is the null reverse-path <>
    params: tuple[tuple[str, str | None], ...] = ()

    def param(self, key: str) -> str | None:
        for k, v in self.params:
            if k == key:
                return v
        return None


def parse_command(arg: str, keyword: str, allow_null: bool) -> Command:
    """Parse ``FROM:<path> params`` / ``TO:<path> params``."""
    head, sep, rest = arg.partition(":")
    if not sep or head.strip().upper() != keyword:
        raise PathError(f"Syntax: {keyword}:<address>")
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        raise PathError("Path must be enclosed in angle brackets")
    end = _closing_bracket(rest)
    path, tail = rest[1:end], rest[end + 1:]
    if tail and not tail.startswith(" "):
        raise PathError("Syntax error after the path")
    params = _params(tail.split())
    if len(path) > MAX_PATH:
        raise PathError("Path too long")
    if path == "":
        if not allow_null:
            raise PathError("Null path not allowed here")
        return Command(None, params)
    path = _ROUTE.sub("", path)
    if keyword == "TO" and path.lower() == "postmaster":
        return Command(Address("postmaster", ""), params)
    return Command(parse_mailbox(path), params)


def parse_mailbox(text: str) -> Address:
    m = _MAILBOX.match(text)
    if m is None or (m.group("domain").startswith("[") and not _literal_ok(m.group("domain"))):
        raise AddressError(f"Bad address syntax: <{_printable(text)}>")
    local, domain = m.group("local"), m.group("domain")
    if len(local) > MAX_LOCAL or len(domain) > MAX_DOMAIN:
        raise AddressError("Address too long")
    if local.startswith('"'):
        # "sam" and sam are one mailbox (RFC 5321 §4.1.2): a quoted local part
        # that needs no quotes is taken without them.
        bare = re.sub(r"\\(.)", r"\1", local[1:-1])
        if re.fullmatch(_DOT_STRING, bare):
            local = bare
    return Address(local, domain)


def literal_address(literal: str) -> str:
    """The IP address an address literal names (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``).

    ValueError unless it is four octets or an IPv6 form (RFC 5321 §4.1.3).
    """
    text = literal.strip()[1:-1]
    if text[:5].lower() == "ipv6:":
        return str(ipaddress.IPv6Address(text[5:]))
    return str(ipaddress.IPv4Address(text))


def _literal_ok(literal: str) -> bool:
    try:
        literal_address(literal)
    except ValueError:
        return False
    return True


def _closing_bracket(text: str) -> int:
    quoted = False
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    # Within an unclosed quoted string a ">" is text, not the end of the path.
    raise PathError("Unmatched quote in the address" if quoted else
                    "Missing closing angle bracket")


def _params(words: list[str]) -> tuple[tuple[str, str | None], ...]:
    out = []
    for w in words:
        m = _PARAM.match(w)
        if m is None:
            raise PathError(f"Bad parameter: {_printable(w)}")
        key = m.group("key").upper()
        if any(k == key for k, _ in out):
            raise PathError(f"Parameter {key} given twice")
        out.append((key, m.group("value")))
    return tuple(out)


def _printable(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:100]
