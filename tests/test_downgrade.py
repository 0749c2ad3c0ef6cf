"""8-bit mail made 7-bit for a server without 8BITMIME (RFC 6152 §3).

Only the bodies of 8-bit leaf parts change, with their
Content-Transfer-Encoding; every other byte goes out as it came.
"""

from __future__ import annotations

import email
import email.policy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistmail.smtp import downgrade
from twistmail.smtp.downgrade import to_7bit


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def leaves(data: bytes) -> list[tuple[str, bytes]]:
    return [(p.get_content_type(), p.get_payload(decode=True))
            for p in parsed(data).walk() if not p.is_multipart()
            and p.get_content_maintype() != "message"]


HEAD = (b"Received: from a\r\nReceived: from b\r\nSubject: hi\x0c\x0cthere\r\n"
        b"X-Long: aaaa bbbb cccc\r\n\tcontinued\r\nMIME-Version: 1.0\r\n")
SEVEN = (b"--XX\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nplain ascii\r\n"
         b"--XX  \r\nContent-Type: application/octet-stream\r\n"
         b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQ=\r\n")
MULTIPART = (
    HEAD + b"Content-Type: multipart/mixed; boundary=XX\r\n\r\npre\xe9amble\r\n"
    + SEVEN + b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nna\xc3\xafve text, mostly ASCII\r\n"
    b"--XX\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"From: x@there.test\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nh\xc3\xa9\r\n"
    b"--XX--\r\nepilogue\r\n"
)


def test_each_eight_bit_part_is_reencoded_and_reads_the_same():
    out = to_7bit(MULTIPART)
    assert out.isascii()
    assert leaves(out) == [("text/plain", b"plain ascii"),
                           ("application/octet-stream", b"\x00\x01\x02\x03\x04"),
                           ("text/plain", "naïve text, mostly ASCII".encode()),
                           ("text/plain", b"h\xc3\xa9")]
    # Mostly ASCII text stays readable; mostly 8-bit text goes in base64.
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\nna=C3=AFve text" in out
    assert b"Content-Transfer-Encoding: base64\r\n\r\naMOp\r\n--XX--" in out
    # An embedded message with nothing 8-bit left is labelled 7bit.
    assert b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n" in out


def test_everything_else_goes_as_it_came():
    out = to_7bit(MULTIPART)
    assert out.startswith(HEAD + b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
                          b"pre?amble\r\n" + SEVEN + b"--XX\r\n")
    assert out.endswith(b"--XX--\r\nepilogue\r\n")


def test_header_fields_are_never_changed():
    """Control characters stay put (no header line is made of them), and
    8-bit header text is SMTPUTF8's business, not 8BITMIME's."""
    head = (b"From: J\xc3\xb6rg<j@x.test>\r\nSubject: caf\xe9\x0c\x1cInjected: no\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Disposition: attachment; filename=\"r\xc3\xa9sum\xc3\xa9.txt\"\r\n")
    out = to_7bit(head + b"Content-Transfer-Encoding: 8bit\r\n\r\nx\xc3\xa9\r\n")
    assert out.startswith(head) and b"Content-Transfer-Encoding: 8bit" not in out
    assert parsed(out).get_payload(decode=True) == b"x\xc3\xa9\r\n"


def test_a_body_without_mime_header_fields_becomes_text_of_unknown_charset():
    out = to_7bit(b"Subject: hi\r\n\r\nh\xc3\xa9llo\r\n")
    msg = parsed(out)
    assert out.isascii() and msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_param("charset") == "unknown-8bit"
    assert msg.get_payload(decode=True) == b"h\xc3\xa9llo\r\n"


def test_a_content_type_without_mime_version_keeps_its_type():
    """As PHP's mail() sends it."""
    out = to_7bit(b"Subject: x\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
                  b"<b>h\xc3\xa9</b>\r\n")
    msg = parsed(out)
    assert msg["MIME-Version"] == "1.0" and msg.get_content_type() == "text/html"
    assert msg.get_payload(decode=True) == b"<b>h\xc3\xa9</b>\r\n"


def test_a_multipart_whose_boundary_never_appears_is_taken_as_text():
    out = to_7bit(b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
                  b"caf\xc3\xa9 text with no boundary\r\n")
    msg = parsed(out)
    assert out.isascii() and msg.get_content_type() == "text/plain"
    assert msg.get_payload(decode=True) == b"caf\xc3\xa9 text with no boundary\r\n"


def test_an_encoding_named_with_spaces_or_a_comment_is_decoded_once():
    for cte in (b"quoted-printable ", b"Quoted-Printable (old mailer)"):
        out = to_7bit(b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                      b"Content-Transfer-Encoding: " + cte
                      + b"\r\n\r\na=3Db and more caf\xc3\xa9\r\n")
        assert parsed(out).get_payload(decode=True) == b"a=b and more caf\xc3\xa9\r\n"


def test_text_in_a_charset_that_is_not_ascii_based_goes_in_base64():
    body = "plain words".encode("utf-16-le")
    out = to_7bit(b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-16le\r\n"
                  b"Content-Transfer-Encoding: binary\r\n\r\n" + body + "é".encode("utf-16-le"))
    assert b"Content-Transfer-Encoding: base64" in out
    assert parsed(out).get_payload(decode=True) == body + "é".encode("utf-16-le")


def test_a_digest_part_without_header_fields_is_a_message():
    out = to_7bit(b"MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n"
                  b"--d\r\n\r\nFrom: a@b.test\r\nSubject: x\r\n\r\ninner caf\xc3\xa9\r\n--d--\r\n")
    assert out.isascii()
    assert leaves(out) == [("text/plain", b"inner caf\xc3\xa9")]


def test_a_soft_line_break_makes_no_boundary_line():
    """Quoted-printable would have broken the line right before "--b",
    making a delimiter: a text/html part that was not in the message."""
    line = b"\xc3\xa9" + b"a" * 69 + b"--b"
    data = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + line + b"\r\n"
            b"Content-Type: text/html\r\n\r\n<script>hidden</script>\r\n--b--\r\n")
    assert [t for t, _ in leaves(to_7bit(data))] == ["text/plain"]
    assert leaves(to_7bit(data)) == leaves(data)


def test_text_before_any_header_field_is_body():
    """As the email package reads it: the MIME fields go before it."""
    text = "h\u00e9llo\r\nworld\r\n\r\nmore \u00e9\r\n".encode()
    out = to_7bit(text)
    assert out.isascii() and out.startswith(b"MIME-Version: 1.0\r\n")
    assert parsed(out).get_payload(decode=True) == text


@pytest.mark.parametrize("data", [
    b"Subject: a\rContent-Transfer-Encoding: 8bit\r\n\r\nh\xc3\xa9llo\r\n",
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"\xc3\xa9\"\r\n\r\n"
    b"--\xc3\xa9\r\n\r\nx\xc3\xa9\r\n--\xc3\xa9--\r\n",
    b"MIME-Version: 1.0\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 30 + b"\xc3\xa9\r\n",
])
def test_what_it_cannot_take_it_says_so_and_the_message_goes_as_it_is(data):
    """A bare CR in a header block, a boundary that is not ASCII, nesting
    past MAX_DEPTH: the client then sends the message unchanged."""
    with pytest.raises(ValueError):
        to_7bit(data)


def test_more_parts_than_it_takes():
    part = b"--b\r\nContent-Type: text/plain\r\n\r\n\xc3\xa9\r\n"
    data = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            + part * downgrade.MAX_PARTS + b"--b--\r\n")
    with pytest.raises(ValueError):
        to_7bit(data)


@given(st.binary(max_size=3000), st.sampled_from(["text/plain", "application/x-thing"]))
def test_any_body_comes_out_seven_bit_and_the_same(body, ctype):
    body = body.replace(b"\r", b"").replace(b"\n", b"\r\n")
    data = (f"MIME-Version: 1.0\r\nContent-Type: {ctype}\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + body
    out = to_7bit(data)
    if body.isascii():
        assert out == data
    else:
        assert out.isascii() and parsed(out).get_payload(decode=True) == body
        assert max(len(line) for line in out.split(b"\r\n")) <= 76
