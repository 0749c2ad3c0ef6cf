"""Shared pieces of the throughput benchmarks (bench/smtp-accept, bench/pop-retr).

A private twistmail daemon in a temporary directory, the peers (Postfix,
Dovecot) found on loopback, the disk's durable-write ceiling, CPU accounting
from /proc, optional py-spy profiles summarised per process role, and the
formatting helpers both reports use.

Nothing here imports twistmail: the daemon is driven through its control
socket and its CLI, so the scripts run under any Python 3.11+.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED_BENCH = REPO.parent / "shared" / "bench"
HOSTNAME = "bench.example.test"
DOMAIN = "example.test"
CLK_TCK = os.sysconf("SC_CLK_TCK")

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sigterm_interrupts() -> None:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt, so every ``finally`` runs."""

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def venv_bin(name: str) -> str:
    for cand in (Path(sys.executable).parent / name, REPO / ".venv" / "bin" / name):
        if cand.exists():
            return str(cand)
    found = shutil.which(name)
    if found:
        return found
    raise SystemExit(f"no {name} found; run `make install` first")


# --------------------------------------------------------------------------
# statistics and formatting


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(x: float | None, spec: str = "{:.0f}", none: str = "-") -> str:
    return none if x is None else spec.format(x)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        cells = []
        for i, (c, w) in enumerate(zip(r, widths, strict=True)):
            cells.append(str(c).ljust(w) if i == 0 else str(c).rjust(w))
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def verdict(value: float | None, goal: float | None) -> str:
    if value is None or goal is None:
        return "not measured"
    return "met" if value >= goal else "MISSED"


# --------------------------------------------------------------------------
# /proc: CPU accounting


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def proc_cpu(pid: int, reaped: bool = True) -> float:
    """CPU seconds of a process (plus those of its reaped children)."""
    st = _stat_fields(pid)
    if st is None:
        return 0.0
    ticks = int(st[11]) + int(st[12])
    if reaped:
        ticks += int(st[13]) + int(st[14])
    return ticks / CLK_TCK


def proc_table() -> dict[int, tuple[int, str, float, float]]:
    """Every process in one pass over /proc: pid -> (ppid, comm, own CPU s, reaped CPU s).

    One read of each ``stat`` file, so that a snapshot of a whole process
    tree is taken in a few milliseconds (walking the tree with
    :func:`children_of` reads /proc once per process of the tree)."""
    out: dict[int, tuple[int, str, float, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read().decode("ascii", "replace")
        except OSError:
            continue
        lp, rp = raw.find("("), raw.rfind(")")
        st = raw[rp + 2:].split()
        try:
            out[int(name)] = (int(st[1]), raw[lp + 1:rp],
                              (int(st[11]) + int(st[12])) / CLK_TCK,
                              (int(st[13]) + int(st[14])) / CLK_TCK)
        except (IndexError, ValueError):
            continue
    return out


def tree_pids(table: dict[int, tuple[int, str, float, float]], root: int) -> list[int]:
    """``root`` and its descendants, from a :func:`proc_table`."""
    kids: dict[int, list[int]] = {}
    for pid, row in table.items():
        kids.setdefault(row[0], []).append(pid)
    out, todo = [], [root] if root in table else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def children_of(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat_fields(int(name))
            if st is not None and st[1] == str(pid):
                out.append(int(name))
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds of a process tree: the root, its children, and everything reaped."""
    total = proc_cpu(root)
    for child in children_of(root):
        total += tree_cpu(child)
    return total


def system_cpu() -> dict[str, float]:
    """Seconds since boot of all CPUs: busy, and irq+softirq (loopback TCP) apart."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    total = sum(vals[:8])
    idle = vals[3] + vals[4]
    return {"busy": (total - idle) / CLK_TCK, "total": total / CLK_TCK,
            "softirq": (vals[5] + vals[6]) / CLK_TCK}


def busy_percent(before: dict[str, float], after: dict[str, float]) -> float | None:
    span = after["total"] - before["total"]
    if span <= 0:
        return None
    return 100.0 * (after["busy"] - before["busy"]) / span


def children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def pids_named(comm: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm") as f:
                if f.read().strip() == comm:
                    out.append(int(name))
        except OSError:
            continue
    return out


# --------------------------------------------------------------------------
# files


def count_files(dirs: Iterable[Path]) -> int:
    """Message files in Maildir folders (dot files and Dovecot's own files excluded)."""
    n = 0
    for d in dirs:
        try:
            n += sum(1 for name in os.listdir(d) if not name.startswith(("." , "dovecot")))
        except FileNotFoundError:
            pass
    return n


def empty_dirs(dirs: Iterable[Path]) -> None:
    for d in dirs:
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_file(follow_symlinks=False) and not e.name.startswith("dovecot"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(e.path)
        except FileNotFoundError:
            pass


class Trash:
    """Moves delivered mail out of the way by renaming folders, not unlinking files.

    On a journal-less ext4 (this machine's) every inode freed in the last
    seconds makes later file creations in its block group scan past it
    (``recently_deleted``), so deleting the previous run's mail would slow
    down the next run's queue and Maildir writes.  ``set_aside`` renames each
    non-empty folder into ``root`` and recreates it empty with the same owner
    and mode; ``empty`` deletes everything, once measuring is over.  ``root``
    must be on the folders' filesystem.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.n = 0

    def set_aside(self, dirs: Iterable[Path]) -> None:
        import stat as _stat

        for d in dirs:
            try:
                with os.scandir(d) as it:
                    if next(it, None) is None:
                        continue
                st = d.stat()
            except FileNotFoundError:
                continue
            self.root.mkdir(mode=0o700, exist_ok=True)
            self.n += 1
            os.rename(d, self.root / f"{self.n}.{d.name}")
            os.mkdir(d, 0o700)
            os.chown(d, st.st_uid, st.st_gid)
            os.chmod(d, _stat.S_IMODE(st.st_mode))

    def empty(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def wait_until(pred: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> float:
    """Poll until ``pred()``; returns the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# --------------------------------------------------------------------------
# the disk's durable-write ceiling


def fsync_ceiling(workdir: Path, *, files: int = 2000, threads: int = 1, dirsync: bool = True,
                  max_seconds: float = 15.0, keep: bool = True) -> dict[str, Any] | None:
    """Run shared/bench/fsync-ceiling.py (write + fsync + rename of 4 KiB files).

    With ``keep`` its files stay in ``workdir`` (removed with it, after the
    measurements): deleting them at once would slow the next run's file
    creations (see :class:`Trash`)."""
    script = SHARED_BENCH / "fsync-ceiling.py"
    if not script.is_file():
        return None
    cmd = [sys.executable, str(script), "--files", str(files), "--threads", str(threads),
           "--max-seconds", str(max_seconds), "--dir", str(workdir / "fsync-ceiling")]
    if dirsync:
        cmd.append("--dirsync")
    if keep:
        cmd.append("--keep")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=max_seconds + 60)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("FSYNC_CEILING")), None)
    if line is None:
        log(f"fsync-ceiling.py failed: {r.stderr.strip()[-300:]}")
        return None
    out: dict[str, Any] = {}
    for part in line.split()[1:]:
        k, _, v = part.partition("=")
        try:
            out[k] = float(v) if "." in v else int(v)
        except ValueError:
            out[k] = v
    return out


# --------------------------------------------------------------------------
# peers on loopback


def probe_line(addr: tuple[str, int], prefix: bytes, quit_cmd: bytes = b"QUIT\r\n",
               timeout: float = 3.0) -> str | None:
    """The greeting when something answers with ``prefix`` at ``addr``; else None."""
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            data = b""
            while b"\n" not in data:
                chunk = s.recv(512)
                if not chunk:
                    break
                data += chunk
            with contextlib.suppress(OSError):
                s.sendall(quit_cmd)
            line = data.split(b"\r\n")[0].decode("ascii", "replace")
            return line if line.encode().startswith(prefix) else None
    except OSError:
        return None


def run_quiet(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A loopback port the kernel has just given out, free again."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def run_peers_setup() -> bool:
    script = SHARED_BENCH / "peers-setup.sh"
    if not script.is_file():
        log(f"{script} not found")
        return False
    log(f"running {script} ...")
    with tempfile.TemporaryFile() as out:
        r = subprocess.run(["bash", str(script)], stdin=subprocess.DEVNULL, stdout=out,
                           stderr=subprocess.STDOUT)
        out.seek(0)
        text = out.read().decode("utf-8", "replace").strip()
    if text:
        log(text.splitlines()[-1])
    return r.returncode == 0


# --------------------------------------------------------------------------
# the twistmail daemon under test


class ControlError(Exception):
    pass


class CheckFailed(RuntimeError):
    """A run did not do what it was asked (not N messages delivered, wrong bytes):
    its figures mean nothing.  The scripts print a FAILED line and exit 1."""


BASE_CONFIG: dict[str, dict[str, Any]] = {
    "system": {"datadir": "var", "hostname": HOSTNAME, "local_domains": [DOMAIN]},
    "listen": {"smtp": "127.0.0.1:0", "submission": "", "smtps": "",
               "pop3": "127.0.0.1:0", "pop3s": ""},
    # A job pool grown by a run stays for the next one: runs measure the
    # steady state, not job start-up (the journal's JS entries count starts).
    "prestart": {"trim_interval": 3600},
    "storage": {"threshold": 99},
    # All load comes from 127.0.0.1; Postfix exempts $mynetworks from its
    # anvil limits the same way.
    "limits": {"maxconnperip": 0, "maxconnrate": 0},
    "prestart.QTMSSRCP": {"inljobs": 20, "threshold": 2, "adljobs": 4, "maxjobs": 40,
                          "maxuse": "*NOMAX"},
    "pop": {"nbrsvr": 8},
    "prestart.QTPOPSRVP": {"threshold": 1, "maxjobs": 16, "maxuse": "*NOMAX"},
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def render_toml(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        out.append("")
    return "\n".join(out)


class Appliance:
    """``twistd -n twistmail`` in a temporary directory; a context manager that
    always stops the daemon (SIGTERM) and removes the directory."""

    def __init__(self, prefix: str = "twistmail-bench-", keep: bool = False,
                 overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep
        self.sections = {k: dict(v) for k, v in BASE_CONFIG.items()}
        for name, values in (overrides or {}).items():
            self.sections.setdefault(name, {}).update(values)
        self.config = self.workdir / "twistmail.toml"
        self.config.write_text(render_toml(self.sections))
        self.datadir = self.workdir / "var"
        self.control_path = self.datadir / "run" / "control.sock"
        self.proc: subprocess.Popen | None = None
        self.logfile: Any = None
        self.pid: int | None = None
        self.listeners: dict[str, str] = {}
        self._journal_offsets: dict[str, int] = {}

    # -- life

    def __enter__(self) -> Appliance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 60.0) -> Appliance:
        self.logfile = open(self.workdir / "twistd.log", "wb")
        self.proc = subprocess.Popen(
            [venv_bin("twistd"), "-n", "--pidfile=", "twistmail", "--config", str(self.config)],
            cwd=self.workdir, stdout=self.logfile, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                status = self.call("status")
                if status.get("listeners"):
                    self.listeners = status["listeners"]
                    self.pid = int(status["pid"])
                    break
            except (OSError, ControlError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"twistd did not come up in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)
        self.wait_pools(timeout)
        return self

    def wait_pools(self, timeout: float = 60.0) -> None:
        """Until every active pool has its initial jobs idle (PSRW) and none starting."""
        want = {"QTMSSRCP": self.sections["prestart.QTMSSRCP"].get("inljobs", 1),
                "QTPOPSRVP": self.sections["pop"].get("nbrsvr", 1)}
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs()
            ok = True
            for pgm, n in want.items():
                mine = [j for j in jobs if j["pgm"] == pgm]
                if not mine and self.listeners.get("smtp" if pgm == "QTMSSRCP" else "pop3"):
                    ok = False
                idle = [j for j in mine if j["status"] == "PSRW"]
                if mine and (len(idle) < n or any(j["status"] == "START" for j in mine)):
                    ok = False
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"pools not ready after {timeout} s: {jobs}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log("twistd did not stop after SIGTERM; killing its process group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Jobs and the bridge end with the controller; anything left in the
        # session is ours.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, 0)
            time.sleep(1.0)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def close(self) -> None:
        try:
            self.stop()
        except KeyboardInterrupt:
            if self.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        finally:
            if self.logfile is not None:
                self.logfile.close()
                self.logfile = None
            if self.keep:
                log(f"kept {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = (self.workdir / "twistd.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    # -- talking to it

    def call(self, cmd: str, timeout: float = 60.0, **args: Any) -> Any:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(self.control_path))
            s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ControlError("control connection closed")
                buf += chunk
        finally:
            s.close()
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "failed"))
        return reply.get("result")

    def cli(self, *args: str, check: bool = True) -> str:
        r = subprocess.run([venv_bin("twistmail"), "--config", str(self.config), *args],
                           capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"twistmail {' '.join(args)}: exit {r.returncode}: "
                               f"{(r.stderr or r.stdout).strip()}")
        return r.stdout

    def addr(self, name: str) -> tuple[str, int]:
        return parse_addr(self.listeners[name])

    def user(self, usrprf: str, password: str) -> None:
        self.cli("crtusrprf", "--usrprf", usrprf, "--password", password)

    def users(self, names: list[str], password: str) -> None:
        """CRTUSRPRF for several profiles at once (one CLI process each)."""
        procs = [(name, subprocess.Popen(
            [venv_bin("twistmail"), "--config", str(self.config), "crtusrprf",
             "--usrprf", name, "--password", password],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for name in names]
        failed = []
        for name, p in procs:
            out, _ = p.communicate(timeout=120)
            if p.returncode != 0:
                failed.append(f"{name}: {out.strip()[-200:]}")
        if failed:
            raise RuntimeError("crtusrprf failed: " + "; ".join(failed))

    def jobs(self) -> list[dict[str, Any]]:
        return self.call("wrkactjob")

    def roles(self) -> dict[str, list[int]]:
        """pids by role: controller, bridge, smtp jobs, pop jobs."""
        out: dict[str, list[int]] = {"controller": [self.pid] if self.pid else [],
                                     "bridge": [], "smtp-jobs": [], "pop-jobs": []}
        for j in self.jobs():
            if j["job"] == "QTSMTPBRSR" and j.get("pid"):
                out["bridge"].append(j["pid"])
            elif j["pgm"] == "QTMSSRCP":
                out["smtp-jobs"].append(j["pid"])
            elif j["pgm"] == "QTPOPSRVP":
                out["pop-jobs"].append(j["pid"])
        return out

    def bridge_status(self) -> str | None:
        return (self.call("status").get("bridge") or {}).get("status")

    def end_bridge(self) -> None:
        """ENDMSF *IMMED; returns once the bridge process is gone."""
        if self.bridge_status() in ("RUN", "RESTARTING", "END"):
            # *IMMED kills at once whatever the delay; the daemon takes 1-999999
            self.call("endmsf", option="*IMMED", delay=1)
        wait_until(lambda: (self.call("status").get("bridge") or {}).get("pid") is None,
                   30, "the bridge to end", poll=0.1)

    def start_bridge(self) -> None:
        """STRMSF; returns once the bridge process exists."""
        self.call("strmsf")
        wait_until(lambda: (self.call("status").get("bridge") or {}).get("pid") is not None,
                   30, "the bridge to start", poll=0.02)

    def journal_counts(self) -> dict[str, int]:
        """Journal entries by code written since the previous call."""
        counts: dict[str, int] = {}
        jdir = self.datadir / "journal"
        offsets = self._journal_offsets
        for f in sorted(jdir.glob("QZMF.*.jsonl")):
            off = offsets.get(f.name, 0)
            with open(f, "rb") as fh:
                fh.seek(off)
                data = fh.read()
            end = data.rfind(b"\n") + 1
            offsets[f.name] = off + end
            for line in data[:end].splitlines():
                i = line.find(b'"code":"')
                if i >= 0:
                    code = line[i + 8:i + 10].decode("ascii", "replace")
                    counts[code] = counts.get(code, 0) + 1
        return counts

    # -- files

    def maildir(self, usrprf: str) -> Path:
        return self.datadir / "mailboxes" / usrprf.upper() / "Maildir"

    def queue_dir(self, name: str) -> Path:
        return self.datadir / "queue" / name


class CpuMeter:
    """CPU seconds used by named process groups between ``start`` and ``stop``.

    ``groups`` is either a callable per group, or one callable that returns
    every group's figure from a single snapshot (consistent parts)."""

    def __init__(self, groups: dict[str, Callable[[], float]]
                 | Callable[[], dict[str, float]]) -> None:
        if callable(groups):
            self.snap = groups
        else:
            self.snap = lambda: {k: f() for k, f in groups.items()}
        self.t0: dict[str, float] = {}
        self.sys0: dict[str, float] = {}

    def start(self) -> None:
        self.sys0 = system_cpu()
        self.t0 = self.snap()

    def stop(self) -> dict[str, Any]:
        return self.lap()

    def lap(self) -> dict[str, Any]:
        """What ``stop`` returns; the meter then counts on from that same snapshot."""
        sys1 = system_cpu()
        t1 = self.snap()
        out: dict[str, Any] = {k: t1.get(k, 0.0) - v for k, v in self.t0.items()}
        out["machine_busy_pct"] = busy_percent(self.sys0, sys1)
        out["softirq"] = sys1["softirq"] - self.sys0["softirq"]
        self.t0, self.sys0 = t1, sys1
        return out


def pids_cpu(pids_fn: Callable[[], list[int]]) -> Callable[[], float]:
    return lambda: sum(proc_cpu(p) for p in pids_fn())


# --------------------------------------------------------------------------
# py-spy profiles


class Profiler:
    """``py-spy record --subprocesses`` on the daemon for one phase, raw output."""

    def __init__(self, outdir: Path | None, rate: int = 40) -> None:
        self.outdir = outdir
        self.rate = rate
        self.proc: subprocess.Popen | None = None
        self.path: Path | None = None

    def start(self, pid: int, name: str) -> None:
        if self.outdir is None:
            return
        pyspy = shutil.which("py-spy") or venv_bin("py-spy")
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.path = self.outdir / f"{name}.raw.txt"
        self.proc = subprocess.Popen(
            [pyspy, "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
             "--rate", str(self.rate), "--output", str(self.path)],
            stdout=subprocess.DEVNULL, stderr=open(self.outdir / f"{name}.py-spy.log", "wb"),
        )
        time.sleep(1.0)  # attaching to many processes takes a moment

    def stop(self) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        if self.path is None or not self.path.exists():
            return None
        summary = summarize_profile(self.path)
        (self.path.with_suffix("").with_suffix(".summary.txt")).write_text(
            format_profile(summary))
        return summary


#: Process names (comm) of jobs, which keep their launcher's command line,
#: and of launchers, which several programs' jobs may share.
_JOB_ROLES = {"QTMSSRCP": "smtp-jobs", "QTPOPSRVP": "pop-jobs", "QTMSCCLCP": "client-jobs",
              "QMSF": "qmsf-jobs", "QZMFLNCH": "launchers"}


def _role(pid: int, cmdline: str) -> str:
    # Jobs are forks of a launcher and keep its command line, which names
    # both server programs for the controller's, and the bridge for the
    # bridge's: a job is known by its name while it runs.
    try:
        with open(f"/proc/{pid}/comm") as f:
            role = _JOB_ROLES.get(f.read().strip())
        if role is not None:
            return role
    except OSError:
        pass  # ended: its command line is all there is
    if "forkserver QTMSSRCP QTPOPSRVP" in cmdline:
        return "smtp-or-pop-jobs"  # the controller's one launcher forks both
    if "--pgm QTMSSRCP" in cmdline or "forkserver QTMSSRCP" in cmdline:
        return "smtp-jobs"
    if "--pgm QTPOPSRVP" in cmdline or "forkserver QTPOPSRVP" in cmdline:
        return "pop-jobs"
    if "--pgm QTMSCCLCP" in cmdline or "forkserver QTMSCCLCP" in cmdline:
        return "client-jobs"
    if "bridge.msf" in cmdline:
        return "qmsf-jobs"
    if "bridge.main" in cmdline:
        return "bridge"
    if "twistd" in cmdline:
        return "controller"
    return "other"


_IDLE = ("EPollReactor.doPoll", "Condition.wait", "Queue.get", "select.epoll.poll",
         "_threadworker.py", "Event.wait")


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Samples per role; inclusive and self percentages of functions, busy samples only.

    A sample whose innermost frame is the reactor's epoll wait or a thread
    pool's idle wait counts as idle and is left out."""
    roles: collections.Counter = collections.Counter()
    idle: collections.Counter = collections.Counter()
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    self_: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    roles_of: dict[str, str] = {}  # process frame -> role
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not n.isdigit():
                continue
            count = int(n)
            frames = stack.split(";")
            procs = [fr for fr in frames if fr.startswith("process ")]
            role = "other"
            if procs:
                if procs[-1] not in roles_of:
                    pid = re.match(r"process (\d+)", procs[-1])
                    roles_of[procs[-1]] = _role(int(pid.group(1)) if pid else 0, procs[-1])
                role = roles_of[procs[-1]]
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in frames
                      if not fr.startswith(("process ", "thread "))]
            leaf = frames[-1] if frames else "<native>"
            if any(tag in leaf for tag in _IDLE):
                idle[role] += count
                continue
            roles[role] += count
            for fr in dict.fromkeys(frames):
                incl[role][fr] += count
            self_[role][leaf] += count
    total = sum(roles.values())
    out: dict[str, Any] = {"file": str(path), "busy_samples": total, "roles": {}}
    for role, n in roles.most_common():
        out["roles"][role] = {
            "busy_samples": n,
            "idle_samples": idle[role],
            "share_of_busy_pct": round(100.0 * n / total, 1) if total else None,
            "inclusive": [(fr, round(100.0 * c / n, 1)) for fr, c in incl[role].most_common(top)],
            "self": [(fr, round(100.0 * c / n, 1)) for fr, c in self_[role].most_common(top)],
        }
    return out


def format_profile(summary: dict[str, Any], top: int = 25) -> str:
    lines = [f"py-spy profile {summary['file']}: {summary['busy_samples']} busy samples"]
    for role, r in summary["roles"].items():
        lines.append(f"\n== {role}: {r['busy_samples']} busy samples "
                     f"({r['share_of_busy_pct']}% of all busy), {r['idle_samples']} idle")
        lines.append("  inclusive %:")
        lines.extend(f"    {pct:5.1f}  {fr}" for fr, pct in r["inclusive"][:top])
        lines.append("  self %:")
        lines.extend(f"    {pct:5.1f}  {fr}" for fr, pct in r["self"][:top])
    return "\n".join(lines) + "\n"
