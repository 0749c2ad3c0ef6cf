"""The TLS certificate of the appliance and the server-side TLS options.

Reads ``[tls] certificate`` and ``key``.  When they are empty a self-signed
pair is made once in ``<datadir>/tls/`` by the controller at start (so a fresh
``make run`` speaks TLS with no step by hand).  The controller checks the
pair at start and at each ``config --apply`` and keeps what it checked in
``<datadir>/run/tls.pem``; the jobs load only that copy, so a renewal half
done on disk reaches none of them.  Connections negotiate TLS 1.2 or newer.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import stat
import sys
import time
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

from twistmail.config import Settings
from twistmail.settingtypes import SettingError


def pair_paths(settings: Settings) -> tuple[Path, Path]:
    if settings.tls.certificate:
        key = settings.tls.key or settings.tls.certificate
        return settings.resolve(settings.tls.certificate), settings.resolve(key)
    d = settings.datadir / "tls"
    return d / "cert.pem", d / "key.pem"


def pair_state(settings: Settings) -> tuple[Any, ...]:
    """What the pair is now: its paths and each file's identity, to notice a renewal."""
    out: list[Any] = []
    for path in pair_paths(settings):
        try:
            st = path.stat()
        except OSError:
            out.append((str(path), None))
        else:
            out.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def ensure_pair(settings: Settings) -> tuple[Path, Path]:
    """The certificate and key paths, making a self-signed pair when none is set."""
    cert, key = pair_paths(settings)
    if settings.tls.certificate or (cert.exists() and key.exists()
                                    and not _made_for_another_name(cert, settings.hostname)):
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
            # This host's loopback addresses too: clients that verify against
            # this certificate are most often pointed at 127.0.0.1 first.
            x509.SubjectAlternativeName([
                x509.DNSName(name), x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]),
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


def _made_for_another_name(cert: Path, hostname: str) -> bool:
    """A certificate ensure_pair made (self-signed; its names the host's,
    then localhost, 127.0.0.1 and ::1) for another host name: made before
    [system] hostname was changed.

    Made again, or clients that check the name would refuse TLS for as long
    as it lasts (ten years).  Any other certificate there, self-signed or
    not, is an administrator's and is left alone.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
        alt = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        [cn] = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    names = alt.get_values_for_type(x509.DNSName)
    addresses = {str(a) for a in alt.get_values_for_type(x509.IPAddress)}
    ours = (certificate.issuer == certificate.subject and len(names) == 2
            and names[1] == "localhost" and cn.value == names[0][:64]
            and addresses == {"127.0.0.1", "::1"})
    return ours and names[0].lower() != hostname.lower()


#: The pair the daemon accepted, key and certificates in one file (one rename
#: replaces both), in ``<datadir>/run``.
ACCEPTED = "tls.pem"


def accepted_path(settings: Settings) -> Path:
    return settings.datadir / "run" / ACCEPTED


def check_pair(settings: Settings) -> tuple[bytes, list[str]]:
    """The configured pair, checked, as the one file the jobs load, and warnings.

    Raises SettingError for a pair that cannot serve.  An expired
    certificate is only a warning: it still serves clients that do not
    verify it, and a daemon does not stop for it.
    """
    _, pem, warnings = _checked(settings)
    return pem, warnings


def keep_pair(settings: Settings, pem: bytes, run_fd: int | None = None,
              owner: tuple[int, int] | None = None) -> None:
    """Make ``pem`` (from :func:`check_pair`) the pair every job started from now loads.

    As root, ``run_fd`` is the run directory opened without following links
    and ``owner`` the daemon's user (twistd --uid/--gid), who gets the file.
    """
    path = accepted_path(settings)
    if run_fd is None:
        _write_atomic(path, pem, 0o600)
    else:
        _write_atomic(Path(path.name), pem, 0o600, dir_fd=run_fd, owner=owner)


def server_options(settings: Settings, check: bool = False) -> ssl.CertificateOptions:
    """The options every TLS listener's job uses; a pair that cannot serve is a SettingError.

    A job loads the pair the daemon accepted (:func:`keep_pair`), or the
    configured files when there is none (a job started by hand).

    The certificate file may hold the intermediate certificates after the
    server's own (a CA's "full chain"): they are sent with it, or clients
    that verify could not reach a root they trust.  The key must not be
    encrypted: a job cannot ask for a pass phrase.

    ``check`` (at start and at each reload) reads the pair with the
    cryptography package to say what is wrong with it, proves the RSA key
    sound and makes the OpenSSL context: about 60 ms, which every job
    started would pay again for a pair already checked.
    """
    if check:
        return _checked(settings)[0]
    accepted = accepted_path(settings)
    if accepted.exists():
        return _job_options(accepted, accepted)
    return _job_options(*pair_paths(settings))


@implementer(IOpenSSLContextFactory)
class JobOptions:
    """A job's server TLS options, loaded at the first TLS session, not at start.

    Most sessions never ask for TLS, while every job started (MAXUSE replaces
    one every 200 sessions by default) paid about 3 ms of CPU to load the pair
    it then mostly did not use.  The pair is the one the daemon checked, so a
    load that fails here is rare (the file removed by hand): the session is
    told TLS is not available, and the reason is logged once.
    """

    #: Seconds a failed load is not tried again: the file may be mended meanwhile.
    RETRY_AFTER = 30.0

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._options: ssl.CertificateOptions | None = None
        self._error: SettingError | None = None
        self._failed_at = 0.0
        self._told = ""

    def load(self) -> ssl.CertificateOptions:
        """The options; raises SettingError for a pair that cannot serve."""
        if self._options is None:
            if self._error is not None and time.monotonic() < self._failed_at + self.RETRY_AFTER:
                raise self._error
            try:
                self._options = server_options(self._settings)
            except SettingError as e:
                self._error, self._failed_at = e, time.monotonic()
                raise
            self._error = None
        return self._options

    def available(self) -> bool:
        """Whether the pair loads; each new reason it does not is logged once."""
        try:
            self.load()
        except SettingError as e:
            if str(e) != self._told:
                self._told = str(e)
                print(f"TLS not available: {e}", file=sys.stderr)
            return False
        return True

    def getContext(self) -> SSL.Context:
        return self.load().getContext()


def usable(options: Any) -> bool:
    """Whether ``options`` (JobOptions, CertificateOptions or None) can start TLS now."""
    if isinstance(options, JobOptions):
        return options.available()
    return options is not None


def _checked(settings: Settings) -> tuple[ssl.CertificateOptions, bytes, list[str]]:
    """The options, the pair as one PEM file, and warnings; each file is read once,
    so what is kept is what was checked even while a renewal writes them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cert_path, key_path = pair_paths(settings)
    key_name = "tls.key" if settings.tls.key else "tls.certificate"
    try:
        cert_pem = cert_path.read_bytes()
        chain = x509.load_pem_x509_certificates(cert_pem)
    except (OSError, ValueError) as e:
        raise _refused("tls.certificate", cert_path, f"it cannot be read: {_why(e)}") from None
    try:
        key_pem = cert_pem if key_path == cert_path else key_path.read_bytes()
        key = load_pem_private_key(key_pem, password=None)
    except TypeError:  # encrypted, and no pass phrase given
        raise _refused(key_name, key_path, "its private key is encrypted") from None
    except (OSError, ValueError) as e:
        raise _refused(key_name, key_path, f"its private key cannot be read: {_why(e)}") from None
    if _public(chain[0].public_key()) != _public(key.public_key()):
        raise _refused(key_name, key_path, f"it is not the key of the certificate in {cert_path}")
    # The key alone, as the jobs load it: a key file may hold certificates too.
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()) + cert_pem
    # What every job will do with the pair, done now: a pair only the check
    # could read would start a daemon whose jobs all fail.
    options = _pair_options(pem, pem, cert_path)
    if len(options.extraCertChain) != len(chain) - 1:
        raise _refused("tls.certificate", cert_path, "its certificates cannot all be read")
    try:
        options.getContext()  # made now: whatever OpenSSL refuses is told at once
    except (crypto.Error, SSL.Error, ValueError, TypeError) as e:
        raise _refused("tls.certificate", cert_path, f"TLS cannot use it: {_why(e)}") from None
    return options, pem, _validity(chain[0], cert_path)


def _validity(cert: Any, path: Path) -> list[str]:
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        return [f"the certificate in {path} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: clients that verify it "
                "refuse TLS"]
    if cert.not_valid_before_utc > now:
        return [f"the certificate in {path} is valid only from "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: clients that verify it "
                "refuse TLS"]
    return []


def _public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


#: A PEM certificate as the cryptography package reads one: the older
#: "X509 CERTIFICATE" label too, lines indented or not.
_PEM_CERT = re.compile(rb"-----BEGIN (?:X509 )?CERTIFICATE-----(.+?)-----END (?:X509 )?"
                       rb"CERTIFICATE-----", re.S)


def _pem_blocks(data: bytes) -> list[bytes]:
    """Each certificate of a PEM file, in the form OpenSSL reads."""
    return [b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(body.split())
            + b"\n-----END CERTIFICATE-----\n" for body in _PEM_CERT.findall(data)]


def _job_options(cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    try:
        cert_pem = cert_path.read_bytes()
        key_pem = cert_pem if key_path == cert_path else key_path.read_bytes()
    except OSError as e:
        raise _refused("tls.certificate", cert_path, f"it cannot be read: {_why(e)}") from None
    return _pair_options(cert_pem, key_pem, cert_path)


def _pair_options(cert_pem: bytes, key_pem: bytes, where: Path) -> ssl.CertificateOptions:
    """A checked pair, loaded with pyOpenSSL alone: the cryptography package's
    loaders would make each job's resident set a megabyte larger."""
    try:
        blocks = _pem_blocks(cert_pem)
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in blocks]
        # A pass phrase given, so an encrypted key fails instead of asking.
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem, b"")
        if not chain:
            raise ValueError("no certificate")
    except (ValueError, crypto.Error) as e:
        raise _refused("tls.certificate", where, f"it cannot be read: {_why(e)}") from None
    # pyOpenSSL's own objects, though it deprecates them in an SSL context:
    # converting the key to the cryptography package's proves it sound again
    # (60 ms per job start) and adds a megabyte to each job, as loading it
    # with that package does.
    return ssl.CertificateOptions(privateKey=key, certificate=chain[0],
                                  extraCertChain=chain[1:],
                                  raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def _refused(key: str, path: Path, problem: str) -> SettingError:
    return SettingError(key, str(path), "a PEM certificate (intermediates may follow it) "
                        f"and its unencrypted private key; {problem}")


def _why(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _holds(path: Path, data: bytes, mode: int, dir_fd: int | None,
           owner: tuple[int, int] | None) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != mode
                or st.st_size != len(data) or st.st_nlink != 1
                or (owner is not None and (st.st_uid, st.st_gid) != owner)):
            return False
        with open(fd, "rb", closefd=False) as f:
            return f.read() == data
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int, dir_fd: int | None = None,
                  owner: tuple[int, int] | None = None) -> None:
    """``path`` replaced whole by ``data``; relative to ``dir_fd`` when given.

    The temporary file is made anew (O_EXCL: never through a link someone
    put in its place), so root can write in a directory the daemon's user owns.
    A file that holds ``data`` already, as it should be held, is left alone:
    the daemon starts on a full disk (to answer 452, and let POP users
    delete mail) with the pair it kept before.
    """
    if _holds(path, data, mode, dir_fd, owner):
        return
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)  # left by a crash, perhaps by another user
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):  # a full disk: no debris
            os.unlink(tmp, dir_fd=dir_fd)
        raise
