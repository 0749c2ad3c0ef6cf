"""Read IBM i CL command strings and turn them into ``twistmail`` arguments.

IBM i administrators have their commands in CL syntax: in their heads, in
saved CL source, in job logs.  Accepting that text as it is spares them
learning the Unix spelling before they can work.  This module knows CL's
lexical rules only; which keywords a command has is the click command's
business, handed to :func:`to_args` by the caller.

Case: command names and keywords are upper-cased, as CL does.  Values are
kept exactly as typed, quoted or not.  CL would upper-case unquoted values,
but twistmail compares special values (``*YES``, ``*NOMAX``) without regard
to case anyway, while passwords, addresses and file names must keep theirs;
so the case decision belongs to whoever knows what a keyword holds.
:func:`to_args` upper-cases object names (PGM, SBSD, SBS), which are
upper-case IBM names in twistmail.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import TypeAlias

import attrs

Element: TypeAlias = "str | tuple[Element, ...]"
Value: TypeAlias = "tuple[Element, ...]"

POSITIONAL: dict[str, tuple[str, ...]] = {
    "CHGPJE": ("SBSD", "PGM"),
    "DSPACTPJ": ("SBS", "PGM"),
    "STRPJ": ("SBS", "PGM"),
    "ENDPJ": ("SBS", "PGM", "OPTION"),
    "STRTCPSVR": ("SERVER",),
    "ENDTCPSVR": ("SERVER",),
    "CHGSMTPA": ("AUTOSTART",),
    "CHGPOPA": ("AUTOSTART",),
    "DSPJRN": ("JRN",),
    "CHGJRN": ("JRN",),
    "ADDDIRE": ("USRID", "USRD"),
    "CHGDIRE": ("USRID",),
    "RMVDIRE": ("USRID",),
    "DLTJRNRCV": ("JRNRCV",),
    "WRKQ": ("QUEUE",),
    "WRKSMTPLE": ("TYPE",),
    "CRTUSRPRF": ("USRPRF", "PASSWORD"),
    "CHGUSRPRF": ("USRPRF", "PASSWORD"),
    "DLTUSRPRF": ("USRPRF",),
    "DSPUSRPRF": ("USRPRF",),
    "HLDDSTQ": ("DSTQ", "PTY"),
    "RLSDSTQ": ("DSTQ", "PTY"),
    "SNDDST": ("TYPE", "TOUSRID", "DSTD"),
    "QRYDST": ("USRID", "OPTION"),
    "RCVDST": ("DSTID",),
    "CHGDSTA": ("KEEPRCP",),
    "ADDSMTPLE": ("TYPE",),
    "RMVSMTPLE": ("TYPE",),
    "STRMSF": ("MSGOPT", "NBRMSFJOB"),
    "ENDMSF": ("OPTION",),
}
"""Keyword names of the values a command accepts without a keyword, in order."""

QUALIFIED_LIBS: dict[str, tuple[str, ...]] = {
    "PGM": ("QTCP", "QSYS", "*LIBL"),
    "SBSD": ("QSYS", "*LIBL"),
    "SBS": ("QSYS", "*LIBL"),
}
"""Keywords that name IBM i objects, with the libraries where twistmail has them."""

SYNONYMS: dict[tuple[str, str], str] = {
    ("DSPJRN", "ENTTYP"): "CODE",
    ("DSPJRN", "FROMTIME"): "FROM",
    ("DSPJRN", "TOTIME"): "TO",
}
"""IBM's keywords for what a twistmail option does under another name."""

_SIGN_ON = frozenset({"INLMNU", "INLPGM", "LMTCPB"})
IGNORED: dict[str, frozenset[str]] = {"DSPJRN": frozenset({"ENTDTALEN", "OUTMBR", "JRNCDE"}),
                                      "CRTUSRPRF": _SIGN_ON, "CHGUSRPRF": _SIGN_ON}
"""IBM keywords taken and ignored: DSPJRN's layout of a database outfile (the
CSV file has every entry's data whole, in one file) and its journal code; the
interactive sign-on of a profile (the manual gives a POP user INLMNU(*SIGNOFF)
INLPGM(*NONE) LMTCPB(*YES); twistmail has no interactive sign-on at all)."""

SHOWN_ONLY: dict[str, str] = {"DSPACTPJ": "OUTPUT", "WRKACTJOB": "OUTPUT", "DSPSMTPA": "OUTPUT",
                              "DSPPOPA": "OUTPUT", "DSPUSRPRF": "OUTPUT"}
"""Commands whose IBM OUTPUT keyword twistmail takes with ``*`` only: it shows."""

JOINED: frozenset[str | tuple[str, str]] = frozenset({
    "TOUSRID", "TOINTNET", "DSTID", "AUTHMECH", "RBLSVR", "NAMESERVERS", "CODE",
    ("DSPJRN", "FROM"), ("DSPJRN", "TO")})
"""List keywords whose elements the click option takes as one blank-separated string.

``TOUSRID((SAM SYSTEM *CC))`` is ``--tousrid 'SAM SYSTEM *CC'``, one option
per list entry; a DSTID typed without quotes is its three words;
``AUTHMECH(*PLAIN *LOGIN)`` is ``--authmech '*PLAIN *LOGIN'``, ``CODE(9T B2)``
``--code '9T B2'``; DSPJRN's ``FROMTIME('2026-11-30' '10:00')`` is
``--from '2026-11-30 10:00'`` (a pair names its command: TO is a list elsewhere).
"""

SUBSYSTEM = "QSYSWRK"
"""The only subsystem: all of twistmail's jobs run in it, as on IBM i."""

_SUBSYSTEM_KEYWORDS = ("SBSD", "SBS")
_COMMAND_NAME = re.compile(r"[A-Z$#@][A-Z0-9$#@_.]*", re.IGNORECASE)
_KEYWORD = re.compile(r"[A-Z][A-Z0-9]*", re.IGNORECASE)
_SPECIAL = ("(", ")", "'")
_CONTINUATION = ("+", "-")


#: CL lists hold values or lists of values; deeper nesting is a mistake.
MAX_NESTING = 8


class ClError(ValueError):
    """CL text that cannot be read or translated.

    ``str()`` is one line naming what is wrong and where, fit to be shown to
    the administrator as it is.
    """


@attrs.frozen
class ClCommand:
    """One CL command: its name without library, its parameters in typed order.

    Positional values are already named by :data:`POSITIONAL`, so a consumer
    never needs to know which form the administrator used.
    """

    name: str
    params: tuple[tuple[str, Value], ...] = ()

    def get(self, keyword: str) -> Value | None:
        """The value of ``keyword`` (any case), or None when not given."""
        keyword = keyword.upper()
        return next((v for k, v in self.params if k == keyword), None)


def parse(text: str) -> ClCommand:
    """Read one CL command; raises :class:`ClError` for anything CL would reject."""
    scanner = _Scanner(_join_continuations(text))
    scanner.skip_blanks()
    name = _command_name(scanner)
    return ClCommand(name, _parameters(scanner, name))


def command_name(text: str) -> str:
    """Only the command name of CL text, upper case and without library.

    Lets a caller say "not supported" for an unknown command before
    complaining about its parameters, which would be the wrong advice.
    """
    scanner = _Scanner(_join_continuations(text))
    scanner.skip_blanks()
    return _command_name(scanner)


def render(cmd: ClCommand) -> str:
    """CL text that :func:`parse` reads back as ``cmd``: for showing and for tests.

    Exact for every value except one with a line ending in ``+`` or ``-``
    inside it, which CL itself cannot write.
    """
    params = (f"{kw}({_render_items(value)})" for kw, value in cmd.params)
    return " ".join([cmd.name, *params])


def unqualify(
    value: str, allowed_libs: Collection[str] | None = None, *, keyword: str | None = None
) -> str:
    """The object of ``LIB/OBJ`` (or of a bare ``OBJ``).

    twistmail has no libraries; a qualified name is accepted so pasted IBM i
    commands work, but a library where twistmail's object cannot be is a
    mistake worth reporting rather than ignoring.
    """
    lib, slash, obj = value.rpartition("/")
    where = f" in {keyword}" if keyword else ""
    if not obj or (slash and not lib) or "/" in lib:
        raise ClError(f"bad qualified name {value!r}{where}; expected OBJ or LIB/OBJ")
    if slash and allowed_libs is not None:
        if lib.upper() not in {a.upper() for a in allowed_libs}:
            raise ClError(
                f"library {lib} is not allowed{where} ({value}); allowed: {', '.join(allowed_libs)}"
            )
    return obj


def to_args(
    cmd: ClCommand,
    command_options: Mapping[str, int | None] | None = None,
    *,
    multiple: Collection[str] = (),
) -> list[str]:
    """The ``twistmail`` argument list for ``cmd``, e.g. ``["chgpje", "--maxjobs", "50"]``.

    ``command_options`` maps the click command's long option names (without
    ``--``) to their nargs: 0 for a switch, None when any count will do.
    Given, it turns unknown keywords and wrong value counts into CL-worded
    errors instead of click's.  ``multiple`` names the options that may be
    repeated; a list of single values for one of them becomes one option per
    value, as a CL list parameter means.  ``*SAME`` values are dropped: they
    mean "leave unchanged", which is what an absent option does.
    """
    args = [cmd.name.lower()]
    repeatable = {m.lower() for m in multiple}
    given: dict[str, str] = {}
    for keyword, _ in cmd.params:
        # CODE(9T) ENTTYP(EH): two names of one parameter; the later dropped the other.
        meant = SYNONYMS.get((cmd.name, keyword), keyword)
        if meant in given:
            raise ClError(f"keywords {given[meant]} and {keyword} given together; allowed: "
                          "one of them, they name the same parameter")
        given[meant] = keyword
    for keyword, value in cmd.params:
        if keyword in _SUBSYSTEM_KEYWORDS:
            _check_subsystem(keyword, value)
            continue
        if (cmd.name, keyword) == ("DSPJRN", "OUTMBR") and any(
                isinstance(v, str) and v.upper() == "*ADD" for v in value):
            # Ignored, *ADD would lose what the file held: it is written anew.
            raise ClError(f"OUTMBR({_render_items(value)}) is not allowed: *ADD; allowed: "
                          "*REPLACE (the CSV outfile is written anew)")
        if keyword in IGNORED.get(cmd.name, ()):
            continue
        if SHOWN_ONLY.get(cmd.name) == keyword and (command_options is None
                                                    or "output" not in command_options):
            if not _is_special(value, "*"):
                raise ClError(f"{keyword}({_render_items(value)}) is not allowed; allowed: * "
                              "(twistmail shows the listing; --json for a program)")
            continue
        keyword = SYNONYMS.get((cmd.name, keyword), keyword)
        nargs = _nargs(cmd.name, keyword, command_options)
        if _is_special(value, "*SAME") or (keyword == "USRID" and _is_special(value,
                                                                            "*CURRENT")):
            continue  # *CURRENT: IBM's default user ID, as when USRID is left out
        if nargs is not None and nargs > 1 and _is_special(value, "*DFT"):
            value = ("*DFT",) * nargs  # RTYMIN(*DFT): each element its default
        if keyword in QUALIFIED_LIBS:
            value = (_object_name(keyword, value),)
        option = keyword.lower()
        joined = keyword in JOINED or (cmd.name, keyword) in JOINED
        if nargs is not None and nargs > 1 and cmd.name in ELEMENTS_KEPT:
            # RTYMIN(4): the elements left out are *SAME, as IBM's CHG commands take them.
            value = _padded(value, nargs)
        args += _option_args(keyword, option, value, nargs, option in repeatable, joined)
    return args


#: Commands whose multi-element parameters (RTYMIN) keep the elements left out.
#: Not CHGDIRE: its USRID is an identifier, of which half means nothing.
ELEMENTS_KEPT = {"CHGSMTPA", "CHGPOPA"}


def _padded(value: Value, nargs: int) -> Value:
    if any(isinstance(e, tuple) for e in value) or not 0 < len(value) < nargs:
        return value
    return (*value, *("*SAME",) * (nargs - len(value)))


class _Scanner:
    """A position in the command text, and the CL lexical rules at that position."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0  # parentheses open

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def rest(self) -> str:
        """A short quote of the unread text, to point at a mistake."""
        rest = self.text[self.pos :].split()
        return " ".join(rest)[:20] if rest else "the end"

    def skip_blanks(self) -> bool:
        """Skip blanks and ``/* */`` comments; whether there were any."""
        start = self.pos
        while True:
            while self.peek().isspace():
                self.pos += 1
            if not self.text.startswith("/*", self.pos):
                return self.pos > start
            end = self.text.find("*/", self.pos + 2)
            if end < 0:
                raise ClError("unterminated comment: /* without */")
            self.pos = end + 2

    def word(self) -> str:
        start = self.pos
        while (c := self.peek()) and not c.isspace() and c not in _SPECIAL:
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self, where: str) -> str:
        """A quoted string without its quotes; ``''`` inside stands for one quote."""
        self.pos += 1
        parts: list[str] = []
        while True:
            end = self.text.find("'", self.pos)
            if end < 0:
                raise ClError(f"unterminated quoted string in {where}")
            parts.append(self.text[self.pos : end])
            if not self.text.startswith("''", end):
                self.pos = end + 1
                return "".join(parts)
            parts.append("'")
            self.pos = end + 2

    def items(self, where: str) -> Value:
        """The elements up to the ``)`` matching an already read ``(``."""
        elements: list[Element] = []
        while True:
            self.skip_blanks()
            if self.at_end():
                raise ClError(f"unbalanced parenthesis after {where}: ')' missing")
            if self.peek() == ")":
                self.pos += 1
                break
            elements.append(self.element(where))
        if not elements:
            raise ClError(f"empty parentheses in {where}; give a value or leave {where} out")
        return tuple(elements)

    def element(self, where: str) -> Element:
        if self.peek() == "(":
            if self.depth >= MAX_NESTING:
                raise ClError(f"parentheses nested more than {MAX_NESTING} deep in {where}")
            self.pos += 1
            self.depth += 1
            try:
                return self.items(where)
            finally:
                self.depth -= 1
        text = self.quoted(where) if self.peek() == "'" else self.word()
        self.expect_separator(text, where)
        return text

    def expect_separator(self, after: str, where: str) -> None:
        """CL needs a blank between values; ``)`` and the end are checked by the caller."""
        c = self.peek()
        if c and not c.isspace() and c != ")":
            # PGM(QTCP/QTMSSRCP MAXJOBS(5): a keyword inside another's value
            hint = (f" (or a ')' missing after the value of {where}?)"
                    if c == "(" and after[:1].isalpha() and after.isalnum() else "")
            raise ClError(f"missing blank after {after!r} in {where} before "
                          f"{self.rest()!r}{hint}")


def _join_continuations(text: str) -> str:
    """Apply CL source line continuation.

    A line whose last non-blank character is ``+`` continues with the first
    non-blank character of the next line; with ``-`` the next line's leading
    blanks are kept.  Only this makes a quoted string split over lines come
    out as CL would read it.
    """
    lines = text.split("\n")
    out: list[str] = []
    strip_next = False
    for i, line in enumerate(lines):
        if strip_next:
            line = line.lstrip()
        trimmed = line.rstrip()
        last = i == len(lines) - 1
        if trimmed.endswith(_CONTINUATION):
            if last:
                raise ClError(
                    f"the command ends with the continuation character {trimmed[-1]}; "
                    "a line is missing"
                )
            out.append(trimmed[:-1])
            strip_next = trimmed[-1] == "+"
        else:
            out.append(line if last else line + "\n")
            strip_next = False
    return "".join(out)


def _command_name(scanner: _Scanner) -> str:
    if scanner.at_end():
        raise ClError("empty command; expected e.g. CHGPJE PGM(QTMSSRCP) MAXJOBS(20)")
    word = scanner.word()
    lib, _, name = word.rpartition("/")
    if not _COMMAND_NAME.fullmatch(name) or (lib and not _is_library(lib)):
        raise ClError(f"bad command name {word or scanner.rest()!r}; expected e.g. CHGPJE")
    scanner.expect_separator(word, "the command name")
    return name.upper()


def _is_library(name: str) -> bool:
    return (name.startswith("*") and name[1:].isalpha()) or bool(_COMMAND_NAME.fullmatch(name))


def _parameters(scanner: _Scanner, name: str) -> tuple[tuple[str, Value], ...]:
    params: dict[str, Value] = {}
    last_keyword: str | None = None
    previous = name
    while True:
        scanner.skip_blanks()
        if scanner.at_end():
            return tuple(params.items())
        if scanner.peek() == ")":
            raise ClError(f"unbalanced parenthesis: ')' without '(' after {previous}")
        keyword, value, by_keyword = _parameter(scanner, name, len(params), last_keyword)
        if keyword in params:
            raise ClError(f"keyword {keyword} given twice")
        params[keyword] = value
        previous = keyword
        if by_keyword:
            last_keyword = keyword


def _parameter(
    scanner: _Scanner, name: str, count: int, last_keyword: str | None
) -> tuple[str, Value, bool]:
    """One parameter: (keyword, value, whether it was given with its keyword)."""
    start = scanner.pos
    word = "" if scanner.peek() in _SPECIAL else scanner.word()
    if word and scanner.peek() == "(":
        if not _KEYWORD.fullmatch(word):
            raise ClError(f"bad keyword {word!r}; a keyword is letters and digits, e.g. MAXJOBS")
        scanner.pos += 1
        keyword = word.upper()
        return keyword, scanner.items(keyword), True
    scanner.pos = start
    if last_keyword is not None:
        value = _render_element(scanner.element(f"the value after {last_keyword}"))
        raise ClError(
            f"positional value {value} after keyword {last_keyword}; "
            "positional values come first"
        )
    keyword = _positional_keyword(name, count)
    value = scanner.element(f"positional parameter {count + 1} ({keyword})")
    return keyword, value if isinstance(value, tuple) else (value,), False


def _positional_keyword(name: str, count: int) -> str:
    names = POSITIONAL.get(name, ())
    if count < len(names):
        return names[count]
    takes = f"positional parameters: {', '.join(names)}" if names else "keywords only"
    raise ClError(f"unknown positional parameter {count + 1} for {name}; {name} takes {takes}")


def _render_items(value: Value) -> str:
    return " ".join(_render_element(e) for e in value)


def _render_element(element: Element) -> str:
    if isinstance(element, tuple):
        return f"({_render_items(element)})"
    if _needs_quotes(element):
        return "'" + element.replace("'", "''") + "'"
    return element


def _needs_quotes(text: str) -> bool:
    return not text or text.startswith("/*") or any(c.isspace() or c in _SPECIAL for c in text)


def _nargs(name: str, keyword: str, command_options: Mapping[str, int | None] | None) -> int | None:
    if command_options is None:
        return None
    option = keyword.lower()
    if option not in command_options:
        known = [o.upper() for o in command_options]
        known += [k for k in POSITIONAL.get(name, ()) if k in _SUBSYSTEM_KEYWORDS]
        known += [k for (n, k) in SYNONYMS if n == name]
        if name in SHOWN_ONLY:
            known.append(SHOWN_ONLY[name])
        known += sorted(IGNORED.get(name, ()))
        raise ClError(f"{name} has no keyword {keyword}; keywords: {', '.join(known)}")
    return command_options[option]


def _is_special(value: Value, word: str) -> bool:
    return len(value) == 1 and isinstance(value[0], str) and value[0].upper() == word


def _object_name(keyword: str, value: Value) -> str:
    if len(value) != 1 or not isinstance(value[0], str):
        raise ClError(f"{keyword} takes one name, got ({_render_items(value)})")
    return unqualify(value[0], QUALIFIED_LIBS[keyword], keyword=keyword).upper()


def _check_subsystem(keyword: str, value: Value) -> None:
    if _object_name(keyword, value) != SUBSYSTEM:
        raise ClError(
            f"{keyword}({_render_items(value)}) is not allowed; allowed: {SUBSYSTEM} or "
            f"QSYS/{SUBSYSTEM}, the only subsystem twistmail has"
        )


def _option_args(
    keyword: str, option: str, value: Value, nargs: int | None, repeatable: bool,
    joined: bool = False,
) -> list[str]:
    if nargs == 0:
        return _switch(keyword, option, value)
    groups = _groups(keyword, value, nargs, repeatable, joined)
    args: list[str] = []
    for group in groups:
        strings = _strings(keyword, group)
        if joined and nargs == 1 and len(strings) > 1:
            strings = [" ".join(strings)]
        if nargs is not None and len(strings) != nargs:
            raise ClError(
                f"{keyword} takes {_count(nargs)}, got {len(strings)}: ({_render_items(group)})"
            )
        args += [f"--{option}", *strings]
    return args


def _groups(keyword: str, value: Value, nargs: int | None, repeatable: bool,
            joined: bool = False) -> tuple[Value, ...]:
    """The value split into one tuple per option occurrence."""
    lists = tuple(e for e in value if isinstance(e, tuple))
    if not lists:
        single = repeatable and nargs == 1 and not joined
        return tuple((e,) for e in value) if single else (value,)
    if len(lists) != len(value):
        raise ClError(
            f"{keyword}({_render_items(value)}) mixes single values and lists; "
            "give each entry in parentheses"
        )
    if len(lists) > 1 and nargs is not None and not repeatable:
        raise ClError(f"{keyword} takes one list, got {len(lists)}: ({_render_items(value)})")
    return lists


def _strings(keyword: str, group: Value) -> list[str]:
    strings = [e for e in group if isinstance(e, str)]
    if len(strings) != len(group):
        raise ClError(f"{keyword}({_render_items(group)}) nests lists deeper than twistmail takes")
    return strings


def _switch(keyword: str, option: str, value: Value) -> list[str]:
    if _is_special(value, "*YES"):
        return [f"--{option}"]
    if _is_special(value, "*NO"):
        return []
    raise ClError(f"{keyword}({_render_items(value)}) is not allowed; allowed: *YES, *NO")


def _count(n: int) -> str:
    return "1 value" if n == 1 else f"{n} values"
