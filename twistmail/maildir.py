"""The Maildir mailbox store: local delivery for the bridge, snapshots for POP3.

Role: implements :class:`~twistmail.interfaces.IMailboxStore` on standard
Maildir, so any Maildir reader (Dovecot, mutt) can read the same mailboxes.
Twisted's ``MaildirMailbox`` is not used (TWISTED.md §2.4).  Every method is
synchronous and may block on disk; reactor code calls it through
``deferToThread``.  All I/O is binary.

Files, under the store root (``<datadir>/mailboxes``):

- ``<USRPRF>/Maildir/{tmp,new,cur}/`` the messages (directories 0700, files 0600);
- ``<USRPRF>/Maildir/.twistmail.lock`` the POP session lock (``flock``);
- ``<USRPRF>/Maildir/.twistmail.expunge`` the deletions of a QUIT in progress;
- ``<USRPRF>/Maildir/.twistmail.stuck`` messages QUITs deleted whose files could
  not be removed (tried again at each open, never listed);
- ``<USRPRF>/gone/<base name>`` what QUITs removed in the last 30 days.

Messages are kept in wire form: CRLF line ends, the received bytes plus the
trace headers the bridge adds, so a file's size is its RFC 1939 size and the
POP server only has to dot-stuff.

Naming.  A delivery is stored as ``<delivery_id>.<host>,S=<size>`` in ``new/``;
a POP session that sees it moves it to ``cur/`` as ``<name>:2,``.  The *base
name* ``<delivery_id>.<host>`` never changes and the UIDL is derived from it.
``<host>`` is the configured host name with every byte outside
``[A-Za-z0-9._-]`` written as ``\\ooo`` (octal, the Maildir convention for
``/`` and ``:``).  ``<size>`` (Maildir++) is the prefix plus the body, so a
listing needs no ``stat``.  Our POP server writes no flag (deletion unlinks),
so a delivered message can only be at ``new/<name>``, ``cur/<name>:2,`` or,
when another reader marked it seen, ``cur/<name>:2,S``, or it was fetched
and deleted; the idempotency check probes exactly those three names and the
``gone/`` record, and never lists a directory.

Idempotency contract: the delivery id names one (queue id, recipient) pair,
and the bridge passes the same prefix on every attempt (trace headers are
built from the envelope, not from the clock), so a retry computes the same
name.  Should two copies of one delivery still exist (a retry with another
prefix), a POP session lists one of them and removes the others at QUIT.
Files of other programs whose names share a base are messages of their
own: the later is renamed to a base of its own, and nothing is removed.

Durability: :meth:`MaildirStore.deliver` returns only when the message is
durable: written to ``tmp/``, fsynced, hard-linked into ``new/`` (the link
fails rather than replace an existing delivery), ``new/`` fsynced.  A queued
file that already begins with the delivery's trace fields (the SMTP server
writes them for a message with one local recipient: ``Spool.write_trace``)
is the copy itself, durable since the 250: it is hard-linked into ``new/``
straight from the queue, and only ``new/`` is fsynced.  That file keeps the
queue's envelope attribute, which names this message and its one
recipient; when the queue lets go of its name the mailbox holds the only
one, and the queue never reuses a file with a second name.  A crash
leaves at most a file in ``tmp/``, removed by a POP session after 36 hours
(the Maildir rule).  QUIT is all-or-nothing across crashes: the names to
remove are written to ``.twistmail.expunge`` (fsynced, renamed into place)
before the first unlink, and the next session finishes a log left behind.
That log is the commit point: the POP server answers QUIT once it is written
(:meth:`MailboxSession.decide`) and unlinks afterwards
(:meth:`MailboxSession.expunge`), still holding the lock.

Locking: a POP session holds an exclusive, non-blocking ``flock`` on
``.twistmail.lock`` from open to QUIT or close (a second session gets
:class:`MailboxInUse`, which the POP server answers ``-ERR [IN-USE]``); the
kernel drops it when the holding process dies.  An open that finds the lock
held while an expunge log exists waits (up to ``EXPUNGE_WAIT``) for that
QUIT to finish instead of refusing.  Delivery takes no lock: it
only adds to ``new/``, and a session works on the snapshot it took at open,
so mail delivered meanwhile appears in the next session.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from zope.interface import implementer

from twistmail.durable import fsync_dir
from twistmail.interfaces import IMailboxStore

#: The info a POP session gives a message when it moves it from new/ to cur/.
SEEN_BY_POP = ":2,"
#: Every cur/ info the idempotency check probes (see the module docstring).
CUR_INFOS = (SEEN_BY_POP, ":2,S")
LOCK_FILE = ".twistmail.lock"
EXPUNGE_FILE = ".twistmail.expunge"
STUCK_FILE = ".twistmail.stuck"
#: How long an open waits for a session that has answered QUIT and is still
#: removing its messages, counted from the last file it removed (seconds):
#: 50,000 deleted messages take longer than that on a busy machine.
EXPUNGE_WAIT = 10.0
#: How long it waits for any other holder before answering it is in use.
HOLDER_WAIT = 0.05
#: Files in tmp/ older than this are debris of a killed delivery.
TMP_MAX_AGE = 36 * 3600
#: Beside the Maildir (not in it: Maildir++ readers take dot-directories for
#: folders), a file named by the base name of each message a QUIT removed.
GONE_DIR = "gone"
#: A full disk or quota: what a user who deletes mail must still get past.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})
#: MSGSPLIT pieces a POP client deleted while others of the same message
#: stay: ``{"<uidl> <cut>": [numbers]}``.  They are not offered again; the
#: message goes once its last piece is deleted.
PIECES_FILE = ".twistmail.pieces"
#: How long a removed message's name is kept: far longer than any crashed
#: delivery takes to be tried again (the bridge retakes it when it restarts).
GONE_MAX_AGE = 30 * 86400
#: Names older than GONE_MAX_AGE are looked for at most this often (seconds).
GONE_PRUNE_EVERY = 86400
_PRUNED = ".pruned"
UIDL_MAX = 70

_USER = re.compile(r"[A-Z0-9$#@_]{1,10}")
_DELIVERY_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_SIZE_FIELD = re.compile(r"S=([0-9]{1,19})")
_WIRE_FIELD = re.compile(r"W=([0-9]{1,19})")  # Maildir++: the size with CRLF line ends
#: How every other Maildir writer begins a name: the time in seconds, then a
#: dot.  Our delivery ids begin with a 22-character queue id.
_OTHERS_TIME = re.compile(r"[1-9][0-9]{8,11}\.")
_HOST_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_HOST_MAX = 100
_CHUNK = 1 << 20
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


class MaildirError(Exception):
    """Base of the store's errors, each of which the POP server maps to ``-ERR``."""


class InvalidName(MaildirError, ValueError):
    """A user or delivery id that could escape its directory or break the naming."""


class MailboxInUse(MaildirError):
    """Another session holds the mailbox (POP: ``-ERR [IN-USE]``)."""


class MailboxGone(MaildirError):
    """The mailbox was removed while a session opened it (DLTUSRPRF *DLT)."""


class NoSuchMessage(MaildirError, LookupError):
    """No message with that number in this session, or it is marked deleted."""


class MessageVanished(MaildirError):
    """The message was in the snapshot but something outside twistmail removed it."""


class SessionClosed(MaildirError):
    """The session has already been committed or closed."""


class DeletionFailed(MaildirError):
    """QUIT could not remove some marked messages (POP: ``-ERR`` in UPDATE)."""


def check_user(user: str) -> str:
    """The profile name as stored on disk; refuses anything that is not one.

    IBM profile names cannot contain ``/``, ``.`` or anything else a path
    trick needs, so validating is the whole defence."""
    if isinstance(user, str) and user.isascii() and _USER.fullmatch(user.upper()):
        return user.upper()
    raise InvalidName(f"not a user profile name: {user!r}")


def check_delivery_id(delivery_id: str) -> str:
    """Refuse ids that could leave the directory, hide as a dot file or break parsing."""
    if isinstance(delivery_id, str) and _DELIVERY_ID.fullmatch(delivery_id):
        return delivery_id
    raise InvalidName(f"not a delivery id: {delivery_id!r}")


def safe_host(hostname: str) -> str:
    """The host name as it may appear in a Maildir name (no ``/ : ,`` or spaces)."""
    raw = hostname.encode("utf-8")
    safe = "".join(chr(b) if b in _HOST_BYTES else f"\\{b:03o}" for b in raw)
    if not safe or len(safe) > _HOST_MAX:
        raise InvalidName(f"host name unusable in Maildir names: {hostname!r}")
    return safe


def base_name(name: str) -> str:
    """The part of a Maildir name that no reader changes: before the info and fields."""
    return name.split(":", 1)[0].split(",", 1)[0]


def size_field(name: str, pattern: re.Pattern[str] = _SIZE_FIELD) -> int | None:
    """The Maildir++ ``S=`` size (or another field), when the writer recorded one."""
    for field in name.split(":", 1)[0].split(",")[1:]:
        match = pattern.fullmatch(field)
        if match:
            return int(match.group(1))
    return None


def wire_size(path: str) -> int:
    """The octets POP sends for a file (RFC 1939 sizes): a bare LF goes out as
    CRLF, and a last line without its line end gets one before the dot."""
    size = bare = 0
    after_cr = False
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            size += len(chunk)
            crlf = chunk.count(b"\r\n") + (after_cr and chunk.startswith(b"\n"))
            bare += chunk.count(b"\n") - crlf
            after_cr = chunk.endswith(b"\r")
            last = chunk[-1:]
    return size + bare + {b"\n": 0, b"\r": 1}.get(last, 2)


def uidl_for(base: str) -> str:
    """A UIDL (RFC 1939: 1-70 chars in 0x21-0x7E) that depends only on the base name.

    Readable base names are used as they are; others become ``#`` plus a hash.
    No usable base name starts with ``#``, so the two forms cannot collide."""
    if 0 < len(base) <= UIDL_MAX and base[0] != "#" and all("!" <= c <= "~" for c in base):
        return base
    return "#" + hashlib.sha256(os.fsencode(base)).hexdigest()[:40]


@attrs.frozen
class MaildirMessage:
    """One message of a session's snapshot; ``size`` is in octets as sent."""

    index: int
    size: int
    uidl: str
    path: Path


@attrs.frozen
class _Entry:
    """A cur/ file found at open; ``key`` orders the listing."""

    name: str
    base: str
    size: int
    key: tuple


@implementer(IMailboxStore)
class MaildirStore:
    """Maildir mailboxes under ``root``, one per user profile."""

    def __init__(self, root: Path, hostname: str) -> None:
        self.root = Path(root)
        self._root = os.fspath(self.root)  # deliveries build plain string paths
        self.hostname = hostname
        self._host = safe_host(hostname)

    def path(self, user: str) -> Path:
        """The user's Maildir directory (which may not exist yet)."""
        return Path(self._maildir(user))

    def _maildir(self, user: str) -> str:
        # A plain string on the way of every message: pathlib cost about a
        # tenth of a QMSF job's CPU in delivery.
        return f"{self._root}/{check_user(user)}/Maildir"

    def ensure(self, user: str) -> Path:
        """Create the mailbox if needed, private to the appliance's user."""
        maildir = self.path(user)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # its names are the users'
        for directory in (maildir.parent, maildir, *(maildir / d for d in ("tmp", "new", "cur"))):
            _make_private_dir(directory)
        return maildir

    def discard_if_empty(self, user: str) -> None:
        """Remove a mailbox that holds no message (made for a profile now deleted)."""
        maildir = self.path(user)
        for sub in ("new", "cur"):
            with suppress(FileNotFoundError), os.scandir(maildir / sub) as entries:
                if any(entries):
                    return
        shutil.rmtree(maildir.parent, ignore_errors=True)

    def message_name(self, delivery_id: str, size: int) -> str:
        """The new/ name of a delivery: sortable by queue id, unique per recipient."""
        return f"{check_delivery_id(delivery_id)}.{self._host},S={size}"

    def deliver(self, user: str, delivery_id: str, body_path: Path | str, prefix: bytes,
                trace: int = 0) -> Path:
        """Store ``prefix`` + body durably; a repeated delivery writes nothing.

        The body is the file after its first ``trace`` octets; when those are
        ``prefix``, the file is linked in as it is (see the module docstring).
        Returns the message's path (in new/, or in cur/ if a session saw it)."""
        maildir = self._maildir(user)
        if not isinstance(prefix, bytes):
            raise TypeError("prefix must be bytes")
        check_delivery_id(delivery_id)
        with open(body_path, "rb", buffering=1 << 16) as body:  # sized: no isatty probe
            body_size = os.fstat(body.fileno()).st_size - trace
            if body_size < 0:
                raise MaildirError("the body file is shorter than its trace fields")
            name = self.message_name(delivery_id, len(prefix) + body_size)
            delivered = _find_delivered(maildir, name)
            if delivered is not None:
                # The attempt that made it may have died before its flush of
                # new/: the caller is about to drop its queue copy.
                fsync_dir(os.path.dirname(delivered))
                return delivered
            if trace and trace == len(prefix) and os.pread(body.fileno(), trace, 0) == prefix:
                linked = _link_queued(maildir, body_path, name, lambda: self.ensure(user))
                if linked is not None:
                    # Read-only, the file is never kept for reuse when the
                    # queue drops its name (see twistmail.spares): the user
                    # may have deleted it here by then, on disk perhaps not yet.
                    os.fchmod(body.fileno(), 0o400)
                    return linked
            tmp = self._write_tmp(user, maildir, name, prefix, body, body_size, trace)
        return _link_new(maildir, tmp, name, lambda: self.ensure(user))

    def _write_tmp(
        self, user: str, maildir: str, name: str, prefix: bytes, body: BinaryIO, size: int,
        start: int = 0,
    ) -> str:
        """Write and fsync the message under a name no other delivery uses."""
        tmp = f"{maildir}/tmp/{name}.{os.getpid()}.{secrets.token_hex(6)}"
        try:
            fd = _create(tmp)
        except FileNotFoundError:
            self.ensure(user)
            fd = _create(tmp)
        try:
            _write_all(fd, prefix)
            _copy_body(body, fd, size, start)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def open(self, user: str) -> MailboxSession:
        """Lock the mailbox and take the snapshot a POP session works on.

        Raises :class:`MailboxInUse` when another session holds it, and
        :class:`MailboxGone` when its profile's deletion removes it meanwhile."""
        try:
            maildir = self.ensure(user)
            lock = _take_lock(maildir, check_user(user))
        except FileNotFoundError as e:
            raise MailboxGone(user) from e
        try:
            # Deleted at an earlier QUIT and still there (a file that cannot
            # be unlinked): never offered again, nor renamed.
            # The stuck record first: what a QUIT log adds to it was tried just now.
            deleted = set(_retry_stuck(maildir)) | set(_finish_expunge(maildir))
            _remove_older(maildir / "tmp", time.time() - TMP_MAX_AGE)
            with suppress(OSError):  # a full disk must not keep its user from emptying it
                _prune_gone(maildir.parent / GONE_DIR, time.time())
            _move_new(maildir)
            entries, redundant = self._scan(maildir / "cur", deleted)
            pieces = _read_pieces(maildir)
        except FileNotFoundError as e:
            lock.close()
            raise MailboxGone(user) from e
        except BaseException:
            lock.close()
            raise
        return MailboxSession(maildir, lock, entries, redundant, pieces)

    def _scan(self, cur: Path, deleted: set[str]) -> tuple[list[_Entry], list[str]]:
        """The listing in arrival order, one entry per base name, and the extra
        copies; the ``deleted`` names (files that outlived their deletion) left out."""
        kept: dict[str, _Entry] = {}
        redundant: list[str] = []
        for entry in _message_files(cur):
            if entry.name in deleted:
                continue
            found = self._entry(entry)
            if found is None:
                continue
            other = kept.get(found.base)
            if other is not None and self._delivery_id_of(found.base) is None:
                # Another program's names: two messages, not two copies of one
                # delivery.  The later gets a base (and so a UIDL) of its own:
                # the earlier keeps the UIDL a client may have seen already.
                if found.key < other.key:
                    kept[found.base], found = found, other
                found = _own_base(cur, found)
                if found is not None:
                    kept[found.base] = found
            elif other is not None:
                keep, drop = (other, found) if other.key <= found.key else (found, other)
                kept[found.base] = keep
                redundant.append(drop.name)
            else:
                kept[found.base] = found
        return sorted(kept.values(), key=lambda e: e.key), redundant

    def _entry(self, entry: os.DirEntry) -> _Entry | None:
        """Order ours by queue id without a stat; others (imported) first, by mtime."""
        name = entry.name
        base = base_name(name)
        size = size_field(name)
        queue_order = self._delivery_id_of(base)
        if size is not None and queue_order is not None:
            return _Entry(name, base, size, (1, queue_order, name))
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None
        if queue_order is None:
            # Another program's file: its S= (or its size) counts its own line
            # ends, which may be bare LFs.  The size as sent is worked out once
            # and kept in the name, as Maildir++ does with W= (the base name,
            # and so the UIDL, stays).
            size = size_field(name, _WIRE_FIELD)
            if size is None:
                try:
                    size = wire_size(entry.path)
                except FileNotFoundError:
                    return None
                head, colon, info = name.partition(":")
                named = f"{head},W={size}{colon}{info}"
                with suppress(OSError):
                    os.rename(entry.path, os.path.join(os.path.dirname(entry.path), named))
                    name = named
        return _Entry(name, base, st.st_size if size is None else size, (0, st.st_mtime_ns, name))

    def _delivery_id_of(self, base: str) -> str | None:
        """The delivery id if this store (same host) made the name, else None."""
        suffix = "." + self._host
        if not base.endswith(suffix) or _OTHERS_TIME.match(base):
            # Dovecot's, Postfix's... left by the program this store replaced
            # on the same host: their S= counts the bare LFs they store.
            return None
        found = base[: -len(suffix)]
        return found if _DELIVERY_ID.fullmatch(found) else None


class MailboxSession:
    """One POP session's view of a mailbox: a fixed snapshot plus pending deletions.

    Nothing on disk changes before :meth:`commit` (the UPDATE state); a session
    that ends any other way, :meth:`close` or a dead process, deletes nothing."""

    def __init__(
        self, maildir: Path, lock: BinaryIO, entries: list[_Entry], redundant: list[str],
        pieces: dict[str, frozenset[int]] | None = None,
    ) -> None:
        self.maildir = maildir
        self._cur = maildir / "cur"
        self._lock: BinaryIO | None = lock
        self._messages = [
            MaildirMessage(i, e.size, uidl_for(e.base), self._cur / e.name)
            for i, e in enumerate(entries, 1)
        ]
        self._redundant = redundant
        self._pieces = pieces or {}
        self._deleted: set[int] = set()
        #: The cur/ names :meth:`decide` committed to removing; None before.
        self._doomed: list[str] | None = None

    def __enter__(self) -> MailboxSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._lock is None

    def messages(self) -> list[MaildirMessage]:
        """The messages not marked deleted, in arrival order (numbers keep their gaps)."""
        self._check_open()
        return [m for m in self._messages if m.index not in self._deleted]

    def message(self, index: int) -> MaildirMessage:
        """A message by its session number; deleted ones may not be accessed (RFC 1939)."""
        self._check_open()
        if not 1 <= index <= len(self._messages) or index in self._deleted:
            raise NoSuchMessage(f"no such message: {index}")
        return self._messages[index - 1]

    def stat(self) -> tuple[int, int]:
        """STAT: count and total octets of the messages not marked deleted."""
        listed = self.messages()
        return len(listed), sum(m.size for m in listed)

    def read(self, index: int) -> BinaryIO:
        """The message file, binary, positioned at the start; the caller closes it.

        Once opened the content stays readable even if the file is unlinked."""
        return open(self._open(index), "rb")

    def read_small(self, index: int, start: int, end: int | None, limit: int) -> bytes | None:
        """Bytes ``start`` to ``end`` (None: the end of the file) of a message,
        or None when they are more than ``limit``.

        Most messages are small: an open, one read and a close serve them,
        without the file object :meth:`read` builds."""
        if end is not None and end - start > limit:
            return None
        fd = self._open(index)
        try:
            data = os.pread(fd, limit + 1 if end is None else end - start, start)
        finally:
            os.close(fd)
        return data if len(data) <= limit else None

    def _open(self, index: int) -> int:
        msg = self.message(index)
        try:
            return _open_message(msg.path)
        except FileNotFoundError:
            pass
        except MessageVanished:
            raise MessageVanished(f"message {index} ({msg.uidl}) is no longer a message "
                                  "file") from None
        moved = self._relocate([msg]).get(index)
        if moved is None:
            raise MessageVanished(f"message {index} ({msg.uidl}) was removed from the mailbox")
        return _open_message(moved.path)

    def mark_deleted(self, index: int) -> None:
        """DELE: only marks; the file goes at commit."""
        self.message(index)
        self._check_undecided()
        self._deleted.add(index)

    def undelete_all(self) -> None:
        """RSET: forget every mark."""
        self._check_open()
        self._deleted.clear()

    def pieces_deleted(self, index: int, cut: str) -> frozenset[int]:
        """The pieces of a message, cut as ``cut`` names, that earlier sessions deleted."""
        return self._pieces.get(_pieces_key(self.message(index).uidl, cut), frozenset())

    def commit(self) -> None:
        """QUIT, all of it: :meth:`decide`, then :meth:`expunge`."""
        self.decide()
        self.expunge()

    def decide(self, pieces: dict[int, tuple[str, set[int]]] | None = None) -> int:
        """The UPDATE state's point of no return; returns how many files will go.

        The names to remove are made durable in ``.twistmail.expunge``.  From
        then on they are removed even if this process dies (the next open
        finishes the log), so the POP server answers QUIT as soon as this
        returns and leaves the unlinking to :meth:`expunge`: a client no longer
        waits for one unlink per message.  Raises :class:`DeletionFailed`
        (after releasing; nothing removed) when the log cannot be written.

        ``pieces``: by message, the MSGSPLIT cut (its name) and the pieces this
        session deleted of a message that stays; recorded first, durably.

        On a full disk, where the log has no room, the files go here and now,
        before the answer: deleting mail is how its user makes room."""
        self._check_open()
        self._check_undecided()
        try:
            kept = self._pieces_kept(pieces or {})
            if kept != self._pieces:
                try:
                    _write_pieces(self.maildir, kept)
                except OSError as e:
                    if e.errno not in NO_ROOM:
                        raise
                    # Not recorded: those pieces are offered again (never lost).
            names = self._names_to_remove()
            count = len(names)
            if names:
                try:
                    _write_names(self.maildir, EXPUNGE_FILE, names)
                except OSError as e:
                    if e.errno not in NO_ROOM:
                        raise
                    _remove_now(self.maildir, self._cur, names)
                    names = []
        except OSError as e:
            self.close()
            raise DeletionFailed(f"deletions not started: {e}") from e
        self._doomed = names
        return count

    def expunge(self) -> None:
        """Remove what :meth:`decide` recorded (or nothing, if it removed them), then release.

        Raises :class:`DeletionFailed` (after releasing) if some could not be
        removed; the log then stays, and the next open tries them again."""
        self._check_open()
        names = self._doomed
        if names is None:
            raise SessionClosed("expunge before the deletions were decided")
        done = False
        try:
            if names:
                _record_if_room(self.maildir, names)
            failed = _unlink_all(self._cur, names) if names else []
            if names and not failed:
                os.unlink(self.maildir / EXPUNGE_FILE)
                done = True
        except OSError as e:
            raise DeletionFailed(f"deletions not completed: {e}") from e
        finally:
            self.close()
        if done:
            # After the release: an open waiting for this QUIT (see _take_lock)
            # gets the lock right after the log goes, not one fsync later.  A
            # log that a crash brings back names only files already gone.
            fsync_dir(self.maildir)
        if failed:
            raise DeletionFailed(f"{len(failed)} deleted messages not removed")

    def close(self) -> None:
        """End the session without deleting anything; safe to call twice."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()

    def _check_open(self) -> None:
        if self._lock is None:
            raise SessionClosed("the mailbox session has ended")

    def _check_undecided(self) -> None:
        if self._doomed is not None:
            raise SessionClosed("the deletions of this session are already decided")

    def _pieces_kept(self, new: dict[int, tuple[str, set[int]]]) -> dict[str, frozenset[int]]:
        """The piece records for messages that stay, with this session's added."""
        staying = {m.uidl for m in self._messages if m.index not in self._deleted}
        kept = {key: numbers for key, numbers in self._pieces
                .items() if key.split(" ", 1)[0] in staying}
        for index, (cut, numbers) in new.items():
            message = self._messages[index - 1]
            if message.uidl in staying and numbers:
                key = _pieces_key(message.uidl, cut)
                kept[key] = kept.get(key, frozenset()) | frozenset(numbers)
        return kept

    def _names_to_remove(self) -> list[str]:
        """cur/ names of the marked messages (followed if renamed) and the extra copies."""
        marked = [self._messages[i - 1] for i in sorted(self._deleted)]
        present: list[MaildirMessage] = []
        missing: list[MaildirMessage] = []
        for m in marked:
            (present if os.path.lexists(m.path) else missing).append(m)
        names = [m.path.name for m in present]
        names += [m.path.name for m in self._relocate(missing).values()]
        return list(dict.fromkeys(names + self._redundant))

    def _relocate(self, lost: Iterable[MaildirMessage]) -> dict[int, MaildirMessage]:
        """Find messages another reader renamed (new flags) by their base name.

        Lists cur/ once, and only when a file has gone, which is rare."""
        wanted = {base_name(m.path.name): m for m in lost}
        if not wanted:
            return {}
        found: dict[int, MaildirMessage] = {}
        try:
            entries = _message_files(self._cur)
        except FileNotFoundError:
            return found  # the mailbox itself is gone (DLTUSRPRF OWNOBJOPT(*DLT))
        for entry in entries:
            msg = wanted.get(base_name(entry.name))
            if msg is not None and msg.index not in found:
                moved = attrs.evolve(msg, path=self._cur / entry.name)
                self._messages[msg.index - 1] = moved
                found[msg.index] = moved
        return found


def _make_private_dir(path: Path) -> None:
    """mkdir 0700 regardless of umask, and make the new entry durable."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)
    fsync_dir(path.parent)


def _create(path: Path | str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_body(body: BinaryIO, out_fd: int, size: int, start: int = 0) -> None:
    """Copy ``size`` bytes from ``start`` in the kernel (sendfile), in 1 MiB
    chunks where it cannot."""
    in_fd = body.fileno()
    offset, end = start, start + size
    try:
        while offset < end:
            sent = os.sendfile(out_fd, in_fd, offset, end - offset)
            if sent == 0:
                raise MaildirError("the body file is shorter than it was")
            offset += sent
    except OSError as e:
        if e.errno not in _NO_SENDFILE:
            raise
        _copy_chunks(body, out_fd, offset, end)


def _copy_chunks(body: BinaryIO, out_fd: int, offset: int, end: int) -> None:
    body.seek(offset)
    while offset < end:
        chunk = body.read(min(_CHUNK, end - offset))
        if not chunk:
            raise MaildirError("the body file is shorter than it was")
        _write_all(out_fd, chunk)
        offset += len(chunk)


def _find_delivered(maildir: str, name: str) -> Path | None:
    """The existing copy of a delivery, probing exact names only.

    new/ is probed before cur/: a session moves new/ → cur/ by one rename, so
    in this order a message being moved is seen in one place or the other.
    A copy its user has fetched and deleted (see :func:`record_removed`) counts as
    delivered: its new/ path is returned, though nothing is there."""
    for candidate in (f"{maildir}/new/{name}", *(f"{maildir}/cur/{name}{i}" for i in CUR_INFOS)):
        if os.path.lexists(candidate):
            return Path(candidate)
    if os.path.lexists(f"{os.path.dirname(maildir)}/{GONE_DIR}/{base_name(name)}"):
        return Path(f"{maildir}/new/{name}")
    return None


def record_removed(maildir: Path, names: Iterable[str]) -> None:
    """Record, durably and before they go, the messages a QUIT (or RCVDST) removes
    (after its +OK: until they go, a delivery finds them in cur/).

    A delivery killed after its copy was made and before the queue learnt
    of it is made again; by then its user may have fetched and deleted the
    copy, and only this record keeps a second one out of the mailbox.
    """
    gone = maildir.parent / GONE_DIR
    _make_private_dir(gone)
    for base in dict.fromkeys(base_name(n) for n in names):
        if base and not base.startswith("."):
            os.close(os.open(gone / base, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    fsync_dir(gone)


def _prune_gone(gone: Path, now: float) -> None:
    """Forget removed messages after GONE_MAX_AGE; looks at most once a GONE_PRUNE_EVERY."""
    stamp = gone / _PRUNED
    try:
        if os.stat(stamp).st_mtime > now - GONE_PRUNE_EVERY:
            return
    except FileNotFoundError:
        if not gone.is_dir():
            return
    _remove_older(gone, now - GONE_MAX_AGE)
    os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    os.utime(stamp, (now, now))


def _link_new(maildir: str, tmp: str, name: str, ensure: Callable[[], Any]) -> Path:
    """Publish a written message; an existing name means it is already delivered."""
    target = f"{maildir}/new/{name}"
    try:
        _link_in(tmp, target, ensure)
    finally:
        # A tmp/ file left behind is removed by a session after 36 hours; an
        # error here would call a delivery that is in new/ a failure.
        with suppress(OSError):
            os.unlink(tmp)
    fsync_dir(f"{maildir}/new")
    return Path(target)


def _link_queued(maildir: str, queued: Path | str, name: str,
                 ensure: Callable[[], Any]) -> Path | None:
    """Publish a queued file that is the message as it is; None when it cannot be
    linked (another file system, a link limit), and a copy must be written.

    It is durable already; the queue drops its own name only after this returns."""
    target = f"{maildir}/new/{name}"
    try:
        _link_in(queued, target, ensure)
    except OSError:
        return None
    fsync_dir(f"{maildir}/new")
    return Path(target)


def _link_in(source: Path | str, target: str, ensure: Callable[[], Any]) -> None:
    """Link ``source`` as ``target``; an existing target is an earlier attempt's copy.

    A new/ that is gone (removed by hand, or never made by another tool) is
    made again, as tmp/ is: otherwise no delivery would ever succeed."""
    try:
        try:
            os.link(source, target)
        except FileNotFoundError:
            ensure()
            os.link(source, target)
    except FileExistsError:
        pass


#: Beside the mailboxes: one lock file per profile name, which outlives the
#: mailbox it guards (``owner_lock``).
OWNERS_DIR = ".owners"


@contextmanager
def owner_lock(root: Path | str, user: str, exclusive: bool = False) -> Iterator[int]:
    """The lock between deliveries into ``user``'s mailbox (shared) and the
    deletion of its profile (exclusive); yields its descriptor.

    A delivery resolved its recipient a moment before it writes: DLTUSRPRF
    removing the mailbox meanwhile destroyed mail just delivered there, or
    had the delivery make the mailbox again for a profile that is no more.
    Under this lock a delivery asks the directory whether the profile is
    still there, and the deletion looks for mail, deletes the profile and
    moves its mailbox away: the directory stays the one truth, so a command
    killed midway leaves nothing to mend.
    """
    directory = os.path.join(root, OWNERS_DIR)
    path = os.path.join(directory, check_user(user))
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:  # the first delivery, or a hand removed it
        os.makedirs(root, mode=0o700, exist_ok=True)  # its names are the users'
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)


def _take_lock(maildir: Path, user: str) -> BinaryIO:
    """The session lock; waits only for a holder that is past QUIT, unlinking.

    Such a holder has answered its client already, and the client (or another
    one) may well log in again at once: it should find the mailbox as that
    QUIT left it, not ``[IN-USE]``.  The expunge log tells that holder from
    a live session, which is refused after ``HOLDER_WAIT``."""
    fd = os.open(maildir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    lock = os.fdopen(fd, "r+b", buffering=0)
    start = since = time.monotonic()
    progress = None  # the mtimes of cur/ and gone/: each record and unlink moves one
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return lock
            except BlockingIOError:
                now = time.monotonic()
                if os.path.exists(maildir / EXPUNGE_FILE):
                    since = now  # a QUIT is unlinking: wait for it while it goes on
                    seen = _mtimes(maildir / "cur", maildir.parent / GONE_DIR)
                    if seen != progress:
                        progress, start = seen, now
                # A live session is refused after a moment: the holder may be
                # a QUIT between dropping its log and releasing the lock.
                if now - since >= HOLDER_WAIT or now - start >= EXPUNGE_WAIT:
                    raise MailboxInUse(
                        f"mailbox of {user} is in use by another session"
                    ) from None
                time.sleep(0.002)
    except BaseException:
        lock.close()
        raise


def _mtimes(*paths: Path) -> tuple[int | None, ...]:
    out = []
    for path in paths:
        try:
            out.append(os.stat(path).st_mtime_ns)
        except OSError:
            out.append(None)
    return tuple(out)


def _message_files(directory: Path) -> list[os.DirEntry]:
    """Message files: regular, neither symlinks nor dot files (our lock and log)."""
    with os.scandir(directory) as it:
        return [e for e in it if not e.name.startswith(".") and e.is_file(follow_symlinks=False)]


#: A mailbox DLTUSRPRF moved aside to remove: ``.deleted-<NAME>-<pid>-<hex>``.
DELETED_PREFIX = ".deleted-"


def sweep_tmp(roots: Iterable[Path], now: float | None = None) -> tuple[int, list[str]]:
    """Remove what deliveries ended midway (a killed job) left in each
    mailbox's ``tmp/`` under ``roots``, once 36 hours old, and the mailboxes
    a killed DLTUSRPRF left moved aside; returns how many files went, and
    what could not be looked at.

    A POP sign-on does this for its own mailbox.  SNADS stores and the
    mailboxes of profiles that never sign on have no such moment: without a
    sweep, what killed deliveries left there stayed for ever.
    """
    older_than = (time.time() if now is None else now) - TMP_MAX_AGE
    removed, problems = 0, []
    for root in roots:
        try:
            with os.scandir(root) as it:
                owners = [e for e in it if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            continue
        except OSError as e:
            problems.append(f"{root}: {e.strerror}")
            continue
        for owner in owners:
            try:
                if owner.name.startswith(DELETED_PREFIX):
                    if not _alive(owner.name):
                        shutil.rmtree(owner.path)
                    continue
                removed += _remove_older(Path(owner.path) / "Maildir" / "tmp", older_than)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:  # one mailbox in the wrong hands stops no other
                problems.append(f"{owner.path}: {e.strerror}")
    return removed, problems


def _alive(moved_aside: str) -> bool:
    """Whether the DLTUSRPRF that moved a mailbox aside may still be removing it."""
    try:
        os.kill(int(moved_aside.split("-")[2]), 0)
    except (IndexError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def _remove_older(directory: Path, older_than: float) -> int:
    """Remove the files of ``directory`` last changed before ``older_than``."""
    removed = 0
    for entry in _message_files(directory):
        with suppress(FileNotFoundError):
            if entry.stat(follow_symlinks=False).st_mtime < older_than:
                os.unlink(entry.path)
                removed += 1
    return removed


def _open_message(path: str | Path) -> int:
    """A descriptor of the message file at ``path``, which must still be one.

    Another program with write access to the Maildir may have put a symlink
    (to /etc/passwd, say) or a FIFO in its place since the listing.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MessageVanished(path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MessageVanished(path)
    return fd


def _own_base(cur: Path, entry: _Entry) -> _Entry | None:
    """``entry`` renamed to a base no other file has; None when it cannot be
    (it is then not listed this session, and not removed either)."""
    rest = entry.name[len(entry.base):]
    name = f"{entry.base}.{secrets.token_hex(4)}{rest}"
    try:
        if os.path.lexists(cur / name):
            return None
        os.rename(cur / entry.name, cur / name)
        fsync_dir(cur)  # the UIDL a client is shown stays the message's
    except OSError:
        return None
    return attrs.evolve(entry, name=name, base=base_name(name),
                        key=(*entry.key[:-1], name))


def _move_new(maildir: Path) -> None:
    """Give messages in new/ to cur/ with the info POP sessions write.

    Two names of other programs that differ only after the ":" would map to
    one name in cur/, and a rename would replace the first message with the
    second: the second gets a name of its own, with a base of its own (a
    copy with the same base would be taken for a redundant one).  Nothing
    else writes cur/ while the session's lock is held.
    """
    cur = maildir / "cur"
    moved = False
    for entry in _message_files(maildir / "new"):
        stem = entry.name.split(":", 1)[0]
        target = cur / (stem + SEEN_BY_POP)
        if os.path.lexists(target):
            head, comma, fields = stem.partition(",")
            target = cur / f"{head}.{secrets.token_hex(4)}{comma}{fields}{SEEN_BY_POP}"
        try:
            os.rename(entry.path, target)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno not in NO_ROOM:
                raise
            break  # cur/ cannot grow: the rest waits in new/ for a session after some room
        moved = True
    if moved:
        fsync_dir(cur)
        fsync_dir(maildir / "new")


def _record_if_room(maildir: Path, names: list[str]) -> None:
    """record_removed, unless the disk is full: the deletions that free it come first."""
    try:
        record_removed(maildir, names)
    except OSError as e:
        if e.errno not in NO_ROOM:
            raise


def _remove_now(maildir: Path, cur: Path, names: list[str]) -> None:
    """QUIT's removals without their log, for a disk with no room for it."""
    _record_if_room(maildir, names)
    failed = _unlink_all(cur, names)
    if failed:
        raise OSError(errno.EIO, f"{len(failed)} deleted messages not removed")


def _pieces_key(uidl: str, cut: str) -> str:
    return f"{uidl} {cut}"  # a UIDL has no blank; another cut is another record


def _read_pieces(maildir: Path) -> dict[str, frozenset[int]]:
    """The piece records; an unreadable file offers the pieces again (never loses one)."""
    try:
        raw = json.loads((maildir / PIECES_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: frozenset(n for n in v if isinstance(n, int)) for k, v in raw.items()
            if isinstance(k, str) and isinstance(v, list)}


def _write_pieces(maildir: Path, pieces: dict[str, frozenset[int]]) -> None:
    if not pieces:
        with suppress(FileNotFoundError):
            os.unlink(maildir / PIECES_FILE)
            fsync_dir(maildir)
        return
    _replace(maildir, PIECES_FILE,
             json.dumps({k: sorted(v) for k, v in sorted(pieces.items())}).encode())


def _replace(maildir: Path, name: str, data: bytes) -> None:
    """A state file of the mailbox, whole and durable or not there at all."""
    tmp = maildir / (name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, maildir / name)
    fsync_dir(maildir)


def _unlink_all(cur: Path, names: Iterable[str]) -> list[str]:
    failed = []
    for name in names:
        try:
            os.unlink(cur / name)
        except FileNotFoundError:
            pass
        except OSError:
            failed.append(name)
    fsync_dir(cur)
    return failed


def _finish_expunge(maildir: Path) -> list[str]:
    """Complete the QUIT of a session that died, or failed, while removing its
    messages; returns the names that still cannot be removed.

    They were deleted, and must not come back when whatever kept them (a
    read-only file, a disk error) is mended: they go to the stuck record,
    or, where that cannot be written, stay in the log.
    """
    log = maildir / EXPUNGE_FILE
    with suppress(FileNotFoundError):
        os.unlink(maildir / (EXPUNGE_FILE + ".tmp"))
    if not log.exists():  # the common case; only the lock's holder writes it
        return []
    names = _read_names(maildir, EXPUNGE_FILE)
    if names:
        # A full disk must not keep every login, and the deletions that
        # would free it, from going on: the record is the lesser loss.
        with suppress(OSError):
            record_removed(maildir, names)
    failed = _unlink_all(maildir / "cur", names)
    if failed:
        try:
            _write_names(maildir, STUCK_FILE, sorted({*_read_names(maildir, STUCK_FILE),
                                                      *failed}))
        except OSError:  # a full disk: the log keeps them meanwhile
            return failed
    os.unlink(log)
    fsync_dir(maildir)
    return failed


def _retry_stuck(maildir: Path) -> list[str]:
    """Remove the files of the stuck record that can go now; the others' names."""
    with suppress(FileNotFoundError):
        os.unlink(maildir / (STUCK_FILE + ".tmp"))
    names = _read_names(maildir, STUCK_FILE)
    if not names:
        return []
    left = _unlink_all(maildir / "cur", names)
    if left != names:
        with suppress(OSError):  # kept whole, it names files already gone: no harm
            if left:
                _write_names(maildir, STUCK_FILE, left)
            else:
                os.unlink(maildir / STUCK_FILE)
                fsync_dir(maildir)
    return left


def _read_names(maildir: Path, name: str) -> list[str]:
    """A record of cur/ names; never a path, nor one of the Maildir's own files."""
    try:
        raw = (maildir / name).read_bytes()
    except FileNotFoundError:
        return []
    names = [os.fsdecode(n) for n in raw.split(b"\0") if n and b"/" not in n]
    return [n for n in names if not n.startswith(".")]


def _write_names(maildir: Path, name: str, names: list[str]) -> None:
    _replace(maildir, name, b"\0".join(os.fsencode(n) for n in names))


def trace_prefix(originator: str, recipient: str) -> bytes:
    """Headers local delivery adds (RFC 5321 §4.4 Return-Path; Delivered-To)."""
    return (f"Return-Path: <{originator}>\r\nDelivered-To: {recipient}\r\n").encode(
        "utf-8", "replace")
