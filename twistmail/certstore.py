"""The user certificate store: ``<datadir>/certs/<USRPRF>/``.

IBM i keeps the certificates the Create and Send MIME E-mail API signs and
encrypts with in a Digital Certificate Manager store per user profile
(``/qibm/userdata/icss/cert/download/client/<user>/<user>.kdb``), opened with
a password.  This is that store:

- ``store.json`` holds an Argon2id hash of the store password (so a wrong
  password is refused before any key is touched) and the own certificate's
  label;
- ``own.pem`` is the user's own certificate followed by the chain that came
  with it, ``own.key`` its private key as PKCS#8 encrypted with the store
  password, so the files alone do not give the key away;
- ``recipients/<label>.pem`` are the certificates of the people mail is
  encrypted for, labelled by lower-case e-mail address, as the seed's
  scenario labels them.

The directory is mode 0700 and every file 0600; files are written to a
temporary name, fsynced and renamed, so a crash never leaves half a key.
As in DCM, the PKCS#12 password normally is the store password (the seed:
"the password for the imported certificate must be the same as that of the
keystore"); a different one may be given for the file alone.

Honours ``system.datadir``.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from twistmail.api import SendMailError
from twistmail.directory import DirectoryError, hash_password, profile_name, verify_password
from twistmail.smtp.address import PathError, parse_mailbox

STORE_FILE = "store.json"
OWN_CERT = "own.pem"
OWN_KEY = "own.key"
RECIPIENTS = "recipients"
OWN, RECIPIENT = "own", "recipient"
MAX_PASSWORD = 128
MAX_FILE = 1024 * 1024


class CertStoreError(SendMailError):
    """A certificate store refusal; ``field`` names the parameter at fault."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


@attrs.frozen
class StoredCert:
    """One entry of a store, as ``dcm list`` shows it."""

    label: str
    kind: str  # OWN or RECIPIENT
    certificate: x509.Certificate | None  # None: the file is damaged

    def row(self) -> dict[str, Any]:
        c = self.certificate
        if c is None:
            return {"label": self.label, "kind": self.kind,
                    "subject": "(damaged: remove it and import it again)", "emails": [],
                    "not_after": "", "sha256": ""}
        return {
            "label": self.label,
            "kind": self.kind,
            "subject": c.subject.rfc4514_string(),
            "emails": certificate_emails(c),
            "not_after": c.not_valid_after_utc.isoformat(),
            "sha256": c.fingerprint(hashes.SHA256()).hex(),
        }


@attrs.frozen
class Signer:
    """The own certificate, its decrypted key and the chain sent along with signatures."""

    certificate: x509.Certificate
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()


def certificate_emails(cert: x509.Certificate) -> list[str]:
    """The e-mail addresses a certificate names (rfc822Name, then emailAddress), lower case."""
    found: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        found += san.value.get_values_for_type(x509.RFC822Name)
    except x509.ExtensionNotFound:
        pass
    found += [str(a.value) for a in cert.subject.get_attributes_for_oid(
        x509.NameOID.EMAIL_ADDRESS)]
    out: list[str] = []
    for e in found:
        if e.lower() not in out:
            out.append(e.lower())
    return out


def check_valid(cert: x509.Certificate, field: str, what: str) -> None:
    """Refuse a certificate outside its validity period: readers refuse what it signs,
    and RFC 8550 agents refuse to encrypt to it."""
    now = datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        raise CertStoreError(field, f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                             "import a valid one")
    if cert.not_valid_before_utc > now:
        raise CertStoreError(field, f"{what} is valid only from "
                             f"{cert.not_valid_before_utc:%Y-%m-%d}")


def other_names(cert: x509.Certificate, address: str) -> list[str]:
    """The addresses ``cert`` names when ``address`` is not one of them, else none.

    A certificate that names no address at all is taken for any.
    """
    emails = certificate_emails(cert)
    return emails if emails and address.lower() not in emails else []


def check_names(cert: x509.Certificate, label: str) -> None:
    """A certificate that names e-mail addresses is stored only under one of them:
    mail to the label would otherwise be readable by someone else."""
    if emails := other_names(cert, label):
        raise CertStoreError("label", f"{label!r} is not an address of the certificate; "
                             f"allowed: {', '.join(emails)}")


def check_label(label: str) -> str:
    """A label is an e-mail address, kept in lower case as the seed's scenario asks."""
    try:
        return str(parse_mailbox(label.strip())).lower()
    except (PathError, AttributeError):
        raise CertStoreError("label", f"{label!r} is not allowed; allowed: the e-mail address "
                             "the certificate belongs to (user@domain)") from None


class CertStore:
    """The certificate store of one user profile."""

    def __init__(self, root: Path, usrprf: str) -> None:
        self.root = root
        self.usrprf = usrprf

    @classmethod
    def for_user(cls, settings: Any, usrprf: str) -> CertStore:
        try:
            name = profile_name(usrprf)
        except DirectoryError as e:
            raise CertStoreError("usrprf", f"{usrprf!r} {e.problem}") from None
        return cls(settings.datadir / "certs" / name, name)

    # -- the store itself --------------------------------------------------

    @property
    def exists(self) -> bool:
        return (self.root / STORE_FILE).is_file()

    def create(self, password: str) -> None:
        """Make an empty store protected by ``password``."""
        _check_new_password(password)
        if self.exists:
            raise CertStoreError("usrprf", f"{self.usrprf} already has a certificate store "
                                 f"({self.root})")
        _private_dir(self.root.parent)
        _private_dir(self.root)
        _private_dir(self.root / RECIPIENTS)
        self._write_meta({"password": hash_password(password), "own": None,
                          "created": datetime.now(UTC).replace(microsecond=0).isoformat()})

    def check_password(self, password: str | None) -> None:
        """Refuse a missing store or a wrong password, naming what to do."""
        meta = self._meta()
        if not password:
            raise CertStoreError("password", f"the certificate store password of {self.usrprf} "
                                 "is needed to sign or encrypt")
        if not verify_password(password, str(meta.get("password", ""))):
            raise CertStoreError("password", f"wrong password for the certificate store of "
                                 f"{self.usrprf}")

    # -- importing ------------------------------------------------------------

    def import_pkcs12(self, data: bytes, password: str, *, file_password: str | None = None,
                      label: str | None = None) -> StoredCert:
        """Make the certificate and key of a PKCS#12 file (.pfx, .p12) the user's own."""
        self.check_password(password)
        secret = (file_password if file_password is not None else password).encode()
        try:
            key, cert, chain = pkcs12.load_key_and_certificates(data, secret)
        except ValueError:
            raise CertStoreError("file", "is not a PKCS#12 file, or its password is not the one "
                                 "given (DCM wants the file's password to be the store's)"
                                 ) from None
        if cert is None or key is None:
            raise CertStoreError("file", "holds no certificate with its private key; export "
                                 "the certificate with its private key")
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise CertStoreError("file", "holds a key that is neither RSA nor EC; S/MIME here "
                                 "signs with RSA or EC keys")
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise CertStoreError("file", "holds a private key that does not belong to its "
                                 "certificate")
        name = self._own_label(cert, label)
        held = self._meta().get("own")
        if held and (self.root / OWN_KEY).exists():
            # Its private key cannot be had again: replaced only when asked.
            raise CertStoreError("file", f"would replace the own certificate {held} of "
                                 f"{self.usrprf} and its private key; remove it first "
                                 f"(dcm remove --label {held}) to replace it")
        check_valid(cert, "file", "its certificate")
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(password.encode()))
        _write(self.root / OWN_KEY, key_pem)
        _write(self.root / OWN_CERT, pem)
        self._write_meta({**self._meta(), "own": name})
        return StoredCert(name, OWN, cert)

    def import_certificate(self, data: bytes, label: str) -> StoredCert:
        """Add a recipient's certificate (DER .cer or PEM) under its e-mail address."""
        self._meta()
        name = check_label(label)
        cert = parse_certificate(data)
        check_names(cert, name)
        check_valid(cert, "file", "the certificate")
        target = self._recipient_path(name)
        if target.exists() or name == self._meta().get("own"):
            raise CertStoreError("label", f"{name} is already in the certificate store of "
                                 f"{self.usrprf}; remove it first to replace it")
        _private_dir(target.parent)
        _write(target, cert.public_bytes(serialization.Encoding.PEM))
        return StoredCert(name, RECIPIENT, cert)

    # -- reading --------------------------------------------------------------

    def entries(self) -> list[StoredCert]:
        """The own certificate (if any) first, then the recipients by label."""
        meta = self._meta()
        out = []
        if meta.get("own") and (self.root / OWN_CERT).is_file():
            own = _stored(self.root / OWN_CERT)
            out.append(StoredCert(meta["own"], OWN, own[0] if own else None))
        folder = self.root / RECIPIENTS
        for path in sorted(folder.glob("*.pem")) if folder.is_dir() else ():
            found = _stored(path)
            out.append(StoredCert(unquote(path.stem), RECIPIENT, found[0] if found else None))
        return out

    def own_certificates(self) -> list[x509.Certificate]:
        """The own certificate and its chain; public, so no password is needed."""
        self._meta()
        path = self.root / OWN_CERT
        if not path.is_file():
            raise CertStoreError("usrprf", f"the certificate store of {self.usrprf} has no own "
                                 "certificate; import one with: twistmail dcm import --usrprf "
                                 f"{self.usrprf} --file F.p12 --password P")
        found = _stored(path)
        if not found:
            raise CertStoreError("usrprf", f"the own certificate in the certificate store of "
                                 f"{self.usrprf} is damaged; import the PKCS#12 file again")
        return found

    def signer(self, password: str | None) -> Signer:
        """The own certificate with its key, decrypted with the store password."""
        self.check_password(password)
        assert password is not None
        cert, *chain = self.own_certificates()
        try:
            key = serialization.load_pem_private_key((self.root / OWN_KEY).read_bytes(),
                                                     password.encode())
        except (OSError, ValueError, TypeError):
            raise CertStoreError("usrprf", f"the private key of {self.usrprf}'s own certificate "
                                 "cannot be read; import the PKCS#12 file again") from None
        assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        check_valid(cert, "usrprf", f"the own certificate of {self.usrprf}")
        return Signer(cert, key, tuple(chain))

    def recipient(self, address: str) -> x509.Certificate:
        """The certificate labelled ``address``; the own one answers for its own label."""
        meta = self._meta()
        name = address.lower()
        if name == meta.get("own"):
            return self.own_certificate()
        path = self._recipient_path(name)
        if not path.is_file():
            raise CertStoreError("recipient", f"no certificate for {name} in the certificate "
                                 f"store of {self.usrprf}; import it with: twistmail dcm import "
                                 f"--usrprf {self.usrprf} --file F.cer --label {name}")
        found = _stored(path)
        if not found:
            raise CertStoreError("recipient", f"the certificate for {name} in the certificate "
                                 f"store of {self.usrprf} is damaged; remove it (twistmail dcm "
                                 f"remove --usrprf {self.usrprf} --label {name}) and import it "
                                 "again")
        if emails := other_names(found[0], name):  # stored before labels were checked
            raise CertStoreError("recipient", f"the certificate stored for {name} names "
                                 f"{', '.join(emails)}, not {name}; remove it (twistmail dcm "
                                 f"remove --usrprf {self.usrprf} --label {name}) and import "
                                 f"{name}'s own")
        check_valid(found[0], "recipient", f"the certificate for {name}")
        return found[0]

    def own_certificate(self) -> x509.Certificate:
        """The own certificate, refused outside its validity period."""
        cert = self.own_certificates()[0]
        check_valid(cert, "usrprf", f"the own certificate of {self.usrprf}")
        return cert

    def recipients(self, addresses: Sequence[str]) -> list[x509.Certificate]:
        return [self.recipient(a) for a in addresses]

    # -- removing -------------------------------------------------------------

    def remove(self, label: str) -> StoredCert:
        """Remove the entry labelled ``label`` (the own one takes its key along)."""
        meta = self._meta()
        name = check_label(label)
        if name == meta.get("own"):
            own = _stored(self.root / OWN_CERT)
            entry = StoredCert(name, OWN, own[0] if own else None)
            (self.root / OWN_KEY).unlink(missing_ok=True)
            (self.root / OWN_CERT).unlink(missing_ok=True)
            self._write_meta({**meta, "own": None})
            return entry
        path = self._recipient_path(name)
        if not path.is_file():
            raise CertStoreError("label", f"{name} is not in the certificate store of "
                                 f"{self.usrprf}")
        found = _stored(path)
        entry = StoredCert(name, RECIPIENT, found[0] if found else None)
        path.unlink()
        return entry

    # -- files ----------------------------------------------------------------

    def _own_label(self, cert: x509.Certificate, label: str | None) -> str:
        if label is not None:
            name = check_label(label)
            check_names(cert, name)
            return name
        emails = certificate_emails(cert)
        if not emails:
            raise CertStoreError("label", "the certificate names no e-mail address; give the "
                                 "sender's address as the label")
        return check_label(emails[0])

    def _recipient_path(self, label: str) -> Path:
        return self.root / RECIPIENTS / (quote(label, safe="@.-_+") + ".pem")

    def _meta(self) -> dict[str, Any]:
        try:
            meta = json.loads((self.root / STORE_FILE).read_text())
        except FileNotFoundError:
            raise CertStoreError("usrprf", f"{self.usrprf} has no certificate store; create it "
                                 f"with: twistmail dcm create-store --usrprf {self.usrprf} "
                                 "--password P") from None
        except (OSError, ValueError) as e:
            raise CertStoreError("usrprf", f"the certificate store of {self.usrprf} cannot be "
                                 f"read ({e})") from None
        if not isinstance(meta, dict):
            raise CertStoreError("usrprf", f"the certificate store of {self.usrprf} is damaged "
                                 f"({self.root / STORE_FILE})")
        return meta

    def _write_meta(self, meta: dict[str, Any]) -> None:
        _write(self.root / STORE_FILE, json.dumps(meta, indent=2).encode() + b"\n")


def _stored(path: Path) -> list[x509.Certificate]:
    """The certificates of a store file; none when it is damaged or gone.

    A damaged entry must still be listed and removable: it is how the
    administrator gets rid of it.
    """
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return []


def parse_certificate(data: bytes) -> x509.Certificate:
    """A PEM or DER X.509 certificate, whichever ``data`` is."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise CertStoreError("file", "is neither a DER (.cer) nor a PEM X.509 certificate"
                             ) from None


def read_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a certificate file, or a clear error."""
    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):  # /dev/zero, a pipe: read for ever
            raise CertStoreError("file", f"{p} is not a regular file")
        if st.st_size > MAX_FILE:
            raise CertStoreError("file", f"{p} is larger than a certificate file can be")
        return p.read_bytes()
    except FileNotFoundError:
        raise CertStoreError("file", f"{p} does not exist") from None
    except IsADirectoryError:
        raise CertStoreError("file", f"{p} is a directory, not a certificate file") from None
    except OSError as e:
        raise CertStoreError("file", f"{p} cannot be read ({e.strerror})") from None


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_new_password(password: str) -> None:
    if not isinstance(password, str) or not 1 <= len(password) <= MAX_PASSWORD:
        raise CertStoreError("password", f"is not allowed; allowed: 1-{MAX_PASSWORD} characters")


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` durably under a temporary name (mode 0600), then rename it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
