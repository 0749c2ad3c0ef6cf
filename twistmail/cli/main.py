"""Entry point of the ``twistmail`` command: imports every command module."""

from twistmail.cli import (
    attrcmds,  # noqa: F401
    base,
    clcmd,  # noqa: F401
    configcmd,  # noqa: F401
    journalcmds,  # noqa: F401
    listcmds,  # noqa: F401
    mailcmds,  # noqa: F401
    poolcmds,  # noqa: F401
    queuecmds,  # noqa: F401
    smimecmds,  # noqa: F401
    snadscmds,  # noqa: F401
    usercmds,  # noqa: F401
)
from twistmail.cli.base import check_text, cli, main  # noqa: F401

check_text(cli)

__all__ = ["base", "cli", "main"]
