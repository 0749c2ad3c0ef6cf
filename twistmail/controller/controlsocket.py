"""The controller's end of the control socket (see :mod:`twistmail.control`).

Only the daemon's user can connect (the socket is 0600 in a 0700 directory),
but a script of that user can still get it wrong, so a connection holds
little: requests are answered one at a time and in order, no request is
read while the answer to the last one waits in a full send buffer (a client
that never reads stops being read), a request line is at most
``MAX_LENGTH`` bytes, a connection with no request in progress ends after
``IDLE_TIMEOUT`` seconds, and at most ``MAX_CONNECTIONS`` are open at once.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from twistmail.control import ControlError

MAX_LENGTH = 64 * 1024  # the longest request line (a settings change is a few hundred bytes)
IDLE_TIMEOUT = 60.0  # seconds: the CLI sends its request at once
MAX_CONNECTIONS = 64


@implementer(IPushProducer, IHalfCloseableProtocol)
class ControlProtocol(Protocol, TimeoutMixin):
    log = Logger()

    def __init__(self) -> None:
        self.buffer = b""
        self.busy = False  # a request is being answered
        self.paused = False  # the send buffer is full: the client is not reading
        self.turn: Any = None  # the next request's turn, later in the reactor
        self.input_ended = False  # the client shut its side: answer what came, then close

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.transport.registerProducer(self, True)
        self.setTimeout(IDLE_TIMEOUT)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections -= 1
        self.setTimeout(None)
        if self.turn is not None and self.turn.active():
            self.turn.cancel()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def readConnectionLost(self) -> None:
        """``printf '...\\n' | socat - UNIX-CONNECT:...``: the answers still go out."""
        self.input_ended = True
        self._next()

    def writeConnectionLost(self) -> None:
        self._close()

    def _close(self, abort: bool = False) -> None:
        """End the connection; a paused producer would keep it open for ever.

        An abort also ends one already closing: its answers wait for a
        client that does not read them."""
        if self.transport is None:
            return
        if not self.transport.disconnecting:
            self.transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()
        elif not self.transport.disconnecting:
            self.transport.loseConnection()

    def _next(self) -> None:
        self.turn = None
        if self.busy or self.paused or self.transport is None or self.transport.disconnecting:
            return
        line, found, rest = self.buffer.partition(b"\n")
        if len(line) > MAX_LENGTH:  # with or without its end yet
            self._send({"ok": False, "error": f"request longer than {MAX_LENGTH} bytes",
                        "usage": True})
            self._close()
            return
        if not found:
            if self.input_ended:
                self._close()
            return
        self.buffer = rest
        self.busy = True
        self.setTimeout(None)  # a command may take a while (ENDMSF with a delay)
        self.transport.pauseProducing()  # nothing more is read until it is answered
        d = defer.maybeDeferred(self._dispatch, line.rstrip(b"\r"))
        d.addCallbacks(self._ok, self._error)
        d.addBoth(self._answered)

    def _answered(self, _: Any) -> None:
        self.busy = False
        if self.transport is None or not self.transport.connected or \
                self.transport.disconnecting:
            return
        self.setTimeout(IDLE_TIMEOUT)
        if not self.paused and not self.input_ended:
            self.transport.resumeProducing()
        # The next buffered request waits for the next reactor turn: one client
        # sending many at once does not keep the daemon from its other work.
        if (self.buffer or self.input_ended) and self.turn is None:
            from twisted.internet import reactor

            self.turn = reactor.callLater(0, self._next)

    # IPushProducer: the transport's send buffer is full, or has room again.
    def pauseProducing(self) -> None:
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if not self.busy and not self.transport.disconnecting:
            if not self.input_ended:
                self.transport.resumeProducing()
            self._next()

    def stopProducing(self) -> None:
        self.paused = True

    def timeoutConnection(self) -> None:
        self._close(abort=True)  # answers it did not read are dropped with it

    def _dispatch(self, line: bytes) -> Any:
        try:
            request = json.loads(line)
            name = request["cmd"]
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ControlError("malformed request", usage=True) from None
        handler = self.factory.handler
        method = getattr(handler, "cmd_" + str(name), None)
        if method is None:
            raise ControlError(f"unknown control command {name!r}", usage=True)
        refusal = handler.refusal(str(name)) if hasattr(handler, "refusal") else None
        if refusal is not None:
            raise ControlError(refusal)
        return method(**args)

    def _ok(self, result: Any) -> None:
        self._send({"ok": True, "result": result})

    def _error(self, failure: Any) -> None:
        err = failure.value
        if isinstance(err, ControlError):
            self._send({"ok": False, "error": str(err), "usage": err.usage})
        elif isinstance(err, TypeError):
            self._send({"ok": False, "error": f"bad arguments: {err}", "usage": True})
        else:
            self.log.failure("control command failed", failure)
            self._send({"ok": False, "error": f"internal error: {err!r}", "usage": False})

    def _send(self, obj: Any) -> None:
        if self.transport is not None:
            self.transport.write(json.dumps(obj, default=str).encode("utf-8") + b"\n")


class _Refuse(Protocol):
    """Says why, then closes: the CLI prints the line."""

    def connectionMade(self) -> None:
        self.transport.write(json.dumps({
            "ok": False, "usage": False,
            "error": f"the daemon has {MAX_CONNECTIONS} control connections open; try again",
        }).encode("utf-8") + b"\n")
        self.transport.loseConnection()


class ControlFactory(Factory):
    protocol = ControlProtocol
    noisy = False  # "Starting factory <...>" at every start says nothing to an administrator

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        if self.connections >= MAX_CONNECTIONS:
            return _Refuse()
        return super().buildProtocol(addr)
