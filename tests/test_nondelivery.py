"""The nondelivery notice on its own: RFC 3464 structure, parsed back with ``email``."""

from __future__ import annotations

import email
import email.policy

from twistmail.bridge.nondelivery import Failure, build_notice, notice_id, original_headers


def test_notice_structure(tmp_path):
    body = tmp_path / "m"
    body.write_bytes(b"Subject: hello\r\nFrom: jane@example.test\r\n\r\n" + b"x" * 100_000)
    assert original_headers(body) == b"Subject: hello\r\nFrom: jane@example.test\r\n"
    raw = build_notice(
        hostname="mail.example.test", queue_id="18ec2f06c368ee480e6dfc",
        originator="jane@example.test", arrival=1_700_000_000.0,
        failures=[Failure("a@example.test", "5.1.1", "550 5.1.1 user unknown"),
                  Failure("b@example.test", "5.2.2", "mailbox full")],
        headers=original_headers(body), message_id="<m1@example.test>",
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "jane@example.test" and msg["In-Reply-To"] == "<m1@example.test>"
    kinds = [p.get_content_type() for p in msg.iter_parts()]
    assert kinds == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = list(msg.iter_parts())[1]
    blocks = status.get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; mail.example.test"
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; a@example.test",
                                                           "rfc822; b@example.test"]
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "5.2.2"]
    assert b"x" * 100 not in raw  # the body of the original is never reflected


def test_notice_id_is_stable_and_a_queue_id():
    a = notice_id("18ec2f06c368ee480e6dfc")
    assert a == notice_id("18ec2f06c368ee480e6dfc") != "18ec2f06c368ee480e6dfc"
    assert len(a) == 22 and all(c in "0123456789abcdef" for c in a)


def test_each_notice_about_a_message_has_its_own_id():
    """Stable for one notice (a repeat after a crash), distinct between notices."""
    qid = "18ec2f06c368ee480e6dfc"
    assert notice_id(qid, "failed", ["a@x.test", "b@x.test"]) == notice_id(
        qid, "failed", ["b@x.test", "a@x.test"])
    ids = {notice_id(qid, "failed", ["a@x.test"]), notice_id(qid, "failed", ["b@x.test"]),
           notice_id(qid, "delayed", ["a@x.test"], 3), notice_id(qid, "delayed", ["a@x.test"], 4),
           notice_id(qid, "relayed", ["a@x.test"], 3)}
    assert len(ids) == 5 and all(i[:16] == qid[:16] for i in ids)


def test_a_notice_is_made_whatever_the_original_and_the_remote_reply_hold():
    """Raw UTF-8 in the original's header, a reply in German with control
    characters, a non-ASCII recipient: the notice used to fail to build, which
    held the message on its queue for good."""
    headers = ("From: jane@example.test\r\nSubject: Grüße\r\nBcc: hidden@example.test,\r\n"
               " other@example.test\r\nTo: sam@example.test\r\n").encode()
    raw = build_notice(
        hostname="mail.example.test", queue_id="18ec2f06c368ee480e6dfc",
        originator="jane@example.test", arrival=1_700_000_000.0,
        failures=[Failure("müller@remote.test", "5.1.1",
                          "550 5.1.1 Benutzer unbekannt: Müller\x00\x1b[2J\r\nX-Forged: 1",
                          orcpt="rfc822;Mueller@remote.test", mta="mx.remote.test")],
        headers=headers, message_id=None, envid="env-1",
    )
    assert raw.isascii() and max(len(line) for line in raw.split(b"\r\n")) < 998
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    _, status, original = msg.iter_parts()
    per_message, block = status.get_payload()
    assert per_message["Original-Envelope-Id"] == "env-1"
    assert block["Original-Recipient"] == "rfc822;Mueller@remote.test"  # RFC 3461 §6.3
    assert block["Final-Recipient"] == "utf-8; m\\x{FC}ller@remote.test"  # RFC 6533
    assert block["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 Benutzer unbekannt: M\\x{FC}ller\\x{0}\\x{1B}[2J X-Forged: 1")
    assert block["X-Forged"] is None and block["Last-Attempt-Date"]
    assert "Subject: Grüße" in original.get_content()
    assert b"hidden@example.test" not in raw and b"other@example.test" not in raw  # no Bcc


def test_the_returned_header_is_the_original_s_bytes_also_when_they_are_no_utf_8():
    headers = (b"From: jane@example.test\r\nSubject: caf\xc3\xa9 \xff\r\nX-Long: "
               + b"y" * 200 + b"\r\n")
    raw = build_notice(
        hostname="mail.example.test", queue_id="18ec2f06c368ee480e6dfc",
        originator="jane@example.test", arrival=1_700_000_000.0,
        failures=[Failure("sam@remote.test", "5.1.1", "550 5.1.1 unknown")],
        headers=headers, message_id=None)
    assert raw.isascii() and max(len(line) for line in raw.split(b"\r\n")) < 998
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    original = msg.get_payload()[2]
    assert original.get_content_type() == "text/rfc822-headers"
    assert original.get_payload(decode=True) == headers


def test_a_long_reply_in_another_script_stays_one_ascii_field():
    """Cut after escaping, so the field stays within its line (no encoded-word)."""
    raw = build_notice(
        hostname="mail.example.test", queue_id="18ec2f06c368ee480e6dfc",
        originator="jane@example.test", arrival=1_700_000_000.0,
        failures=[Failure("a@remote.test", "5.1.1", "550 " + "漢" * 300)],
        headers=b"", message_id=None,
    )
    [line] = [x for x in raw.split(b"\r\n") if x.startswith(b"Diagnostic-Code:")]
    assert b"=?" not in line and line.endswith(b"}") and len(line) < 998


def test_ret_full_returns_the_original_byte_for_byte_but_its_bcc():
    """The email package wrote the returned message again ('From:   J' became
    'From: J'): a DKIM signature with simple canonicalization no longer verified."""
    original = (b"DKIM-Signature: v=1; a=rsa-sha256; c=simple/simple; d=x.test;\r\n"
                b"\th=from:to:subject; b=XYZ\r\nFrom:   Jane <jane@x.test>\r\n"
                b"Bcc: hidden@x.test\r\nTo: bob@remote.test\r\n"
                b"X-Odd:\tvalue  with  spaces \r\nSubject: hi\r\n\r\n"
                b"Gr\xc3\xbc\xc3\x9fe\r\n.a dot\r\nFrom the start")
    raw = build_notice(
        hostname="mail.example.test", queue_id="18ec2f06c368ee480e6dfc",
        originator="jane@x.test", arrival=1_700_000_000.0,
        failures=[Failure("bob@remote.test", "5.1.1", "550 5.1.1 user unknown")],
        headers=b"", message_id=None, full=original,
    )
    kept = original.replace(b"Bcc: hidden@x.test\r\n", b"") + b"\r\n"
    assert kept in raw and b"hidden@" not in raw
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    _, _, returned = msg.iter_parts()
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"  # the original is 8-bit
    assert msg["Content-Transfer-Encoding"] == "8bit"  # and the report that holds it
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "hi" and inner["X-Odd"].strip() == "value  with  spaces"


def test_a_returned_original_holding_the_boundary_does_not_end_the_notice():
    original = (b"Subject: tricky\r\n\r\n--18ec2f06c368ee480e6dfc.ndn--\r\nafter\r\n")
    raw = build_notice(
        hostname="mail.example.test", queue_id="18ec2f06c368ee480e6dfc",
        originator="jane@x.test", arrival=1_700_000_000.0,
        failures=[Failure("bob@remote.test", "5.1.1", "550 5.1.1 user unknown")],
        headers=b"", message_id=None, full=original,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    _, _, returned = msg.iter_parts()
    assert "after" in returned.get_payload()[0].get_content()  # the whole original, inside


def test_diagnostics_that_are_not_smtp_replies_say_so():
    """RFC 3464 §2.3.6: type smtp carries an SMTP reply; our own words are X-Twistmail."""
    raw = build_notice(
        hostname="mail.example.test", queue_id="18ec2f06c368ee480e6dfc",
        originator="jane@example.test", arrival=1_700_000_000.0,
        failures=[Failure("a@x.test", "5.1.1", "550 5.1.1 user unknown", mta="mx.x.test"),
                  Failure("b@x.test", "4.4.1", "4.4.1 connection refused by x.test"),
                  # Our words in the shape of a reply: no server sent a 451.
                  Failure("c@x.test", "4.4.1", "451 4.4.1 Cannot connect to x.test"),
                  Failure("d@x.test", "4.2.1", "450 4.2.1 mailbox busy (retries exhausted)",
                          mta="mx.x.test"),
                  Failure("e@example.test", "5.1.1", "550 5.1.1 unknown local user")],
        headers=b"", message_id=None,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    blocks = list(msg.iter_parts())[1].get_payload()[1:]
    assert [b["Diagnostic-Code"] for b in blocks] == [
        "smtp; 550 5.1.1 user unknown", "X-Twistmail; 4.4.1 connection refused by x.test",
        "X-Twistmail; 451 4.4.1 Cannot connect to x.test",
        "smtp; 450 4.2.1 mailbox busy",  # as the server sent it
        "X-Twistmail; 550 5.1.1 unknown local user"]


def test_a_reply_from_a_server_names_it_as_remote_mta():
    """RFC 3464 §2.3.5: a failure reported by the server we relayed to names it."""
    raw = build_notice(
        hostname="mail.example.test", queue_id="18ec2f06c368ee480e6dfc",
        originator="jane@example.test", arrival=1_700_000_000.0,
        failures=[Failure("a@x.test", "5.1.1", "550 5.1.1 user unknown", mta="mx1.x.test"),
                  Failure("b@x.test", "4.4.1", "4.4.1 connection refused by x.test")],
        headers=b"", message_id=None,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    blocks = list(msg.iter_parts())[1].get_payload()[1:]
    assert [b["Remote-MTA"] for b in blocks] == ["dns; mx1.x.test", None]


def _notice(**fields):
    base = dict(hostname="mail.example.test", queue_id="18ec2f06c368ee480e6dfc",
                originator="jane@example.test", arrival=1_700_000_000.0,
                failures=[Failure("a@example.test", "5.1.1", "550 5.1.1 user unknown")],
                headers=b"Subject: x\r\n", message_id="<m1@example.test>")
    base.update(fields)
    return build_notice(**base)


def test_a_message_id_holding_an_encoded_line_break_adds_nothing_to_the_notice():
    """Written through the email package, the decoded CR LF of an encoded word
    came out as it is (CVE-2024-6923, Python before 3.11.10): the sender wrote
    fields and a body of a notice from MAILER-DAEMON."""
    injected = ("=?utf-8?q?<x@y>=0D=0ABcc:_spy@evil.test=0D=0AContent-Type:_text/plain"
                "=0D=0A=0D=0AYour_account_is_suspended.?=")
    for message_id in (injected, f"<{injected}@x>", "<a b@x>"):
        raw = _notice(message_id=message_id)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert [n.lower() for n in msg.keys()] == [
            "to", "from", "subject", "date", "message-id", "auto-submitted", "mime-version",
            "content-type"]
        assert msg.get_content_type() == "multipart/report"
        assert b"suspended" not in raw and b"spy@" not in raw
    msg = email.message_from_bytes(_notice(), policy=email.policy.default)
    assert msg["In-Reply-To"] == msg["References"] == "<m1@example.test>"


def test_an_originator_holding_an_encoded_line_break_still_gets_its_notice():
    """The email package decoded the encoded word inside the quoted local part
    and refused the address: no notice could be made, and the message stayed
    on its queue, retried for ever."""
    for originator in ('"=?utf-8?q?a=0D=0ABcc:_spy3@evil.test?="@remote.test',
                       "=?utf-8?q?a=0D=0A?=@remote.test"):
        raw = _notice(originator=originator)
        assert f"To: <{originator}>\r\n".encode() in raw
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        assert "bcc" not in [n.lower() for n in msg.keys()]
        assert msg.get_content_type() == "multipart/report"


def test_bcc_written_with_a_space_before_the_colon_is_not_returned():
    headers = b"From: j@x.test\r\nBCC : hidden4@x.test\r\nbcc:h5@x.test\r\nSubject: s\r\n"
    raw = _notice(headers=headers)
    assert b"hidden4" not in raw and b"h5@" not in raw and b"Subject: s" in raw


def test_a_utf8_original_recipient_is_written_as_the_client_gave_it():
    """RFC 6533's utf-8-addr-xtext is escaped already: its backslashes were
    escaped again, and the reader saw \\x{5C}x{E9} where é was meant."""
    raw = build_notice(
        hostname="mail.example.test", queue_id="18ec2f06c368ee480e6dfc",
        originator="jane@example.test", arrival=1_700_000_000.0,
        failures=[Failure("jerome@example.test", "5.1.1", "550 5.1.1 unknown",
                          orcpt="utf-8;j\\x{E9}r\\x{F4}me@example.test\x1b")],
        headers=b"Subject: s\r\n", message_id=None, envid=None,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    _, status, _ = msg.iter_parts()
    _, block = status.get_payload()
    assert block["Original-Recipient"] == "utf-8;j\\x{E9}r\\x{F4}me@example.test\\x{1B}"
