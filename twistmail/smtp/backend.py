"""What an SMTP server job's sessions use: the directory, the queue, the journal.

Every call that touches the disk or SQLite runs in the reactor's thread pool,
so a slow fsync or lookup never stalls the other work of the job.  A message
goes to QTMSINQ when it has a local recipient (the bridge forwards any remote
ones) and to QTMSOUTQ when all its recipients are remote; the journal gets
94/95, 91, 92, 9T, 99 and 97/96 as IBM's SMTP server writes them.

Settings honoured: ``[system] local_domains``, ``[storage] threshold``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, threads

from twistmail.directory import resolve_recipient
from twistmail.interfaces import QTMSINQ, QTMSOUTQ
from twistmail.maildir import trace_prefix
from twistmail.protocols.peer import client_address
from twistmail.queue import Envelope, Recipient
from twistmail.smtp.address import Address, literal_address
from twistmail.smtp.server import Backend, Received, Verdict

STORAGE_CHECK_EVERY = 1.0  # seconds
#: How long a recipient, once accepted, is accepted again without asking the
#: directory, and how many such verdicts are remembered.
KNOWN_FOR = 1.0  # seconds
KNOWN_MAX = 1024


def storage_used_percent(path: Path) -> float:
    st = os.statvfs(path)
    if not st.f_blocks:
        return 0.0
    return 100.0 * (1.0 - st.f_bavail / st.f_blocks)


_LOCAL_OK = Verdict(250, "2.1.5 Recipient OK")


class QueueBackend(Backend):
    def __init__(self, reactor: Any, settings: Any, directory: Any, queue: Any,
                 journal: Any) -> None:
        self.reactor = reactor
        self.hostname = settings.hostname
        self.local_domains = tuple(d.lower() for d in settings.system.local_domains)
        self.threshold = settings.storage.threshold
        self.alwrly = settings.smtp.alwrly
        self.vfyfromusr = settings.smtp.vfyfromusr
        self.pctrtgchr = settings.smtp.pctrtgchr == "*YES"
        self.popwdw = settings.smtp.popwdw
        self.nfydlvry = settings.smtp.nfydlvry
        self.datadir = settings.datadir
        self.directory = directory
        self.queue = queue
        self.journal = journal
        self._storage_checked = 0.0
        self._storage_full = False
        #: Recipients accepted lately, with the verdict and when it stops
        #: counting: by address when local, by address and client when relayed.
        self._known: dict[Any, tuple[float, Verdict]] = {}

    def storage_full(self) -> bool:
        now = time.monotonic()
        if now - self._storage_checked >= STORAGE_CHECK_EVERY:
            self._storage_checked = now
            self._storage_full = storage_used_percent(self.datadir) > self.threshold
        return self._storage_full

    def check_recipient(self, address: Address, client_ip: str, user: str | None,
                        server_ip: str | None = None) -> Any:
        """The verdict on a RCPT; a recipient accepted in the last second is known.

        Asking the directory means a trip to a thread, which costs a job as
        much CPU as the rest of the RCPT.  A recipient found local a moment
        ago is accepted again without asking: the bridge resolves every
        recipient again when it delivers, so a profile deleted meanwhile
        gets a nondelivery notice instead of a 550, for that second only.
        A relay recipient is accepted again for the same client (address
        and signed-on user) only, since ALWRLY judges the client: an
        *ACCEPT entry removed meanwhile stops relaying a second later at
        most.  Refusals are never remembered.
        """
        here = None
        if not address.domain or self._of_this_host(address):
            # <postmaster>, which RFC 5321 §4.5.1 says must be accepted: the
            # first local domain's, and delivered there (the route).
            here = Address("postmaster", self.local_domains[0])
        elif server_ip is not None and _names(address.domain, server_ip):
            # RFC 1123 §5.2.17: a literal of our own address is recognised;
            # sam@[192.0.2.1] is sam of the first local domain.  Only the
            # address the client reached counts: asking about others would
            # map the host's addresses for anyone.
            here = Address(address.local, self.local_domains[0])
        if here is not None:
            address = here
            d = defer.maybeDeferred(self.check_recipient, address, client_ip, user)
            return d.addCallback(lambda v: attrs.evolve(v, route=v.route or str(address))
                                 if v.accepted else v)
        key = str(address)
        now = self.reactor.seconds()
        for known in (self._known.get(key), self._known.get((key, client_ip, user))):
            # Within KNOWN_FOR ahead only: a clock set back must not stretch it.
            if known is not None and 0 < known[0] - now <= KNOWN_FOR:
                return known[1]
        d = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._verdict, address, client_ip, user
        )
        d.addCallback(self._remember, key, client_ip, user)
        return d

    def _of_this_host(self, address: Address) -> bool:
        """Postmaster or MAILER-DAEMON at the host name, when that is no local domain.

        Notices come from MAILER-DAEMON@<hostname> and name its postmaster:
        a reply to one, or mail to the postmaster it names, is for this
        host's postmaster, not a relay.
        """
        return (address.local.lower() in ("postmaster", "mailer-daemon")
                and address.domain_key == self.hostname.lower().rstrip(".")
                and address.domain_key not in self.local_domains)

    def _remember(self, verdict: Verdict, key: str, client_ip: str,
                  user: str | None) -> Verdict:
        if verdict.code == 250 and (verdict is _LOCAL_OK or not verdict.local):
            if len(self._known) >= KNOWN_MAX:
                self._known.clear()
            until = self.reactor.seconds() + KNOWN_FOR
            self._known[key if verdict.local else (key, client_ip, user)] = (until, verdict)
        return verdict

    def _verdict(self, address: Address, client_ip: str, user: str | None) -> Verdict:
        routed = self._percent_route(address)
        if routed is not None and routed.domain_key in self.local_domains:
            # user%local@local is user@local: delivered here, never relayed.
            verdict = self._verdict(routed, client_ip, user)
            if not verdict.accepted:
                return verdict
            return attrs.evolve(verdict, route=verdict.route or str(routed))
        if routed is not None:
            # user%remote@local is mail for user@remote: a relay like any other.
            why = self._relay_refused(routed, client_ip, user)
            if why is None:
                return Verdict(250, "2.1.5 Recipient OK (relay, % routing)", local=False,
                               route=str(routed))
            self.journal.write("9V", f"9V RLY {client_ip}", ip=client_ip,
                               recipient=str(address), alwrly=self.alwrly, reason=why)
            return Verdict(550, f"5.7.1 <{address}>: Relay access denied")
        resolution, stand_in = resolve_recipient(self.directory, str(address), self.nfydlvry)
        if stand_in is not None:
            return Verdict(250, "2.1.5 Recipient OK")  # not remembered: no entry
        if resolution is None:
            if address.local.lower() == "postmaster":
                # Taken with nobody to read it, it would go back to its
                # sender: a notice carrying anyone's text to any address.
                return self.rejected(client_ip, "recipient", str(address), Verdict(
                    550, f"5.1.1 <{address}>: Recipient address rejected: no mailbox "
                    "is enrolled for the postmaster"))
            return self.rejected(client_ip, "recipient", str(address), Verdict(
                550, f"5.1.1 <{address}>: Recipient address rejected: "
                "user unknown in the system distribution directory"))
        if resolution.kind == "remote":
            why = self._relay_refused(address, client_ip, user)
            if why is None:
                return Verdict(250, "2.1.5 Recipient OK (relay)", local=False)
            self.journal.write("9V", f"9V RLY {client_ip}", ip=client_ip,
                               recipient=str(address), alwrly=self.alwrly, reason=why)
            return Verdict(550, f"5.7.1 <{address}>: Relay access denied")
        return _LOCAL_OK

    def _percent_route(self, address: Address) -> Address | None:
        """PCTRTGCHR(*YES): ``user%host@local`` names ``user@host``; off, it is a local part."""
        if not self.pctrtgchr or "%" not in address.local:
            return None
        if address.domain_key not in self.local_domains:
            return None
        user, _, host = address.local.rpartition("%")
        if not user or not host:
            return None
        return Address(user, host)

    def _relay_refused(self, address: Address, client_ip: str, user: str | None) -> str | None:
        """Why relaying to ``address`` is refused (ALWRLY), or None when it is allowed.

        An authenticated client may always relay.  *BOTH grants relay when
        either list does: the recipient's domain is near, or the client is on
        the accept list.
        """
        if user is not None:
            return None
        rule = self.alwrly
        if rule == "*ALL":
            return None
        near = rule in ("*NEAR", "*BOTH") and self.directory.near_domain(address.domain_key)
        listed = rule in ("*LIST", "*BOTH") and self.directory.address_listed("*ACCEPT",
                                                                              client_ip)
        if near or listed:
            return None
        if rule == "*POPWDW" and self.popwdw and self.directory.pop_login_since(
                client_ip, time.time() - 60 * self.popwdw):
            return None
        return f"not allowed by ALWRLY {rule}"

    def check_sender(self, address: Address, client_ip: str, user: str | None) -> Any:
        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._sender_verdict, address,
            client_ip, user,
        )

    def _sender_verdict(self, address: Address, client_ip: str,
                        user: str | None) -> Verdict | None:
        """VFYFROMUSR: the MAIL FROM must be a directory entry's, and the user's own."""
        if self.vfyfromusr == "*NOTACCEPT" and self.directory.address_listed("*ACCEPT",
                                                                             client_ip):
            return None
        res = self.directory.resolve(str(address))
        if res is None or res.kind == "remote" or res.catchall:  # *ANY *ANY takes anything
            return self.rejected(client_ip, "originator", str(address), Verdict(
                553, f"5.7.1 <{address}>: Sender address rejected: not in the "
                "system distribution directory (VFYFROMUSR)"))
        if user is not None and res.usrprf != user:
            return self.rejected(client_ip, "originator", str(address), Verdict(
                553, f"5.7.1 <{address}>: Sender address rejected: it belongs to "
                f"another user than {user} (VFYFROMUSR)"))
        return None

    def rejected(self, client_ip: str, what: str, address: str, verdict: Verdict,
                 argument: str | None = None) -> Verdict:
        """9W, "rejected by the SMTP server": the refusals an administrator
        looks for when a sender says its mail did not arrive.  Relay (9V) and
        connection (9S) refusals have their own codes.  ``argument``, for a
        command refused for its syntax, is what the client sent: no address."""
        if argument is not None:
            self.journal.write("9W", f"9W RJT {client_ip} (syntax)", ip=client_ip,
                               argument=argument, refused=what,
                               reply=f"{verdict.code} {verdict.text}")
            return verdict
        self.journal.write("9W", f"9W RJT {client_ip} {address or '<>'}", ip=client_ip,
                           **{what: address}, reply=f"{verdict.code} {verdict.text}")
        return verdict

    def limit_reached(self, client_ip: str, setting: str) -> None:
        self.journal.write("JL", f"JL LIMIT limits.{setting} {client_ip}", ip=client_ip,
                           setting=f"limits.{setting}")

    def etrn(self, node: str, client_ip: str) -> Any:
        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._etrn, node, client_ip)

    def _etrn(self, node: str, client_ip: str) -> str | None:
        """None when started; why not otherwise ("not allowed", "held")."""
        if not (self.directory.etrn_allowed(client_ip) or self._etrn_host(client_ip)):
            return "not allowed"
        from twistmail.bridge.outbound import held_parts, request_flush

        if held_parts(self.queue.root):
            # HLDDSTQ: nothing would go; the mail stays where it waits.
            self.journal.write("9Y", f"9Y ETRN {node} {client_ip}", ip=client_ip, node=node,
                               refused="outbound delivery is held (HLDDSTQ)")
            return "held"
        request_flush(self.queue.root, node)
        self.journal.write("9Y", f"9Y ETRN {node} {client_ip}", ip=client_ip, node=node)
        return None

    def _etrn_host(self, client_ip: str) -> bool:
        """Whether an *ETRNSVR entry given by host name has the client's address.

        Looked up now (the system resolver and /etc/hosts, in this thread), so
        an ISP whose address changes keeps its entry working.
        """
        client = client_address(client_ip)
        for host in self.directory.etrn_host_names():
            try:
                infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                continue
            if any(client_address(info[4][0]) == client for info in infos):
                return True
        return False

    def dsn_allowed(self, client_ip: str) -> Any:
        if self.alwrly == "*ALL":
            return True
        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self.directory.address_listed,
            "*ACCEPT", client_ip)

    def authenticate(self, user: str, password: str, client_ip: str,
                     authzid: str = "") -> Any:
        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._authenticate, user, password,
            client_ip, authzid,
        )

    def _profile_of(self, user: str) -> str:
        """The profile a sign-on name means: a profile name, or an SMTP address.

        Not through the catch-all: any made-up address would sign on as its
        owner.  A name that means nobody gives "", which still costs a hash,
        so the time taken does not tell it apart.
        """
        if "@" not in user:
            return user
        res = self.directory.resolve(user)
        known = res is not None and res.usrprf and not res.catchall
        return res.usrprf if known else ""

    def _authenticate(self, user: str, password: str, client_ip: str,
                      authzid: str = "") -> str | None:
        usrprf = self.directory.authenticate(self._profile_of(user), password)
        if usrprf is not None and authzid and \
                self._profile_of(authzid).upper() != usrprf:
            # RFC 4616: acting for another identity needs a right to it, which
            # nobody has here; the user's own name or address is no other.
            usrprf = None
        if usrprf is None:
            self.journal.write("9X", f"9X AUTHFAIL {client_ip}", ip=client_ip, user=user)
        else:
            self.journal.write("9Z", f"9Z AUTH {client_ip} {usrprf}", ip=client_ip,
                               usrprf=usrprf)
        return usrprf

    def signs_on(self, usrprf: str) -> Any:
        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self.directory.signs_on, usrprf)

    def new_spool(self, originator: str = "", recipients: Any = ()) -> Any:
        spool = self.queue.new_spool()
        if len(recipients) == 1 and recipients[0][1]:
            # One local recipient: the file begins as its mailbox copy will,
            # and delivery links it instead of copying (Spool.write_trace).
            try:
                spool.write_trace(trace_prefix(originator, recipients[0][0]))
            except BaseException:
                spool.abort()
                raise
        return spool

    def commit(self, spool: Any, received: Received) -> Any:
        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._commit, spool, received
        )

    def _commit(self, spool: Any, received: Received) -> str:
        local = any(is_local for _, is_local in received.recipients)
        # Mail for remote recipients only goes straight to QTMSOUTQ, unless
        # content filters (*FTR*) are set: the bridge examines it first then,
        # so relayed mail is filtered as local mail is.
        target = QTMSINQ if local or self._filtering() else QTMSOUTQ
        dsn = {addr: (notify, orcpt) for addr, notify, orcpt in received.dsn}
        envelope = Envelope(
            id=spool.id,
            originator=received.originator,
            recipients=tuple(Recipient(addr, notify=dsn.get(addr, (None, None))[0],
                                       orcpt=dsn.get(addr, (None, None))[1])
                             for addr, _ in received.recipients),
            ret=received.ret,
            envid=received.envid,
            received=time.time(),
            client_ip=received.client_ip,
            helo=received.helo,
            message_id=received.message_id,
            size=spool.size - spool.trace,
            trace=spool.trace,
        )
        size = envelope.size
        journaled = []

        def before_publish() -> None:
            self._journal_received(spool.id, received, size, target)
            journaled.append(True)

        try:
            return spool.commit(target, envelope, before_publish=before_publish)
        except Exception as e:
            if journaled:
                # The entries say it was placed on the queue; the client hears
                # 451 and sends it again, under a new id.
                self.journal.write(
                    "9W", f"9W RJT {received.client_ip} {received.originator or '<>'}",
                    spool.id, ip=received.client_ip, originator=received.originator,
                    reply="451 4.3.0 message not queued", reason=f"{type(e).__name__}: {e}")
            raise

    def _filtering(self) -> bool:
        return any(self.directory.filters().values())

    def _journal_received(self, qid: str, r: Received, size: int, target: str) -> None:
        with self.journal.batch():
            self._journal_entries(qid, r, size, target)

    def _journal_entries(self, qid: str, r: Received, size: int, target: str) -> None:
        j = self.journal
        # 94 or 95 by what the mail is (for this system, or relayed); 97 or 96
        # by where it went (relayed mail goes through QTMSINQ when filtered).
        if any(is_local for _, is_local in r.recipients):
            j.write("94", f"94 LIN {r.client_ip}", qid, ip=r.client_ip, helo=r.helo)
        else:
            j.write("95", f"95 RIN {r.client_ip}", qid, ip=r.client_ip, helo=r.helo)
        j.write("91", f"91 O {r.originator or '<>'}", qid, originator=r.originator)
        for addr, _ in r.recipients:
            j.write("92", f"92 R {addr}", qid, recipient=addr)
        j.write("9T", f"9T SIZE {size}", qid, size=size)
        if r.message_id:
            j.write("99", f"99 MID {r.message_id}", qid, message_id=r.message_id)
        if target == QTMSINQ:
            j.write("97", f"97 TIQ {QTMSINQ}", qid, queue=QTMSINQ)
        else:
            j.write("96", f"96 TOQ {QTMSOUTQ}", qid, queue=QTMSOUTQ)


def _names(domain: str, ip: str) -> bool:
    """Whether ``domain`` is an address literal of ``ip``."""
    if not domain.startswith("["):
        return False
    try:
        return ipaddress.ip_address(literal_address(domain)) == ipaddress.ip_address(ip)
    except ValueError:
        return False
