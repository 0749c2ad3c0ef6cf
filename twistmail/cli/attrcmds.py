"""CHGSMTPA/DSPSMTPA and CHGPOPA/DSPPOPA: the attributes of the SMTP and POP servers.

The options are made from the settings classes, so every ``[smtp]`` and
``[pop]`` key is a keyword of the same name with the same allowed values.
A change is saved in the TOML file (comments kept) and applied at once: the
daemon re-reads the file and tells its jobs to, so new sessions see it.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
import click

from twistmail import config as configmod
from twistmail.cli.base import (
    Command,
    Failure,
    app,
    cli,
    nothing_to_change,
    refused_change,
    value_of,
)
from twistmail.cli.output import emit_record
from twistmail.cli.poolcmds import apply_live
from twistmail.settingtypes import IntPair, SettingError, TextList


def _options(cls: type) -> list[click.Option]:
    out = []
    for f in attrs.fields(cls):
        vtype = f.metadata["type"]
        nargs = 2 if isinstance(vtype, IntPair) else 1
        same = " (each may be *SAME or *DFT)" if nargs == 2 else ", *DFT"
        if isinstance(vtype, TextList):
            same += "; the list in one value, blank-separated"
        out.append(click.Option([f"--{f.name}"], nargs=nargs, default=None,
                                help=f"{f.metadata['doc']}; {vtype.allowed}{same}"))
    return out


def _change(section: str, cls: type, what: str, values: dict[str, Any]) -> None:
    from twistmail import configedit

    changes: dict[str, Any] = {}
    for name, raw in values.items():
        if raw is None:
            continue
        words = [w.strip().upper() for w in (raw if isinstance(raw, tuple) else (raw,))]
        if all(w == "*SAME" for w in words):
            continue
        default = attrs.fields_dict(cls)[name].default
        if all(w == "*DFT" for w in words):
            changes[f"{section}.{name}"] = default
            continue
        vtype = configmod.field_type(cls, name)
        if isinstance(raw, tuple) and "*DFT" in words and "*SAME" not in words:
            # RTYMIN(4 *DFT): nothing from the file, so not stopped by a bad value there.
            changes[f"{section}.{name}"] = _pair(section, name, raw, words, default, vtype)
            continue
        if isinstance(raw, tuple) and "*SAME" in words:
            # An element of a pair (RTYMIN's count or minutes) kept or reset
            # alone: checked now, and made again from the file as it is written.
            make = functools.partial(_pair, section, name, raw, words, default, vtype)
            try:
                current = app().settings
            except click.UsageError:  # a bad value elsewhere: checked as the file is written
                current = None
            if current is not None:
                make(current)
            changes[f"{section}.{name}"] = configedit.FromFile(make)
            continue
        text = " ".join(raw) if isinstance(raw, tuple) else raw
        changes[f"{section}.{name}"] = value_of(f"--{name}", vtype, text)
    if not changes:
        nothing_to_change(f"give at least one attribute to change; see --help for the {what} "
                          "keywords", same_given=any(v is not None for v in values.values()))
    options = {k: "--" + k.rsplit(".", 1)[-1] for k in changes}
    nbrsvr = changes.get("pop.nbrsvr")
    if nbrsvr is not None:
        # IBM's CHGPOPA NBRSVR is 1-20 whatever else is set: the POP server's
        # THRESHOLD (at most its initial jobs, NBRSVR) follows it down.
        changes["prestart.QTPOPSRVP.threshold"] = configedit.FromFile(
            lambda s: nbrsvr if s.prestart.QTPOPSRVP.threshold > nbrsvr
            else configedit.UNCHANGED)
    path = app().editable_path()
    try:
        before = configedit.set_values(path, changes)
    except SettingError as e:
        refused_change(e, options)
    except OSError as e:
        raise Failure(f"cannot write {path}: {e.strerror}") from None
    if nbrsvr is not None and before is not None:
        old = before.prestart.QTPOPSRVP.threshold
        if old > nbrsvr:
            click.echo(f"note: THRESHOLD of QTPOPSRVP lowered from {old} to NBRSVR {nbrsvr}",
                       err=True)
    apply_live(what)
    settings = getattr(app().reload(), section)
    for line in getattr(settings, "idle_values", list)():
        click.echo(f"note: {line}", err=True)
    if changes.get("smtp.nfydlvry"):
        _say_unreached(changes["smtp.nfydlvry"])


def _say_unreached(address: str) -> None:
    """NFYDLVRY names a person; one in a local domain with no mailbox here
    would have every copy of a failure notice dropped (7U), said only then."""
    from twistmail import directory as dirmod

    settings = app().settings
    if not (settings.datadir / dirmod.FILENAME).exists():
        return
    with dirmod.SqliteDirectory.from_settings(settings) as d:
        res = d.resolve(address)
    if res is None:
        click.echo(f"note: {address} is no mailbox here (no directory entry takes it): copies "
                   "of failure notices for it are dropped until one does", err=True)


def _pair(section: str, name: str, raw: tuple[str, ...], words: list[str], default: Any,
          vtype: Any, settings: configmod.Settings | None = None) -> Any:
    """A pair with its *SAME elements taken from ``settings``, its *DFT from the default."""
    current = getattr(getattr(settings, section), name) if settings is not None else None
    text = " ".join(str(current[i]) if w == "*SAME" else str(default[i]) if w == "*DFT"
                    else raw[i] for i, w in enumerate(words))
    return value_of(f"--{name}", vtype, text)


def _display(section_obj: Any, as_json: bool) -> None:
    record: dict[str, Any] = {}
    labels = []
    for f in attrs.fields(type(section_obj)):
        value = getattr(section_obj, f.name)
        vtype = f.metadata["type"]
        record[f.name] = vtype.dump(value) if as_json else vtype.show(value)
        labels.append((f.name, f"{f.name.upper()} ({f.metadata['doc']})"))
        # VFYFROMUSR and VFYMSFMSG, which ALWAUTH(*LCLRLY) turns on.
        in_effect = getattr(section_obj, f"{f.name}_in_effect", None)
        if in_effect is not None and as_json:
            record[f"{f.name}_in_effect"] = in_effect
        elif in_effect is not None and in_effect != value:
            record[f.name] += f" (in effect {in_effect}: ALWAUTH *LCLRLY)"
    emit_record(record, labels, as_json)


def _make(chg: str, dsp: str, section: str, cls: type, what: str, ibm: str) -> None:
    def change(**values: Any) -> None:
        _change(section, cls, what, values)

    change.__doc__ = f"Change {what} ({ibm}); applies to the running daemon at once."
    cli.add_command(Command(chg, callback=change, params=_options(cls),
                                  help=change.__doc__))

    def display(as_json: bool) -> None:
        _display(getattr(app().settings, section), as_json)

    cli.add_command(Command(
        dsp, callback=display, help=f"Display {what} (DSP{ibm[3:]}).",
        params=[click.Option(["--json", "as_json"], is_flag=True, help="One JSON object.")],
    ))


_make("chgsmtpa", "dspsmtpa", "smtp", configmod.SmtpSettings, "SMTP attributes", "CHGSMTPA")
_make("chgpopa", "dsppopa", "pop", configmod.PopSettings, "POP server attributes", "CHGPOPA")
