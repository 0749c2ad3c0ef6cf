"""Mail leaves the box for real SMTP peers acting as the remote host.

The peers are independent receivers on loopback: a second twistmail
appliance (a remote domain with its own users and POP server), aiosmtpd
(another SMTP server implementation, scripted through its handler hooks),
Postfix's smtp-sink where it is installed, and the threaded ``Sink`` of
test_smtp_client.py where a failure must come at an exact point (a drop
in DATA, a stall, a slow reply).  Each
failure mode is judged by what the administrator sees: the queue moves
and the QZMF journal (8B taken, 88/82 delivered, 8C to QTMSRTQ1, 8E back
to QTMSOUTQ, 83 failed, 87 notice), and by what reached the peer.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import poplib
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiosmtpd.controller import Controller
from appliance import Appliance, alive
from test_smtp_client import Behaviour, Sink

SMTP_SINK = "/usr/sbin/smtp-sink"
OUTBOUND_QUEUES = ("QTMSOUTQ", "QTMSRTQ1", "QTMSRTQ2")


# -- helpers ------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a peer that cannot take port 0."""
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def relay_to(make_appliance: Callable[..., Appliance], port: int, **smtp: Any) -> Appliance:
    """An appliance sending all non-local mail to 127.0.0.1:port, retrying quickly."""
    settings = {"mailrouter": f"127.0.0.1:{port}", "firewall": "*YES", "alwrly": "*ALL",
                "rtymin": [2, 0], **smtp}
    a = make_appliance(smtp=settings).start()
    a.user("SAM")
    return a


def note(mid: str, body: str = "to the world") -> bytes:
    return (f"Message-ID: <{mid}>\r\nSubject: {mid}\r\n\r\n{body}\r\n").encode()


def send(a: Appliance, rcpts: list[str], content: bytes) -> None:
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("sam@example.test", rcpts, content)


def codes(a: Appliance) -> list[str]:
    return [e["code"] for e in a.journal()]


def settled(a: Appliance) -> bool:
    """Nothing waits for delivery: QTMSINQ, QTMSOUTQ and the retry queues are empty."""
    return not any(a.queue_files(q) for q in ("QTMSINQ", *OUTBOUND_QUEUES))


def retry_reason(a: Appliance) -> str:
    """Why the one message went to QTMSRTQ1: the error of its one recipient (8C)."""
    [entry] = a.journal("8C")
    [error] = entry["errors"].values()
    return error


def message_id(content: bytes) -> str:
    head = content.split(b"\r\n\r\n", 1)[0]
    return email.message_from_bytes(head, policy=email.policy.default)["Message-ID"]


# -- aiosmtpd as a peer -------------------------------------------------------------


@attrs.define
class Received:
    originator: str
    recipients: list[str]
    content: bytes


class Scripted:
    """An aiosmtpd handler whose RCPT and end-of-data replies a test scripts.

    ``rcpt`` gets the address, ``data`` the number of end-of-data replies
    given so far; each returns the reply to send.
    """

    def __init__(self) -> None:
        self.rcpt: Callable[[str], str] = lambda address: "250 2.1.5 OK"
        self.data: Callable[[int], str] = lambda n: "250 2.0.0 OK"
        self.ends = 0
        self.messages: list[Received] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        reply = self.rcpt(address)
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self.data(self.ends)
        self.ends += 1
        if reply.startswith("250"):
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.content))
        return reply


@attrs.define
class Aiosmtpd:
    handler: Scripted
    controller: Controller
    port: int


@pytest.fixture
def aiosmtpd() -> Iterator[Aiosmtpd]:
    handler = Scripted()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield Aiosmtpd(handler, controller, port)
    controller.stop()


def once(first: str, then: str) -> Callable[..., str]:
    """A reply script: ``first`` the first time, ``then`` ever after."""
    calls = {"n": 0}

    def reply(*_: Any) -> str:
        calls["n"] += 1
        return first if calls["n"] == 1 else then

    return reply


# -- Sink variants --------------------------------------------------------------------


class DropsOnce(Sink):
    """Closes the connection after ``drop_after`` DATA bytes the first time only."""

    def receive_data(self, reader: Any, sock: socket.socket) -> bytes | None:
        got = super().receive_data(reader, sock)
        if got is None:
            self.behaviour = attrs.evolve(self.behaviour, drop_after=None)
        return got


class StallsOnce(Sink):
    """Stops reading after 354 in the first transaction until ``release`` is set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stalled = threading.Event()
        self.release = threading.Event()

    def receive_data(self, reader: Any, sock: socket.socket) -> bytes | None:
        if not self.stalled.is_set():
            self.stalled.set()
            self.release.wait(60)
            return None
        return super().receive_data(reader, sock)


class StallsOn(StallsOnce):
    """Reads the DATA of a message holding ``mark``, then gives no reply until
    ``release``, and drops the connection: that message was not taken."""

    def __init__(self, mark: bytes) -> None:
        super().__init__()
        self.mark = mark

    def receive_data(self, reader: Any, sock: socket.socket) -> bytes | None:
        got = Sink.receive_data(self, reader, sock)
        if got is not None and self.mark in got and not self.stalled.is_set():
            self.stalled.set()
            self.release.wait(60)
            return None
        return got


class AnswersLateOn(StallsOn):
    """Takes the message holding ``mark``, and answers its DATA only once
    ``release`` is set."""

    def receive_data(self, reader: Any, sock: socket.socket) -> bytes | None:
        got = Sink.receive_data(self, reader, sock)
        if got is not None and self.mark in got and not self.stalled.is_set():
            self.stalled.set()
            self.release.wait(60)
        return got


@pytest.fixture
def sinks() -> Iterator[list[Sink]]:
    made: list[Sink] = []
    yield made
    for s in made:
        if isinstance(s, StallsOnce):
            s.release.set()
        s.stop()


# -- real peers -----------------------------------------------------------------------


def test_a_second_twistmail_instance_is_the_remote_host(make_appliance):
    remote = make_appliance(system={"hostname": "mail.remote.test",
                                    "local_domains": ["remote.test"]}).start()
    remote.user("FRIEND")
    a = relay_to(make_appliance, remote.addr("smtp")[1])
    send(a, ["friend@remote.test"], note("peer-1@example.test", "hello over there"))
    remote.wait_mailbox("FRIEND", 1, timeout=30)
    p = poplib.POP3(*remote.addr("pop3"), timeout=30)
    p.user("friend")
    p.pass_("secret")
    content = b"\r\n".join(p.retr(1)[1])
    p.quit()
    assert b"Message-ID: <peer-1@example.test>" in content
    assert content.endswith(b"\r\n\r\nhello over there")
    a.wait_for(lambda: settled(a), 10, "the outbound queues to empty")
    assert {"96", "8B", "88", "82"} <= set(codes(a))
    [delivered] = a.journal("88")
    assert delivered["ip"] == "127.0.0.1"
    assert {"7A", "B8", "B2"} <= set(codes(remote))  # the remote side took it in


def test_mx_records_lead_to_a_second_instance(make_appliance, dns):
    """The better MX refuses connections; the next one, a real appliance, takes the mail."""
    dead, live = "127.0.0.6", "127.0.0.7"
    probe = socket.socket()
    try:
        probe.bind((live, 25))
    except OSError:
        pytest.skip("cannot listen on port 25 here")
    finally:
        probe.close()
    remote = make_appliance(system={"hostname": "mx2.remote.test",
                                    "local_domains": ["remote.test"]},
                            listen={"smtp": f"{live}:25"}).start()
    remote.user("FRIEND")
    port = dns({
        "remote.test": {"MX": [[10, "mx1.remote.test"], [20, "mx2.remote.test"]]},
        "mx1.remote.test": {"A": [dead]},
        "mx2.remote.test": {"A": [live]},
    })
    a = make_appliance(smtp={"alwrly": "*ALL", "nameservers": [f"127.0.0.1:{port}"],
                             "rtymin": [5, 0]}).start()
    a.user("SAM")
    send(a, ["friend@remote.test"], note("by-mx@example.test", "found by its MX"))
    [got] = remote.wait_mailbox("FRIEND", 1, timeout=30)
    assert got.read_bytes().endswith(b"\r\n\r\nfound by its MX\r\n")
    a.wait_for(lambda: settled(a), 10, "the outbound queues to empty")
    [delivered] = a.journal("88")
    assert delivered["ip"] == live
    assert "8C" not in codes(a)  # the dead MX is skipped within the one try


def test_aiosmtpd_is_the_remote_host(make_appliance, aiosmtpd):
    a = relay_to(make_appliance, aiosmtpd.port)
    body = "line one\r\n.starts with a dot\r\n..two dots\r\n.\r\nnot the end"
    send(a, ["one@remote.test", "two@remote.test"], note("peer-2@example.test", body))
    a.wait_for(lambda: aiosmtpd.handler.messages, 30, "delivery to aiosmtpd")
    [m] = aiosmtpd.handler.messages  # one transaction for both recipients
    assert m.originator == "sam@example.test"
    assert sorted(m.recipients) == ["one@remote.test", "two@remote.test"]
    assert message_id(m.content) == "<peer-2@example.test>"
    assert m.content.endswith(f"\r\n\r\n{body}\r\n".encode())  # unstuffed by aiosmtpd
    a.wait_for(lambda: settled(a), 10, "the outbound queues to empty")
    assert codes(a).count("82") == 2


def test_postfix_smtp_sink_is_the_remote_host(make_appliance):
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.skip("Postfix's smtp-sink is not installed")
    # smtp-sink drops root privileges to write its dumps, so they go to a
    # directory that user can reach (pytest's own are private to root).
    dump = Path(tempfile.mkdtemp(prefix="twistmail-smtp-sink-"))
    dump.chmod(0o777)
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([SMTP_SINK, *user, "-d", f"{dump}/msg.", f"127.0.0.1:{port}", "16"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        a = relay_to(make_appliance, port)
        send(a, ["far@remote.test"], note("peer-3@example.test", "through postfix"))

        def captured() -> list[bytes]:
            if sink.poll() is not None:
                raise AssertionError(f"smtp-sink ended: {sink.stderr.read().decode()}")
            return [p.read_bytes() for p in dump.glob("msg.*")
                    if p.read_bytes().endswith(b"through postfix\n\n")]

        [raw] = a.wait_for(captured, 30, "the dump of smtp-sink")
        assert b"X-Mail-Args: <sam@example.test>" in raw
        assert b"X-Rcpt-Args: <far@remote.test>" in raw
        assert b"Message-ID: <peer-3@example.test>" in raw
        a.wait_for(lambda: settled(a), 10, "the outbound queues to empty")
        assert {"8B", "88", "82"} <= set(codes(a))
    finally:
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(dump, ignore_errors=True)


# -- failure modes --------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
def test_4xx_waits_on_the_retry_queue_then_delivers(make_appliance, aiosmtpd, stage):
    refusal = "451 4.3.2 try again later" if stage == "RCPT" else "452 4.3.1 out of space"
    if stage == "RCPT":
        aiosmtpd.handler.rcpt = once(refusal, "250 2.1.5 OK")
    else:
        aiosmtpd.handler.data = once(refusal, "250 2.0.0 OK")
    a = relay_to(make_appliance, aiosmtpd.port)
    send(a, ["friend@remote.test"], note("retry@example.test"))
    a.wait_for(lambda: aiosmtpd.handler.messages, 30, "delivery on the retry")
    a.wait_for(lambda: settled(a), 10, "the outbound queues to empty")
    seen = codes(a)
    assert seen.count("8B") == 2  # the first try and the retry
    assert seen.count("8C") == 1 and seen.count("8E") == 1
    assert seen.index("8C") < seen.index("8E") < seen.index("88")
    assert seen.count("82") == 1 and "83" not in seen
    assert retry_reason(a) == refusal
    [m] = aiosmtpd.handler.messages
    assert m.recipients == ["friend@remote.test"]
    assert a.mailbox("SAM") == []  # no notice


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
def test_5xx_fails_the_recipient_with_a_notice(make_appliance, aiosmtpd, stage):
    if stage == "RCPT":
        aiosmtpd.handler.rcpt = lambda address: "550 5.1.1 no such mailbox here"
    else:
        aiosmtpd.handler.data = lambda n: "554 5.6.0 content refused"
    a = relay_to(make_appliance, aiosmtpd.port)
    send(a, ["nobody@remote.test"], note("bounce@example.test", "never arrives"))
    [notice] = a.wait_mailbox("SAM", 1, timeout=30)
    raw = notice.read_bytes()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert b"Final-Recipient: rfc822; nobody@remote.test" in raw
    assert (b"5.1.1" if stage == "RCPT" else b"5.6.0") in raw
    a.wait_for(lambda: settled(a), 10, "the outbound queues to empty")
    seen = codes(a)
    assert seen.count("8B") == 1 and {"83", "87"} <= set(seen)
    assert "8C" not in seen and "88" not in seen  # permanent: no retry
    [failed] = a.journal("83")
    assert failed["recipient"] == "nobody@remote.test"
    assert aiosmtpd.handler.messages == []


def test_connection_dropped_in_data_is_retried(make_appliance, sinks):
    sink = DropsOnce(Behaviour(drop_after=4000))
    sinks.append(sink)
    a = relay_to(make_appliance, sink.port)
    body = "\r\n".join(f"line {i:05d} of a message long enough to be cut" for i in range(400))
    send(a, ["friend@remote.test"], note("dropped@example.test", body))
    a.wait_for(lambda: sink.messages, 30, "delivery on the retry")
    a.wait_for(lambda: settled(a), 10, "the outbound queues to empty")
    assert sink.connections == 2
    [m] = sink.messages
    assert m.content.endswith(f"\r\n\r\n{body}\r\n".encode())
    assert "4.4.2 Connection lost" in retry_reason(a)
    seen = codes(a)
    assert seen.count("8B") == 2 and seen.count("8C") == 1 and seen.count("8E") == 1
    assert seen.count("82") == 1 and "83" not in seen
    assert a.mailbox("SAM") == []


def test_a_slow_server_within_the_timeouts_still_delivers(make_appliance, sinks):
    def slow(address: str) -> str:
        time.sleep(3)
        return "250 2.1.5 ok, eventually"

    sink = Sink(Behaviour(rcpt=slow))
    sinks.append(sink)
    a = relay_to(make_appliance, sink.port)
    send(a, ["friend@remote.test"], note("slow@example.test"))
    a.wait_for(lambda: sink.messages, 30, "the slow delivery")
    a.wait_for(lambda: settled(a), 10, "the outbound queues to empty")
    seen = codes(a)
    assert "8C" not in seen and seen.count("82") == 1


def test_a_server_slower_than_clienttimeout_is_a_temporary_failure(make_appliance, sinks):
    tries = {"n": 0}

    def rcpt(address: str) -> str:
        tries["n"] += 1
        time.sleep(8 if tries["n"] == 1 else 1)  # clienttimeout is 5 s
        return "250 2.1.5 ok"

    sink = Sink(Behaviour(rcpt=rcpt))
    sinks.append(sink)
    a = relay_to(make_appliance, sink.port, clienttimeout=5)
    send(a, ["friend@remote.test"], note("too-slow@example.test"))
    a.wait_for(lambda: sink.messages, 40, "delivery on the retry")
    a.wait_for(lambda: settled(a), 10, "the outbound queues to empty")
    assert sink.connections == 2 and tries["n"] == 2
    [m] = sink.messages  # the first transaction never got to DATA
    assert message_id(m.content) == "<too-slow@example.test>"
    assert "4.4.2 Timed out after 5 s" in retry_reason(a)
    seen = codes(a)
    assert seen.count("8B") == 2 and seen.count("8C") == 1 and seen.count("8E") == 1
    assert seen.count("82") == 1 and "83" not in seen
    assert a.mailbox("SAM") == []


# -- SIGKILL mid-delivery ---------------------------------------------------------------


def test_sigkill_of_the_bridge_mid_delivery_loses_nothing(make_appliance, sinks):
    def rcpt(address: str) -> str:
        time.sleep(0.03)  # long enough that the kill finds deliveries in flight
        return "250 2.1.5 ok"

    sink = Sink(Behaviour(rcpt=rcpt))
    sinks.append(sink)
    a = relay_to(make_appliance, sink.port)
    assert a.cli("endmsf", "--option", "*IMMED")[0] == 0
    a.wait_for(lambda: a.control("status")["bridge"]["pid"] is None, 10, "the bridge to end")
    total = 50
    sent = set()
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        for i in range(total):
            # Five domains: the connection matrix limits each domain, and the
            # mail router takes them all, so every client job has work.
            s.sendmail("sam@example.test", [f"friend@d{i % 5}.remote.test"],
                       note(f"kill-bridge-{i}@example.test"))
            sent.add(f"<kill-bridge-{i}@example.test>")
    assert a.cli("strmsf")[0] == 0
    a.wait_for(lambda: len(sink.messages) >= 3, 30, "deliveries to start")
    bridge = a.control("status")["bridge"]["pid"]
    os.kill(bridge, signal.SIGKILL)
    assert len(sink.messages) < total, "everything went before the bridge could be killed"
    a.wait_for(lambda: (a.control("status")["bridge"]["pid"] or bridge) != bridge, 20,
               "the bridge to restart")
    a.wait_for(lambda: {message_id(m.content) for m in sink.messages} == sent, 60,
               "every message at the sink")
    a.wait_for(lambda: settled(a), 20, "the outbound queues to empty")
    assert not alive(bridge)
    assert a.mailbox("SAM") == []  # nothing failed


def client_job_pids(a: Appliance, status: str | None = None) -> list[int]:
    rc, out, err = a.cli("wrkactjob", "--json")
    assert rc == 0, err
    return [r["pid"] for r in json.loads(out) if r.get("pgm") == "QTMSCCLCP"
            and (status is None or r["status"] == status)]


def test_sigkill_of_a_client_job_mid_delivery_retries(make_appliance, sinks):
    sink = StallsOnce()
    sinks.append(sink)
    a = relay_to(make_appliance, sink.port)
    send(a, ["friend@remote.test"], note("kill-job@example.test"))
    a.wait_for(sink.stalled.is_set, 30, "the client job to reach DATA")
    [busy] = a.wait_for(lambda: client_job_pids(a, "RUN"), 10, "the busy client job listed")
    os.kill(busy, signal.SIGKILL)
    a.wait_for(lambda: sink.messages, 30, "delivery on the retry")
    sink.release.set()
    a.wait_for(lambda: settled(a), 10, "the outbound queues to empty")
    [m] = sink.messages
    assert message_id(m.content) == "<kill-job@example.test>"
    crash = [e for e in a.journal("JC") if e["pid"] == busy]
    assert crash and crash[0]["exit"] == "signal 9"
    assert retry_reason(a) == "451 4.3.0 the SMTP client job ended during delivery"
    seen = codes(a)
    assert seen.count("8B") == 2 and seen.count("8C") == 1 and seen.count("8E") == 1
    assert seen.count("82") == 1 and "83" not in seen
    assert a.mailbox("SAM") == []




def tasks_of_three(make_appliance: Callable[..., Appliance], sink: Sink,
                   tag: str) -> tuple[Appliance, list[str]]:
    """12 messages to one domain, queued while the bridge is ended, then sent:
    more messages than the domain's connections, so tasks of three."""
    a = relay_to(make_appliance, sink.port)
    assert a.cli("endmsf", "--option", "*IMMED")[0] == 0
    a.wait_for(lambda: a.control("status")["bridge"]["pid"] is None, 10, "the bridge to end")
    sent = []
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        for i in range(12):
            s.sendmail("sam@example.test", ["friend@remote.test"], note(f"{tag}-{i}@example.test"))
            sent.append(f"<{tag}-{i}@example.test>")
    assert a.cli("strmsf")[0] == 0
    return a, sent


def test_a_client_job_killed_mid_task_sends_again_only_what_it_had_not_sent(
        make_appliance, sinks):
    """The messages of a task it had delivered were all sent a second time."""
    sink = StallsOn(b"part-2@")
    sinks.append(sink)
    a, sent = tasks_of_three(make_appliance, sink, "part")
    a.wait_for(sink.stalled.is_set, 30, "the stalled message's DATA")

    def stalled_job() -> list[int]:
        # The status is written once a second: a job done with its task may
        # still be listed busy for a moment after its last message arrived.
        busy = client_job_pids(a, "RUN") if len(sink.messages) >= 9 else []
        return busy if len(busy) == 1 else []

    [busy] = a.wait_for(stalled_job, 30, "the other tasks done, the stalled one's job busy")
    before = [message_id(m.content) for m in sink.messages]
    os.kill(busy, signal.SIGKILL)
    sink.release.set()
    a.wait_for(lambda: {message_id(m.content) for m in sink.messages} == set(sent), 60,
               "every message at the sink")
    a.wait_for(lambda: settled(a), 20, "the outbound queues to empty")
    ids = [message_id(m.content) for m in sink.messages]
    assert sorted(ids) == sorted(sent), f"sent twice: {sorted(set(ids))} after {before}"
    assert len(a.journal("82")) == len(sent)


def test_a_client_job_ended_mid_task_finishes_the_message_under_way(make_appliance, sinks):
    """ENDTCPSVR's end delay over, the job was cut off while the next hop had
    taken a message and not yet said so: that message was sent again."""
    sink = AnswersLateOn(b"late-0@")  # the first of a task: the task's others not begun
    sinks.append(sink)
    a, sent = tasks_of_three(make_appliance, sink, "late")
    a.wait_for(sink.stalled.is_set, 30, "the message answered late")
    rc, out, err = a.cli("endtcpsvr", "--server", "*SMTP")  # end delay 3 s, then SIGTERM
    assert rc == 0, err
    time.sleep(4)  # the delay is over: the job is ending, its message under way
    sink.release.set()
    a.wait_for(lambda: not client_job_pids(a), 15, "the client jobs to end")
    assert a.cli("strtcpsvr", "--server", "*SMTP")[0] == 0
    a.wait_for(lambda: {message_id(m.content) for m in sink.messages} == set(sent), 90,
               "every message at the sink")
    a.wait_for(lambda: settled(a), 20, "the outbound queues to empty")
    ids = [message_id(m.content) for m in sink.messages]
    assert sorted(ids) == sorted(sent), f"sent twice: {sorted(i for i in ids if ids.count(i) > 1)}"
    # Those its job did not begin waited on QTMSOUTQ: no try counted, no retry queue.
    assert not {"8C", "8D", "8E"} & set(codes(a))
