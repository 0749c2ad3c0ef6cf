"""What may be in a state directory, so that a wrong ``datadir`` is refused.

The daemon makes the state directory its own: started as root with
``--uid``, it gives what is in it to the daemon's user and makes ``run/``
private.  A relative ``datadir`` read from a copy of the shipped settings
(``../var`` beside ``/etc/twistmail.toml``) names ``/var``: the start would
hand the system's files to the mail user.  So a directory holding anything
twistmail does not make there is refused before anything in it is touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from twistmail.controller.datadirlock import LOCK_FILE
from twistmail.directory import FILENAME as DIRECTORY_FILE

#: The names twistmail makes at the top of its state directory.
OURS = frozenset({
    "run", "journal", "queue", "mailboxes", "snads", "tls", "certs", LOCK_FILE,
    DIRECTORY_FILE, f"{DIRECTORY_FILE}-wal", f"{DIRECTORY_FILE}-shm",
    f"{DIRECTORY_FILE}-journal",
})


def foreign_entries(datadir: Path) -> list[str]:
    """The names in ``datadir`` that are not twistmail's, sorted; none when it
    cannot be listed.  A file system's lost+found (a state directory of its
    own mount) is left alone; hidden names are not: a home directory holds
    nothing else, and its .ssh would be given to the daemon's user."""
    try:
        names = os.listdir(datadir)
    except OSError:  # none yet; or not a directory, unreadable: the start says so next
        return []
    return sorted(n for n in names if n not in OURS and n != "lost+found")


def refusal(datadir: Path) -> str | None:
    """Why ``datadir`` cannot be the state directory, or None."""
    foreign = foreign_entries(datadir)
    if not foreign:
        return None
    shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    return (f"the state directory {datadir} holds files twistmail did not make ({shown}); "
            "the daemon makes it its own, so [system] datadir must name a directory of "
            "twistmail's alone (e.g. /var/lib/twistmail): set it, or move those files")
