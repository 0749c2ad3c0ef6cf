"""The QZMF journal: the administrator's record of what happened to each message.

IBM i deposits one entry per step of a message's life in QUSRSYS/QZMF so that a
lost message can be traced after the fact; twistmail keeps the same codes and
adds its own (function letter J) for the processes that serve mail.

Files, all under ``<datadir>/journal/``:

- ``QZMF.000001.jsonl``, ``QZMF.000002.jsonl`` ... the receivers, one compact JSON
  object per line; the highest number is the one being written (CHGJRN adds one).
- ``QZMF.state`` both the lock every writer takes (``flock``) and the small
  record of the last sequence number, the current receiver and its expected end.
  It exists so a write never has to scan receivers; when it is lost or stale
  (a writer killed mid-write) it is rebuilt from the receivers themselves.

Many processes write at once (controller, every prestart job, the bridge), and
the sequence number must still be strictly increasing across all of them, hence
the lock.  There is no fsync: the journal is diagnostics, not mail.

Settings honoured: ``smtp.journal`` (``*YES``/``*NO``, may change at run time,
as IBM's QTMSJRNL switch can) and ``journal.receiver_size`` (bytes after which a
new receiver starts).  The reader side (``read_entries``, ``follow``) takes no
lock, so ``dspjrn`` works while the daemon is down or busy.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import fcntl
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

import attrs

JOURNAL = "QZMF"
STATE_FILE = f"{JOURNAL}.state"
DEFAULT_RECEIVER_SIZE = 16 * 1024 * 1024
#: Entries lost between two reports of a journal that cannot be written.
TELL_EVERY = 1000

#: Every journal code (function letter + action letter) and what it records.
CODES: dict[str, str] = {
    # 6: bridge client (V4R4 only)
    "66": "bridge client: mail put on the output queue for a remote system",
    "67": "bridge client: bad mail sent back to SNADS",
    # 7: bridge server (QTSMTPBRSR)
    "7A": "bridge: taken from QTMSINQ for processing",
    "7O": "bridge: passed to SNADS",
    "7L": "bridge: parked on QTMSBSSQ, storage use over the threshold",
    "7M": "bridge: taken off QTMSBSSQ, storage reclaimed",
    "7H": "bridge: note inserted into MSF",
    "71": "bridge: originator of the note inserted into MSF",
    "72": "bridge: recipient of the note inserted into MSF",
    "7R": "bridge: confirmation of delivery (COD) created",
    "7G": "bridge: message id of the notice just created (COD, DSN or nondelivery)",
    "7P": "bridge: undeliverable (nondelivery) notice being created",
    "7U": "bridge: undeliverable notice deleted, its return address is bad",
    "7X": "bridge: queue recovery removed debris of crashed writers, or a message never "
          "queued (twistmail)",
    "7Y": "bridge: unreadable envelope moved to the corrupt/ queue (twistmail)",
    "7N": "bridge: parked message deleted from QTMSBSSQ by the administrator (wrkq --delete), "
    "with the recipients it had (twistmail)",
    "7Z": "bridge: message in corrupt/ released to QTMSINQ or deleted by the administrator "
          "(wrkq; twistmail)",
    "7W": "bridge: DSN delay notice created (twistmail)",
    # 8: SMTP client (QTSMTPCLTP)
    "8B": "SMTP client: taken from QTMSOUTQ for delivery",
    "88": "SMTP client: delivered (DLV), with the receiving host's IP address",
    "82": "SMTP client: recipient delivered (one entry per recipient)",
    "83": "SMTP client: recipient undeliverable",
    "8C": "SMTP client: put on the first-level retry queue QTMSRTQ1",
    "8D": "SMTP client: put on the second-level retry queue QTMSRTQ2",
    "8E": "SMTP client: retry due, from QTMSRTQ1 back to QTMSOUTQ (QTMSINQ for a deferred "
          "local recipient)",
    "8F": "SMTP client: retry due, from QTMSRTQ2 back to QTMSOUTQ (QTMSINQ for a deferred "
          "local recipient)",
    "87": "SMTP client: to QTMSINQ for a nondelivery notice, or COD queued for the bridge",
    "86": "SMTP client: back on QTMSOUTQ (connection matrix full or a recipient changed)",
    "8K": "SMTP client: resolver error (MX or address lookup failed)",
    "8U": "SMTP client: no server of a destination answered; the messages waiting "
    "for it alone go to the retry queues untried, with the number and the reason (twistmail)",
    "8W": "SMTP client: waiting on QTMSOUTQ for the next scheduled mail transfer "
    "(MAILXFRINT), with its time (twistmail)",
    "8X": "SMTP client: scheduled mail transfer started (MAILXFRINT interval or RLSDSTQ), "
    "with the number of messages sent (twistmail)",
    "8Y": "SMTP client: ETRN issued to the mail router for a local domain (ETRNCLT), with "
    "the reply, or why it was not issued (twistmail)",
    "8Z": "SMTP client: deleted from QTMSOUTQ, QTMSRTQ1 or QTMSRTQ2 by the administrator "
    "(wrkq --delete), with the recipients it still had (twistmail)",
    # 9: SMTP server (QTSMTPSRVP)
    "94": "SMTP server: received for local delivery (LIN), with the sender's IP address",
    "95": "SMTP server: received for relay (RIN), with the sender's IP address",
    "91": "SMTP server: originator (O)",
    "92": "SMTP server: recipient (R)",
    "9T": "SMTP server: message size",
    "99": "SMTP server: RFC 822 Message-ID",
    "97": "SMTP server: placed on QTMSINQ",
    "96": "SMTP server: placed on QTMSOUTQ",
    "9S": "SMTP server: connection rejected",
    "9V": "SMTP server: relay rejected",
    "9Y": "SMTP server: ETRN accepted, delivery of the node's queued mail started (twistmail)",
    "9W": "SMTP server: rejected by the SMTP server (an originator, recipient or message "
          "refused with a 5xx reply, or a message journaled as queued that could not be "
          "(451): the reply, the client IP and the address)",
    "9Z": "SMTP server: client authenticated (AUTH), with its IP and user profile (twistmail)",
    "9X": "SMTP server: authentication failed, with the client IP (twistmail)",
    # A: MSF nondelivery
    "AP": "MSF nondelivery: nondelivery message created",
    "A1": "MSF nondelivery: originator of the nondelivery message",
    "A2": "MSF nondelivery: recipient of the nondelivery message",
    "A3": "MSF nondelivery: recipient undeliverable (U), with the reason",
    # B: MSF local delivery
    "B8": "MSF local delivery: delivered into a POP mailbox (mailbox directory logged)",
    "B2": "MSF local delivery: recipient (POP mailbox delivery or COD insertion)",
    "BD": "MSF local delivery: mailbox cannot take mail now, recipient deferred to the "
          "retries, with the reason (twistmail)",
    "BR": "MSF local delivery: COD message inserted into MSF",
    "B1": "MSF local delivery: originator of the COD message",
    # C: MSF message forwarding
    "CN": "MSF forwarding: back on the MSF queue, SMTP not started",
    "C6": "MSF forwarding: put on QTMSOUTQ",
    "C1": "MSF forwarding: originator of the forwarded note",
    "C2": "MSF forwarding: recipient of the forwarded note",
    # D: POP create message (MAPI XTND XDESCRIPT)
    "DH": "POP create message: note from a POP client inserted into MSF",
    "D1": "POP create message: originator",
    "D2": "POP create message: recipient",
    "DT": "POP create message: message size",
    "D9": "POP create message: RFC 822 Message-ID",
    # E: Send Mail API (QtmmSendMail, QtmsCreateSendEmail)
    "EH": "send mail API: message created and inserted into MSF",
    "E1": "send mail API: originator",
    "E2": "send mail API: recipient",
    "ET": "send mail API: message size (all attachments)",
    # G: tunneling snap-in
    "G8": "tunneling: message tunneled to a SNADS-bridged system",
    "GQ": "tunneling: tunneled message received for local delivery",
    "G2": "tunneling: recipient",
    # H: SNADS switcher
    "H1": "SNADS switcher: originator of a message switched into MSF, with its size",
    "H2": "SNADS switcher: recipient of a message switched into MSF",
    # I: MIME parser (local delivery snap-in)
    "IH": "MIME parser: parsed note reinserted into MSF, with its size",
    "I1": "MIME parser: originator of the reinserted note",
    "I2": "MIME parser: recipient of the reinserted note",
    "IG": "MIME parser: RFC 822 Message-ID mapped to the MSF message id",
    # O: filtering (5.4+); action letters as in IBM's action table
    "O1": "filtering: originator of a message that matched a filter",
    "O2": "filtering: recipient of a message that matched a filter",
    "O3": "filtering: recipient not delivered, message discarded by a filter",
    "OW": "filtering: a filter matched (kept in quarantine or discarded, FTRACN), "
    "or the administrator released or deleted a quarantined message",
    # P: MSF SMTP exit for address resolution (5.4+)
    "P2": "address resolution: recipient resolved (RRSL)",
    "P3": "address resolution: recipient could not be resolved",
    # J: twistmail's own function letter (prestart jobs and the subsystem);
    # IBM's table does not use J, so these never collide with an IBM code.
    "JS": "job started",
    "JE": "job ended (maxuse, trim, maxjobs, endpj, endtcpsvr, shutdown, unresponsive)",
    "JC": "job crashed (exit status or signal)",
    "JB": "job failed to boot (died before it was ready)",
    "JF": "prestart entry stopped after repeated boot failures",
    "JR": "program start request rejected (no job free)",
    "JW": "program start request waited a second or more for a job",
    "JP": "prestart entry started (strpj, strtcpsvr)",
    "JQ": "prestart entry ended (endpj, endtcpsvr)",
    "JA": "prestart entry changed (chgpje)",
    "JM": "mail server framework (bridge) started",
    "JN": "mail server framework (bridge) ended",
    "JK": "mail server framework (bridge) crashed",
    "JG": "controller started",
    "JH": "controller ended",
    "JL": "a client address hit an abuse limit ([limits] setting named): refused by the "
          "controller, or its SMTP session ended (maxerrors)",
    # Q: POP server jobs (twistmail's own function letter; IBM's table has no Q)
    "QL": "POP server: user signed on (client IP, user profile, messages, octets)",
    "QF": "POP server: sign-on refused (client IP, user name given, failures so far)",
    "QU": "POP server: mailbox in use by another session, sign-on refused",
    "QR": "POP server: message retrieved (user profile, UIDL, size)",
    "QD": "POP server: deletions committed at QUIT (user profile, count)",
}

_RESERVED = frozenset(("seq", "ts", "code", "job", "msgid", "esd"))
_RECEIVER_RE = re.compile(rf"^{JOURNAL}\.(\d+)\.jsonl$")
_STATE_LEN = 64
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
_TAIL_CHUNK = 65536


def receiver_name(number: int) -> str:
    return f"{JOURNAL}.{number:06d}.jsonl"


def receivers(directory: Path) -> list[tuple[int, Path]]:
    """The receivers in ``directory``, oldest first (by number, not by name)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = _RECEIVER_RE.match(name)
        if m:
            found.append((int(m.group(1)), Path(directory) / name))
    found.sort()
    return found


def seq_keeper(directory: Path, attached: int) -> int | None:
    """The detached receiver that must stay: the newest holding entries, while
    the attached one holds none.  It has the last seq, which a lost state
    file is rebuilt from; without it seq would start again at 1."""
    try:
        if os.stat(Path(directory) / receiver_name(attached)).st_size > 0:
            return None
    except FileNotFoundError:
        pass
    for number, path in reversed(receivers(directory)):
        if number >= attached:
            continue
        try:
            if path.stat().st_size > 0:
                return number
        except FileNotFoundError:
            continue
    return None


def delete_receivers(directory: Path, below: int, keep: int | None = None) -> list[str]:
    """Delete the receivers numbered below ``below``, except ``keep``; their names.

    Never the attached one: callers pass at most its number.  A follower
    reading one keeps reading it (its descriptor stays valid) and moves on.
    """
    gone = []
    refused: OSError | None = None
    for number, path in receivers(directory):
        if number >= below:
            break
        if number == keep:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:  # one that cannot go keeps none of the others
            refused = refused or e
            continue
        gone.append(path.name)
    if refused is not None:
        raise refused
    return gone


_second: tuple[int, str] = (-1, "")


def _now_text() -> str:
    """UTC now as ``2024-05-01T10:30:00.123456Z``; the date part is formatted once a second."""
    global _second
    sec, us = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{us:06d}Z"


def time_text(epoch: float | None) -> str | None:
    """A time a field names (a next try), written as ``ts`` is: UTC ISO 8601, to the second."""
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


# --------------------------------------------------------------------------- writer

_forks = 0


def _after_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_after_fork)


@attrs.define
class _State:
    """What the state file holds: last seq, current receiver, its expected size."""

    seq: int
    receiver: int
    end: int

    def pack(self) -> bytes:
        """Fixed width, so one pwrite at offset 0 always replaces the whole record."""
        text = b"%020d %010d %020d" % (self.seq, self.receiver, self.end)
        return text.ljust(_STATE_LEN - 1) + b"\n"

    @classmethod
    def unpack(cls, data: bytes) -> _State | None:
        parts = data.split()
        if len(parts) != 3:
            return None
        try:
            seq, receiver, end = int(parts[0]), int(parts[1]), int(parts[2])
        except ValueError:
            return None
        if seq < 0 or receiver < 1 or end < 0:
            return None
        return cls(seq, receiver, end)


class Journal:
    """Appends entries to the journal in ``directory`` on behalf of one job.

    ``enabled`` and ``receiver_size`` are plain attributes so a settings change
    (CHGSMTPA JOURNAL, a new receiver size) applies to the next write.  Files are
    opened on the first write, so a disabled journal creates nothing.
    """

    def __init__(
        self,
        directory: Path,
        job: str,
        enabled: bool = True,
        receiver_size: int = DEFAULT_RECEIVER_SIZE,
        keep_receivers: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.job = job
        self.enabled = enabled
        self.receiver_size = receiver_size
        self.keep_receivers = keep_receivers  # 0: every receiver is kept
        self.failures = 0
        self.last_error: OSError | None = None
        self._told = 0  # failures when the log was last told of them; 0: writing works
        self._rotation_failing = False  # told once, until a rotation works again
        self._pruning_failing = False  # the same for deleting old receivers
        self._mutex = threading.Lock()
        self._batches = threading.local()
        self._forks = _forks
        self._state_fd: int | None = None
        self._rfd: int | None = None

    @classmethod
    def from_settings(cls, settings: Any, job: str) -> Journal:
        """A journal configured from the appliance's settings."""
        return cls(
            journal_directory(settings),
            job,
            enabled=settings.smtp.journal == "*YES",
            receiver_size=settings.journal.receiver_size,
            keep_receivers=settings.journal.keep_receivers,
        )

    def configure(self, settings: Any) -> None:
        """A reload: [smtp] journal and [journal], as from_settings reads them."""
        self.enabled = settings.smtp.journal == "*YES"
        self.receiver_size = settings.journal.receiver_size
        self.keep_receivers = settings.journal.keep_receivers

    def write(self, code: str, esd: str, msgid: str | None = None, **fields: Any) -> int | None:
        """Append one entry; its seq, or None when disabled or the disk refused.

        A failed write never raises: losing a diagnostic entry must not cost a
        mail session.  ``failures`` counts them for the controller to report.
        """
        if not self.enabled:
            return None
        if len(code) != 2:
            raise ValueError(f"journal code {code!r} is not two characters")
        if fields and not _RESERVED.isdisjoint(fields):
            raise ValueError(f"journal fields may not be named {sorted(_RESERVED & set(fields))}")
        entry = {"code": code, "job": self.job, "msgid": msgid, "esd": esd}
        if fields:
            entry.update(fields)
        # Encoded now, outside the lock every job's writes wait for; seq and
        # ts go in front of it under the lock.
        try:
            rest = _encode(entry)[1:]
        except (TypeError, ValueError) as e:  # a field JSON cannot hold
            self.failures += 1
            self.last_error = e
            return None
        pending = getattr(self._batches, "entries", None)
        if pending is not None:
            pending.append(rest)
            return None
        return self._write_entries([rest])

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Entries written in this thread inside the block go out together at its end.

        One step of a message (a message received, one delivered) writes
        several entries; taking the lock and writing once for all of them
        keeps the journal's cost per message small.  Their seqs stay
        consecutive and in the order written.  Inside, ``write`` returns None.
        """
        if getattr(self._batches, "entries", None) is not None:
            yield  # already batching: the outer block writes
            return
        self._batches.entries = []
        try:
            yield
        finally:
            entries, self._batches.entries = self._batches.entries, None
            if entries and self.enabled:
                self._write_entries(entries)

    def flush(self) -> None:
        """Write what this thread's batch holds now; the batch goes on.

        For the moment before a step publishes its result (moves or removes
        the message): its entries then precede whatever a reader of the
        queue does next, as the entries of a received message do.
        """
        entries = getattr(self._batches, "entries", None)
        if entries:
            self._batches.entries = []
            if self.enabled:
                self._write_entries(entries)

    def _write_entries(self, entries: list[str]) -> int | None:
        with self._mutex:
            try:
                seq = self._locked(lambda state: self._append(state, entries))
            except OSError as e:
                self.failures += 1
                self.last_error = e
                self._close()
                if self.failures - self._told >= TELL_EVERY or self._told == 0:
                    self._tell(f"entries are being lost: {e.strerror or e} "
                               f"({self.failures} so far)")
                    self._told = self.failures
                return None
            if self._told:
                self._tell(f"written again, after {self.failures} entries lost")
                self._told = 0
            return seq

    @property
    def failing(self) -> str | None:
        """Why entries are being lost now, or None while writes succeed."""
        if not self._told or self.last_error is None:
            return None
        e = self.last_error
        return f"{getattr(e, 'strerror', None) or e}; {self.failures} entries lost"

    def _tell(self, what: str) -> None:
        """Into the daemon's log: a journal that stops must not stop in silence."""
        print(f"journal {self.directory} ({self.job}): {what}", file=sys.stderr, flush=True)

    def delete_detached(self, numbers: Iterable[int] | None = None
                        ) -> tuple[list[str], str, str | None]:
        """DLTJRNRCV: delete detached receivers (``numbers``, or all of them).

        Under the journal's lock, so a rotation cannot attach one meanwhile.
        Returns the names deleted, the name of the attached receiver, and the
        name of one kept (see :func:`seq_keeper`) among those asked for.
        """
        def action(state: _State) -> tuple[tuple[list[str], str, str | None], _State]:
            wanted = None if numbers is None else set(numbers)
            keep = seq_keeper(self.directory, state.receiver)
            kept = None
            if keep is not None and (wanted is None or keep in wanted):
                kept = receiver_name(keep)
            gone = []
            for number, path in receivers(self.directory):
                if number >= state.receiver or (wanted is not None and number not in wanted):
                    continue
                if number == keep:
                    continue
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                gone.append(path.name)
            return (gone, receiver_name(state.receiver), kept), state

        with self._mutex:
            return self._locked(action)

    def new_receiver(self) -> str:
        """CHGJRN: attach a new receiver and return its file name."""
        with self._mutex:
            return self._locked(self._attach)

    def close(self) -> None:
        with self._mutex:
            self._close()

    # -- under the lock

    def _locked(self, action: Callable[[_State], tuple[Any, _State]]) -> Any:
        """Run ``action`` with the state file locked; it returns (result, new state)."""
        fd = self._lock()
        try:
            state = _State.unpack(os.pread(fd, _STATE_LEN, 0)) or self._recover()
            if os.path.exists(self._receiver_path(state.receiver + 1)):
                # A rotation whose writer died before it wrote the state: the
                # new receiver is the current one (followers have moved on).
                state = _State(state.seq, state.receiver + 1, -1)
            result, new_state = action(state)
            os.pwrite(fd, new_state.pack(), 0)
            return result
        finally:
            # Not kept open between writes: a quiet process would keep a
            # receiver that rotation or DLTJRNRCV deleted, and its space.
            self._release_receiver()
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _lock(self) -> int:
        """Lock the state file, reopening it when it was replaced under us."""
        if self._forks != _forks:
            # flock is shared with the parent through an inherited descriptor
            self._close()
            self._forks = _forks
        while True:
            if self._state_fd is None:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._state_fd = os.open(
                    self.directory / STATE_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
                )
            fd = self._state_fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                return fd
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self._state_fd = None

    def _append(self, state: _State, entries: list[str]) -> tuple[int, _State]:
        """Write entries (JSON objects without their first brace) after seq and ts."""
        state = self._writable(state)
        seq = state.seq
        ts = _now_text()
        lines = []
        for rest in entries:
            seq += 1
            lines.append(f'{{"seq":{seq},"ts":"{ts}",{rest}\n')
        # A lone surrogate (a file name that was not UTF-8) becomes its JSON
        # escape: the line stays valid, and the batch is not lost.
        data = "".join(lines).encode("utf-8", "backslashreplace")
        assert self._rfd is not None
        try:
            if os.write(self._rfd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write to the journal")
        except OSError:
            # A full disk took part of the batch: what it took goes, so no
            # torn line stays for a reader of the file to trip on.
            with contextlib.suppress(OSError):
                os.ftruncate(self._rfd, state.end)
            raise
        state = _State(seq, state.receiver, state.end + len(data))
        if state.end >= self.receiver_size:
            try:
                state = self._rotate(state)
            except OSError as e:
                # The entries are written: only the next receiver could not be
                # made, and this one grows past its size until it can.
                if not self._rotation_failing:
                    self._tell(f"cannot start a new receiver, {receiver_name(state.receiver)} "
                               f"grows meanwhile: {e.strerror or e}")
                self._rotation_failing = True
            else:
                if self._rotation_failing:
                    self._tell(f"a new receiver is started again: {receiver_name(state.receiver)}")
                self._rotation_failing = False
        return seq, state

    def _attach(self, state: _State) -> tuple[str, _State]:
        """CHGJRN; on a journal with no receiver yet, the first one is the new one."""
        if (self.directory / receiver_name(state.receiver)).exists():
            # The state first matches the file: a writer killed after its
            # write left the state one entry behind.
            state = self._rotate(self._writable(state))
        else:
            self._open_receiver(state.receiver)
            state = _State(state.seq, state.receiver, 0)
        return receiver_name(state.receiver), state

    def _writable(self, state: _State) -> _State:
        """Open the current receiver and make sure the state matches the file.

        Opened anew under each lock (none is kept between writes), so it is
        always the one the state names, and never one deleted meanwhile.
        """
        self._open_receiver(state.receiver)
        assert self._rfd is not None
        size = os.fstat(self._rfd).st_size
        if size != state.end:
            return self._repair(state, size)
        return state

    def _repair(self, state: _State, size: int) -> _State:
        """The file is not where the state says: a writer died mid-write or state was lost.

        Terminate a torn last line so the next entry starts on its own line, and
        take the seq from the file if it is ahead of the state.
        """
        assert self._rfd is not None
        path = self.directory / receiver_name(state.receiver)
        if size and _last_byte(path) != b"\n":
            os.write(self._rfd, b"\n")
            size += 1
        seq = max(state.seq, last_seq(self.directory, state.receiver))
        return _State(seq, state.receiver, size)

    def _receiver_path(self, number: int) -> str:
        return f"{self.directory}/{receiver_name(number)}"

    def _rotate(self, state: _State) -> _State:
        number = state.receiver + 1
        self._open_receiver(number)
        assert self._rfd is not None
        if self.keep_receivers:
            # The newest detached one holding entries always stays: it has the
            # last seq, which a lost state file is rebuilt from (the new
            # receiver is empty, and so may the ones CHGJRN attached be).
            try:
                delete_receivers(self.directory, below=number - max(self.keep_receivers, 2) + 1,
                                 keep=seq_keeper(self.directory, number))
            except OSError as e:  # the rotation itself is done
                if not self._pruning_failing:
                    self._tell(f"old receivers cannot all be deleted: {e.strerror or e}"
                               + (f": {e.filename}" if e.filename else ""))
                self._pruning_failing = True
            else:
                self._pruning_failing = False
        return _State(state.seq, number, os.fstat(self._rfd).st_size)

    def _recover(self) -> _State:
        """Rebuild a lost state file from the newest receiver."""
        found = receivers(self.directory)
        if not found:
            return _State(0, 1, 0)
        number = found[-1][0]
        # end=-1 forces _writable to check the file's last line.
        return _State(last_seq(self.directory, number), number, -1)

    def _open_receiver(self, number: int) -> None:
        if self._rfd is not None:
            os.close(self._rfd)
            self._rfd = None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._rfd = os.open(self._receiver_path(number), flags, 0o640)

    def _release_receiver(self) -> None:
        if self._rfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._rfd)
            self._rfd = None

    def _close(self) -> None:
        for fd in (self._rfd, self._state_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._rfd = self._state_fd = None


def journal_directory(settings: Any) -> Path:
    return Path(settings.datadir) / "journal"


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def last_seq(directory: Path, upto: int | None = None) -> int:
    """The seq of the last complete entry in the receivers numbered ``upto`` or lower."""
    for number, path in reversed(receivers(directory)):
        if upto is not None and number > upto:
            continue
        seq = _last_seq_in(path)
        if seq is not None:
            return seq
    return 0


def _last_seq_in(path: Path) -> int | None:
    entry = _last_entry_in(path)
    return None if entry is None else int(entry["seq"])


def _last_entry_in(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            tail = b""
            while pos > 0:
                pos = max(0, pos - _TAIL_CHUNK)
                f.seek(pos)
                tail = f.read(end - pos)
                lines = tail.split(b"\n")
                # the first piece may be cut unless we reached the file start
                candidates = lines if pos == 0 else lines[1:]
                for line in reversed(candidates):
                    entry = _parse(line)
                    if entry is not None:
                        return entry
                if pos == 0:
                    break
    except FileNotFoundError:
        return None
    return None


def _parse(line: bytes) -> dict[str, Any] | None:
    """One entry, or None for a torn or foreign line."""
    if not line.strip():
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int):
        return None
    if entry.get("code") == "9W" and str(entry.get("esd", "")).startswith("9W AUTH "):
        # Versions before 2026-11-30 wrote a sign-on as 9W, which is now IBM's
        # "rejected by the SMTP server": read as what it records, 9Z.
        entry["code"], entry["esd"] = "9Z", "9Z" + entry["esd"][2:]
    return entry


# --------------------------------------------------------------------------- reader

_CODE_PATTERN_RE = re.compile(r"^[0-9A-Z*]+$")


def check_code_patterns(patterns: Iterable[str], known: Iterable[str] | None = None) -> list[str]:
    """Normalise code patterns (upper case); ValueError names the first bad one.

    A pattern is a two-character code or one with ``*`` wildcards (``8*``,
    ``*S``, ``*``).  With ``known``, a pattern must match at least one of them,
    so a typo is reported instead of showing an empty journal.
    """
    out = []
    known_codes = list(known) if known is not None else None
    for raw in patterns:
        p = raw.strip().upper()
        literal = p.replace("*", "")
        if (
            not p
            or not _CODE_PATTERN_RE.match(p)
            or len(literal) > 2
            or ("*" not in p and len(p) != 2)
        ):
            raise ValueError(
                f"{raw!r} is not a journal code; allowed: two characters (88, 9S) "
                "or a pattern with * (8*, J*)"
            )
        if known_codes is not None:
            rx = _pattern_regex([p])
            if not any(rx.match(c) for c in known_codes):
                raise ValueError(
                    f"{raw!r} matches no journal code; allowed: a code such as 88, 9S, JS "
                    "or a pattern such as 8*, J*"
                )
        out.append(p)
    return out


def _pattern_regex(patterns: list[str]) -> re.Pattern[str]:
    alternatives = "|".join(".*".join(re.escape(part) for part in p.split("*")) for p in patterns)
    return re.compile(rf"^(?:{alternatives})$")


@attrs.frozen
class _Filter:
    """The selection of ``dspjrn``: codes, message id, time range."""

    codes: re.Pattern[str] | None
    msgid: str | None
    since: datetime | None
    until: datetime | None
    needle: bytes | None

    @classmethod
    def build(
        cls,
        codes: Iterable[str] | None,
        msgid: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> _Filter:
        rx = _pattern_regex(check_code_patterns(codes)) if codes is not None else None
        needle = None
        if msgid is not None:
            needle = json.dumps(msgid, ensure_ascii=False).encode()
        return cls(rx, msgid, _aware(since), _aware(until), needle)

    def wants_line(self, line: bytes) -> bool:
        """Cheap pre-check on the raw line, so most lines are never decoded."""
        return self.needle is None or self.needle in line

    def wants(self, entry: dict[str, Any]) -> bool:
        if self.codes is not None and not self.codes.match(str(entry.get("code", "")).upper()):
            return False
        if self.msgid is not None and entry.get("msgid") != self.msgid:
            return False
        if self.since is not None or self.until is not None:
            ts = entry_time(entry)
            if ts is None:
                return False
            if self.since is not None and ts < self.since:
                return False
            if self.until is not None and ts > self.until:
                return False
        return True

    def past(self, entry: dict[str, Any]) -> bool:
        """Whether ``entry`` is after ``until``: nothing later can match."""
        if self.until is None:
            return False
        ts = entry_time(entry)
        return ts is not None and ts > self.until


def _aware(t: datetime | None) -> datetime | None:
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=UTC)
    return t


def entry_time(entry: dict[str, Any]) -> datetime | None:
    try:
        return _aware(datetime.fromisoformat(entry["ts"]))
    except (KeyError, TypeError, ValueError):
        return None


def read_entries(
    directory: Path,
    codes: Iterable[str] | None = None,
    msgid: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """The matching entries of every receiver, oldest first.

    Takes no lock: a line a writer has not finished is left out, as are lines
    that are not journal entries.  ValueError for a malformed code pattern.
    """
    flt = _Filter.build(codes, msgid, since, until)
    for _, path in _from(receivers(directory), flt.since):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        complete, _ = _split(data)
        yield from _matching(complete, flt)


def _from(found: list[tuple[int, Path]], since: datetime | None) -> list[tuple[int, Path]]:
    """The receivers from the first whose first or last entry is at ``since`` or later.

    Entries are written in time order, so an older receiver holds nothing
    for ``--from``: ``dspjrn --from -1h`` read a journal of 1.7 million
    entries whole.  Both ends are looked at because a clock set back (an
    NTP step) can leave a receiver ending before entries it holds.
    """
    if since is None:
        return found
    for at, (_, path) in enumerate(found):
        for entry in (_first_entry_in(path), _last_entry_in(path)):
            ts = entry_time(entry) if entry is not None else None
            if ts is None or ts >= since:
                return found[at:]
    return []


def _first_entry_in(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(_TAIL_CHUNK)
    except FileNotFoundError:
        return None
    complete, _ = _split(head)
    return next((e for e in map(_parse, complete) if e is not None), None)


def _split(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines and the unfinished rest (without a newline yet)."""
    lines = data.split(b"\n")
    return lines[:-1], lines[-1]


def _matching(lines: list[bytes], flt: _Filter) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not flt.wants_line(line):
            continue
        entry = _parse(line)
        if entry is not None and flt.wants(entry):
            yield entry


def follow(
    directory: Path,
    codes: Iterable[str] | None = None,
    msgid: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    poll_interval: float = 0.2,
    stop: Callable[[], bool] | None = None,
    last: int | None = None,
    gone: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """The matching entries already written, then new ones as they arrive.

    ``gone`` is told of receivers deleted (by keep_receivers, say) before
    the reader got to them: their entries are lost to it, which it says.

    With ``last``, no ``since`` and no ``until`` already past, only the last
    ``last`` matching entries of the attached receiver (the one being
    written) come first, as ``tail -f`` shows a file.
    Moves to a newer receiver only once one exists and the current one has been
    read to its end, so rotation loses nothing.  Ends when ``stop()`` is true or,
    with ``until``, at the first entry after it.
    """
    flt = _Filter.build(codes, msgid, since, until)
    tail = _Tail(Path(directory), gone)
    present = receivers(Path(directory))
    # It starts at the first receiver that may match; all older: at the
    # attached one, where the new entries come.
    start = (_from(present, flt.since) or present[-1:])[:1]
    if last is not None and (since is not None
                             or (until is not None and until <= datetime.now(UTC))):
        last = None  # every entry from the time given, or up to one past
    if last is not None:
        start = present[-1:]
    if start:
        tail.number = start[0][0] - 1
        tail.opened = True  # receivers gone from here on held entries it wanted
    backlog = collections.deque(maxlen=last) if last is not None else None
    try:
        while not (stop is not None and stop()):
            lines = tail.read()
            if lines is None:
                if backlog is not None:  # caught up: what was last comes first
                    yield from backlog
                    backlog = None
                time.sleep(poll_interval)
                continue
            for line in lines:
                entry = _parse(line) if flt.until is not None or flt.wants_line(line) else None
                if entry is None:
                    continue
                if flt.past(entry):  # any entry past ``until`` ends it, wanted or not
                    if backlog is not None:
                        yield from backlog
                    return
                if flt.wants_line(line) and flt.wants(entry):
                    if backlog is not None:
                        backlog.append(entry)
                    else:
                        yield entry
    finally:
        tail.close()


class _Tail:
    """Reads the receivers in order, one complete line at a time, across rotation."""

    def __init__(self, directory: Path, gone: Callable[[str], None] | None = None) -> None:
        self.directory = directory
        self.gone = gone
        self.opened = False  # numbers skipped before the first are no loss
        self.number = 0
        self.file: Any = None
        self.pending = b""
        #: The receivers as last listed: the directory is listed again only
        #: when none of them is newer than the current one (with thousands
        #: of receivers, listing it at each move took minutes).
        self._known: list[tuple[int, Path]] = []
        #: The receivers of the first listing: a gap between them was made
        #: before this reader began (DLTJRNRCV), and hides nothing from it.
        self._first: tuple[set[int], int] | None = None

    def _list(self) -> None:
        self._known = receivers(self.directory)
        if self._first is None:
            numbers = {n for n, _ in self._known}
            self._first = (numbers, max(numbers, default=0))

    def read(self) -> list[bytes] | None:
        """New complete lines, or None when there is nothing new anywhere."""
        if self.file is None and not self._next():
            return None
        data = self.file.read()
        if data:
            lines, self.pending = _split(self.pending + data)
            return lines
        newer = self._newer()
        if newer is None:
            return None
        # A newer receiver exists: the current one is finished once read to its end.
        data = self.file.read()
        lines, _ = _split(self.pending + data)
        self.close()
        self._next()  # it may be gone already (keep_receivers): the one after it
        return lines

    def _newer(self) -> tuple[int, Path] | None:
        at = bisect.bisect_right(self._known, self.number, key=lambda r: r[0])
        if at == len(self._known):
            self._list()
            at = bisect.bisect_right(self._known, self.number, key=lambda r: r[0])
            if at == len(self._known):
                return None
        return self._known[at]

    def _next(self) -> bool:
        expected = self.number + 1  # the one that comes next, unless some went
        reporting = self.opened
        found = False
        while True:
            newer = self._newer()
            if newer is None:
                break
            try:
                self._open(*newer)
                found = True
                break
            except FileNotFoundError:
                # The listing is stale (pruned meanwhile): list again.
                self.number = newer[0]
                self._list()
        last_gone = self.number - 1 if found else self.number
        if reporting and last_gone >= expected:
            self._lost(expected, last_gone)
        return found

    def _lost(self, first: int, last: int) -> None:
        if self._first is not None:
            listed, highest = self._first
            missed = [n for n in range(first, last + 1) if n in listed or n > highest]
            if not missed:
                return
            first, last = missed[0], missed[-1]
        if self.gone is not None and last >= first:
            names = receiver_name(first) + ("" if last == first else
                                            f" to {receiver_name(last)}")
            self.gone(f"{names} {'was' if last == first else 'were'} deleted before "
                      f"{'it' if last == first else 'they'} could be read (any entries "
                      f"{'it' if last == first else 'they'} held are not shown)")

    def _open(self, number: int, path: Path) -> None:
        self.close()
        self.number = number
        self.pending = b""
        self.file = open(path, "rb")
        self.opened = True

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# --------------------------------------------------------------------------- times

_RELATIVE_RE = re.compile(r"^-(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
#: IBM's DSPJRN FROMTIME('113026' '070257'): a date as the job's *MDY format
#: has it, then, optionally, a time HHMMSS (or HHMM).
_IBM_TIME_RE = re.compile(r"^(\d\d)(\d\d)(\d\d)(?:\s+(\d\d)(\d\d)(\d\d)?)?$")


def parse_time(text: str, now: datetime | None = None, *, end_of_day: bool = False) -> datetime:
    """An aware UTC datetime from ISO 8601 or a relative time like ``-10m``.

    Naive times are UTC, as the journal is.  A bare time of day means today.
    With ``end_of_day`` a time means the last microsecond of what it names, so
    ``--to 2024-05-01`` includes that whole day and ``--to 10:30`` that minute.
    """
    s = text.strip()
    now = now or datetime.now(UTC)
    if s.lower() == "now":
        return now
    try:
        m = _RELATIVE_RE.match(s)
        if m:
            return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        ibm = _IBM_TIME_RE.match(s)
        if ibm:
            month, day, year, hour, minute, second = (int(g or 0) for g in ibm.groups())
            # The century as IBM i reads a two-digit year: 40-99 is 19xx.
            t = datetime(year + (1900 if year >= 40 else 2000), month, day, hour, minute,
                         second, tzinfo=UTC)
            if end_of_day:  # up to the end of what was given: the day, minute or second
                unit = ("days" if ibm.group(4) is None else
                        "minutes" if ibm.group(6) is None else "seconds")
                t += timedelta(**{unit: 1}, microseconds=-1)
            return t
        t = _parse_iso(s, now)
        unit = _iso_unit(s) if end_of_day else None
        if unit:
            t += timedelta(**{unit: 1}, microseconds=-1)
        return t
    except (ValueError, OverflowError):  # not a time, or none this calendar holds
        raise ValueError(
            f"{text!r} is not a time; allowed: ISO 8601 (2024-05-01, 2024-05-01T10:30, "
            "10:30 for today, with Z or an offset, naive is UTC), IBM's MMDDYY [HHMMSS] "
            "(UTC), or relative "
            "-30s, -10m, -2h, -1d, -1w, within the years 1-9999"
        ) from None


#: The date forms of ISO 8601 that datetime reads: 2024-05-01, 20240501, 2024-W18-3.
_ISO_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{4}-W\d{2}(?:-\d)?|\d{8}|\d{4}W\d{2}\d?")


def _iso_unit(s: str) -> str | None:
    """The last unit an ISO time names, so that ``--to 10:30`` takes its whole minute.

    A time with a fraction of a second is exact: there is nothing after it to take.
    """
    clock = s
    day = _ISO_DATE_RE.match(s)
    if day:
        if day.end() == len(s):
            return "days"
        clock = s[day.end() + 1:]  # after the separator, whichever it is
    clock = re.split(r"[Zz+-]", clock, maxsplit=1)[0].removeprefix("T")
    return {2: "hours", 4: "minutes", 6: "seconds"}.get(len(clock.replace(":", "")))


def _parse_iso(s: str, now: datetime) -> datetime:
    if not s:
        raise ValueError(s)
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        if not _TIME_OF_DAY_RE.match(s):
            # "2026" read as 20:26 and "2026-11" as 20:26 at -11:00: a time of
            # day needs its colon, a leading T, or to be an hour alone.
            raise
        tod = dtime.fromisoformat(s)
        # Today where the offset given is, so 01:00+03:00 is not a day early.
        t = datetime.combine(now.astimezone(tod.tzinfo or UTC).date(), tod)
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


#: A time of day alone: 08, 08:15, 08:15:30.5, T0815, each with Z or an offset.
_TIME_OF_DAY_RE = re.compile(r"^(?:T.+|\d\d(?:[Zz]|[+-].*)?|\d\d:.*)$")
