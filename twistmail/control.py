"""The control socket: how the CLI talks to the running controller.

A UNIX stream socket (``<datadir>/run/control.sock``, mode 0600) carrying one
JSON object per line each way: ``{"cmd": NAME, "args": {...}}`` and
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TEXT, "usage": bool}``.
Line-delimited JSON keeps it scriptable with ``socat`` and needs no reactor
in the short-lived CLI.  The server side dispatches to ``cmd_<NAME>`` methods
of a handler object, which may return a Deferred.
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

MAX_LINE = 16 * 1024 * 1024


class ControlError(Exception):
    """A request the daemon refused; ``usage`` marks a caller's mistake."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class NotRunning(Exception):
    """No daemon answers on the control socket."""


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1024 * 1024
    log = Logger()

    def lineReceived(self, line: bytes) -> None:
        d = defer.maybeDeferred(self._dispatch, line)
        d.addCallbacks(self._ok, self._error)

    def _dispatch(self, line: bytes) -> Any:
        try:
            request = json.loads(line)
            name = request["cmd"]
            args = request.get("args") or {}
        except (ValueError, KeyError, TypeError):
            raise ControlError("malformed request", usage=True) from None
        method = getattr(self.factory.handler, "cmd_" + str(name), None)
        if method is None:
            raise ControlError(f"unknown control command {name!r}", usage=True)
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
            self.sendLine(json.dumps(obj, default=str).encode("utf-8"))


class ControlFactory(Factory):
    protocol = ControlProtocol

    def __init__(self, handler: Any) -> None:
        self.handler = handler


def socket_in_use(path: Path) -> bool:
    """True when a live daemon answers at ``path``; a stale file is not in use."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


class ControlClient:
    """A blocking client for the CLI (which has no reactor)."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, cmd: str, **args: Any) -> Any:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(str(self.path))
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                    raise NotRunning(
                        f"the twistmail daemon is not running (no answer on {self.path})"
                    ) from None
                raise
            s.sendall(json.dumps({"cmd": cmd, "args": args}).encode("utf-8") + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise NotRunning("the twistmail daemon closed the control connection")
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise ControlError("reply too long")
        finally:
            s.close()
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "failed"), usage=bool(reply.get("usage")))
        return reply.get("result")

    def running(self) -> bool:
        return socket_in_use(self.path)
