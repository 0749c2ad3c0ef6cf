"""Value types of settings: parse, check and render one setting's value.

One type object serves three readers: the TOML loader, the CLI options (which
arrive as strings) and the TOML writer.  Keeping them in one place is what
makes a CLI mistake and a bad config value produce the same one-line message.
Special values are spelled as IBM i spells them ("*YES", "*NOMAX").
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import attrs


class SettingError(ValueError):
    """A value that a setting does not allow.

    ``str()`` is the one line shown to the administrator: the key, the
    value and what is allowed.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        # TOML's spelling of a boolean, not Python's: the file says true.
        shown = ("true" if value else "false") if isinstance(value, bool) else repr(value)
        super().__init__(f"{key}: {shown} is not allowed; allowed: {allowed}")


class FileError(SettingError):
    """The file as a whole cannot be read as settings: ``path: not <what>``."""

    def __init__(self, path: str, what: str) -> None:
        self.problem = f"not {what}"
        ValueError.__init__(self, f"{path}: {self.problem}")
        self.key, self.value, self.allowed = path, "(file)", what


class _Invalid(Exception):
    """Raised by a type's ``parse``; turned into SettingError with the key.

    Its argument, when given, is the part of the value at fault (one word of
    a list): the error names it rather than the whole value.
    """


@attrs.frozen
class Choice:
    """One of a fixed set of special values, compared case-insensitively."""

    values: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return ", ".join(self.values)

    def parse(self, raw: Any) -> str:
        if isinstance(raw, str):
            for v in self.values:
                if raw.strip().upper() == v.upper():
                    return v
        raise _Invalid

    def dump(self, value: str) -> str:
        return value

    def show(self, value: str) -> str:
        return value


_DIGITS = re.compile(r"[+-]?[0-9]+")


@attrs.frozen
class Int:
    """A whole number in a range, or one of a few special words.

    A special word maps to a Python value (``*NOMAX`` to ``None``); ``also``
    are numbers allowed outside the range (POPWDW: 0 or 15-65535).
    """

    lo: int
    hi: int
    specials: tuple[tuple[str, Any], ...] = ()
    also: tuple[int, ...] = ()

    @property
    def allowed(self) -> str:
        words = [w for w, _ in self.specials]
        return " or ".join([*map(str, self.also), ", ".join([f"{self.lo}-{self.hi}", *words])])

    def parse(self, raw: Any) -> Any:
        if isinstance(raw, str):
            for word, value in self.specials:
                if raw.strip().upper() == word:
                    return value
            if not _DIGITS.fullmatch(raw.strip()) or len(raw.strip()) > 30:
                # int() also takes "３０" and "1_000", and refuses 4301 digits
                # with an error of its own.
                raise _Invalid
            raw = int(raw.strip(), 10)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise _Invalid
        if not (self.lo <= raw <= self.hi or raw in self.also):
            raise _Invalid
        return raw

    def dump(self, value: Any) -> Any:
        for word, special in self.specials:
            if value == special and (value is not None or special is None):
                return word
        return value

    def show(self, value: Any) -> str:
        return str(self.dump(value))


@attrs.frozen
class IntPair:
    """Two whole numbers, such as RTYMIN's (count, minutes)."""

    first: Int
    second: Int

    @property
    def allowed(self) -> str:
        return f"[{self.first.allowed}, {self.second.allowed}]"

    def parse(self, raw: Any) -> tuple[int, int]:
        if isinstance(raw, str):
            raw = raw.replace(",", " ").split()
        if not isinstance(raw, list | tuple) or len(raw) != 2:
            raise _Invalid
        return (self.first.parse(raw[0]), self.second.parse(raw[1]))

    def dump(self, value: tuple[int, int]) -> list[int]:
        return [value[0], value[1]]

    def show(self, value: tuple[int, int]) -> str:
        return f"{value[0]} {value[1]}"


@attrs.frozen
class Text:
    """Free text; ``empty_ok`` says whether "" is allowed."""

    what: str = "text"
    empty_ok: bool = True

    @property
    def allowed(self) -> str:
        return self.what if self.empty_ok else f"{self.what}, not empty"

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str) or (not self.empty_ok and not raw.strip()) or "\0" in raw:
            raise _Invalid  # a NUL is in no path or name, and a path with one is unusable
        return raw.strip()

    def dump(self, value: str) -> str:
        return value

    def show(self, value: str) -> str:
        return value


@attrs.frozen
class TextList:
    """A list of words (domains, zones).  From the CLI: comma or space separated."""

    what: str = "a list of names"

    @property
    def allowed(self) -> str:
        return self.what

    def parse(self, raw: Any) -> tuple[str, ...]:
        if isinstance(raw, str):
            if raw.strip().upper() == "*NONE":
                return ()
            raw = raw.replace(",", " ").split()
        if not isinstance(raw, list | tuple) or not all(isinstance(x, str) for x in raw):
            raise _Invalid
        # A name given twice is meant once: EHLO offered "AUTH PLAIN PLAIN".
        seen: set[str] = set()
        out = []
        for x in (x.strip() for x in raw):
            if x and x.lower() not in seen:
                seen.add(x.lower())
                out.append(x)
        return tuple(out)

    def dump(self, value: tuple[str, ...]) -> list[str]:
        return list(value)

    def show(self, value: tuple[str, ...]) -> str:
        return " ".join(value) if value else "(none)"


@attrs.frozen(order=True)
class Endpoint:
    """A listening address; ``port`` 0 asks the kernel for a free port."""

    host: str
    port: int

    @property
    def family(self) -> str:
        return "inet6" if ":" in self.host else "inet"

    def overlaps(self, other: Endpoint) -> bool:
        """Whether both cannot be bound at once: one port, and one address or
        an every-address one that takes it in too ("::" serves IPv4 as well)."""
        if self.port != other.port or not self.port:
            return False  # port 0: the kernel picks a free port for each
        if self.host == other.host or "::" in (self.host, other.host):
            return True
        return "0.0.0.0" in (self.host, other.host) and self.family == other.family

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class Listen:
    """``host:port`` or ``[v6]:port``; "" disables the listener (None)."""

    @property
    def allowed(self) -> str:
        return ('"host:port", "[ipv6]:port" (port 0-65535; an address of this host, no '
                'IPv4-mapped [::ffff:...] or zone %) or "" to disable')

    def parse(self, raw: Any) -> Endpoint | None:
        if not isinstance(raw, str):
            raise _Invalid
        raw = raw.strip()
        if not raw:
            return None
        if raw.startswith("["):
            host, sep, port = raw[1:].partition("]:")
            if not sep:
                raise _Invalid
        else:
            host, sep, port = raw.rpartition(":")
            if not sep or ":" in host:
                raise _Invalid
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise _Invalid from None
            host = "127.0.0.1"
        else:  # forms a listener cannot bind (an IPv6 socket is IPv6-only here)
            if isinstance(ip, ipaddress.IPv6Address) and (ip.ipv4_mapped or ip.scope_id):
                raise _Invalid
            # One spelling per address: "[0:0:0:0:0:0:0:0]" is "::", the
            # address that serves IPv4 too, and the checks compare strings.
            host = str(ip)
        if not _is_port(port, 0):
            raise _Invalid
        return Endpoint(host, int(port))

    def dump(self, value: Endpoint | None) -> str:
        return "" if value is None else str(value)

    def show(self, value: Endpoint | None) -> str:
        return "(disabled)" if value is None else str(value)


@attrs.frozen
class HostPort:
    """``*NONE`` or ``host[:port]`` for the mail router and hub.

    ``what`` names the non-special form in messages, so a setting that holds
    an address rather than a host says so.
    """

    what: str = '"host[:port]"'
    #: The host must be a domain name or an IP address: "*NO" for FWDHUBSVR,
    #: an easy slip, sent every non-local message to a host of that name.
    hosts: bool = True

    @property
    def allowed(self) -> str:
        return f"*NONE or {self.what}"

    def parse(self, raw: Any) -> str | None:
        if not isinstance(raw, str) or not raw.strip():
            raise _Invalid
        raw = raw.strip()
        if raw.upper() == "*NONE":
            return None
        try:  # the form the client jobs read: [v6]:port was let through unchecked
            host, _ = parse_hostport(raw)
            if raw.startswith("["):
                ipaddress.IPv6Address(host)
            elif self.hosts and not is_domain(host):
                ipaddress.ip_address(host)
        except ValueError:
            raise _Invalid from None
        # An apostrophe is in no host name, but in many a local part (o'brien@).
        forbidden = "\"'<>,;()\\" if self.hosts else "\"<>,;()\\"
        if any(c.isspace() or c in forbidden for c in raw) or not raw.isprintable():
            raise _Invalid
        return raw

    def dump(self, value: str | None) -> str:
        return "*NONE" if value is None else value

    def show(self, value: str | None) -> str:
        return self.dump(value)


@attrs.frozen
class NameServers(TextList):
    """DNS servers by address: Twisted sends queries to an IP address only."""

    what: str = "a list of IP[:port] ([IPv6]:port)"

    def parse(self, raw: Any) -> tuple[str, ...]:
        servers = super().parse(raw)
        for text in servers:
            try:
                nameserver_address(text)
            except ValueError:
                raise _Invalid from None
        return servers


@attrs.frozen
class DomainList(TextList):
    """Domain names, as DNS allows them (letters, digits, hyphens; dots between)."""

    what: str = "a list of domain names"

    def parse(self, raw: Any) -> tuple[str, ...]:
        domains = super().parse(raw)
        if not all(is_domain(d) for d in domains):
            raise _Invalid
        return domains


@attrs.frozen
class ChoiceList(TextList):
    """Some of a fixed set of special values, compared case-insensitively as
    Choice is (CL upper-cases ``AUTHMECH(*login)``)."""

    values: tuple[str, ...] = ()

    @property
    def allowed(self) -> str:
        return ", ".join(self.values)

    def parse(self, raw: Any) -> tuple[str, ...]:
        choice = Choice(self.values)
        out = []
        for word in super().parse(raw):
            try:
                out.append(choice.parse(word))
            except _Invalid:
                raise _Invalid(word) from None
        return tuple(dict.fromkeys(out))


def is_domain(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return text.isascii() and len(text) <= 253 and all(
        0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
        and all(c.isalnum() or c in "-_" for c in label) for label in labels)


def parse_hostport(text: str, default_port: int = 25) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    text = text.strip()
    if not text:
        raise ValueError("empty host")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after ']' in {text!r}")
        if rest == ":":
            raise ValueError(f"no port after ':' in {text!r}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"no host in {text!r}")
    if text.endswith(":") and not text.startswith("[") and text.count(":") == 1:
        raise ValueError(f"no port after ':' in {text!r}")
    if not port_text:
        return host, default_port
    if not _is_port(port_text, 1):
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


def nameserver_address(text: str) -> tuple[str, int]:
    """A DNS server's address and port: Twisted sends queries to an IP address only."""
    host, port = parse_hostport(text, 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"a name server must be an IP address, not {host!r}") from None
    return host, port


def _is_port(text: str, lo: int) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts "¹", which ``int`` refuses."""
    return text.isascii() and text.isdigit() and lo <= int(text) <= 65535


def parse_value(key: str, vtype: Any, raw: Any) -> Any:
    """Parse ``raw`` for setting ``key``, raising SettingError with the key."""
    try:
        return vtype.parse(raw)
    except _Invalid as e:
        raise SettingError(key, e.args[0] if e.args else raw, vtype.allowed) from None


def setting(vtype: Any, default: Any, doc: str) -> Any:
    """An attrs field that carries its value type and one-line meaning."""
    return attrs.field(default=default, metadata={"type": vtype, "doc": doc})


#: OPTION and DELAY (seconds) of ENDPJ and ENDMSF, for the CLI and the daemon alike.
END_OPTION = Choice(("*CNTRLD", "*IMMED"))
END_DELAY = Int(1, 999999)
