"""The job launcher's protocol, spoken to a real launcher process over its socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from appliance import alive

from twistmail import config as configmod
from twistmail import tlsconfig


def launcher(tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-m", "twistmail.prestart.forkserver", "QTMSSRCP"],
                            pass_fds=(3,), stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: os.dup2(theirs.fileno(), 3))
    theirs.close()
    ours.settimeout(30)
    return proc, ours


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "the launcher closed its socket"
        data += chunk
    return data.rstrip(b"\n")


def test_requests_are_answered_in_order_and_ends_reported(tmp_path):
    proc, sock = launcher(tmp_path)
    try:
        # A request without its descriptor fails on its own; the launcher goes on.
        sock.sendall(b"SPAWN QTMSSRCP /nonexistent.toml\n")
        assert read_line(sock).startswith(b"FAIL bad request")
        # A job whose settings cannot be read dies at once: PID, then EXIT.
        job_end, kept = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        socket.send_fds(sock, [b"SPAWN QTMSSRCP /nonexistent.toml\n"], [job_end.fileno()])
        job_end.close()
        pid_line = read_line(sock)
        assert pid_line.startswith(b"PID ")
        pid = int(pid_line.split()[1])
        exit_line = read_line(sock).split()
        assert exit_line[:2] == [b"EXIT", str(pid).encode()]
        assert os.WIFEXITED(int(exit_line[2])) and os.WEXITSTATUS(int(exit_line[2])) != 0
        kept.close()
    finally:
        sock.close()  # the controller goes: so does the launcher
        assert proc.wait(10) == 0


def test_its_jobs_die_with_it(tmp_path):
    proc, sock = launcher(tmp_path)
    job_end, kept = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    config = tmp_path / "twistmail.toml"
    config.write_text('[system]\ndatadir = "var"\n')
    tlsconfig.ensure_pair(configmod.load(config))  # the controller makes it before any job
    socket.send_fds(sock, [f"SPAWN QTMSSRCP {config}\n".encode()], [job_end.fileno()])
    job_end.close()
    pid = int(read_line(sock).split()[1])
    kept.settimeout(30)
    assert kept.recv(100).startswith(b"READY")  # a real job, forked and ready
    # Woken by its dispatcher, it waits for a CPU rather than preempt it.
    assert os.sched_getscheduler(pid) == os.SCHED_BATCH
    assert os.sched_getscheduler(proc.pid) == os.SCHED_OTHER
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    sock.close()
    kept.close()


def test_a_childs_lines_are_logged_at_the_level_it_logged_them():
    """A filter by level must see the bridge's and the jobs' errors."""
    from twisted.logger import Logger, LogLevel

    from twistmail.prestart.launch import ChildOutput

    events: list[dict] = []
    out = ChildOutput("QMSF", lambda reason: None)
    out.log = Logger(observer=events.append)
    out.childDataReceived(2, b"2026-11-30T10:00:00+0000 [twistmail.bridge.x#error] broken\n"
                             b"\tTraceback (most recent call last):\n"
                             b"2026-11-30T10:00:01+0000 [twistmail.bridge.x#info] fine\n"
                             b"journal /var (QMSF/1): entries are being lost\n")
    assert [e["log_level"] for e in events] == [LogLevel.error, LogLevel.error, LogLevel.info,
                                                LogLevel.warn]


def test_settings_are_read_once_per_version_of_the_file(tmp_path):
    """Jobs take the settings the launcher read; a reload writes a new file
    (a rename), which the next job started reads, and a file that cannot be
    read is left to the job to report."""
    from twistmail.prestart.forkserver import Launcher

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    launcher = Launcher(theirs)
    path = tmp_path / "t.toml"

    def write(text: str) -> None:
        tmp = tmp_path / "new.toml"
        tmp.write_text(text)
        os.replace(tmp, path)

    try:
        write('[system]\nhostname = "one.example.test"\n')
        first = launcher.settings(str(path))
        assert first.hostname == "one.example.test"
        assert launcher.settings(str(path)) is first
        write('[system]\nhostname = "two.example.test"\n')
        assert launcher.settings(str(path)).hostname == "two.example.test"
        write('[system]\nhostname = "bad name!"\n')
        assert launcher.settings(str(path)) is None
        assert launcher.settings(str(tmp_path / "missing.toml")) is None
    finally:
        ours.close()
        theirs.close()


def test_a_program_that_cannot_be_imported_fails_alone(monkeypatch):
    """The controller's launcher serves two programs: one broken stops one entry."""
    import gc

    from twistmail.prestart import forkserver

    monkeypatch.setitem(forkserver.PRELOAD, "BROKEN", ("twistmail.no_such_module",))
    monkeypatch.setitem(forkserver.PRELOAD, "FINE", ("twistmail.journal",))
    try:
        broken = forkserver.preload(("BROKEN", "FINE"))
    finally:
        gc.unfreeze()
    assert list(broken) == ["BROKEN"] and "twistmail.no_such_module" in broken["BROKEN"]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    spare, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        launcher = forkserver.Launcher(ours, broken)
        launcher.fds.append(os.dup(spare.fileno()))
        launcher.request(b"SPAWN BROKEN /nonexistent.toml")
        theirs.settimeout(5)
        assert read_line(theirs).startswith(b"FAIL cannot import twistmail.no_such_module")
        assert launcher.fds == []  # the job's channel is closed, not kept
        # Mended (and STRPJ): the next start imports it again and goes on to fork.
        monkeypatch.setitem(forkserver.PRELOAD, "BROKEN", ("twistmail.journal",))

        def no_fork() -> int:
            raise OSError(11, "Resource temporarily unavailable")

        monkeypatch.setattr(forkserver.os, "fork", no_fork)
        launcher.fds.append(os.dup(spare.fileno()))
        launcher.request(b"SPAWN BROKEN /nonexistent.toml")
        assert read_line(theirs) == b"FAIL fork: Resource temporarily unavailable"
        assert launcher.broken == {}
    finally:
        for s in (ours, theirs, spare, other):
            s.close()


def test_a_descriptor_the_kernel_could_not_pass_fails_its_own_request(monkeypatch):
    """Out of descriptors, the request whose channel was dropped must not
    take the channel of the next one (another entry's job, maybe)."""
    from twistmail.prestart import forkserver

    monkeypatch.setattr(forkserver, "MAX_FDS", 0)  # no room: the kernel drops it
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    spare, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        launcher = forkserver.Launcher(ours)
        socket.send_fds(theirs, [b"SPAWN QTMSSRCP /nonexistent.toml\n"], [spare.fileno()])
        assert launcher.receive()
        theirs.settimeout(5)
        assert read_line(theirs) == (b"FAIL fork: the job's channel was lost "
                                     b"(out of descriptors)")
        assert launcher.fds == []
    finally:
        for s in (ours, theirs, spare, other):
            s.close()
