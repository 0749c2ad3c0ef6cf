"""write_now sends at once on an idle plain connection, keeps order, and never bypasses TLS;
close_now closes only a connection with nothing left to send.

Real TCP connections on loopback, in this process's reactor.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.task import deferLater
from twisted.trial import unittest

from twistmail import config as configmod
from twistmail import tlsconfig
from twistmail.protocols.writenow import close_now, send_descriptor_now, write_now


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


class Speaker(protocol.Protocol):
    """Writes through write_now and transport.write in turn, noting what was queued."""

    def __init__(self, tls: ssl.CertificateOptions | None = None) -> None:
        self.tls = tls
        self.queued_after_first: list[bytes] | None = None

    def connectionMade(self) -> None:
        if self.tls is not None:
            self.transport.startTLS(self.tls)
        write_now(self.transport, b"one ")
        self.queued_after_first = list(self.transport._tempDataBuffer)
        self.transport.write(b"two ")
        write_now(self.transport, b"three ")  # the buffer is not empty: it queues behind
        write_now(self.transport, b"x" * 300_000)  # more than the socket takes at once
        self.transport.loseConnection()


class Closer(protocol.Protocol):
    """Writes ``reply`` and closes with close_now, noting what happened in that call."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.closed_now: bool | None = None
        self.lost_inside = False
        self.inside = False

    def connectionMade(self) -> None:
        write_now(self.transport, self.reply)
        self.inside = True
        self.closed_now = close_now(reactor, self.transport)
        self.inside = False
        if not self.closed_now:
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        self.lost_inside = self.inside


class CloseNowTests(unittest.TestCase):
    timeout = 20

    async def exchange(self, closer: Closer) -> bytes:
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: closer),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        collect = Collect()
        await protocol.ClientCreator(reactor, lambda: collect).connectTCP(
            "127.0.0.1", port.getHost().port)
        return await collect.done

    async def test_an_idle_connection_closes_at_once_after_its_last_reply(self) -> None:
        closer = Closer(b"221 bye\r\n")
        self.assertEqual(await self.exchange(closer), b"221 bye\r\n")
        self.assertTrue(closer.closed_now)
        self.assertTrue(closer.lost_inside)  # the protocol was told within the call
        self.assertFalse(reactor.getReaders().count(closer.transport))

    async def test_a_connection_with_bytes_queued_is_left_to_loseconnection(self) -> None:
        closer = Closer(b"x" * 3_000_000)  # more than the socket takes at once
        self.assertEqual(await self.exchange(closer), b"x" * 3_000_000)  # nothing cut off
        self.assertFalse(closer.closed_now)
        self.assertFalse(closer.lost_inside)


class WriteNowTests(unittest.TestCase):
    timeout = 20

    async def exchange(self, speaker: Speaker, client_tls: bool = False) -> bytes:
        factory = protocol.Factory.forProtocol(lambda: speaker)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        collect = Collect()
        creator = protocol.ClientCreator(reactor, lambda: collect)
        if client_tls:
            await creator.connectSSL("127.0.0.1", port.getHost().port,
                                     ssl.CertificateOptions(verify=False))
        else:
            await creator.connectTCP("127.0.0.1", port.getHost().port)
        return await collect.done

    async def test_plain_tcp_sends_at_once_and_keeps_order(self) -> None:
        speaker = Speaker()
        data = await self.exchange(speaker)
        self.assertEqual(data, b"one two three " + b"x" * 300_000)
        self.assertEqual(speaker.queued_after_first, [])  # "one" left without the reactor

    async def test_tls_bytes_go_through_tls(self) -> None:
        home = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, home)
        config = home / "twistmail.toml"
        config.write_text('[system]\ndatadir = "var"\n')
        settings = configmod.load(config)
        tlsconfig.ensure_pair(settings)
        data = await self.exchange(Speaker(tlsconfig.server_options(settings)), client_tls=True)
        self.assertEqual(data, b"one two three " + b"x" * 300_000)


class DescriptorTests(unittest.TestCase):
    """A passed descriptor goes at once with its line, or queued with the bytes before it."""

    timeout = 20

    async def test_a_descriptor_goes_with_its_line_at_once_or_behind_queued_bytes(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        proto = protocol.Protocol()
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                      protocol.Factory.forProtocol(lambda: proto))
        ours.close()
        self.addCleanup(proto.transport.loseConnection)
        pipes = [os.pipe(), os.pipe()]
        for r, w in pipes:
            self.addCleanup(os.close, r)
            self.addCleanup(os.close, w)
        send_descriptor_now(proto.transport, pipes[0][0], b"FIRST\n")
        self.assertEqual(proto.transport._sendmsgQueue, [])  # gone without the reactor
        proto.transport.write(b"queued ")
        send_descriptor_now(proto.transport, pipes[1][0], b"SECOND\n")
        await deferLater(reactor, 0.05, lambda: None)
        data, fds = b"", []
        theirs.settimeout(5)
        while data.count(b"\n") < 2:
            chunk, got, _, _ = socket.recv_fds(theirs, 100, 2)
            self.assertTrue(chunk)
            data += chunk
            fds += got
            # a descriptor is never later than its line
            self.assertGreaterEqual(len(fds), data.count(b"\n"))
        self.assertEqual(data, b"FIRST\nqueued SECOND\n")
        for (_, w), fd in zip(pipes, fds, strict=True):
            os.write(w, b"!")
            self.assertEqual(os.read(fd, 1), b"!")
            os.close(fd)
