"""The Send MIME Mail API (QtmmSendMail) and SNDMAIL, with VFYMSFMSG."""

from __future__ import annotations

import json
import poplib

import pytest

from twistmail.api import BCC, CC, TO, SendMailError, send_mime_mail
from twistmail.config import load

NOTE = (b"From: app@example.test\r\nTo: sam@example.test\r\nBcc: secret@example.test\r\n"
        b"Subject: nightly report\r\nMessage-ID: <report-1@example.test>\r\n"
        b"Date: Sat, 28 Nov 2026 09:00:00 +0000\r\n\r\nAll jobs ended normally.\r\n")


@pytest.fixture
def post(make_appliance):
    a = make_appliance().start()
    for user in ("SAM", "JANE", "APP"):
        a.user(user)
    return a


def test_send_mime_mail_delivers_and_the_file_goes(post, tmp_path):
    a = post
    note = tmp_path / "report.mime"
    note.write_bytes(NOTE)
    qid = send_mime_mail(str(note), "app@example.test",
                         [("sam@example.test", TO), ("jane@example.test", CC),
                          ("secret@example.test", BCC)], settings=load(a.config))
    [sam] = a.wait_mailbox("SAM", 1)
    a.wait_mailbox("JANE", 1)
    a.wait_for(lambda: not note.exists(), 10, "the MIME file to be deleted")
    data = sam.read_bytes()
    assert b"Bcc:" not in data and b"secret@" not in data  # blind copies stay blind
    assert data.endswith(b"\r\n\r\nAll jobs ended normally.\r\n")
    codes = [e["code"] for e in a.journal() if e.get("msgid") == qid]
    assert codes[:5] == ["EH", "E1", "E2", "E2", "E2"] and "ET" in codes
    p = poplib.POP3(*a.addr("pop3"), timeout=30)
    p.user("sam")
    p.pass_("secret")
    assert b"Subject: nightly report" in b"\r\n".join(p.retr(1)[1])
    p.quit()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: "relative.mime", "not an absolute path"),
        (lambda d: str(d / "missing.mime"), "does not exist"),
        (lambda d: _write(d / "nohead.mime", b"Subject: x\r\nno blank line"),
         "no end of header"),
        (lambda d: _write(d / "long.mime", b"Subject: x\r\n\r\n" + b"x" * 999 + b"\r\n"),
         "line 3 of .* has 999 octets; allowed: at most 998"),
        # folded onto nothing: it folded into the Message-ID added before it
        (lambda d: _write(d / "fold.mime", b" continued\r\nSubject: x\r\n\r\nbody\r\n"),
         "line 1 of .* is not a header field"),
        (lambda d: _write(d / "text.mime", b"just some text, not mime\r\n\r\nbody\r\n"),
         "line 1 of .* is not a header field"),
        (lambda d: _write(d / "second.mime", b"Subject: x\r\n: no name\r\n\r\nbody\r\n"),
         "line 2 of .* is not a header field"),
    ],
)
def test_file_problems_are_clear_errors(make_appliance, tmp_path, make, needle):
    stopped = make_appliance()  # the checks come before anything is queued
    with pytest.raises(SendMailError, match=needle):
        send_mime_mail(make(tmp_path), "app@example.test", ["sam@example.test"],
                       settings=load(stopped.config))


def _write(path, data):
    path.write_bytes(data)
    return str(path)


def test_bad_addresses_and_types(make_appliance, tmp_path):
    note = _write(tmp_path / "n.mime", NOTE)
    s = load(make_appliance().config)
    with pytest.raises(SendMailError, match="originator"):
        send_mime_mail(note, "not an address", ["sam@example.test"], settings=s)
    with pytest.raises(SendMailError, match="recipient type"):
        send_mime_mail(note, "app@example.test", [("sam@example.test", "XX")], settings=s)
    with pytest.raises(SendMailError, match="at least one recipient"):
        send_mime_mail(note, "app@example.test", [], settings=s)


def test_sndmail_cli(post, tmp_path):
    a = post
    note = _write(tmp_path / "cli.mime", NOTE)
    rc, out, err = a.cli("sndmail", "--file", note, "--from", "app@example.test",
                         "--to", "sam@example.test")
    assert rc == 0 and out.startswith("queued as "), err
    a.wait_mailbox("SAM", 1)
    rc, out, err = a.cli("sndmail", "--file", "rel.mime", "--from", "app@example.test",
                         "--to", "sam@example.test")
    assert rc == 2 and "absolute path" in err and len(err.strip().splitlines()) == 1
    # The profile named goes into the envelope and the journal: it must be one.
    note = _write(tmp_path / "who.mime", NOTE)
    rc, out, err = a.cli("sndmail", "--file", note, "--from", "app@example.test",
                         "--to", "sam@example.test", "--usrprf", "nosuch")
    assert (rc, out) == (2, "") and err.strip().endswith("--usrprf: 'NOSUCH' does not exist")
    assert (tmp_path / "who.mime").exists()  # not taken


def test_vfymsfmsg_requires_the_callers_own_address(make_appliance, tmp_path):
    a = make_appliance(smtp={"vfymsfmsg": "*YES"}).start()
    a.user("SAM")
    a.user("APP")
    s = load(a.config)
    note = _write(tmp_path / "v.mime", NOTE)
    with pytest.raises(SendMailError, match="calling user profile must be given"):
        send_mime_mail(note, "app@example.test", ["sam@example.test"], settings=s)
    with pytest.raises(SendMailError, match="not the SMTP address of user profile SAM"):
        send_mime_mail(note, "app@example.test", ["sam@example.test"], settings=s,
                       usrprf="SAM")
    send_mime_mail(note, "app@example.test", ["sam@example.test"], settings=s, usrprf="app")
    a.wait_mailbox("SAM", 1)


def test_send_mime_mail_to_a_remote_recipient_goes_out(make_appliance, tmp_path):
    from test_smtp_client import Sink

    sink = Sink()
    try:
        a = make_appliance(smtp={"mailrouter": f"127.0.0.1:{sink.port}",
                                 "firewall": "*YES"}).start()
        a.user("SAM")
        note = _write(tmp_path / "far.mime", NOTE)
        send_mime_mail(note, "app@example.test",
                       [("friend@remote.test", TO), ("hidden@remote.test", BCC)],
                       settings=load(a.config))
        a.wait_for(lambda: sink.messages, 30, "delivery to the remote sink")
        [m] = sink.messages
        assert sorted(m.recipients) == ["friend@remote.test", "hidden@remote.test"]
        assert b"Bcc:" not in m.content and b"secret@" not in m.content
        assert m.content.endswith(b"\r\n\r\nAll jobs ended normally.\r\n")
    finally:
        sink.stop()


def test_the_smtp_limits_hold_for_the_api(make_appliance, tmp_path):
    """MAXMSGSIZE and MAXRCPT, checked before anything is queued."""
    a = make_appliance(smtp={"maxmsgsize": 1024, "maxrcpt": 2})
    note = tmp_path / "big.mime"
    note.write_bytes(NOTE.replace(b"All jobs", b"x" * 2000 + b" All jobs"))
    with pytest.raises(SendMailError, match="MAXMSGSIZE"):
        send_mime_mail(str(note), "app@example.test", ["sam@example.test"],
                       settings=load(a.config))
    note.write_bytes(NOTE)
    with pytest.raises(SendMailError, match="MAXRCPT"):
        send_mime_mail(str(note), "app@example.test",
                       ["sam@example.test", "jane@example.test", "app@example.test"],
                       settings=load(a.config))
    assert a.queue_files("QTMSINQ") == []


def _queued(settings, qid):
    from twistmail.interfaces import QTMSINQ
    from twistmail.queue import FileQueue

    queue = FileQueue.for_settings(settings)
    return queue.load(QTMSINQ, qid), queue.body_path(qid, QTMSINQ).read_bytes()


def test_the_file_goes_when_queued_but_never_a_new_file_of_its_name(
        make_appliance, tmp_path, monkeypatch):
    """The bridge used to delete the file by name when it took the message, later:
    the caller's next note, written under the same name meanwhile, went unsent."""
    from twistmail import api

    s = load(make_appliance().config)
    note = tmp_path / "note.mime"
    note.write_bytes(NOTE)
    qid = send_mime_mail(str(note), "app@example.test", ["sam@example.test"], settings=s)
    assert not note.exists()
    env, _ = _queued(s, qid)
    assert not [h for h in env.history if "api_file" in h]

    queue_message = api.queue_message

    def and_the_next_note(*args, **kwargs):
        qid = queue_message(*args, **kwargs)
        nxt = tmp_path / "next.tmp"
        nxt.write_bytes(NOTE.replace(b"nightly report", b"the next one"))
        nxt.rename(note)
        return qid

    monkeypatch.setattr(api, "queue_message", and_the_next_note)
    note.write_bytes(NOTE)
    send_mime_mail(str(note), "app@example.test", ["sam@example.test"], settings=s)
    assert b"the next one" in note.read_bytes()
    monkeypatch.setattr(api, "queue_message", queue_message)
    link = tmp_path / "link.mime"
    link.symlink_to(note)
    send_mime_mail(str(link), "app@example.test", ["sam@example.test"], settings=s)
    assert not link.is_symlink() and note.exists()  # the name given goes, as before


def test_a_program_sending_many_notes_keeps_no_descriptor(make_appliance, tmp_path):
    import gc
    import os

    s = load(make_appliance().config)
    note = tmp_path / "n.mime"

    def send():
        note.write_bytes(NOTE)
        send_mime_mail(str(note), "app@example.test", ["sam@example.test"], settings=s)

    send()  # the first call may import and open what stays for the process
    # What earlier tests left to the garbage collector closes now, not in the loop.
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        send()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_unix_file_s_line_ends_become_crlf(make_appliance, tmp_path):
    """POP announces a message's size from its file: bare LFs would make RETR longer."""
    s = load(make_appliance().config)
    note = tmp_path / "unix.mime"
    note.write_bytes(b"From: app@example.test\nSubject: unix\r\n\r\nline one\nline two\rend\n")
    qid = send_mime_mail(str(note), "app@example.test", ["sam@example.test"], settings=s)
    _, body = _queued(s, qid)
    assert body.endswith(b"From: app@example.test\r\nSubject: unix\r\n\r\n"
                         b"line one\r\nline two\r\nend\r\n")
    assert b"\n" not in body.replace(b"\r\n", b"") and b"\r" not in body.replace(b"\r\n", b"")


def test_a_unix_file_is_sent_and_fields_with_no_blank_line_are_refused(make_appliance,
                                                                       tmp_path):
    """An all-LF file was refused for want of a CRLF blank line.  Without any
    blank line, text of the shape "Status: failed" would pass for fields."""
    s = load(make_appliance().config)
    note = tmp_path / "lf.mime"
    note.write_bytes(b"Subject: lf\n\nline1\n")
    qid = send_mime_mail(str(note), "app@example.test", ["sam@example.test"], settings=s)
    assert _queued(s, qid)[1].endswith(b"Subject: lf\r\n\r\nline1\r\n")
    for data in (b"Subject: x\r\nthis is body text\r\n",
                 b"Subject: Nightly job\nStatus: FAILED\nErrors: 3\n"):
        note.write_bytes(data)
        with pytest.raises(SendMailError, match="no end of header"):
            send_mime_mail(str(note), "app@example.test", ["sam@example.test"], settings=s)


def test_an_address_named_twice_gets_the_message_once(make_appliance, tmp_path):
    s = load(make_appliance().config)
    note = _write(tmp_path / "n.mime", NOTE)
    qid = send_mime_mail(note, "app@example.test",
                         [("sam@example.test", BCC), ("sam@EXAMPLE.test", CC),
                          ("jane@example.test", TO)], settings=s)
    env, _ = _queued(s, qid)
    assert [(r.address, r.kind) for r in env.recipients] == [
        ("sam@EXAMPLE.test", "cc"), ("jane@example.test", "to")]


def test_a_disabled_profile_sends_nothing(make_appliance, tmp_path):
    """On IBM i a disabled profile runs no job, so it calls no API."""
    from twistmail.api import create_send_email

    a = make_appliance()
    a.user("APP")
    rc, _, err = a.cli("chgusrprf", "--usrprf", "APP", "--status", "*DISABLED")
    assert rc == 0, err
    s = load(a.config)
    with pytest.raises(SendMailError, match=r"APP is \*DISABLED"):
        create_send_email(["sam@example.test"], "s", "b", usrprf="app", settings=s)
    note = _write(tmp_path / "n.mime", NOTE)
    a.cli("chgsmtpa", "--vfymsfmsg", "*YES")
    with pytest.raises(SendMailError, match=r"APP is \*DISABLED"):
        send_mime_mail(note, "app@example.test", ["sam@example.test"], usrprf="APP",
                       settings=load(a.config))


def test_attachments_too_big_are_refused_before_they_are_read(make_appliance, tmp_path,
                                                              monkeypatch):
    from twistmail import mimebuild
    from twistmail.api import create_send_email

    a = make_appliance()
    a.user("APP")
    a.cli("chgsmtpa", "--maxmsgsize", "1048576")
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate(900_000)  # 1.2 MB once in base64
    monkeypatch.setattr(mimebuild, "attachment_parts", lambda items: pytest.fail("read"))
    with pytest.raises(SendMailError, match="MAXMSGSIZE"):
        create_send_email(["sam@example.test"], "s", "b", [big], usrprf="APP",
                          settings=load(a.config))


def test_a_saved_message_goes_as_an_attachment(make_appliance, tmp_path):
    """.eml is guessed message/rfc822, which must not be base64 (RFC 2046 5.2.1)."""
    import email
    import email.policy

    from twistmail.api import create_send_email

    a = make_appliance()
    a.user("APP")
    s = load(a.config)
    saved = tmp_path / "forwarded.eml"
    saved.write_bytes(NOTE)
    qid = create_send_email(["sam@example.test"], "fwd", "see attached", [saved],
                            usrprf="APP", settings=s)
    _, body = _queued(s, qid)
    msg = email.message_from_bytes(body, policy=email.policy.default)
    [part] = list(msg.iter_attachments())
    assert part.get_content_type() == "application/octet-stream"
    assert part.get_filename() == "forwarded.eml" and part.get_content() == NOTE
    with pytest.raises(SendMailError, match="message/"):
        create_send_email(["sam@example.test"], "fwd", "x", [(saved, "message/rfc822")],
                          usrprf="APP", settings=s)


def test_alwauth_lclrly_turns_vfymsfmsg_on_as_the_seed_says(make_appliance, tmp_path):
    """"If you set the parameter to *LCLRLY, the Verify MSF messages
    (VFYMSFMSG) and Verify from user (VFYFROMUSR) parameters are also
    enabled": the API took any originator, and DSPSMTPA showed *NO."""
    a = make_appliance()
    rc, out, err = a.cli("chgsmtpa", "--alwauth", "*LCLRLY")
    assert rc == 0 and "VFYFROMUSR and VFYMSFMSG *NO act as *YES" in err, err
    note = _write(tmp_path / "v.mime", NOTE)
    with pytest.raises(SendMailError, match="calling user profile must be given"):
        send_mime_mail(note, "ceo@example.test", ["sam@example.test"], settings=load(a.config))
    rc, out, err = a.cli("dspsmtpa")
    assert "*NO (in effect *YES: ALWAUTH *LCLRLY)" in out
    rc, out, err = a.cli("dspsmtpa", "--json")
    shown = json.loads(out)
    assert (shown["vfymsfmsg"], shown["vfymsfmsg_in_effect"]) == ("*NO", "*YES")
    assert shown["vfyfromusr_in_effect"] == "*YES"


def test_a_note_without_date_or_message_id_gets_them(make_appliance, tmp_path):
    """RFC 5322 §3.6 requires both; the SMTP server adds them, so the API does
    (RFC 6409 §8).  One the note has is kept as it is."""
    import email
    import email.policy

    s = load(make_appliance().config)
    note = tmp_path / "bare.mime"
    note.write_bytes(b"From: app@example.test\r\nSubject: bare\r\nMessage-ID: \r\n\r\nx\r\n")
    qid = send_mime_mail(str(note), "app@example.test", ["sam@example.test"], settings=s)
    msg = email.message_from_bytes(_queued(s, qid)[1], policy=email.policy.compat32)
    assert msg["Date"] and email.utils.parsedate_to_datetime(msg["Date"])
    assert msg.get_all("Message-ID") == [f"<{qid}@{s.hostname}>"]  # the empty one replaced
    note.write_bytes(NOTE)
    qid = send_mime_mail(str(note), "app@example.test", ["sam@example.test"], settings=s)
    msg = email.message_from_bytes(_queued(s, qid)[1], policy=email.policy.compat32)
    assert msg.get_all("Message-ID") == ["<report-1@example.test>"]
    assert msg.get_all("Date") == ["Sat, 28 Nov 2026 09:00:00 +0000"]


def test_date_and_message_id_are_there_once_whatever_the_copies():
    """An empty copy beside a good one made a second Message-ID; an empty one
    folded over a blank line left that line on the field before it."""
    from twistmail.api import _completed

    out = _completed(b"Message-ID: \r\nMessage-ID: <x@y>\r\nDate:\r\n  \r\nSubject: s\r\n\r\n"
                     b"body\r\n", "QID", "mail.example.test")
    head, body = out.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[1:] == [b"Message-ID: <x@y>", b"Subject: s"] and lines[0].startswith(b"Date: ")
    assert body == b"body\r\n"


def test_the_calling_profile_must_be_a_profile_name(tmp_path):
    """Any text, control characters too, went into the journal's EH entry
    and the envelope as the calling user profile."""
    from twistmail.api import SendMailError, send_mime_mail

    f = tmp_path / "m.mime"
    f.write_bytes(b"From: a@example.test\r\nTo: b@example.test\r\nSubject: x\r\n\r\nbody\r\n")
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[system]\ndatadir = "{tmp_path}/var"\n')
    from twistmail import config

    with pytest.raises(SendMailError, match="usrprf: 'evil\\\\n"):
        send_mime_mail(f, "a@example.test", ["b@example.test"],
                       settings=config.load(cfg), usrprf="evil\n\x1b[31mX")
    assert f.exists()


@pytest.mark.parametrize("body", [None, b"bytes"])
def test_a_body_that_is_not_text_is_the_api_s_own_refusal(body):
    """None raised a TypeError from len(), not the SendMailError callers catch."""
    from twistmail.api import create_send_email

    with pytest.raises(SendMailError, match="body: must be text"):
        create_send_email(["sam@example.test"], "s", body, usrprf="APP")


def test_fields_after_one_with_a_space_before_its_colon_are_seen():
    """``X-Mailer : 1.0`` (RFC 5322 §4.5.3) stopped the email package's parser:
    the Date and Message-ID after it were added a second time."""
    from twistmail.api import _completed

    head = (b"From: jane@example.test\r\nX-Mailer : Acme 1.0\r\nDate : Wed, 02 Dec 2026 "
            b"15:00:00 +0000\r\nMessage-ID:\r\n <orig@x.test>\r\n\r\nbody\r\n")
    assert _completed(head, "QID", "mail.example.test") == head
