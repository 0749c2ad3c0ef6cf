"""The TLS certificate of the appliance and the server-side TLS options.

Reads ``[tls] certificate`` and ``key``.  When they are empty a self-signed
pair is made once in ``<datadir>/tls/`` by the controller at start (so a fresh
``make run`` speaks TLS with no step by hand); the jobs only load it.
Connections negotiate TLS 1.2 or newer.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from twisted.internet import ssl

from twistmail.config import Settings


def pair_paths(settings: Settings) -> tuple[Path, Path]:
    if settings.tls.certificate:
        key = settings.tls.key or settings.tls.certificate
        return settings.resolve(settings.tls.certificate), settings.resolve(key)
    d = settings.datadir / "tls"
    return d / "cert.pem", d / "key.pem"


def ensure_pair(settings: Settings) -> tuple[Path, Path]:
    """The certificate and key paths, making a self-signed pair when none is set."""
    cert, key = pair_paths(settings)
    if settings.tls.certificate or (cert.exists() and key.exists()):
        return cert, key
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = settings.hostname
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(key, key_pem, 0o600)
    _write_atomic(cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def server_options(settings: Settings) -> ssl.CertificateOptions:
    cert, key = pair_paths(settings)
    pem = cert.read_bytes() + b"\n" + key.read_bytes()
    private = ssl.PrivateCertificate.loadPEM(pem)
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
