"""The outbound SMTP client against a real loopback SMTP sink.

The sink is a plain-socket server in a thread, so what it records is the
exact byte stream the client sent.  It is deliberately lax about the end of
DATA (a "." line ended by a bare LF counts too): a lax receiver is where
smuggled messages show up, so it is the right judge of the client's
dot-stuffing.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import re
import shutil
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet import ssl as tssl
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from twistmail.mx import Hop
from twistmail.smtp.client import (
    CHUNK_SIZE,
    DELIVERED,
    PERMANENT,
    TEMPORARY,
    TLS_OPPORTUNISTIC,
    TLS_REQUIRED,
    TLS_VERIFY,
    Credentials,
    DeliveryResult,
    DotStuffer,
    Envelope,
    Recipient,
    SessionCache,
    Timeouts,
    deliver,
    xtext,
)

_TLS_DIR = tempfile.TemporaryDirectory(prefix="twistmail-client-tls-")  # removed at exit
SMUGGLE = b"MAIL FROM:<smuggled@evil.test>\r\nRCPT TO:<victim@sink.test>\r\nDATA\r\nowned\r\n"


# -- certificates -------------------------------------------------------------------


@cache
def certificate() -> tuple[Path, Path, bytes]:
    """A self-signed certificate for localhost / 127.0.0.1: (cert file, key file, PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = Path(_TLS_DIR.name)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "cert.pem").write_bytes(pem)
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return directory / "cert.pem", directory / "key.pem", pem


def server_tls_context(pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    cert, key = pair or certificate()[:2]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


@cache
def leaf_without_names() -> tuple[Path, Path, bytes]:
    """A certificate signed by a CA of its own, naming localhost in its CN only
    (no subjectAltName): (cert file, key file, the CA's PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: str, public: Any, signer: Any, ca: bool) -> Any:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256())
        )

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build("Names CA", "Names CA", ca_key.public_key(), ca_key, True)
    leaf = build("localhost", "Names CA", key.public_key(), ca_key, False)
    directory = Path(_TLS_DIR.name)
    (directory / "bare.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (directory / "bare.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return (directory / "bare.pem", directory / "bare.key",
            ca.public_bytes(serialization.Encoding.PEM))


def trust_root() -> Any:
    return tssl.Certificate.loadPEM(certificate()[2])


# -- the sink -------------------------------------------------------------------------


def unstuff(raw: bytes) -> bytes:
    lines = raw.splitlines(keepends=True)
    return b"".join(line[1:] if line.startswith(b".") else line for line in lines)


@attrs.define
class Message:
    originator: str
    recipients: list[str]
    raw: bytes  # the DATA bytes as sent, terminator excluded

    @property
    def content(self) -> bytes:
        return unstuff(self.raw)


@attrs.define
class Behaviour:
    greeting: str | None = "220 sink.test ESMTP"
    ehlo: str | None = None  # a failure reply to EHLO, e.g. "502 5.5.1 no"
    helo: str = "250 sink.test"
    ehlo_after_tls: str | None = None  # a failure reply to EHLO once TLS is on
    extensions: tuple[str, ...] = ("PIPELINING", "SIZE 10000000", "8BITMIME",
                                   "ENHANCEDSTATUSCODES")
    tls: bool = False  # offer STARTTLS before TLS
    tls_pair: tuple[Path, Path] | None = None  # (cert, key) files; default: certificate()
    tls_extensions: tuple[str, ...] | None = None  # after TLS; default: extensions
    credentials: tuple[str, str] | None = None
    mail: str = "250 2.1.0 ok"
    rcpt: Callable[[str], str] = lambda address: "250 2.1.5 ok"
    data: str = "354 go ahead"
    end: str = "250 2.0.0 queued"
    drop_after: int | None = None  # close after this many DATA bytes
    stall_data: float | None = None  # stop reading after 354 for this long
    end_delay: float | None = None  # wait this long before the reply to the message
    starttls_reply: str = "220 2.0.0 go ahead"
    tls_broken: bool = False  # the TLS hello answered with plain bytes, then closed
    rset: str = "250 2.0.0 ok"
    etrn: str = "250 2.0.0 queuing started"  # the reply to ETRN (offer it in extensions)
    max_rcpts: int | None = None  # recipients taken per transaction; more get 452 4.5.3
    hang_up_on_refusal: bool = False  # close right after a 4xx/5xx to MAIL or RCPT (Exim's drop)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.reads = 0

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.reads += 1
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"


class Sink:
    """A threaded SMTP receiver that records commands, batches and messages."""

    def __init__(self, behaviour: Behaviour | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.behaviour = behaviour or Behaviour()
        self.commands: list[str] = []
        self.batches: list[tuple[str, int]] = []  # (verb, receive number)
        self.messages: list[Message] = []
        self.auth: list[str] = []
        self.tls_sessions = 0
        self.tls_failures = 0
        self.connections = 0
        self.peers: list[str] = []  # the client address of each connection
        sink = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sink.connections += 1
                sink.peers.append(self.client_address[0])
                try:
                    sink.session(self.request)
                except (EOFError, OSError, ssl.SSLError):
                    pass

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))
        self.thread.daemon = True
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def hop(self, host: str = "sink.test") -> Hop:
        return Hop(host, "127.0.0.1", self.port, 10)

    # -- one session ------------------------------------------------------------------

    def session(self, sock: socket.socket) -> None:
        b = self.behaviour
        if b.greeting is None:
            time.sleep(5)
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = _Reader(sock)
        state: dict[str, Any] = {"tls": False, "mail": None, "rcpts": []}

        def reply(text: str) -> None:
            sock.sendall(text.encode() + b"\r\n")

        reply(b.greeting)
        while True:
            raw = reader.line()
            command = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            verb = command.split(" ", 1)[0].upper()
            self.commands.append(command)
            self.batches.append((verb, reader.reads))
            if verb == "EHLO":
                if b.ehlo or (state["tls"] and b.ehlo_after_tls):
                    reply(b.ehlo_after_tls if state["tls"] and b.ehlo_after_tls else b.ehlo)
                    continue
                extensions = list(b.extensions)
                if state["tls"] and b.tls_extensions is not None:
                    extensions = list(b.tls_extensions)
                if b.tls and not state["tls"]:
                    extensions.append("STARTTLS")
                lines = ["sink.test", *extensions]
                reply("".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}")
            elif verb == "HELO":
                reply(b.helo)
            elif verb == "STARTTLS":
                reply(b.starttls_reply)
                if not b.starttls_reply.startswith("220 "):
                    continue
                assert reader.buffer == b""
                if b.tls_broken:
                    sock.recv(65536)  # the client's hello, answered with no TLS
                    sock.sendall(b"this is no TLS\r\n")
                    self.tls_failures += 1
                    return
                try:
                    sock = server_tls_context(b.tls_pair).wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    self.tls_failures += 1
                    return
                self.tls_sessions += 1
                reader.sock = sock
                state["tls"] = True
            elif verb == "AUTH":
                reply(self.authenticate(command, reader, reply))
            elif verb == "MAIL":
                state["mail"], state["rcpts"] = command, []
                reply(b.mail)
                if b.hang_up_on_refusal and b.mail[:1] in "45":
                    return
            elif verb == "RCPT":
                address = re.search(r"<([^>]*)>", command).group(1)
                if b.max_rcpts is not None and len(state["rcpts"]) >= b.max_rcpts:
                    answer = "452 4.5.3 Too many recipients"
                else:
                    answer = b.rcpt(address)
                if answer.startswith("2"):
                    state["rcpts"].append(address)
                reply(answer)
                if b.hang_up_on_refusal and answer[:1] in "45":
                    return
            elif verb == "DATA":
                reply(b.data)
                if not b.data.startswith("354"):
                    continue
                if b.stall_data is not None:
                    time.sleep(b.stall_data)
                    return
                raw_data = self.receive_data(reader, sock)
                if raw_data is None:
                    return
                originator = re.search(r"<([^>]*)>", state["mail"]).group(1)
                if b.end_delay is not None:
                    time.sleep(b.end_delay)
                self.messages.append(Message(originator, list(state["rcpts"]), raw_data))
                reply(b.end)
            elif verb == "QUIT":
                reply("221 2.0.0 bye")
                return
            elif verb == "RSET":
                reply(b.rset)
            elif verb == "NOOP":
                reply("250 2.0.0 ok")
            elif verb == "ETRN" and "ETRN" in b.extensions:
                reply(b.etrn)
            else:
                reply("500 5.5.2 what?")

    def receive_data(self, reader: _Reader, sock: socket.socket) -> bytes | None:
        got = bytearray()
        while True:
            line = reader.line()
            if line.rstrip(b"\r\n") == b".":
                return bytes(got)
            got += line
            limit = self.behaviour.drop_after
            if limit is not None and len(got) >= limit:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                return None

    def authenticate(self, command: str, reader: _Reader, reply: Callable[[str], None]) -> str:
        words = command.split()
        mechanism = words[1].upper()
        if mechanism == "PLAIN":
            token = words[2] if len(words) > 2 else None
            if token is None:
                reply("334 ")
                token = reader.line().strip().decode()
            _, user, password = base64.b64decode(token).decode().split("\0")
        elif mechanism == "LOGIN":
            reply("334 VXNlcm5hbWU6")
            user = base64.b64decode(reader.line().strip()).decode()
            reply("334 UGFzc3dvcmQ6")
            password = base64.b64decode(reader.line().strip()).decode()
        else:
            return "504 5.5.4 unknown mechanism"
        self.auth.append(f"{mechanism} {user}")
        if (user, password) == self.behaviour.credentials:
            return "235 2.7.0 authenticated"
        return "535 5.7.8 bad credentials"


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sent_commands(sink: Sink) -> list[str]:
    return [c.split(" ", 1)[0].upper() for c in sink.commands]


# -- dot-stuffing without a network ------------------------------------------------------


def stuff(data: bytes, chunk: int) -> bytes:
    s = DotStuffer()
    return b"".join(s.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)) + s.finish()


def normalised(data: bytes) -> bytes:
    out = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return out if out == b"" or out.endswith(b"\r\n") else out + b"\r\n"


def strict_split(stream: bytes) -> tuple[bytes, bytes]:
    """Body and what follows the first CRLF.CRLF end of data."""
    assert stream.endswith(b".\r\n")
    if stream.startswith(b".\r\n"):
        return b"", stream[3:]
    end = stream.find(b"\r\n.\r\n")
    return stream[: end + 2], stream[end + 5:]


@given(
    st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b".\r\n"]), max_size=40),
    st.integers(min_value=1, max_value=9),
)
@settings(max_examples=400, deadline=None)
def test_dot_stuffing_is_chunk_independent(parts: list[bytes], chunk: int) -> None:
    data = b"".join(parts)
    stream = stuff(data, chunk)
    assert stream == stuff(data, len(data) or 1)
    body, after = strict_split(stream)
    assert after == b""
    assert unstuff(body) == normalised(data)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", stream) is None


def test_lone_dot_at_every_chunk_position() -> None:
    for chunk in (1, 2, 3, 16):
        for pad in range(0, 40):
            data = b"x" * pad + b"\r\n.\r\n" + SMUGGLE + b".\r\nend"
            body, after = strict_split(stuff(data, chunk))
            assert after == b"" and unstuff(body) == normalised(data)


def test_dot_stuffer_edges() -> None:
    assert stuff(b"", 4) == b".\r\n"
    assert stuff(b".", 1) == b"..\r\n.\r\n"
    assert stuff(b"a\r", 1) == b"a\r\n.\r\n"
    assert stuff(b"a\n.\nb", 2) == b"a\r\n..\r\nb\r\n.\r\n"
    assert stuff(b"a\r.\rb", 3) == b"a\r\n..\r\nb\r\n.\r\n"


def test_xtext() -> None:
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext("é") == "+C3+A9"


def test_clienttimeout_keeps_the_rfc_proportions() -> None:
    assert Timeouts.for_reply(300) == Timeouts()
    short = Timeouts.for_reply(30)
    assert (short.greeting, short.rcpt, short.data_init, short.data_block, short.data_end) == \
        (30, 30, 12, 18, 60)
    assert (short.connect, short.quit, short.close) == (30, 30, 10)  # not RFC 5321 waits


# -- deliveries over the network ---------------------------------------------------------


class ClientTests(unittest.TestCase):
    timeout = 20

    def sink(self, **behaviour: Any) -> Sink:
        s = Sink(Behaviour(**behaviour))
        self.addCleanup(s.stop)
        return s

    def body(self, data: bytes) -> Path:
        directory = tempfile.mkdtemp(prefix="twistmail-client-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = Path(directory) / "message"
        path.write_bytes(data)
        return path

    async def send(
        self, hops: list[Hop], data: bytes = b"Subject: hi\r\n\r\nhello\r\n",
        recipients: tuple[Any, ...] = ("a@dest.test",), originator: str = "me@here.test",
        **options: Any,
    ) -> DeliveryResult:
        options.setdefault("timeout_scale", 0.02)
        envelope = options.pop("envelope", None) or Envelope(originator, recipients)
        policy = options.pop("tls_policy", TLS_OPPORTUNISTIC)
        return await deliver(
            reactor, hops, envelope, self.body(data), "client.test", policy, **options
        )

    # -- the basics ---------------------------------------------------------------------

    async def test_pipelined_envelope_and_mixed_recipients(self) -> None:
        answers = {"ok@d.test": "250 2.1.5 ok", "later@d.test": "450 4.2.1 busy",
                   "gone@d.test": "550 5.1.1 no such user", "ok2@d.test": "250 2.1.5 ok"}
        sink = self.sink(rcpt=lambda a: answers[a])
        result = await self.send([sink.hop()], recipients=tuple(answers))
        statuses = {r.address: (r.status, r.code) for r in result.recipients}
        self.assertEqual(statuses, {
            "ok@d.test": (DELIVERED, 250), "later@d.test": (TEMPORARY, 450),
            "gone@d.test": (PERMANENT, 550), "ok2@d.test": (DELIVERED, 250),
        })
        self.assertEqual(sent_commands(sink), ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "RCPT",
                                               "DATA", "QUIT"])
        batch = {n for verb, n in sink.batches if verb in ("MAIL", "RCPT", "DATA")}
        self.assertEqual(len(batch), 1, "MAIL, the RCPTs and DATA must go out in one write")
        self.assertEqual(sink.messages[0].recipients, ["ok@d.test", "ok2@d.test"])
        self.assertEqual(result.remote_ip, "127.0.0.1")
        self.assertIn("SIZE=", sink.commands[1])
        self.assertNotIn("BODY=", sink.commands[1])

    async def test_without_pipelining_commands_wait_for_replies(self) -> None:
        sink = self.sink(extensions=("SIZE 100000",))
        result = await self.send([sink.hop()], recipients=("x@d.test", "y@d.test"))
        self.assertEqual([r.status for r in result.recipients], [DELIVERED, DELIVERED])
        receives = [n for verb, n in sink.batches if verb in ("MAIL", "RCPT")]
        self.assertEqual(len(set(receives)), 3)

    async def test_mail_refused_settles_every_recipient(self) -> None:
        sink = self.sink(mail="553 5.7.1 sender refused")
        result = await self.send([sink.hop()], recipients=("x@d.test", "y@d.test"))
        self.assertEqual({r.status for r in result.recipients}, {PERMANENT})
        self.assertEqual(sink.messages, [])
        # This sink answers DATA with 354 even then: it gets no text, and no
        # message is made (the connection is dropped).
        self.assertEqual(sent_commands(sink)[-1], "DATA")

    async def test_replies_given_before_the_server_hangs_up_stand(self) -> None:
        """A server that drops the client after a refusal (Exim's "drop"): the
        refusal was taken for a lost connection, retried for days, and the
        notice at the end said 4.4.2 instead of the server's reason."""
        sink = self.sink(mail="554 5.7.1 sender blocked by policy", hang_up_on_refusal=True)
        result = await self.send([sink.hop()], recipients=("x@d.test", "y@d.test"))
        self.assertEqual({(r.status, r.code) for r in result.recipients}, {(PERMANENT, 554)})
        self.assertIn("sender blocked by policy", result.recipients[0].text)
        sink = self.sink(mail="421 4.7.0 too many connections", hang_up_on_refusal=True)
        result = await self.send([sink.hop()])
        self.assertEqual((result.recipients[0].status, result.recipients[0].code),
                         (TEMPORARY, 421))
        answers = {"ok@d.test": "250 2.1.5 ok", "gone@d.test": "550 5.1.1 no such user",
                   "after@d.test": "250 2.1.5 ok"}
        sink = self.sink(rcpt=lambda a: answers[a], hang_up_on_refusal=True)
        result = await self.send([sink.hop()], recipients=tuple(answers))
        statuses = {r.address: (r.status, r.code) for r in result.recipients}
        self.assertEqual(statuses["gone@d.test"], (PERMANENT, 550))
        # Accepted, or never answered, then cut off: not delivered, tried again.
        self.assertEqual(statuses["ok@d.test"][0], TEMPORARY)
        self.assertEqual(statuses["after@d.test"][0], TEMPORARY)
        self.assertIn("Connection lost", next(r.text for r in result.recipients
                                              if r.address == "after@d.test"))
        self.assertEqual(sink.messages, [])
        # The same without PIPELINING, each command waiting for its reply.
        sink = self.sink(rcpt=lambda a: answers[a], hang_up_on_refusal=True,
                         extensions=("SIZE 10000000", "8BITMIME"))
        result = await self.send([sink.hop()], recipients=tuple(answers))
        statuses = {r.address: (r.status, r.code) for r in result.recipients}
        self.assertEqual(statuses["gone@d.test"], (PERMANENT, 550))
        self.assertEqual({statuses["ok@d.test"][0], statuses["after@d.test"][0]}, {TEMPORARY})

    async def test_end_of_data_temporary_failure(self) -> None:
        sink = self.sink(end="451 4.3.0 try later")
        result = await self.send([sink.hop()])
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertEqual(result.recipients[0].code, 451)

    async def test_helo_fallback(self) -> None:
        sink = self.sink(ehlo="502 5.5.1 EHLO not implemented")
        result = await self.send([sink.hop()], data="8bit é\r\n".encode())
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertEqual(sent_commands(sink)[:3], ["EHLO", "HELO", "MAIL"])
        self.assertEqual(sink.commands[2], "MAIL FROM:<me@here.test>")

    async def test_a_last_hop_that_refuses_ehlo_and_helo_for_good_returns_the_mail(
            self) -> None:
        """A 5xx to both is permanent where the last hop says it (Postfix bounces at
        its final server); it had the mail retried for days and returned as 4.4.1."""
        refusing = self.sink(ehlo="550 5.7.1 not you", helo="550 5.7.1 not you either")
        result = await self.send([refusing.hop()])
        [r] = result.recipients
        self.assertEqual((r.status, r.code), (PERMANENT, 550))
        self.assertTrue(r.text.startswith("5.7.1 "), r.text)
        self.assertIn("not you either", r.text)
        self.assertEqual(sent_commands(refusing), ["EHLO", "HELO", "QUIT"])

    async def test_a_hop_that_refuses_helo_for_good_moves_to_the_next(self) -> None:
        refusing = self.sink(ehlo="550 no", helo="554 no")
        good = self.sink()
        result = await self.send([refusing.hop(), good.hop()])
        self.assertEqual(result.recipients[0].status, DELIVERED)
        refusing2 = self.sink(ehlo="550 no", helo="554 no")
        busy = self.sink(ehlo="421 4.3.2 busy")
        result = await self.send([refusing2.hop(), busy.hop()])
        [r] = result.recipients
        self.assertEqual(r.status, TEMPORARY, "the last hop's word decides")
        self.assertIn("5.0.0", r.text)  # the first hop's refusal is said too

    async def test_size_refused_before_mail(self) -> None:
        sink = self.sink(extensions=("PIPELINING", "SIZE 1000"))
        result = await self.send([sink.hop()], data=b"x" * 5000 + b"\r\n")
        self.assertEqual(result.recipients[0].status, PERMANENT)
        self.assertEqual(result.recipients[0].code, 552)
        self.assertIn("5.3.4", result.recipients[0].text)
        self.assertNotIn("MAIL", sent_commands(sink))

    async def test_eightbit_body(self) -> None:
        sink = self.sink()
        await self.send([sink.hop()], data="Subject: é\r\n\r\nçà\r\n".encode())
        self.assertIn("BODY=8BITMIME", sink.commands[1])

    async def test_an_eightbit_body_is_made_seven_bit_for_a_server_without_8bitmime(
            self) -> None:
        """RFC 6152 §3: converted, not sent as it is; the text reads the same.
        Header fields go as they came (8-bit ones are SMTPUTF8's business)."""
        import email
        import email.policy

        data = ("From: Jörg <j@here.test>\r\nSubject: déjà vu\r\nMIME-Version: 1.0\r\n"
                "Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\nçà\r\n.point\r\n--b1\r\n"
                "Content-Type: application/octet-stream\r\n"
                "Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--b1--\r\n").encode()
        plain = self.sink(extensions=("PIPELINING", "SIZE 10000000"))
        result = await self.send([plain.hop()], data=data)
        self.assertEqual(result.recipients[0].status, DELIVERED)
        sent = plain.messages[0].content
        head, body = sent.split(b"\r\n\r\n", 1)
        self.assertTrue(body.isascii())
        self.assertEqual(head, data.split(b"\r\n\r\n", 1)[0])
        self.assertEqual(plain.commands[1], f"MAIL FROM:<me@here.test> SIZE={len(sent)}")
        msg = email.message_from_bytes(sent, policy=email.policy.default)
        self.assertEqual(str(msg["Subject"]), "déjà vu")
        self.assertEqual(msg["From"].addresses[0].addr_spec, "j@here.test")
        text, blob = [p.get_payload(decode=True) for p in msg.iter_parts()]
        self.assertEqual((text, blob), ("çà\r\n.point".encode(), b"\x00\x01\x02"))
        self.assertIn(b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n", sent)

    async def test_an_eightbit_body_goes_as_it_is_when_only_its_conversion_is_too_big(
            self) -> None:
        """Converted, it would be returned (552); as it is, it may well arrive."""
        data = b"Subject: x\r\n\r\n" + bytes(range(128, 256)) * 20 + b"\r\n"
        plain = self.sink(extensions=("PIPELINING", f"SIZE {len(data) + 10}"))
        result = await self.send([plain.hop()], data=data)
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertEqual(plain.messages[0].content, data)
        self.assertEqual(plain.commands[1], f"MAIL FROM:<me@here.test> SIZE={len(data)}")

    async def test_a_message_is_converted_once_for_all_its_transactions(self) -> None:
        """Recipients past the server's limit go in more transactions; one with
        8-bit header fields only was converted again for each."""
        from twistmail.smtp import client, downgrade

        calls = []
        real = downgrade.to_7bit_pieces
        data = "Subject: déjà vu\r\n\r\nplain text\r\n".encode()

        def counting(body: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(bytes(body) == data)  # the whole message, not one of its parts
            return real(body, *args, **kwargs)

        self.patch(client.downgrade, "to_7bit_pieces", counting)
        plain = self.sink(extensions=("PIPELINING", "SIZE 10000000"), max_rcpts=1)
        result = await self.send([plain.hop()], data=data,
                                 recipients=("a@d.test", "b@d.test", "c@d.test"))
        self.assertEqual({r.status for r in result.recipients}, {DELIVERED})
        self.assertEqual([m.content for m in plain.messages], [data] * 3)
        self.assertEqual(calls.count(True), 1)

    async def test_eight_bit_header_fields_sent_as_they_are_are_logged(self) -> None:
        """Header fields are never changed: where they go 8-bit to a server that
        did not offer 8BITMIME, the log says so, as README promises."""
        said: list[str] = []
        observer = lambda event: said.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        plain = self.sink(extensions=("PIPELINING", "SIZE 10000000"))
        for data in ("Subject: Grüße\r\n\r\nplain\r\n", "Subject: Grüße\r\n\r\nçà\r\n",
                     "Subject: hi\r\n\r\nçà\r\n"):
            result = await self.send([plain.hop()], data=data.encode())
            self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertEqual(len([t for t in said if "cannot be made 7-bit (header fields" in t]), 2)

    async def test_the_trace_fields_before_the_message_are_never_sent(self) -> None:
        """A queued file may begin with the Return-Path and Delivered-To fields
        local delivery keeps (the envelope's ``trace``): the message after them
        is what goes, also for its SIZE, its 8-bit scan and its conversion."""
        from twistmail.smtp.downgrade import to_7bit

        trace = b"Return-Path: <me@here.test>\r\nDelivered-To: a@d.test\r\n"
        small = "Subject: é\r\n\r\nçà\r\n".encode()
        large = b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 2000
        eight = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Content-Transfer-Encoding: 8bit\r\n\r\n" + "é\r\n".encode() * 40000)
        sink = self.sink(extensions=("PIPELINING", "SIZE 10000000", "8BITMIME"))
        plain = self.sink(extensions=("PIPELINING", "SIZE 10000000"))
        for data, server, sent in ((small, sink, small), (large, sink, large),
                                   (eight, plain, to_7bit(eight))):
            result = await deliver(reactor, [server.hop()], Envelope("me@here.test", ("a@d.test",)),
                                   self.body(trace + data), "client.test", timeout_scale=0.02,
                                   body_offset=len(trace))
            self.assertEqual(result.recipients[0].status, DELIVERED)
            # DATA ends the base64 of the conversion with a line end.
            ended = sent if sent.endswith(b"\r\n") else sent + b"\r\n"
            self.assertEqual(server.messages[-1].content, ended)
            mail = [c for c in server.commands if c.startswith("MAIL")][-1]
            self.assertIn(f"SIZE={len(sent)}", mail)
        self.assertIn("BODY=8BITMIME", [c for c in sink.commands if c.startswith("MAIL")][0])
        self.assertNotIn("BODY=8BITMIME", [c for c in sink.commands if c.startswith("MAIL")][1])

    async def test_a_large_eightbit_body_is_converted_into_a_file_of_its_own(self) -> None:
        """Larger than a chunk, the 7-bit copy is sent from a file that leaves nothing behind."""
        from twistmail.smtp.downgrade import to_7bit

        data = (b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Transfer-Encoding: binary\r\n\r\n"
                + bytes(range(256)) * 1200 + b"\r\n.\r\n")
        path = self.body(data)

        def open_there() -> list[str]:
            links = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    links.append(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    pass  # the descriptor of the listing itself
            return [link for link in links if link.startswith(str(path.parent))]

        from twistmail.smtp import client

        made = []

        def spill(**kw: Any) -> Any:
            f = real(**kw)
            made.append(kw["dir"])
            return f

        real = client.tempfile.TemporaryFile
        self.patch(client.tempfile, "TemporaryFile", spill)
        plain = self.sink(extensions=("PIPELINING", "SIZE 10000000"))
        result = await deliver(reactor, [plain.hop()], Envelope("me@here.test", ("a@d.test",)),
                               path, "client.test", timeout_scale=0.02)
        self.assertEqual(result.recipients[0].status, DELIVERED)
        # The base64 ends without a line end; DATA gives it one.
        self.assertEqual(plain.messages[0].content, to_7bit(data) + b"\r\n")
        self.assertGreater(len(to_7bit(data)), CHUNK_SIZE)
        self.assertEqual(made, [path.parent])  # sent from the file beside the message
        self.assertEqual((os.listdir(path.parent), open_there()), (["message"], []))

        def no_room(**kw: Any) -> Any:
            raise OSError(28, "No space left on device")

        self.patch(client.tempfile, "TemporaryFile", no_room)  # memory will do then
        result = await deliver(reactor, [plain.hop()], Envelope("me@here.test", ("a@d.test",)),
                               path, "client.test", timeout_scale=0.02)
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertEqual(plain.messages[1].content, to_7bit(data) + b"\r\n")

    async def test_an_eightbit_body_without_mime_headers_is_made_mime(self) -> None:
        import email
        import email.policy

        plain = self.sink(extensions=("PIPELINING",))
        await self.send([plain.hop()], data="Subject: hi\r\n\r\nçà\r\n".encode())
        sent = plain.messages[0].content
        self.assertTrue(sent.isascii())
        msg = email.message_from_bytes(sent, policy=email.policy.default)
        self.assertEqual(msg.get_content_type(), "text/plain")
        self.assertEqual(msg.get_param("charset"), "unknown-8bit")
        self.assertEqual(msg.get_payload(decode=True), "çà\r\n".encode())

    async def test_dsn_parameters_pass_through_when_offered(self) -> None:
        envelope = Envelope(
            "me@here.test",
            (Recipient("a@d.test", ("SUCCESS", "FAILURE"), "rfc822;A+b@d.test"),),
            ret="HDRS", envid="id 1",
        )
        sink = self.sink(extensions=("PIPELINING", "DSN"))
        result = await self.send([sink.hop()], envelope=envelope)
        self.assertTrue(result.dsn)
        self.assertEqual(sink.commands[1], "MAIL FROM:<me@here.test> RET=HDRS ENVID=id+201")
        self.assertEqual(sink.commands[2],
                         "RCPT TO:<a@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bb@d.test")
        bare = self.sink(extensions=("PIPELINING",))
        result = await self.send([bare.hop()], envelope=envelope)
        self.assertFalse(result.dsn)
        self.assertEqual(bare.commands[2], "RCPT TO:<a@d.test>")

    async def test_control_characters_never_reach_the_wire(self) -> None:
        sink = self.sink()
        result = await self.send([sink.hop()], recipients=("ok@d.test", "x@d.test>\r\nDATA"))
        self.assertEqual([r.status for r in result.recipients], [DELIVERED, PERMANENT])
        self.assertEqual(sent_commands(sink).count("RCPT"), 1)

    # -- hops and connection failures -------------------------------------------------------

    async def test_connection_refused_moves_to_next_hop(self) -> None:
        sink = self.sink()
        dead = Hop("dead.test", "127.0.0.1", closed_port(), 10)
        result = await self.send([dead, sink.hop()])
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertEqual(result.hop, sink.hop())
        self.assertEqual(len(result.attempts), 1)
        self.assertIn("4.4.1", result.attempts[0].error)

    async def test_all_hops_refused_is_temporary(self) -> None:
        dead = [Hop("dead.test", "127.0.0.1", closed_port()) for _ in range(2)]
        result = await self.send(dead, recipients=("a@d.test", "b@d.test"))
        self.assertEqual({r.status for r in result.recipients}, {TEMPORARY})
        self.assertEqual(len(result.attempts), 2)
        self.assertFalse(result.recipients[0].remote)
        self.assertFalse(any(a.answered for a in result.attempts), "no server is up")

    async def test_all_hops_failing_name_each_in_the_recipient_error(self) -> None:
        """The journal and WRKQ show one line: the primary MX's error is in it too."""
        first = Hop("mx10.d.test", "127.0.0.1", closed_port(), 10)
        busy = self.sink(greeting="421 4.3.2 too busy")
        result = await self.send([first, busy.hop()])
        text = result.recipients[0].text
        self.assertTrue(text.startswith("4.4.1 sink.test[127.0.0.1]:"), text)
        self.assertIn(" greeted with: 421 4.3.2 too busy; ", text)
        self.assertIn("; tried before it: 4.4.1 ", text)
        self.assertIn("mx10.d.test", text)

    async def test_greeting_4xx_moves_to_next_hop(self) -> None:
        busy = self.sink(greeting="421 4.3.2 too busy")
        good = self.sink()
        result = await self.send([busy.hop(), good.hop()])
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertIn("421", result.attempts[0].error)
        self.assertTrue(result.attempts[0].answered, "a server that greets is up")
        self.assertEqual(len(good.messages), 1)

    async def test_greeting_5xx_moves_to_next_hop(self) -> None:
        refusing = self.sink(greeting="554 5.3.2 no service")
        good = self.sink()
        result = await self.send([refusing.hop(), good.hop()])
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertEqual(sent_commands(refusing), ["QUIT"])

    async def test_too_many_recipients_552_is_temporary(self) -> None:
        sink = self.sink(rcpt=lambda a: "552 5.5.3 too many" if a.startswith("b") else "250 ok")
        result = await self.send([sink.hop()], recipients=("a@d.test", "b@d.test"))
        self.assertEqual([r.status for r in result.recipients], [DELIVERED, TEMPORARY])

    async def test_recipients_past_a_server_s_limit_go_in_more_transactions_at_once(
            self) -> None:
        """They waited a retry interval per chunk, and bounced past RTYMIN's count."""
        sink = self.sink(max_rcpts=3)
        recipients = tuple(f"m{n}@d.test" for n in range(1, 9))
        result = await self.send([sink.hop()], recipients=recipients)
        self.assertEqual({r.status for r in result.recipients}, {DELIVERED})
        self.assertEqual([m.recipients for m in sink.messages],
                         [list(recipients[0:3]), list(recipients[3:6]), list(recipients[6:])])
        self.assertEqual(sink.connections, 1)
        self.assertEqual(sent_commands(sink).count("QUIT"), 1)

    async def test_a_transaction_that_delivers_to_none_ends_the_round(self) -> None:
        sink = self.sink(max_rcpts=2, end="451 4.3.0 try later")
        result = await self.send([sink.hop()], recipients=("a@d.test", "b@d.test", "c@d.test"))
        self.assertEqual({r.status for r in result.recipients}, {TEMPORARY})
        self.assertEqual(sent_commands(sink).count("MAIL"), 1)
        refusing = self.sink(max_rcpts=0)
        result = await self.send([refusing.hop()], recipients=("a@d.test", "b@d.test"))
        self.assertEqual([r.code for r in result.recipients], [452, 452])
        self.assertEqual(sent_commands(refusing).count("MAIL"), 1)

    async def test_silent_server_times_out(self) -> None:
        silent = self.sink(greeting=None)
        started = time.monotonic()
        result = await self.send([silent.hop()], timeout_scale=0.002)
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertIn("Timed out", result.attempts[0].error)
        self.assertFalse(result.attempts[0].answered)

    async def test_dropped_mid_data_is_temporary(self) -> None:
        sink = self.sink(drop_after=30000)
        data = b"".join(b"line %06d of a long message\r\n" % i for i in range(20000))
        other = self.sink()
        result = await self.send([sink.hop(), other.hop()], data=data,
                                 recipients=("a@d.test", "b@d.test"))
        self.assertEqual({r.status for r in result.recipients}, {TEMPORARY})
        self.assertEqual(sink.messages, [])
        self.assertEqual(other.connections, 0, "a transaction under way is not retried elsewhere")

    async def test_stalled_reader_hits_the_data_block_timeout(self) -> None:
        sink = self.sink(stall_data=3, extensions=("PIPELINING",))
        data = (b"z" * 998 + b"\r\n") * 16000
        started = time.monotonic()
        result = await self.send([sink.hop()], data=data, timeout_scale=0.005)
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertIn("sending the message", result.recipients[0].text)

    # -- TLS ------------------------------------------------------------------------------------

    async def test_starttls_opportunistic(self) -> None:
        sink = self.sink(tls=True)
        result = await self.send([sink.hop()])
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertTrue(result.tls)
        self.assertEqual(sink.tls_sessions, 1)
        self.assertEqual(sent_commands(sink)[:3], ["EHLO", "STARTTLS", "EHLO"])

    async def test_a_5xx_to_ehlo_and_helo_after_starttls_is_temporary(self) -> None:
        """A server whose TLS set-up is broken: mended, it takes the mail.  It must
        not be returned as a refusal, as a 5xx before TLS is at the last hop."""
        sink = self.sink(tls=True, ehlo_after_tls="550 5.7.1 no", helo="550 5.7.1 no")
        result = await self.send([sink.hop()])
        self.assertEqual(result.recipients[0].status, TEMPORARY)

    async def test_opportunistic_without_starttls_goes_plain(self) -> None:
        sink = self.sink()
        result = await self.send([sink.hop()])
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertFalse(result.tls)

    async def test_plaintext_after_starttls_reply_is_refused(self) -> None:
        """Bytes after the 220 to STARTTLS must not be read as TLS-session replies."""
        sink = self.sink(tls=True, starttls_reply="220 2.0.0 go ahead\r\n250 injected")
        other = self.sink()
        result = await self.send([sink.hop(), other.hop()])
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertEqual(result.hop, other.hop())
        self.assertIn("after the 220", result.attempts[0].error)
        self.assertEqual(sink.tls_sessions, 0)

    async def test_opportunistic_goes_on_in_the_clear_after_a_refused_starttls(self) -> None:
        """RFC 3207 §4: after a 454 the session goes on as before STARTTLS."""
        sink = self.sink(tls=True, starttls_reply="454 4.7.0 TLS not available")
        result = await self.send([sink.hop()])
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertFalse(result.tls)
        self.assertEqual(sent_commands(sink)[:3], ["EHLO", "STARTTLS", "MAIL"])
        required = self.sink(tls=True, starttls_reply="454 4.7.0 TLS not available")
        result = await self.send([required.hop()], tls_policy=TLS_REQUIRED)
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertNotIn("MAIL", sent_commands(required))

    async def test_opportunistic_tries_the_hop_again_in_the_clear_after_a_failed_handshake(
            self) -> None:
        """Not the next hop, and not never: mail for a domain whose only MX has a
        broken TLS stack still goes, as opportunistic TLS means."""
        sink = self.sink(tls=True, tls_broken=True)
        said: list[str] = []
        observer = lambda event: said.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        envelope = Envelope("me@here.test", ("a@dest.test",), id="18ece2c5e9680f8d3ee0f7")
        result = await self.send([sink.hop()], envelope=envelope)
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertFalse(result.tls)
        self.assertEqual((sink.tls_failures, len(sink.messages)), (1, 1))
        # The log line names the message, as the journal's entries do.
        [line] = [text for text in said if "without TLS" in text]
        self.assertTrue(line.startswith("18ece2c5e9680f8d3ee0f7: "), line)
        required = self.sink(tls=True, tls_broken=True)
        result = await self.send([required.hop()], tls_policy=TLS_REQUIRED)
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertEqual(required.messages, [])

    async def test_a_reply_whose_lines_change_their_code_is_taken_at_its_last(self) -> None:
        """RFC 5321 §4.2.1 wants one code; a sloppy server is not a destination never reached."""
        sink = self.sink(rcpt=lambda address: "550-5.1.1 this one\r\n551 5.1.1 or that one"
                         if address.startswith("gone") else "250 2.1.5 ok")
        result = await self.send([sink.hop()], recipients=("gone@d.test", "here@d.test"))
        self.assertEqual([(r.status, r.code) for r in result.recipients],
                         [(PERMANENT, 551), (DELIVERED, 250)])
        self.assertEqual(len(sink.messages), 1)

    async def test_required_without_starttls_is_temporary(self) -> None:
        sink = self.sink()
        result = await self.send([sink.hop()], tls_policy=TLS_REQUIRED)
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertIn("STARTTLS", result.recipients[0].text)
        self.assertNotIn("MAIL", sent_commands(sink))

    async def test_required_with_starttls(self) -> None:
        sink = self.sink(tls=True)
        result = await self.send([sink.hop()], tls_policy=TLS_REQUIRED)
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertTrue(result.tls)

    async def test_verify_with_right_name(self) -> None:
        for host in ("localhost", "localhost."):  # a trailing dot is the same name
            sink = self.sink(tls=True)
            result = await self.send([sink.hop(host)], tls_policy=TLS_VERIFY,
                                     trust_root=trust_root())
            self.assertEqual(result.recipients[0].status, DELIVERED)

    async def test_verify_with_wrong_name_is_temporary(self) -> None:
        sink = self.sink(tls=True)
        result = await self.send([sink.hop("mx.wrong.test")], tls_policy=TLS_VERIFY,
                                 trust_root=trust_root())
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertIn("4.7.5", result.recipients[0].text)
        self.assertEqual(sink.messages, [])
        self.assertNotIn("MAIL", sent_commands(sink))

    async def test_verify_untrusted_certificate_is_temporary(self) -> None:
        sink = self.sink(tls=True)
        result = await self.send([sink.hop("localhost")], tls_policy=TLS_VERIFY,
                                 trust_root=tssl.Certificate.loadPEM(_other_ca_pem()))
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertNotIn("MAIL", sent_commands(sink))

    async def test_verify_refuses_a_trusted_certificate_that_names_no_host(self) -> None:
        """Twisted's check logs service_identity's CertificateError (no
        subjectAltName) as a critical error and then goes by OpenSSL's chain
        verdict alone: a certificate of a trusted CA naming no host in a SAN
        passed for any host, and the message went to it."""
        cert, key, ca = leaf_without_names()
        for host in ("mx.wrong.test", "localhost"):
            sink = self.sink(tls=True, tls_pair=(cert, key))
            result = await self.send([sink.hop(host)], tls_policy=TLS_VERIFY,
                                     trust_root=tssl.Certificate.loadPEM(ca))
            self.assertEqual(result.recipients[0].status, TEMPORARY)
            self.assertIn("4.7.5", result.recipients[0].text)
            self.assertIn("cannot be matched to the host name", result.recipients[0].text)
            self.assertNotIn("MAIL", sent_commands(sink))

    # -- AUTH -----------------------------------------------------------------------------------

    async def test_auth_plain_after_starttls(self) -> None:
        sink = self.sink(tls=True, extensions=("PIPELINING",),
                         tls_extensions=("PIPELINING", "AUTH PLAIN LOGIN"),
                         credentials=("jane", "s3cret"))
        result = await self.send([sink.hop()], auth={"sink.test": Credentials("jane", "s3cret")})
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertEqual(sink.auth, ["PLAIN jane"])

    async def test_auth_login(self) -> None:
        sink = self.sink(tls=True, tls_extensions=("AUTH LOGIN",), credentials=("sam", "pw"))
        result = await self.send([sink.hop()], auth=Credentials("sam", "pw"))
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertEqual(sink.auth, ["LOGIN sam"])

    async def test_auth_rejected_is_temporary(self) -> None:
        sink = self.sink(tls=True, tls_extensions=("AUTH PLAIN",), credentials=("sam", "pw"))
        result = await self.send([sink.hop()], auth=Credentials("sam", "wrong"))
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertNotIn("MAIL", sent_commands(sink))

    async def test_no_credentials_over_plaintext(self) -> None:
        sink = self.sink(extensions=("AUTH PLAIN LOGIN",), credentials=("sam", "pw"))
        result = await self.send([sink.hop()], auth=Credentials("sam", "pw"))
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertEqual(sink.auth, [])
        self.assertNotIn("AUTH", sent_commands(sink))

    # -- SMTP smuggling regression (TWISTED.md §2.2) -------------------------------------------

    async def test_no_smuggling_at_chunk_boundaries(self) -> None:
        """Lone-dot lines at and around 16 KiB and 64 KiB never end the message early."""
        sink = self.sink()
        payloads = [b"\r\n.\r\n" + SMUGGLE, b"\n.\n" + SMUGGLE, b"\r\n.\n" + SMUGGLE,
                    b"\n.\r\n" + SMUGGLE, b"\r.\r" + SMUGGLE]
        cases = []
        for boundary in (16384, 65536):
            for delta in range(-4, 5):
                for payload in payloads:
                    # The "." of the payload lands exactly on boundary + delta.
                    dot = payload.index(b".")
                    pad = boundary + delta - dot
                    cases.append(b"Subject: x\r\n\r\n" + b"y" * (pad - 14)
                                 + payload + b".\r\n.\r\ntail")
        for chunk in (16384, 65536):
            for data in cases[:: 1 if chunk == 16384 else 2]:
                start = len(sink.messages)
                result = await self.send([sink.hop()], data=data, chunk_size=chunk)
                self.assertEqual(result.recipients[0].status, DELIVERED)
                self.assertEqual(len(sink.messages), start + 1)
                self.assertEqual(sink.messages[-1].content, normalised(data))
                self.assertIsNone(re.search(rb"\r(?!\n)|(?<!\r)\n", sink.messages[-1].raw))
        self.assertNotIn("smuggled@evil.test", " ".join(sink.commands))
        self.assertEqual(sent_commands(sink).count("MAIL"), len(sink.messages))

    async def test_exact_bytes_on_the_wire(self) -> None:
        sink = self.sink()
        data = b".start\n..two\r\nbare\rcr\r\n.\r\nlast"
        await self.send([sink.hop()], data=data, chunk_size=3)
        self.assertEqual(sink.messages[0].raw,
                         b"..start\r\n...two\r\nbare\r\ncr\r\n..\r\nlast\r\n")

    # -- connection reuse ------------------------------------------------------------------

    async def test_a_kept_connection_carries_the_next_message(self) -> None:
        sink = self.sink()
        cache = SessionCache(reactor, idle=5.0)
        self.addCleanup(cache.close_all)
        for n in range(3):
            result = await self.send([sink.hop()], recipients=(f"r{n}@d.test",), cache=cache)
            self.assertEqual([r.status for r in result.recipients], [DELIVERED])
        self.assertEqual(sink.connections, 1)
        self.assertEqual([m.recipients for m in sink.messages],
                         [["r0@d.test"], ["r1@d.test"], ["r2@d.test"]])
        self.assertEqual(sent_commands(sink), ["EHLO", "MAIL", "RCPT", "DATA",
                                               "RSET", "MAIL", "RCPT", "DATA",
                                               "RSET", "MAIL", "RCPT", "DATA"])
        # The RSET that tests the kept connection goes with the next envelope
        # (RFC 2920): one write, one round trip, per message after the first.
        groups = [n for verb, n in sink.batches if verb in ("RSET", "MAIL", "RCPT", "DATA")]
        self.assertEqual(len(set(groups)), 3)

    async def test_a_refusing_greeting_moves_to_the_next_hop_with_a_cache_too(self) -> None:
        """Client jobs always keep connections: a hop that never opened a
        session was a local error there, and the next hop was not tried."""
        cache = SessionCache(reactor, idle=5.0)
        self.addCleanup(cache.close_all)
        for greeting in ("421 4.3.2 too busy", "554 5.3.2 no service"):
            refusing, good = self.sink(greeting=greeting), self.sink()
            result = await self.send([refusing.hop(), good.hop()], cache=cache)
            self.assertEqual(result.recipients[0].status, DELIVERED)
            self.assertIn(greeting[:3], result.attempts[0].error)
            self.assertEqual(len(good.messages), 1)

    async def test_a_kept_connection_whose_rset_fails_is_replaced_without_a_try(self) -> None:
        sink = self.sink()
        cache, session = await self.kept_session(sink)
        sink.behaviour.rset = "421 4.3.2 shutting down"
        result = await self.send([sink.hop()], recipients=("b@d.test",), cache=cache)
        self.assertEqual([r.status for r in result.recipients], [DELIVERED])
        self.assertEqual(sink.connections, 2)
        self.assertEqual([m.recipients for m in sink.messages], [["a@dest.test"], ["b@d.test"]])
        self.assertTrue(session.lost)

    async def test_a_session_the_server_closes_with_421_is_not_kept(self) -> None:
        """RFC 5321 §3.8: 421 closes the channel.  After a 421 to the end of the
        data, the job sent the next message on the same connection."""
        sink = self.sink(end="421 4.3.2 shutting down")
        cache = SessionCache(reactor, idle=5.0)
        self.addCleanup(cache.close_all)
        result = await self.send([sink.hop()], cache=cache)
        self.assertEqual([r.status for r in result.recipients], [TEMPORARY])
        self.assertEqual(cache._kept, {})
        sink.behaviour.end = "250 2.0.0 queued"
        result = await self.send([sink.hop()], recipients=("b@d.test",), cache=cache)
        self.assertEqual([r.status for r in result.recipients], [DELIVERED])
        self.assertEqual(sink.connections, 2)

    async def test_a_reply_with_two_codes_is_a_protocol_error(self) -> None:
        """RFC 5321 §4.2.1: "250-ok" then "550 no" was a permanent refusal."""
        sink = self.sink(mail="250-ok\r\n550 5.0.0 but no")
        result = await self.send([sink.hop()])
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertIn("reply lines with codes 250 and 550", result.recipients[0].text)

    async def test_a_reply_before_the_final_dot_is_no_acceptance(self) -> None:
        """A 250 sent with the 354, then a 554 to the dot: taken as the reply to
        the dot, it made the message delivered while the server refused it."""
        sink = self.sink(data="354 go\r\n250 2.0.0 early ok", end="554 5.7.1 rejected after all")
        result = await self.send([sink.hop()])
        self.assertEqual(result.recipients[0].status, TEMPORARY)
        self.assertIn("a positive reply before the end of the message", result.recipients[0].text)

    async def test_a_refusal_before_the_final_dot_is_the_reply_to_the_message(self) -> None:
        """552 sent as soon as the server saw the message was too big: the
        server's word on it, not a protocol error to retry with the whole body."""
        sink = self.sink(data="354 go\r\n552 5.3.4 too big", end="250 2.0.0 queued anyway")
        result = await self.send([sink.hop()])
        self.assertEqual((result.recipients[0].status, result.recipients[0].code),
                         (PERMANENT, 552))

    async def test_a_reply_shorter_than_a_code_is_a_protocol_error(self) -> None:
        for end in ("25", "650 what"):
            sink = self.sink(end=end)
            result = await self.send([sink.hop()])
            self.assertEqual(result.recipients[0].status, TEMPORARY)
            self.assertIn("malformed reply line", result.recipients[0].text)

    async def kept_session(self, sink: Any) -> tuple[SessionCache, Any]:
        """A cache holding the session of one delivery to ``sink``, and that session."""
        cache = SessionCache(reactor, idle=5.0)
        self.addCleanup(cache.close_all)
        await self.send([sink.hop()], cache=cache)
        [(session, _, _)] = cache._kept.values()
        return cache, session

    async def test_a_connection_the_server_closed_meanwhile_is_replaced(self) -> None:
        sink = self.sink()
        cache, session = await self.kept_session(sink)
        session.transport.loseConnection()  # as a server's idle timeout would
        await session.closed
        result = await self.send([sink.hop()], cache=cache)
        self.assertEqual([r.status for r in result.recipients], [DELIVERED])
        self.assertEqual(sink.connections, 2)
        self.assertEqual(len(sink.messages), 2)

    async def test_a_peer_that_spoke_while_idle_gets_a_new_connection(self) -> None:
        sink = self.sink()
        cache, session = await self.kept_session(sink)
        session.dataReceived(b"250 2.0.0 nobody asked\r\n")  # would shift every reply
        result = await self.send([sink.hop()], recipients=("b@d.test",), cache=cache)
        self.assertEqual([r.status for r in result.recipients], [DELIVERED])
        self.assertEqual(sink.connections, 2)
        self.assertEqual(sink.messages[-1].recipients, ["b@d.test"])

    async def test_a_broken_session_is_not_kept_and_idle_ones_quit(self) -> None:
        sink = self.sink(drop_after=10)
        cache = SessionCache(reactor, idle=0.05)
        result = await self.send([sink.hop()], cache=cache)
        self.assertEqual([r.status for r in result.recipients], [TEMPORARY])
        self.assertEqual(cache._kept, {})  # dropped in DATA: nothing to reuse
        good = self.sink()
        await self.send([good.hop()], cache=cache)
        self.assertEqual(len(cache._kept), 1)
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(cache._kept, {})
        self.assertEqual(sent_commands(good)[-1], "QUIT")  # the idle one said goodbye

    async def test_large_message_streams(self) -> None:
        sink = self.sink()
        line = b"0123456789" * 9 + b"\r\n"
        data = line * 40000 + b".\r\n" + line
        result = await self.send([sink.hop()], data=data)
        self.assertEqual(result.recipients[0].status, DELIVERED)
        self.assertEqual(sink.messages[0].content, data)


@cache
def _other_ca_pem() -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Other CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_client_job_s_reload_leaves_no_resolver_behind(tmp_path):
    """Each settings reload (every CHGPJE or CHGSMTPA) made the client job a
    new deliverer; the old one's resolver re-read resolv.conf every minute for
    ever and was never freed: about 4 KB and one timer per reload."""
    from appliance import base_sections, render_toml
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from twistmail import config as configmod
    from twistmail.prestart.job import Job

    config = tmp_path / "twistmail.toml"
    config.write_text(render_toml(base_sections(tmp_path / "var")))
    clock = Clock()
    job = Job(clock, "QTMSCCLCP", configmod.load(config), source=str(config))
    timers = len(clock.getDelayedCalls())
    directory = job.directory()
    for _ in range(5):
        job.reconfigure()
    assert len(clock.getDelayedCalls()) == timers
    # One directory for the job's life: each holds a connection in every pool thread.
    assert job.deliverer.directory is directory
    # A deliverer in use when a reload replaces it is closed when its task ends.
    running: defer.Deferred = defer.Deferred()
    busy = job.deliverer
    busy.run = lambda payload, part=None: running
    job.done = lambda line: None
    job.run_task("T1", b"{}")
    job.reconfigure()
    assert busy.resolver.resolver._parseCall.active()
    running.callback(b"OK")
    assert not busy.resolver.resolver._parseCall.active()
    assert len(clock.getDelayedCalls()) == timers


def test_replies_nobody_reads_are_bounded_in_bytes() -> None:
    """A server that sent a thousand replies of 200 long lines each after the
    end of data grew a client job to 1.1 GB, kept until MAXUSE ended it."""
    from twisted.internet.testing import StringTransport

    from twistmail.smtp.client import MAX_QUEUED_BYTES, MAX_REPLY_BYTES, _Session

    class Transport(StringTransport):
        def setTcpNoDelay(self, enabled: bool) -> None:
            pass

    session = _Session(reactor)
    session.makeConnection(Transport())
    reply = b"".join(b"250-" + b"x" * 4000 + b"\r\n" for _ in range(15)) + b"250 z\r\n"
    for _ in range(200):
        session.dataReceived(reply)
        if session.error is not None:
            break
    assert session.error is not None and "too many unsolicited replies" in str(session.error)
    assert session.queued_bytes <= MAX_QUEUED_BYTES
    assert sum(len(t) for r in session.replies for t in r.text) <= MAX_QUEUED_BYTES

    session = _Session(reactor)
    session.makeConnection(Transport())
    session.dataReceived(b"250-" + b"y" * 4000 + b"\r\n")
    session.dataReceived(b"".join(b"250-" + b"y" * 4000 + b"\r\n" for _ in range(100)))
    assert session.error is not None and "reply too long" in str(session.error)
    assert session.partial_bytes <= MAX_REPLY_BYTES + 4100
