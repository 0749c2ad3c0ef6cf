"""Persisting changed settings in the TOML file, comments and layout kept.

The commands that change attributes (chgsmtpa, chgpopa, chgpje ...) write
through here, so the file the administrator documented by hand stays theirs:
only the changed lines differ.  A change is written only when the whole
resulting file still loads (``config.from_mapping``), so the daemon can never
be left with a configuration it refuses at its next start.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import functools
import os
import re
import stat
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import attrs
import tomlkit
import tomlkit.exceptions
from tomlkit.items import AoT, Array, Table

from twistmail import config
from twistmail.durable import fsync_dir
from twistmail.identity import as_invoker
from twistmail.settingtypes import FileError, SettingError, parse_value

__all__ = ["UNCHANGED", "FromFile", "SettingError", "UnknownSetting", "set_values",
           "setting_type"]


@attrs.frozen
class FromFile:
    """A value made from the settings the file holds when it is rewritten.

    RTYMIN's count given with ``*SAME`` minutes must keep the minutes the file
    has then, under the writers' lock: taken from the file as it was when the
    command started, it undid another command's change made meanwhile.
    ``make`` may return UNCHANGED to leave the key alone.
    """

    make: Callable[[config.Settings], Any]


#: What a FromFile gives for a key it leaves as it is.
UNCHANGED = object()


class UnknownSetting(SettingError, KeyError):
    """A dotted key that names no setting.

    It is a KeyError too, so a lookup-style ``except KeyError`` catches it,
    while ``str()`` stays the one-line SettingError message.
    """

    def __str__(self) -> str:
        return ValueError.__str__(self)


@functools.cache
def _setting_types() -> dict[str, Any]:
    defaults = config.Settings(path=Path("."))
    return {key: vtype for key, vtype, _, _ in config.iter_settings(defaults)}


def setting_type(dotted_key: str) -> Any:
    """The value type of a setting, e.g. ``"prestart.QTMSSRCP.maxjobs"``.

    Raises UnknownSetting naming the settings that are near the bad key, so
    a typo shows the right spellings.
    """
    try:
        return _setting_types()[dotted_key]
    except KeyError:
        raise UnknownSetting(dotted_key, dotted_key, _keys_near(dotted_key)) from None


def _keys_near(dotted_key: str) -> str:
    keys = list(_setting_types())
    parts = dotted_key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n]) + "."
        near = [k for k in keys if k.startswith(prefix)]
        if near:
            return "one of the settings " + ", ".join(near)
    return "a setting in one of the sections " + ", ".join(config.SECTIONS)


def set_values(path: Path | str, changes: Mapping[str, Any]) -> config.Settings | None:
    """Write parsed values (``None`` for *NOMAX, tuples for pairs) into the file.

    All changes are checked together, against the whole file, before
    anything is written; on SettingError the file is untouched.  Writers are
    serialised so two commands changing different keys both persist.
    A FromFile value is made under that lock; then the settings it was made
    from are returned.
    """
    if not changes:
        return None
    given = Path(path).absolute()  # relative paths in it start here, as load() reads it
    target = given.resolve()  # a symlink is kept: its target is what is rewritten
    dumped = {key: _dumped(key, value) for key, value in changes.items()
              if not isinstance(value, FromFile)}
    before = None
    with as_invoker(), _locked(target.parent):  # the file is root's, where root runs us
        raw = target.read_bytes()
        text = raw.decode("utf-8-sig")
        doc = _parse(text, target)
        for key, value in changes.items():
            if isinstance(value, FromFile):
                if before is None:
                    before = _current(text, dumped, given)
                made = value.make(before)
                if made is not UNCHANGED:
                    dumped[key] = _dumped(key, made)
        for key, value in dumped.items():
            _assign(doc, key, value)
        new_text = _same_line_ends(doc.as_string(), text)
        _loaded(new_text, given)  # refused as the daemon would refuse it
        if new_text != text:
            bom = codecs.BOM_UTF8 if raw.startswith(codecs.BOM_UTF8) else b""
            _write_atomically(target, bom + new_text.encode("utf-8"))
    return before


def _same_line_ends(new: str, old: str) -> str:
    """Lines added to a file written with CRLF end in CRLF too, not LF."""
    crlf = old.count("\r\n")
    if crlf == 0 or crlf != old.count("\n"):
        return new
    return re.sub(r"(?<!\r)\n", "\r\n", new)


def _dumped(key: str, value: Any) -> Any:
    """The TOML form of ``value``, normalised through a parse so it is canonical."""
    vtype = setting_type(key)
    try:
        raw = vtype.dump(value)
    except (TypeError, ValueError, IndexError, AttributeError):
        raise SettingError(key, value, vtype.allowed) from None
    return vtype.dump(parse_value(key, vtype, raw))


def _parse(text: str, path: Path) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as e:
        raise FileError(str(path), f"valid TOML ({_one_line(str(e))})") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _assign(doc: tomlkit.TOMLDocument, key: str, value: Any) -> None:
    *tables, leaf = key.split(".")
    node: Any = doc
    for depth, name in enumerate(tables):
        where = ".".join(tables[: depth + 1])
        node = _child_table(node, name, where, is_last=depth == len(tables) - 1)
    if leaf not in node:
        _add_key(node, leaf, value)
        return
    old = node[leaf]
    if isinstance(old, Array) and isinstance(value, list) and len(old) == len(value):
        # Element by element: an array written over several lines keeps the
        # comments beside its elements (RTYMIN's "count" and "minutes").
        for i, element in enumerate(value):
            kept = old[i].unwrap() if hasattr(old[i], "unwrap") else old[i]
            if type(kept) is not type(element) or kept != element:  # 30.0 is no 30
                old[i] = element
    else:
        node[leaf] = value


def _child_table(node: Any, name: str, where: str, is_last: bool) -> Any:
    """The sub-table ``name`` of ``node``, created when missing.

    A created intermediate table (``prestart`` for ``prestart.QTMSSRCP``)
    is a super table, so no empty ``[prestart]`` header is written.
    """
    if name not in node:
        node[name] = tomlkit.table(is_super_table=not is_last)
    child = node[name]
    if not isinstance(child, MutableMapping):
        raise SettingError(where, child, "a table of settings")
    return child


def _add_key(table: Any, key: str, value: Any) -> None:
    """Add a key after the table's last key, not after its trailing comments.

    Comments just before the next table header describe that table; a key
    appended after them would look as if it belonged there.
    """
    container = getattr(table, "value", None)
    insert_after = getattr(container, "_insert_after", None)
    last = None
    for k, item in getattr(container, "body", ()):
        if k is not None and not isinstance(item, Table | AoT):
            last = k
    if last is None or insert_after is None:
        table[key] = value
    else:
        insert_after(last.key, key, value)


def _current(text: str, dumped: Mapping[str, Any], path: Path) -> config.Settings:
    """The settings a FromFile is made from: the file's, or, when a value this
    change replaces is what the file cannot be read for, the file with it replaced."""
    try:
        return _loaded(text, path)
    except SettingError as e:
        if e.key not in dumped:
            raise
    trial = _parse(text, path)
    for key, value in dumped.items():
        _assign(trial, key, value)
    return _loaded(trial.as_string(), path)


def _loaded(text: str, path: Path) -> config.Settings:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FileError(str(path), f"valid TOML ({e})") from None
    return config.from_mapping(data, path)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the file's directory.

    The file itself is replaced by rename, so a lock on it would be lost with
    the old inode; the directory survives the rename.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomically(target: Path, data: bytes) -> None:
    """Replace ``target`` so a reader sees the old file or the new, never half.

    The temporary file lives in the same directory so the rename stays on one
    filesystem; mode and owner are copied so the daemon can still read it.
    """
    st = target.stat()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            _copy_owner(f.fileno(), st)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def _copy_owner(fd: int, st: os.stat_result) -> None:
    """Keep the owner when allowed (root editing another user's file)."""
    own = os.fstat(fd)
    if (own.st_uid, own.st_gid) != (st.st_uid, st.st_gid):
        with contextlib.suppress(PermissionError):
            os.fchown(fd, st.st_uid, st.st_gid)
