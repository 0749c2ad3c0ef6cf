"""The durable message spool: Postfix's queue discipline on plain files.

Role: every message the appliance has accepted lives here until its next
holder (a mailbox, a remote MX, a nondelivery notice) has it durably.  SMTP
server jobs and the API enqueue through :meth:`FileQueue.new_spool`; the
bridge moves, updates and removes; ``wrkq`` only reads.

Files, all under ``<datadir>/queue/`` (mode 0700 directories, 0600 files):

- ``tmp/<id>.<pid>.body`` and ``tmp/<id>.<pid>.json``: files being written.
  The writer's pid is in the name so :meth:`FileQueue.recover` can tell an
  abandoned file (its writer is dead) from one still being written.
- ``data/<id>``: the message body, immutable once committed.
- ``<QUEUE>/<id>.json``, one directory per name in
  :data:`twistmail.interfaces.QUEUES`: the envelope that puts the message in
  that queue.  A message is "in" a queue exactly when its envelope is there.
- ``QTMSINQ/<id>.msg`` and ``QTMSOUTQ/<id>.msg``: a *packed* message, as
  SMTP and the API commit mail: the body, with the envelope in the extended
  attribute ``user.twistmail.envelope``.  One file instead of two: the
  commit costs 2 fsyncs and one inode, and removing a delivered message one
  rename into ``retired/``.  The first new envelope or move unpacks it
  (:meth:`FileQueue.unpack`), so no other queue holds packed files
  (``corrupt/`` aside).  Copies of a queue must keep extended attributes
  (``cp -a``, ``rsync -X``, ``tar --xattrs``); a packed file found without
  its attribute goes to ``corrupt/`` whole.
- The body file of a message for one local recipient begins with the trace
  fields its mailbox copy gets (Return-Path, Delivered-To), counted by the
  envelope's ``trace``: the message itself starts after them, and every
  reader of the body skips them.  Local delivery then links the file into
  the Maildir as it is instead of writing a copy (:mod:`twistmail.maildir`);
  the file, with a second name, is never emptied for reuse.
- ``retired/<id>`` and ``spare/<id>``: the file of a message that left the
  queue, kept for the next new message to take instead of a new inode
  (:mod:`twistmail.spares`).  Nothing reads them: what is there is in no
  queue.

Durability contract (DESIGN.md §2, queue rules 1, 2 and 4):

- :meth:`Spool.commit` into QTMSINQ or QTMSOUTQ sets the envelope attribute on the body
  file, fsyncs it, renames it into the queue and fsyncs the queue directory:
  2 fsyncs.  Elsewhere (or without extended attributes) it fsyncs the body,
  renames it into ``data/``, fsyncs ``data/``, writes and fsyncs the
  envelope in ``tmp/``, renames it into the queue and fsyncs the queue
  directory: 4 fsyncs.  The body is visible before the envelope, so no
  reader ever finds an envelope without its body; only after ``commit``
  returns may SMTP answer 250.
- Unpacking links the packed file into ``data/`` (fsync), writes the
  envelope file beside it (fsync), then removes the packed file (fsync);
  recovery removes a packed file that has an envelope file beside it.
- :meth:`FileQueue.move` is one ``rename`` into the target, and a new
  envelope first replaces the old one in the source (written to ``tmp/``,
  renamed over it): a process killed at any step leaves the message in
  exactly one of the two queues.  A crash of the machine may bring back
  both directory entries of a rename not yet written back; then
  :meth:`FileQueue.recover` keeps the newer envelope.  It knows which one
  that is because every envelope file carries a write ``stamp``
  (nanoseconds) and a new envelope gets one strictly greater than the old
  one's, even if the clock steps back.
- :meth:`FileQueue.update` replaces an envelope atomically (tmp, rename,
  directory fsync); :meth:`FileQueue.remove` deletes the envelope first, then
  the body, so a crash never leaves an envelope whose body is gone.
- :meth:`FileQueue.recover` removes what crashed writers left (dead pid or
  older than a day in ``tmp/``; bodies no envelope names, once older than an
  hour, because a commit in another process has a body without envelope for
  a few milliseconds), moves unreadable envelopes (or envelopes whose body
  is missing) to ``corrupt/`` keeping the body, and resolves a message found
  in two queues.  In QTMSINQ, QTMSOUTQ and the retry queues, whose every
  message the bridge reads anyway, the check is left to whoever reads a
  message (:meth:`FileQueue.set_aside`): a restart with a long backlog does
  not read every envelope before the first delivery, and a busy outbound
  queue is not read twice.  It must not run concurrently with moves made by
  another thread of the same owner (the bridge runs it from its queue
  manager).

Everything here is synchronous and may block on disk: code in a reactor calls
it through ``deferToThread``.  Settings honoured: ``system.datadir`` (through
:meth:`FileQueue.for_settings`).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import json
import math
import os
import re
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
from attrs import validators as v
from zope.interface import implementer

from twistmail.durable import fsync_dir
from twistmail.durable import unlink as _unlink
from twistmail.interfaces import CORRUPT, QTMSINQ, QTMSOUTQ, QTMSRTQ1, QTMSRTQ2, QUEUES, IQueue
from twistmail.spares import Spares

#: Recipient states.  ``pending`` and ``retry`` still need work; the others are final.
PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
RETRY = "retry"
RELAYED = "relayed"
STATES = (PENDING, DELIVERED, FAILED, RETRY, RELAYED)
FINAL_STATES = frozenset((DELIVERED, FAILED, RELAYED))

#: The envelope note of a message an ETRN or ``wrkq --retry`` took from the
#: retry queues before its retry was due: the try does not count, and the
#: message keeps its next try (see the bridge's outbound ``_settle_locked``).
EARLY = "early_for_etrn"

#: Version of the envelope JSON; readers ignore keys they do not know.
FORMAT = 1

#: The extended attribute that holds the envelope of a packed message.
ENVELOPE_ATTR = "user.twistmail.envelope"
#: A larger envelope (many recipients) goes to an envelope file: ext4 holds
#: an attribute's value in one block.
PACKED_MAX = 3072
#: The queues new messages are committed to packed: where SMTP and the API
#: put them, and where most leave from without a change of envelope.
PACKABLE = (QTMSINQ, QTMSOUTQ)
#: Queues whose every message the bridge reads (QMSF jobs, the outbound
#: scan): those readers set aside what they cannot read, not recovery.
CHECKED_BY_READERS = frozenset((QTMSINQ, QTMSOUTQ, QTMSRTQ1, QTMSRTQ2))
#: Where packed files may be: those, and corrupt/ for damaged ones.
_PACKED_IN = frozenset((*PACKABLE, CORRUPT))
_NO_ATTRS = frozenset((errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS))

TMP_MAX_AGE = 24 * 3600.0
ORPHAN_MIN_AGE = 3600.0

_ID_RE = re.compile(r"[0-9a-f]{22}")
_ID_LEN = 22
_id_lock = threading.Lock()
_last_ns = 0


class CorruptEnvelope(ValueError):
    """An envelope file that cannot be read as an envelope."""


# -- queue ids -------------------------------------------------------------------


def new_queue_id() -> str:
    """A fresh queue id: 16 hex digits of nanoseconds since the epoch, 6 random.

    Sorting ids sorts messages by creation time, so a directory listing gives
    the oldest first without reading any file.  Within a process the time part
    strictly increases; between processes the random part keeps ids apart
    without any coordination.  Only ``[0-9a-f]``, so an id is safe in file
    names and in Maildir names.
    """
    global _last_ns
    with _id_lock:
        ns = max(time.time_ns(), _last_ns + 1)
        _last_ns = ns
    return f"{ns:016x}{secrets.token_hex(3)}"


def is_queue_id(text: str) -> bool:
    return _ID_RE.fullmatch(text) is not None


def id_time(queue_id: str) -> float:
    """When the id was made (seconds since the epoch)."""
    return int(_check_id(queue_id)[:16], 16) / 1e9


def _check_id(queue_id: str) -> str:
    """Ids become file names: anything else could point outside the queue."""
    if not isinstance(queue_id, str) or not is_queue_id(queue_id):
        raise ValueError(f"not a queue id: {queue_id!r}")
    return queue_id


# -- envelopes -------------------------------------------------------------------


def _number(value: Any) -> float:
    """A finite JSON number as float; strings, booleans, NaN are damage, not times."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def _optional_number(value: Any) -> float | None:
    return None if value is None else _number(value)


def _optional_tuple(value: Any) -> tuple[Any, ...] | None:
    return None if value is None else tuple(value)


def _count(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name}: expected a count, got {value!r}")


def _valid_id(_inst: Any, _attribute: attrs.Attribute, value: Any) -> None:
    _check_id(value)


_str = v.instance_of(str)
_opt_str = v.optional(v.instance_of(str))


@attrs.frozen
class Recipient:
    """One recipient and how far its delivery has gone."""

    address: str = attrs.field(validator=_str)
    state: str = attrs.field(default=PENDING, validator=v.in_(STATES))
    orcpt: str | None = attrs.field(default=None, validator=_opt_str)
    notify: tuple[str, ...] | None = attrs.field(
        default=None,
        converter=_optional_tuple,
        validator=v.optional(v.deep_iterable(_str, v.instance_of(tuple))),
    )
    kind: str = attrs.field(default="to", validator=_str)
    attempts: int = attrs.field(default=0, validator=_count)
    last_error: str | None = attrs.field(default=None, validator=_opt_str)
    #: The server whose reply ``last_error`` quotes: a notice's Remote-MTA.
    mta: str | None = attrs.field(default=None, validator=_opt_str)
    resolved: str | None = attrs.field(default=None, validator=_opt_str)
    delivered_at: float | None = attrs.field(default=None, converter=_optional_number)

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    def evolve(self, **changes: Any) -> Recipient:
        return attrs.evolve(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _field_names(Recipient)}

    @classmethod
    def from_dict(cls, data: Any) -> Recipient:
        if not isinstance(data, dict):
            raise TypeError(f"a recipient must be an object, got {data!r}")
        return cls(**_known(cls, data))


@attrs.frozen
class Envelope:
    """What the queue knows about a message besides its body.

    ``originator`` ``""`` is the null reverse-path (``MAIL FROM:<>``).
    ``history`` holds JSON objects (journal references, moves) in order.
    """

    id: str = attrs.field(validator=_valid_id)
    originator: str = attrs.field(validator=_str)
    recipients: tuple[Recipient, ...] = attrs.field(
        converter=tuple, validator=v.deep_iterable(v.instance_of(Recipient))
    )
    received: float = attrs.field(converter=_number)
    client_ip: str | None = attrs.field(default=None, validator=_opt_str)
    helo: str | None = attrs.field(default=None, validator=_opt_str)
    size: int = attrs.field(default=0, validator=_count)
    #: Octets at the start of the body file that are not the message: the
    #: trace fields local delivery adds (see :meth:`Spool.write_trace`).
    #: Every reader of the body starts after them.
    trace: int = attrs.field(default=0, validator=_count)
    source: str = attrs.field(default="smtp", validator=_str)
    attempts: int = attrs.field(default=0, validator=_count)
    next_try: float | None = attrs.field(default=None, converter=_optional_number)
    ret: str | None = attrs.field(default=None, validator=_opt_str)
    envid: str | None = attrs.field(default=None, validator=_opt_str)
    auth: str | None = attrs.field(default=None, validator=_opt_str)
    message_id: str | None = attrs.field(default=None, validator=_opt_str)
    history: tuple[Any, ...] = attrs.field(default=(), converter=tuple)

    @classmethod
    def new(
        cls, originator: str, recipients: Any, received: float | None = None, **fields: Any
    ) -> Envelope:
        """An envelope with a fresh id; recipients may be plain addresses."""
        rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients)
        when = time.time() if received is None else received
        return cls(new_queue_id(), originator, rcpts, when, **fields)

    @property
    def pending(self) -> tuple[Recipient, ...]:
        """Recipients that still need a delivery attempt."""
        return tuple(r for r in self.recipients if not r.done)

    @property
    def done(self) -> bool:
        return all(r.done for r in self.recipients)

    def evolve(self, **changes: Any) -> Envelope:
        return attrs.evolve(self, **changes)

    def with_recipients(self, recipients: Any) -> Envelope:
        return attrs.evolve(self, recipients=tuple(recipients))

    def with_recipient(self, address: str, **changes: Any) -> Envelope:
        """Change the recipient(s) with this address; KeyError if there is none."""
        if not any(r.address == address for r in self.recipients):
            raise KeyError(address)
        return self.with_recipients(
            r.evolve(**changes) if r.address == address else r for r in self.recipients
        )

    def note(self, event: dict[str, Any]) -> Envelope:
        return attrs.evolve(self, history=(*self.history, event))

    def to_dict(self) -> dict[str, Any]:
        """What ``attrs.asdict`` gives, built directly: every message is written once."""
        data = {"v": FORMAT}
        for name in _field_names(Envelope):
            data[name] = getattr(self, name)
        data["recipients"] = tuple(r.to_dict() for r in self.recipients)
        data["history"] = tuple(copy.deepcopy(h) if isinstance(h, (dict, list)) else h
                                for h in self.history)
        return data

    def to_json(self) -> bytes:
        return _dump(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Envelope:
        if not isinstance(data, dict):
            raise TypeError("an envelope must be a JSON object")
        fields = _known(cls, data)
        fields["recipients"] = tuple(Recipient.from_dict(r) for r in data["recipients"])
        return cls(**fields)

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        """Parse an envelope file; any damage is a :class:`CorruptEnvelope`."""
        try:
            return cls.from_dict(json.loads(data))
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
                RecursionError) as e:  # a huge number, deep nesting: damage too
            raise CorruptEnvelope(f"{type(e).__name__}: {e}") from None


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Only the keys this version knows: newer writers may add fields."""
    names = _name_set(cls)
    return {k: val for k, val in data.items() if k in names}


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(a.name for a in attrs.fields(cls))


@functools.cache
def _name_set(cls: type) -> frozenset[str]:
    return frozenset(_field_names(cls))


def _dump(data: dict[str, Any]) -> bytes:
    """ASCII JSON: strings decoded with surrogateescape (8-bit SMTP) still round-trip."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode("ascii")


# -- listings and recovery reports -----------------------------------------------


@attrs.frozen
class QueueEntry:
    """One line of a queue listing (``wrkq``)."""

    queue: str
    id: str
    age: float
    size: int
    originator: str | None
    recipients: tuple[Recipient, ...]
    attempts: int
    next_try: float | None
    error: str | None = None
    #: Sent before its retry was due (wrkq --retry, ETRN): its next try is
    #: the retry it keeps, not a wait.
    early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, filter=lambda a, _: a.name != "early")


@attrs.frozen
class CorruptItem:
    id: str
    queue: str
    reason: str


@attrs.frozen
class DuplicateItem:
    id: str
    kept: str
    removed: tuple[str, ...]


@attrs.frozen
class RecoveryReport:
    """What :meth:`FileQueue.recover` did, for the caller to journal."""

    tmp_removed: tuple[str, ...] = ()
    corrupt: tuple[CorruptItem, ...] = ()
    duplicates: tuple[DuplicateItem, ...] = ()
    orphans_removed: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return not (self.tmp_removed or self.corrupt or self.duplicates or self.orphans_removed)

    def unfinished(self) -> list[str]:
        """The ids of new messages whose writer died before queueing them."""
        return list(dict.fromkeys(
            name.split(".")[0] for name in self.tmp_removed
            if name.endswith((".body", ".new")) and is_queue_id(name.split(".")[0])))

    def counts(self) -> dict[str, int]:
        """How many of each kind, for a one-line journal entry."""
        return {
            "tmp_removed": len(self.tmp_removed),
            "corrupt": len(self.corrupt),
            "duplicates": len(self.duplicates),
            "orphans_removed": len(self.orphans_removed),
        }

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


# -- file helpers ----------------------------------------------------------------


def _read_envelope_file(path: Path | str) -> bytes:
    """The bytes of an envelope file; CorruptEnvelope when it is no regular file.

    A FIFO with an envelope's name (put there by hand, or by a tool gone
    wrong) held the bridge's reading thread, and every wrkq, for ever:
    opened without waiting, and refused.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptEnvelope(f"{Path(path).name} is not a regular file")
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _write_synced(path: Path | str, data: bytes) -> None:
    """Write and fsync a new file; on failure it is removed, not left.

    A full disk fails the write: the empty file it left in tmp/ stayed
    until its writer died or a day passed, thousands of them in a backlog
    retried through a full disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_pid(name: str) -> int | None:
    """The pid in ``<id>.<pid>.<ext>``, or None for a name we did not make."""
    parts = name.split(".")
    if len(parts) != 3 or not is_queue_id(parts[0]) or not parts[1].isdigit():
        return None
    return int(parts[1])


# -- the spool -------------------------------------------------------------------


class Spool:
    """The body writer of one new message, from the first byte to ``commit``.

    Use as a context manager so that any exception before ``commit`` aborts.
    """

    def __init__(self, queue: FileQueue, envelope: Envelope | None,
                 queue_id: str | None = None) -> None:
        self._queue = queue
        #: None: the envelope comes with ``commit``.
        self.envelope = envelope
        self.id = envelope.id if envelope is not None else _check_id(queue_id)
        self.size = 0
        self.trace = 0
        pid = os.getpid()
        self._body_tmp = f"{queue._tmp}/{self.id}.{pid}.body"
        # ".new": a new message's, which recovery tells from an update's.
        self._env_tmp = f"{queue._tmp}/{self.id}.{pid}.new"
        self._body = queue._body(self.id)
        self._env_final: str | None = None
        self._committed = False
        self._aborted = False
        fd = queue.spares.take(self._body_tmp)
        #: Whether the body file is a spare: a crash may have left it the
        #: envelope attribute of its last message.
        self._reused = fd is not None
        if fd is None:
            fd = os.open(self._body_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = open(fd, "wb", buffering=1 << 16)  # sized: no isatty probe

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    @property
    def active(self) -> bool:
        """Neither committed nor aborted yet."""
        return not (self._committed or self._aborted)

    def write(self, data: bytes) -> None:
        if not self.active:
            raise ValueError(f"spool {self.id} is closed")
        self._file.write(data)
        self.size += len(data)

    def write_trace(self, trace: bytes) -> None:
        """Begin the body file with the trace fields local delivery would add
        (:func:`twistmail.maildir.trace_prefix`), before the message itself.

        A message for one local recipient is then, byte for byte, the copy its
        mailbox gets, and delivery hard-links the queued file into the Maildir
        instead of writing and syncing a copy.  The envelope's ``trace`` says
        how many octets to skip; ``size`` counts only the message.
        """
        if self.size:
            raise ValueError(f"spool {self.id}: the trace must come first")
        self.write(trace)
        self.trace = len(trace)

    def commit(
        self,
        queue: str,
        envelope: Envelope | None = None,
        before_publish: Callable[[], None] | None = None,
    ) -> str:
        """Make body and envelope durable in ``queue``; return the queue id.

        The envelope's ``size`` is set to the bytes written (less the
        trace, which sets its ``trace``).  If anything
        fails, everything written is removed again and the error raised: the
        client must then get a temporary failure and retry.
        ``before_publish`` runs once everything is durable except the rename
        that makes the message visible, so what it records (journal entries)
        precedes anything a reader of the queue does with the message.
        """
        if not self.active:
            raise ValueError(f"spool {self.id} is closed")
        if envelope is None and self.envelope is None:
            raise ValueError(f"spool {self.id} has no envelope to commit")
        env = envelope or self.envelope
        if env.size != self.size - self.trace or env.trace != self.trace:
            env = attrs.evolve(env, size=self.size - self.trace, trace=self.trace)
        if env.id != self.id:
            raise ValueError(f"envelope id {env.id} is not the spool's id {self.id}")
        target = self._queue._envelope(queue, self.id)
        try:
            if not self._commit_packed(env, queue, before_publish):
                self._commit(env, target, self._queue._dirs[queue], before_publish)
        except BaseException:
            self.abort()
            raise
        self._committed = True
        return self.id

    def _commit(
        self, env: Envelope, target: str, directory: str,
        before_publish: Callable[[], None] | None,
    ) -> None:
        q = self._queue
        self._file.flush()
        fd = self._file.fileno()
        if self._reused:
            with contextlib.suppress(OSError):  # ENODATA: it had none
                os.removexattr(fd, ENVELOPE_ATTR)
        os.utime(fd)  # the orphan age in recover() counts from the commit
        os.fsync(fd)
        self._file.close()
        os.rename(self._body_tmp, self._body)
        fsync_dir(q._data)
        _write_synced(self._env_tmp, q.envelope_bytes(env))
        if before_publish is not None:
            before_publish()
        os.rename(self._env_tmp, target)
        self._env_final = target
        fsync_dir(directory)

    def _commit_packed(
        self, env: Envelope, queue: str, before_publish: Callable[[], None] | None
    ) -> bool:
        """QTMSINQ, QTMSOUTQ: one file, the envelope in an attribute of the body (2 fsyncs).

        False, with nothing published, for another queue, a large envelope or
        a file system without extended attributes: the caller writes two files.
        """
        q = self._queue
        data = q.envelope_bytes(env)
        if queue not in PACKABLE or not q.packing or len(data) > PACKED_MAX:
            return False
        self._file.flush()
        fd = self._file.fileno()
        try:
            os.setxattr(fd, ENVELOPE_ATTR, data)
        except OSError as e:
            if e.errno in _NO_ATTRS:
                q.packing = False
                return False
            if e.errno in (errno.E2BIG, errno.ERANGE, errno.ENOSPC):
                return False
            raise
        os.utime(fd)  # the orphan age in recover() counts from the commit
        os.fsync(fd)
        self._file.close()
        if before_publish is not None:
            before_publish()
        target = q._packed(queue, self.id)
        os.rename(self._body_tmp, target)
        self._env_final = target
        fsync_dir(q._dirs[queue])
        return True

    def abort(self) -> None:
        """Remove everything this spool wrote; a no-op after a successful commit."""
        if not self.active:
            return
        self._aborted = True
        # Never raises: on a full disk the close cannot flush what is being
        # thrown away (it still closes the file), and an abort that stopped
        # there left the partial body in tmp/ for a day, where the space ran out.
        with contextlib.suppress(OSError):
            self._file.close()
        if self._env_final is not None:
            with contextlib.suppress(OSError):
                if _unlink(self._env_final):
                    fsync_dir(os.path.dirname(self._env_final))
        for path in (self._env_tmp, self._body):
            with contextlib.suppress(OSError):
                _unlink(path)
        # Kept for the next message like the file of one delivered: a client
        # whose messages are refused at their end must not use the spares up.
        with contextlib.suppress(OSError):
            self._queue.spares.retire(self._body_tmp, self.id)


# -- the queue -------------------------------------------------------------------


@implementer(IQueue)
class FileQueue:
    """The spool under one directory (normally ``<datadir>/queue``).

    One owner per message at a time: the spool until commit, then the bridge.
    """

    def __init__(self, root: Path | str, *, create: bool = True) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.data = self.root / "data"
        # Plain strings for the paths every message goes through: building
        # them with pathlib was about a fifth of the bridge's time per message.
        self._dirs = {q: str(self.root / q) for q in QUEUES}
        self._data = str(self.data)
        self._tmp = str(self.tmp)
        # tmp/: an aborted spool's file is retired from there.
        self.spares = Spares(str(self.root),
                             lambda: (*self._dirs.values(), self._data, self._tmp),
                             (ENVELOPE_ATTR,))
        self._odd_tmp: set[str] = set()
        #: Whether new messages for PACKABLE queues are packed; off for good once
        #: the file system refuses extended attributes.
        self.packing = True
        #: Envelope files recovery found sound, by path, with the mtime it saw:
        #: an unchanged file is not read again at the next recovery.
        self._sound: dict[str, int] = {}
        if create:
            self._make_dirs()

    @classmethod
    def for_settings(cls, settings: Any, *, create: bool = True) -> FileQueue:
        return cls(Path(settings.datadir) / "queue", create=create)

    def _make_dirs(self) -> None:
        """Create the layout; fsync parents once so the first commit cannot vanish."""
        made = not self.root.is_dir()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        spares = (Path(self.spares.spare), Path(self.spares.retired))
        for d in (self.tmp, self.data, *spares, *(self.root / q for q in QUEUES)):
            if not d.is_dir():
                d.mkdir(mode=0o700, exist_ok=True)
                made = True
        if made:
            fsync_dir(self.root)
            fsync_dir(self.root.parent)

    # paths

    def queue_dir(self, queue: str) -> Path:
        if queue not in QUEUES:
            raise ValueError(f"not a queue: {queue!r}; allowed: {', '.join(QUEUES)}")
        return self.root / queue

    def envelope_path(self, queue: str, queue_id: str) -> Path:
        return Path(self._envelope(queue, queue_id))

    def body_damage(self, queue: str, envelope: Envelope,
                    body: Path | str | None = None) -> str | None:
        """A body cut short (a crash of the disk, a hand in the queue) would go
        out as a shorter message, or an empty one: its size must be the one
        its envelope recorded when the message was received.  ``body``: its
        path, when the caller has looked it up already."""
        try:
            size = os.stat(body or self.body_path(envelope.id, queue)).st_size
        except FileNotFoundError:
            return "body missing"
        if size < envelope.trace:
            return f"body of {size} bytes, shorter than its {envelope.trace} bytes of trace"
        size -= envelope.trace
        if envelope.size and size != envelope.size:
            return f"body of {size} bytes, {envelope.size} when it was received"
        return None

    def body_path(self, queue_id: str, queue: str | None = None) -> Path:
        """The body: in data/, or the packed file itself (the body and nothing else).

        A message packed in ``queue`` is found with one look instead of three.
        """
        if queue in _PACKED_IN:
            packed = self._packed(queue, queue_id)
            if os.path.exists(packed):
                return Path(packed)
        path = self._body(queue_id)
        if not os.path.exists(path):
            for other in PACKABLE:
                packed = self._packed(other, queue_id)
                if other != queue and os.path.exists(packed):
                    return Path(packed)
        return Path(path)

    def _envelope(self, queue: str, queue_id: str) -> str:
        directory = self._dirs.get(queue)
        if directory is None:
            self.queue_dir(queue)  # raises the error that names the queues
        return f"{directory}/{_check_id(queue_id)}.json"

    def _body(self, queue_id: str) -> str:
        return f"{self._data}/{_check_id(queue_id)}"

    def _packed(self, queue: str, queue_id: str) -> str:
        return f"{self._dirs[queue]}/{_check_id(queue_id)}.msg"

    def _entry_file(self, queue: str, queue_id: str) -> str | None:
        """The file that puts the message in ``queue``, envelope file first; None if none."""
        path = self._envelope(queue, queue_id)
        if os.path.exists(path):
            return path
        if queue in _PACKED_IN:
            packed = self._packed(queue, queue_id)
            if os.path.exists(packed):
                return packed
        return None

    def _packed_envelope(self, queue: str, queue_id: str) -> bytes:
        """The envelope of a packed message; KeyError when there is none."""
        if queue not in _PACKED_IN:
            raise KeyError(queue_id)
        try:
            return os.getxattr(self._packed(queue, queue_id), ENVELOPE_ATTR)
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        except OSError as e:
            raise CorruptEnvelope(
                f"packed message without its envelope attribute: {e.strerror}"
            ) from None

    def unpack(self, queue: str, queue_id: str) -> bool:
        """Give a packed message a body in data/ and an envelope file; False if not packed.

        Every new envelope and every move starts here, and so does a reader
        that keeps the body's path while the envelope may change (the path
        of a packed message goes with its first new envelope).  The body is linked
        (not copied) into data/ before the envelope file is written, and the
        packed file goes last, so a crash at any step leaves a message that
        reads the same; recover() removes a packed file that has an envelope
        file beside it.
        """
        if queue not in _PACKED_IN:  # corrupt/ too: a message released from it
            return False
        try:
            data = self._packed_envelope(queue, queue_id)
        except KeyError:
            return False
        packed = self._packed(queue, queue_id)
        try:
            os.link(packed, self._body(queue_id))
        except FileExistsError:
            pass  # an unpacking a crash interrupted got this far
        fsync_dir(self._data)
        tmp = f"{self._tmp}/{queue_id}.{os.getpid()}.json"
        _write_synced(tmp, data)
        os.rename(tmp, self._envelope(queue, queue_id))
        fsync_dir(self._dirs[queue])
        _unlink(packed)
        fsync_dir(self._dirs[queue])
        return True

    def envelope_bytes(self, envelope: Envelope, stamp: int | None = None) -> bytes:
        """The envelope file: the envelope plus the write stamp duplicates are settled by."""
        stamp = time.time_ns() if stamp is None else stamp
        return _dump({**envelope.to_dict(), "stamp": stamp})

    def _tmp_envelope(self, envelope: Envelope, stamp: int | None = None) -> Path:
        path = self.tmp / f"{envelope.id}.{os.getpid()}.json"
        _write_synced(path, self.envelope_bytes(envelope, stamp))
        return path

    # IQueue

    def new_spool(self, envelope: Envelope | None = None) -> Spool:
        if envelope is None:
            # A fresh id: its time part increases within this process and its
            # random part keeps processes apart, so no file has it yet.  The
            # SMTP server takes one per message and pays no lookups for it.
            return Spool(self, None, new_queue_id())
        if os.path.exists(self._body(envelope.id)) or any(
                os.path.exists(self._packed(q, envelope.id)) for q in PACKABLE):
            raise ValueError(f"queue id {envelope.id} is already in use")
        return Spool(self, envelope)

    def load(self, queue: str, queue_id: str) -> Envelope:
        path = self._envelope(queue, queue_id)
        try:
            data = _read_envelope_file(path)
        except FileNotFoundError:
            data = self._packed_envelope(queue, queue_id)
        env = Envelope.from_json(data)
        if env.id != queue_id:
            raise CorruptEnvelope(f"file {queue_id}.json holds the envelope of {env.id}")
        return env

    def list(self, queue: str) -> list[str]:
        try:
            names = os.listdir(self.queue_dir(queue))
        except FileNotFoundError:
            return []
        ids = {n[:-5] for n in names if n.endswith(".json") and is_queue_id(n[:-5])}
        if queue in _PACKED_IN:
            ids.update(n[:-4] for n in names if n.endswith(".msg") and is_queue_id(n[:-4]))
        return sorted(ids)

    def versions(self, queue: str) -> list[tuple[str, tuple[int, ...]]]:
        """The ids in ``queue``, oldest first, each with the identity of its entry file.

        One directory read and one stat per message: a scan of a queue of
        thousands needs no look for each message's file by name.  Every
        change of envelope replaces the file (a new inode), and its times
        and size tell a changed one even where a file system reuses an
        inode at once.  The envelope file wins over a packed message.
        """
        found: dict[str, tuple[int, ...]] = {}
        packed = queue in _PACKED_IN
        try:
            entries = os.scandir(self.queue_dir(queue))
        except FileNotFoundError:
            return []
        with entries:
            for entry in entries:
                name = entry.name
                if name.endswith(".json"):
                    qid = name[:-5]
                elif packed and name.endswith(".msg"):
                    qid = name[:-4]
                    if qid in found:
                        continue
                else:
                    continue
                if not is_queue_id(qid):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found[qid] = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
        return sorted(found.items())

    def update(self, queue: str, envelope: Envelope) -> None:
        """Replace the envelope of a message that stays in ``queue`` (2 fsyncs)."""
        path = self._envelope(queue, envelope.id)
        if not os.path.exists(path) and not self.unpack(queue, envelope.id):
            raise KeyError(envelope.id)
        os.replace(self._tmp_envelope(envelope), path)
        fsync_dir(self._dirs[queue])

    def move(
        self, queue_id: str, source: str, target: str, envelope: Envelope | None = None
    ) -> None:
        """Move a message between queues: one rename (2 fsyncs; 3 with an envelope).

        A new envelope replaces the old one in ``source`` first, and the
        message then moves by one rename: whenever the mover dies, the
        message is in one queue, never in both.  (Writing the new envelope
        into ``target`` and then deleting the old one would leave two copies
        to a mover killed in between, and a reader could act on each.)
        """
        src = self._envelope(source, queue_id)
        dst = self._envelope(target, queue_id)
        if envelope is not None and envelope.id != queue_id:
            raise ValueError(f"envelope id {envelope.id} is not {queue_id}")
        if source == target:
            if envelope is not None:
                self.update(source, envelope)
            elif self._entry_file(source, queue_id) is None:
                raise KeyError(queue_id)
            return
        if not os.path.exists(src):
            self.unpack(source, queue_id)  # only PACKABLE queues hold packed messages
        if envelope is not None:
            # Not made durable on its own: should a crash lose this rename
            # and keep the next, recover() keeps the copy with the newer stamp.
            stamp = max(time.time_ns(), self._stamp(src) + 1)
            os.replace(self._tmp_envelope(envelope, stamp), src)
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        fsync_dir(self._dirs[target])
        if source in _PACKED_IN:
            _unlink(self._packed(source, queue_id))  # left by an interrupted unpacking
        fsync_dir(self._dirs[source])
        if source == CORRUPT:
            _unlink(self._why(queue_id))

    def remove(self, queue: str, queue_id: str, durable: bool = True) -> None:
        """Delete envelope then body; the body stays while another queue holds it.

        The envelope's removal is made durable (a message that came back
        after a crash would be handled twice) unless ``durable`` is False:
        the caller knows handling it twice is harmless (see IQueue.remove).  The body's
        removal never is: a body a crash brings back has no envelope, and
        recovery removes such orphans.
        """
        removed = _unlink(self._envelope(queue, queue_id))
        if queue in _PACKED_IN and self.spares.retire(self._packed(queue, queue_id), queue_id):
            removed = True  # a packed message is one file, envelope and body
        if not removed:
            raise KeyError(queue_id)
        if queue == CORRUPT:
            _unlink(self._why(queue_id))
        if durable:
            fsync_dir(self._dirs[queue])
        body = self._body(queue_id)
        # A packed message has no body in data/: nothing to look for then.
        if os.path.exists(body) and not self._held(queue_id):
            self.spares.retire(body, queue_id, also=None if durable else self._dirs[queue])

    def find(self, queue_id: str) -> str | None:
        """The first queue (in QUEUES order) that holds the message."""
        for queue in QUEUES:
            if self._entry_file(queue, queue_id) is not None:
                return queue
        return None

    def _stamp(self, path: Path | str) -> int:
        """The write stamp of an envelope file; KeyError if it is gone, 0 if unreadable."""
        try:
            if str(path).endswith(".msg"):
                data = json.loads(os.getxattr(path, ENVELOPE_ATTR))
            else:
                data = json.loads(_read_envelope_file(path))
        except FileNotFoundError:
            raise KeyError(Path(path).stem) from None
        except (ValueError, OSError):
            return 0
        stamp = data.get("stamp", 0) if isinstance(data, dict) else 0
        return stamp if isinstance(stamp, int) and not isinstance(stamp, bool) else 0

    # listings

    def entries(self, queue: str | None = None, now: float | None = None) -> Iterator[QueueEntry]:
        """The messages of one queue or of all, oldest first within each queue."""
        now = time.time() if now is None else now
        if queue is not None:
            for queue_id in self.list(queue):
                entry = self._entry(queue, queue_id, now)
                if entry is not None:
                    yield entry
        else:
            listed = self._everywhere(now)
            listed.sort(key=lambda e: (QUEUES.index(e.queue), e.id))
            yield from listed
        if queue in (None, CORRUPT):
            yield from self._more_copies(now)

    def _everywhere(self, now: float) -> list[QueueEntry]:
        """Every message once, in the queue that holds it when its envelope is read.

        The queues are read one after another while the bridge moves mail
        between them: a message moved on between the reads of two queues was
        met in both, one moved back (a retry, to QTMSOUTQ) in neither.  A
        second read finds the latter; each message is then read where it was
        met, and looked for again if it has moved since.
        """
        found: dict[str, list[str]] = {}
        for _ in range(2):
            for q in QUEUES:
                for queue_id in self.list(q):
                    where = found.setdefault(queue_id, [])
                    if q not in where:
                        where.append(q)
        listed: list[QueueEntry] = []
        for queue_id, where in found.items():
            read = [e for q in where if (e := self._entry(q, queue_id, now)) is not None]
            if not read:  # moved (or gone) since it was met
                q = self.find(queue_id)
                entry = None if q is None else self._entry(q, queue_id, now)
                read = [] if entry is None else [entry]
            if len(read) > 1:  # moved on between two reads, or two copies really there
                read = [e for e in read if self._entry_file(e.queue, queue_id)] or read[-1:]
            listed.extend(read)
        return listed

    def _more_copies(self, now: float) -> Iterator[QueueEntry]:
        """Copies set aside after a first one of the same id (``<id>.<ns>.json``):
        the administrator must see them too."""
        for name in sorted(_listdir(self.root / CORRUPT)):
            parts = name.split(".")
            if len(parts) == 3 and is_queue_id(parts[0]) and parts[1].isdigit() and \
                    parts[2] in ("json", "msg"):
                path = self.root / CORRUPT / name
                why = self._reason(f"{parts[0]}.{parts[1]}")
                yield QueueEntry(CORRUPT, parts[0], max(0.0, now - id_time(parts[0])),
                                 _size(path), None, (), 0, None,
                                 error=f"another copy set aside: {name}"
                                 + (f" ({why})" if why else ""))

    def _entry(self, queue: str, queue_id: str, now: float) -> QueueEntry | None:
        try:
            env = self.load(queue, queue_id)
        except KeyError:
            return None
        except CorruptEnvelope as e:
            age = max(0.0, now - id_time(queue_id))
            path = self._entry_file(queue, queue_id)
            if path is not None and path.endswith(".msg"):  # the body itself
                size = _size(path)
            else:
                size = self._body_size(queue_id)
            return QueueEntry(queue, queue_id, age, size, None, (), 0, None, error=str(e))
        age = max(0.0, now - env.received)
        return QueueEntry(
            queue=queue,
            id=queue_id,
            age=age,
            size=env.size,
            originator=env.originator,
            recipients=env.recipients,
            attempts=env.attempts,
            next_try=env.next_try,
            error=self._reason(queue_id) if queue == CORRUPT else None,
            early=any(isinstance(h, dict) and EARLY in h for h in env.history),
        )

    def _body_size(self, queue_id: str) -> int:
        return _size(self.body_path(queue_id))

    # recovery

    def recover(self, now: float | None = None) -> RecoveryReport:
        """Finish or undo what crashed writers left; see the module docstring."""
        now = time.time() if now is None else now
        tmp_removed = self._clean_tmp(now)
        self._finish_unpacking()
        corrupt = self._quarantine_corrupt()
        duplicates = self._settle_duplicates()
        orphans = self._remove_orphans(now)
        self.spares.adopt()
        return RecoveryReport(tmp_removed, corrupt, duplicates, orphans)

    def _clean_tmp(self, now: float) -> tuple[str, ...]:
        removed = []
        for name in sorted(_listdir(self.tmp)):
            path = self.tmp / name
            try:
                mtime = path.lstat().st_mtime
            except FileNotFoundError:
                continue  # its writer just renamed it into place
            pid = _writer_pid(name)
            abandoned = pid is not None and not _pid_alive(pid)
            if not (abandoned or now - mtime > TMP_MAX_AGE):
                continue
            try:
                if _unlink(path):
                    removed.append(name)
            except OSError as e:  # not a file (put there by hand): left, said once
                if name not in self._odd_tmp:
                    self._odd_tmp.add(name)
                    print(f"{path}: cannot be removed: {e.strerror}", file=sys.stderr)
        return tuple(removed)

    def _finish_unpacking(self) -> None:
        """A packed file beside an envelope file of its id: an unpacking a crash cut short."""
        for queue in PACKABLE:
            names = set(_listdir(self._dirs[queue]))
            for name in sorted(names):
                queue_id = name[:-4]
                if not (name.endswith(".msg") and is_queue_id(queue_id)):
                    continue
                if f"{queue_id}.json" in names and self._drop_packed(queue, queue_id):
                    fsync_dir(self._dirs[queue])

    def _drop_packed(self, queue: str, queue_id: str) -> bool:
        """Remove a packed file whose message goes on as envelope file and data/ body.

        The body is linked into data/ first (an unpacking may have been cut
        short before it): the file is the body.  False when it was not there."""
        packed = self._packed(queue, queue_id)
        try:
            os.link(packed, self._body(queue_id))
        except FileExistsError:
            pass
        except FileNotFoundError:
            return False
        fsync_dir(self._data)
        return _unlink(packed)

    def _quarantine_corrupt(self) -> tuple[CorruptItem, ...]:
        """Move unreadable envelopes aside; each file is read once while it is unchanged.

        Recovery runs at every rescan of an idle bridge; reading every
        envelope of a large retry queue each time would cost a core.
        """
        found = []
        sound: dict[str, int] = {}
        for queue in QUEUES:
            if queue == CORRUPT or queue in CHECKED_BY_READERS:
                continue
            for queue_id in self.list(queue):
                path = self._entry_file(queue, queue_id)
                if path is None:
                    continue
                try:
                    mtime = os.stat(path).st_mtime_ns
                except FileNotFoundError:
                    continue
                if self._sound.get(path) == mtime:
                    sound[path] = mtime
                    continue
                reason = self._damage(queue, queue_id)
                if reason is None:
                    sound[path] = mtime
                elif self._to_corrupt(queue, queue_id, reason):
                    found.append(CorruptItem(queue_id, queue, reason))
        self._sound = sound
        return tuple(found)

    def _damage(self, queue: str, queue_id: str) -> str | None:
        try:
            self.load(queue, queue_id)
        except KeyError:
            return None
        except CorruptEnvelope as e:
            return f"unreadable envelope: {e}"
        if not self.body_path(queue_id).exists():
            return "body missing"
        return None

    def set_aside(self, queue: str, queue_id: str, reason: str) -> CorruptItem | None:
        """Move a message found damaged to ``corrupt/``; None if it is gone already."""
        if not self._to_corrupt(queue, queue_id, reason):
            return None
        return CorruptItem(queue_id, queue, reason)

    def _to_corrupt(self, queue: str, queue_id: str, reason: str) -> bool:
        """Keep the damaged envelope (and its body) for the administrator.

        A packed file goes to corrupt/ whole: it is the body."""
        source = self._entry_file(queue, queue_id)
        if source is None:
            return False
        ext = ".msg" if source.endswith(".msg") else ".json"
        target = self.root / CORRUPT / f"{queue_id}{ext}"
        if target.exists():
            target = target.with_name(f"{queue_id}.{time.time_ns()}{ext}")
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return False
        fsync_dir(target.parent)
        fsync_dir(self.queue_dir(queue))
        with contextlib.suppress(OSError):  # what wrkq shows; the 7Y entry has it too
            target.with_suffix(".why").write_text(reason + "\n")
        return True

    def _why(self, name: str) -> Path:
        """Why the message (or copy) ``name`` of corrupt/ was set aside."""
        return self.root / CORRUPT / f"{name}.why"

    def _reason(self, name: str) -> str | None:
        try:
            return self._why(name).read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def _settle_duplicates(self) -> tuple[DuplicateItem, ...]:
        holders: dict[str, list[str]] = {}
        for queue in QUEUES:
            if queue != CORRUPT:
                for queue_id in self.list(queue):
                    holders.setdefault(queue_id, []).append(queue)
        settled = []
        for queue_id, queues in sorted(holders.items()):
            if len(queues) > 1:
                item = self._settle(queue_id, queues)
                if item is not None:
                    settled.append(item)
        return tuple(settled)

    def _settle(self, queue_id: str, queues: list[str]) -> DuplicateItem | None:
        """Keep the copy with the highest write stamp: the newest envelope of the message."""
        ranked = []
        for queue in queues:
            path = self._entry_file(queue, queue_id)
            if path is None:
                continue
            try:
                ranked.append((self._stamp(path), os.stat(path).st_mtime_ns, queue))
            except (KeyError, FileNotFoundError):
                continue
        if len(ranked) < 2:
            return None
        ranked.sort()
        kept = ranked[-1][2]
        removed = tuple(q for _, _, q in ranked[:-1])
        for queue in removed:
            gone = _unlink(self.envelope_path(queue, queue_id))
            # A packed copy that goes still holds the body the kept one needs.
            if queue in _PACKED_IN and self._drop_packed(queue, queue_id):
                gone = True
            if gone:
                fsync_dir(self.queue_dir(queue))
        return DuplicateItem(queue_id, kept, removed)

    def _referenced(self) -> set[str]:
        """Every id some envelope names, damaged ones in ``corrupt/`` included."""
        ids: set[str] = set()
        for queue in QUEUES:
            for name in _listdir(self.root / queue):
                if name.endswith((".json", ".msg")) and is_queue_id(name[:_ID_LEN]):
                    ids.add(name[:_ID_LEN])
        return ids

    def _held(self, queue_id: str) -> bool:
        if self.find(queue_id) is not None:
            return True
        return any(n.startswith(queue_id) for n in _listdir(self._dirs[CORRUPT]))

    def _remove_orphans(self, now: float) -> tuple[str, ...]:
        referenced = self._referenced()
        removed = []
        for name in sorted(_listdir(self.data)):
            if not is_queue_id(name) or name in referenced:
                continue
            try:
                young = now - (self.data / name).stat().st_mtime < ORPHAN_MIN_AGE
            except FileNotFoundError:
                continue
            # Look again, twice: a move running meanwhile may have hidden it from the scan.
            if young or self._held(name) or self._held(name):
                continue
            if _unlink(self.data / name):
                removed.append(name)
        if removed:
            fsync_dir(self.data)
        return tuple(removed)


def _size(path: Path | str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _listdir(path: Path | str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
