"""A full or read-only disk, or a permission taken away, is told in one line;
anything else whole."""

from __future__ import annotations

import errno
import sqlite3

from twisted.python.failure import Failure

from twistmail.storagefault import log_failure, storage_fault


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def warn(self, fmt: str, **kw: object) -> None:
        self.lines.append(("warn", fmt.format(**kw)))

    def failure(self, what: str, failure: object) -> None:
        self.lines.append(("failure", what))


def _failure(exc: BaseException) -> Failure:
    try:
        raise exc
    except BaseException:
        return Failure()


def test_a_full_or_read_only_disk_is_one_warning_line():
    for exc in (OSError(errno.ENOSPC, "No space left on device", "/var/q/tmp/x"),
                OSError(errno.EROFS, "Read-only file system"),
                OSError(errno.EDQUOT, "Disk quota exceeded"),
                # The administrator's chmod on a queue directory, too.
                PermissionError(errno.EACCES, "Permission denied", "/var/q/QTMSINQ/x"),
                sqlite3.OperationalError("database or disk is full"),
                # A tool's long transaction on the directory, past the busy timeout.
                sqlite3.OperationalError("database is locked")):
        log = _Log()
        log_failure(log, "could not queue a message", _failure(exc))
        [(kind, line)] = log.lines
        assert kind == "warn" and line.startswith("could not queue a message: ")
        assert "\n" not in line
    assert storage_fault(OSError(errno.ENOSPC, "No space left on device", "/q")) == (
        "No space left on device: /q")


def test_anything_else_is_logged_whole():
    for exc in (OSError(errno.EBADF, "Bad file descriptor"), ValueError("x"),
                sqlite3.OperationalError("no such table: profiles")):
        log = _Log()
        log_failure(log, "command failed", _failure(exc))
        assert log.lines == [("failure", "command failed")]
