"""One POP3 session in-process (StringTransport, Clock): timing and hostile input.

The protocol itself is tested with real clients against a running daemon in
test_pop3.py; here are the cases that need a clock or a client that stops
reading, which a real socket cannot show in reasonable time.
"""

from __future__ import annotations

import io
import time

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twistmail.auth import IMailboxAccess
from twistmail.maildir import MailboxInUse, MaildirStore
from twistmail.pop3.server import CHUNK, POP3Factory, _cut
from twistmail.protocols.sequential import CLOSE_GRACE

INACTTIMO = 600


class _Journal:
    def write(self, *args: object, **fields: object) -> None:
        pass


class _Portal:
    def __init__(self, store: MaildirStore) -> None:
        self.store = store

    def login(self, creds, mind, iface):
        box = self.store.open(creds.username.decode())
        return defer.succeed((IMailboxAccess, box, box.close))


class _Factory(POP3Factory):
    """Thread work runs at once, unless a test holds it."""

    hold: list | None = None

    def in_thread(self, f, *args):
        if self.hold is None:
            return defer.maybeDeferred(f, *args)
        d: defer.Deferred = defer.Deferred()
        self.hold.append((d, f, args))
        return d

    def record_login(self, ip, usrprf):
        return defer.succeed(None)


@pytest.fixture
def store(tmp_path):
    return MaildirStore(tmp_path / "mailboxes", "mail.example.test")


def _deliver(store: MaildirStore, tmp_path, data: bytes, n: int = 1) -> None:
    body = tmp_path / f"body{n}"
    body.write_bytes(data)
    store.deliver("SAM", f"Q{n}.R1", body, b"")


def _session(store, alwssl: str = "*YES", msgsplit_kb: int | None = None,
             implicit_tls: bool = False):
    clock = Clock()
    factory = _Factory(reactor=clock, hostname="mail.example.test", portal=_Portal(store),
                       directory=None, journal=_Journal(), inacttimo=INACTTIMO,
                       msgsplit_kb=msgsplit_kb, alwssl=alwssl, tls_options=None,
                       implicit_tls=implicit_tls, on_done=lambda: None, fail_delay=0.0)
    session = factory.buildProtocol(None)
    transport = StringTransport()
    session.makeConnection(transport)
    return clock, factory, session, transport


def _login(session, transport) -> None:
    session.dataReceived(b"USER sam\r\nPASS secret\r\n")
    assert transport.value().splitlines()[-1].startswith(b"+OK SAM has")
    transport.clear()


def test_a_client_that_stops_reading_a_reply_is_cut_off_not_sent_an_error(store, tmp_path):
    """Output that moves keeps the session alive; an -ERR in the middle of a
    message would be taken for part of it."""
    _deliver(store, tmp_path, b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 20000)
    clock, _, session, transport = _session(store)
    _login(session, transport)
    session.dataReceived(b"RETR 1\r\n")
    for _ in range(4):  # the client reads slowly, for longer than the timeout in all
        clock.advance(INACTTIMO * 0.6)
        session.sender.resumeProducing()
    assert not transport.disconnecting
    clock.advance(INACTTIMO)  # it stops reading
    assert transport.disconnecting and b"-ERR" not in transport.value()


@pytest.mark.parametrize("line", [b"LIST \xc2\xb2", b"RETR \xd9\xa1", b"TOP 1 \xc2\xb2",
                                  b"DELE \xc2\xb2", b"\xc5\xbftat"])
def test_digits_and_letters_of_other_scripts_get_an_error(store, tmp_path, line):
    _deliver(store, tmp_path, b"Subject: hi\r\n\r\nbody\r\n")
    _, _, session, transport = _session(store)
    _login(session, transport)
    session.dataReceived(line + b"\r\nNOOP\r\n")
    replies = transport.value().splitlines()
    assert replies[0].startswith(b"-ERR") and replies[1] == b"+OK"


def test_top_finds_the_blank_line_after_a_header_longer_than_a_read(store, tmp_path):
    # A read takes CHUNK octets: the line's CRLF comes alone in the next.
    _deliver(store, tmp_path, b"X-Long: " + b"a" * (CHUNK - 8) + b"\r\nSubject: after\r\n\r\n"
             b"body\r\n")
    _, _, session, transport = _session(store)
    _login(session, transport)
    session.dataReceived(b"TOP 1 0\r\n")
    while session.sender is not None:
        session.sender.resumeProducing()
    assert b"Subject: after\r\n" in transport.value()
    assert b"body" not in transport.value()


def test_a_refusal_on_995_that_cannot_leave_does_not_hold_the_job(store):
    """ALWSSL *NO: the -ERR on 995 waits for a handshake the client may never make."""
    clock, _, _, transport = _session(store, alwssl="*NO", implicit_tls=True)
    assert transport.value().startswith(b"-ERR [SYS/PERM] TLS is disabled")
    assert transport.disconnecting and not transport.disconnected
    clock.advance(CLOSE_GRACE)
    assert transport.disconnected  # cut: StringTransport's mark of abortConnection


def test_stls_with_an_argument_is_refused(store):
    """RFC 2595 §4: STLS takes no arguments; "STLS foo" began TLS."""
    _, _, session, transport = _session(store)
    session.dataReceived(b"STLS foo\r\n")
    assert transport.value().endswith(b"-ERR STLS takes no arguments\r\n")
    assert not session.tls


def test_capa_offers_no_user_where_a_plaintext_login_is_refused(store):
    _, _, session, transport = _session(store, alwssl="*ONLY")
    session.dataReceived(b"CAPA\r\n")
    assert b"USER\r\n" not in transport.value() and b"TOP\r\n" in transport.value()


def test_a_connection_lost_during_quit_keeps_the_mailbox_locked_until_done(store, tmp_path):
    _deliver(store, tmp_path, b"Subject: hi\r\n\r\nbody\r\n")
    _, factory, session, transport = _session(store)
    _login(session, transport)
    factory.hold = []
    session.dataReceived(b"DELE 1\r\nQUIT\r\n")
    session.connectionLost(None)  # while the list of what goes is being written
    with pytest.raises(MailboxInUse):
        store.open("SAM")
    while factory.hold:
        d, f, args = factory.hold.pop(0)
        d.callback(f(*args))  # decide, then expunge, which lets go of the lock
    with store.open("SAM") as box:
        assert box.messages() == []


@pytest.mark.parametrize("ended_by", ["shutdown", "maxauthfail"])
def test_a_session_at_quit_is_told_plus_ok_not_cut_off(store, tmp_path, ended_by):
    """A shutdown or the MAXAUTHFAIL cut-off during QUIT answered -ERR while
    the deletions it was deciding went through (RFC 1939 §6: -ERR only when
    nothing was removed)."""
    _deliver(store, tmp_path, b"Subject: hi\r\n\r\nbody\r\n")
    _, factory, session, transport = _session(store)
    _login(session, transport)
    factory.hold = []
    session.dataReceived(b"DELE 1\r\nQUIT\r\n")
    transport.clear()
    gone = session.shutdown_notice() if ended_by == "shutdown" else session.cut_off()
    assert transport.value() == b"" and not transport.disconnecting
    d, f, args = factory.hold.pop(0)
    d.callback(f(*args))  # decide
    assert transport.value().startswith(b"+OK mail.example.test signing off (1 message")
    if ended_by == "shutdown":
        fired = []
        gone.addCallback(fired.append)
        session.connectionLost(None)
        assert fired  # the shutdown waited for it
    while factory.hold:
        d, f, args = factory.hold.pop(0)
        d.callback(f(*args))
    with store.open("SAM") as box:
        assert box.messages() == []


@pytest.mark.parametrize("data", [b"", b"a" * 1000, b"line\n" * 1000, b"x" * 999 + b"\n" +
                                  b"y" * 1000, b"ab\r\n" * 700, b"ab\n" * 700,
                                  b"ab\n" * 300, b"x" * 700 + b"\n" + b"ab\r\nc\n" * 90])
def test_pieces_are_cut_at_line_ends_reading_a_piece_at_a_time(data):
    """At most a piece's size as sent: a file with bare LF line ends (another
    program's) grows by an octet a line, and 900 octets of it are not one piece."""
    cuts = _cut(io.BytesIO(data), 1024)
    assert b"".join(data[a:b] for a, b, *_ in cuts) == data
    assert all(0 < b - a and 0 < octets <= 1024 + 2 for a, b, octets in cuts)
    # The file's end without a line end is sent with one (as RETR sends it).
    assert all(octets == len(data[a:b].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
               + ((1 if data.endswith(b"\r") else 2)
                  if b == len(data) and not data.endswith(b"\n") else 0)
               for a, b, octets in cuts)
    assert all(data[b - 1:b] == b"\n" for _, b, *_ in cuts[:-1])  # after a line end


@pytest.mark.parametrize("data", [b"a" * 2500, b"x" * 999 + b"\n" + b"y" * 3000])
def test_a_line_longer_than_a_piece_is_not_cut(data):
    """Cut in two, it would come back with a line end more (RFC 2046 §5.2.2)."""
    assert _cut(io.BytesIO(data), 1024)[-1][2] == -1


@pytest.mark.parametrize("end", [b"\n", b"", b"\r"])
def test_a_piece_is_listed_at_the_octets_retr_sends(store, tmp_path, end):
    """Another program's file with LF line ends: each bare LF goes out as CRLF;
    one that ends without a line end is sent with one."""
    cur = store.ensure("SAM") / "cur"
    (cur / "imported:2,S").write_bytes(b"Subject: big\n\n" + (b"z" * 60 + b"\n") * 2999
                                       + b"z" * 60 + end)
    _, _, session, transport = _session(store, msgsplit_kb=64)
    _login(session, transport)
    session.dataReceived(b"LIST\r\n")
    listed = [int(line.split()[1]) for line in transport.value().splitlines()[1:-1]]
    assert len(listed) == 3
    for n, size in enumerate(listed, 1):
        transport.clear()
        session.dataReceived(b"RETR %d\r\n" % n)
        while session.sender is not None:
            session.sender.resumeProducing()
        sent = transport.value().split(b"\r\n", 1)[1]
        assert sent.endswith(b"\r\n.\r\n")
        assert len(sent[:-3].replace(b"\r\n..", b"\r\n.")) == size


def test_msgsplit_pieces_are_listed_at_login(store, tmp_path):
    _deliver(store, tmp_path, b"Subject: big\r\n\r\n" + (b"z" * 60 + b"\r\n") * 3000)
    _, _, session, transport = _session(store, msgsplit_kb=64)
    session.dataReceived(b"USER sam\r\nPASS secret\r\nLIST\r\n")
    replies = transport.value().splitlines()
    assert replies[2].startswith(b"+OK SAM has 3 messages")
    assert replies[3:] == [b"+OK 3 messages (186754 octets)", b"1 64742", b"2 64726",
                           b"3 57286", b"."]


def test_a_session_not_signed_on_ends_when_its_address_used_up_maxauthfail(store, tmp_path):
    _, _, session, transport = _session(store)
    transport.clear()
    session.cut_off()
    assert transport.value().startswith(b"-ERR [SYS/TEMP] Too many failed sign-ons")
    assert transport.disconnecting
    _deliver(store, tmp_path, b"Subject: x\r\n\r\nx\r\n")
    _, _, session, transport = _session(store)
    _login(session, transport)
    session.cut_off()
    assert transport.value() == b"" and not transport.disconnecting


@pytest.mark.parametrize(
    ("peer", "alwssl", "alwplainauth", "allowed"),
    [
        ("192.0.2.7", "*YES", False, False),  # a password in clear across the network
        ("192.0.2.7", "*YES", True, True),
        ("192.0.2.7", "*NO", False, True),  # no TLS to use instead
        ("127.0.0.1", "*YES", False, True),  # it never leaves this host
        ("::1", "*YES", False, True),
        ("127.0.0.1", "*ONLY", True, False),
    ],
)
def test_plaintext_logins_from_other_hosts_wait_for_tls(store, peer, alwssl, alwplainauth,
                                                        allowed):
    from twisted.internet.address import IPv4Address, IPv6Address

    factory = _Factory(reactor=Clock(), hostname="mail.example.test", portal=_Portal(store),
                       directory=None, journal=_Journal(), inacttimo=INACTTIMO,
                       msgsplit_kb=None, alwssl=alwssl, tls_options=object(),
                       implicit_tls=False, on_done=lambda: None, fail_delay=0.0,
                       alwplainauth=alwplainauth)
    session = factory.buildProtocol(None)
    address = IPv6Address("TCP", peer, 4242) if ":" in peer else IPv4Address("TCP", peer, 4242)
    transport = StringTransport(peerAddress=address)
    session.makeConnection(transport)
    session.dataReceived(b"CAPA\r\nUSER sam\r\nPASS secret\r\n")
    out = transport.value()
    assert (b"\r\nUSER\r\n" in out) is allowed
    assert (b"+OK SAM has" in out) is allowed
    if not allowed:
        assert b"-ERR [AUTH] Plaintext login is not allowed here: use STLS first" in out


def test_a_job_ended_while_serving_says_so_unless_a_message_is_streaming(store, tmp_path):
    _deliver(store, tmp_path, b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 20000)
    _, _, session, transport = _session(store)
    _login(session, transport)
    session.dataReceived(b"RETR 1\r\n")
    assert session.sender is not None  # the message is streaming
    sent = transport.value()
    session.shutdown_notice()  # an -ERR now would be taken for a line of the message
    assert transport.value() == sent and not transport.disconnecting
    while session.sender is not None:
        session.sender.resumeProducing()
    transport.clear()
    session.shutdown_notice()
    assert transport.value() == b"-ERR [SYS/TEMP] Server shutting down, try again later\r\n"
    assert transport.disconnecting


def test_a_piece_carries_folded_header_fields_whole(store, tmp_path):
    _deliver(store, tmp_path, b"Subject: a long\r\n subject line\r\nTo: a@example.test,\r\n"
             b"\tb@example.test\r\n\r\n" + (b"z" * 60 + b"\r\n") * 3000)
    _, _, session, transport = _session(store, msgsplit_kb=64)
    _login(session, transport)
    transport.clear()
    session.dataReceived(b"TOP 1 0\r\n")
    while session.sender is not None:
        session.sender.resumeProducing()
    head = transport.value()
    assert b"Subject: a long\r\n subject line (part 1 of 3)\r\n" in head
    assert b"To: a@example.test,\r\n b@example.test\r\n" in head


def test_a_piece_with_a_long_subject_is_no_larger_than_msgsplit(store, tmp_path):
    """The subject, unfolded into one line of 2462 octets (over RFC 5322's 998),
    came on top of every piece, which all went over MSGSPLIT."""
    subject = b"\r\n ".join([b"word" * 15] * 40)
    _deliver(store, tmp_path, b"From: a@x.test\r\nSubject: " + subject + b"\r\n\r\n"
             + b"".join(b"line %05d abcdefghij\r\n" % n for n in range(4000)))
    _, _, session, transport = _session(store, msgsplit_kb=32)
    _login(session, transport)
    transport.clear()
    session.dataReceived(b"LIST\r\n")
    listed = [int(line.split()[1]) for line in transport.value().splitlines()[1:-1]]
    assert len(listed) > 1 and max(listed) <= 32 * 1024
    for n, size in enumerate(listed, 1):
        transport.clear()
        session.dataReceived(b"RETR %d\r\n" % n)
        while session.sender is not None:
            session.sender.resumeProducing()
        sent = transport.value().split(b"\r\n", 1)[1][:-3].replace(b"\r\n..", b"\r\n.")
        assert len(sent) == size and max(len(line) for line in sent.split(b"\r\n")) <= 998


def test_a_message_whose_header_leaves_no_room_for_a_piece_is_offered_whole(store, tmp_path):
    """A Subject folded to 35 KB, MSGSPLIT 32: fifty pieces of 36 KB each, every
    one carrying the header, all over MSGSPLIT."""
    subject = b"\r\n ".join([b"word" * 15] * 580)
    data = b"Subject: " + subject + b"\r\n\r\n" + b"body line\r\n" * 1400
    _deliver(store, tmp_path, data)
    _, _, session, transport = _session(store, msgsplit_kb=32)
    session.dataReceived(b"USER sam\r\nPASS secret\r\nLIST\r\n")
    replies = transport.value().splitlines()
    assert replies[4:] == [b"1 %d" % len(data), b"."]


def test_an_eight_bit_message_is_offered_whole_not_cut(store, tmp_path):
    """RFC 2046 §5.2.2: message/partial is 7bit always; 8-bit pieces are not allowed."""
    data = b"Subject: big\r\n\r\n" + (b"z" * 60 + b"\r\n") * 3000 + "caf\u00e9\r\n".encode()
    _deliver(store, tmp_path, data)
    _, _, session, transport = _session(store, msgsplit_kb=64)
    session.dataReceived(b"USER sam\r\nPASS secret\r\nLIST\r\n")
    replies = transport.value().splitlines()
    assert replies[2].startswith(b"+OK SAM has 1 message (")
    assert replies[4:] == [b"1 %d" % len(data), b"."]


def test_a_message_with_a_line_longer_than_a_piece_is_offered_whole(store, tmp_path):
    data = b"Subject: big\r\n\r\n" + b"A" * 100000 + b"\r\n"
    _deliver(store, tmp_path, data)
    _, _, session, transport = _session(store, msgsplit_kb=32)
    session.dataReceived(b"USER sam\r\nPASS secret\r\nLIST\r\n")
    assert transport.value().splitlines()[4:] == [b"1 %d" % len(data), b"."]


def test_pieces_of_a_message_without_a_date_keep_theirs(store, tmp_path):
    """Each fetch of a piece is the same bytes: its Date is not made anew."""
    _deliver(store, tmp_path, b"Subject: big\r\n\r\n" + (b"z" * 60 + b"\r\n") * 3000)
    heads = []
    for _ in range(2):
        clock, _, session, transport = _session(store, msgsplit_kb=64)
        _login(session, transport)
        session.dataReceived(b"TOP 1 0\r\n")
        while session.sender is not None:
            session.sender.resumeProducing()
        heads.append(transport.value())
        session.connectionLost(None)
        time.sleep(1.1)  # a Date made at each fetch would differ
    assert b"\r\nDate: " in heads[0] and heads[0] == heads[1]


def test_an_idle_session_is_closed_without_a_response(store, tmp_path):
    """RFC 1939 §3: the autologout timer closes the connection and sends nothing."""
    clock, _, session, transport = _session(store)
    session.dataReceived(b"USER sam\r\n")
    transport.clear()
    clock.advance(INACTTIMO + 1)
    assert transport.value() == b""
    assert transport.disconnecting


def _listing(store, msgsplit_kb: int) -> tuple[list[bytes], object, object]:
    _, _, session, transport = _session(store, msgsplit_kb=msgsplit_kb)
    _login(session, transport)
    session.dataReceived(b"UIDL\r\n")
    lines = transport.value().splitlines()[1:-1]
    transport.clear()
    return [line.split()[1] for line in lines], session, transport


def test_pieces_deleted_under_one_msgsplit_do_not_hide_pieces_of_another(store, tmp_path):
    """Two sizes that cut a message into as many pieces, at other lines: the
    record of one cut hid pieces of the other, and lines were never seen."""
    _deliver(store, tmp_path, b"Subject: big\r\n\r\n"
             + b"".join(b"line %05d " % i + b"z" * 60 + b"\r\n" for i in range(1500)))
    first, session, transport = _listing(store, 32)
    session.dataReceived(b"DELE 1\r\nDELE 2\r\nQUIT\r\n")
    second, other, _ = _listing(store, 36)
    assert len(first) == len(second) == 4
    assert set(first).isdisjoint(second)  # another cut, other names
    other.dataReceived(b"QUIT\r\n")
    again, session, transport = _listing(store, 32)
    assert again == first[2:]  # the first cut's record still holds for it
    session.dataReceived(b"QUIT\r\n")


def test_a_sign_on_whose_mailbox_was_removed_meanwhile_is_told_to_try_again(store):
    """DLTUSRPRF *DLT between the password check and the mailbox's open gave
    "-ERR Internal error" and a critical traceback in the log."""
    from twistmail.maildir import MailboxGone

    class Gone(_Portal):
        def login(self, creds, mind, iface):
            return defer.fail(MailboxGone("SAM"))

    _, factory, session, transport = _session(store)
    factory.portal = Gone(store)
    transport.clear()
    session.dataReceived(b"USER sam\r\nPASS secret\r\nNOOP\r\n")
    replies = transport.value().splitlines()
    assert replies[1] == b"-ERR [SYS/TEMP] Mailbox not available, try again later", replies
    assert replies[2].startswith(b"-ERR") and len(replies) == 3  # NOOP: still not signed on


def test_a_client_must_sign_on_within_one_inactivity_timeout(store, tmp_path):
    """USER or CAPA now and then kept a session not signed on, and its job, for ever."""
    clock, _, session, transport = _session(store)
    for _ in range(3):
        clock.advance(INACTTIMO / 3 - 1)
        session.dataReceived(b"CAPA\r\n")
    assert not transport.disconnecting
    clock.advance(3)
    assert transport.disconnecting  # closed without a reply, as an autologout (RFC 1939)
    clock, factory, session, transport = _session(store)
    checks: list[defer.Deferred] = []

    class Slow(_Portal):  # the password check, in a thread, takes its time
        def login(self, creds, mind, iface):
            checks.append(defer.Deferred())
            return checks[-1].addCallback(lambda _: super(Slow, self).login(creds, mind, iface))

    factory.portal = Slow(store)
    clock.advance(INACTTIMO - 1)
    session.dataReceived(b"USER sam\r\nPASS secret\r\n")
    clock.advance(5)
    assert not transport.disconnecting  # a PASS that came in time is answered
    checks[0].callback(None)
    assert transport.value().splitlines()[-1].startswith(b"+OK SAM has")
    for _ in range(3):
        clock.advance(INACTTIMO - 1)
        session.dataReceived(b"NOOP\r\n")
    assert not transport.disconnecting


def test_a_mailbox_the_daemon_may_not_enter_is_named_in_one_log_line(store):
    """A chown mistake: -ERR [SYS/TEMP], and the path, not a traceback."""
    from twisted.logger import Logger

    class Refusing(_Portal):
        def login(self, creds, mind, iface):
            return defer.fail(PermissionError(13, "Permission denied", "/var/mailboxes/SAM"))

    _, factory, session, transport = _session(store)
    factory.portal = Refusing(store)
    events: list[dict] = []
    session.log = Logger(observer=events.append)
    session.dataReceived(b"USER sam\r\nPASS secret\r\n")
    assert transport.value().splitlines()[-1] == \
        b"-ERR [SYS/TEMP] Mailbox not available, try again later"
    [event] = events
    assert "log_failure" not in event and event["where"] == ": /var/mailboxes/SAM"


def test_a_command_with_a_stray_cr_before_its_line_end_is_not_taken(store, tmp_path):
    """Exactly one line end goes: ``NOOP\\r\\r\\n`` is not NOOP, as ``NO\\rOP`` is not."""
    _deliver(store, tmp_path, b"Subject: hi\r\n\r\nbody\r\n")
    _, _, session, transport = _session(store)
    _login(session, transport)
    session.dataReceived(b"NOOP\r\r\nDELE 1\r\r\nNOOP\r\n")
    assert [r[:4] for r in transport.value().splitlines()] == [b"-ERR", b"-ERR", b"+OK"]


@pytest.mark.parametrize("line", [b"NOOP\x00", b"NO\x00OP", b"NOOP\x1b", b"LIST\x7f"])
def test_control_characters_in_a_command_get_the_same_error(store, tmp_path, line):
    _, _, session, transport = _session(store)
    _login(session, transport)
    session.dataReceived(line + b"\r\nNOOP\r\n")
    assert transport.value().splitlines() == [
        b"-ERR Syntax error: control characters in command", b"+OK"]


@pytest.mark.parametrize(("line", "reply"), [
    (b"LIST \xc2\xa0", b"-ERR Syntax: a message number is required"),
    (b"UIDL \xe2\x80\x83", b"-ERR Syntax: a message number is required"),
    (b"LIST 1\xc2\xa0", b"-ERR Syntax: a message number is required"),
    (b"TOP 1\xc2\xa00", b"-ERR Syntax: TOP message lines"),
])
def test_only_a_space_separates_an_argument(store, tmp_path, line, reply):
    """RFC 1939: one SP between keyword and argument; a no-break space is no blank."""
    _deliver(store, tmp_path, b"Subject: hi\r\n\r\nbody\r\n")
    _, _, session, transport = _session(store)
    _login(session, transport)
    session.dataReceived(line + b"\r\n")
    assert transport.value().splitlines() == [reply]


def test_a_close_after_the_connection_is_gone_leaves_no_timer(store):
    """A TLS client's close_notify ends the connection under a session still
    at work; its close afterwards armed a timer that aborted a transport gone
    10 s before (a critical traceback in the log)."""
    clock, _, session, transport = _session(store)
    session.connectionLost(None)
    session.close()
    assert clock.getDelayedCalls() == []


def test_a_user_name_of_blanks_is_a_syntax_error(store):
    _, _, session, transport = _session(store)
    transport.clear()
    session.dataReceived(b"USER  \r\nUSER \r\nUSER\r\n")
    assert transport.value().splitlines() == [b"-ERR Syntax: USER name"] * 3


def test_a_message_another_reader_removed_is_gone_for_good(store, tmp_path):
    """SYS/TEMP would have the client try again, for ever (RFC 3206 §4)."""
    _deliver(store, tmp_path, b"Subject: hi\r\n\r\nbody\r\n")
    _, _, session, transport = _session(store)
    _login(session, transport)
    [path] = (store.path("SAM") / "cur").iterdir()
    path.unlink()
    session.dataReceived(b"RETR 1\r\nTOP 1 0\r\n")
    replies = transport.value().splitlines()
    assert [r.split(b" ", 2)[:2] for r in replies] == [[b"-ERR", b"[SYS/PERM]"]] * 2
