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
from typing import TYPE_CHECKING

from twistmail.controller.datadirlock import LOCK_FILE
from twistmail.directory import FILENAME as DIRECTORY_FILE

if TYPE_CHECKING:
    from twistmail.config import Settings

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


def left_beside_link(settings: Settings) -> str | None:
    """Why the state directory is refused when the state was found only where
    a relative datadir once led: beside the symbolic link to the settings
    file, not beside the file itself (earlier versions read it so).

    The daemon started on an empty one would show no profiles and no mail
    and leave the queued mail where it lies; a command (wrkusrprf) would say
    there are none, and one that makes the directory database there would
    take the refusal away.
    """
    link = Path(os.path.abspath(settings.path))
    datadir = Path(os.path.expanduser(settings.system.datadir))
    if datadir.is_absolute() or not link.is_symlink():
        return None
    old = (link.parent / datadir).resolve()
    if old == settings.datadir or not (old / DIRECTORY_FILE).exists():
        return None
    if (settings.datadir / DIRECTORY_FILE).exists():
        return None
    return (f"the state directory is {settings.datadir}, read from where the settings file "
            f"really is, but the state is in {old}, beside the link to it, where earlier "
            "versions read it: move it there, or give datadir as an absolute path")
