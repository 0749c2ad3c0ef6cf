"""Telling a full or read-only disk in one line.

A full file system, a quota or a file system remounted read-only is a
condition of the machine, not a defect of the appliance: the client gets
its temporary reply (452, 451, -ERR [SYS/TEMP]) and the administrator
needs one line that says what is wrong, not a traceback per connection.
Anything else is still logged whole.
"""

from __future__ import annotations

import errno
import sqlite3
from typing import Any

#: What frees itself once the administrator makes room or remounts.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

#: SQLite's words for the same conditions.
_SQLITE_WORDS = ("disk is full", "readonly database", "disk I/O error")


def storage_fault(exc: BaseException | None) -> str | None:
    """A one-line description when ``exc`` is a full or read-only disk, else None."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    if isinstance(exc, sqlite3.OperationalError) and any(w in str(exc) for w in _SQLITE_WORDS):
        return f"the directory database: {exc}"
    return None


def _permission(exc: BaseException | None) -> str | None:
    """A file of the state directory the daemon may not touch: the administrator's
    chmod or chown to mend, said in one line like a full disk."""
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return None


def log_failure(log: Any, what: str, failure: Any) -> None:
    """``log.failure`` for defects; one warning line for a full or read-only disk,
    a permission the administrator took away, or a database another writer holds."""
    exc = getattr(failure, "value", None)
    fault = storage_fault(exc) or _permission(exc) or _locked(exc)
    if fault is None:
        log.failure(what, failure)
    else:
        log.warn("{what}: {fault}", what=what, fault=fault)


def _locked(exc: BaseException | None) -> str | None:
    """The directory database held by another writer past the busy timeout
    (a long transaction of a tool): a condition, said in one line."""
    if isinstance(exc, sqlite3.OperationalError) and "database is locked" in str(exc):
        return "the directory database is locked by another writer"
    return None
