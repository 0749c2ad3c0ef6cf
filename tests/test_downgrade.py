"""8-bit mail made 7-bit for a server without 8BITMIME (RFC 6152 §3)."""

from __future__ import annotations

import email
import email.policy

from hypothesis import given
from hypothesis import strategies as st

from twistmail.smtp.downgrade import to_7bit


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def leaves(data: bytes) -> list[tuple[str, bytes]]:
    return [(p.get_content_type(), p.get_payload(decode=True))
            for p in parsed(data).walk() if not p.is_multipart()
            and p.get_content_maintype() != "message"]


MULTIPART = (
    b"From: a@here.test\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=XX\r\n"
    b"X-Long: aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj kkkk llll mmmm nnnn oooo\r\n"
    b"\tcontinued\r\n\r\npre\xe9amble\r\n"
    b"--XX\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9\r\n"
    b"--XX\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nplain ascii\r\n"
    b"--XX\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQ=\r\n"
    b"--XX\r\nContent-Type: message/rfc822\r\n\r\n"
    b"From: x@there.test\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nh\xc3\xa9\r\n"
    b"--XX--\r\n"
)


def test_each_eight_bit_part_is_reencoded_and_reads_the_same():
    out = to_7bit(MULTIPART)
    assert out.isascii()
    assert leaves(out) == [("text/plain", b"caf\xe9"), ("text/plain", b"plain ascii"),
                           ("application/octet-stream", b"\x00\x01\x02\x03\x04"),
                           ("text/plain", b"h\xc3\xa9")]
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9\r\n" in out


def test_what_is_seven_bit_already_goes_as_it_came():
    out = to_7bit(MULTIPART)
    for kept in (b"X-Long: aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj kkkk llll mmmm "
                 b"nnnn oooo\r\n\tcontinued\r\n",
                 b"Content-Type: text/plain; charset=us-ascii\r\n\r\nplain ascii\r\n",
                 b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQ=\r\n"):
        assert kept in out


def test_a_body_without_mime_headers_becomes_text_of_unknown_charset():
    out = to_7bit(b"Subject: hi\r\n\r\nh\xc3\xa9llo\r\n")
    msg = parsed(out)
    assert out.isascii() and msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_param("charset") == "unknown-8bit"
    assert msg.get_payload(decode=True) == b"h\xc3\xa9llo\r\n"


def test_eight_bit_header_words_become_encoded_words_and_addresses_stay():
    data = (b"Received: from a\r\nReceived: from b\r\n"
            b"From: J\xc3\xb6rg M\xc3\xbcller <j@x.test>\r\nSubject: caf\xe9 au lait\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\nx\xc3\xa9\r\n")
    out = to_7bit(data)
    msg = parsed(out)
    assert out.isascii()
    assert msg["From"].addresses[0].display_name == "Jörg Müller"
    assert msg["From"].addresses[0].addr_spec == "j@x.test"
    assert b"<j@x.test>" in out
    assert b"Subject: =?unknown-8bit?b?Y2Fm6Q==?= au lait\r\n" in out  # not UTF-8
    assert msg.get_all("Received") == ["from a", "from b"]  # order and repeats kept
    assert out.index(b"Received") < out.index(b"From:") < out.index(b"Subject:")


@given(st.binary(max_size=3000))
def test_any_text_body_comes_out_seven_bit_and_the_same(body):
    body = body.replace(b"\r", b"").replace(b"\n", b"\r\n")
    data = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body)
    out = to_7bit(data)
    assert out.isascii()
    if not body.isascii():
        assert parsed(out).get_payload(decode=True) == body
