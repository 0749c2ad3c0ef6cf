"""The framework's steps on one message (what a QMSF job runs), on a real queue and Maildir."""

from __future__ import annotations

import os
import shutil

import pytest
from appliance import base_sections, break_maildir, render_toml
from fsyncs import record_fsyncs

from twistmail import config as configmod
from twistmail.bridge.msf import build_processor
from twistmail.bridge.nondelivery import Failure, queue_notice
from twistmail.directory import SqliteDirectory
from twistmail.interfaces import QTMSINQ, QTMSOUTQ
from twistmail.maildir import MaildirStore, trace_prefix
from twistmail.queue import FAILED, Envelope, FileQueue

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


@pytest.fixture
def settings(tmp_path):
    config = tmp_path / "twistmail.toml"
    config.write_text(render_toml(base_sections(tmp_path / "var")))
    settings = configmod.load(config)
    SqliteDirectory.from_settings(settings).create_profile("SAM", "secret")
    return settings


def _queued(fq: FileQueue, *recipients: str) -> str:
    with fq.new_spool(Envelope.new("jane@example.test", recipients)) as spool:
        spool.write(b"Subject: hi\r\n\r\nhello\r\n")
        return spool.commit(QTMSINQ)


def test_mail_only_for_mailboxes_leaves_the_queue_without_a_flush(settings, monkeypatch):
    """A crash may bring such a message back; handled again, it finds its copy
    in the Maildir and makes none.  So its removal is not worth an fsync."""
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "sam@example.test")
    [entry] = (fq.root / QTMSINQ).iterdir()  # the one file: envelope and body
    kept = entry.with_name("kept")
    shutil.copy2(entry, kept)  # the file as a crash could bring it back, envelope and all
    synced = record_fsyncs(monkeypatch)
    assert processor.process(qid).delivered == 1
    assert str(entry.parent) not in synced and fq.list(QTMSINQ) == []
    os.rename(kept, entry)
    assert processor.process(qid).delivered == 1
    assert fq.list(QTMSINQ) == []
    maildir = settings.datadir / "mailboxes" / "SAM" / "Maildir" / "new"
    assert len(os.listdir(maildir)) == 1


def _traced(fq: FileQueue, recipient: str, **fields) -> str:
    """A message as the SMTP server queues one for a single local recipient:
    its file begins with the trace fields of that recipient's mailbox copy."""
    with fq.new_spool(Envelope.new("jane@example.test", (recipient,), **fields)) as spool:
        spool.write_trace(trace_prefix("jane@example.test", recipient))
        spool.write(b"Subject: hi\r\n\r\nhello\r\n")
        return spool.commit(QTMSINQ)


def _traced_for_sam(settings):
    """A traced message for Sam, its queue entry and a second name of it:
    the queue's name as a crash could bring it back."""
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _traced(fq, "sam@example.test")
    [entry] = (fq.root / QTMSINQ).iterdir()
    kept = entry.with_name("kept")
    os.link(entry, kept)
    return fq, processor, qid, entry, kept


def test_a_queued_file_that_begins_with_its_trace_becomes_the_mailbox_copy(
        settings, monkeypatch):
    """No second copy is written or synced: the queued file, durable since its
    250, is linked into new/, and a crash that brings the queue's name back
    makes no second copy."""
    fq, processor, qid, entry, kept = _traced_for_sam(settings)
    processor.mailboxes.ensure("SAM")
    synced = record_fsyncs(monkeypatch)
    assert processor.process(qid).delivered == 1
    maildir = settings.datadir / "mailboxes" / "SAM" / "Maildir"
    assert synced == [str(maildir / "new")] and fq.list(QTMSINQ) == []
    [copy] = (maildir / "new").iterdir()
    assert copy.read_bytes() == (trace_prefix("jane@example.test", "sam@example.test")
                                 + b"Subject: hi\r\n\r\nhello\r\n")
    assert os.path.samefile(copy, kept) and os.listdir(maildir / "tmp") == []
    os.rename(kept, entry)
    assert processor.process(qid).delivered == 1
    assert fq.list(QTMSINQ) == [] and list((maildir / "new").iterdir()) == [copy]
    assert copy.stat().st_nlink == 1


def test_a_linked_file_the_user_deleted_first_is_not_kept_for_reuse(settings):
    """The user's deletion may be on disk only later than the queue's
    directories: the file must not become another message meanwhile."""
    fq, processor, qid, entry, kept = _traced_for_sam(settings)
    assert processor.process(qid).delivered == 1
    new = settings.datadir / "mailboxes" / "SAM" / "Maildir" / "new"
    [copy] = new.iterdir()
    session = processor.mailboxes.open("SAM")  # fetched and deleted at once
    session.mark_deleted(1)
    session.commit()
    os.rename(kept, entry)
    assert processor.process(qid).delivered == 1  # its gone/ record: no copy again
    processor.queue.spares.flush()
    assert fq.recover().clean  # which releases what any process retired
    assert list((fq.root / "spare").iterdir()) == [] and list(new.iterdir()) == []


def test_the_trace_stays_out_of_the_notice(settings):
    """The trace fields are for the mailbox copy only: a notice quotes the
    message from its first real header field, whole with RET=FULL."""
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    for ret in (None, "FULL"):
        qid = _traced(fq, "nobody@example.test", ret=ret)
        notice = processor.process(qid).notice
        text = fq.body_path(notice, QTMSINQ).read_bytes()
        assert b"Subject: hi" in text and (b"hello" in text) == (ret == "FULL")
        assert b"Delivered-To: nobody" not in text and b"Return-Path: <jane" not in text
        fq.remove(QTMSINQ, notice)


def test_a_removal_after_a_notice_is_flushed(settings, monkeypatch):
    """Handled again, the message would send its nondelivery notice twice."""
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "sam@example.test", "nobody@example.test")
    synced = record_fsyncs(monkeypatch)
    outcome = processor.process(qid)
    assert outcome.delivered == 1 and outcome.failed == 1 and outcome.notice is not None
    assert str(fq.root / QTMSINQ) in synced
    assert fq.find(qid) is None


def test_each_notice_about_one_message_is_a_message_of_its_own(settings):
    """A local user unknown at once and a remote one refused later make two
    notices: the second is neither dropped nor mistaken for the first."""
    SqliteDirectory.from_settings(settings).create_profile("JANE", "secret")
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "sam@example.test", "nobody@example.test", "bob@remote.test")
    first = processor.process(qid)
    assert first.failed == 1 and first.forwarded == 1 and fq.find(qid) == QTMSOUTQ
    env = fq.load(QTMSOUTQ, qid).with_recipient("bob@remote.test", state=FAILED,
                                                 last_error="550 5.1.1 no such user")
    second = queue_notice(fq, SqliteDirectory.from_settings(settings), processor.journal,
                          settings.hostname, env,
                          [Failure("bob@remote.test", "5.1.1", "550 5.1.1 no such user")],
                          fq.body_path(qid, QTMSOUTQ))
    assert second is not None and second != first.notice
    assert sorted(fq.list(QTMSINQ)) == sorted([first.notice, second])
    for nid in (first.notice, second):
        assert processor.process(nid).delivered == 1
    store = MaildirStore(settings.datadir / "mailboxes", settings.hostname)
    with store.open("JANE") as mailbox:
        texts = [mailbox.read(m.index).read() for m in mailbox.messages()]
    assert len(texts) == 2
    assert any(b"nobody@example.test" in t for t in texts)
    assert any(b"bob@remote.test" in t for t in texts)


def test_a_notice_made_again_is_neither_queued_nor_journaled_twice(settings):
    """As after a crash between queueing the notice and removing the original."""
    from twistmail.journal import read_entries

    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "nobody@example.test")
    env = fq.load(QTMSINQ, qid)
    failure = [Failure("nobody@example.test", "5.1.1", "550 5.1.1 user unknown")]
    args = (fq, SqliteDirectory.from_settings(settings), processor.journal, settings.hostname,
            env, failure, fq.body_path(qid, QTMSINQ))
    nid = queue_notice(*args)
    assert queue_notice(*args) == nid and fq.list(QTMSINQ).count(nid) == 1
    processor.journal.flush()
    entries = list(read_entries(processor.journal.directory, ["7P", "7G", "AP"]))
    assert [e["code"] for e in entries] == ["7P", "7G", "AP"]
    assert entries[1]["notice"] == nid and entries[1]["esd"] == f"7G MSGID {nid}"


def _maildir_files(settings, user):
    box = settings.datadir / "mailboxes" / user / "Maildir"
    return sorted(p.name for d in ("new", "cur") if (box / d).is_dir()
                  for p in (box / d).iterdir())


def test_a_broken_mailbox_defers_its_recipient_alone(settings):
    """JANE's Maildir cannot take mail: she waits for the retries (BD), SAM's
    copy and bob's forwarding go at once.  SAM fetched and deleted his copy
    before the retry, which delivers to JANE only."""
    from twistmail.journal import read_entries

    SqliteDirectory.from_settings(settings).create_profile("JANE", "secret")
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    repair = break_maildir(settings.datadir, "JANE")
    qid = _queued(fq, "jane@example.test", "sam@example.test", "bob@remote.test")
    outcome = processor.process(qid)
    assert (outcome.delivered, outcome.deferred, outcome.forwarded) == (1, 1, 1)
    assert len(_maildir_files(settings, "SAM")) == 1
    env = fq.load(QTMSOUTQ, qid)  # the outbound side keeps the retries
    assert [r.state for r in env.recipients] == ["retry", "delivered", "pending"]
    assert env.recipients[0].last_error.startswith("4.2.0 mailbox cannot take mail now")
    processor.journal.flush()
    [bd] = read_entries(processor.journal.directory, ["BD"])
    assert bd["recipient"] == "jane@example.test" and bd["mailbox"] == "pop:JANE"
    for p in (settings.datadir / "mailboxes" / "SAM" / "Maildir" / "new").iterdir():
        p.unlink()  # fetched and deleted over POP
    repair()
    fq.move(qid, QTMSOUTQ, QTMSINQ, env.with_recipient("bob@remote.test", state="relayed"))
    outcome = processor.process(qid)  # the retry, as the outbound side brings it back
    assert (outcome.delivered, outcome.deferred, outcome.forwarded) == (1, 0, 0)
    assert _maildir_files(settings, "SAM") == [] and len(_maildir_files(settings, "JANE")) == 1
    assert fq.find(qid) is None


def test_addresses_of_one_mailbox_make_one_copy(settings):
    """The same address twice, in two spellings, or two caught by *ANY *ANY."""
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "sam@example.test", "SAM@Example.TEST", "sam@example.test")
    assert processor.process(qid).delivered == 3
    assert len(_maildir_files(settings, "SAM")) == 1


def test_an_unknown_recipient_beside_a_broken_mailbox_still_gets_its_notice(settings):
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    repair = break_maildir(settings.datadir, "SAM")
    qid = _queued(fq, "sam@example.test", "nobody@example.test")
    first = processor.process(qid)
    assert first.deferred == 1 and first.failed == 1 and first.notice is not None
    env = fq.load(QTMSOUTQ, qid)
    repair()
    fq.move(qid, QTMSOUTQ, QTMSINQ, env)
    outcome = processor.process(qid)  # no second notice about nobody
    assert outcome.delivered == 1 and outcome.failed == 0 and outcome.notice is None
    assert fq.list(QTMSINQ) == [first.notice]


def _notices_fail_once(monkeypatch):
    """The first notice cannot be queued (a full disk); the next ones can."""
    import errno

    from twistmail.bridge import inbound

    real = inbound.queue_notice
    calls = []

    def full_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(inbound, "queue_notice", full_once)


def test_deliveries_are_recorded_when_a_later_step_fails(settings, monkeypatch):
    """The nondelivery notice cannot be queued (a full disk): the retry makes
    no second copy for SAM, who fetched and deleted the first meanwhile."""
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "sam@example.test", "nobody@example.test")
    _notices_fail_once(monkeypatch)
    with pytest.raises(OSError):
        processor.process(qid)
    for p in (settings.datadir / "mailboxes" / "SAM" / "Maildir" / "new").iterdir():
        p.unlink()
    outcome = processor.process(qid)
    assert outcome.failed == 1 and outcome.notice is not None
    assert _maildir_files(settings, "SAM") == []


def test_a_retry_reports_only_its_own_deliveries(settings):
    """SAM asked for a success report and got his copy at the first try; the
    retry that delivers JANE's must not report SAM's again."""
    from twistmail.queue import Recipient

    SqliteDirectory.from_settings(settings).create_profile("JANE", "secret")
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    repair = break_maildir(settings.datadir, "JANE")
    qid = _queued(fq, *(Recipient(a, notify=("SUCCESS",))
                        for a in ("jane@example.test", "sam@example.test")))
    assert processor.process(qid).deferred == 1
    [report] = fq.list(QTMSINQ)  # SAM's
    repair()
    fq.move(qid, QTMSOUTQ, QTMSINQ)
    assert processor.process(qid).delivered == 1
    second = [n for n in fq.list(QTMSINQ) if n != report]
    assert len(second) == 1
    text = fq.body_path(second[0], QTMSINQ).read_bytes()
    assert b"Final-Recipient: rfc822; jane@example.test" in text
    assert b"Final-Recipient: rfc822; sam@example.test" not in text


def test_a_deferred_recipient_whose_domain_is_no_longer_local_is_forwarded(settings):
    from twistmail.queue import RETRY, Recipient

    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, Recipient("jane@moved.test", state=RETRY, resolved="pop:JANE",
                                last_error="4.2.0 mailbox cannot take mail now: x"))
    assert processor.process(qid).forwarded == 1
    assert fq.load(QTMSOUTQ, qid).recipients[0].state == "pending"


def test_a_success_report_survives_a_step_that_failed_after_the_delivery(settings, monkeypatch):
    """The failure notice could not be queued (a full disk): the retry, which
    finds JANE delivered already, still makes her success report."""
    from twistmail.queue import Recipient

    SqliteDirectory.from_settings(settings).create_profile("JANE", "secret")
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, Recipient("jane@example.test", notify=("SUCCESS",)),
                  "nobody@example.test")
    _notices_fail_once(monkeypatch)
    with pytest.raises(OSError):
        processor.process(qid)
    processor.process(qid)
    texts = [fq.body_path(n, QTMSINQ).read_bytes() for n in fq.list(QTMSINQ)]
    assert any(b"Action: delivered" in t for t in texts)


def test_reports_other_than_failures_return_headers_and_no_7u(settings):
    """RET=FULL asks for the whole message back on failure only (RFC 3461 §4.3);
    mail from <> gets no report, and only a failure's is an undeliverable
    notice deleted (7U)."""
    import email
    import email.policy

    from twistmail.journal import read_entries

    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "sam@example.test")
    import attrs

    env = fq.load(QTMSINQ, qid)
    env = env.evolve(ret="FULL", recipients=tuple(
        attrs.evolve(r, notify=("SUCCESS", "DELAY", "FAILURE")) for r in env.recipients))
    directory = SqliteDirectory.from_settings(settings)
    body = fq.body_path(qid, QTMSINQ)
    kinds = {}
    for action in ("delivered", "relayed", "delayed", "failed"):
        report = [Failure("sam@example.test", "2.0.0", "250 2.0.0 ok", action)]
        nid = queue_notice(fq, directory, processor.journal, settings.hostname, env, report,
                           body)
        msg = email.message_from_bytes(fq.body_path(nid, QTMSINQ).read_bytes(),
                                       policy=email.policy.default)
        part = list(msg.iter_parts())[2]
        kinds[action] = (part.get_content_type(), part["Content-Description"])
    assert kinds == {"delivered": ("text/rfc822-headers", "Delivered message headers"),
                     "relayed": ("text/rfc822-headers", "Relayed message headers"),
                     "delayed": ("text/rfc822-headers", "Delayed message headers"),
                     "failed": ("message/rfc822", "Undelivered message")}
    bounce = env.evolve(originator="")
    for action in ("relayed", "failed"):
        report = [Failure("sam@example.test", "2.0.0", "250 2.0.0 ok", action)]
        assert queue_notice(fq, directory, processor.journal, settings.hostname, bounce,
                            report, body) is None
    processor.journal.flush()
    assert len(list(read_entries(processor.journal.directory, ["7U"]))) == 1


def test_a_message_too_large_to_return_in_full_says_so(settings, monkeypatch):
    """RET=FULL of a message over the limit: its header, and a line that says why."""
    from twistmail.bridge import nondelivery

    monkeypatch.setattr(nondelivery, "MAX_RETURNED", 10)
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "nobody@example.test")
    env = fq.load(QTMSINQ, qid).evolve(ret="FULL")
    nid = queue_notice(fq, SqliteDirectory.from_settings(settings), processor.journal,
                       settings.hostname, env,
                       [Failure("nobody@example.test", "5.1.1", "550 5.1.1 user unknown")],
                       fq.body_path(qid, QTMSINQ))
    raw = fq.body_path(nid, QTMSINQ).read_bytes()
    assert b"text/rfc822-headers" in raw and b"message/rfc822" not in raw
    assert b"only its header is returned" in raw.replace(b"\r\n", b" ")


def test_postmaster_without_an_entry_reaches_the_responsible_person(settings):
    """RFC 5321 §4.5.1: SMTP takes postmaster mail; it must not bounce for want of an entry."""
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "Postmaster@example.test")
    outcome = processor.process(qid)  # no responsible person, no NONDELIVERY user
    assert outcome.failed == 1 and outcome.notice is not None
    processor.responsible = "sam@example.test"  # CHGSMTPA NFYDLVRY
    qid = _queued(fq, "Postmaster@example.test")
    outcome = processor.process(qid)
    assert outcome.delivered == 1 and outcome.notice is None
    [delivered] = (settings.datadir / "mailboxes" / "SAM" / "Maildir" / "new").iterdir()
    assert b"Delivered-To: Postmaster@example.test" in delivered.read_bytes()


def test_postmaster_mail_goes_to_its_stand_in_rather_than_the_catch_all(settings):
    """README: postmaster mail without an entry of its own goes to the NFYDLVRY
    person or else the NONDELIVERY user.  With a *ANY *ANY entry it went to
    the catch-all, where abuse reports would be lost among the spam."""
    from twistmail.directory import DirectoryEntry
    from twistmail.journal import read_entries

    directory = SqliteDirectory.from_settings(settings)
    directory.create_profile("JANE", "secret")
    directory.add_entry(DirectoryEntry("NONDLV", "MAIL", "copies", user="SAM",
                                       msfsrvlvl="*SYSMS", prefadr="*SMTP",
                                       smtpuser="NONDELIVERY"))
    directory.add_entry(DirectoryEntry("*ANY", "*ANY", "catch-all", user="JANE",
                                       msfsrvlvl="*SYSMS"))
    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "postmaster@example.test", "stranger@example.test")
    assert processor.process(qid).delivered == 2
    boxes = settings.datadir / "mailboxes"
    [to_postmaster] = (boxes / "SAM" / "Maildir" / "new").iterdir()
    assert b"Delivered-To: postmaster@example.test" in to_postmaster.read_bytes()
    [to_stranger] = (boxes / "JANE" / "Maildir" / "new").iterdir()
    assert b"Delivered-To: stranger@example.test" in to_stranger.read_bytes()
    processor.journal.flush()
    vias = {e["recipient"]: e.get("via")
            for e in read_entries(processor.journal.directory, ["P2"], msgid=qid)}
    assert vias == {"postmaster@example.test": "NONDELIVERY@example.test",
                    "stranger@example.test": None}


def test_resolution_and_forwarding_are_journaled_as_the_seed_tags_them(settings):
    """P2 carries the seed's tags (POP LclDel, SMTP MsgFwd, SMTP NonDel) in its
    data, which IBM's queries search; C6 comes with C1 and C2."""
    from twistmail.journal import read_entries

    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "sam@example.test", "friend@remote.test", "nobody@example.test")
    processor.process(qid)
    processor.journal.flush()
    entries = list(read_entries(processor.journal.directory, ["P2", "C6", "C1", "C2"], msgid=qid))
    assert [e["esd"] for e in entries] == [
        "P2 R sam@example.test POP LclDel", "P2 R friend@remote.test SMTP MsgFwd",
        "P2 R nobody@example.test SMTP NonDel", f"C6 TOQ {QTMSOUTQ}",
        "C1 O jane@example.test", "C2 R friend@remote.test"]


def test_a_report_of_delivery_is_journaled_as_a_cod_not_as_a_nondelivery(settings):
    """REFERENCE §5.3: AP/A1/A2 are nondelivery messages; a query for AP
    counted every success report among the bounces."""
    from twistmail.journal import read_entries
    from twistmail.queue import Recipient

    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, Recipient("sam@example.test", notify=("SUCCESS",)))
    assert processor.process(qid).delivered == 1
    processor.journal.flush()
    codes = [e["code"] for e in read_entries(processor.journal.directory)]
    assert {"7R", "7G", "BR", "B1"} <= set(codes) and "AP" not in codes and "A2" not in codes


def test_mail_is_journaled_parked_only_once_it_is(settings):
    """On a full disk the move to QTMSBSSQ may fail: 7L was written all the
    same, for a message that stayed on QTMSINQ."""
    import errno

    from twistmail.journal import read_entries

    fq = FileQueue.for_settings(settings)
    processor = build_processor(settings, "QMSF/1")
    qid = _queued(fq, "sam@example.test")
    processor.storage_full = lambda: True

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    processor.queue.move = full
    with pytest.raises(OSError):
        processor.process(qid)
    processor.journal.flush()
    assert [e["code"] for e in read_entries(processor.journal.directory, msgid=qid)] == ["7A"]
    assert qid in {e.id for e in fq.entries(QTMSINQ)}
