"""The command-line clients some tests talk to the appliance with.

`make test` on a machine without one of them skips those tests and names the
Debian package; `.ci/run` installs every one first, so CI runs them all.
"""

from __future__ import annotations

import shutil

import pytest


def needs(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"{', '.join(missing)} not installed (apt-get install {' '.join(missing)})")
