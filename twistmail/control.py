"""The control socket: how the CLI talks to the running controller.

A UNIX stream socket (``<datadir>/run/control.sock``, mode 0600) carrying one
JSON object per line each way: ``{"cmd": NAME, "args": {...}}`` and
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TEXT, "usage": bool}``.
Line-delimited JSON keeps it scriptable with ``socat`` and needs no reactor
in the short-lived CLI.  The server side dispatches to ``cmd_<NAME>`` methods
of a handler object, which may return a Deferred
(:mod:`twistmail.controller.controlsocket`).  This module is the CLI's
side and imports nothing of Twisted: every command starts faster.
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

MAX_LINE = 16 * 1024 * 1024


class ControlError(Exception):
    """A request the daemon refused; ``usage`` marks a caller's mistake."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class NotRunning(Exception):
    """No daemon answers on the control socket."""


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
