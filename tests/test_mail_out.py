"""Mail leaves the box: client jobs deliver through the mail router, retry, and bounce."""

from __future__ import annotations

import email
import email.policy
import email.utils
import json
import os
import signal
import smtplib
import threading
import time

import pytest
from appliance import break_maildir
from test_smtp_client import Behaviour, Sink


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.stop()


def outbound(make_appliance, sink, **smtp):
    settings = {"mailrouter": f"127.0.0.1:{sink.port}", "firewall": "*YES", "alwrly": "*ALL",
                "rtymin": [2, 0], **smtp}
    a = make_appliance(smtp=settings).start()
    a.user("SAM")
    return a


def send(a, rcpts, body=b"Subject: out\r\n\r\nto the world\r\n"):
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        return s.sendmail("sam@example.test", rcpts, body)


def test_relayed_mail_is_delivered_by_a_client_job(make_appliance, sink):
    a = outbound(make_appliance, sink)
    send(a, ["friend@remote.test", "other@remote.test"])
    a.wait_for(lambda: sink.messages, 20, "delivery to the mail router")
    [m] = sink.messages  # one connection, one transaction for both recipients
    assert sorted(m.recipients) == ["friend@remote.test", "other@remote.test"]
    assert m.content.endswith(b"\r\n\r\nto the world\r\n")
    a.wait_for(lambda: not a.queue_files("QTMSOUTQ"), 10, "QTMSOUTQ to empty")
    codes = [e["code"] for e in a.journal()]
    assert {"96", "8B", "88", "82"} <= set(codes)
    assert codes.count("82") == 2
    rc, out, err = a.cli("dspactpj", "--pgm", "QTMSCCLCP")
    assert rc == 0 and "Program start requests: number accepted" in out, err
    # The bridge publishes its client pool once a second.
    a.wait_for(lambda: "QTSMTPCLTP" in a.cli("wrkactjob")[1], 5, "client jobs listed")


def test_eight_bit_mail_is_made_seven_bit_for_a_server_without_8bitmime(make_appliance, sink):
    sink.behaviour = Behaviour(extensions=("PIPELINING", "SIZE 10000000"))
    a = outbound(make_appliance, sink)
    body = ("Subject: caf\u00e9\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            "\r\nd\u00e9j\u00e0 vu, once more with feeling\r\n").encode()
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("sam@example.test", ["friend@remote.test"], body, mail_options=["BODY=8BITMIME"])
    a.wait_for(lambda: sink.messages, 20, "delivery to the mail router")
    sent = sink.messages[0].content
    assert sent.split(b"\r\n\r\n", 1)[1].isascii()
    assert b"Content-Transfer-Encoding: quoted-printable" in sent
    assert "Subject: caf\u00e9\r\n".encode() in sent  # header fields go as they came
    msg = email.message_from_bytes(sent, policy=email.policy.default)
    assert msg.get_content() == "d\u00e9j\u00e0 vu, once more with feeling\r\n"


def test_permanent_failure_makes_one_notice(make_appliance, sink):
    sink.behaviour = Behaviour(rcpt=lambda addr: "550 5.1.1 no such user"
                               if addr.startswith("bad") else "250 2.1.5 ok")
    a = outbound(make_appliance, sink)
    send(a, ["bad@remote.test", "good@remote.test"])
    a.wait_for(lambda: sink.messages, 20, "the good recipient")
    [notice] = a.wait_mailbox("SAM", 1)
    msg = email.message_from_bytes(notice.read_bytes(), policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    raw = notice.read_bytes()
    assert b"Final-Recipient: rfc822; bad@remote.test" in raw and b"good@remote.test" not in \
        raw.split(b"message/delivery-status")[1].split(b"text/rfc822-headers")[0]
    assert b"\r\nRemote-MTA: dns; 127.0.0.1\r\n" in raw  # the router that refused it
    assert {"83", "87", "AP"} <= {e["code"] for e in a.journal()}
    a.wait_for(lambda: not a.queue_files("QTMSOUTQ"), 10)


def test_temporary_failure_retries_only_the_failed_recipient(make_appliance, sink):
    tries = {"n": 0}

    def rcpt(addr: str) -> str:
        if addr.startswith("slow"):
            tries["n"] += 1
            return "451 4.2.0 try later" if tries["n"] == 1 else "250 2.1.5 ok"
        return "250 2.1.5 ok"

    sink.behaviour = Behaviour(rcpt=rcpt)
    a = outbound(make_appliance, sink)
    send(a, ["slow@remote.test", "fast@remote.test"])
    a.wait_for(lambda: len(sink.messages) == 2, 30, "first delivery, then the retry")
    assert sink.messages[0].recipients == ["fast@remote.test"] or \
        sorted(sink.messages[0].recipients) == ["fast@remote.test", "slow@remote.test"]
    assert sink.messages[1].recipients == ["slow@remote.test"]
    codes = [e["code"] for e in a.journal()]
    assert "8C" in codes and "8E" in codes
    a.wait_for(lambda: not a.queue_files("QTMSOUTQ") and not a.queue_files("QTMSRTQ1"), 10)
    assert a.mailbox("SAM") == []  # no notice: everything was delivered


def test_retries_used_up_make_a_notice(make_appliance, sink):
    sink.behaviour = Behaviour(rcpt=lambda addr: "451 4.2.0 try later")
    a = outbound(make_appliance, sink, rtymin=[1, 0], rtyhour=[1, 0])
    send(a, ["never@remote.test"])
    [notice] = a.wait_mailbox("SAM", 1, timeout=40)
    assert b"Final-Recipient: rfc822; never@remote.test" in notice.read_bytes()
    codes = [e["code"] for e in a.journal()]
    assert codes.count("8B") == 3  # the first try, one from RTQ1, one from RTQ2
    assert {"8C", "8D", "8E", "8F", "83"} <= set(codes)


def test_hold_and_release_outbound(make_appliance, sink):
    a = outbound(make_appliance, sink)
    rc, out, err = a.cli("hlddstq", "--dstq", "QSMTPQ")
    assert rc == 0, err
    send(a, ["friend@remote.test"])
    time.sleep(3)
    assert sink.messages == []
    rc, out, err = a.cli("wrkq", "--queue", "QTMSOUTQ")
    assert "friend@remote.test" in out and " held " in out, out
    # ENDMSF: nothing can send it; it showed as "sending".
    assert a.cli("endmsf")[0] == 0
    rc, out, err = a.cli("rlsdstq", "--dstq", "QSMTPQ")
    assert rc == 0
    rc, out, err = a.cli("wrkq", "--queue", "QTMSOUTQ", "--json")
    assert '"stopped"' in out, out
    assert a.cli("strmsf")[0] == 0
    a.wait_for(lambda: sink.messages, 20, "delivery after the release")
    rc, out, err = a.cli("hlddstq", "--dstq", "QXYZ")
    assert rc == 2 and "QSMTPQ" in err


def test_endtcpsvr_smtp_ends_the_client_jobs_and_keeps_mail_queued(make_appliance, sink):
    """IBM i: ENDTCPSVR *SMTP ends the server, client and bridge jobs of SMTP."""
    a = outbound(make_appliance, sink)
    a.wait_for(lambda: a.count("QTMSCCLCP") > 0, 20, "client jobs")
    assert a.cli("hlddstq", "--dstq", "QSMTPQ")[0] == 0
    send(a, ["friend@remote.test"])
    rc, out, err = a.cli("endtcpsvr", "--server", "*SMTP")
    assert rc == 0, err
    # Not ACTIVE while the bridge has not yet written that they ended.
    assert a.control("status")["pools"]["QTMSCCLCP"] in ("ENDING", "ENDED")
    assert a.control("dspactpj", pgm="QTMSCCLCP")["status"] in ("ENDING", "ENDED")
    a.wait_for(lambda: a.count("QTMSCCLCP") == 0, 20, "the client jobs to end")
    a.wait_for(lambda: a.control("status")["pools"]["QTMSCCLCP"] == "ENDED", 10, "ENDED")
    assert a.cli("rlsdstq", "--dstq", "QSMTPQ")[0] == 0
    time.sleep(3)
    assert sink.messages == []  # SMTP is still ended
    rc, out, err = a.cli("wrkq", "--queue", "QTMSOUTQ", "--json")
    assert rc == 0 and '"held"' in out, out
    rc, out, err = a.cli("strtcpsvr", "--server", "*SMTP")
    assert rc == 0, err
    a.wait_for(lambda: sink.messages, 30, "delivery once SMTP is started again")
    a.wait_for(lambda: a.count("QTMSCCLCP") > 0, 10, "client jobs listed again")


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_client_jobs_are_forks_of_a_launcher_the_bridge_forked(make_appliance, sink):
    """No interpreter starts for it; after its death an exec'd one takes over."""
    a = outbound(make_appliance, sink)
    a.wait_for(lambda: a.count("QTMSCCLCP", "PSRW") > 0, 20, "a client job")
    bridge = a.control("status")["bridge"]["pid"]
    [job] = [r["pid"] for r in a.jobs("QTMSCCLCP")]
    launcher = _parent_of(job)
    assert open(f"/proc/{launcher}/comm").read().strip() == "QZMFLNCH"
    assert _parent_of(launcher) == bridge
    assert "twistmail.bridge.main" in open(f"/proc/{launcher}/cmdline").read()
    os.kill(launcher, signal.SIGKILL)  # its job dies with it
    a.wait_for(lambda: [r for r in a.jobs("QTMSCCLCP")
                        if r["status"] == "PSRW" and r["pid"] != job], 20, "a new client job")
    [fresh] = [r["pid"] for r in a.jobs("QTMSCCLCP")]
    assert _parent_of(_parent_of(fresh)) == bridge
    send(a, ["friend@remote.test"])
    a.wait_for(lambda: sink.messages, 20, "delivery by the new job")
    assert "selected twice" not in a.log_text()  # each job sets up its own log, once


def test_chgpje_of_the_client_pool_applies_live(make_appliance, sink):
    a = outbound(make_appliance, sink)
    rc, out, err = a.cli("chgpje", "--pgm", "QTMSCCLCP", "--inljobs", "2", "--maxjobs", "5")
    assert rc == 0, err
    a.wait_for(lambda: a.count("QTMSCCLCP", "PSRW") == 2, 20, "two client jobs")
    assert a.control("status")["pools"]["QTMSCCLCP"] == "ACTIVE"  # the bridge's, listed too
    rc, out, err = a.cli("strpj", "--pgm", "QTMSCCLCP")
    assert rc == 1 and "ENDMSF" in err and "not running" not in err


def test_percent_routing(make_appliance, sink):
    a = outbound(make_appliance, sink, pctrtgchr="*YES")
    send(a, ["friend%remote.test@example.test"])
    a.wait_for(lambda: sink.messages, 20, "% routed delivery")
    assert sink.messages[0].recipients == ["friend@remote.test"]
    send(a, ["sam%example.test@example.test"])  # % to a local domain: local mail
    a.wait_for(lambda: a.mailbox("SAM"), 20, "% routed local delivery")
    assert len(sink.messages) == 1
    b = outbound(make_appliance, sink)  # *NO, the default: % is part of a local name
    with smtplib.SMTP(*b.addr("smtp"), timeout=30) as s:
        s.ehlo()
        s.mail("sam@example.test")
        assert s.rcpt("friend%remote.test@example.test")[0] == 550


def test_mx_routing_through_a_loopback_dns(make_appliance, dns):
    import socket

    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("127.0.0.3", 25))
    except OSError:
        pytest.skip("cannot listen on 127.0.0.3:25 here")
    finally:
        probe.close()
    mx_sink = Sink(host="127.0.0.3", port=25)
    try:
        _mx_routing(make_appliance, dns, mx_sink)
    finally:
        mx_sink.stop()


def _mx_routing(make_appliance, dns, mx_sink) -> None:
    port = dns({
        "remote.test": {"MX": [[10, "mx1.remote.test"], [20, "mx2.remote.test"]]},
        "mx1.remote.test": {"A": ["127.0.0.3"]},
        "mx2.remote.test": {"A": ["127.0.0.4"]},
        "nullmx.test": {"MX": [[0, "."]]},
    })
    # Quick first-level retries: a DNS answer slowed by a busy machine is a
    # temporary failure, and must not wait the default 30 minutes.
    a = make_appliance(smtp={"alwrly": "*ALL", "nameservers": [f"127.0.0.1:{port}"],
                             "rtymin": [5, 0]}).start()
    a.user("SAM")
    send(a, ["friend@remote.test", "x@nullmx.test"])
    a.wait_for(lambda: mx_sink.messages, 30, "delivery to the preferred MX")
    assert mx_sink.messages[0].recipients == ["friend@remote.test"]
    [notice] = a.wait_mailbox("SAM", 1, timeout=60)  # a null MX is a permanent failure
    assert b"Final-Recipient: rfc822; x@nullmx.test" in notice.read_bytes()


def test_cltbind_binds_each_family_to_its_own_entry(make_appliance, sink):
    """An IPv6 entry first must not leave IPv4 mail unbound (the NAT case of the manual)."""
    a = outbound(make_appliance, sink)
    for address in ("::1", "127.0.0.2"):
        assert a.cli("addsmtple", "--type", "*CLTBIND", "--intnetadr", address)[0] == 0
    time.sleep(1.2)  # client jobs read the lists at most once a second
    send(a, ["friend@remote.test"])
    a.wait_for(lambda: sink.messages, 20, "delivery to the mail router")
    assert sink.peers[-1] == "127.0.0.2"


def test_etrn_starts_delivery_of_held_back_mail(make_appliance, sink):
    state = {"up": False}
    sink.behaviour = Behaviour(rcpt=lambda addr: "250 2.1.5 ok" if state["up"]
                               else "451 4.4.1 not now")
    a = outbound(make_appliance, sink, rtymin=[3, 60], etrnsvr="*YES")
    send(a, ["friend@remote.test"])
    send(a, ["other@branch.remote.test"])
    a.wait_for(lambda: len(a.queue_files("QTMSRTQ1")) == 2, 20, "the messages on the retry queue")
    state["up"] = True
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        assert s.has_extn("etrn")
        code, text = s.docmd("ETRN", "remote.test")
        assert code == 459  # not in the *ETRNSVR list
        # The manual's way: the ISP's host name (found by its address now).
        assert a.cli("addsmtple", "--type", "*ETRNSVR", "--hostname", "localhost")[0] == 0
        code, text = s.docmd("ETRN", "remote.test")
        assert code == 250, text
    a.wait_for(lambda: sink.messages, 20, "delivery started by ETRN, not after 60 minutes")
    time.sleep(2)  # RFC 1985: "remote.test" is that node, not its subdomains
    assert [m.recipients for m in sink.messages] == [["friend@remote.test"]]
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        assert s.docmd("ETRN", "@remote.test")[0] == 250
    a.wait_for(lambda: len(sink.messages) == 2, 20, "ETRN @remote.test")
    assert sink.messages[1].recipients == ["other@branch.remote.test"]
    assert a.cli("hlddstq", "--dstq", "QSMTPQ")[0] == 0
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        code, text = s.docmd("ETRN", "remote.test")  # RFC 1985: nothing would go
        assert (code, b"held" in text) == (458, True), text


def test_dsn_notify_ret_and_the_responsible_person(make_appliance, sink):
    sink.behaviour = Behaviour(rcpt=lambda addr: "550 5.1.1 no such user")
    a = outbound(make_appliance, sink, nfydlvry="postmaster@example.test")
    a.user("POSTMSTR")
    assert a.cli("chgdire", "--usrid", "POSTMSTR", "MAIL", "--smtpuser", "postmaster",
                 "--smtpdomain", "example.test")[0] == 0
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        assert s.has_extn("dsn")
        s.mail("sam@example.test", ["RET=FULL", "ENVID=batch+2B7"])
        assert s.rcpt("quiet@remote.test", ["NOTIFY=NEVER"])[0] == 250
        assert s.rcpt("loud@remote.test", ["NOTIFY=FAILURE,DELAY",
                                          "ORCPT=rfc822;loud@remote.test"])[0] == 250
        assert s.rcpt("x@remote.test", ["NOTIFY=NEVER,SUCCESS"])[0] == 501
        assert s.data(b"Subject: dsn\r\n\r\nthe whole body comes back\r\n")[0] == 250
    [notice] = a.wait_mailbox("SAM", 1)
    raw = notice.read_bytes()
    assert b"Final-Recipient: rfc822; loud@remote.test" in raw
    assert b"quiet@remote.test" not in raw.split(b"message/delivery-status", 1)[1]
    assert b"Original-Envelope-Id: batch+7" in raw
    assert b"the whole body comes back" in raw  # RET=FULL
    a.wait_mailbox("POSTMSTR", 1)  # the NFYDLVRY responsible person gets a copy


def test_dsn_success_relayed_and_delay_notices(make_appliance, sink):
    sink.behaviour = Behaviour(rcpt=lambda addr: "451 4.2.0 later" if addr.startswith("slow")
                               else "250 2.1.5 ok")
    a = outbound(make_appliance, sink, nfydlvry="postmaster@example.test", rtymin=[1, 0],
                 rtyhour=[5, 1])
    a.user("JANE")
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        s.mail("sam@example.test")
        for rcpt in ("jane@example.test", "far@remote.test", "slow@remote.test"):
            assert s.rcpt(rcpt, ["NOTIFY=SUCCESS,DELAY"])[0] == 250
        assert s.data(b"Subject: reports\r\n\r\nx\r\n")[0] == 250
    reports = a.wait_mailbox("SAM", 3, timeout=40)
    actions = sorted(
        line.split(b":", 1)[1].strip().decode()
        for p in reports for line in p.read_bytes().split(b"\r\n")
        if line.startswith(b"Action:"))
    assert actions == ["delayed", "delivered", "relayed"]
    # The server's name goes with what it answered, not with a local delivery.
    mtas = sorted(b"Remote-MTA: dns; 127.0.0.1" in p.read_bytes() for p in reports)
    assert mtas == [False, True, True]
    # The delay report says until when: five more tries an hour apart (RTYHOUR 5 1).
    [delayed] = [p.read_bytes() for p in reports if b"Action: delayed" in p.read_bytes()]
    until = email.utils.parsedate_to_datetime(
        delayed.split(b"Will-Retry-Until: ", 1)[1].split(b"\r\n", 1)[0].decode())
    assert abs(until.timestamp() - time.time() - 5 * 3600) < 120



def test_one_message_to_several_domains(make_appliance, sink):
    """Tasks queued for one client job keep their own result tokens."""
    sink.behaviour = Behaviour(rcpt=lambda addr: "550 5.1.1 no such user"
                               if addr.startswith("bad") else "250 2.1.5 ok")
    a = outbound(make_appliance, sink)
    send(a, ["one@first.test", "two@second.test", "bad@third.test", "ok@third.test"])
    a.wait_for(lambda: len(sink.messages) == 3, 30, "one delivery per domain")
    [notice] = a.wait_mailbox("SAM", 1, timeout=30)
    assert b"Final-Recipient: rfc822; bad@third.test" in notice.read_bytes()
    a.wait_for(lambda: not a.queue_files("QTMSOUTQ"), 10, "the message settled")


def released_at_once(make_appliance, sink, count=12, **smtp):
    """``count`` one-recipient messages for remote.test, held, then released together."""
    a = outbound(make_appliance, sink, **smtp)
    assert a.cli("hlddstq", "--dstq", "QSMTPQ")[0] == 0
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        for i in range(count):
            s.sendmail("sam@example.test", [f"r{i}@remote.test"], b"Subject: out\r\n\r\nhi\r\n")
    assert a.cli("rlsdstq", "--dstq", "QSMTPQ")[0] == 0
    return a


class FirstRefused(Sink):
    """A sink that greets its first ``refuse`` connections with 421 and closes them."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse
        self.lock = threading.Lock()
        super().__init__()

    def session(self, sock) -> None:
        with self.lock:
            self.refuse -= 1
            refused = self.refuse >= 0
        if refused:
            sock.sendall(b"421 4.3.2 not now\r\n")
            return
        super().session(sock)


def test_mail_waiting_for_one_destination_shares_tasks(make_appliance):
    """Twelve messages for four connections: four tasks of three.  The
    destination failing the first message of a task, the others wait
    without being tried, and all go at the next try."""
    import json

    sink = FirstRefused(4)
    try:
        a = released_at_once(make_appliance, sink)
        a.wait_for(lambda: len(sink.messages) == 12, 30, "every message at the next try")
        failed = a.journal("8C")
        assert len(failed) == 12 and sink.connections >= 4
        assert sum("not tried" in str(e["errors"]) for e in failed) == 8
        rc, out, err = a.cli("dspactpj", "--pgm", "QTMSCCLCP", "--json")
        assert rc == 0, err
        assert json.loads(out)["accepted"] < 24  # fewer tasks than messages
        a.wait_for(lambda: not a.queue_files("QTMSOUTQ") and not a.queue_files("QTMSRTQ1"),
                   10)
    finally:
        sink.stop()


def test_a_recipient_refused_for_now_holds_back_no_other_message(make_appliance, sink):
    """A server's 4xx to one recipient (greylisting) is about that message:
    the others of its task go on the same connection."""
    sink.behaviour = Behaviour(rcpt=lambda addr: "450 4.2.0 greylisted, try later"
                               if addr == "r0@remote.test" else "250 2.1.5 ok")
    a = released_at_once(make_appliance, sink)
    a.wait_for(lambda: len(sink.messages) == 11, 30, "every other message")
    a.wait_for(lambda: a.journal("8C"), 10, "the greylisted one waits")
    assert all("not tried" not in str(e["errors"]) for e in a.journal("8C"))
    assert {tuple(e["recipients"]) for e in a.journal("8C")} == {("r0@remote.test",)}


def test_mail_for_a_host_that_never_answers_is_not_tried_one_task_after_another(
        make_appliance, sink):
    """Sixty messages, four connections: once four tasks have waited out
    the greeting, the rest goes to the retries untried (8U), instead of
    four more tasks waiting out the same timeout."""
    sink.behaviour = Behaviour(greeting=None)
    a = released_at_once(make_appliance, sink, 60, clienttimeout=5, rtymin=[2, 1])
    a.wait_for(lambda: len(a.queue_files("QTMSRTQ1")) == 60, 40, "every message to retry")
    # Each 8C is written just after its message's move: the last may still come.
    a.wait_for(lambda: len(a.journal("8C")) == 60, 10, "every 8C entry")
    assert sink.connections == 4
    [entry] = a.journal("8U")
    assert entry["domain"] == "remote.test" and entry["messages"] == 60 - 32
    assert sum("no server of remote.test answered" in str(e["errors"])
               for e in a.journal("8C")) == 60 - 32


def test_a_session_that_breaks_holds_back_nothing(make_appliance, sink):
    """The server was there: the mail waiting for it is tried as usual."""
    sink.behaviour = Behaviour(drop_after=0)
    a = released_at_once(make_appliance, sink, 40, rtymin=[2, 1])
    a.wait_for(lambda: len(a.queue_files("QTMSRTQ1")) == 40, 40, "every message to retry")
    assert not a.journal("8U") and sink.connections == 5


class OneAtATime(Sink):
    """A server that takes one connection at a time and greets the others with 421."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        super().__init__()

    def session(self, sock) -> None:
        with self.lock:
            refused = self.active >= 1
            self.active += not refused
        if refused:
            sock.sendall(b"421 4.7.0 too many connections from your host\r\n")
            return
        try:
            super().session(sock)
        finally:
            with self.lock:
                self.active -= 1


def test_a_server_that_refuses_connections_over_its_limit_is_not_taken_for_dead(
        make_appliance):
    """It greets them with 421: it is up, and what waits for it is not held back."""
    sink = OneAtATime()
    try:
        a = released_at_once(make_appliance, sink, 40, rtymin=[50, 0])
        # Its idle kept connection holds the one slot for two seconds, so
        # the mail goes slowly, a task at a time, through 421s.
        a.wait_for(lambda: len(set(m.recipients[0] for m in sink.messages)) >= 16, 60,
                   "mail delivered through the 421s")
        assert not a.journal("8U")
    finally:
        sink.stop()


def test_dspactpj_reset_reaches_the_client_pool(make_appliance, sink):
    import json

    a = outbound(make_appliance, sink)
    send(a, ["friend@remote.test"])
    a.wait_for(lambda: sink.messages, 20, "delivery by a client job")

    def accepted() -> int:
        rc, out, err = a.cli("dspactpj", "--pgm", "QTMSCCLCP", "--json")
        assert rc == 0, err
        return json.loads(out)["accepted"]

    a.wait_for(lambda: accepted() >= 1, 5, "the delivery counted")
    rc, out, err = a.cli("dspactpj", "--pgm", "QTMSCCLCP", "--reset", "--json")
    assert rc == 0, err
    assert json.loads(out)["accepted"] >= 1  # what was counted until the reset
    assert accepted() == 0


def test_mail_that_would_loop_back_to_this_host_is_returned(make_appliance, dns):
    port = dns({  # this host (mail.example.test) is the best MX
        "loop.test": {"MX": [[10, "mail.example.test"], [20, "backup.loop.test"]]},
        "mail.example.test": {"A": ["192.0.2.10"]},
        "backup.loop.test": {"A": ["192.0.2.20"]},
    })
    a = make_appliance(smtp={"alwrly": "*ALL", "nameservers": [f"127.0.0.1:{port}"],
                             "rtymin": [5, 0]}).start()
    a.user("SAM")
    send(a, ["friend@loop.test"])
    [notice] = a.wait_mailbox("SAM", 1, timeout=30)
    raw = notice.read_bytes()
    assert b"Final-Recipient: rfc822; friend@loop.test" in raw
    assert b"5.4.6" in raw and b"loops back to myself" in raw
    assert [e["reason"].split()[:2] for e in a.journal("83")] == [["554", "5.4.6"]]
    assert not a.journal("8C")  # permanent: no retry


def test_a_mailbox_that_cannot_take_mail_waits_for_the_retries_alone(make_appliance, sink):
    """JANE's copy waits on the retry queue; SAM's and the remote one go at once.
    Once her mailbox is mended, a due retry delivers hers, and only hers.
    RTYMIN 0 minutes retries about ten times a second: the most tries there
    are, so a loaded machine does not use them up before the mending."""
    a = outbound(make_appliance, sink, rtymin=[99, 0])
    a.user("JANE")
    repair = break_maildir(a.datadir, "JANE")
    send(a, ["jane@example.test", "sam@example.test", "far@remote.test"])
    a.wait_for(lambda: sink.messages, 20, "the remote copy")
    a.wait_mailbox("SAM", 1)
    a.wait_for(lambda: {"BD", "8C"} <= {e["code"] for e in a.journal()}, 20, "BD, then 8C")
    [bd] = a.journal("BD")[:1]
    assert bd["recipient"] == "jane@example.test" and "Not a directory" in bd["reason"]
    rc, out, _ = a.cli("wrkq")
    assert rc == 0 and "jane@example.test (retry)" in out, out
    repair()
    a.wait_mailbox("JANE", 1)
    a.wait_for(lambda: not any(a.queue_files(q) for q in ("QTMSINQ", "QTMSOUTQ", "QTMSRTQ1")),
               10, "the queues to empty")
    assert len(sink.messages) == 1 and len(a.mailbox("SAM")) == 1
    assert any(e["code"] == "8E" and e.get("to") == "QTMSINQ" for e in a.journal())


def test_a_mailbox_broken_past_the_retries_gets_a_notice(make_appliance, sink):
    a = outbound(make_appliance, sink, rtymin=[1, 0], rtyhour=[1, 0],
                 nfydlvry="admin@remote.test")  # DSN is offered with NFYDLVRY
    a.user("JANE")
    break_maildir(a.datadir, "JANE")
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        s.mail("sam@example.test")
        assert s.rcpt("jane@example.test", ["NOTIFY=FAILURE,DELAY"])[0] == 250
        assert s.data(b"Subject: to jane\r\n\r\nx\r\n")[0] == 250
    reports = a.wait_mailbox("SAM", 2, timeout=40)  # delayed, then failed
    texts = [p.read_bytes() for p in reports]
    assert all(b"Final-Recipient: rfc822; jane@example.test" in t for t in texts)
    actions = sorted(line.split(b":", 1)[1].strip() for t in texts
                     for line in t.split(b"\r\n") if line.startswith(b"Action:"))
    assert actions == [b"delayed", b"failed"]
    assert any(b"mailbox cannot take mail now" in t for t in texts)
    codes = [e["code"] for e in a.journal()]
    assert codes.count("BD") == 3 and {"8C", "8D", "8E", "8F", "A3"} <= set(codes)


def test_a_hold_of_outbound_mail_does_not_hold_local_retries(make_appliance, sink):
    a = outbound(make_appliance, sink, rtymin=[50, 0])
    a.user("JANE")
    assert a.cli("hlddstq")[0] == 0
    repair = break_maildir(a.datadir, "JANE")
    send(a, ["jane@example.test"])
    send(a, ["far@remote.test"])
    a.wait_for(lambda: a.journal("8E"), 20, "a retry of the local recipient")
    repair()
    a.wait_mailbox("JANE", 1)
    assert sink.messages == []  # the remote message is still held
    assert a.cli("rlsdstq")[0] == 0
    a.wait_for(lambda: sink.messages, 20, "the remote message, once released")


def _queued_id(a, queue):
    [f] = a.wait_for(lambda: a.queue_files(queue), 30, f"the message on {queue}")
    return f.stem


def _bridge_running(a):
    from twistmail.bridge.status import bridge_running

    a.wait_for(lambda: bridge_running(a.datadir / "run", time.time()), 20, "the bridge")


def test_wrkq_delete_takes_a_message_off_the_retry_queue(make_appliance, sink):
    sink.behaviour = Behaviour(rcpt=lambda addr: "451 4.2.0 try later")
    a = outbound(make_appliance, sink, rtymin=[3, 30])
    send(a, ["never@remote.test", "nor@remote.test"])
    qid = _queued_id(a, "QTMSRTQ1")
    _bridge_running(a)
    rc, out, err = a.cli("wrkq", "--delete", qid)
    assert (rc, out, err) == (0, f"message {qid} deleted\n", "")
    assert not any(a.queue_files(q) for q in ("QTMSOUTQ", "QTMSRTQ1", "QTMSRTQ2"))
    [entry] = a.journal("8Z")
    assert entry["msgid"] == qid and entry["queue"] == "QTMSRTQ1"
    assert sorted(entry["recipients"]) == ["never@remote.test", "nor@remote.test"]
    assert a.mailbox("SAM") == []  # deleted without a notice
    rc, out, err = a.cli("wrkq", "--delete", qid)
    assert rc == 2 and err.strip().endswith(f"--delete: message {qid} is in no queue; "
                                            "allowed: a message in QTMSOUTQ, QTMSRTQ1, "
                                            "QTMSRTQ2, QTMSBSSQ, quarantine or corrupt/"), err


def test_wrkq_delete_of_held_mail_and_while_the_bridge_is_ended(make_appliance, sink):
    a = outbound(make_appliance, sink)
    _bridge_running(a)
    assert a.cli("hlddstq")[0] == 0
    send(a, ["friend@remote.test"])
    held = _queued_id(a, "QTMSOUTQ")
    assert a.cli("wrkq", "--delete", held)[1] == f"message {held} deleted\n"
    send(a, ["friend@remote.test"])
    later = _queued_id(a, "QTMSOUTQ")
    assert a.cli("endmsf")[0] == 0
    rc, out, err = a.cli("wrkq", "--delete", later)
    assert rc == 0 and "the bridge is not running" in out and "strmsf" in out, (out, err)
    rc, out, err = a.cli("wrkq", "--json")
    assert [e["state"] for e in json.loads(out)] == ["deleting"], out
    assert [f.stem for f in a.queue_files("QTMSOUTQ")] == [later]
    assert a.cli("strmsf")[0] == 0
    a.wait_for(lambda: not a.queue_files("QTMSOUTQ"), 20, "the deletion asked for before")
    # journaled a moment after the file goes
    a.wait_for(lambda: len(a.journal("8Z")) == 2, 10, "its 8Z entry")
    assert [e["msgid"] for e in a.journal("8Z")] == [held, later]
    assert a.cli("rlsdstq")[0] == 0
    time.sleep(2)
    assert sink.messages == []


@pytest.mark.parametrize("end", ["451 4.3.0 later", "250 2.0.0 queued"])
def test_wrkq_delete_of_a_message_being_sent_waits_for_its_attempt(make_appliance, sink, end):
    sink.behaviour = Behaviour(end_delay=3, end=end)
    a = outbound(make_appliance, sink, rtymin=[3, 30])
    send(a, ["friend@remote.test"])
    a.wait_for(lambda: a.journal("8B"), 20, "the message taken for delivery")
    _bridge_running(a)
    [qid] = [e["msgid"] for e in a.journal("8B")]
    rc, out, err = a.cli("wrkq", "--delete", qid)
    if end.startswith("451"):  # the attempt failed for now: deleted from QTMSRTQ1
        assert (rc, out) == (0, f"message {qid} deleted\n"), err
        assert [e["queue"] for e in a.journal("8Z")] == ["QTMSRTQ1"]
    else:  # delivered: it left before it could be deleted, and the command says so
        assert rc == 1 and "was not deleted: it left QTMSOUTQ meanwhile" in err, (out, err)
        assert a.journal("8Z") == [] and a.journal("88")
    assert not any(a.queue_files(q) for q in ("QTMSOUTQ", "QTMSRTQ1", "QTMSRTQ2"))
    assert not list((a.datadir / "queue" / "delete").iterdir())


def test_wrkq_delete_all_of_a_queue_and_several_ids(make_appliance, sink):
    a = outbound(make_appliance, sink)
    _bridge_running(a)
    assert a.cli("hlddstq")[0] == 0
    for _ in range(5):
        send(a, ["friend@remote.test"])
    ids = [f.stem for f in a.wait_for(lambda: len(a.queue_files("QTMSOUTQ")) == 5
                                      and a.queue_files("QTMSOUTQ"), 20, "five held")]
    rc, out, err = a.cli("wrkq", "--delete", "ALL")
    assert rc == 2 and "--queue is needed" in err, err
    rc, out, err = a.cli("wrkq", "--delete", "all", "--queue", "qtmsinq")
    assert rc == 2 and "QTMSINQ cannot be emptied" in err, err
    rc, out, err = a.cli("wrkq", "--delete", ids[0], "--delete", ids[1])
    assert (rc, out) == (0, "2 messages deleted\n"), err
    gone = ids[0]
    rc, out, err = a.cli("wrkq", "--delete", ids[2], "--delete", gone)
    assert rc == 2 and out == "1 message deleted\n", (out, err)
    assert err.strip().endswith(f"1 of 2 messages not deleted: message {gone} is in no queue")
    rc, out, err = a.cli("wrkq", "--delete", "ALL", "--queue", "QTMSOUTQ")
    assert (rc, out) == (0, "2 messages deleted\n"), err
    assert a.cli("wrkq", "--delete", "ALL", "--queue", "QTMSOUTQ")[1] == \
        "no messages on QTMSOUTQ\n"
    assert sorted(e["msgid"] for e in a.journal("8Z")) == sorted(ids)


def test_wrkq_retry_tries_the_retry_queues_now(make_appliance, sink):
    tries = {"n": 0}

    def rcpt(addr: str) -> str:
        tries["n"] += 1
        return "451 4.2.0 try later" if tries["n"] == 1 else "250 2.1.5 ok"

    sink.behaviour = Behaviour(rcpt=rcpt)
    a = outbound(make_appliance, sink, rtymin=[3, 30])
    _bridge_running(a)
    assert a.cli("wrkq", "--retry")[1] == "no messages on QTMSRTQ1 or QTMSRTQ2\n"
    send(a, ["friend@remote.test"])
    _queued_id(a, "QTMSRTQ1")
    rc, out, err = a.cli("wrkq", "--retry")
    assert (rc, out) == (0, "1 message on the retry queues: it is tried now\n"), err
    a.wait_for(lambda: sink.messages, 20, "delivery after --retry")
    a.wait_for(lambda: not a.queue_files("QTMSRTQ1") and not a.queue_files("QTMSOUTQ"), 10)
    assert [e["code"] for e in a.journal() if e["code"] in ("8C", "8E", "88")] == \
        ["8C", "8E", "88"]


def test_wrkq_delete_of_several_messages_being_sent_says_so_once(make_appliance, sink,
                                                                 monkeypatch):
    from twistmail.cli import queuecmds

    monkeypatch.setattr(queuecmds, "DELETE_WAIT", 1.0)
    sink.behaviour = Behaviour(end_delay=4, end="451 4.3.0 later")
    a = outbound(make_appliance, sink, rtymin=[3, 30])
    _bridge_running(a)
    send(a, ["friend@remote.test"])
    send(a, ["pal@remote.test"])
    a.wait_for(lambda: len(a.journal("8B")) == 2, 20, "both taken for delivery")
    ids = [e["msgid"] for e in a.journal("8B")]
    rc, out, err = a.cli("wrkq", "--delete", ids[0], "--delete", ids[1])
    assert (rc, out) == (0, "2 more being sent now: the bridge deletes each when its attempt "
                            "ends (what it delivers meanwhile stays delivered)\n"), err
    a.wait_for(lambda: len(a.journal("8Z")) == 2, 30, "both deleted after their attempts")
    assert not any(a.queue_files(q) for q in ("QTMSOUTQ", "QTMSRTQ1"))
