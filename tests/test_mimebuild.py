"""What the mail APIs build: header fields say exactly what was asked, no more."""

from __future__ import annotations

import email
import email.policy

import pytest

from twistmail.api import CC, TO, Recipient, SendMailError, _without_bcc
from twistmail.mimebuild import Attachment, content_entity, header_block

RCPTS = [Recipient("sam@example.test", TO)]


@pytest.mark.parametrize("subject", ["a\x0bb", "a\x85b", "a\r\nBcc: spy@evil.test"])
def test_a_subject_cannot_add_a_field_or_end_the_header(subject):
    with pytest.raises(SendMailError, match="subject"):
        header_block("jane@example.test", RCPTS, subject, "mail.example.test")


@pytest.mark.parametrize("subject", [
    "=?utf-8?q?hello=0D=0ABcc:_spy@evil.test=0D=0A=0D=0AFAKE_BODY?=",  # CVE-2024-6923
    "=?utf-8?b?aGVsbG8NCkJjYzogc3B5QGV2aWwudGVzdA==?=",
    "=?utf-8?q?hi?= there",
])
def test_a_subject_that_looks_encoded_reads_as_typed_and_adds_no_field(subject):
    block = header_block("jane@example.test", RCPTS, subject, "mail.example.test")
    back = email.message_from_bytes(block + b"\r\nbody\r\n", policy=email.policy.default)
    assert str(back["Subject"]) == subject
    assert "bcc" not in [k.lower() for k in back.keys()]
    assert back.get_content().strip() == "body"


def test_address_fields_name_the_envelope_s_addresses_as_they_are():
    """The email package would decode an encoded-word in a quoted local part, or
    unquote it: the header would name another address than the envelope."""
    rcpts = [Recipient('"=?utf-8?b?w6k=?="@example.test'), Recipient('"a\\ b"@example.test'),
             Recipient('"=?utf-8?q?x=0D=0ABcc=3A_spy=40evil=2Etest?="@example.test', CC)]
    rcpts += [Recipient(f"user{n:02d}@example.test") for n in range(12)]
    block = header_block("jane@example.test", rcpts, "s", "mail.example.test")
    assert b'"=?utf-8?b?w6k=?="@example.test,' in block
    assert b'"a\\ b"@example.test,' in block
    assert b'Cc: "=?utf-8?q?x=0D=0ABcc=3A_spy=40evil=2Etest?="@example.test\r\n' in block
    assert all(len(line) <= 78 for line in block.split(b"\r\n"))
    back = email.message_from_bytes(block + b"\r\n", policy=email.policy.compat32)
    assert [k.lower() for k in back.keys()] == [
        "from", "to", "cc", "subject", "date", "message-id", "mime-version"]


def test_ordinary_subjects_pass_and_are_encoded():
    block = header_block("jane@example.test", RCPTS, "Grüße, =?not an encoded word",
                         "mail.example.test")
    assert block.count(b"\r\nSubject: ") == 1 and block.isascii()


@pytest.mark.parametrize("name", ["=?utf-8?q?a=0D=0AX-Inj:_y?=.txt", "a\nb.txt"])
def test_an_attachment_name_cannot_add_a_field(name):
    with pytest.raises(SendMailError, match="attachment"):
        content_entity("body", [Attachment(name, b"x", "text/plain")])


def test_blind_copies_go_whatever_the_line_ends():
    head = (b"From: app@example.test\nTo: sam@example.test\nBcc: secret@example.test,\n"
            b" other@example.test\r\nResent-Bcc: hidden@example.test\r\nSubject: x\r\n")
    kept = _without_bcc(head)
    assert b"secret@" not in kept and b"other@" not in kept and b"hidden@" not in kept
    assert kept == b"From: app@example.test\nTo: sam@example.test\nSubject: x\r\n"


def test_an_attachment_must_be_a_regular_file():
    """/dev/zero would be read for ever, a FIFO waited on for ever."""
    from twistmail.mimebuild import attachment_parts

    with pytest.raises(SendMailError, match="not a regular file"):
        attachment_parts(["/dev/zero"])


@pytest.mark.parametrize("ctype", ["application/pdf;name=evil.exe", "text/plain; charset=utf-7",
                                   "/", "text/", "/pdf", "a/b/c", "text /plain"])
def test_an_attachment_type_is_a_bare_type_and_subtype(ctype, tmp_path):
    """A parameter gave the part a second file name beside its
    Content-Disposition's, which readers show differently."""
    from twistmail.mimebuild import attachment_parts

    (tmp_path / "rep.pdf").write_bytes(b"%PDF")
    with pytest.raises(SendMailError, match="no parameters"):
        attachment_parts([(tmp_path / "rep.pdf", ctype)])
    assert attachment_parts([(tmp_path / "rep.pdf", "application/PDF")])[0].content_type == \
        "application/pdf"


def test_a_body_or_a_file_name_that_cannot_be_sent_is_refused_for_its_reason():
    for body in ("a\udcffb", "nul\x00here"):
        with pytest.raises(SendMailError, match="body: a NUL or an unpaired surrogate"):
            content_entity(body, [])
    with pytest.raises(SendMailError, match="is not UTF-8"):
        content_entity("b", [Attachment("n\udcff.pdf", b"x", "application/pdf")])
    with pytest.raises(SendMailError, match="subject: must be one line of text"):
        header_block("app@example.test", [], "a\x00b", "mail.example.test")


def test_a_utf8_text_attachment_says_its_charset():
    """Without charset= text/* is US-ASCII: a reader showed "é" as two letters."""
    entity = content_entity("see attached", [
        Attachment("notes.txt", "café\n".encode(), "text/plain"),
        Attachment("plain.txt", b"ascii only\n", "text/plain"),
        Attachment("latin.txt", "café\n".encode("latin-1"), "text/plain"),
        Attachment("image.png", "é".encode(), "image/png")])
    msg = email.message_from_bytes(entity, policy=email.policy.default)
    parts = {p.get_filename(): p for p in msg.iter_attachments()}
    assert parts["notes.txt"].get_content_charset() == "utf-8"
    assert parts["notes.txt"].get_content() == "café\n"
    for name in ("plain.txt", "latin.txt", "image.png"):
        assert parts[name].get_param("charset") is None, name


@pytest.mark.parametrize("name", ["=?utf-8?q?=41?=.txt",
                                  "=?utf-8?q?a=22=3B_name=3Devil.exe=3B_x=3D?=.txt"])
def test_a_file_name_a_reader_would_decode_is_refused_not_renamed(name):
    """The email package decodes an encoded-word as it builds the field: the
    file went as A.txt, or as a name with a quote and a semicolon in it."""
    with pytest.raises(SendMailError, match="would reach its reader as"):
        content_entity("hi", [Attachment(name, b"data", "application/octet-stream")])
