"""The appliance's settings: attrs classes loaded and checked from TOML.

Reads the TOML file named by ``--config`` (default ``etc/twistmail.toml``).
Every section of INTERFACE.md is a frozen attrs class; every field carries its
value type (``twistmail.settingtypes``), so the loader, the CLI and the writer
(``twistmail.configedit``) agree on what is allowed.  Relative paths in the
file are relative to the directory that holds the file.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import tomllib
from pathlib import Path
from typing import Any

import attrs

from twistmail.settingtypes import (
    Choice,
    ChoiceList,
    DomainList,
    Endpoint,
    FileError,
    HostPort,
    Int,
    IntPair,
    Listen,
    NameServers,
    SettingError,
    Text,
    is_domain,
    parse_value,
    setting,
)

YESNO = Choice(("*YES", "*NO"))
NOMAX = (("*NOMAX", None),)
DEFAULT_CONFIG = "etc/twistmail.toml"

#: The prestart programs, their job names and the services they serve.
PROGRAMS = {
    "QTMSSRCP": {"job": "QTSMTPSRVP", "daemon": "QTSMTPSRVD", "server": "*SMTP"},
    "QTPOPSRVP": {"job": "QTPOPSRVP", "daemon": "QTPOPSRVD", "server": "*POP"},
    "QTMSCCLCP": {"job": "QTSMTPCLTP", "daemon": "QTSMTPBRSR", "server": "*SMTP"},
}

#: Which prestart program serves each listener.
LISTENER_PROGRAM = {
    "smtp": "QTMSSRCP",
    "submission": "QTMSSRCP",
    "smtps": "QTMSSRCP",
    "pop3": "QTPOPSRVP",
    "pop3s": "QTPOPSRVP",
}


def _is_address(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return bool(at and local) and local.isprintable() and not any(
        c.isspace() or c in '"<>,;()\\' for c in local) and is_domain(domain)


@attrs.frozen
class SystemSettings:
    hostname: str = setting(
        Text("a host name"), "", "name in greetings; empty: this machine's name"
    )
    datadir: str = setting(Text("a directory path", empty_ok=False), "var", "state directory")
    local_domains: tuple[str, ...] = setting(
        DomainList(), ("example.test",), "domains delivered here; first is default"
    )

    def check(self) -> None:
        if self.hostname and not is_domain(self.hostname):
            raise SettingError("system.hostname", self.hostname, "a host name (letters, digits, "
                               "hyphens, dots), or empty for this machine's name")


@attrs.frozen
class ListenSettings:
    smtp: Any = setting(Listen(), Listen().parse("127.0.0.1:2525"), "SMTP (port 25)")
    submission: Any = setting(Listen(), Listen().parse("127.0.0.1:2587"), "submission (587)")
    smtps: Any = setting(Listen(), Listen().parse("127.0.0.1:2465"), "SMTP, implicit TLS (465)")
    pop3: Any = setting(Listen(), Listen().parse("127.0.0.1:2110"), "POP3 (110)")
    pop3s: Any = setting(Listen(), Listen().parse("127.0.0.1:2995"), "POP3, implicit TLS (995)")

    def check(self) -> None:
        """Two services on one address and port: the second bind failed as
        "Address already in use", naming neither the setting nor the other."""
        seen: list[tuple[str, Endpoint]] = []
        for field in attrs.fields(ListenSettings):
            endpoint = getattr(self, field.name)
            if endpoint is None:
                continue
            for name, other in seen:
                if endpoint.overlaps(other):
                    raise SettingError(
                        f"listen.{field.name}", str(endpoint),
                        f"an address and port no other service has (listen.{name} "
                        f"is {other})")
            seen.append((field.name, endpoint))


@attrs.frozen
class TLSSettings:
    certificate: str = setting(Text("a PEM file path"), "", "empty: self-signed pair in var/tls/")
    key: str = setting(Text("a PEM file path"), "", "private key of the certificate")


@attrs.frozen
class PrestartEntry:
    """The CHGPJE values of one prestart job entry."""

    strjobs: str = setting(YESNO, "*YES", "start jobs when the server starts")
    inljobs: int = setting(Int(1, 9999), 4, "jobs started at first")
    threshold: int = setting(Int(1, 9999), 2, "start more when available jobs fall below this")
    adljobs: int = setting(Int(0, 999), 2, "how many more to start each time")
    maxjobs: int | None = setting(Int(1, 32000, NOMAX), 20, "most jobs at once")
    maxuse: int | None = setting(Int(1, 1000, NOMAX), 200, "sessions a job serves before ending")
    wait: str = setting(YESNO, "*YES", "*YES: a request waits for a free job; *NO: rejected")

    def check(self, pgm: str) -> None:
        """Cross-field rules of CHGPJE; raises SettingError on the offending key."""
        prefix = f"prestart.{pgm}."
        cap = self.maxjobs
        if cap is not None:
            if self.inljobs > cap:
                raise SettingError(prefix + "inljobs", self.inljobs, f"1-{cap} (at most MAXJOBS)")
            if self.adljobs > cap:
                raise SettingError(prefix + "adljobs", self.adljobs, f"0-{cap} (at most MAXJOBS)")
        if self.threshold > self.inljobs:  # and so at most MAXJOBS
            raise SettingError(
                prefix + "threshold", self.threshold, f"1-{self.inljobs} (at most INLJOBS)"
            )


def _pop_entry() -> PrestartEntry:
    return PrestartEntry(inljobs=3)


@attrs.frozen
class PrestartSettings:
    trim_interval: int = setting(
        Int(1, 3600), 30, "seconds between checks for surplus idle jobs to end"
    )
    wait_limit: int = setting(
        Int(1, 3600), 30, "seconds a request may wait for a free job (WAIT *YES) before 421"
    )
    end_delay: int = setting(
        Int(0, 3600), 10, "seconds busy jobs may finish their sessions at shutdown"
    )
    QTMSSRCP: PrestartEntry = attrs.field(factory=PrestartEntry)
    QTPOPSRVP: PrestartEntry = attrs.field(factory=_pop_entry)
    QTMSCCLCP: PrestartEntry = attrs.field(factory=PrestartEntry)

    def entry(self, pgm: str) -> PrestartEntry:
        return getattr(self, pgm)


RTYMIN = IntPair(Int(0, 99), Int(0, 99))


@attrs.frozen
class SmtpSettings:
    autostart: str = setting(YESNO, "*YES", "start SMTP with the daemon")
    rtymin: tuple[int, int] = setting(RTYMIN, (3, 30), "first-level retries: count, minutes")
    rtyday: tuple[int, int] = setting(
        IntPair(Int(0, 9), Int(0, 9)), (0, 0), "second-level retries: count, days"
    )
    rtyhour: tuple[int, int] = setting(RTYMIN, (0, 0), "second-level retries: count, hours")
    mailrouter: str | None = setting(HostPort(), None, "mail router for non-local mail")
    firewall: str = setting(YESNO, "*NO", "all non-local mail through the mail router")
    fwdhubsvr: str | None = setting(HostPort(), None, "forward all non-local mail to this hub")
    nameservers: tuple[str, ...] = setting(NameServers(), (), "DNS servers")
    hosttable: str = setting(Text("a hosts file path"), "", "hosts file consulted before DNS")
    pctrtgchr: str = setting(YESNO, "*NO", "% in a local part is a routing character")
    journal: str = setting(YESNO, "*YES", "write the QZMF journal")
    alwrly: str = setting(
        Choice(("*ALL", "*NONE", "*NEAR", "*LIST", "*BOTH", "*POPWDW")), "*NONE", "relay policy"
    )
    popwdw: int = setting(Int(15, 65535, also=(0,)), 0, "POP-before-SMTP window, minutes")
    alwauth: str = setting(Choice(("*NONE", "*LCLRLY", "*RELAY")), "*RELAY",
                           "AUTH: not offered, required, or offered for relay")
    authmech: tuple[str, ...] = setting(
        ChoiceList(values=("*PLAIN", "*LOGIN")), ("*PLAIN", "*LOGIN"), "AUTH mechanisms offered"
    )
    alwplainauth: str = setting(YESNO, "*NO", "offer AUTH before STARTTLS")
    vfyfromusr: str = setting(Choice(("*NO", "*YES", "*NOTACCEPT")), "*NO", "check MAIL FROM")
    vfymsfmsg: str = setting(YESNO, "*NO", "check the originator of API mail")
    ovrrjtcnnl: str = setting(YESNO, "*NO", "POP-before-SMTP clients pass *REJECT")
    rblsvr: tuple[str, ...] = setting(DomainList("a list of DNS zones"), (), "DNS block lists")
    etrnsvr: str = setting(YESNO, "*NO", "accept ETRN")
    etrnclt: str = setting(YESNO, "*NO", "issue ETRN when connecting")
    mailxfrint: int = setting(Int(0, 65535), 0, "scheduled delivery interval, minutes")
    nfydlvry: str | None = setting(
        HostPort('an address "user@domain"', hosts=False), None,
        "DSN responsible person (*NONE: off)"
    )
    alwbarelf: str = setting(YESNO, "*NO", "accept a bare LF as a line end in DATA")
    mime8bit: str = setting(YESNO, "*YES", "offer 8BITMIME")
    ftracn: str = setting(Choice(("*KEEP", "*DISCARD")), "*KEEP", "what a matching filter does")
    tlsoutbound: str = setting(
        Choice(("*OPPORTUNISTIC", "*REQUIRED", "*VERIFY")), "*OPPORTUNISTIC", "client STARTTLS"
    )
    clienttimeout: int = setting(
        Int(5, 65535), 300, "seconds the SMTP client waits for a reply (RFC 5321 proportions)"
    )
    maxmsgsize: int = setting(Int(1024, 2**31 - 1), 52428800, "SIZE limit, bytes")
    maxrcpt: int = setting(Int(1, 100000), 100, "recipients per message")
    inacttimo: int = setting(Int(10, 65535), 300, "idle session timeout, seconds")

    def check(self) -> None:
        if self.rtyday[0] and self.rtyhour[0]:
            raise SettingError(
                "smtp.rtyhour", list(self.rtyhour), "[0, 0] while rtyday is set (only one of them)"
            )
        if not self.authmech and self.alwauth != "*NONE":
            raise SettingError("smtp.authmech", [], "*PLAIN, *LOGIN or both while alwauth "
                               f"is {self.alwauth} (*NONE offers no AUTH)")
        if self.nfydlvry is not None and not _is_address(self.nfydlvry):
            raise SettingError("smtp.nfydlvry", self.nfydlvry, '*NONE or an address "user@domain"')

    @property
    def vfyfromusr_in_effect(self) -> str:
        """ALWAUTH(*LCLRLY) also turns VFYFROMUSR on, as the seed says."""
        if self.alwauth == "*LCLRLY" and self.vfyfromusr == "*NO":
            return "*YES"
        return self.vfyfromusr

    @property
    def vfymsfmsg_in_effect(self) -> str:
        """ALWAUTH(*LCLRLY) also turns VFYMSFMSG on, as the seed says."""
        return "*YES" if self.alwauth == "*LCLRLY" else self.vfymsfmsg

    def idle_values(self) -> list[str]:
        """Values that are allowed but do nothing with the others as they are.

        Not refused: an administrator may set them in either order, but
        should hear that one is still waiting for the other.
        """
        out = []
        if self.alwrly == "*POPWDW" and not self.popwdw:
            out.append("ALWRLY *POPWDW lets no one relay while POPWDW is 0")
        if self.ovrrjtcnnl == "*YES" and not self.popwdw:
            out.append("OVRRJTCNNL *YES lets no one past *REJECT while POPWDW is 0")
        if self.firewall == "*YES" and self.mailrouter is None:
            out.append("FIREWALL *YES sends nothing to a router while MAILROUTER is *NONE")
        if self.etrnclt == "*YES" and (not self.mailxfrint or self.mailrouter is None):
            out.append("ETRNCLT *YES issues no ETRN without MAILXFRINT above 0 and a MAILROUTER")
        overridden = [name for name in ("vfyfromusr", "vfymsfmsg")
                      if getattr(self, name) == "*NO" and self.alwauth == "*LCLRLY"]
        if overridden:
            one = len(overridden) == 1
            out.append(f"{' and '.join(n.upper() for n in overridden)} *NO "
                       f"{'acts' if one else 'act'} as *YES while ALWAUTH is *LCLRLY, which "
                       f"enables {'it' if one else 'them'}")
        return out


@attrs.frozen
class PopSettings:
    autostart: str = setting(YESNO, "*YES", "start POP with the daemon")
    nbrsvr: int = setting(Int(1, 20), 3, "initial POP server jobs")
    inacttimo: int = setting(Int(10, 65535), 600, "idle session timeout, seconds")
    msgsplit: int | None = setting(Int(32, 2048, NOMAX), None, "split size, KB")
    alwssl: str = setting(Choice(("*YES", "*NO", "*ONLY")), "*YES", "TLS for POP")
    alwplainauth: str = setting(
        YESNO, "*NO", "USER/PASS without TLS from other hosts (this host may always)")


@attrs.frozen
class StorageSettings:
    threshold: int = setting(Int(50, 99), 90, "percent of the filesystem in use that parks mail")


@attrs.frozen
class LimitsSettings:
    """Abuse limits the controller applies before a job is used (Postfix's anvil)."""

    maxconnperip: int = setting(Int(0, 100000), 10, "concurrent sessions per client (0: none)")
    maxconnrate: int = setting(Int(0, 1000000), 120, "connections per client per interval")
    maxauthfail: int = setting(Int(0, 100000), 10, "failed sign-ons per client per interval")
    maxerrors: int = setting(
        Int(1, 1000), 10, "SMTP errors without a message accepted before the session ends")
    interval: int = setting(Int(10, 86400), 60, "seconds over which rates are counted")


@attrs.frozen
class SnadsSettings:
    """The distribution attributes (CHGDSTA) that SNDDST honours."""

    keeprcp: str = setting(
        Choice(("*BCC", "*ALL", "*NONE")), "*BCC", "recipients kept in SNDDST's MIME headers"
    )


@attrs.frozen
class JournalSettings:
    receiver_size: int = setting(
        Int(4096, 2**40), 16 * 1024 * 1024, "bytes after which a new receiver starts"
    )
    keep_receivers: int = setting(
        Int(2, 999999, also=(0,)), 64, "receivers kept when a new one starts; 0 keeps every one"
    )


SECTIONS: dict[str, type] = {
    "system": SystemSettings,
    "listen": ListenSettings,
    "tls": TLSSettings,
    "prestart": PrestartSettings,
    "smtp": SmtpSettings,
    "pop": PopSettings,
    "storage": StorageSettings,
    "limits": LimitsSettings,
    "journal": JournalSettings,
    "snads": SnadsSettings,
}


@attrs.frozen
class Settings:
    """Everything the appliance reads from its TOML file."""

    path: Path
    system: SystemSettings = attrs.field(factory=SystemSettings)
    listen: ListenSettings = attrs.field(factory=ListenSettings)
    tls: TLSSettings = attrs.field(factory=TLSSettings)
    prestart: PrestartSettings = attrs.field(factory=PrestartSettings)
    smtp: SmtpSettings = attrs.field(factory=SmtpSettings)
    pop: PopSettings = attrs.field(factory=PopSettings)
    storage: StorageSettings = attrs.field(factory=StorageSettings)
    limits: LimitsSettings = attrs.field(factory=LimitsSettings)
    journal: JournalSettings = attrs.field(factory=JournalSettings)
    snads: SnadsSettings = attrs.field(factory=SnadsSettings)
    #: Where relative paths start: the real file's directory, found once when
    #: the file is read (and recorded for the jobs), so that a link re-pointed
    #: later moves no running process to another state directory.
    directory: Path = attrs.field(
        default=attrs.Factory(lambda s: s.path.resolve().parent, takes_self=True), eq=False)

    @property
    def datadir(self) -> Path:
        return self.resolve(self.system.datadir)

    @property
    def hostname(self) -> str:
        return self.system.hostname or socket.getfqdn()

    @property
    def control_socket(self) -> Path:
        return self.datadir / "run" / "control.sock"

    def resolve(self, p: str) -> Path:
        """A path from the file, relative to the file's own directory.

        The file's, not a link's to it: with /etc/twistmail.toml a link to
        /opt/twistmail/etc/twistmail.toml, the shipped "../var" is
        /opt/twistmail/var, not /var.
        """
        path = Path(os.path.expanduser(p))
        return path if path.is_absolute() else (self.directory / path).resolve()


def field_type(cls: type, name: str) -> Any:
    return attrs.fields_dict(cls)[name].metadata["type"]


def _nested_default(f: Any) -> Any:
    """The default of a field that holds a whole table, such as one prestart entry."""
    default = f.default
    return default.factory() if isinstance(default, attrs.Factory) else default


def _load_section(cls: type, data: Any, prefix: str, base: Any = None) -> Any:
    """Parse one table; keys it leaves out keep the values of ``base``.

    ``base`` matters where a table's defaults differ from its class's, as the
    POP prestart entry's INLJOBS does.
    """
    if not isinstance(data, dict):
        raise SettingError(prefix.rstrip("."), data, "a table of settings")
    fields = attrs.fields_dict(cls)
    values: dict[str, Any] = {}
    for key, raw in data.items():
        f = fields.get(key)
        if f is None:
            known = ", ".join(n for n in fields)
            raise SettingError(prefix + key, raw, f"one of the settings {known}")
        if "type" in f.metadata:
            values[key] = parse_value(prefix + key, f.metadata["type"], raw)
        else:
            default = _nested_default(f)
            values[key] = _load_section(type(default), raw, f"{prefix}{key}.", default)
    return attrs.evolve(base, **values) if base is not None else cls(**values)


def from_mapping(data: dict[str, Any], path: Path, directory: Path | None = None) -> Settings:
    """Settings from an already parsed TOML document (checked)."""
    sections: dict[str, Any] = {}
    for name, raw in data.items():
        cls = SECTIONS.get(name)
        if cls is None:
            raise SettingError(name, "[" + name + "]", "sections " + ", ".join(SECTIONS))
        sections[name] = _load_section(cls, raw, name + ".")
    if directory is not None:
        sections["directory"] = directory
    settings = Settings(path=path, **sections)
    pop_entry = data.get("prestart", {}).get("QTPOPSRVP", {})
    if isinstance(pop_entry, dict) and "inljobs" in pop_entry:
        raise SettingError(
            "prestart.QTPOPSRVP.inljobs", pop_entry["inljobs"],
            "nothing here: the POP entry's initial jobs are "
            f"{DERIVED['prestart.QTPOPSRVP.inljobs']} (CHGPOPA NBRSVR)",
        )
    settings = attrs.evolve(settings, prestart=attrs.evolve(
        settings.prestart,
        QTPOPSRVP=attrs.evolve(settings.prestart.QTPOPSRVP, inljobs=settings.pop.nbrsvr),
    ))
    for pgm in PROGRAMS:
        settings.prestart.entry(pgm).check(pgm)
    settings.smtp.check()
    settings.system.check()
    settings.listen.check()
    for key, value in (("smtp.hosttable", settings.smtp.hosttable),
                       ("tls.certificate", settings.tls.certificate),
                       ("tls.key", settings.tls.key)):
        found = _is_file(settings.resolve(value)) if value else True
        # A pair in a directory only root may enter (/etc/letsencrypt/live):
        # the daemon reads it as root before it gives up root, and the jobs,
        # which read these settings as its user, load the copy it keeps.
        if found is None and key.startswith("tls."):
            continue
        if not found:
            raise SettingError(key, value, "an existing file (relative paths start at "
                               "the configuration file's directory)")
    if settings.tls.key and not settings.tls.certificate:
        raise SettingError("tls.key", settings.tls.key, "empty while tls.certificate is "
                           "empty (the self-signed pair is used then); or set both")
    if not settings.system.local_domains:
        raise SettingError("system.local_domains", [], "at least one domain")
    if len(os.fsencode(settings.control_socket)) > MAX_SOCKET_PATH:
        raise SettingError("system.datadir", settings.system.datadir,
                           f"a directory whose path, with run/control.sock, is at most "
                           f"{MAX_SOCKET_PATH} bytes (a UNIX socket's limit)")
    return settings


#: The longest path a UNIX socket can be bound at on Linux (108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def _is_file(path: Path) -> bool | None:
    """Whether ``path`` is a regular file; None when this user may not look (a
    directory on the way it may not enter).  ``os.stat`` itself: from Python
    3.14 ``Path.is_file`` answers False for that too."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except PermissionError:
        return None
    except (OSError, ValueError):  # gone, a name too long, a NUL
        return False


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read and check the configuration file; raises SettingError or OSError.

    A ``.json`` path is the running daemon's accepted settings (``write_applied``).
    """
    p = Path(path or os.environ.get("TWISTMAIL_CONFIG") or DEFAULT_CONFIG).absolute()
    if p.suffix == ".json":
        return _load_applied(p)
    raw = read_file(p)
    try:
        # A byte order mark, as some Windows editors write, is no mistake.
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except tomllib.TOMLDecodeError as e:
        raise FileError(str(p), f"valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise FileError(str(p), f"UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise FileError(str(p), "TOML of values nested a few hundred deep at most") from None
    except ValueError:  # Python's own limit on the digits of an integer
        raise FileError(str(p), "TOML with integers of at most 4300 digits") from None
    return from_mapping(data, p)


#: The largest settings file read: the shipped one, comments and all, is 40 KB.
MAX_FILE = 4 << 20


def read_file(p: str | os.PathLike[str]) -> bytes:
    """A settings file's bytes; raises FileError for what is none (a FIFO,
    /dev/zero, a file over MAX_FILE), OSError."""
    # O_NONBLOCK: a named pipe with no writer would hold the open itself.
    with os.fdopen(os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # /dev/zero, a pipe: read for ever
            raise FileError(str(p), "a regular file")
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise FileError(str(p), f"a settings file of {MAX_FILE >> 20} MiB at most")
    return data


def control_socket_of(path: str | os.PathLike[str]) -> Path | None:
    """Where the daemon of the file at ``path`` answers, read leniently: a bad
    value elsewhere in the file must not hide a running daemon (``status``)."""
    p = Path(path).absolute()
    try:
        if p.suffix == ".json":
            return _load_applied(p).control_socket
        raw_bytes = read_file(p)
        try:
            data = tomllib.loads(raw_bytes.decode("utf-8-sig"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
            # Its own line may still do.
            data = {"system": _datadir_line(raw_bytes.decode("utf-8", "replace"))}
        raw = data.get("system", {}).get("datadir", SystemSettings().datadir)
        datadir = parse_value("system.datadir", field_type(SystemSettings, "datadir"), raw)
        settings = Settings(path=p, system=SystemSettings(datadir=datadir))
    except (OSError, ValueError, TypeError, AttributeError):  # SettingError is a ValueError
        return None
    return settings.control_socket


def _datadir_line(text: str) -> dict[str, Any]:
    """``[system] datadir`` from a file TOML cannot read, by its own line."""
    table = ""
    for line in text.splitlines():
        header = re.match(r"\s*\[\s*([^\]]*?)\s*\]\s*(#.*)?$", line)
        if header:
            table = header.group(1).strip("\"'")
        elif table == "system" and re.match(r"""\s*(datadir|"datadir"|'datadir')\s*=""", line):
            try:
                return tomllib.loads(line)
            except tomllib.TOMLDecodeError:
                return {}
    return {}


#: Where the daemon keeps the settings it accepted, in ``<datadir>/run``.
APPLIED = "settings.json"


def applied_path(settings: Settings) -> Path:
    return settings.datadir / "run" / APPLIED


def write_applied(settings: Settings) -> Path:
    """Record the settings the daemon accepted, for the processes it starts.

    Jobs and the bridge start, and reload, from this record, never from the
    file itself: a value the daemon refused (a hand edit ``config --apply``
    turned down), or an edit not applied yet, must not reach a job that
    happens to start meanwhile, where it would stop the job from booting.
    Relative paths still start at the configuration file's directory.
    """
    tree: dict[str, Any] = {}
    for key, vtype, value, _ in iter_settings(settings):
        *tables, leaf = key.split(".")
        node = tree
        for name in tables:
            node = node.setdefault(name, {})
        node[leaf] = vtype.dump(value)
    path = applied_path(settings)
    data = json.dumps({"config": str(settings.path), "directory": str(settings.directory),
                       "settings": tree}).encode()
    try:
        if path.read_bytes() == data:
            return path  # as recorded before: nothing to write, on a full disk too
    except OSError:
        pass
    tmp = path.with_name(f".{APPLIED}.{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a job starting now reads the old record or the new
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: no debris, one per refused start
        raise
    return path


def _load_applied(path: Path) -> Settings:
    try:
        record = json.loads(read_file(path))
        config, tree = Path(record["config"]), record["settings"]
        directory = Path(record.get("directory") or config.resolve().parent)
        if not isinstance(tree, dict):
            raise TypeError("its settings are not a table")
    except FileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise FileError(str(path), f"the daemon's settings record ({e})") from None
    return from_mapping(tree, config, directory)


#: Settings whose value comes from another key, and are never written themselves.
DERIVED = {"prestart.QTPOPSRVP.inljobs": "pop.nbrsvr"}


def iter_settings(obj: Any, defaults: Any = None, prefix: str = "") -> Any:
    """Yield (dotted key, value type, value, default) for every setting."""
    if defaults is None:
        defaults = Settings(path=Path("."))
    for f in attrs.fields(type(obj)):
        if f.name in ("path", "directory"):
            continue
        value, default = getattr(obj, f.name), getattr(defaults, f.name)
        if "type" in f.metadata:
            if prefix + f.name not in DERIVED:
                yield prefix + f.name, f.metadata["type"], value, default
        else:
            yield from iter_settings(value, default, prefix + f.name + ".")


def changes(old: Settings, new: Settings) -> list[str]:
    """``key old -> new`` for each setting a reload changes, in the file's order."""
    return [f"{key} {_shown(vtype, was)} -> {_shown(vtype, value)}"
            for key, vtype, value, was in iter_settings(new, old) if value != was]


def _shown(vtype: Any, value: Any) -> str:
    """A value as the file has it; "" for an empty one, which would show as nothing."""
    return vtype.show(value) or '""'


def differences(settings: Settings) -> list[tuple[str, str, str]]:
    """(key, value, default) for each setting that differs from its default."""
    out = []
    for key, vtype, value, default in iter_settings(settings):
        if value != default:
            out.append((key, vtype.show(value), vtype.show(default)))
    return out
