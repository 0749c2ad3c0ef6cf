"""The outbound side of the bridge: the tasks it gives client jobs, and how
QTMSOUTQ lets go of a message whose last delivery task has answered."""

from __future__ import annotations

import json
import os

import pytest
from appliance import base_sections, render_toml
from fsyncs import record_fsyncs
from twisted.internet.task import Clock

from twistmail import config as configmod
from twistmail.bridge.outbound import OutboundManager, _sending
from twistmail.directory import SqliteDirectory
from twistmail.interfaces import QTMSOUTQ
from twistmail.journal import Journal
from twistmail.queue import Envelope, FileQueue, Recipient
from twistmail.smtp import delivery

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


class Pool:
    """The client job pool's seam: it records the tasks it is given."""

    def __init__(self) -> None:
        self.tasks: list[bytes] = []

    def submit_task(self, line: bytes, destination: str) -> int:
        self.tasks.append(line)
        return len(self.tasks)


@pytest.fixture
def manager(tmp_path):
    config = tmp_path / "twistmail.toml"
    config.write_text(render_toml(base_sections(tmp_path / "var")))
    settings = configmod.load(config)
    return OutboundManager(Clock(), settings, FileQueue.for_settings(settings),
                           SqliteDirectory.from_settings(settings),
                           Journal.from_settings(settings, "QTSMTPBRCL/1"), Pool())


def _queued(fq: FileQueue, *recipients: Recipient) -> str:
    env = Envelope.new("jane@example.test", ()).with_recipients(recipients)
    with fq.new_spool(env) as spool:
        spool.write(b"Subject: hi\r\n\r\nhello\r\n")
        return spool.commit(QTMSOUTQ)


def _relayed(manager: OutboundManager, qid: str, status: str = "delivered") -> None:
    result = {"results": [{"address": "rcpt@remote.test", "status": status,
                           "code": 250 if status == "delivered" else 550, "text": "ok"}]}
    manager._record(qid, result, last=True)


def test_relayed_mail_leaves_the_queue_without_a_flush(manager, monkeypatch):
    """Killing a process never undoes an unlink; only a crash of the machine
    could bring the message back, to be relayed again as by any MTA."""
    qid = _queued(manager.queue, Recipient("rcpt@remote.test"))
    synced = record_fsyncs(monkeypatch)
    _relayed(manager, qid)
    assert manager.queue.list(QTMSOUTQ) == []
    assert str(manager.queue.root / QTMSOUTQ) not in synced


@pytest.mark.parametrize("case", ["failed", "success-notify"])
def test_a_removal_after_a_notice_is_flushed(manager, monkeypatch, case):
    """Brought back by a crash, the message would send its notice twice."""
    if case == "failed":
        qid = _queued(manager.queue, Recipient("rcpt@remote.test"))
    else:
        qid = _queued(manager.queue, Recipient("rcpt@remote.test", notify=("SUCCESS",)))
    synced = record_fsyncs(monkeypatch)
    _relayed(manager, qid, "permanent" if case == "failed" else "delivered")
    assert manager.queue.list(QTMSOUTQ) == []
    assert str(manager.queue.root / QTMSOUTQ) in synced


def test_a_task_carries_what_goes_on_mail_and_rcpt(manager):
    """The client job then sends from the task what it would read from the envelope."""
    qid = _queued(manager.queue,
                  Recipient("a@remote.test", notify=("SUCCESS", "FAILURE"),
                            orcpt="rfc822;a@example.test"),
                  Recipient("b@other.test"), Recipient("c@remote.test"))
    env = manager.queue.load(QTMSOUTQ, qid).evolve(ret="HDRS", envid="xyz")
    rcpts = ["a@remote.test", "c@remote.test"]
    task = json.loads(json.dumps({"id": qid, "queue": QTMSOUTQ, "domain": "remote.test",
                                  "recipients": rcpts, "send": _sending(env, rcpts)}))
    read = delivery.Deliverer._read(type("D", (), {"queue": manager.queue})(), task)
    sent = delivery._sending(task)
    assert [r.address for r in sent.recipients] == rcpts
    assert sent.recipients[0].notify == ("SUCCESS", "FAILURE")
    assert sent.recipients[0].orcpt == "rfc822;a@example.test"
    assert (sent.originator, sent.ret, sent.envid) == ("jane@example.test", "HDRS", "xyz")
    assert sent.recipients == read.recipients and sent.originator == read.originator
    assert delivery._sending({"id": qid}) is None  # read from the envelope then


def test_a_one_destination_message_is_settled_from_the_envelope_it_started_with(
        manager, monkeypatch):
    """Its result needs no second read of the envelope file."""
    qid = _queued(manager.queue, Recipient("rcpt@remote.test"))
    env = manager.queue.load(QTMSOUTQ, qid)
    manager.backlog[qid] = (env, {"remote.test": ["rcpt@remote.test"]})
    manager._start(env, {"remote.test": ["rcpt@remote.test"]})
    [line] = manager.pool.tasks
    assert json.loads(line)["send"]["recipients"] == [["rcpt@remote.test", None, None]]

    def no_read(*args):
        raise AssertionError("the envelope was read again")

    monkeypatch.setattr(manager.queue, "load", no_read)
    known = manager.started.pop(qid)
    manager._record(qid, {"results": [{"address": "rcpt@remote.test", "status": "delivered",
                                       "code": 250, "text": "ok"}]}, True, known)
    assert manager.queue.list(QTMSOUTQ) == []


def test_arrivals_ask_for_a_scan_only_when_few_messages_wait(manager):
    """A scan reads every envelope in QTMSOUTQ: with plenty waiting for a
    connection, a new message waits for the refill instead of asking for one."""
    from twisted.internet import inotify
    from twisted.python.filepath import FilePath

    from twistmail.bridge import outbound

    manager._arrival = inotify.IN_MOVED_TO
    arrived = FilePath(str(manager.queue.queue_dir(QTMSOUTQ))).child("x.msg")
    manager._changed(None, arrived, inotify.IN_MOVED_TO)
    assert manager._kick is not None and manager._kick.active()  # few wait: scan soon
    manager._kick.cancel()
    qid = _queued(manager.queue, Recipient("rcpt@remote.test"))
    env = manager.queue.load(QTMSOUTQ, qid)
    manager.backlog = {f"{i}": (env, {"remote.test": ["rcpt@remote.test"]})
                       for i in range(outbound.REFILL_AT)}
    manager._changed(None, arrived, inotify.IN_MOVED_TO)
    assert not manager._kick.active() and manager.refill  # plenty wait: no scan
    manager.backlog.popitem()
    manager._start_ready(())  # a connection took one: now few are left
    assert manager._kick.active() and not manager.refill
