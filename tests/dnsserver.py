"""A loopback DNS server for tests: ``python dnsserver.py ZONE.json``.

Serves the names in the JSON file (``{"name": {"A": [...], "AAAA": [...],
"MX": [[pref, host]], "TXT": [...]}}``) over UDP and TCP on 127.0.0.1, on
a port the kernel picks, which it prints as its first line.  Unknown names
are NXDOMAIN.  It exits when its standard input closes.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import defer, reactor, stdio
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Protocol
from twisted.names import common, dns, error, server

TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT}


class ZoneResolver(common.ResolverBase):
    def __init__(self, zone: dict) -> None:
        super().__init__()
        self.zone = {k.lower().rstrip("."): v for k, v in zone.items()}

    def _lookup(self, name, cls, type, timeout=None):  # noqa: A002 - Twisted's signature
        key = name.decode() if isinstance(name, bytes) else name
        records = self.zone.get(key.lower().rstrip("."))
        if records is None:
            return defer.fail(error.DomainError(name))
        answers = []
        for kind, values in records.items():
            if TYPES.get(kind) != type:
                continue
            for v in values:
                answers.append(dns.RRHeader(name, type, cls, 60, _payload(kind, v)))
        return defer.succeed((answers, [], []))


def _payload(kind: str, v):
    if kind == "A":
        return dns.Record_A(v, 60)
    if kind == "AAAA":
        return dns.Record_AAAA(v, 60)
    if kind == "MX":
        return dns.Record_MX(v[0], v[1].encode(), 60)
    return dns.Record_TXT(v.encode(), ttl=60)


class _Stdin(Protocol):
    def connectionLost(self, reason=None) -> None:
        reactor.stop()


def main() -> None:
    zone = json.loads(open(sys.argv[1]).read())
    factory = server.DNSServerFactory(clients=[ZoneResolver(zone)])
    # One port number for both: the kernel picks a free UDP port, whose TCP
    # twin another process (a client's ephemeral port) may hold; then again.
    for _ in range(50):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        break
    print(port, flush=True)
    stdio.StandardIO(_Stdin())
    reactor.run()


if __name__ == "__main__":
    main()
