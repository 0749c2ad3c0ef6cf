"""User profiles and the system distribution directory, kept in SQLite.

This is the embedded backend of :class:`twistmail.interfaces.IDirectory`: the
CLI (CRTUSRPRF, ADDDIRE, WRKDIRE ...) edits it, SMTP and POP jobs read it to
authenticate users, and the bridge reads it to resolve recipients (the SMTP
address resolution exit of the mail server framework).

Reads and writes ``<datadir>/directory.sqlite`` (plus SQLite's ``-wal`` and
``-shm`` files beside it), created mode 0600 because it holds password hashes
and the *HOSTAUTH passwords the SMTP client must send in clear to remote hosts.
Many processes open it at once, so it runs in WAL mode with a 5 second busy
timeout, every write is one ``BEGIN IMMEDIATE`` transaction, and each thread
(and each forked process) gets its own connection.  The schema version is
``PRAGMA user_version``; migrations are additive, so later tables (SMTP list
entries, POP-before-SMTP records) are one more step in :data:`MIGRATIONS`.

Honours ``system.datadir``, ``system.local_domains`` (the first is the SMTP
domain of newly enrolled users) and ``system.hostname`` (its first label is
the directory's system address, as IBM i uses the system name).

The API is synchronous and blocks on disk; code running in a reactor calls it
through ``twisted.internet.threads.deferToThread``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from zope.interface import implementer

from twistmail.interfaces import IDirectory

FILENAME = "directory.sqlite"
BUSY_TIMEOUT_MS = 5000

ENABLED = "*ENABLED"
DISABLED = "*DISABLED"
STATUSES = (ENABLED, DISABLED)
#: PASSWORD(*NONE): the profile has no password and cannot sign on (mail-only
#: profiles such as the one NONDELIVERY copies go to).
NO_PASSWORD = "*NONE"
SPECIAL_PASSWORDS = frozenset((NO_PASSWORD, "*SAME", "*USRPRF"))
SYSMS = "*SYSMS"
USRIDX = "*USRIDX"
SERVICE_LEVELS = (SYSMS, USRIDX)
PREF_SMTP = "*SMTP"
PREF_USRID = "*USRID"
PREFERRED_ADDRESSES = (PREF_SMTP, PREF_USRID)
ANY = "*ANY"
NONE = "*NONE"

#: Resolution kinds.
POP = "pop"
SNADS = "snads"
REMOTE = "remote"

#: Argon2id at one of OWASP's equivalent minimum settings (12 MiB, 3 passes,
#: 1 lane).  Its sibling of 19 MiB and 2 passes is as strong but costs 40 %
#: more CPU per login here (more memory traffic), and several logins run at
#: once in a POP pool polled all day, each holding its memory meanwhile.
ARGON2_M, ARGON2_T, ARGON2_P = 12 * 1024, 3, 1
ARGON2_LEN = 32
#: The scheme of earlier releases; its hashes still verify.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES = 16
MAX_PASSWORD = 128
MAX_PASSWORD_OCTETS = 248  # 'PASS ' + the password + CRLF in a 255-octet POP line
MAX_TEXT = 50
MAX_LOCAL_PART = 64
MAX_DOMAIN = 253

_PROFILE_RE = re.compile(r"[A-Z$#@][A-Z0-9$#@_]{0,9}")
_DIR_NAME_RE = re.compile(r"[A-Z0-9$#@_]{1,8}")
_ATOM_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

PROFILE_ALLOWED = "1-10 characters, the first A-Z $ # @, the rest A-Z 0-9 $ # @ _"
DIR_NAME_ALLOWED = "1-8 characters A-Z 0-9 $ # @ _ (or *ANY *ANY, the catch-all)"

#: Schema steps; ``PRAGMA user_version`` is the number of steps applied.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE profiles (
            usrprf   TEXT PRIMARY KEY,
            pwhash   TEXT NOT NULL,
            status   TEXT NOT NULL,
            text     TEXT NOT NULL,
            created  TEXT NOT NULL
        )""",
        """CREATE TABLE entries (
            userid     TEXT NOT NULL,
            address    TEXT NOT NULL,
            usrd       TEXT NOT NULL,
            usrprf     TEXT REFERENCES profiles(usrprf),
            msfsrvlvl  TEXT NOT NULL,
            prefadr    TEXT NOT NULL,
            smtpuser   TEXT,
            smtpdomain TEXT,
            smtpfold   TEXT,
            PRIMARY KEY (userid, address)
        )""",
        "CREATE UNIQUE INDEX entries_smtp ON entries (smtpdomain, smtpuser)"
        " WHERE smtpuser IS NOT NULL",
        "CREATE INDEX entries_smtpfold ON entries (smtpdomain, smtpfold)"
        " WHERE smtpuser IS NOT NULL",
        "CREATE INDEX entries_usrprf ON entries (usrprf)",
    ),
    (
        # POP-before-SMTP: the last successful POP login of each client address.
        """CREATE TABLE pop_logins (
            ip     TEXT PRIMARY KEY,
            usrprf TEXT NOT NULL,
            at     REAL NOT NULL
        )""",
    ),
    (
        # SMTP list entries (ADDSMTPLE).  ``entrykey`` is an entry's normalized
        # identity within its type.  The triggers count every list change, so a
        # process can keep the parsed lists and re-read them only when the
        # count (or the file's random token) differs from what it parsed.
        """CREATE TABLE smtp_list (
            id         INTEGER PRIMARY KEY,
            type       TEXT NOT NULL,
            entrykey   TEXT NOT NULL,
            intnetadr  TEXT,
            subnetmask TEXT,
            hostname   TEXT,
            ftrdata    TEXT,
            username   TEXT,
            password   TEXT
        )""",
        "CREATE UNIQUE INDEX smtp_list_key ON smtp_list (type, entrykey)",
        """CREATE TABLE smtp_list_version (
            id    INTEGER PRIMARY KEY CHECK (id = 1),
            token TEXT NOT NULL,
            n     INTEGER NOT NULL
        )""",
        "INSERT INTO smtp_list_version (id, token, n) VALUES (1, lower(hex(randomblob(8))), 0)",
        "CREATE TRIGGER smtp_list_added AFTER INSERT ON smtp_list"
        " BEGIN UPDATE smtp_list_version SET n = n + 1; END",
        "CREATE TRIGGER smtp_list_changed AFTER UPDATE ON smtp_list"
        " BEGIN UPDATE smtp_list_version SET n = n + 1; END",
        "CREATE TRIGGER smtp_list_removed AFTER DELETE ON smtp_list"
        " BEGIN UPDATE smtp_list_version SET n = n + 1; END",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class DirectoryError(ValueError):
    """A request the directory refuses.

    ``str()`` is the one line an administrator sees: the field, the value and
    what is allowed or why not.  ``field`` lets the CLI name its own option.
    """

    def __init__(self, field: str, value: Any, problem: str) -> None:
        self.field = field
        self.value = value  # None: not given at all
        self.problem = problem
        super().__init__(self.said(field))

    def said(self, name: str) -> str:
        """The line, naming the field as the caller's user knows it (``--intnetadr``)."""
        return f"{name}: {self.problem}" if self.value is None else \
            f"{name}: {self.value!r} {self.problem}"


class DirectoryLost(sqlite3.DatabaseError):
    """The directory file is gone or empty while mailboxes remain: a restore that
    missed it, or a mistake.  A new empty one made every user unknown and
    returned every message queued for them; mail waits instead (4xx) until it
    is back, as for any directory that cannot be read."""


def lost(path: Path) -> str | None:
    """Why ``path`` must not be made anew, or None."""
    try:
        if path.stat().st_size > 0:
            return None
        state = "empty"
    except FileNotFoundError:
        state = "missing"
    boxes = path.parent / "mailboxes"
    try:
        held = sum(1 for e in os.scandir(boxes)  # not one DLTUSRPRF set aside
                   if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not held:
        return None
    return (f"the directory {path} is {state}, but {boxes} holds {held} mailbox"
            f"{'es' if held > 1 else ''}: restore it from the backup; to begin again with no "
            f"user profiles, move {boxes} away first")


@attrs.frozen
class UserProfile:
    usrprf: str
    status: str
    text: str
    created: str
    password_none: bool = False  # PASSWORD(*NONE): it cannot sign on


@attrs.frozen
class DirectoryEntry:
    """One entry of the system distribution directory (ADDDIRE's keywords).

    The defaults are IBM's: a *USRIDX (SNADS) user addressed by user ID.
    """

    userid: str
    address: str
    usrd: str
    user: str | None = None
    msfsrvlvl: str = USRIDX
    prefadr: str = PREF_USRID
    smtpuser: str | None = None
    smtpdomain: str | None = None

    @property
    def is_catchall(self) -> bool:
        return self.userid == ANY and self.address == ANY

    @property
    def smtp_name(self) -> str | None:
        if self.smtpuser is None or self.smtpdomain is None:
            return None
        return f"{self.smtpuser}@{self.smtpdomain}"


@attrs.frozen
class Resolution:
    """Where mail for one address goes.

    ``kind`` is "pop" (the POP mailbox of ``usrprf``), "snads" (a *USRIDX
    user: ``userid`` at ``sysaddress``) or "remote" (the domain is not ours).
    """

    kind: str
    address: str
    usrprf: str | None = None
    userid: str | None = None
    sysaddress: str | None = None
    catchall: bool = False


# -- SMTP list entries: types --------------------------------------------------

ACCEPT = "*ACCEPT"
REJECT = "*REJECT"
NEAR = "*NEAR"
DOMAIN = "*DOMAIN"
SVRBIND = "*SVRBIND"
CLTBIND = "*CLTBIND"
ETRNSVR = "*ETRNSVR"
FTRSUBJECT = "*FTRSUBJECT"
FTRORIGIN = "*FTRORIGIN"
FTRFILNAME = "*FTRFILNAME"
FTRTYPE = "*FTRTYPE"
HOSTAUTH = "*HOSTAUTH"
NETWORK_TYPES = (ACCEPT, REJECT)
FILTER_TYPES = (FTRSUBJECT, FTRORIGIN, FTRFILNAME, FTRTYPE)

#: The ADDSMTPLE keywords after TYPE, in IBM's order.
LIST_KEYWORDS = ("intnetadr", "subnetmask", "hostname", "ftrdata", "username", "password")
MAX_FTRDATA = 255

#: What each keyword takes, for messages that say what is allowed.
LIST_KEYWORD_ALLOWED = {
    "intnetadr": "an IPv4 or IPv6 address such as 192.0.2.0 or 2001:db8::",
    "subnetmask": "a contiguous IPv4 mask such as 255.255.255.0 (default 255.255.255.255) "
    "or a prefix length such as 24 or, for IPv6, 64 (default 128)",
    "hostname": "a host or domain name such as mail.example.com",
    "ftrdata": f"1-{MAX_FTRDATA} printable characters, * standing for one or more characters",
    "username": f"1-{MAX_PASSWORD} printable characters",
    "password": f"1-{MAX_PASSWORD} characters",
}


@attrs.frozen
class ListType:
    """What one ADDSMTPLE TYPE takes.

    ``required`` keywords must be given to add an entry (only one of them
    when ``alternatives``); ``key`` keywords identify an entry, so they are
    what RMVSMTPLE needs and what makes two entries duplicates.
    """

    name: str
    meaning: str
    required: tuple[str, ...]
    key: tuple[str, ...]
    optional: tuple[str, ...] = ()
    alternatives: bool = False

    @property
    def keywords(self) -> tuple[str, ...]:
        return tuple(k for k in LIST_KEYWORDS if k in self.required + self.optional)


LIST_TYPES: dict[str, ListType] = {
    t.name: t
    for t in (
        ListType(
            ACCEPT,
            "clients allowed to relay",
            ("intnetadr",),
            ("intnetadr", "subnetmask"),
            ("subnetmask",),
        ),
        ListType(
            REJECT,
            "clients whose connections are rejected",
            ("intnetadr",),
            ("intnetadr", "subnetmask"),
            ("subnetmask",),
        ),
        ListType(
            NEAR,
            "domains relayed for and not sent through the firewall",
            ("hostname",),
            ("hostname",),
        ),
        ListType(
            DOMAIN,
            "the domain of an interface the SMTP server binds to (kept, not used)",
            ("intnetadr", "hostname"),
            ("intnetadr",),
        ),
        ListType(SVRBIND, "addresses the SMTP server binds to (kept, not used: [listen])",
                 ("intnetadr",), ("intnetadr",)),
        ListType(CLTBIND, "addresses the SMTP client binds to", ("intnetadr",), ("intnetadr",)),
        ListType(
            ETRNSVR,
            "hosts allowed to use ETRN",
            ("hostname", "intnetadr"),
            ("hostname", "intnetadr"),
            alternatives=True,
        ),
        ListType(FTRSUBJECT, "subjects of mail to filter", ("ftrdata",), ("ftrdata",)),
        ListType(FTRORIGIN, "originators of mail to filter", ("ftrdata",), ("ftrdata",)),
        ListType(FTRFILNAME, "attachment file names to filter", ("ftrdata",), ("ftrdata",)),
        ListType(FTRTYPE, "MIME types to filter", ("ftrdata",), ("ftrdata",)),
        ListType(
            HOSTAUTH,
            "the user and password the SMTP client signs on with at a remote host",
            ("hostname", "username", "password"),
            ("hostname",),
        ),
    )
}
LIST_TYPE_NAMES = tuple(LIST_TYPES)


@attrs.frozen
class ListEntry:
    """One SMTP list entry (ADDSMTPLE's keywords).

    The password is left out of ``repr`` so that logging an entry cannot
    leak the credential the SMTP client sends to a remote host.
    """

    type: str
    intnetadr: str | None = None
    subnetmask: str | None = None
    hostname: str | None = None
    ftrdata: str | None = None
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)


# -- names and values ---------------------------------------------------------


def profile_name(raw: str, field: str = "usrprf") -> str:
    """The IBM i form of a profile name: upper case, checked."""
    name = raw.strip().upper() if isinstance(raw, str) and raw.isascii() else None
    if not name or not _PROFILE_RE.fullmatch(name):
        raise DirectoryError(field, raw, f"is not allowed; allowed: {PROFILE_ALLOWED}")
    return name


def system_address_from_hostname(hostname: str) -> str:
    """IBM i addresses local users by system name; the host's first label stands in."""
    label = hostname.strip().split(".", 1)[0].upper()
    name = "".join(c for c in label if c.isascii() and c.isalnum())[:8]
    return name or "LOCAL"


def _check_password(password: Any) -> str:
    """1-128 characters that fit a POP PASS line (255 octets) in UTF-8 too: a
    password of 128 two-octet letters signed on by SMTP and never by POP.
    No control character: a line break or a NUL cannot be sent in PASS, so
    such a password was taken and could never sign on to POP."""
    if not isinstance(password, str) or not 1 <= len(password) <= MAX_PASSWORD or \
            len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_OCTETS or \
            any(c < " " or c == "\x7f" for c in password):
        shown = f"({len(password)} characters)" if isinstance(password, str) else password
        raise DirectoryError(
            "password", shown, f"is not allowed; allowed: 1-{MAX_PASSWORD} characters, "
            f"at most {MAX_PASSWORD_OCTETS} octets in UTF-8, no control characters"
        )
    return password


def _check_text(field: str, raw: Any, required: bool = False) -> str:
    if not isinstance(raw, str):
        raise DirectoryError(field, raw, "is not allowed; allowed: text")
    text = raw.strip()
    if required and not text:
        raise DirectoryError(field, raw, f"is not allowed; allowed: 1-{MAX_TEXT} characters")
    if len(text) > MAX_TEXT or not text.isprintable():
        raise DirectoryError(
            field, raw, f"is not allowed; allowed: up to {MAX_TEXT} printable characters"
        )
    return text


def _check_choice(field: str, raw: Any, values: Sequence[str]) -> str:
    if isinstance(raw, str) and raw.strip().upper() in values:
        return raw.strip().upper()
    raise DirectoryError(field, raw, "is not allowed; allowed: " + ", ".join(values))


def _check_dir_name(field: str, raw: Any) -> str:
    name = raw.strip().upper() if isinstance(raw, str) and raw.isascii() else None
    if name == ANY:
        return name
    if not name or not _DIR_NAME_RE.fullmatch(name):
        raise DirectoryError(field, raw, f"is not allowed; allowed: {DIR_NAME_ALLOWED}")
    return name


def _check_local_part(raw: str) -> str:
    """A dot-atom (RFC 5321 without quoted strings), kept in its case."""
    local = raw.strip()
    if (
        not local
        or len(local) > MAX_LOCAL_PART
        or not all(_ATOM_RE.fullmatch(atom) for atom in local.split("."))
    ):
        raise DirectoryError(
            "smtpuser",
            raw,
            f"is not allowed; allowed: up to {MAX_LOCAL_PART} characters A-Z a-z 0-9 "
            "!#$%&'*+/=?^_`{|}~- and single dots inside",
        )
    return local


def _check_domain(raw: str) -> str:
    domain = raw.strip().lower().removesuffix(".")
    if (
        not domain
        or len(domain) > MAX_DOMAIN
        or not domain.isascii()
        or not all(_LABEL_RE.fullmatch(label) for label in domain.split("."))
    ):
        raise DirectoryError(
            "smtpdomain", raw, "is not allowed; allowed: a domain name such as example.test"
        )
    return domain


def _optional(raw: str | None) -> str | None:
    """``None``, "" and "*NONE" all mean the field is empty."""
    if raw is None or not raw.strip() or raw.strip().upper() == NONE:
        return None
    return raw


def _fold(local: str) -> str:
    return local.casefold()


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


# -- password hashes ----------------------------------------------------------


def hash_password(password: str) -> str:
    """An Argon2id hash in the PHC string format, which carries its parameters.

    Of the password in Unicode NFC (RFC 8265's OpaqueString): "ü" typed as one
    character or as u + combining diaeresis (what some systems send) is one
    password.
    """
    kdf = Argon2id(salt=secrets.token_bytes(SALT_BYTES), length=ARGON2_LEN,
                   iterations=ARGON2_T, lanes=ARGON2_P, memory_cost=ARGON2_M)
    return kdf.derive_phc_encoded(unicodedata.normalize("NFC", password).encode("utf-8"))


def current_scheme(stored: str) -> bool:
    """True when ``stored`` was made with today's scheme and costs."""
    return stored.startswith(f"$argon2id$v=19$m={ARGON2_M},t={ARGON2_T},p={ARGON2_P}$")


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check; an unreadable hash is simply a wrong password."""
    if stored.startswith("$argon2id$"):
        return _verify_argon2id(password, stored)
    return _verify_scrypt(password, stored)


_PHC_COSTS = re.compile(r"\$argon2id\$v=19\$m=(\d{1,7}),t=(\d{1,3}),p=(\d{1,3})\$")


def _verify_argon2id(password: str, stored: str) -> bool:
    costs = _PHC_COSTS.match(stored)
    if costs is None:
        return False
    m, t, p = (int(x) for x in costs.groups())
    # A damaged or hostile hash must not push memory or time past these
    # (at most 64 MiB, and about four times the work of today's hashes).
    if not (8 * p <= m <= 64 * 1024 and 1 <= t <= 10 and 1 <= p <= 8
            and m * t <= 160 * 1024):
        return False
    try:
        Argon2id.verify_phc_encoded(password.encode("utf-8"), stored)
    except (InvalidKey, ValueError):
        return False
    return True


def _verify_scrypt(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt64, digest64 = stored.split("$")
        n_i, r_i, p_i = int(n), int(r), int(p)
        salt = base64.b64decode(salt64, validate=True)
        digest = base64.b64decode(digest64, validate=True)
    except ValueError:
        return False
    if scheme != "scrypt" or not _sane_cost(n_i, r_i, p_i) or not salt or not digest:
        return False
    try:
        candidate = _scrypt(password, salt, n_i, r_i, p_i, len(digest))
    except ValueError:  # parameters OpenSSL refuses: a damaged hash
        return False
    return hmac.compare_digest(candidate, digest)


def _sane_cost(n: int, r: int, p: int) -> bool:
    """Bounds a damaged or hostile hash cannot push memory or time past."""
    return (
        2 <= n <= 2**20
        and n & (n - 1) == 0
        and 1 <= r <= 32
        and 1 <= p <= 16
        and (128 * r * n <= 64 * 2**20)
    )


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        dklen=dklen,
        maxmem=256 * r * n + 2**20,
    )


_DUMMY_HASH: str | None = None


def prepare_sign_on() -> None:
    """Make the dummy hash now, before any sign-on: made at the first unknown
    user, it cost that user a second hash, which told it apart (a prestart
    job's launcher calls this once, and every job inherits it)."""
    _dummy_hash()


def _dummy_hash() -> str:
    """A hash no password matches, so unknown users cost the same as known ones."""
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(32))
    return _DUMMY_HASH


# -- the directory ------------------------------------------------------------

_ENTRY_COLUMNS = "userid, address, usrd, usrprf, msfsrvlvl, prefadr, smtpuser, smtpdomain"
_CHANGEABLE = ("usrd", "user", "msfsrvlvl", "prefadr", "smtpuser", "smtpdomain")


@implementer(IDirectory)
class SqliteDirectory:
    """User profiles and directory entries in one SQLite file."""

    def __init__(self, path: Path, local_domains: Sequence[str], system_address: str) -> None:
        self.path = Path(path)
        self.local_domains: tuple[str, ...] = tuple(
            d.strip().lower().removesuffix(".") for d in local_domains if d.strip()
        )
        self.system_address = _check_dir_name("system_address", system_address)
        self._local = threading.local()

    @classmethod
    def from_settings(cls, settings: Any) -> SqliteDirectory:
        return cls(
            settings.datadir / FILENAME,
            settings.system.local_domains,
            system_address_from_hostname(settings.hostname),
        )

    # connections

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection; a forked child never reuses its parent's."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._open()
            local.conn, local.pid = conn, os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = lost(self.path)
        if why is not None:
            raise DirectoryLost(why)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _enable_wal(conn)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        _migrate(conn)
        return conn

    def check(self) -> None:
        """Open the file and look it over (the daemon's start): sqlite3.DatabaseError
        when it cannot serve, rather than a 451 to every message from then on."""
        row = self._conn().execute("PRAGMA quick_check(1)").fetchone()
        if row is None or row[0] != "ok":
            raise sqlite3.DatabaseError(f"it is damaged: {row[0] if row else 'no answer'}")

    def fold_log(self) -> None:
        """Write the write-ahead log into the file itself (the daemon's stop): the
        jobs end without closing their connections, which left the profiles
        in ``directory.sqlite-wal`` alone, lost to a copy of the file without it."""
        conn = self._conn()
        conn.execute("PRAGMA busy_timeout = 200")  # not held up by another program
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    def __enter__(self) -> SqliteDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock up front.

        A deferred transaction that reads and then writes can fail at once
        with "database is locked" instead of waiting; IMMEDIATE waits.
        """
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    # user profiles

    def create_profile(
        self, usrprf: str, password: str, text: str = "", status: str = ENABLED
    ) -> UserProfile:
        """Create a profile and enroll it as a POP user, as the seed describes."""
        name = profile_name(usrprf)
        text = _check_text("text", text)
        status = _check_choice("status", status, STATUSES)
        pwhash = _password_hash(password)
        profile = UserProfile(name, status, text, _now(), pwhash == NO_PASSWORD)
        with self._write() as conn:
            if _profile_row(conn, name) is not None:
                raise DirectoryError("usrprf", name, "already exists")
            conn.execute(
                "INSERT INTO profiles (usrprf, pwhash, status, text, created)"
                " VALUES (?, ?, ?, ?, ?)",
                (name, pwhash, status, text, profile.created),
            )
            try:
                enrolment = self._enrolment(conn, profile)
            except DirectoryError as e:
                raise DirectoryError(
                    "usrprf", name, f"cannot be enrolled in the directory: {e}"
                ) from None
            self._insert_entry(conn, enrolment)
        return profile

    def _enrolment(self, conn: sqlite3.Connection, profile: UserProfile) -> DirectoryEntry:
        """A POP user's entry: system message store, addressed by SMTP name.

        Without a local domain, or for a profile name with "@" (which cannot
        be a local part), there is no SMTP name to give, so the entry is
        addressed by user ID until an administrator adds one (CHGDIRE).
        """
        smtp = bool(self.local_domains) and "@" not in profile.usrprf
        entry = DirectoryEntry(
            userid=_free_userid(conn, profile.usrprf[:8], self.system_address),
            address=self.system_address,
            usrd=profile.text or profile.usrprf,
            user=profile.usrprf,
            msfsrvlvl=SYSMS,
            prefadr=PREF_SMTP if smtp else PREF_USRID,
            smtpuser=profile.usrprf.lower() if smtp else None,
            smtpdomain=self.local_domains[0] if smtp else None,
        )
        return self._checked(conn, _normalized(entry, self.local_domains), new=True)

    def change_profile(
        self,
        usrprf: str,
        password: str | None = None,
        status: str | None = None,
        text: str | None = None,
    ) -> UserProfile:
        name = profile_name(usrprf)
        updates: dict[str, str] = {}
        if status is not None:
            updates["status"] = _check_choice("status", status, STATUSES)
        if text is not None:
            updates["text"] = _check_text("text", text)
        if password is not None:
            updates["pwhash"] = _password_hash(password)
        with self._write() as conn:
            if _profile_row(conn, name) is None:
                raise _no_profile("usrprf", name)
            for column, value in updates.items():
                conn.execute(f"UPDATE profiles SET {column} = ? WHERE usrprf = ?", (value, name))
            if updates.get("status") == DISABLED:
                # Its POP sign-ons no longer let its address relay (POPWDW).
                conn.execute("DELETE FROM pop_logins WHERE usrprf = ?", (name,))
            row = _profile_row(conn, name)
        return _profile(row)

    def delete_profile(self, usrprf: str) -> str:
        """Delete a profile and its directory entries; its mail stays on disk.

        Returns a note naming the mailbox left behind, because removing mail
        is the administrator's decision (the seed has the user collect it).
        """
        name = profile_name(usrprf)
        with self._write() as conn:
            if _profile_row(conn, name) is None:
                raise _no_profile("usrprf", name)
            removed = conn.execute("DELETE FROM entries WHERE usrprf = ?", (name,)).rowcount
            conn.execute("DELETE FROM profiles WHERE usrprf = ?", (name,))
            # Its POP sign-ons no longer let its addresses relay (POPWDW).
            conn.execute("DELETE FROM pop_logins WHERE usrprf = ?", (name,))
        return (
            f"User profile {name} deleted with {removed} directory "
            f"entr{'y' if removed == 1 else 'ies'}; its mailbox stays in {self.mailbox(name)}"
        )

    def snads_store(self, userid: str) -> Path:
        """A *USRIDX user's store (SNADS), named by its user ID alone."""
        return self.path.parent / "snads" / userid / "Maildir"

    def mailbox(self, usrprf: str) -> Path:
        """Where the Maildir of a profile lives (DESIGN.md §2)."""
        return self.path.parent / "mailboxes" / usrprf / "Maildir"

    def get_profile(self, usrprf: str) -> UserProfile | None:
        try:
            name = profile_name(usrprf)
        except DirectoryError:
            return None
        row = _profile_row(self._conn(), name)
        return None if row is None else _profile(row)

    def profiles(self) -> list[UserProfile]:
        rows = self._conn().execute(
            "SELECT usrprf, status, text, created, pwhash = ? AS password_none FROM profiles"
            " ORDER BY usrprf", (NO_PASSWORD,)
        )
        return [_profile(row) for row in rows]

    def authenticate(self, usrprf: str, password: str) -> str | None:
        """The profile name if the password is right and the profile enabled.

        Every call costs exactly one password hash, so neither an unknown
        name nor a disabled profile is revealed by the time the answer takes.
        A hash of an earlier scheme, or with other costs, is replaced at the
        first good login.
        """
        try:
            name: str | None = profile_name(usrprf)
        except DirectoryError:
            name = None
        row = None
        if name is not None:
            row = (
                self._conn()
                .execute("SELECT pwhash, status FROM profiles WHERE usrprf = ?", (name,))
                .fetchone()
            )
        if row is not None and (row["pwhash"] == NO_PASSWORD or _special(password)):
            # PASSWORD(*NONE): refused as an unknown name is, at the same cost.
            # So are IBM's special values typed as a password: an older
            # twistmail stored PASSWORD(*NONE) as the password "*NONE".
            row = None
        stored = row["pwhash"] if row is not None else _dummy_hash()
        secret = password if isinstance(password, str) else ""
        nfc = unicodedata.normalize("NFC", secret)
        good = verify_password(nfc, stored)
        legacy = False
        if not good and nfc != secret:
            # A hash made before passwords were normalised, of a password
            # not in NFC: it is made again in NFC once it matches.  Asked
            # for an unknown name too, so the time does not tell it apart.
            good = legacy = verify_password(secret, stored)
        if row is None or not good or row["status"] != ENABLED:
            return None
        if legacy or not current_scheme(stored):
            upgraded = hash_password(secret)  # before the write lock, not under it
            try:
                with self._write() as conn:
                    conn.execute("UPDATE profiles SET pwhash = ? WHERE usrprf = ? AND pwhash = ?",
                                 (upgraded, name, stored))
            except sqlite3.Error:
                pass  # the next login tries again; this one has succeeded
        return name

    # directory entries

    def add_entry(self, entry: DirectoryEntry) -> DirectoryEntry:
        """Add an entry (ADDDIRE); returns it as stored (upper-cased names ...)."""
        with self._write() as conn:
            entry = self._checked(conn, _normalized(entry, self.local_domains), new=True)
            self._insert_entry(conn, entry)
        return entry

    def change_entry(self, userid: str, address: str, **fields: Any) -> DirectoryEntry:
        """Change some fields of an entry (CHGDIRE); None or "*NONE" empties one."""
        unknown = set(fields) - set(_CHANGEABLE)
        if unknown:
            raise TypeError(f"change_entry() got unknown fields {sorted(unknown)}")
        key = _entry_key(userid, address)
        with self._write() as conn:
            current = _entry_row(conn, *key)
            if current is None:
                raise _no_entry(*key)
            if "smtpuser" in fields and "smtpdomain" not in fields and (
                    fields["smtpuser"] is None or str(fields["smtpuser"]).strip().upper() == NONE):
                fields = {**fields, "smtpdomain": None}  # the SMTP name goes as a whole
            changed = attrs.evolve(_entry(current), **fields)
            changed = self._checked(conn, _normalized(changed, self.local_domains), new=False)
            # In place: the row keeps its place among the profile's entries,
            # which tells its own entry (enrolled first) from later ones.
            conn.execute(
                "UPDATE entries SET usrd = ?, usrprf = ?, msfsrvlvl = ?, prefadr = ?,"
                " smtpuser = ?, smtpdomain = ?, smtpfold = ? WHERE userid = ? AND address = ?",
                (changed.usrd, changed.user, changed.msfsrvlvl, changed.prefadr,
                 changed.smtpuser, changed.smtpdomain,
                 None if changed.smtpuser is None else _fold(changed.smtpuser), *key))
        return changed

    def remove_entry(self, userid: str, address: str) -> None:
        """Remove an entry (RMVDIRE): no more mail is delivered for it."""
        key = _entry_key(userid, address)
        with self._write() as conn:
            if (
                conn.execute("DELETE FROM entries WHERE userid = ? AND address = ?", key).rowcount
                == 0
            ):
                raise _no_entry(*key)

    def entries(self) -> list[DirectoryEntry]:
        rows = self._conn().execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries ORDER BY userid, address"
        )
        return [_entry(row) for row in rows]

    def get_entry(self, userid: str, address: str) -> DirectoryEntry | None:
        try:
            key = _entry_key(userid, address)
        except DirectoryError:
            return None
        row = _entry_row(self._conn(), *key)
        return None if row is None else _entry(row)

    def _checked(
        self, conn: sqlite3.Connection, entry: DirectoryEntry, new: bool
    ) -> DirectoryEntry:
        """The rules that involve other rows; ``entry`` is already normalized."""
        key = (entry.userid, entry.address)
        if new and _entry_row(conn, *key) is not None:
            raise DirectoryError("usrid", " ".join(key), "already exists")
        if entry.user is not None and _profile_row(conn, entry.user) is None:
            raise _no_profile("user", entry.user, "; allowed: *NONE or an existing user profile")
        if entry.smtpuser is not None and (new or _smtp_key(_entry_row(conn, *key)) !=
                                           (entry.smtpdomain, _fold(entry.smtpuser))):
            # A change that keeps the name is not held against names an
            # earlier release let differ in case alone.
            _check_smtp_name_free(conn, entry)
        if entry.msfsrvlvl == USRIDX and entry.userid != "*ANY":
            # A SNADS user's store is named by the user ID alone: two *USRIDX
            # entries with one user ID would read each other's mail.
            other = conn.execute(
                "SELECT address FROM entries WHERE userid = ? AND address != ? AND msfsrvlvl = ?",
                (entry.userid, entry.address, USRIDX)).fetchone()
            if other is not None:
                raise DirectoryError("usrid", " ".join(key), "is not allowed: user ID "
                                     f"{entry.userid} already has a *USRIDX entry at address "
                                     f"{other[0]}, whose SNADS store it would share")
            before = None if new else _entry_row(conn, *key)
            if before is None or before["msfsrvlvl"] != USRIDX:
                # Nor one a removed entry left: RMVDIRE keeps the store.
                store = self.snads_store(entry.userid)
                left = messages_in(store)
                if left:
                    raise DirectoryError(
                        "usrid", " ".join(key), f"is not allowed: user ID {entry.userid} has "
                        f"a SNADS store left by an earlier entry, with {left} "
                        f"distribution{'s' if left != 1 else ''} ({store.parent}); allowed: "
                        "a user ID without one (move or remove that store first)")
        elif not new and entry.userid != "*ANY":
            before = _entry_row(conn, *key)
            if before is not None and before["msfsrvlvl"] == USRIDX:
                # Its distributions would stay where no command reaches them,
                # and the entry could not be changed back.
                store = self.snads_store(entry.userid)
                left = messages_in(store)
                if left:
                    raise DirectoryError(
                        "msfsrvlvl", entry.msfsrvlvl, f"is not allowed while the SNADS store "
                        f"of {entry.userid} holds {left} distribution{'s' if left != 1 else ''}"
                        f" ({store.parent}); allowed: *USRIDX, or another once the store is "
                        "empty (qrydst, rcvdst)")
        return entry

    def _insert_entry(self, conn: sqlite3.Connection, entry: DirectoryEntry) -> None:
        conn.execute(
            f"INSERT INTO entries ({_ENTRY_COLUMNS}, smtpfold) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.userid,
                entry.address,
                entry.usrd,
                entry.user,
                entry.msfsrvlvl,
                entry.prefadr,
                entry.smtpuser,
                entry.smtpdomain,
                None if entry.smtpuser is None else _fold(entry.smtpuser),
            ),
        )

    # resolution

    def resolve(self, address: str) -> Resolution | None:
        """How to deliver to ``address``, or None when no entry takes it.

        The domain is matched without regard to case (RFC 5321); the local
        part exactly first, then without regard to case when that names one
        entry only.  Unknown local users go to the ``*ANY *ANY`` entry when
        there is one.  ``postmaster`` gets no special treatment here: without
        an entry it resolves to None and the caller decides what postmaster
        mail does.  A disabled profile still receives mail (disabling stops
        sign-on, as on IBM i).
        """
        if not isinstance(address, str):
            return None
        local, at, domain = address.strip().rpartition("@")
        domain = domain.lower().removesuffix(".")
        if not at or not local or not domain:
            return None
        if domain not in self.local_domains:
            return Resolution(REMOTE, address)
        conn = self._conn()
        entry = _smtp_match(conn, local, domain)
        if entry is not None:
            return _resolution(entry, address)
        row = _entry_row(conn, ANY, ANY)
        if row is None:
            return None
        return Resolution(POP, address, usrprf=row["usrprf"], catchall=True)

    # POP-before-SMTP records

    def record_pop_login(self, ip: str, usrprf: str, at: float | None = None) -> None:
        """Remember that ``ip`` signed on to POP (for the relay window, POPWDW)."""
        when = time.time() if at is None else at
        with self._write() as conn:
            conn.execute(
                "INSERT INTO pop_logins (ip, usrprf, at) VALUES (?, ?, ?)"
                " ON CONFLICT(ip) DO UPDATE SET usrprf = excluded.usrprf, at = excluded.at",
                (ip, usrprf, when),
            )

    def pop_login_since(self, ip: str, since: float) -> str | None:
        """The profile that signed on to POP from ``ip`` at or after ``since``."""
        row = self._conn().execute(
            "SELECT l.usrprf FROM pop_logins l JOIN profiles p ON p.usrprf = l.usrprf"
            " WHERE l.ip = ? AND l.at >= ? AND p.status = ?", (ip, since, ENABLED)
        ).fetchone()
        return None if row is None else row["usrprf"]

    def signs_on(self, usrprf: str) -> bool:
        """Whether the profile exists and is enabled: a session signed on with it
        goes on relaying only while this holds (DLTUSRPRF, STATUS *DISABLED)."""
        row = self._conn().execute(
            "SELECT status FROM profiles WHERE usrprf = ?", (usrprf,)).fetchone()
        return row is not None and row["status"] == ENABLED

    def smtp_address(self, usrprf: str) -> str | None:
        """The SMTP name mail from ``usrprf`` carries.

        A *SMTP entry of the system message store first; among those, the
        profile's own (its user ID is the profile name, or it was enrolled
        first, as CRTUSRPRF does): entries added only to route mail to its
        mailbox (NONDELIVERY, postmaster) must not change who the user is.
        """
        try:
            name = profile_name(usrprf)
        except DirectoryError:
            return None
        row = (
            self._conn()
            .execute(
                "SELECT smtpuser, smtpdomain FROM entries"
                " WHERE usrprf = ? AND smtpuser IS NOT NULL AND userid != ?"
                " ORDER BY prefadr != ?, msfsrvlvl != ?, userid != ?, rowid LIMIT 1",
                (name, ANY, PREF_SMTP, SYSMS, name[:8]),
            )
            .fetchone()
        )
        return None if row is None else f"{row['smtpuser']}@{row['smtpdomain']}"

    # SMTP list entries (ADDSMTPLE / RMVSMTPLE / WRKSMTPLE)

    def add_list_entry(self, entry: ListEntry) -> ListEntry:
        """Add an entry; returns it as stored (normalized addresses, lower-case hosts).

        An *ACCEPT or *REJECT address keeps only its network part, so that
        192.0.2.5 with mask 255.255.255.0 and 192.0.2.0 with the same mask
        are recognized as the same entry.
        """
        normal, key = _normalized_list_entry(entry)
        with self._write() as conn:
            if _list_rows(conn, normal.type, "entrykey", key):
                field, shown = _list_key_shown(normal)
                raise DirectoryError(field, shown, f"is already in the {normal.type} list")
            conn.execute(
                f"INSERT INTO smtp_list (type, entrykey, {', '.join(LIST_KEYWORDS)})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (normal.type, key, *(getattr(normal, k) for k in LIST_KEYWORDS)),
            )
        return normal

    def remove_list_entry(self, type: str, **fields: str | None) -> ListEntry:
        """Remove exactly one entry (RMVSMTPLE), named by its type and key keywords.

        An *ACCEPT or *REJECT entry may be named by its address alone when
        only one entry has that address; otherwise the mask must say which.
        Other keywords given must agree with the entry, so a mistyped
        command cannot remove something the administrator did not mean.
        """
        unknown = set(fields) - set(LIST_KEYWORDS)
        if unknown:
            raise TypeError(f"remove_list_entry() got unknown fields {sorted(unknown)}")
        given = {k: v for k, v in fields.items() if _is_given(v)}
        rule = check_list_keywords(type, given, removal=True)
        with self._write() as conn:
            row = _the_row_to_remove(conn, rule, given)
            conn.execute("DELETE FROM smtp_list WHERE id = ?", (row["id"],))
        return _list_entry(row)

    def list_entries(self, type: str | None = None) -> list[ListEntry]:
        """The entries of one type, or of all types, each type in the order added."""
        conn = self._conn()
        if type is None:
            rows = conn.execute(f"SELECT {_LIST_COLUMNS} FROM smtp_list ORDER BY id")
        else:
            name = _check_choice("type", type, LIST_TYPE_NAMES)
            rows = conn.execute(
                f"SELECT {_LIST_COLUMNS} FROM smtp_list WHERE type = ? ORDER BY id", (name,)
            )
        order = {name: i for i, name in enumerate(LIST_TYPE_NAMES)}
        entries = [_list_entry(row) for row in rows]
        return sorted(entries, key=lambda e: order.get(e.type, len(order)))

    # SMTP list checks, made for every connection, recipient and message

    def address_listed(self, type: str, ip: str) -> bool:
        """Whether client address ``ip`` is in the *ACCEPT or *REJECT list.

        An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a dual-stack
        listener reports for IPv4 clients) matches IPv4 entries.  An address
        that cannot be read is in no list.
        """
        if type not in NETWORK_TYPES:
            type = _check_choice("type", type, NETWORK_TYPES)
        v4, v6 = _client_ints(ip) if isinstance(ip, str) else (None, None)
        nets4, nets6 = self._list_snapshot().networks[type]
        return _in_networks(v4, nets4) or _in_networks(v6, nets6)

    def near_domain(self, domain: str) -> bool:
        """Whether ``domain`` is a *NEAR domain or a subdomain of one."""
        near = self._list_snapshot().near
        if not near or not isinstance(domain, str):
            return False
        labels = domain.strip().lower().removesuffix(".").split(".")
        return any(".".join(labels[i:]) in near for i in range(len(labels)))

    def etrn_allowed(self, ip_or_host: str) -> bool:
        """Whether the client, by address or by host name, is in the *ETRNSVR list."""
        if not isinstance(ip_or_host, str):
            return False
        return _host_key(ip_or_host) in self._list_snapshot().etrn

    def etrn_host_names(self) -> list[str]:
        """The *ETRNSVR entries given by host name (the manual's "ISP's host"), sorted."""
        return sorted(h for h in self._list_snapshot().etrn if not _is_address(h))

    def hostauth(self, hostname: str) -> tuple[str, str] | None:
        """The (user name, password) the SMTP client signs on with at ``hostname``."""
        if not isinstance(hostname, str):
            return None
        return self._list_snapshot().hostauth.get(_host_key(hostname))

    def filters(self) -> dict[str, list[str]]:
        """The filter patterns of each *FTR type (every type present, maybe empty)."""
        snapshot = self._list_snapshot().filters
        return {t: [pattern for pattern, _ in snapshot[t]] for t in FILTER_TYPES}

    def filter_match(self, type: str, value: str) -> str | None:
        """The first pattern of filter list ``type`` that ``value`` matches, if any.

        Matching ignores case and covers the whole value; ``*`` stands for
        one or more characters, as the seed describes (``*.vbs``, ``image/*``,
        ``*@us.ibm.com``).
        """
        name = _check_choice("type", type, FILTER_TYPES)
        if not isinstance(value, str):
            return None
        for pattern, compiled in self._list_snapshot().filters[name]:
            if compiled.fullmatch(value.strip()):
                return pattern
        return None

    def _list_snapshot(self) -> _ListSnapshot:
        """The parsed lists, re-read only when the version row says they changed.

        The version is read before the rows: a change landing between the two
        reads leaves a snapshot older than its rows, which only costs one
        more re-read at the next check, never a stale answer.
        """
        conn = self._conn()
        token, version = conn.execute("SELECT token, n FROM smtp_list_version").fetchone()
        snapshot = _LIST_CACHE.get(self.path)
        if snapshot is None or snapshot.version != version or snapshot.token != token:
            rows = conn.execute(f"SELECT {_LIST_COLUMNS} FROM smtp_list ORDER BY id").fetchall()
            snapshot = _ListSnapshot.build(token, version, [_list_entry(r) for r in rows])
            _LIST_CACHE[self.path] = snapshot
        return snapshot


# -- helpers on a connection --------------------------------------------------


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, retrying: the switch needs a moment alone with the file.

    SQLite may answer "database is locked" here without consulting the busy
    timeout when several processes open a new file at once.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot use WAL mode (journal_mode is {mode})")


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply the schema steps this file lacks, once, whoever opens it first."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back unless SQLite already has, so the first error is the one reported."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _profile_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT usrprf, status, text, created, pwhash = ? AS password_none FROM profiles"
        " WHERE usrprf = ?", (NO_PASSWORD, name)
    ).fetchone()


def _profile(row: sqlite3.Row) -> UserProfile:
    return UserProfile(row["usrprf"], row["status"], row["text"], row["created"],
                       bool(row["password_none"]))


def _special(password: Any) -> bool:
    """One of IBM's special values of PASSWORD, which is never a password."""
    return isinstance(password, str) and password.strip().upper() in SPECIAL_PASSWORDS


def _password_hash(password: str) -> str:
    """What is stored for a password: its hash, or NO_PASSWORD as it is,
    which no hash check matches."""
    if password.strip().upper() == NO_PASSWORD:
        return NO_PASSWORD
    if _special(password):
        raise DirectoryError("password", password, "is not allowed; allowed: a password, or "
                             "*NONE (no sign-on)")
    return hash_password(_check_password(password))


def _entry_row(conn: sqlite3.Connection, userid: str, address: str) -> sqlite3.Row | None:
    return conn.execute(
        f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE userid = ? AND address = ?",
        (userid, address),
    ).fetchone()


def _entry(row: sqlite3.Row) -> DirectoryEntry:
    return DirectoryEntry(
        userid=row["userid"],
        address=row["address"],
        usrd=row["usrd"],
        user=row["usrprf"],
        msfsrvlvl=row["msfsrvlvl"],
        prefadr=row["prefadr"],
        smtpuser=row["smtpuser"],
        smtpdomain=row["smtpdomain"],
    )


def _entry_key(userid: str, address: str) -> tuple[str, str]:
    key = (_check_dir_name("usrid", userid), _check_dir_name("usrid", address))
    if (key[0] == ANY) != (key[1] == ANY):
        raise DirectoryError(
            "usrid", f"{key[0]} {key[1]}", "is not allowed; *ANY is only allowed as *ANY *ANY, "
            "the catch-all (mail is found by SMTP name: an entry for any user of one "
            "address would never be used)")
    return key


def _normalized(entry: DirectoryEntry, local_domains: Sequence[str]) -> DirectoryEntry:
    """The entry's own rules: names, choices, required combinations.

    An SMTP user without a domain gets the first local domain, the default
    SMTP domain of this system.
    """
    userid, address = _entry_key(entry.userid, entry.address)
    user = _optional(entry.user)
    smtpuser = _optional(entry.smtpuser)
    smtpdomain = _optional(entry.smtpdomain)
    if smtpuser is not None and smtpdomain is None and local_domains:
        smtpdomain = local_domains[0]
    normal = DirectoryEntry(
        userid=userid,
        address=address,
        usrd=_check_text("usrd", entry.usrd, required=True),
        user=None if user is None else profile_name(user, "user"),
        msfsrvlvl=_check_choice("msfsrvlvl", entry.msfsrvlvl, SERVICE_LEVELS),
        prefadr=_check_choice("prefadr", entry.prefadr, PREFERRED_ADDRESSES),
        smtpuser=None if smtpuser is None else _check_local_part(smtpuser),
        smtpdomain=None if smtpdomain is None else _check_domain(smtpdomain),
    )
    _check_combination(normal)
    return normal


def _check_combination(entry: DirectoryEntry) -> None:
    if entry.is_catchall and entry.user is None:
        raise DirectoryError(
            "user",
            NONE,
            "is not allowed for *ANY *ANY; allowed: the user profile "
            "whose mailbox receives mail for unknown local users",
        )
    if entry.is_catchall and entry.msfsrvlvl != SYSMS:
        raise DirectoryError(
            "msfsrvlvl",
            entry.msfsrvlvl,
            "is not allowed for *ANY *ANY; allowed: *SYSMS "
            "(the catch-all delivers to its user profile's mailbox)",
        )
    if entry.msfsrvlvl == SYSMS and entry.user is None:
        raise DirectoryError(
            "user",
            NONE,
            "is not allowed with *SYSMS; allowed: the user profile that owns the mailbox",
        )
    if entry.smtpuser is not None and entry.smtpdomain is None:
        raise DirectoryError("smtpdomain", NONE, f"is not allowed with SMTP user "
                             f"{entry.smtpuser!r}; allowed: a domain (both, or *NONE for both)")
    if entry.smtpuser is None and entry.smtpdomain is not None:
        raise DirectoryError("smtpuser", NONE, f"is not allowed with SMTP domain "
                             f"{entry.smtpdomain!r}; allowed: a user name (both, or *NONE "
                             "for both)")
    if entry.prefadr == PREF_SMTP and entry.smtpuser is None:
        raise DirectoryError(
            "smtpuser",
            NONE,
            "is not allowed with preferred address *SMTP; allowed: "
            "an SMTP user name (with --smtpdomain)",
        )


def _check_smtp_name_free(conn: sqlite3.Connection, entry: DirectoryEntry) -> None:
    """Names are told apart without regard to case: with ``sam`` and ``Sam``
    both taken, ``SAM@`` would name neither, and mail to it is refused."""
    row = conn.execute(
        "SELECT userid, address FROM entries WHERE smtpdomain = ? AND smtpfold = ?"
        " AND NOT (userid = ? AND address = ?)",
        (entry.smtpdomain, _fold(entry.smtpuser or ""), entry.userid, entry.address),
    ).fetchone()
    if row is not None:
        raise DirectoryError(
            "smtpuser",
            entry.smtp_name,
            f"is already the SMTP name of directory entry {row['userid']} {row['address']}",
        )


def messages_in(maildir: Path) -> int:
    """Messages in a Maildir, one being delivered (tmp/) included: what a
    mailbox or SNADS store left by a profile or entry removed still holds."""
    count = 0
    for sub in ("new", "cur", "tmp"):
        try:
            count += sum(1 for n in os.listdir(maildir / sub) if not n.startswith("."))
        except FileNotFoundError:
            pass
    return count


def _smtp_key(row: sqlite3.Row | None) -> tuple[str, str] | None:
    if row is None or row["smtpuser"] is None:
        return None
    return row["smtpdomain"], _fold(row["smtpuser"])


def _free_userid(conn: sqlite3.Connection, userid: str, address: str) -> str:
    """``userid`` or, when taken at ``address``, its end replaced by digits."""
    candidate, n = userid, 0
    while _entry_row(conn, candidate, address) is not None:
        n += 1
        suffix = str(n)
        candidate = userid[: 8 - len(suffix)] + suffix
    return candidate


def _smtp_match(conn: sqlite3.Connection, local: str, domain: str) -> sqlite3.Row | None:
    exact = conn.execute(
        f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE smtpdomain = ? AND smtpuser = ?",
        (domain, local),
    ).fetchone()
    if exact is not None:
        return exact
    folded = conn.execute(
        f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE smtpdomain = ? AND smtpfold = ? LIMIT 2",
        (domain, _fold(local)),
    ).fetchall()
    return folded[0] if len(folded) == 1 else None


def _resolution(row: sqlite3.Row, address: str) -> Resolution:
    if row["msfsrvlvl"] == SYSMS:
        return Resolution(POP, address, usrprf=row["usrprf"])
    return Resolution(
        SNADS, address, usrprf=row["usrprf"], userid=row["userid"], sysaddress=row["address"]
    )


def _no_profile(field: str, name: str, allowed: str = "") -> DirectoryError:
    return DirectoryError(field, name, f"does not exist{allowed}")


def _no_entry(userid: str, address: str) -> DirectoryError:
    return DirectoryError("usrid", f"{userid} {address}", "is not in the directory")


# -- SMTP list entries: checks and matching -------------------------------------

_LIST_COLUMNS = "id, type, " + ", ".join(LIST_KEYWORDS)
_MIME_PATTERN_RE = re.compile(r"[A-Za-z0-9!#$&^_.+*-]+/[A-Za-z0-9!#$&^_.+*-]+")
_FTRDATA_ALLOWED = {
    FTRSUBJECT: "a subject such as ILOVEYOU",
    FTRORIGIN: "an originator address such as *@example.com",
    FTRFILNAME: "a file name such as lovebug.vbs or *.vbs",
    FTRTYPE: "a MIME type such as image/jpeg or image/*",
}
_HOST_ALLOWED = {
    NEAR: "a domain name such as example.com (its subdomains match too)",
    DOMAIN: "a domain name such as example.com",
    ETRNSVR: "a host name such as mail.example.com, or an IP address",
    HOSTAUTH: "a host name such as mail.example.com, or an IP address",
}

_Networks = tuple[tuple[int, frozenset[int]], ...]


def check_list_keywords(
    type: str,
    given: Mapping[str, Any],
    *,
    removal: bool = False,
    spell: Callable[[str], str] = str.upper,
) -> ListType:
    """Refuse keywords ``type`` does not take and required ones that are missing.

    Public so that the CLI words the same rules with its option names
    (``spell``); the directory words them as CL keywords.  For a removal the
    key keywords are required and the password is not taken.
    """
    rule = LIST_TYPES[_check_choice("type", type, LIST_TYPE_NAMES)]
    allowed = tuple(k for k in rule.keywords if not (removal and k == "password"))
    needed = tuple(k for k in rule.key if k != "subnetmask") if removal else rule.required
    for keyword, value in given.items():
        if keyword not in allowed:
            shown = "(hidden)" if keyword == "password" else value
            raise DirectoryError(
                keyword,
                shown,
                f"is not allowed with type {rule.name}; allowed: "
                + ", ".join(spell(k) for k in allowed),
            )
    if rule.alternatives:
        _check_one_of(rule, needed, given, spell)
        return rule
    for keyword in needed:
        if keyword not in given:
            raise DirectoryError(
                keyword,
                None,
                f"is required with type {rule.name}; allowed: {_keyword_allowed(rule, keyword)}",
            )
    return rule


def _check_one_of(
    rule: ListType, needed: Sequence[str], given: Mapping[str, Any], spell: Callable[[str], str]
) -> None:
    present = [k for k in needed if k in given]
    if len(present) > 1:
        raise DirectoryError(
            present[1],
            given[present[1]],
            f"is not allowed together with {spell(present[0])} for type {rule.name}; "
            "allowed: one of them",
        )
    if not present:
        first, *others = needed
        raise DirectoryError(
            first,
            None,
            f"is required with type {rule.name} unless "
            f"{' or '.join(spell(k) for k in others)} is given; "
            f"allowed: {_keyword_allowed(rule, first)}",
        )


def _keyword_allowed(rule: ListType, keyword: str) -> str:
    if keyword == "hostname":
        return _HOST_ALLOWED[rule.name]
    if keyword == "ftrdata":
        return _ftrdata_allowed(rule.name)
    return LIST_KEYWORD_ALLOWED[keyword]


def _is_given(value: Any) -> bool:
    """None and "" mean the keyword was left out."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def _normalized_list_entry(entry: ListEntry) -> tuple[ListEntry, str]:
    """The entry as stored, and its key: what makes two entries the same one."""
    given = {k: getattr(entry, k) for k in LIST_KEYWORDS if _is_given(getattr(entry, k))}
    rule = check_list_keywords(entry.type, given)
    values = _list_values(rule.name, given)
    if rule.name in NETWORK_TYPES:
        network = _network(values["intnetadr"], given.get("subnetmask"))
        values.update(intnetadr=str(network.network_address), subnetmask=_mask_text(network))
        return ListEntry(rule.name, **values), network.with_prefixlen
    return ListEntry(rule.name, **values), _list_key(rule, values)


def _list_values(list_type: str, given: Mapping[str, Any]) -> dict[str, str]:
    """Each keyword's value checked and normalized; the mask needs its address, so later."""
    checks: dict[str, Callable[[Any], str]] = {
        "intnetadr": lambda raw: str(_check_address("intnetadr", raw)),
        "hostname": lambda raw: _check_list_host(list_type, raw),
        "ftrdata": lambda raw: _check_ftrdata(list_type, raw),
        "username": _check_username,
        "password": _check_password,
    }
    return {k: checks[k](v) for k, v in given.items() if k != "subnetmask"}


def _list_key(rule: ListType, values: Mapping[str, str]) -> str:
    keyword = next(k for k in rule.key if k in values)
    return values[keyword].casefold() if keyword == "ftrdata" else values[keyword]


def _check_address(field: str, raw: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    text = raw.strip() if isinstance(raw, str) else ""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise DirectoryError(
            field, raw, f"is not allowed; allowed: {LIST_KEYWORD_ALLOWED['intnetadr']}"
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        raise DirectoryError(
            field,
            raw,
            f"is not allowed; allowed: the IPv4 address {address.ipv4_mapped} itself "
            "(it matches IPv4-mapped clients too)",
        )
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise DirectoryError(field, raw, "is not allowed; allowed: an address without a %zone")
    return address


def _network(address: str, mask: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    parsed = _check_address("intnetadr", address)
    return ipaddress.ip_network((parsed, _prefix_length(parsed, mask)), strict=False)


def _prefix_length(address: ipaddress.IPv4Address | ipaddress.IPv6Address, raw: Any) -> int:
    """The prefix length of a dotted IPv4 mask or of a length (``24``, ``/64``).

    A dotted mask is checked for contiguity by hand: ``ipaddress`` would
    quietly read ``0.0.255.255`` as a host mask, the inverse of what an
    administrator typing a subnet mask means.
    """
    if raw is None:
        return address.max_prefixlen
    text = raw.strip().removeprefix("/") if isinstance(raw, str) else ""
    if text.isascii() and text.isdigit():
        if int(text) <= address.max_prefixlen:
            return int(text)
    elif address.version == 4:
        prefix = _dotted_prefix(text)
        if prefix is not None:
            return prefix
    allowed = (
        "a contiguous mask such as 255.255.255.0, or a prefix length 0-32"
        if address.version == 4
        else "a prefix length 0-128 such as 64"
    )
    raise DirectoryError("subnetmask", raw, f"is not allowed for {address}; allowed: {allowed}")


def _dotted_prefix(text: str) -> int | None:
    try:
        mask = int(ipaddress.IPv4Address(text))
    except ValueError:
        return None
    hostbits = mask ^ 0xFFFFFFFF
    if hostbits & (hostbits + 1):
        return None
    return 32 - hostbits.bit_length()


def _mask_text(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """IBM's dotted mask for IPv4; IPv6 has no such form, so its prefix length."""
    return str(network.netmask) if network.version == 4 else str(network.prefixlen)


def _check_list_host(list_type: str, raw: Any) -> str:
    """A lower-case host or domain name, or (where a host may be one) an IP address."""
    text = raw.strip().removesuffix(".") if isinstance(raw, str) else ""
    literal = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    allowed = _HOST_ALLOWED[list_type]
    if _is_address(literal):
        if list_type in (NEAR, DOMAIN):
            raise DirectoryError("hostname", raw, f"is an address; allowed: {allowed}")
        return str(_check_address("hostname", literal))
    name = text.lower()
    labels = name.split(".")
    if (
        not name
        or len(name) > MAX_DOMAIN
        or not name.isascii()
        or not all(_LABEL_RE.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise DirectoryError("hostname", raw, f"is not allowed; allowed: {allowed}")
    return name


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _ftrdata_allowed(list_type: str) -> str:
    return (
        f"{_FTRDATA_ALLOWED[list_type]}, up to {MAX_FTRDATA} printable characters; "
        "* stands for one or more characters and cannot be the whole pattern"
    )


def _check_ftrdata(list_type: str, raw: Any) -> str:
    """A filter pattern; one that is only ``*`` is refused, as it would stop all mail."""
    text = raw.strip() if isinstance(raw, str) else ""
    bad = (
        not text.strip("*")
        or len(text) > MAX_FTRDATA
        or not text.isprintable()
        or (list_type == FTRTYPE and not _MIME_PATTERN_RE.fullmatch(text))
        or (list_type == FTRORIGIN and any(c.isspace() or c in "<>" for c in text))
        or (list_type == FTRFILNAME and any(c in "/\\" for c in text))
    )
    if bad:
        raise DirectoryError(
            "ftrdata",
            raw,
            f"is not allowed with type {list_type}; allowed: {_ftrdata_allowed(list_type)}",
        )
    return text


def _check_username(raw: Any) -> str:
    text = raw.strip() if isinstance(raw, str) else ""
    if not text or len(text) > MAX_PASSWORD or not text.isprintable():
        raise DirectoryError(
            "username", raw, f"is not allowed; allowed: {LIST_KEYWORD_ALLOWED['username']}"
        )
    return text


def _list_key_shown(entry: ListEntry) -> tuple[str, str]:
    """The keyword and value that name ``entry`` in a message."""
    if entry.type in NETWORK_TYPES:
        return "intnetadr", f"{entry.intnetadr} {entry.subnetmask}"
    rule = LIST_TYPES[entry.type]
    keyword = next(k for k in rule.key if getattr(entry, k) is not None)
    return keyword, getattr(entry, keyword)


def _list_rows(conn: sqlite3.Connection, list_type: str, column: str, value: str) -> list[Any]:
    return conn.execute(
        f"SELECT {_LIST_COLUMNS} FROM smtp_list WHERE type = ? AND {column} = ? ORDER BY id",
        (list_type, value),
    ).fetchall()


def _the_row_to_remove(
    conn: sqlite3.Connection, rule: ListType, given: Mapping[str, Any]
) -> sqlite3.Row:
    """The one row ``given`` names, or the error that says why there is not one."""
    values = _list_values(rule.name, given)
    if rule.name not in NETWORK_TYPES:
        rows = _list_rows(conn, rule.name, "entrykey", _list_key(rule, values))
    elif "subnetmask" in given:
        network = _network(values["intnetadr"], given["subnetmask"])
        rows = _list_rows(conn, rule.name, "entrykey", network.with_prefixlen)
    else:
        rows = _list_rows(conn, rule.name, "intnetadr", values["intnetadr"])
    rows = [r for r in rows if all(r[k] == v for k, v in values.items() if k not in rule.key)]
    if len(rows) == 1:
        return rows[0]
    keyword = next(k for k in (*rule.key, *LIST_KEYWORDS) if k in given)
    shown = " ".join(str(given[k]) for k in LIST_KEYWORDS if k in given)
    if not rows:
        raise DirectoryError(keyword, shown, f"is not in the {rule.name} list")
    raise DirectoryError(
        "subnetmask",
        NONE,
        f"is not allowed: {shown} is in the {rule.name} list {len(rows)} times; "
        "allowed: " + ", ".join(r["subnetmask"] for r in rows),
    )


def _list_entry(row: sqlite3.Row) -> ListEntry:
    return ListEntry(row["type"], **{k: row[k] for k in LIST_KEYWORDS})


# The matchers answer from this per-process snapshot, keyed by database path.
_LIST_CACHE: dict[Path, _ListSnapshot] = {}


@attrs.frozen
class _ListSnapshot:
    """The lists parsed into what the per-connection checks need.

    Networks are grouped by mask, so a check costs one AND and one set
    lookup per distinct mask rather than a comparison per entry.
    """

    token: str
    version: int
    networks: dict[str, tuple[_Networks, _Networks]]
    near: frozenset[str]
    etrn: frozenset[str]
    hostauth: dict[str, tuple[str, str]]
    filters: dict[str, tuple[tuple[str, _Wildcard], ...]]

    @classmethod
    def build(cls, token: str, version: int, entries: Sequence[ListEntry]) -> _ListSnapshot:
        def of(list_type: str) -> list[ListEntry]:
            return [e for e in entries if e.type == list_type]

        return cls(
            token=token,
            version=version,
            networks={t: _network_groups(of(t)) for t in NETWORK_TYPES},
            near=frozenset(e.hostname for e in of(NEAR) if e.hostname),
            etrn=frozenset(_host_key(h) for e in of(ETRNSVR) if (h := e.hostname or e.intnetadr)),
            hostauth={
                _host_key(e.hostname): (e.username, e.password)
                for e in of(HOSTAUTH)
                if e.hostname and e.username is not None and e.password is not None
            },
            filters={
                t: tuple((e.ftrdata, _Wildcard(e.ftrdata)) for e in of(t) if e.ftrdata)
                for t in FILTER_TYPES
            },
        )


def _network_groups(entries: Sequence[ListEntry]) -> tuple[_Networks, _Networks]:
    """(IPv4, IPv6) networks as (mask, network numbers) pairs, one per distinct mask."""
    groups: dict[tuple[int, int], set[int]] = {}
    for entry in entries:
        try:
            network = _network(entry.intnetadr or "", entry.subnetmask)
        except ValueError:
            continue
        key = (network.version, int(network.netmask))
        groups.setdefault(key, set()).add(int(network.network_address))
    by_version = [
        tuple((mask, frozenset(nets)) for (v, mask), nets in groups.items() if v == version)
        for version in (4, 6)
    ]
    return by_version[0], by_version[1]


def _in_networks(address: int | None, networks: _Networks) -> bool:
    return address is not None and any((address & mask) in nets for mask, nets in networks)


@functools.lru_cache(maxsize=4096)
def _client_ints(ip: str) -> tuple[int | None, int | None]:
    """A client address as (IPv4 number, IPv6 number); a mapped address has both.

    Cached because the same clients come back again and again, and parsing
    costs more than the whole lookup.
    """
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None, None
    if isinstance(address, ipaddress.IPv4Address):
        return int(address), None
    mapped = address.ipv4_mapped
    return (None if mapped is None else int(mapped)), int(address)


@functools.lru_cache(maxsize=1024)
def _host_key(text: str) -> str:
    """How a host is compared: a canonical address (mapped ones as IPv4) or a lower-case name."""
    name = text.strip().removesuffix(".")
    literal = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        address = ipaddress.ip_address(literal.split("%", 1)[0])
    except ValueError:
        return name.lower()
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


class _Wildcard:
    """The seed's filter wildcard: ``*`` is one or more characters; case is ignored.

    Matched by finding the literal pieces in order, leftmost first, which is
    linear in the value.  A regular expression with several ``.+`` took
    seconds to minutes on a long crafted subject (``*free*money*``), holding
    a QMSF job all that time.
    """

    def __init__(self, pattern: str) -> None:
        parts = [part.casefold() for part in pattern.split("*")]
        self.literal = len(parts) == 1
        self.first, self.middle, self.last = parts[0], parts[1:-1], parts[-1]

    def fullmatch(self, value: str) -> bool:
        v = value.casefold()
        first, middle, last = self.first, self.middle, self.last
        if self.literal:
            return v == first
        end = len(v) - len(last)  # where the last piece must start
        if not (v.startswith(first) and v.endswith(last)) or end < len(first):
            return False
        pos = len(first)  # each * takes at least one character from here
        for part in middle:
            found = v.find(part, pos + 1, end - 1)
            if found < 0:
                return False
            pos = found + len(part)
        return pos + 1 <= end


#: The seed's generic user that gets a copy of every nondelivery notice.
NONDELIVERY_USER = "NONDELIVERY"


def nondelivery_address(directory: Any) -> str | None:
    """The seed's generic NONDELIVERY@<local domain> SMTP name, if enrolled."""
    for domain in directory.local_domains:
        address = f"{NONDELIVERY_USER}@{domain}"
        res = directory.resolve(address)
        if res is not None and res.kind in ("pop", "snads") and not res.catchall:
            return address
    return None


def postmaster_stand_in(directory: Any, responsible: str | None) -> tuple[Any, str | None]:
    """Where postmaster mail goes when no entry names it, and who that is.

    RFC 5321 §4.5.1: every domain's postmaster takes mail.  Without an entry
    of its own it goes to the first local domain's postmaster, else to the
    NFYDLVRY responsible person, else to the NONDELIVERY user, whichever is
    a mailbox here; (None, None) when none is.  The ``*ANY *ANY`` entry is
    no stand-in: what it collects is seldom read, and abuse reports sent
    to the postmaster would be lost in it.
    """
    first = f"postmaster@{directory.local_domains[0]}" if directory.local_domains else None
    for stand_in in (first, responsible, nondelivery_address(directory)):
        if not stand_in or stand_in.startswith("*"):
            continue
        res = directory.resolve(stand_in)
        if res is not None and res.kind in ("pop", "snads") and not res.catchall:
            return res, stand_in
    return None, None


def resolve_recipient(directory: Any, address: str,
                      responsible: str | None) -> tuple[Any, str | None]:
    """``directory.resolve`` with the postmaster's stand-in, and who stood in.

    A postmaster address that no entry of its own takes (unknown, or only
    caught by ``*ANY *ANY``) goes to :func:`postmaster_stand_in`'s choice;
    the catch-all keeps it only when there is no stand-in.
    """
    res = directory.resolve(address)
    if not address.lower().startswith("postmaster@"):
        return res, None
    if res is not None and (res.kind == "remote" or not res.catchall):
        return res, None
    stand, stand_in = postmaster_stand_in(directory, responsible)
    if stand is None:
        return res, None
    return stand, stand_in
