"""STARTTLS, implicit TLS, AUTH and relay decisions with real clients."""

from __future__ import annotations

import poplib
import smtplib
import socket
import ssl
import subprocess

import pytest
from appliance import read_reply
from clients import needs


def ctx() -> ssl.SSLContext:
    c = ssl.create_default_context()
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    return c


@pytest.fixture
def post(make_appliance):
    a = make_appliance().start()
    a.user("SAM")
    return a


def test_starttls_then_auth_lets_a_user_relay(post):
    a = post
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        assert s.has_extn("starttls") and not s.has_extn("auth")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            s.sendmail("sam@example.test", ["friend@remote.test"], b"Subject: x\r\n\r\ny\r\n")
        assert refused.value.recipients["friend@remote.test"][0] == 550
        s.starttls(context=ctx())
        s.ehlo()
        assert s.has_extn("auth") and not s.has_extn("starttls")
        assert s.login("sam", "secret")[0] == 235
        assert s.sendmail("sam@example.test", ["friend@remote.test"],
                          b"Subject: out\r\n\r\nto the world\r\n") == {}
    a.wait_for(lambda: a.queue_files("QTMSOUTQ"), 10, "relayed message on QTMSOUTQ")
    codes = {e["code"] for e in a.journal()}
    assert {"9V", "9Z", "95", "96"} <= codes


def test_auth_with_smtp_address_and_bad_password(post):
    a = post
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.starttls(context=ctx())
        s.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("sam", "nope")
        assert e.value.smtp_code == 535
        assert s.login("sam@example.test", "secret")[0] == 235


def test_starttls_discards_pipelined_plaintext_cve_2011_0411(post):
    a = post
    raw = socket.create_connection(a.addr("smtp"), timeout=10)
    read_reply(raw)
    raw.sendall(b"EHLO x\r\n")
    while not read_reply(raw).startswith(b"250 "):
        pass
    # The injected commands ride in the same packet as STARTTLS.
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<sam@example.test>\r\n")
    assert read_reply(raw).startswith(b"220 2.0.0")
    tls = ctx().wrap_socket(raw, server_hostname="mail.example.test")
    tls.sendall(b"NOOP\r\n")
    assert read_reply(tls).startswith(b"250 2.0.0 Ok")  # no stray replies queued
    # The session starts afresh: HELO is needed again, and no transaction exists.
    tls.sendall(b"RCPT TO:<sam@example.test>\r\n")
    assert read_reply(tls).startswith(b"503")
    tls.sendall(b"EHLO x\r\nDATA\r\n")
    while not read_reply(tls).startswith(b"250 "):
        pass
    assert read_reply(tls).startswith(b"503 5.5.1 Error: need MAIL")
    tls.close()


def test_implicit_tls_on_smtps_offers_auth_not_starttls(post):
    """465 is submission over TLS (RFC 8314 §3.3): as on 587, a client signs on first."""
    a = post
    with smtplib.SMTP_SSL(*a.addr("smtps"), timeout=30, context=ctx()) as s:
        s.ehlo()
        assert not s.has_extn("starttls") and s.has_extn("auth")
        assert s.mail("sam@example.test")[0] == 530
        assert s.login("sam", "secret")[0] == 235
        assert s.mail("sam@example.test")[0] == 250


def test_the_self_signed_certificate_verifies_for_the_loopback_addresses(post):
    """A client given the made certificate as its trust anchor, pointed at 127.0.0.1."""
    a = post
    verifying = ssl.create_default_context(cafile=str(a.datadir / "tls" / "cert.pem"))
    host, port = a.addr("smtps")
    assert host == "127.0.0.1"
    with smtplib.SMTP_SSL(host, port, timeout=30, context=verifying) as s:
        assert s.ehlo()[0] == 250


def test_submission_requires_auth(post):
    a = post
    with smtplib.SMTP(*a.addr("submission"), timeout=30) as s:
        s.starttls(context=ctx())
        s.ehlo()
        code, text = s.mail("sam@example.test")
        assert code == 530
        s.login("sam", "secret")
        assert s.mail("sam@example.test")[0] == 250


@needs("openssl")
def test_openssl_starttls_smtp(post):
    a = post
    host, port = a.addr("smtp")
    r = subprocess.run(
        ["openssl", "s_client", "-quiet", "-starttls", "smtp", "-connect", f"{host}:{port}"],
        input=b"EHLO client\r\nQUIT\r\n", capture_output=True, timeout=60)
    assert b"250-AUTH PLAIN LOGIN" in r.stdout or b"250 AUTH PLAIN LOGIN" in r.stdout
    assert b"221 2.0.0" in r.stdout


def test_pop_before_smtp_window(make_appliance):
    a = make_appliance(smtp={"alwrly": "*POPWDW", "popwdw": 15, "alwauth": "*NONE"}).start()
    a.user("SAM")
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        assert not s.has_extn("auth")
        s.mail("sam@example.test")
        assert s.rcpt("friend@remote.test")[0] == 550
    p = poplib.POP3(*a.addr("pop3"), timeout=30)
    p.user("sam")
    p.pass_("secret")
    p.quit()
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        assert s.sendmail("sam@example.test", ["friend@remote.test"], b"Subject: p\r\n\r\nx\r\n"
                          ) == {}


def test_alwrly_all_and_none(make_appliance):
    a = make_appliance(smtp={"alwrly": "*ALL"}).start()
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        s.mail("x@elsewhere.test")
        assert s.rcpt("friend@remote.test")[0] == 250


def test_vfyfromusr_checks_the_sender(make_appliance):
    a = make_appliance(smtp={"vfyfromusr": "*YES"}).start()
    a.user("SAM")
    a.user("JANE")
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        code, text = s.mail("stranger@remote.test")
        assert code == 553 and b"VFYFROMUSR" in text
        assert s.mail("jane@example.test")[0] == 250
        s.rset()
        assert s.mail("<>")[0] == 250  # notices keep their null sender
        s.rset()
        s.starttls(context=ctx())
        s.ehlo()
        s.login("sam", "secret")
        code, text = s.mail("jane@example.test")
        assert code == 553 and b"another user than SAM" in text
        assert s.mail("sam@example.test")[0] == 250


def relay_code(a, source: str, rcpt: str) -> int:
    with smtplib.SMTP(*a.addr("smtp"), timeout=30, source_address=(source, 0)) as s:
        s.ehlo()
        s.mail("someone@elsewhere.test")
        return s.rcpt(rcpt)[0]


@pytest.mark.parametrize(
    ("alwrly", "expected"),
    [
        # (near domain from a listed client, far domain from listed, near from unlisted,
        #  far from unlisted)
        ("*NEAR", [250, 550, 250, 550]),
        ("*LIST", [250, 250, 550, 550]),
        ("*BOTH", [250, 250, 250, 550]),
        ("*NONE", [550, 550, 550, 550]),
    ],
)
def test_relay_lists(make_appliance, alwrly, expected):
    a = make_appliance(smtp={"alwrly": alwrly}).start()
    assert a.cli("addsmtple", "--type", "*NEAR", "--hostname", "partner.test")[0] == 0
    assert a.cli("addsmtple", "--type", "*ACCEPT", "--intnetadr", "127.0.0.7")[0] == 0
    got = [relay_code(a, "127.0.0.7", "x@mail.partner.test"),
           relay_code(a, "127.0.0.7", "x@far.test"),
           relay_code(a, "127.0.0.8", "x@partner.test"),
           relay_code(a, "127.0.0.8", "x@far.test")]
    assert got == expected


def test_what_the_server_refuses_is_journaled_as_9w(post):
    """9W is the seed's "rejected by the SMTP server": an administrator asked
    why mail did not arrive finds the refusal, its reply and the client."""
    a = post
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        assert s.mail("jane@remote.test", ["SIZE=999999999"])[0] == 552
        assert s.mail("jane@remote.test")[0] == 250
        assert s.rcpt("nobody@example.test")[0] == 550
        assert s.rcpt("sam@example.test")[0] == 250
        assert s.data(b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n")[0] == 550
    entries = a.wait_for(lambda: [e for e in a.journal("9W")] if len(a.journal("9W")) >= 3
                         else None, 10, "three 9W entries")
    size, rcpt, data = entries
    assert size["originator"] == "jane@remote.test" and size["reply"].startswith("552 5.3.4")
    assert rcpt["recipient"] == "nobody@example.test" and rcpt["reply"].startswith("550 5.1.1")
    assert data["originator"] == "jane@remote.test" and data["reply"].startswith("550 5.6.0")
    assert {e["ip"] for e in entries} == {"127.0.0.1"}
    assert rcpt["esd"] == "9W RJT 127.0.0.1 nobody@example.test"
    assert not [e for e in a.journal("9Z")]  # nobody signed on


def test_a_session_ended_for_too_many_errors_is_journaled_jl(make_appliance):
    a = make_appliance(limits={"maxerrors": 3}).start()
    s = socket.create_connection(a.addr("smtp"), timeout=30)
    assert read_reply(s).startswith(b"220 ")
    s.sendall(b"BOGUS\r\nBOGUS\r\nBOGUS\r\n")
    replies = b""
    while b"421 " not in replies:
        chunk = s.recv(4096)
        assert chunk, replies
        replies += chunk
    s.close()
    [entry] = a.wait_for(lambda: a.journal("JL"), 10, "the JL entry")
    assert (entry["esd"], entry["setting"]) == ("JL LIMIT limits.maxerrors 127.0.0.1",
                                                "limits.maxerrors")


def test_a_failed_tls_handshake_is_one_log_line_naming_the_client(post):
    """The client sees only a closed connection: the log must say why, as
    Postfix logs SSL_accept errors."""
    a = post
    for service in ("smtps", "pop3s"):
        with socket.create_connection(a.addr(service), timeout=30) as s:
            s.sendall(b"EHLO not-a-client-hello\r\n")  # text where a ClientHello belongs
            s.settimeout(30)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    a.wait_for(lambda: a.log_text().count("TLS with 127.0.0.1 failed: ") >= 2, 10,
               "the failed handshakes in the log")
    assert "Traceback" not in a.log_text()
    # Named after the job that wrote it, not only the launcher whose pipes it shares.
    [line] = [x for x in a.log_text().splitlines()
              if "TLS with" in x and "SMTPSession" in x]
    assert "QTSMTPSRVP/" in line, line
