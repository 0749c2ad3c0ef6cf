"""Greeting-only SMTP and POP3 sessions.

They let the prestart pools be exercised end to end by real clients before
the full protocol layers exist: greet, answer QUIT, refuse everything else
with the protocol's "not implemented" reply.  Lines are bounded (RFC 5321
512 octets for SMTP commands, RFC 2449 255 for POP3) and idle sessions end
after the configured inactivity timeout.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin


class _LineSession(LineOnlyReceiver, TimeoutMixin):
    delimiter = b"\r\n"

    def __init__(self, hostname: str, timeout: int, on_done: Callable[[], None]) -> None:
        self.hostname = hostname
        self.timeout = timeout
        self.on_done = on_done

    def connectionMade(self) -> None:
        self.setTimeout(self.timeout)
        self.greet()

    def connectionLost(self, reason: object = None) -> None:
        self.setTimeout(None)
        self.on_done()

    def reply(self, text: str) -> None:
        self.sendLine(text.encode("utf-8"))

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        verb = line.split(b" ", 1)[0].strip().upper()
        self.command(verb)

    def greet(self) -> None:
        raise NotImplementedError

    def command(self, verb: bytes) -> None:
        raise NotImplementedError


class StubSMTP(_LineSession):
    MAX_LENGTH = 512

    def greet(self) -> None:
        self.reply(f"220 {self.hostname} twistmail ESMTP service ready")

    def command(self, verb: bytes) -> None:
        if verb == b"QUIT":
            self.reply(f"221 2.0.0 {self.hostname} closing connection")
            self.transport.loseConnection()
        else:
            self.reply("502 5.5.1 Command not implemented")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reply("500 5.5.2 Line too long")
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        self.reply(f"421 4.4.2 {self.hostname} idle too long, closing connection")
        self.transport.loseConnection()


class StubPOP3(_LineSession):
    MAX_LENGTH = 255

    def greet(self) -> None:
        self.reply(f"+OK {self.hostname} twistmail POP3 server ready")

    def command(self, verb: bytes) -> None:
        if verb == b"QUIT":
            self.reply(f"+OK {self.hostname} signing off")
            self.transport.loseConnection()
        else:
            self.reply("-ERR Command not implemented")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reply("-ERR Line too long")
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        self.reply("-ERR idle too long, closing connection")
        self.transport.loseConnection()


class SessionFactory(Factory):
    """Builds one session protocol per adopted connection."""

    def __init__(
        self, protocol: type[_LineSession], hostname: str, timeout: int,
        on_done: Callable[[], None],
    ) -> None:
        self.protocol_class = protocol
        self.hostname = hostname
        self.timeout = timeout
        self.on_done = on_done

    def buildProtocol(self, addr: object) -> Protocol:
        p = self.protocol_class(self.hostname, self.timeout, self.on_done)
        p.factory = self
        return p
