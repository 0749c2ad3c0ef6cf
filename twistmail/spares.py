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
Nor is a file without its owner's write permission: a queued file linked
into a mailbox is made read-only (``twistmail.maildir``), and once the
mailbox's user has deleted it there, that name may be gone only in memory,
which no fsync of the queue's directories settles.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import random
import stat
import threading
import time
from collections.abc import Callable, Iterable

from twistmail.durable import fsync_dir
from twistmail.durable import unlink as _unlink

#: Files kept in spare/ and retired/ together; beyond that they are unlinked
#: (by a thread of the process: see Spares._discard_later).
SPARE_MAX = 256
#: Retired files released together, after one fsync of each directory they left.
RELEASE_BATCH = 32
#: A batch older than this (seconds) is released at the next retirement.
RELEASE_AGE = 1.0
#: Names of spare/ a process tries from one listing: processes that listed
#: together take from the same names, so a long list goes stale.
_TAKE_TRIES = 8
#: New files made without looking again after spare/ was found empty.
_SKIP = 2
#: Retirements between two counts of what is kept (other processes add and
#: take): several processes retiring at once may keep a few more than SPARE_MAX.
_RECOUNT = 32


def _listing(path: str) -> list[str] | None:
    """A directory's entries; None when it cannot be read."""
    try:
        return [n for n in os.listdir(path) if not n.startswith(".")]
    except OSError:
        return None


def _names(path: str) -> list[str]:
    return _listing(path) or []


def _discarding(paths: queue.SimpleQueue[str]) -> None:
    while True:
        _discard(paths.get())


def _is_file(path: str) -> bool:
    """A plain, writable file with no other name: the only kind kept and reused."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return _reusable(st)


def _reusable(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and bool(st.st_mode & stat.S_IWUSR)


def _discard(path: str) -> None:
    """Remove what is not for reuse, whatever it is; leave what cannot be removed."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(path)


class Spares:
    """The spare files of one queue directory, for one process (and its threads)."""

    def __init__(self, root: str, directories: Callable[[], Iterable[str]],
                 attributes: tuple[str, ...] = ()) -> None:
        self.spare = f"{root}/spare"
        self.retired = f"{root}/retired"
        #: Every directory a retired file may have left, for :meth:`adopt`.
        self._directories = directories
        #: Extended attributes of the old message, removed with its bytes.
        self._attributes = attributes
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
        self._at_exit = 0  # the pid that registered flush() to run at its exit
        #: Files for the discarding thread of process ``_discards_pid``.
        self._discards: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._discards_pid = 0

    # -- retiring

    def retire(self, path: str, name: str, also: str | None = None) -> bool:
        """Take ``path``, a file of mail that is done, out of its directory:
        kept for reuse while there is room, else unlinked.  False if it was gone.

        ``also``: a directory whose change must be on disk before the file is
        reused as well, such as the queue that held the message's envelope
        file (without it, a power cut could bring back the envelope
        without its body)."""
        # A file with another name (see the module docstring) keeps that one.
        if not _is_file(path):
            return _unlink(path)
        kept = self._room()
        try:
            os.rename(path, f"{self.retired}/{name}")
        except OSError:  # gone, or no retired/ (a queue made by an older version)
            return _unlink(path)
        if not kept:
            self._discard_later(f"{self.retired}/{name}")
            return True
        batch = None
        now = time.monotonic()
        with self._lock:
            self._flush_at_exit()
            if not self._pending:
                self._pending_since = now
            self._pending.append(name)
            self._pending_dirs.add(os.path.dirname(path))
            if also is not None:
                self._pending_dirs.add(also)
            if len(self._pending) >= RELEASE_BATCH or now - self._pending_since >= RELEASE_AGE:
                batch, dirs = self._pending, self._pending_dirs
                self._pending, self._pending_dirs = [], set()
        if batch is not None:
            self._release(batch, dirs)
        return True

    def _discard_later(self, path: str) -> None:
        """Unlink ``path`` in this process's discarding thread.

        Unlinking a file of mail frees its blocks, and the kernel waits for
        its bitmaps: 80-170 microseconds in which a QMSF job delivered
        nothing.  The file is out of its queue already (in retired/); one
        that a process ending leaves there is released by adopt()."""
        with self._lock:
            if self._discards_pid != os.getpid():  # none yet, or forked: start one
                self._discards = queue.SimpleQueue()
                self._discards_pid = os.getpid()
                threading.Thread(target=_discarding, args=(self._discards,), daemon=True,
                                 name="spare-discard").start()
            self._discards.put(path)
            self._flush_at_exit()

    def _flush_at_exit(self) -> None:
        """Under the lock: a process that ends releases its batch and
        discards what waits (one that ends by os._exit calls flush itself)."""
        if self._at_exit != os.getpid():
            self._at_exit = os.getpid()
            atexit.register(self.flush)

    def flush(self) -> None:
        """Release this process's retired files now, and discard those it may not keep."""
        with self._lock:
            batch, dirs = self._pending, self._pending_dirs
            self._pending, self._pending_dirs = [], set()
            discards = self._discards if self._discards_pid == os.getpid() else None
        if batch:
            self._release(batch, dirs)
        while discards is not None:  # beside the thread: each path goes to one of them
            try:
                path = discards.get_nowait()
            except queue.Empty:
                break
            _discard(path)

    def adopt(self) -> int:
        """Release every retired file, also those a dead process left; how many.

        Listed before the fsyncs: a file retired after the listing may have
        left a directory whose fsync had already begun."""
        names = []
        for name in _names(self.retired):
            if _is_file(f"{self.retired}/{name}"):
                names.append(name)
            else:
                _discard(f"{self.retired}/{name}")
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
                if _is_file(path):
                    os.truncate(path, 0)
                    for attribute in self._attributes:
                        with contextlib.suppress(OSError):  # ENODATA: it had none
                            os.removexattr(path, attribute)
                    os.rename(path, f"{self.spare}/{name}")
                    continue
            _discard(path)  # not for reuse, or no spare/ to go to

    def _room(self) -> bool:
        with self._lock:
            if self._full:
                self._full -= 1
                return False
            if self._count is None or self._since_count >= _RECOUNT:
                spare = _listing(self.spare)
                if spare is None:  # what could not be listed could not be taken
                    self._full = _RECOUNT
                    return False
                self._count = len(spare) + len(_names(self.retired))
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
            if not _is_file(source):
                _discard(source)
                continue
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
            # O_NONBLOCK: a FIFO with no reader fails instead of waiting for one.
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            st = os.fstat(fd)
            if _reusable(st):
                os.ftruncate(fd, 0)
                return fd
        except OSError:  # a link, a directory, a file of another owner
            pass
        if fd is not None:
            os.close(fd)
        _discard(path)
        return None
