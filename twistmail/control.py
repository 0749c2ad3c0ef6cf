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
import time
from pathlib import Path
from typing import Any

MAX_LINE = 16 * 1024 * 1024
#: The refusal of a change while the daemon stops: a change saved in the file
#: then applies at the next start, as when the daemon is not running.
STOPPING = "the twistmail daemon is stopping; run the command once it has started again"


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
    """A blocking client for the CLI (which has no reactor).

    Whatever goes wrong is a ControlError naming the socket (or NotRunning
    when no daemon listens): never a traceback, never a wait without end.
    """

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, cmd: str, **args: Any) -> Any:
        s = self._connect()
        try:
            unsent: OSError | None = None
            try:
                s.sendall(json.dumps({"cmd": cmd, "args": args}).encode("utf-8") + b"\n")
            except (BrokenPipeError, ConnectionResetError) as e:
                # A daemon that refuses the connection (too many open) says
                # why and closes, maybe before the request is written: its
                # line is still there to read.
                unsent = e
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    if unsent is not None:
                        raise unsent
                    raise ControlError(f"the twistmail daemon on {self.path} closed the "
                                       "connection without an answer (is it stopping?)")
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise ControlError(f"the answer of the daemon on {self.path} is too long")
        except TimeoutError:
            raise ControlError(f"the twistmail daemon on {self.path} did not answer within "
                               f"{self.timeout:.0f} s") from None
        except OSError as e:  # reset by a daemon that died, say
            raise ControlError(f"the control connection to {self.path} failed: "
                               f"{e.strerror or e}") from None
        finally:
            s.close()
        try:
            reply = json.loads(buf)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise ControlError(f"the answer of the daemon on {self.path} cannot be read")
        if not reply["ok"]:
            raise ControlError(str(reply.get("error", "failed")), usage=bool(reply.get("usage")))
        return reply.get("result")

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(str(self.path))
                return s
            except OSError as e:
                s.close()
                if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                    raise NotRunning(
                        f"the twistmail daemon is not running (no answer on {self.path})"
                    ) from None
                # A full backlog: the daemon is busy for a moment (the socket
                # is non-blocking under a timeout, so connect does not wait).
                if e.errno == errno.EAGAIN and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                if e.errno == errno.EAGAIN:
                    raise ControlError(f"the twistmail daemon on {self.path} took no "
                                       f"connection within {self.timeout:.0f} s") from None
                hint = " (only the daemon's user may use it)" if e.errno in (
                    errno.EACCES, errno.EPERM) else ""
                raise ControlError(f"cannot use the control socket {self.path}: "
                                   f"{e.strerror or e}{hint}") from None

    def running(self) -> bool:
        return socket_in_use(self.path)
