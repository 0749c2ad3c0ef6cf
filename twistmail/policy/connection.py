"""Connection restrictions the controller applies before any job is used.

In order: the abuse limits (``twistmail.policy.anvil``, for SMTP and POP),
then for SMTP the ``*REJECT`` address list and the DNS block lists of
RBLSVR.  A client on the reject list is let through when OVRRJTCNNL(*YES)
and it signed on to POP within POPWDW minutes, as the seed describes (the
POP window is checked first, then the reject list).  Refusals are answered
by the controller itself and journaled (9S; JL for limits).

The reject list is read from the directory in a worker thread every few
seconds and matched in memory, so the common connection costs no I/O; the
DNS lookups are asynchronous with short timeouts (TWISTED.md §2.6).

Settings honoured: ``[smtp] rblsvr ovrrjtcnnl popwdw nameservers``,
``[limits]``.
"""

from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from twistmail.policy.anvil import AUTHFAIL_TEXT, Anvil, LimitSettings, Refusal, client_key

REFRESH_EVERY = 1.0  # seconds between reads of the reject list (README: within a second)
DNS_TIMEOUT = (1, 2)  # seconds per try: a slow block list must not stall mail
#: At most this long for one block list's answer, whatever the resolver does
#: (a truncated answer retried over TCP waits far longer): then not listed.
RBL_LIMIT = 5.0
#: Connections at most waiting for block list answers; more get 421 at once.
#: Each holds its socket and one per list: a flood must not take every
#: descriptor of the controller.
MAX_CHECKING = 256
#: Seconds a client at MAXCONNPERIP waits for one of its sessions to end.
PERIP_GRACE = 1.0


@attrs.frozen
class Verdict:
    code: str  # journal code
    reply: str  # the protocol line, without CRLF
    journal: bool
    fields: dict[str, Any] = attrs.field(factory=dict)
    anvil_counted: bool = True


def _address(ip: str) -> Any:
    """The address of a peer as accept() gave it; a link-local one has a zone
    (``fe80::1%eth0``) that ``ipaddress`` of Python 3.11 refuses."""
    return ipaddress.ip_address(ip.split("%", 1)[0])


def rbl_query(ip: str, zone: str) -> str | None:
    """The DNS name to look up for ``ip`` in block list ``zone`` (nibbles for IPv6)."""
    try:
        addr = _address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        reverse = ".".join(reversed(str(addr).split(".")))
    else:
        reverse = ".".join(reversed(addr.exploded.replace(":", "")))
    return f"{reverse}.{zone.strip('.')}"


def listed_answer(addresses: list[str]) -> bool:
    """Whether A answers mean "listed": 127.0.0.0/8, but not 127.255.255.0/24
    nor 127.0.0.1.

    Spamhaus and others answer 127.255.255.x for "query refused" (an open or
    public resolver), which must never block mail; a list never holds
    127.0.0.1 (RFC 5782 §5), so that answer is a broken list or resolver.
    """
    for a in addresses:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if ip in ipaddress.ip_network("127.0.0.0/8") and ip not in ipaddress.ip_network(
                "127.255.255.0/24") and str(ip) != "127.0.0.1":
            return True
    return False


def make_resolver(reactor: Any, nameservers: tuple[str, ...]) -> Any:
    from twistmail import mx

    return mx.make_resolver(reactor, nameservers, DNS_TIMEOUT)


class ConnectionPolicy:
    log = Logger()

    def __init__(self, reactor: Any, settings: Any, directory: Any, journal: Any,
                 resolver: Any = None) -> None:
        self.reactor = reactor
        self.directory = directory
        self.journal = journal
        self.rejects: list[Any] = []
        self.unread = False  # the last read of the *REJECT list failed
        self.resolver = resolver
        #: The name servers the resolver was made for; None for one given.
        self._made_for: tuple[str, ...] | None = None
        self.checking = 0  # connections waiting for block list answers
        #: Block lists whose last lookup failed (no answer, SERVFAIL): said
        #: once in the log, and again when they answer.
        self.unanswered: set[str] = set()
        self.loop: task.LoopingCall | None = None
        # Elapsed time, not the wall clock: a clock set back an hour would
        # keep a MAXAUTHFAIL lockout (or a rate window) for that hour more.
        self.anvil = Anvil(LimitSettings(), time.monotonic)
        #: Connections of clients at MAXCONNPERIP waiting for one of their sessions to end.
        self.room: dict[str, collections.deque[tuple[defer.Deferred, str, Any, Any]]] = {}
        self.configure(settings)

    def configure(self, settings: Any) -> None:
        s = settings.smtp
        lim = settings.limits
        self.hostname = settings.hostname
        self.rblsvr = tuple(s.rblsvr)
        self.ovrrjtcnnl = s.ovrrjtcnnl == "*YES"
        self.popwdw = s.popwdw
        self.anvil.settings = LimitSettings(lim.maxconnperip, lim.maxconnrate,
                                            lim.maxauthfail, float(lim.interval))
        servers = tuple(s.nameservers)
        made_here = self._made_for is not None
        if self.rblsvr and (self.resolver is None or made_here and self._made_for != servers):
            self.resolver = make_resolver(self.reactor, servers)  # CHGSMTPA applies live
            self._made_for = servers

    def start(self) -> None:
        self.loop = task.LoopingCall(self.refresh)
        self.loop.clock = self.reactor
        self.loop.start(REFRESH_EVERY, now=True)

    def stop(self) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.stop()

    def refresh(self) -> Any:
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      self._read_rejects)
        d.addCallbacks(self._set_rejects, self._not_read)
        self.anvil.sweep()
        return d

    def _not_read(self, failure: Any) -> None:
        """Said once until it is read again (it is tried every few seconds)."""
        if not self.unread:
            self.unread = True
            self.log.warn("the *REJECT list cannot be read from the directory ({why}); the "
                          "one read before stays in force", why=failure.getErrorMessage())

    def _read_rejects(self) -> list[Any]:
        nets = []
        for e in self.directory.list_entries("*REJECT"):
            try:
                nets.append(ipaddress.ip_network(f"{e.intnetadr}/{e.subnetmask}", strict=False))
            except ValueError:
                continue
        return nets

    def _set_rejects(self, nets: list[Any]) -> None:
        self.rejects = nets
        if self.unread:
            self.unread = False
            self.log.info("the *REJECT list is read from the directory again")

    # -- the check -----------------------------------------------------------

    def check(self, ip: str, smtp: bool, rbl: bool = True,
              gone: Callable[[], bool] | None = None) -> Verdict | None | defer.Deferred:
        """None to go on; a Verdict to refuse; a Deferred when DNS must be asked,
        or when the client is at MAXCONNPERIP (see ``_wait_for_room``).

        ``rbl`` False skips the block lists: on the submission ports, where
        every client must sign on anyway and roaming users often come from
        addresses the lists name (dial-up and residential ranges).  ``gone``
        tells whether the client has hung up (a waiting one gives up its place).
        """
        if self.anvil.only_sessions_full(ip) or client_key(ip) in self.room:
            d = self._wait_for_room(ip, gone)
            if d is not None:  # admitted or refused when woken, in its turn
                return d.addCallback(lambda refusal: self._limit(ip, refusal, smtp)
                                     if refusal is not None else self._admitted(ip, smtp, rbl))
        refusal = self.anvil.admit(ip)
        if refusal is not None:
            return self._limit(ip, refusal, smtp)
        return self._admitted(ip, smtp, rbl)

    def _admitted(self, ip: str, smtp: bool, rbl: bool) -> Verdict | None | defer.Deferred:
        """The checks after the limits: the reject list and the block lists."""
        if not smtp:
            return None
        if self._rejected(ip):
            if self.ovrrjtcnnl and self.popwdw:
                d = threads.deferToThreadPool(
                    self.reactor, self.reactor.getThreadPool(), self.directory.pop_login_since,
                    ip, time.time() - 60 * self.popwdw)
                return d.addCallback(lambda who: self._after_pop_window(ip, who, rbl))
            return self._reject_list(ip)
        if self.rblsvr and rbl:
            return self._rbl(ip)
        return None

    def _after_pop_window(self, ip: str, who: str | None, rbl: bool = True) -> Any:
        if who is None:
            return self._reject_list(ip)
        return self._rbl(ip) if self.rblsvr and rbl else None

    def closed(self, ip: str) -> None:
        self.anvil.closed(ip)
        key = client_key(ip)
        if key in self.room:
            self._wake(key)

    def _wait_for_room(self, ip: str, gone: Callable[[], bool] | None = None
                       ) -> defer.Deferred | None:
        """A Deferred that fires when a session of ``ip`` ends, or after PERIP_GRACE.

        A session is counted until its job reports its end.  A client that
        closes and connects again at once (a submitting application with a
        few connections) is often faster than that report, and was refused
        while well under the limit.  The Deferred fires with the limits'
        refusal, or None once admitted.  None when as many already wait as
        the limit allows: a flood is refused at once.  A newcomer waits
        behind those already waiting: the slot a session frees is theirs.
        """
        key = client_key(ip)
        waiting = self.room.setdefault(key, collections.deque())
        self._drop_gone(waiting)
        if len(waiting) >= max(1, self.anvil.settings.maxconnperip):
            if not waiting:
                del self.room[key]
            return None
        d: defer.Deferred = defer.Deferred()
        waiting.append((d, ip, self.reactor.callLater(PERIP_GRACE, self._wake, key, d), gone))
        return d

    def _drop_gone(self, waiting: collections.deque[Any]) -> None:
        """Refuse the waiting connections whose client hung up: their places are free."""
        for entry in [e for e in waiting if e[3] is not None and e[3]()]:
            waiting.remove(entry)
            d, ip, call, _ = entry
            if call.active():
                call.cancel()
            refusal = Refusal("maxconnperip", "too many concurrent connections from your "
                              "address", False)
            self.reactor.callLater(0, d.callback, refusal)

    def _wake(self, key: str, which: defer.Deferred | None = None) -> None:
        """Admit (or refuse) the first waiting connection of ``key``, or ``which``."""
        waiting = self.room.get(key, collections.deque())
        if which is None:  # a session ended: its slot goes to a client still there
            self._drop_gone(waiting)
        for entry in waiting:
            if which is None or entry[0] is which:
                waiting.remove(entry)
                break
        else:
            return
        if not waiting:
            del self.room[key]
        d, ip, call, _ = entry
        if call.active():
            call.cancel()
        # Counted now, so no newcomer takes the slot; handed on in a later
        # turn: the session's end is reported from inside the pool (a job
        # freed, a request refused), which must finish first.
        self.reactor.callLater(0, d.callback, self.anvil.admit(ip))

    def _rejected(self, ip: str) -> bool:
        if not self.rejects:
            return False
        try:
            addr = _address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == n.version and addr in n for n in self.rejects)

    def _reject_list(self, ip: str) -> Verdict:
        return Verdict("9S", f"554 5.7.1 {self.hostname} Connection refused: {ip} is on the "
                       "reject list", True, {"ip": ip, "reason": "*REJECT"})

    def authfail_reply(self, smtp: bool) -> str:
        """The line that refuses an address past MAXAUTHFAIL, as at connect."""
        return self._limit("", Refusal("maxauthfail", AUTHFAIL_TEXT, False), smtp).reply

    def _limit(self, ip: str, refusal: Refusal, smtp: bool) -> Verdict:
        text = (f"421 4.7.0 {self.hostname} {refusal.text}" if smtp
                else f"-ERR [SYS/TEMP] {refusal.text}")
        return Verdict("JL", text, refusal.journal,
                       {"ip": ip, "setting": f"limits.{refusal.setting}"}, anvil_counted=False)

    def _rbl(self, ip: str) -> defer.Deferred | Verdict:
        if self.checking >= MAX_CHECKING:
            return Verdict("JL", f"421 4.3.2 {self.hostname} Too many connections being "
                           "checked, try again later", False,
                           {"ip": ip, "setting": "rblsvr"})
        lookups = []
        for zone in self.rblsvr:
            name = rbl_query(ip, zone)
            if name is None:
                continue
            # Whatever the resolver raises (out of descriptors) or however
            # long it takes, the answer is "not listed", and in time.
            d = defer.maybeDeferred(self.resolver.lookupAddress, name)
            d.addTimeout(RBL_LIMIT, self.reactor)
            d.addCallbacks(lambda r, zone=zone: self._answered(zone, r),
                           lambda f, zone=zone: self._unanswered(zone, f))
            d.addCallback(lambda listed, zone=zone: zone if listed else None)
            lookups.append(d)
        done = defer.gatherResults(lookups)

        def decide(zones: list[str | None]) -> Verdict | None:
            hit = next((z for z in zones if z), None)
            if hit is None:
                return None
            return Verdict("9S", f"554 5.7.1 {self.hostname} Connection refused: {ip} is "
                           f"listed by {hit}", True, {"ip": ip, "reason": "RBL", "zone": hit})

        self.checking += 1

        def checked(result: Any) -> Any:
            self.checking -= 1
            return result

        return done.addCallback(decide).addBoth(checked)

    def _answered(self, zone: str, result: Any) -> bool:
        if zone in self.unanswered:
            self.unanswered.discard(zone)
            self.log.info("block list {zone} answers again", zone=zone)
        return self._answers(result)

    def _unanswered(self, zone: str, failure: Any) -> bool:
        """Not listed: a block list that fails lets clients in, as other MTAs
        do, but the administrator learns that it no longer checks them."""
        from twisted.names import error

        if failure.check(error.DNSNameError):  # NXDOMAIN: the answer "not listed"
            return self._answered(zone, ())
        if zone not in self.unanswered:
            self.unanswered.add(zone)
            self.log.warn("block list {zone} does not answer ({why}); clients are let in "
                          "unchecked by it until it does", zone=zone, why=_why(failure))
        return False

    @staticmethod
    def _answers(result: Any) -> bool:
        from twisted.names import dns

        answers = result[0] if isinstance(result, tuple) else []
        addresses = [rr.payload.dottedQuad() for rr in answers if rr.type == dns.A]
        return listed_answer(addresses)


def _why(failure: Any) -> str:
    from twistmail import mx

    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "no answer"
    return mx.describe_dns_error(failure.value)
