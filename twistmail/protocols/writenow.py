"""Replies that go out at once when the connection has nothing queued.

``transport.write`` queues the bytes and sends them in the reactor's next
turn: per reply, an ``epoll_ctl`` to watch for writability, a turn of the
loop, the send, and another ``epoll_ctl``.  Our sessions answer one command
at a time, so nearly every reply finds the connection idle; on a plain TCP
connection with an empty buffer and no producer the socket can take the
bytes now.  Whatever it does not take goes through ``transport.write``
behind them, so the order of the bytes is kept.

TLS connections (STARTTLS, or a protocol wrapped for implicit TLS) and
anything else that is not a bare TCP connection always take the ordinary
path: their bytes must pass through the TLS layer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def write_now(transport: Any, data: bytes) -> None:
    """Send ``data`` on ``transport``, without waiting for the next reactor turn when possible."""
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not getattr(transport, "_aborting", False)
        and transport.producer is None
        and transport.offset == len(transport.dataBuffer)
        and not transport._tempDataBuffer
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
    if data:
        transport.write(data)
