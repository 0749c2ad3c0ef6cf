"""The outbound side of the bridge: the tasks it gives client jobs, and how
QTMSOUTQ lets go of a message whose last delivery task has answered."""

from __future__ import annotations

import collections
import json
import os

import pytest
from appliance import base_sections, render_toml
from fsyncs import record_fsyncs
from inline_reactor import Inline as _Inline
from twisted.internet.task import Clock

from twistmail import config as configmod
from twistmail import queue as queuemod
from twistmail.bridge import deletes, outbound
from twistmail.bridge.outbound import OutboundManager, _sending
from twistmail.directory import SqliteDirectory
from twistmail.interfaces import CORRUPT, QTMSOUTQ, QTMSRTQ1, QTMSRTQ2
from twistmail.journal import Journal, read_entries
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
    message = json.loads(json.dumps({"id": qid, "recipients": rcpts,
                                     "send": _sending(env, rcpts)}))
    sent = delivery._sending(message)
    assert [r.address for r in sent.recipients] == rcpts
    assert sent.recipients[0].notify == ("SUCCESS", "FAILURE")
    assert sent.recipients[0].orcpt == "rfc822;a@example.test"
    assert sent.recipients[1].notify is None and sent.recipients[1].orcpt is None
    assert (sent.originator, sent.ret, sent.envid) == ("jane@example.test", "HDRS", "xyz")


def _waiting(manager: OutboundManager, *domains: str) -> list[str]:
    """Messages as a scan leaves them waiting, each for its domains."""
    qids = []
    for spec in domains:
        rcpts = [Recipient(f"rcpt@{d}") for d in spec.split(",")]
        qid = _queued(manager.queue, *rcpts)
        env = manager.queue.load(QTMSOUTQ, qid)
        manager.backlog[qid] = (env, {d: [f"rcpt@{d}"] for d in spec.split(",")})
        manager.by_domain.setdefault(spec.split(",")[0], collections.deque()).append(qid)
        qids.append(qid)
    return qids


def _task_ids(line: bytes) -> list[str]:
    return [m["id"] for m in json.loads(line)["messages"]]


def test_a_task_carries_one_message_while_connections_are_free(manager):
    qids = _waiting(manager, *["remote.test"] * outbound.CONNECTIONS_PER_DOMAIN)
    manager._start_ready(["remote.test"])
    assert [_task_ids(t) for t in manager.pool.tasks] == [[q] for q in qids]


def test_waiting_messages_share_the_free_connections_in_order(manager):
    """Ten waiting for four connections: tasks of three, three, two and two."""
    qids = _waiting(manager, *["remote.test"] * 10)
    manager._start_ready(["remote.test"])
    assert [_task_ids(t) for t in manager.pool.tasks] == [
        qids[0:3], qids[3:6], qids[6:8], qids[8:10]]
    assert manager.per_domain["remote.test"] == outbound.CONNECTIONS_PER_DOMAIN
    assert not manager.backlog


def test_a_task_carries_at_most_a_batch(manager):
    many = outbound.CONNECTIONS_PER_DOMAIN * outbound.BATCH + 5
    qids = _waiting(manager, *["remote.test"] * many)
    manager._start_ready(["remote.test"])
    assert [len(_task_ids(t)) for t in manager.pool.tasks] == \
        [outbound.BATCH] * outbound.CONNECTIONS_PER_DOMAIN
    assert list(manager.backlog) == qids[-5:]  # they wait for a connection (86)


def test_a_message_on_its_last_try_goes_alone_and_says_so(manager):
    """Tried even behind one that failed (the job is told "last"), it goes
    alone: after the others of a task it would wait out a dead host's timeouts."""
    qids = _waiting(manager, *["remote.test"] * 10)
    count = sum(manager.settings.smtp.rtymin[:1]) + manager._second_level()[0]
    env = manager.backlog[qids[4]][0].evolve(attempts=count)  # one try left
    manager.backlog[qids[4]] = (env, manager.backlog[qids[4]][1])
    manager._start_ready(["remote.test"])
    tasks = [json.loads(t)["messages"] for t in manager.pool.tasks]
    assert [[m["id"] for m in t] for t in tasks][:2] == [qids[0:3], qids[3:4]]
    assert [(m["id"], m["last"]) for m in tasks[2]] == [(qids[4], True)]
    assert not any(m["last"] for t in tasks if t is not tasks[2] for m in t)


def test_a_message_for_two_destinations_goes_alone(manager):
    """A batch stops before it; it then takes a connection of each destination."""
    a, two, c, d, e, f = _waiting(manager, "remote.test", "remote.test,other.test",
                                  *["remote.test"] * 4)
    manager._start_ready(["remote.test"])
    tasks = [(json.loads(t)["domain"], _task_ids(t)) for t in manager.pool.tasks]
    assert tasks == [("remote.test", [a]), ("remote.test", [two]), ("other.test", [two]),
                     ("remote.test", [c, d]), ("remote.test", [e, f])]


def test_each_message_of_a_task_is_settled_by_its_own_outcome(manager):
    qids = _waiting(manager, *["remote.test"] * 10)
    manager._start_ready(["remote.test"])
    token = 1
    first = _task_ids(manager.pool.tasks[0])
    assert len(first) == 3
    outcome = {"domain": "remote.test", "messages": [
        {"id": first[0], "results": [{"address": "rcpt@remote.test", "status": "delivered",
                                      "code": 250, "text": "ok"}]},
        {"id": first[1], "results": [{"address": "rcpt@remote.test", "status": "temporary",
                                      "code": 451, "text": "later"}]},
    ]}  # the third has no outcome: it is tried again
    manager.reactor = _Inline()
    manager._result(token, json.dumps(outcome).encode())
    assert first[0] not in manager.queue.list(QTMSOUTQ)
    assert set(manager.queue.list(QTMSRTQ1)) == {first[1], first[2]}
    assert manager.queue.load(QTMSRTQ1, first[2]).attempts == 1
    assert not (set(first) & (manager.open.keys() | manager.busy | manager.started.keys()))
    assert set(qids[3:]) & set(manager.open)  # the freed connection took the next ones


def test_a_one_destination_message_is_settled_from_the_envelope_it_started_with(
        manager, monkeypatch):
    """Its result needs no second read of the envelope file."""
    [qid] = _waiting(manager, "remote.test")
    manager._start_ready(["remote.test"])
    [line] = manager.pool.tasks
    assert json.loads(line)["messages"][0]["send"]["recipients"] == \
        [["rcpt@remote.test", None, None]]

    def no_read(*args):
        raise AssertionError("the envelope was read again")

    monkeypatch.setattr(manager.queue, "load", no_read)
    manager.reactor = _Inline()
    manager._result(1, json.dumps({"messages": [{"id": qid, "results": [
        {"address": "rcpt@remote.test", "status": "delivered", "code": 250, "text": "ok"}]}]}
    ).encode())
    assert manager.queue.list(QTMSOUTQ) == [] and not manager.busy


def test_a_scan_sets_aside_what_it_cannot_read(manager):
    """Recovery leaves QTMSOUTQ and the retry queues to their reader: a
    damaged envelope or a lost body goes to corrupt/ (7Y) at the scan."""
    fq = manager.queue
    fine = _queued(fq, Recipient("rcpt@remote.test"))
    packed = _queued(fq, Recipient("rcpt@remote.test"))
    os.removexattr(fq.root / QTMSOUTQ / f"{packed}.msg", queuemod.ENVELOPE_ATTR)
    fq.packing = False
    no_body = _queued(fq, Recipient("rcpt@remote.test"))
    fq.body_path(no_body).unlink()
    retry = _queued(fq, Recipient("rcpt@remote.test"))
    fq.move(retry, QTMSOUTQ, QTMSRTQ1)
    fq.envelope_path(QTMSRTQ1, retry).write_bytes(b'{"id": "trunc')
    cut = _queued(fq, Recipient("rcpt@remote.test"))
    os.truncate(fq.body_path(cut), 7)
    found = manager._due(False, None, frozenset())
    assert [env.id for env, _ in found.work] == [fine]
    assert sorted(fq.list(CORRUPT)) == sorted([packed, no_body, retry, cut])
    reasons = {e["msgid"]: e["reason"]
               for e in read_entries(manager.journal.directory, ["7Y"])}
    assert reasons[no_body] == "body missing"
    assert reasons[cut].startswith("body of 7 bytes, ")
    assert reasons[packed].startswith("unreadable envelope") and \
        reasons[retry].startswith("unreadable envelope")


def test_arrivals_ask_for_a_scan_only_when_few_messages_wait(manager):
    """A scan reads every envelope in QTMSOUTQ: with plenty waiting for a
    connection, a new message waits for the refill instead of asking for one."""
    from twisted.internet import inotify
    from twisted.python.filepath import FilePath

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


def _delivered(*qids: str, status: str = "delivered", domain: str = "remote.test") -> bytes:
    return json.dumps({"messages": [{"id": q, "results": [
        {"address": f"rcpt@{domain}", "status": status, "code": 250, "text": "ok"}]}
        for q in qids]}).encode()


def test_an_outcome_that_cannot_be_written_is_kept_and_written_later(manager, monkeypatch):
    """Until it is written the message is not sent again: its envelope on disk
    still shows pending a recipient the task delivered."""
    fq = manager.queue
    qid = _queued(fq, Recipient("ok@remote.test"), Recipient("slow@remote.test"))
    env = fq.load(QTMSOUTQ, qid)
    manager.backlog[qid] = (env, {"remote.test": ["ok@remote.test", "slow@remote.test"]})
    manager.by_domain["remote.test"] = collections.deque([qid])
    manager._start_ready(["remote.test"])
    move = fq.move

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fq, "move", full)
    manager.reactor = _Inline()
    manager._result(1, json.dumps({"messages": [{"id": qid, "results": [
        {"address": "ok@remote.test", "status": "delivered", "code": 250, "text": "ok"},
        {"address": "slow@remote.test", "status": "temporary", "code": 451, "text": "later"},
    ]}]}).encode())
    assert fq.list(QTMSOUTQ) == [qid] and qid in manager.busy and qid in manager.record_retries
    assert manager._due(False, None, frozenset()).work == []  # not sent again meanwhile
    manager.reactor.advance(outbound.RECORD_RETRY)  # still full: later again
    assert qid in manager.record_retries and fq.list(QTMSRTQ1) == []
    monkeypatch.setattr(fq, "move", move)
    manager.reactor.advance(2 * outbound.RECORD_RETRY)
    assert fq.list(QTMSRTQ1) == [qid] and not manager.busy and not manager.record_retries
    states = {r.address: r.state for r in fq.load(QTMSRTQ1, qid).recipients}
    assert states == {"ok@remote.test": queuemod.DELIVERED, "slow@remote.test": queuemod.PENDING}


def test_the_message_under_way_when_its_job_ended_goes_alone_next_time(manager):
    """Should it be what ends the jobs, it takes no other with it again.  The one
    after it was not begun (the job tells each before it begins the next): it
    goes again with no try counted."""
    from types import SimpleNamespace

    qids = _waiting(manager, *["remote.test"] * 8)
    manager._start_ready(["remote.test"])
    lost = manager.pool.tasks[0]
    first = _task_ids(lost)
    assert len(first) == 2
    manager.reactor = _Inline()
    manager._lost(SimpleNamespace(token=1, task=lost))
    assert manager.queue.list(QTMSRTQ1) == first[:1]  # tried again later
    assert manager.queue.find(first[1]) == QTMSOUTQ
    assert manager.queue.load(QTMSOUTQ, first[1]).recipients[0].attempts == 0
    assert manager.alone == {first[0]}
    # Due again, it waits with others for the connections of their destination.
    env = manager.queue.load(QTMSRTQ1, first[0])
    manager.queue.move(first[0], QTMSRTQ1, QTMSOUTQ)
    manager.backlog[first[0]] = (env, {"remote.test": ["rcpt@remote.test"]})
    first = first[:1]
    later = _waiting(manager, *["remote.test"] * 4)
    manager.by_domain["remote.test"] = collections.deque(first + later)
    for token in (2, 3, 4):
        manager._result(token, _delivered(*_task_ids(manager.pool.tasks[token - 1])))
    after = [_task_ids(t) for t in manager.pool.tasks[4:]]
    assert [[q] for q in first] == [t for t in after if set(t) & set(first)]
    assert sorted(q for t in after for q in t) == sorted(first + later)
    assert not manager.alone and len(qids) == 8


def test_a_job_killed_after_it_told_some_outcomes_charges_only_the_next(manager):
    """Ten waiting: a task of three.  The job told the first done (PART), so
    the second was under way; the third was not begun and waits untouched."""
    from types import SimpleNamespace

    _waiting(manager, *["remote.test"] * 10)
    manager._start_ready(["remote.test"])
    lost = manager.pool.tasks[0]
    done, under_way, untouched = _task_ids(lost)
    manager.reactor = _Inline()
    [told] = json.loads(_delivered(done))["messages"]
    manager._part(1, done, json.dumps(told).encode())
    manager._lost(SimpleNamespace(token=1, task=lost))
    fq = manager.queue
    assert fq.find(done) is None  # delivered, as told
    assert fq.find(under_way) == QTMSRTQ1 and manager.alone == {under_way}
    assert fq.find(untouched) == QTMSOUTQ
    assert fq.load(QTMSOUTQ, untouched).recipients[0].attempts == 0


def test_a_task_no_job_ran_stays_let_go_by_its_transfer(manager):
    """With MAILXFRINT, it goes at the next scan, not at the next transfer."""
    from types import SimpleNamespace

    [qid] = _waiting(manager, "remote.test")
    manager.schedule = SimpleNamespace(active=True, stop=lambda: None)
    manager._start_ready(["remote.test"])
    assert qid not in manager.released
    manager._refused(SimpleNamespace(token=1, task=manager.pool.tasks[0]))
    assert qid in manager.released and not manager.open and not manager.per_domain


def test_each_entry_of_an_answer_stands_on_its_own():
    line = json.dumps({"messages": [None, {"id": ["x"]}, {"id": "a", "results": "bad"},
                                    {"id": "b", "results": []}, {"id": "b", "results": [1]},
                                    {"id": "c"}]}).encode()
    assert outbound._outcomes(outbound._answer(line)) == {
        "b": {"id": "b", "results": []}, "c": {"id": "c"}}
    for bad in (b"not json", b'{"messages": 3}', b"[1]", b'"x"'):
        assert outbound._outcomes(outbound._answer(bad)) == {}
        assert outbound._unreachable(outbound._answer(bad)) is None


def test_no_relayed_notice_is_made_when_nothing_was_relayed(manager):
    """Nor is a 7U journaled for a bounce that went nowhere."""
    env = Envelope.new("", ()).with_recipients([Recipient("rcpt@remote.test")])
    with manager.queue.new_spool(env) as spool:
        spool.write(b"Subject: a notice\r\n\r\nhello\r\n")
        qid = spool.commit(QTMSOUTQ)
    manager._record(qid, {"dsn": False, "results": [
        {"address": "rcpt@remote.test", "status": "temporary", "code": 421, "text": "no"}]},
        last=True)
    assert manager.queue.list(QTMSRTQ1) == [qid]
    assert list(read_entries(manager.journal.directory, ["7U"])) == []


def test_a_failure_of_a_notice_journals_no_notice_put_on_qtmsinq(manager):
    """87 said a notice went to QTMSINQ where none was made (a null sender)."""
    env = Envelope.new("", ()).with_recipients([Recipient("rcpt@remote.test")])
    with manager.queue.new_spool(env) as spool:
        spool.write(b"Subject: a notice\r\n\r\nhello\r\n")
        qid = spool.commit(QTMSOUTQ)
    _relayed(manager, qid, status="permanent")
    codes = [e["code"] for e in read_entries(manager.journal.directory, ["83", "87", "7U"])]
    assert codes == ["83", "7U"]
    qid = _queued(manager.queue, Recipient("rcpt@remote.test"))
    _relayed(manager, qid, status="permanent")
    codes = [e["code"] for e in read_entries(manager.journal.directory, ["87", "7P", "AP"])]
    assert codes == ["87", "7P", "AP"]


def test_a_destination_no_job_ran_leaves_its_message_for_the_next_scan(manager):
    """Not in a retry queue, with an attempt counted, for its other destination's outcome."""
    from types import SimpleNamespace

    [qid] = _waiting(manager, "remote.test,other.test")
    manager._start_ready(["remote.test"])
    tokens = {json.loads(t)["domain"]: i + 1 for i, t in enumerate(manager.pool.tasks)}
    manager._refused(SimpleNamespace(token=tokens["other.test"], task=b""))
    manager.reactor = _Inline()
    manager._result(tokens["remote.test"], _delivered(qid))
    env = manager.queue.load(QTMSOUTQ, qid)
    assert manager.queue.list(QTMSRTQ1) == [] and env.attempts == 0
    assert {r.address: r.state for r in env.recipients} == {
        "rcpt@remote.test": queuemod.DELIVERED, "rcpt@other.test": queuemod.PENDING}
    assert not (manager.busy or manager.untried or manager.open)
    assert [e.id for e, _ in manager._due(False, None, frozenset()).work] == [qid]


def _notices(fq: FileQueue) -> list[list[str]]:
    """The Final-Recipients of each notice waiting on QTMSINQ."""
    import email
    import email.policy

    from twistmail.interfaces import QTMSINQ

    out = []
    for nid in fq.list(QTMSINQ):
        msg = email.message_from_bytes(fq.body_path(nid, QTMSINQ).read_bytes(),
                                       policy=email.policy.default)
        [status] = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
        out.append(sorted(b["Final-Recipient"] for b in status.get_payload()[1:]))
    return sorted(out)


def test_a_local_failure_reported_by_the_bridge_is_not_reported_again(manager):
    """nobody@ unknown at once, bob@remote refused later: two notices, each naming
    its own recipient (the second named nobody@ again, and journaled its 83)."""
    from twistmail.bridge.msf import build_processor
    from twistmail.interfaces import QTMSINQ

    fq = manager.queue
    with fq.new_spool(Envelope.new("jane@example.test",
                                   ("nobody@example.test", "bob@remote.test"))) as spool:
        spool.write(b"Subject: hi\r\n\r\nhello\r\n")
        qid = spool.commit(QTMSINQ)
    build_processor(manager.settings, "QMSF/1").process(qid)
    assert _notices(fq) == [["rfc822; nobody@example.test"]]
    manager._record(qid, {"results": [{"address": "bob@remote.test", "status": "permanent",
                                       "code": 550, "text": "5.1.1 no such user"}]}, last=True)
    assert _notices(fq) == [["rfc822; bob@remote.test"], ["rfc822; nobody@example.test"]]


def test_a_delay_notice_goes_once_not_at_every_second_level_retry(manager, monkeypatch):
    fq = manager.queue
    qid = _queued(fq, Recipient("bob@remote.test", notify=("DELAY", "FAILURE")))
    monkeypatch.setattr(manager, "_retry_target", lambda attempts: (
        queuemod.QTMSRTQ2, "8D", 60.0))
    for _ in range(3):
        manager._record(qid, {"results": [{"address": "bob@remote.test", "status": "temporary",
                                           "code": 451, "text": "4.3.0 try later"}]},
                        last=True)
        fq.move(qid, queuemod.QTMSRTQ2, QTMSOUTQ)  # due again
    assert _notices(fq) == [["rfc822; bob@remote.test"]]


def test_a_retry_set_before_the_clock_went_back_is_not_held_for_the_difference(manager):
    """next_try a day ahead on QTMSRTQ1 (RTYMIN waits 30 minutes at most): the
    clock was set back, or RTYMIN lowered; the message goes now."""
    import time

    fq = manager.queue
    qid = _queued(fq, Recipient("bob@remote.test"))
    env = fq.load(QTMSOUTQ, qid)
    fq.move(qid, QTMSOUTQ, QTMSRTQ1, env.evolve(attempts=1, next_try=time.time() + 86400))
    other = _queued(fq, Recipient("eve@remote.test"))
    env = fq.load(QTMSOUTQ, other)
    fq.move(other, QTMSOUTQ, QTMSRTQ1, env.evolve(attempts=1, next_try=time.time() + 600))
    manager._due(False, None, frozenset())
    assert fq.find(qid) == QTMSOUTQ and fq.find(other) == QTMSRTQ1


def test_an_etrn_sends_the_remote_part_of_a_message_with_a_deferred_local_one(manager):
    """Under MAILXFRINT the flush lets the remote recipient past the schedule
    from QTMSOUTQ; by way of QTMSINQ its request would be forgotten."""
    import time

    from twistmail.queue import RETRY

    fq = manager.queue
    qid = _queued(fq, Recipient("jane@example.test", state=RETRY, resolved="pop:JANE",
                                last_error="4.2.0 mailbox cannot take mail now: x"),
                  Recipient("bob@remote.test"))
    fq.move(qid, QTMSOUTQ, QTMSRTQ1,
            fq.load(QTMSOUTQ, qid).evolve(attempts=1, next_try=time.time() + 600))
    outbound.request_flush(fq.root, "remote.test")
    found = manager._due(False, time.time() + 3600, frozenset())
    assert [env.id for env, _ in found.work] == [qid]


def test_a_local_recipient_out_of_retries_is_journaled_a3(manager):
    from twistmail.queue import RETRY

    fq = manager.queue
    manager.settings = attrs_evolve_smtp(manager.settings, rtymin=(0, 0))
    qid = _queued(fq, Recipient("jane@example.test", state=RETRY, resolved="pop:JANE",
                                last_error="4.2.0 mailbox cannot take mail now: x"))
    manager._settle_message(qid)
    manager.journal.flush()
    codes = [e["code"] for e in read_entries(manager.journal.directory)]
    assert "A3" in codes and "83" not in codes


def attrs_evolve_smtp(settings, **changes):
    import attrs

    return attrs.evolve(settings, smtp=attrs.evolve(settings.smtp, **changes))


def test_an_etrn_does_not_use_up_a_retry_of_a_local_recipient_it_did_not_try(manager):
    """The remote part went early; JANE's mailbox was not tried, so her
    message goes back with the tries it had and the time it was due."""
    import time

    from twistmail.queue import RETRY

    fq = manager.queue
    qid = _queued(fq, Recipient("jane@example.test", state=RETRY, resolved="pop:JANE",
                                attempts=1, last_error="4.2.0 mailbox cannot take mail now"),
                  Recipient("rcpt@remote.test"))
    due = time.time() + 600
    fq.move(qid, QTMSOUTQ, QTMSRTQ1, fq.load(QTMSOUTQ, qid).evolve(attempts=1, next_try=due))
    outbound.request_flush(fq.root, "remote.test")
    assert [env.id for env, _ in manager._due(False, None, frozenset()).work] == [qid]
    _relayed(manager, qid)
    env = fq.load(QTMSRTQ1, qid)
    assert (env.attempts, env.next_try) == (1, due)
    assert [r.state for r in env.recipients] == ["retry", "delivered"]


def test_an_etrn_try_that_fails_for_now_uses_no_retry_up(manager):
    """RFC 1985 asks for an early try, not a shorter schedule: three ETRNs
    in seconds returned the message as undeliverable, before the time its
    delay notice had promised."""
    import time

    fq = manager.queue
    manager.settings = attrs_evolve_smtp(manager.settings, rtymin=(1, 30), rtyhour=(0, 0))
    qid = _queued(fq, Recipient("rcpt@remote.test"))
    due = time.time() + 1800
    fq.move(qid, QTMSOUTQ, QTMSRTQ1, fq.load(QTMSOUTQ, qid).evolve(attempts=1, next_try=due))
    for _ in range(3):
        outbound.request_flush(fq.root, "remote.test")
        found = manager._due(False, None, frozenset())
        assert [env.id for env, _ in found.work] == [qid]
        assert not manager._last_try(found.work[0][0])  # not its last: it does not count
        _relayed(manager, qid, status="temporary")
        env = fq.load(QTMSRTQ1, qid)
        assert (env.attempts, env.next_try) == (1, due)
    manager._due(False, None, frozenset())
    assert fq.find(qid) == QTMSRTQ1  # not due: the flush is spent


def test_a_local_recipient_tried_this_round_counts_its_try(manager):
    """Its counter may lag the message's (an earlier ETRN round counted a try
    for the remote part alone): what tells an untried round is the ETRN's
    note, not the counters."""
    import time

    from twistmail.queue import RETRY

    fq = manager.queue
    qid = _queued(fq, Recipient("jane@example.test", state=RETRY, resolved="pop:JANE",
                                attempts=2, last_error="4.2.0 mailbox cannot take mail now"))
    fq.update(QTMSOUTQ, fq.load(QTMSOUTQ, qid).evolve(attempts=2, next_try=time.time() - 1))
    manager._settle_message(qid)
    env = fq.load(QTMSRTQ1, qid)
    assert env.attempts == 3 and env.next_try > time.time()


def _reads_of(manager, queue):
    """Count the scans' readings of ``queue``."""
    reads = []
    versions = manager.queue.versions

    def counting(name):
        if name == queue:
            reads.append(name)
        return versions(name)

    manager.queue.versions = counting
    return reads


def _temporary(manager, qid):
    manager._record(qid, {"results": [{"address": "bob@remote.test", "status": "temporary",
                                       "code": 451, "text": "4.3.0 try later"}]}, last=True)


def test_the_retry_queues_are_not_read_while_nothing_there_is_due(manager):
    """A destination down for hours leaves thousands of messages waiting there:
    reading them every second took a quarter of a CPU."""
    import time

    fq = manager.queue
    qid = _queued(fq, Recipient("bob@remote.test"))
    _temporary(manager, qid)  # RTYMIN: 30 minutes
    assert fq.find(qid) == QTMSRTQ1
    reads = _reads_of(manager, QTMSRTQ1)
    for _ in range(3):
        manager._due(False, None, frozenset())
    assert len(reads) == 1 and fq.find(qid) == QTMSRTQ1
    # Read again after REREAD (a file put there by hand), and when due.
    manager._retry_read_at[QTMSRTQ1] -= outbound.REREAD
    manager._due(False, None, frozenset())
    assert len(reads) == 2
    fq.update(QTMSRTQ1, fq.load(QTMSRTQ1, qid).evolve(next_try=time.time() - 1))
    manager._due(False, None, frozenset())
    assert len(reads) == 2  # nothing told the bridge: the reread finds it
    manager._retry_read_at[QTMSRTQ1] -= outbound.REREAD
    found = manager._due(False, None, frozenset())
    assert [env.id for env, _ in found.work] == [qid]


def test_a_retry_the_bridge_queues_is_due_without_a_reread(manager):
    """Its move lowers the mark, also while a scan reads the queue."""
    fq = manager.queue
    manager.settings = attrs_evolve_smtp(manager.settings, rtymin=(3, 0))
    manager._due(False, None, frozenset())  # QTMSRTQ1 empty: nothing will be due there
    first = _queued(fq, Recipient("bob@remote.test"))
    _temporary(manager, first)
    found = manager._due(False, None, frozenset())
    assert [env.id for env, _ in found.work] == [first]

    second = _queued(fq, Recipient("bob@remote.test"))
    versions = fq.versions

    def settling_meanwhile(name):
        listing = versions(name)
        if name == QTMSRTQ1 and fq.find(second) == QTMSOUTQ:
            _temporary(manager, second)  # after the listing: the next scan's
        return listing

    fq.versions = settling_meanwhile
    manager._retry_read_at[QTMSRTQ1] -= outbound.REREAD
    found = manager._due(False, None, frozenset())
    assert second not in [env.id for env, _ in found.work] and fq.find(second) == QTMSRTQ1
    fq.versions = versions
    found = manager._due(False, None, frozenset())
    assert second in [env.id for env, _ in found.work]


def test_new_retry_settings_have_the_retry_queues_read(manager):
    import time

    fq = manager.queue
    qid = _queued(fq, Recipient("bob@remote.test"))
    fq.move(qid, QTMSOUTQ, QTMSRTQ1,
            fq.load(QTMSOUTQ, qid).evolve(attempts=1, next_try=time.time() + 1500))
    manager._due(False, None, frozenset())
    assert fq.find(qid) == QTMSRTQ1
    # RTYMIN lowered to 10 minutes: a wait of 25 more is longer than it gives.
    manager.configure(attrs_evolve_smtp(manager.settings, rtymin=(3, 10)))
    found = manager._due(False, None, frozenset())
    assert [env.id for env, _ in found.work] == [qid]


def test_a_held_queue_is_read_again_only_for_what_arrives(manager):
    """HLDDSTQ over a backlog of thousands: each scan read all of QTMSOUTQ."""
    from twisted.internet import inotify
    from twisted.python.filepath import FilePath

    fq = manager.queue
    (fq.root / outbound.HOLD_FLAGS["*NORMAL"]).touch()
    manager.notifier = object()  # inotify reports arrivals
    manager._arrival = inotify.IN_MOVED_TO
    _queued(fq, Recipient("bob@remote.test"))
    reads = _reads_of(manager, QTMSOUTQ)
    for _ in range(3):
        assert manager._due(False, None, frozenset()).held
    assert len(reads) == 1
    # A local recipient deferred and nothing to send: settled, hold or not.
    qid = _queued(fq, Recipient("jane@example.test", state=queuemod.RETRY, resolved="pop:JANE",
                                last_error="4.2.0 mailbox cannot take mail now"))
    manager._changed(None, FilePath(str(fq.queue_dir(QTMSOUTQ) / f"{qid}.msg")),
                     inotify.IN_MOVED_TO)
    assert manager._due(False, None, frozenset()).settle == [qid]
    assert manager._due(False, None, frozenset()).settle == [] and len(reads) == 2
    manager._outq_read_at -= outbound.REREAD
    assert manager._due(False, None, frozenset()).settle == [qid] and len(reads) == 3


def test_a_backlog_waiting_for_connections_is_not_read_again_while_it_stands(manager):
    """A slow destination with thousands waiting: each scan read them all and
    rebuilt the backlog, half a CPU for 20000.  What arrives, and the messages
    of a task no job ran, have the queue read again."""
    from types import SimpleNamespace

    from twisted.internet import inotify
    from twisted.python.filepath import FilePath

    fq = manager.queue
    manager.notifier = object()
    manager._arrival = inotify.IN_MOVED_TO
    many = outbound.REFILL_AT + outbound.CONNECTIONS_PER_DOMAIN * outbound.BATCH + 10
    for _ in range(many):
        _queued(fq, Recipient("bob@slow.test"))
    reads = _reads_of(manager, QTMSOUTQ)

    assert len(_scan(manager).work) == many
    tasks = len(manager.pool.tasks)
    assert tasks == outbound.CONNECTIONS_PER_DOMAIN
    waiting = len(manager.backlog)
    assert _scan(manager).unchanged and len(reads) == 1 and len(manager.backlog) == waiting
    # Another destination's message arrives: read, and it goes at once.
    other = _queued(fq, Recipient("eve@fast.test"))
    manager._changed(None, FilePath(str(fq.queue_dir(QTMSOUTQ) / f"{other}.msg")),
                     inotify.IN_MOVED_TO)
    assert not _scan(manager).unchanged and len(reads) == 2
    assert _task_ids(manager.pool.tasks[-1]) == [other]
    assert _scan(manager).unchanged
    # A task no job ran: its messages are work again.
    first = _task_ids(manager.pool.tasks[0])
    manager._refused(SimpleNamespace(token=1, task=manager.pool.tasks[0]))
    assert not _scan(manager).unchanged and set(first) <= set(manager.backlog) | set(manager.open)
    manager._outq_read_at -= outbound.REREAD
    assert not _scan(manager).unchanged


def _standing_backlog(manager):
    """A backlog of more than REFILL_AT for slow.test, as a scan leaves it; inotify on."""
    from twisted.internet import inotify

    manager.notifier = object()
    manager._arrival = inotify.IN_MOVED_TO
    many = outbound.REFILL_AT + outbound.CONNECTIONS_PER_DOMAIN * outbound.BATCH + 10
    qids = [_queued(manager.queue, Recipient("bob@slow.test")) for _ in range(many)]
    _scan(manager)
    return qids


def _scan(manager, next_at=None, released=frozenset()):
    """What OutboundManager.scan does, in this thread."""
    manager.touched = set()
    found = manager._due(False, next_at, frozenset(released))
    manager._dispatch(found)
    return found


def test_a_message_freed_while_a_scan_ran_is_read_at_the_next(manager, monkeypatch):
    """Started while the scan ran and refused at once: the scan's view of it is
    stale, so it is left out of the backlog; the next scan must read it."""
    qids = _standing_backlog(manager)
    freed = qids[-1]
    flush_requests = outbound._flush_requests

    def meanwhile(root):  # the reactor thread, while the scan thread starts
        manager.touched.add(freed)
        return flush_requests(root)

    monkeypatch.setattr(outbound, "_flush_requests", meanwhile)
    manager._outq_changed = True  # something arrived: this scan reads the queue
    _scan(manager)
    assert freed not in manager.backlog
    monkeypatch.setattr(outbound, "_flush_requests", flush_requests)
    assert not _scan(manager).unchanged and freed in manager.backlog


def test_mail_waiting_for_a_transfer_goes_when_mailxfrint_is_turned_off(manager):
    import time

    qids = _standing_backlog(manager)
    waiting = _queued(manager.queue, Recipient("eve@fast.test"))
    # MAILXFRINT: a transfer let the others go; the one after it waits (8W).
    _scan(manager, next_at=time.time() + 3600, released=qids)
    assert waiting not in manager.backlog and len(manager.backlog) >= outbound.REFILL_AT
    manager.configure(attrs_evolve_smtp(manager.settings, mailxfrint=0))
    assert not _scan(manager).unchanged
    assert any(waiting in _task_ids(t) for t in manager.pool.tasks)


def test_a_failed_read_of_the_queue_has_it_read_again(manager):
    _standing_backlog(manager)
    manager._outq_changed = True
    versions = manager.queue.versions

    def failing(name):
        if name == QTMSOUTQ:
            raise OSError(24, "Too many open files")
        return versions(name)

    manager.queue.versions = failing
    with pytest.raises(OSError):
        manager._due(False, None, frozenset())
    manager.queue.versions = versions
    assert not _scan(manager).unchanged


def test_a_pool_that_refuses_at_once_is_given_one_task_per_round(manager):
    """WAIT(*NO) with every job busy: each refused task freed its connection
    again, so one round made refused tasks of the whole backlog."""
    from types import SimpleNamespace

    qids = _waiting(manager, *["slow.test"] * 30, *["other.test"] * 30)
    record = manager.pool.submit_task

    def refusing(line, destination):
        token = record(line, destination)
        manager._refused(SimpleNamespace(token=token, task=line))
        return token

    manager.pool.submit_task = refusing
    manager._start_ready(["slow.test", "other.test"])
    assert len(manager.pool.tasks) == 1
    refused = _task_ids(manager.pool.tasks[0])
    assert not manager.open and not manager.per_domain
    assert set(manager.backlog) == set(qids) - set(refused)  # the rest waits as it was
    manager.pool.submit_task = record
    manager._start_ready(["slow.test", "other.test"])
    assert len(manager.pool.tasks) == 1 + 2 * outbound.CONNECTIONS_PER_DOMAIN


def _unreachable(*qids: str, why: str = "4.4.1 Cannot connect to mx[192.0.2.1]:25",
                 domain: str = "dead.test") -> bytes:
    answer = json.loads(_delivered(*qids, status="temporary", domain=domain))
    return json.dumps({**answer, "unreachable": why}).encode()


def test_what_waits_for_a_destination_no_task_could_reach_is_retried_later(manager):
    """A backlog for a host that never answers went round one task at a
    time, each waiting out the same timeouts on one of four connections."""
    manager.reactor = _Inline()
    many = outbound.CONNECTIONS_PER_DOMAIN * outbound.BATCH + 10
    qids = _waiting(manager, *["dead.test"] * many)
    [other] = _waiting(manager, "other.test")
    manager._start_ready(["dead.test", "other.test"])
    tasks = [_task_ids(t) for t in manager.pool.tasks[:outbound.CONNECTIONS_PER_DOMAIN]]
    for token, ids in enumerate(tasks[:-1], start=1):
        manager._result(token, _unreachable(*ids))
        manager._start_ready(["dead.test"], note_waiting=True)  # as after a scan
        # The others may still reach it: meanwhile no new task for it.
        assert len(manager.pool.tasks) == outbound.CONNECTIONS_PER_DOMAIN + 1
        assert manager.queue.list(QTMSRTQ1) and len(manager.backlog) == 10
    manager._result(outbound.CONNECTIONS_PER_DOMAIN, _unreachable(*tasks[-1]))
    assert len(manager.pool.tasks) == outbound.CONNECTIONS_PER_DOMAIN + 1
    # Meanwhile a scan's 86 said why they waited.
    reasons = {e["reason"] for e in read_entries(manager.journal.directory, ["86"])}
    assert reasons == {"no server answered the last task; its other tasks decide"}
    assert sorted(manager.queue.list(QTMSRTQ1)) == sorted(qids)
    assert not manager.backlog and "dead.test" not in manager.by_domain
    assert manager.open == {other: {"other.test"}}  # another destination is not held back
    held_back = set(qids) - {q for ids in tasks for q in ids}
    for qid in held_back:
        env = manager.queue.load(QTMSRTQ1, qid)
        assert env.attempts == 1
        assert "not tried: no server of dead.test answered just now" in \
            env.recipients[0].last_error
    [entry] = [e for e in read_entries(manager.journal.directory) if e["code"] == "8U"]
    assert entry["domain"] == "dead.test" and entry["messages"] == len(held_back)
    assert "Cannot connect" in entry["reason"]
    # A message that arrives later is tried: it is the probe.
    [later] = _waiting(manager, "dead.test")
    manager._start_ready(["dead.test"])
    assert _task_ids(manager.pool.tasks[-1]) == [later]


def test_a_task_that_reached_the_destination_clears_the_doubt(manager):
    """A server that turns away connections beyond its limit is not dead:
    the task it served answers, and the waiting mail goes on."""
    manager.reactor = _Inline()
    many = outbound.CONNECTIONS_PER_DOMAIN * outbound.BATCH + 4
    qids = _waiting(manager, *["busy.test"] * many)
    manager._start_ready(["busy.test"])
    first, second = _task_ids(manager.pool.tasks[0]), _task_ids(manager.pool.tasks[1])
    manager._result(1, _unreachable(*first, why="4.4.1 busy[127.0.0.1]:25 greeted with: 421",
                                    domain="busy.test"))
    manager._result(2, _delivered(*second, domain="busy.test"))
    assert not manager.failing and "8U" not in {
        e["code"] for e in read_entries(manager.journal.directory)}
    assert len(manager.pool.tasks) == outbound.CONNECTIONS_PER_DOMAIN + 2
    assert sorted(manager.queue.list(QTMSRTQ1)) == sorted(first)  # its own, as before
    assert not manager.backlog and len(qids) == many


def _fill_and_fail(manager, domain="dead.test"):
    """Fill the connections of ``domain`` with tasks; the message ids of each task."""
    manager.reactor = _Inline()
    _waiting(manager, *[domain] * (outbound.CONNECTIONS_PER_DOMAIN * outbound.BATCH))
    manager._start_ready([domain])
    return [_task_ids(t) for t in manager.pool.tasks]


def _answer_unreachable(manager, tasks):
    for token, ids in enumerate(tasks, start=1):
        manager._result(token, _unreachable(*ids))


def test_a_message_for_several_destinations_is_not_held_back(manager):
    """Its other destinations are not held back with it: it waits for its connection."""
    tasks = _fill_and_fail(manager)
    [both] = _waiting(manager, "dead.test,other.test")
    manager.by_domain["other.test"] = collections.deque([both])
    _answer_unreachable(manager, tasks)
    assert both not in manager.queue.list(QTMSRTQ1)
    new = [(json.loads(t)["domain"], _task_ids(t)) for t in manager.pool.tasks[len(tasks):]]
    assert new == [("dead.test", [both]), ("other.test", [both])]


def test_a_message_on_its_last_try_is_tried_not_held_back(manager):
    """With no retries left it would be returned without ever being tried."""
    tasks = _fill_and_fail(manager)
    # Only it is on its last try (those would each go alone, in tasks of their own).
    manager.settings = attrs_evolve_smtp(manager.settings, rtymin=(0, 0))
    [last] = _waiting(manager, "dead.test")
    _answer_unreachable(manager, tasks)
    assert last not in manager.queue.list(QTMSRTQ1) and not manager.queue.list(QTMSRTQ1)
    assert _task_ids(manager.pool.tasks[-1]) == [last]


def test_the_verdict_waits_for_a_task_the_pool_did_not_run(manager):
    """The last running task, refused by the pool, says nothing of the
    destination: the answers before it decide."""
    from types import SimpleNamespace

    tasks = _fill_and_fail(manager)
    waiting = _waiting(manager, *["dead.test"] * 3)
    _answer_unreachable(manager, tasks[:-1])
    assert set(waiting).isdisjoint(manager.queue.list(QTMSRTQ1))
    assert len(manager.pool.tasks) == len(tasks)
    manager._refused(SimpleNamespace(token=len(tasks), task=manager.pool.tasks[-1]))
    assert set(waiting) <= set(manager.queue.list(QTMSRTQ1))
    assert set(tasks[-1]).isdisjoint(manager.queue.list(QTMSRTQ1))  # not run: next scan


def test_nothing_is_held_back_while_the_queue_is_held(manager):
    tasks = _fill_and_fail(manager)
    waiting = _waiting(manager, *["dead.test"] * 3)
    outbound.hold_flag(manager.queue.root).touch()
    _answer_unreachable(manager, tasks)
    assert set(waiting) <= set(manager.backlog) and not manager.failing
    assert set(waiting).isdisjoint(manager.queue.list(QTMSRTQ1))


def test_the_status_of_a_notice_is_the_one_the_reply_gave():
    """A temporary code stays temporary when the retries run out (as the delay notice
    said); only the word where RFC 3463 puts it counts."""
    from twistmail.bridge.outbound import _status

    assert _status("451 4.3.0 busy (retries exhausted)") == "4.3.0"
    assert _status("550 5.1.1 user unknown") == "5.1.1"
    assert _status("4.4.1 connection refused") == "4.4.1"
    assert _status("550 Server v2.0.1 refuses you") == "5.0.0"
    assert _status("451 5.1.1 mixed classes") == "4.0.0"
    assert _status("451 Try later") == "4.0.0"
    assert _status(None) == "5.0.0"


def test_a_delay_notice_keeps_the_reply_status_in_class_4():
    from twistmail.bridge.outbound import _delayed_status

    assert _delayed_status("452 4.5.3 Too many recipients") == "4.5.3"
    assert _delayed_status("550 5.5.0 odd") == "4.5.0"  # a permanent code never delays
    assert _delayed_status("4.4.1 connection refused") == "4.4.1"


# -- wrkq --delete: the bridge deletes what the administrator asks for -----------


def _scan_now(manager):
    manager.reactor = _Inline()
    manager._dispatch(manager._due(False, None, frozenset()))


def test_a_message_on_a_retry_queue_is_deleted_at_the_next_scan(manager):
    fq = manager.queue
    qid = _queued(fq, Recipient("bob@remote.test"), Recipient("ann@remote.test"))
    _temporary(manager, qid)
    assert fq.find(qid) == QTMSRTQ1
    deletes.request(fq.root, qid)
    _scan_now(manager)
    assert fq.find(qid) is None and not os.listdir(fq.root / "data")
    assert deletes.outcome(fq.root, qid) == "done"
    [entry] = read_entries(manager.journal.directory, ["8Z"])
    assert entry["msgid"] == qid and entry["queue"] == QTMSRTQ1
    assert entry["recipients"] == ["bob@remote.test", "ann@remote.test"]
    assert entry["originator"] == "jane@example.test"
    assert manager.pool.tasks == []


def test_a_message_waiting_on_qtmsoutq_is_deleted_and_not_sent(manager):
    fq = manager.queue
    kept = _queued(fq, Recipient("rcpt@remote.test"))
    qid = _queued(fq, Recipient("rcpt@remote.test"))
    deletes.request(fq.root, qid)
    _scan_now(manager)
    assert fq.list(QTMSOUTQ) == [kept] and deletes.outcome(fq.root, qid) == "done"
    assert [_task_ids(t) for t in manager.pool.tasks] == [[kept]]
    assert qid not in manager.busy and qid not in manager.backlog


@pytest.mark.parametrize("result", ["temporary", "delivered"])
def test_a_message_being_sent_is_deleted_when_its_attempt_ends(manager, result):
    """What the attempt delivered stays delivered; what it did not is not tried again."""
    fq = manager.queue
    [qid] = _waiting(manager, "remote.test")
    manager._start_ready(["remote.test"])
    deletes.request(fq.root, qid)
    _scan_now(manager)
    assert fq.find(qid) == QTMSOUTQ and deletes.outcome(fq.root, qid) == "asked"
    manager._result(1, json.dumps({"messages": [{"id": qid, "results": [
        {"address": "rcpt@remote.test", "status": result, "code": 250, "text": "ok"}]}]}
    ).encode())
    _scan_now(manager)
    assert fq.find(qid) is None
    if result == "temporary":  # waited on QTMSRTQ1 for a moment
        assert deletes.outcome(fq.root, qid) == "done"
        assert [e["queue"] for e in read_entries(manager.journal.directory, ["8Z"])] == \
            [QTMSRTQ1]
    else:  # left before it could be deleted: told apart, and nothing journaled as deleted
        assert deletes.outcome(fq.root, qid) == "gone"
        assert deletes.outcome(fq.root, qid) == "done"  # the answer is read once
        assert list(read_entries(manager.journal.directory, ["8Z"])) == []
    assert len(manager.pool.tasks) == 1


def test_a_request_that_is_not_a_queue_id_is_left_alone(manager):
    fq = manager.queue
    qid = _queued(fq, Recipient("rcpt@remote.test"))
    (fq.root / deletes.DIRECTORY).mkdir(exist_ok=True)
    (fq.root / deletes.DIRECTORY / "notes.txt").touch()
    assert deletes.asked(fq.root) == []
    _scan_now(manager)
    assert fq.find(qid) == QTMSOUTQ and [_task_ids(t) for t in manager.pool.tasks] == [[qid]]
    assert (fq.root / deletes.DIRECTORY / "notes.txt").exists()


def test_a_message_set_aside_meanwhile_is_not_deleted(manager):
    """Set aside (or quarantined), it is the administrator's to act on alone:
    a request made before must not delete it after a release."""
    fq = manager.queue
    qid = _queued(fq, Recipient("rcpt@remote.test"))
    deletes.request(fq.root, qid)
    fq.move(qid, QTMSOUTQ, CORRUPT)
    _scan_now(manager)
    assert fq.find(qid) == CORRUPT and deletes.outcome(fq.root, qid) == "gone"


class _Killed(BaseException):
    """A SIGKILL at that point: nothing after it runs."""


def test_a_deletion_killed_half_way_is_finished_and_journaled_at_the_next_start(
        manager, monkeypatch):
    fq = manager.queue
    qid = _queued(fq, Recipient("bob@remote.test"))
    _temporary(manager, qid)
    deletes.request(fq.root, qid)
    write = manager.journal.write

    def killed(code, *args, **fields):
        if code == "8Z":
            raise _Killed  # after the removal, before the journal and the answer
        return write(code, *args, **fields)

    monkeypatch.setattr(manager.journal, "write", killed)
    with pytest.raises(_Killed):
        _scan_now(manager)
    monkeypatch.setattr(manager.journal, "write", write)
    assert fq.find(qid) is None and deletes.outcome(fq.root, qid) == "asked"
    again = OutboundManager(Clock(), manager.settings, fq, manager.directory, manager.journal,
                            Pool())
    _scan_now(again)
    assert deletes.outcome(fq.root, qid) == "done"
    [entry] = read_entries(manager.journal.directory, ["8Z"])
    assert entry["msgid"] == qid and entry["queue"] == QTMSRTQ1


def test_parked_mail_deleted_while_a_scan_reads_the_requests_is_answered_deleted(manager):
    """The queue manager deletes parked mail; the outbound scan, in its own
    thread, must not take the request of a message it finds gone for one
    that left the queues (the command said "not deleted" after a 7N)."""
    from test_msfjobs import DyingJobs

    from twistmail.bridge.manager import QueueManager
    from twistmail.interfaces import QTMSBSSQ, QTMSINQ

    fq = manager.queue
    with fq.new_spool(Envelope.new("jane@example.test", ("sam@example.test",))) as spool:
        spool.write(b"Subject: big\r\n\r\nbody\r\n")
        qid = spool.commit(QTMSINQ)
    fq.move(qid, QTMSINQ, QTMSBSSQ)

    class ScanMeanwhile:
        def write(self, code, *args, **fields):
            manager._deletes()  # between the removal and the answer
            return manager.journal.write(code, *args, **fields)

    parked = QueueManager(manager.reactor, fq, DyingJobs(), ScanMeanwhile(), lambda: True)
    deletes.request(fq.root, qid)
    parked._release_parked()
    assert fq.find(qid) is None and deletes.outcome(fq.root, qid) == "done"


def test_a_message_deleted_from_a_retry_queue_is_forgotten(manager):
    """One whose client job died goes alone next time; deleted, nothing of it is kept."""
    from types import SimpleNamespace

    fq = manager.queue
    [qid] = _waiting(manager, "remote.test")
    manager.reactor = _Inline()
    manager._start_ready(["remote.test"])
    manager._lost(SimpleNamespace(token=1, task=manager.pool.tasks[0]))
    assert fq.find(qid) == QTMSRTQ1 and qid in manager.alone
    deletes.request(fq.root, qid)
    _scan_now(manager)
    assert fq.find(qid) is None and deletes.outcome(fq.root, qid) == "done"
    assert qid not in manager.alone


def test_a_deletion_killed_after_its_claim_deletes_the_message_at_the_next_start(manager):
    fq = manager.queue
    qid = _queued(fq, Recipient("bob@remote.test"))
    _temporary(manager, qid)
    deletes.request(fq.root, qid)
    os.replace(fq.root / deletes.DIRECTORY / qid,
               fq.root / deletes.DIRECTORY / f"{qid}.{QTMSRTQ1}{deletes.CLAIMED}")
    assert deletes.outcome(fq.root, qid) == "asked"
    _scan_now(manager)  # the first scan of this bridge
    assert fq.find(qid) is None and deletes.outcome(fq.root, qid) == "done"
    [entry] = read_entries(manager.journal.directory, ["8Z"])
    assert entry["recipients"] == ["bob@remote.test"]


def test_wrkq_retry_sends_every_remote_retry_now_and_the_try_does_not_count(manager):
    """The administrator mended the destination: the mail goes now, not in hours.
    A try that fails again uses no retry up: run while the host is still down,
    --retry returned mail before the time its delay notice had promised."""
    import time

    fq = manager.queue
    manager.settings = attrs_evolve_smtp(manager.settings, rtyhour=(3, 1))
    first = _queued(fq, Recipient("bob@remote.test"))
    _temporary(manager, first)  # RTYMIN: 30 minutes
    due = fq.load(QTMSRTQ1, first).next_try
    second = _queued(fq, Recipient("ann@other.test"))
    fq.move(second, QTMSOUTQ, QTMSRTQ2,
            fq.load(QTMSOUTQ, second).evolve(attempts=4, next_try=time.time() + 1200))
    local = _queued(fq, Recipient("jane@example.test", state=queuemod.RETRY,
                                  resolved="pop:JANE", attempts=1, last_error="4.2.0 full"))
    fq.move(local, QTMSOUTQ, QTMSRTQ1,
            fq.load(QTMSOUTQ, local).evolve(attempts=1, next_try=time.time() + 600))
    assert manager._due(False, None, frozenset()).work == []
    outbound.request_retry(fq.root)
    # A MAILXFRINT schedule does not hold them back either.
    found = manager._due(False, time.time() + 3600, frozenset())
    assert sorted(env.id for env, _ in found.work) == sorted([first, second])
    assert fq.find(local) == QTMSRTQ1  # its mailbox keeps its own timed retries
    assert not (fq.root / outbound.RETRY_REQUEST).exists()  # asked once, done once
    codes = [e["code"] for e in read_entries(manager.journal.directory, ["8E", "8F"])]
    assert sorted(codes) == ["8E", "8F"]
    _temporary(manager, first)
    env = fq.load(QTMSRTQ1, first)
    assert (env.attempts, env.next_try) == (1, due)


def test_a_retry_request_whose_scan_fails_is_kept(manager, monkeypatch):
    fq = manager.queue
    qid = _queued(fq, Recipient("bob@remote.test"))
    _temporary(manager, qid)
    outbound.request_retry(fq.root)

    def broken(*args):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(manager.queue, "versions", broken)
    with pytest.raises(OSError):
        manager._due(False, None, frozenset())
    monkeypatch.undo()
    assert [env.id for env, _ in manager._due(False, None, frozenset()).work] == [qid]
