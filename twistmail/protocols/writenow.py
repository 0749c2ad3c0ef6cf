"""Replies (and the close after the last one) done at once when the connection has nothing queued.

``transport.write`` queues the bytes and sends them in the reactor's next
turn: per reply, an ``epoll_ctl`` to watch for writability, a turn of the
loop, the send, and another ``epoll_ctl``.  Our sessions answer one command
at a time, so nearly every reply finds the connection idle; on a plain TCP
connection with an empty buffer and no reply streaming from a file the socket can take the
bytes now.  Whatever it does not take goes through ``transport.write``
behind them, so the order of the bytes is kept.

TLS connections (STARTTLS, or a protocol wrapped for implicit TLS) and
anything else that is not a bare TCP connection always take the ordinary
path: their bytes must pass through the TLS layer.
"""

from __future__ import annotations

import array
import socket
from typing import Any

from twisted.internet import error, tcp
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure


def _idle(transport: Any) -> bool:
    """A plain connection with nothing queued: bytes written now keep their order."""
    return (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not getattr(transport, "_aborting", False)
        # A reply streamed from a file paces itself; a session that only
        # watches for a full buffer (a streaming producer, not paused) does not.
        and (transport.producer is None
             or (transport.streamingProducer and not transport.producerPaused))
        and transport.offset == len(transport.dataBuffer)
        and not transport._tempDataBuffer
        and not getattr(transport, "_sendmsgQueue", None)
    )


def write_now(transport: Any, data: bytes) -> None:
    """Send ``data`` on ``transport``, without waiting for the next reactor turn when possible."""
    if _idle(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
    if data:
        transport.write(data)


def send_descriptor_now(transport: Any, fd: int, data: bytes) -> None:
    """Pass ``fd`` on a UNIX connection with ``data`` (at least one byte), at once when idle.

    One ``sendmsg`` carries the descriptor and the bytes.  Otherwise both go
    the ordinary way (``sendFileDescriptor`` then ``write``) in the next turn,
    and the descriptor travels with the first byte still queued: never
    after its line.
    """
    if _idle(transport) and hasattr(transport, "sendFileDescriptor"):
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        try:
            sent = transport.socket.sendmsg([data], rights)
        except OSError:  # full, interrupted, or broken: the ordinary path copes (or reports it)
            sent = 0
        if sent > 0:  # the descriptor went with the first byte
            if sent < len(data):
                transport.write(data[sent:])
            return
    transport.sendFileDescriptor(fd)
    transport.write(data)


def close_now(reactor: Any, transport: Any) -> bool:
    """Close an idle plain connection now; False (nothing done) if it is not idle.

    ``loseConnection`` waits for the reactor's next turn to find the buffer
    empty: two ``epoll_ctl`` calls, a wake-up and an empty write per session
    for nothing.  With nothing queued, this does at once what the reactor
    then does: stop watching the descriptor and tell the transport it is
    gone (``IFileDescriptor.connectionLost``), which shuts the socket down,
    closes it and tells the protocol.
    """
    if not _idle(transport):
        return False
    reactor.removeReader(transport)
    reactor.removeWriter(transport)
    transport.connectionLost(Failure(error.ConnectionDone()))
    return True


def _tls_layer(transport: Any) -> TLSMemoryBIOProtocol | None:
    """The TLS layer of a connection: the transport itself (implicit TLS), or
    the protocol STARTTLS put under it; None for a plain connection."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        return transport
    inner = getattr(transport, "protocol", None)
    if getattr(transport, "TLS", False) and isinstance(inner, TLSMemoryBIOProtocol):
        return inner
    return None


def cut_unfinished_tls(transport: Any) -> None:
    """After ``loseConnection``: a TLS handshake that never finished is cut at once.

    Twisted waits for such a handshake to finish when it holds a reply (an
    implicit-TLS greeting), so a client that connected and said nothing
    held its job for the idle time and then the whole grace period.  The
    client can read nothing before its handshake, so nothing is lost.  A
    finished handshake keeps Twisted's way: it reads on until the client's
    close_notify, and what the client still sends never meets a closed
    socket (whose reset would cut the last reply short in the client).
    """
    tls = _tls_layer(transport)
    if (tls is not None and tls.transport is not None and tls.disconnecting
            and not tls._aborted and not tls._handshakeDone):
        tls.abortConnection()


def tls_lost(transport: Any) -> bool:
    """Whether the connection's TLS layer has ended: the client sent its
    close_notify (or TLS failed), and Twisted drops every write from then on.

    The TCP connection lingers until what was queued has left, and the
    session hears of it only then.  Meanwhile no reply can reach the client,
    so no further command may be carried out: a QUIT run then committed the
    deletions of a client that never saw the messages it had fetched.
    """
    tls = _tls_layer(transport)
    return tls is not None and tls._lostTLSConnection
