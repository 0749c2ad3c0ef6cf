"""The launcher: a preloaded process that forks prestart jobs on request.

Starting a job with exec costs about half a second of CPU, nearly all of it
importing Twisted, OpenSSL and our protocol modules.  A pool that replaces
jobs at MAXUSE, or grows under a burst, would spend its cores on imports.
The launcher does the imports once; each job is then a fork of it, which
takes a few milliseconds and shares the imported code with its siblings.

The launcher never installs a reactor, opens a database or starts a thread:
everything a job owns is made after the fork, in the job.

Protocol on fd 3 (a UNIX socket to the controller), one line each way:

* in: ``SPAWN <pgm> <config path>`` with the job's channel descriptor
  attached (SCM_RIGHTS);
* out: ``PID <pid>`` once the job is forked, or ``FAIL <why>``, in request
  order;
* out: ``EXIT <pid> <wait status>`` when a job has ended.

When the controller goes, the launcher goes, and its jobs with it
(PR_SET_PDEATHSIG on both).

The bridge's QMSF jobs and its client jobs come from launchers too.  Those
are forks of the bridge itself, made before its reactor exists
(:func:`fork_launcher`): the bridge has imported what the jobs run, so a
launcher costs no interpreter start of its own and the first job starts at
once after STRMSF.  One that dies is replaced by an exec'd one.

Run as ``python -m twistmail.prestart.forkserver PGM...`` (the programs to preload).
"""

from __future__ import annotations

import array
import gc
import importlib
import os
import select
import signal
import socket
import sys

from twistmail.lifeline import (
    die_with_parent,
    name_process,
    return_large_blocks,
    yield_on_wakeup,
)

CONTROL_FD = 3
JOB_CHANNEL_FD = 3
KEPT_FD = 4  # what fork_launcher keeps for the launcher and its jobs
MAX_FDS = 16

COMMON = (
    "twisted.internet.epollreactor",
    "twisted.internet.ssl",
    "twisted.protocols.tls",
    "twisted.logger",
    "sqlite3",
    "twistmail.prestart.job",
    "twistmail.tlsconfig",
    "twistmail.directory",
    "twistmail.journal",
    "twistmail.queue",
)
#: What each program's jobs import.  Only what a launcher's jobs use is
#: preloaded: every preloaded page is in each job's resident set.  The
#: controller's one launcher preloads both server programs, whose own
#: modules are small beside what they have in common.
PRELOAD = {
    "QTMSSRCP": (*COMMON, "twistmail.smtp.server", "twistmail.smtp.backend"),
    "QTPOPSRVP": (*COMMON, "twistmail.pop3.server", "twistmail.auth", "twistmail.maildir"),
    "QTMSCCLCP": (*COMMON, "twistmail.smtp.delivery"),
    # No reactor: a QMSF job is a plain loop over its channel.
    "QMSF": ("twistmail.bridge.msf", "twistmail.bridge.inbound", "twistmail.maildir",
             "twistmail.smtp.backend"),
}
#: The module whose ``main`` a job of the program runs; prestart jobs by default.
ENTRY = {"QMSF": "twistmail.bridge.msf"}
NAME = "QZMFLNCH"
#: How a FAIL line begins when the system is short of processes or memory:
#: the pool then does not count a boot failure, as it does for other FAILs.
SHORTAGE = "fork:"
#: In place of a descriptor the kernel could not pass (MSG_CTRUNC).
LOST = -1


def preload(programs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Import what the jobs need; the reactor itself is chosen after the fork.

    Returns why each program that cannot run failed to import: a launcher
    serving two programs answers only the broken one's requests FAIL, and
    the other entry goes on.
    """
    broken: dict[str, str] = {}
    for program in programs:
        why = _imports(program)
        if why is not None:
            broken[program] = why
            print(f"{program} jobs cannot start: {why}", file=sys.stderr)
    # Keep the collector away from the shared objects, so the jobs' pages
    # stay shared (copy-on-write) instead of being copied by a GC pass.
    gc.collect()
    gc.freeze()
    _trim_heap()
    return broken


def _imports(program: str) -> str | None:
    """Import one program's modules; why they cannot be, or None."""
    for name in PRELOAD.get(program, ()):
        try:
            importlib.import_module(name)
        except Exception as e:
            return f"cannot import {name}: {e!r}"
    if program in ("QTMSSRCP", "QTPOPSRVP"):
        from twistmail.directory import prepare_sign_on

        prepare_sign_on()
    return None


def _trim_heap() -> None:
    """Give the C heap's free pages back: each job's resident set starts smaller."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


class Launcher:
    def __init__(self, control: socket.socket, broken: dict[str, str] | None = None) -> None:
        self.control = control
        #: Programs whose modules failed to import, and why: their requests FAIL.
        self.broken = broken or {}
        self.buffer = b""
        self.fds: list[int] = []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self._settings: tuple[bytes, object] | None = None

    def run(self) -> None:
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self.wake_w)
        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            try:
                events = poller.poll()
            except InterruptedError:
                events = []
            for fd, _ in events:
                if fd == self.wake_r:
                    os.read(self.wake_r, 4096)
            self.reap()
            if any(fd == self.control.fileno() for fd, _ in events):
                if not self.receive():
                    return

    def receive(self) -> bool:
        """Read requests; False when the controller has gone."""
        try:
            data, ancdata, flags, _ = self.control.recvmsg(
                65536, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC and not ancdata:
            # The kernel dropped the descriptor these bytes carried (we are
            # out of descriptors): its request must not take the next one's.
            self.fds.append(LOST)
        if not data:
            return False
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.request(line.rstrip(b"\r"))
        return True

    def request(self, line: bytes) -> None:
        """Fork a job; every request is answered in order, ``PID n`` or ``FAIL why``."""
        parts = line.decode("utf-8", "replace").split(" ", 2)
        if parts[0] != "SPAWN" or len(parts) != 3 or not self.fds:
            self.send(f"FAIL bad request {line[:200]!r}")
            return
        fd = self.fds.pop(0)
        if fd == LOST:
            self.send(f"FAIL {SHORTAGE} the job's channel was lost (out of descriptors)")
            return
        if parts[1] in self.broken:
            # Tried again: the entry went FAILED, its cause was mended and
            # STRPJ came, while the other entry kept this launcher running.
            why = _imports(parts[1])
            if why is not None:
                os.close(fd)
                self.send(f"FAIL {why}")
                return
            del self.broken[parts[1]]
        settings = self.settings(parts[2])
        try:
            pid = os.fork()
        except OSError as e:  # out of processes or memory: this job fails, we go on
            os.close(fd)
            self.send(f"FAIL {SHORTAGE} {e.strerror}")
            return
        if pid == 0:
            self.become_job(fd, parts[1], parts[2], settings)
        os.close(fd)
        self.send(f"PID {pid}")

    def settings(self, path: str) -> object | None:
        """The settings at ``path``, checked again only when its bytes changed.

        Reading and checking them took each job about 1.5 ms of CPU, and a
        pool at MAXUSE starts jobs all day; the file (the daemon's record of
        its settings, a few kilobytes) only changes at a reload.  None when it
        cannot be read here: the job reads it itself and reports why.
        """
        from twistmail import config as configmod

        try:
            key = configmod.read_file(path)
            if self._settings is None or self._settings[0] != key:
                self._settings = (key, configmod.load(path))
        except Exception:  # whatever it is, the launcher goes on
            self._settings = None
            return None
        return self._settings[1]

    def become_job(self, fd: int, pgm: str, config_path: str, settings: object | None) -> None:
        """In the child: take the job's channel as fd 3 and run the job."""
        code = 70
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            for other in self.fds:
                if other != LOST:
                    os.close(other)
            self.control.detach()
            os.dup2(fd, JOB_CHANNEL_FD)  # takes the place of the control socket
            os.close(fd)
            name_process(pgm)
            yield_on_wakeup()
            entry = importlib.import_module(ENTRY.get(pgm, "twistmail.prestart.job"))
            code = entry.run(pgm, config_path, settings)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.send(f"EXIT {pid} {status}")

    def send(self, line: str) -> None:
        try:
            self.control.sendall(line.encode("ascii", "replace") + b"\n")
        except OSError:
            pass


def fork_launcher(programs: tuple[str, ...],
                  keep_fd: int | None = None) -> tuple[int, socket.socket]:
    """Fork a launcher from this process; its pid and our end of its channel.

    Call it before the reactor is imported and before any thread starts: the
    launcher is a copy of this process at that moment, and keeps only its
    standard streams, the channel and ``keep_fd`` (the state directory's
    lock, as KEPT_FD, which its jobs inherit).  The caller reaps it.
    """
    if "twisted.internet.reactor" in sys.modules:
        raise RuntimeError("a launcher is forked before the reactor exists")
    broken = preload(programs)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            ours.detach()  # its descriptor goes with the others below
            kept = None if keep_fd is None else os.dup(keep_fd)  # before fd 3 is taken
            fd = theirs.detach()
            if fd != CONTROL_FD:
                os.dup2(fd, CONTROL_FD)
            if kept is not None:
                os.dup2(kept, KEPT_FD)
            os.closerange(CONTROL_FD + 1 if kept is None else KEPT_FD + 1,
                          os.sysconf("SC_OPEN_MAX"))
            die_with_parent(sig=signal.SIGKILL)  # a stopped one must not outlive it
            return_large_blocks()  # the jobs forked from here keep it
            name_process(NAME)
            code = _run_launcher(broken)
        except SystemExit as e:  # the bridge died meanwhile
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    theirs.close()
    return pid, ours


def _run_launcher(broken: dict[str, str] | None = None) -> int:
    Launcher(socket.socket(fileno=CONTROL_FD), broken).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    # SIGKILL, not SIGTERM: a launcher stopped when its parent dies would keep
    # a SIGTERM pending, and the state directory's lock (or its pipes) with it.
    die_with_parent(sig=signal.SIGKILL)
    return_large_blocks()  # the jobs forked from here keep it
    name_process(NAME)
    broken = preload(sys.argv[1:] if argv is None else argv)
    return _run_launcher(broken)


if __name__ == "__main__":
    sys.exit(main())
