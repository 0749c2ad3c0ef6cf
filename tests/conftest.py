"""Shared fixtures: a running appliance per test, torn down without leftovers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from appliance import Appliance  # noqa: E402


@pytest.fixture
def make_appliance(tmp_path: Path) -> Iterator[Callable[..., Appliance]]:
    """Build (not start) appliances with config overrides, stopped at teardown."""
    made: list[Appliance] = []

    def make(**overrides: dict) -> Appliance:
        root = tmp_path / f"a{len(made)}"
        root.mkdir()
        a = Appliance(root, **overrides)
        made.append(a)
        return a

    yield make
    for a in made:
        a.kill_all()


@pytest.fixture
def appliance(make_appliance: Callable[..., Appliance]) -> Appliance:
    return make_appliance().start()


@pytest.fixture
def dns(tmp_path):
    """A loopback DNS server; yields a function that starts it with a zone."""
    procs = []

    def start(zone: dict) -> int:
        f = tmp_path / f"zone{len(procs)}.json"
        f.write_text(json.dumps(zone))
        p = subprocess.Popen([sys.executable, str(HERE / "dnsserver.py"), str(f)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(p)
        return int(p.stdout.readline())

    yield start
    for p in procs:
        p.stdin.close()
        p.wait(10)


@pytest.fixture
def full_disk(tmp_path: Path):
    """A small file system of its own (tmpfs), to fill up for real."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,nr_inodes=4096", "tmpfs",
                           str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    n = 0
    while True:  # the last blocks, and the inodes, one small file at a time
        try:
            (directory / f"filler{n}").write_bytes(b"x" * 512)
        except OSError:
            break
        n += 1
