"""Mail flows in: real clients send, the bridge delivers into Maildir, nothing is lost."""

from __future__ import annotations

import base64
import email
import email.policy
import os
import poplib
import signal
import smtplib
import socket
import subprocess
import time
from email.message import EmailMessage

import pytest
from appliance import alive, descendants_of, read_reply, wait_gone
from clients import needs

from twistmail.maildir import trace_prefix


@pytest.fixture
def post(make_appliance):
    a = make_appliance().start()
    a.user("SAM")
    a.user("JANE")
    return a


def seed_message() -> bytes:
    """Jane's note to Sam: an 8-bit body and a base64 attachment."""
    msg = EmailMessage()
    msg["From"] = "Jane Smith <jane@example.test>"
    msg["To"] = "Sam Jones <sam@example.test>"
    msg["Subject"] = "Contract review"
    msg["Date"] = "Sat, 28 Nov 2026 09:00:00 +0000"
    msg["Message-ID"] = "<contract-1@example.test>"
    msg.set_content("Grüße, Sam — the contract is attached.\n", cte="8bit")
    msg.add_attachment(bytes(range(256)) * 40, maintype="application",
                       subtype="octet-stream", filename="contract.bin")
    return msg.as_bytes(policy=email.policy.SMTP)


def test_seed_scenario_jane_to_sam(post):
    a = post
    original = seed_message()
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo("janes-pc.example.test")
        assert s.has_extn("8bitmime")
        refused = s.sendmail("jane@example.test", ["sam@example.test"], original,
                             mail_options=["BODY=8BITMIME"])
    assert refused == {}
    [path] = a.wait_mailbox("SAM", 1)
    stored = path.read_bytes()
    # Byte-identical except for the headers the appliance adds in front.
    assert stored.endswith(original)
    added = stored[: -len(original)].decode()
    assert added.startswith("Return-Path: <jane@example.test>\r\nDelivered-To: "
                            "sam@example.test\r\nReceived: from janes-pc.example.test "
                            "([127.0.0.1])\r\n\tby mail.example.test (twistmail) with ESMTP id ")
    parsed = email.message_from_bytes(stored, policy=email.policy.default)
    att = next(p for p in parsed.iter_attachments())
    assert att.get_content() == bytes(range(256)) * 40
    assert "Grüße" in parsed.get_body().get_content()
    a.wait_for(lambda: not a.queue_files("QTMSINQ"), 10)
    codes = [e["code"] for e in a.journal() if e.get("msgid") and e["code"][0] in "9B7P"]
    assert codes[:6] == ["94", "91", "92", "9T", "99", "97"]
    assert {"7A", "P2", "B8", "B2"} <= set(codes)


@needs("swaks", "curl")
def test_swaks_and_curl_deliver(post, tmp_path):
    a = post
    host, port = a.addr("smtp")
    r = subprocess.run(
        ["swaks", "--server", f"{host}:{port}", "--from", "jane@example.test",
         "--to", "sam@example.test", "--header", "Subject: via swaks", "--body", "hello"],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 Ok: queued as" in r.stdout
    msg = tmp_path / "msg.txt"
    msg.write_bytes(b"From: jane@example.test\r\nTo: sam@example.test\r\nSubject: via curl\r\n"
                    b"\r\n.leading dot\r\nbye\r\n")
    r = subprocess.run(
        ["curl", "-sS", f"smtp://{host}:{port}", "--mail-from", "jane@example.test",
         "--mail-rcpt", "sam@example.test", "--upload-file", str(msg)],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    files = a.wait_mailbox("SAM", 2)
    bodies = [p.read_bytes() for p in files]
    assert any(b"Subject: via swaks" in b for b in bodies)
    curl = next(b for b in bodies if b"Subject: via curl" in b)
    assert curl.endswith(b"\r\n.leading dot\r\nbye\r\n")
    # curl gives no Message-ID or Date: the appliance adds them.
    assert b"\r\nMessage-ID: <" in curl and b"\r\nDate: " in curl


def test_unknown_recipient_refused_and_catchall_routes(post):
    a = post
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        s.mail("jane@example.test")
        code, text = s.rcpt("nobody@example.test")
        assert code == 550 and b"5.1.1" in text
        code, text = s.rcpt("someone@remote.test")
        assert code == 550 and b"5.7.1" in text
        s.rset()
    rc, out, err = a.cli("adddire", "--usrid", "*ANY", "*ANY", "--usrd", "catch-all",
                         "--user", "SAM", "--msfsrvlvl", "*SYSMS")
    assert rc == 0, err
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        assert s.sendmail("jane@example.test", ["Whoever@EXAMPLE.TEST"], b"Subject: x\r\n\r\n"
                          b"y\r\n") == {}
    [path] = a.wait_mailbox("SAM", 1)
    assert b"Delivered-To: Whoever@EXAMPLE.TEST\r\n" in path.read_bytes()


def test_domain_matches_without_regard_to_case(post):
    a = post
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        assert s.sendmail("jane@example.test", ["sam@Example.TEST"], b"Subject: c\r\n\r\nx\r\n") \
            == {}
    a.wait_mailbox("SAM", 1)


def test_nondelivery_notice_to_originator_with_copy(post):
    a = post
    # The seed's way: a POP user whose directory entry has the SMTP name NONDELIVERY.
    a.user("MAILADM")
    rc, out, err = a.cli("adddire", "--usrid", "NONDLV", "MAIL", "--usrd", "nondelivery copies",
                         "--user", "MAILADM", "--msfsrvlvl", "*SYSMS", "--prefadr", "*SMTP",
                         "--smtpuser", "NONDELIVERY", "--smtpdomain", "example.test")
    assert rc == 0, err
    a.user("TEMP")
    assert a.cli("endmsf", "--option", "*IMMED")[0] == 0
    a.wait_for(lambda: a.control("status")["bridge"]["pid"] is None, 10)
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["temp@example.test", "sam@example.test"],
                   b"Subject: to a leaver\r\nMessage-ID: <leaver@example.test>\r\n\r\nhi\r\n")
    # The user leaves before the bridge gets to the message.
    assert a.cli("dltusrprf", "--usrprf", "TEMP")[0] == 0
    assert a.cli("strmsf")[0] == 0
    [ndn] = a.wait_mailbox("JANE", 1)
    a.wait_mailbox("SAM", 1)
    [copy] = a.wait_mailbox("MAILADM", 1)
    notice = email.message_from_bytes(ndn.read_bytes(), policy=email.policy.default)
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    assert notice["Return-Path"] == "<>"
    status = [p for p in notice.walk() if p.get_content_type() == "message/delivery-status"]
    assert status and b"Final-Recipient: rfc822; temp@example.test" in ndn.read_bytes()
    assert b"Status: 5.1.1" in ndn.read_bytes()
    assert b"Subject: to a leaver" in ndn.read_bytes()  # the original headers
    copied = email.message_from_bytes(copy.read_bytes(), policy=email.policy.default)
    assert copied["Message-ID"] == notice["Message-ID"]  # one notice, two recipients
    codes = {e["code"] for e in a.journal()}
    assert {"A3", "7P", "AP", "A1", "A2"} <= codes
    # A notice that cannot be delivered makes no notice of its own.
    time.sleep(1)
    assert len(a.mailbox("JANE")) == 1


def test_a_message_for_one_local_user_is_delivered_as_the_file_it_was_queued_in(post):
    """The SMTP server writes the trace fields of the one mailbox copy first
    (the queue's ``trace``), so delivery links the queued file into the
    Maildir; a notice about such a message quotes no trace field."""
    a = post
    a.user("TEMP")
    assert a.cli("endmsf", "--option", "*IMMED")[0] == 0
    a.wait_for(lambda: a.control("status")["bridge"]["pid"] is None, 10)
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["sam@example.test"], b"Subject: one\r\n\r\nhi\r\n")
        [queued] = a.queue_files("QTMSINQ")
        s.sendmail("jane@example.test", ["temp@example.test"],
                   b"Subject: to a leaver\r\n\r\nhi\r\n")
    inode = queued.stat().st_ino
    assert queued.read_bytes().startswith(b"Return-Path: <jane@example.test>\r\n"
                                          b"Delivered-To: sam@example.test\r\nReceived: ")
    assert a.cli("dltusrprf", "--usrprf", "TEMP")[0] == 0
    assert a.cli("strmsf")[0] == 0
    [copy] = a.wait_mailbox("SAM", 1)
    [ndn] = a.wait_mailbox("JANE", 1)
    assert copy.stat().st_ino == inode and copy.read_bytes().count(b"Return-Path:") == 1
    notice = ndn.read_bytes()
    assert b"Subject: to a leaver" in notice and b"Delivered-To: temp" not in notice
    assert notice.count(b"Return-Path:") == 1  # the notice's own, <>


def test_bare_lf_rejected_and_nothing_stored(post):
    a = post
    s = a.connect()
    read_reply(s)
    s.sendall(b"EHLO x\r\n")
    while not read_reply(s).startswith(b"250 "):
        pass
    s.sendall(b"MAIL FROM:<jane@example.test>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    assert [read_reply(s)[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    s.sendall(b"Subject: lf\n\nbody\n.\nMAIL FROM:<evil@example.test>\r\n.\r\n")
    assert read_reply(s).startswith(b"550 5.6.0 ")
    s.sendall(b"QUIT\r\n")
    s.close()
    time.sleep(1)
    assert a.mailbox("SAM") == []
    assert list((a.datadir / "queue" / "data").iterdir()) == []


def test_bare_lf_accepted_when_allowed(make_appliance):
    a = make_appliance(smtp={"alwbarelf": "*YES"}).start()
    a.user("SAM")
    s = a.connect()
    read_reply(s)
    s.sendall(b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<sam@example.test>\r\nDATA\r\n")
    assert [read_reply(s)[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
    s.sendall(b"Subject: lf\n\nbody\n.\nstill\r\n.\r\n")
    assert read_reply(s).startswith(b"250 ")
    [path] = a.wait_mailbox("SAM", 1)
    assert path.read_bytes().endswith(b"\r\nbody\r\n.\r\nstill\r\n")


def test_storage_over_threshold(make_appliance):
    st = os.statvfs("/tmp")
    used = 100 * (1 - st.f_bavail / st.f_blocks)
    if used < 51:
        pytest.skip(f"the filesystem is only {used:.0f}% full; the threshold floor is 50%")
    a = make_appliance(storage={"threshold": 50}).start()
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        code, text = s.mail("jane@example.test")
        assert code == 452 and b"4.3.1" in text


def test_bridge_parks_mail_while_storage_is_short(post):
    a = post
    st = os.statvfs(a.datadir)
    used = 100 * (1 - st.f_bavail / st.f_blocks)
    if used < 51:
        pytest.skip(f"the filesystem is only {used:.0f}% full; the threshold floor is 50%")
    a.cli("endmsf", "--option", "*IMMED")
    a.wait_for(lambda: a.control("status")["bridge"]["pid"] is None, 10)
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["sam@example.test"], b"Subject: p\r\n\r\nx\r\n")
    good = a.config.read_text()
    a.config.write_text(good.replace("threshold = 99", "threshold = 50"))
    assert a.cli("config", "--apply")[0] == 0
    a.cli("strmsf")
    a.wait_for(lambda: a.queue_files("QTMSBSSQ"), 15, "message parked on QTMSBSSQ")
    rc, out, err = a.cli("wrkq", "--queue", "QTMSBSSQ")
    assert "sam@example.test" in out
    assert a.mailbox("SAM") == []
    a.cli("endmsf", "--option", "*IMMED")
    a.wait_for(lambda: a.control("status")["bridge"]["pid"] is None, 10)
    a.config.write_text(good)
    assert a.cli("config", "--apply")[0] == 0
    a.cli("strmsf")
    a.wait_mailbox("SAM", 1)
    assert {"7L", "7M"} <= {e["code"] for e in a.journal()}


def open_data(a):
    """A raw session from Jane to Sam, answered 354 and ready for the message."""
    s = a.connect()
    read_reply(s)
    s.sendall(b"HELO x\r\nMAIL FROM:<jane@example.test>\r\nRCPT TO:<sam@example.test>\r\n"
              b"DATA\r\n")
    assert [read_reply(s)[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
    return s


def _busy_job(a) -> int:
    return a.wait_for(
        lambda: next((r["pid"] for r in a.jobs("QTMSSRCP") if r["status"] == "RUN"), None), 10)


def test_sigkill_of_smtp_job_mid_data_leaves_nothing(post):
    a = post
    s = open_data(a)
    s.sendall(b"Subject: half\r\n\r\n" + b"partial line\r\n" * 1000)
    time.sleep(0.3)
    pid = _busy_job(a)
    os.kill(pid, signal.SIGKILL)
    assert s.recv(100) == b""
    # The bridge's periodic recovery removes the dead writer's spool file.
    a.wait_for(lambda: not list((a.datadir / "queue" / "tmp").iterdir()), 20, "tmp/ to empty")
    assert list((a.datadir / "queue" / "data").iterdir()) == []
    assert a.mailbox("SAM") == []
    for q in ("QTMSINQ", "QTMSOUTQ"):
        assert a.queue_files(q) == []
    # The journal's last word on the message says it was never queued (a
    # writer killed after its 97 and before the rename left that 97 alone).
    unfinished = [e for e in a.journal("7X") if e["msgid"] is not None]
    assert [e["esd"] for e in unfinished] == [f"7X RCV {unfinished[0]['msgid']} never queued"]


def test_sigkill_right_after_250_still_delivers_once(post):
    a = post
    s = open_data(a)
    pid = _busy_job(a)
    s.sendall(b"Subject: acked\r\n\r\nkept\r\n.\r\n")
    assert read_reply(s).startswith(b"250 2.0.0 Ok: queued as ")
    os.kill(pid, signal.SIGKILL)
    [path] = a.wait_mailbox("SAM", 1)
    assert path.read_bytes().endswith(b"kept\r\n")
    time.sleep(1)
    assert len(a.mailbox("SAM")) == 1


def qmsf_jobs(bridge: int) -> list[int]:
    """The bridge's QMSF job processes (STRMSF NBRMSFJOB), forks of its launcher."""
    out = []
    for pid in descendants_of(bridge):
        try:
            if open(f"/proc/{pid}/comm").read().strip() == "QMSF":
                out.append(pid)
        except OSError:
            pass
    return out


def _queue_while_msf_ended(make_appliance, total: int):
    """An appliance whose QTMSINQ holds ``total`` messages for SAM; MSF ended."""
    a = make_appliance(prestart__QTMSSRCP={"inljobs": 4, "threshold": 1, "adljobs": 2,
                                           "maxjobs": 8}).start()
    a.user("SAM")
    assert a.cli("endmsf", "--option", "*IMMED")[0] == 0
    a.wait_for(lambda: a.control("status")["bridge"]["pid"] is None, 10)
    sent = set()
    with smtplib.SMTP(*a.addr("smtp"), timeout=60) as s:
        for i in range(total):
            mid = f"<drain-{i}@example.test>"
            s.sendmail("jane@example.test", ["sam@example.test"],
                       f"Message-ID: {mid}\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode())
            sent.add(mid)
    assert len(a.queue_files("QTMSINQ")) == total
    return a, sent


def _start_msf_until_delivered(a, delivered: int) -> int:
    """STRMSF, and wait until ``delivered`` messages are in SAM's Maildir; the bridge's pid."""
    assert a.cli("strmsf")[0] == 0
    a.wait_for(lambda: len(a.mailbox("SAM")) >= delivered, 60, "the QMSF jobs to deliver")
    return a.control("status")["bridge"]["pid"]


def _assert_each_once(a, sent: set[str]) -> None:
    a.wait_for(lambda: not a.queue_files("QTMSINQ"), 120, "queue to drain")
    files = a.mailbox("SAM")
    ids = []
    for p in files:
        head = p.read_bytes().split(b"\r\n\r\n", 1)[0]
        ids.append(next(line for line in head.split(b"\r\n")
                        if line.startswith(b"Message-ID: ")).split(b" ", 1)[1].decode())
    assert len(files) == len(sent)
    assert set(ids) == sent


def test_sigkill_of_bridge_mid_drain_delivers_all_exactly_once(make_appliance):
    total = 500
    a, sent = _queue_while_msf_ended(make_appliance, total)
    bridge = _start_msf_until_delivered(a, 50)
    jobs = qmsf_jobs(bridge)
    assert len(jobs) == 3
    family = descendants_of(bridge)  # the jobs, their launchers, the client jobs
    os.kill(bridge, signal.SIGKILL)
    killed_at = len(a.mailbox("SAM"))
    assert killed_at < total, "the bridge finished before it could be killed"
    a.wait_for(lambda: (a.control("status")["bridge"]["pid"] or bridge) != bridge, 20,
               "bridge restart")
    _assert_each_once(a, sent)
    assert not alive(bridge)
    assert wait_gone(jobs, 10) == [], "QMSF jobs outlived their bridge"
    assert wait_gone(family, 10) == [], "processes of the bridge outlived it"


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_qmsf_jobs_are_forks_of_a_launcher_replaced_when_it_dies(make_appliance):
    """The bridge forks their launcher as it starts; after its death a new one forks them."""
    total = 300
    a, sent = _queue_while_msf_ended(make_appliance, total)
    bridge = _start_msf_until_delivered(a, 30)
    jobs = qmsf_jobs(bridge)
    [launcher] = {_parent_of(p) for p in jobs}
    assert open(f"/proc/{launcher}/comm").read().strip() == "QZMFLNCH"
    assert _parent_of(launcher) == bridge
    a.wait_for(lambda: launcher in [r["pid"] for r in a.control("wrkactjob")
                                    if r["job"] == "QZMFLNCH"], 5, "WRKACTJOB to list it")
    os.kill(launcher, signal.SIGKILL)  # its jobs die with it, messages in hand and all
    assert len(a.mailbox("SAM")) < total, "the jobs finished before the launcher was killed"
    _assert_each_once(a, sent)
    assert wait_gone(jobs, 10) == []
    fresh = qmsf_jobs(bridge)
    assert fresh and {_parent_of(p) for p in fresh} != {launcher}
    assert a.control("status")["bridge"]["pid"] == bridge


def test_sigkill_of_a_qmsf_job_mid_drain_delivers_all_exactly_once(make_appliance):
    total = 300
    a, sent = _queue_while_msf_ended(make_appliance, total)
    bridge = _start_msf_until_delivered(a, 30)
    # One that has delivered already: its place is taken at once.  (One that
    # dies before its first message is replaced after a delay, in case it
    # cannot start at all.)
    delivering = {e["job"] for e in a.journal("B8")}
    victim = next(p for p in qmsf_jobs(bridge) if f"QMSF/{p}" in delivering)
    os.kill(victim, signal.SIGKILL)
    assert len(a.mailbox("SAM")) < total, "the jobs finished before one could be killed"
    _assert_each_once(a, sent)
    [crash] = a.wait_for(lambda: a.journal("JK"), 10, "the crash entry")
    assert crash["pid"] == victim and crash["esd"] == f"JK CRASH QMSF/{victim}"
    jobs = a.wait_for(lambda: len(qmsf_jobs(bridge)) == 3 and qmsf_jobs(bridge), 10,
                      "a replacement job")
    assert victim not in jobs and a.control("status")["bridge"]["pid"] == bridge


def test_qmsf_jobs_start_with_mail_take_changes_and_end_with_endmsf(post):
    """No mail, no QMSF job; CHGSMTPA FTRACN reaches a running one; ENDMSF ends it."""
    a = post
    bridge = a.wait_for(lambda: a.control("status")["bridge"]["pid"], 10)
    time.sleep(0.5)
    assert qmsf_jobs(bridge) == []
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["sam@example.test"], b"Subject: first\r\n\r\nhi\r\n")
    a.wait_mailbox("SAM", 1)
    [job] = qmsf_jobs(bridge)
    a.wait_for(lambda: [(r["pid"], r["status"], r["uses"]) for r in a.control("wrkactjob")
                        if r["job"] == "QMSF"] == [(job, "DEQW", 1)], 5,
               "WRKACTJOB: the QMSF job waiting, one message done")
    assert a.cli("addsmtple", "--type", "*FTRSUBJECT", "--ftrdata", "Quarterly*")[0] == 0
    assert a.cli("chgsmtpa", "--ftracn", "*DISCARD")[0] == 0
    time.sleep(0.5)  # the SIGHUP reaches the bridge, and from it the job
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["sam@example.test"], _virus())
    [entry] = a.wait_for(lambda: a.journal("OW"), 15, "the filter entry")
    assert entry["action"] == "discarded" and a.queue_files("quarantine") == []
    assert entry["job"] == f"QMSF/{job}" and qmsf_jobs(bridge) == [job]
    rc, out, err = a.cli("endmsf")
    assert rc == 0, err
    assert wait_gone([bridge, job], 10) == []
    assert [e["pid"] for e in a.journal("JN") if e["esd"].startswith("JN END QMSF")] == [job]
    # A job ends by os._exit: it releases its last batch of retired files itself.
    assert os.listdir(a.datadir / "queue" / "retired") == []


def test_strmsf_nbrmsfjob_sets_how_many_qmsf_jobs_run(post):
    a = post
    assert a.cli("endmsf", "--option", "*IMMED")[0] == 0
    a.wait_for(lambda: a.control("status")["bridge"]["pid"] is None, 10)
    for bad in ("0", "100", "three"):
        rc, out, err = a.cli("strmsf", "--nbrmsfjob", bad)
        assert rc == 2 and "--nbrmsfjob" in err and len(err.strip().splitlines()) == 1, err
    rc, out, err = a.cli("strmsf", "--msgopt", "*CLEAR")
    assert rc == 2 and "*RESUME" in err and len(err.strip().splitlines()) == 1, err
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        for i in range(60):
            s.sendmail("jane@example.test", ["sam@example.test"], f"Subject: {i}\r\n\r\nx\r\n")
    rc, out, err = a.cli("cl", "STRMSF MSGOPT(*RESUME) NBRMSFJOB(1)")
    assert rc == 0 and "with 1 QMSF jobs" in out, err
    bridge = a.wait_for(lambda: a.control("status")["bridge"]["pid"], 10)
    seen: set[int] = set()
    while len(a.mailbox("SAM")) < 60:
        seen.update(qmsf_jobs(bridge))
        time.sleep(0.01)
    assert len(seen) == 1


def test_a_message_that_cannot_be_read_is_set_aside_when_taken(post):
    a = post
    assert a.cli("endmsf", "--option", "*IMMED")[0] == 0
    a.wait_for(lambda: a.control("status")["bridge"]["pid"] is None, 10)
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        for subject in ("damaged", "cut", "sound"):
            s.sendmail("jane@example.test", ["sam@example.test"],
                       f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    damaged, cut, sound = a.queue_files("QTMSINQ")
    assert damaged.suffix == ".msg"  # one file, the envelope in an extended attribute
    os.removexattr(damaged, "user.twistmail.envelope")
    os.truncate(cut, 100)  # it went out as a shorter message, or an empty one
    assert a.cli("strmsf")[0] == 0
    [path] = a.wait_mailbox("SAM", 1)
    assert b"Subject: sound" in path.read_bytes()
    entries = a.wait_for(lambda: len(a.journal("7Y")) == 2 and a.journal("7Y"), 15,
                         "the 7Y entries")
    reasons = {e["msgid"]: e["reason"] for e in entries}
    assert "envelope" in reasons[damaged.stem]
    # Its size is the message's: the trace fields in front do not count.
    trace = trace_prefix("jane@example.test", "sam@example.test")
    assert reasons[cut.stem].startswith(f"body of {100 - len(trace)} bytes, ")
    assert all(e["job"].startswith("QMSF/") for e in entries)
    # The sound one is in the mailbox; its job may not have removed it from the queue yet.
    a.wait_for(lambda: a.queue_files("QTMSINQ") == [], 10, "QTMSINQ to empty")
    assert sorted(p.stem for p in a.queue_files("corrupt")) == sorted([damaged.stem, cut.stem])
    rc, out, err = a.cli("wrkq", "--queue", "corrupt")
    assert rc == 0 and damaged.stem in out


def test_wrkq_lists_messages_as_mailq(post):
    a = post
    a.cli("endmsf", "--option", "*IMMED")
    a.wait_for(lambda: a.control("status")["bridge"]["pid"] is None, 10)
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["sam@example.test", "jane@example.test"],
                   b"Subject: q\r\n\r\nx\r\n")
    rc, out, err = a.cli("wrkq")
    assert rc == 0 and "QTMSINQ" in out and "sam@example.test" in out
    import json

    rc, out, err = a.cli("wrkq", "--json")
    [entry] = json.loads(out)
    assert entry["queue"] == "QTMSINQ" and entry["originator"] == "jane@example.test"
    rc, out, err = a.cli("wrkq", "--queue", "NOSUCHQ")
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_base64_attachment_survives_large_message(post):
    a = post
    blob = os.urandom(3 * 1024 * 1024)
    msg = EmailMessage()
    msg["Subject"] = "big"
    msg.set_content("see attachment")
    msg.add_attachment(blob, maintype="application", subtype="octet-stream",
                       filename="big.bin")
    raw = msg.as_bytes(policy=email.policy.SMTP)
    with smtplib.SMTP(*a.addr("smtp"), timeout=60) as s:
        s.sendmail("jane@example.test", ["sam@example.test"], raw)
    [path] = a.wait_mailbox("SAM", 1)
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    att = next(parsed.iter_attachments())
    assert att.get_content() == blob
    assert base64.b64encode(blob)[:76] in path.read_bytes()


def test_usridx_user_gets_mail_in_the_snads_store(post):
    a = post
    rc, out, err = a.cli("adddire", "--usrid", "OVUSER", "HQ", "--usrd", "OfficeVision user",
                         "--msfsrvlvl", "*USRIDX", "--prefadr", "*SMTP", "--smtpuser", "ov.user",
                         "--smtpdomain", "example.test")
    assert rc == 0, err
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        assert s.sendmail("jane@example.test", ["ov.user@example.test"],
                          b"Subject: snads\r\n\r\nfor the distribution store\r\n") == {}
    store = a.datadir / "snads" / "OVUSER" / "Maildir" / "new"
    a.wait_for(lambda: list(store.glob("*")), 15, "SNADS store delivery")
    [path] = list(store.glob("*"))
    assert path.read_bytes().endswith(b"for the distribution store\r\n")
    # The step's entries are written as it ends, just after the copy is made.
    [entry] = a.wait_for(lambda: a.journal("7O"), 10, "the 7O entry")
    assert entry["userid"] == "OVUSER" and entry["address"] == "HQ"


def _virus() -> bytes:
    msg = EmailMessage()
    msg["From"] = "jane@example.test"
    msg["Subject"] = "Quarterly figures"
    msg.set_content("see inside")
    inner = EmailMessage()
    inner["Subject"] = "inner"
    inner.set_content("hi")
    inner.add_attachment(b"MZ...", maintype="application", subtype="octet-stream",
                         filename="loveletter.vbs")
    msg.add_attachment(inner)  # the attachment hides one level down
    return msg.as_bytes(policy=email.policy.SMTP)


def test_filter_keeps_in_quarantine_then_release(post):
    a = post
    rc, out, err = a.cli("addsmtple", "--type", "*FTRFILNAME", "--ftrdata", "*.VBS")
    assert rc == 0, err
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["sam@example.test"], _virus())
        s.sendmail("jane@example.test", ["sam@example.test"], b"Subject: clean\r\n\r\nok\r\n")
    a.wait_mailbox("SAM", 1)
    a.wait_for(lambda: a.queue_files("quarantine"), 15, "quarantine")
    rc, out, err = a.cli("wrkq", "--queue", "quarantine")
    assert "jane@example.test" in out
    [entry] = a.journal("OW")
    assert entry["filter"] == "*FTRFILNAME" and entry["value"] == "loveletter.vbs"
    qid = a.queue_files("quarantine")[0].stem
    rc, out, err = a.cli("wrkq", "--release", qid)
    assert rc == 0, err
    a.wait_mailbox("SAM", 2)
    assert a.queue_files("quarantine") == []


def test_relayed_mail_is_filtered_too(make_appliance):
    """Remote recipients only: while a filter is set, the bridge examines it first."""
    a = make_appliance(smtp={"alwrly": "*ALL"}).start()
    rc, out, err = a.cli("addsmtple", "--type", "*FTRFILNAME", "--ftrdata", "*.VBS")
    assert rc == 0, err
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["friend@remote.test"], _virus())
    a.wait_for(lambda: a.queue_files("quarantine"), 15, "quarantine")
    assert a.queue_files("QTMSOUTQ") == [] and a.journal("OW")
    assert a.journal("95") and not a.journal("94")  # journaled as relayed mail


def test_filter_discard(make_appliance):
    a = make_appliance(smtp={"ftracn": "*DISCARD"}).start()
    a.user("SAM")
    a.cli("addsmtple", "--type", "*FTRSUBJECT", "--ftrdata", "Quarterly*")
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["sam@example.test"], _virus())
    a.wait_for(lambda: a.journal("OW"), 15, "the filter entry")
    assert a.mailbox("SAM") == [] and a.queue_files("quarantine") == []
    assert a.journal("OW")[0]["action"] == "discarded"


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_client_that_reads_no_replies_stops_being_read(post):
    """Pipelined commands whose replies the client never reads: the job stops
    reading once its output is full, so the client's sends stall and the
    job's memory stays as it was."""
    a = post
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(a.addr("smtp"))
    sock.sendall(b"EHLO client.example\r\nMAIL FROM:<jane@example.test>\r\n")
    job = _busy_job(a)
    before = _rss_kb(job)
    sock.setblocking(False)
    # RCPT past MAXRCPT is answered 452 4.5.3 and is no error; NOOP or HELO
    # would be junk, and that much junk ends the session.
    chunk = b"RCPT TO:<sam@example.test>\r\n" * 2_000
    sent, last_progress = 0, time.monotonic()
    while time.monotonic() - last_progress < 1.5 and sent < 32 * 2**20:
        try:
            sent += sock.send(chunk)
            last_progress = time.monotonic()
        except BlockingIOError:
            time.sleep(0.05)
    grown = _rss_kb(job) - before
    sock.close()
    assert sent < 32 * 2**20 and grown < 16 * 1024, (sent, grown)


def test_a_copy_fetched_and_deleted_before_a_crashed_delivery_is_retried_stays_gone(
        make_appliance):
    """A QMSF job killed after D1's copy and before the queue learnt of it: the
    message is delivered again.  D1 fetched and deleted the first copy
    meanwhile; the retry must not give D1 a second one."""
    a = make_appliance(smtp={"maxmsgsize": 100_000_000}).start()
    users = ["D1", "D2", "D3", "D4"]
    for user in users:
        a.user(user)
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 40_000  # 40 MB
    with smtplib.SMTP(*a.addr("smtp"), timeout=120) as s:
        s.sendmail("jane@example.test", [f"{u.lower()}@example.test" for u in users], body)
    bridge = a.control("status")["bridge"]["pid"]
    a.wait_for(lambda: a.mailbox("D1"), 60, "D1's copy")
    for pid in qmsf_jobs(bridge):
        os.kill(pid, signal.SIGKILL)
    if all(a.mailbox(u) for u in users[1:]):
        pytest.skip("the job delivered every copy before it could be killed")
    p = poplib.POP3(*a.addr("pop3"), timeout=60)
    p.user("d1")
    p.pass_("secret")
    assert len(p.list()[1]) == 1
    p.retr(1)
    p.dele(1)
    p.quit()
    for user in users[1:]:
        a.wait_mailbox(user, 1, timeout=60)
    a.wait_for(lambda: not a.queue_files("QTMSINQ"), 30, "the message settled")
    assert a.mailbox("D1") == []
    assert [len(a.mailbox(u)) for u in users[1:]] == [1, 1, 1]


def test_mail_to_a_literal_of_the_address_reached_is_delivered_here(post):
    """RFC 1123 §5.2.17; it was refused as relay."""
    a = post
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        s.mail("jane@example.test")
        assert s.rcpt("sam@[127.0.0.1]")[0] == 250
        assert s.rcpt("sam@[127.0.0.2]")[0] == 550  # not the address it reached
        assert s.data(b"Subject: literal\r\n\r\nhi\r\n")[0] == 250
    [msg] = a.wait_mailbox("SAM", 1)
    assert b"Subject: literal" in msg.read_bytes()
