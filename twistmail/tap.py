"""twistd glue: ``twistd -n twistmail --config etc/twistmail.toml``.

A bad configuration stops start-up with one line naming the key, the value
and what is allowed, and exit status 2: no traceback for a typo.
"""

from __future__ import annotations

import os
import pwd
import sys
from typing import Any

from twisted.python import usage

from twistmail import StartRefused
from twistmail import config as configmod


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "The appliance's TOML configuration file (default: "
         f"$TWISTMAIL_CONFIG, else {configmod.DEFAULT_CONFIG})."],
    ]

    def postOptions(self) -> None:
        # As the commands read it: a daemon and its commands on one file.
        self["config"] = (self["config"] or os.environ.get("TWISTMAIL_CONFIG")
                          or configmod.DEFAULT_CONFIG)
        try:
            self.settings = configmod.load(self["config"])
        except FileNotFoundError:
            _fatal(f"--config: {self['config']!r} does not exist")
        except configmod.FileError as e:  # names the file already
            _fatal(str(e))
        except configmod.SettingError as e:
            _fatal(f"{self['config']}: {e}")
        except OSError as e:  # a directory, unreadable, ...
            _fatal(f"--config: {self['config']!r} cannot be read: {e.strerror}")
        if self.settings.tls.certificate:  # every job loads it: refuse a pair that cannot serve
            from twistmail import tlsconfig

            try:
                tlsconfig.server_options(self.settings, check=True)
            except configmod.SettingError as e:
                _fatal(str(e))
        # Checked again when the service starts; asked here as well because
        # here, before twistd daemonises, the refusal is still one plain line.
        from twistmail.control import socket_in_use

        path = self.settings.control_socket
        if socket_in_use(path):
            _fatal(f"another daemon is running (it answers on {path})", status=1)


def _fatal(message: str, status: int = 2) -> None:
    sys.stderr.write(f"twistmail: {message}\n")
    raise SystemExit(status)


def makeService(options: Options):  # noqa: ANN201 - twistd's interface
    import signal

    from twistmail.controller.service import Controller

    # Until the controller takes it (a reload), a SIGHUP must not end the
    # daemon half started, as its default action would.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.excepthook = _refusal_in_one_line(sys.excepthook)
    _raise_file_limit()

    return Controller(options.settings, owner=run_as(getattr(options, "parent", None)))


#: The descriptors the daemon asks for, up to the hard limit: every session
#: holds one in the controller until its job takes it, and every job two.
FILE_LIMIT = 65536


def _raise_file_limit() -> None:
    """Lift the soft RLIMIT_NOFILE (1024 under systemd) towards the hard one.

    Out of descriptors, accepts and job starts fail while clients wait.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FILE_LIMIT if hard == resource.RLIM_INFINITY else min(hard, FILE_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass  # kept as it is: the limit is the administrator's


def _refusal_in_one_line(previous: Any) -> Any:
    """twistd lets a start-up exception end the process: a refusal is one line
    on the terminal (and in the log of a daemon), not a traceback."""

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, StartRefused):
            previous(kind, value, tb)
            return
        try:
            sys.stderr.write(f"twistmail: {value}\n")  # twistd's log when it took stderr
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass

    return hook


def run_as(twistd: Any) -> tuple[int, int] | None:
    """The user and group twistd switches to after binding (``--uid``/``--gid``).

    What the daemon makes while still root (the state directory, its lock,
    run/ and journal/) must belong to them, or the daemon cannot go on.
    -1 keeps an owner as it is.
    """
    if twistd is None:
        return None
    uid, gid = twistd.get("uid"), twistd.get("gid")
    if uid is not None and gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    if uid is None and gid is None:
        return None
    return (-1 if uid is None else uid, -1 if gid is None else gid)
