"""CRTSNDEMAIL and DCM: the Create and Send MIME E-mail API and the user certificate store.

``crtsndemail`` is QtmsCreateSendEmail from the shell; ``dcm`` does the
seed's Digital Certificate Manager steps on ``<datadir>/certs/<USRPRF>/``
(see ``twistmail.certstore``).  Neither needs the daemon: a queued message
waits on QTMSINQ until the bridge runs.  A refusal is one line naming the
option, exit 2.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from twistmail.cli.base import api_refusal, app, cli, open_directory, stdin_text, usage_error
from twistmail.cli.output import emit_table
from twistmail.identity import as_invoker

if TYPE_CHECKING:
    from twistmail.certstore import CertStore

PKCS12_SUFFIXES = (".p12", ".pfx")
LIST_COLUMNS = (
    ("label", "Label"),
    ("kind", "Kind"),
    ("subject", "Subject"),
    ("not_after", "Expires (UTC)"),
    ("sha256", "SHA-256 fingerprint"),
)


def _secret(raw: str | None) -> str | None:
    """``-`` reads the password from standard input, keeping it out of ``ps``."""
    if raw != "-":
        return raw
    return stdin_text("--password")


@cli.command("crtsndemail")
@click.option("--usrprf", required=True, help="The sending user profile (its SMTP name is From).")
@click.option("--to", "to", multiple=True, help="Recipient (repeatable).")
@click.option("--cc", "cc", multiple=True, help="Copy recipient (repeatable).")
@click.option("--bcc", "bcc", multiple=True, help="Blind copy recipient (repeatable).")
@click.option("--subject", required=True, help="The subject line.")
@click.option("--body", help="The text of the note.")
@click.option("--body-file", "body_file", help="A UTF-8 file holding the text of the note.")
@click.option("--attach", "attach", multiple=True, help="A file to attach (repeatable).")
@click.option("--security", default="0", show_default=True,
              help="0 none, 1 signed, 2 encrypted, 3 signed and encrypted (S/MIME).")
@click.option("--password", help="The certificate store password (security 1-3); - reads stdin.")
def crtsndemail(usrprf: str, to: tuple[str, ...], cc: tuple[str, ...], bcc: tuple[str, ...],
                subject: str, body: str | None, body_file: str | None,
                attach: tuple[str, ...], security: str, password: str | None) -> None:
    """Build a MIME note with attachments, optionally S/MIME, and send it (QtmsCreateSendEmail)."""
    from twistmail.api import BCC, CC, TO, SendMailError, create_send_email

    if (body is None) == (body_file is None):
        usage_error("give exactly one of --body TEXT, --body-file FILE")
    if body_file is not None:
        body = _read_text("--body-file", body_file)
        if "\0" in body:  # refused as the text of a note; named as the file it came from
            usage_error(f"--body-file: {body_file} holds a NUL; allowed: a file of UTF-8 text "
                        "without NUL")
    recipients = [(a, TO) for a in to] + [(a, CC) for a in cc] + [(a, BCC) for a in bcc]
    try:
        qid = create_send_email(recipients, subject, body or "", attach, security,
                                usrprf=usrprf, password=_secret(password),
                                settings=app().settings)
    except SendMailError as e:
        api_refusal(e)
    click.echo(f"queued as {qid}")


def _read_text(option: str, path: str) -> str:
    try:
        with as_invoker():  # the caller's file (see twistmail.identity)
            # O_NONBLOCK: a named pipe with no writer would hold the open itself.
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    usage_error(f"{option}: {path} is not a regular file; allowed: a file of "
                                "UTF-8 text")  # /dev/zero, a pipe: read for ever
                return f.read().decode("utf-8")
    except FileNotFoundError:
        usage_error(f"{option}: {path} does not exist")
    except UnicodeDecodeError:
        usage_error(f"{option}: {path} is not UTF-8 text")
    except OSError as e:
        usage_error(f"{option}: {path} cannot be read ({e.strerror})")


# -- the certificate store -----------------------------------------------------


@cli.group("dcm")
def dcm() -> None:
    """The user certificate store (the Digital Certificate Manager's user store)."""


def _store(usrprf: str) -> CertStore:
    from twistmail.certstore import CertStore, CertStoreError

    try:
        return CertStore.for_user(app().settings, usrprf)
    except CertStoreError as e:
        _refuse(e)


def _refuse(e: Exception) -> NoReturn:
    field, problem = getattr(e, "field", None), getattr(e, "problem", str(e))
    usage_error(f"--{field}: {problem}" if field else str(e))


@dcm.command("create-store")
@click.option("--usrprf", required=True, help="The user profile the store belongs to.")
@click.option("--password", required=True, help="The store password; - reads stdin.")
def create_store(usrprf: str, password: str) -> None:
    """Create the user's empty certificate store, protected by a password."""
    from twistmail.certstore import CertStoreError
    from twistmail.directory import DirectoryError

    store = _store(usrprf)
    with open_directory("the directory") as d:
        if d.get_profile(store.usrprf) is None:
            raise DirectoryError("usrprf", store.usrprf, "does not exist; create it with "
                                 "crtusrprf first")
    try:
        store.create(_secret(password) or "")
    except CertStoreError as e:
        _refuse(e)
    click.echo(f"Certificate store of {store.usrprf} created in {store.root}.")


@dcm.command("import")
@click.option("--usrprf", required=True, help="The user profile whose store receives it.")
@click.option("--file", "path", required=True,
              help="A PKCS#12 file (.p12, .pfx: own certificate and key) or a recipient's "
              "certificate (DER .cer or PEM).")
@click.option("--password", help="The store password (for a PKCS#12 file); - reads stdin.")
@click.option("--file-password", "file_password",
              help="The PKCS#12 file's password when it is not the store password.")
@click.option("--label", help="The e-mail address, lower case (required for a recipient).")
def import_(usrprf: str, path: str, password: str | None, file_password: str | None,
            label: str | None) -> None:
    """Import the own certificate and key, or a recipient's certificate."""
    from twistmail.certstore import CertStoreError, parse_certificate, read_file

    store = _store(usrprf)
    try:
        with as_invoker():
            data = read_file(path)
        own = Path(path).suffix.lower() in PKCS12_SUFFIXES
        if not own:
            try:
                parse_certificate(data)
            except CertStoreError:
                if password is None:
                    raise
                own = True
        if own:
            if password is None:
                usage_error("--password: required for a PKCS#12 file; allowed: the password "
                            f"of {store.usrprf}'s certificate store")
            entry = store.import_pkcs12(data, _secret(password) or "",
                                        file_password=file_password, label=label)
        else:
            if label is None:
                usage_error("--label: required for a recipient's certificate; allowed: the "
                            "recipient's e-mail address")
            entry = store.import_certificate(data, label)
    except CertStoreError as e:
        _refuse(e)
    what = "own certificate and key" if entry.kind == "own" else "recipient certificate"
    click.echo(f"Imported {what} {entry.label} into the certificate store of {store.usrprf}.")


@dcm.command("list")
@click.option("--usrprf", required=True, help="The user profile whose store is listed.")
@click.option("--json", "as_json", is_flag=True, help="JSON array of entries.")
def list_(usrprf: str, as_json: bool) -> None:
    """List the own certificate and the recipients' certificates."""
    from twistmail.certstore import CertStoreError

    store = _store(usrprf)
    try:
        rows = [e.row() for e in store.entries()]
    except CertStoreError as e:
        _refuse(e)
    emit_table(rows, LIST_COLUMNS, as_json, empty="(no certificates)")


@dcm.command("remove")
@click.option("--usrprf", required=True, help="The user profile whose store holds it.")
@click.option("--label", required=True, help="The label (e-mail address) to remove.")
def remove(usrprf: str, label: str) -> None:
    """Remove a certificate (the own one with its key)."""
    from twistmail.certstore import CertStoreError

    store = _store(usrprf)
    try:
        entry = store.remove(label)
    except CertStoreError as e:
        _refuse(e)
    click.echo(f"Removed {entry.kind} certificate {entry.label} from the certificate store of "
               f"{store.usrprf}.")
