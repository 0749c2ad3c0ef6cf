"""The configuration: etc/twistmail.toml, the checks, the writer and ``twistmail config``.

The shipped file is the administrator's documentation, so it is tested like
code: every setting present, commented, and with the default the code uses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomlkit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twistmail import config
from twistmail.cli import base, configcmd
from twistmail.configedit import UnknownSetting, set_values, setting_type
from twistmail.settingtypes import Choice, Endpoint, Int, IntPair, Listen, SettingError, parse_value

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc" / "twistmail.toml"
DEFAULTS = config.Settings(path=Path("."))
ALL = list(config.iter_settings(DEFAULTS))
KEYS = [key for key, _, _, _ in ALL]


def toml(value: Any) -> str:
    return tomlkit.item(value).as_string()


def flat_keys(table: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, value in table.items():
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


@pytest.fixture
def etc_copy(tmp_path: Path) -> Path:
    """The shipped file in a scratch directory (datadir "../var" is never created)."""
    p = tmp_path / "etc" / "twistmail.toml"
    p.parent.mkdir()
    shutil.copyfile(ETC, p)
    return p


def write(tmp_path: Path, text: str, name: str = "twistmail.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --- etc/twistmail.toml -------------------------------------------------------


def test_etc_equals_the_defaults_except_the_example_host_and_datadir() -> None:
    loaded = config.load(ETC)
    expected = attrs.evolve(DEFAULTS, path=loaded.path, system=attrs.evolve(
        DEFAULTS.system, hostname="mail.example.test", datadir="../var"))
    assert loaded == expected
    assert config.differences(loaded) == [("system.hostname", "mail.example.test", ""),
                                          ("system.datadir", "../var", "var")]
    assert loaded.datadir == ROOT / "var"


def test_etc_spells_out_every_setting() -> None:
    with ETC.open("rb") as f:
        assert flat_keys(tomllib.load(f)) == set(KEYS)


def test_etc_listens_on_loopback_unprivileged_ports() -> None:
    listen = config.load(ETC).listen
    assert [str(getattr(listen, name)) for name in config.LISTENER_PROGRAM] == [
        "127.0.0.1:2525",
        "127.0.0.1:2587",
        "127.0.0.1:2465",
        "127.0.0.1:2110",
        "127.0.0.1:2995",
    ]


def comment_above(lines: list[str], index: int) -> list[str]:
    block = []
    while index > 0 and lines[index - 1].startswith("#"):
        index -= 1
        block.insert(0, lines[index])
    return block


def comment_of(key: str) -> list[str]:
    """The comment lines directly above ``key``'s line in the shipped file."""
    table, leaf = key.rsplit(".", 1)
    lines = ETC.read_text(encoding="utf-8").splitlines()
    current = None
    for i, line in enumerate(lines):
        if line.startswith("["):
            current = line.strip()[1:-1]
        elif current == table and line.partition("=")[0].strip() == leaf:
            return comment_above(lines, i)
    raise AssertionError(f"{key} is not in {ETC}")


def labelled(block: list[str], label: str) -> str:
    found = [line.split(label, 1)[1] for line in block if line.lstrip("# ").startswith(label)]
    assert len(found) == 1, f"expected one {label!r} line in {block}"
    return found[0].strip()


def required_words(vtype: Any) -> list[str]:
    """Words the Allowed line must mention: every choice, bound and special."""
    if isinstance(vtype, Choice):
        return [f'"{v}"' for v in vtype.values]
    if isinstance(vtype, Int):
        return [str(vtype.lo), str(vtype.hi), *(f'"{w}"' for w, _ in vtype.specials),
                *map(str, vtype.also)]
    if isinstance(vtype, IntPair):
        return required_words(vtype.first) + required_words(vtype.second)
    return []


#: Settings whose cross-field check allows fewer values than their type.
NARROWED = {"prestart.QTMSCCLCP.strjobs": ['"*YES"']}


@pytest.mark.parametrize(("key", "vtype", "default"), [(k, t, d) for k, t, _, d in ALL], ids=KEYS)
def test_etc_documents_each_setting(key: str, vtype: Any, default: Any) -> None:
    block = comment_of(key)
    assert len(block) >= 4, "meaning, Allowed, Default and IBM i lines"
    allowed = re.findall(r'"[^"]*"|\d+', labelled(block, "Allowed:"))
    for word in NARROWED.get(key, required_words(vtype)):
        assert word in allowed
    assert labelled(block, "Default:").startswith(toml(vtype.dump(default)))
    assert labelled(block, "IBM i:")


def test_etc_comments_each_table() -> None:
    lines = ETC.read_text(encoding="utf-8").splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert [lines[i] for i in headers][:4] == ["[system]", "[listen]", "[tls]", "[prestart]"]
    for i in headers:
        assert comment_above(lines, i), f"{lines[i]} has no comment above it"


def test_etc_names_ibm_keywords() -> None:
    assert "CHGSMTPA RTYMIN" in " ".join(comment_of("smtp.rtymin"))
    assert "CHGPOPA MSGSPLIT" in " ".join(comment_of("pop.msgsplit"))
    assert "CHGPJE MAXJOBS" in " ".join(comment_of("prestart.QTMSCCLCP.maxjobs"))


# --- checks: one line naming the key, the value and what is allowed ------------

BAD = [
    pytest.param('[smtp]\nmaxrcpt = "many"\n', "smtp.maxrcpt", "'many'", "1-100000", id="type"),
    pytest.param("[pop]\nnbrsvr = 21\n", "pop.nbrsvr", "21", "1-20", id="range"),
    pytest.param("[pop]\nnbrsvr = 2.5\n", "pop.nbrsvr", "2.5", "1-20", id="float"),
    pytest.param(
        "[prestart.QTMSSRCP]\nmaxjobs = true\n",
        "prestart.QTMSSRCP.maxjobs",
        "true",  # as the file spells it
        "1-32000, *NOMAX",
        id="bool",
    ),
    pytest.param(
        '[prestart.QTMSSRCP]\nmaxjobs = "*NOLIMIT"\n',
        "prestart.QTMSSRCP.maxjobs",
        "'*NOLIMIT'",
        "*NOMAX",
        id="special",
    ),
    pytest.param(
        '[smtp]\nalwrly = "*SOME"\n', "smtp.alwrly", "'*SOME'", "*BOTH, *POPWDW", id="choice"
    ),
    pytest.param("[smtp]\nrtymin = [3]\n", "smtp.rtymin", "[3]", "[0-99, 0-99]", id="pair"),
    pytest.param("[smtp]\nrtysec = [1, 1]\n", "smtp.rtysec", "[1, 1]", "rtymin", id="unknown-key"),
    pytest.param("[smtpd]\nport = 25\n", "smtpd", "'[smtpd]'", "smtp, pop", id="unknown-section"),
    pytest.param(
        "[prestart.QTMSSRCP]\ninljobs = 2\nthreshold = 3\n",
        "prestart.QTMSSRCP.threshold",
        "3",
        "1-2 (at most INLJOBS)",
        id="threshold>inljobs",
    ),
    pytest.param(  # named by the bound that holds: MAXJOBS's 1-7 said 4 would do
        "[prestart.QTMSSRCP]\ninljobs = 3\nmaxjobs = 7\nthreshold = 8\n",
        "prestart.QTMSSRCP.threshold",
        "8",
        "1-3 (at most INLJOBS)",
        id="threshold>maxjobs",
    ),
    pytest.param(
        "[prestart.QTMSCCLCP]\ninljobs = 30\n",
        "prestart.QTMSCCLCP.inljobs",
        "30",
        "1-20 (at most MAXJOBS)",
        id="inljobs>maxjobs",
    ),
    pytest.param(
        "[smtp]\nrtyday = [2, 1]\nrtyhour = [3, 4]\n",
        "smtp.rtyhour",
        "[3, 4]",
        "only one of them",
        id="rtyday+rtyhour",
    ),
    pytest.param("[smtp]\npopwdw = 5\n", "smtp.popwdw", "5", "0 or 15-65535", id="popwdw"),
    pytest.param("[journal]\nkeep_receivers = 1\n", "journal.keep_receivers", "1",
                 "0 or 2-999999", id="keep_receivers"),
    pytest.param(
        '[listen]\nsmtp = "mail.example.test:25"\n',
        "listen.smtp",
        "'mail.example.test:25'",
        "host:port",
        id="listen-name",
    ),
    pytest.param(
        '[listen]\npop3 = "127.0.0.1:99999"\n',
        "listen.pop3",
        "'127.0.0.1:99999'",
        "port 0-65535",
        id="listen-port",
    ),
    pytest.param(
        '[listen]\nsmtp = "127.0.0.1:\u00b9"\n',
        "listen.smtp",
        "'127.0.0.1:\u00b9'",
        "port 0-65535",
        id="listen-superscript",
    ),
    pytest.param('[listen]\nsubmission = "[::ffff:127.0.0.1]:2587"\n', "listen.submission",
                 "'[::ffff:127.0.0.1]:2587'", "no IPv4-mapped", id="listen-v4-mapped"),
    pytest.param('[listen]\nsmtp = "[::1%lo]:2525"\n', "listen.smtp", "'[::1%lo]:2525'",
                 "zone %", id="listen-zone"),
    # Two services on one port: the second bind failed "Address already in
    # use", naming neither setting.
    pytest.param('[listen]\nsmtp = "[::1]:2600"\nsubmission = "[::1]:2600"\n',
                 "listen.submission", "'[::1]:2600'", "listen.smtp is [::1]:2600",
                 id="listen-same"),
    pytest.param('[listen]\nsmtp = "[::]:2600"\npop3 = "127.0.0.1:2600"\n',
                 "listen.pop3", "'127.0.0.1:2600'", "listen.smtp is [::]:2600",
                 id="listen-dual-stack"),
    pytest.param('[listen]\nsmtp = "0.0.0.0:2600"\nsmtps = "localhost:2600"\n',
                 "listen.smtps", "'127.0.0.1:2600'", "listen.smtp is 0.0.0.0:2600",
                 id="listen-any-v4"),
    pytest.param(
        '[smtp]\nmailrouter = "relay:\u00b9"\n',
        "smtp.mailrouter",
        "'relay:\u00b9'",
        "host[:port]",
        id="router-superscript",
    ),
    pytest.param(
        '[smtp]\nnfydlvry = "post master"\n',
        "smtp.nfydlvry",
        "'post master'",
        "*NONE or an address",
        id="nfydlvry",
    ),
    pytest.param(
        "[system]\nlocal_domains = []\n",
        "system.local_domains",
        "[]",
        "at least one domain",
        id="no-domain",
    ),
    pytest.param('[system]\ndatadir = ""\n', "system.datadir", "''", "not empty", id="empty"),
    pytest.param('[smtp]\nnameservers = ["not a host"]\n', "smtp.nameservers",
                 "['not a host']", "IP[:port]", id="nameserver-name"),
    pytest.param('[smtp]\nnameservers = ["1.2.3.4:99999"]\n', "smtp.nameservers",
                 "['1.2.3.4:99999']", "IP[:port]", id="nameserver-port"),
    pytest.param('[smtp]\nmailrouter = "evil\\nhost"\n', "smtp.mailrouter",
                 "'evil\\nhost'", "host[:port]", id="router-newline"),
    pytest.param('[smtp]\nmailrouter = "host:"\n', "smtp.mailrouter", "'host:'",
                 "host[:port]", id="router-no-port"),
    pytest.param('[smtp]\nmailrouter = "[::1]:abc"\n', "smtp.mailrouter", "'[::1]:abc'",
                 "host[:port]", id="router-v6-bad-port"),
    pytest.param('[smtp]\nfwdhubsvr = "[::1]:99999"\n', "smtp.fwdhubsvr", "'[::1]:99999'",
                 "host[:port]", id="hub-v6-port-range"),
    pytest.param('[smtp]\nfwdhubsvr = "[::1"\n', "smtp.fwdhubsvr", "'[::1'",
                 "host[:port]", id="hub-v6-no-bracket"),
    pytest.param('[smtp]\nfwdhubsvr = "[]:25"\n', "smtp.fwdhubsvr", "'[]:25'",
                 "host[:port]", id="hub-v6-empty"),
    pytest.param('[system]\ndatadir = "a\\u0000b"\n', "system.datadir", "'a\\x00b'",
                 "a directory path", id="nul-in-path"),  # a ValueError's traceback
    pytest.param('[smtp]\nfwdhubsvr = "[2001:db8::]:"\n', "smtp.fwdhubsvr",
                 "'[2001:db8::]:'", "host[:port]", id="hub-v6-no-port"),
    pytest.param('[smtp]\nnfydlvry = "notanaddress"\n', "smtp.nfydlvry", "'notanaddress'",
                 "an address", id="nfydlvry-no-at"),
    # "*NO" sent every non-local message to a host of that name.
    pytest.param('[smtp]\nfwdhubsvr = "*NO"\n', "smtp.fwdhubsvr", "'*NO'", "host[:port]",
                 id="hub-special-value"),
    pytest.param('[smtp]\nmailrouter = "a..b:25"\n', "smtp.mailrouter", "'a..b:25'",
                 "host[:port]", id="router-empty-label"),
    pytest.param('[smtp]\nmailrouter = "-x"\n', "smtp.mailrouter", "'-x'", "host[:port]",
                 id="router-hyphen"),
    pytest.param('[smtp]\nfwdhubsvr = "h\u00fcb.test"\n', "smtp.fwdhubsvr", "'hüb.test'",
                 "host[:port]", id="hub-not-ascii"),
    pytest.param('[smtp]\nauthmech = []\n', "smtp.authmech", "[]", "while alwauth",
                 id="no-authmech"),
    pytest.param('[system]\nhostname = "bad host name"\n', "system.hostname",
                 "'bad host name'", "a host name", id="hostname"),
    pytest.param('[system]\nlocal_domains = ["bad domain"]\n', "system.local_domains",
                 "['bad domain']", "domain names", id="domain"),
    pytest.param('[tls]\ncertificate = "/nonexistent.pem"\n', "tls.certificate",
                 "'/nonexistent.pem'", "an existing file", id="certificate"),
    pytest.param('[smtp]\nhosttable = "no/such/hosts"\n', "smtp.hosttable",
                 "'no/such/hosts'", "an existing file", id="hosttable"),
    pytest.param(f'[smtp]\nhosttable = "/{"h" * 300}"\n', "smtp.hosttable",
                 f"'/{'h' * 300}'", "an existing file", id="hosttable-name-too-long"),
    pytest.param("pop = 3\n", "pop", "3", "a table of settings", id="not-a-table"),
]


@pytest.mark.parametrize(("text", "key", "value", "allowed"), BAD)
def test_bad_value_is_one_line(
    tmp_path: Path, text: str, key: str, value: str, allowed: str
) -> None:
    with pytest.raises(SettingError) as info:
        config.load(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    assert info.value.key == key
    assert message.startswith(f"{key}: {value} is not allowed; allowed: ")
    assert allowed in message


@pytest.mark.parametrize(
    "content",
    [b"[smtp\nautostart = 1\n", b"[smtp]\nautostart = \n", b'[smtp]\njournal = "\xff"\n',
     b"a = " + b"[" * 3000 + b"]" * 3000 + b"\n"],
    ids=["header", "value", "not-utf8", "nested-3000-deep"],  # the last: a RecursionError
)
def test_unreadable_file_is_one_line(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "twistmail.toml"
    p.write_bytes(content)
    with pytest.raises(SettingError) as info:
        config.load(p)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{p}: not ")
    assert "TOML" in message or "UTF-8" in message


def test_a_special_file_is_not_read(tmp_path: Path) -> None:
    """/dev/zero as the configuration was read for ever, gigabytes into memory."""
    with pytest.raises(SettingError, match="^/dev/zero: not a regular file$"):
        config.load("/dev/zero")
    fifo = tmp_path / "twistmail.toml"
    os.mkfifo(fifo)  # with no writer, its open alone waited for ever
    with pytest.raises(SettingError, match="not a regular file$"):
        config.load(fifo)


def test_partial_pop_entry_keeps_its_own_defaults(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, "[prestart.QTPOPSRVP]\nmaxuse = 10\n"))
    assert loaded.prestart.QTPOPSRVP == attrs.evolve(DEFAULTS.prestart.QTPOPSRVP, maxuse=10)
    assert loaded.prestart.QTPOPSRVP.inljobs == 3


def test_special_values_as_ibm_writes_them(tmp_path: Path) -> None:
    text = (
        '[prestart.QTMSSRCP]\nmaxjobs = "*nomax"\n[pop]\nmsgsplit = 64\n[smtp]\nfirewall = "*yes"\n'
    )
    loaded = config.load(write(tmp_path, text))
    assert loaded.prestart.QTMSSRCP.maxjobs is None
    assert loaded.pop.msgsplit == 64
    assert loaded.smtp.firewall == "*YES"


def test_a_name_given_twice_in_a_list_counts_once(tmp_path: Path) -> None:
    text = ('[system]\nlocal_domains = ["example.test", "other.test", "EXAMPLE.test"]\n'
            '[smtp]\nauthmech = ["*PLAIN", "*PLAIN", "*LOGIN"]\n'
            'rblsvr = ["bl.example", "bl.example"]\n')
    loaded = config.load(write(tmp_path, text))
    assert loaded.system.local_domains == ("example.test", "other.test")
    assert loaded.smtp.authmech == ("*PLAIN", "*LOGIN")
    assert loaded.smtp.rblsvr == ("bl.example",)
    assert setting_type("smtp.authmech").parse("*PLAIN *plain, *LOGIN") == ("*PLAIN", "*LOGIN")


def test_special_values_in_a_list_take_any_case(tmp_path: Path) -> None:
    """As every other special value: CL upper-cases AUTHMECH(*login) anyway."""
    loaded = config.load(write(tmp_path, '[smtp]\nauthmech = ["*login", "*Plain"]\n'))
    assert loaded.smtp.authmech == ("*LOGIN", "*PLAIN")
    with pytest.raises(SettingError) as e:
        parse_value("smtp.authmech", setting_type("smtp.authmech"), "*login *cram")
    assert "'*cram'" in str(e.value)


# --- configedit ---------------------------------------------------------------


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.splitlines(), after.splitlines()
    assert len(old) == len(new)
    return [(a, b) for a, b in zip(old, new, strict=True) if a != b]


def test_setting_type_is_the_field_type() -> None:
    assert setting_type("smtp.rtymin") is config.field_type(config.SmtpSettings, "rtymin")
    maxjobs = config.field_type(config.PrestartEntry, "maxjobs")
    assert setting_type("prestart.QTPOPSRVP.maxjobs") is maxjobs
    assert setting_type("prestart.trim_interval").allowed == "1-3600"


@pytest.mark.parametrize(
    ("key", "near"),
    [
        ("prestart.QTMSSRCP.maxjob", "prestart.QTMSSRCP.maxjobs"),
        ("prestart.QTMSSRCP", "prestart.QTMSSRCP.maxjobs"),
        ("smtp.rtysec", "smtp.rtymin"),
        ("smtpd.port", "sections system, listen"),
        ("path", "sections system"),
    ],
)
def test_unknown_key(key: str, near: str) -> None:
    with pytest.raises(UnknownSetting) as info:
        setting_type(key)
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, SettingError)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: ")
    assert near in message


def test_change_rewrites_only_its_line(etc_copy: Path) -> None:
    before = etc_copy.read_text()
    set_values(etc_copy, {"prestart.QTMSSRCP.maxjobs": 50})
    assert changed_lines(before, etc_copy.read_text()) == [("maxjobs = 20", "maxjobs = 50")]
    assert config.load(etc_copy).prestart.QTMSSRCP.maxjobs == 50
    assert config.load(etc_copy).prestart.QTMSCCLCP.maxjobs == 20


def test_none_is_written_as_nomax(etc_copy: Path) -> None:
    before = etc_copy.read_text()
    set_values(etc_copy, {"pop.msgsplit": 64, "prestart.QTMSCCLCP.maxuse": None})
    set_values(etc_copy, {"pop.msgsplit": None})
    assert changed_lines(before, etc_copy.read_text()) == [("maxuse = 200", 'maxuse = "*NOMAX"')]
    loaded = config.load(etc_copy)
    assert loaded.prestart.QTMSCCLCP.maxuse is None
    assert loaded.pop.msgsplit is None


def test_pairs_lists_and_listeners(etc_copy: Path) -> None:
    before = etc_copy.read_text()
    set_values(
        etc_copy,
        {
            "smtp.rtymin": (5, 10),
            "smtp.rblsvr": ("zen.example.test",),
            "listen.smtps": None,
            "listen.smtp": Endpoint("::1", 2525),
            "smtp.mailrouter": "relay.example.test:2526",
        },
    )
    assert changed_lines(before, etc_copy.read_text()) == [
        ('smtp = "127.0.0.1:2525"', 'smtp = "[::1]:2525"'),
        ('smtps = "127.0.0.1:2465"', 'smtps = ""'),
        ("rtymin = [3, 30]", "rtymin = [5, 10]"),
        ('mailrouter = "*NONE"', 'mailrouter = "relay.example.test:2526"'),
        ("rblsvr = []", 'rblsvr = ["zen.example.test"]'),
    ]
    loaded = config.load(etc_copy)
    assert loaded.smtp.rtymin == (5, 10)
    assert loaded.listen.smtps is None
    assert loaded.listen.smtp == Endpoint("::1", 2525)


def test_rewriting_the_loaded_values_changes_nothing(etc_copy: Path) -> None:
    before = etc_copy.read_bytes()
    stamp = etc_copy.stat()
    loaded = config.load(etc_copy)
    set_values(etc_copy, {key: value for key, _, value, _ in config.iter_settings(loaded)})
    assert etc_copy.read_bytes() == before
    assert etc_copy.stat().st_ino == stamp.st_ino


def test_trailing_comment_and_spacing_kept(tmp_path: Path) -> None:
    text = "# mine\n[smtp]\n\n   maxrcpt   =  100   # per message\njournal='*NO'\n"
    p = write(tmp_path, text)
    set_values(p, {"smtp.maxrcpt": 250})
    assert p.read_text() == text.replace("100   #", "250   #")


def test_comments_inside_an_array_kept(tmp_path: Path) -> None:
    text = "[smtp]\nrtymin = [\n  3,   # count\n  30,  # minutes\n]\n"
    p = write(tmp_path, text)
    set_values(p, {"smtp.rtymin": (4, 30)})
    assert p.read_text() == text.replace("3,   #", "4,   #")
    assert config.load(p).smtp.rtymin == (4, 30)
    # An element of another type that compares equal is written anew.
    p.write_text(text.replace("30,", "30.0,"))
    set_values(p, {"smtp.rtymin": (4, 30)})
    assert config.load(p).smtp.rtymin == (4, 30) and "30.0" not in p.read_text()


def test_missing_tables_and_keys_are_created(tmp_path: Path) -> None:
    text = '# notes\n[system]\ndatadir = "state"  # beside this file\n'
    p = write(tmp_path, text)
    set_values(
        p,
        {
            "system.hostname": "mx.example.test",
            "smtp.rtymin": (5, 10),
            "prestart.QTPOPSRVP.maxuse": None,
        },
    )
    after = p.read_text()
    assert after.startswith(text + 'hostname = "mx.example.test"\n')
    assert "[prestart]" not in after
    assert "[prestart.QTPOPSRVP]" in after
    loaded = config.load(p)
    assert (loaded.system.hostname, loaded.system.datadir) == ("mx.example.test", "state")
    assert loaded.smtp.rtymin == (5, 10)
    assert loaded.prestart.QTPOPSRVP.maxuse is None
    assert loaded.prestart.QTPOPSRVP.inljobs == 3


def test_new_key_goes_before_the_next_tables_comment(tmp_path: Path) -> None:
    text = "[prestart]\ntrim_interval = 30\n\n# the SMTP server jobs\n[prestart.QTMSSRCP]\n"
    p = write(tmp_path, text)
    set_values(p, {"prestart.wait_limit": 40})
    assert p.read_text() == text.replace("30\n", "30\nwait_limit = 40\n")


def test_tables_split_around_others(tmp_path: Path) -> None:
    text = '[prestart.QTMSSRCP]\nmaxjobs = 30\n\n[smtp]\njournal = "*NO"\n\n[prestart.QTPOPSRVP]\n'
    p = write(tmp_path, text)
    set_values(
        p,
        {
            "prestart.QTPOPSRVP.maxjobs": 9,
            "prestart.QTMSSRCP.maxjobs": 31,
            "prestart.trim_interval": 7,
            "prestart.QTMSCCLCP.wait": "*NO",
        },
    )
    loaded = config.load(p)
    assert loaded.prestart.trim_interval == 7
    assert (loaded.prestart.QTMSSRCP.maxjobs, loaded.prestart.QTPOPSRVP.maxjobs) == (31, 9)
    assert loaded.prestart.QTMSCCLCP.wait == "*NO"
    assert loaded.smtp.journal == "*NO"


def assert_untouched(p: Path, before: bytes, stamp: os.stat_result) -> None:
    assert p.read_bytes() == before
    after = p.stat()
    assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    assert os.listdir(p.parent) == [p.name]


@pytest.mark.parametrize(
    ("changes", "key", "allowed"),
    [
        ({"prestart.QTMSSRCP.inljobs": 1}, "prestart.QTMSSRCP.threshold", "at most INLJOBS"),
        ({"prestart.QTMSSRCP.maxjobs": 3}, "prestart.QTMSSRCP.inljobs", "at most MAXJOBS"),
        ({"smtp.rtyday": (1, 1), "smtp.rtyhour": (2, 2)}, "smtp.rtyhour", "only one"),
        ({"smtp.popwdw": 14}, "smtp.popwdw", "0 or 15-65535"),
        ({"system.local_domains": ()}, "system.local_domains", "at least one"),
        ({"pop.nbrsvr": 99}, "pop.nbrsvr", "1-20"),
        ({"smtp.maxrcpt": None}, "smtp.maxrcpt", "1-100000"),
        ({"smtp.rtymin": 3}, "smtp.rtymin", "[0-99, 0-99]"),
        ({"smtp.maxrcpt": 50, "smtp.rtysec": (1, 1)}, "smtp.rtysec", "smtp.rtymin"),
    ],
)
def test_refused_change_leaves_the_file_untouched(
    etc_copy: Path, changes: dict[str, Any], key: str, allowed: str
) -> None:
    before, stamp = etc_copy.read_bytes(), etc_copy.stat()
    with pytest.raises(SettingError) as info:
        set_values(etc_copy, changes)
    assert info.value.key == key
    assert allowed in str(info.value)
    assert "\n" not in str(info.value)
    assert_untouched(etc_copy, before, stamp)


def test_changes_are_checked_together(etc_copy: Path) -> None:
    set_values(etc_copy, {"prestart.QTMSSRCP.inljobs": 1, "prestart.QTMSSRCP.threshold": 1})
    entry = config.load(etc_copy).prestart.QTMSSRCP
    assert (entry.inljobs, entry.threshold) == (1, 1)


def test_a_broken_file_is_not_written(tmp_path: Path) -> None:
    p = write(tmp_path, "[smtp]\nmaxrcpt = 0\n")
    before, stamp = p.read_bytes(), p.stat()
    with pytest.raises(SettingError, match=r"^smtp\.maxrcpt: 0 "):
        set_values(p, {"smtp.journal": "*NO"})
    assert_untouched(p, before, stamp)


def test_a_value_where_a_table_belongs_is_not_written(tmp_path: Path) -> None:
    p = write(tmp_path, "prestart = 5\n")
    before, stamp = p.read_bytes(), p.stat()
    with pytest.raises(SettingError, match=r"^prestart: 5 is not allowed; allowed: a table"):
        set_values(p, {"prestart.QTMSSRCP.maxjobs": 3})
    assert_untouched(p, before, stamp)


def test_bad_toml_is_not_written(tmp_path: Path) -> None:
    p = write(tmp_path, "[smtp\n")
    before, stamp = p.read_bytes(), p.stat()
    with pytest.raises(SettingError) as info:
        set_values(p, {"smtp.journal": "*NO"})
    assert "\n" not in str(info.value)
    assert "valid TOML" in str(info.value)
    assert_untouched(p, before, stamp)


def test_mode_kept_and_no_temporary_left(etc_copy: Path) -> None:
    etc_copy.chmod(0o640)
    set_values(etc_copy, {"smtp.journal": "*NO"})
    assert stat.S_IMODE(etc_copy.stat().st_mode) == 0o640
    assert os.listdir(etc_copy.parent) == [etc_copy.name]


def test_symlink_is_followed(tmp_path: Path, etc_copy: Path) -> None:
    link = tmp_path / "link.toml"
    link.symlink_to(etc_copy)
    set_values(link, {"smtp.journal": "*NO"})
    assert link.is_symlink()
    assert config.load(etc_copy).smtp.journal == "*NO"


def test_relative_paths_through_a_symlink_are_checked_as_the_daemon_reads_them(
        tmp_path: Path) -> None:
    """Relative paths are the real file's: with /etc/twistmail.toml a link to
    /opt/twistmail/etc/twistmail.toml, the shipped "../var" is /opt/twistmail/var
    (it was /var, next to the link).  The check of a change reads them so too."""
    real = tmp_path / "opt" / "etc"
    real.mkdir(parents=True)
    (real / "twistmail.toml").write_text(
        '[system]\ndatadir = "../var"\nlocal_domains = ["example.test"]\n')
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hosts").write_text("127.0.0.1 mx.example.test\n")
    link = etc / "twistmail.toml"
    link.symlink_to(real / "twistmail.toml")
    assert config.load(link).datadir == (tmp_path / "opt" / "var").resolve()
    with pytest.raises(SettingError, match="smtp.hosttable"):
        set_values(link, {"smtp.hosttable": "hosts"})  # beside the link only
    assert "hosttable" not in (real / "twistmail.toml").read_text()
    (real / "hosts").write_text("127.0.0.1 mx.example.test\n")
    set_values(link, {"smtp.hosttable": "hosts"})
    assert config.load(link).smtp.hosttable == "hosts"


def test_crlf_lines_stay_crlf(tmp_path: Path) -> None:
    p = tmp_path / "twistmail.toml"
    p.write_bytes(b'[smtp]\r\nmaxrcpt = 100\r\njournal = "*YES"\r\n')
    set_values(p, {"smtp.maxrcpt": 7})
    assert p.read_bytes() == b'[smtp]\r\nmaxrcpt = 7\r\njournal = "*YES"\r\n'


def test_lines_added_to_a_crlf_file_end_in_crlf(tmp_path: Path) -> None:
    """A key or a table the file lacked was added with bare LFs, mixing line ends."""
    p = tmp_path / "twistmail.toml"
    p.write_bytes(b'[smtp]\r\nmaxrcpt = 100\r\n')
    set_values(p, {"smtp.inacttimo": 60, "snads.keeprcp": "*ALL"})
    data = p.read_bytes()
    assert data.count(b"\n") == data.count(b"\r\n") and b"inacttimo = 60\r\n" in data
    assert config.load(p).snads.keeprcp == "*ALL"


def test_a_byte_order_mark_is_read_and_kept(tmp_path: Path) -> None:
    """A file saved by an editor that starts it with a BOM was 'not valid TOML'."""
    p = tmp_path / "twistmail.toml"
    p.write_bytes(b'\xef\xbb\xbf[smtp]\nmaxrcpt = 100\n')
    assert config.load(p).smtp.maxrcpt == 100
    assert config.control_socket_of(p) == config.load(p).control_socket
    set_values(p, {"smtp.maxrcpt": 7})
    assert p.read_bytes() == b'\xef\xbb\xbf[smtp]\nmaxrcpt = 7\n'


INT_KEYS = [key for key, vtype, _, _ in ALL if isinstance(vtype, Int)]


def in_range(vtype: Int, value: int | None) -> bool:
    if value is None:
        return any(special is None for _, special in vtype.specials)
    return vtype.lo <= value <= vtype.hi


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(INT_KEYS), value=st.none() | st.integers(-2, 70000))
def test_int_change_is_written_exactly_or_refused(key: str, value: int | None) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "twistmail.toml"
        shutil.copyfile(ETC, p)
        before = p.read_text()
        try:
            set_values(p, {key: value})
        except SettingError as e:
            assert "\n" not in str(e)
            assert p.read_text() == before
            if in_range(setting_type(key), value):
                assert e.key.rsplit(".", 1)[0] == key.rsplit(".", 1)[0], "only a cross rule"
            return
        vtype = setting_type(key)
        leaf = key.rsplit(".", 1)[1]
        loaded = dict((k, v) for k, _, v, _ in config.iter_settings(config.load(p)))
        assert loaded[key] == value
        lines = changed_lines(before, p.read_text())
        if lines:
            [(old, new)] = lines
            assert old.startswith(f"{leaf} = ")
            assert new == f"{leaf} = {toml(vtype.dump(value))}"


# --- twistmail config -----------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = base.run(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_config_non_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--config", str(ETC), "config", "-n") == (
        0,
        'system.hostname = "mail.example.test"  # default: ""\n'
        'system.datadir = "../var"  # default: "var"\n',
        "",
    )


def test_config_non_default_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--config", str(ETC), "config", "--non-default", "--json")
    assert (rc, err) == (0, "")
    assert json.loads(out) == [
        {"key": "system.hostname", "value": "mail.example.test", "default": ""},
        {"key": "system.datadir", "value": "../var", "default": "var"}]


def test_config_lists_every_setting_as_toml(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--config", str(ETC), "config")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert [line.partition(" = ")[0] for line in lines] == KEYS
    assert "prestart.QTMSSRCP.maxjobs = 20" in lines
    assert 'pop.msgsplit = "*NOMAX"' in lines
    assert "smtp.rtymin = [3, 30]" in lines
    loaded = config.load(ETC)
    assert config.from_mapping(tomllib.loads(out), loaded.path) == loaded


def test_config_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--config", str(ETC), "config", "--json")
    rows = {row["key"]: row for row in json.loads(out)}
    assert rc == 0
    assert list(rows) == KEYS
    assert rows["pop.msgsplit"] == {"key": "pop.msgsplit", "value": "*NOMAX", "default": "*NOMAX"}
    assert rows["smtp.rtymin"]["value"] == [3, 30]
    assert rows["listen.smtp"]["value"] == "127.0.0.1:2525"


def test_config_shows_persisted_changes(capsys: pytest.CaptureFixture[str], etc_copy: Path) -> None:
    set_values(etc_copy, {"smtp.rtymin": (5, 10), "prestart.QTMSSRCP.maxjobs": None})
    rc, out, _ = run(capsys, "--config", str(etc_copy), "config", "-n")
    assert rc == 0
    assert out.splitlines() == [
        'system.hostname = "mail.example.test"  # default: ""',
        'system.datadir = "../var"  # default: "var"',
        'prestart.QTMSSRCP.maxjobs = "*NOMAX"  # default: 20',
        "smtp.rtymin = [5, 10]  # default: [3, 30]",
    ]


def test_config_all_defaults(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = write(tmp_path, "# nothing changed\n")
    assert run(capsys, "--config", str(p), "config", "-n") == (0, configcmd.ALL_DEFAULT + "\n", "")
    assert run(capsys, "--config", str(p), "config", "-n", "--json") == (0, "[]\n", "")


def test_apply_with_a_listing_option_is_refused(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    """``config -n --apply`` applied and ignored -n: the listing asked for never came."""
    p = write(tmp_path, "# nothing changed\n")
    for options in (["-n"], ["--json"], ["-n", "--json"]):
        rc, out, err = run(capsys, "--config", str(p), "config", *options, "--apply")
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
        assert "--apply" in err and f"allowed without {' and '.join(options)}" in err


def test_config_bad_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = write(tmp_path, "[pop]\nnbrsvr = 99\n")
    rc, out, err = run(capsys, "--config", str(p), "config", "-n")
    assert (rc, out) == (2, "")
    assert err == f"twistmail config: {p}: pop.nbrsvr: 99 is not allowed; allowed: 1-20\n"


def test_config_bad_toml(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = write(tmp_path, "[pop\n")
    rc, out, err = run(capsys, "--config", str(p), "config")
    assert (rc, out) == (2, "")
    assert err.count("\n") == 1
    assert "valid TOML" in err


def test_config_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, err = run(capsys, "--config", str(tmp_path / "none.toml"), "config")
    assert (rc, out) == (2, "")
    assert err.count("\n") == 1
    assert "--config" in err and "none.toml" in err


def test_the_daemon_s_record_of_its_settings_reads_back_as_the_same_settings(
        etc_copy: Path) -> None:
    """Jobs load what the controller accepted (write_applied); nothing may change on the way."""
    (etc_copy.parent / "hosts").write_text("127.0.0.1 mx.example.test\n")
    set_values(etc_copy, {
        "smtp.hosttable": "hosts", "smtp.maxrcpt": 7, "smtp.rtymin": (2, 5),
        "prestart.QTMSSRCP.maxjobs": None, "pop.nbrsvr": 3,
        "smtp.nameservers": ("127.0.0.1:5353",), "system.local_domains": ("a.test", "b.test"),
    })
    settings = config.load(etc_copy)
    (settings.datadir / "run").mkdir(parents=True)
    record = config.write_applied(settings)
    again = config.load(record)
    assert again == settings
    assert again.resolve(again.smtp.hosttable) == etc_copy.parent / "hosts"
    assert not [p for p in record.parent.iterdir() if p != record]  # no temporary left


@pytest.mark.parametrize("broken", [
    b'[system]\ndatadir = "/srv/mail"\n[pop\n',
    b'["system"]\n"datadir" = "/srv/mail"\n[pop\n',
    b'[system]\ndatadir = "/srv/mail"\n# caf\xe9\n',
])
def test_the_daemon_of_a_file_toml_cannot_read_is_still_found(tmp_path: Path, broken) -> None:
    p = tmp_path / "twistmail.toml"
    p.write_bytes(broken)
    assert config.control_socket_of(p) == Path("/srv/mail/run/control.sock")


def test_a_link_re_pointed_later_moves_no_process_to_another_state_directory(
        tmp_path: Path) -> None:
    """The directory relative paths start at is found once, when the file is
    read, and recorded for the jobs: a job that found it anew after the link
    to the file was re-pointed would queue mail where the bridge never looks."""
    for name in ("r1", "r2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "twistmail.toml").write_text(
            '[system]\ndatadir = "var"\nlocal_domains = ["example.test"]\n')
    link = tmp_path / "twistmail.toml"
    link.symlink_to(tmp_path / "r1" / "twistmail.toml")
    s = config.load(link)
    (s.datadir / "run").mkdir(parents=True)
    record = config.write_applied(s)
    link.unlink()
    link.symlink_to(tmp_path / "r2" / "twistmail.toml")
    assert s.datadir == (tmp_path / "r1" / "var").resolve()
    assert config.load(record).datadir == (tmp_path / "r1" / "var").resolve()
    assert config.load(link).datadir == (tmp_path / "r2" / "var").resolve()  # a new start


def test_a_reload_shows_an_empty_value_as_the_file_writes_it() -> None:
    """``tls.certificate  -> tls/cert.pem`` read as if a word were missing."""
    new = attrs.evolve(DEFAULTS, tls=attrs.evolve(DEFAULTS.tls, certificate="tls/cert.pem"))
    assert config.changes(DEFAULTS, new) == ['tls.certificate "" -> tls/cert.pem']
    assert config.changes(new, DEFAULTS) == ['tls.certificate tls/cert.pem -> ""']


@pytest.mark.parametrize("kind", ["fifo", "zero", "deep", "json-list", "json-deep", "big"])
def test_every_way_to_a_settings_file_refuses_what_is_none_in_one_line(tmp_path, kind) -> None:
    """status and the daemon commands read a refused file again, leniently,
    without load()'s guards: /dev/zero ate memory, a FIFO hung, deep nesting
    and a .json record of the wrong shape ended in tracebacks."""
    import subprocess
    import sys

    p = tmp_path / ("x.json" if kind.startswith("json") else "x.toml")
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "zero":
        p.symlink_to("/dev/zero")
    elif kind == "deep":
        p.write_text("a = " + "[" * 2000 + "]" * 2000 + "\n")
    elif kind == "json-list":
        p.write_text('{"config": "/x.toml", "settings": []}')
    elif kind == "json-deep":
        p.write_text("[" * 100000 + "]" * 100000)
    else:
        p.write_bytes(b"# " + b"x" * (5 << 20) + b"\n")
    exe = str(Path(sys.executable).with_name("twistmail"))
    for command in ("status", "wrkusrprf"):
        r = subprocess.run([exe, "--config", str(p), command], capture_output=True,
                           text=True, timeout=30)
        assert "Traceback" not in r.stderr and r.returncode in (1, 2, 3), (command, r)
        assert len(r.stderr.strip().splitlines()) <= 1, r.stderr


def test_a_number_longer_than_python_reads_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """Past 4300 digits Python's int() and tomllib raise an error of their own:
    a traceback from every command, and at start-up."""
    from twistmail import config as configmod
    from twistmail.settingtypes import parse_value

    p = write(tmp_path, "[smtp]\nmaxrcpt = " + "9" * 5000 + "\n")
    with pytest.raises(SettingError, match="integers of at most 4300 digits"):
        configmod.load(p)
    vtype = configmod.field_type(configmod.SmtpSettings, "maxrcpt")
    with pytest.raises(SettingError):
        parse_value("smtp.maxrcpt", vtype, "9" * 5000)


def test_a_responsible_person_may_have_an_apostrophe_in_the_name() -> None:
    from twistmail import config as configmod
    from twistmail.settingtypes import parse_value

    vtype = configmod.field_type(configmod.SmtpSettings, "nfydlvry")
    assert parse_value("smtp.nfydlvry", vtype, "o'brien@example.test") == "o'brien@example.test"
    vtype = configmod.field_type(configmod.SmtpSettings, "mailrouter")
    with pytest.raises(SettingError):
        parse_value("smtp.mailrouter", vtype, "o'brien.example.test")


@pytest.mark.parametrize(("written", "read"), [
    ("[0:0:0:0:0:0:0:0]:2600", Endpoint("::", 2600)),  # serves IPv4 too, as "::" does
    ("[::0]:2600", Endpoint("::", 2600)),
    ("[0:0:0:0:0:0:0:1]:2600", Endpoint("::1", 2600)),
    ("[2001:DB8::1]:2600", Endpoint("2001:db8::1", 2600)),
])
def test_a_listener_address_is_read_in_one_spelling(written: str, read: Endpoint) -> None:
    """The listener and the "MX is this host" check compared strings: written
    out in full, the every-address "::" was bound IPv6-only."""
    assert Listen().parse(written) == read
