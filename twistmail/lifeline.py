"""Children of the controller end when it does, even if it died by SIGKILL."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


@functools.cache
def _libc() -> ctypes.CDLL:
    """One handle for the process: a job forked from its launcher inherits it."""
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(expected: int | None = None, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel for ``sig`` when the parent dies; exit if it already has.

    ``expected`` is the parent's pid as the parent said it: a parent that
    died before this runs leaves the process with another one, not always
    pid 1 (a subreaper: systemd --user, tini -s).
    """
    parent = os.getppid()
    # Ctrl-C at the terminal of "make run" reaches the whole process group:
    # a child then ends when the controller tells it (sessions may finish),
    # not at once with a KeyboardInterrupt.  Twisted's reactor leaves an
    # ignored SIGINT alone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = _libc()
        libc.prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent or parent == 1 or expected not in (None, parent):
        sys.exit(0)


M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 128 * 1024


def return_large_blocks() -> None:
    """Blocks over 128 KiB come from mmap and go back to the system when freed.

    glibc raises that threshold after the first large block is freed, and
    then keeps later ones: each password check (Argon2id, 12 MiB) in a pool
    thread left its buffer resident, about 50 MB more in every POP job.
    Fixing the threshold (glibc's own initial value) stops the rise.
    """
    try:
        libc = _libc()
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK)
    except (OSError, AttributeError):  # not glibc
        pass


def name_process(name: str) -> None:
    """Show ``name`` in ps and top: a forked job would otherwise look like its launcher."""
    try:
        libc = _libc()
        libc.prctl(PR_SET_NAME, name.encode("ascii", "replace")[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def yield_on_wakeup() -> None:
    """Let this worker wait for its CPU when it is woken, rather than take it.

    A job is woken by its dispatcher (the controller handing a connection, the
    bridge a message), and a woken normal process may preempt the one that
    woke it: under load the controller lost its CPU at about every second
    handoff, in the middle of a batch of them, and fell a batch behind its
    jobs.  SCHED_BATCH changes only that (a batch process is preempted and
    runs by the same fair shares and nice values); on an idle CPU a woken job
    runs at once as before.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused: a normal process
        pass


def _routine_text(text: str) -> bool:
    """What every new DNS resolver says (twisted.names reads /etc/resolv.conf),
    every DNS query's UDP port as it opens and closes, and every job's reactor
    as it ends: once per job or lookup, they were nearly all of the daemon's
    log.  The journal has each job's start and end (JS, JE)."""
    return (text.startswith(("Resolver added ", "DNSDatagramProtocol starting on ",
                             "Starting protocol <twisted.names.",
                             "Stopping protocol <twisted.names."))
            or text == "Main loop terminated."
            or (text.startswith("(UDP Port ") and text.endswith(" Closed)"))
            or ("resolv.conf" in text and text.endswith("changed, reparsing")))


def _with_level(event: dict) -> dict:
    """Twisted's older log calls name a "system" (``[-]``, a connection) in
    place of the level; the controller reads the level from each line, so
    it is added: ``[-#info]``, ``[SMTPConnection,3,127.0.0.1#critical]``."""
    system = event.get("log_system")
    if system is None or "#" in str(system):
        return event
    level = event.get("log_level")
    return {**event, "log_system": f"{system}#{level.name if level else 'info'}"}


def log_to_stderr(label: str | None = None) -> None:
    """Send this child's Twisted log to stderr, which the controller logs with its name.

    A job forked from a launcher shares the launcher's pipes, so the
    controller names its lines after the launcher: ``label`` (the job's
    name and pid) stands first on each line in place of the time, which the
    controller's log gives already.
    """
    from twisted.logger import (
        FileLogObserver,
        FilteringLogObserver,
        PredicateResult,
        formatEvent,
        formatEventAsClassicLogText,
        globalLogBeginner,
        textFileLogObserver,
    )

    def routine(event: dict) -> PredicateResult:
        text = " ".join(str(m) for m in event.get("message", ()))
        if not text and "log_format" in event:
            text = formatEvent(event)
        return PredicateResult.no if _routine_text(text) else PredicateResult.maybe

    if label is None:
        text = textFileLogObserver(sys.stderr)
    else:
        text = FileLogObserver(sys.stderr, lambda event: formatEventAsClassicLogText(
            event, formatTime=lambda _: label))
    observer = FilteringLogObserver(lambda event: text(_with_level(event)), [routine])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def stop_once_on_sigterm(reactor: Any) -> None:
    """SIGTERM stops the reactor, and a second one does nothing.

    A whole process group signalled (``kill -TERM -PGID``, ``timeout``, a
    container stop) reaches a child, and so does its controller's own
    request to end: Twisted's handler then stopped a stopped reactor and
    logged a ReactorNotRunning traceback for each.
    """
    from twisted.internet.error import ReactorNotRunning

    def stop() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    def install() -> None:  # after reactor.run() has put Twisted's own in place
        signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(stop))

    reactor.callWhenRunning(install)
