"""How listings are printed: an aligned table for people, JSON for programs."""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import click

#: Rows a streamed table takes its column widths from.
STREAM_WIDTHS_FROM = 1000
#: C0 and C1 controls and DEL: a terminal acts on them (colours, the window title...).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


def emit_table(
    rows: Iterable[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    as_json: bool,
    empty: str = "(none)",
    stream: bool = False,
    least: Mapping[str, int] | None = None,
) -> None:
    """Print ``rows``: with ``as_json`` a JSON array of the row dicts, else a table.

    ``columns`` pairs a row key with its heading.  With ``stream`` the rows
    are printed as they come, in memory that does not grow with them (a
    journal of millions of entries): the table's widths are those of its
    first rows, at least ``least`` (by row key) where a caller knows more
    (the journal's last seq), and the JSON is written element by element.
    """
    rows = iter(rows)
    if as_json and stream:
        _json_stream(rows)
    elif as_json:
        click.echo(json.dumps(list(rows), indent=2, default=str))
    else:
        _table(rows, columns, empty, STREAM_WIDTHS_FROM if stream else None, least or {})


def _json_stream(rows: Iterator[dict[str, Any]]) -> None:
    """The same text ``json.dumps(list(rows), indent=2)`` gives, element by element."""
    first = True
    for r in rows:
        text = json.dumps(r, indent=2, default=str).replace("\n", "\n  ")
        click.echo(("[\n  " if first else ",\n  ") + text, nl=False)
        first = False
    click.echo("[]" if first else "\n]")


def _table(rows: Iterator[dict[str, Any]], columns: Sequence[tuple[str, str]], empty: str,
           widths_from: int | None, least: Mapping[str, int]) -> None:
    """Aligned to the widest cell of the first ``widths_from`` rows (of all: None)."""
    head = list(rows if widths_from is None else itertools.islice(rows, widths_from))
    if not head:
        click.echo(empty)
        return
    cells = [[_cell(r.get(k)) for k, _ in columns] for r in head]
    widths = [
        max(_width(h), least.get(k, 0), *(_width(c[i]) for c in cells))
        for i, (k, h) in enumerate(columns)
    ]
    click.echo(_line([h for _, h in columns], widths))
    for c in itertools.chain(cells, ([_cell(r.get(k)) for k, _ in columns] for r in rows)):
        click.echo(_line(c, widths))


def table_row(row: dict[str, Any], columns: Sequence[tuple[str, str]],
              widths: Mapping[str, int]) -> str:
    """One line of a table whose widths are known before its rows (a listing
    that follows new entries): ``row`` by key, or the headings with
    ``dict(columns)``; a column not in ``widths`` is not padded."""
    return _line([_cell(row.get(k)) for k, _ in columns], [widths.get(k, 0) for k, _ in columns])


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(_pad(v, w) for v, w in zip(cells, widths, strict=True)).rstrip()


def _width(text: str) -> int:
    """Columns on a terminal: East Asian wide characters take two, combining marks none."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else
               2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))  # none when wider than its column


def emit_record(record: dict[str, Any], labels: Sequence[tuple[str, str]], as_json: bool) -> None:
    """Print one record as ``label . . : value`` lines (DSPxxx style) or JSON."""
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
        return
    width = max(len(label) for _, label in labels) + 2
    for key, label in labels:
        click.echo(f"{(label + ' ').ljust(width, '.')} : {_cell(record.get(key))}")


def printable(text: str) -> str:
    """``text`` with its control characters shown as ``\\x1b``, not sent to the terminal.

    Listings show what others wrote (a remote server's reply, a client's
    address): an escape sequence there would be acted on by the terminal of
    the administrator who lists it."""
    if text.isprintable():
        return text
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, list | tuple):
        return printable(" ".join(str(x) for x in v))
    return printable(str(v))
