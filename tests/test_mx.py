"""MX selection against a real loopback DNS server, and the routing decisions.

The server is Twisted's own ``DNSServerFactory`` answering from a small
test zone over UDP, so every lookup goes through the same client code and
wire format as in production.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.names import common, dns, server
from twisted.trial import unittest

from twistmail.mx import (
    DIRECT,
    HUB,
    MAILROUTER,
    VIA_HOSTTABLE,
    VIA_HUB,
    VIA_IMPLICIT,
    VIA_LITERAL,
    VIA_MAILROUTER,
    VIA_MX,
    Hop,
    HostTable,
    LocalHost,
    MailLoop,
    MXResolver,
    NullMX,
    PermanentRouteError,
    RoutingDecision,
    TemporaryRouteError,
    normalise_domain,
    parse_hostport,
    route_for,
)

A, AAAA, MX, CNAME = dns.A, dns.AAAA, dns.MX, dns.CNAME


class ServFail(Exception):
    """Raised by the zone to make the server answer SERVFAIL."""


def zone() -> dict[str, dict[int, Any]]:
    z: dict[str, dict[int, Any]] = {
        "multi.test": {MX: [(30, "mx3.multi.test"), (10, "mx1.multi.test"),
                            (20, "mx2a.multi.test"), (20, "mx2b.multi.test"),
                            (20, "mx2c.multi.test")]},
        "mx1.multi.test": {A: ["192.0.2.1"]},
        "mx2a.multi.test": {A: ["192.0.2.21"]},
        "mx2b.multi.test": {A: ["192.0.2.22"]},
        "mx2c.multi.test": {A: ["192.0.2.23"]},
        "mx3.multi.test": {A: ["192.0.2.3"], AAAA: ["2001:db8::3"]},
        "null.test": {MX: [(0, "")]},
        "implicit.test": {A: ["192.0.2.50"], AAAA: ["2001:db8::50"]},
        "empty.test": {},
        "cname.test": {MX: [(10, "alias.cname.test")]},
        "alias.cname.test": {CNAME: "real.cname.test"},
        "real.cname.test": {A: ["192.0.2.60"]},
        "aliasdomain.test": {CNAME: "implicit.test"},
        "many.test": {A: [f"192.0.2.{i}" for i in range(100, 106)]},
        "wide.test": {MX: [(i, f"h{i}.wide.test") for i in range(10)]},
        "v6only.test": {MX: [(10, "mx.v6only.test")]},
        "mx.v6only.test": {AAAA: ["2001:db8::66"]},
        "deadmx.test": {MX: [(10, "nx.deadmx.test"), (20, "ok.deadmx.test")]},
        "ok.deadmx.test": {A: ["192.0.2.80"]},
        "allnx.test": {MX: [(10, "nx.allnx.test")]},
        "mxservfail.test": {MX: [(10, "servfail.test")]},
        "mxaddress.test": {MX: [(10, "192.0.2.9")]},
        "hang.test": {MX: [(10, "slow.hang.test")]},
        "pinned.test": {MX: [(10, "mx.pinned.test")]},
        "loop.test": {MX: [(10, "self.example.test"), (20, "backup.loop.test")]},
        "self.example.test": {A: ["192.0.2.90"]},
        "backup.loop.test": {A: ["192.0.2.91"]},
        "secondary.test": {MX: [(10, "primary.secondary.test"), (20, "self.example.test"),
                                (20, "peer.secondary.test"), (30, "worse.secondary.test")]},
        "primary.secondary.test": {A: ["192.0.2.92"]},
        "peer.secondary.test": {A: ["192.0.2.93"]},
        "worse.secondary.test": {A: ["192.0.2.94"]},
        "addrloop.test": {MX: [(10, "mx.addrloop.test")]},
        "mx.addrloop.test": {A: ["127.0.0.1"]},
        "mappedloop.test": {MX: [(10, "mx.mappedloop.test")]},
        "mx.mappedloop.test": {AAAA: ["::ffff:127.0.0.1"]},
        "mx.pinned.test": {A: ["192.0.2.70"]},
    }
    for i in range(10):
        z[f"h{i}.wide.test"] = {A: [f"198.51.100.{i * 10 + j}" for j in range(4)]}
    return z


SERVFAIL = {"servfail.test", "flaky.test"}
HANG = {"slow.hang.test"}


class ZoneAuthority(common.ResolverBase):
    """Answers from ``zone()``: NXDOMAIN for unknown names, CNAMEs followed."""

    def __init__(self) -> None:
        super().__init__()
        self.zone = zone()
        self.queries: list[tuple[str, int]] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred:
        key = name.decode().lower()
        self.queries.append((key, type))
        if key in SERVFAIL:
            return defer.fail(ServFail(key))
        if key in HANG:
            return defer.Deferred()
        if key not in self.zone:
            return defer.fail(dns.DomainError(key))
        return defer.succeed((self._answers(key, type), [], []))

    def _answers(self, key: str, type: int) -> list[dns.RRHeader]:
        records = self.zone[key]
        if CNAME in records and type != CNAME:
            target = records[CNAME]
            head = dns.RRHeader(key, CNAME, payload=dns.Record_CNAME(target), auth=True)
            return [head, *self._answers(target, type)]
        out = []
        for value in records.get(type, []):
            out.append(dns.RRHeader(key, type, payload=_record(type, value), auth=True))
        return out


def _record(type: int, value: Any) -> Any:
    if type == A:
        return dns.Record_A(value)
    if type == AAAA:
        return dns.Record_AAAA(value)
    if type == MX:
        return dns.Record_MX(value[0], value[1].encode())
    raise ValueError(type)


class DNSTests(unittest.TestCase):
    def setUp(self) -> None:
        self.authority = ZoneAuthority()
        factory = server.DNSServerFactory(authorities=[self.authority])
        port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.nameserver = f"127.0.0.1:{port.getHost().port}"

    def resolver(self, **kw: Any) -> MXResolver:
        kw.setdefault("nameservers", [self.nameserver])
        kw.setdefault("timeout", (0.5, 1.0))
        r = MXResolver(reactor, **kw)
        self.addCleanup(r.close)
        return r

    def black_hole(self) -> str:
        port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"127.0.0.1:{port.getHost().port}"

    # -- MX ordering ------------------------------------------------------------------

    async def test_all_mx_sorted_by_preference(self) -> None:
        route = await self.resolver().route("Multi.TEST.")
        self.assertEqual(route.via, VIA_MX)
        self.assertEqual(route.domain, "multi.test")
        prefs = [h.preference for h in route]
        self.assertEqual(prefs, sorted(prefs))
        self.assertEqual(route[0], Hop("mx1.multi.test", "192.0.2.1", 25, 10))
        self.assertEqual({h.host for h in route.hops[1:4]},
                         {"mx2a.multi.test", "mx2b.multi.test", "mx2c.multi.test"})
        self.assertEqual([h.address for h in route.hops[4:]], ["192.0.2.3", "2001:db8::3"])

    async def test_equal_preference_order_follows_the_seeded_random(self) -> None:
        orders = set()
        for seed in range(12):
            route = await self.resolver(rng=random.Random(seed)).route("multi.test")
            middle = [h.host for h in route.hops[1:4]]
            expected = ["mx2a.multi.test", "mx2b.multi.test", "mx2c.multi.test"]
            random.Random(seed).shuffle(expected)
            self.assertEqual(middle, expected)
            orders.add(tuple(middle))
        self.assertGreater(len(orders), 1)

    async def test_an_answer_truncated_over_tcp_too_is_a_server_failure(self) -> None:
        """Twisted asked again over TCP for every truncated answer, also one that
        came over TCP: tens of thousands of queries a second, and no answer ever."""

        class AlwaysTruncated(server.DNSServerFactory):
            tcp_queries = 0

            def handleQuery(self, message, protocol, address):  # noqa: N802
                if address is None:  # over TCP
                    AlwaysTruncated.tcp_queries += 1
                return super().handleQuery(message, protocol, address)

            def sendReply(self, protocol, message, address):  # noqa: N802
                message.trunc = True
                return super().sendReply(protocol, message, address)

        factory = AlwaysTruncated(authorities=[self.authority])
        for _ in range(20):  # a UDP port whose TCP twin is free too
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
            try:
                tcp = reactor.listenTCP(udp.getHost().port, factory, interface="127.0.0.1")
            except OSError:
                udp.stopListening()
                continue
            break
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        started = time.monotonic()
        with self.assertRaises(TemporaryRouteError) as caught:
            await self.resolver(nameservers=[f"127.0.0.1:{udp.getHost().port}"]).route(
                "multi.test")
        self.assertIn("SERVFAIL", str(caught.exception))
        self.assertLess(time.monotonic() - started, 5)
        self.assertLessEqual(AlwaysTruncated.tcp_queries, 2)

    async def test_null_mx_is_permanent(self) -> None:
        with self.assertRaises(NullMX) as caught:
            await self.resolver().route("null.test")
        self.assertEqual(caught.exception.code, 556)
        self.assertEqual(caught.exception.status, "5.1.10")
        self.assertTrue(caught.exception.permanent)

    async def test_nxdomain_is_permanent(self) -> None:
        with self.assertRaises(PermanentRouteError) as caught:
            await self.resolver().route("nowhere.test")
        self.assertEqual(caught.exception.status, "5.1.2")
        self.assertNotIsInstance(caught.exception, NullMX)

    async def test_servfail_is_temporary(self) -> None:
        with self.assertRaises(TemporaryRouteError) as caught:
            await self.resolver().route("servfail.test")
        self.assertEqual(caught.exception.status, "4.4.3")
        self.assertIn("SERVFAIL", str(caught.exception))
        self.flushLoggedErrors(ServFail)

    async def test_an_mx_host_that_cannot_be_resolved_is_named_once(self) -> None:
        with self.assertRaises(TemporaryRouteError) as caught:
            await self.resolver().route("mxservfail.test")
        self.assertEqual(str(caught.exception).count(" servfail.test:"), 1, str(caught.exception))
        self.flushLoggedErrors(ServFail)

    async def test_an_mx_written_as_an_address_is_refused_saying_so(self) -> None:
        """RFC 5321 §5.1: an MX names a host; its address is not looked up as one."""
        with self.assertRaises(PermanentRouteError) as caught:
            await self.resolver().route("mxaddress.test")
        self.assertIn("the MX 192.0.2.9 is an address", str(caught.exception))

    async def test_unanswering_server_is_temporary_within_the_timeout(self) -> None:
        r = self.resolver(nameservers=[self.black_hole()], timeout=(0.2, 0.3))
        started = time.monotonic()
        with self.assertRaises(TemporaryRouteError):
            await r.route("anything.test")
        self.assertLess(time.monotonic() - started, 2.0)

    # -- addresses -----------------------------------------------------------------------

    async def test_implicit_mx_uses_a_and_aaaa(self) -> None:
        route = await self.resolver().route("implicit.test")
        self.assertEqual(route.via, VIA_IMPLICIT)
        self.assertEqual([h.address for h in route], ["192.0.2.50", "2001:db8::50"])
        self.assertEqual({h.host for h in route}, {"implicit.test"})

    async def test_prefer_ipv6(self) -> None:
        route = await self.resolver(prefer_ipv6=True).route("implicit.test")
        self.assertEqual([h.address for h in route], ["2001:db8::50", "192.0.2.50"])

    async def test_no_mx_and_no_address_is_permanent(self) -> None:
        with self.assertRaises(PermanentRouteError):
            await self.resolver().route("empty.test")

    async def test_cname_answers_are_filtered_by_type(self) -> None:
        route = await self.resolver().route("cname.test")
        self.assertEqual(list(route), [Hop("alias.cname.test", "192.0.2.60", 25, 10)])
        implicit = await self.resolver().route("aliasdomain.test")
        self.assertEqual([h.address for h in implicit], ["192.0.2.50", "2001:db8::50"])

    async def test_aaaa_only_exchange(self) -> None:
        route = await self.resolver().route("v6only.test")
        self.assertEqual(list(route), [Hop("mx.v6only.test", "2001:db8::66", 25, 10)])

    async def test_addresses_per_host_are_capped(self) -> None:
        route = await self.resolver().route("many.test")
        self.assertEqual(len(route), 4)
        route = await self.resolver(max_addresses_per_host=2).route("many.test")
        self.assertEqual(len(route), 2)

    async def test_total_hops_are_capped(self) -> None:
        route = await self.resolver().route("wide.test")
        self.assertEqual(len(route), 20)
        self.assertEqual([h.preference for h in route], [i // 4 for i in range(20)])

    async def test_exchange_without_address_is_skipped(self) -> None:
        route = await self.resolver().route("deadmx.test")
        self.assertEqual([h.host for h in route], ["ok.deadmx.test"])
        with self.assertRaises(PermanentRouteError):
            await self.resolver().route("allnx.test")

    async def test_exchange_that_never_resolves_is_temporary(self) -> None:
        with self.assertRaises(TemporaryRouteError):
            await self.resolver(timeout=(0.2, 0.3)).route("hang.test")

    async def test_address_literals_route_directly(self) -> None:
        r = self.resolver()
        v4 = await r.route("[192.0.2.9]")
        self.assertEqual((v4.via, list(v4)), (VIA_LITERAL, [Hop("192.0.2.9", "192.0.2.9")]))
        v6 = await r.route("[IPv6:2001:DB8::1]")
        self.assertEqual(v6[0].address, "2001:db8::1")
        with self.assertRaises(PermanentRouteError):
            await r.route("[not-an-address]")
        self.assertEqual(self.authority.queries, [])

    async def test_bytes_domain_is_refused(self) -> None:
        with self.assertRaises(TypeError):
            await self.resolver().route(b"multi.test")  # type: ignore[arg-type]

    # -- host table ------------------------------------------------------------------------

    def hosts_file(self, text: str) -> Path:
        directory = tempfile.mkdtemp(prefix="twistmail-mx-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = Path(directory) / "hosts"
        path.write_text(text)
        return path

    async def test_host_table_answers_before_dns(self) -> None:
        path = self.hosts_file("10.0.0.7  mx.pinned.test  # the real one\n")
        route = await self.resolver(hosttable=path).route("pinned.test")
        self.assertEqual(list(route), [Hop("mx.pinned.test", "10.0.0.7", 25, 10)])
        self.assertNotIn(("mx.pinned.test", A), self.authority.queries)

    async def test_host_table_pins_a_domain_without_dns(self) -> None:
        path = self.hosts_file("10.0.0.9 pinned-domain.test\n2001:db8::9 Pinned-Domain.test\n")
        r = self.resolver(hosttable=path, nameservers=[self.black_hole()], timeout=(0.2, 0.3))
        route = await r.route("pinned-domain.test")
        self.assertEqual(route.via, VIA_HOSTTABLE)
        self.assertEqual([h.address for h in route], ["10.0.0.9", "2001:db8::9"])

    async def test_host_table_is_reread_when_changed(self) -> None:
        path = self.hosts_file("10.0.0.7 mx.pinned.test\n")
        r = self.resolver(hosttable=path)
        self.assertEqual((await r.route("pinned.test"))[0].address, "10.0.0.7")
        path.write_text("10.0.0.8 mx.pinned.test extra.name\n")
        self.assertEqual((await r.route("pinned.test"))[0].address, "10.0.0.8")

    # -- routing decisions through DNS ---------------------------------------------------------

    async def test_mailrouter_is_the_fallback_when_nothing_is_found(self) -> None:
        settings = Settings(mailrouter="192.0.2.99:2525")
        r = self.resolver()
        route = await r.route_decision(route_for("nowhere.test", settings))
        self.assertEqual(route.via, VIA_MAILROUTER)
        self.assertEqual(list(route), [Hop("192.0.2.99", "192.0.2.99", 2525)])
        found = await r.route_decision(route_for("multi.test", settings))
        self.assertEqual(found.via, VIA_MX)
        with self.assertRaises(NullMX):
            await r.route_decision(route_for("null.test", settings))

    async def test_hub_name_is_resolved(self) -> None:
        settings = Settings(fwdhubsvr="mx3.multi.test:587")
        route = await self.resolver().route_decision(route_for("any.example", settings))
        self.assertEqual(route.via, VIA_HUB)
        self.assertEqual([(h.host, h.address, h.port) for h in route], [
            ("mx3.multi.test", "192.0.2.3", 587), ("mx3.multi.test", "2001:db8::3", 587)])

    async def test_unresolvable_router_is_temporary(self) -> None:
        settings = Settings(mailrouter="nowhere.test", firewall="*YES")
        with self.assertRaises(TemporaryRouteError):
            await self.resolver().route_decision(route_for("multi.test", settings))

    # -- mail that would loop back to this host (RFC 5321 §5.1) --------------------------------

    def local(self, **kw: Any) -> MXResolver:
        return self.resolver(local=LocalHost(**kw))

    async def test_best_mx_named_as_this_host_is_a_loop(self) -> None:
        r = self.local(names=["Self.Example.Test."])
        with self.assertRaises(MailLoop) as caught:
            await r.route("loop.test")  # the backup, preference 20, is worse than us: out
        self.assertEqual((caught.exception.code, caught.exception.status), (554, "5.4.6"))
        self.assertIn("loops back to myself", str(caught.exception))
        # Not even the mail router takes it: the loop is this host's own setup.
        with self.assertRaises(MailLoop):
            await r.route_decision(route_for("loop.test", Settings(mailrouter="192.0.2.99")))

    async def test_as_a_backup_mx_only_better_ones_are_kept(self) -> None:
        route = await self.local(names=["self.example.test"]).route("secondary.test")
        self.assertEqual([h.host for h in route], ["primary.secondary.test"])
        everyone = await self.resolver().route("secondary.test")
        self.assertEqual(len(everyone), 4)

    async def test_an_mx_address_this_host_listens_on_is_a_loop(self) -> None:
        with self.assertRaises(MailLoop):
            await self.local(endpoints=[("127.0.0.1", 25)]).route("addrloop.test")
        with self.assertRaises(MailLoop):  # a wildcard listener takes every local address
            await self.local(endpoints=[("0.0.0.0", 25)]).route("addrloop.test")
        for listener in ("127.0.0.1", "0.0.0.0"):  # an IPv4-mapped address reaches it too
            with self.assertRaises(MailLoop):
                await self.local(endpoints=[(listener, 25)]).route("mappedloop.test")
        other_port = await self.local(endpoints=[("127.0.0.1", 2525)]).route("addrloop.test")
        self.assertEqual(other_port[0].address, "127.0.0.1")

    async def test_a_router_or_hub_that_is_our_own_listener_is_temporary(self) -> None:
        r = self.local(endpoints=[("127.0.0.1", 2525)])
        for settings in (Settings(mailrouter="127.0.0.1:2525", firewall="*YES"),
                         Settings(fwdhubsvr="[127.0.0.1]:2525")):
            with self.assertRaises(TemporaryRouteError) as caught:
                await r.route_decision(route_for("multi.test", settings))
            self.assertIn("this host's own SMTP listener", str(caught.exception))
        with self.assertRaises(TemporaryRouteError) as caught:
            await self.local(endpoints=[("::1", 2525)]).route_decision(
                route_for("multi.test", Settings(fwdhubsvr="[::1]:2525")))
        self.assertIn("names [::1]:2525, this host's own", str(caught.exception))
        # A name with several addresses, one of them ours: the others serve.
        hub = await self.local(endpoints=[("192.0.2.3", 587)]).route_decision(
            route_for("any.example", Settings(fwdhubsvr="mx3.multi.test:587")))
        self.assertEqual([(h.address, h.port) for h in hub], [("2001:db8::3", 587)])
        # The same host on another port (a content filter) is a fine router.
        route = await r.route_decision(route_for(
            "multi.test", Settings(mailrouter="127.0.0.1:10025", firewall="*YES")))
        self.assertEqual([(h.address, h.port) for h in route], [("127.0.0.1", 10025)])

    async def test_a_domain_without_mx_that_is_this_host_is_a_loop(self) -> None:
        with self.assertRaises(MailLoop):
            await self.local(names=["implicit.test"]).route("implicit.test")
        with self.assertRaises(MailLoop):
            await self.local(endpoints=[("127.0.0.1", 25)]).route("[127.0.0.1]")


@attrs.frozen
class Settings:
    mailrouter: str | None = None
    firewall: str = "*NO"
    fwdhubsvr: str | None = None


class PureTests(unittest.SynchronousTestCase):
    def test_hub_takes_everything(self) -> None:
        s = Settings(mailrouter="router.test", firewall="*YES", fwdhubsvr="hub.test:2525")
        self.assertEqual(route_for("near.test", s, ["near.test"]),
                         RoutingDecision(HUB, "near.test", relay=("hub.test", 2525)))

    def test_firewall_sends_all_but_near_to_the_router(self) -> None:
        s = Settings(mailrouter="[2001:db8::1]:26", firewall="*YES")
        self.assertEqual(route_for("Far.Example.", s, ["near.test"]),
                         RoutingDecision(MAILROUTER, "far.example", relay=("2001:db8::1", 26)))
        for domain in ("near.test", "sub.near.test"):
            # Not through the firewall, not even as a fallback when DNS fails.
            self.assertEqual(route_for(domain, s, [".near.test"]),
                             RoutingDecision(DIRECT, domain))
        self.assertEqual(route_for("notnear.test", s, ["near.test"]).kind, MAILROUTER)

    def test_mx_with_router_fallback(self) -> None:
        s = Settings(mailrouter="router.test")
        self.assertEqual(route_for("a.test", s),
                         RoutingDecision(DIRECT, "a.test", fallback=("router.test", 25)))
        self.assertEqual(route_for("a.test", Settings()), RoutingDecision(DIRECT, "a.test"))
        self.assertEqual(route_for("a.test", Settings(mailrouter="*NONE", firewall="*YES")),
                         RoutingDecision(DIRECT, "a.test"))

    def test_near_domains_from_settings(self) -> None:
        @attrs.frozen
        class WithNear(Settings):
            near_domains: tuple[str, ...] = ("inside.test",)

        s = WithNear(mailrouter="router.test", firewall="*YES")
        self.assertEqual(route_for("inside.test", s).kind, DIRECT)
        self.assertEqual(route_for("outside.test", s).kind, MAILROUTER)

    def test_parse_hostport(self) -> None:
        self.assertEqual(parse_hostport("host"), ("host", 25))
        self.assertEqual(parse_hostport("host:2525"), ("host", 2525))
        self.assertEqual(parse_hostport("[::1]:53", 25), ("::1", 53))
        self.assertEqual(parse_hostport("[::1]"), ("::1", 25))
        self.assertEqual(parse_hostport("2001:db8::1"), ("2001:db8::1", 25))
        for bad in ("", "host:0", "host:x", "[::1", "[::1]x", ":25"):
            with self.assertRaises(ValueError):
                parse_hostport(bad)

    def test_domain_normalisation(self) -> None:
        self.assertEqual(normalise_domain("Bücher.Example."), "xn--bcher-kva.example")
        for bad in ("", "a..b", "x" * 64 + ".test"):
            with self.assertRaises(PermanentRouteError):
                normalise_domain(bad)

    def test_local_host_addresses(self) -> None:
        wildcard = LocalHost(endpoints=[("0.0.0.0", 25)])
        self.assertTrue(wildcard.listens_on("127.0.0.7"))
        self.assertFalse(wildcard.listens_on("192.0.2.1"))  # no interface has it
        self.assertFalse(wildcard.listens_on("::1"))  # 0.0.0.0 is IPv4 only
        self.assertFalse(wildcard.listens_on("127.0.0.7", 587))
        self.assertTrue(LocalHost(endpoints=[("::", 25)]).listens_on("::1"))
        self.assertTrue(LocalHost(endpoints=[("localhost", 25)]).listens_on("127.0.0.1"))
        self.assertFalse(LocalHost(endpoints=[("127.0.0.1", 25)]).listens_on("127.0.0.2"))
        self.assertFalse(LocalHost(names=["mail.test"]).is_host("mx.test", ["192.0.2.1"]))

    def test_nameservers_must_be_addresses(self) -> None:
        with self.assertRaises(ValueError):
            MXResolver(reactor, nameservers=["dns.example"])

    def test_host_table_parsing(self) -> None:
        table = HostTable.parse(
            "# comment\n"
            "127.0.0.1 localhost\n"
            "192.0.2.5   Mail.Example.TEST  mail   # trailing\n"
            "2001:db8::5 mail.example.test\n"
            "not-an-ip   bogus.test\n"
            "192.0.2.6\n"
            "192.0.2.5 mail.example.test.\n"
        )
        self.assertEqual(table.addresses("mail.example.test"), ("192.0.2.5", "2001:db8::5"))
        self.assertEqual(table.addresses("MAIL"), ("192.0.2.5",))
        self.assertNotIn("bogus.test", table)
        self.assertIn("localhost", table)
        self.assertEqual(table.addresses("absent.test"), ())
