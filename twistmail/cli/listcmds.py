"""SMTP list entries from the shell: ADDSMTPLE, RMVSMTPLE and WRKSMTPLE.

The lists live in ``<datadir>/directory.sqlite`` (see ``twistmail.directory``)
and the daemon's jobs read them on every check, so these commands need no
running daemon and a change applies to the next connection, recipient or
message at once (IBM i applies list changes only at the next SMTP start).
Honours ``system.datadir`` through ``SqliteDirectory.from_settings``.  A
refused value is one line naming the option and what is allowed, exit 2; a
database that cannot be used is one line, exit 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from twistmail import directory as dirmod
from twistmail.cli.base import cli, open_directory, stdin_text, usage_error, value_of
from twistmail.cli.output import emit_table
from twistmail.directory import DirectoryError, ListEntry
from twistmail.settingtypes import Choice

LIST_TYPE = Choice(dirmod.LIST_TYPE_NAMES)
HIDDEN_PASSWORD = "*****"
LIVE = "Applies at once to the running daemon's next check; no daemon is needed."

COLUMNS = (
    ("type", "Type"),
    ("intnetadr", "Internet address"),
    ("subnetmask", "Subnet mask"),
    ("hostname", "Host name"),
    ("ftrdata", "Filter data"),
    ("username", "User name"),
    ("password", "Password"),
)

_TYPE_HELP = "List type: " + ", ".join(dirmod.LIST_TYPE_NAMES) + " (any case)."
_TYPE_MEANINGS = "List type (any case): " + "; ".join(
    f"{t.name} {t.meaning}" for t in dirmod.LIST_TYPES.values()
)
_OPTION_HELP = {
    "intnetadr": "Internet address, IPv4 or IPv6 (*ACCEPT, *REJECT, *DOMAIN, *SVRBIND, "
    "*CLTBIND, *ETRNSVR).",
    "subnetmask": "Subnet mask such as 255.255.255.0, or a prefix length such as 24 or 64 "
    "(*ACCEPT, *REJECT; default a single address).",
    "hostname": "Host or domain name (*NEAR, *DOMAIN, *ETRNSVR, *HOSTAUTH).",
    "ftrdata": "Filter pattern, * standing for one or more characters (*FTRSUBJECT, "
    "*FTRORIGIN, *FTRFILNAME, *FTRTYPE).",
    "username": "User name the SMTP client signs on with (*HOSTAUTH).",
    "password": "Password the SMTP client signs on with (*HOSTAUTH); - reads stdin.",
}


def _list_type(raw: str) -> str:
    return value_of("--type", LIST_TYPE, raw)


def _given(options: dict[str, str | None]) -> dict[str, str]:
    """The options given; an empty value counts as left out, as in the directory."""
    return {k: v for k, v in options.items() if v is not None and v.strip()}


def _check_options(list_type: str, given: dict[str, str], removal: bool = False) -> None:
    """The directory's keyword rules, checked here to word them with option names."""
    try:
        dirmod.check_list_keywords(list_type, given, removal=removal, spell=lambda k: f"--{k}")
    except DirectoryError as e:
        usage_error(e.said(f"--{e.field}"))


def _password(raw: str | None) -> str | None:
    """``-`` reads the password from standard input, keeping it out of ``ps``."""
    if raw != "-":
        return raw
    return stdin_text("--password")


#: RMVSMTPLE names an entry: the mask may be left out when one entry has the address.
_REMOVAL_HELP = {**_OPTION_HELP, "subnetmask": _OPTION_HELP["subnetmask"].replace(
    "default a single address", "may be left out when only one entry has the address")}


def _options(*names: str, type_help: str = _TYPE_HELP,
             helps: dict[str, str] = _OPTION_HELP) -> Callable[..., Any]:
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            f = click.option(f"--{name}", help=helps[name])(f)
        return click.option("--type", "list_type", required=True, help=type_help)(f)

    return decorate


def describe(entry: ListEntry) -> str:
    """An entry in one line for messages; never its password."""
    parts = [getattr(entry, k) for k in dirmod.LIST_KEYWORDS if k != "password"]
    return " ".join([entry.type, *(p for p in parts if p is not None)])


def _row(entry: ListEntry) -> dict[str, Any]:
    row: dict[str, Any] = {k: getattr(entry, k) for k, _ in COLUMNS}
    row["password"] = None if entry.password is None else HIDDEN_PASSWORD
    return row


def _used_columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """The columns some row fills, so a listing of one type stays narrow."""
    return tuple(c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows))


@cli.command("addsmtple", epilog=LIVE)
@_options(*dirmod.LIST_KEYWORDS, type_help=_TYPE_MEANINGS)
def addsmtple(list_type: str, **options: str | None) -> None:
    """Add an SMTP list entry (relay, reject, near domain, bind, ETRN, filter, host sign-on)."""
    list_type = _list_type(list_type)
    given = _given(options)
    _check_options(list_type, given)
    if "password" in given:
        given["password"] = _password(given["password"]) or ""
    with open_directory("the SMTP lists") as d:
        entry = d.add_list_entry(ListEntry(list_type, **given))
    click.echo(f"SMTP list entry {describe(entry)} added.")
    if entry.type == "*ACCEPT" and _everyone(entry):
        click.echo("Warning: this *ACCEPT entry takes every address: with ALWRLY *LIST or "
                   "*BOTH, anyone on the Internet may relay through this server.", err=True)
    if entry.type in _KEPT_ONLY:
        click.echo(f"note: {entry.type} entries are kept but not used: {_KEPT_ONLY[entry.type]}",
                   err=True)


#: List types IBM i has that twistmail records without acting on them.
_KEPT_ONLY = {
    "*SVRBIND": "the SMTP server listens on the addresses of [listen] smtp, submission and "
                'smtps in the settings file (e.g. smtp = "192.0.2.5:25"; a restart applies them)',
    "*DOMAIN": "every interface greets with [system] hostname and serves all of "
               "[system] local_domains",
}


def _everyone(entry: ListEntry) -> bool:
    """An address and mask that together cover every client address."""
    import ipaddress

    try:
        network = ipaddress.ip_network(f"{entry.intnetadr}/{entry.subnetmask}", strict=False)
    except ValueError:
        return False
    return network.prefixlen == 0


@cli.command("rmvsmtple", epilog=LIVE)
@_options("intnetadr", "subnetmask", "hostname", "ftrdata", "username", helps=_REMOVAL_HELP)
def rmvsmtple(list_type: str, **options: str | None) -> None:
    """Remove one SMTP list entry, named by its type and the keywords that identify it."""
    list_type = _list_type(list_type)
    given = _given(options)
    _check_options(list_type, given, removal=True)
    with open_directory("the SMTP lists") as d:
        entry = d.remove_list_entry(list_type, **given)
    click.echo(f"SMTP list entry {describe(entry)} removed.")


@cli.command("wrksmtple")
@click.option("--type", "list_type", help="Only this list type. " + _TYPE_HELP)
@click.option("--json", "as_json", is_flag=True, help="JSON array of entries.")
def wrksmtple(list_type: str | None, as_json: bool) -> None:
    """List the SMTP list entries; passwords show as *****."""
    if list_type is not None:
        list_type = _list_type(list_type)
    with open_directory("the SMTP lists") as d:
        rows = [_row(e) for e in d.list_entries(list_type)]
    columns = COLUMNS if as_json else _used_columns(rows)
    emit_table(rows, columns, as_json, empty="(no SMTP list entries)")
