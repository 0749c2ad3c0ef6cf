"""One appliance per state directory, for as long as any of its queue owners live.

The controller takes an exclusive ``flock`` on ``<datadir>/twistmail.lock``
and hands the locked file to the bridge, whose QMSF jobs inherit it: the
lock is held while any process that moves queued mail is alive.  After a
SIGKILL of the controller the bridge ends in a controlled way (up to
END_DELAY and more) while the control socket no longer answers; a new
daemon started in that window would run a second bridge on the same
queues and send a message twice.  It waits for the lock instead.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

LOCK_FILE = "twistmail.lock"
#: How long a new daemon waits for the processes of an ended one to go.
WAIT = 30.0


class DatadirBusy(Exception):
    """Another appliance, or what is left of one, still uses the state directory."""


class NoLock(Exception):
    """The state directory cannot be locked here (a file system without flock)."""


def holding(path: str | Path) -> list[int]:
    """The processes with ``path`` open (as far as /proc lets us see them)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    found = []
    with os.scandir("/proc") as processes:
        pids = [p.name for p in processes if p.name.isdigit()]
    for pid in pids:
        try:
            with os.scandir(f"/proc/{pid}/fd") as fds:
                for fd in fds:
                    st = os.stat(fd.path)
                    if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                        found.append(int(pid))
                        break
        except OSError:  # gone meanwhile, or another user's
            continue
    return sorted(found)


def lock_datadir(datadir: Path, wait: float = WAIT, poll: float = 0.2,
                 running: Callable[[], str | None] | None = None,
                 waiting: Callable[[str], None] | None = None) -> int:
    """The locked descriptor (kept open for the daemon's life); DatadirBusy after
    ``wait``; NoLock when the file system takes no lock (the caller goes on).

    ``running``, asked while it waits, tells (in a sentence) of a daemon
    that has come up meanwhile: the lock is then not an earlier daemon's,
    still ending, but a live one's, and the wait ends at once.  ``waiting``
    is told once, when the wait begins, so that a start does not look hung."""
    path = datadir / LOCK_FILE
    try:
        # Never through a link: a daemon started as root would open (and
        # give away) whatever file the daemon's user pointed it at.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DatadirBusy(f"{path} is a symbolic link; twistmail takes none there: "
                              "remove it") from None
        raise NoLock(f"{path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        # A hard link to a file elsewhere: root would give that file away.
        os.close(fd)
        raise DatadirBusy(f"{path} is not a file of its own (it has {st.st_nlink} names); "
                          "twistmail takes no link there: remove it")
    deadline = time.monotonic() + wait
    told = waiting is None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            live = running() if running is not None else None
            if live is not None:
                os.close(fd)
                raise DatadirBusy(live) from None
            if not told:
                told = True
                holders = ", ".join(str(pid) for pid in holding(path)) or "unknown"
                waiting(f"waiting up to {wait:g} s for processes of an earlier twistmail daemon "
                        f"to end (pids {holders} hold {path})")
            if time.monotonic() >= deadline:
                os.close(fd)
                holders = ", ".join(str(pid) for pid in holding(path)) or "unknown"
                raise DatadirBusy(
                    f"processes of an earlier twistmail daemon still use {datadir} (they hold "
                    f"{path}: pids {holders}); wait for them to end, or end them") from None
            time.sleep(poll)
        except OSError as e:  # ENOLCK (NFS without locks), EOPNOTSUPP, EINVAL
            os.close(fd)
            raise NoLock(f"{path}: {e.strerror}") from None
