"""twistd glue: ``twistd -n twistmail --config etc/twistmail.toml``.

A bad configuration stops start-up with one line naming the key, the value
and what is allowed, and exit status 2: no traceback for a typo.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from twistmail import config as configmod


class Options(usage.Options):
    optParameters = [
        ["config", "c", configmod.DEFAULT_CONFIG, "The appliance's TOML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self.settings = configmod.load(self["config"])
        except FileNotFoundError:
            _fatal(f"--config: {self['config']!r} does not exist")
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


def _fatal(message: str) -> None:
    sys.stderr.write(f"twistmail: {message}\n")
    raise SystemExit(2)


def makeService(options: Options):  # noqa: ANN201 - twistd's interface
    from twistmail.controller.service import Controller

    return Controller(options.settings)
