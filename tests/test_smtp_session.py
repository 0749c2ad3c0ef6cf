"""The SMTP command layer as a state machine (StringTransport + Clock).

Each defect reproduced in Twisted's stock ESMTP class has a regression test
here: out-of-order pipelined replies with asynchronous checks, DATA desync on
long lines, unbounded buffers, and bare CR/LF passed through or taken as the
end of data (SMTP smuggling).
"""

from __future__ import annotations

import re
import types

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twistmail.protocols.sequential import CLOSE_GRACE
from twistmail.smtp import server
from twistmail.smtp.server import Received, SMTPFactory, SMTPSession, Verdict


@attrs.define
class FakeSpool:
    id: str
    chunks: list[bytes] = attrs.field(factory=list)
    aborted: bool = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def abort(self) -> None:
        self.aborted = True

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class FakeBackend:
    hostname = "mail.example.test"

    def __init__(self) -> None:
        self.spools: list[FakeSpool] = []
        self.queued: list[tuple[FakeSpool, Received]] = []
        self.pending_rcpt: list[defer.Deferred] = []
        self.pending_commit: list[defer.Deferred] = []
        self.async_rcpt = False
        self.async_commit = False
        self.full = False
        self.refusals: list[tuple[str, str, int]] = []
        self.limits: list[tuple[str, str]] = []

    def storage_full(self) -> bool:
        return self.full

    def rejected(self, client_ip, what, address, verdict, argument=None):
        self.refusals.append((what, address if argument is None else argument, verdict.code))
        return verdict

    def limit_reached(self, client_ip, setting):
        self.limits.append((client_ip, setting))

    def authenticate(self, user, password, client_ip, authzid=""):
        if authzid.lower() not in ("", "sam", "sam@example.test"):
            return None
        return "SAM" if (user, password) == ("sam", "secret") else None

    revoked: frozenset = frozenset()

    def signs_on(self, usrprf):
        return usrprf not in self.revoked

    dsn_trusted = True

    def dsn_allowed(self, client_ip):
        return self.dsn_trusted

    def check_recipient(self, address, client_ip, user=None, server_ip=None):
        if address.domain_key == "remote.test":
            v = Verdict(250, "2.1.5 Ok, relayed", local=False)
        elif address.domain_key not in ("example.test", ""):
            v = Verdict(550, "5.7.1 Relaying denied")
        elif address.local.startswith("nobody"):
            v = Verdict(550, "5.1.1 Mailbox unknown")
        else:
            v = Verdict(250, "2.1.5 Recipient OK")
        if self.async_rcpt:
            d = defer.Deferred()
            self.pending_rcpt.append((d, v))
            return d
        return v

    def new_spool(self, originator="", recipients=()):
        s = FakeSpool(f"q{len(self.spools) + 1}")
        self.spools.append(s)
        return s

    def commit(self, spool, received):
        self.queued.append((spool, received))
        if self.async_commit:
            d = defer.Deferred()
            self.pending_commit.append((d, spool.id))
            return d
        return spool.id

    def release(self) -> None:
        while self.pending_rcpt:
            d, v = self.pending_rcpt.pop(0)
            d.callback(v)
        while self.pending_commit:
            d, qid = self.pending_commit.pop(0)
            d.callback(qid)


class Session:
    def __init__(self, **kw) -> None:
        self.backend = FakeBackend()
        self.clock = Clock()
        self.done = 0
        opts = dict(maxmsgsize=10_000, maxrcpt=3, inacttimo=300, alwbarelf=False,
                    mime8bit=True)
        opts.update(kw)
        self.factory = SMTPFactory(self.backend, self.clock, on_done=self._done, **opts)
        self.proto = self.factory.buildProtocol(None)
        self.tr = StringTransport(peerAddress=_Peer("192.0.2.7"))
        self.proto.makeConnection(self.tr)

    def _done(self) -> None:
        self.done += 1

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)
        self.clock.advance(0)  # run what waits zero seconds (error_delay=0)

    def replies(self) -> list[str]:
        out = self.tr.value().decode()
        self.tr.clear()
        return [line for line in out.split("\r\n") if line]

    def codes(self) -> list[int]:
        return [int(r[:3]) for r in self.replies() if r[3] == " "]

    def start(self) -> None:
        self.replies()
        self.send(b"EHLO client.example\r\n")
        self.replies()


@attrs.frozen
class _Peer:
    host: str
    port: int = 4242


def test_greeting_and_ehlo_extensions():
    s = Session()
    assert s.replies() == ["220 mail.example.test ESMTP twistmail service ready"]
    s.send(b"EHLO client.example\r\n")
    r = s.replies()
    assert r[0] == "250-mail.example.test"
    assert set(r[1:]) >= {"250-PIPELINING", "250-SIZE 10000", "250-8BITMIME",
                          "250-ENHANCEDSTATUSCODES"}
    assert r[-1].startswith("250 ")


def test_whole_transaction_adds_trace_and_missing_headers():
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<jane@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    assert s.codes() == [250, 250, 354]
    s.send(b"Subject: hi\r\n\r\nHello\r\n..dot\r\n.\r\n")
    r = s.replies()
    assert r == ["250 2.0.0 Ok: queued as q1"]
    spool, rec = s.backend.queued[0]
    body = spool.body
    assert body.startswith(b"Received: from client.example ([192.0.2.7])\r\n\tby "
                           b"mail.example.test (twistmail) with ESMTP id q1\r\n\tfor "
                           b"<sam@example.test>;\r\n\t")
    head, _, text = body.partition(b"\r\n\r\n")
    assert b"\r\nSubject: hi\r\n" in head + b"\r\n"
    assert b"\r\nMessage-ID: <q1@mail.example.test>" in head
    assert b"\r\nDate: " in head
    assert text == b"Hello\r\n.dot\r\n"
    assert rec.originator == "jane@example.test"
    assert rec.recipients == (("sam@example.test", True),)
    assert rec.message_id == "<q1@mail.example.test>"


def test_a_remote_mailbox_given_twice_is_sent_once_without_the_root_s_dot():
    """Each spelling went to the next hop, one of them with a trailing dot,
    which RFC 5321 does not allow and a next hop may refuse."""
    s = Session(maxrcpt=10, dsn=True)
    s.start()
    s.send(b"MAIL FROM:<jane@example.test>\r\n")
    for rcpt in (b"dup@remote.test", b"dup@REMOTE.TEST", b"dup@remote.test.", b"Dup@remote.test",
                 b"sam@example.test.", b"sam@example.test"):
        s.send(b"RCPT TO:<" + rcpt + b"> NOTIFY=NEVER\r\n")
    s.send(b"DATA\r\nSubject: hi\r\n\r\nHello\r\n.\r\n")
    assert s.codes() == [250] * 7 + [354, 250]
    _, rec = s.backend.queued[0]
    assert rec.recipients == (("dup@remote.test", False), ("Dup@remote.test", False),
                              ("sam@example.test", True), ("sam@example.test", True))
    assert [to for to, _, _ in rec.dsn] == [to for to, _ in rec.recipients]


def test_existing_message_id_and_date_are_kept():
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n"
           b"Message-ID: <abc@x>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb\r\n.\r\n")
    assert s.codes()[-1] == 250
    body = s.backend.queued[0][0].body
    assert body.count(b"Message-ID") == 1 and body.count(b"Date:") == 1
    assert s.backend.queued[0][1].message_id == "<abc@x>"
    assert s.backend.queued[0][1].originator == ""


def test_pipelined_replies_stay_in_order_with_async_checks():
    s = Session()
    s.start()
    s.backend.async_rcpt = True
    s.send(b"MAIL FROM:<jane@example.test>\r\nRCPT TO:<sam@example.test>\r\n"
           b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    assert s.codes() == [250]  # the rest waits behind the first RCPT check
    s.backend.release()
    while s.backend.pending_rcpt:
        s.backend.release()
    assert s.codes() == [250, 550, 250, 354]
    s.send(b"x\r\n.\r\nQUIT\r\n")
    assert s.codes() == [250, 221]
    assert [a for a, _ in s.backend.queued[0][1].recipients] == ["sam@example.test",
                                                                 "bob@example.test"]


def test_250_only_after_durable_commit_and_pipelined_next_transaction_waits():
    s = Session()
    s.start()
    s.backend.async_commit = True
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.replies()
    s.send(b"body\r\n.\r\nMAIL FROM:<b@example.test>\r\nRCPT TO:<sam@example.test>\r\n")
    assert s.replies() == []  # no 250 before the commit
    s.backend.release()
    assert s.codes() == [250, 250, 250]


def test_commit_failure_is_451_and_spool_aborted():
    s = Session()
    s.start()

    def fail(spool, received):
        raise OSError("disk on fire")

    s.backend.commit = fail
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\nx\r\n.\r\n")
    assert s.codes() == [250, 250, 354, 451]
    assert s.backend.spools[0].aborted


@pytest.mark.parametrize(
    "payload",
    [
        b"a\r\n\n.\n\r\nb\r\n",  # <LF>.<LF>
        b"a\r\n\n.\r\nb\r\n",  # <LF>.<CRLF>
        b"a\r\n\r.\r\nb\r\n",  # <CR>.<CRLF>
        b"a\r\n.\rMAIL\r\n",  # <CRLF>.<CR>
        b"a\n.\nMAIL\r\n",  # bare LFs around a dot
    ],
)
def test_smuggling_bare_cr_lf_never_end_data(payload):
    """A second message hidden behind a non-standard terminator is not accepted."""
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.replies()
    s.send(payload + b"MAIL FROM:<evil@example.test>\r\nRCPT TO:<sam@example.test>\r\n"
           b"DATA\r\nsmuggled\r\n.\r\n")
    # All of it is one message, rejected for the bare CR/LF; nothing is queued.
    assert s.codes() == [550]
    assert s.backend.queued == []
    assert s.backend.spools[0].aborted


def test_bare_lf_accepted_with_alwbarelf_but_never_ends_data():
    s = Session(alwbarelf=True)
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.replies()
    s.send(b"Subject: x\n\nline one\n.\nstill data\r\n.\r\n")
    assert s.codes() == [250]
    body = s.backend.queued[0][0].body
    assert body.endswith(b"\r\nline one\r\n.\r\nstill data\r\n")
    assert b"\n\n" not in body.replace(b"\r\n", b"")


def test_bare_cr_rejected_even_with_alwbarelf():
    s = Session(alwbarelf=True)
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.replies()
    s.send(b"a\rb\r\n.\r\n")
    assert s.codes() == [550]


def test_long_text_line_does_not_desync_data():
    """Twisted's ESMTP lost its place after a long line; the tail here is never a command."""
    s = Session(maxmsgsize=10_000_000)
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.replies()
    s.send(b"x" * 5000)
    s.send(b".\r\nQUIT\r\n")  # the tail "x.": not the end of data
    assert s.replies() == []
    s.send(b"more\r\n.\r\n")
    # After the data, a reply RFC 5321 §4.3.2 allows there (not 500, a command error).
    assert s.replies() == ["550 5.6.0 Message has a line longer than 1000 octets "
                           "(RFC 5321 4.5.3.1.6)"]
    assert s.backend.queued == []
    s.send(b"NOOP\r\n")
    assert s.codes() == [250]


def test_text_line_of_exactly_1000_octets_is_fine():
    s = Session(maxmsgsize=10_000_000)
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.replies()
    s.send(b"\r\n" + b"y" * 998 + b"\r\n.\r\n")
    assert s.codes() == [250]
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.replies()
    s.send(b"\r\n" + b"y" * 999 + b"\r\n.\r\n")
    assert s.codes() == [550]


def test_the_dot_doubled_for_transparency_does_not_count_in_the_line_limit():
    """RFC 5321 §4.5.3.1.6: 1000 octets "not counting the leading dot
    duplicated for transparency"; such a line was refused 550 5.6.0."""
    s = Session(maxmsgsize=10_000_000)
    s.start()
    for pipelined_after in (b"", b"MAIL FROM:<a@example.test>\r\n"):  # block and line paths
        s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
        s.replies()
        s.send(b"\r\n.." + b"y" * 997 + b"\r\n.\r\n" + pipelined_after)
        assert s.codes()[0] == 250
        assert s.backend.queued[-1][0].body.endswith(b"\r\n." + b"y" * 997 + b"\r\n")
        s.send(b"RSET\r\n")
        s.replies()


def test_long_command_line_is_refused_and_stream_stays_in_sync():
    s = Session()
    s.start()
    s.send(b"NOOP " + b"a" * 600 + b"\r\nNOOP\r\n")
    assert s.codes() == [500, 250]
    s.send(b"X" * 100_000)  # no line end at all: bounded, one reply
    assert s.codes() == [500]
    assert len(s.proto.buffer) <= 512
    s.send(b"tail\r\nNOOP\r\n")
    assert s.codes() == [250]


def test_dsn_and_auth_parameters_lengthen_mail_and_rcpt_lines():
    """RFC 3461 §4: +500 for RCPT's NOTIFY and ORCPT; MAIL gets ENVID, RET, SIZE, AUTH=."""
    s = Session(dsn=True, maxmsgsize=100_000)
    s.start()
    local = b"a" * 64
    s.send(b"MAIL FROM:<" + local + b"@example.test> RET=HDRS ENVID=" + b"e" * 100
           + b" SIZE=1000\r\n")
    assert s.codes() == [250]
    rcpt = local + b"@" + b"d" * 180 + b".example.test"
    line = (b"RCPT TO:<" + rcpt + b"> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;" + rcpt
            + b"\r\n")
    assert 512 < len(line) <= 1012
    s.send(line)
    assert s.codes()[0] != 500
    s.send(b"RCPT TO:<a@example.test> ORCPT=rfc822;" + b"x" * 1000 + b"\r\n")
    assert s.codes() == [500]
    s.send(b"NOOP " + b"a" * 600 + b"\r\n")
    assert s.codes() == [500]


def test_dsn_is_offered_on_port_25_only_to_clients_whose_requests_are_carried_out():
    """Offered and then ignored, a NOTIFY=SUCCESS was lost: the client that
    sees no DSN sends the "relayed" notice itself (RFC 3461 §4.1)."""
    for trusted, listener, offered in ((True, "smtp", True), (False, "smtp", False),
                                       (False, "submission", True)):
        s = Session(dsn=True, listener=listener, alwplainauth=True)
        s.backend.dsn_trusted = trusted
        s.replies()
        s.send(b"EHLO client.example\r\n")
        assert any(r[4:] == "DSN" for r in s.replies()) is offered, (trusted, listener)


def test_the_systems_own_452_is_not_held_against_the_client():
    """Storage short for a while: a client trying again is neither slowed down nor cut off."""
    s = Session(maxerrors=5)
    s.start()
    s.backend.full = True
    for _ in range(12):
        s.send(b"MAIL FROM:<jane@example.test>\r\nRSET\r\n")
        assert s.codes() == [452, 250]
    s.backend.full = False
    s.send(b"MAIL FROM:<jane@example.test>\r\n")
    assert s.codes() == [250]


def test_the_recipient_limit_is_not_held_against_the_client():
    """452 4.5.3 at MAXRCPT asks for the rest in another transaction (RFC 5321
    §4.5.3.1.10); counted as an error, a client that did so was slowed down
    from the third message and cut off at the tenth."""
    s = Session(maxerrors=5, maxrcpt=2)
    s.start()
    for _ in range(12):
        s.send(b"MAIL FROM:<jane@example.test>\r\nRCPT TO:<sam@example.test>\r\n"
               b"RCPT TO:<joe@example.test>\r\nRCPT TO:<ann@example.test>\r\nRSET\r\n")
        assert s.codes() == [250, 250, 250, 452, 250]
    assert s.proto.errors == 0


def test_a_message_accepted_starts_the_error_count_afresh():
    """An MTA keeping its connection for many messages, each with a stale
    address, was slowed down from the third and cut off at the tenth."""
    s = Session(maxerrors=3, error_delay=0)
    s.start()
    for _ in range(6):
        s.send(b"MAIL FROM:<list@example.test>\r\nRCPT TO:<sam@example.test>\r\n"
               b"RCPT TO:<nobody1@example.test>\r\nRCPT TO:<joe@example.test>\r\n"
               b"DATA\r\n")
        s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        assert s.codes() == [250, 250, 550, 250, 354, 250]
        s.send(b"BOGUS\r\n")  # and one more error of another kind
        assert s.codes() == [500]
    for _ in range(2):  # without a message, they still add up
        s.send(b"RCPT TO:<nobody@example.test>\r\n")
    assert s.codes() == [503, 503, 421]


def test_guesses_are_not_wiped_out_by_a_cheap_message():
    """A harvester sending one message to a known address for every few
    guessed ones went on for ever once a message started the count afresh."""
    s = Session(maxerrors=5, error_delay=0)
    s.start()
    codes = []
    for n in range(5):
        s.send(b"MAIL FROM:<h@harvest.example>\r\nRCPT TO:<sam@example.test>\r\n"
               b"RCPT TO:<SAM@example.test>\r\n"  # the same known one again makes up for none
               + f"RCPT TO:<nobody{n}a@example.test>\r\n".encode()
               + f"RCPT TO:<nobody{n}b@example.test>\r\nDATA\r\n".encode())
        s.send(b"\r\nhi\r\n.\r\n")
        codes += s.codes()
        if s.proto.closing:
            break
    assert codes[-1] == 421 and n < 4


def test_a_session_kept_open_with_noop_alone_ends():
    """NOOP, RSET, VRFY and HELP past JUNK_LIMIT count as errors, until a message goes."""
    from twistmail.smtp.server import JUNK_LIMIT

    s = Session(maxerrors=3, error_delay=0)
    s.start()  # its EHLO is the first
    s.send(b"NOOP\r\n" * (JUNK_LIMIT - 1))
    assert s.codes() == [250] * (JUNK_LIMIT - 1) and s.proto.errors == 0
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n"
           b"\r\nhi\r\n.\r\n")
    assert s.codes() == [250, 250, 354, 250]
    s.send(b"RSET\r\n" * JUNK_LIMIT)  # afresh after the message
    assert s.codes() == [250] * JUNK_LIMIT
    s.send(b"VRFY sam\r\nEHLO c.example\r\nNOOP\r\n")
    assert s.codes() == [252, 250, 421] and s.proto.closing


def test_input_is_bounded_while_a_check_is_pending(monkeypatch):
    # RCPT past MAXRCPT (452 4.5.3, no error up to RCPT_OVERSHOOT), not NOOP:
    # a flood of NOOP is junk (JUNK_LIMIT) and would end the session.
    monkeypatch.setattr(server, "RCPT_OVERSHOOT", 10**6)
    s = Session()
    s.start()
    s.backend.async_rcpt = True
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\n")
    s.replies()
    for _ in range(100):
        s.send(b"RCPT TO:<sam@example.test>\r\n" * 200)
    assert s.tr.producerState == "paused"
    s.backend.release()
    assert s.tr.producerState == "producing"
    assert len(s.codes()) == 1 + 20_000


def test_size_limits():
    s = Session(maxmsgsize=1000)
    s.start()
    s.send(b"MAIL FROM:<a@example.test> SIZE=5000\r\n")
    assert s.replies() == ["552 5.3.4 Message size exceeds fixed maximum message size"]
    s.send(b"MAIL FROM:<a@example.test> SIZE=500\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    assert s.codes() == [250, 250, 354]
    s.send((b"z" * 100 + b"\r\n") * 20 + b".\r\n")
    assert s.replies() == ["552 5.3.4 Message size exceeds fixed maximum message size"]
    assert s.backend.queued == [] and s.backend.spools[0].aborted


def test_a_header_block_over_1_mib_is_refused_and_the_session_goes_on():
    # Past the bound the added fields and the hops could not be decided:
    # before, a Message-ID and Date went in the middle and the hops went uncounted.
    s = Session(maxmsgsize=10 * 1024 * 1024)
    s.start()
    pad = b"".join(b"X-Pad-%05d: " % i + b"p" * 86 + b"\r\n" for i in range(11000))
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.send(b"Subject: x\r\n" + pad + b"Message-ID: <late@x>\r\n\r\nbody\r\n.\r\n")
    assert s.replies()[-1] == "552 5.3.4 Message header exceeds 1048576 octets"
    assert s.backend.queued == [] and s.backend.spools[0].aborted
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n"
           b"Subject: y\r\n\r\nb\r\n.\r\n")
    assert s.codes()[-4:] == [250, 250, 354, 250]


@pytest.mark.parametrize("name", [b"mail.example.test", b"my_pc", b"192.0.2.1",
                                  b"scanner@corp.example",  # some devices send an address
                                  b"[192.0.2.1]", b"[IPv6:2001:db8::1]", b"localhost."])
def test_helo_names_of_real_clients_are_taken(name):
    s = Session()
    s.replies()
    s.send(b"EHLO " + name + b"\r\nMAIL FROM:<a@b.test>\r\n")
    assert s.codes() == [250, 250], name


def test_a_return_path_the_client_wrote_does_not_reach_the_mailbox():
    """RFC 5321 §4.4: the Return-Path delivery writes is the only one; one the
    client wrote (a forged sender) went on below it."""
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n"
           b"Return-Path: <forged@bank.test>\r\nSubject: s\r\nreturn-path :\r\n"
           b" <folded@bank.test>\r\nDelivered-To: sam@example.test\r\n\r\nb\r\n.\r\n")
    assert s.codes() == [250, 250, 354, 250]
    body = s.backend.spools[0].body
    assert b"bank.test" not in body and b"eturn-path" not in body.lower()
    assert b"\r\nSubject: s\r\nDelivered-To: sam@example.test\r\n" in body


def test_recipients_far_past_maxrcpt_count_as_errors():
    """452 4.5.3 is no fault of the client's (it sends the rest in another
    transaction), but a session sending RCPT for ever delivered nothing and
    held its job: past RCPT_OVERSHOOT each one is an error, up to MAXERRORS."""
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<sam@example.test>\r\n" * 3)
    assert s.codes() == [250, 250, 250, 250]
    s.send(b"RCPT TO:<sam@example.test>\r\n" * server.RCPT_OVERSHOOT)
    assert s.codes() == [452] * server.RCPT_OVERSHOOT and not s.proto.closing
    for _ in range(100):
        s.send(b"RCPT TO:<sam@example.test>\r\n")
        s.clock.advance(60)
        if s.proto.closing:
            break
    replies = s.replies()
    assert s.proto.closing and replies[-1].startswith("421 4.7.0 ")


def test_an_unsupported_parameter_is_named_in_a_reply_of_at_most_512_octets():
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<a@b.test> " + b"X" * 1100 + b"\r\n")
    [reply] = s.replies()
    assert reply.startswith("555 5.5.4 Unsupported parameter XXX") and len(reply) + 2 <= 512


def test_an_empty_message_id_or_date_is_replaced():
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n"
           b"Message-ID:\r\nDate: \r\n \r\nSubject: empty\r\n\r\nb\r\n.\r\n")
    assert s.codes()[-1] == 250
    spool, rec = s.backend.queued[0]
    head = spool.body.partition(b"\r\n\r\n")[0]
    assert head.count(b"Message-ID:") == 1 and head.count(b"Date:") == 1
    assert b"\r\nSubject: empty\r\nMessage-ID: <q1@mail.example.test>\r\nDate: " in head
    assert rec.message_id == "<q1@mail.example.test>"


def test_a_folded_message_id_is_kept_and_named():
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n"
           b"Message-ID:\r\n <abc@x>\r\nDate: Mon, 1 Jan 2024\r\n 00:00:00 +0000\r\n\r\nb\r\n.\r\n")
    spool, rec = s.backend.queued[0]
    assert rec.message_id == "<abc@x>"
    assert spool.body.endswith(b"\r\nMessage-ID:\r\n <abc@x>\r\nDate: Mon, 1 Jan 2024\r\n"
                               b" 00:00:00 +0000\r\n\r\nb\r\n")


def test_a_message_in_a_mail_loop_is_refused_554_5_4_6():
    s = Session()
    s.start()
    trace = b"".join(b"Received: from hop%d.example.test by mail\r\n" % i for i in range(99))
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.send(trace + b"Subject: 99 hops\r\n\r\nstill fine\r\n.\r\n")
    assert s.codes() == [250, 250, 354, 250]  # RFC 5321 §6.3: at least 100
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.send(b"Received: from hop.example.test by mail\r\n" + trace
           + b"Subject: 100 hops\r\n\r\nlooping\r\n.\r\n")
    assert s.replies()[-1].startswith("554 5.4.6 Too many hops: 100 Received:")
    assert len(s.backend.queued) == 1 and s.backend.spools[-1].aborted


def test_recipient_limit_and_routing_replies():
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\n")
    s.send(b"RCPT TO:<x@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\n")
    assert s.codes() == [250, 550, 550]
    s.send(b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(4)))
    assert s.codes() == [250, 250, 250, 452]


def test_sequence_errors_and_syntax():
    s = Session(error_delay=0, maxerrors=100)
    s.replies()
    s.send(b"MAIL FROM:<a@example.test>\r\n")
    assert s.codes() == [503]
    s.send(b"HELO\r\nEHLO x\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    assert s.codes() == [501, 250, 503, 503]
    s.send(b"MAIL FROM:a@example.test\r\nMAIL FROM:<a@example.test> FOO=1\r\n")
    assert s.codes() == [501, 555]
    s.send(b"MAIL FROM:<a@example.test>\r\nMAIL FROM:<b@example.test>\r\nDATA\r\n")
    assert s.codes() == [250, 503, 554]
    s.send(b"RSET\r\nVRFY sam\r\nEXPN staff\r\nTURN\r\nBOGUS\r\nHELP\r\nNOOP\r\n")
    assert s.codes() == [250, 252, 502, 502, 500, 214, 250]
    s.send(b"RCPT TO:<postmaster>\r\n")
    assert s.codes() == [503]


def test_storage_full_answers_452_at_mail():
    s = Session()
    s.start()
    s.backend.full = True
    s.send(b"MAIL FROM:<a@example.test>\r\n")
    assert s.replies() == ["452 4.3.1 Insufficient system storage, try again later"]


def test_idle_timeout_421():
    s = Session(inacttimo=60)
    s.start()
    s.clock.advance(59)
    s.send(b"NOOP\r\n")
    s.clock.advance(59)
    assert s.codes() == [250]
    s.clock.advance(2)
    assert s.replies()[0].startswith("421 4.4.2 ")
    assert s.tr.disconnecting


def test_bytes_that_never_make_a_command_do_not_hold_off_the_timeout():
    """A byte every little while is not activity: only a command (or message text) is."""
    s = Session(inacttimo=60)
    s.start()
    for _ in range(5):
        s.clock.advance(20)
        s.send(b"N")
        if s.tr.disconnecting:
            break
    assert s.replies()[0].startswith("421 4.4.2 ")
    assert s.tr.disconnecting


def test_a_slow_message_text_is_activity():
    """Slow but steady (600 octets a second): each line keeps the session."""
    s = Session(inacttimo=60, maxmsgsize=10**6)
    s.start()
    s.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    for _ in range(8):
        s.clock.advance(50)
        s.send((b"x" * 998 + b"\r\n") * 30)
    s.send(b".\r\n")
    assert s.codes() == [250, 250, 354, 250] and not s.tr.disconnecting


def test_a_fast_client_whose_message_was_refused_early_still_gets_the_refusal():
    """The pace was judged on the octets kept: once a message failed (a bare
    LF, a long line, too big) none were, and a client sending at full speed
    got 421 4.4.2 instead of its 5xx, and sent the whole message again."""
    s = Session(inacttimo=60, maxmsgsize=10**6)
    s.start()
    s.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n"
           b"Subject: bare\nLF\r\n")
    for _ in range(40):
        s.clock.advance(10)
        s.send((b"x" * 998 + b"\r\n") * 20)  # 2000 octets a second
        assert not s.tr.disconnecting
    s.send(b".\r\n")
    assert s.codes() == [250, 250, 354, 550]


def test_a_trickle_of_message_text_ends_the_session():
    """A line every 50 s, INACTTIMO 60: it held a job for as long as the client
    liked, and twenty such clients held every job of the pool."""
    s = Session(inacttimo=60)
    s.start()
    s.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    for _ in range(10):
        s.clock.advance(50)
        if s.tr.disconnecting:
            break
        s.send(b"a line of text\r\n")
    replies = s.replies()
    assert [int(r[:3]) for r in replies] == [250, 250, 354, 421]
    assert replies[-1].startswith("421 4.4.2 ")
    assert s.clock.seconds() <= 2 * 60 + 50  # the grace, then one INACTTIMO at most


@pytest.mark.parametrize("name", [b"evil\tby\tmx.trusted.example", b"a\x1b[31m", b"x\x7f",
                                  b"\x0b", b"a" * 256,
                                  # RFC 5322 reads these in a Received: field: "(" opened a
                                  # comment over the client's address and the "by" part,
                                  # ";" ended the tokens before the date.
                                  b"evil(", b"a;Thu,_1_Jan_1970(", b"<x>", b'"q"', b"a,b",
                                  b"a\\b", b"[1.2.3.4", b"x]", b"[a]b", b"[a[b]"])
def test_helo_names_with_blanks_or_controls_are_refused(name):
    """They would go into the Received: field (and the journal) as they came."""
    for verb in (b"HELO", b"EHLO"):
        s = Session()
        s.replies()
        s.send(verb + b" " + name + b"\r\nMAIL FROM:<a@b.test>\r\n")
        assert s.codes() == [501, 503], (verb, name)


@pytest.mark.parametrize("line", [b"NOOP\r\r\n", b"MAIL FROM:<a@b.test>\r\r\n",
                                  b"EHLO x\r\r\r\n", b"NO\rOP\r\n"])
def test_a_stray_cr_in_a_command_is_refused_wherever_it_is(line):
    """Exactly one line end goes; a CR more is a control character in the command."""
    s = Session()
    s.replies()
    s.send(line + b"NOOP\r\n")
    assert s.codes() == [500, 250], line


def test_a_job_ended_while_serving_says_421_first():
    s = Session()
    s.start()
    gone = s.proto.shutdown_notice()
    assert s.replies() == ["421 4.3.2 mail.example.test Service shutting down, try again later"]
    assert s.tr.disconnecting and not gone.called
    s.proto.connectionLost(None)
    assert gone.called


def queueing(pipelined: bytes = b"") -> Session:
    """A session whose message is being queued: its commit waits for ``release()``."""
    s = Session()
    s.start()
    s.backend.async_commit = True
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.replies()
    s.send(b"body\r\n.\r\n" + pipelined)
    return s


def test_a_job_ended_while_a_message_is_queued_gives_its_250_before_the_421():
    """A 421 first would make the client send again a message that is queued."""
    s = queueing(pipelined=b"MAIL FROM:<b@example.test>\r\n")
    waiting = s.proto.shutdown_notice()
    assert waiting is not None and not waiting.called and s.replies() == []
    s.backend.release()
    assert s.replies() == ["250 2.0.0 Ok: queued as q1",
                           "421 4.3.2 mail.example.test Service shutting down, try again later"]
    assert s.tr.disconnecting and len(s.backend.queued) == 1  # the pipelined MAIL not read
    # The shutdown goes on once they have left, not when they are written: a
    # TLS transport still holds them then, and the reactor's end drops them.
    assert not waiting.called
    s.proto.connectionLost(None)
    assert waiting.called


def test_a_last_reply_that_cannot_leave_does_not_hold_the_job():
    """A client that reads nothing, or never finishes its handshake on 465 (the 421
    then waits unencrypted in the TLS layer): loseConnection alone would wait
    for ever, and the job with it.  The connection is cut after a grace."""
    s = Session(inacttimo=60)
    s.start()
    s.clock.advance(60)
    assert s.replies()[0].startswith("421 4.4.2 ")
    assert s.tr.disconnecting and not s.tr.disconnected  # asked to close, not cut
    s.clock.advance(CLOSE_GRACE - 0.1)
    assert not s.tr.disconnected
    s.clock.advance(0.1)
    assert s.tr.disconnected  # StringTransport's mark of abortConnection


def test_a_session_that_closed_leaves_no_timer_behind():
    s = Session()
    s.start()
    s.send(b"QUIT\r\n")
    s.proto.connectionLost(None)
    assert s.clock.getDelayedCalls() == []


def test_quit_and_session_end_reported_once():
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\npartial\r\n")
    s.proto.connectionLost(None)
    assert s.backend.spools[0].aborted and s.done == 1


def test_dot_stuffing_at_every_position():
    s = Session(maxmsgsize=10_000_000)
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    s.replies()
    lines = [b"", b"..", b"...", b".x", b"x.", b" ."]
    wire = b"\r\n" + b"\r\n".join(lines) + b"\r\n.\r\n"
    for i in range(len(wire)):  # byte by byte: chunk boundaries everywhere
        s.send(wire[i:i + 1])
    assert s.codes() == [250]
    body = s.backend.queued[0][0].body.split(b"\r\n\r\n", 1)[1]
    assert body == b"\r\n".join([b"", b".", b"..", b"x", b"x.", b" ."]) + b"\r\n"


_DATE = re.compile(rb"\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}")
_PIECES = [b"x", b"text", b".", b"..", b"\r\n", b"\r\n", b"\r\n", b"\r", b"\n", b" ",
           b"\r\n.\r\n", b"y" * 990, b"y" * 996, b"y" * 997]


def _outcome(payload: bytes, cuts: list[int], block_path: bool, alwbarelf: bool,
             monkeypatch) -> tuple[list[str], bytes | None]:
    """Replies and stored body for one DATA, sent in pieces cut at ``cuts``."""
    if not block_path:
        monkeypatch.setattr(SMTPSession, "_body_lines", lambda self, buf, pos: 0)
    try:
        s = Session(maxmsgsize=6000, alwbarelf=alwbarelf)
        s.start()
        s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
        s.replies()
        wire = b"Subject: t\r\n\r\n" + payload + b"\r\n.\r\nNOOP\r\n"
        edges = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
        for a, b in zip(edges, edges[1:], strict=False):
            s.send(wire[a:b])
        queued = s.backend.queued[0][0].body if s.backend.queued else None
        if queued is not None:  # the two runs may straddle a second: dates aside
            queued = _DATE.sub(b"<date>", queued)
        return s.replies(), queued
    finally:
        monkeypatch.undo()


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(_PIECES), max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
       alwbarelf=st.booleans())
def test_whole_body_blocks_read_exactly_as_line_by_line(pieces, cuts, alwbarelf, monkeypatch):
    payload = b"".join(pieces)
    assert (_outcome(payload, cuts, True, alwbarelf, monkeypatch)
            == _outcome(payload, cuts, False, alwbarelf, monkeypatch))


@pytest.mark.parametrize("length", [997, 998, 999, 1000])
def test_the_text_line_limit_is_the_same_on_both_paths(length, monkeypatch):
    payload = b"first\r\n" + b"z" * length + b"\r\nlast"
    fast = _outcome(payload, [], True, False, monkeypatch)
    assert fast == _outcome(payload, [], False, False, monkeypatch)
    assert fast[0][-2].startswith("250" if length <= 998 else "550 5.6.0")


def _b64(text: bytes) -> bytes:
    import base64

    return base64.b64encode(text)


def test_auth_not_offered_in_the_clear():
    s = Session()
    s.start()
    s.send(b"EHLO x\r\n")
    assert not any("AUTH" in r for r in s.replies())
    s.send(b"AUTH PLAIN " + _b64(b"\0sam\0secret") + b"\r\n")
    assert s.replies() == ["538 5.7.11 Encryption required for requested authentication "
                           "mechanism: use STARTTLS first"]


def test_auth_plain_and_login():
    s = Session(alwplainauth=True)
    s.replies()
    s.send(b"EHLO x\r\n")
    assert s.replies()[-1] == "250 AUTH PLAIN LOGIN"
    s.send(b"AUTH PLAIN " + _b64(b"\0sam\0secret") + b"\r\n")
    assert s.replies() == ["235 2.7.0 Authentication successful"]
    s.send(b"AUTH PLAIN " + _b64(b"\0sam\0secret") + b"\r\n")
    assert s.codes() == [503]
    t = Session(alwplainauth=True)
    t.start()
    t.send(b"AUTH LOGIN\r\n")
    assert t.replies() == ["334 VXNlcm5hbWU6"]
    t.send(_b64(b"sam") + b"\r\n")
    assert t.replies() == ["334 UGFzc3dvcmQ6"]
    t.send(_b64(b"secret") + b"\r\nNOOP\r\n")
    assert t.codes() == [235, 250]
    u = Session(alwplainauth=True)
    u.start()
    u.send(b"AUTH PLAIN\r\n")
    assert u.replies() == ["334 "]
    u.send(b"*\r\n")
    assert u.codes() == [501]
    u.send(b"AUTH CRAM-MD5\r\n")
    assert u.codes() == [504]


def test_an_auth_response_with_a_stray_cr_is_refused_as_a_command_would_be():
    s = Session(alwplainauth=True)
    s.start()
    s.send(b"AUTH PLAIN\r\n")
    assert s.codes() == [334]
    s.send(_b64(b"\0sam\0secret") + b"\r\r\nAUTH PLAIN\r\n")
    assert s.codes() == [501, 334]
    s.send(_b64(b"\0sam\0secret") + b"\r\n")
    assert s.codes() == [235]


def test_auth_plain_acting_for_another_identity_is_refused():
    """RFC 4616: an authorization identity other than the one signing on needs a
    right to act for it, which nobody has here."""
    s = Session(alwplainauth=True)
    s.start()
    s.send(b"AUTH PLAIN " + _b64(b"bob\0sam\0secret") + b"\r\n")
    s.clock.advance(60)  # a failure is answered after a delay
    assert s.codes() == [535] and s.proto.user is None
    for authzid in (b"sam", b"SAM", b""):
        s = Session(alwplainauth=True)
        s.start()
        s.send(b"AUTH PLAIN " + _b64(authzid + b"\0sam\0secret") + b"\r\n")
        assert s.codes() == [235] and s.proto.user == "SAM"


def test_a_session_signed_on_with_a_profile_since_deleted_is_signed_on_no_more():
    """DLTUSRPRF or STATUS(*DISABLED) while the session is open: its next
    transaction is that of a client that never signed on."""
    s = Session(alwplainauth=True, listener="submission")
    s.start()
    s.send(b"AUTH PLAIN " + _b64(b"\0sam\0secret") + b"\r\n")
    s.send(b"MAIL FROM:<sam@example.test>\r\nRSET\r\n")
    assert s.codes() == [235, 250, 250]
    s.backend.revoked = frozenset({"SAM"})
    s.send(b"MAIL FROM:<sam@example.test>\r\n")
    assert s.codes() == [530] and s.proto.user is None


def test_failed_auth_is_answered_later_and_ends_the_session():
    s = Session(alwplainauth=True)
    s.start()
    delays = []
    for _ in range(3):
        s.send(b"AUTH PLAIN " + _b64(b"\0sam\0wrong") + b"\r\nNOOP\r\n")
        waited = 0.0
        while not s.tr.value():
            s.clock.advance(0.25)
            waited += 0.25
        delays.append(waited)
        codes = s.codes()
        assert codes[0] == 535
    assert delays == [1.0, 2.0, 4.0]  # growing
    assert s.tr.disconnecting


def test_submission_and_lclrly_require_auth_before_mail():
    for kw in ({"listener": "submission", "alwplainauth": True}, {"alwauth": "*LCLRLY"}):
        s = Session(**kw)
        s.start()
        s.send(b"MAIL FROM:<a@example.test>\r\n")
        assert s.replies() == ["530 5.7.0 Authentication required"]
    s = Session(listener="submission", alwplainauth=True)
    s.start()
    s.send(b"AUTH PLAIN " + _b64(b"\0sam\0secret") + b"\r\nMAIL FROM:<a@example.test>\r\n")
    assert s.codes() == [235, 250]


def test_alwauth_none_offers_no_auth():
    s = Session(alwauth="*NONE", alwplainauth=True)
    s.replies()
    s.send(b"EHLO x\r\n")
    assert not any("AUTH" in r for r in s.replies())
    s.send(b"AUTH PLAIN " + _b64(b"\0sam\0secret") + b"\r\n")
    assert s.codes() == [502]


def test_errors_slow_the_client_then_end_the_session():
    s = Session(maxerrors=5)
    s.start()
    s.send(b"BOGUS\r\nBOGUS\r\nBOGUS\r\nNOOP\r\n")
    assert s.codes() == [500, 500, 500]  # the NOOP waits: three errors so far
    s.clock.advance(1)
    assert s.codes() == [250]
    s.send(b"BOGUS\r\n")
    s.clock.advance(2)
    assert s.codes() == [500]
    s.send(b"BOGUS\r\n")
    s.clock.advance(3)
    r = s.replies()
    assert r[0].startswith("500") and r[1].startswith("421 4.7.0") and s.tr.disconnecting
    assert s.backend.limits == [("192.0.2.7", "maxerrors")]  # journaled JL: it was not


def test_a_client_that_erred_and_leaves_is_let_go_at_once():
    """The delay slows a client that keeps erring; a QUIT waiting behind it
    only held the job (up to 10 s) for a client that wanted to go."""
    s = Session(maxerrors=50)
    s.start()
    s.send(b"BOGUS\r\n" * 3)
    assert s.codes() == [500] * 3
    s.send(b"quit\r\n")
    assert s.codes() == [221] and s.done == 1


def test_the_job_is_free_once_quit_is_answered_and_told_only_once():
    """The client may connect again as soon as it has the 221: its next
    connection should find the job free, not wait for the close to go through."""
    s = Session()
    s.start()
    s.send(b"QUIT\r\n")
    assert s.codes() == [221]
    assert s.done == 1 and s.tr.disconnecting
    s.proto.connectionLost(None)
    assert s.done == 1


def test_a_session_that_ends_otherwise_frees_the_job_when_it_is_gone():
    s = Session()
    s.start()
    assert s.done == 0
    s.proto.connectionLost(None)
    assert s.done == 1


def test_a_client_that_reads_no_replies_is_not_read_either(monkeypatch):
    """Replies pile up in the transport only until its buffer is full: then the
    transport pauses the session (its producer), which handles no command and
    reads nothing until the client has read."""
    monkeypatch.setattr(server, "RCPT_OVERSHOOT", 10**6)
    s = Session()  # RCPT past MAXRCPT: a reply each, and no error (nor junk)
    s.start()
    assert s.tr.producer is s.proto and s.tr.streaming
    s.send(b"MAIL FROM:<a@example.test>\r\n" + b"RCPT TO:<sam@example.test>\r\n" * 3)
    assert s.codes() == [250, 250, 250, 250]
    s.proto.pauseProducing()  # as the transport does once its buffer is full
    s.send(b"RCPT TO:<sam@example.test>\r\n" * 1000)
    assert s.replies() == [] and s.tr.producerState == "producing"
    s.send(b"RCPT TO:<sam@example.test>\r\n" * 11_000)  # past max_pending: reading stops
    assert s.replies() == [] and s.tr.producerState == "paused"
    s.proto.resumeProducing()  # the client read: the transport drained
    assert s.tr.producerState == "producing" and s.codes() == [452] * 12_000


def test_a_session_that_closes_stops_producing_so_the_connection_can_close():
    s = Session()
    s.start()
    s.send(b"QUIT\r\n")
    assert s.tr.producer is None and s.tr.disconnecting


def test_mail_from_may_name_who_submitted_it_when_auth_is_offered():
    """RFC 4954 §5: sendmail and Exim send AUTH= on MAIL once signed on."""
    s = Session(alwplainauth=True)
    s.start()
    s.send(b"AUTH PLAIN " + _b64(b"\0sam\0secret") + b"\r\n")
    s.send(b"MAIL FROM:<jane@example.test> AUTH=<>\r\nRSET\r\n"
           b"MAIL FROM:<jane@example.test> SIZE=abc\r\nMAIL FROM:<jane@example.test> SIZE\r\n")
    assert s.codes() == [235, 250, 250, 501, 501]
    t = Session()  # no AUTH offered: no AUTH= either
    t.start()
    t.send(b"MAIL FROM:<jane@example.test> AUTH=<>\r\nAUTH\r\n")
    assert t.codes()[0] == 555


def test_auth_without_a_mechanism_is_a_syntax_error():
    s = Session(alwplainauth=True)
    s.start()
    s.send(b"AUTH\r\nAUTH \r\n")
    assert s.codes() == [501, 501]


def test_an_over_long_auth_response_ends_the_exchange():
    """However it is split, and the next command is a command again."""
    s = Session(alwplainauth=True)
    s.start()
    s.send(b"AUTH PLAIN\r\n")
    assert s.codes() == [334]
    s.send(b"A" * 8000)
    s.send(b"A" * 8000)
    s.send(b"\r\nNOOP\r\n")
    assert s.codes() == [500, 250]
    # Long, and taken as a response (not "line too long"); an authorization
    # identity that is not the user's is then refused.
    s.send(b"AUTH PLAIN " + _b64(b"x" * 900 + b"\0sam\0secret") + b"\r\n")
    s.clock.advance(60)
    assert s.codes() == [535]


def test_a_body_without_a_header_block_gets_a_blank_line_after_the_added_fields():
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    s.send(b"hello world\r\n.\r\n")
    body = s.backend.spools[0].body
    head, sep, rest = body.partition(b"\r\n\r\n")
    assert sep and rest == b"hello world\r\n"
    assert b"\r\nMessage-ID: <q1@mail.example.test>\r\nDate: " in head


def test_an_obsolete_space_before_the_colon_still_names_a_field():
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    s.send(b"Date : Sat, 28 Nov 2026 09:00:00 +0000\r\nMessage-ID : <x@y>\r\n\r\nhi\r\n.\r\n")
    body = s.backend.spools[0].body
    assert body.count(b"Date") == 1 and b"Message-ID:" not in body


def test_a_disk_that_refuses_gets_a_reply_and_the_session_goes_on():
    s = Session()
    s.start()

    def full(*_: object) -> None:
        raise OSError(24, "Too many open files")

    s.backend.new_spool = full
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nNOOP\r\n")
    assert s.codes() == [250, 250, 451, 250]


@attrs.define
class _FillingSpool(FakeSpool):
    full: bool = False

    def write(self, data: bytes) -> None:
        if self.full:
            raise OSError(28, "No space left on device")
        super().write(data)


def test_a_spool_that_fills_up_fails_the_message_with_452():
    s = Session()
    s.start()
    spool = _FillingSpool("q1")
    s.backend.new_spool = lambda *_: spool
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert s.codes() == [250, 250, 354]
    spool.full = True
    s.send(b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n")
    assert s.codes() == [452, 250] and spool.aborted and s.backend.queued == []


def test_received_names_an_ipv6_client_and_the_protocol_as_rfc_3848_does():
    s = Session()
    s.proto.peer_ip = "2001:db8::7"
    s.start()
    s.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhi\r\n.\r\n")
    first = s.backend.spools[0].body.split(b"\r\n")[0:2]
    assert first[0] == b"Received: from client.example ([IPv6:2001:db8::7])"
    assert b" with ESMTP id " in first[1]


def test_dsn_requests_of_a_client_that_may_not_relay_are_not_honoured():
    """A success notice, or any notice carrying the whole message, goes to the
    sender the client names: from anyone, it would send anything to anyone."""
    def session(trusted: bool, auth: bool = False) -> Received:
        s = Session(dsn=True, alwplainauth=True)
        s.backend.dsn_trusted = trusted
        s.start()
        if auth:
            s.send(b"AUTH PLAIN " + _b64(b"\0sam\0secret") + b"\r\n")
        s.send(b"MAIL FROM:<victim@remote.test> RET=FULL\r\n"
               b"RCPT TO:<b@example.test> NOTIFY=SUCCESS\r\nDATA\r\nspam\r\n.\r\n")
        [(_, received)] = s.backend.queued
        return received

    untrusted = session(False)
    assert (untrusted.ret, untrusted.dsn) == (None, ())
    listed = session(True)
    assert listed.ret == "FULL" and listed.dsn == (("b@example.test", ("SUCCESS",), None),)
    signed_on = session(False, auth=True)
    assert signed_on.ret == "FULL" and signed_on.dsn


def test_notify_never_of_a_client_that_may_not_relay_is_kept():
    """NEVER only means fewer notices to the sender it names: nothing to misuse."""
    s = Session(dsn=True)
    s.backend.dsn_trusted = False
    s.start()
    s.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@example.test> NOTIFY=NEVER\r\n"
           b"RCPT TO:<c@example.test> NOTIFY=SUCCESS\r\nDATA\r\nx\r\n.\r\n")
    [(_, received)] = s.backend.queued
    assert received.dsn == (("b@example.test", ("NEVER",), None),)


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        # a line break decoded from xtext: fields of the client's own in a report
        (b"MAIL FROM:<a@example.test> ENVID=id+0D+0AFinal-Recipient:+20x",
         "501 5.5.4 Syntax: ENVID"),
        (b"MAIL FROM:<a@example.test> ENVID=caf+E9", "501 5.5.4 Syntax: ENVID"),
        (b"MAIL FROM:<a@example.test> ENVID=bad+ZZ", "501 5.5.4 Syntax: ENVID"),
        (b"MAIL FROM:<a@example.test> ENVID=lower+0a", "501 5.5.4 Syntax: ENVID"),
        (b"MAIL FROM:<a@example.test> ENVID=" + b"x" * 101, "501 5.5.4 Syntax: ENVID"),
        (b"RCPT TO:<b@example.test> ORCPT=rfc822;a+0D+0Ab@x", "501 5.5.4 Syntax: ORCPT"),
        (b"RCPT TO:<b@example.test> ORCPT=no-semicolon", "501 5.5.4 Syntax: ORCPT"),
        # addr-type ";" xtext (RFC 3461 §4.2): an atom, a real ";", an address
        (b"RCPT TO:<b@example.test> ORCPT=;", "501 5.5.4 Syntax: ORCPT"),
        (b"RCPT TO:<b@example.test> ORCPT=rfc822;", "501 5.5.4 Syntax: ORCPT"),
        (b"RCPT TO:<b@example.test> ORCPT=rfc822+3Bb@x.test", "501 5.5.4 Syntax: ORCPT"),
        # an offered parameter with a bad value is a syntax error, not unknown (555)
        (b"MAIL FROM:<a@example.test> RET=BOGUS", "501 5.5.4 Syntax: RET=FULL or RET=HDRS"),
        (b"MAIL FROM:<a@example.test> RET", "501 5.5.4 Syntax: RET=FULL or RET=HDRS"),
        (b"MAIL FROM:<a@example.test> BODY=9BIT", "501 5.5.4 Syntax: BODY=7BIT"),
        (b"MAIL FROM:<a@example.test> BODY=BINARYMIME", "555 5.5.4 BODY=BINARYMIME is not"),
        (b"RCPT TO:<b@example.test> NOTIFY", "501 5.5.4 NOTIFY takes"),
        (b"MAIL FROM:<a@example.test> RET=FULL RET=HDRS", "501 5.5.4 Parameter RET given twice"),
        (b"RCPT TO:<b@example.test> NOTIFY=NEVER NOTIFY=SUCCESS",
         "501 5.5.4 Parameter NOTIFY given twice"),
    ],
)
def test_dsn_xtext_must_be_well_formed_printable_ascii(command, reply):
    s = Session(dsn=True)
    s.start()
    if command.startswith(b"RCPT"):
        s.send(b"MAIL FROM:<a@example.test>\r\n")
        s.replies()
    s.send(command + b"\r\n")
    assert s.replies()[0].startswith(reply)


@pytest.mark.parametrize("literal", [b"[999.999.999.999]", b"[1.2]", b"[IPv6:::::::::::::]",
                                     b"[IPv6:1.2.3.4]", b"[01.2.3.4]"])
def test_address_literals_name_real_addresses(literal):
    """RFC 5321 §4.1.3: four octets or an IPv6 form; a notice to anything else goes nowhere."""
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<jane@" + literal + b">\r\n")
    assert s.replies()[0].startswith("501 5.1.7 Bad address syntax")
    s.send(b"MAIL FROM:<jane@[192.0.2.1]>\r\nRCPT TO:<a@" + literal + b">\r\n"
           b"RCPT TO:<a@[IPv6:2001:db8::1]>\r\n")
    codes = s.codes()
    assert codes[:2] == [250, 501] and codes[2] != 501


def test_the_ipv6_tag_of_a_literal_is_taken_in_any_case():
    """RFC 5234: a quoted string of the ABNF ("IPv6:") matches in any case."""
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<jane@[ipv6:2001:db8::1]>\r\nRCPT TO:<a@[IPV6:2001:db8::2]>\r\n")
    codes = s.codes()
    assert codes[0] == 250 and codes[1] != 501


def test_a_quoted_local_part_that_needs_no_quotes_is_the_same_mailbox():
    s = Session()
    s.start()
    s.send(b'MAIL FROM:<"jane"@example.test>\r\nRCPT TO:<"sam"@example.test>\r\n'
           b'RCPT TO:<"s\\am"@example.test>\r\nRCPT TO:<"s am"@example.test>\r\nDATA\r\nx\r\n.\r\n')
    [(_, received)] = s.backend.queued
    assert received.originator == "jane@example.test"
    assert [a for a, _ in received.recipients][:2] == ["sam@example.test", "sam@example.test"]


def test_dsn_xtext_is_decoded():
    s = Session(dsn=True)
    s.start()
    s.send(b"MAIL FROM:<a@example.test> ENVID=QQ+2B1+3D2\r\n"
           b"RCPT TO:<b@example.test> NOTIFY=FAILURE ORCPT=rfc822;A+2Bb@x.test\r\n"
           b"DATA\r\nx\r\n.\r\n")
    [(_, received)] = s.backend.queued
    assert received.envid == "QQ+1=2"
    assert received.dsn == (("b@example.test", ("FAILURE",), "rfc822;A+b@x.test"),)


def test_a_session_not_signed_on_ends_when_its_address_used_up_maxauthfail():
    """Parallel sessions each got their own three tries before: the limit counted
    only at the next connection."""
    s = Session(alwplainauth=True)
    s.start()
    s.proto.cut_off()
    assert s.replies() == ["421 4.7.0 mail.example.test Too many failed sign-ons from your "
                           "address, closing connection"] and s.tr.disconnecting
    signed = Session(alwplainauth=True)
    signed.start()
    signed.send(b"AUTH PLAIN " + _b64(b"\0sam\0secret") + b"\r\n")
    signed.replies()
    signed.proto.cut_off()  # a user behind the same address goes on
    assert signed.replies() == [] and not signed.tr.disconnecting


def test_a_cut_while_a_message_is_received_or_queued_comes_after_its_250():
    """A 421 while the message is being queued, then queued: the client sends it
    again.  The session ends once its reply is out, as it does after DATA."""
    s = Session()
    s.start()
    s.backend.async_commit = True
    s.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n"
           b"Subject: x\r\n\r\n")
    s.proto.cut_off()  # during DATA
    s.send(b"hello\r\n.\r\n")
    s.proto.cut_off()  # and again while it is queued
    assert s.codes() == [250, 250, 354] and not s.tr.disconnecting
    s.backend.release()
    assert s.codes() == [250, 421] and s.tr.disconnecting


def test_the_job_shutdown_waits_for_the_reply_due_first_but_not_for_ever():
    from twistmail.prestart import job as jobmod

    s = queueing()
    clock = Clock()
    j = types.SimpleNamespace(stopping=False, reactor=clock, _session=lambda: s.proto,
                              _told=set())  # a server job: no task running
    waiting = jobmod.Job.shutting_down(j)
    assert waiting is not None and not waiting.called
    clock.advance(jobmod.SHUTDOWN_WAIT)
    assert waiting.called  # a commit that never ends does not hold the shutdown
    s.backend.release()
    assert s.codes()[-2:] == [250, 421]
    s.proto.connectionLost(None)  # given up on already: nothing more to fire


def test_a_shutdown_waiting_for_a_reply_ends_with_the_connection():
    s = queueing()
    waiting = s.proto.shutdown_notice()
    s.proto.connectionLost(None)
    assert waiting.called
    s.backend.release()  # the commit ends later: nothing to answer, nothing raised


def test_etrn_for_a_queue_name_is_valid_syntax_that_is_not_served():
    """RFC 1985 §5: "#name" names a queue; this server starts queues by domain only."""
    s = Session(etrnsvr=True)
    s.start()
    s.send(b"ETRN #outbound\r\nETRN #\r\nETRN a b\r\n")
    assert s.codes() == [458, 501, 501]


def test_help_names_the_extensions_the_session_offers():
    s = Session()
    s.start()
    s.send(b"HELP\r\n")
    assert s.replies() == ["214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP "
                           "VRFY"]
    s = Session(etrnsvr=True)
    s.start()
    s.send(b"HELP\r\n")
    assert s.replies()[-1].endswith("VRFY ETRN")


def test_replies_the_rfcs_name_for_utf8_addresses_and_auth_lines():
    s = Session(maxerrors=50, error_delay=0)
    s.start()
    s.send("MAIL FROM:<jäne@example.test>\r\n".encode())
    assert s.replies() == ["501 5.5.2 Syntax error: non-ASCII characters in the arguments "
                           "(SMTPUTF8 is not offered)"]
    s.send("MÄIL FROM:<jane@example.test>\r\n".encode())
    assert s.codes() == [500]
    s.proto.tls = True  # AUTH is offered over TLS
    s.send(b"AUTH LOGIN =\r\n")  # an empty initial response (RFC 4954 section 4)
    assert s.replies() == ["334 UGFzc3dvcmQ6"]
    s.send(b"*\r\n")
    assert s.codes() == [501]
    s.send(b"AUTH PLAIN\r\n" + b"A" * 13000 + b"\r\n")
    assert s.replies() == ["334 ", "500 5.5.6 Authentication Exchange line is too long "
                           "(12288 octets at most)"]
    s.send(b"AUTH PLAIN " + b"A" * 13000 + b"\r\n")  # the initial response too
    assert s.replies() == ["500 5.5.6 Authentication Exchange line is too long "
                           "(12288 octets at most)"]
    s.send(b"AUTH PLAIN " + b"A" * 13000)  # no end of line yet
    assert s.replies()[0].startswith("500 5.5.6 ")
    s.send(b"\r\nAUTH PLAIN\r\n")
    s.replies()
    s.send(b"A" * 70000)  # no end of line yet
    assert s.codes() == [500]
    s.send(b"\r\nNOOP\r\n")
    assert s.codes() == [250]


@pytest.mark.parametrize(("path", "reply"), [
    (b'<a"b@example.test>', "501 5.5.4 Unmatched quote in the address"),
    (b"<a@example.test", "501 5.5.4 Missing closing angle bracket"),
])
def test_an_unclosed_path_names_what_is_unclosed(path, reply):
    s = Session()
    s.start()
    s.send(b"MAIL FROM:" + path + b"\r\n")
    assert s.replies()[0].startswith(reply)


def test_syntax_refusals_of_a_path_or_parameter_are_journaled_like_any_other():
    """README: 9W records each originator or recipient refused with a 5xx.
    A path too long, a bad address or parameter wrote none."""
    s = Session()
    s.start()
    s.send(b"MAIL FROM:<" + b"a" * 300 + b"@example.test>\r\n")
    s.send(b"MAIL FROM:<jane@example.test> BODY=FOO\r\n")
    s.send(b"MAIL FROM:<jane@example.test>\r\n")
    s.send(b"RCPT TO:<no spaces@example.test>\r\n")
    s.send(b"RCPT TO:<sam@example.test> FOO=BAR\r\n")
    s.clock.advance(60)  # errors past the first few are answered slowly
    assert s.codes() == [501, 501, 250, 501, 555]
    assert [(what, code) for what, _, code in s.backend.refusals] == [
        ("originator", 501), ("originator", 501), ("recipient", 501), ("recipient", 555)]
    assert s.backend.refusals[1][1] == "jane@example.test"
    assert s.backend.refusals[3][1] == "sam@example.test"
