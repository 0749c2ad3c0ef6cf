"""POP3 server jobs with real clients: poplib, curl, fetchmail, openssl s_client."""

from __future__ import annotations

import email
import email.policy
import poplib
import smtplib
import socket
import ssl
import struct
import subprocess
import time

import pytest
from appliance import read_reply
from clients import needs
from hypothesis import given, settings
from hypothesis import strategies as st

from twistmail.pop3.server import DotStuffer


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture
def post(make_appliance):
    a = make_appliance(pop={"nbrsvr": 2}, prestart__QTPOPSRVP={"threshold": 1}).start()
    a.user("SAM")
    a.user("JANE")
    return a


def send(a, rcpt: str, body: bytes, count: int = 1) -> None:
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        for _ in range(count):
            assert s.sendmail("jane@example.test", [rcpt], body) == {}


def pop(a, user: str = "sam", password: str = "secret") -> poplib.POP3:
    p = poplib.POP3(*a.addr("pop3"), timeout=30)
    p.user(user)
    p.pass_(password)
    return p


def test_seed_scenario_send_retrieve_delete(post):
    """Jane sends with smtplib; Sam retrieves with poplib and deletes; the box is empty."""
    a = post
    note = (b"From: jane@example.test\r\nTo: sam@example.test\r\nSubject: Legal\r\n"
            b"Message-ID: <legal-1@example.test>\r\nDate: Sat, 28 Nov 2026 09:00:00 +0000\r\n"
            b"\r\nSam, please review.\r\n")
    send(a, "sam@example.test", note)
    a.wait_mailbox("SAM", 1)
    p = pop(a)
    count, octets = p.stat()
    assert count == 1 and octets == a.mailbox("SAM")[0].stat().st_size
    resp, lines, size = p.retr(1)
    assert resp.startswith(b"+OK")
    assert b"\r\n".join(lines) + b"\r\n" == a.mailbox("SAM")[0].read_bytes()
    assert b"\r\n".join(lines).endswith(note.rstrip(b"\r\n"))
    p.dele(1)
    assert p.quit().startswith(b"+OK")
    # A login right after QUIT waits for its unlinking, so it sees the box empty.
    p = pop(a)
    assert p.stat() == (0, 0)
    assert a.mailbox("SAM") == []
    p.quit()
    codes = [e["code"] for e in a.journal() if e["code"].startswith("Q")]
    assert codes.count("QL") == 2 and "QR" in codes and "QD" in codes
    # Who signed on, in the table too (QR and QD name the profile as well).
    assert {e["esd"] for e in a.journal("QL")} == {"QL LOGIN SAM 127.0.0.1"}
    # dspjrn --msgid follows the message to its reading.
    [accepted] = a.journal("97")
    [read] = a.journal("QR")
    assert read["msgid"] == accepted["msgid"] is not None


@needs("curl")
def test_curl_pop3_and_pop3s(post):
    a = post
    send(a, "sam@example.test", b"Subject: curl\r\n\r\nline\r\n")
    a.wait_mailbox("SAM", 1)
    host, port = a.addr("pop3")
    r = subprocess.run(["curl", "-sS", f"pop3://{host}:{port}/1", "-u", "sam:secret"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == a.mailbox("SAM")[0].read_bytes()
    assert r.stdout.endswith(b"\r\n\r\nline\r\n")
    host, port = a.addr("pop3s")
    r = subprocess.run(["curl", "-sS", "-k", f"pop3s://{host}:{port}/", "-u", "sam:secret"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"1 ")
    # curl with STLS on port 110
    host, port = a.addr("pop3")
    r = subprocess.run(["curl", "-sS", "-k", "--ssl-reqd", f"pop3://{host}:{port}/1",
                        "-u", "sam:secret"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert b"Subject: curl" in r.stdout


@needs("fetchmail")
def test_fetchmail_retrieves_into_a_file(post, tmp_path):
    a = post
    send(a, "sam@example.test", b"Subject: fetch me\r\n\r\n.dot first\r\nend\r\n", count=3)
    a.wait_mailbox("SAM", 3)
    host, port = a.addr("pop3")
    out = tmp_path / "mbox"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll {host} service {port} protocol pop3 timeout 30\n"
        f"  user sam password secret is root here\n"
        f"  fetchall nokeep sslproto '' mda \"/bin/sh -c 'cat >> {out}'\"\n")
    rc.chmod(0o600)
    r = subprocess.run(["fetchmail", "-f", str(rc), "--nosyslog", "-N", "-i", str(tmp_path /
                        "ids")], capture_output=True, text=True, timeout=120,
                       env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    data = out.read_bytes()
    assert data.count(b"Subject: fetch me") == 3
    assert b"\n.dot first\n" in data.replace(b"\r\n", b"\n")
    a.wait_for(lambda: a.mailbox("SAM") == [], 10, "the messages fetchmail deleted to go")


@needs("openssl")
def test_openssl_starttls_pop3(post):
    a = post
    host, port = a.addr("pop3")
    r = subprocess.run(
        ["openssl", "s_client", "-quiet", "-starttls", "pop3", "-connect", f"{host}:{port}"],
        input=b"USER sam\r\nPASS secret\r\nSTAT\r\nQUIT\r\n", capture_output=True,
        timeout=60)
    out = r.stdout
    assert b"+OK SAM has 0 messages" in out and b"+OK 0 0" in out, out + r.stderr


def test_a_pop3s_client_that_never_begins_its_handshake_is_cut_at_the_idle_time(
        make_appliance):
    """Its greeting waits for a handshake that never comes: it used to hold
    the job for the idle time and then the 10-second grace."""
    a = make_appliance(pop={"nbrsvr": 2, "inacttimo": 10},
                       prestart__QTPOPSRVP={"threshold": 1}).start()
    silent = socket.create_connection(a.addr("pop3s"), timeout=30)  # not even a ClientHello
    began = time.monotonic()
    try:
        assert silent.recv(1) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - began < 16
    silent.close()
    a.wait_for(lambda: a.count("QTPOPSRVP", "PSRW") == 2, 10, "the job to be free again")


def test_what_a_tls_client_sends_after_quit_does_not_cut_its_last_replies(post):
    """The client reads a large RETR slowly and sends more (a NOOP, or its
    close_notify) after QUIT: a socket closed under it would answer with a
    reset, and the client would lose the rest of the message and the DELE's
    message with it."""
    a = post
    body = b"Subject: big\r\n\r\n" + b"".join(b"%07d " % i + b"x" * 70 + b"\r\n"
                                           for i in range(80000))  # about 6 MB
    send(a, "sam@example.test", body)
    [path] = a.wait_mailbox("SAM", 1)
    stored = path.read_bytes()
    raw = socket.create_connection(a.addr("pop3s"), timeout=30)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    tls = tls_context().wrap_socket(raw, server_hostname="mail.example.test")
    assert read_reply(tls).startswith(b"+OK")
    tls.sendall(b"USER sam\r\nPASS secret\r\n")
    assert read_reply(tls).startswith(b"+OK") and read_reply(tls).startswith(b"+OK")
    tls.sendall(b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
    got = b""
    slow_until = time.monotonic() + 2.5  # the server gets to QUIT, megabytes still queued
    while time.monotonic() < slow_until:
        got += tls.recv(16384)
        time.sleep(0.01)
    tls.sendall(b"NOOP\r\n")
    while not got.endswith(b"signing off (1 message deleted)\r\n") and len(got) < 10 ** 8:
        chunk = tls.recv(65536)
        if not chunk:
            break
        got += chunk
    tls.close()
    head, _, rest = got.partition(b"\r\n")
    assert head.startswith(b"+OK")
    message, _, after = rest.partition(b"\r\n.\r\n")
    assert message.replace(b"\r\n..", b"\r\n.") + b"\r\n" == stored
    assert after.startswith(b"+OK Message 1 marked for deletion\r\n+OK ")
    assert after.endswith(b"signing off (1 message deleted)\r\n"), after[-200:]


def test_a_client_that_ends_tls_mid_retr_loses_no_message_it_did_not_get_whole(post):
    """TLS 1.3 lets a client send its close_notify and read on.  Twisted
    drops every reply from then on, and the pipelined DELE and QUIT behind a
    large RETR used to run all the same: the message was deleted, the client
    holding a part of it."""
    from OpenSSL import SSL

    a = post
    body = b"Subject: big\r\n\r\n" + b"".join(b"%07d " % i + b"x" * 70 + b"\r\n"
                                           for i in range(80000))  # about 6 MB
    send(a, "sam@example.test", body)
    a.wait_mailbox("SAM", 1)
    raw = socket.create_connection(a.addr("pop3s"), timeout=30)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.settimeout(None)  # blocking, as OpenSSL wants it; the kernel's timeout instead:
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 30, 0))
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), raw)
    conn.set_connect_state()
    conn.do_handshake()
    got = b""
    while got.count(b"\r\n") < 3:
        if got.count(b"\r\n") == 1 and b"USER" not in got:
            conn.sendall(b"USER sam\r\nPASS secret\r\n")
            got += b"USER"
        got += conn.recv(4096)
    conn.sendall(b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
    got = b""
    while len(got) < 1_000_000:  # a slow reader: the RETR is far from sent
        got += conn.recv(16384)
        time.sleep(0.005)
    conn.shutdown()  # close_notify; the client reads on
    while True:
        try:
            chunk = conn.recv(65536)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            break
        if not chunk:
            break
        got += chunk
    raw.close()
    whole = got.endswith(b"signing off (1 message deleted)\r\n")

    def left() -> int | None:
        try:
            p = pop(a)
        except poplib.error_proto:  # the ended session still holds the mailbox
            return None
        count = p.stat()[0]
        p.quit()
        return count + 1  # a count of 0 must not read as "not yet"

    assert a.wait_for(left, 15, "a sign-on") == (1 if whole else 2)


def test_stls_discards_pipelined_plaintext(post):
    """CVE-2011-0411 class: commands sent with STLS in the clear must not run after TLS."""
    a = post
    raw = socket.create_connection(a.addr("pop3"), timeout=10)
    read_reply(raw)
    raw.sendall(b"STLS\r\nUSER sam\r\nPASS secret\r\n")
    assert read_reply(raw).startswith(b"+OK Begin TLS")
    tls = tls_context().wrap_socket(raw, server_hostname="mail.example.test")
    tls.sendall(b"STAT\r\n")
    # The injected USER/PASS were dropped: still in AUTHORIZATION.
    assert read_reply(tls).startswith(b"-ERR STAT is not allowed in the AUTHORIZATION")
    tls.sendall(b"CAPA\r\n")
    capa = b""
    while not capa.endswith(b"\r\n.\r\n"):
        capa += tls.recv(4096)
    assert b"STLS" not in capa  # not offered twice
    tls.close()


@pytest.mark.parametrize("offset", [16 * 1024, 64 * 1024])
def test_dot_stuffing_at_chunk_boundaries(post, offset):
    """Twisted's POP3 lost a dot at its 16 KiB chunk edges; a lone dot must never leak."""
    a = post
    head = b"Subject: dots\r\n\r\n"
    trace = 200  # room for the trace headers; try every alignment nearby
    filler = b"".join(b"x" * 62 + b"\r\n" for _ in range(offset // 64 + 8))
    body = head + filler[: offset - trace] + b".\r\nQUIT\r\n.\r\n" + b"+OK injected\r\n" + \
        b".\r\n.\r\n..\r\n" + filler[:3000] + b".\r\n"
    for shift in range(0, 8):
        msg = head + b"y" * shift + b"\r\n" + body[len(head):]
        send(a, "sam@example.test", msg.replace(b"\r\n.", b"\r\n.."))
    a.wait_mailbox("SAM", 8)
    p = pop(a)
    files = a.mailbox("SAM")  # moved to cur/ by the session
    files.sort(key=lambda f: f.name)
    for n, path in enumerate(files, 1):
        resp, lines, _ = p.retr(n)
        assert b"\r\n".join(lines) + b"\r\n" == path.read_bytes()
    assert p.stat()[0] == 8  # the session is still in sync
    p.quit()


def test_maildir_semantics(post):
    a = post
    for i in range(3):
        send(a, "sam@example.test", f"Subject: m{i}\r\n\r\nline1\r\nline2\r\nline3\r\n".encode())
    files = a.wait_mailbox("SAM", 3)
    p = pop(a)
    uidls = p.uidl()[1]
    assert [u.split()[0] for u in uidls] == [b"1", b"2", b"3"]
    top = p.top(2, 1)[1]
    assert top[top.index(b"") - 1].startswith(b"Date:") or b"Subject: m1" in top
    assert top[top.index(b"") + 1:] == [b"line1"]
    assert p.top(2, 0)[1][-1] == b""
    # Arrival order.
    assert b"Subject: m0" in b"\n".join(p.retr(1)[1])
    p.dele(1)
    with pytest.raises(poplib.error_proto):
        p.retr(1)
    assert p.stat()[0] == 2
    p.rset()
    assert p.stat()[0] == 3
    p.dele(2)
    # New mail during the session appears only in the next one.
    send(a, "sam@example.test", b"Subject: late\r\n\r\nx\r\n")
    a.wait_mailbox("SAM", 4)
    assert p.stat()[0] == 2
    # A session that ends without QUIT deletes nothing.
    p.file.close()
    p.sock.close()
    time.sleep(0.5)
    p = pop(a)
    assert p.stat()[0] == 4
    again = p.uidl()[1]
    assert again[:3] == uidls  # stable across sessions
    p.dele(1)
    p.quit()
    # Stable across a restart of the whole appliance.
    before = pop(a)  # waits for the QUIT above to finish unlinking
    assert len(a.mailbox("SAM")) == 3
    assert files[0] not in a.mailbox("SAM")
    listing = before.uidl()[1]
    before.quit()
    a.stop()
    a.start()
    after = pop(a)
    assert after.uidl()[1] == listing
    after.quit()


def test_one_session_per_mailbox(post):
    a = post
    first = pop(a)
    second = poplib.POP3(*a.addr("pop3"), timeout=30)
    second.user("sam")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_("secret")
    first.quit()
    second = pop(a)
    second.quit()


def test_failed_login_disabled_profile_and_delay(post):
    a = post
    p = poplib.POP3(*a.addr("pop3"), timeout=30)
    p.user("sam")
    t0 = time.monotonic()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.pass_("wrong")
    first = time.monotonic() - t0
    p.user("sam")
    t0 = time.monotonic()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.pass_("wrong again")
    second = time.monotonic() - t0
    print(f"failed-login delays: {first:.2f}s then {second:.2f}s")
    fails = a.journal("QF")
    assert [e["failures"] for e in fails] == [1, 2]
    assert fails[0]["ip"] == "127.0.0.1"
    assert a.cli("chgusrprf", "--usrprf", "SAM", "--status", "*DISABLED")[0] == 0
    p = poplib.POP3(*a.addr("pop3"), timeout=30)
    p.user("sam")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.pass_("secret")


def test_alwssl_only_and_no(make_appliance):
    a = make_appliance(pop={"alwssl": "*ONLY", "nbrsvr": 1}).start()
    a.user("SAM")
    p = poplib.POP3(*a.addr("pop3"), timeout=30)
    with pytest.raises(poplib.error_proto, match="use STLS first, or the POP3S port"):
        p.user("sam")
    p.stls(tls_context())
    p.user("sam")
    assert p.pass_("secret").startswith(b"+OK")
    p.quit()
    p = poplib.POP3_SSL(*a.addr("pop3s"), timeout=30, context=tls_context())
    p.user("sam")
    p.pass_("secret")
    p.quit()

    b = make_appliance(pop={"alwssl": "*NO", "nbrsvr": 1}).start()
    p = poplib.POP3(*b.addr("pop3"), timeout=30)
    assert "STLS" not in p.capa()
    p.quit()


def test_login_records_pop_before_smtp(post):
    a = post
    pop(a).quit()
    from twistmail.config import load
    from twistmail.directory import SqliteDirectory

    d = SqliteDirectory.from_settings(load(a.config))
    assert d.pop_login_since("127.0.0.1", time.time() - 60) == "SAM"


def test_msgsplit_offers_message_partial_pieces(make_appliance):
    a = make_appliance(pop={"msgsplit": 32, "nbrsvr": 1}).start()
    a.user("SAM")
    body = b"".join(b"line %05d " % i + b"z" * 60 + b"\r\n" for i in range(1500))
    original = b"From: jane@example.test\r\nSubject: big one\r\n\r\n" + body
    send(a, "sam@example.test", original)
    send(a, "sam@example.test", b"Subject: small\r\n\r\nx\r\n")
    stored = [p.read_bytes() for p in a.wait_mailbox("SAM", 2)]
    p = pop(a)
    count, _ = p.stat()
    assert count > 3
    pieces = []
    for n in range(1, count):
        raw = b"\r\n".join(p.retr(n)[1]) + b"\r\n"
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        assert msg.get_content_type() == "message/partial"
        assert int(msg.get_param("number")) == n and int(msg.get_param("total")) == count - 1
        assert msg["Subject"] == f"big one (part {n} of {count - 1})"
        assert len(raw) <= 32 * 1024
        pieces.append(raw.split(b"\r\n\r\n", 1)[1])
    assert b"".join(pieces) == stored[0]  # the pieces reassemble the message
    assert b"Subject: small" in b"\r\n".join(p.retr(count)[1])
    # Deleting every piece deletes the message.
    for n in range(1, count):
        p.dele(n)
    p.quit()
    a.wait_for(lambda: len(a.mailbox("SAM")) == 1, 10, "the pieces' message to go")


def test_pieces_deleted_a_few_at_a_time_are_not_offered_again(make_appliance):
    """fetchmail's FETCHLIMIT: DELE of some pieces, QUIT, and the next poll goes on."""
    a = make_appliance(pop={"msgsplit": 32, "nbrsvr": 1}).start()
    a.user("SAM")
    body = b"".join(b"line %05d " % i + b"z" * 60 + b"\r\n" for i in range(1500))
    send(a, "sam@example.test", b"Subject: big one\r\n\r\n" + body)
    a.wait_mailbox("SAM", 1)
    p = pop(a)
    count, _ = p.stat()
    uidls = [line.split()[1] for line in p.uidl()[1]]
    assert count == len(uidls) > 3
    p.dele(1)
    p.dele(2)
    assert p.quit().endswith(b"(2 messages deleted)")
    p = pop(a)
    assert p.stat()[0] == count - 2
    assert [line.split()[1] for line in p.uidl()[1]] == uidls[2:]
    raw = b"\r\n".join(p.retr(1)[1])
    assert f"(part 3 of {count})".encode() in raw
    for n in range(1, count - 1):
        p.dele(n)
    p.quit()
    a.wait_for(lambda: a.mailbox("SAM") == [], 10, "the message to go with its last piece")
    p = pop(a)
    assert p.stat() == (0, 0)
    p.quit()
    assert not (a.datadir / "mailboxes" / "SAM" / "Maildir" / ".twistmail.pieces").exists()


def test_pipelined_commands_answered_in_order(post):
    a = post
    send(a, "sam@example.test", b"Subject: p\r\n\r\nx\r\n")
    a.wait_mailbox("SAM", 1)
    s = socket.create_connection(a.addr("pop3"), timeout=10)
    read_reply(s)
    s.sendall(b"USER sam\r\nPASS secret\r\nSTAT\r\nNOOP\r\nQUIT\r\n")
    replies = [read_reply(s) for _ in range(5)]
    assert [r[:3] for r in replies] == [b"+OK"] * 5
    assert replies[2].startswith(b"+OK 1 ")


def test_a_client_that_shuts_down_its_side_after_quit_has_it_all_answered(post):
    """``nc -N``: the whole session, then a FIN; PASS waits for a thread meanwhile.

    Taken for the connection's end, the FIN dropped PASS, DELE and QUIT: the
    deletion the client asked for did not happen.  SMTP likewise, RCPT onwards.
    """
    a = post
    send(a, "sam@example.test", b"Subject: p\r\n\r\nx\r\n")
    a.wait_mailbox("SAM", 1)
    s = socket.create_connection(a.addr("pop3"), timeout=10)
    read_reply(s)
    s.sendall(b"USER sam\r\nPASS secret\r\nSTAT\r\nDELE 1\r\nQUIT\r\n")
    s.shutdown(socket.SHUT_WR)
    replies = [read_reply(s) for _ in range(5)]
    assert [r[:3] for r in replies] == [b"+OK"] * 5 and s.recv(100) == b""
    a.wait_for(lambda: a.mailbox("SAM") == [], 10, "the deletion QUIT committed")
    s = socket.create_connection(a.addr("smtp"), timeout=10)
    s.sendall(b"EHLO c.example\r\nMAIL FROM:<jane@example.test>\r\n"
              b"RCPT TO:<sam@example.test>\r\nDATA\r\nSubject: n\r\n\r\nhi\r\n.\r\n")
    s.shutdown(socket.SHUT_WR)  # and no QUIT: the session ends once DATA is answered
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    assert b"250 2.0.0 Ok: queued" in data, data
    a.wait_mailbox("SAM", 1)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x", b"x.", b" ."]), max_size=20),
    cuts=st.lists(st.integers(min_value=1, max_value=7), max_size=40),
)
def test_dot_stuffer_any_chunking(lines, cuts):
    data = b"".join(line + b"\r\n" for line in lines)
    stuffer = DotStuffer()
    out = b""
    pos = 0
    for c in cuts:
        out += stuffer.feed(data[pos:pos + c])
        pos += c
    out += stuffer.feed(data[pos:]) + stuffer.end()
    assert out.endswith(b"\r\n.\r\n") or out == b".\r\n"
    body = out[: -len(b".\r\n")]
    got = [] if not body else body[:-2].split(b"\r\n")
    assert b"." not in got  # no line of the body is a lone dot
    assert [g[1:] if g.startswith(b".") else g for g in got] == lines
