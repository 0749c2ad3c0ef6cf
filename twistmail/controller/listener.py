"""A listening socket that the controller accepts on by itself.

The controller never lets Twisted read or shut down a client socket: it calls
``accept()`` itself and passes the descriptor on, so early talkers' bytes stay
in the socket for the job, and closing the controller's copy never tears down
the session the job now owns (TWISTED.md §1.4).  While its pool can take no
more, the listener stops reading and new clients wait in the kernel backlog.

A wakeup takes only as many connections as there are idle jobs.  Under load
the listener is often ready before the channels whose FREE lines free those
jobs, and the clients of those very sessions have already connected again:
accepting them all at once queued them behind jobs that were in fact free,
and the pool grew for demand it did not have (to MAXJOBS for 16 clients).
With no idle job, the listener waits for the rest of the reactor turn, and
takes one connection then, so that real demand still shows.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from twistmail.protocols.peer import client_address
from twistmail.settingtypes import Endpoint

ACCEPTS_PER_WAKEUP = 64
BACKLOG = 511


def bind(endpoint: Endpoint) -> socket.socket:
    """Create, bind and listen; done before privileges are dropped."""
    family = socket.AF_INET6 if endpoint.family == "inet6" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "[::]:25" is every address, IPv4 clients included (reported as
            # ::ffff:a.b.c.d, written as IPv4); any other IPv6 address is itself.
            v6only = 0 if endpoint.host == "::" else 1
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@implementer(IReadDescriptor)
class Listener:
    """Accepts connections for one ``[listen]`` entry and passes them on."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        name: str,
        sock: socket.socket,
        on_accept: Callable[[socket.socket, str, str], None],
        room: Callable[[], int] | None = None,
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.sock = sock
        self.on_accept = on_accept
        #: How many connections the pool takes at once now (idle jobs).
        self.room = room or (lambda: ACCEPTS_PER_WAKEUP)
        self._late: Any = None  # the accept deferred to the end of the turn
        self.reading = False
        self.wanted = False  # the pool takes connections: read once able to
        #: Accepts failed in a row (EMFILE...): said once, and once more when over.
        self.failing = 0

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def resume(self) -> None:
        self.wanted = True
        self._read()

    def pause(self) -> None:
        self.wanted = False
        self._unread()

    def _read(self) -> None:
        if self.wanted and not self.reading and self.sock.fileno() >= 0:
            self.reading = True
            self.reactor.addReader(self)

    def _unread(self) -> None:
        if self._late is not None:
            self._late.cancel()
            self._late = None
        if self.reading:
            self.reading = False
            self.reactor.removeReader(self)

    def close(self) -> None:
        self.pause()
        self.sock.close()

    # IReadDescriptor
    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return f"Listener({self.name})"

    def connectionLost(self, reason: object) -> None:
        self.reading = False

    def doRead(self) -> None:
        self._accept(0)

    def _accept_late(self) -> None:
        self._late = None
        if self.reading:
            self._accept(1)

    def _accept(self, at_least: int) -> None:
        want = min(max(self.room(), at_least), ACCEPTS_PER_WAKEUP)
        if want <= 0:
            if self._late is None:
                self._late = self.reactor.callLater(0, self._accept_late)
            return
        for _ in range(want):
            if not self.reading:
                return
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: back off, keep serving
                if not self.failing:
                    self.log.warn("accept on {name} failed: {e}; trying again every 0.1 s",
                                  name=self.name, e=e)
                self.failing += 1
                self._unread()
                # Reading again after the back-off only if the pool still
                # takes connections: a pause it asked for meanwhile holds.
                self.reactor.callLater(0.1, self._read)
                return
            if self.failing:
                self.log.info("accept on {name} works again, after {n} failed tries",
                              name=self.name, n=self.failing)
                self.failing = 0
            conn.setblocking(False)
            # Replies are small and end a command; Nagle would hold the last
            # segment (a POP terminator, an SMTP reply) for the peer's delayed ACK.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.on_accept(conn, self.name, client_address(addr[0]))
            except Exception:
                # Twisted drops a reader whose doRead raises: one connection
                # must not stop the listener for good.
                self.log.failure("a connection on {name} could not be handled", name=self.name)
                conn.close()
