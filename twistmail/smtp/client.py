"""Outbound ESMTP delivery of one message to one destination (QTMSCCLCP jobs).

``deliver()`` takes the hops from ``twistmail.mx`` and carries one message,
for all of that destination's recipients, over one connection: the first
hop that gives a definitive answer wins, the others are tried only on
connection failures and on refusals before the MAIL command (RFC 5321
§5.1).  The result says, per recipient, delivered / temporary / permanent,
so the bridge can settle each one (journal 88/82, retry queues, NDN).
``etrn()`` opens a session the same way and asks the mail router to start
sending the mail it holds for our domains (RFC 1985, ETRNCLT).

Settings honoured (passed in by the caller): ``[smtp] tlsoutbound``
(``*OPPORTUNISTIC`` / ``*REQUIRED`` / ``*VERIFY``), the ``*HOSTAUTH`` list
entries (credentials per host), ``*CLTBIND`` (source address), and the
DSN parameters kept in the queue envelope (NOTIFY/ORCPT, RET/ENVID).

Twisted's SMTP client is not used (TWISTED.md §2.2), and its defects are
avoided here:

* it dot-stuffs each 16 KiB chunk on its own, so a line starting with "."
  at a chunk boundary went out unstuffed and message content could smuggle
  a second message.  ``DotStuffer`` keeps the line-start state across
  chunks, turns every line end (CRLF, bare LF, bare CR) into CRLF, so no
  bare CR or LF ever leaves, and ends the body with CRLF before ".";
* it keeps processing buffered replies after the 220 to STARTTLS; here any
  byte after that reply is a protocol violation and the connection is
  dropped before TLS starts;
* its TLS policy is verify-or-nothing; here ``*OPPORTUNISTIC`` encrypts
  without checking the certificate (most MX certificates do not verify),
  ``*REQUIRED`` insists on encryption and ``*VERIFY`` checks certificate
  and host name with service_identity.  Not through Twisted's
  ``optionsForClientTLS``: it let a trusted certificate with no
  subjectAltName pass for any host (``_Verified``);
* it offers no SIZE, 8BITMIME, PIPELINING or DSN and does not classify
  recipients as temporary or permanent.

An 8-bit body for a server that does not offer 8BITMIME is converted to
7 bit first (``downgrade``, RFC 6152 §3), in a worker thread; should the
conversion fail, it goes out as it is, which practically every server
takes.  A converted body is held in memory for its DATA.

The body is streamed from its spool file through a push producer, so even
a 50 MB message is never held in memory.  Every wait has the RFC 5321
§4.5.3.2 timeout, multiplied by ``timeout_scale``.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import re
import tempfile
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import defer, ssl, threads
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistmail.mx import Hop
from twistmail.protocols.writenow import write_now
from twistmail.smtp import downgrade

TLS_OPPORTUNISTIC = "*OPPORTUNISTIC"
TLS_REQUIRED = "*REQUIRED"
TLS_VERIFY = "*VERIFY"
#: No STARTTLS at all: the second connection to a hop whose TLS failed under
#: *OPPORTUNISTIC (never a setting).
_TLS_OFF = "*OFF"
TLS_POLICIES = (TLS_OPPORTUNISTIC, TLS_REQUIRED, TLS_VERIFY)

DELIVERED = "delivered"
TEMPORARY = "temporary"
PERMANENT = "permanent"

CHUNK_SIZE = 64 * 1024  # bytes read from the spool file at a time
MAX_REPLY_LINE = 4096  # longer reply lines are a protocol violation
MAX_REPLY_LINES = 200
#: The text of one reply, all its lines.
MAX_REPLY_BYTES = 64 * 1024
#: Replies received before the client reads them: the answers to a pipelined
#: group (MAIL, up to MAXRCPT RCPTs, DATA) fit many times over.  Beyond, a
#: server flooding them would hold the job's memory until MAXUSE ends it.
MAX_QUEUED_REPLIES = 1000
MAX_QUEUED_BYTES = 256 * 1024
MAX_PATH = 256
#: Longest account of the hops that all failed (a recipient's last error).
MAX_WHY = 900
NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY", "NEVER")

log = Logger()


# -- data ---------------------------------------------------------------------------


@attrs.frozen
class Timeouts:
    """Seconds to wait at each stage; the defaults are RFC 5321 §4.5.3.2.

    ``connect``, ``tls`` and ``quit`` are not in the RFC: 30 s is Postfix's
    connect timeout, and nothing rides on the QUIT reply.
    """

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    tls: float = 300.0
    auth: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    quit: float = 30.0
    close: float = 10.0

    def scaled(self, factor: float) -> Timeouts:
        if factor == 1.0:
            return self
        return Timeouts(**{k: v * factor for k, v in attrs.asdict(self).items()})

    @classmethod
    @functools.lru_cache(maxsize=8)  # a job asks for each message; the answer is frozen
    def for_reply(cls, seconds: float) -> Timeouts:
        """The waits for ``[smtp] clienttimeout``: ``seconds`` for each command reply.

        The DATA, data-block and end-of-data waits keep their RFC 5321
        proportions to the 5-minute command wait, so one number tunes a
        client for slow or impatient peers; connect, QUIT and close, which
        the RFC does not set, stay as they are.
        """
        base = cls()
        factor = seconds / base.mail
        return attrs.evolve(base, **{k: getattr(base, k) * factor for k in _RFC_WAITS})


_RFC_WAITS = ("greeting", "ehlo", "tls", "auth", "mail", "rcpt", "data_init", "data_block",
              "data_end")


@attrs.frozen
class Credentials:
    """A *HOSTAUTH user name and password; the password never shows in a repr."""

    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class Recipient:
    """One envelope recipient with its DSN parameters (decoded, not xtext)."""

    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None  # "rfc822;user@example.com" or just the address


def _recipients(items: Iterable[Any]) -> tuple[Recipient, ...]:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(Recipient(item))
        else:
            notify = getattr(item, "notify", None)
            out.append(Recipient(
                item.address, tuple(notify) if notify else None, getattr(item, "orcpt", None)
            ))
    return tuple(out)


@attrs.frozen
class Envelope:
    """What goes on MAIL and RCPT; the queue's Envelope converts with ``from_any``."""

    originator: str
    recipients: tuple[Recipient, ...] = attrs.field(converter=_recipients)
    ret: str | None = None  # FULL or HDRS
    envid: str | None = None
    #: The queue id, which the log lines about the message start with.
    id: str | None = None

    @property
    def named(self) -> str:
        return f"{self.id}: " if self.id else ""

    @classmethod
    def from_any(cls, envelope: Any) -> Envelope:
        """Anything with ``originator`` and ``recipients`` (strings or objects)."""
        if isinstance(envelope, Envelope):
            return envelope
        return cls(
            envelope.originator, envelope.recipients,
            getattr(envelope, "ret", None), getattr(envelope, "envid", None),
            getattr(envelope, "id", None),
        )


@attrs.frozen
class Reply:
    """One SMTP reply: its code and its text lines."""

    code: int
    lines: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return " ".join(line.strip() for line in self.lines if line.strip())

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def outcome(self) -> str:
        if self.positive:
            return DELIVERED
        return PERMANENT if 500 <= self.code < 600 else TEMPORARY

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


@attrs.frozen
class RecipientResult:
    """How one recipient ended: ``remote`` is False for outcomes made up here."""

    address: str
    status: str  # DELIVERED, TEMPORARY or PERMANENT
    code: int
    text: str
    remote: bool = True


@attrs.frozen
class HopAttempt:
    """A hop that was tried without a definitive answer, and why.

    ``answered``: the server greeted (even with 4xx or 5xx), so it is up;
    False when the connection failed, or the server never greeted.
    """

    hop: Hop
    error: str
    answered: bool = False
    code: int = 451  # 5xx: the hop refused the message for good (see ``_HopFailed``)


@attrs.frozen
class DeliveryResult:
    """The outcome of ``deliver()`` for one message and one destination."""

    recipients: tuple[RecipientResult, ...]
    hop: Hop | None = None  # the hop that answered definitively
    remote_ip: str | None = None
    tls: bool = False
    dsn: bool = False  # the server took NOTIFY/ORCPT/RET/ENVID
    attempts: tuple[HopAttempt, ...] = ()

    def with_status(self, status: str) -> tuple[RecipientResult, ...]:
        return tuple(r for r in self.recipients if r.status == status)

    @property
    def delivered(self) -> tuple[RecipientResult, ...]:
        return self.with_status(DELIVERED)

    @property
    def temporary(self) -> tuple[RecipientResult, ...]:
        return self.with_status(TEMPORARY)

    @property
    def permanent(self) -> tuple[RecipientResult, ...]:
        return self.with_status(PERMANENT)


@attrs.frozen
class Extensions:
    """The EHLO keywords (upper case) and their parameters; empty after HELO."""

    keywords: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    esmtp: bool = True

    @classmethod
    def parse(cls, reply: Reply) -> Extensions:
        out: dict[str, tuple[str, ...]] = {}
        for line in reply.lines[1:]:
            if line.upper().startswith("AUTH="):  # the pre-RFC 4954 form some servers add
                line = line.replace("=", " ", 1)
            words = line.split()
            if words:
                keyword = words[0].upper()
                out[keyword] = out.get(keyword, ()) + tuple(words[1:])
        return cls(out)

    def has(self, keyword: str) -> bool:
        return keyword in self.keywords

    @property
    def size_limit(self) -> int | None:
        """The SIZE the server announced; None when unknown or unlimited (0)."""
        params = self.keywords.get("SIZE", ())
        if params and params[0].isascii() and params[0].isdigit() and int(params[0]) > 0:
            return int(params[0])
        return None

    @property
    def auth_mechanisms(self) -> tuple[str, ...]:
        return tuple(m.upper() for m in self.keywords.get("AUTH", ()))


# -- dot-stuffing ------------------------------------------------------------------------


class DotStuffer:
    """Turns message bytes, fed in chunks of any size, into the DATA stream.

    The line-start state and a CR that may be the first half of a CRLF are
    carried from one chunk to the next, which is exactly what Twisted's
    per-chunk ``transformChunk`` lost.  Every CRLF, bare LF and bare CR
    becomes CRLF (a receiver that honours bare line ends could otherwise
    find an end of data we did not send), every line starting with "."
    gets a second ".", and ``finish`` closes the last line before ".".
    """

    def __init__(self) -> None:
        self.at_line_start = True
        self.pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self.pending_cr:
            chunk = b"\r" + chunk
            self.pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self.pending_cr = True
        return self._lines(chunk)

    def finish(self) -> bytes:
        out = self._lines(b"\n") if self.pending_cr else b""
        self.pending_cr = False
        if not self.at_line_start:
            out += b"\r\n"
            self.at_line_start = True
        return out + b".\r\n"

    def _lines(self, data: bytes) -> bytes:
        if not data:
            return b""
        lf = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lf = lf.replace(b"\n.", b"\n..")
        if self.at_line_start and lf.startswith(b"."):
            lf = b"." + lf
        self.at_line_start = lf.endswith(b"\n")
        return lf.replace(b"\n", b"\r\n")


def xtext(value: str) -> str:
    """RFC 3461 xtext: "+", "=" and anything outside "!".."~" as +HH."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )


def _orcpt(value: str) -> str:
    kind, sep, address = value.partition(";")
    if not sep:
        kind, address = "rfc822", value
    return f"{kind.strip()};{xtext(address.strip())}"


def _bad_address(address: str) -> str | None:
    """Why an envelope address cannot go on a command line, or None.

    The queue holds addresses our server checked, but a control character
    here would inject commands, so it is checked again.
    """
    if len(address) > MAX_PATH:
        return "address too long"
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        return "control character in address"
    return None


def is_8bit(path: Path | str, chunk_size: int = CHUNK_SIZE, start: int = 0) -> bool:
    """Whether the file holds any byte above 127 from ``start`` on (read in
    chunks, never whole)."""
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(chunk_size):
            if not chunk.isascii():
                return True
    return False


# -- errors ------------------------------------------------------------------------------


class SessionError(Exception):
    """A connection-level failure: every unsettled recipient becomes temporary."""

    code = 451


class StageTimeout(SessionError):
    pass


class ConnectionDropped(SessionError):
    pass


class ProtocolViolation(SessionError):
    pass


class TLSFailure(SessionError):
    pass


class LocalError(SessionError):
    pass


class _Stale(Exception):
    """A kept session failed its RSET: the delivery goes over a new connection."""


class _HopFailed(Exception):
    """The hop gave no definitive answer before MAIL: try the next one.

    ``code`` 5xx: the hop refused permanently, which decides the outcome
    when it is the last one tried (as Postfix bounces at its final server).
    """

    def __init__(self, text: str, code: int = 451) -> None:
        super().__init__(text)
        self.code = code


class _TLSFailed(_HopFailed):
    """The TLS handshake failed: with *OPPORTUNISTIC, the hop is tried again without it."""


# -- the connection ----------------------------------------------------------------------


@implementer(IHandshakeListener)
class _Session(Protocol):
    """Reply parsing, waits with timeouts, STARTTLS and closing, for one connection."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.buffer = bytearray()
        self.partial: list[str] = []
        self.partial_bytes = 0
        self.replies: deque[Reply] = deque()
        self.queued_bytes = 0  # the text of ``replies``
        self.waiter: defer.Deferred[Reply] | None = None
        self.handshake: defer.Deferred[None] | None = None
        self.error: SessionError | None = None
        self.lost = False
        self.closing = False  # the server said 421: it is closing the channel (RFC 5321 §3.8)
        self.partial_code = 0
        self.tls = False
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.body: _BodyWriter | None = None
        self.peer_ip: str | None = None

    # -- connection events --------------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer_ip = getattr(self.transport.getPeer(), "host", None)
        # Writes are whole command groups or large body chunks; Nagle would
        # only hold back the final "." behind an unacknowledged segment.
        self.transport.setTcpNoDelay(True)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        if self.error is None:
            if self.handshake is not None:
                self.error = TLSFailure(f"4.7.5 TLS handshake failed: {_reason(reason)}")
            else:
                self.error = ConnectionDropped(f"4.4.2 Connection lost: {_reason(reason)}")
        if self.handshake is not None:
            d, self.handshake = self.handshake, None
            d.errback(self.error)
        if self.waiter is not None:
            d2, self.waiter = self.waiter, None
            d2.errback(self.error)
        if self.body is not None:
            self.body.fail(self.error)
        self.closed.callback(None)

    def handshakeCompleted(self) -> None:
        self.tls = True
        if self.handshake is not None:
            d, self.handshake = self.handshake, None
            d.callback(None)

    def abort(self, error: SessionError) -> None:
        if self.error is None:
            self.error = error
        if not self.lost:
            self.transport.abortConnection()

    # -- replies ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.buffer += data
        while self.error is None:
            nl = self.buffer.find(b"\n")
            if nl < 0:
                if len(self.buffer) > MAX_REPLY_LINE:
                    self._violation("reply line too long")
                return
            raw = bytes(self.buffer[:nl]).rstrip(b"\r")
            del self.buffer[: nl + 1]
            self._line(raw)

    def _line(self, raw: bytes) -> None:
        sep = raw[3:4]
        if (len(raw) > MAX_REPLY_LINE or len(raw) < 3 or not raw[:3].isdigit()
                or raw[:1] not in b"2345" or sep not in (b"", b" ", b"-")):
            self._violation(f"malformed reply line {raw[:60]!r}")
            return
        # RFC 5321 §4.2.1 wants one code on every line of a reply.  A server
        # that changes it within its class (550 then 551) is taken at its
        # last line; one that changes the class (250 then 550) says nothing sure.
        code = int(raw[:3])
        if not self.partial:
            self.partial_code = code
        elif code // 100 != self.partial_code // 100:
            self._violation(f"reply lines with codes {self.partial_code} and {code}")
            return
        self.partial.append(raw[4:].decode("utf-8", "replace"))
        self.partial_bytes += len(raw)
        if len(self.partial) > MAX_REPLY_LINES:
            self._violation("reply has too many lines")
            return
        if self.partial_bytes > MAX_REPLY_BYTES:
            self._violation("reply too long")
            return
        if sep == b"-":
            return
        reply = Reply(code, tuple(self.partial))
        self.partial, self.partial_bytes = [], 0
        if code == 421:
            self.closing = True
        if self.waiter is not None:
            d, self.waiter = self.waiter, None
            d.callback(reply)
        elif (len(self.replies) >= MAX_QUEUED_REPLIES
              or self.queued_bytes + _size(reply) > MAX_QUEUED_BYTES):
            self._violation("too many unsolicited replies")
        else:
            self.replies.append(reply)
            self.queued_bytes += _size(reply)

    def _violation(self, what: str) -> None:
        self.abort(ProtocolViolation(f"4.4.2 Protocol error from the server: {what}"))

    def read(self, stage: str, seconds: float) -> defer.Deferred[Reply]:
        """The next reply, failing with a SessionError on loss or after ``seconds``."""
        if self.replies:
            reply = self.replies.popleft()
            self.queued_bytes -= _size(reply)
            return defer.succeed(reply)
        if self.error is not None:
            return defer.fail(self.error)
        d: defer.Deferred[Reply] = defer.Deferred(self._cancel_wait)
        self.waiter = d
        return self._within(d, seconds, f"the {stage} reply")

    def _cancel_wait(self, d: defer.Deferred[Reply]) -> None:
        if self.waiter is d:
            self.waiter = None

    def _within(self, d: defer.Deferred[Any], seconds: float, what: str) -> defer.Deferred[Any]:
        d.addTimeout(seconds, self.reactor)

        def timed_out(f: Failure) -> Failure:
            if f.check(defer.TimeoutError) and not f.check(SessionError):
                error = StageTimeout(f"4.4.2 Timed out after {seconds:g} s waiting for {what}")
                self.abort(error)
                return Failure(error)
            return f

        return d.addErrback(timed_out)

    # -- output -----------------------------------------------------------------------------

    def send(self, *lines: str, utf8: bool = False) -> None:
        """Write commands in one segment (a pipelined group is one write)."""
        encoded = []
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError("line break inside an SMTP command")
            encoded.append(line.encode("utf-8" if utf8 else "ascii") + b"\r\n")
        if not self.lost:
            write_now(self.transport, b"".join(encoded))

    async def start_tls(self, creator: Any, seconds: float) -> None:
        """Start TLS right after the 220; anything the server sent past it is refused."""
        if self.buffer or self.replies or self.partial:
            self._violation("data after the 220 reply to STARTTLS")
            raise self.error  # type: ignore[misc]
        self.handshake = defer.Deferred(self._cancel_handshake)
        self.transport.startTLS(creator)
        await self._within(self.handshake, seconds, "the TLS handshake")

    def _cancel_handshake(self, d: defer.Deferred[None]) -> None:
        if self.handshake is d:
            self.handshake = None

    async def close(self, seconds: float) -> None:
        """Close and wait until the socket is gone, so nothing outlives the delivery."""
        if not self.lost:
            self.transport.loseConnection()
            call = self.reactor.callLater(seconds, self._force_close)
            await self.closed
            if call.active():
                call.cancel()

    def _force_close(self) -> None:
        if not self.lost:
            self.transport.abortConnection()


class _OneSession(Factory):
    """Connects one session; quiet, so a connection per message does not log twice."""

    noisy = False

    def __init__(self, session: _Session) -> None:
        self.session = session

    def buildProtocol(self, addr: Any) -> _Session:
        return self.session


_ENHANCED_5 = re.compile(r"^\s*5\.([0-9]{1,3}\.[0-9]{1,3})\b")


def _too_many(reply: Reply) -> bool:
    """A RCPT refused for the transaction's number of recipients, not for itself:
    452 (RFC 5321 §4.5.3.1.10), or 552 in older servers, with X.5.3 or its words."""
    if reply.code not in (452, 552):
        return False
    text = reply.text.lower()
    return text.startswith(("4.5.3", "5.5.3")) or "too many recipients" in text


def _size(reply: Reply) -> int:
    """What a queued reply counts against MAX_QUEUED_BYTES: its lines as received."""
    return sum(len(line) + 4 for line in reply.lines)


def _reason(reason: Any) -> str:
    value = getattr(reason, "value", reason)
    if isinstance(value, VerificationError):
        return "the certificate does not match the host name"
    if isinstance(value, CertificateError):
        return f"the certificate cannot be matched to the host name: {value}"
    if isinstance(value, SSL.Error):
        return f"TLS error {value}"
    text = str(value) or type(value).__name__
    return text.strip()


@implementer(IPushProducer)
class _BodyWriter:
    """Streams the spool file through ``DotStuffer`` as the transport asks for data.

    A push producer: it writes until the transport pauses it (its buffer is
    full), so memory stays bounded by one chunk plus the socket buffer.  A
    stall longer than the data-block timeout aborts the connection; a read
    error aborts it too, since ending the DATA would deliver a truncated
    message.
    """

    def __init__(self, session: _Session, job: _Job, chunk_size: int, block: float) -> None:
        self.session = session
        self.job = job
        self.chunk_size = chunk_size
        self.block = block
        self.stuffer = DotStuffer()
        self.paused = False
        self.finished = False
        self.done: defer.Deferred[None] = defer.Deferred()
        self.timer: Any = None
        self.file: Any = None

    def run(self) -> defer.Deferred[None]:
        self.file = self.job.open_body()
        self.session.body = self
        self._arm()
        self.session.transport.registerProducer(self, True)
        self.resumeProducing()
        return self.done

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._arm()
        while not self.paused and not self.finished:
            self._step()

    def stopProducing(self) -> None:
        self.fail(self.session.error or ConnectionDropped(
            "4.4.2 Connection lost while sending the message"
        ))

    def _step(self) -> None:
        try:
            chunk = self.file.read(self.chunk_size)
        except OSError as e:
            error = LocalError(f"4.3.0 Cannot read the message file: {e}")
            self.session.abort(error)
            self.fail(error)
            return
        if chunk:
            out = self.stuffer.feed(chunk)
            if out:
                self.session.transport.write(out)
                self._arm()
            return
        self.session.transport.write(self.stuffer.finish())
        self._end(None)

    def _arm(self) -> None:
        if self.finished:
            return
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.block)
        else:
            self.timer = self.session.reactor.callLater(self.block, self._stalled)

    def _stalled(self) -> None:
        error = StageTimeout(f"4.4.2 Timed out after {self.block:g} s sending the message")
        self.session.abort(error)
        self.fail(error)

    def fail(self, error: SessionError) -> None:
        self._end(error)

    def _end(self, error: SessionError | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.session.body = None
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.file.close()
        if not self.session.lost:
            self.session.transport.unregisterProducer()
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)


# -- TLS -----------------------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """Encryption without certificate checks, with SNI: *OPPORTUNISTIC and *REQUIRED."""

    _context: SSL.Context | None = None

    def __init__(self, hostname: str) -> None:
        self.sni = _sni(hostname)

    @classmethod
    def context(cls) -> SSL.Context:
        if cls._context is None:
            cls._context = ssl.CertificateOptions(
                raiseMinimumTo=ssl.TLSVersion.TLSv1_2
            ).getContext()
        return cls._context

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context(), None)
        connection.set_app_data(tls_protocol)
        if self.sni is not None:
            connection.set_tlsext_host_name(self.sni)
        return connection


class _Verified(_Unverified):
    """*VERIFY: the chain to the trust root, then the hop's name, both checked here.

    Not Twisted's ``optionsForClientTLS``: its check logs service_identity's
    CertificateError (a certificate with no subjectAltName) as a critical
    error and then goes by the chain alone, so a certificate of a trusted CA
    that named no host in a SAN passed for every host.  Here any error of
    the name check is a refusal.
    """

    _platform: SSL.Context | None = None  # with the system's CAs, made once

    def __init__(self, hostname: str, trust_root: Any = None) -> None:
        hostname = hostname.rstrip(".")  # an absolute name is the same name
        super().__init__(hostname)
        self.trust_root = trust_root
        if isIPAddress(hostname) or isIPv6Address(hostname):
            self.identity: Any = IPAddress_ID(hostname)
        else:
            self.identity = DNS_ID(hostname)

    def context(self) -> SSL.Context:  # type: ignore[override]
        if self.trust_root is not None:
            return _verifying_context(self.trust_root)
        if _Verified._platform is None:
            _Verified._platform = _verifying_context(ssl.platformTrust())
        return _Verified._platform

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = super().clientConnectionForTLS(tls_protocol)
        self._protocol = tls_protocol  # told why, when the name does not match
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return connection

    def _verify(self, connection: Any, certificate: Any, error: int, depth: int,
                ok: int) -> bool:
        if not ok:
            return False  # the chain: OpenSSL's verdict
        if depth != 0:
            return True
        protocol, self._protocol = self._protocol, None
        try:
            verify_service_identity(extract_patterns(certificate), [self.identity], [])
        except Exception as e:  # VerificationError, CertificateError, one it cannot read
            if protocol is not None:
                protocol.failVerification(Failure(e))
            return False
        return True


def _verifying_context(trust_root: Any) -> SSL.Context:
    return ssl.CertificateOptions(
        trustRoot=trust_root, raiseMinimumTo=ssl.TLSVersion.TLSv1_2).getContext()


def _sni(hostname: str) -> bytes | None:
    hostname = hostname.rstrip(".")  # RFC 6066 §3: the name without its trailing dot
    if not hostname or ":" in hostname or re.fullmatch(r"[0-9.]+", hostname):
        return None
    try:
        return hostname.encode("idna")
    except UnicodeError:
        return None


def tls_creator(policy: str, hostname: str, trust_root: Any = None) -> Any:
    """The TLS connection creator for a policy and the hop's host name."""
    if policy == TLS_VERIFY:
        return _Verified(hostname, trust_root)
    return _Unverified(hostname)


# -- one attempt -------------------------------------------------------------------------


@attrs.frozen
class _Options:
    helo_name: str
    tls_policy: str
    timeouts: Timeouts
    auth: Any
    trust_root: Any
    auth_requires_tls: bool
    chunk_size: int
    #: *CLTBIND: one address, or the first of each family (str or a tuple of them).
    bind_address: str | tuple[str, ...] | None

    def credentials(self, hop: Hop) -> Credentials | None:
        if self.auth is None or isinstance(self.auth, Credentials):
            return self.auth
        return self.auth.get(hop.host.lower()) or self.auth.get(hop.address)


@attrs.frozen
class _Job:
    envelope: Envelope
    body_path: Path
    size: int
    body_8bit: bool
    presettled: tuple[RecipientResult | None, ...]  # refused before any connection
    #: The whole body when it is one chunk or less: the file is read once,
    #: for its size, its 8-bit scan and the DATA, instead of once for each.
    body: bytes | None = None
    #: A larger body made 7-bit, in a file of its own with no name (it goes
    #: with the job); None while ``body_path`` (or ``body``) is what is sent.
    converted: Any = attrs.field(default=None, eq=False)
    #: Where the message starts in ``body_path``: after the trace fields the
    #: queue keeps for local delivery (the envelope's ``trace``).
    offset: int = 0

    def open_body(self) -> Any:
        """The body to send, from its start, in a file object of its own."""
        if self.body is not None:
            return io.BytesIO(self.body)
        if self.converted is not None:
            f = os.fdopen(os.dup(self.converted.fileno()), "rb")
            f.seek(0)
            return f
        f = open(self.body_path, "rb")
        if self.offset:
            f.seek(self.offset)
        return f

    def read_body(self) -> bytes:
        with self.open_body() as f:
            return f.read()

    @classmethod
    def build(cls, envelope: Any, path: Path, size: int | None, body_8bit: bool | None,
              offset: int = 0) -> _Job:
        env = Envelope.from_any(envelope)
        body = None
        if size is None or body_8bit is None:
            with open(path, "rb", buffering=0) as f:
                actual = os.fstat(f.fileno()).st_size - offset
                if actual <= CHUNK_SIZE:
                    f.seek(offset)
                    body = f.readall()
                    actual = len(body)
            if size is None:
                size = actual
            if body_8bit is None:
                body_8bit = (not body.isascii() if body is not None
                             else is_8bit(path, start=offset))
        return cls(env, path, size, body_8bit, _presettle(env), body, offset=offset)


def _presettle(env: Envelope) -> tuple[RecipientResult | None, ...]:
    """Permanent results for addresses that must not reach a command line."""
    bad_from = _bad_address(env.originator)
    out: list[RecipientResult | None] = []
    for r in env.recipients:
        why = _bad_address(r.address) or (None if r.address else "empty address")
        if bad_from is not None:
            out.append(RecipientResult(
                r.address, PERMANENT, 550, f"5.1.7 Bad originator address: {bad_from}", False
            ))
        elif why is not None:
            out.append(RecipientResult(
                r.address, PERMANENT, 553, f"5.1.3 Bad recipient address: {why}", False
            ))
        else:
            out.append(None)
    return tuple(out)


@attrs.frozen
class _Outcome:
    """A definitive per-recipient answer, or why the hop gave none."""

    results: tuple[RecipientResult, ...] | None = None
    error: str | None = None
    tls: bool = False
    dsn: bool = False
    plain_retry: bool = False  # TLS failed where it was only opportunistic
    answered: bool = False  # the server greeted (see ``HopAttempt``)
    code: int = 451  # of the hop's failure (see ``_HopFailed``)


class _Opening:
    """Greeting, EHLO, STARTTLS, AUTH and QUIT with one hop: every session's frame."""

    def __init__(self, session: _Session, hop: Hop, options: _Options) -> None:
        self.session = session
        self.hop = hop
        self.options = options
        self.t = options.timeouts
        self.greeted = False  # the server said something: it is up

    @property
    def where(self) -> str:
        return f"{self.hop.host}[{self.hop.address}]:{self.hop.port}"

    # -- before MAIL -----------------------------------------------------------------------

    async def _open(self) -> Extensions:
        greeting = await self.session.read("greeting", self.t.greeting)
        self.greeted = True
        if greeting.code != 220:
            raise _HopFailed(f"4.4.1 {self.where} greeted with: {greeting}")
        ext = await self._hello()
        ext = await self._secure(ext)
        await self._authenticate(ext)
        return ext

    async def _hello(self) -> Extensions:
        self.session.send(f"EHLO {self.options.helo_name}")
        reply = await self.session.read("EHLO", self.t.ehlo)
        if reply.positive:
            return Extensions.parse(reply)
        if reply.code >= 500:
            self.session.send(f"HELO {self.options.helo_name}")
            reply = await self.session.read("HELO", self.t.ehlo)
            if reply.positive:
                return Extensions(esmtp=False)
        if 500 <= reply.code < 600 and not self.session.tls:
            # The server will not talk to us, now or later.  After STARTTLS it
            # is rather its TLS set-up that is broken: mended, it takes the mail.
            found = _ENHANCED_5.match(reply.lines[0]) if reply.lines else None
            status = f"5.{found.group(1)}" if found else "5.0.0"
            raise _HopFailed(f"{status} {self.where} refused EHLO/HELO: {reply}", reply.code)
        raise _HopFailed(f"4.4.1 {self.where} refused EHLO/HELO: {reply}")

    async def _secure(self, ext: Extensions) -> Extensions:
        """STARTTLS as TLSOUTBOUND says.

        *OPPORTUNISTIC delivers without TLS rather than not at all (RFC 3207
        §4, and what TWISTED.md §2.2 asks of MX delivery): a server that
        does not offer it, refuses it (454), or fails the handshake (the
        hop is then tried again on a new connection without STARTTLS).
        """
        policy = self.options.tls_policy
        if policy == _TLS_OFF:
            return ext
        if not ext.has("STARTTLS"):
            if policy == TLS_OPPORTUNISTIC:
                return ext
            raise _HopFailed(
                f"4.7.10 {self.where} does not offer STARTTLS (TLSOUTBOUND {policy})"
            )
        self.session.send("STARTTLS")
        reply = await self.session.read("STARTTLS", self.t.ehlo)
        if reply.code != 220:
            if policy == TLS_OPPORTUNISTIC:
                return ext  # the session goes on as before STARTTLS
            raise _HopFailed(f"4.7.5 {self.where} refused STARTTLS: {reply}")
        creator = tls_creator(policy, self.hop.host, self.options.trust_root)
        try:
            await self.session.start_tls(creator, self.t.tls)
        except ProtocolViolation:
            raise  # plaintext after the 220 (injected?): this hop is not tried again
        except SessionError as e:
            if policy == TLS_OPPORTUNISTIC:
                raise _TLSFailed(f"4.7.5 TLS with {self.where} failed: {e}") from None
            raise
        return await self._hello()

    async def _authenticate(self, ext: Extensions) -> None:
        creds = self.options.credentials(self.hop)
        if creds is None or not ext.auth_mechanisms:
            return
        if not self.session.tls and self.options.auth_requires_tls:
            raise _HopFailed(
                f"4.7.11 Not sending credentials to {self.where} without TLS"
            )
        mechanisms = ext.auth_mechanisms
        if "PLAIN" in mechanisms:
            token = f"\0{creds.username}\0{creds.password}".encode()
            reply = await self._auth_step(f"AUTH PLAIN {_b64(token)}")
            if reply.code == 334:
                reply = await self._auth_step(_b64(token))
        elif "LOGIN" in mechanisms:
            reply = await self._auth_step("AUTH LOGIN")
            if reply.code == 334:
                reply = await self._auth_step(_b64(creds.username.encode()))
            if reply.code == 334:
                reply = await self._auth_step(_b64(creds.password.encode()))
        else:
            raise _HopFailed(f"4.7.0 {self.where} offers no AUTH mechanism we know: "
                             + " ".join(mechanisms))
        if reply.code != 235:
            raise _HopFailed(f"4.7.0 Authentication to {self.where} failed: {reply}")

    async def _auth_step(self, line: str) -> Reply:
        self.session.send(line)
        return await self.session.read("AUTH", self.t.auth)

    async def _quit(self) -> None:
        if self.session.lost or self.session.error is not None:
            return
        try:
            self.session.send("QUIT")
            await self.session.read("QUIT", self.t.quit)
        except SessionError:
            pass


class _Conversation(_Opening):
    """The SMTP dialogue with one hop, from the greeting to QUIT."""

    def __init__(self, session: _Session, hop: Hop, job: _Job, options: _Options) -> None:
        super().__init__(session, hop, options)
        self.job = job
        self.recipients = job.envelope.recipients
        self.results: list[RecipientResult | None] = list(job.presettled)
        self.dsn = False
        self.rset = False  # a kept session: RSET goes first, and must succeed
        #: Recipients the last transaction's server refused only for their
        #: number, and whether that transaction delivered to any.
        self.overflow: list[int] = []
        self.progress = False
        self.downgrade_tried = False
        self.clean = True  # the session is in step with the server for another message
        #: The extensions of a session left open for the next message (``run``, ``keep``);
        #: None also when the session never opened.
        self.ext: Extensions | None = None

    async def run(self, ext: Extensions | None = None, keep: bool = False,
                  rset: bool = False) -> _Outcome:
        """The dialogue; with ``ext``, on a session already open (a reused connection).

        With ``keep``, a session whose transaction ended cleanly is left open
        (no QUIT) and its extensions are in ``self.ext`` for the next message.
        With ``rset`` (a kept session), the transaction begins with RSET, in
        the same pipelined group as MAIL; :class:`_Stale` when it fails,
        before any recipient has a result.
        """
        self.rset = rset
        if ext is None:
            try:
                ext = await self._open()
            except _HopFailed as e:
                await self._quit()
                return _Outcome(error=str(e), tls=self.session.tls,
                                plain_retry=isinstance(e, _TLSFailed), answered=self.greeted,
                                code=e.code)
            except SessionError as e:
                return _Outcome(error=f"{e} ({self.where})", tls=self.session.tls,
                                answered=self.greeted)
        try:
            await self._transaction(ext)
            while self._more_transactions():
                await self._transaction(ext)
        except SessionError as e:
            self.clean = False
            self._settle_open(TEMPORARY, e.code, f"{e} ({self.where})", remote=False)
        if any(r is None for r in self.results):
            self.clean = False
            self._settle_open(TEMPORARY, 451, f"4.4.2 No reply from {self.where}", remote=False)
        if keep and self.clean and not (self.session.lost or self.session.closing
                                        or self.session.error is not None):
            self.ext = ext
        else:
            await self._quit()
        return _Outcome(tuple(self.results), tls=self.session.tls, dsn=self.dsn)  # type: ignore[arg-type]

    # -- the transaction ---------------------------------------------------------------------

    async def _transaction(self, ext: Extensions) -> None:
        limit = ext.size_limit
        if limit is not None and self.job.size > limit:
            self._settle_open(PERMANENT, 552, (
                f"5.3.4 Message size {self.job.size} exceeds the limit {limit} of {self.where}"
            ), remote=False)
            return
        utf8 = self._check_utf8(ext)
        if utf8 is None:
            return
        wanted = [i for i, r in enumerate(self.results) if r is None]
        if not wanted:
            return
        if self.job.body_8bit and not ext.has("8BITMIME") and not self.downgrade_tried:
            self.downgrade_tried = True  # once: further transactions send what it made
            self.job = await self._downgraded(limit)
        self.dsn = ext.has("DSN")
        mail = self._mail_command(ext, utf8)
        rcpts = [self._rcpt_command(self.recipients[i], ext) for i in wanted]
        pipelined = ext.has("PIPELINING")
        mail_reply, rcpt_replies, data_reply = await self._envelope(mail, rcpts, utf8,
                                                                    pipelined)
        accepted = []
        if not mail_reply.positive:
            self._settle(wanted, mail_reply)
        else:
            for i, reply in zip(wanted, rcpt_replies, strict=True):
                if reply is None:
                    continue  # not answered: the connection ended first
                if reply.positive:
                    accepted.append(i)
                    continue
                if _too_many(reply):
                    self.overflow.append(i)
                if reply.code == 552:
                    # Too many recipients, in the old code: temporary (RFC 5321 §4.5.3.1.10),
                    # its enhanced code too, so the retry's reason does not say permanent.
                    self._settle([i], Reply(452, tuple(_ENHANCED_5.sub(r"4.\1", line, count=1)
                                                       for line in reply.lines)))
                else:
                    self._settle([i], reply)
        if self.session.error is not None and any(self.results[i] is None for i in wanted):
            raise self.session.error  # those accepted or unanswered: the loss decides
        if data_reply is not None and not accepted:
            # DATA went with the group and nobody is left to take it.  A
            # server that should have refused it but waits for the text
            # gets none: the connection is dropped, so no message is made.
            if data_reply.code == 354:
                self.clean = False
                self.session.abort(ProtocolViolation(
                    "4.4.2 354 to DATA with no recipient accepted; connection dropped"))
            return
        if accepted:
            await self._data(accepted, data_reply)
            self.progress = any(self.results[i].status == DELIVERED  # type: ignore[union-attr]
                                for i in accepted)

    def _more_transactions(self) -> bool:
        """Whether the recipients refused only for their number go now, in another
        transaction on this connection (RFC 5321 §4.5.3.1.10): as long as each
        transaction delivers to some.  Left to a retry, a server's limit cost a
        retry interval per chunk of recipients, and bounced those past RTYMIN's
        count of chunks."""
        overflow, self.overflow = self.overflow, []
        progress, self.progress = self.progress, False
        if not (overflow and progress and self.clean) or self.session.lost \
                or self.session.closing or self.session.error is not None:
            return False
        for i in overflow:
            self.results[i] = None
        self.rset = False  # the transaction just ended: the next MAIL begins another
        return True

    async def _envelope(
        self, mail: str, rcpts: list[str], utf8: bool, pipelined: bool
    ) -> tuple[Reply, list[Reply | None], Reply | None]:
        """[RSET], MAIL, RCPTs and DATA: one write with PIPELINING (RFC 2920), replies in order.

        Without PIPELINING each command waits for its reply, and DATA is
        left to :meth:`_data` (the third item is None).
        """
        if pipelined:
            group = ["RSET"] if self.rset else []
            self.session.send(*group, mail, *rcpts, "DATA", utf8=utf8)
            await self._rset_reply()
            mail_reply = await self.session.read("MAIL", self.t.mail)
            replies: list[Reply | None] = []
            try:
                for _ in rcpts:
                    replies.append(await self.session.read("RCPT", self.t.rcpt))
                return mail_reply, replies, await self.session.read("DATA", self.t.data_init)
            except SessionError:
                # Answered, then cut off (a server that drops the client after
                # a refusal, as Exim's "drop" does): each reply given stands for
                # its command (RFC 2920 §3.1); those not answered stay open.
                return mail_reply, replies + [None] * (len(rcpts) - len(replies)), None
        if self.rset:
            self.session.send("RSET")
            await self._rset_reply()
        self.session.send(mail, utf8=utf8)
        mail_reply = await self.session.read("MAIL", self.t.mail)
        replies = []
        if mail_reply.positive:
            try:
                for rcpt in rcpts:
                    self.session.send(rcpt, utf8=utf8)
                    replies.append(await self.session.read("RCPT", self.t.rcpt))
            except SessionError:  # as above: the replies given stand
                replies += [None] * (len(rcpts) - len(replies))
        return mail_reply, replies, None

    async def _rset_reply(self) -> None:
        """The reply to the RSET that tests a kept session; _Stale unless it is 250."""
        if not self.rset:
            return
        self.rset = False
        try:
            reply = await self.session.read("RSET", self.t.mail)
        except SessionError:
            raise _Stale() from None
        if reply.code != 250:
            raise _Stale()

    async def _data(self, accepted: list[int], reply: Reply | None = None) -> None:
        """DATA (unless its reply came with the group), the body, and the final reply."""
        if reply is None:
            self.session.send("DATA")
            reply = await self.session.read("DATA", self.t.data_init)
        if reply.code != 354:
            if reply.positive:
                reply = Reply(451, (f"4.4.2 Unexpected reply to DATA: {reply}",))
            self._settle(accepted, reply)
            return
        writer = _BodyWriter(self.session, self.job, self.options.chunk_size, self.t.data_block)
        await writer.run()
        if self._early_acceptance():
            # Said before the final dot, so not about the message: a 250
            # there is no acceptance (a 554 may follow the dot).
            self.session._violation("a positive reply before the end of the message")
            raise self.session.error  # type: ignore[misc]
        # An early refusal (552 too big, 421 closing) is the server's word on
        # the message, as any client reads it.
        self._settle(accepted, await self.session.read("end of data", self.t.data_end))

    def _early_acceptance(self) -> bool:
        """A 2xx reply, or the start of one, arrived before the final dot was sent."""
        session = self.session
        if session.replies:
            return session.replies[0].positive
        if session.partial:
            return 200 <= session.partial_code < 300
        return session.buffer[:1] == b"2"

    async def _downgraded(self, limit: int | None) -> _Job:
        """The job with its body made 7-bit; as it was, should that fail.

        Also as it was when only the converted copy would exceed the
        server's SIZE: sent as it is, it may well arrive; converted, it
        would be returned.  A converted copy larger than a chunk goes to a
        file with no name beside the spool file, so a large message is not
        held in memory while it is sent; it vanishes with the job.
        """
        job = self.job
        reactor = self.session.reactor

        def convert() -> _Job | None:
            pieces = downgrade.to_7bit_pieces(job.read_body())
            # 8-bit header fields, if any, go as they came: body_8bit stays for them.
            eight = pieces is None or not all(p.isascii() for p in pieces)
            if eight:
                # Header fields are never changed, nor message/partial and
                # message/external-body parts re-encoded (downgrade.py).
                log.warn("{named}{where} does not offer 8BITMIME, and parts of the message "
                         "cannot be made 7-bit (header fields, or parts that may not be "
                         "re-encoded); sending them as they are",
                         named=job.envelope.named, where=self.where)
            if pieces is None:
                return None  # 8-bit header fields only
            size = sum(map(len, pieces))
            if limit is not None and size > limit:
                log.warn("{named}{where} does not offer 8BITMIME, and the message made "
                         "7-bit would exceed its SIZE {limit}; sending it as it is",
                         named=job.envelope.named, where=self.where, limit=limit)
                return None
            if size <= CHUNK_SIZE:
                return attrs.evolve(job, body=b"".join(pieces), converted=None, size=size,
                                    body_8bit=eight)
            spill = None
            try:
                spill = tempfile.TemporaryFile(dir=job.body_path.parent)
                spill.writelines(pieces)
                spill.flush()
            except BaseException as e:
                if spill is not None:
                    spill.close()
                if not isinstance(e, OSError):
                    raise
                # The spool's disk is full: memory will do for this one.
                return attrs.evolve(job, body=b"".join(pieces), converted=None, size=size,
                                    body_8bit=eight)
            return attrs.evolve(job, body=None, converted=spill, size=size, body_8bit=eight)

        try:
            converted = await threads.deferToThreadPool(reactor, reactor.getThreadPool(),
                                                        convert)
        except defer.CancelledError:
            raise
        except Exception as e:
            log.warn("{named}{where} does not offer 8BITMIME and the message could not "
                     "be made 7-bit ({error}); sending it as it is",
                     named=job.envelope.named, where=self.where, error=e)
            return job
        return job if converted is None else converted

    def _check_utf8(self, ext: Extensions) -> bool | None:
        """Whether SMTPUTF8 is used; None when the originator rules delivery out."""
        originator = self.job.envelope.originator
        utf8_offered = ext.has("SMTPUTF8")
        if not originator.isascii():
            if not utf8_offered:
                self._settle_open(PERMANENT, 550, (
                    f"5.6.7 {self.where} does not offer SMTPUTF8 for a non-ASCII originator"
                ), remote=False)
                return None
            return True
        needed = False
        for i, r in enumerate(self.recipients):
            if self.results[i] is None and not r.address.isascii():
                if not utf8_offered:
                    self.results[i] = RecipientResult(r.address, PERMANENT, 553, (
                        f"5.6.7 {self.where} does not offer SMTPUTF8 for a non-ASCII address"
                    ), remote=False)
                needed = True
        return needed and utf8_offered

    def _mail_command(self, ext: Extensions, utf8: bool) -> str:
        env = self.job.envelope
        params = []
        if ext.has("SIZE"):
            params.append(f"SIZE={self.job.size}")
        if self.job.body_8bit and ext.has("8BITMIME"):
            params.append("BODY=8BITMIME")
        if utf8:
            params.append("SMTPUTF8")
        if self.dsn:
            if env.ret and env.ret.upper() in ("FULL", "HDRS"):
                params.append(f"RET={env.ret.upper()}")
            if env.envid:
                params.append(f"ENVID={xtext(env.envid)}")
        return " ".join([f"MAIL FROM:<{env.originator}>", *params])

    def _rcpt_command(self, rcpt: Recipient, ext: Extensions) -> str:
        params = []
        if self.dsn:
            notify = [n.upper() for n in rcpt.notify or ()]
            if notify and set(notify) <= set(NOTIFY_VALUES) and (
                "NEVER" not in notify or notify == ["NEVER"]
            ):
                params.append("NOTIFY=" + ",".join(notify))
            if rcpt.orcpt:
                params.append("ORCPT=" + _orcpt(rcpt.orcpt))
        return " ".join([f"RCPT TO:<{rcpt.address}>", *params])

    # -- results ------------------------------------------------------------------------------

    def _settle(self, indexes: Iterable[int], reply: Reply) -> None:
        status = reply.outcome
        for i in indexes:
            self.results[i] = RecipientResult(
                self.recipients[i].address, status, reply.code, reply.text
            )

    def _settle_open(self, status: str, code: int, text: str, remote: bool) -> None:
        for i, r in enumerate(self.results):
            if r is None:
                self.results[i] = RecipientResult(
                    self.recipients[i].address, status, code, text, remote
                )



def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- connection reuse ----------------------------------------------------------------------


class SessionCache:
    """Open sessions kept between messages, one per hop and policy, for a short while.

    A client job delivers message after message, most often to the same
    destination; a new connection each time (connect, greeting, EHLO,
    STARTTLS, AUTH) costs more than the transaction.  A session that ended
    its transaction cleanly waits here ``idle`` seconds for the next
    message; a reused session is first tested with RSET, and one that fails
    it is closed and a new connection made, so reuse never costs a try.
    """

    def __init__(self, reactor: Any, idle: float = 2.0) -> None:
        self.reactor = reactor
        self.idle = idle
        self._kept: dict[tuple[Any, ...], tuple[_Session, Extensions, Any]] = {}

    def take(self, key: tuple[Any, ...]) -> tuple[_Session, Extensions] | None:
        kept = self._kept.pop(key, None)
        if kept is None:
            return None
        session, ext, call = kept
        if call.active():
            call.cancel()
        if session.lost or session.error is not None or session.replies or session.buffer \
                or session.partial:
            # Gone, or the peer spoke while idle: its replies would no longer
            # match our commands.  A new connection is the safe way on.
            defer.Deferred.fromCoroutine(_goodbye(session, 1.0))
            return None
        return session, ext

    def keep(self, key: tuple[Any, ...], session: _Session, ext: Extensions,
             quit_seconds: float) -> bool:
        """Keep ``session`` for the next message to its hop; the one kept before goes.

        At most one session is kept, so a job holds at most one idle
        connection besides the one it works on.
        """
        if self.idle <= 0:
            return False
        self.close_all(quit_seconds)
        call = self.reactor.callLater(self.idle, self._expire, key, quit_seconds)
        self._kept[key] = (session, ext, call)
        return True

    def _expire(self, key: tuple[Any, ...], quit_seconds: float) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            defer.Deferred.fromCoroutine(_goodbye(kept[0], quit_seconds))

    def close_all(self, quit_seconds: float = 1.0) -> defer.Deferred[Any]:
        """QUIT and close every kept session; fires when all are closed."""
        goodbyes = []
        for key in list(self._kept):
            session, _, call = self._kept.pop(key)
            if call.active():
                call.cancel()
            goodbyes.append(defer.Deferred.fromCoroutine(_goodbye(session, quit_seconds)))
        return defer.DeferredList(goodbyes)


async def _goodbye(session: _Session, seconds: float) -> None:
    """QUIT and close an idle kept session."""
    if not session.lost and session.error is None:
        try:
            session.send("QUIT")
            await session.read("QUIT", seconds)
        except SessionError:
            pass
    await session.close(seconds)


def _cache_key(hop: Hop, options: _Options) -> tuple[Any, ...]:
    auth = options.credentials(hop)
    return (hop.host, hop.address, hop.port, options.tls_policy, options.helo_name,
            None if auth is None else (auth.username, auth.password), options.bind_address)


# -- deliver -----------------------------------------------------------------------------


def deliver(
    reactor: Any,
    hops: Sequence[Hop],
    envelope: Any,
    body_path: Path | str,
    helo_name: str,
    tls_policy: str = TLS_OPPORTUNISTIC,
    *,
    auth: Credentials | Mapping[str, Credentials] | None = None,
    size: int | None = None,
    body_8bit: bool | None = None,
    trust_root: Any = None,
    timeouts: Timeouts | None = None,
    timeout_scale: float = 1.0,
    bind_address: str | tuple[str, ...] | None = None,
    auth_requires_tls: bool = True,
    chunk_size: int = CHUNK_SIZE,
    cache: SessionCache | None = None,
    body_offset: int = 0,
) -> defer.Deferred[DeliveryResult]:
    """Deliver one message to one destination; fires with a DeliveryResult.

    ``envelope``: anything with ``originator`` and ``recipients`` (see
    ``Envelope.from_any``).  ``auth``: one Credentials for every hop or a
    mapping from host name (or address) to Credentials (*HOSTAUTH).
    ``size`` defaults to the file size, ``body_8bit`` to a scan of the file;
    the message starts ``body_offset`` octets into the file (the envelope's
    ``trace``).
    ``trust_root`` replaces the platform's CA store for ``*VERIFY``.  The
    Deferred fails only on local errors (an unreadable body file, a bad
    policy name); every network outcome is in the result.  With ``cache``,
    a connection left open by an earlier delivery to the same hop is used
    again, and this one is left open for the next.
    """
    options = _Options(
        helo_name, tls_policy, (timeouts or Timeouts()).scaled(timeout_scale), auth,
        trust_root, auth_requires_tls, chunk_size, bind_address,
    )

    async def run() -> DeliveryResult:
        if tls_policy not in TLS_POLICIES:
            raise ValueError(f"tls_policy must be one of {', '.join(TLS_POLICIES)}")
        job = _Job.build(envelope, Path(body_path), size, body_8bit, body_offset)
        return await _deliver(reactor, list(hops), job, options, cache)

    return defer.Deferred.fromCoroutine(run())


async def _deliver(reactor: Any, hops: list[Hop], job: _Job, options: _Options,
                   cache: SessionCache | None = None) -> DeliveryResult:
    if all(r is not None for r in job.presettled):
        return DeliveryResult(job.presettled)  # type: ignore[arg-type]
    attempts: list[HopAttempt] = []
    for hop in hops:
        outcome, remote_ip = await _attempt(reactor, hop, job, options, cache)
        if outcome.results is not None:
            return DeliveryResult(
                outcome.results, hop, remote_ip, outcome.tls, outcome.dsn, tuple(attempts)
            )
        log.info("{named}delivery via {where} failed: {error}", named=job.envelope.named,
                 where=hop.address, error=outcome.error)
        attempts.append(HopAttempt(hop, outcome.error or "failed", outcome.answered,
                                   outcome.code))
    text = _none_took_it(attempts)
    # The last hop's refusal decides, as the last hop's reply would have.
    code = attempts[-1].code if attempts else 451
    status = PERMANENT if 500 <= code < 600 else TEMPORARY
    results = tuple(
        done or RecipientResult(r.address, status, code, text, remote=False)
        for r, done in zip(job.envelope.recipients, job.presettled, strict=True)
    )
    last = attempts[-1].hop if attempts else None
    return DeliveryResult(results, None, last.address if last else None, attempts=tuple(attempts))


def _none_took_it(attempts: list[HopAttempt]) -> str:
    """Why no hop took the message: the last one's error, then the others' in order.

    The journal and WRKQ show this one line; with only the last backup MX
    in it, the administrator would not learn why the primary failed.
    """
    if not attempts:
        return "4.4.4 No hop to deliver to"
    text = attempts[-1].error
    if len(attempts) > 1:
        text += "; tried before it: " + "; ".join(a.error for a in attempts[:-1])
    return text if len(text) <= MAX_WHY else text[:MAX_WHY - 3] + "..."


async def _attempt(
    reactor: Any, hop: Hop, job: _Job, options: _Options, cache: SessionCache | None = None
) -> tuple[_Outcome, str | None]:
    key = _cache_key(hop, options) if cache is not None else ()
    if cache is not None:
        reused = await _reuse(cache, key, hop, job, options)
        if reused is not None:
            return reused
    session = _Session(reactor)
    endpoint = _endpoint(reactor, hop, options)
    try:
        await endpoint.connect(_OneSession(session))
    except Exception as e:
        return _Outcome(error=f"4.4.1 Cannot connect to {hop.host}[{hop.address}]:"
                              f"{hop.port}: {_reason(e)}"), hop.address
    outcome, peer = await _converse(session, hop, job, options, cache, key, None)
    if outcome.plain_retry:
        log.info("{named}{error}; delivering to it without TLS (TLSOUTBOUND "
                 "*OPPORTUNISTIC)", named=job.envelope.named, error=outcome.error)
        return await _attempt(reactor, hop, job, attrs.evolve(options, tls_policy=_TLS_OFF),
                              cache)
    return outcome, peer


async def _reuse(cache: SessionCache, key: tuple[Any, ...], hop: Hop, job: _Job,
                 options: _Options) -> tuple[_Outcome, str | None] | None:
    """The delivery over a kept session, or None when there is none that still works."""
    taken = cache.take(key)
    if taken is None:
        return None
    session, ext = taken
    try:
        return await _converse(session, hop, job, options, cache, key, ext)
    except _Stale:
        return None  # its RSET failed: a new connection, and no try is lost


async def _converse(session: _Session, hop: Hop, job: _Job, options: _Options,
                    cache: SessionCache | None, key: tuple[Any, ...],
                    ext: Extensions | None) -> tuple[_Outcome, str | None]:
    """One transaction on ``session`` (opened first unless ``ext``); then keep or close it."""
    conversation = _Conversation(session, hop, job, options)
    kept = False
    try:
        outcome = await conversation.run(ext, keep=cache is not None, rset=ext is not None)
        if cache is not None and conversation.ext is not None:
            kept = cache.keep(key, session, conversation.ext, options.timeouts.quit)
            if not kept:
                await conversation._quit()
    finally:
        if conversation.job.converted is not None:
            conversation.job.converted.close()  # the 7-bit copy made for this server
        if not kept:
            await session.close(options.timeouts.close)
    return outcome, session.peer_ip or hop.address


def _endpoint(reactor: Any, hop: Hop, options: _Options) -> Any:
    v6 = ":" in hop.address
    given = options.bind_address
    addresses = (given,) if isinstance(given, str) else (given or ())
    bind = next(((a, 0) for a in addresses if (":" in a) == v6), None)  # the hop's family
    cls = TCP6ClientEndpoint if v6 else TCP4ClientEndpoint
    return cls(reactor, hop.address, hop.port, timeout=options.timeouts.connect,
               bindAddress=bind)


# -- ETRN (RFC 1985) ----------------------------------------------------------------------


@attrs.frozen
class EtrnResult:
    """The reply to ``ETRN node`` for each node, and the hop that gave them.

    When no hop could be reached, every node carries the same locally made
    4xx reply saying why, and ``hop`` is None.
    """

    replies: tuple[tuple[str, Reply], ...]
    hop: Hop | None = None
    remote_ip: str | None = None


class _Etrn(_Opening):
    """Asks one hop, over one session, to start delivering the mail it holds for us."""

    async def run(self, nodes: Sequence[str]) -> tuple[Reply, ...] | str:
        """A reply per node, or why this hop gave none (then the next is tried)."""
        try:
            ext = await self._open()
        except _HopFailed as e:
            await self._quit()
            return str(e)
        except SessionError as e:
            return f"{e} ({self.where})"
        replies: list[Reply] = []
        for node in nodes:
            if not ext.has("ETRN"):
                replies.append(Reply(502, (f"5.5.1 {self.where} does not offer ETRN",)))
            elif not node or any(c.isspace() or ord(c) < 32 for c in node):
                replies.append(Reply(501, (f"5.5.4 Not a node name: {node!r}",)))
            else:
                try:
                    self.session.send(f"ETRN {node}")
                    replies.append(await self.session.read("ETRN", self.t.mail))
                except SessionError as e:
                    replies.append(Reply(e.code, (f"{e} ({self.where})",)))
        await self._quit()
        return tuple(replies)


def etrn(
    reactor: Any,
    hops: Sequence[Hop],
    nodes: Sequence[str],
    helo_name: str,
    tls_policy: str = TLS_OPPORTUNISTIC,
    *,
    auth: Credentials | Mapping[str, Credentials] | None = None,
    trust_root: Any = None,
    timeouts: Timeouts | None = None,
    timeout_scale: float = 1.0,
    bind_address: str | tuple[str, ...] | None = None,
    auth_requires_tls: bool = True,
) -> defer.Deferred[EtrnResult]:
    """Issue ``ETRN node`` for each node to the first hop that answers (ETRNCLT).

    The session starts as a delivery does (EHLO, STARTTLS by ``tls_policy``,
    AUTH for a *HOSTAUTH host), so a mail router that wants TLS or a sign-on
    before it takes mail gets the same before ETRN.  A server that does not
    offer ETRN after EHLO is not sent the command (RFC 1985 §3).  Fires with
    an EtrnResult; network failures are in it, never raised.
    """
    options = _Options(
        helo_name, tls_policy, (timeouts or Timeouts()).scaled(timeout_scale), auth,
        trust_root, auth_requires_tls, CHUNK_SIZE, bind_address,
    )

    async def run() -> EtrnResult:
        if tls_policy not in TLS_POLICIES:
            raise ValueError(f"tls_policy must be one of {', '.join(TLS_POLICIES)}")
        error = "4.4.4 No hop to send ETRN to"
        for hop in hops:
            session = _Session(reactor)
            try:
                await _endpoint(reactor, hop, options).connect(_OneSession(session))
            except Exception as e:
                error = f"4.4.1 Cannot connect to {hop.host}[{hop.address}]:{hop.port}: " \
                        f"{_reason(e)}"
                continue
            try:
                outcome = await _Etrn(session, hop, options).run(nodes)
            finally:
                await session.close(options.timeouts.close)
            if not isinstance(outcome, str):
                return EtrnResult(tuple(zip(nodes, outcome, strict=True)), hop,
                                  session.peer_ip or hop.address)
            error = outcome
        return EtrnResult(tuple((n, Reply(451, (error,))) for n in nodes))

    return defer.Deferred.fromCoroutine(run())
