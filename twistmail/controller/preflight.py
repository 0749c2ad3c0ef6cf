"""Whether the daemon's user can start the processes the appliance is made of."""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path

import twistmail


def unrunnable() -> str | None:
    """Why this user cannot start the jobs and the bridge, or None.

    They are new processes of this Python running twistmail's modules: a
    daemon whose user may not (a virtualenv under /root, after --uid) came
    up, answered every client 421 and restarted its bridge for ever.
    """
    package = Path(twistmail.__file__).parent
    for path, mode, what in ((Path(sys.executable), os.X_OK, "run"),
                             (package, os.R_OK | os.X_OK, "read")):
        if not os.access(path, mode):
            try:
                user = pwd.getpwuid(os.getuid()).pw_name
            except KeyError:
                user = str(os.getuid())
            return (f"this daemon's user ({user}) may not {what} {path}, which every job "
                    "and the bridge need: install twistmail where that user can")
    return None
