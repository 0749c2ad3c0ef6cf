"""The controller's end of the control socket (see :mod:`twistmail.control`)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from twistmail.control import ControlError


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
            self.sendLine(json.dumps(obj, default=str).encode("utf-8"))


class ControlFactory(Factory):
    protocol = ControlProtocol

    def __init__(self, handler: Any) -> None:
        self.handler = handler
