"""SNADS users: SNDDST into the mail queues, QRYDST/RCVDST on the distribution store, CHGDSTA."""

from __future__ import annotations

import email
import email.policy
import json
import poplib
import smtplib

import pytest
from test_smtp_client import Sink

from twistmail.config import load
from twistmail.snads import DistributionError, send_distribution


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.stop()


def enroll(a) -> None:
    """POP users SAM, JANE, APP; SNADS users OVUSER HQ (SMTP name ov.user) and BOB HQ (none)."""
    for user in ("SAM", "JANE", "APP"):
        a.user(user)
    for args in (["--usrid", "OVUSER", "HQ", "--usrd", "OfficeVision user", "--msfsrvlvl",
                  "*USRIDX", "--prefadr", "*SMTP", "--smtpuser", "ov.user"],
                 ["--usrid", "BOB", "HQ", "--usrd", "Bob in accounts"]):
        rc, out, err = a.cli("adddire", *args)
        assert rc == 0, err


@pytest.fixture
def post(make_appliance, sink):
    a = make_appliance(smtp={"mailrouter": f"127.0.0.1:{sink.port}", "firewall": "*YES"})
    a.start()
    enroll(a)
    return a


def pop_messages(a, user: str) -> list[email.message.EmailMessage]:
    p = poplib.POP3(*a.addr("pop3"), timeout=30)
    p.user(user.lower())
    p.pass_("secret")
    count = len(p.list()[1])
    out = [email.message_from_bytes(b"".join(line + b"\n" for line in p.retr(i)[1]),
                                    policy=email.policy.default) for i in range(1, count + 1)]
    p.quit()
    return out


def qrydst(a, *user: str) -> list[dict]:
    rc, out, err = a.cli("qrydst", *user, "--json")
    assert rc == 0, err
    return json.loads(out)


def one_line_error(result, *needles: str) -> None:
    rc, out, err = result
    assert rc == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in err


def test_snddst_reaches_pop_users_and_the_internet(post, sink):
    a = post
    rc, out, err = a.cli(
        "snddst", "--type", "*LMSG", "--usrid", "OVUSER", "HQ",
        "--tousrid", "SAM MAIL", "--tousrid", "JANE MAIL *CC", "--tousrid", "APP MAIL *BCC",
        "--tointnet", "friend@remote.test", "--tointnet", "hidden@remote.test *BCC",
        "--dstd", "Budget meeting", "--longmsg", "Room 4B at ten.\nBring the figures.",
        "--importance", "*HIGH")
    assert rc == 0 and "queued as" in out, err
    a.wait_mailbox("JANE", 1)
    a.wait_mailbox("APP", 1)
    a.wait_for(lambda: sink.messages, 30, "delivery to the Internet recipients")
    [sam] = pop_messages(a, "SAM")
    assert sam["Subject"] == "Budget meeting"
    assert sam["From"].addresses[0].addr_spec == "ov.user@example.test"
    assert sam["From"].addresses[0].display_name == "OfficeVision user"
    assert {x.addr_spec for x in sam["To"].addresses} == {"sam@example.test",
                                                          "friend@remote.test"}
    assert sam["Cc"] is None  # KEEPRCP *BCC, the shipped value: no Cc header
    assert sam["Importance"] == "high"
    assert sam.get_content_type() == "text/plain" and sam.get_content_charset() == "utf-8"
    assert sam.get_content() == "Room 4B at ten.\nBring the figures.\n"
    [out_msg] = sink.messages
    assert sorted(out_msg.recipients) == ["friend@remote.test", "hidden@remote.test"]
    for raw in (out_msg.content, a.mailbox("SAM")[0].read_bytes()):
        assert b"hidden@" not in raw and b"app@" not in raw and b"Bcc" not in raw
    codes = [e["code"] for e in a.journal() if e.get("job", "").startswith("SNDDST/")]
    assert codes[:2] == ["EH", "E1"] and codes.count("E2") == 5 and "ET" in codes
    assert "H1" in codes and codes.count("H2") == 5


def test_keeprcp_all_keeps_cc_and_never_bcc(make_appliance):
    a = make_appliance().start()
    enroll(a)
    rc, out, err = a.cli("dspdsta", "--json")
    assert rc == 0 and json.loads(out) == {"keeprcp": "*BCC"}
    rc, out, err = a.cli("chgdsta", "--keeprcp", "*all")
    assert rc == 0 and "*ALL" in out, err
    assert 'keeprcp = "*ALL"' in a.config.read_text()
    rc, out, err = a.cli("chgdsta", "--keeprcp", "*SAME")  # as in CL: no change, no mistake
    assert (rc, out) == (0, "Distribution attributes unchanged (*SAME).\n"), err
    rc, out, err = a.cli("dspdsta")
    assert rc == 0 and "*ALL" in out
    rc, out, err = a.cli("snddst", "--type", "*LMSG", "--usrid", "OVUSER", "HQ",
                         "--tousrid", "SAM MAIL *PRI", "--tousrid", "JANE MAIL *CC",
                         "--tousrid", "APP MAIL *BCC", "--dstd", "Minutes",
                         "--longmsg", "attached below")
    assert rc == 0, err
    a.wait_mailbox("APP", 1)
    for user in ("SAM", "JANE", "APP"):
        [msg] = pop_messages(a, user)
        assert [x.addr_spec for x in msg["To"].addresses] == ["sam@example.test"]
        assert [x.addr_spec for x in msg["Cc"].addresses] == ["jane@example.test"]
        assert msg["Bcc"] is None and "app@" not in str(msg["To"]) + str(msg["Cc"])
        assert user == "APP" or "app@" not in msg.as_string()  # APP's own: Delivered-To


def test_internet_mail_to_a_snads_user_is_queried_and_received(post, tmp_path):
    a = post
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["ov.user@example.test"],
                   b"From: Jane <jane@example.test>\r\nSubject: Lunch on Friday?\r\n"
                   b"Date: Fri, 27 Nov 2026 09:30:00 +0000\r\n\r\nAt noon.\r\n")
        s.sendmail("friend@remote.test", ["ov.user@example.test"],
                   b"From: friend@remote.test\r\nSubject: hello from outside\r\n\r\nHi.\r\n")
    # The journal entry of a step is written when the step ends, just after the store.
    a.wait_for(lambda: len(a.journal("7O")) == 2, 20, "two 7O entries")
    assert len(qrydst(a, "--usrid", "OVUSER", "HQ")) == 2
    first, second = qrydst(a, "--usrid", "ovuser", "hq")
    assert first["dstid"] == "MAIL    JANE    0001"  # Jane's directory entry: JANE MAIL
    assert first["sender"] == "jane@example.test"
    assert first["description"] == "Lunch on Friday?"
    assert first["date"].startswith("2026-11-27T09:30:00")
    assert second["dstid"] == "REMOTE  FRIEND  0002"
    assert {first["status"], second["status"]} == {"*OLD"}  # listed once already

    rc, out, err = a.cli("rcvdst", "--usrid", "OVUSER", "HQ", "--dstid", first["dstid"],
                         "--keep", "*YES")
    assert rc == 0 and "Subject: Lunch on Friday?" in out and out.endswith("At noon.\r\n"), err
    assert [d["status"] for d in qrydst(a, "--usrid", "OVUSER", "HQ")] == ["*OPENED", "*OLD"]

    target = tmp_path / "lunch.eml"
    rc, out, err = a.cli("cl", f"RCVDST DSTID(MAIL JANE 1) USRID(OVUSER HQ) OUTFILE('{target}')")
    assert rc == 0 and "written to" in out, err
    assert target.read_bytes().endswith(b"\r\n\r\nAt noon.\r\n")
    assert [d["dstid"] for d in qrydst(a, "--usrid", "OVUSER", "HQ")] == ["REMOTE  FRIEND  0002"]
    one_line_error(a.cli("rcvdst", "--usrid", "OVUSER", "HQ", "--dstid", first["dstid"]),
                   "--dstid", "not a distribution of OVUSER HQ")

    rc, out, err = a.cli("rcvdst", "--usrid", "OVUSER", "HQ", "--dstid", second["dstid"])
    assert rc == 0 and "hello from outside" in out
    rc, out, err = a.cli("qrydst", "--usrid", "OVUSER", "HQ")
    assert rc == 0 and "no distributions" in out


def test_a_new_snads_entry_is_not_handed_the_store_of_one_removed(post):
    """The store is named by the user ID alone: after RMVDIRE, an entry added
    with that user ID read the distributions of the one removed."""
    a = post
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["ov.user@example.test"], b"Subject: private\r\n\r\nx\r\n")
    a.wait_for(lambda: len(a.journal("7O")) == 1, 20, "the 7O entry")
    rc, out, err = a.cli("rmvdire", "--usrid", "OVUSER", "HQ")
    assert rc == 0 and "Its SNADS store keeps 1 distribution" in out, err
    rc, out, err = a.cli("adddire", "--usrid", "OVUSER", "BRANCH", "--usrd", "Other person",
                         "--msfsrvlvl", "*USRIDX")
    one_line_error((rc, out, err), "--usrid: 'OVUSER BRANCH' is not allowed: user ID OVUSER "
                   "has a SNADS store left by an earlier entry, with 1 distribution")
    # Nor by a change: an entry that becomes *USRIDX.
    rc, out, err = a.cli("adddire", "--usrid", "OVUSER", "BRANCH", "--usrd", "Other person",
                         "--msfsrvlvl", "*SYSMS", "--user", "SAM")
    assert rc == 0, err
    one_line_error(a.cli("chgdire", "--usrid", "OVUSER", "BRANCH", "--msfsrvlvl", "*USRIDX"),
                   "user ID OVUSER has a SNADS store left by an earlier entry")
    rc, out, err = a.cli("adddire", "--usrid", "OTHER", "BRANCH", "--usrd", "Other person",
                         "--msfsrvlvl", "*USRIDX")
    assert rc == 0, err


def test_snddst_to_snads_users_by_smtp_name_and_by_store(post):
    a = post
    sent = send_distribution(load(a.config), usrprf="sam", tousrid=["OVUSER HQ"],
                             dstd="Inventory", longmsg="Counts are in.",
                             tointnet=[], msg="Short note", type="*LMSG")
    assert sent.queue_id is not None and sent.queued == ("ov.user@example.test",)
    assert sent.stored == ()
    rc, out, err = a.cli("snddst", "--type", "*MSG", "--usrprf", "SAM",
                         "--tousrid", "BOB HQ", "--dstd", "Quick one", "--msg", "See me")
    assert rc == 0 and "stored for BOB HQ" in out, err
    [bob] = qrydst(a, "--usrid", "BOB", "HQ")  # no SMTP name: routed straight to the store
    assert bob["dstid"] == "MAIL    SAM     0001" and bob["description"] == "Quick one"
    a.wait_for(lambda: qrydst(a, "--usrid", "OVUSER", "HQ"), 20, "delivery via the bridge")
    rc, out, err = a.cli("rcvdst", "--usrid", "OVUSER", "HQ", "--dstid", "MAIL SAM 1")
    assert rc == 0 and "Short note\n\nCounts are in." in out.replace("\r\n", "\n"), err
    rc, out, err = a.cli("rcvdst", "--usrid", "BOB", "HQ", "--dstid", "MAIL SAM 1")
    assert rc == 0 and "To: BOB HQ:;" in out and "See me" in out
    one_line_error(a.cli("qrydst", "--usrprf", "SAM"), "--usrprf", "*SYSMS", "*USRIDX")


@pytest.fixture
def stopped(make_appliance):
    """The checks come before anything is queued, so no daemon is needed."""
    a = make_appliance()
    enroll(a)
    return a


SEND = ("snddst", "--type", "*LMSG", "--usrid", "OVUSER", "HQ", "--tousrid", "SAM MAIL",
        "--dstd", "x")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("snddst", "--type", "*LMSG", "--usrid", "NOBODY", "HQ", "--tousrid", "SAM MAIL",
          "--dstd", "x", "--longmsg", "y"), ("--usrid", "NOBODY HQ", "not in the system")),
        (("snddst", "--type", "*LMSG", "--usrid", "BOB", "HQ", "--tousrid", "SAM MAIL",
          "--dstd", "x", "--longmsg", "y"), ("--usrid", "no SMTP name", "chgdire")),
        (("snddst", "--type", "*LMSG", "--usrprf", "NOSUCH", "--tousrid", "SAM MAIL",
          "--dstd", "x", "--longmsg", "y"), ("--usrprf", "NOSUCH")),
        ((*SEND, "--longmsg", "z" * 5001), ("--longmsg", "5001 characters", "up to 5000")),
        ((*SEND[:2], "*DOC", *SEND[3:], "--longmsg", "y"), ("--type", "*DOC", "*LMSG, *MSG")),
        ((*SEND[:2], "*BOGUS", *SEND[3:], "--longmsg", "y"), ("--type", "not allowed")),
        (SEND[:1] + SEND[3:] + ("--longmsg", "y"), ("--type", "required")),
        (SEND, ("--longmsg", "*LMSG")),
        ((*SEND, "--longmsg", "y", "--tousrid", "GHOST HQ"), ("--tousrid", "GHOST HQ")),
        ((*SEND, "--longmsg", "y", "--tousrid", "JANE MAIL *XX"), ("--tousrid", "*PRI")),
        ((*SEND, "--longmsg", "y", "--tointnet", "not-an-address"), ("--tointnet",)),
        ((*SEND, "--longmsg", "y", *(w for i in range(301) for w in
                                     ("--tointnet", f"u{i}@remote.test"))),
         ("--tointnet", "301 recipients", "up to 300")),
        ((*SEND[:-1], "d" * 45, "--longmsg", "y"), ("--dstd", "up to 44")),
        (("chgdsta", "--keeprcp", "*SOME"), ("--keeprcp", "*BCC", "*ALL", "*NONE")),
        (("qrydst",), ("--usrid", "--usrprf")),
        (("qrydst", "--usrid", "OVUSER", "HQ", "--option", "*OUT"), ("--option", "*IN")),
        (("rcvdst", "--usrid", "OVUSER", "HQ", "--dstid", "nonsense"), ("--dstid", "20")),
        (("rcvdst", "--usrid", "OVUSER", "HQ", "--dstid", "MAIL JANE 7"),
         ("--dstid", "not a distribution")),
        (("rcvdst", "--usrid", "OVUSER", "HQ", "--dstid", "MAIL JANE 7", "--keep", "*MAYBE"),
         ("--keep", "*NO, *YES")),
    ],
)
def test_mistakes_are_one_line_exit_2(stopped, args, needles):
    one_line_error(stopped.cli(*args), *needles)
    assert not stopped.queue_files("QTMSINQ")


def test_a_store_that_fails_does_not_hide_where_the_distribution_went(stopped):
    """Queued for the Internet and stored for BOB, refused by CAROL's store: the
    command says exactly that (a retry to all would send the others a copy)."""
    a = stopped
    rc, _, err = a.cli("adddire", "--usrid", "CAROL", "HQ", "--usrd", "Carol")
    assert rc == 0, err
    (a.datadir / "snads").mkdir(parents=True, exist_ok=True)
    (a.datadir / "snads" / "CAROL").write_text("not a directory")
    rc, out, err = a.cli("snddst", "--type", "*MSG", "--usrid", "OVUSER", "HQ",
                         "--tousrid", "BOB HQ", "--tousrid", "CAROL HQ",
                         "--tointnet", "friend@remote.test", "--dstd", "third", "--msg", "hi")
    assert rc == 1 and "queued as" in out and "stored for BOB HQ" in out, (out, err)
    assert len(err.strip().splitlines()) == 1
    assert "could not be stored for CAROL HQ: Not a directory" in err
    assert "send it again only to these" in err
    assert [d["description"] for d in qrydst(a, "--usrid", "BOB", "HQ")] == ["third"]
    assert len(a.queue_files("QTMSINQ")) == 1
    assert sorted(e["recipient"] for e in a.journal("H2")) == ["BOB HQ", "friend@remote.test"]


def test_the_longest_longmsg_and_cl_syntax(stopped):
    a = stopped
    rc, out, err = a.cli(*SEND, "--longmsg", "z" * 5000)
    assert rc == 0, err
    rc, out, err = a.cli("cl", "SNDDST TYPE(*LMSG) TOUSRID((SAM MAIL) (JANE MAIL *CC)) "
                         "DSTD('Typed as CL') LONGMSG('From a CL program') USRID(OVUSER HQ) "
                         "TOINTNET(('friend@remote.test' *BCC))")
    assert rc == 0 and "queued as" in out and "3 recipients" in out, err
    assert len(a.queue_files("QTMSINQ")) == 2
    rc, out, err = a.cli("cl", "CHGDSTA *NONE")
    assert rc == 0, err
    assert load(a.config).snads.keeprcp == "*NONE"
    with pytest.raises(DistributionError, match="--tousrid"):
        send_distribution(load(a.config), usrid=("OVUSER", "HQ"), dstd="x", longmsg="y")


def test_a_description_cannot_add_a_field_nor_end_the_header(stopped):
    """Python's email package writes a line break an encoded-word holds as is
    (CVE-2024-6923): the note would carry a Bcc of the description's choosing."""
    with pytest.raises(DistributionError, match="--dstd.*line break"):
        send_distribution(load(stopped.config), usrid=("OVUSER", "HQ"), tousrid=["SAM MAIL"],
                          dstd="=?utf-8?q?x=0D=0ABcc:_spy@evil.test?=", longmsg="y")
    assert stopped.queue_files("QTMSINQ") == []


def test_text_that_looks_like_an_encoded_word_is_refused_not_decoded(stopped):
    """The email package decoded it as it wrote the field: a USRD of
    ``=?utf-8?q?Boss?= <ceo@example.test>`` sent the note from "Boss <ceo@...>"."""
    with pytest.raises(DistributionError, match="--dstd.*decoded"):
        send_distribution(load(stopped.config), usrid=("OVUSER", "HQ"), tousrid=["SAM MAIL"],
                          dstd="=?utf-8?q?Boss?=", longmsg="y")
    rc, out, err = stopped.cli("chgdire", "--usrid", "OVUSER", "HQ", "--usrd",
                               "=?utf-8?q?Boss?= <ceo@example.test>")
    assert rc == 0, err
    with pytest.raises(DistributionError, match="USRD.*decoded"):
        send_distribution(load(stopped.config), usrid=("OVUSER", "HQ"), tousrid=["SAM MAIL"],
                          dstd="a=?b?=c is fine", longmsg="y")
    assert stopped.queue_files("QTMSINQ") == []


# -- the store itself ---------------------------------------------------------------


def _store_with(tmp_path, n: int):
    from twistmail.dststore import DistributionStore

    new = tmp_path / "snads" / "BOB" / "Maildir" / "new"
    new.mkdir(parents=True)
    (new.parent / "cur").mkdir()
    for i in range(n):
        (new / f"{1000 + i}.M{i}.host").write_bytes(
            f"From: u{i}@remote.test\r\nSubject: note {i}\r\n\r\nbody\r\n".encode())
    return DistributionStore(tmp_path / "snads", {}), new


def test_a_full_store_lists_what_has_an_identifier_and_the_rest_waits(tmp_path, monkeypatch):
    """DSTIDs have four digits: past 9999 (3 here) newer mail waits, and the store
    can still be listed and emptied."""
    import twistmail.dststore as dststore

    monkeypatch.setattr(dststore, "MAX_SEQUENCE", 3)
    store, _ = _store_with(tmp_path, 5)
    listing = store.query("BOB")
    assert [d.description for d in listing.distributions] == ["note 0", "note 1", "note 2"]
    assert listing.waiting == 2
    with store.receive("BOB", listing.distributions[1].dstid):
        pass
    listing = store.query("BOB")
    assert [d.description for d in listing.distributions] == ["note 0", "note 2", "note 3"]
    assert listing.distributions[2].dstid.endswith("0002") and listing.waiting == 1
    assert listing.distributions[2].status == "*NEW"  # shown for the first time


def test_only_what_a_listing_showed_becomes_old(tmp_path, monkeypatch):
    """A distribution that arrives while QRYDST lists stays *NEW: nobody has seen it."""
    import twistmail.dststore as dststore

    store, new = _store_with(tmp_path, 1)
    real = dststore._mark_listed

    def arriving(maildir, listed):
        (new / "2000.M9.host").write_bytes(b"From: late@remote.test\r\nSubject: late\r\n\r\nx\r\n")
        real(maildir, listed)

    monkeypatch.setattr(dststore, "_mark_listed", arriving)
    assert [d.description for d in store.query("BOB").distributions] == ["note 0"]
    monkeypatch.setattr(dststore, "_mark_listed", real)
    statuses = {d.description: d.status for d in store.query("BOB").distributions}
    assert statuses == {"note 0": "*OLD", "late": "*NEW"}


def test_a_received_distribution_delivered_again_after_a_crash_stays_received(tmp_path):
    """RCVDST removes it; a delivery killed before the queue learnt of it, made
    again, found no copy and put it back."""
    from twistmail.dststore import DistributionStore
    from twistmail.maildir import MaildirStore

    maildirs = MaildirStore(tmp_path / "snads", "mail.example.test")
    body = tmp_path / "body"
    body.write_bytes(b"From: jane@remote.test\r\nSubject: once\r\n\r\nbody\r\n")
    maildirs.deliver("BOB", "Q1.R0", body, b"")
    store = DistributionStore(tmp_path / "snads", {})
    [dist] = store.query("BOB").distributions
    with store.receive("BOB", dist.dstid):
        pass
    maildirs.deliver("BOB", "Q1.R0", body, b"")  # the retried delivery
    assert store.query("BOB").distributions == ()


def test_a_profile_sends_through_its_own_entry_not_one_that_routes_others_mail(stopped):
    """The README's NONDLV entry for SAM (--smtpuser NONDELIVERY) sorts before
    SAM's own: SNDDST --usrprf SAM went out From NONDELIVERY, as DSTID
    MAIL NONDLV, while DSPUSRPRF said sam@."""
    from twistmail.directory import SqliteDirectory
    from twistmail.snads import sender_entry

    a = stopped
    rc, out, err = a.cli("adddire", "--usrid", "NONDLV", "MAIL", "--usrd", "Nondelivery copies",
                         "--user", "SAM", "--msfsrvlvl", "*SYSMS", "--prefadr", "*SMTP",
                         "--smtpuser", "NONDELIVERY")
    assert rc == 0, err
    with SqliteDirectory.from_settings(load(a.config)) as d:
        entry = sender_entry(d, None, "sam")
    assert (entry.userid, entry.smtp_name) == ("SAM", "sam@example.test")


def test_chgdire_keeps_a_snads_user_while_its_store_holds_mail(post):
    """*USRIDX to *SYSMS left the distributions where no command reached them,
    and the change back was refused as 'a store left by an earlier entry'."""
    a = post
    rc, out, err = a.cli("snddst", "--type", "*MSG", "--usrprf", "SAM",
                         "--tousrid", "BOB HQ", "--dstd", "Kept", "--msg", "for bob")
    assert rc == 0, err
    one_line_error(a.cli("chgdire", "--usrid", "BOB", "HQ", "--msfsrvlvl", "*SYSMS",
                         "--user", "JANE"),
                   "--msfsrvlvl", "SNADS store of BOB holds 1 distribution", "allowed: *USRIDX")
    assert [d["description"] for d in qrydst(a, "--usrid", "BOB", "HQ")] == ["Kept"]


def test_a_store_on_a_full_disk_lists_what_it_numbered_and_can_be_emptied(tmp_path,
                                                                        monkeypatch):
    """On a full disk QRYDST and RCVDST failed outright (the index of DSTIDs
    could not be written), so a SNADS user could not make room."""
    import errno

    from twistmail.dststore import DistributionStore

    store, new = _store_with(tmp_path, 2)
    first = store.query("BOB")
    (new / "3000.M9.host").write_bytes(b"From: late@remote.test\r\nSubject: late\r\n\r\nx\r\n")

    def full(self, userid, index):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DistributionStore, "_save", full)
    listing = store.query("BOB")
    assert [d.dstid for d in listing.distributions] == [d.dstid for d in first.distributions]
    assert listing.waiting == 1 and listing.no_room
    with store.receive("BOB", first.distributions[0].dstid):
        pass
    monkeypatch.undo()
    assert [d.description for d in store.query("BOB").distributions] == ["note 1", "late"]


def test_a_distribution_whose_reader_stops_early_stays_in_the_store(tmp_path):
    """rcvdst | head: write() returned short when the reader went away, the
    rest was never tried, and the distribution was removed with exit 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    config = tmp_path / "twistmail.toml"
    config.write_text('[system]\ndatadir = "var"\nlocal_domains = ["example.test"]\n')
    cli = [str(Path(sys.executable).with_name("twistmail")), "--config", str(config)]
    subprocess.run([*cli, "adddire", "--usrid", "OVUSER", "HQ", "--usrd", "Office user"],
                   check=True, capture_output=True)
    new = tmp_path / "var" / "snads" / "OVUSER" / "Maildir" / "new"
    new.mkdir(parents=True)
    body = b"From: friend@remote.test\r\nSubject: big\r\n\r\n" + (b"z" * 70 + b"\r\n") * 4000
    (new / f"18ed6c50306eba44711e0a.R0.mail.example.test,S={len(body)}").write_bytes(body)
    receiver = subprocess.Popen([*cli, "rcvdst", "--usrid", "OVUSER", "HQ", "--dstid",
                                 "REMOTE FRIEND 1"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    receiver.stdout.read(100)
    receiver.stdout.close()
    err = receiver.stderr.read().decode()
    receiver.stderr.close()
    assert receiver.wait(30) == 1 and "distribution not received" in err
    listed = subprocess.run([*cli, "qrydst", "--usrid", "OVUSER", "HQ", "--json"],
                            check=True, capture_output=True, text=True).stdout
    assert [d["dstid"] for d in json.loads(listed)] == ["REMOTE  FRIEND  0001"]
    closed = subprocess.run([*cli, "rcvdst", "--usrid", "OVUSER", "HQ", "--dstid",
                             "REMOTE FRIEND 1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.close(1))  # started with 1 closed
    assert closed.returncode == 1 and closed.stderr.strip().endswith(
        "standard output is closed; use --outfile")


def test_an_empty_note_text_is_refused_as_an_omitted_one_is(stopped):
    """LONGMSG('') sent an empty note; left out, it was refused 'allowed: 1-5000'."""
    for kind, text in (("*LMSG", {"longmsg": ""}), ("*MSG", {"msg": "  "})):
        with pytest.raises(DistributionError, match="allowed: 1-"):
            send_distribution(load(stopped.config), usrid=("OVUSER", "HQ"),
                              tousrid=["SAM MAIL"], dstd="x", type=kind, **text)
    assert stopped.queue_files("QTMSINQ") == []
