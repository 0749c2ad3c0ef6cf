"""Per-client limits the controller enforces before a job is used (like Postfix's anvil).

Counts concurrent sessions and connection rate per client address, and
authentication failures per address reported by the jobs.  A client over a
limit is refused by the controller itself, so a flood from one address never
occupies the prestart jobs other clients need.  Each limit's refusals are
journaled at most once per interval per address, naming the setting, so a
flood does not flood the journal too.

Pure bookkeeping with an injected clock; no I/O.

Settings honoured: ``[limits] maxconnperip maxconnrate maxauthfail interval``.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
from collections.abc import Callable

import attrs


@attrs.frozen
class LimitSettings:
    maxconnperip: int = 10  # concurrent sessions per client address (0: no limit)
    maxconnrate: int = 120  # new connections per client address per interval (0: no limit)
    maxauthfail: int = 10  # failed sign-ons per client address per interval (0: no limit)
    interval: float = 60.0  # seconds


@attrs.frozen
class Refusal:
    setting: str  # the [limits] key that refused
    text: str
    journal: bool  # first refusal for this address and setting in this interval


@functools.lru_cache(maxsize=4096)
def client_key(ip: str) -> str:
    """IPv6 clients are counted per /64: one host usually owns the whole prefix.

    Cached: the controller asks twice per connection, mostly for the same
    few addresses, and parsing one costs more than the rest of the check."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return ip


AUTHFAIL_TEXT = "too many failed sign-ons from your address"


class Anvil:
    def __init__(self, settings: LimitSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.active: collections.Counter[str] = collections.Counter()
        self.connects: dict[str, collections.deque[float]] = {}
        self.failures: dict[str, collections.deque[float]] = {}
        self.reported: dict[tuple[str, str], float] = {}

    def admit(self, ip: str) -> Refusal | None:
        """A new connection from ``ip``: None to let it in (and count it)."""
        key = client_key(ip)
        s = self.settings
        now = self.clock()
        if s.maxauthfail and self._count(self.failures, key, now) >= s.maxauthfail:
            return self._refuse(key, "maxauthfail", now, AUTHFAIL_TEXT)
        if s.maxconnperip and self.active[key] >= s.maxconnperip:
            return self._refuse(key, "maxconnperip", now,
                                "too many concurrent connections from your address")
        if s.maxconnrate and self._count(self.connects, key, now) >= s.maxconnrate:
            return self._refuse(key, "maxconnrate", now,
                                "too many connections from your address, slow down")
        self.connects.setdefault(key, collections.deque()).append(now)
        self.active[key] += 1
        return None

    def only_sessions_full(self, ip: str) -> bool:
        """Whether MAXCONNPERIP, and no other limit, would refuse ``ip`` now."""
        key = client_key(ip)
        s = self.settings
        if not s.maxconnperip or self.active[key] < s.maxconnperip:
            return False
        now = self.clock()
        return not (s.maxauthfail and self._count(self.failures, key, now) >= s.maxauthfail
                    or s.maxconnrate and self._count(self.connects, key, now) >= s.maxconnrate)

    def closed(self, ip: str) -> None:
        """A session admitted earlier has ended."""
        key = client_key(ip)
        if self.active[key] > 1:
            self.active[key] -= 1
        else:
            self.active.pop(key, None)

    def auth_failed(self, ip: str) -> bool:
        """Count a failed sign-on; True when ``ip`` has now used up MAXAUTHFAIL."""
        key = client_key(ip)
        now = self.clock()
        self.failures.setdefault(key, collections.deque()).append(now)
        limit = self.settings.maxauthfail
        return bool(limit) and self._count(self.failures, key, now) >= limit

    def _count(self, table: dict[str, collections.deque[float]], key: str, now: float) -> int:
        q = table.get(key)
        if not q:
            return 0
        horizon = now - self.settings.interval
        while q and q[0] <= horizon:
            q.popleft()
        if not q:
            del table[key]
            return 0
        return len(q)

    def _refuse(self, key: str, setting: str, now: float, text: str) -> Refusal:
        last = self.reported.get((key, setting))
        first = last is None or now - last >= self.settings.interval
        if first:
            self.reported[(key, setting)] = now
        return Refusal(setting, text, first)

    def sweep(self) -> None:
        """Forget addresses that have gone quiet (bounded memory under a scan)."""
        now = self.clock()
        for table in (self.connects, self.failures):
            for key in list(table):
                self._count(table, key, now)
        horizon = now - self.settings.interval
        for k, t in list(self.reported.items()):
            if t <= horizon:
                del self.reported[k]
