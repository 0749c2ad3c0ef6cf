"""The distribution store of a SNADS user: what QRYDST lists and RCVDST takes.

The bridge delivers mail for a *USRIDX user (journal 7O), and SNDDST stores
notes for SNADS users without an SMTP name, into that user's store: a
standard Maildir, ``<datadir>/snads/<USERID>/Maildir``.  This module is the
user's view of it, the incoming mail log of IBM i:

- :meth:`DistributionStore.query` lists the distributions with their
  distribution identifier (DSTID), sender, dates, description (the Subject)
  and status;
- :meth:`DistributionStore.receive` hands one over by DSTID and then removes
  it (RCVDST KEEP *NO) or marks it opened (KEEP *YES).

DSTID: IBM's 20-character form, the sender's directory *address* padded to
8, the sender's *user ID* padded to 8, and a 4-digit sequence number, for
example ``MAIL    JANE    0001``.  A sender enrolled in the directory (found
by its SMTP name) gives its own user ID and address; any other sender gives
the first 8 letters and digits of its local part and of the first label of
its domain (``friend@remote.test`` is ``REMOTE  FRIEND``).  The sequence
number is given when a distribution is first seen and never changes, so a
DSTID read from a listing stays valid; it is unique within the store.  The
ids given are kept in ``<datadir>/snads/<USERID>/dstids.json`` (written
atomically) and every query or receive holds an exclusive ``flock`` on
``.dstids.lock`` beside it, so two commands never give one id twice.

Status, as QRYDST STATUS names it: *NEW until a listing has shown it (the
Maildir moves it from new/ to cur/), then *OLD, and *OPENED once received
with KEEP *YES (the Maildir "seen" flag).

Synchronous and blocking on disk; only the CLI uses it.
"""

from __future__ import annotations

import contextlib
import email.policy
import fcntl
import json
import os
import re
from collections.abc import Iterator
from datetime import datetime
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import attrs

from twistmail.durable import fsync_dir
from twistmail.maildir import NO_ROOM, base_name, check_user, record_removed

INDEX = "dstids.json"
LOCK = ".dstids.lock"
MAX_SEQUENCE = 9999
HEAD_BYTES = 64 * 1024
NEW, OLD, OPENED = "*NEW", "*OLD", "*OPENED"
_NAME_CHARS = re.compile(r"[^A-Z0-9$#@]")


class UnknownDistribution(LookupError):
    """No distribution with that DSTID in the user's store."""


@attrs.frozen
class Distribution:
    """One incoming distribution as QRYDST lists it."""

    dstid: str
    sender: str
    date: str  # the note's Date, ISO 8601 ("" when it has none that can be read)
    received: str  # when it reached the store, ISO 8601 local time
    description: str
    size: int
    status: str
    path: Path = attrs.field(repr=False)

    def record(self) -> dict[str, Any]:
        """The listing's fields (the path is the store's business)."""
        return {k: v for k, v in attrs.asdict(self).items() if k != "path"}


@attrs.frozen
class Listing:
    """What QRYDST shows, and how many newer distributions wait for a DSTID."""

    distributions: tuple[Distribution, ...]
    waiting: int
    #: The waiting ones wait for room on the disk to keep their DSTIDs, not
    #: for a free sequence number.
    no_room: bool = False


def normalize_dstid(raw: str) -> str:
    """A DSTID as stored: the 20-character form, or its three words re-padded.

    ``'MAIL    JANE    0001'`` and ``MAIL JANE 1`` name the same
    distribution, so a DSTID survives being typed without its blanks.
    """
    text = raw.upper() if isinstance(raw, str) else ""
    if len(text) == 20 and text[16:].isdigit():
        return text
    words = text.split()
    if len(words) == 3 and all(len(w) <= 8 for w in words[:2]) and words[2].isdigit() \
            and len(words[2]) <= 4:
        return words[0].ljust(8) + words[1].ljust(8) + words[2].zfill(4)
    raise ValueError(f"{raw!r} is not a distribution identifier; allowed: 20 characters, "
                     "sender address (8), sender user ID (8), sequence (4 digits), "
                     "as qrydst lists it")


def sender_names(sender: str, enrolled: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(address, user ID) of a sender, for its DSTID; ``enrolled`` maps SMTP names."""
    known = enrolled.get(sender.lower())
    if known is not None:
        return known[0][:8], known[1][:8]
    local, _, domain = sender.rpartition("@")
    user = _NAME_CHARS.sub("", local.upper())[:8] or "INTERNET"
    address = _NAME_CHARS.sub("", domain.split(".", 1)[0].upper())[:8] or "INTERNET"
    return address, user


class DistributionStore:
    """The SNADS users' stores under ``root`` (``<datadir>/snads``)."""

    def __init__(self, root: Path, enrolled: dict[str, tuple[str, str]]) -> None:
        self.root = Path(root)
        self.enrolled = {k.lower(): v for k, v in enrolled.items()}

    def query(self, userid: str) -> Listing:
        """The user's distributions in arrival order; shown ones become *OLD."""
        with self._locked(userid) as index:
            if index is None:
                return Listing((), 0)
            listing = self._scan(userid, index)
            _mark_listed(self._maildir(userid), listing.distributions)
            return listing

    @contextlib.contextmanager
    def receive(self, userid: str, dstid: str, keep: bool = False
                ) -> Iterator[tuple[Distribution, bytes]]:
        """Yield one distribution and its bytes; afterwards remove it or mark it opened.

        Nothing changes when the caller's block raises: a distribution that
        could not be written out stays in the store.
        """
        wanted = normalize_dstid(dstid)
        with self._locked(userid) as index:
            found = None
            if index is not None:
                found = next((d for d in self._scan(userid, index).distributions
                              if d.dstid == wanted), None)
            if found is None:
                raise UnknownDistribution(wanted)
            data = found.path.read_bytes()
            yield found, data
            if keep:
                _mark_opened(found.path)
            else:
                # A delivery killed before the queue learnt of it, made again,
                # must not bring back what was received.
                record_removed(self._maildir(userid), [found.path.name])
                found.path.unlink(missing_ok=True)
                fsync_dir(found.path.parent)
                index["ids"] = {b: i for b, i in index["ids"].items() if i != wanted}
                try:
                    self._save(userid, index)
                except OSError as e:  # received all the same: the next listing forgets it
                    if e.errno not in NO_ROOM:
                        raise

    # -- inside the lock ---------------------------------------------------------

    def _maildir(self, userid: str) -> Path:
        return self.root / check_user(userid) / "Maildir"

    @contextlib.contextmanager
    def _locked(self, userid: str) -> Iterator[dict[str, Any] | None]:
        """The id index under the user's lock; None when the user has no store yet."""
        home = self.root / check_user(userid)
        if not (home / "Maildir").is_dir():
            yield None
            return
        fd = os.open(home / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._load(userid)
        finally:
            os.close(fd)

    def _load(self, userid: str) -> dict[str, Any]:
        try:
            data = json.loads((self.root / check_user(userid) / INDEX).read_text("utf-8"))
        except (FileNotFoundError, ValueError):
            data = {}
        ids = data.get("ids") if isinstance(data, dict) else None
        nxt = data.get("next") if isinstance(data, dict) else None
        return {"next": nxt if isinstance(nxt, int) and 1 <= nxt <= MAX_SEQUENCE else 1,
                "ids": ids if isinstance(ids, dict) else {}}

    def _save(self, userid: str, index: dict[str, Any]) -> None:
        home = self.root / check_user(userid)
        tmp = home / f".{INDEX}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, home / INDEX)
        except BaseException:  # a full disk: no file left per listing tried
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(home)

    def _scan(self, userid: str, index: dict[str, Any]) -> Listing:
        """Every message with its DSTID; new ones get the next sequence numbers.

        A DSTID has four digits: with every number in use, newer messages
        wait, unlisted and unread, until receiving older ones frees numbers.
        """
        files = _message_files(self._maildir(userid))
        ids: dict[str, str] = index["ids"]
        kept = set(ids.values())
        present = {base for base, _ in files}
        changed = any(base not in present for base in ids)
        ids = {b: i for b, i in ids.items() if b in present}
        used = {i[16:] for i in ids.values()}
        out = []
        waiting = 0
        for base, path in files:
            if base not in ids and len(used) >= MAX_SEQUENCE:
                waiting += 1
                continue
            head = _head(path)
            sender = _sender(head)
            if base not in ids:
                ids[base] = self._new_id(index, used, sender)
                changed = True
            out.append(_distribution(ids[base], sender, head, path))
        index["ids"] = ids
        if changed:
            try:
                self._save(userid, index)
            except OSError as e:
                if e.errno not in NO_ROOM:
                    raise
                # A full disk: DSTIDs given now could not be kept, and the next
                # listing could give them to others.  Those kept are listed, so
                # the user can receive them and make room; the new ones wait.
                listed = tuple(d for d in out if d.dstid in kept)
                return Listing(listed, waiting + len(out) - len(listed), no_room=True)
        return Listing(tuple(out), waiting)

    def _new_id(self, index: dict[str, Any], used: set[str], sender: str) -> str:
        """The next free sequence number (``used`` gains it); one is free."""
        seq = index["next"]
        while f"{seq:04d}" in used:
            seq = seq % MAX_SEQUENCE + 1
        used.add(f"{seq:04d}")
        index["next"] = seq % MAX_SEQUENCE + 1
        address, user = sender_names(sender, self.enrolled)
        return f"{address.ljust(8)}{user.ljust(8)}{seq:04d}"


def _message_files(maildir: Path) -> list[tuple[str, Path]]:
    """(base name, path) of the messages in new/ and cur/, by base name (arrival order)."""
    found: dict[str, Path] = {}
    for sub in ("new", "cur"):
        try:
            entries = list(os.scandir(maildir / sub))
        except FileNotFoundError:
            continue
        for e in entries:
            if not e.name.startswith(".") and e.is_file(follow_symlinks=False):
                found.setdefault(base_name(e.name), Path(e.path))
    return sorted(found.items())


def _head(path: Path) -> Any:
    with open(path, "rb") as f:
        data = f.read(HEAD_BYTES)
    end = min((i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0),
              default=len(data))
    return BytesHeaderParser(policy=email.policy.default).parsebytes(data[:end] + b"\r\n\r\n")


def _sender(head: Any) -> str:
    """The From address; the envelope originator (Return-Path) when From is unusable."""
    try:
        addresses = head["From"].addresses if head["From"] is not None else ()
        if addresses and addresses[0].addr_spec:
            return addresses[0].addr_spec
    except (AttributeError, IndexError, ValueError, TypeError):
        pass
    raw = str(head.get("Return-Path", "") or "").strip()
    return raw.strip("<>")


def _distribution(dstid: str, sender: str, head: Any, path: Path) -> Distribution:
    st = path.stat()
    try:
        subject = str(head.get("Subject", "") or "")
    except (ValueError, TypeError):
        subject = ""
    try:
        when = head["Date"].datetime if head["Date"] is not None else None
        date = when.isoformat() if when is not None else ""
    except (AttributeError, ValueError, TypeError):
        date = ""
    received = datetime.fromtimestamp(st.st_mtime).astimezone().isoformat(timespec="seconds")
    info = path.name.partition(":2,")[2]
    status = NEW if path.parent.name == "new" else (OPENED if "S" in info else OLD)
    return Distribution(dstid, sender, date, received, " ".join(subject.split()), st.st_size,
                        status, path)


def _mark_listed(maildir: Path, listed: tuple[Distribution, ...]) -> None:
    """Listed distributions leave new/ (Maildir: a reader has seen them), becoming *OLD.

    Only those listed: one that arrived since the scan stays *NEW.
    """
    moved = False
    for path in (d.path for d in listed):
        if path.parent.name == "new":
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, maildir / "cur" / (path.name + ":2,"))
                moved = True
    if moved:
        fsync_dir(maildir / "cur")
        fsync_dir(maildir / "new")


def _mark_opened(path: Path) -> None:
    """KEEP *YES: the distribution stays, flagged seen (*OPENED)."""
    maildir = path.parent.parent
    name = path.name.split(":", 1)[0]
    flags = path.name.partition(":2,")[2]
    target = maildir / "cur" / f"{name}:2,{''.join(sorted(set(flags + 'S')))}"
    if target != path:
        os.rename(path, target)
        fsync_dir(target.parent)
