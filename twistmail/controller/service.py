"""The controller: the twistd service that owns listeners, pools and the bridge.

It binds the ``[listen]`` sockets (before twistd drops privileges), accepts on
them itself, hands every connection to its prestart pool, serves the control
socket for the CLI, and supervises the bridge.  It does no protocol work and
no per-message disk I/O.  Settings changed with the CLI are re-read from the
TOML file on the ``reload`` control command and applied live; the processes it
starts read only what it accepted (``config.write_applied``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
from pathlib import Path
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from twistmail import StartRefused, tlsconfig
from twistmail import config as configmod
from twistmail.bridge.msf import NBRMSFJOB
from twistmail.bridge.status import RESET_FILE, SMTP_ENDED, STATUS_FILE
from twistmail.control import STOPPING, ControlError, socket_in_use
from twistmail.controller import listener as listenermod
from twistmail.controller import preflight, statedir
from twistmail.controller.bridgeslot import BridgeSlot
from twistmail.controller.controlsocket import ControlFactory
from twistmail.controller.datadirlock import DatadirBusy, NoLock, lock_datadir
from twistmail.journal import Journal
from twistmail.policy.anvil import client_key
from twistmail.prestart import launch
from twistmail.prestart.policy import Limits
from twistmail.prestart.pool import KILL_AFTER, Pool, hung_up
from twistmail.settingtypes import END_DELAY, END_OPTION, Endpoint, parse_value

SERVERS = {"*SMTP": "QTMSSRCP", "*POP": "QTPOPSRVP"}
SERVER_LISTENERS = {
    "*SMTP": ("smtp", "submission", "smtps"),
    "*POP": ("pop3", "pop3s"),
}
POOL_PROGRAMS = ("QTMSSRCP", "QTPOPSRVP")
IMPLICIT_TLS = ("smtps", "pop3s")


def limits_of(settings: configmod.Settings) -> Limits:
    p = settings.prestart
    return Limits(trim_interval=float(p.trim_interval), wait_limit=float(p.wait_limit))


def _reject_reply(pgm: str, hostname: str, ending: bool = False) -> bytes:
    """What a connection no job takes is told: none is free, or the server ends."""
    if pgm == "QTPOPSRVP":
        if ending:
            return b"-ERR [SYS/TEMP] Server shutting down, try again later\r\n"
        return b"-ERR [SYS/TEMP] no POP server job is free; try again later\r\n"
    if ending:
        return f"421 4.3.2 {hostname} Service shutting down, try again later\r\n".encode()
    return (
        f"421 4.3.2 {hostname} Service not available: no SMTP server job is free; "
        "try again later\r\n"
    ).encode()


#: Ports where every client signs on (RFC 6409, RFC 8314): no block lists there.
SUBMISSION_LISTENERS = frozenset({"submission", "smtps"})


class Controller(service.Service):
    log = Logger()

    def __init__(self, settings: configmod.Settings, reactor: Any = None,
                 owner: tuple[int, int] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.settings = settings
        self.config_path = str(settings.path)
        #: What jobs and the bridge read: the settings this daemon accepted.
        self.applied_path = str(configmod.applied_path(settings))
        self.sockets: dict[str, socket.socket] = {}
        self.listeners: dict[str, listenermod.Listener] = {}
        self.servers: dict[str, bool] = {"*SMTP": False, "*POP": False}
        self.pools: dict[str, Pool] = {}
        self.journal: Journal | None = None
        self.bridge: BridgeSlot | None = None
        self.control_port: Any = None
        self.policy: Any = None
        self.tls_state: tuple[Any, ...] = ()
        self.lock_fd: int | None = None
        #: Who twistd runs the daemon as after binding (--uid/--gid), if it switches.
        self.owner = owner
        #: The TLS pair's warnings when it was checked and kept as root.
        self.tls_warnings: list[str] | None = None
        #: Sections changed in the file that only a restart applies (the last reload's view).
        self.restart_needed: list[str] = []

    @property
    def pid(self) -> int:
        """Asked each time: twistd without -n forks to run in the background
        after the service is made, and the daemon is the last fork."""
        return os.getpid()

    # -- start ---------------------------------------------------------

    def _autostart(self) -> list[str]:
        out = []
        if self.settings.smtp.autostart == "*YES":
            out.append("*SMTP")
        if self.settings.pop.autostart == "*YES":
            out.append("*POP")
        return out

    def privilegedStartService(self) -> None:
        """Bind listening sockets while still privileged (ports 25, 110...)."""
        self._prepare_datadir()
        try:
            for server in self._autostart():
                self._bind_server(server)
        except ControlError as e:
            raise StartRefused(str(e)) from None
        if os.geteuid() == 0 and self.settings.tls.certificate:
            self._keep_pair_as_root()
        super().privilegedStartService()

    def _keep_pair_as_root(self) -> None:
        """A key only root may read (/etc/letsencrypt) is read now; the jobs load the
        checked copy, the daemon's user's.  A renewal of such a key takes a restart."""
        s = self.settings
        try:
            pem, self.tls_warnings = tlsconfig.check_pair(s)
        except configmod.SettingError as e:
            raise StartRefused(str(e)) from None
        fd = _open_no_link(s.datadir / "run")
        try:
            tlsconfig.keep_pair(s, pem, run_fd=fd, owner=self.owner)
        except OSError as e:
            raise StartRefused(f"cannot keep the TLS pair for the jobs: {e}") from None
        finally:
            os.close(fd)

    def _prepare_datadir(self) -> None:
        d = self.settings.datadir
        why = statedir.refusal(d)
        if why is not None:  # before anything in it is made, changed or given away
            raise StartRefused(why)
        why = statedir.left_beside_link(self.settings)
        if why is not None:
            raise StartRefused(why)
        try:
            # Its own: with twistd -n the umask is the shell's, and a 0755 state
            # directory let every local user list the mailboxes, by profile name.
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            for sub in ("run", "journal"):
                (d / sub).mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise StartRefused(f"cannot make {e.filename}: {e.strerror}") from None
        _private(d, d / "mailboxes", d / "snads")  # made so by an earlier version
        root = os.geteuid() == 0
        if root:
            try:
                self._own_as_root(d)
            except OSError as e:  # a read-only file system, say
                raise StartRefused(f"cannot prepare {e.filename or d} for the "
                                   f"daemon's user: {e.strerror}") from None
        else:
            os.chmod(d / "run", 0o700)
        path = self.settings.control_socket
        running = f"another daemon is running (it answers on {path})"
        if socket_in_use(path):
            raise StartRefused(running)
        try:
            # One started a moment before this one holds the lock and answers
            # soon: said then, not after the wait for a daemon still ending.
            self.lock_fd = lock_datadir(d, running=lambda: running if socket_in_use(path)
                                        else None,
                                        waiting=lambda text: self.log.info("{text}", text=text))
        except DatadirBusy as e:
            raise StartRefused(str(e)) from None
        except NoLock as e:
            self.log.warn("the state directory cannot be locked ({e}); make sure no other "
                          "twistmail uses it", e=e)
        if socket_in_use(path):  # one that started while this one waited
            raise StartRefused(running)
        if not root:
            if path.exists() or path.is_symlink():
                path.unlink()
        else:  # in run/ itself: the daemon's user may have made run/ a link meanwhile
            fd = _open_no_link(path.parent)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path.name, dir_fd=fd)
            finally:
                os.close(fd)
        if root and self.owner is not None and self.lock_fd is not None:
            os.fchown(self.lock_fd, *self.owner)

    def _own_as_root(self, d: Path) -> None:
        """run/ private, and what root made the daemon's user's (--uid/--gid).

        Through descriptors opened without following links: after the first
        start the directory is that user's, who could put a link there to
        have root chmod or chown any file.
        """
        if self.owner is not None:
            before = os.stat(d)
            # Everything the first time; then all but the mailboxes (the bulk),
            # for what a root command of an older twistmail left.
            _give_tree(d, before.st_uid, self.owner,
                       whole=(before.st_uid, before.st_gid) != self.owner)
            os.chown(d, *self.owner)  # the configured path, links and all
        for sub, mode in (("run", 0o700), ("journal", None)):
            fd = _open_no_link(d / sub)
            try:
                if mode is not None:
                    os.fchmod(fd, mode)
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
            finally:
                os.close(fd)

    def _bind_server(self, server: str) -> None:
        """All of a server's listening sockets, or none: a socket left bound
        with nothing accepting on it would take clients and never greet them."""
        bound = []
        try:
            for name in SERVER_LISTENERS[server]:
                endpoint: Endpoint | None = getattr(self.settings.listen, name)
                if endpoint is None or name in self.sockets:
                    continue
                try:
                    self.sockets[name] = listenermod.bind(endpoint)
                except OSError as e:
                    raise ControlError(
                        f"cannot listen for {name} on {endpoint}: {e.strerror}"
                    ) from None
                bound.append(name)
        except ControlError:
            for name in bound:
                self.sockets.pop(name).close()
            raise

    def startService(self) -> None:
        super().startService()
        s = self.settings
        why = preflight.unrunnable()  # as the daemon's user: after --uid
        if why is not None:
            # Said first, and once: each job's and the bridge's failure to
            # start, which follow, name only their exit.
            self.log.error("{why}", why=why)
        if "." not in s.hostname.strip(".") or s.hostname.lower().startswith("localhost"):
            self.log.warn("this host's name is {name!r}: set [system] hostname to its fully "
                          "qualified name; the greeting, Received: fields, notices and the "
                          "system name of new directory entries use it", name=s.hostname)

        try:
            tlsconfig.ensure_pair(s)
        except OSError as e:  # a state directory another user made, say
            raise StartRefused(f"cannot make the TLS pair: {e}") from None
        # Taken before the files are read: a renewal during the check is seen
        # next time.  As the daemon's user, as every reload takes it.
        self.tls_state = tlsconfig.pair_state(s)
        warnings = self.tls_warnings
        if warnings is None:  # not kept as root already
            try:
                # Every job needs it: refused now; what is checked is what they load.
                pem, warnings = tlsconfig.check_pair(s)
                tlsconfig.keep_pair(s, pem)
            except configmod.SettingError as e:
                raise StartRefused(str(e)) from None
            except OSError as e:
                raise StartRefused(f"cannot keep the TLS pair for the jobs: {e}") from None
        for warning in warnings:
            self.log.warn("TLS: {warning}", warning=warning)
        try:
            configmod.write_applied(s)
        except OSError as e:
            raise StartRefused(f"cannot record the settings for the jobs: {e}") from None
        try:
            self.journal = self._journal(f"QSYSWRK/{self.pid}")
            self.journal.write("JG", "JG STR twistmail", pid=self.pid, config=self.config_path)
        except OSError as e:
            raise StartRefused(f"cannot write the journal: {e}") from None
        launcher = launch.ForkServer(self.reactor, POOL_PROGRAMS)
        for pgm in POOL_PROGRAMS:
            daemon = configmod.PROGRAMS[pgm]["daemon"]
            pool = Pool(
                self.reactor, pgm, s.prestart.entry(pgm), limits_of(s), self.applied_path,
                self._journal(f"{daemon}/{self.pid}"), _reject_reply(pgm, s.hostname),
                launcher.share(), end_reply=_reject_reply(pgm, s.hostname, ending=True),
            )
            pool.accepting_changed.append(lambda on, pgm=pgm: self._pool_accepting(pgm, on))
            self.pools[pgm] = pool
        from twistmail.directory import SqliteDirectory
        from twistmail.policy.connection import ConnectionPolicy

        self._check_directory()
        self.policy = ConnectionPolicy(self.reactor, s, SqliteDirectory.from_settings(s),
                                       self.journal)
        self.policy.start()
        for pool in self.pools.values():
            pool.session_ended = self.policy.closed
            pool.auth_failed = self._auth_failed
        self.control_port = self.reactor.listenUNIX(
            str(s.control_socket), ControlFactory(self), mode=0o600, backlog=511
        )
        started = self._autostart()
        for server in started:
            self._start_server(server, at_start=True)
        self._smtp_ended("*SMTP" not in started)  # read by the bridge as it starts
        self.bridge = BridgeSlot(self.reactor, self.applied_path, self.journal, self.lock_fd)
        self.bridge.start()
        # A Unix daemon's SIGHUP reads its settings again (config --apply); by
        # default it ended the controller without a word.
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._hung_up))
        self.log.info(
            "twistmail controller {pid} started; state in {datadir}; listening on {where}",
            pid=self.pid, datadir=s.datadir,
            where=", ".join(f"{n}={lst.address}" for n, lst in self.listeners.items()) or "-",
        )
        self._reread_if_changed()

    def _check_directory(self) -> None:
        """A directory that cannot serve refuses the start, in one line: the
        daemon ran, answered 451 to every message, and logged a traceback a
        second.  One locked by another program is waited for by every lookup."""
        import sqlite3

        from twistmail.directory import DirectoryLost, SqliteDirectory

        directory = SqliteDirectory.from_settings(self.settings)
        path = directory.path
        try:
            with directory as d:
                d.check()
        except DirectoryLost as e:
            raise StartRefused(str(e)) from None
        except sqlite3.OperationalError as e:
            if "locked" not in str(e):
                raise StartRefused(f"the directory {path} cannot be used ({e})") from None
            self.log.warn("the directory {path} is locked by another program; mail waits "
                          "(4xx) while it stays so", path=path)
        except sqlite3.DatabaseError as e:
            raise StartRefused(f"the directory {path} cannot be used ({e}): restore it from "
                               "the backup") from None

    def _reread_if_changed(self) -> None:
        """Apply what a command saved while this daemon started.

        The file was read before the control socket answered: a CHGPJE or
        CHGSMTPA run meanwhile found no daemon, saved its change and said it
        applies at the next start, which is this one.  A command that comes
        once the socket listens is answered, and reloads, after this.
        """
        try:
            fresh = configmod.load(self.config_path)
        except (configmod.SettingError, OSError):
            return  # an edit the next reload will refuse, with its reason
        if fresh != self.settings:
            try:
                self.cmd_reload(tls=False)
            except ControlError:
                pass  # logged by the reload

    def _hung_up(self) -> None:
        if not self.running:
            return
        try:
            self.cmd_reload()
        except ControlError:
            pass  # cmd_reload said why in the log

    def _journal(self, job: str) -> Journal:
        return Journal.from_settings(self.settings, job)

    def _start_server(self, server: str, at_start: bool = False) -> None:
        """Listen for ``server``; its jobs start too, except at the daemon's own
        start when STRJOBS is *NO (as at a subsystem's start: STRPJ starts them).
        An administrator's STRTCPSVR starts them whatever STRJOBS says."""
        self._bind_server(server)
        pool = self.pools[SERVERS[server]]
        for name in SERVER_LISTENERS[server]:
            sock = self.sockets.get(name)
            if sock is None or name in self.listeners:
                continue
            lst = listenermod.Listener(self.reactor, name, sock, self._accepted, pool.room)
            self.listeners[name] = lst
            if pool.is_accepting:
                lst.resume()
        self.servers[server] = True
        strjobs = self.settings.prestart.entry(pool.pgm).strjobs == "*YES"
        if strjobs or not (at_start or pool.active):
            pool.start()

    def _smtp_ended(self, ended: bool) -> None:
        """Tell the bridge whether the SMTP server runs: its client jobs run with it."""
        flag = self.settings.control_socket.parent / SMTP_ENDED
        try:
            if ended:
                flag.touch()
            else:
                flag.unlink(missing_ok=True)
        except OSError as e:
            self.log.error("cannot tell the bridge that SMTP {what}: {e}",
                           what="ended" if ended else "started", e=e)
            return
        if self.bridge is not None and self.bridge.process is not None:
            launch.send_signal(self.bridge.process, "HUP")

    def _stop_server(self, server: str, option: str, delay: float,
                     reason: str = "endtcpsvr") -> Any:
        for name in SERVER_LISTENERS[server]:
            lst = self.listeners.pop(name, None)
            if lst is not None:
                lst.close()
            self.sockets.pop(name, None)
        self.servers[server] = False
        return self.pools[SERVERS[server]].end(option, delay, reason=reason)

    def _auth_failed(self, ip: str) -> None:
        """A job's failed sign-on; at MAXAUTHFAIL the address's other sessions
        that are not signed on end too (each would go on guessing)."""
        if self.policy.anvil.auth_failed(ip):
            key = client_key(ip)
            for pgm, pool in self.pools.items():
                refusal = self.policy.authfail_reply(smtp=pgm == "QTMSSRCP")
                pool.cut_sessions(client_key, key, refusal.encode() + b"\r\n")

    def _accepted(self, sock: socket.socket, listener: str, peer: str) -> None:
        pgm = configmod.LISTENER_PROGRAM[listener]
        try:
            verdict = self.policy.check(peer, smtp=pgm == "QTMSSRCP",
                                        rbl=listener not in SUBMISSION_LISTENERS,
                                        gone=lambda: hung_up(sock))
        except Exception:  # as when a check's answer fails: in, and counted
            self.log.failure("connection check for {peer} failed; letting it in", peer=peer)
            verdict = None
        if verdict is None:
            self.pools[pgm].submit(sock, listener, peer)
        elif isinstance(verdict, defer.Deferred):
            verdict.addCallback(self._decided, sock, listener, peer)
            verdict.addErrback(self._check_failed, sock, listener, peer)
        else:
            self._refuse(sock, listener, peer, verdict)

    def _decided(self, verdict: Any, sock: socket.socket, listener: str, peer: str) -> None:
        if verdict is None:
            self.pools[configmod.LISTENER_PROGRAM[listener]].submit(sock, listener, peer)
        else:
            self._refuse(sock, listener, peer, verdict)

    def _check_failed(self, failure: Any, sock: socket.socket, listener: str,
                      peer: str) -> None:
        self.log.failure("connection check for {peer} failed; letting it in", failure,
                         peer=peer)
        self._decided(None, sock, listener, peer)

    def _refuse(self, sock: socket.socket, listener: str, peer: str, verdict: Any) -> None:
        if listener not in IMPLICIT_TLS:  # a plaintext line would be noise inside TLS
            try:
                sock.send(verdict.reply.encode() + b"\r\n")
            except OSError:
                pass
        sock.close()
        if verdict.anvil_counted:
            self.policy.closed(peer)
        if verdict.journal:
            esd = f"{verdict.code} REJ {peer}"
            if verdict.code == "JL":
                esd = f"JL LIMIT {verdict.fields.get('setting')} {peer}"
            self.journal.write(verdict.code, esd, listener=listener, **verdict.fields)

    def _pool_accepting(self, pgm: str, on: bool) -> None:
        for name, lst in self.listeners.items():
            if configmod.LISTENER_PROGRAM[name] == pgm:
                lst.resume() if on else lst.pause()

    # -- stop ----------------------------------------------------------

    def stopService(self) -> defer.Deferred:
        super().stopService()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no reload while it ends
        delay = float(self.settings.prestart.end_delay)
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Twisted's handler would stop the stopped reactor again: a
            # critical traceback for each Ctrl-C pressed while it ends.
            signal.signal(signum, lambda n, _, delay=delay: self.reactor.callFromThread(
                self.log.info, "{name} received: already ending (sessions get up to "
                "{delay:g} s, [prestart] end_delay)", name=signal.Signals(n).name,
                delay=delay))
        waits = []
        for server in list(self.servers):
            if self.servers[server]:
                waits.append(self._stop_server(server, "*CNTRLD", delay, reason="shutdown"))
        for pool in self.pools.values():
            if pool.jobs:
                waits.append(pool.end("*CNTRLD", delay, reason="shutdown"))
        if self.bridge is not None:
            # The bridge ends its own client jobs with the same delay, then
            # kills them KILL_AFTER later: it is given that long, and more.
            waits.append(self.bridge.stop("*CNTRLD", delay + 2 * KILL_AFTER))
        d = defer.DeferredList(waits)
        d.addBoth(lambda _: defer.DeferredList([p.launcher.stop() for p in self.pools.values()]))
        d.addBoth(self._stopped)
        return d

    def _stopped(self, _: Any) -> None:
        if self.policy is not None:
            self.policy.stop()
        if self.control_port is not None:
            self.control_port.stopListening()
        run = self.settings.control_socket.parent
        for name in (self.settings.control_socket.name, STATUS_FILE, RESET_FILE, SMTP_ENDED):
            # The bridge's status files too: it may have been killed before
            # it removed them.  The settings and the TLS pair the jobs load
            # stay: the next start need not write them, on a full disk either.
            (run / name).unlink(missing_ok=True)
        self._fold_directory_log()
        if self.journal is not None:
            self.journal.write("JH", "JH END twistmail", pid=self.pid)

    def _fold_directory_log(self) -> None:
        """Every job is gone: the directory file is left whole by itself."""
        import sqlite3

        from twistmail.directory import SqliteDirectory

        try:
            with SqliteDirectory.from_settings(self.settings) as d:
                d.fold_log()
        except (sqlite3.Error, OSError) as e:  # kept in its log, as SQLite reads it
            self.log.info("the directory's log is kept beside it ({e})", e=e)

    # -- control commands ---------------------------------------------

    def _client_pool_status(self) -> dict[str, Any] | None:
        """The bridge's QTMSCCLCP pool, as the bridge last wrote it (every second)."""
        import json

        if self.bridge is None or self.bridge.pid is None:
            return None
        try:
            return json.loads((self.settings.datadir / "run" / "QTMSCCLCP.json").read_text())
        except (OSError, ValueError):
            return None

    def _pool(self, pgm: str) -> Pool:
        pgm = _word("--pgm", pgm)
        if pgm not in self.pools:
            if pgm in configmod.PROGRAMS and self.bridge is not None and self.bridge.pid:
                raise ControlError(f"prestart entry {pgm} belongs to the bridge: ENDMSF ends "
                                   "its jobs and STRMSF starts them again; CHGPJE changes it "
                                   "live")
            if pgm in configmod.PROGRAMS:
                raise ControlError(f"prestart entry {pgm} has no jobs: the bridge that owns "
                                   "it is not running (STRMSF)")
            raise ControlError(
                f"--pgm: {pgm!r} is not a prestart entry; allowed: {', '.join(self.pools)}",
                usage=True,
            )
        return self.pools[pgm]

    def _servers(self, server: str) -> list[str]:
        server = _word("--server", server)
        if server == "*ALL":
            return list(SERVERS)
        if server not in SERVERS:
            raise ControlError(
                f"--server: {server!r} is not allowed; allowed: *SMTP, *POP, *ALL", usage=True
            )
        return [server]

    #: What may still be asked while the daemon stops: looking, not changing.
    WHILE_STOPPING = frozenset({"status", "dspactpj", "wrkactjob"})

    def refusal(self, command: str) -> str | None:
        """Why a control command is refused now; None when it may run.

        A STRTCPSVR or STRMSF during shutdown reopened listeners and
        restarted what was being ended, and the ending bridge was journaled
        as crashed.
        """
        if not self.running and command not in self.WHILE_STOPPING:
            return STOPPING
        return None

    def cmd_status(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "stopping": not self.running,
            "config": self.config_path,
            "servers": dict(self.servers),
            "listeners": {n: lst.address for n, lst in self.listeners.items()},
            "pools": self._pool_statuses(),
            "bridge": {"status": self.bridge.status, "pid": self.bridge.pid}
            if self.bridge
            else None,
            "restart_needed": list(self.restart_needed),
            # Any of the controller's writers (its own, each pool's); the jobs'
            # and the bridge's say so in the log.
            "journal_failing": next((j.failing for j in self._journals() if j.failing), None),
        }

    def _pool_statuses(self) -> dict[str, str]:
        statuses = {p: pool.status for p, pool in self.pools.items()}
        client = self._client_pool_status()  # the bridge's, while it runs
        if client is not None and isinstance(client.get("report"), dict):
            statuses["QTMSCCLCP"] = self._client_status(client["report"].get("status", "?"))
        elif self.bridge is not None and not self.bridge.wanted:
            statuses["QTMSCCLCP"] = "ENDED"  # the bridge runs them: ENDMSF ended them too
        return statuses

    def _client_status(self, status: str) -> str:
        """ENDTCPSVR *SMTP ends the client jobs; the bridge's file says so within a second."""
        return "ENDING" if status == "ACTIVE" and not self.servers["*SMTP"] else status

    def cmd_dspactpj(self, pgm: str, reset: bool = False) -> Any:
        if _word("--pgm", pgm) == "QTMSCCLCP":
            status = self._client_pool_status()
            if status is not None:
                if reset:
                    return self._client_pool_reset()
                report = dict(status["report"])
                if "status" in report:
                    report["status"] = self._client_status(report["status"])
                return report
        return self._pool(pgm).report(reset=reset)

    def _client_pool_reset(self) -> defer.Deferred:
        """DSPACTPJ RESET of the bridge's pool: the bridge resets, we show what was."""
        from twistmail.bridge import status

        def answered(report: dict[str, Any] | None) -> dict[str, Any]:
            if report is None:
                raise ControlError("DSPACTPJ RESET: the bridge did not answer; the QTMSCCLCP "
                                   "statistics were not reset")
            return report

        d = status.reset(self.reactor, self.settings.datadir / "run")
        return d.addCallback(answered)

    def cmd_wrkactjob(self) -> list[dict[str, Any]]:
        rows = []
        for server, pgm in SERVERS.items():
            if self.servers[server]:
                rows.append({
                    "job": configmod.PROGRAMS[pgm]["daemon"], "pgm": "", "pid": self.pid,
                    "status": "SELW", "uses": None, "peer": "",
                })
        if self.bridge is not None and self.bridge.pid is not None:
            rows.append({
                "job": "QTSMTPBRSR", "pgm": "", "pid": self.bridge.pid,
                "status": self.bridge.status, "uses": None, "peer": "",
            })
        for pool in self.pools.values():
            rows.extend(pool.listing())
        status = self._client_pool_status()
        if status is not None:
            rows.extend(status["jobs"])
        return rows

    def cmd_reload(self, tls: bool = True, config: str | None = None) -> dict[str, Any]:
        """Apply the file.  ``tls`` False (a command that changed another section,
        CHGPJE, CHGSMTPA...) leaves the TLS pair as it is: a renewal half done on
        disk meanwhile must not refuse that change; ``config --apply`` takes it.

        ``config``: the file the command changed.  Another file naming the same
        state directory is not this daemon's: reloading its own would apply
        nothing of the change, and the command would say it was applied."""
        if config is not None and not _same_file(config, self.config_path):
            raise ControlError(f"this daemon runs with {self.config_path}, not {config}: "
                               "the change is only in the file given")
        try:
            fresh = configmod.load(self.config_path)
        except (configmod.SettingError, OSError) as e:
            self.log.warn("configuration not applied: {e}", e=e)
            raise ControlError(f"configuration not applied: {e}", usage=True) from None
        old = self.settings
        # Listeners, the state directory and the host's names stay as started
        # until a restart, in this process and in every job it starts.
        restart = [sec for sec in ("listen", "system") if getattr(fresh, sec) != getattr(old, sec)]
        if fresh.directory != old.directory and "system" not in restart:
            # A link to the file re-pointed: a relative datadir moves with it.
            restart.append("system")
        self.restart_needed = restart
        new = attrs.evolve(fresh, listen=old.listen, system=old.system,
                           directory=old.directory)  # a link re-pointed since: at a restart
        if tls:
            tls_state, pem, warnings = self._check_tls(new)
        else:
            new = attrs.evolve(new, tls=old.tls)
            tls_state, pem, warnings = self.tls_state, None, []
        changed = configmod.changes(old, new)  # what applies now, not at a restart
        if new == old and tls_state == self.tls_state:
            self.log.info("configuration applied: nothing changed{restart}",
                          restart=_restart_text(restart))
            return {"applied": [], "changed": changed, "restart_needed": restart,
                    "warnings": warnings}
        try:
            configmod.write_applied(new)
            if pem is not None:  # only once nothing else can refuse the reload
                tlsconfig.keep_pair(new, pem)
        except OSError as e:
            self.log.warn("configuration not applied: cannot record it: {e}", e=e)
            raise ControlError(f"configuration not applied: cannot record it: {e}") from None
        self.settings = new
        applied = []
        for pgm, pool in self.pools.items():
            entry, limits = new.prestart.entry(pgm), limits_of(new)
            if entry != pool.entry or limits != pool.limits:
                pool.reconfigure(entry, limits)
                applied.append(f"prestart.{pgm}")
        if (new.smtp, new.limits) != (old.smtp, old.limits):
            self.policy.configure(new)
        if self.bridge is not None and self.bridge.process is not None:
            # The bridge owns the client pool and the delivery settings.
            launch.send_signal(self.bridge.process, "HUP")
            applied.append("bridge")
        tls_changed = tls_state != self.tls_state
        self.tls_state = tls_state
        if tls_changed or (new.smtp, new.pop, new.journal, new.storage, new.limits) != (
                old.smtp, old.pop, old.journal, old.storage, old.limits):
            for pool in self.pools.values():
                pool.reload_jobs()
            applied.append("jobs")
        if tls_changed:
            applied.append("tls")
        if new.smtp.journal != old.smtp.journal or new.journal != old.journal:
            for j in self._journals():
                j.configure(new)
            applied.append("journal")
        self.log.info("configuration applied: {changed} (reloaded: {applied}){restart}",
                      changed="; ".join(changed) or "the TLS pair",
                      applied=", ".join(applied) or "the settings file as read",
                      restart=_restart_text(restart))
        return {"applied": applied, "changed": changed, "restart_needed": restart,
                "warnings": warnings}

    def _check_tls(self, new: configmod.Settings
                   ) -> tuple[tuple[Any, ...], bytes | None, list[str]]:
        """The state of the pair the jobs will load after this reload, the pair
        itself when it changed (refused before anything applies), and what is
        worth a warning about it.

        A certificate renewed in place (same paths, new files) counts as a
        change: every job then loads it, not only the ones started later.
        """
        state = tlsconfig.pair_state(new)
        if state == self.tls_state and new.tls == self.settings.tls:
            return state, None, []
        unreadable = [p for p in tlsconfig.pair_paths(new) if not os.access(p, os.R_OK)]
        if unreadable and self.tls_warnings is not None and new.tls == self.settings.tls:
            # Files only root may read, read as root at the start: the rest of
            # the file applies, and the pair read then stays until a restart.
            warning = (f"tls: {unreadable[0]} cannot be read by the daemon's user; the pair "
                       "read at the start stays in use: restart to serve the renewed one")
            self.log.warn("{warning}", warning=warning)
            return self.tls_state, None, [warning]
        try:
            tlsconfig.ensure_pair(new)
            # Before the files are read: a renewal during the check is seen next time.
            state = tlsconfig.pair_state(new)
            pem, warnings = tlsconfig.check_pair(new)
        except (configmod.SettingError, OSError) as e:
            self.log.warn("configuration not applied: {e}", e=e)
            raise ControlError(f"configuration not applied: {e}", usage=True) from None
        for warning in warnings:
            self.log.warn("TLS: {warning}", warning=warning)
        return state, pem, [f"tls: {w}" for w in warnings]

    def _journals(self) -> list[Journal]:
        out = [self.journal] if self.journal else []
        return out + [p.journal for p in self.pools.values() if p.journal is not None]

    def cmd_strpj(self, pgm: str) -> str:
        pool = self._pool(pgm)
        if pool.active or pool.jobs:
            raise ControlError(
                f"STRPJ: {pool.pgm} still has active jobs; end them with ENDPJ first"
            )
        pool.start()
        return f"prestart jobs for {pool.pgm} started"

    def cmd_endpj(self, pgm: str, option: str = "*CNTRLD", delay: float = 30) -> str:
        pool = self._pool(pgm)
        option, delay = _end_args(option, delay)
        if not pool.active and not pool.jobs:
            raise ControlError(f"ENDPJ: {pool.pgm} has no active jobs")
        pool.end(option, delay)
        return f"prestart jobs for {pool.pgm} ending ({option})"

    def cmd_strtcpsvr(self, server: str) -> list[str]:
        done, failed = [], False
        for srv in self._servers(server):
            pool = self.pools[SERVERS[srv]]
            if self.servers[srv] and not pool.active:
                # Listening, with its entry ended by ENDPJ or stopped after
                # boot failures: starting the server again starts its jobs.
                if pool.jobs:
                    done.append(f"{srv} already started; its prestart jobs ({pool.pgm}) are "
                                f"still ending: strpj --pgm {pool.pgm} once they have")
                    failed = True
                else:
                    pool.start()
                    done.append(f"{srv} already started; its prestart jobs ({pool.pgm}) "
                                "were not running and are started")
                continue
            if self.servers[srv]:
                if srv == "*POP":  # IBM i starts one more server job
                    more = self.pools[SERVERS[srv]].start_one_more()
                    done.append(f"{srv} already started; " + (
                        "one more server job started" if more else
                        "no more server jobs: the entry is at MAXJOBS"))
                else:
                    done.append(f"{srv} already started")
                continue
            try:
                self._start_server(srv)
            except ControlError as e:  # *ALL: the others start all the same
                done.append(f"{srv} not started: {e}")
                failed = True
                continue
            if srv == "*SMTP":
                self._smtp_ended(False)
            done.append(f"{srv} started")
        if failed:
            raise ControlError("; ".join(done))
        return done

    def cmd_endtcpsvr(self, server: str) -> list[str]:
        done = []
        for srv in self._servers(server):
            if not self.servers[srv]:
                done.append(f"{srv} not started")
                continue
            self._stop_server(srv, "*IMMED", 0)
            if srv == "*SMTP":
                self._smtp_ended(True)
            done.append(f"{srv} ended")
        return done

    def cmd_strmsf(self, nbrmsfjob: int = NBRMSFJOB) -> str:
        if self.bridge.wanted:
            raise ControlError("STRMSF: the mail server framework is already active (CPFAFAD)")
        if type(nbrmsfjob) is not int or not 1 <= nbrmsfjob <= 99:  # JSON true is no count
            raise ControlError(f"--nbrmsfjob: {nbrmsfjob!r} is not allowed; allowed: 1-99",
                               usage=True)
        self.bridge.start(nbrmsfjob)
        return f"mail server framework started with {nbrmsfjob} QMSF jobs"

    def cmd_endmsf(self, option: str = "*CNTRLD", delay: float = 30) -> Any:
        option, delay = _end_args(option, delay)
        if not self.bridge.wanted:
            raise ControlError("ENDMSF: the mail server framework is not active")
        d = self.bridge.stop(option, delay)
        d.addCallback(lambda _: "mail server framework ended")
        return d


#: Where the mail itself lies: walked whole at a first start as ``--uid`` only.
BULK_DIRS = frozenset({"mailboxes", "snads"})
#: Levels of a mail area looked at on every start (mailboxes/SAM/Maildir/cur):
#: below them, only a directory found in the wrong hands is walked.
BULK_DEPTH = 3


def _give_tree(d: Path, previous: int, owner: tuple[int, int], whole: bool,
               dir_fd: int | None = None, shown: str | None = None) -> None:
    """A start as ``--uid``: the state directory becomes that user's.

    What root made in it before (``sudo twistmail crtusrprf`` ahead of the
    first start: the directory database, journal receivers) the daemon's user
    could not open: every recipient got 451.  Regular files and directories
    owned by root or by the directory's previous owner change hands.  The
    daemon's user may change the tree meanwhile, so each entry is opened
    without following a link and changed through that descriptor, only
    after its own check: no link, and no file with a second name, can lead
    root to give away anything outside.
    """
    start = os.fspath(d)
    for top, dirs, files, fd in os.fwalk(start, dir_fd=dir_fd, follow_symlinks=False):
        where = (shown or start) + top[len(start):]
        bulk: list[str] = []
        if not whole and top == start:
            bulk = [n for n in dirs if n in BULK_DIRS]
            dirs[:] = [n for n in dirs if n not in BULK_DIRS]
        for name in (*dirs, *files, *bulk):
            try:
                if name in bulk:
                    _give_bulk(fd, name, os.path.join(where, name), previous, owner, 0)
                else:
                    _give(fd, name, previous, owner)
            except OSError as e:
                raise StartRefused(f"cannot give {os.path.join(where, name)} to the "
                                   f"daemon's user: {e.strerror}") from None


def _give_bulk(dir_fd: int, name: str, path: str, previous: int, owner: tuple[int, int],
               depth: int) -> None:
    """A mail area after the first start: too large to walk at every start.

    A directory the daemon's user owns is trusted with its messages; the few
    levels above them are looked at, and a directory found in root's or the
    previous owner's hands (a root command of an older twistmail, a ``chown
    -R`` mistake) is given whole: its mail could not be delivered or read.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _give(dir_fd, name, previous, owner)
        return
    if st.st_uid in (0, previous) and (st.st_uid, st.st_gid) != owner:
        _give(dir_fd, name, previous, owner)
        # Through the descriptor of the directory it is in, never by its path:
        # the directories above are the daemon's user's, who could put a link
        # in place of one of them meanwhile and have root give away its target.
        _give_tree(Path(name), previous, owner, whole=True, dir_fd=dir_fd, shown=path)
        return
    if depth >= BULK_DEPTH:
        return
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # made a link since
            return
        raise
    try:
        with os.scandir(fd) as entries:
            names = [entry.name for entry in entries]
        for child in names:
            _give_bulk(fd, child, os.path.join(path, child), previous, owner, depth + 1)
    finally:
        os.close(fd)


def _give(dir_fd: int, name: str, previous: int, owner: tuple[int, int]) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if st.st_uid not in (0, previous) or (st.st_uid, st.st_gid) == owner:
            return  # the common case: nothing to open
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return  # a link, a socket, a FIFO: never opened
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ELOOP:  # made a link since
            return
        raise
    try:
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)
        if st.st_uid in (0, previous) and (stat.S_ISDIR(st.st_mode) or (
                regular and st.st_nlink == 1)):
            os.fchown(fd, *owner)
    finally:
        os.close(fd)


def _private(*directories: Path) -> None:
    """Those that exist lose their group and other bits; never through a link
    (as root), and quietly where this user may not change them (not its own)."""
    for directory in directories:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # not there yet, or a link: the checks after this one say so
        try:
            mode = os.fstat(fd).st_mode
            if mode & 0o077:
                os.fchmod(fd, mode & 0o700)
        except OSError:
            pass
        finally:
            os.close(fd)


def _open_no_link(directory: Path) -> int:
    """A directory of the state directory, as root: never through a link."""
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise StartRefused(f"{directory}: {e.strerror}; started as root, "
                           "twistmail takes no symbolic link there") from None


def _word(option: str, value: Any) -> str:
    """A name a control request gives (PGM, SERVER), in upper case; the socket
    takes requests from scripts too, which may send a number or a list."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ControlError(f"{option}: {value!r} is not allowed; allowed: a name", usage=True)
    return value.upper()


def _restart_text(sections: list[str]) -> str:
    return f"; restart needed for [{'], ['.join(sections)}]" if sections else ""


def _end_args(option: Any, delay: Any) -> tuple[str, float]:
    """OPTION and DELAY of ENDPJ and ENDMSF, checked before anything ends: the
    socket takes requests from scripts too, not only from the CLI's checks."""
    try:
        return (parse_value("--option", END_OPTION, option),
                float(parse_value("--delay", END_DELAY, delay)))
    except configmod.SettingError as e:
        raise ControlError(str(e), usage=True) from None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
