"""The mail server framework's work on one message from QTMSINQ.

The steps, as IBM i's MSF runs its exit programs: take the message (7A),
park it on QTMSBSSQ when storage is short (7L), filter (nothing yet),
resolve each recipient against the system distribution directory (P2), then
deliver into the POP mailbox (B8, B2) or the SNADS store (7O), forward the
remote recipients to QTMSOUTQ (C6), and write one nondelivery notice for the
recipients that cannot be delivered (7P, AP, A1, A2).  A message that
cannot be read (a damaged envelope, a missing body) is set aside in
``corrupt/`` (7Y) when it is taken.

A mailbox that cannot take the message now (its file system full or
read-only, its directory damaged) defers that recipient alone (BD): the
message goes on to QTMSOUTQ with it, the outbound side puts it on the retry
queues with the remote recipients that wait, and a due retry brings it back
here.  So a broken mailbox holds back no other recipient, and its sender
hears of it as of any other delivery that waits (the delay notice, then the
nondelivery notice when RTYMIN and RTYDAY or RTYHOUR are used up).

Synchronous: a QMSF job (:mod:`twistmail.bridge.msf`) runs it.  Every step can be
repeated after a crash without a second copy: Maildir names derive from the
queue id and the recipient's position, and a notice's queue id derives from
the original's, so a repeated notice is the same message.
"""

from __future__ import annotations

import errno
import sys
import time
from typing import Any

import attrs

from twistmail.bridge.nondelivery import Failure, queue_notice
from twistmail.directory import resolve_recipient
from twistmail.interfaces import CORRUPT, QTMSBSSQ, QTMSINQ, QTMSOUTQ, QUARANTINE
from twistmail.maildir import MailboxGone, owner_lock, trace_prefix
from twistmail.policy.filters import examine
from twistmail.queue import (
    DELIVERED,
    FAILED,
    PENDING,
    RETRY,
    CorruptEnvelope,
    Envelope,
    Recipient,
)

#: How P2's entry-specific data tags a resolved recipient, in the seed's words
#: ("POP LclDel", "SMTP MsgFwd", "SMTP NonDel", "chg to SNADS"), so that
#: IBM's queries of the data (JOESD LIKE '%NonDel%') find them.
P2_TAGS = {"pop": "POP LclDel", "remote": "SMTP MsgFwd", "unknown": "SMTP NonDel",
           "snads": "chg to SNADS"}
UNKNOWN = ("5.1.1", "550 5.1.1 user unknown: no entry in the system distribution directory")


@attrs.frozen
class Outcome:
    queue_id: str
    delivered: int = 0
    failed: int = 0
    forwarded: int = 0
    deferred: int = 0
    parked: bool = False
    filtered: bool = False
    corrupt: bool = False
    notice: str | None = None


class InboundProcessor:
    """Resolution and local delivery for messages taken from QTMSINQ."""

    def __init__(self, *, hostname: str, queue: Any, directory: Any, mailboxes: Any,
                 snads: Any, journal: Any, storage_full: Any, ftracn: str = "*KEEP",
                 responsible: str | None = None) -> None:
        self.hostname = hostname
        self.queue = queue
        self.directory = directory
        self.mailboxes = mailboxes
        self.snads = snads
        self.journal = journal
        self.storage_full = storage_full
        self.ftracn = ftracn
        self.responsible = responsible  # NFYDLVRY: gets a copy of every failure notice
        #: Called before each recipient's step: a QMSF job tells its bridge it
        #: is still at work on a message of many recipients.
        self.progress: Any = lambda: None

    def process(self, queue_id: str) -> Outcome:
        with self.journal.batch():  # one journal write for the message's steps
            return self._process(queue_id)

    def _process(self, queue_id: str) -> Outcome:
        try:
            env = self.queue.load(QTMSINQ, queue_id)
        except CorruptEnvelope as e:
            return self._set_aside(queue_id, f"unreadable envelope: {e}")
        body = self.queue.body_path(queue_id, QTMSINQ)
        damage = self.queue.body_damage(QTMSINQ, env, body)
        if damage is not None:
            return self._set_aside(queue_id, damage)
        j = self.journal
        j.write("7A", f"7A FIQ {QTMSINQ}", queue_id, queue=QTMSINQ)
        if self.storage_full():
            # Journaled once done: on a full disk the move itself may fail,
            # and the message then stays on QTMSINQ, not parked.
            self.queue.move(queue_id, QTMSINQ, QTMSBSSQ)
            j.write("7L", f"7L TSSQ {QTMSBSSQ}", queue_id, queue=QTMSBSSQ)
            j.flush()
            return Outcome(queue_id, parked=True)
        if env.attempts == 0 and not released(env):  # a retry was filtered the first time
            match = examine(body, env.originator, self.directory, env.trace)
            if match is not None:
                return self._filtered(env, match)
        recipients: list[Recipient] = []
        failures: list[Failure] = []
        forwarded = delivered = deferred = 0
        errors: list[Exception] = []
        # Mailboxes this message is in already: two addresses of one user (or
        # the same address twice, or two caught by *ANY *ANY) make one copy.
        boxes = {r.resolved: i for i, r in enumerate(env.recipients)
                 if r.state == DELIVERED and r.resolved}
        for index, rcpt in enumerate(env.recipients):
            if rcpt.done or rcpt.state == "relayed":
                recipients.append(rcpt)
                continue
            self.progress()
            try:
                new = self._one(env, index, rcpt, body, boxes)
            except Exception as e:  # this mailbox; the others still get their copy
                errors.append(e)
                recipients.append(rcpt)
                continue
            recipients.append(new)
            if new.state == DELIVERED:
                delivered += 1
            elif new.state == RETRY:
                deferred += 1
            elif new.state == FAILED:
                status, text = (new.last_error or "5.0.0 failed").split(" ", 1)
                failures.append(Failure(new.address, status, text))
            else:
                forwarded += 1
        before, env = env, env.with_recipients(recipients)
        try:
            if errors:
                raise errors[0]
            notice = self._settle(env, failures, forwarded, deferred, body)
        except Exception:
            # What was delivered is recorded before the message is tried again:
            # a retry must not put a second copy in the mailboxes that worked
            # (their user may have fetched and deleted the first one by then).
            # Nothing else is: a failure is reported, with its notice, then.
            self._keep_deliveries(before, recipients)
            raise
        return Outcome(queue_id, delivered, len(failures), forwarded, deferred, notice=notice)

    def _settle(self, env: Envelope, failures: list[Failure], forwarded: int, deferred: int,
                body: Any) -> str | None:
        """Notices, then the message moves on to QTMSOUTQ or goes; the failure notice's id."""
        j, queue_id = self.journal, env.id
        notice = self._notice(env, failures, body) if failures else None
        if failures:  # the client side must not report them again
            env = env.note({"noticed": [f.address for f in failures]})
        # A retry reports only what no try reported: the note goes with the
        # message only once the report is queued.
        reported = {a for h in env.history if isinstance(h, dict)
                    for a in h.get("success_noticed", ())}
        successes = [Failure(r.address, "2.0.0", "delivered to the local mailbox", "delivered")
                     for r in env.recipients if r.state == DELIVERED and r.notify
                     and "SUCCESS" in r.notify and r.delivered_at is not None
                     and r.address not in reported]
        if successes:
            self._notice(env, successes, body)
            env = env.note({"success_noticed": [f.address for f in successes]})
        # The step's entries are written before the message moves on or goes.
        if forwarded or deferred:
            # Deferred recipients go along: the outbound side keeps the retries.
            j.write("C6", f"C6 TOQ {QTMSOUTQ}", queue_id, queue=QTMSOUTQ, recipients=forwarded,
                    deferred=deferred)
            j.write("C1", f"C1 O {env.originator or '<>'}", queue_id, originator=env.originator)
            for address in [r.address for r in env.recipients if r.state == PENDING]:
                j.write("C2", f"C2 R {address}", queue_id, recipient=address)
            j.flush()
            self.queue.move(queue_id, QTMSINQ, QTMSOUTQ, env)
        else:
            j.flush()
            # Mail that only went into mailboxes may come back after a crash:
            # delivered again, it finds its copies there and makes none.  A
            # notice would be sent twice, so its removal must hold.
            self.queue.remove(QTMSINQ, queue_id, durable=bool(failures or successes))
        return notice

    def _keep_deliveries(self, before: Envelope, recipients: list[Recipient]) -> None:
        kept = [new if new.state == DELIVERED else old
                for old, new in zip(before.recipients, recipients, strict=True)]
        if kept == list(before.recipients):
            return
        self.journal.flush()
        try:
            self.queue.update(QTMSINQ, before.with_recipients(kept))
        except (OSError, KeyError) as e:  # the first error is the one raised
            print(f"{before.id}: its deliveries could not be recorded: {e}", file=sys.stderr)

    def _set_aside(self, queue_id: str, reason: str) -> Outcome:
        """A message that cannot be read goes to corrupt/ (7Y), kept for the administrator."""
        if self.queue.set_aside(QTMSINQ, queue_id, reason) is None:
            raise KeyError(queue_id)  # gone meanwhile
        self.journal.write("7Y", f"7Y CRP {queue_id}", queue_id, queue=CORRUPT, reason=reason)
        return Outcome(queue_id, corrupt=True)

    def _filtered(self, env: Envelope, match: Any) -> Outcome:
        """FTRACN: keep the message in quarantine, or discard it (journal OW)."""
        what = {"filter": match.type, "pattern": match.pattern, "value": match.value[:200]}
        keep = self.ftracn == "*KEEP"
        action = "kept in quarantine" if keep else "discarded"
        self.journal.write("OW", f"OW {match.type} {action}", env.id, action=action,
                           ftracn=self.ftracn, originator=env.originator, **what)
        self.journal.flush()
        if keep:
            self.queue.move(env.id, QTMSINQ, QUARANTINE, env.note({"quarantined": what}))
        else:
            self.queue.remove(QTMSINQ, env.id)
        return Outcome(env.id, filtered=True)

    def _one(self, env: Envelope, index: int, rcpt: Recipient, body: Any,
             boxes: dict[str, int]) -> Recipient:
        j = self.journal
        qid = env.id
        # Postmaster mail was accepted while a stand-in took it (see
        # QueueBackend); one removed since gets the notice any unknown
        # recipient gets.
        res, stand_in = resolve_recipient(self.directory, rcpt.address, self.responsible)
        via = {"via": stand_in} if stand_in is not None else {}
        kind = res.kind if res is not None else "unknown"
        j.write("P2", f"P2 R {rcpt.address} {P2_TAGS.get(kind, kind)}", qid,
                recipient=rcpt.address, resolved=kind, **via)
        if res is None:
            j.write("A3", f"A3 U {rcpt.address}", qid, recipient=rcpt.address,
                    reason=UNKNOWN[1])
            return rcpt.evolve(state=FAILED, last_error=f"{UNKNOWN[0]} {UNKNOWN[1]}",
                               attempts=rcpt.attempts + 1)
        if res.kind == "remote":  # also one deferred while its domain was local
            return rcpt.evolve(state=PENDING, resolved="remote")
        prefix = trace_prefix(env.originator, rcpt.address)
        now = time.time()
        box = f"pop:{res.usrprf}" if res.kind == "pop" else f"snads:{res.userid}"
        first = boxes.get(box)
        if first is not None and first != index:
            j.write("B2", f"B2 R {rcpt.address}", qid, recipient=rcpt.address,
                    same_mailbox_as=env.recipients[first].address)
            return rcpt.evolve(state=DELIVERED, resolved=box, delivered_at=now,
                               attempts=rcpt.attempts + 1)
        delivery_id = f"{qid}.R{index}"
        try:
            if res.kind == "pop":
                path = deliver_to_profile(self.mailboxes, self.directory, res.usrprf,
                                          delivery_id, body, prefix, env.trace)
                mailbox = str(path.parent.parent)
                j.write("B8", f"B8 DLV {mailbox}", qid, recipient=rcpt.address,
                        usrprf=res.usrprf, mailbox=mailbox)
                j.write("B2", f"B2 R {rcpt.address}", qid, recipient=rcpt.address)
            else:
                self.snads.deliver(res.userid, delivery_id, body, prefix, env.trace)
                j.write("7O", f"7O TSDS {res.userid} {res.sysaddress}", qid,
                        recipient=rcpt.address, userid=res.userid, address=res.sysaddress)
        except (OSError, MailboxGone) as e:  # this mailbox, for now: tried again later
            if isinstance(e, MailboxGone):
                # DLTUSRPRF since it was resolved: the retry finds where it goes now.
                error, filename = "4.2.0 mailbox cannot take mail now: its user profile " \
                    "was deleted", None
            else:
                error = f"{_deferral_status(e)} mailbox cannot take mail now: {e.strerror or e}"
                filename = e.filename
            j.write("BD", f"BD DFR {rcpt.address}", qid, recipient=rcpt.address, mailbox=box,
                    reason=error, file=filename)
            return rcpt.evolve(state=RETRY, resolved=box, last_error=error,
                               attempts=rcpt.attempts + 1)
        boxes[box] = index
        return rcpt.evolve(state=DELIVERED, resolved=box, delivered_at=now,
                           attempts=rcpt.attempts + 1)

    def _notice(self, env: Envelope, failures: list[Failure], body: Any) -> str | None:
        return queue_notice(self.queue, self.directory, self.journal, self.hostname, env,
                            failures, body, responsible=self.responsible)


def deliver_to_profile(store: Any, directory: Any, usrprf: str, delivery_id: str, body: Any,
                       prefix: bytes, trace: int = 0) -> Any:
    """Deliver into the mailbox of ``usrprf`` while the profile is still there.

    It was resolved a moment ago; DLTUSRPRF since then raises MailboxGone,
    and the retry finds where the mail goes now (see ``owner_lock``).
    """
    with owner_lock(store.root, usrprf):
        if directory.get_profile(usrprf) is None:
            raise MailboxGone(usrprf)
        return store.deliver(usrprf, delivery_id, body, prefix, trace)


def _deferral_status(error: OSError) -> str:
    """RFC 3463's word for why a mailbox cannot take mail now."""
    if error.errno == errno.EDQUOT:
        return "4.2.2"  # mailbox full
    if error.errno == errno.ENOSPC:
        return "4.3.1"  # mail system full
    return "4.2.0"


def released(env: Envelope) -> bool:
    """Whether an administrator released this message from quarantine."""
    return any(isinstance(h, dict) and "released" in h for h in env.history)
