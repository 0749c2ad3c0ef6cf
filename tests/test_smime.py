"""The Create and Send MIME E-mail API (QtmsCreateSendEmail), S/MIME and the certificate store.

Certificates are made with the OpenSSL command line, imported with the CLI,
and every signed or encrypted message is checked by ``openssl smime``, an
implementation that shares nothing with ours.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import poplib
import re
import stat
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from clients import needs
from test_smtp_client import Sink

from twistmail.api import BCC, CC, TO, SendMailError, create_send_email
from twistmail.config import load
from twistmail.directory import SqliteDirectory

pytestmark = needs("openssl")

TWISTMAIL = str(Path(sys.executable).with_name("twistmail"))
PW = "store-secret"
BODY = "Dear Sam,\nthe nightly report is attached.\nGrüße, the batch job\n"

BCC_FIELD = re.compile(rb"(?mi)^bcc:")


@attrs.frozen
class Certs:
    dir: Path

    def __getattr__(self, name: str) -> Path:  # certs.sam_pem -> <dir>/sam.pem
        if name.startswith("_"):
            raise AttributeError(name)
        stem, _, suffix = name.rpartition("_")
        return self.dir / f"{stem}.{suffix}"


def openssl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(["openssl", *map(str, args)], capture_output=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    """A test CA and S/MIME certificates for app, sam, jane; app's as a PKCS#12 file."""
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "ca.key",
            "-out", d / "ca.pem", "-subj", "/CN=Test Mail CA", "-days", "2")
    for user, domain in (("app", "example.test"), ("sam", "example.test"),
                         ("jane", "example.test"), ("friend", "remote.test")):
        address = f"{user}@{domain}"
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / f"{user}.key",
                "-out", d / f"{user}.pem", "-subj", f"/CN={user}/emailAddress={address}",
                "-days", "2", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
                "-addext", f"subjectAltName=email:{address}",
                "-addext", "keyUsage=digitalSignature,keyEncipherment",
                "-addext", "extendedKeyUsage=emailProtection",
                "-addext", "basicConstraints=CA:FALSE")
    openssl("pkcs12", "-export", "-inkey", d / "app.key", "-in", d / "app.pem",
            "-certfile", d / "ca.pem", "-out", d / "app.p12", "-passout", f"pass:{PW}")
    openssl("pkcs12", "-export", "-inkey", d / "app.key", "-in", d / "app.pem",
            "-out", d / "other.p12", "-passout", "pass:file-only")
    openssl("x509", "-in", d / "sam.pem", "-outform", "DER", "-out", d / "sam.cer")
    (d / "old.pem").write_bytes(_expired("old@example.test"))
    return Certs(d)


def _expired(address: str) -> bytes:
    """A self-signed S/MIME certificate that expired a year ago (openssl 3.0's req
    cannot back-date one)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, address)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=730))
            .not_valid_after(now - datetime.timedelta(days=365))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def ok(a, *args: str) -> str:
    rc, out, err = a.cli(*args)
    assert rc == 0, err
    return out


def refused(a, *args: str) -> str:
    rc, out, err = a.cli(*args)
    assert rc == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out, err
    return err


def make_store(a, certs: Certs, **labels: Path) -> None:
    """APP's store with its own PKCS#12 and the recipient certificates named by label."""
    ok(a, "dcm", "create-store", "--usrprf", "APP", "--password", PW)
    ok(a, "dcm", "import", "--usrprf", "APP", "--file", str(certs.app_p12), "--password", PW)
    for label, path in labels.items():
        ok(a, "dcm", "import", "--usrprf", "APP", "--file", str(path), "--label", label)


def test_certificate_store_from_the_cli(make_appliance, certs):
    a = make_appliance()
    a.user("APP")
    assert "no certificate store" in refused(a, "dcm", "list", "--usrprf", "APP")
    assert "does not exist" in refused(a, "dcm", "create-store", "--usrprf", "NOBODY",
                                       "--password", PW)
    ok(a, "dcm", "create-store", "--usrprf", "app", "--password", PW)
    assert "already has" in refused(a, "dcm", "create-store", "--usrprf", "APP",
                                    "--password", PW)
    assert "wrong password" in refused(a, "dcm", "import", "--usrprf", "APP", "--file",
                                       str(certs.app_p12), "--password", "guess")
    # a PKCS#12 file with its own password: DCM wants the store's, unless told otherwise
    assert "--file:" in refused(a, "dcm", "import", "--usrprf", "APP", "--file",
                                str(certs.other_p12), "--password", PW)
    out = ok(a, "dcm", "import", "--usrprf", "APP", "--file", str(certs.other_p12),
             "--password", PW, "--file-password", "file-only")
    assert "own certificate and key app@example.test" in out
    # The own key cannot be had again: it was replaced without a word.
    assert "would replace the own certificate app@example.test of APP and its private key" \
        in refused(a, "dcm", "import", "--usrprf", "APP", "--file", str(certs.app_p12),
                   "--password", PW)
    ok(a, "dcm", "remove", "--usrprf", "APP", "--label", "app@example.test")
    ok(a, "dcm", "import", "--usrprf", "APP", "--file", str(certs.app_p12), "--password", PW)
    assert "--label" in refused(a, "dcm", "import", "--usrprf", "APP", "--file",
                                str(certs.sam_cer))
    ok(a, "dcm", "import", "--usrprf", "APP", "--file", str(certs.sam_cer),  # DER
       "--label", "Sam@Example.TEST")
    ok(a, "dcm", "import", "--usrprf", "APP", "--file", str(certs.jane_pem),  # PEM
       "--label", "jane@example.test")
    assert "already in" in refused(a, "dcm", "import", "--usrprf", "APP", "--file",
                                   str(certs.sam_pem), "--label", "sam@example.test")
    assert "neither a DER" in refused(a, "dcm", "import", "--usrprf", "APP", "--file",
                                      str(certs.ca_key), "--label", "x@example.test")
    assert "--label: 'not-an-address'" in refused(
        a, "dcm", "import", "--usrprf", "APP", "--file", str(certs.jane_pem),
        "--label", "not-an-address")
    # Mail to bob would be readable by jane: a certificate goes under its own addresses.
    assert "--label: 'bob@remote.test' is not an address of the certificate; allowed: " \
        "jane@example.test" in refused(a, "dcm", "import", "--usrprf", "APP", "--file",
                                       str(certs.jane_pem), "--label", "bob@remote.test")
    assert "expired on " in refused(a, "dcm", "import", "--usrprf", "APP", "--file",
                                    str(certs.old_pem), "--label", "old@example.test")

    rows = json.loads(ok(a, "dcm", "list", "--usrprf", "APP", "--json"))
    assert [(r["label"], r["kind"]) for r in rows] == [
        ("app@example.test", "own"), ("jane@example.test", "recipient"),
        ("sam@example.test", "recipient")]
    assert rows[2]["emails"] == ["sam@example.test"]
    assert "sam@example.test" in ok(a, "dcm", "list", "--usrprf", "APP")

    # private files, and the key readable only with the store password (checked by OpenSSL)
    root = a.datadir / "certs" / "APP"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for f in root.rglob("*"):
        assert stat.S_IMODE(f.stat().st_mode) == (0o700 if f.is_dir() else 0o600), f
    key = root / "own.key"
    assert key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    openssl("pkey", "-in", key, "-passin", f"pass:{PW}", "-noout")
    assert openssl("pkey", "-in", key, "-passin", "pass:guess", "-noout",
                   check=False).returncode != 0

    ok(a, "dcm", "remove", "--usrprf", "APP", "--label", "jane@example.test")
    assert "is not in" in refused(a, "dcm", "remove", "--usrprf", "APP", "--label",
                                  "jane@example.test")
    ok(a, "dcm", "remove", "--usrprf", "APP", "--label", "app@example.test")
    assert not key.exists()

    # the installed command, as an administrator runs it
    base = [TWISTMAIL, "--config", str(a.config)]
    r = subprocess.run([*base, "dcm", "list", "--usrprf", "APP", "--json"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [row["label"] for row in json.loads(r.stdout)] == ["sam@example.test"]
    r = subprocess.run([*base, "dcm", "remove", "--usrprf", "APP", "--label", "x@example.test"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_damaged_store_file_is_told_in_one_line_and_can_be_removed(make_appliance, certs):
    a = make_appliance()
    for user in ("APP", "SAM"):
        a.user(user)
    make_store(a, certs, **{"sam@example.test": certs.sam_pem})
    root = a.datadir / "certs" / "APP"
    (root / "recipients" / "sam@example.test.pem").write_text("junk")
    rows = json.loads(ok(a, "dcm", "list", "--usrprf", "APP", "--json"))
    assert [(r["label"], r["subject"].startswith("(damaged")) for r in rows] == [
        ("app@example.test", False), ("sam@example.test", True)]
    assert "is damaged; remove it" in refused(
        a, "crtsndemail", "--usrprf", "APP", "--to", "sam@example.test", "--subject", "s",
        "--body", "b", "--security", "2", "--password", PW)
    ok(a, "dcm", "remove", "--usrprf", "APP", "--label", "sam@example.test")
    (root / "own.pem").write_bytes((root / "own.pem").read_bytes()[:40])
    assert "own certificate in the certificate store of APP is damaged" in refused(
        a, "crtsndemail", "--usrprf", "APP", "--to", "app@example.test", "--subject", "s",
        "--body", "b", "--security", "1", "--password", PW)
    ok(a, "dcm", "remove", "--usrprf", "APP", "--label", "app@example.test")
    assert json.loads(ok(a, "dcm", "list", "--usrprf", "APP", "--json")) == []


@pytest.fixture
def post(make_appliance, certs):
    a = make_appliance().start()
    for user in ("APP", "SAM", "JANE", "BOB"):
        a.user(user)
    make_store(a, certs, **{"sam@example.test": certs.sam_cer,
                            "jane@example.test": certs.jane_pem})
    return a


def pop_messages(a, user: str) -> list[bytes]:
    p = poplib.POP3(*a.addr("pop3"), timeout=30)
    p.user(user.lower())
    p.pass_("secret")
    count, _ = p.stat()
    out = [b"\r\n".join(p.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
    p.quit()
    return out


def by_subject(messages: list[bytes]) -> dict[str, bytes]:
    return {str(email.message_from_bytes(m, policy=email.policy.default)["subject"]): m
            for m in messages}


def attachments(entity: bytes) -> dict[str, bytes]:
    msg = email.message_from_bytes(entity, policy=email.policy.default)
    return {part.get_filename(): part.get_content() for part in msg.iter_attachments()}


def text(part) -> str:
    """A text part's content with the wire form's CRLF as newlines."""
    return part.get_content().replace("\r\n", "\n")


def smime(tmp_path: Path, action: str, data: bytes, *args: str | Path) -> bytes:
    """``openssl smime -<action>`` on ``data``; returns what it writes."""
    src, dst = tmp_path / f"{action}.in", tmp_path / f"{action}.out"
    src.write_bytes(data)
    openssl("smime", f"-{action}", "-in", src, "-out", dst, *args)
    return dst.read_bytes()


def test_every_security_level_reaches_a_pop_mailbox(post, certs, tmp_path):
    a = post
    report = tmp_path / "report.bin"
    report.write_bytes(os.urandom(5000) + b"\r\n.\r\nFrom the end\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("plain notes\n")
    settings = load(a.config)
    qids = {}
    for level in range(4):
        rcpts = [("sam@example.test", TO), ("jane@example.test", CC)]
        if level == 0:
            rcpts.append(("bob@example.test", BCC))
        qids[level] = create_send_email(rcpts, f"Report, security {level} (ünïcode)", BODY,
                                        [report, notes], level, usrprf="app",
                                        password=None if level == 0 else PW, settings=settings)
    a.wait_mailbox("SAM", 4)
    a.wait_mailbox("JANE", 4)
    [bob] = a.wait_mailbox("BOB", 1)
    sam = by_subject(pop_messages(a, "SAM"))
    jane = by_subject(pop_messages(a, "JANE"))
    assert len(sam) == 4 and len(jane) == 4
    want = {"report.bin": report.read_bytes(), "notes.txt": "plain notes\n"}

    plain = sam["Report, security 0 (ünïcode)"]
    msg = email.message_from_bytes(plain, policy=email.policy.default)
    assert msg["From"] == "app@example.test" and msg["To"] == "sam@example.test"
    assert msg["Cc"] == "jane@example.test" and msg["Message-ID"] and msg["Date"]
    # Blind copies stay blind.  (Only a header line counts: the random
    # attachment's base64 holds "Bcc" now and then, but never a colon.)
    assert b"bob@" not in plain and not BCC_FIELD.search(plain)
    assert not BCC_FIELD.search(bob.read_bytes())
    assert text(msg.get_body(("plain",))) == BODY
    assert attachments(plain) == want
    assert {p.get_content_type() for p in msg.iter_attachments()} == {
        "application/octet-stream", "text/plain"}

    signed = sam["Report, security 1 (ünïcode)"]
    assert b"multipart/signed" in signed and b"micalg=sha-256" in signed
    content = smime(tmp_path, "verify", signed, "-CAfile", certs.ca_pem)
    assert attachments(content) == want

    encrypted = sam["Report, security 2 (ünïcode)"]
    assert b"smime-type=enveloped-data" in encrypted and b"report.bin" not in encrypted
    for who in ("sam", "app"):  # the recipient, and the sender reading its own copy
        content = smime(tmp_path, "decrypt", encrypted, "-recip", certs.dir / f"{who}.pem",
                        "-inkey", certs.dir / f"{who}.key")
        assert attachments(content) == want
    content = smime(tmp_path, "decrypt", jane["Report, security 2 (ünïcode)"],
                    "-recip", certs.jane_pem, "-inkey", certs.jane_key)
    assert attachments(content) == want

    both = sam["Report, security 3 (ünïcode)"]
    inner = smime(tmp_path, "decrypt", both, "-recip", certs.sam_pem, "-inkey", certs.sam_key)
    assert b"multipart/signed" in inner
    content = smime(tmp_path, "verify", inner, "-CAfile", certs.ca_pem)
    assert attachments(content) == want

    for qid in qids.values():
        codes = [e["code"] for e in a.journal() if e.get("msgid") == qid]
        assert codes[:2] == ["EH", "E1"] and "E2" in codes and "ET" in codes

    out = ok(a, "crtsndemail", "--usrprf", "APP", "--to", "sam@example.test", "--subject",
             "from the shell", "--body", "signed from the CLI", "--security", "1",
             "--password", PW)
    assert out.startswith("queued as ")
    a.wait_mailbox("SAM", 5)
    content = smime(tmp_path, "verify", by_subject(pop_messages(a, "SAM"))["from the shell"],
                    "-CAfile", certs.ca_pem)
    assert b"signed from the CLI" in content


def test_refusals_queue_nothing(make_appliance, certs, tmp_path):
    a = make_appliance()
    for user in ("APP", "SAM"):
        a.user(user)
    make_store(a, certs, **{"sam@example.test": certs.sam_pem})
    settings = load(a.config)

    def refuse(needle: str, *args, **kwargs) -> None:
        kwargs = {"usrprf": "APP", "password": PW, "settings": settings, **kwargs}
        with pytest.raises(SendMailError, match=needle):
            create_send_email(*args, **kwargs)

    to_sam = ["sam@example.test"]
    refuse("wrong password", to_sam, "s", "b", (), 1, password="guess")
    refuse("password of APP is needed", to_sam, "s", "b", (), 3, password=None)
    refuse("no certificate for bob@example.test", [*to_sam, ("bob@example.test", BCC)],
           "s", "b", (), 2)
    refuse("security: 7", to_sam, "s", "b", (), 7)
    refuse("usrprf: 'NOBODY' does not exist", to_sam, "s", "b", usrprf="NOBODY")
    with SqliteDirectory.from_settings(settings) as d:
        d.create_profile("A@B", "pw")  # "@" is in no local part: no SMTP name is given
    refuse("no directory entry with an SMTP name", to_sam, "s", "b", usrprf="A@B")
    refuse("SAM has no certificate store", ["app@example.test"], "s", "b", (), 1,
           usrprf="SAM")
    # SAM's store holding APP's certificate and key: mail from sam@ signed as app@.
    ok(a, "dcm", "create-store", "--usrprf", "SAM", "--password", PW)
    ok(a, "dcm", "import", "--usrprf", "SAM", "--file", str(certs.app_p12), "--password", PW)
    refuse("names app@example.test, not sam@example.test, the sender", ["app@example.test"],
           "s", "b", (), 1, usrprf="SAM")
    # Encrypted, the sender's copy was for APP, whose key then read SAM's mail.
    refuse("names app@example.test, not sam@example.test, the sender: the sender's copy",
           ["app@example.test"], "s", "b", (), 2, usrprf="SAM")
    refuse("attachment: .*missing.bin does not exist", to_sam, "s", "b",
           [tmp_path / "missing.bin"])
    refuse("subject: must be one line", to_sam, "s\r\nBcc: x@example.test", "b")
    refuse("at least one recipient", [], "s", "b")
    r = subprocess.run([TWISTMAIL, "--config", str(a.config), "crtsndemail", "--usrprf", "APP",
                        "--to", "sam@example.test", "--subject", "s", "--body", "b",
                        "--security", "3", "--password", "guess"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "guess" not in r.stderr  # the password is never shown back
    assert r.stderr.startswith("twistmail crtsndemail: --password: wrong password for the "
                               "certificate store of APP")
    assert "exactly one of" in refused(a, "crtsndemail", "--usrprf", "APP", "--to",
                                       "sam@example.test", "--subject", "s")
    assert a.queue_files("QTMSINQ") == []
    assert [e for e in a.journal() if e["code"].startswith("E")] == []

    # the same call with the right password is queued: the refusals were real
    create_send_email(to_sam, "s", "b", (), 3, usrprf="APP", password=PW, settings=settings)
    assert len(a.queue_files("QTMSINQ")) == 1
    assert [e["code"] for e in a.journal()][:2] == ["EH", "E1"]


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.stop()


def test_signed_and_encrypted_mail_reaches_a_remote_host(make_appliance, sink, certs,
                                                         tmp_path):
    a = make_appliance(smtp={"mailrouter": f"127.0.0.1:{sink.port}", "firewall": "*YES"})
    a.start()
    a.user("APP")
    make_store(a, certs, **{"friend@remote.test": certs.friend_pem})
    create_send_email(["friend@remote.test"], "over the wire", BODY, security=3, usrprf="APP",
                      password=PW, settings=load(a.config))
    a.wait_for(lambda: sink.messages, 20, "delivery to the mail router")
    [m] = sink.messages
    assert m.recipients == ["friend@remote.test"]
    inner = smime(tmp_path, "decrypt", m.content, "-recip", certs.friend_pem,
                  "-inkey", certs.friend_key)
    content = smime(tmp_path, "verify", inner, "-CAfile", certs.ca_pem)
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert text(msg) == BODY


def test_a_certificate_that_expired_since_its_import_is_refused_before_sending(tmp_path):
    from twistmail.certstore import CertStore, CertStoreError

    store = CertStore(tmp_path / "store", "APP")
    store.create(PW)
    path = store._recipient_path("old@example.test")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_expired("old@example.test"))  # imported while it was valid
    with pytest.raises(CertStoreError, match="the certificate for old@example.test expired on "):
        store.recipient("old@example.test")


def test_a_certificate_stored_under_another_address_before_labels_were_checked_is_not_used(
        tmp_path, certs):
    from twistmail.certstore import CertStore, CertStoreError

    store = CertStore(tmp_path / "store", "APP")
    store.create(PW)
    path = store._recipient_path("bob@remote.test")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(certs.jane_pem.read_bytes())  # Jane's, under Bob's name
    with pytest.raises(CertStoreError, match="names jane@example.test, not bob@remote.test"):
        store.recipient("bob@remote.test")
