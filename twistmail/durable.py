"""Making a change to a directory survive a crash.

A new file's data is durable after its own fsync, but the directory entry
that names it (a create, a rename, a link, an unlink) is durable only once the
directory is fsynced as well.  Every store that promises "nothing
acknowledged is lost" (queues, mailboxes, the distribution store, the
settings file) does this the same way.
"""

from __future__ import annotations

import os
from pathlib import Path


def unlink(path: Path | str) -> bool:
    """Remove a file; False when it was already gone (another holder removed it)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def fsync_dir(path: Path | str) -> None:
    """Make the renames, links and unlinks done in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
