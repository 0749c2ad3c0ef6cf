"""What the controller does with a connection before any job: failures on that path.

A Clock and resolvers that misbehave on purpose (out of descriptors, never
answering); the listener on a real listening socket with a reactor that
records what it is asked.  Block lists against a real DNS server are tested
in test_connection_policy.py.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
from appliance import base_sections, render_toml
from twisted.internet import defer
from twisted.internet.task import Clock

from twistmail import config as configmod
from twistmail.controller.listener import Listener
from twistmail.policy import connection
from twistmail.policy.connection import ConnectionPolicy, listed_answer, rbl_query


class _Directory:
    def list_entries(self, kind: str) -> list:
        return []


def _settings(tmp_path: Path, **smtp: object) -> configmod.Settings:
    sections = base_sections(tmp_path / "var")
    sections["smtp"] = {"rblsvr": ["bl.test"], **smtp}
    config = tmp_path / "twistmail.toml"
    config.write_text(render_toml(sections))
    return configmod.load(config)


class _OutOfDescriptors:
    """Twisted's client opens a UDP socket per query, and raises at EMFILE."""

    def lookupAddress(self, name: str) -> defer.Deferred:
        raise OSError(errno.EMFILE, "Too many open files")


class _Silent:
    def lookupAddress(self, name: str) -> defer.Deferred:
        return defer.Deferred()


def _policy(tmp_path: Path, resolver: object) -> tuple[Clock, ConnectionPolicy]:
    clock = Clock()
    return clock, ConnectionPolicy(clock, _settings(tmp_path), _Directory(), None, resolver)


def _outcome(d: defer.Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_a_resolver_out_of_descriptors_means_not_listed(tmp_path):
    """It raised out of the accept loop: Twisted dropped the listener for good."""
    _, policy = _policy(tmp_path, _OutOfDescriptors())
    assert _outcome(policy.check("192.0.2.7", smtp=True)) == [None]
    assert policy.checking == 0


def test_a_block_list_that_never_answers_is_given_up_in_time(tmp_path):
    clock, policy = _policy(tmp_path, _Silent())
    result = _outcome(policy.check("192.0.2.7", smtp=True))
    assert result == [] and policy.checking == 1
    clock.advance(connection.RBL_LIMIT)
    assert result == [None] and policy.checking == 0


def test_connections_waiting_for_block_lists_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(connection, "MAX_CHECKING", 2)
    _, policy = _policy(tmp_path, _Silent())
    waiting = [policy.check(f"192.0.2.{i}", smtp=True) for i in (1, 2)]
    assert all(isinstance(d, defer.Deferred) for d in waiting)
    refused = policy.check("192.0.2.3", smtp=True)
    assert refused.reply.startswith("421 4.3.2 ") and refused.anvil_counted


def test_a_link_local_client_is_looked_up_and_matched():
    """accept() gives fe80::...%eth0, which Python 3.11's ipaddress refuses."""
    name = rbl_query("fe80::1%eth0", "bl.test")
    assert name is not None and name.endswith(".8.e.f.bl.test")


def test_127_0_0_1_is_never_a_listing():
    """RFC 5782 §5: a list never holds it; the answer means a broken list."""
    assert listed_answer(["127.0.0.2"]) and not listed_answer(["127.0.0.1"])
    assert not listed_answer(["127.255.255.254"])


def test_new_name_servers_apply_at_a_reload(tmp_path):
    clock = Clock()
    policy = ConnectionPolicy(clock, _settings(tmp_path, nameservers=["192.0.2.53"]),
                              _Directory(), None)
    first = policy.resolver
    policy.configure(_settings(tmp_path, nameservers=["192.0.2.53"]))
    assert policy.resolver is first
    policy.configure(_settings(tmp_path, nameservers=["192.0.2.54"]))
    assert policy.resolver is not first


class _Reactor:
    """Just what a Listener asks of its reactor."""

    def __init__(self) -> None:
        self.readers: set = set()
        self.clock = Clock()

    def addReader(self, r: object) -> None:
        self.readers.add(r)

    def removeReader(self, r: object) -> None:
        self.readers.discard(r)

    def callLater(self, delay: float, f, *args):  # noqa: ANN001, ANN202
        return self.clock.callLater(delay, f, *args)


@pytest.fixture
def listening():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    clients: list[socket.socket] = []

    def connect() -> None:
        clients.append(socket.create_connection(sock.getsockname(), timeout=5))

    yield sock, connect
    for c in clients:
        c.close()
    sock.close()


def test_a_connection_that_cannot_be_handled_does_not_stop_the_listener(listening):
    sock, connect = listening
    reactor = _Reactor()
    taken: list[str] = []

    def on_accept(conn: socket.socket, name: str, peer: str) -> None:
        if not taken:
            taken.append("failed")
            raise ValueError("a bug on the accept path")
        taken.append(peer)
        conn.close()

    lst = Listener(reactor, "smtp", sock, on_accept)
    lst.resume()
    connect()
    connect()
    lst.doRead()
    assert taken == ["failed", "127.0.0.1"] and lst in reactor.readers


def test_a_pause_the_pool_asks_during_a_back_off_holds(listening, monkeypatch):
    sock, connect = listening
    reactor = _Reactor()
    lst = Listener(reactor, "smtp", sock, lambda *a: None)
    lst.resume()

    def emfile() -> tuple:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(lst, "sock", type("S", (), {"accept": staticmethod(emfile),
                                                    "fileno": sock.fileno})())
    lst.doRead()
    assert lst not in reactor.readers  # backing off
    lst.pause()  # the pool is full meanwhile
    reactor.clock.advance(1)
    assert lst not in reactor.readers
    lst.resume()
    assert lst in reactor.readers


def test_accepts_failing_for_want_of_descriptors_are_said_once_and_once_over(listening):
    """Out of descriptors, the back-off tries ten times a second: it wrote a
    warning each time, 300 lines in half a minute."""
    from twisted.logger import Logger, formatEvent

    sock, connect = listening
    reactor = _Reactor()
    lst = Listener(reactor, "smtp", sock, lambda conn, name, peer: conn.close())
    events: list[dict] = []
    lst.log = Logger(observer=events.append)
    lst.resume()
    real = lst.sock
    short = {"left": 30}

    class Short:
        def accept(self) -> tuple:
            if short["left"]:
                short["left"] -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return real.accept()

        def fileno(self) -> int:
            return real.fileno()

    lst.sock = Short()
    connect()
    for _ in range(31):
        lst.doRead()
        reactor.clock.advance(0.1)
    said = [formatEvent(e) for e in events]
    assert len(said) == 2, said
    assert "Too many open files; trying again every 0.1 s" in said[0]
    assert said[1] == "accept on smtp works again, after 30 failed tries"


def test_a_wakeup_takes_only_as_many_connections_as_jobs_are_idle(listening):
    """The rest wait in the kernel backlog: under load the listener is often
    read before the channels whose FREE lines free the jobs, and queueing the
    connections made the pool grow for demand it did not have."""
    sock, connect = listening
    reactor = _Reactor()
    taken: list[socket.socket] = []
    room = {"n": 1}
    lst = Listener(reactor, "smtp", sock, lambda conn, name, peer: taken.append(conn),
                   room=lambda: room["n"])
    lst.resume()
    for _ in range(3):
        connect()
    lst.doRead()
    assert len(taken) == 1
    room["n"] = 0  # no job idle: one connection, once the turn is over
    lst.doRead()
    lst.doRead()
    assert len(taken) == 1
    reactor.clock.advance(0)
    assert len(taken) == 2
    lst.doRead()
    lst.pause()  # the pool takes no more: the late accept is off too
    reactor.clock.advance(0)
    assert len(taken) == 2
    for conn in taken:
        conn.close()
