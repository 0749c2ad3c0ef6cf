"""How the controller sees and resets the bridge's client pool (QTMSCCLCP).

The SMTP client pool lives in the bridge, but DSPACTPJ and WRKACTJOB are
answered by the controller.  The bridge writes the pool's statistics and
jobs to ``<datadir>/run/QTMSCCLCP.json`` once a second; the controller
reads that file.  DSPACTPJ RESET goes the other way: the controller writes
a request file with a fresh token, the bridge resets the statistics at its
next status write and records, under ``reset``, the token and the
statistics as they were just before; the controller waits for that token
and shows those statistics, so a reset loses nothing and is never applied
twice.  Files, not signals: a signal arriving while the bridge starts
could end it, and a file request survives a bridge restart.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

STATUS_FILE = "QTMSCCLCP.json"
RESET_FILE = "QTMSCCLCP.reset"
#: Present while the SMTP server is ended (ENDTCPSVR *SMTP, or not started
#: with the daemon).  SMTP on IBM i is server, client and bridge jobs at once:
#: with it ended no mail leaves either, and the client jobs end.  The
#: controller writes it, then signals the bridge (SIGHUP); a bridge that starts
#: reads it.  In ``run/``: it lasts as long as the daemon.
SMTP_ENDED = "SMTP.ended"
RESET_WAIT = 10.0  # seconds the controller waits for the bridge to reset
POLL = 0.1


def smtp_ended(run_dir: Path) -> bool:
    """Whether the controller has the SMTP server ended (see :data:`SMTP_ENDED`)."""
    return (run_dir / SMTP_ENDED).exists()


#: Seconds after which a status the bridge wrote (once a second) says it is gone.
STALE_AFTER = 10.0


def bridge_running(run_dir: Path, now: float) -> bool:
    """Whether a bridge runs: none after ENDMSF or with the daemon stopped
    (the status is removed then), nor when the one that wrote it was killed.

    By the writer's pid: a bridge that cannot write its status (a full
    disk) still runs.  A status without one is judged by its age.
    """
    status = read_status(run_dir) or {}
    pid = status.get("pid")
    if isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # another user's process: there is one
        return True
    at = status.get("at")
    return isinstance(at, int | float) and now - at < STALE_AFTER


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The pool as the bridge last wrote it, or None when there is none."""
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def request_reset(run_dir: Path) -> str:
    """Ask the bridge to reset the statistics; returns the token it will answer with."""
    token = secrets.token_hex(8)
    path = run_dir / RESET_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(token)
    os.replace(tmp, path)
    return token


def take_reset_request(run_dir: Path) -> str | None:
    """The bridge's side: the token of a waiting reset request, which is removed."""
    path = run_dir / RESET_FILE
    try:
        token = path.read_text().strip()
        path.unlink()
    except OSError:
        return None
    return token or None


def reset(clock: Any, run_dir: Path, wait: float = RESET_WAIT) -> defer.Deferred[Any]:
    """Reset the client pool's statistics; fires with them as they were before.

    Fires with None when the bridge did not answer within ``wait`` seconds;
    the request is withdrawn then, so a bridge that comes back later does
    not reset what the administrator no longer expects to be reset.
    """

    async def run() -> dict[str, Any] | None:
        token = request_reset(run_dir)
        deadline = clock.seconds() + wait
        taken = False
        while True:
            answer = _answer(run_dir, token)
            if answer is not None:
                return answer
            if clock.seconds() >= deadline:
                if taken or take_reset_request(run_dir) is not None:
                    return None
                taken = True  # the bridge has just taken it: its answer is on the way
                deadline = clock.seconds() + 1.0
            await task.deferLater(clock, POLL, lambda: None)

    return defer.Deferred.fromCoroutine(run())


def _answer(run_dir: Path, token: str) -> dict[str, Any] | None:
    done = (read_status(run_dir) or {}).get("reset") or {}
    return done.get("report") if done.get("token") == token else None
