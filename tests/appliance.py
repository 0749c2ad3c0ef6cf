"""A real twistmail daemon for tests: ``twistd -n twistmail`` in a temp dir.

Tests talk to it over real sockets with real clients and drive it with the
real CLI.  Everything listens on 127.0.0.1 with kernel-chosen ports.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twistmail.cli import main as climain
from twistmail.control import ControlClient

TWISTD = str(Path(sys.executable).with_name("twistd"))


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def render_toml(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        out.append("")
    return "\n".join(out)


def base_sections(datadir: Path) -> dict[str, dict[str, Any]]:
    return {
        "system": {"datadir": str(datadir), "hostname": "mail.example.test",
                   "local_domains": ["example.test"]},
        "listen": {"smtp": "127.0.0.1:0", "submission": "127.0.0.1:0", "smtps": "127.0.0.1:0",
                   "pop3": "127.0.0.1:0", "pop3s": "127.0.0.1:0"},
        "prestart": {"trim_interval": 30, "wait_limit": 30, "end_delay": 3},
        "storage": {"threshold": 99},
        "prestart.QTMSSRCP": {"inljobs": 2, "threshold": 1, "adljobs": 2, "maxjobs": 8},
        "prestart.QTPOPSRVP": {"threshold": 1, "adljobs": 1, "maxjobs": 4},
        "prestart.QTMSCCLCP": {"inljobs": 1, "threshold": 1, "adljobs": 1, "maxjobs": 4},
        "pop": {"nbrsvr": 1},
    }


class Appliance:
    def __init__(self, root: Path, **overrides: dict[str, Any]) -> None:
        self.root = root
        self.datadir = root / "var"
        self.config = root / "twistmail.toml"
        sections = base_sections(self.datadir)
        for name, values in overrides.items():
            name = name.replace("__", ".")
            sections.setdefault(name, {}).update(values)
        self.sections = sections
        self.config.write_text(render_toml(sections))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "twistd.log"
        self.listeners: dict[str, str] = {}

    # -- life ---------------------------------------------------------

    def start(self, wait_jobs: bool = True, twistd_args: tuple[str, ...] = ()) -> Appliance:
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *twistd_args, "twistmail", "--config", str(self.config)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, cwd=self.root,
        )
        self.wait_for(self.running, 20, "control socket")
        self.listeners = self.control("status")["listeners"]
        if wait_jobs:
            self.wait_for(self.pools_ready, 20, "initial jobs ready")
        return self

    def running(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
        return ControlClient(self.control_socket).running()

    @property
    def control_socket(self) -> Path:
        return self.datadir / "run" / "control.sock"

    def pools_ready(self) -> bool:
        for pgm in ("QTMSSRCP", "QTPOPSRVP"):
            st = self.control("dspactpj", pgm=pgm)
            if st["status"] == "ACTIVE" and self.count(pgm, "PSRW") < self.inljobs(pgm):
                return False
        return True

    def inljobs(self, pgm: str) -> int:
        if pgm == "QTPOPSRVP":
            return self.sections["pop"]["nbrsvr"]
        return self.sections[f"prestart.{pgm}"]["inljobs"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        children = self.children()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if sig == signal.SIGTERM:
            wait_gone(children, 10)
        return rc

    def kill_all(self) -> None:
        """Tear down even after a failed test: nothing may outlive it."""
        children = self.children() if self.proc and self.proc.poll() is None else []
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def children(self) -> list[int]:
        """Every process below the daemon: the bridge, the launcher and the jobs."""
        assert self.proc is not None
        return descendants_of(self.proc.pid)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # -- talking to it ------------------------------------------------

    def control(self, cmd: str, **args: Any) -> Any:
        return ControlClient(self.control_socket).call(cmd, **args)

    def cli(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = climain.base.run(["--config", str(self.config), *args])
        return rc, out.getvalue(), err.getvalue()

    def addr(self, name: str) -> tuple[str, int]:
        host, port = self.listeners[name].rsplit(":", 1)
        return host.strip("[]"), int(port)

    def connect(self, name: str = "smtp", timeout: float = 10) -> socket.socket:
        s = socket.create_connection(self.addr(name), timeout=timeout)
        return s

    def jobs(self, pgm: str | None = None) -> list[dict[str, Any]]:
        rows = self.control("wrkactjob")
        return [r for r in rows if r["pgm"] and (pgm is None or r["pgm"] == pgm)]

    def count(self, pgm: str, status: str | None = None) -> int:
        return sum(1 for r in self.jobs(pgm) if status is None or r["status"] == status)

    def journal(self, code: str | None = None) -> list[dict[str, Any]]:
        out = []
        for f in sorted((self.datadir / "journal").glob("QZMF.*.jsonl")):
            for line in f.read_text().splitlines():
                if line.strip():
                    e = json.loads(line)
                    if code is None or e["code"] == code:
                        out.append(e)
        return out

    def mailbox(self, user: str) -> list[Path]:
        """The message files of a user's Maildir (new and cur), sorted by name."""
        root = self.datadir / "mailboxes" / user.upper() / "Maildir"
        return sorted(p for d in ("new", "cur") for p in (root / d).glob("*") if p.is_file())

    def wait_mailbox(self, user: str, count: int, timeout: float = 30) -> list[Path]:
        self.wait_for(lambda: len(self.mailbox(user)) >= count, timeout,
                      f"{count} messages for {user}")
        return self.mailbox(user)

    def queue_files(self, queue: str) -> list[Path]:
        directory = self.datadir / "queue" / queue
        return sorted(p for p in directory.glob("*") if p.suffix in (".json", ".msg"))

    def user(self, name: str, password: str = "secret") -> None:
        rc, out, err = self.cli("crtusrprf", "--usrprf", name, "--password", password)
        assert rc == 0, err

    def wait_for(self, pred: Callable[[], Any], timeout: float = 10, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or pred}\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(d.name))
    return out


def descendants_of(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


def read_reply(sock: socket.socket, timeout: float = 10) -> bytes:
    """Read one CRLF-terminated line."""
    sock.settimeout(timeout)
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def break_maildir(datadir: Path, user: str) -> Callable[[], None]:
    """A user's Maildir that cannot take mail (its tmp/ and new/ are files: a
    queued file is linked into new/ without tmp/); the repair to call later."""
    from twistmail.maildir import MaildirStore

    maildir = MaildirStore(datadir / "mailboxes", "mail.example.test").ensure(user)
    broken = [maildir / "tmp", maildir / "new"]
    for path in broken:
        path.rmdir()
        path.write_text("not a directory")

    def repair() -> None:
        for path in broken:
            path.unlink()
            path.mkdir()

    return repair
