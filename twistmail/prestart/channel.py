"""The line protocol on the UNIX socketpair between the controller and a job.

Controller to job::

    FD <token> <listener> <family>     (with one socket passed by SCM_RIGHTS)
    END                                (end when idle; a busy job ends after its session)
    CFG                                (re-read the settings file for new sessions)
    TASK <token> <json>                (SMTP client jobs: deliver one message to one domain)
    CUT                                (end a session not signed on: MAXAUTHFAIL reached)
    PING                               (a job busy for a while: is it alive?)

Job to controller::

    READY                              (booted, waiting for work)
    ACK <token>                        (took the socket: the controller closes its copy)
    FREE <seconds>                     (session over, waiting for work; when, on
                                        CLOCK_MONOTONIC, which every process shares)
    PONG                               (the answer to PING, from the job's reactor)
    AUTHFAIL <ip>                      (a sign-on failed; the controller counts per address)
    PART <token> <id> <json>           (one message of a task done, told as the next one
                                        begins: if the job dies, it is not sent again)
    RESULT <token> <json>              (a task's outcome, in the same write as its FREE;
                                        a task has no ACK: nothing waits for one)

Every passed descriptor travels with the bytes of its FD line, written in the
same reactor turn (TWISTED.md §1.4: a descriptor without a data byte makes
Twisted drop the channel).
"""

from __future__ import annotations

import time

DELIMITER = b"\n"
MAX_LINE = 4 * 1024 * 1024  # task and result lines carry recipient lists


def fd_line(token: int, listener: str, family: int) -> bytes:
    return b"FD %d %s %d" % (token, listener.encode("ascii"), family)


def free_line() -> bytes:
    return b"FREE %.6f" % time.monotonic()


def parse(line: bytes) -> tuple[str, list[str]]:
    """Split a channel line into its verb and (at most three) arguments.

    The JSON of a TASK, PART or RESULT line is left alone: its reader takes it
    from the line, and decoding and splitting it here was wasted.
    """
    parts = [p.decode("ascii", "replace") for p in line.split(None, 4)[:4]]
    if not parts:
        return "", []
    return parts[0], parts[1:]
