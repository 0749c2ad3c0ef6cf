"""How a child process of the appliance is started.

All job and bridge starts go through :func:`spawn`, so a faster way to start
them (a preloaded fork server) can replace exec without touching the pool.
A child gets the other end of a UNIX socketpair as fd 3 when ``channel`` is
given; its stdout and stderr come back to the controller's log.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger

CHILD_CHANNEL_FD = 3


class ChildOutput(ProcessProtocol):
    """Logs what a child writes and reports its end."""

    log = Logger()

    def __init__(self, name: str, on_ended: Any) -> None:
        self.name = name
        self.on_ended = on_ended
        self.pid: int | None = None
        self._partial = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buf = self._partial.get(fd, b"") + data
        *lines, self._partial[fd] = buf.split(b"\n")
        for line in lines:
            self._emit(line)
        if len(self._partial[fd]) > 8192:
            self._emit(self._partial[fd])
            self._partial[fd] = b""

    def _emit(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            self.log.info("{name}/{pid}: {text}", name=self.name, pid=self.pid, text=text)

    def processEnded(self, reason: Any) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._emit(rest)
                self._partial[fd] = b""
        self.on_ended(reason)


class _Prebuilt(Factory):
    def __init__(self, proto: Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: object) -> Protocol:
        return self.proto


def spawn(
    reactor: Any,
    name: str,
    module: str,
    args: list[str],
    output: ChildOutput,
    channel: Protocol | None = None,
) -> Any:
    """Start ``python -m module args``; returns the process transport."""
    child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
    child_end = None
    if channel is not None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent_end.setblocking(False)
        reactor.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX, _Prebuilt(channel))
        parent_end.close()
        child_fds[CHILD_CHANNEL_FD] = child_end.fileno()
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    try:
        return reactor.spawnProcess(
            output,
            sys.executable,
            [sys.executable, "-m", module, *args],
            env=env,
            childFDs=child_fds,
        )
    finally:
        if child_end is not None:
            child_end.close()
