"""Files of mail that left the queue, kept emptied for the next message to take.

Why: on ext4 without a journal, creating a file scans past every inode of
its block group freed in the last one to six minutes.  The kernel keeps
such inodes from reuse so that a directory entry a power cut kept cannot
name a new file.  With a file freed for every message delivered and one
created for every message received, that scan took over a third of the CPU
of accepting mail.  The queue keeps its inodes instead.

The kernel's reason holds here too: a file may be reused only once its old
name is gone on disk.  A retired file therefore waits in ``retired/`` until
the directories it left are fsynced, in batches (every
:data:`RELEASE_BATCH` files, or the first retirement a second after the
batch began), and only then is emptied and put in ``spare/``, where new
spools take it.  Rename first, empty later: a crash leaves a whole file in
``retired/`` or ``spare/``, where nothing reads it as mail.  What a dead
process left in ``retired/`` is released by :meth:`Spares.adopt`, which the
queue's recovery calls.

A file with a second name (an unpacking cut short links the packed file
into ``data/``) is never kept: emptying it would empty that name's message.
"""

from __future__ import annotations

import contextlib
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Iterable

from twistmail.durable import fsync_dir

#: Files kept in spare/ and retired/ together; beyond that they are unlinked.
SPARE_MAX = 256
#: Retired files released together, after one fsync of each directory they left.
RELEASE_BATCH = 32
#: A batch older than this (seconds) is released at the next retirement.
RELEASE_AGE = 1.0
#: Names of spare/ a process tries from one listing: processes that listed
#: together take from the same names, so a long list goes stale.
_TAKE_TRIES = 8
#: New files made without looking again after spare/ was found empty.
_SKIP = 16
#: Retirements between two counts of what is kept (other processes add and take).
_RECOUNT = 32


def _names(path: str) -> list[str]:
    """A directory's entries; none when it cannot be read (then nothing is reused)."""
    try:
        return [n for n in os.listdir(path) if not n.startswith(".")]
    except OSError:
        return []


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


class Spares:
    """The spare files of one queue directory, for one process (and its threads)."""

    def __init__(self, root: str, directories: Callable[[], Iterable[str]]) -> None:
        self.spare = f"{root}/spare"
        self.retired = f"{root}/retired"
        #: Every directory a retired file may have left, for :meth:`adopt`.
        self._directories = directories
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._pending_dirs: set[str] = set()
        self._pending_since = 0.0
        #: What spare/ and retired/ held at the last count, plus what this
        #: process kept since; None until the first count.
        self._count: int | None = None
        self._since_count = 0
        self._full = 0
        #: Names from the last listing of spare/, and the pid that listed them.
        self._names: list[str] = []
        self._names_pid = 0
        self._skip = 0

    # -- retiring

    def retire(self, path: str, name: str) -> bool:
        """Take ``path``, a file of mail that is done, out of its directory:
        kept for reuse while there is room, else unlinked.  False if it was gone."""
        if not self._room():
            return _unlink(path)
        try:
            os.rename(path, f"{self.retired}/{name}")
        except OSError:  # gone, or no retired/ (a queue made by an older version)
            return _unlink(path)
        batch = None
        now = time.monotonic()
        with self._lock:
            if not self._pending:
                self._pending_since = now
            self._pending.append(name)
            self._pending_dirs.add(os.path.dirname(path))
            if len(self._pending) >= RELEASE_BATCH or now - self._pending_since >= RELEASE_AGE:
                batch, dirs = self._pending, self._pending_dirs
                self._pending, self._pending_dirs = [], set()
        if batch is not None:
            self._release(batch, dirs)
        return True

    def flush(self) -> None:
        """Release this process's retired files now."""
        with self._lock:
            batch, dirs = self._pending, self._pending_dirs
            self._pending, self._pending_dirs = [], set()
        if batch:
            self._release(batch, dirs)

    def adopt(self) -> int:
        """Release every retired file, also those a dead process left; how many.

        Listed before the fsyncs: a file retired after the listing may have
        left a directory whose fsync had already begun."""
        names = _names(self.retired)
        if names:
            self._release(names, self._directories())
        return len(names)

    def _release(self, names: list[str], directories: Iterable[str]) -> None:
        try:
            for d in directories:
                fsync_dir(d)
        except OSError:
            return  # kept in retired/ until a later adopt()
        for name in names:
            path = f"{self.retired}/{name}"
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    os.truncate(path, 0)
                    os.rename(path, f"{self.spare}/{name}")
                    continue
            with contextlib.suppress(OSError):  # not for reuse, or no spare/ to go to
                _unlink(path)

    def _room(self) -> bool:
        with self._lock:
            if self._full:
                self._full -= 1
                return False
            if self._count is None or self._since_count >= _RECOUNT:
                self._count = len(_names(self.spare)) + len(_names(self.retired))
                self._since_count = 0
            if self._count >= SPARE_MAX:
                self._full, self._count = _RECOUNT, None
                return False
            self._count += 1
            self._since_count += 1
            return True

    # -- taking

    def take(self, dest: str) -> int | None:
        """A spare renamed to ``dest``, open for writing and empty; None if none."""
        if self._names_pid != os.getpid():  # forked: list for this process
            self._names, self._names_pid, self._skip = [], os.getpid(), 0
        for _ in range(2 * _TAKE_TRIES):
            try:
                name = self._names.pop()
            except IndexError:
                if self._skip:
                    self._skip -= 1
                    return None
                names = _names(self.spare)
                if not names:
                    self._skip = _SKIP
                    return None
                self._names = random.sample(names, min(len(names), _TAKE_TRIES))
                continue
            source = f"{self.spare}/{name}"
            try:
                os.rename(source, dest)
            except FileNotFoundError:
                if os.path.lexists(source):
                    return None  # it is dest's directory that is missing
                continue  # another process took it
            except OSError:
                return None
            return self._open(dest)
        return None

    @staticmethod
    def _open(path: str) -> int | None:
        fd = None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.ftruncate(fd, 0)
                return fd
        except OSError:  # a link, a directory, a file of another owner
            pass
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(path)
        return None
