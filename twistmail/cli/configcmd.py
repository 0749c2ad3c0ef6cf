"""``twistmail config``: the settings in effect, all of them or the changed ones.

Each line is ``dotted.key = value`` with the value written as in the TOML
file, so the listing is itself valid TOML: an administrator can paste a line
into the file, and a program can read the whole output back.  ``--json``
gives the same as an array of ``{"key", "value", "default"}`` objects.
"""

from __future__ import annotations

import json
from typing import Any

import click
import tomlkit

from twistmail import config as configmod
from twistmail.cli.base import app, cli, usage_error
from twistmail.cli.poolcmds import say_after_reload

ALL_DEFAULT = "# every setting has its default value"


@cli.command("config")
@click.option(
    "-n",
    "--non-default",
    is_flag=True,
    help="Only the settings that differ from their defaults.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON array of {key, value, default}.")
@click.option("--apply", is_flag=True, help="Apply the file to the running daemon: after "
              "editing it by hand, or renewing the TLS certificate files in place.")
def config_command(non_default: bool, as_json: bool, apply: bool) -> None:
    """Show the settings read from the configuration file (or --apply them)."""
    if apply:
        if non_default or as_json:
            given = " and ".join(o for o, on in (("-n", non_default), ("--json", as_json)) if on)
            usage_error(f"--apply: it shows what it applied, not a listing; allowed "
                        f"without {given}")
        _apply()
        return
    rows = setting_rows(app().settings, non_default)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif non_default and not rows:
        click.echo(ALL_DEFAULT)
    else:
        for row in rows:
            click.echo(_line(row, with_default=non_default))


def _apply() -> None:
    from twistmail.cli.poolcmds import call

    app().reload()  # a file the daemon would refuse is told first, in one line (exit 2)
    result = call("reload", config=str(app().config_path.absolute()))
    applied = ", ".join(result.get("applied", ())) or "nothing changed"
    click.echo(f"configuration applied to the running daemon: {applied}")
    for change in result.get("changed", ()):
        click.echo(f"  {change}")
    say_after_reload(result)


def setting_rows(settings: configmod.Settings, non_default: bool) -> list[dict[str, Any]]:
    """One row per setting, values in their TOML form ("*NOMAX", [3, 30]).

    What counts as changed is ``config.differences``'s decision, so this
    listing and anything else built on it agree.
    """
    changed = {key for key, _, _ in configmod.differences(settings)}
    return [
        {"key": key, "value": vtype.dump(value), "default": vtype.dump(default)}
        for key, vtype, value, default in configmod.iter_settings(settings)
        if not non_default or key in changed
    ]


def _line(row: dict[str, Any], with_default: bool) -> str:
    line = f"{row['key']} = {_toml(row['value'])}"
    if with_default:
        line += f"  # default: {_toml(row['default'])}"
    return line


def _toml(value: Any) -> str:
    return tomlkit.item(value).as_string()
