"""The *FTR* content filters on crafted messages: what hides an attachment is caught."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from twistmail.directory import ListEntry, SqliteDirectory
from twistmail.policy.filters import UNEXAMINED, examine


@pytest.fixture
def directory(tmp_path: Path) -> SqliteDirectory:
    d = SqliteDirectory(tmp_path / "var" / "directory.sqlite", ("example.test",), "mail")
    d.add_list_entry(ListEntry("*FTRFILNAME", ftrdata="*.vbs"))
    d.add_list_entry(ListEntry("*FTRSUBJECT", ftrdata="ILOVEYOU"))
    yield d
    d.close()


def _examined(tmp_path: Path, directory: SqliteDirectory, message: bytes):
    path = tmp_path / "m"
    path.write_bytes(message)
    return examine(path, "jane@example.test", directory)


def _part(name: str) -> bytes:
    return (b"--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment;"
            b" filename=\"" + name.encode() + b"\"\r\n\r\nx\r\n")


def test_an_attachment_past_a_thousand_parts_is_kept_not_let_through(tmp_path, directory):
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(1000))
    message = (b"Subject: many\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + parts
               + _part("evil.vbs") + b"--b--\r\n")
    match = _examined(tmp_path, directory, message)
    assert match is not None and match.pattern == UNEXAMINED


def test_a_second_subject_or_disposition_is_examined_too(tmp_path, directory):
    assert _examined(tmp_path, directory, b"Subject: hello\r\nSubject: ILOVEYOU\r\n\r\nx\r\n")
    message = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
               b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;"
               b" filename=\"report.txt\"\r\nContent-Disposition: attachment;"
               b" filename=\"evil.vbs\"\r\n\r\nx\r\n--b--\r\n")
    assert _examined(tmp_path, directory, message).value == "evil.vbs"


def test_a_trailing_dot_does_not_hide_an_extension(tmp_path, directory):
    message = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               + _part("evil.vbs.") + b"--b--\r\n")
    assert _examined(tmp_path, directory, message).value == "evil.vbs"


def test_an_attached_message_sent_base64_is_examined_decoded(tmp_path, directory):
    inner = (b"Subject: inner\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
             + _part("evil.vbs") + b"--b--\r\n")
    message = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n"
               b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               + base64.encodebytes(inner) + b"--o--\r\n")
    assert _examined(tmp_path, directory, message).value == "evil.vbs"


def test_parts_nested_too_deep_are_kept(tmp_path, directory):
    depth = 3000
    head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                    for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    match = _examined(tmp_path, directory, b"Subject: deep\r\n" + head + b"x" + tail)
    assert match is not None and match.pattern == UNEXAMINED


def test_an_ordinary_message_passes(tmp_path, directory):
    message = (b"Subject: minutes\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               + _part("minutes.pdf") + b"--b--\r\n")
    assert _examined(tmp_path, directory, message) is None


def test_a_second_filename_parameter_is_examined_too(tmp_path, directory):
    message = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
               b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;"
               b" filename=\"ok.txt\"; filename=\"evil.vbs\"\r\n\r\nx\r\n--b--\r\n")
    assert _examined(tmp_path, directory, message).value == "evil.vbs"


def test_a_media_type_with_a_comment_or_spaces_is_the_type(tmp_path, directory):
    """RFC 2045 §5.1 allows comments and spaces around the slash; readers drop them."""
    directory.add_list_entry(ListEntry("*FTRTYPE", ftrdata="application/x-msdownload"))
    for ctype in (b"application/x-msdownload (exe)", b"application / x-msdownload",
                  b"Application/X-MSDownload; name=a"):
        message = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                   b"Content-Type: " + ctype + b"\r\n\r\nx\r\n--b--\r\n")
        match = _examined(tmp_path, directory, message)
        assert match is not None and match.value == "application/x-msdownload", ctype


def test_conflicting_content_types_are_kept_not_let_through(tmp_path, directory):
    """Two boundaries: the parser reads the first, a mail reader may read the
    second, and the attachment behind it was let through."""
    message = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=a\r\n"
               b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--a\r\n"
               b"Content-Type: text/plain\r\n\r\nhello\r\n--a--\r\n"
               + _part("evil.vbs") + b"--b--\r\n")
    match = _examined(tmp_path, directory, message)
    assert match is not None and match.pattern == UNEXAMINED
    # Boundaries that differ in case or spacing only are still two boundaries.
    for first, second in ((b"boundary=A", b"boundary=a"),
                          (b'boundary="x y"', b'boundary="x  y"')):
        message = (b"Subject: x\r\nContent-Type: multipart/mixed; " + first + b"\r\n"
                   b"Content-Type: multipart/mixed; " + second + b"\r\n\r\nx\r\n")
        match = _examined(tmp_path, directory, message)
        assert match is not None and match.pattern == UNEXAMINED, first


def test_copies_of_a_content_type_that_mean_the_same_are_not_a_conflict(tmp_path, directory):
    """Quoting, spacing, parameter order and a charset's case change nothing:
    such a message went to quarantine, or with *DISCARD was lost."""
    for first, second in ((b"text/plain; charset=us-ascii", b'text/plain; charset="US-ASCII"'),
                          (b"text/plain; charset=utf-8; format=flowed",
                           b"text/plain;format=flowed;  charset=utf-8")):
        message = (b"Subject: x\r\nContent-Type: " + first + b"\r\nContent-Type: " + second
                   + b"\r\n\r\nhello\r\n")
        assert _examined(tmp_path, directory, message) is None, first


def test_an_originator_with_a_trailing_dot_is_the_same_originator(tmp_path, directory):
    directory.add_list_entry(ListEntry("*FTRORIGIN", ftrdata="*@spam.test"))
    path = tmp_path / "m"
    path.write_bytes(b"Subject: x\r\n\r\nx\r\n")
    assert examine(path, "x@spam.test.", directory).value == "x@spam.test"
    path.write_bytes(b"From: Bad <x@spam.test.>\r\nSubject: x\r\n\r\nx\r\n")
    assert examine(path, "jane@example.test", directory).value == "x@spam.test"


@pytest.mark.parametrize("subject", [
    b"=?utf-8*en?b?SUxPVkVZT1U=?=",  # RFC 2231 section 5: charset*language
    b"=?x-unknown?q?ILOVEYOU?=",  # a charset Python does not know
    b"=?us-ascii?q?I?= =?us-ascii?q?LOVEYOU?=",
])
def test_every_spelling_of_an_encoded_subject_is_examined_decoded(tmp_path, directory, subject):
    """Left encoded when Python could not decode it, it slipped past the filter."""
    match = _examined(tmp_path, directory, b"Subject: " + subject + b"\r\n\r\nx\r\n")
    assert match is not None and match.type == "*FTRSUBJECT"


def test_an_encoded_attachment_name_with_a_language_is_examined_decoded(tmp_path, directory):
    message = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               + _part("=?utf-8*en?q?evil.vbs?=") + b"--b--\r\n")
    assert _examined(tmp_path, directory, message).value == "evil.vbs"


def test_a_byte_an_encoded_word_s_charset_does_not_allow_is_shown_as_a_reader_does():
    from twistmail.policy.filters import _text

    assert _text("Re: =?utf-8?q?ILOVE=FFYOU?=") == "Re: ILOVE\ufffdYOU"  # was left encoded
