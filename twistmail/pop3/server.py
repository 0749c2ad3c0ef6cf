"""The POP3 server session of a QTPOPSRVP job (RFC 1939, 2449, 2595).

Twisted's POP3 class is not used: it has no STLS, and its RETR and TOP break
dot-stuffing at chunk boundaries, which lets message content inject POP
responses.  Here:

* commands run one at a time from a bounded buffer, so pipelined replies stay
  in order while a login is checked in a worker thread;
* STLS discards whatever the client sent after the command before the
  handshake starts (no CVE-2011-0411-class injection), and resets the
  session to a fresh AUTHORIZATION state;
* messages stream from the Maildir snapshot through :class:`DotStuffer`,
  which tracks the start of line across every read, so no byte position can
  produce a line that is a lone dot;
* a failed login is answered after a growing delay, and the session ends
  after three;
* with MSGSPLIT a message larger than the split size is offered as RFC 2046
  message/partial pieces, in order, each its own POP message.

Settings honoured: ``[pop] inacttimo msgsplit alwssl alwplainauth``.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import os
import re
from collections.abc import Iterable
from typing import Any, BinaryIO

import attrs
from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, interfaces
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from twistmail.auth import IMailboxAccess
from twistmail.maildir import MailboxGone, MailboxInUse, MaildirError, MessageVanished
from twistmail.protocols.peer import client_address
from twistmail.protocols.sequential import SequentialSession, without_line_end
from twistmail.protocols.writenow import write_now
from twistmail.queue import is_queue_id
from twistmail.storagefault import log_failure

MAX_LINE = 255  # RFC 2449: commands up to 255 octets with CRLF
#: What no command line holds (a tab may be in a password): CR, NUL, DEL, ...
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
MAX_PENDING = 16 * 1024
CHUNK = 64 * 1024
MAX_FAILURES = 3
CAPS = ["USER", "TOP", "UIDL", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"]


@attrs.frozen
class Item:
    """One POP message: a whole Maildir message, or one piece of a split one."""

    number: int
    index: int  # the mailbox snapshot's index
    size: int
    uidl: str
    start: int = 0  # byte range of the file this item carries
    end: int | None = None
    part: int = 0  # 1..total for message/partial pieces
    total: int = 0
    header: bytes = b""  # the piece's own header block (message/partial)
    cut: str = ""  # which cut the piece is of (MSGSPLIT's piece size)


class DotStuffer:
    """Stuffs dots and normalises line ends across arbitrary chunk boundaries."""

    def __init__(self) -> None:
        self.at_line_start = True
        self.pending_cr = False

    def feed(self, data: bytes) -> bytes:
        if self.pending_cr:
            data = b"\r" + data
            self.pending_cr = False
        if data.endswith(b"\r"):
            self.pending_cr = True
            data = data[:-1]
        if not data:
            return b""
        # Bare LFs (files from other Maildir writers) become CRLF.  Counting
        # first spares the two copies for the usual message, which has none.
        if data.count(b"\n") != data.count(b"\r\n"):
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self.at_line_start and data.startswith(b"."):
            data = b"." + data
        if b"\n." in data:
            data = data.replace(b"\n.", b"\n..")
        self.at_line_start = data.endswith(b"\n")
        return data

    def end(self) -> bytes:
        """The terminator, after a final CRLF if the message lacked one."""
        out = b""
        if self.pending_cr:
            self.pending_cr = False
            out += b"\r\n"
            self.at_line_start = True
        if not self.at_line_start:
            out += b"\r\n"
        return out + b".\r\n"


@implementer(interfaces.IPullProducer)
class _Sender:
    """Streams one file range through a DotStuffer with the transport's pace."""

    def __init__(self, session: POP3Session, f: BinaryIO, prefix: bytes, limit: int | None,
                 lines: int | None) -> None:
        self.session = session
        self.f = f
        self.stuffer = DotStuffer()
        self.left = limit
        self.prefix = prefix
        self.lines = lines  # TOP: body lines still to send (None: everything)
        self.in_body = bool(prefix)  # a piece's own header block comes first

    def start(self) -> None:
        self.session.sender = self
        self.session.lend_output()
        self.session.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        self.session.reset_timeout()  # the client is reading: it is not idle
        out = b""
        if self.prefix:
            out = self.stuffer.feed(self.prefix)
            self.prefix = b""
        chunk = self._read()
        if chunk:
            out += self.stuffer.feed(chunk)
        if not chunk or self.at_end:
            # The end goes with the last data: one write, one segment, and no
            # extra turn of the reactor for a message that fits in a chunk.
            self._finish(out)
        elif out:
            self.session.transport.write(out)

    at_end = False  # the last read reached the end of the range
    line_start = True  # the last read ended a line (TOP)

    def _read(self) -> bytes:
        if self.lines is not None:
            return self._read_top()
        n = CHUNK if self.left is None else min(CHUNK, self.left)
        if n <= 0:
            return b""
        data = self.f.read(n)
        if self.left is not None:
            self.left -= len(data)
        # A regular file returns less than asked only at its end.
        self.at_end = len(data) < n or self.left == 0
        return data

    def _read_top(self) -> bytes:
        out = []
        for _ in range(256):
            if self.in_body and self.lines <= 0:
                break
            size = CHUNK if self.left is None else min(CHUNK, self.left)
            line = self.f.readline(size) if size > 0 else b""
            if not line:
                break
            if self.left is not None:
                self.left -= len(line)
            out.append(line)
            if not self.in_body:
                # A header line longer than a read comes in pieces: only a
                # whole line can be the blank one.
                if self.line_start and line in (b"\r\n", b"\n"):
                    self.in_body = True
            elif line.endswith(b"\n"):
                self.lines -= 1
            self.line_start = line.endswith(b"\n")
        return b"".join(out)

    def _finish(self, out: bytes = b"") -> None:
        self.session.transport.write(out + self.stuffer.end())
        self.session.transport.unregisterProducer()
        self.f.close()
        self.session.sender = None
        self.session.watch_output()
        self.session.sent()

    def stopProducing(self) -> None:
        self.f.close()
        self.session.sender = None


class POP3Session(SequentialSession):
    log = Logger()
    max_pending = MAX_PENDING

    def __init__(self, factory: POP3Factory, implicit_tls: bool) -> None:
        super().__init__(factory.reactor, factory.inacttimo)
        self.factory = factory
        self.tls = implicit_tls
        self.discarding = False
        self.state = "AUTHORIZATION"
        self.user: str | None = None
        self.usrprf: str | None = None
        self.box: Any = None
        self.logout: Any = None
        self.items: list[Item] = []
        self.deleted: set[int] = set()
        self.failures = 0
        self.peer_ip = "unknown"
        self.sender: _Sender | None = None  # the reply being streamed
        self.logon_limit: Any = None

    # -- connection -------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer_ip = client_address(getattr(self.transport.getPeer(), "host", "unknown"))
        if self.tls and self.factory.alwssl == "*NO":
            self.err("[SYS/PERM] TLS is disabled on this server (ALWSSL *NO); use the plain POP3 "
                     "port")
            self.close()
            return
        self.watch_output()
        self.reset_timeout()
        # Commands reset the idle timer, but a client must sign on within one
        # INACTTIMO of its greeting: USER or CAPA now and then must not hold
        # a job for ever.
        self.logon_limit = self.reactor.callLater(self.inacttimo, self._logon_overdue)
        self.ok(f"{self.factory.hostname} twistmail POP3 server ready")

    def _logon_overdue(self) -> None:
        self.logon_limit = None
        if self.state != "AUTHORIZATION" or self.closing:
            return
        if self.busy:  # a PASS that came in time is being checked: its answer goes first
            self.logon_limit = self.reactor.callLater(1.0, self._logon_overdue)
            return
        self.timed_out()

    def _stop_logon_limit(self) -> None:
        if self.logon_limit is not None and self.logon_limit.active():
            self.logon_limit.cancel()
        self.logon_limit = None

    def connectionLost(self, reason: object = None) -> None:
        self.closing = True
        self.cancel_timeout()
        self._stop_logon_limit()
        self._release(commit=False)
        self.factory.on_done()
        self.connection_gone(reason)

    def _release(self, commit: bool) -> None:
        box, self.box = self.box, None
        if box is None:
            return
        if commit:
            return  # committed by QUIT already
        try:
            box.close()  # a session that ends without QUIT deletes nothing
        except Exception:
            self.log.failure("closing a mailbox failed")

    def timed_out(self) -> None:
        if self.sender is not None:
            # The client stopped reading a reply: an -ERR now would land in
            # the middle of the message, and the client could take the rest
            # for the message.  The connection is cut instead.
            self.closing = True
            self.transport.abortConnection()
            return
        # RFC 1939 §3: an autologout closes without a response: a client
        # that has just sent a command would take the text for its reply.
        self.close()

    def shutdown_notice(self) -> defer.Deferred | None:
        if self.closing or self.transport is None:
            return None
        if self.state == "UPDATE":
            # QUIT is deciding the deletions: they go through whatever this
            # says, so the client is owed its +OK (RFC 1939 §6: -ERR only
            # when nothing was removed).  The shutdown waits for it.
            return self.wait_gone()
        if self.sender is not None:
            return None  # a reply streaming: an -ERR would land inside the message
        gone = self.wait_gone()  # its -ERR flushed (over TLS too) before the reactor ends
        self.err("[SYS/TEMP] Server shutting down, try again later")
        self.close()
        return gone

    def signed_on(self) -> bool:
        return self.box is not None

    def cut_off(self) -> None:
        """MAXAUTHFAIL reached from this address: sessions not signed on end
        (one at QUIT is signed on, its mailbox with QUIT's work)."""
        if self.closing or self.signed_on() or self.state == "UPDATE" or self.sender is not None:
            return
        self.err("[SYS/TEMP] Too many failed sign-ons from your address")
        self.close()

    def ok(self, text: str = "") -> None:
        self._line("+OK" + (" " + text if text else ""))

    def err(self, text: str) -> None:
        self._line("-ERR " + text)

    def _listing(self, text: str, lines: Iterable[bytes]) -> None:
        """A multi-line reply, status line to terminator in one write."""
        if self.transport is not None and not self.closing:
            write_now(self.transport, f"+OK {text}\r\n".encode() + b"".join(lines) + b".\r\n")

    def _line(self, text: str) -> None:
        if self.transport is not None and not self.closing:
            write_now(self.transport, text.encode("utf-8", "replace") + b"\r\n")

    # -- input --------------------------------------------------------------

    def step(self) -> bool:
        lf = self.buffer.find(b"\n")
        if lf < 0:
            if len(self.buffer) > MAX_LINE:
                self.buffer = b""
                if not self.discarding:
                    self.discarding = True
                    self.err("Line too long: commands are limited to 255 octets")
            return False
        line, self.buffer = self.buffer[:lf + 1], self.buffer[lf + 1:]
        if self.discarding:
            self.discarding = False
            return True
        self._command(line)
        return True

    def sent(self) -> None:
        """A streamed reply has gone out."""
        self.resume()

    def _command(self, raw: bytes) -> None:
        if len(raw) > MAX_LINE:
            self.err("Line too long: commands are limited to 255 octets")
            return
        line = without_line_end(raw)
        if _CONTROL.search(line):
            self.err("Syntax error: control characters in command")
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.err("Syntax error: not UTF-8")
            return
        verb, _, arg = text.partition(" ")
        handler = getattr(self, f"pop_{verb.upper()}", None) if _word(verb) else None
        if handler is None:
            self.err("Command not recognized")
            return
        allowed = getattr(handler, "states", ("AUTHORIZATION", "TRANSACTION"))
        if self.state not in allowed:
            self.err(f"{verb.upper()} is not allowed in the {self.state} state")
            return
        result = handler(arg)
        if isinstance(result, defer.Deferred):
            self.wait_for(result)

    def step_failed(self, failure: Any) -> None:
        log_failure(self.log, "POP3 command failed", failure)
        self.err("[SYS/TEMP] Internal error, try again later")

    # -- AUTHORIZATION ------------------------------------------------------

    def pop_CAPA(self, arg: str) -> None:
        caps = list(CAPS)
        if not self._plaintext_allowed():
            caps.remove("USER")  # refused until TLS is up (RFC 2449 §6.4)
        if self._stls_offered():
            caps.append("STLS")
        caps.append("IMPLEMENTATION twistmail")
        self.ok("Capability list follows")
        for c in caps:
            self._line(c)
        self._line(".")

    pop_CAPA.states = ("AUTHORIZATION", "TRANSACTION")  # type: ignore[attr-defined]

    def _stls_offered(self) -> bool:
        return (not self.tls and self.factory.tls_options is not None
                and self.factory.alwssl != "*NO" and self.state == "AUTHORIZATION")

    def pop_STLS(self, arg: str) -> None:
        if arg:  # RFC 2595 §4: no arguments
            self.err("STLS takes no arguments")
            return
        if not self._stls_offered():
            self.err("STLS is not available now")
            return
        from twistmail.tlsconfig import usable  # loaded by the jobs; not by the bridge

        if not usable(self.factory.tls_options):
            self.err("[SYS/TEMP] TLS is not available")
            return
        self.ok("Begin TLS negotiation")
        # Anything the client sent after STLS was sent in the clear: drop it.
        self.buffer = b""
        self.user = None
        self.tls = True
        self.transport.startTLS(self.factory.tls_options)

    pop_STLS.states = ("AUTHORIZATION",)  # type: ignore[attr-defined]

    def _plaintext_allowed(self) -> bool:
        """Whether USER/PASS may go now: over TLS, from this host, or as configured.

        A password in clear text crosses the network only where the
        administrator says so (ALWPLAINAUTH *YES) or where there is no TLS
        to use instead (ALWSSL *NO, or no certificate); from loopback it
        never leaves the machine.  ALWSSL *ONLY wants TLS even there.
        """
        f = self.factory
        if self.tls:
            return True
        if f.alwssl == "*ONLY":
            return False
        if f.alwssl == "*NO" or f.tls_options is None:
            return True
        return f.alwplainauth or _is_loopback(self.peer_ip)

    def _plaintext_refused(self) -> bool:
        if not self._plaintext_allowed():
            self.err("[AUTH] Plaintext login is not allowed here: use STLS first, or the POP3S "
                     "port")
            return True
        return False

    def pop_USER(self, arg: str) -> None:
        if self._plaintext_refused():
            return
        name = arg.strip(" ")
        if not name or " " in name:
            self.err("Syntax: USER name")
            return
        self.user = name
        self.ok("Send your password")

    pop_USER.states = ("AUTHORIZATION",)  # type: ignore[attr-defined]

    def pop_PASS(self, arg: str) -> Any:
        if self._plaintext_refused():
            return None
        if self.user is None:
            self.err("USER first")
            return None
        user, self.user = self.user, None
        creds = credentials.UsernamePassword(user.encode("utf-8"), arg.encode("utf-8"))
        d = self.factory.portal.login(creds, None, IMailboxAccess)
        d.addCallbacks(self._logged_in, self._login_failed, errbackArgs=(user,))
        return d

    pop_PASS.states = ("AUTHORIZATION",)  # type: ignore[attr-defined]

    def _logged_in(self, result: tuple[Any, Any, Any]) -> Any:
        _iface, box, logout = result
        if self.closing:
            box.close()
            return None
        self.box, self.logout = box, logout
        self.usrprf = box.maildir.parent.name
        if self.factory.msgsplit is None:
            return self._ready(self._items(box))
        # Cutting large messages into pieces (MSGSPLIT) reads them: in a thread.
        d = self.factory.in_thread(self._items, box)
        return d.addCallbacks(self._ready, self._not_ready)

    def _not_ready(self, failure: Any) -> Any:
        self._release(commit=False)  # the client may try again: the lock must not stay
        return failure

    def _ready(self, items: list[Item]) -> Any:
        if self.closing:
            return None  # the connection is gone, and the mailbox with it
        self.items = items
        self.state = "TRANSACTION"
        self._stop_logon_limit()
        count, octets = self._stat()
        j = self.factory.journal
        j.write("QL", f"QL LOGIN {self.usrprf} {self.peer_ip}", ip=self.peer_ip, usrprf=self.usrprf,
                messages=count, octets=octets, tls=self.tls)
        self.ok(f"{self.usrprf} has {_messages(count)} ({octets} octets)")
        return self.factory.record_login(self.peer_ip, self.usrprf)

    def _login_failed(self, failure: Any, user: str) -> Any:
        if failure.check(MailboxInUse):
            self.factory.journal.write("QU", f"QU INUSE {self.peer_ip}", ip=self.peer_ip,
                                       user=user)
            self.err("[IN-USE] Mailbox is in use by another POP session")
            return None
        if failure.check(MailboxGone):
            # Its profile was deleted after the password was checked.
            self.err("[SYS/TEMP] Mailbox not available, try again later")
            return None
        if failure.check(OSError):
            # A mailbox the daemon's user may not enter (a chown mistake), a
            # full disk: the administrator's to mend, named in one line.
            e = failure.value
            self.log.error("the mailbox of {user} cannot be opened: {why}{where}",
                           user=user, why=e.strerror or e,
                           where=f": {e.filename}" if e.filename else "")
            self.err("[SYS/TEMP] Mailbox not available, try again later")
            return None
        if not failure.check(UnauthorizedLogin):
            return failure
        self.failures += 1
        self.factory.on_auth_failure(self.peer_ip)
        self.factory.journal.write("QF", f"QF FAIL {self.peer_ip}", ip=self.peer_ip,
                                   user=user, failures=self.failures)
        delay = self.factory.fail_delay * 2 ** (self.failures - 1)
        d: defer.Deferred = defer.Deferred()

        def answer() -> None:
            self.err("[AUTH] Invalid user name or password")
            if self.failures >= MAX_FAILURES:
                self.close()
            d.callback(None)

        self.factory.reactor.callLater(delay, answer)
        return d

    # -- TRANSACTION --------------------------------------------------------

    def _items(self, box: Any) -> list[Item]:
        items: list[Item] = []
        limit = self.factory.msgsplit
        for m in box.messages():
            if limit is None or m.size <= limit:
                items.append(Item(len(items) + 1, m.index, m.size, m.uidl))
                continue
            items.extend(self._pieces(box, m, limit, len(items)))
        return items

    def _pieces(self, box: Any, m: Any, limit: int, before: int) -> list[Item]:
        """RFC 2046 §5.2.2 pieces of one message, cut at line ends (read a piece at a time)."""
        with box.read(m.index) as f:
            headers = _header_fields(f.read(MAX_HEADER_BYTES))
            # Room for a piece's own header: 1024 octets, or what a long one
            # (a Subject folded over many lines) takes, so no piece is larger
            # than MSGSPLIT.  The size names the cut (see below).
            longest = len(_partial_header(headers, f"{m.uidl}.999999@{self.factory.hostname}",
                                          99999, 99999, self.factory.hostname, 0.0))
            size = limit - (1024 if longest <= 1000 else longest + 24)
            # A header that leaves no room for a piece of 1024: offered whole,
            # as a message that cannot be cut is (each piece would carry it).
            cuts = _cut(f, size) if size >= 1024 else [(0, 0, -1)]
            # A piece's Date, where the message has none: the same at every fetch.
            arrived = os.fstat(f.fileno()).st_mtime
        if cuts and cuts[-1][2] < 0:
            # RFC 2046 §5.2.2: a message/partial piece is 7bit, always, and
            # the pieces joined are the message: an 8-bit message, or one
            # with a line longer than a piece, cannot be cut, so it is
            # offered whole.
            return [Item(before + 1, m.index, m.size, m.uidl)]
        total = len(cuts)
        # Another MSGSPLIT cuts elsewhere, often into as many pieces: the size
        # is in every name of a piece (its UIDL, the partial id, the record of
        # deleted ones), so a piece of one cut is never taken for another's.
        cut = f"{size}"
        pid = f"{m.uidl}.{cut}@{self.factory.hostname}"
        taken = box.pieces_deleted(m.index, cut)  # by earlier sessions: not offered again
        if len(taken) >= total:  # a message never goes unseen: its last piece takes it
            taken = frozenset()
        out = []
        for n, (start, end, octets) in enumerate(cuts, 1):
            if n in taken:
                continue
            head = _partial_header(headers, pid, n, total, self.factory.hostname, arrived)
            uidl = _piece_uidl(m.uidl, n, total, cut)
            out.append(Item(before + len(out) + 1, m.index, len(head) + octets, uidl,
                            start, end, n, total, head, cut))
        return out

    def _item(self, arg: str) -> Item | None:
        arg = arg.strip(" ")
        if not _number(arg):
            self.err("Syntax: a message number is required")
            return None
        n = int(arg)
        if not 1 <= n <= len(self.items) or n in self.deleted:
            self.err(f"No such message: {n}")
            return None
        return self.items[n - 1]

    def _live(self) -> list[Item]:
        return [i for i in self.items if i.number not in self.deleted]

    def _stat(self) -> tuple[int, int]:
        live = self._live()
        return len(live), sum(i.size for i in live)

    def pop_STAT(self, arg: str) -> None:
        count, octets = self._stat()
        self.ok(f"{count} {octets}")

    pop_STAT.states = ("TRANSACTION",)  # type: ignore[attr-defined]

    def pop_LIST(self, arg: str) -> None:
        if arg.strip(" "):
            item = self._item(arg)
            if item is not None:
                self.ok(f"{item.number} {item.size}")
            return
        count, octets = self._stat()
        self._listing(f"{_messages(count)} ({octets} octets)",
                      (b"%d %d\r\n" % (i.number, i.size) for i in self._live()))

    pop_LIST.states = ("TRANSACTION",)  # type: ignore[attr-defined]

    def pop_UIDL(self, arg: str) -> None:
        if arg.strip(" "):
            item = self._item(arg)
            if item is not None:
                self.ok(f"{item.number} {item.uidl}")
            return
        self._listing("Unique-ID listing follows",
                      (f"{i.number} {i.uidl}\r\n".encode() for i in self._live()))

    pop_UIDL.states = ("TRANSACTION",)  # type: ignore[attr-defined]

    def pop_RETR(self, arg: str) -> Any:
        item = self._item(arg)
        if item is None:
            return None
        return self._send(item, f"{item.size} octets", lines=None, journal=True)

    pop_RETR.states = ("TRANSACTION",)  # type: ignore[attr-defined]

    def pop_TOP(self, arg: str) -> Any:
        parts = [p for p in arg.split(" ") if p]
        if len(parts) != 2 or not _number(parts[1]):
            self.err("Syntax: TOP message lines")
            return None
        item = self._item(parts[0])
        if item is None:
            return None
        return self._send(item, "Top of message follows", lines=int(parts[1]), journal=False)

    pop_TOP.states = ("TRANSACTION",)  # type: ignore[attr-defined]

    def _send(self, item: Item, text: str, lines: int | None, journal: bool) -> Any:
        try:
            # Most replies fit in one chunk: status line and message then
            # go out in one write, one segment, with no reactor turn between.
            small = None if lines is not None or item.size > CHUNK else self.box.read_small(
                item.index, item.start, item.end, CHUNK)
            f = self.box.read(item.index) if small is None else None
        except MaildirError as e:
            # Removed by another Maildir reader: gone for good, and a client
            # told SYS/TEMP would try again (RFC 3206 §4).  A disk error may pass.
            code = "SYS/PERM" if isinstance(e, MessageVanished) else "SYS/TEMP"
            self.err(f"[{code}] Message {item.number} is no longer available: {e}")
            return None
        if small is not None:
            stuffer = DotStuffer()
            write_now(self.transport, b"+OK %s\r\n%s%s%s" % (
                text.encode(), stuffer.feed(item.header), stuffer.feed(small), stuffer.end()))
        elif f is not None:
            if item.start:
                f.seek(item.start)
            limit = None if item.end is None else item.end - item.start
            self.ok(text)
            self.busy = True  # until the sender is done (it may finish at once)
            _Sender(self, f, item.header, limit, lines).start()
        if journal:
            # After the reply: the client's next command is on its way meanwhile.
            self.factory.journal.write("QR", f"QR RETR {self.usrprf} {item.uidl}",
                                       _queue_id_of(self.box.message(item.index).path.name),
                                       usrprf=self.usrprf,
                                       uidl=item.uidl, size=item.size, ip=self.peer_ip)
        return None

    def pop_DELE(self, arg: str) -> None:
        item = self._item(arg)
        if item is not None:
            self.deleted.add(item.number)
            self.ok(f"Message {item.number} marked for deletion")

    pop_DELE.states = ("TRANSACTION",)  # type: ignore[attr-defined]

    def pop_RSET(self, arg: str) -> None:
        self.deleted.clear()
        count, octets = self._stat()
        self.ok(f"{_messages(count)} ({octets} octets)")

    pop_RSET.states = ("TRANSACTION",)  # type: ignore[attr-defined]

    def pop_NOOP(self, arg: str) -> None:
        self.ok()

    pop_NOOP.states = ("TRANSACTION",)  # type: ignore[attr-defined]

    def pop_QUIT(self, arg: str) -> Any:
        if self.state != "TRANSACTION":
            self.ok(f"{self.factory.hostname} signing off")
            self.close()
            return None
        self.state = "UPDATE"
        # QUIT owns the mailbox now: a connection lost meanwhile must not
        # close it (and free its lock) under decide() and expunge().
        box, self.box = self.box, None
        gone, pieces = self._files_to_delete()
        deleted = len(self.deleted)  # as the client counts: a piece is a message
        for index in gone:
            box.mark_deleted(index)
        # The reply waits only for the durable list of what goes (decide);
        # the unlinking (expunge) follows with the connection already closed.
        d = self.factory.in_thread(box.decide, pieces)

        def decided(_: Any) -> None:
            self.factory.journal.write("QD", f"QD DEL {self.usrprf} {len(gone)}",
                                       usrprf=self.usrprf, deleted=len(gone), ip=self.peer_ip)
            self.ok(f"{self.factory.hostname} signing off ({_messages(deleted)} deleted)")
            self.close()
            self.factory.in_thread(box.expunge).addErrback(
                lambda f: log_failure(
                    self.log, "removing the messages deleted at QUIT failed; the next session "
                    "retries", f)
            )

        def failed(failure: Any) -> None:
            try:
                box.close()  # nothing was decided: nothing goes
            except Exception:
                self.log.failure("closing a mailbox failed")
            log_failure(self.log, "QUIT could not remove messages", failure)
            self.err("[SYS/TEMP] Some deleted messages were not removed")
            self.close()

        return d.addCallbacks(decided, failed)

    pop_QUIT.states = ("AUTHORIZATION", "TRANSACTION")  # type: ignore[attr-defined]

    def _files_to_delete(self) -> tuple[list[int], dict[int, tuple[str, set[int]]]]:
        """Snapshot indexes whose every item offered is marked deleted, and, for
        messages of which only some pieces are, the cut and those pieces.

        Each piece is a message to the client: one it deleted is not offered
        again, even while the others stay (fetchmail's FETCHLIMIT takes a few
        at a time)."""
        wanted: dict[int, bool] = {}
        pieces: dict[int, tuple[str, set[int]]] = {}
        for i in self.items:
            marked = i.number in self.deleted
            wanted[i.index] = wanted.get(i.index, True) and marked
            if marked and i.part:
                pieces.setdefault(i.index, (i.cut, set()))[1].add(i.part)
        gone = [index for index, all_marked in wanted.items() if all_marked]
        return gone, {index: cut for index, cut in pieces.items() if index not in gone}


def _word(text: str) -> bool:
    """A command name: ASCII letters only (``str.isalpha`` takes any script's)."""
    return text.isascii() and text.isalpha()


def _number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` takes superscripts, which ``int`` refuses."""
    return text.isascii() and text.isdigit()


MAX_HEADER_BYTES = 64 * 1024  # what MSGSPLIT reads of a message for its pieces' headers


def _header_fields(data: bytes) -> dict[bytes, bytes]:
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    out: dict[bytes, bytes] = {}
    last: bytes | None = None  # the field a continuation line belongs to, if it is kept
    for line in head.splitlines():
        if line[:1] in (b" ", b"\t"):
            if last is not None:  # folded (RFC 5322 2.2.3): it stays so, each line short
                out[last] += b"\r\n " + line.strip()
            continue
        name, colon, value = line.partition(b":")
        key = name.strip().lower()
        last = key if colon and name and key not in out else None
        if last is not None:
            out[key] = value.strip()
    return out


def _cut(f: BinaryIO, size: int) -> list[tuple[int, int, int]]:
    """Byte ranges of at most ``size``, each ending with a line (the last: where the
    file ends), with the octets each is sent as (a bare LF goes out as CRLF, as in
    wire_size).

    The reading stops at the first 8-bit octet, or at a line longer than
    ``size`` (cut in two, it would come back with a line end more): that
    range then has -1 octets."""
    cuts = []
    start = 0
    while True:
        f.seek(start)
        data = f.read(size + 1)  # one more byte: is there more after this piece?
        if not data:
            return cuts
        if not data.isascii():
            cuts.append((start, start + len(data), -1))
            return cuts
        octets = _wire(data)
        if len(data) > size or octets > size:
            data = _lines_within(data, size)
            if not data:
                cuts.append((start, start + size, -1))
                return cuts
            octets = _wire(data)
        elif not data.endswith(b"\n"):
            # The file ends without a line end: it is completed, as a whole one is.
            octets += 1 if data.endswith(b"\r") else 2
        end = start + len(data)
        cuts.append((start, end, octets))
        start = end


def _wire(data: bytes) -> int:
    """Octets as sent: a bare LF goes out as CRLF."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def _lines_within(data: bytes, size: int) -> bytes:
    """The whole lines at the start of ``data`` that are at most ``size`` octets as
    sent (a file with bare LF line ends grows on the way); empty if the first is
    longer."""
    nl = data.rfind(b"\n", 0, size)
    if nl < 0:
        return b""
    data = data[:nl + 1]
    if _wire(data) <= size:
        return data
    end = octets = 0
    for line in data.split(b"\n")[:-1]:
        grown = len(line) + (1 if line.endswith(b"\r") else 2)
        if octets + grown > size:
            break
        octets += grown
        end += len(line) + 1
    return data[:end]


def _partial_header(fields: dict[bytes, bytes], pid: str, n: int, total: int,
                    hostname: str, arrived: float) -> bytes:
    lines = []
    for name in (b"from", b"to", b"date"):
        if name in fields:
            lines.append(name.capitalize() + b": " + fields[name])
    if b"date" not in fields:
        lines.append(b"Date: " + email.utils.formatdate(arrived, localtime=True).encode())
    subject = fields.get(b"subject", b"(no subject)")
    lines.append(b"Subject: " + subject + b" (part %d of %d)" % (n, total))
    digest = hashlib.sha1(pid.encode()).hexdigest()[:16]
    lines.append(f"Message-ID: <{digest}.{n}.{total}@{hostname}>".encode())
    lines.append(b"MIME-Version: 1.0")
    lines.append(f'Content-Type: message/partial; id="{pid}"; number={n}; total={total}'
                 .encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _piece_uidl(uidl: str, n: int, total: int, cut: str) -> str:
    text = f"{uidl}.{n}of{total}.{cut}"
    if len(text) <= 70:
        return text
    return "#" + hashlib.sha1(text.encode()).hexdigest()


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class POP3Factory(Factory):
    def __init__(self, *, reactor: Any, hostname: str, portal: Any, directory: Any,
                 journal: Any, inacttimo: int, msgsplit_kb: int | None, alwssl: str,
                 tls_options: Any, implicit_tls: bool, on_done: Any,
                 fail_delay: float = 1.0, on_auth_failure: Any = None,
                 alwplainauth: bool = False) -> None:
        self.reactor = reactor
        self.hostname = hostname
        self.portal = portal
        self.directory = directory
        self.journal = journal
        self.inacttimo = inacttimo
        self.msgsplit = None if msgsplit_kb is None else msgsplit_kb * 1024
        self.alwssl = alwssl
        self.alwplainauth = alwplainauth
        self.tls_options = tls_options
        self.implicit_tls = implicit_tls
        self.on_done = on_done
        self.fail_delay = fail_delay
        self.on_auth_failure = on_auth_failure or (lambda ip: None)

    def buildProtocol(self, addr: object) -> POP3Session:
        p = POP3Session(self, self.implicit_tls)
        p.factory = self
        self.current = p  # a job serves one session at a time
        return p

    def in_thread(self, f: Any, *args: Any) -> defer.Deferred:
        from twisted.internet import threads

        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def record_login(self, ip: str, usrprf: str) -> defer.Deferred:
        d = self.in_thread(self.directory.record_pop_login, ip, usrprf)
        d.addErrback(lambda f: log_failure(POP3Session.log, "POP-before-SMTP record failed", f))
        return d


def _messages(count: int) -> str:
    return f"{count} message" if count == 1 else f"{count} messages"


def _queue_id_of(name: str) -> str | None:
    """The queue id a delivery's file name begins with (``<id>.R<n>.<host>...``),
    so that ``dspjrn --msgid`` follows a message to its reading; None for
    mail put in the mailbox otherwise.  (Not from the UIDL: a long host name
    makes that a digest.)"""
    head, _, rest = name.partition(".")
    return head if is_queue_id(head) and rest.startswith("R") else None
