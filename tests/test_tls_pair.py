"""The appliance's own certificate: a CA's full chain, and pairs that cannot serve.

Real daemons and real TLS clients: a client that verifies must reach the
root it trusts through the intermediates the server sends; a key that is
not the certificate's, or is encrypted, stops start-up (and a reload) with
one line instead of killing every job that loads it.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from appliance import TWISTD
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from twistmail import config as configmod
from twistmail.control import ControlError

HOST = "mail.example.test"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool, san: str | None = None):
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key, password: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def make_chain(where: Path, tag: str = "") -> tuple[Path, Path, Path]:
    """root -> intermediate -> server; returns (root.pem, fullchain.pem, server.key)."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    root = _cert(f"Test Root{tag}", keys[0], f"Test Root{tag}", keys[0], ca=True)
    inter = _cert(f"Test Intermediate{tag}", keys[1], f"Test Root{tag}", keys[0], ca=True)
    leaf = _cert(HOST, keys[2], f"Test Intermediate{tag}", keys[1], ca=False, san=HOST)
    (where / "root.pem").write_bytes(_pem(root))
    (where / "fullchain.pem").write_bytes(_pem(leaf) + _pem(inter))
    (where / "server.key").write_bytes(_key_pem(keys[2]))
    return where / "root.pem", where / "fullchain.pem", where / "server.key"


def _verifying(root: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(root))
    ctx.check_hostname = True
    return ctx


def _server_cert(a, root: Path | None = None) -> bytes:
    """The DER certificate the smtps listener shows, verified against ``root`` if given."""
    if root is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = _verifying(root)
    with socket.create_connection(a.addr("smtps"), timeout=30) as sock, \
            ctx.wrap_socket(sock, server_hostname=HOST) as tls:
        assert tls.recv(100).startswith(b"220 ")
        return tls.getpeercert(binary_form=True)


def test_the_intermediates_in_the_certificate_file_are_sent(make_appliance, tmp_path):
    """A client that verifies reaches its root through the intermediate sent."""
    root, chain, key = make_chain(tmp_path)
    a = make_appliance(tls={"certificate": str(chain), "key": str(key)}).start()
    _server_cert(a, root)


def _twistd(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("problem", ["another key", "encrypted"])
def test_a_key_that_cannot_serve_stops_startup_with_one_line(make_appliance, tmp_path, problem):
    root, chain, key = make_chain(tmp_path)
    if problem == "another key":
        key.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
        told = "it is not the key of the certificate in"
    else:
        key.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1()), b"secret"))
        told = "its private key is encrypted"
    a = make_appliance(tls={"certificate": str(chain), "key": str(key)})
    r = _twistd(a.config)
    out = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stdout + r.stderr
    assert len(out) == 1 and out[0].startswith(f"twistmail: tls.key: '{key}' is not allowed")
    assert told in out[0]


def test_a_renewed_pair_reaches_every_job_at_reload_and_a_bad_one_is_refused(
        make_appliance, tmp_path):
    first, second = tmp_path / "1", tmp_path / "2"
    first.mkdir()
    second.mkdir()
    root1, chain, key = make_chain(first)
    a = make_appliance(tls={"certificate": str(chain), "key": str(key)}).start()
    before = _server_cert(a, root1)

    # Half a renewal: the new certificate, the old key.  Refused, nothing applied.
    root2, chain2, key2 = make_chain(second, tag=" 2")
    chain.write_bytes(chain2.read_bytes())
    with pytest.raises(ControlError, match="configuration not applied: tls.key"):
        a.control("reload")
    rc, out, err = a.cli("config", "--apply")  # a setting's mistake, as at the start
    assert rc == 2 and "tls.key" in err and len(err.strip().splitlines()) == 1, (rc, out, err)
    # A change of another section still applies meanwhile (and leaves TLS alone).
    rc, out, err = a.cli("chgpje", "--pgm", "QTMSSRCP", "--maxuse", "150")
    assert rc == 0 and "applied to the running daemon" in out, err
    assert b"\"maxuse\": 150" in (a.datadir / "run" / "settings.json").read_bytes()
    # Jobs started meanwhile (here all of them, by ENDPJ and STRPJ) still
    # serve the pair the daemon accepted, not the files as they are.
    assert a.cli("endpj", "--pgm", "QTMSSRCP", "--option", "*IMMED")[0] == 0
    a.wait_for(lambda: a.count("QTMSSRCP") == 0, 10, "the SMTP jobs to end")
    assert a.cli("strpj", "--pgm", "QTMSSRCP")[0] == 0
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == a.inljobs("QTMSSRCP"), 10, "new jobs")
    assert _server_cert(a, root1) == before
    key.write_bytes(key2.read_bytes())
    rc, out, _ = a.cli("config", "--apply")
    assert rc == 0 and out.startswith("configuration applied to the running daemon: ")
    assert "tls" in out and "restart" not in out
    a.wait_for(lambda: _server_cert(a) != before, 20, "the renewed certificate served")
    assert hashlib.sha256(_server_cert(a, root2)).digest() != hashlib.sha256(before).digest()


def test_a_key_file_that_holds_the_certificates_too_still_serves(make_appliance, tmp_path):
    """A combined file (key, then the full chain) as tls.key beside the chain file."""
    root, chain, key = make_chain(tmp_path)
    combined = tmp_path / "combined.pem"
    combined.write_bytes(key.read_bytes() + chain.read_bytes())
    a = make_appliance(tls={"certificate": str(chain), "key": str(combined)}).start()
    _server_cert(a, root)


def test_an_expired_certificate_serves_with_a_warning(make_appliance, tmp_path):
    """Clients that verify refuse it, the others still get TLS: a warning, not a stop."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    old = (x509.CertificateBuilder().subject_name(_name(HOST)).issuer_name(_name(HOST))
           .public_key(key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(days=60))
           .not_valid_after(now - datetime.timedelta(days=30))
           .sign(key, hashes.SHA256()))
    cert, key_file = tmp_path / "old.pem", tmp_path / "old.key"
    cert.write_bytes(_pem(old))
    key_file.write_bytes(_key_pem(key))
    a = make_appliance(tls={"certificate": str(cert), "key": str(key_file)}).start()
    assert _server_cert(a)
    assert f"TLS: the certificate in {cert} expired on " in a.log_text()
    cert.write_bytes(_pem(old))  # renewed in place, by the same expired one
    rc, out, err = a.cli("config", "--apply")
    assert rc == 0 and "tls" in out
    assert err.startswith(f"warning: tls: the certificate in {cert} expired on ")


def test_a_key_without_its_certificate_is_refused(tmp_path):
    cfg = tmp_path / "t.toml"
    (tmp_path / "k.pem").write_text("x")
    cfg.write_text('[system]\nlocal_domains = ["example.test"]\n[tls]\nkey = "k.pem"\n')
    with pytest.raises(configmod.SettingError, match="tls.key: 'k.pem' is not allowed"):
        configmod.load(cfg)


def _settings_for(tmp_path: Path, cert: Path, key: Path) -> configmod.Settings:
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[system]\nlocal_domains = ["example.test"]\ndatadir = "{tmp_path}/var"\n'
                   f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n')
    return configmod.load(cfg)


@pytest.mark.parametrize("form", ["as made", "X509 label", "indented", "CRLF, key first"])
def test_what_the_start_accepts_every_job_loads_too(tmp_path, form):
    """Jobs read the pair with pyOpenSSL alone; a form only the check read
    started a daemon whose jobs all died."""
    from twistmail import tlsconfig

    _, chain, key = make_chain(tmp_path)
    pem = chain.read_bytes()
    if form == "X509 label":
        pem = pem.replace(b"BEGIN CERTIFICATE", b"BEGIN X509 CERTIFICATE").replace(
            b"END CERTIFICATE", b"END X509 CERTIFICATE")
    elif form == "indented":
        pem = b"".join(b"    " + line for line in pem.splitlines(keepends=True))
    elif form == "CRLF, key first":
        pem = (key.read_bytes() + pem).replace(b"\n", b"\r\n")
        key = chain
    chain.write_bytes(pem)
    settings = _settings_for(tmp_path, chain, key)
    try:
        checked = tlsconfig.server_options(settings, check=True)
    except configmod.SettingError:
        return  # refused at start: no job would be started with it
    job = tlsconfig.server_options(settings)
    assert len(job.extraCertChain) == len(checked.extraCertChain) == 1


def test_jobs_load_the_pair_at_the_first_tls_session_and_serve_without_it(make_appliance):
    """A job loads the pair when a client first asks for TLS, not when it starts
    (every start paid for it, and most sessions never use it).  Jobs started
    while the pair cannot be read serve mail in the clear and refuse STARTTLS
    with 454; before, each of them died at start, until the entry stopped."""
    import poplib
    import smtplib

    a = make_appliance().start()
    for path in (a.datadir / "run" / "tls.pem", a.datadir / "tls" / "cert.pem",
                 a.datadir / "tls" / "key.pem"):
        path.unlink()
    for pgm in ("QTMSSRCP", "QTPOPSRVP"):
        assert a.cli("endpj", "--pgm", pgm, "--option", "*IMMED")[0] == 0
        a.wait_for(lambda pgm=pgm: a.count(pgm) == 0, 10, f"the {pgm} jobs to end")
        assert a.cli("strpj", "--pgm", pgm)[0] == 0
        a.wait_for(lambda pgm=pgm: a.count(pgm, "PSRW") == a.inljobs(pgm), 10, "new jobs")
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo("client.example.test")
        assert s.docmd("STARTTLS") == (454, b"4.7.0 TLS not available")
        assert s.noop()[0] == 250  # the session goes on in the clear
    pop = poplib.POP3(*a.addr("pop3"), timeout=30)
    with pytest.raises(poplib.error_proto, match=r"TLS is not available"):
        pop._shortcmd("STLS")
    assert pop.quit().startswith(b"+OK")
    for name, pgm in (("smtps", "QTMSSRCP"), ("pop3s", "QTPOPSRVP")):
        # Closed at once, and no traceback in the log.
        with socket.create_connection(a.addr(name), timeout=30) as s:
            s.sendall(b"\x16\x03\x01\x00\x05hello")
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:  # closed with the hello unread
                pass
        # Every job idle again (the pool may have grown by ADLJOBS meanwhile).
        a.wait_for(lambda pgm=pgm: a.count(pgm) == a.count(pgm, "PSRW"), 10, "jobs free")
    log = a.log_text()
    assert "TLS not available" in log and "Unhandled Error" not in log and "Traceback" not in log


def test_a_pair_that_failed_to_load_is_tried_again_later(tmp_path, monkeypatch):
    """A failed load was kept for the job's life: mending the file changed
    nothing until MAXUSE replaced the job."""
    from twistmail import tlsconfig

    _, chain, key = make_chain(tmp_path)
    settings = _settings_for(tmp_path, chain, key)
    good = key.read_bytes()
    key.write_bytes(b"broken")
    options = tlsconfig.JobOptions(settings)
    clock = [1000.0]
    monkeypatch.setattr(tlsconfig.time, "monotonic", lambda: clock[0])
    assert not options.available()
    key.write_bytes(good)
    assert not options.available()  # not read again at once
    clock[0] += tlsconfig.JobOptions.RETRY_AFTER
    assert options.available() and options.getContext() is not None


def test_the_self_signed_pair_follows_a_new_host_name(tmp_path):
    """Made for the host name of the first start, it was kept after [system]
    hostname changed: clients that check the name refused TLS for ten years."""
    from twistmail import tlsconfig

    def settings(hostname: str) -> configmod.Settings:
        config = tmp_path / "twistmail.toml"
        config.write_text(f'[system]\ndatadir = "var"\nhostname = "{hostname}"\n')
        return configmod.load(config)

    def names(cert: Path) -> list[str]:
        c = x509.load_pem_x509_certificate(cert.read_bytes())
        return c.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)

    cert, key = tlsconfig.ensure_pair(settings(HOST))
    assert names(cert)[0] == HOST
    first = cert.read_bytes()
    assert tlsconfig.ensure_pair(settings(HOST.upper()))[0].read_bytes() == first  # kept
    tlsconfig.ensure_pair(settings("mx.example.test"))
    assert names(cert)[0] == "mx.example.test"
    tlsconfig.check_pair(settings("mx.example.test"))  # key and certificate made together
    # One a CA issued, or a self-signed one of the administrator's, put there
    # by hand, is left alone.
    _, chain, server_key = make_chain(tmp_path)
    own_key = ec.generate_private_key(ec.SECP256R1())
    own = _pem(_cert("*.example.test", own_key, "*.example.test", own_key, ca=False,
                     san="*.example.test"))
    for pem, key_pem in ((chain.read_bytes(), server_key.read_bytes()),
                         (own, _key_pem(own_key))):
        cert.write_bytes(pem)
        key.write_bytes(key_pem)
        tlsconfig.ensure_pair(settings("other.example.test"))
        assert cert.read_bytes() == pem
