"""SNDMAIL: the Send MIME Mail API (QtmmSendMail) from the shell."""

from __future__ import annotations

import click

from twistmail.cli.base import api_refusal, app, cli


@cli.command()
@click.option("--file", "path", required=True, help="Absolute path of the MIME message file.")
@click.option("--from", "originator", required=True, help="Originator SMTP address.")
@click.option("--to", "to", multiple=True, help="Recipient (repeatable).")
@click.option("--cc", "cc", multiple=True, help="Copy recipient (repeatable).")
@click.option("--bcc", "bcc", multiple=True, help="Blind copy recipient (repeatable).")
@click.option("--usrprf", help="The calling user profile (needed when VFYMSFMSG is *YES).")
def sndmail(path: str, originator: str, to: tuple[str, ...], cc: tuple[str, ...],
            bcc: tuple[str, ...], usrprf: str | None) -> None:
    """Send a complete MIME message file (QtmmSendMail); the file is deleted once taken."""
    from twistmail.api import BCC, CC, TO, SendMailError, send_mime_mail

    recipients = [(a, TO) for a in to] + [(a, CC) for a in cc] + [(a, BCC) for a in bcc]
    try:
        qid = send_mime_mail(path, originator, recipients, settings=app().settings,
                             usrprf=usrprf)
    except SendMailError as e:
        api_refusal(e)
    click.echo(f"queued as {qid}")
