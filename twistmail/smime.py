"""S/MIME (RFC 8551) for the Create and Send MIME E-mail API.

Each function takes a MIME entity (its own header lines, a CRLF blank line
and its body, in canonical CRLF form) and returns the entity that replaces it:

- :func:`sign`: ``multipart/signed`` with a detached SHA-256 signature
  (``application/pkcs7-signature``), the original entity as the first part,
  byte for byte, because the signature covers exactly those bytes;
- :func:`encrypt`: ``application/pkcs7-mime; smime-type=enveloped-data``,
  the entity encrypted with AES-256-CBC for every certificate given.

Signing then encrypting (security level 3) is ``encrypt(sign(entity))``, the
order RFC 8551 section 3.7 describes.  The cryptography is ``cryptography``'s
PKCS#7 builders; only the MIME framing is ours, written out by hand so no
generator re-folds the signed part.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from twistmail.certstore import CertStoreError, Signer, certificate_emails

CRLF = b"\r\n"
MICALG = "sha-256"


def canonical(entity: bytes) -> bytes:
    """Every line ending CRLF (RFC 8551 section 3.1.1), ending with one."""
    data = re.sub(rb"\r?\n", CRLF, entity)
    return data if data.endswith(CRLF) else data + CRLF


def sign(entity: bytes, signer: Signer) -> bytes:
    """A ``multipart/signed`` entity: ``entity`` and its detached signature."""
    entity = canonical(entity)
    builder = (pkcs7.PKCS7SignatureBuilder().set_data(entity)
               .add_signer(signer.certificate, signer.key, hashes.SHA256()))
    for cert in signer.chain:
        builder = builder.add_certificate(cert)
    signature = builder.sign(serialization.Encoding.DER,
                             [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary])
    boundary = _boundary(entity)
    return CRLF.join([
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";',
        b'\tmicalg=' + MICALG.encode() + b'; boundary="' + boundary + b'"',
        b"",
        b"This is a cryptographically signed message in MIME format.",
        b"",
        b"--" + boundary,
        # the CRLF before a delimiter belongs to the delimiter (RFC 2046 section
        # 5.1.1), so the part is ``entity`` with its own last CRLF
        entity + CRLF + b"--" + boundary,
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"',
        b"Content-Transfer-Encoding: base64",
        b'Content-Disposition: attachment; filename="smime.p7s"',
        b"Content-Description: S/MIME cryptographic signature",
        b"",
        _base64(signature),
        b"--" + boundary + b"--",
        b"",
    ])


def encrypt(entity: bytes, recipients: Sequence[x509.Certificate]) -> bytes:
    """An ``enveloped-data`` entity that each of ``recipients`` can decrypt."""
    builder = (pkcs7.PKCS7EnvelopeBuilder().set_data(canonical(entity))
               .set_content_encryption_algorithm(algorithms.AES256))
    seen: set[bytes] = set()
    for cert in recipients:
        fingerprint = cert.fingerprint(hashes.SHA256())
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        if not isinstance(cert.public_key(), rsa.RSAPublicKey):
            who = ", ".join(certificate_emails(cert)) or cert.subject.rfc4514_string()
            raise CertStoreError("recipient", f"the certificate of {who} has no RSA key; "
                                 "S/MIME encryption here needs RSA certificates")
        builder = builder.add_recipient(cert)
    envelope = builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    return CRLF.join([
        b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data;',
        b'\tname="smime.p7m"',
        b"Content-Transfer-Encoding: base64",
        b'Content-Disposition: attachment; filename="smime.p7m"',
        b"Content-Description: S/MIME encrypted message",
        b"",
        _base64(envelope),
    ])


def _boundary(entity: bytes) -> bytes:
    while True:
        boundary = b"----=_smime_" + secrets.token_hex(12).encode()
        if boundary not in entity:
            return boundary


def _base64(data: bytes) -> bytes:
    """Base64 in 76-character lines, each ending CRLF (RFC 2045 section 6.8)."""
    text = base64.b64encode(data)
    return b"".join(text[i:i + 76] + CRLF for i in range(0, len(text), 76))
