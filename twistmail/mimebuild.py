"""The MIME message the Create and Send MIME E-mail API builds.

The message is built in two pieces so S/MIME can wrap one of them: the
content entity (the text body, and with attachments a ``multipart/mixed``
around it and them) and the header block (From, To, Cc, Subject, Date,
Message-ID, MIME-Version).  The final message is ``header_block + entity``,
where the entity is the content as built, or signed, encrypted, or both.

Everything is 7-bit (quoted-printable or base64 where needed) with CRLF line
ends, because a signed entity must reach the reader byte for byte and no
relay may re-encode it (RFC 8551 section 3.1.2).  Bcc recipients never
appear in the header block.
"""

from __future__ import annotations

import email.header
import email.policy
import email.utils
import mimetypes
import os
import re
import stat
from collections.abc import Iterable, Sequence
from email.message import EmailMessage, MIMEPart
from pathlib import Path
from typing import Any

import attrs

from twistmail.api import CC, TO, Recipient, SendMailError
from twistmail.identity import as_invoker

POLICY = email.policy.SMTP.clone(cte_type="7bit", max_line_length=78)
MAX_ATTACHMENT = 64 * 1024 * 1024
SIGN, ENCRYPT = 1, 2


@attrs.frozen
class Attachment:
    filename: str
    data: bytes
    content_type: str


def attachment_size(item: str | os.PathLike[str] | tuple[str | os.PathLike[str], str]) -> int:
    """The size of an attachment file as it is now (0 when it cannot be told: the
    read that follows says why)."""
    path = item[0] if isinstance(item, tuple) else item
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


#: RFC 2045 §5.1: type "/" subtype, each a token; no parameters.
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def attachment_parts(
    attachments: Iterable[str | os.PathLike[str] | tuple[str | os.PathLike[str], str]],
) -> list[Attachment]:
    """Read each attachment file, with its content type given or guessed from its name."""
    out = []
    for item in attachments:
        path, ctype = item if isinstance(item, tuple) else (item, None)
        file = Path(path)
        if ctype is None:
            guessed, wrapper = mimetypes.guess_type(file.name, strict=False)
            # a .gz or .bz2 file is sent as it is, not as what it unpacks to; a saved
            # message (.eml) too: base64 is not allowed for message/* (RFC 2046 5.2.1)
            ctype = (guessed if guessed and not wrapper and not guessed.startswith("message/")
                     else "application/octet-stream")
        if not _MEDIA_TYPE.fullmatch(ctype) or ctype.lower().startswith(
                ("multipart/", "message/")):
            # Parameters too: "application/pdf;name=evil.exe" gave the part a
            # second file name beside its Content-Disposition's.
            raise SendMailError(f"attachment: content type {ctype!r} of {file} is not allowed; "
                                "allowed: type/subtype such as application/pdf (no parameters), "
                                "not multipart/ or message/")
        try:
            with as_invoker():  # the caller's file (see twistmail.identity)
                data = _read_attachment(file)
        except FileNotFoundError:
            raise SendMailError(f"attachment: {file} does not exist") from None
        except IsADirectoryError:
            raise SendMailError(f"attachment: {file} is a directory, not a file") from None
        except OSError as e:
            raise SendMailError(f"attachment: {file} cannot be read ({e.strerror})") from None
        out.append(Attachment(file.name, data, ctype.lower()))
    return out


def _read_attachment(file: Path) -> bytes:
    st = file.stat()
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        # /dev/zero would be read for ever, a FIFO wait for ever.
        raise SendMailError(f"attachment: {file} is not a regular file")
    if st.st_size > MAX_ATTACHMENT:
        raise SendMailError(f"attachment: {file} is larger than "
                            f"{MAX_ATTACHMENT // (1024 * 1024)} MB")
    return file.read_bytes()


def same_fields(built: EmailMessage, data: bytes, what: str) -> bytes:
    """``data``, generated from ``built``, once it reads back with the same header fields.

    The email package of Python before 3.11.10 writes a line break that an
    RFC 2047 encoded-word holds as it is (CVE-2024-6923): a subject such as
    ``=?utf-8?q?x=0D=0ABcc:_spy@evil.test?=`` would add a field, or end the
    header early.  Whatever the cause, mail that would not say what was
    built is refused.
    """
    back = email.message_from_bytes(data, policy=POLICY)
    if _shape(back) != _shape(built):
        raise SendMailError(f"{what}: a line break, also an encoded one (=?...?=), is not "
                            "allowed in a subject, description, name or file name")
    return data


def _shape(message: Any) -> list[list[str]]:
    return [[name.lower() for name in part.keys()] for part in message.walk()]


def _generated(built: EmailMessage, what: str) -> bytes:
    try:
        data = built.as_bytes(policy=POLICY)
    except ValueError as e:  # a line break the folder refuses (\v, \x85, ...)
        raise SendMailError(f"{what}: {e}") from None
    return same_fields(built, data, what)


def _charset(a: Attachment) -> dict[str, str]:
    """UTF-8 text says so: without charset, text/* is US-ASCII (RFC 2045 §5.2),
    and a reader shows its accented letters as two wrong ones each.  Text in
    another charset cannot be told from its bytes, and keeps none."""
    if not a.content_type.startswith("text/") or a.data.isascii():
        return {}
    try:
        a.data.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    return {"charset": "utf-8"}


def content_entity(body: str, attachments: Sequence[Attachment]) -> bytes:
    """The text body, with attachments a multipart/mixed entity; CRLF, 7-bit."""
    if not isinstance(body, str):
        raise SendMailError(f"body: must be text (str), not {type(body).__name__}")
    try:
        body.encode("utf-8")  # an unpaired surrogate (undecodable bytes) fails; at C speed
        if "\x00" in body:
            raise UnicodeError
    except UnicodeError:
        raise SendMailError("body: a NUL or an unpaired surrogate (undecodable bytes) is not "
                            "allowed; allowed: text") from None
    part = MIMEPart(policy=POLICY)
    part.set_content(body, subtype="plain")
    for a in attachments:
        maintype, subtype = a.content_type.split("/")
        try:
            part.add_attachment(a.data, maintype=maintype, subtype=subtype, cte="base64",
                                filename=a.filename, params=_charset(a))
        except UnicodeError:
            raise SendMailError(f"attachment: the file name {a.filename!r} is not allowed: "
                                "it is not UTF-8") from None
        except ValueError:
            raise SendMailError(f"attachment: the file name {a.filename!r} is not allowed: "
                                "it holds a line break") from None
    data = _generated(part, "attachment")
    _same_names(data, attachments)
    return data


def _same_names(data: bytes, attachments: Sequence[Attachment]) -> None:
    """Each attachment reaches its reader under its own name.  Readers decode an
    RFC 2047 encoded-word in a file name (and so does the email package, as it
    builds the field): ``=?utf-8?q?=41?=.txt`` would arrive as ``A.txt``."""
    back = email.message_from_bytes(data, policy=POLICY)
    names = [part.get_filename() for part in back.walk()
             if part.get_content_disposition() == "attachment"]
    for a, name in zip(attachments, names, strict=True):
        if name != a.filename.strip():  # spaces around a name are lost, and harmless
            raise SendMailError(f"attachment: the file name {a.filename!r} is not allowed: it "
                                f"would reach its reader as {name!r} (an encoded-word, "
                                "=?...?=, in it is decoded); rename the file")


def header_block(sender: str, rcpts: Sequence[Recipient], subject: str, hostname: str) -> bytes:
    """The top-level header fields, each folded and ending CRLF; no Bcc.

    The address fields are written as the envelope has them: they are checked
    ASCII addr-specs, and the email package would decode an encoded-word in
    a quoted local part (which RFC 2047 section 5 forbids there) or drop a
    quoting backslash, naming another address than the one mail goes to.
    """
    if not isinstance(subject, str) or any(c < " " and c != "\t" for c in subject):
        raise SendMailError("subject: must be one line of text, without control characters")
    fields, names = [_address_field("From", [sender])], ["from"]
    for kind, field in ((TO, "To"), (CC, "Cc")):
        addresses = [r.address for r in rcpts if r.kind == kind]
        if addresses:
            fields.append(_address_field(field, addresses))
            names.append(field.lower())
    if not any(r.kind in (TO, CC) for r in rcpts):
        fields.append(b"To: undisclosed-recipients:;\r\n")
        names.append("to")
    head = EmailMessage(policy=POLICY)
    try:
        if "=?" in subject:
            # Text that looks like an encoded-word is encoded, so readers show it as typed.
            fields.append(b"Subject: " + email.header.Header(
                subject, "utf-8", header_name="Subject").encode(
                    linesep="\r\n", maxlinelen=78).encode("ascii") + b"\r\n")
            names.append("subject")
        else:
            head["Subject"] = subject
        head["Date"] = email.utils.formatdate(localtime=True)
        head["Message-ID"] = email.utils.make_msgid(domain=hostname)
        head["MIME-Version"] = "1.0"
        block = b"".join(fields) + b"".join(
            POLICY.fold_binary(name, value) for name, value in head.items())
    except ValueError:  # a line break the email package refuses (\v, \x85, ...)
        raise SendMailError("subject: must be one line of text") from None
    names += [name.lower() for name in head.keys()]
    back = email.message_from_bytes(block + b"\r\n", policy=POLICY)
    if [name.lower() for name in back.keys()] != names:
        raise SendMailError("subject: a line break, also an encoded one (=?...?=), is not "
                            "allowed in a subject")
    return block


def _address_field(name: str, addresses: Sequence[str]) -> bytes:
    """``Name: a, b, ...`` folded before an address that would pass 78 columns."""
    lines, line = [], f"{name}:"
    for i, address in enumerate(addresses):
        piece = " " + address + ("," if i < len(addresses) - 1 else "")
        if len(line) + len(piece) > 78 and line != f"{name}:":
            lines.append(line)
            line = ""
        line += piece
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def secure(content: bytes, level: int, settings: Any, usrprf: str, password: str | None,
           addresses: Sequence[str], sender: str | None = None) -> bytes:
    """Sign (level 1), encrypt (2) or sign then encrypt (3) ``content`` with S/MIME.

    The certificates come from ``usrprf``'s store; encryption is also for the
    sender's own certificate, so the sender can read what it sent.  Every
    certificate is looked up before any cryptography, so a missing one fails
    alone.  A signature must be by a certificate that names ``sender``, the
    From address: RFC 8550 §3 receivers refuse any other.
    """
    from twistmail import smime
    from twistmail.certstore import CertStore, CertStoreError, other_names

    store = CertStore.for_user(settings, usrprf)
    store.check_password(password)
    signer = store.signer(password) if level & SIGN else None
    own = store.own_certificate() if level & ENCRYPT else None

    def names_the_sender(certificate: Any, why: str) -> None:
        if sender and (names := other_names(certificate, sender)):
            raise CertStoreError("usrprf", f"the own certificate of {usrprf} names "
                                 f"{', '.join(names)}, not {sender.lower()}, the sender: "
                                 f"{why}; import the sender's own certificate")

    if signer is not None:
        names_the_sender(signer.certificate, "its readers would refuse the signature")
    if own is not None:  # the sender's copy must be for the sender, not another's key
        names_the_sender(own, "the sender's copy would be for the holder of that certificate")
    readers = []
    if own is not None:
        readers = [*store.recipients(list(dict.fromkeys(a.lower() for a in addresses))), own]
    if signer is not None:
        content = smime.sign(content, signer)
    if readers:
        content = smime.encrypt(content, readers)
    return content
