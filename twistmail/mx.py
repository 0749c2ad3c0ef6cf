"""Where outbound mail goes: MX selection and the IBM i routing choices.

The SMTP client jobs (QTMSCCLCP) ask this module for the ordered list of
addresses to try for one destination domain.  ``route_for`` is the pure
CHGSMTPA decision (hub, mail router, or the domain's own MX); ``MXResolver``
turns a decision into hops with ``twisted.names``.

Settings honoured: ``[smtp] nameservers hosttable mailrouter firewall
fwdhubsvr`` and the ``*NEAR`` list entries (passed in by the caller);
``[system] hostname`` and ``[listen] smtp`` say which MX is this host
itself (``LocalHost``): mail is never sent to it (RFC 5321 §5.1).

Twisted defects avoided (TWISTED.md §2.5, §2.6):

* ``relaymanager.MXCalculator`` returns a single MX, silently skips the MX
  lookup when given a bytes domain, and returns a null MX as host ``""``.
  Here every MX is kept (sorted, shuffled within equal preference), domains
  are ``str`` only, and a null MX is a permanent failure of its own.
* ``client.Resolver`` retries for up to a minute by default; every resolver
  built here gets a short timeout tuple.
* Answers may carry CNAME records; answers are filtered by record type.
* ``client.Resolver`` asks again over TCP for every truncated answer, also
  one that came over TCP: a server that sets TC there had it ask tens of
  thousands of times a second, for ever.  ``Resolver`` asks over TCP once.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names import error as dns_error

from twistmail.settingtypes import Endpoint, nameserver_address, parse_hostport
from twistmail.smtp.address import literal_address

DEFAULT_PORT = 25
DNS_PORT = 53
MAX_ADDRESSES_PER_HOST = 4
MAX_HOPS = 20
DEFAULT_TIMEOUT = (1.0, 3.0)
SYSTEM_RESOLV_CONF = "/etc/resolv.conf"
SYSTEM_HOSTS = "/etc/hosts"

#: How a route was found (``Route.via``).
VIA_MX = "mx"
VIA_IMPLICIT = "implicit"  # no MX: the domain's own addresses (RFC 5321 §5.1)
VIA_LITERAL = "literal"  # an address literal such as [192.0.2.1]
VIA_HOSTTABLE = "hosttable"  # the domain itself is in the host table
VIA_MAILROUTER = "mailrouter"
VIA_HUB = "hub"
SETTING_OF_VIA = {VIA_MAILROUTER: "MAILROUTER", VIA_HUB: "FWDHUBSVR"}

#: Kinds of routing decision (``RoutingDecision.kind``).
DIRECT = "mx"
MAILROUTER = "mailrouter"
HUB = "hub"

log = Logger()


class RouteError(Exception):
    """No route to a domain; ``code`` and ``status`` are the SMTP reply to report."""

    code = 451
    status = "4.4.3"
    permanent = False

    def __init__(self, domain: str, reason: str) -> None:
        super().__init__(f"{self.status} {domain}: {reason}")
        self.domain = domain
        self.reason = reason


class TemporaryRouteError(RouteError):
    """DNS timed out or failed: try again later."""


class PermanentRouteError(RouteError):
    """The domain does not exist or has no address: return the mail."""

    code = 550
    status = "5.1.2"
    permanent = True


class NullMX(PermanentRouteError):
    """The domain says it accepts no mail at all (RFC 7505)."""

    code = 556
    status = "5.1.10"


class MailLoop(PermanentRouteError):
    """The best MX of the domain is this host: sending would loop (RFC 5321 §5.1)."""

    code = 554
    status = "5.4.6"


@attrs.frozen
class Hop:
    """One address to try: ``host`` names it for TLS and *HOSTAUTH, ``address`` is dialled."""

    host: str
    address: str
    port: int = DEFAULT_PORT
    preference: int = 0


@attrs.frozen
class Route:
    """The hops for one destination, in the order they must be tried."""

    domain: str
    hops: tuple[Hop, ...]
    via: str = VIA_MX

    def __iter__(self) -> Iterator[Hop]:
        return iter(self.hops)

    def __len__(self) -> int:
        return len(self.hops)

    def __getitem__(self, index: int) -> Hop:
        return self.hops[index]


@attrs.frozen
class RoutingDecision:
    """Where a non-local message for ``domain`` goes, before any DNS is asked.

    ``relay`` is the fixed (host, port) of the hub or mail router when the
    decision is not the domain's MX; ``fallback`` is the mail router to use
    when the MX lookup finds nothing.
    """

    kind: str
    domain: str
    relay: tuple[str, int] | None = None
    fallback: tuple[str, int] | None = None


@attrs.frozen
class LocalHost:
    """This host as an MX record can name it: its names and its SMTP listeners.

    An MX host that is one of ``names``, or that has an address one of
    ``endpoints`` (``(address, port)`` as configured; ``0.0.0.0`` and ``::``
    mean every local address) accepts on the MX port, is this host.  Mail
    handed to it would come straight back, so it must not be sent there.
    """

    names: frozenset[str] = attrs.field(
        default=frozenset(),
        converter=lambda names: frozenset(n.lower().rstrip(".") for n in names if n))
    endpoints: frozenset[tuple[str, int]] = attrs.field(default=frozenset(),
                                                        converter=frozenset)

    def named(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.names

    def listens_on(self, address: str, port: int = DEFAULT_PORT) -> bool:
        """Whether a listener of this host accepts connections to ``address:port``."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:a.b.c.d reaches a.b.c.d's listener
        for host, listen_port in self.endpoints:
            if listen_port != port:
                continue
            if host in ("0.0.0.0", "::", ""):
                if (host != "0.0.0.0" or ip.version == 4) and _is_local_address(str(ip)):
                    return True
            elif host == "localhost":
                if ip.is_loopback:
                    return True
            elif _is_ip(host) and ipaddress.ip_address(host) == ip:
                return True
        return False

    def is_host(self, name: str, addresses: Iterable[str]) -> bool:
        return self.named(name) or any(self.listens_on(a) for a in addresses)


def _is_local_address(address: str) -> bool:
    """Whether an interface of this machine has the address (bind() succeeds only then)."""
    if ipaddress.ip_address(address).is_loopback:
        return True
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((address, 0))
    except OSError:
        return False
    return True


# -- parsing -------------------------------------------------------------------


def normalise_domain(domain: str) -> str:
    """Lower case ASCII (A-labels) without the trailing dot; bytes are refused.

    Bytes are refused because Twisted's own MX code keys answers by ``str``
    and silently fell back to the A record for a bytes domain.
    """
    if not isinstance(domain, str):
        raise TypeError(f"domain must be str, not {type(domain).__name__}")
    name = domain.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise PermanentRouteError(domain, "not a valid domain name") from None
    if not name or len(name) > 253 or any(not 0 < len(p) <= 63 for p in name.split(".")):
        raise PermanentRouteError(domain, "not a valid domain name")
    return name


def address_literal(domain: str) -> str | None:
    """The IP address of ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``, None for a name."""
    text = domain.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        return literal_address(text)
    except ValueError:
        raise PermanentRouteError(domain, "not a valid address literal") from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# -- host table ------------------------------------------------------------------


class HostTable:
    """A hosts-format file: ``IP name [aliases...]`` lines, ``#`` comments.

    It answers A/AAAA questions before DNS, so an administrator can pin a
    host (or a whole mail domain) to an address, and an appliance with no
    DNS at all can still deliver to the hosts it knows.
    """

    def __init__(self, entries: dict[str, tuple[str, ...]] | None = None) -> None:
        self._entries = dict(entries or {})

    @classmethod
    def parse(cls, text: str) -> HostTable:
        entries: dict[str, list[str]] = {}
        for line in text.splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2 or not _is_ip(fields[0]):
                continue
            address = str(ipaddress.ip_address(fields[0]))
            for name in fields[1:]:
                found = entries.setdefault(name.lower().rstrip("."), [])
                if address not in found:
                    found.append(address)
        return cls({k: tuple(v) for k, v in entries.items()})

    @classmethod
    def load(cls, path: Path) -> HostTable:
        return cls.parse(Path(path).read_text(encoding="utf-8", errors="replace"))

    def addresses(self, name: str) -> tuple[str, ...]:
        """All addresses of ``name`` in file order; empty when it is not listed."""
        return self._entries.get(name.lower().rstrip("."), ())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.addresses(name))

    def __len__(self) -> int:
        return len(self._entries)


class _HostTableFile:
    """Re-reads the host table when the file changes: CHGSMTPA applies at once."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._table = HostTable()

    def table(self) -> HostTable:
        if self.path is None:
            return self._table
        try:
            st = self.path.stat()
        except OSError:
            if self._stamp != (0, 0):
                log.warn("host table {path} cannot be read; using none", path=str(self.path))
                self._stamp, self._table = (0, 0), HostTable()
            return self._table
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp, self._table = stamp, HostTable.load(self.path)
        return self._table


# -- routing decision (pure) -------------------------------------------------------


def _configured(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if not text or text.upper() == "*NONE" else text


def _yes(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().upper() in ("*YES", "YES", "TRUE", "1")


def is_near(domain: str, near_domains: Iterable[str]) -> bool:
    """A *NEAR entry covers the domain itself and every subdomain of it."""
    name = domain.lower().rstrip(".")
    for entry in near_domains:
        near = entry.lower().strip().lstrip(".").rstrip(".")
        if near and (name == near or name.endswith("." + near)):
            return True
    return False


def route_for(
    domain: str, settings: Any, near_domains: Iterable[str] | None = None
) -> RoutingDecision:
    """The CHGSMTPA routing choice for a non-local message to ``domain``.

    ``settings`` needs ``mailrouter``, ``firewall`` and ``fwdhubsvr`` (as in
    ``SmtpSettings``); ``near_domains`` defaults to ``settings.near_domains``
    when that exists.  FWDHUBSVR wins over everything; FIREWALL(*YES) sends
    all but *NEAR domains to MAILROUTER; otherwise the domain's MX is used,
    with MAILROUTER as the fallback when the lookup finds nothing.  FIREWALL
    without a MAILROUTER has nowhere to send mail, so MX is used.
    """
    name = domain.strip().lower().rstrip(".")
    hub = _configured(getattr(settings, "fwdhubsvr", None))
    router = _configured(getattr(settings, "mailrouter", None))
    near = near_domains if near_domains is not None else getattr(settings, "near_domains", ())
    if hub is not None:
        return RoutingDecision(HUB, name, relay=parse_hostport(hub))
    router_hp = parse_hostport(router) if router is not None else None
    firewall = _yes(getattr(settings, "firewall", "*NO"))
    if firewall and router_hp is not None:
        if is_near(name, near or ()):
            # *NEAR mail never goes through the firewall, not even when its
            # own DNS fails for a while: it waits for it instead.
            return RoutingDecision(DIRECT, name)
        return RoutingDecision(MAILROUTER, name, relay=router_hp)
    return RoutingDecision(DIRECT, name, fallback=router_hp)


# -- resolver ------------------------------------------------------------------------


def _order_addresses(v4: Sequence[str], v6: Sequence[str], prefer_ipv6: bool) -> list[str]:
    """Alternate families so a host unreachable over one is tried over the other early."""
    first, second = (v6, v4) if prefer_ipv6 else (v4, v6)
    out: list[str] = []
    for i in range(max(len(first), len(second))):
        out += [a[i] for a in (first, second) if i < len(a)]
    return out


def _split_families(addresses: Iterable[str]) -> tuple[list[str], list[str]]:
    v4: list[str] = []
    v6: list[str] = []
    for a in addresses:
        (v6 if ":" in a else v4).append(a)
    return v4, v6


@attrs.frozen
class _HostAnswer:
    """The addresses of one host name, or why there are none."""

    addresses: tuple[str, ...] = ()
    temporary: str | None = None  # a lookup failed in a way worth retrying


class MXResolver:
    """Resolves destination domains to ordered hops with ``twisted.names``.

    With ``nameservers`` (``host[:port]``, IPv6 in brackets) only those
    servers are asked; without them the servers of ``/etc/resolv.conf``
    are, as ``client.createResolver()`` does, but with short timeouts.
    ``hosttable`` None with no nameservers means ``/etc/hosts`` (again as
    ``createResolver``); an empty string means no host table, which is the
    ``[smtp] hosttable`` default.  ``rng`` decides the order among MX
    records of equal preference.  ``local`` names this host: an MX that is this
    host, and every MX of the same or a worse preference, is dropped, and a
    domain left with none fails with ``MailLoop``.  Call ``close()`` when
    done: the system resolver re-reads resolv.conf on a timer.
    """

    def __init__(
        self,
        reactor: Any,
        nameservers: Sequence[str] | None = None,
        hosttable: Path | str | None = None,
        timeout: Sequence[float] = DEFAULT_TIMEOUT,
        rng: random.Random | None = None,
        max_addresses_per_host: int = MAX_ADDRESSES_PER_HOST,
        max_hops: int = MAX_HOPS,
        prefer_ipv6: bool = False,
        resolver: Any = None,
        local: LocalHost | None = None,
    ) -> None:
        self.reactor = reactor
        self.local = local or LocalHost()
        self.timeout = tuple(timeout)
        self.rng = rng or random.Random()
        self.max_addresses_per_host = max_addresses_per_host
        self.max_hops = max_hops
        self.prefer_ipv6 = prefer_ipv6
        if hosttable is None and not nameservers:
            hosttable = SYSTEM_HOSTS
        self._hosts = _HostTableFile(Path(hosttable) if hosttable else None)
        self.resolver = resolver or self._make_resolver(nameservers)
        #: Routes to a mail router or hub named by its address: they need no
        #: DNS and never change, and a client job asks for one per message.
        self._address_routes: dict[tuple[str, int, str], Route] = {}

    def _make_resolver(self, nameservers: Sequence[str] | None) -> client.Resolver:
        return make_resolver(self.reactor, nameservers, self.timeout)

    def close(self) -> None:
        """Stop the resolv.conf re-read timer and any TCP query connection."""
        call = getattr(self.resolver, "_parseCall", None)
        if call is not None and call.active():
            call.cancel()
        for proto in list(getattr(self.resolver, "connections", ())):
            proto.transport.loseConnection()

    @property
    def hosttable(self) -> HostTable:
        return self._hosts.table()

    # -- public API ------------------------------------------------------------------

    def route(self, domain: str) -> defer.Deferred[Route]:
        """The hops for ``domain``: MX, implicit MX, host table or address literal.

        Fails with NullMX, PermanentRouteError or TemporaryRouteError.
        """
        return defer.Deferred.fromCoroutine(self._route(domain))

    def resolve_host(
        self, host: str, port: int = DEFAULT_PORT, via: str = VIA_IMPLICIT
    ) -> defer.Deferred[Route]:
        """The hops for one configured host (mail router, hub); no MX lookup.

        A name that does not resolve is a temporary failure: it is the
        administrator's setting that is wrong, not the recipient's address.
        """
        return defer.Deferred.fromCoroutine(self._relay(host, port, via))

    def route_decision(self, decision: RoutingDecision) -> defer.Deferred[Route]:
        """Hops for a ``route_for`` decision, using MAILROUTER when the MX finds nothing.

        The mail router exists for domains this system cannot resolve
        itself, so both "no such domain" and DNS failures fall back to it;
        a null MX does not, since the domain has said it takes no mail, and
        neither does a mail loop, since that is this host's own setup.
        """
        return defer.Deferred.fromCoroutine(self._decision(decision))

    # -- implementation -------------------------------------------------------------

    async def _decision(self, decision: RoutingDecision) -> Route:
        if decision.relay is not None:
            via = VIA_HUB if decision.kind == HUB else VIA_MAILROUTER
            return await self._relay(*decision.relay, via=via)
        try:
            return await self._route(decision.domain)
        except (NullMX, MailLoop):
            raise
        except RouteError as e:
            if decision.fallback is None:
                raise
            log.info("no route for {domain} ({why}); using the mail router",
                     domain=decision.domain, why=str(e))
            return await self._relay(*decision.fallback, via=VIA_MAILROUTER)

    async def _relay(self, host: str, port: int, via: str) -> Route:
        known = self._address_routes.get((host, port, via))
        if known is not None:
            return known
        literal = address_literal(host) if host.startswith("[") else None
        if literal is not None or _is_ip(host):
            address = literal or str(ipaddress.ip_address(host))
            route = self._not_our_listener(Route(host, (Hop(address, address, port),), via))
            if len(self._address_routes) < 64:
                self._address_routes[(host, port, via)] = route
            return route
        name = normalise_domain(host)
        answer = await self._host_addresses(name)
        if not answer.addresses:
            raise TemporaryRouteError(name, answer.temporary or "the host has no address")
        return self._not_our_listener(
            Route(name, tuple(Hop(name, a, port) for a in answer.addresses), via))

    def _not_our_listener(self, route: Route) -> Route:
        """A mail router or hub that is this host's own SMTP listener would loop.

        Its addresses that are ours are dropped; with none left the route
        fails.  The same host on another port (a content filter, say) is fine.  The
        setting is wrong, not the mail: a temporary failure keeps the mail
        queued until the administrator changes it.
        """
        ours = [h for h in route if self.local.listens_on(h.address, h.port)]
        if not ours:
            return route
        others = tuple(h for h in route if h not in ours)
        if others:  # a name with several addresses, one of them ours: the others serve
            return attrs.evolve(route, hops=others)
        raise TemporaryRouteError(
            route.domain, f"{SETTING_OF_VIA.get(route.via, route.via)} names "
            f"{Endpoint(ours[0].address, ours[0].port)}, this host's own SMTP listener: mail would "
            "loop back to myself")

    async def _route(self, domain: str) -> Route:
        literal = address_literal(domain)
        if literal is not None:
            self._not_us(domain, domain, (literal,))
            return Route(domain, (Hop(literal, literal, DEFAULT_PORT),), VIA_LITERAL)
        name = normalise_domain(domain)
        if name in self.hosttable:
            answer = await self._host_addresses(name)
            self._not_us(name, name, answer.addresses)
            return Route(name, self._hops_for_host(name, answer.addresses, 0), VIA_HOSTTABLE)
        exchanges = await self._exchanges(name)
        if not exchanges:
            return await self._implicit(name)
        hops = await self._mx_hops(name, exchanges)
        return Route(name, hops, VIA_MX)

    async def _exchanges(self, name: str) -> list[tuple[int, str]]:
        """MX (preference, host) pairs in trying order; raises NullMX for ``0 .``."""
        try:
            answers, _, _ = await self.resolver.lookupMailExchange(name)
        except dns_error.DNSNameError:
            raise PermanentRouteError(name, "no such domain (NXDOMAIN)") from None
        except Exception as e:  # timeouts, SERVFAIL, REFUSED, socket errors
            raise TemporaryRouteError(name, f"MX lookup failed: {describe_dns_error(e)}") from None
        records = [
            (rr.payload.preference, rr.payload.name.name.decode("ascii", "replace"))
            for rr in answers
            if rr.type == dns.MX
        ]
        real = [(p, h.lower().rstrip(".")) for p, h in records if h.rstrip(".")]
        if records and not real:
            raise NullMX(name, "the domain accepts no mail (null MX)")
        return self._shuffle_by_preference(real)

    def _shuffle_by_preference(self, records: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Sort by preference, shuffling within each preference (RFC 5321 §5.1)."""
        groups: dict[int, list[str]] = {}
        for pref, host in records:
            if host not in groups.setdefault(pref, []):
                groups[pref].append(host)
        out: list[tuple[int, str]] = []
        for pref in sorted(groups):
            hosts = sorted(groups[pref])
            self.rng.shuffle(hosts)
            out += [(pref, h) for h in hosts]
        return out

    async def _mx_hops(self, name: str, exchanges: list[tuple[int, str]]) -> tuple[Hop, ...]:
        exchanges = exchanges[: self.max_hops]
        answers = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._host_addresses(h)) for _, h in exchanges]
        )
        ours = [pref for (pref, host), answer in zip(exchanges, answers, strict=True)
                if self.local.is_host(host, answer.addresses)]
        if ours:
            # RFC 5321 §5.1: this host and every MX no better than it are out.
            kept = [(e, a) for e, a in zip(exchanges, answers, strict=True) if e[0] < min(ours)]
            if not kept:
                raise MailLoop(name, "mail loops back to myself (this host is the best MX, "
                               f"preference {min(ours)})")
            exchanges, answers = [e for e, _ in kept], [a for _, a in kept]
        hops: list[Hop] = []
        seen: set[str] = set()
        temporary: list[str] = []
        for (pref, host), answer in zip(exchanges, answers, strict=True):
            if answer.temporary:
                temporary.append(f"{host}: {answer.temporary}")
            for hop in self._hops_for_host(host, answer.addresses, pref):
                if hop.address not in seen and len(hops) < self.max_hops:
                    seen.add(hop.address)
                    hops.append(hop)
        if hops:
            return tuple(hops)
        if temporary:
            raise TemporaryRouteError(name, "no MX host could be resolved: " + "; ".join(temporary))
        written = [host for _, host in exchanges if _is_ip(host.rstrip("."))]
        if written:  # RFC 5321 §5.1: an MX names a host, never an address
            raise PermanentRouteError(name, f"no MX host has an address (the MX {written[0]} "
                                            "is an address where a host name belongs)")
        raise PermanentRouteError(name, "no MX host has an address")

    async def _implicit(self, name: str) -> Route:
        answer = await self._host_addresses(name)
        if answer.addresses:
            self._not_us(name, name, answer.addresses)
            return Route(name, self._hops_for_host(name, answer.addresses, 0), VIA_IMPLICIT)
        if answer.temporary:
            raise TemporaryRouteError(name, answer.temporary)
        raise PermanentRouteError(name, "no MX and no address for the domain")

    def _not_us(self, domain: str, host: str, addresses: Iterable[str]) -> None:
        """A domain routed to its own address (no MX) must not be this host either."""
        if self.local.is_host(host, addresses):
            raise MailLoop(domain, "mail loops back to myself (the domain's address is "
                           "this host)")

    def _hops_for_host(self, host: str, addresses: Sequence[str], pref: int) -> tuple[Hop, ...]:
        capped = list(addresses)[: self.max_addresses_per_host]
        return tuple(Hop(host, a, DEFAULT_PORT, pref) for a in capped)

    async def _host_addresses(self, host: str) -> _HostAnswer:
        """A and AAAA of one host, host table first, preferred family interleaved."""
        pinned = self.hosttable.addresses(host)
        if pinned:
            v4, v6 = _split_families(pinned)
        else:
            results = await defer.DeferredList(
                [self.resolver.lookupAddress(host), self.resolver.lookupIPV6Address(host)],
                consumeErrors=True,
            )
            (ok4, r4), (ok6, r6) = results
            v4 = _addresses(r4, dns.A) if ok4 else []
            v6 = _addresses(r6, dns.AAAA) if ok6 else []
            if not v4 and not v6:
                failures = [r for ok, r in results if not ok]
                transient = [f for f in failures if not f.check(dns_error.DNSNameError)]
                if transient:
                    return _HostAnswer(temporary=describe_dns_error(transient[0].value))
        ordered = _order_addresses(v4, v6, self.prefer_ipv6)
        return _HostAnswer(tuple(ordered[: self.max_addresses_per_host]))


def _addresses(result: Any, rtype: int) -> list[str]:
    answers = result[0]
    out: list[str] = []
    for rr in answers:
        if rr.type != rtype:
            continue
        if rtype == dns.A:
            address = rr.payload.dottedQuad()
        else:
            address = socket.inet_ntop(socket.AF_INET6, rr.payload.address)
        if address not in out:
            out.append(address)
    return out


class Resolver(client.Resolver):
    """Twisted's resolver, asking over TCP once for a truncated answer."""

    def filterAnswers(self, message: dns.Message) -> Any:  # noqa: N802 (Twisted's name)
        if message.trunc:
            return self.queryTCP(message.queries).addCallback(self._over_tcp)
        return super().filterAnswers(message)

    def _over_tcp(self, message: dns.Message) -> Any:
        if message.trunc:  # truncated over TCP too: nothing better comes by asking again
            raise dns_error.DNSServerError(message)
        return super().filterAnswers(message)


def make_resolver(reactor: Any, nameservers: Sequence[str] | None,
                  timeout: Sequence[int]) -> Resolver:
    """A resolver of these name servers, or of the system's (resolv.conf)."""
    if nameservers:
        servers = [nameserver_address(s) for s in nameservers]
        return Resolver(servers=servers, timeout=timeout, reactor=reactor)
    return Resolver(resolv=SYSTEM_RESOLV_CONF, timeout=timeout, reactor=reactor)


def describe_dns_error(error: BaseException) -> str:
    if isinstance(error, defer.TimeoutError | dns_error.DNSQueryTimeoutError):
        return "DNS timeout"
    if isinstance(error, dns_error.DNSServerError):
        return "DNS server failure (SERVFAIL)"
    if isinstance(error, dns_error.DNSQueryRefusedError):
        return "DNS query refused"
    return f"{type(error).__name__}: {error}"
