"""Root's commands act on the state directory as the daemon's user.

The daemon started as root runs as the ``--uid`` user, who owns the state
directory.  A file an administrator's ``sudo twistmail …`` made there as
root (a queued message, a journal receiver, the directory database) was one
the daemon could not read: mail set aside as corrupt, a journal silently
stopped.  So a command run as root takes, for its effective identity, the
owner of the state directory, as Postfix's postsuper takes mail_owner's.
What it reads or writes for its caller (the settings file under /etc, a
message file, an attachment, an output file) it does as root again, within
:func:`as_invoker`.

Only the effective ids change: the saved ones stay root, so the switch back
is possible.  A state directory that root owns, or that does not exist yet
(a profile made before the first start), is left to root; the daemon's
first start as root gives it to its user (``controller.service``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def act_as_owner(datadir: Path) -> None:
    """As root, become (effectively) the owner of ``datadir`` when that is not root."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(datadir)
    except OSError:
        return
    if st.st_uid == 0:
        return
    os.setgroups([st.st_gid])
    os.setegid(st.st_gid)
    os.seteuid(st.st_uid)


@contextlib.contextmanager
def as_invoker() -> Iterator[None]:
    """Root again, for the caller's own files; a no-op unless :func:`act_as_owner` switched."""
    real, effective, _saved = os.getresuid()
    if real != 0 or effective == 0:
        yield
        return
    gid = os.getegid()
    os.seteuid(0)
    os.setegid(0)
    os.setgroups([0])
    try:
        yield
    finally:
        os.setgroups([gid])
        os.setegid(gid)
        os.seteuid(effective)
