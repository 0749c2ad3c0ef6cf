"""Work management commands: CHGPJE, DSPACTPJ, WRKACTJOB, STRPJ/ENDPJ,
STRTCPSVR/ENDTCPSVR and STRMSF/ENDMSF.

CHGPJE writes the TOML file (comments kept) and then asks a running daemon
to re-read it, so the change applies at once without a restart; the other
commands act on the running daemon through the control socket.
"""

from __future__ import annotations

from typing import Any

import click

from twistmail import config as configmod
from twistmail.bridge.msf import NBRMSFJOB
from twistmail.cli.base import (
    Failure,
    app,
    cli,
    nothing_to_change,
    refused_change,
    usage_error,
    value_of,
)
from twistmail.cli.output import emit_record, emit_table
from twistmail.control import STOPPING, ControlError, NotRunning
from twistmail.settingtypes import END_DELAY, END_OPTION, Choice, Int, SettingError

PGM_CHOICES = ", ".join(configmod.PROGRAMS)
NBRMSFJOB_TYPE = Int(1, 99)
MSGOPT_TYPE = Choice(("*RESUME",))
SERVER_TYPE = Choice(("*SMTP", "*POP", "*ALL"))
START_TYPE = Choice(("*SMTP", "*POP", "*ALL", "*AUTOSTART"))


def _pgm(value: str) -> str:
    name = value.strip().upper().rsplit("/", 1)[-1]
    if name not in configmod.PROGRAMS:
        usage_error(f"--pgm: {value!r} is not a prestart program; allowed: {PGM_CHOICES}")
    return name


def call(cmd: str, **args: Any) -> Any:
    """One control request; maps refusals to one-line errors."""
    try:
        return app().control().call(cmd, **args)
    except NotRunning as e:
        raise Failure(str(e)) from None
    except ControlError as e:
        if e.usage:
            usage_error(str(e))
        raise Failure(str(e)) from None


def apply_live(what: str) -> None:
    """Ask a running daemon to re-read the file; say what happened."""
    try:
        result = app().control().call("reload", tls=False,
                                      config=str(app().config_path.absolute()))
    except NotRunning:
        click.echo(f"{what} saved; the daemon is not running, it applies at the next start")
        return
    except ControlError as e:
        if str(e) == STOPPING:
            click.echo(f"{what} saved; the daemon is stopping, it applies at the next start")
            return
        raise Failure(f"{what} saved, but the daemon did not apply it: {e}") from None
    if result.get("applied") == [] and not result.get("changed"):
        click.echo(f"{what}: the running daemon has these values already")
    else:
        click.echo(f"{what} changed and applied to the running daemon")
    say_after_reload(result)


def say_after_reload(result: dict[str, Any]) -> None:
    """What a reload leaves for the administrator: a restart to come, warnings."""
    if result.get("restart_needed"):
        click.echo("restart needed for: " + ", ".join(result["restart_needed"]))
    for warning in result.get("warnings", ()):
        click.echo(f"warning: {warning}", err=True)


ENTRY_KEYS = ("strjobs", "inljobs", "threshold", "adljobs", "maxjobs", "maxuse", "wait")


@cli.command()
@click.option("--pgm", required=True, help="Prestart program: " + PGM_CHOICES)
@click.option("--strjobs", help="*YES or *NO")
@click.option("--inljobs", help="1-9999 (QTPOPSRVP: 1-20, its NBRSVR)")
@click.option("--threshold", help="1-9999")
@click.option("--adljobs", help="0-999")
@click.option("--maxjobs", help="1-32000 or *NOMAX")
@click.option("--maxuse", help="1-1000 or *NOMAX")
@click.option("--wait", help="*YES or *NO")
def chgpje(pgm: str, **values: str | None) -> None:
    """Change a prestart job entry (CHGPJE); applies live."""
    from twistmail import configedit

    pgm = _pgm(pgm)
    changes: dict[str, Any] = {}
    for key in ENTRY_KEYS:
        raw = values.get(key)
        if raw is None or raw.strip().upper() == "*SAME":
            continue
        if pgm == "QTPOPSRVP" and key == "inljobs":
            # The POP entry's INLJOBS is CHGPOPA NBRSVR, kept in [pop].
            vtype = configmod.field_type(configmod.PopSettings, "nbrsvr")
            changes["pop.nbrsvr"] = value_of("--inljobs", vtype, raw)
            continue
        vtype = configmod.field_type(configmod.PrestartEntry, key)
        changes[f"prestart.{pgm}.{key}"] = value_of(f"--{key}", vtype, raw)
        if pgm == "QTMSCCLCP" and key == "strjobs" and changes[f"prestart.{pgm}.{key}"] != "*YES":
            # The bridge owns this entry: its jobs start with it and end with it.
            # (A file that says *NO still loads: the value has never done anything.)
            usage_error(f"--strjobs: {raw!r} is not allowed for QTMSCCLCP; allowed: *YES (the "
                        "SMTP client jobs start with the bridge, STRMSF, and end with it, ENDMSF)")
    if not changes:
        nothing_to_change("give at least one of " + ", ".join("--" + k for k in ENTRY_KEYS),
                          same_given=any(values.get(k) is not None for k in ENTRY_KEYS))
    try:
        configedit.set_values(app().editable_path(), changes)
    except SettingError as e:
        refused_change(e, {k: "--inljobs" if k == "pop.nbrsvr" else "--" + k.rsplit(".", 1)[-1]
                           for k in changes})
    apply_live(f"prestart entry {pgm}")


DSPACTPJ_LABELS = [
    ("pgm", "Program"),
    ("status", "Entry status"),
    ("elapsed", "Elapsed time (seconds)"),
    ("jobs_current", "Prestart jobs: current number"),
    ("jobs_average", "Prestart jobs: average number"),
    ("jobs_peak", "Prestart jobs: peak number"),
    ("in_use_current", "Prestart jobs in use: current number"),
    ("in_use_average", "Prestart jobs in use: average number"),
    ("in_use_peak", "Prestart jobs in use: peak number"),
    ("waiting_current", "Program start requests: current number waiting"),
    ("waiting_average", "Program start requests: average number waiting"),
    ("waiting_peak", "Program start requests: peak number waiting"),
    ("average_wait", "Program start requests: average wait time (seconds)"),
    ("accepted", "Program start requests: number accepted"),
    ("rejected", "Program start requests: number rejected"),
]


@cli.command()
@click.option("--pgm", required=True, help="Prestart program: " + PGM_CHOICES)
@click.option("--reset", is_flag=True, help="Start the statistics afresh after showing them.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def dspactpj(pgm: str, reset: bool, as_json: bool) -> None:
    """Display active prestart job statistics (DSPACTPJ)."""
    emit_record(call("dspactpj", pgm=_pgm(pgm), reset=reset), DSPACTPJ_LABELS, as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON array of jobs.")
def wrkactjob(as_json: bool) -> None:
    """Work with the appliance's active jobs (WRKACTJOB)."""
    columns = [("job", "Job"), ("pid", "PID"), ("status", "Status"), ("pgm", "Program"),
               ("uses", "Uses"), ("peer", "Client")]
    emit_table(call("wrkactjob"), columns, as_json)


@cli.command()
@click.option("--pgm", required=True, help="Prestart program: " + PGM_CHOICES)
def strpj(pgm: str) -> None:
    """Start prestart jobs (STRPJ): INLJOBS jobs of an entry that has none."""
    click.echo(call("strpj", pgm=_pgm(pgm)))


@cli.command()
@click.option("--pgm", required=True, help="Prestart program: " + PGM_CHOICES)
@click.option("--option", "option", default="*CNTRLD", show_default=True, help="*CNTRLD or *IMMED")
@click.option("--delay", default="30", show_default=True, help="seconds, 1-999999 (*CNTRLD)")
def endpj(pgm: str, option: str, delay: str) -> None:
    """End prestart jobs (ENDPJ)."""
    opt = value_of("--option", END_OPTION, option)
    secs = value_of("--delay", END_DELAY, delay)
    click.echo(call("endpj", pgm=_pgm(pgm), option=opt, delay=secs))


_server_option = click.option(
    "--server", "servers", multiple=True,
    help="*SMTP, *POP or *ALL (the default); repeat it for both servers")


def _servers(servers: tuple[str, ...]) -> list[str]:
    """The servers named (each once, in order), or *ALL."""
    named = [value_of("--server", SERVER_TYPE, s) for s in servers] or ["*ALL"]
    return ["*ALL"] if "*ALL" in named else list(dict.fromkeys(named))


@cli.command()
@click.option("--server", "servers", multiple=True,
              help="*SMTP, *POP, *ALL (the default), or *AUTOSTART (those whose AUTOSTART is "
                   "*YES); repeat it for both servers")
def strtcpsvr(servers: tuple[str, ...]) -> None:
    """Start TCP/IP servers in the running daemon (STRTCPSVR)."""
    servers = tuple(value_of("--server", START_TYPE, s) for s in servers)
    if "*AUTOSTART" in servers:
        settings = app().settings
        auto = [name for name, on in (("*SMTP", settings.smtp.autostart),
                                      ("*POP", settings.pop.autostart)) if on == "*YES"]
        servers = tuple(s for s in servers if s != "*AUTOSTART") + tuple(auto)
        if not servers:
            click.echo("no server has AUTOSTART *YES")
            return
    for server in _servers(servers):
        for line in call("strtcpsvr", server=server):
            click.echo(line)


@cli.command()
@_server_option
def endtcpsvr(servers: tuple[str, ...]) -> None:
    """End TCP/IP servers in the running daemon (ENDTCPSVR): connections drop at once.

    *SMTP ends the SMTP client jobs too, as on IBM i: deliveries under way
    finish, and outbound mail then waits queued until STRTCPSVR *SMTP."""
    for server in _servers(servers):
        for line in call("endtcpsvr", server=server):
            click.echo(line)


@cli.command()
@click.option("--msgopt", default="*RESUME", show_default=True,
              help="*RESUME: each message goes on from the step where it stopped")
@click.option("--nbrmsfjob", default=str(NBRMSFJOB), show_default=True,
              help="QMSF jobs, each processing one message at a time, 1-99")
def strmsf(msgopt: str, nbrmsfjob: str) -> None:
    """Start the mail server framework, the bridge (STRMSF)."""
    if msgopt.strip().upper() in ("*RESET", "*CLEAR"):
        # *RESET would deliver again what was delivered; *CLEAR would throw
        # accepted mail away.  Each message goes on from its own step.
        usage_error(f"--msgopt: {msgopt!r} is IBM's but not supported here; allowed: *RESUME")
    value_of("--msgopt", MSGOPT_TYPE, msgopt)
    click.echo(call("strmsf", nbrmsfjob=value_of("--nbrmsfjob", NBRMSFJOB_TYPE, nbrmsfjob)))


@cli.command()
@click.option("--option", "option", default="*CNTRLD", show_default=True, help="*CNTRLD or *IMMED")
@click.option("--delay", default="30", show_default=True, help="seconds, 1-999999")
def endmsf(option: str, delay: str) -> None:
    """End the mail server framework, the bridge (ENDMSF)."""
    opt = value_of("--option", END_OPTION, option)
    secs = value_of("--delay", END_DELAY, delay)
    click.echo(call("endmsf", option=opt, delay=secs))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status(as_json: bool) -> None:
    """Show whether the daemon runs, its servers, listeners and bridge."""
    try:
        result = app().control().call("status")
    except NotRunning as e:
        if as_json:
            click.echo('{"running": false}')
        else:
            click.echo(str(e))
        raise SystemExit(3) from None
    except ControlError as e:  # the socket is the daemon's user's, say
        raise Failure(str(e)) from None
    result["running"] = True
    if as_json:
        emit_record(result, [], True)
        return
    state = "stopping" if result.get("stopping") else "running"
    click.echo(f"twistmail daemon {state}, pid {result['pid']}")
    for srv, on in result["servers"].items():
        click.echo(f"  {srv:6} {'started' if on else 'ended'}")
    for name, addr in result["listeners"].items():
        click.echo(f"  listen {name:10} {addr}")
    for pgm, st in result["pools"].items():
        click.echo(f"  prestart {pgm:9} {st}")
    bridge = result.get("bridge") or {}
    pid = bridge.get("pid")
    click.echo(f"  bridge  {bridge.get('status')}" + (f" pid {pid}" if pid else ""))
    if result.get("restart_needed"):
        click.echo("  restart needed for: " + ", ".join(result["restart_needed"]))
    if result.get("journal_failing"):
        click.echo(f"  journal not written: {result['journal_failing']}")
