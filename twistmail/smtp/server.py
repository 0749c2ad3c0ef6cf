"""The SMTP server session of a QTMSSRCP job: our own RFC 5321 command layer.

Twisted's ESMTP class is not used: it was shown to inject plaintext after
STARTTLS, desynchronise DATA on long lines, buffer without bound, pass bare
CR/LF through, and answer pipelined commands out of order.  This layer:

* processes one command at a time from a bounded input queue, so replies go
  out in command order even when a check (a directory lookup, the durable
  commit) is asynchronous, and stops reading while the queue is full;
* limits command lines to 512 octets (more for MAIL, RCPT and AUTH, whose
  extensions add parameters) and text lines to 1000 octets, and recovers
  from an over-long line without losing its place in the stream;
* ends DATA only on CRLF.CRLF; a bare CR or LF never ends it, and a bare LF
  is accepted as a line end inside the message only with ALWBARELF(*YES);
* streams the message to the queue's spool file (never the whole message in
  memory) and answers 250 only after the queue's durable commit.

Settings honoured: ``[smtp] maxmsgsize maxrcpt inacttimo alwbarelf mime8bit``.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import errno
import functools
import re
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistmail.protocols.peer import client_address
from twistmail.protocols.sequential import SequentialSession, without_line_end
from twistmail.protocols.writenow import write_now
from twistmail.smtp.address import Address, AddressError, Command, PathError, parse_command
from twistmail.storagefault import log_failure

MAX_COMMAND = 512  # octets, CRLF included (RFC 5321 §4.5.3.1.4)
#: Service extensions lengthen the lines of the commands they add parameters
#: to (RFC 5321 §4.5.3.1.4): MAIL by 100 for ENVID and RET (RFC 3461 §4), 26
#: for SIZE (RFC 1870), 500 for AUTH= (RFC 4954 §5); RCPT by 500 for NOTIFY
#: and ORCPT (RFC 3461 §4).
MAX_LINE_OF = {b"MAIL ": MAX_COMMAND + 100 + 26 + 500, b"RCPT ": MAX_COMMAND + 500}
MAX_AUTH_LINE = 12288  # an AUTH command or response, CRLF included (RFC 4954 §4)
MAX_TEXT = 1000  # octets, CRLF included (§4.5.3.1.6)
MAX_HEADER_BLOCK = 1024 * 1024  # header bytes we hold to add missing fields
#: RFC 5321 §6.3: a message that has passed this many hosts is in a loop
#: (two servers routing a domain to each other, a MAILROUTER pointing back).
MAX_RECEIVED = 100
MAX_PENDING = 64 * 1024  # pipelined input held while a command waits, before we stop reading
MAX_AUTH_FAILURES = 3
SOFT_ERRORS = 3  # errors after which each command waits a little
#: NOOP, RSET, VRFY, HELP, HELO, EHLO a client may send without delivering mail; each
#: one more counts as an error (Postfix's smtpd_junk_command_limit): a session
#: kept open with them alone ends, within MAXERRORS more.
JUNK_LIMIT = 100
JUNK = frozenset({b"NOOP", b"RSET", b"VRFY", b"HELP", b"HELO", b"EHLO"})
#: RCPTs a session may send past MAXRCPT (452 4.5.3, not a fault: the client
#: sends the rest in another transaction); each one more counts as an error,
#: as Postfix's smtpd_recipient_overshoot_limit.
RCPT_OVERSHOOT = 1000
#: In DATA, the octets a second a client must average once INACTTIMO seconds
#: have passed for its lines to count as activity (Postfix's
#: smtpd_min_data_rate, which Postfix applies under stress only; here always):
#: a line every few minutes would hold a job for ever.
MIN_DATA_RATE = 500

UNIMPLEMENTED = {b"EXPN", b"TURN", b"SAML", b"SEND", b"SOML"}


def date_now() -> str:
    """Now as an RFC 5322 date in local time, for the Received: and Date: headers."""
    return _date_of_second(int(time.time()))


@functools.lru_cache(maxsize=1)
def _date_of_second(second: int) -> str:
    # Formatting a date costs more than the rest of the Received: header; a
    # busy job stamps many messages within one second.
    return email.utils.formatdate(second, localtime=True)


def _mailbox_key(address: str) -> str:
    """Two spellings of one remote mailbox: the domain's case does not count."""
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}"


@attrs.frozen
class Verdict:
    """Whether a recipient is accepted, and how: the SMTP reply and the route."""

    code: int
    text: str
    local: bool = True  # deliver via QTMSINQ (True) or QTMSOUTQ (False)
    route: str | None = None  # the address to deliver to, when it differs (% routing)

    @property
    def accepted(self) -> bool:
        return self.code < 400


@attrs.frozen
class Received:
    """What the backend needs to queue a finished message."""

    helo: str
    client_ip: str
    originator: str
    recipients: tuple[tuple[str, bool], ...]  # (address, local?)
    size: int
    message_id: str | None
    body_8bit: bool = False
    ret: str | None = None  # DSN RET (FULL or HDRS)
    envid: str | None = None  # DSN ENVID, decoded
    dsn: tuple[tuple[str, tuple[str, ...] | None, str | None], ...] = ()  # address, NOTIFY, ORCPT


class Backend:
    """What a session needs from the rest of the appliance (all may be async)."""

    hostname: str

    def storage_full(self) -> bool:
        raise NotImplementedError

    def check_recipient(self, address: Address, client_ip: str, user: str | None,
                        server_ip: str | None = None) -> Any:
        """A Verdict, or a Deferred firing with one (``user``: the AUTH identity;
        ``server_ip``: the address the client reached)."""
        raise NotImplementedError

    def authenticate(self, user: str, password: str, client_ip: str) -> Any:
        """The user profile, or None; may return a Deferred."""
        raise NotImplementedError

    def check_sender(self, address: Address, client_ip: str, user: str | None) -> Any:
        """VFYFROMUSR: None when the sender may use ``address``, else a refusing Verdict."""
        raise NotImplementedError

    def etrn(self, node: str, client_ip: str) -> Any:
        """Start delivery of the mail queued for ``node``: None when started, else why
        not ("not allowed", "held"); may be a Deferred."""
        raise NotImplementedError

    def dsn_allowed(self, client_ip: str) -> Any:
        """Whether an unauthenticated client's DSN requests are honoured (may be a Deferred)."""
        raise NotImplementedError

    def rejected(self, client_ip: str, what: str, address: str, verdict: Verdict,
                 argument: str | None = None) -> Verdict:
        """Record that the server refused ``what`` ("originator", "recipient")
        with a 5xx ``verdict`` (journal 9W); returns the verdict.  ``argument``
        is the command's text when it was refused for its syntax."""
        raise NotImplementedError

    def limit_reached(self, client_ip: str, setting: str) -> None:
        """The session ends for the ``[limits]`` ``setting`` (journal JL)."""
        raise NotImplementedError

    def new_spool(self, originator: str, recipients: Any) -> Any:
        """A spool with ``id``, ``write(bytes)`` and ``abort()``, for a message
        from ``originator`` to ``recipients`` ((address, is_local) pairs)."""
        raise NotImplementedError

    def commit(self, spool: Any, received: Received) -> Any:
        """Make the message durable; a Deferred firing with the queue id."""
        raise NotImplementedError


@attrs.define
class Transaction:
    originator: Address | None
    size_hint: int | None = None
    body_8bit: bool = False
    recipients: list[tuple[str, bool]] = attrs.field(factory=list)
    ret: str | None = None
    envid: str | None = None
    dsn: list[tuple[str, tuple[str, ...] | None, str | None]] = attrs.field(factory=list)
    #: The remote mailboxes among the recipients (see ``_mailbox_key``).
    remote: set[str] = attrs.field(factory=set)


class _Data:
    """The DATA phase: unstuffing, limits, header fix-ups, streaming to the spool."""

    def __init__(self, session: SMTPSession, spool: Any) -> None:
        self.session = session
        self.spool = spool
        self.size = 0
        #: Octets the client sent, also those not kept (a message already
        #: refused is read to its end): what its pace is judged on.
        self.received = 0
        self.started = session.reactor.seconds()
        self.error: tuple[int, str] | None = None
        self.in_header = True
        self.header: list[bytes] = []
        self.header_bytes = 0
        #: Where each Message-ID, Date and Return-Path field starts in ``header``.
        self.ids_and_dates: list[tuple[bytes, int]] = []
        self.message_id: str | None = None
        self.last_field: bytes | None = None
        self.hops = 0  # Received: fields already in the header

    def fail(self, code: int, text: str) -> None:
        if self.error is None:
            self.error = (code, text)

    def _write(self, data: bytes) -> None:
        """To the spool; a disk that refuses fails the message, not the session."""
        try:
            self.spool.write(data)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self.fail(452, "4.3.1 Insufficient system storage, try again later")
            else:
                self.fail(451, f"4.3.0 Local error writing the message: {e.strerror}")

    def line(self, line: bytes) -> None:
        """One message line without its CRLF, already unstuffed."""
        if not self._fits(len(line) + 2):
            return
        if self.in_header:
            self._header_line(line)
        else:
            self._write(line + b"\r\n")

    def body_block(self, block: bytes) -> None:
        """Whole body lines, each ending in CRLF, already unstuffed and checked."""
        if self._fits(len(block)):
            self._write(block)

    def _fits(self, octets: int) -> bool:
        """Count ``octets`` more; False once the message has failed or is too big."""
        if self.error is not None:
            return False
        self.size += octets
        if self.size > self.session.factory.maxmsgsize:
            self.fail(552, "5.3.4 Message size exceeds fixed maximum message size")
            return False
        return True

    def _header_line(self, line: bytes) -> None:
        if line == b"":
            self._end_header()
            self._write(b"\r\n")
            return
        if line[:1] not in (b" ", b"\t") or self.last_field is None:
            name, colon, _ = line.partition(b":")
            name = name.rstrip(b" \t")  # RFC 5322 §4.5.3: obsolete space before the colon
            if not (colon and name and b" " not in name and b"\t" not in name):
                # Not a header field: the header has ended without a blank
                # line.  One goes in, or the line would join the header
                # block, after the fields added to it.
                self._end_header()
                self._write(b"\r\n" + line + b"\r\n")
                return
            field = name.lower()
            self.last_field = field
            if field in (b"message-id", b"date", b"return-path"):
                self.ids_and_dates.append((field, len(self.header)))
            elif field == b"received":
                self.hops += 1
                if self.hops >= MAX_RECEIVED:
                    self.fail(554, f"5.4.6 Too many hops: {self.hops} Received: header "
                              "fields, the message is in a mail loop")
                    return
        self.header.append(line)
        self.header_bytes += len(line) + 2
        if self.header_bytes > MAX_HEADER_BLOCK:
            # Past this the fields to add and the hops could no longer be
            # told from the header: refused whole, as Exim's header_maxsize.
            self.fail(552, f"5.3.4 Message header exceeds {MAX_HEADER_BLOCK} octets")

    def _end_header(self) -> None:
        """Add a Message-ID and a Date where the header has none; drop Return-Path.

        An empty field (``Message-ID:`` and nothing else) is no msg-id or
        date (RFC 5322 §3.6.1, §3.6.4): it goes, and ours takes its place,
        so that the message has one of each and the journal its 99 entry.
        A Return-Path the client wrote goes too (RFC 5321 §4.4, as Postfix's
        cleanup does): the one delivery writes is the only one a reader sees.
        """
        if not self.in_header:
            return
        self.in_header = False
        if self.error is not None:  # refused: nothing more goes to the spool
            return
        header = self.header
        dropped: set[int] = set()
        found: dict[bytes, str] = {}
        for field, start in self.ids_and_dates:
            stop = start + 1  # the field runs on over its continuation lines
            while stop < len(header) and header[stop][:1] in (b" ", b"\t"):
                stop += 1
            value = b"".join(h.strip() for h in header[start:stop]).partition(b":")[2].strip()
            if value and field != b"return-path":
                found.setdefault(field, value.decode("latin-1"))
            else:
                dropped.update(range(start, stop))
        out = [h + b"\r\n" for i, h in enumerate(header) if i not in dropped]
        host = self.session.factory.backend.hostname
        self.message_id = found.get(b"message-id")
        if self.message_id is None:
            self.message_id = f"<{self.spool.id}@{host}>"
            out.append(f"Message-ID: {self.message_id}\r\n".encode())
        if b"date" not in found:
            out.append(f"Date: {date_now()}\r\n".encode())
        self._write(b"".join(out))
        self.header = []

    def finish(self) -> None:
        if self.in_header:
            self._end_header()


#: After DATA a line over the limit gets a reply allowed there (RFC 5321 §4.3.2), not 500.
TEXT_LINE_TOO_LONG = "5.6.0 Message has a line longer than 1000 octets (RFC 5321 4.5.3.1.6)"
#: What HELO/EHLO may name: printable ASCII, no blanks (RFC 5321 §4.1.1.1: a
#: domain or an address literal).  Names that are not quite domains (a bare
#: IP, an underscore) are common and harmless; a tab, a control character or
#: a blank would go into the Received: field and could forge its "by" part,
#: and what RFC 5322 gives a meaning there (a comment's parenthesis, the ";"
#: before the date, brackets outside a literal) would change how it reads.
_HELO_NAME = re.compile(r"\[[\x21-\x5a\x5e-\x7e]{1,253}\]"
                        r"|[^\x00-\x20\x7f-\uffff()<>\[\]\";\\,]{1,255}")
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
#: RFC 3461 §4.4 and §4.2: the longest ENVID and ORCPT a server must take.
MAX_ENVID = 100
MAX_ORCPT = 500


def _xtext_decode(text: str, limit: int) -> str | None:
    """RFC 3461 xtext ("+XX" is the character XX); None unless it is well formed and
    decodes to at most ``limit`` printable ASCII characters.

    What it decodes to is written into notices: a line break or a control
    character there would let a client add fields to a delivery report.
    """
    if _XTEXT.fullmatch(text) is None:
        return None
    out = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)
    if len(out) > limit or not all(" " <= c <= "~" for c in out):
        return None
    return out


_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")


def _orcpt(value: str | None) -> str | None:
    """ORCPT's ``addr-type ";" xtext`` (RFC 3461 §4.2), decoded; None if it is not that."""
    addr_type, semicolon, rest = (value or "").partition(";")
    if not semicolon or not _ADDR_TYPE.fullmatch(addr_type) or not rest:
        return None
    decoded = _xtext_decode(rest, MAX_ORCPT - len(addr_type) - 1)
    return None if not decoded else f"{addr_type};{decoded}"


def _only_never(dsn: tuple[Any, ...]) -> tuple[Any, ...]:
    """What an untrusted client's DSN requests keep: NOTIFY=NEVER, which only
    means fewer notices to the sender it names."""
    return tuple((a, n, None) for a, n, _ in dsn if n == ("NEVER",))


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not base64") from None



def _is_quit(line: bytes) -> bool:
    return line[:4].upper() == b"QUIT" and line[4:5] in (b"\r", b"\n", b" ")

class SMTPSession(SequentialSession):
    log = Logger()
    max_pending = MAX_PENDING

    def __init__(self, factory: SMTPFactory, on_done: Callable[[], None]) -> None:
        super().__init__(factory.reactor, factory.inacttimo)
        self.factory = factory
        self._on_done: Callable[[], None] | None = on_done
        self.after_crlf = True  # the last DATA line ended with CRLF
        self.last_command_crlf = True
        self.discarding = False  # skipping the rest of an over-long line
        self.helo: str | None = None
        self.esmtp = False
        self.txn: Transaction | None = None
        self.data: _Data | None = None
        self.peer_ip = "unknown"
        self.tls = factory.implicit_tls
        self.user: str | None = None  # the authenticated user profile
        #: Whether this client's DSN requests are carried out without AUTH
        #: (it may relay); None until an EHLO asks.
        self.dsn_heeded: bool | None = None
        self.auth_failures = 0
        self.cut_pending = False  # MAXAUTHFAIL reached while a step was under way
        self.errors = 0  # since the last message accepted, as Postfix counts them
        #: Unknown recipients (5.1.1) not made up for by recipients of messages
        #: accepted: a message does not wipe them out, or a harvester sending
        #: one cheap message per few guesses would never be slowed down.
        self.unknown = 0
        self.junk = 0
        self.overshoot = 0  # RCPTs refused for MAXRCPT
        self.auth_step: Callable[[str], Any] | None = None

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer_ip = client_address(getattr(peer, "host", "unknown"))
        self.watch_output()
        self.reset_timeout()
        self.reply(220, f"{self.factory.backend.hostname} ESMTP twistmail service ready")

    def connectionLost(self, reason: object = None) -> None:
        self.closing = True
        self.cancel_timeout()
        self.connection_gone(reason)
        if self.data is not None:
            self.data.spool.abort()
            self.data = None
        self.session_over()

    def session_over(self) -> None:
        """Tell the job, once, that it may take its next connection."""
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    def timed_out(self) -> None:
        self.reply(421, f"4.4.2 {self.factory.backend.hostname} Idle too long, closing connection")
        self.close()

    def shutdown_notice(self) -> defer.Deferred | None:
        if self.closing or self.transport is None:
            return None
        gone = self.wait_gone()
        # A message being queued: a 421 before its 250 would make the client
        # send again what is queued.  Its reply goes first (see resume).
        if not (self.busy and self.data is None):
            self._shutting_down()
        return gone

    def _shutting_down(self) -> None:
        # RFC 5321 §3.8: a server that must shut down says 421 first.
        self.reply(421, f"4.3.2 {self.factory.backend.hostname} Service shutting down, "
                   "try again later")
        self.close()

    def signed_on(self) -> bool:
        return self.user is not None

    def cut_off(self) -> None:
        if self.closing or self.signed_on():
            return
        if self.data is not None or self.busy:
            # A message being received, or being queued (a 421 now would make
            # the client send it again), or a check under way: done first.
            self.cut_pending = True
            return
        self.reply(421, f"4.7.0 {self.factory.backend.hostname} Too many failed sign-ons "
                   "from your address, closing connection")
        self.close()

    def resume(self, _: Any = None) -> None:
        if self.gone is not None and not self.closing:  # the job is ending
            self.busy = False  # the step is over; nothing pipelined after it is read
            self._shutting_down()
            return
        super().resume()
        self._cut_if_pending()

    def _cut_if_pending(self) -> None:
        if self.cut_pending and not self.busy and self.data is None:
            self.cut_pending = False
            self.cut_off()

    def reply(self, code: int, text: str, more: list[str] | None = None) -> None:
        if self.transport is None or self.closing and code != 421 and code != 221:
            return
        lines = [text, *(more or [])]
        out = [f"{code}-{t}\r\n" for t in lines[:-1]] + [f"{code} {lines[-1]}\r\n"]
        write_now(self.transport, "".join(out).encode("utf-8", "replace"))
        # Errors of the client's count towards MAXERRORS; this system's own
        # state (x.3.x: storage, a local error) is no fault of the client's,
        # nor is its recipient limit (4.5.3, RFC 5321 §4.5.3.1.10: the client
        # sends the rest in another transaction).
        if code >= 400 and code != 421 and text[1:4] != ".3." and not text.startswith("4.5.3"):
            if text.startswith("5.1.1"):
                self.unknown += 1
            self._count_error()

    def _count_error(self) -> None:
        self.errors += 1
        if self.errors >= self.factory.maxerrors:
            self.factory.backend.limit_reached(self.peer_ip, "maxerrors")
            self.reply(421, f"4.7.0 {self.factory.backend.hostname} Too many errors, "
                       "closing connection")
            self.close()

    # -- input -------------------------------------------------------------

    def reset_timeout(self) -> None:
        data = self.data
        if data is not None and data.received < MIN_DATA_RATE * (
                self.reactor.seconds() - data.started - self.inacttimo):
            return  # a trickle: the wait runs on from the last time the pace was kept
        super().reset_timeout()

    def step(self) -> bool:
        if self.data is not None:
            return self._data_chunk()
        return self._command_step()

    def _command_step(self) -> bool:
        lf = self.buffer.find(b"\n")
        if lf < 0:
            if len(self.buffer) > self._line_limit():
                auth = self.auth_step is not None or _limit_of(self.buffer) == MAX_AUTH_LINE
                self.buffer = b""
                if not self.discarding:
                    self.discarding = True
                    if auth:
                        self.auth_step = None  # the exchange is over, not its next line
                        self._auth_too_long()
                    else:
                        self.reply(500, "5.5.2 Line too long: command lines are limited to "
                                   "512 octets (MAIL 1138, RCPT 1012, AUTH 12288)")
            return False
        line, self.buffer = self.buffer[: lf + 1], self.buffer[lf + 1:]
        if self.discarding:  # the tail of an over-long line
            self.discarding = False
            return True
        if self.auth_step is not None:
            self._auth_response(line)
            return True
        if self.errors >= SOFT_ERRORS and not _is_quit(line):
            # A client that keeps erring waits a little longer each time;
            # one that leaves is let go at once: waiting would only hold its job.
            self.busy = True
            delay = min(self.errors - SOFT_ERRORS + 1, 10) * self.factory.error_delay
            self.factory.reactor.callLater(delay, self._delayed, line)
            return True
        self._command(line)
        return True

    def _delayed(self, line: bytes) -> None:
        self.busy = False
        if self.closing:
            return
        self.processing = True
        try:
            self._command(line)
        finally:
            self.processing = False
        if not self.busy:
            self.resume()

    # -- DATA input ----------------------------------------------------------

    def _data_chunk(self) -> bool:
        """Consume the complete message lines in the buffer; False when none is left."""
        buf = self.buffer
        data = self.data
        pos = 0
        progressed = False
        blocks = True  # until a block is refused in the body: then lines, for this buffer
        while self.data is not None and not self.busy:
            if blocks:
                taken = self._body_lines(buf, pos)
                if taken:
                    pos += taken
                    progressed = True
                    continue
                # Each try scans the rest of the buffer: one refusal in the
                # body means lines to its end, never a scan per line.
                blocks = self.data.in_header
            lf = buf.find(b"\n", pos)
            if lf < 0:
                break
            crlf = lf > pos and buf[lf - 1] == 13
            line = buf[pos: lf - 1 if crlf else lf]
            pos = lf + 1
            progressed = True
            # "." ends the message only between two CRLFs: <CRLF>.<CRLF>.
            may_end = crlf and self.after_crlf
            self.after_crlf = crlf
            if self.discarding:
                self.discarding = False
            elif crlf:
                self._text_line(line, may_end)
            else:
                self._bare_lf(line)
        rest = buf[pos:]
        if self.data is not None and len(rest) > MAX_TEXT:
            # Over-long: the rest of this line is text, never a terminator.
            self.data.fail(550, TEXT_LINE_TOO_LONG)
            self.discarding = True
            rest = rest[-1:] if rest.endswith(b"\r") else b""
            progressed = True
        self.buffer = rest
        if data is not None:
            data.received += len(buf) - len(rest)
        return progressed  # the loop asks again, and learns the rest is not a line yet

    def _body_lines(self, buf: bytes, pos: int) -> int:
        """Take the plain body lines at ``pos`` as one block; how many bytes were taken.

        The body of most messages is ordinary text: CRLF line ends, no bare
        CR or LF, short lines, a few dot-stuffed lines.  Such a run of lines
        is checked and unstuffed with a few scans of the whole run instead of
        line by line.  Anything unusual (the header, a bare CR or LF, a long
        line, an error already found) returns 0 and the line-by-line path,
        which gives the exact reply, takes over.  The terminator is never
        part of a block.
        """
        data = self.data
        if (data is None or data.in_header or data.error is not None or self.discarding
                or not self.after_crlf):
            return 0
        text = buf[pos:] if pos else buf
        end = (b"\r\n" + text).find(b"\r\n.\r\n")  # where "." CRLF starts in text
        if end < 0:
            end = text.rfind(b"\r\n") + 2  # complete lines only; 1 when there is none
        block = text[:end] if end > 1 else b""
        if not block:
            return 0
        crlfs = block.count(b"\r\n")
        if block.count(b"\n") != crlfs or block.count(b"\r") != crlfs:
            return 0  # a bare LF or CR: the exact reply comes from the line path
        lines = block.split(b"\r\n")
        if max(map(len, lines)) + 2 > MAX_TEXT:
            return 0
        unstuffed = (b"\r\n" + block).replace(b"\r\n.", b"\r\n")[2:]
        data.body_block(unstuffed)
        return len(block)

    def _bare_lf(self, line: bytes) -> None:
        # A bare LF never ends DATA, so "." here is plain text.
        if self.factory.alwbarelf:
            self._text_line(line, may_end=False)
        else:
            self.data.fail(550, "5.6.0 Message contains a bare LF; lines must end with "
                           "CRLF (ALWBARELF is *NO)")

    def _text_line(self, line: bytes, may_end: bool = True) -> None:
        data = self.data
        if line == b".":
            if may_end:
                self._end_of_data()
            else:
                data.line(line)  # a lone dot that is not a terminator stays text
            return
        if b"\r" in line:
            data.fail(550, "5.6.0 Message contains a bare CR")
            return
        if line.startswith(b"."):
            line = line[1:]  # the limit counts no dot doubled for transparency
        if len(line) + 2 > MAX_TEXT:
            data.fail(550, TEXT_LINE_TOO_LONG)
            return
        data.line(line)

    def _end_of_data(self) -> None:
        data, self.data = self.data, None
        txn, self.txn = self.txn, None
        data.finish()
        if data.error is not None:
            data.spool.abort()  # never raises: the client gets its reply
            if data.error[0] >= 500:
                self.factory.backend.rejected(self.peer_ip, "originator",
                                              str(txn.originator or ""), Verdict(*data.error))
            self.reply(*data.error)
            self._cut_if_pending()
            return
        self.busy = True
        received = Received(
            helo=self.helo or "", client_ip=self.peer_ip,
            originator=str(txn.originator) if txn.originator else "",
            recipients=tuple(txn.recipients), size=data.size,
            message_id=data.message_id, body_8bit=txn.body_8bit,
            ret=txn.ret, envid=txn.envid, dsn=tuple(txn.dsn),
        )
        if self.user is None and (received.ret or any(n or o for _, n, o in received.dsn)):
            # A success notice, or any notice with the whole message (RET=FULL),
            # goes to the sender the client names: from anyone, a way to send
            # anything to anyone.  Honoured for clients that may relay.
            d = defer.maybeDeferred(self.factory.backend.dsn_allowed, self.peer_ip)
            d.addCallback(lambda allowed: received if allowed else attrs.evolve(
                received, ret=None, envid=None, dsn=_only_never(received.dsn)))
            d.addCallback(lambda r: self.factory.backend.commit(data.spool, r))
        else:
            d = defer.maybeDeferred(self.factory.backend.commit, data.spool, received)
        # Distinct ones: one known address named ten times makes up for no guess.
        distinct = len({str(route).lower() for route, _ in txn.recipients})
        d.addCallbacks(self._queued, self._not_queued, callbackArgs=(distinct,),
                       errbackArgs=(data.spool,))
        d.addBoth(self.resume)

    def _queued(self, queue_id: str, recipients: int) -> None:
        self.reply(250, f"2.0.0 Ok: queued as {queue_id}")
        # A client that delivers mail starts afresh: an MTA that keeps its
        # connection open for many messages, each with a stale address or
        # two, is not cut off for their sum.  Unknown recipients count on,
        # less one for each distinct recipient the message had.
        self.unknown = max(0, self.unknown - recipients)
        self.errors, self.junk = self.unknown, 0

    def _not_queued(self, failure: Any, spool: Any) -> None:
        log_failure(self.log, "could not queue a message", failure)
        try:
            spool.abort()
        except Exception:
            pass
        self.reply(451, "4.3.0 Local error in processing: message not queued, try again")

    # -- commands ------------------------------------------------------------

    def _line_limit(self) -> int:
        if self.auth_step is not None:
            return MAX_AUTH_LINE
        return _limit_of(self.buffer)

    def _command(self, raw: bytes) -> None:
        limit = _limit_of(raw)
        if len(raw) > limit:
            if limit == MAX_AUTH_LINE:  # AUTH's initial response (RFC 4954 section 4)
                self._auth_too_long()
            else:
                self.reply(500, f"5.5.2 Line too long: this command's lines are limited to "
                           f"{limit} octets")
            return
        self.last_command_crlf = raw.endswith(b"\r\n")
        line = without_line_end(raw)
        if b"\r" in line or b"\x00" in line:
            self.reply(500, "5.5.2 Syntax error: control characters in command")
            return
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            verb = line.split(b" ", 1)[0]
            if verb.isalpha() and hasattr(self, "smtp_" + verb.decode().upper()):
                # A command we know, with an address in UTF-8: SMTPUTF8 is not offered.
                self.reply(501, "5.5.2 Syntax error: non-ASCII characters in the arguments "
                           "(SMTPUTF8 is not offered)")
            else:
                self.reply(500, "5.5.2 Syntax error: non-ASCII characters in command")
            return
        verb, _, arg = text.partition(" ")
        verb_b = verb.upper().encode()
        if verb_b in JUNK:
            self.junk += 1
            if self.junk > JUNK_LIMIT:
                self._count_error()
                if self.closing:
                    return
        handler = getattr(self, "smtp_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            if verb_b in UNIMPLEMENTED:
                self.reply(502, "5.5.1 Command not implemented")
            else:
                self.reply(500, "5.5.2 Command not recognized")
            return
        try:
            result = handler(arg.strip())
        except Exception:  # a full disk, no file descriptor left: the session goes on
            self.step_failed(Failure())
            return
        if isinstance(result, defer.Deferred):
            self.wait_for(result)

    def step_failed(self, failure: Any) -> None:
        log_failure(self.log, "command failed", failure)
        self.reply(451, "4.3.0 Local error in processing, try again")

    def _greeted(self) -> bool:
        if self.helo is None:
            self.reply(503, "5.5.1 Error: send HELO or EHLO first")
            return False
        return True

    def smtp_HELO(self, arg: str) -> None:
        if not _HELO_NAME.fullmatch(arg):
            self.reply(501, "5.5.4 Syntax: HELO hostname")
            return
        self.helo, self.esmtp, self.txn = arg, False, None
        self.reply(250, self.factory.backend.hostname)

    def smtp_EHLO(self, arg: str) -> Any:
        if not _HELO_NAME.fullmatch(arg):
            self.reply(501, "5.5.4 Syntax: EHLO hostname")
            return None
        self.helo, self.esmtp, self.txn = arg, True, None
        if not self.factory.dsn or self.factory.submission or self.dsn_heeded is not None:
            self.reply(250, self.factory.backend.hostname, self.extensions())
            return None
        # DSN is offered only where a request is carried out: a client that
        # sees none sends the "relayed" notice itself (RFC 3461 §4.1), where
        # one that saw it offered would have the request ignored.
        d = defer.maybeDeferred(self.factory.backend.dsn_allowed, self.peer_ip)

        def known(allowed: Any) -> None:
            self.dsn_heeded = bool(allowed)
            self.reply(250, self.factory.backend.hostname, self.extensions())

        def unknown(failure: Any) -> None:
            log_failure(self.log, "the relay check for DSN failed; DSN not offered", failure)
            known(False)

        return d.addCallbacks(known, unknown)

    def extensions(self) -> list[str]:
        ext = ["PIPELINING", f"SIZE {self.factory.maxmsgsize}"]
        if self.factory.mime8bit:
            ext.append("8BITMIME")
        ext += ["ENHANCEDSTATUSCODES", "HELP"]
        if self._starttls_offered():
            ext.append("STARTTLS")
        if self._auth_offered() and self.user is None:
            ext.append("AUTH " + " ".join(self.factory.mechanisms))
        if self.factory.etrnsvr:
            ext.append("ETRN")
        if self.factory.dsn and (self.factory.submission or self.user is not None
                                 or self.dsn_heeded):
            ext.append("DSN")
        return ext

    def smtp_ETRN(self, arg: str) -> Any:
        """RFC 1985: start delivery of the mail queued for a node (ETRNSVR, *ETRNSVR)."""
        if not self.factory.etrnsvr:
            self.reply(502, "5.5.1 Command not implemented (ETRNSVR is *NO)")
            return None
        if not self._greeted():
            return None
        if self.txn is not None:
            self.reply(503, "5.5.1 Error: ETRN not allowed during a mail transaction")
            return None
        # "@domain" asks for the domain and its subdomains, "domain" for that node only.
        node = arg.strip()
        if node.startswith("#") and len(node) > 1 and " " not in node:
            # RFC 1985 §5: a queue name is valid syntax; this server keeps none.
            self.reply(458, f"4.5.1 Unable to queue messages for node {node}: "
                       "queues are started by domain only")
            return None
        if not node.lstrip("@") or " " in node or node.startswith(("#", "@@")):
            self.reply(501, "5.5.4 Syntax: ETRN domain")
            return None
        d = defer.maybeDeferred(self.factory.backend.etrn, node, self.peer_ip)

        def answered(refused: str | None) -> None:
            if refused is None:
                self.reply(250, f"2.0.0 Queuing for node {node} started")
            elif refused == "held":
                self.reply(458, f"4.3.2 Unable to queue messages for node {node}: "
                           "outbound delivery is held")
            else:
                self.reply(459, f"4.7.1 Node {node} not allowed: this client is not in the "
                           "*ETRNSVR list")

        return d.addCallback(answered)

    def _starttls_offered(self) -> bool:
        return not self.tls and self.factory.tls_options is not None

    def _auth_offered(self) -> bool:
        f = self.factory
        if f.alwauth == "*NONE" and not f.submission:
            return False
        return bool(f.mechanisms) and (self.tls or f.alwplainauth)

    # -- STARTTLS (RFC 3207) and AUTH (RFC 4954) --------------------------

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self.reply(501, "5.5.4 Syntax: STARTTLS takes no arguments")
            return
        if self.tls:
            self.reply(503, "5.5.1 Error: TLS is already active")
            return
        from twistmail.tlsconfig import usable  # loaded by the jobs; not by the bridge

        if not usable(self.factory.tls_options):
            self.reply(454, "4.7.0 TLS not available")
            return
        self.reply(220, "2.0.0 Ready to start TLS")
        # Whatever the client pipelined after STARTTLS came in the clear:
        # discard it, and forget everything said before (RFC 3207 §4.2).
        self.buffer = b""
        self.helo, self.esmtp, self.txn, self.user = None, False, None, None
        self.tls = True
        self.transport.startTLS(self.factory.tls_options)

    def smtp_AUTH(self, arg: str) -> Any:
        if not self._greeted():
            return None
        if self.user is not None:
            self.reply(503, "5.5.1 Error: already authenticated")
            return None
        if self.txn is not None:
            self.reply(503, "5.5.1 Error: AUTH not allowed during a mail transaction")
            return None
        if not self._auth_offered():
            if self.factory.alwauth == "*NONE" and not self.factory.submission:
                self.reply(502, "5.5.1 Error: authentication is not enabled (ALWAUTH *NONE)")
            else:
                self.reply(538, "5.7.11 Encryption required for requested authentication "
                           "mechanism: use STARTTLS first")
            return None
        mech, _, initial = arg.strip().partition(" ")
        mech = mech.upper()
        if not mech:
            self.reply(501, "5.5.4 Syntax: AUTH mechanism [initial-response]")
            return None
        if mech not in self.factory.mechanisms:
            self.reply(504, f"5.5.4 Unrecognized authentication type; offered: "
                       f"{' '.join(self.factory.mechanisms)}")
            return None
        initial = initial.strip()
        # "=" is an initial response that is empty (RFC 4954 §4), not none.
        given, initial = bool(initial), "" if initial == "=" else initial
        if mech == "PLAIN":
            if given:
                return self._auth_plain(initial)
            self.auth_step = self._auth_plain
            self.reply(334, "")
            return None
        # LOGIN: username then password, each base64
        if given:
            return self._auth_login_user(initial)
        self.auth_step = self._auth_login_user
        self.reply(334, "VXNlcm5hbWU6")  # "Username:"
        return None

    def _auth_response(self, raw: bytes) -> None:
        step, self.auth_step = self.auth_step, None
        if len(raw) > MAX_AUTH_LINE:
            self._auth_too_long()
            return
        line = without_line_end(raw)
        if b"\r" in line:
            self.reply(501, "5.5.2 Cannot decode the AUTH response: control characters")
            return
        text = line.decode("ascii", "replace")
        if text == "*":
            self.reply(501, "5.0.0 Authentication cancelled")
            return
        result = step(text)
        if isinstance(result, defer.Deferred):
            self.wait_for(result)

    def _auth_too_long(self) -> None:
        self.reply(500, "5.5.6 Authentication Exchange line is too long (12288 octets at most)")

    def _auth_plain(self, text: str) -> Any:
        try:
            fields = _b64(text).split(b"\x00")
            authzid, user, password = fields
        except ValueError:
            self.reply(501, "5.5.2 Cannot decode the AUTH PLAIN response")
            return None
        return self._check(user, password, authzid)

    def _auth_login_user(self, text: str) -> None:
        try:
            user = _b64(text)
        except ValueError:
            self.reply(501, "5.5.2 Cannot decode the AUTH LOGIN response")
            return
        self.auth_step = lambda t: self._auth_login_password(user, t)
        self.reply(334, "UGFzc3dvcmQ6")  # "Password:"

    def _auth_login_password(self, user: bytes, text: str) -> Any:
        try:
            password = _b64(text)
        except ValueError:
            self.reply(501, "5.5.2 Cannot decode the AUTH LOGIN response")
            return None
        return self._check(user, password)

    def _check(self, user: bytes, password: bytes, authzid: bytes = b"") -> Any:
        d = defer.maybeDeferred(self.factory.backend.authenticate,
                                user.decode("utf-8", "replace"),
                                password.decode("utf-8", "replace"), self.peer_ip,
                                authzid.decode("utf-8", "replace"))

        def checked(usrprf: str | None) -> Any:
            if usrprf is not None:
                self.user = usrprf
                self.reply(235, "2.7.0 Authentication successful")
                return None
            self.auth_failures += 1
            self.factory.on_auth_failure(self.peer_ip)
            delay = self.factory.fail_delay * 2 ** (self.auth_failures - 1)
            answer: defer.Deferred = defer.Deferred()

            def later() -> None:
                self.reply(535, "5.7.8 Authentication credentials invalid")
                if self.auth_failures >= MAX_AUTH_FAILURES:
                    self.reply(421, f"4.7.0 {self.factory.backend.hostname} Too many failed "
                               "authentication attempts, closing connection")
                    self.close()
                answer.callback(None)

            self.factory.reactor.callLater(delay, later)
            return answer

        return d.addCallback(checked)

    def smtp_MAIL(self, arg: str) -> Any:
        if not self._greeted():
            return None
        if self.user is not None and self.txn is None:
            # Each transaction of a signed-on session asks whether its profile
            # still signs on: DLTUSRPRF or STATUS(*DISABLED) ends its relaying
            # at once, not when the client disconnects.
            d = defer.maybeDeferred(self.factory.backend.signs_on, self.user)
            return d.addCallback(self._still_signed_on, arg)
        return self._mail(arg)

    def _still_signed_on(self, signs_on: bool, arg: str) -> Any:
        if not signs_on:
            self.user = None
        return self._mail(arg)

    def _refused(self, what: str, address: Any, code: int, text: str,
                 argument: str | None = None) -> None:
        """A 5xx to MAIL or RCPT, journaled 9W as every refused originator and
        recipient is (README): a syntax error is what a sender's
        administrator asks about as often as an unknown user.  ``address``
        is made text here, on a refusal only: MAIL and RCPT are a hot path."""
        self.factory.backend.rejected(self.peer_ip, what, str(address or ""),
                                      Verdict(code, text), argument=argument)
        self.reply(code, text)

    def _mail(self, arg: str) -> Any:
        if self.user is None and (self.factory.submission or self.factory.alwauth == "*LCLRLY"):
            self.reply(530, "5.7.0 Authentication required")
            return None
        if self.txn is not None:
            self.reply(503, "5.5.1 Error: nested MAIL command")
            return None
        try:
            cmd = parse_command(arg, "FROM", allow_null=True)
        except PathError as e:
            self._refused("originator", None,
                          501, f"{'5.1.7' if isinstance(e, AddressError) else '5.5.4'} {e}",
                          argument=arg)
            return None
        size_hint: int | None = None
        body_8bit = False
        ret: str | None = None
        envid: str | None = None
        for key, value in cmd.params:
            if key == "SIZE" and not (value is not None and value.isascii() and value.isdigit()):
                self._refused("originator", cmd.address,
                              501, "5.5.4 Syntax: SIZE=<octets>")
                return None
            if key == "SIZE" and value is not None:
                size_hint = int(value)
                if size_hint > self.factory.maxmsgsize:
                    self._refused("originator", cmd.address,
                                  552, "5.3.4 Message size exceeds fixed maximum message size")
                    return None
            elif key == "BODY":
                if value is not None and value.upper() == "BINARYMIME":  # RFC 3030: not offered
                    self._refused("originator", cmd.address,
                                  555, "5.5.4 BODY=BINARYMIME is not offered")
                    return None
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._refused("originator", cmd.address,
                                  501, "5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME")
                    return None
                body_8bit = value.upper() == "8BITMIME"
                if body_8bit and not self.factory.mime8bit:
                    self._refused("originator", cmd.address,
                                  555, "5.5.4 BODY=8BITMIME is not offered (MIME8BIT is *NO)")
                    return None
            elif key == "RET" and self.factory.dsn:
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    self._refused("originator", cmd.address,
                                  501, "5.5.4 Syntax: RET=FULL or RET=HDRS")
                    return None
                ret = value.upper()
            elif key == "ENVID" and self.factory.dsn and value is not None:
                envid = _xtext_decode(value, MAX_ENVID)
                if envid is None:
                    self._refused("originator", cmd.address,
                                  501, f"5.5.4 Syntax: ENVID=xtext, at most {MAX_ENVID} "
                                       "printable ASCII characters")
                    return None
            elif key == "AUTH" and value is not None and self._auth_offered():
                pass  # RFC 4954 §5: who submitted it, by the client's word; not trusted here
            else:
                self._refused("originator", cmd.address,
                              555, f"5.5.4 Unsupported parameter {key[:100]}")
                return None
        if self.factory.backend.storage_full():
            self.reply(452, "4.3.1 Insufficient system storage, try again later")
            return None

        def accept(verdict: Verdict | None = None) -> None:
            if verdict is not None:
                self.reply(verdict.code, verdict.text)
                return
            self.txn = Transaction(cmd.address, size_hint, body_8bit, ret=ret, envid=envid)
            self.reply(250, f"2.1.0 Sender <{cmd.address or ''}> OK")

        if self.factory.vfyfromusr == "*NO" or cmd.address is None:
            accept()
            return None
        d = defer.maybeDeferred(self.factory.backend.check_sender, cmd.address, self.peer_ip,
                                self.user)
        return d.addCallback(accept)

    def smtp_RCPT(self, arg: str) -> Any:
        if not self._greeted():
            return None
        if self.txn is None:
            self.reply(503, "5.5.1 Error: need MAIL command")
            return None
        try:
            cmd: Command = parse_command(arg, "TO", allow_null=False)
        except PathError as e:
            self._refused("recipient", None,
                          501, f"{'5.1.3' if isinstance(e, AddressError) else '5.5.4'} {e}",
                          argument=arg)
            return None
        notify: tuple[str, ...] | None = None
        orcpt: str | None = None
        for key, value in cmd.params:
            if key == "NOTIFY" and self.factory.dsn:
                words = tuple(w.upper() for w in (value or "").split(","))
                if not set(words) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or (
                        "NEVER" in words and len(words) > 1):
                    self._refused("recipient", cmd.address,
                                  501, "5.5.4 NOTIFY takes NEVER, or SUCCESS, FAILURE, DELAY")
                    return None
                notify = words
            elif key == "ORCPT" and self.factory.dsn:
                orcpt = _orcpt(value)
                if orcpt is None:
                    self._refused("recipient", cmd.address,
                                  501, "5.5.4 Syntax: ORCPT=addr-type;xtext, at most "
                                       f"{MAX_ORCPT} printable ASCII characters")
                    return None
            else:
                self._refused("recipient", cmd.address,
                              555, f"5.5.4 Unsupported parameter {key[:100]}")
                return None
        if len(self.txn.recipients) >= self.factory.maxrcpt:
            self.reply(452, "4.5.3 Too many recipients")
            self.overshoot += 1
            if self.overshoot > RCPT_OVERSHOOT:
                self._count_error()
            return None
        address = cmd.address
        txn = self.txn
        # The address the client reached, for a recipient at an address literal.
        server_ip = client_address(getattr(self.transport.getHost(), "host", "")) \
            if address is not None and address.domain.startswith("[") else None
        d = defer.maybeDeferred(self.factory.backend.check_recipient, address, self.peer_ip,
                                self.user, server_ip)

        def decided(verdict: Verdict) -> None:
            if verdict.accepted and self.txn is txn:
                # The root's dot goes (RFC 5321 has no such domain: the next
                # hop may refuse it), and a remote address given twice is
                # sent once, as the local ones are delivered once.
                to = verdict.route or str(attrs.evolve(address, domain=address.domain[:-1])
                                          if address.domain.endswith(".") else address)
                key = None if verdict.local else _mailbox_key(to)
                if key not in txn.remote:
                    if key is not None:
                        txn.remote.add(key)
                    txn.recipients.append((to, verdict.local))
                    if notify is not None or orcpt is not None:
                        txn.dsn.append((to, notify, orcpt))
            self.reply(verdict.code, verdict.text)

        d.addCallback(decided)
        return d

    def smtp_DATA(self, arg: str) -> None:
        if not self._greeted():
            return
        if arg:
            self.reply(501, "5.5.4 Syntax: DATA takes no arguments")
            return
        if self.txn is None:
            self.reply(503, "5.5.1 Error: need MAIL command")
            return
        if not self.txn.recipients:
            self.reply(554, "5.5.1 Error: no valid recipients")
            return
        txn = self.txn
        spool = self.factory.backend.new_spool(
            str(txn.originator) if txn.originator else "", tuple(txn.recipients))
        try:
            spool.write(self._received_header(spool.id))
        except BaseException:
            spool.abort()
            raise
        self.data = _Data(self, spool)
        self.after_crlf = self.last_command_crlf
        self.reply(354, "End data with <CR><LF>.<CR><LF>")

    def _received_header(self, queue_id: str) -> bytes:
        txn = self.txn
        # RFC 3848: ESMTPS over TLS, ESMTPA authenticated, ESMTPSA both.
        proto = ("ESMTP" + ("S" if self.tls else "") + ("A" if self.user else "")
                 if self.esmtp else "SMTP")
        rcpt = f"\r\n\tfor <{txn.recipients[0][0]}>" if len(txn.recipients) == 1 else ""
        date = date_now()
        host = self.factory.backend.hostname
        literal = f"IPv6:{self.peer_ip}" if ":" in self.peer_ip else self.peer_ip
        return (
            f"Received: from {self.helo} ([{literal}])\r\n"
            f"\tby {host} (twistmail) with {proto} id {queue_id}{rcpt};\r\n"
            f"\t{date}\r\n"
        ).encode("utf-8", "replace")

    def smtp_RSET(self, arg: str) -> None:
        if arg:
            self.reply(501, "5.5.4 Syntax: RSET takes no arguments")
            return
        self.txn = None
        self.reply(250, "2.0.0 Ok")

    def smtp_NOOP(self, arg: str) -> None:
        self.reply(250, "2.0.0 Ok")

    def smtp_QUIT(self, arg: str) -> None:
        self.reply(221, f"2.0.0 {self.factory.backend.hostname} closing connection")
        # The job is free before the client sees the connection end: the
        # client may connect again at once, and its new connection should
        # find this job free rather than wait (or make the pool grow).
        self.session_over()
        self.close()

    def smtp_HELP(self, arg: str) -> None:
        """The commands this session takes now, those of its extensions too."""
        extra = [word for word, offered in (
            ("STARTTLS", self._starttls_offered()),
            ("AUTH", self._auth_offered() and self.user is None),
            ("ETRN", self.factory.etrnsvr)) if offered]
        self.reply(214, "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY"
                   + "".join(f" {word}" for word in extra))

    def smtp_VRFY(self, arg: str) -> None:
        if not arg:
            self.reply(501, "5.5.4 Syntax: VRFY address")
            return
        # Confirming addresses would hand out the user list (RFC 5321 §3.5.3).
        self.reply(252, "2.0.0 Cannot VRFY user, but will accept message and attempt delivery")


class SMTPFactory(Factory):
    """Builds sessions with the job's settings and backend."""

    def __init__(
        self,
        backend: Backend,
        reactor: Any,
        maxmsgsize: int,
        maxrcpt: int,
        inacttimo: int,
        alwbarelf: bool,
        mime8bit: bool,
        on_done: Callable[[], None],
        listener: str = "smtp",
        tls_options: Any = None,
        implicit_tls: bool = False,
        alwauth: str = "*RELAY",
        authmech: tuple[str, ...] = ("*PLAIN", "*LOGIN"),
        alwplainauth: bool = False,
        fail_delay: float = 1.0,
        maxerrors: int = 10,
        error_delay: float = 1.0,
        on_auth_failure: Callable[[str], None] | None = None,
        vfyfromusr: str = "*NO",
        etrnsvr: bool = False,
        dsn: bool = False,
    ) -> None:
        self.backend = backend
        self.reactor = reactor
        self.maxmsgsize = maxmsgsize
        self.maxrcpt = maxrcpt
        self.inacttimo = inacttimo
        self.alwbarelf = alwbarelf
        self.mime8bit = mime8bit
        self.on_done = on_done
        self.listener = listener
        self.tls_options = tls_options
        self.implicit_tls = implicit_tls
        self.alwauth = alwauth
        self.mechanisms = tuple(m.lstrip("*").upper() for m in authmech)
        self.alwplainauth = alwplainauth
        self.fail_delay = fail_delay
        self.maxerrors = maxerrors
        self.error_delay = error_delay
        self.on_auth_failure = on_auth_failure or (lambda ip: None)
        self.vfyfromusr = vfyfromusr
        self.etrnsvr = etrnsvr
        self.dsn = dsn  # NFYDLVRY names a responsible person: DSN is offered

    @property
    def submission(self) -> bool:
        """Message submission (RFC 6409): 587, and 465 with implicit TLS (RFC 8314 §3.3)."""
        return self.listener in ("submission", "smtps")

    def buildProtocol(self, addr: object) -> SMTPSession:
        p = SMTPSession(self, self.on_done)
        p.factory = self
        self.current = p  # a job serves one session at a time
        return p


def _limit_of(line: bytes) -> int:
    """The longest a command line may be, by its verb (MAIL, RCPT, AUTH take more)."""
    verb = line[:5].upper()
    if verb == b"AUTH ":
        return MAX_AUTH_LINE
    return MAX_LINE_OF.get(verb, MAX_COMMAND)
