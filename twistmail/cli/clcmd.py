"""``twistmail cl "CHGPJE PGM(QTMSSRCP) MAXJOBS(50)"``: any command in CL syntax.

An IBM i administrator's habits and saved CL source work unchanged.  The
text is translated against the click command actually registered, so the
keywords accepted are exactly that command's options and its own checks and
messages apply; ``--show`` prints the translation so the Unix spelling can be
learnt from it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import Any

import click
from click.core import ParameterSource

from twistmail.cli import clparse
from twistmail.cli.base import FROM_CL, cli, missing_option


@cli.command("cl", short_help="Run a command written in IBM i CL syntax.")
@click.argument("text", nargs=-1, required=True, metavar="'CL COMMAND'")
@click.option(
    "--show", is_flag=True, help="Print the twistmail command line instead of running it."
)
@click.pass_context
def cl(ctx: click.Context, text: Sequence[str], show: bool) -> Any:
    """Run a command written as IBM i CL, e.g. "CHGPJE PGM(QTCP/QTMSSRCP) MAXJOBS(50)"."""
    group_ctx = _group_context(ctx)
    source = " ".join(text)
    try:
        sub = _subcommand(ctx, group_ctx, clparse.command_name(source))
        options, multiple = command_options(sub)
        args = clparse.to_args(clparse.parse(source), options, multiple=multiple)
    except clparse.ClError as e:
        raise click.UsageError(str(e), ctx) from None
    if show:
        click.echo(shlex.join([*_group_args(group_ctx), *args]))
        return None
    return _invoke(group_ctx, sub, args)


def command_options(command: click.Command) -> tuple[dict[str, int | None], frozenset[str]]:
    """The long options of ``command`` with their nargs (0 for switches), and the repeatable.

    Help is left out: ``HELP(*YES)`` is not something a CL command has.
    """
    options: dict[str, int | None] = {}
    multiple: set[str] = set()
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        nargs = 0 if param.is_flag or param.count else param.nargs
        for opt in param.opts:
            if opt.startswith("--"):
                options[opt[2:]] = nargs
                if param.multiple:
                    multiple.add(opt[2:])
    return options, frozenset(multiple)


def _group_context(ctx: click.Context) -> click.Context:
    parent = ctx.parent
    if parent is None or not isinstance(parent.command, click.Group):
        raise click.UsageError("cl runs CL commands of a command group; it has none", ctx)
    return parent


def _subcommand(ctx: click.Context, group_ctx: click.Context, name: str) -> click.Command:
    group = group_ctx.command
    assert isinstance(group, click.Group)
    sub = group.get_command(group_ctx, name.lower())
    if sub is None or not _is_cl_command(sub, ctx.command):
        supported = ", ".join(n.upper() for n in _supported(ctx, group_ctx))
        raise click.UsageError(f"CL command {name} is not supported; supported: {supported}", ctx)
    return sub


def _supported(ctx: click.Context, group_ctx: click.Context) -> list[str]:
    group = group_ctx.command
    assert isinstance(group, click.Group)
    names = []
    for name in group.list_commands(group_ctx):
        sub = group.get_command(group_ctx, name)
        if sub is not None and not sub.hidden and _is_cl_command(sub, ctx.command):
            names.append(name)
    return names


def _is_cl_command(sub: click.Command, itself: click.Command) -> bool:
    """Groups (``dcm``) take subcommands, not keywords, and ``cl`` would only recurse."""
    return sub is not itself and not isinstance(sub, click.Group)


def _group_args(group_ctx: click.Context) -> list[str]:
    """How the group was called, so a shown command line runs against the same config."""
    args = group_ctx.command_path.split()
    if group_ctx.get_parameter_source("config_path") is ParameterSource.COMMANDLINE:
        args += ["--config", str(group_ctx.params["config_path"])]
    return args


def _invoke(group_ctx: click.Context, sub: click.Command, args: list[str]) -> Any:
    """Run ``sub`` as the group would: same settings object, same exit status."""
    group_ctx.meta[FROM_CL] = True  # a CL value may be any text, "--text" too
    try:
        with sub.make_context(args[0], args[1:], parent=group_ctx) as sub_ctx:
            return sub.invoke(sub_ctx)
    except click.ClickException as e:
        # Told in the words it was asked in: MAXJOBS, not --maxjobs; ENTTYP,
        # not the --code it maps to.
        typed = {option: keyword for (command, keyword), option in clparse.SYNONYMS.items()
                 if command == sub.name.upper()}
        own = command_options(sub)[0]  # not the group's --config, which CL has no word for

        def keyword(m: re.Match[str]) -> str:
            name = m.group(1)
            return typed.get(name.upper(), name.upper()) if name in own else m.group(0)

        if isinstance(e, click.MissingParameter) and isinstance(e.param, click.Option) \
                and e.param.help:
            # click words this one only when it is shown, from the option itself.
            raise click.UsageError(_OPTION.sub(keyword, missing_option(e.param)),
                                   e.ctx) from None
        e.message = _OPTION.sub(keyword, e.message)
        raise


_OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*[a-z0-9])")
