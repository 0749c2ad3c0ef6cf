"""The mail transfer scheduler (MAILXFRINT) and the ETRN client (ETRNCLT).

The schedule's timekeeping is driven by ``twisted.internet.task.Clock``;
the ETRN client talks to the loopback sink; the whole scheduled transfer
runs in a real appliance whose transfer is started with ``rlsdstq``, so no
test waits a whole interval.
"""

from __future__ import annotations

import json
import smtplib
import socket
from typing import Any

import pytest
from test_smtp_client import Behaviour, Sink
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from twistmail.bridge.schedule import TransferSchedule
from twistmail.journal import time_text
from twistmail.mx import Hop
from twistmail.smtp.client import EtrnResult, etrn

ETRN_EXTENSIONS = ("PIPELINING", "SIZE 10000000", "8BITMIME", "ETRN")

# -- the schedule ----------------------------------------------------------------------


def schedule(minutes: int) -> tuple[Clock, TransferSchedule, list[float]]:
    clock = Clock()
    ticks: list[float] = []
    s = TransferSchedule(clock, minutes, lambda: ticks.append(clock.seconds()))
    s.start()
    return clock, s, ticks


def test_transfers_every_interval_from_the_start() -> None:
    clock, s, ticks = schedule(15)
    assert s.active and s.next_at == 900
    clock.advance(899)
    assert ticks == []
    clock.advance(1)
    assert ticks == [900]
    clock.pump([900, 900])
    assert ticks == [900, 1800, 2700]
    assert s.next_at == 3600


def test_the_last_transfer_outlives_a_restart(tmp_path) -> None:
    state = tmp_path / "QSMTPQ.lastxfr"
    clock = Clock()
    ticks: list[float] = []
    first = TransferSchedule(clock, 10, lambda: ticks.append(clock.seconds()), state=state)
    first.start()
    clock.advance(600)
    assert ticks == [600]
    first.stop()  # the bridge ends 2 minutes later and starts again
    clock.advance(120)
    again = TransferSchedule(clock, 10, lambda: ticks.append(clock.seconds()), state=state)
    again.start()
    assert again.next_at == 1200  # the rhythm goes on, not 10 minutes from the restart
    again.stop()
    clock.advance(3000)  # down when a transfer fell due: it happens at once
    late = TransferSchedule(clock, 10, lambda: ticks.append(clock.seconds()), state=state)
    late.start()
    clock.advance(0)
    assert ticks == [600, 3720]
    state.write_text("not a time")  # a damaged file: counted from the start, as without one
    broken = TransferSchedule(clock, 10, lambda: None, state=state)
    broken.start()
    assert broken.next_at == 3720 + 600


def test_zero_means_no_schedule() -> None:
    clock, s, ticks = schedule(0)
    assert not s.active and s.next_at is None
    clock.advance(10 * 86400)
    assert ticks == []


def test_a_live_change_counts_from_the_last_transfer() -> None:
    clock, s, ticks = schedule(10)
    clock.advance(600)
    clock.advance(300)  # five minutes after the transfer at 600
    s.configure(30)  # raising postpones: 600 + 1800
    assert s.next_at == 2400
    s.configure(4)  # lowering below the time already past: due at once
    assert s.next_at == 900
    clock.advance(0)
    assert ticks == [600, 900]
    assert s.next_at == 900 + 240


def test_turning_the_schedule_off_and_on() -> None:
    clock, s, ticks = schedule(5)
    s.configure(0)
    assert s.next_at is None
    clock.advance(3600)
    assert ticks == []
    s.configure(5)  # from the start, long past: due at once
    clock.advance(0)
    assert ticks == [3600]


def test_stop_cancels() -> None:
    clock, s, ticks = schedule(1)
    s.stop()
    assert clock.getDelayedCalls() == []
    s.configure(2)  # a stopped schedule stays stopped
    clock.advance(600)
    assert ticks == []


# -- the ETRN client ----------------------------------------------------------------------


class EtrnClientTests(unittest.TestCase):
    timeout = 20

    def sink(self, **behaviour: Any) -> Sink:
        s = Sink(Behaviour(**behaviour))
        self.addCleanup(s.stop)
        return s

    async def etrn(self, hops: list[Hop], nodes: tuple[str, ...]) -> EtrnResult:
        return await etrn(reactor, hops, nodes, "dialup.example.test", timeout_scale=0.02)

    async def test_etrn_for_each_node_over_one_session(self) -> None:
        sink = self.sink(extensions=ETRN_EXTENSIONS, etrn="253 2.0.0 4 messages started")
        result = await self.etrn([sink.hop()], ("example.test", "branch.example.test"))
        self.assertEqual(sink.commands, ["EHLO dialup.example.test", "ETRN example.test",
                                         "ETRN branch.example.test", "QUIT"])
        self.assertEqual([(n, r.code) for n, r in result.replies],
                         [("example.test", 253), ("branch.example.test", 253)])
        self.assertEqual(result.remote_ip, "127.0.0.1")
        self.assertEqual(sink.connections, 1)

    async def test_a_server_without_etrn_is_not_sent_it(self) -> None:
        sink = self.sink()
        result = await self.etrn([sink.hop()], ("example.test",))
        self.assertEqual(sink.commands, ["EHLO dialup.example.test", "QUIT"])
        [(node, reply)] = result.replies
        self.assertEqual(reply.code, 502)
        self.assertIn("does not offer ETRN", reply.text)

    async def test_the_next_hop_when_the_first_is_down(self) -> None:
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
        self.addCleanup(dead.close)
        sink = self.sink(extensions=ETRN_EXTENSIONS, etrn="458 4.0.0 unable to queue")
        hops = [Hop("dead.test", "127.0.0.1", dead.getsockname()[1]), sink.hop()]
        result = await self.etrn(hops, ("example.test",))
        self.assertEqual(result.hop, sink.hop())
        self.assertEqual(result.replies[0][1].code, 458)

    async def test_no_hop_answers(self) -> None:
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        self.addCleanup(dead.close)
        result = await self.etrn([Hop("dead.test", "127.0.0.1", dead.getsockname()[1])],
                                 ("example.test",))
        self.assertIsNone(result.hop)
        [(node, reply)] = result.replies
        self.assertEqual(reply.code, 451)
        self.assertIn("Cannot connect", reply.text)


# -- the scheduled transfer in a running appliance ----------------------------------------


@pytest.fixture
def sink():
    s = Sink(Behaviour(extensions=ETRN_EXTENSIONS))
    yield s
    s.stop()


def scheduled(make_appliance, sink, **smtp):
    settings = {"mailrouter": f"127.0.0.1:{sink.port}", "firewall": "*YES", "alwrly": "*ALL",
                "mailxfrint": 1, **smtp}
    a = make_appliance(system={"local_domains": ["example.test", "branch.example.test"]},
                       smtp=settings).start()
    a.user("SAM")
    return a


def send(a, rcpts):
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("sam@example.test", rcpts, b"Subject: batch\r\n\r\nby dial-up\r\n")


def test_mail_waits_for_the_transfer_which_issues_etrn(make_appliance, sink):
    a = scheduled(make_appliance, sink, etrnclt="*YES")
    send(a, ["friend@remote.test"])
    [wait] = a.wait_for(lambda: a.journal("8W"), 20, "the message waiting for the transfer")
    rc, out, err = a.cli("wrkq", "--queue", "QTMSOUTQ", "--json")
    assert rc == 0, err
    [entry] = json.loads(out)
    assert time_text(entry["next_try"]) == wait["next_try"]  # epoch in wrkq, ISO in the journal
    assert "friend@remote.test" in a.cli("wrkq")[1]
    assert sink.messages == [] and not any(c.startswith("ETRN") for c in sink.commands)
    rc, out, err = a.cli("rlsdstq", "--dstq", "QSMTPQ")  # the transfer, now
    assert rc == 0 and "transfer" in out, err
    a.wait_for(lambda: sink.messages, 20, "the transfer")
    assert sink.messages[0].recipients == ["friend@remote.test"]
    a.wait_for(lambda: len(a.journal("8Y")) == 2, 20, "the ETRN replies journalled")
    assert [c for c in sink.commands if c.startswith("ETRN")] == [
        "ETRN example.test", "ETRN branch.example.test"]
    replies = {e["node"]: e["reply"] for e in a.journal("8Y")}
    assert replies == {"example.test": "250 2.0.0 queuing started",
                       "branch.example.test": "250 2.0.0 queuing started"}
    [xfr] = a.journal("8X")
    assert xfr["messages"] == 1
    a.wait_for(lambda: not a.queue_files("QTMSOUTQ"), 10, "QTMSOUTQ to empty")


def test_interval_changes_live_and_etrn_needs_a_router(make_appliance, sink):
    a = scheduled(make_appliance, sink)
    send(a, ["friend@remote.test"])
    a.wait_for(lambda: a.journal("8W"), 20, "the message waiting for the transfer")
    assert a.cli("chgsmtpa", "--mailxfrint", "0")[0] == 0  # SIGHUP: delivered at once
    a.wait_for(lambda: sink.messages, 20, "delivery once the schedule is off")
    assert not any(c.startswith("ETRN") for c in sink.commands)  # ETRNCLT is *NO
    rc, out, err = a.cli("chgsmtpa", "--mailxfrint", "1", "--etrnclt", "*YES",
                         "--firewall", "*NO", "--mailrouter", "*NONE")
    assert rc == 0, err
    assert a.cli("rlsdstq")[0] == 0
    [note] = a.wait_for(lambda: a.journal("8Y"), 20, "the ETRN skipped for want of a router")
    assert "no MAILROUTER" in note["esd"]
    assert a.journal("8X")[0]["messages"] == 0
