"""The ``twistmail`` command group and what every subcommand shares.

Subcommands live in small modules next to this one and register themselves
on :data:`cli`; ``twistmail.cli.main`` imports them all.  Mistakes are one
line on stderr and exit status 2; a command that needs the daemon while it is
down says so in one line and exits 1.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from twistmail import config as configmod
from twistmail.identity import act_as_owner, as_invoker
from twistmail.settingtypes import FileError, SettingError, parse_value

EXIT_USAGE = 2
EXIT_FAILED = 1


class Failure(click.ClickException):
    """A command that could not do its work (not a usage mistake): exit 1.

    It is said with the command's name, as usage mistakes are.
    """

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        ctx = click.get_current_context(silent=True)
        self.command_path = ctx.command_path if ctx is not None else None


class AppContext:
    """Per-invocation state: the config path, loaded settings on demand."""

    def __init__(self, config_path: str) -> None:
        self.config_path = Path(config_path)
        self._settings: configmod.Settings | None = None
        #: A bad value in the file that a change command went on with.
        self.bad_value: SettingError | None = None

    @property
    def settings(self) -> configmod.Settings:
        if self._settings is None:
            try:
                with as_invoker():  # a settings file only root may read, under sudo
                    self._settings = configmod.load(self.config_path)
            except FileNotFoundError:
                raise click.UsageError(
                    f"--config: {str(self.config_path)!r} does not exist; "
                    "allowed: the path of a twistmail TOML file (or set TWISTMAIL_CONFIG)"
                ) from None
            except FileError as e:
                raise click.UsageError(f"{self.config_path}: {e.problem}") from None
            except SettingError as e:
                raise click.UsageError(f"{self.config_path}: {e}") from None
            except OSError as e:
                raise click.UsageError(
                    f"--config: {str(self.config_path)!r} cannot be read ({e.strerror}); "
                    "allowed: the path of a readable twistmail TOML file"
                ) from None
            from twistmail.controller import statedir

            with as_invoker():
                beside_link = statedir.left_beside_link(self._settings)
            if beside_link is not None:
                self._settings = None
                raise click.UsageError(f"{self.config_path}: {beside_link}")
            # Files made in the state directory must be the daemon's user's.
            act_as_owner(self._settings.datadir)
        return self._settings

    def editable_path(self) -> Path:
        """The file a change command writes.  A bad value in it stops no such
        command: it may be the one that sets it right, and the file is
        checked whole as it would be written (``configedit.set_values``)."""
        try:
            return self.settings.path
        except click.UsageError as bad:
            try:
                with as_invoker():
                    configmod.load(self.config_path)
            except SettingError as e:
                if not isinstance(e, FileError):  # a value, not the file as a whole
                    self.bad_value = e
                    return self.config_path.absolute()
            except Exception:  # missing, unreadable: the usage error says it
                pass
            raise bad from None

    def reload(self) -> configmod.Settings:
        self._settings = None
        return self.settings

    def control(self) -> Any:
        from twistmail.control import ControlClient

        try:
            return ControlClient(self.settings.control_socket)
        except click.UsageError:
            # A bad value in the file: the daemon still runs on what it
            # accepted, and status, wrkactjob, ... can still reach it.
            where = configmod.control_socket_of(self.config_path)
            if where is None:
                raise
            return ControlClient(where)


#: ``Context.meta`` key: the arguments are a translation of CL text.
FROM_CL = "twistmail.from_cl"


class Command(click.Command):
    """A command whose mistakes in the shape of its arguments are named, too.

    Click's parser leaves its errors without the command they came from,
    keeps the last of an option given twice, and takes the next option for
    a missing value; each of those is a one-line mistake here.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            if not ctx.meta.get(FROM_CL):  # CL text is checked in its own terms
                # A group's own options come before its command: what follows is
                # the command's to check.
                _check_shape(self.get_params(ctx), args, until_argument=isinstance(
                    self, click.Group))
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            if e.ctx is None:
                e.ctx = ctx
            raise


class Group(Command, click.Group):
    command_class = Command
    group_class = type  # subgroups (dcm) are Groups too


def _check_shape(params: list[click.Parameter], args: list[str],
                 until_argument: bool = False) -> None:
    """An option given twice, or another option where its value should be: a usage error."""
    options = {name: p for p in params if isinstance(p, click.Option)
               for name in (*p.opts, *p.secondary_opts)}
    seen: set[str] = set()
    at = 0
    while at < len(args) and args[at] != "--":
        name, eq, _ = args[at].partition("=") if args[at].startswith("--") else (args[at], "", "")
        at += 1
        param = options.get(name)
        if param is None:
            if until_argument and not name.startswith("-"):
                break
            continue
        if not param.is_flag and not param.count and not eq:
            for value in args[at: at + param.nargs]:
                if value in options:
                    many = f"{param.nargs} values" if param.nargs > 1 else "a value"
                    usage_error(f"{name}: takes {many}, got the option {value} instead "
                                f"({_what_it_takes(param)})")
            at += param.nargs
        if param.multiple or param.count:
            continue
        if param.name in seen:
            hint = "; a list goes in one value, e.g. 'a b'" if "list" in (param.help or "") \
                else ""
            usage_error(f"{name}: given twice; give it once{hint}")
        seen.add(param.name or name)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar="TWISTMAIL_CONFIG",
    default=configmod.DEFAULT_CONFIG,
    show_default=True,
    help="The appliance's TOML configuration file (or $TWISTMAIL_CONFIG); it goes "
         "before the command.",
)
@click.version_option(package_name="twistmail", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, config_path: str) -> None:
    """Administer the twistmail appliance with IBM i CL command names."""
    ctx.obj = AppContext(config_path)


def app(ctx: click.Context | None = None) -> AppContext:
    ctx = ctx or click.get_current_context()
    return ctx.find_object(AppContext)


def value_of(option: str, vtype: Any, raw: Any) -> Any:
    """Parse a CLI option with a setting's type; a bad value is a usage error."""
    try:
        return parse_value(option, vtype, raw)
    except SettingError as e:
        raise click.UsageError(str(e)) from None


#: The longest line a password read from standard input may be (/dev/zero has none).
MAX_STDIN_LINE = 4096


def stdin_text(option: str, whole: bool = False) -> str:
    """What ``OPTION -`` reads: one line (a password) or everything, as UTF-8."""
    if sys.stdin is None:  # descriptor 0 closed, as under some schedulers
        usage_error(f"{option}: '-' reads standard input, which is closed; "
                    "allowed: the value itself, or '-' with the value on standard input")
    stream = getattr(sys.stdin, "buffer", None)
    try:
        if stream is None:  # a text stream put in its place
            text = sys.stdin.read() if whole else sys.stdin.readline()
            return text if whole else text.rstrip("\r\n")
        data = stream.read() if whole else stream.readline(MAX_STDIN_LINE + 1)
    except (OSError, ValueError) as e:  # unreadable, or a closed file object
        usage_error(f"{option}: '-' could not read standard input ({e}); "
                    "allowed: the value itself, or '-' with the value on standard input")
    if not whole and len(data) > MAX_STDIN_LINE:
        usage_error(f"{option}: '-' read a line longer than {MAX_STDIN_LINE} bytes; allowed: "
                    "the value on one line of standard input")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        usage_error(f"{option}: standard input is not UTF-8 text; allowed: UTF-8 text")
    return text if whole else text.rstrip("\r\n")


#: Options that name files: any bytes are a valid file name, UTF-8 or not.
FILE_OPTIONS = frozenset({"config_path", "path", "outfile", "attach", "body_file"})


class TextContext(click.Context):
    """Every text argument must be UTF-8: mail, the directory and the TOML file hold it.

    The shell hands Python other bytes as surrogates, which fail far from
    the option that brought them (a traceback while building the mail);
    here the option is named instead.
    """

    def invoke(self, callback: Any, /, *args: Any, **kwargs: Any) -> Any:
        command = self.command
        if callback is getattr(command, "callback", None):
            for param in command.params:
                if param.name in FILE_OPTIONS or isinstance(param.type, click.Path):
                    continue
                for value in _strings(kwargs.get(param.name or "")):
                    if not _is_utf8(value):
                        name = param.opts[0] if param.opts else param.name
                        shown = "the value" if "password" in (param.name or "") else repr(value)
                        usage_error(f"{name}: {shown} is not UTF-8 text; allowed: UTF-8 text")
        return super().invoke(callback, *args, **kwargs)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _strings(v)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Commands whose text becomes another command, which checks it (and names its option).
PASSES_THROUGH = frozenset({"cl"})


def check_text(group: click.Group) -> None:
    """Give every command of ``group`` (and of its subgroups) the TextContext."""
    for name, command in group.commands.items():
        if name not in PASSES_THROUGH:
            command.context_class = TextContext
        if isinstance(command, click.Group):
            check_text(command)


def usage_error(message: str) -> NoReturn:
    raise click.UsageError(message)


def nothing_to_change(message: str, same_given: bool = False) -> NoReturn:
    """A change command given no value to change.

    From the shell with no value at all, a mistake (``message``).  In CL,
    where every keyword defaults to *SAME, or with values that are all
    *SAME (``same_given``), the command is complete and does nothing, as on
    IBM i.
    """
    ctx = click.get_current_context(silent=True)
    if same_given or (ctx is not None and ctx.meta.get(FROM_CL)):
        click.echo("nothing changed: every value is *SAME")
        raise click.exceptions.Exit(0)
    usage_error(message)


#: The parameters the mail APIs name in their refusals, as the CLI's options.
API_OPTIONS = {"file": "--file", "originator": "--from", "recipient": "--to/--cc/--bcc",
               "recipients": "--to/--cc/--bcc", "recipient type": "--to/--cc/--bcc",
               "usrprf": "--usrprf", "attachment": "--attach", "subject": "--subject",
               "body": "--body", "security": "--security", "password": "--password",
               "message": "the message"}


def api_refusal(e: Exception) -> NoReturn:
    """An API's one-line refusal, its parameter named as the option that gave it."""
    head, sep, rest = str(e).partition(": ")
    usage_error(f"{API_OPTIONS[head]}: {rest}" if sep and head in API_OPTIONS else str(e))


def refused_change(e: SettingError, options: dict[str, str]) -> NoReturn:
    """A change the configuration refused, told in the options the user gave.

    ``options`` maps each changed setting key to its option.  When the
    refused key is another one (CHGPJE MAXJOBS under INLJOBS), the message
    names the options given and the setting they conflict with.
    """
    option = options.get(e.key)
    bad = app().bad_value
    if bad is not None and bad.key == e.key and (option is None or e.value == bad.value):
        usage_error(f"{app().config_path}: {bad}")  # the file's, as any command says it
    if option is not None:
        usage_error(f"{option}: {e.value!r} is not allowed; allowed: {e.allowed}")
    name = e.key.rsplit(".", 1)[-1].upper()
    given = ", ".join(options.values())
    usage_error(f"{given}: {name} {e.value!r} would then be out of range; allowed for "
                f"{name}: {e.allowed}")


@contextmanager
def open_directory(what: str, option_of_field: Mapping[str, str] | None = None) -> Iterator[Any]:
    """The directory of this configuration; its refusals become one-line usage errors.

    ``option_of_field`` names the CLI option for a directory field where they differ.
    """
    import sqlite3

    from twistmail import directory as dirmod

    settings = app().settings
    try:
        with dirmod.SqliteDirectory.from_settings(settings) as d:
            yield d
    except dirmod.DirectoryError as e:
        option = (option_of_field or {}).get(e.field, e.field)
        usage_error(e.said(f"--{option}"))
    except (sqlite3.Error, OSError) as e:
        raise Failure(
            f"{settings.datadir / dirmod.FILENAME}: {what} cannot be used ({e})"
        ) from None


#: Click 8.2 and later raise this for a group given no command; 8.1 prints the help itself.
_NO_ARGS: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


def run(args: list[str] | None = None, prog_name: str = "twistmail") -> int:
    """Run the CLI; returns the exit status instead of raising SystemExit."""
    try:
        rv = cli.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except _NO_ARGS as e:  # a group with no command: its help
        click.echo(e.ctx.get_help())
        return EXIT_USAGE
    except click.UsageError as e:
        name = e.ctx.command_path if e.ctx is not None else prog_name
        click.echo(f"{name}: {_bounded(_usage_message(e))}", err=True)
        return EXIT_USAGE
    except click.ClickException as e:
        name = getattr(e, "command_path", None) or prog_name
        click.echo(f"{name}: {_bounded(_one_line(e.format_message()))}", err=True)
        return e.exit_code
    except click.Abort:
        click.echo(f"{prog_name}: aborted", err=True)
        return EXIT_FAILED
    except BrokenPipeError:
        return 0
    except OSError as e:  # a file the command needed: say which, in one line
        where = f": {e.filename}" if e.filename else ""
        click.echo(f"{prog_name}: {e.strerror or e}{where}", err=True)
        return EXIT_FAILED
    return rv if isinstance(rv, int) else 0


def _usage_message(e: click.UsageError) -> str:
    """One line naming the option and what it takes, where click's own line does not."""
    if isinstance(e, click.NoSuchOption):
        if e.option_name == "--config" and e.ctx is not None and e.ctx.parent is not None:
            return ("--config: goes before the command; allowed: twistmail --config FILE "
                    f"{e.ctx.info_name} ...")
        return f"{_shown(e.option_name)}: no such option{_known_options(e)}"
    if isinstance(e, click.BadOptionUsage):
        param = _option(e.ctx, e.option_name)
        if param is not None and param.nargs > 1:
            return f"{e.option_name}: takes {param.nargs} values ({_what_it_takes(param)})"
        if param is not None and param.help and "requires an argument" in e.format_message():
            return f"{e.option_name}: a value is needed ({_what_it_takes(param)})"
    elif isinstance(e, click.MissingParameter):
        if isinstance(e.param, click.Option) and e.param.help:
            return missing_option(e.param)
    extra = _EXTRA_ARGS.fullmatch(e.format_message())
    if extra is not None:
        return _extra_arguments(e.ctx, extra.group(1))
    command = _NO_COMMAND.fullmatch(e.format_message())
    if command is not None and isinstance(getattr(e.ctx, "command", None), click.Group):
        given = command.group(1)
        what = "a command is needed" if given is None else f"{_shown(given)}: no such command"
        return f"{what}; allowed: {', '.join(sorted(e.ctx.command.list_commands(e.ctx)))}"
    return _one_line(e.format_message())


def missing_option(param: click.Option) -> str:
    """An option left out, with what it takes: its help is that line (a
    description, and the values where there are few)."""
    return f"{param.opts[0]}: required ({_what_it_takes(param)})"


def _what_it_takes(param: click.Parameter) -> str:
    """An option's help, which says what it takes (and the values, where there are few)."""
    return (getattr(param, "help", None) or param.name or "").rstrip(".")


#: click's words for a command that is not there, or not given.
_NO_COMMAND = re.compile(r"No such command '(.*)'\.|Missing command\.", re.S)


def _shown(text: str) -> str:
    """What the user typed, quoted when it holds what a terminal would act on."""
    return text if text.isprintable() and text.strip() else repr(text)


#: click's words for words left over after the options (it has no class for them).
_EXTRA_ARGS = re.compile(r"Got unexpected extra arguments? \((.*)\)", re.S)


def _extra_arguments(ctx: click.Context | None, words: str) -> str:
    """Say what the command takes; a CL keyword, ``MAXRCPT(5)``, goes to ``cl``."""
    known = ""
    if ctx is not None:
        names = sorted(max(p.opts, key=len) for p in ctx.command.get_params(ctx)
                       if isinstance(p, click.Option) and "--help" not in p.opts)
        known = f"; allowed: {', '.join(names)}" if names else "; allowed: no arguments"
    hint = ""
    if ctx is not None and re.fullmatch(r"\w+\(.*\)", (words.split() or [""])[0]):
        hint = f' (CL keywords go to cl: twistmail cl "{ctx.info_name.upper()} {words}")'
    return f"{_shown(words)}: not an option{known}{hint}"


def _option(ctx: click.Context | None, name: str) -> click.Option | None:
    if ctx is None:
        return None
    for param in ctx.command.get_params(ctx):
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def _known_options(e: click.NoSuchOption) -> str:
    """What might have been meant, and what the command takes."""
    close = f"; did you mean {', '.join(sorted(e.possibilities))}?" if e.possibilities else ""
    if e.ctx is None:
        return close
    names = sorted(max(p.opts, key=len) for p in e.ctx.command.get_params(e.ctx)
                   if isinstance(p, click.Option))
    return f"{close}; allowed: {', '.join(names)}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


#: A quoted value in a message (as repr writes it) longer than this is cut.
SHOWN_MAX = 60
#: A quote that opens a value follows no letter and one that closes it is
#: followed by none: the apostrophe of "file's" in the text around a value
#: neither opens nor closes one.
_LONG_QUOTED = re.compile(
    (r"(?<![\w'\"])'(?:[^'\\]|\\.){%d,}'(?!\w)" + r'|(?<![\w\'"])"(?:[^"\\]|\\.){%d,}"(?!\w)')
    % (SHOWN_MAX + 20, SHOWN_MAX + 20))


def _bounded(message: str) -> str:
    """The message with each long value it quotes cut: a 100,000-character
    name made a line of 100,000 characters, where its start says enough."""
    def cut(m: re.Match[str]) -> str:
        quoted = m.group(0)
        return f"{quoted[:SHOWN_MAX + 1]}...{quoted[0]} ({len(quoted) - 2} characters)"
    return _LONG_QUOTED.sub(cut, message)


def main() -> None:
    sys.exit(run())
