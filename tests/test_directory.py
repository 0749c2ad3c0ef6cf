"""User profiles, the system distribution directory, resolution and their commands."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

from twistmail import directory as dirmod
from twistmail.cli.base import run
from twistmail.directory import (
    DirectoryEntry,
    DirectoryError,
    Resolution,
    SqliteDirectory,
    UserProfile,
)
from twistmail.interfaces import IDirectory

DOMAINS = ("example.test", "Other.Test")
CONFIG = """[system]
datadir = "var"
local_domains = ["example.test", "other.test"]
hostname = "mail.example.test"
"""


@pytest.fixture
def cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing at full cost makes each profile take a few hundredths of a second."""
    monkeypatch.setattr(dirmod, "ARGON2_M", 64)
    monkeypatch.setattr(dirmod, "ARGON2_T", 1)
    monkeypatch.setattr(dirmod, "SCRYPT_N", 2**4)


@pytest.fixture
def d(tmp_path: Path, cheap_scrypt: None) -> SqliteDirectory:
    directory = SqliteDirectory(tmp_path / "var" / "directory.sqlite", DOMAINS, "mail")
    yield directory
    directory.close()


def _db_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


# -- construction -------------------------------------------------------------


def test_provides_the_interface_and_normalizes_domains(d):
    assert IDirectory.providedBy(d)
    assert d.local_domains == ("example.test", "other.test")
    assert d.system_address == "MAIL"


@pytest.mark.parametrize(
    ("hostname", "address"),
    [
        ("mail.example.test", "MAIL"),
        ("mx-01.example.test", "MX01"),
        ("averyverylongname.example", "AVERYVER"),
        ("", "LOCAL"),
        ("---.example", "LOCAL"),
    ],
)
def test_system_address_from_hostname(hostname, address):
    assert dirmod.system_address_from_hostname(hostname) == address


def test_from_settings(tmp_path):
    from twistmail import config

    cfg = tmp_path / "t.toml"
    cfg.write_text(CONFIG)
    with SqliteDirectory.from_settings(config.load(cfg)) as d:
        assert d.path == tmp_path / "var" / "directory.sqlite"
        assert d.local_domains == ("example.test", "other.test")
        assert d.system_address == "MAIL"


def test_database_is_wal_versioned_and_private(d):
    d.profiles()
    conn = sqlite3.connect(d.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == dirmod.SCHEMA_VERSION
    conn.close()
    assert d.path.stat().st_mode & 0o077 == 0


# -- profiles and passwords ---------------------------------------------------


def test_password_is_stored_only_as_an_argon2id_hash(tmp_path):
    d = SqliteDirectory(tmp_path / "directory.sqlite", DOMAINS, "MAIL")
    d.create_profile("sam", "Correct Horse 42", text="Sam")
    stored = d._conn().execute("SELECT pwhash FROM profiles").fetchone()[0]
    _, scheme, version, costs, salt, digest = stored.split("$")
    assert (scheme, version, costs) == ("argon2id", "v=19", "m=12288,t=3,p=1")
    assert len(dirmod.base64.b64decode(salt + "==")) == 16
    assert b"Correct Horse 42" not in _db_bytes(d.path)
    d.close()
    assert b"Correct Horse 42" not in _db_bytes(d.path)


def test_a_hash_of_the_earlier_scheme_verifies_and_is_replaced_at_login(d):
    d.create_profile("sam", "pw")
    salt = b"0123456789abcdef"
    digest = dirmod._scrypt("pw", salt, 2**4, 8, 1, 32)
    old = "$".join(["scrypt", "16", "8", "1", dirmod.base64.b64encode(salt).decode(),
                    dirmod.base64.b64encode(digest).decode()])
    with d._write() as conn:
        conn.execute("UPDATE profiles SET pwhash = ?", (old,))
    assert d.authenticate("sam", "no") is None
    assert d._conn().execute("SELECT pwhash FROM profiles").fetchone()[0] == old
    assert d.authenticate("sam", "pw") == "SAM"
    assert d._conn().execute("SELECT pwhash FROM profiles").fetchone()[0].startswith(
        "$argon2id$")
    assert d.authenticate("sam", "pw") == "SAM"


def test_a_hash_with_other_argon2id_costs_is_replaced_at_login(d, monkeypatch):
    monkeypatch.setattr(dirmod, "ARGON2_T", 2)
    d.create_profile("sam", "pw")
    old = d._conn().execute("SELECT pwhash FROM profiles").fetchone()[0]
    monkeypatch.setattr(dirmod, "ARGON2_T", 1)
    assert d.authenticate("sam", "no") is None
    assert d._conn().execute("SELECT pwhash FROM profiles").fetchone()[0] == old
    assert d.authenticate("sam", "pw") == "SAM"
    new = d._conn().execute("SELECT pwhash FROM profiles").fetchone()[0]
    assert new != old and dirmod.current_scheme(new)
    assert d.authenticate("sam", "pw") == "SAM"


@pytest.mark.parametrize("costs", ["m=999999,t=2,p=1", "m=19456,t=99,p=1", "m=4,t=2,p=1",
                                   "m=19456,t=2,p=0", "m=65536,t=8,p=1"])
def test_a_hostile_hash_costs_nothing_and_matches_nothing(costs):
    damaged_scrypt = "scrypt$65536$1$1$MDEyMzQ1Njc4OWFiY2RlZg==$AAAA"
    assert dirmod.verify_password("pw", damaged_scrypt) is False  # OpenSSL refuses it
    stored = (f"$argon2id$v=19${costs}$MDEyMzQ1Njc4OWFiY2RlZg"
              "$qhGYb1MyPEE+aES/CN6NCQDLQrWvmzyI+WAxnX2ZLmI")
    assert dirmod.verify_password("pw", stored) is False


def test_authenticate(d):
    d.create_profile("Sam", "s3cret")
    assert d.authenticate("sam", "s3cret") == "SAM"
    assert d.authenticate("SAM", "s3cret") == "SAM"
    assert d.authenticate(" sAm ", "s3cret") == "SAM"
    assert d.authenticate("sam", "S3CRET") is None
    assert d.authenticate("sam", "s3cret ") is None
    assert d.authenticate("sam", "") is None
    assert d.authenticate("nobody", "s3cret") is None
    assert d.authenticate("not a name!", "s3cret") is None


def test_disabled_profile_is_refused_and_re_enabled(d):
    d.create_profile("sam", "pw", status="*disabled")
    assert d.get_profile("sam").status == "*DISABLED"
    assert d.authenticate("sam", "pw") is None
    d.change_profile("sam", status="*ENABLED")
    assert d.authenticate("sam", "pw") == "SAM"


def test_every_authentication_costs_one_hash(d, monkeypatch):
    d.create_profile("sam", "pw")
    d.create_profile("off", "pw", status="*DISABLED")
    dirmod._dummy_hash()
    calls = []
    real = dirmod.Argon2id.verify_phc_encoded
    monkeypatch.setattr(dirmod.Argon2id, "verify_phc_encoded",
                        lambda *a: calls.append(1) or real(*a))
    for user, password in [
        ("sam", "pw"),
        ("sam", "no"),
        ("ghost", "pw"),
        ("off", "pw"),
        ("bad name", "pw"),
        ("x" * 40, "pw"),
    ]:
        calls.clear()
        d.authenticate(user, password)
        assert len(calls) == 1, user


def test_change_password_and_text(d):
    d.create_profile("sam", "old")
    p = d.change_profile("SAM", password="new", text="Sam Smith")
    assert p.text == "Sam Smith"
    assert d.authenticate("sam", "old") is None
    assert d.authenticate("sam", "new") == "SAM"


def test_profile_listing(d):
    d.create_profile("zed", "pw")
    d.create_profile("amy", "pw", text="Amy")
    profiles = d.profiles()
    assert [p.usrprf for p in profiles] == ["AMY", "ZED"]
    assert isinstance(profiles[0], UserProfile) and profiles[0].text == "Amy"
    assert d.get_profile("nobody") is None
    assert d.get_profile("not valid!") is None


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("sam", "SAM"),
        ("$SYS_1", "$SYS_1"),
        ("#A@B", "#A@B"),
        ("#A$B", "#A$B"),
        ("ABCDEFGHIJ", "ABCDEFGHIJ"),
        ("ABCDEFGHIJK", None),
        ("1SAM", None),
        ("_SAM", None),
        ("", None),
        ("SAM SMITH", None),
        ("SAM-1", None),
        ("straße", None),
    ],
)
def test_profile_name_rules(d, name, ok):
    if ok:
        assert d.create_profile(name, "pw").usrprf == ok
    else:
        with pytest.raises(DirectoryError) as e:
            d.create_profile(name, "pw")
        assert str(e.value).startswith("usrprf: ")
        assert "allowed: 1-10 characters" in str(e.value)
        assert "\n" not in str(e.value)


def test_duplicate_profile_refused_case_insensitively(d):
    d.create_profile("sam", "pw")
    with pytest.raises(DirectoryError, match="usrprf: 'SAM' already exists"):
        d.create_profile("Sam", "other")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"password": ""}, "password: '(0 characters)'"),
        ({"password": "x" * 129}, "1-128 characters"),
        ({"password": "a\nb"}, "no control characters"),
        ({"password": "tab\there"}, "no control characters"),
        ({"password": "pw", "status": "*LOCKED"}, "status: '*LOCKED' is not allowed"),
        ({"password": "pw", "text": "x" * 51}, "text: "),
    ],
)
def test_profile_value_errors(d, kwargs, needle):
    with pytest.raises(DirectoryError) as e:
        d.create_profile("sam", **kwargs)
    assert needle in str(e.value)
    assert d.get_profile("sam") is None
    assert d.entries() == []


def test_change_or_delete_unknown_profile(d):
    with pytest.raises(DirectoryError, match="usrprf: 'NOBODY' does not exist"):
        d.change_profile("nobody", text="x")
    with pytest.raises(DirectoryError, match="does not exist"):
        d.delete_profile("nobody")


# -- enrolment ----------------------------------------------------------------


def test_creating_a_profile_enrolls_a_pop_user(d):
    d.create_profile("sam", "pw", text="Sam Smith")
    d.create_profile("jane", "pw")
    assert d.get_entry("sam", "mail") == DirectoryEntry(
        userid="SAM",
        address="MAIL",
        usrd="Sam Smith",
        user="SAM",
        msfsrvlvl="*SYSMS",
        prefadr="*SMTP",
        smtpuser="sam",
        smtpdomain="example.test",
    )
    assert d.get_entry("JANE", "MAIL").usrd == "JANE"
    assert d.smtp_address("sam") == "sam@example.test"
    assert d.resolve("sam@example.test") == Resolution("pop", "sam@example.test", usrprf="SAM")


def test_enrolment_picks_a_free_user_id(d):
    d.create_profile("ABCDEFGHIJ", "pw")
    d.create_profile("ABCDEFGHXY", "pw")
    d.add_entry(DirectoryEntry("ABCDEFG2", "MAIL", "taken"))
    d.create_profile("ABCDEFGHZZ", "pw")
    d.create_profile("ABC", "pw")
    d.add_entry(DirectoryEntry("BOB", "MAIL", "SNADS Bob"))
    d.create_profile("BOB", "pw")
    ids = {e.user: e.userid for e in d.entries() if e.user}
    assert ids == {
        "ABCDEFGHIJ": "ABCDEFGH",
        "ABCDEFGHXY": "ABCDEFG1",
        "ABCDEFGHZZ": "ABCDEFG3",
        "ABC": "ABC",
        "BOB": "BOB1",
    }
    assert d.resolve("abcdefghzz@example.test").usrprf == "ABCDEFGHZZ"


def test_a_profile_name_with_at_sign_is_enrolled_without_smtp_name(d):
    d.create_profile("#A@B", "pw")
    e = d.get_entry("#A@B", "MAIL")
    assert (e.msfsrvlvl, e.prefadr, e.smtp_name) == ("*SYSMS", "*USRID", None)
    assert d.smtp_address("#A@B") is None


def test_enrolment_refused_when_the_smtp_name_is_taken(d):
    d.add_entry(DirectoryEntry("OLDSAM", "MAIL", "old", smtpuser="sam"))
    with pytest.raises(DirectoryError) as e:
        d.create_profile("sam", "pw")
    assert str(e.value).startswith("usrprf: 'SAM' cannot be enrolled")
    assert "OLDSAM MAIL" in str(e.value)
    assert d.get_profile("sam") is None


def test_delete_profile_removes_its_entries_but_not_its_mailbox(d):
    d.create_profile("sam", "pw")
    d.add_entry(DirectoryEntry("*any", "*any", "catch", user="sam", msfsrvlvl="*SYSMS"))
    d.add_entry(DirectoryEntry("SAMX", "MAIL", "alias", user="sam", smtpuser="s.smith"))
    mailbox = d.mailbox("SAM")
    mailbox.mkdir(parents=True)
    note = d.delete_profile("Sam")
    assert str(mailbox) in note and "3 directory entries" in note
    assert mailbox.is_dir()
    assert d.get_profile("sam") is None
    assert d.entries() == []
    assert d.resolve("sam@example.test") is None


# -- directory entries --------------------------------------------------------


def test_add_entry_normalizes(d):
    d.create_profile("sam", "pw")
    e = d.add_entry(
        DirectoryEntry(
            " joe ",
            "hq",
            "Joe",
            user="sam",
            msfsrvlvl="*usridx",
            prefadr="*smtp",
            smtpuser="Joe.Bloggs",
            smtpdomain="Other.TEST.",
        )
    )
    assert e == DirectoryEntry(
        "JOE", "HQ", "Joe", "SAM", "*USRIDX", "*SMTP", "Joe.Bloggs", "other.test"
    )
    assert d.get_entry("joe", "hq") == e


def test_smtp_domain_defaults_to_the_first_local_domain(d):
    e = d.add_entry(DirectoryEntry("JOE", "HQ", "Joe", smtpuser="joe"))
    assert e.smtpdomain == "example.test"


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (DirectoryEntry("TOOLONGID", "MAIL", "x"), "usrid: 'TOOLONGID' is not allowed"),
        (DirectoryEntry("SAM", "", "x"), "usrid: '' is not allowed; allowed: 1-8"),
        (DirectoryEntry("SA M", "MAIL", "x"), "usrid: 'SA M'"),
        (DirectoryEntry("*ANY", "MAIL", "x"), "only allowed as *ANY *ANY"),
        (DirectoryEntry("JOE", "MAIL", ""), "usrd: '' is not allowed"),
        (DirectoryEntry("JOE", "MAIL", "x", user="ghost"), "user: 'GHOST' does not exist"),
        (DirectoryEntry("JOE", "MAIL", "x", msfsrvlvl="*DOMINO"), "*SYSMS, *USRIDX"),
        (DirectoryEntry("JOE", "MAIL", "x", prefadr="*ORNAME"), "*SMTP, *USRID"),
        (DirectoryEntry("JOE", "MAIL", "x", msfsrvlvl="*SYSMS"), "user: '*NONE'"),
        (DirectoryEntry("JOE", "MAIL", "x", prefadr="*SMTP"), "smtpuser: '*NONE'"),
        (DirectoryEntry("JOE", "MAIL", "x", smtpuser="a b"), "smtpuser: 'a b'"),
        (DirectoryEntry("JOE", "MAIL", "x", smtpuser=".joe"), "smtpuser: '.joe'"),
        (DirectoryEntry("JOE", "MAIL", "x", smtpuser="j@e"), "smtpuser: 'j@e'"),
        (
            DirectoryEntry("JOE", "MAIL", "x", smtpuser="j", smtpdomain="ex ample"),
            "smtpdomain: 'ex ample'",
        ),
        (DirectoryEntry("JOE", "MAIL", "x", smtpuser="j", smtpdomain="-bad.test"), "smtpdomain"),
        (DirectoryEntry("*ANY", "*ANY", "catch", msfsrvlvl="*SYSMS"), "user: '*NONE'"),
        (DirectoryEntry("*ANY", "*ANY", "catch", user="sam"), "msfsrvlvl: '*USRIDX'"),
    ],
)
def test_entry_rules(d, entry, needle):
    d.create_profile("sam", "pw")
    before = d.entries()
    with pytest.raises(DirectoryError) as e:
        d.add_entry(entry)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)
    assert d.entries() == before


def test_duplicate_entry_refused(d):
    d.add_entry(DirectoryEntry("JOE", "MAIL", "Joe"))
    with pytest.raises(DirectoryError, match="usrid: 'JOE MAIL' already exists"):
        d.add_entry(DirectoryEntry("joe", "mail", "Joe again"))


def test_smtp_names_are_unique_without_regard_to_case(d):
    d.add_entry(DirectoryEntry("JOE", "MAIL", "Joe", smtpuser="joe", smtpdomain="example.test"))
    with pytest.raises(DirectoryError, match="already the SMTP name of directory entry JOE MAIL"):
        d.add_entry(DirectoryEntry("JOE2", "MAIL", "x", smtpuser="joe", smtpdomain="EXAMPLE.Test"))
    d.add_entry(DirectoryEntry("JOE3", "MAIL", "x", smtpuser="joe", smtpdomain="other.test"))
    # "Joe" beside "joe" made JOE@example.test name neither: mail to it got 550.
    with pytest.raises(DirectoryError, match="'Joe@example.test' is already the SMTP name of "
                       "directory entry JOE MAIL"):
        d.add_entry(DirectoryEntry("JOE4", "MAIL", "x", smtpuser="Joe", smtpdomain="example.test"))
    d.add_entry(DirectoryEntry("JOE4", "MAIL", "x", smtpuser="joey", smtpdomain="example.test"))
    with pytest.raises(DirectoryError, match="smtpuser: 'JOE@example.test'"):
        d.change_entry("JOE4", "MAIL", smtpuser="JOE")
    d.change_entry("JOE", "MAIL", smtpuser="Joe")  # its own name in another case
    assert d.get_entry("JOE", "MAIL").smtpuser == "Joe"


def test_change_entry(d):
    d.create_profile("sam", "pw")
    d.add_entry(DirectoryEntry("JOE", "HQ", "Joe", smtpuser="joe"))
    assert d.resolve("joe@example.test").kind == "snads"
    e = d.change_entry("joe", "hq", user="sam", msfsrvlvl="*sysms", prefadr="*SMTP")
    assert (e.user, e.msfsrvlvl, e.prefadr, e.smtp_name) == (
        "SAM",
        "*SYSMS",
        "*SMTP",
        "joe@example.test",
    )
    assert d.resolve("joe@example.test") == Resolution("pop", "joe@example.test", usrprf="SAM")
    with pytest.raises(DirectoryError, match="user: '\\*NONE' is not allowed with \\*SYSMS"):
        d.change_entry("JOE", "HQ", user="*NONE")
    e = d.change_entry(
        "JOE",
        "HQ",
        msfsrvlvl="*USRIDX",
        prefadr="*USRID",
        user=None,
        smtpuser="*NONE",
        smtpdomain=None,
    )
    assert (e.user, e.smtp_name) == (None, None)
    assert d.resolve("joe@example.test") is None
    with pytest.raises(DirectoryError, match="is not in the directory"):
        d.change_entry("NOBODY", "HQ", usrd="x")
    with pytest.raises(TypeError):
        d.change_entry("JOE", "HQ", userid="X")


def test_remove_entry(d):
    d.create_profile("sam", "pw")
    d.remove_entry("sam", "MAIL")
    assert d.get_entry("SAM", "MAIL") is None
    assert d.resolve("sam@example.test") is None
    assert d.get_profile("sam") is not None
    assert d.smtp_address("sam") is None
    with pytest.raises(DirectoryError, match="usrid: 'SAM MAIL' is not in the directory"):
        d.remove_entry("SAM", "MAIL")


def test_smtp_address_prefers_the_smtp_entry(d):
    d.create_profile("sam", "pw")
    d.add_entry(DirectoryEntry("AAA", "MAIL", "alias", user="sam", smtpuser="aaa"))
    assert d.smtp_address("SAM") == "sam@example.test"
    assert d.smtp_address("nobody") is None


# -- resolution ---------------------------------------------------------------


@pytest.fixture
def populated(d: SqliteDirectory) -> SqliteDirectory:
    d.create_profile("sam", "pw")
    d.create_profile("jane", "pw")
    d.create_profile("catch", "pw")
    d.add_entry(
        DirectoryEntry(
            "JSMITH",
            "MAIL",
            "J Smith",
            user="jane",
            msfsrvlvl="*SYSMS",
            smtpuser="J.Smith",
            smtpdomain="other.test",
        )
    )
    d.add_entry(
        DirectoryEntry("CASE1", "MAIL", "a", user="sam", msfsrvlvl="*SYSMS", smtpuser="Twin")
    )
    with d._write() as conn:  # names that differ in case alone, as earlier releases allowed
        d._insert_entry(conn, DirectoryEntry("CASE2", "MAIL", "b", user="JANE",
                                             msfsrvlvl="*SYSMS", smtpuser="TWIN",
                                             smtpdomain="example.test"))
    d.add_entry(DirectoryEntry("BOB", "ROCHSTR", "SNADS Bob", smtpuser="bob"))
    return d


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("sam@example.test", Resolution("pop", "sam@example.test", usrprf="SAM")),
        ("sam@EXAMPLE.TEST", Resolution("pop", "sam@EXAMPLE.TEST", usrprf="SAM")),
        ("SAM@example.test", Resolution("pop", "SAM@example.test", usrprf="SAM")),
        ("sam@example.test.", Resolution("pop", "sam@example.test.", usrprf="SAM")),
        ("jane@example.test", Resolution("pop", "jane@example.test", usrprf="JANE")),
        ("J.Smith@Other.Test", Resolution("pop", "J.Smith@Other.Test", usrprf="JANE")),
        ("j.smith@other.test", Resolution("pop", "j.smith@other.test", usrprf="JANE")),
        ("Twin@example.test", Resolution("pop", "Twin@example.test", usrprf="SAM")),
        ("TWIN@example.test", Resolution("pop", "TWIN@example.test", usrprf="JANE")),
        ("twin@example.test", None),
        ("j.smith@example.test", None),
        ("sam@other.test", None),
        ("postmaster@example.test", None),
        (
            "bob@example.test",
            Resolution("snads", "bob@example.test", userid="BOB", sysaddress="ROCHSTR"),
        ),
        ("sam@elsewhere.test", Resolution("remote", "sam@elsewhere.test")),
        ("sam@sub.example.test", Resolution("remote", "sam@sub.example.test")),
        ("a@b@example.test", None),
        ("sam", None),
        ("@example.test", None),
        ("sam@", None),
        ("", None),
    ],
)
def test_resolution(populated, address, expected):
    assert populated.resolve(address) == expected


def test_entries_whose_names_differ_in_case_alone_can_still_be_changed(populated):
    """Names an earlier release let differ in case alone: any CHGDIRE of them was refused."""
    assert populated.change_entry("CASE1", "MAIL", usrd="new text").usrd == "new text"
    assert populated.change_entry("CASE2", "MAIL", msfsrvlvl="*SYSMS").smtpuser == "TWIN"
    with pytest.raises(DirectoryError, match="already the SMTP name of directory entry CASE"):
        populated.change_entry("JSMITH", "MAIL", smtpuser="twin", smtpdomain="example.test")


def test_catch_all_takes_unknown_local_users_only(populated):
    populated.add_entry(
        DirectoryEntry("*ANY", "*ANY", "catch-all", user="catch", msfsrvlvl="*SYSMS")
    )
    assert populated.resolve("nobody@example.test") == Resolution(
        "pop", "nobody@example.test", usrprf="CATCH", catchall=True
    )
    assert populated.resolve("postmaster@other.test").catchall
    assert populated.resolve("twin@example.test").usrprf == "CATCH"
    assert populated.resolve("sam@example.test") == Resolution(
        "pop", "sam@example.test", usrprf="SAM"
    )
    assert populated.resolve("nobody@elsewhere.test").kind == "remote"
    assert populated.resolve("no-at-sign") is None
    populated.remove_entry("*any", "*ANY")
    assert populated.resolve("nobody@example.test") is None


# -- several processes --------------------------------------------------------


def _create_many(path: str, worker: int, start: float) -> None:
    dirmod.ARGON2_M, dirmod.ARGON2_T = 64, 1
    d = SqliteDirectory(Path(path), DOMAINS, "MAIL")
    time.sleep(max(0.0, start - time.time()))
    for i in range(25):
        d.create_profile(f"U{worker}X{i}", "pw")
    d.close()


def test_four_processes_create_profiles_at_once(tmp_path):
    path = tmp_path / "new" / "directory.sqlite"
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 1.5
    procs = [ctx.Process(target=_create_many, args=(str(path), w, start)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with SqliteDirectory(path, DOMAINS, "MAIL") as d:
        assert len(d.profiles()) == 100
        assert len(d.entries()) == 100
        assert d.resolve("u3x24@example.test").usrprf == "U3X24"


def _use_inherited(d: SqliteDirectory) -> None:
    d.create_profile("child", "pw")


def test_a_forked_child_opens_its_own_connection(d):
    d.create_profile("parent", "pw")
    p = multiprocessing.get_context("fork").Process(target=_use_inherited, args=(d,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert d.authenticate("parent", "pw") == "PARENT"
    assert d.get_profile("child") is not None


def test_threads_get_their_own_connections(d):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: d.create_profile(f"T{i}", "pw"), range(12)))
    assert len(d.profiles()) == 12


# -- the commands -------------------------------------------------------------


@pytest.fixture
def cfg(tmp_path: Path, cheap_scrypt: None) -> str:
    path = tmp_path / "twistmail.toml"
    path.write_text(CONFIG)
    return str(path)


def tm(capsys: pytest.CaptureFixture, cfg: str, *args: str) -> tuple[int, str, str]:
    rc = run(["--config", cfg, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_crtusrprf_enrolls_and_dspusrprf_hides_the_hash(cfg, capsys, tmp_path):
    rc, out, err = tm(
        capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw", "--text", "Sam Smith"
    )
    assert (rc, err) == (0, "")
    assert "SAM" in out and "sam@example.test" in out and "SAM MAIL" in out
    assert (tmp_path / "var" / "directory.sqlite").exists()
    rc, out, err = tm(capsys, cfg, "dspusrprf", "--usrprf", "Sam", "--json")
    assert rc == 0
    record = json.loads(out)
    assert record["usrprf"] == "SAM" and record["status"] == "*ENABLED"
    assert record["text"] == "Sam Smith" and record["smtp"] == "sam@example.test"
    assert record["entries"] == ["SAM MAIL"]
    assert record["mailbox"].endswith("var/mailboxes/SAM/Maildir")
    assert "scrypt" not in out
    rc, out, err = tm(capsys, cfg, "dspusrprf", "--usrprf", "sam")
    assert rc == 0 and "sam@example.test" in out and "scrypt" not in out


def test_wrkusrprf_lists_every_profile(cfg, capsys):
    rc, out, err = tm(capsys, cfg, "wrkusrprf")
    assert (rc, out.strip()) == (0, "(no user profiles)")
    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw", "--text", "Sam Smith")
    tm(capsys, cfg, "crtusrprf", "--usrprf", "jane", "--password", "pw", "--status", "*DISABLED")
    rc, out, err = tm(capsys, cfg, "wrkusrprf", "--json")
    assert rc == 0 and "pw" not in out and "scrypt" not in out
    assert [(r["usrprf"], r["status"], r["smtp"]) for r in json.loads(out)] == [
        ("JANE", "*DISABLED", "jane@example.test"), ("SAM", "*ENABLED", "sam@example.test")]
    rc, out, err = tm(capsys, cfg, "wrkusrprf")
    assert rc == 0 and "Sam Smith" in out and out.splitlines()[0].startswith("User profile")


def test_chgusrprf_and_dltusrprf(cfg, capsys):
    from twistmail import config

    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    rc, out, err = tm(
        capsys, cfg, "chgusrprf", "--usrprf", "sam", "--status", "*disabled", "--password", "new"
    )
    assert rc == 0, err
    with SqliteDirectory.from_settings(config.load(cfg)) as d:
        assert d.get_profile("sam").status == "*DISABLED"
        assert d.authenticate("sam", "new") is None
        d.change_profile("sam", status="*ENABLED")
        assert d.authenticate("sam", "new") == "SAM"
    rc, out, err = tm(capsys, cfg, "dltusrprf", "--usrprf", "SAM")
    assert rc == 0 and out == "User profile SAM deleted.\n"
    rc, out, err = tm(capsys, cfg, "dspusrprf", "--usrprf", "SAM")
    assert rc == 2 and "--usrprf: 'SAM' does not exist" in err


def test_dltusrprf_names_the_entries_that_routed_others_mail_to_the_profile(cfg, capsys):
    """The catch-all and a postmaster entry went silently with the profile:
    routing for the whole system changed without a word."""
    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    for args in (("--usrid", "*ANY", "*ANY", "--usrd", "catch"),
                 ("--usrid", "pm", "sysa", "--usrd", "Postmaster", "--smtpuser", "postmaster")):
        rc, out, err = tm(capsys, cfg, "adddire", *args, "--user", "sam",
                          "--msfsrvlvl", "*SYSMS")
        assert rc == 0, err
    rc, out, err = tm(capsys, cfg, "dltusrprf", "--usrprf", "SAM")
    assert rc == 0, err
    assert out.splitlines()[1] == (
        "Removed with it, so they route no more mail: *ANY *ANY, "
        "PM SYSA (postmaster@example.test).")


def test_a_profile_that_owns_mail_is_deleted_only_with_its_mail(cfg, capsys):
    """DLTUSRPRF OWNOBJOPT(*NODLT), IBM's default: a profile that owns objects stays.
    Kept mail went to whoever was created next under the same name."""
    from twistmail import config

    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    with SqliteDirectory.from_settings(config.load(cfg)) as d:
        box = d.mailbox("SAM")
    (box / "new").mkdir(parents=True)
    (box / "new" / "1.M1.host").write_bytes(b"Subject: private\r\n\r\nfor sam\r\n")
    rc, out, err = tm(capsys, cfg, "dltusrprf", "--usrprf", "SAM")
    assert rc == 2 and "--ownobjopt: SAM owns a mailbox with 1 message" in err
    assert "allowed: *DLT" in err and box.exists()
    rc, out, err = tm(capsys, cfg, "dltusrprf", "--usrprf", "SAM", "--ownobjopt", "*CHGOWN")
    assert rc == 2 and "is IBM's but not supported here" in err
    (box / "tmp").mkdir()
    (box / "tmp" / "2.M2.host").write_bytes(b"being delivered")  # counts as mail too
    rc, out, err = tm(capsys, cfg, "dltusrprf", "--usrprf", "SAM", "--ownobjopt", "*dlt")
    assert rc == 0 and "deleted with a mailbox with 2 messages" in out
    assert not box.parent.exists()


def test_a_mailbox_that_will_not_all_go_is_said_to_be_left(cfg, capsys, monkeypatch):
    """A file that could not be removed (immutable, say) left the mail on the
    disk after "deleted with a mailbox with 1 message"."""
    from twistmail import config
    from twistmail.cli import usercmds

    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    with SqliteDirectory.from_settings(config.load(cfg)) as d:
        box = d.mailbox("SAM")
    (box / "new").mkdir(parents=True)
    (box / "new" / "1.M1.host").write_bytes(b"Subject: private\r\n\r\nfor sam\r\n")
    monkeypatch.setattr(usercmds.shutil, "rmtree", lambda path, ignore_errors=False: None)
    rc, out, err = tm(capsys, cfg, "dltusrprf", "--usrprf", "SAM", "--ownobjopt", "*DLT")
    assert rc == 0 and "deleted with a mailbox with 1 message" in out
    assert err.startswith("note: its mailbox could not all be removed (") and \
        "the bridge tries again every hour" in err


def test_a_new_profile_is_not_handed_mail_left_under_its_name(cfg, capsys):
    from twistmail import config

    with SqliteDirectory.from_settings(config.load(cfg)) as d:
        assert d.profiles() == []  # the directory is there, the profile is not
        box = d.mailbox("SAM")
    (box / "cur").mkdir(parents=True)
    (box / "cur" / "1.M1.host:2,S").write_bytes(b"Subject: old\r\n\r\nx\r\n")
    rc, out, err = tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    assert rc == 2 and "--usrprf: SAM has a mailbox left by an earlier profile" in err


def test_a_new_profile_is_not_handed_mail_queued_for_one_deleted(cfg, capsys):
    """Mail accepted for BOB and still queued (the bridge ended) went to a BOB
    created after the first was deleted."""
    from twistmail import config
    from twistmail.interfaces import QTMSINQ, QTMSOUTQ
    from twistmail.queue import Envelope, FileQueue

    tm(capsys, cfg, "crtusrprf", "--usrprf", "bob", "--password", "pw")
    fq = FileQueue.for_settings(config.load(cfg))
    with fq.new_spool(Envelope.new("jane@example.test", ("Bob@example.test",))) as spool:
        spool.write(b"Subject: for the first bob\r\n\r\nx\r\n")
        spool.commit(QTMSINQ)
    rc, out, err = tm(capsys, cfg, "dltusrprf", "--usrprf", "BOB")
    assert rc == 0 and out == ("User profile BOB deleted.\n1 queued message for its addresses "
                               "is no longer its: a catch-all entry (*ANY) takes it, or it "
                               "goes back to its sender (wrkq lists it).\n")
    rc, out, err = tm(capsys, cfg, "crtusrprf", "--usrprf", "bob", "--password", "pw")
    assert rc == 2 and err.strip().endswith(
        "--usrprf: 1 queued message is for bob@example.test, the address BOB would get, "
        "accepted before it existed; allowed: a name no queued mail is for (it goes back to "
        "its sender at its next try, which wrkq shows; the bridge must be running: strmsf)")
    # Deferred (a full mailbox), it goes along with its message's remote recipients.
    fq.move(spool.id, QTMSINQ, QTMSOUTQ)
    rc, out, err = tm(capsys, cfg, "crtusrprf", "--usrprf", "bob", "--password", "pw")
    assert rc == 2 and "1 queued message is for bob@example.test" in err
    fq.remove(QTMSOUTQ, spool.id)
    rc, out, err = tm(capsys, cfg, "crtusrprf", "--usrprf", "bob", "--password", "pw")
    assert rc == 0, err


def test_directory_changes_say_what_they_do_to_queued_mail(cfg, capsys):
    """Queued mail is resolved again at delivery: rmvdire then adddire of the
    same SMTP name handed ZED's waiting mail to another mailbox, and a renamed
    entry's waiting mail went back to its sender, without a word."""
    from twistmail import config
    from twistmail.interfaces import QTMSINQ
    from twistmail.queue import Envelope, FileQueue

    tm(capsys, cfg, "crtusrprf", "--usrprf", "zed", "--password", "pw")
    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    fq = FileQueue.for_settings(config.load(cfg))
    with fq.new_spool(Envelope.new("jane@example.test", ("zed@example.test",))) as spool:
        spool.write(b"Subject: for zed\r\n\r\nx\r\n")
        spool.commit(QTMSINQ)
    rc, out, err = tm(capsys, cfg, "chgdire", "--usrid", "ZED", "MAIL", "--smtpuser", "zedd")
    assert rc == 0 and out.splitlines()[1] == (
        "1 queued message for zed@example.test no longer reaches ZED MAIL: another entry or "
        "a catch-all (*ANY) takes it, or it goes back to its sender (wrkq lists it).")
    rc, out, err = tm(capsys, cfg, "adddire", "--usrid", "OTHER", "MAIL", "--usrd", "reuse",
                      "--user", "SAM", "--msfsrvlvl", "*SYSMS", "--prefadr", "*SMTP",
                      "--smtpuser", "zed")
    assert rc == 0 and out.splitlines()[1] == (
        "1 queued message for zed@example.test, accepted before OTHER MAIL had that name, "
        "is delivered to it (wrkq lists it).")
    rc, out, err = tm(capsys, cfg, "rmvdire", "--usrid", "OTHER", "MAIL")
    assert rc == 0 and "1 queued message for zed@example.test no longer reaches OTHER MAIL" \
        in out
    rc, out, err = tm(capsys, cfg, "chgdire", "--usrid", "ZED", "MAIL", "--usrd", "Zed")
    assert rc == 0 and out == "Directory entry ZED MAIL changed.\n"  # its name stays
    rc, out, err = tm(capsys, cfg, "chgdire", "--usrid", "ZED", "MAIL", "--smtpuser", "zed")
    rc, out, err = tm(capsys, cfg, "chgdire", "--usrid", "ZED", "MAIL", "--smtpuser", "Zed")
    assert rc == 0 and out == "Directory entry ZED MAIL changed.\n"  # case: the same name
    rc, out, err = tm(capsys, cfg, "chgdire", "--usrid", "ZED", "MAIL", "--user", "SAM")
    assert rc == 0 and out.splitlines()[1] == (
        "1 queued message for zed@example.test goes to SAM's mailbox now (wrkq lists it).")


def test_an_smtp_name_in_no_local_domain_is_taken_with_a_note(cfg, capsys):
    rc, out, err = tm(capsys, cfg, "adddire", "--usrid", "X1", "HQ", "--usrd", "x",
                      "--smtpuser", "x1", "--smtpdomain", "remote.test")
    assert rc == 0 and out.splitlines()[1] == (
        "note: x1@remote.test is in no local domain ([system] local_domains: example.test, "
        "other.test), so mail to it is not delivered to this entry")


def test_the_catch_all_is_a_mailbox_entry_by_default(cfg, capsys):
    """adddire's default level, *USRIDX, is one the catch-all cannot have: an
    administrator who never typed it was told it is not allowed."""
    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    rc, out, err = tm(capsys, cfg, "adddire", "--usrid", "*ANY", "*ANY", "--usrd", "catch",
                      "--user", "SAM")
    assert rc == 0, err
    rc, out, err = tm(capsys, cfg, "wrkdire", "--json")
    [catch] = [e for e in json.loads(out) if e["userid"] == "*ANY"]
    assert catch["msfsrvlvl"] == "*SYSMS"


def test_password_from_stdin(cfg, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    rc, out, err = tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "-")
    assert rc == 0, err
    from twistmail import config

    with SqliteDirectory.from_settings(config.load(cfg)) as d:
        assert d.authenticate("sam", "from stdin") == "SAM"


def test_directory_commands(cfg, capsys):
    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    rc, out, err = tm(
        capsys,
        cfg,
        "adddire",
        "--usrid",
        "*ANY",
        "*ANY",
        "--usrd",
        "catch",
        "--user",
        "sam",
        "--msfsrvlvl",
        "*SYSMS",
    )
    assert rc == 0, err
    rc, out, err = tm(
        capsys,
        cfg,
        "adddire",
        "--usrid",
        "bob",
        "rochstr",
        "--usrd",
        "Bob",
        "--smtpuser",
        "Bob",
        "--smtpdomain",
        "other.test",
    )
    assert rc == 0, err
    rc, out, err = tm(capsys, cfg, "chgdire", "--usrid", "BOB", "ROCHSTR", "--prefadr", "*smtp")
    assert rc == 0, err
    rc, out, err = tm(capsys, cfg, "wrkdire", "--json")
    rows = json.loads(out)
    assert [(r["userid"], r["address"]) for r in rows] == [
        ("*ANY", "*ANY"),
        ("BOB", "ROCHSTR"),
        ("SAM", "MAIL"),
    ]
    bob = rows[1]
    assert bob["smtp"] == "Bob@other.test" and bob["prefadr"] == "*SMTP"
    assert bob["msfsrvlvl"] == "*USRIDX" and bob["user"] is None
    rc, out, err = tm(capsys, cfg, "wrkdire")
    lines = out.splitlines()
    for heading in (
        "User ID",
        "Address",
        "Description",
        "User profile",
        "Mail service level",
        "Preferred address",
        "SMTP name",
    ):
        assert heading in lines[0]
    assert len(lines) == 4 and "Bob@other.test" in out
    rc, out, err = tm(capsys, cfg, "rmvdire", "--usrid", "bob", "rochstr")
    assert rc == 0, err
    rc, out, err = tm(capsys, cfg, "wrkdire", "--json")
    assert len(json.loads(out)) == 2


def test_cl_syntax_reaches_the_directory(cfg, capsys):
    tm(capsys, cfg, "cl", "CRTUSRPRF USRPRF(SAM) PASSWORD(pw)")
    rc, out, err = tm(capsys, cfg, "cl", "ADDDIRE USRID(JOE HQ) USRD('Joe') SMTPUSER(joe)")
    assert rc == 0, err
    rc, out, err = tm(capsys, cfg, "wrkdire", "--json")
    assert {r["userid"] for r in json.loads(out)} == {"SAM", "JOE"}


def test_empty_listing(cfg, capsys):
    rc, out, err = tm(capsys, cfg, "wrkdire")
    assert rc == 0 and out.strip() == "(no directory entries)"
    rc, out, err = tm(capsys, cfg, "wrkdire", "--json")
    assert json.loads(out) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["crtusrprf", "--usrprf", "1BAD", "--password", "pw"], "--usrprf: '1BAD'"),
        (["crtusrprf", "--usrprf", "SAM", "--password", "pw"], "--usrprf: 'SAM' already exists"),
        (["crtusrprf", "--usrprf", "NEW"], "--password"),
        (
            ["crtusrprf", "--usrprf", "NEW", "--password", "pw", "--status", "*ON"],
            "--status: '*ON' is not allowed; allowed: *ENABLED, *DISABLED",
        ),
        (["crtusrprf", "--usrprf", "NEW", "--password", ""], "--password: '(0 characters)'"),
        (["chgusrprf", "--usrprf", "SAM"], "give at least one of"),
        (["chgusrprf", "--usrprf", "GHOST", "--text", "x"], "--usrprf: 'GHOST' does not exist"),
        (["dltusrprf", "--usrprf", "GHOST"], "--usrprf: 'GHOST' does not exist"),
        (["dspusrprf", "--usrprf", "BAD NAME"], "--usrprf: 'BAD NAME' is not allowed"),
        (["adddire", "--usrid", "JOE", "HQ"], "--usrd: required"),
        (["adddire", "--usrid", "JOE"], "--usrid"),
        (["adddire", "--usrid", "TOOLONGID", "HQ", "--usrd", "x"], "--usrid: 'TOOLONGID'"),
        (
            ["adddire", "--usrid", "JOE", "HQ", "--usrd", "x", "--msfsrvlvl", "*DOMINO"],
            "--msfsrvlvl: '*DOMINO' is not allowed; allowed: *SYSMS, *USRIDX",
        ),
        (
            ["adddire", "--usrid", "JOE", "HQ", "--usrd", "x", "--prefadr", "*SMTP"],
            "--smtpuser: '*NONE'",
        ),
        (
            ["adddire", "--usrid", "JOE", "HQ", "--usrd", "x", "--user", "GHOST"],
            "--user: 'GHOST' does not exist",
        ),
        (
            ["adddire", "--usrid", "JOE", "HQ", "--usrd", "x", "--msfsrvlvl", "*SYSMS"],
            "--user: '*NONE'",
        ),
        (
            ["adddire", "--usrid", "JOE", "HQ", "--usrd", "x", "--smtpuser", "sam"],
            "--smtpuser: 'sam@example.test' is already the SMTP name of directory entry SAM MAIL",
        ),
        (["adddire", "--usrid", "*ANY", "*ANY", "--usrd", "x"], "--user: '*NONE'"),
        (["adddire", "--usrid", "SAM", "MAIL", "--usrd", "x"], "--usrid: 'SAM MAIL' already"),
        (["chgdire", "--usrid", "SAM", "MAIL"], "give at least one of"),
        (["chgdire", "--usrid", "NO", "ONE", "--usrd", "x"], "--usrid: 'NO ONE' is not in"),
        (
            ["chgdire", "--usrid", "SAM", "MAIL", "--smtpdomain", "bad domain"],
            "--smtpdomain: 'bad domain'",
        ),
        (["rmvdire", "--usrid", "NO", "ONE"], "--usrid: 'NO ONE' is not in the directory"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(cfg, capsys, args, needle):
    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    rc, out, err = tm(capsys, cfg, *args)
    assert rc == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert "Traceback" not in out + err


def test_an_unusable_database_fails_with_exit_1(cfg, capsys, tmp_path):
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "directory.sqlite").write_bytes(b"this is not a database" * 100)
    rc, out, err = tm(capsys, cfg, "wrkdire")
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and "directory.sqlite" in err


def test_one_user_id_has_one_snads_store(d: SqliteDirectory) -> None:
    """The store is named by the user ID: a second *USRIDX address for it would share it."""
    d.add_entry(DirectoryEntry("JOE", "MAIL", "Joe at mail", msfsrvlvl="*USRIDX", prefadr="*USRID"))
    with pytest.raises(DirectoryError, match="already has a \\*USRIDX entry at address MAIL"):
        d.add_entry(DirectoryEntry("JOE", "HQ", "Joe at HQ", msfsrvlvl="*USRIDX",
                                   prefadr="*USRID"))


def test_a_deleted_profile_s_pop_sign_ons_no_longer_open_the_relay(d: SqliteDirectory) -> None:
    d.create_profile("sam", "pw")
    d.record_pop_login("192.0.2.7", "SAM")
    assert d.pop_login_since("192.0.2.7", 0) == "SAM"
    d.delete_profile("sam")
    assert d.pop_login_since("192.0.2.7", 0) is None


def test_a_disabled_profile_s_pop_sign_ons_no_longer_open_the_relay(d: SqliteDirectory) -> None:
    d.create_profile("sam", "pw")
    d.record_pop_login("192.0.2.7", "SAM")
    d.change_profile("sam", status="*DISABLED")
    assert d.pop_login_since("192.0.2.7", 0) is None
    d.change_profile("sam", status="*ENABLED")
    d.record_pop_login("192.0.2.7", "SAM")
    with d._write() as conn:  # a sign-on recorded while the profile was being disabled
        conn.execute("UPDATE profiles SET status = '*DISABLED' WHERE usrprf = 'SAM'")
    assert d.pop_login_since("192.0.2.7", 0) is None


def test_a_password_must_fit_a_pop_pass_line(d: SqliteDirectory) -> None:
    """128 letters of two octets each: SMTP AUTH took them, POP's 255-octet line never."""
    with pytest.raises(DirectoryError, match="at most 248 octets in UTF-8"):
        d.create_profile("sam", "é" * 128)
    d.create_profile("sam", "é" * 124)  # 248 octets: "PASS " + it + CRLF is 255
    assert d.authenticate("sam", "é" * 124) == "SAM"


def test_a_password_is_one_whatever_its_unicode_form(d: SqliteDirectory) -> None:
    """RFC 8265: "ü" as one character or as u + combining diaeresis."""
    import unicodedata

    nfc, nfd = "pässwörd", unicodedata.normalize("NFD", "pässwörd")
    d.create_profile("sam", nfd)  # typed in NFD
    assert d.authenticate("sam", nfc) == "SAM" and d.authenticate("sam", nfd) == "SAM"
    assert d.authenticate("sam", "passwort") is None


def test_a_hash_made_before_normalisation_still_signs_on_and_is_made_again(
        d: SqliteDirectory) -> None:
    import unicodedata

    from twistmail import directory as dirmod

    nfd = unicodedata.normalize("NFD", "pässwörd")
    d.create_profile("sam", "x")
    kdf_input = nfd.encode("utf-8")  # as the hash of a release before NFC was made
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    old = Argon2id(salt=b"0123456789abcdef", length=dirmod.ARGON2_LEN,
                   iterations=dirmod.ARGON2_T, lanes=dirmod.ARGON2_P,
                   memory_cost=dirmod.ARGON2_M).derive_phc_encoded(kdf_input)
    with d._write() as conn:
        conn.execute("UPDATE profiles SET pwhash = ? WHERE usrprf = 'SAM'", (old,))
    assert d.authenticate("sam", nfd) == "SAM"
    with d._write() as conn:
        now = conn.execute("SELECT pwhash FROM profiles WHERE usrprf = 'SAM'").fetchone()[0]
    assert now != old and d.authenticate("sam", unicodedata.normalize("NFC", nfd)) == "SAM"


def test_entries_routed_to_a_profile_do_not_change_its_own_address(d):
    """The README's NONDELIVERY and postmaster entries point at SAM's mailbox
    with the same service level and preferred address as SAM's own entry, and
    sort before it; SAM still sends as sam@."""
    d.create_profile("sam", "pw")
    for userid, smtpuser in (("NONDLV", "NONDELIVERY"), ("POSTMSTR", "postmaster")):
        d.add_entry(DirectoryEntry(userid, "MAIL", "copies", user="sam", msfsrvlvl="*SYSMS",
                                   prefadr="*SMTP", smtpuser=smtpuser))
    assert d.smtp_address("SAM") == "sam@example.test"
    d.create_profile("ABCDEFGHIJ", "pw")  # enrolled as ABCDEFGH
    d.add_entry(DirectoryEntry("ABC", "MAIL", "alias", user="ABCDEFGHIJ", msfsrvlvl="*SYSMS",
                               prefadr="*SMTP", smtpuser="abc"))
    assert d.smtp_address("ABCDEFGHIJ") == "abcdefghij@example.test"


def test_password_none_signs_on_nobody_and_same_keeps_what_is_there(cfg, capsys):
    """IBM's special values: PASSWORD(*NONE) is a profile without a password
    (mail only); *SAME keeps a value.  Both were stored as passwords, so
    anyone could read a *NONE profile's mail with PASS *NONE."""
    from twistmail import config

    rc, out, err = tm(capsys, cfg, "cl", "CRTUSRPRF USRPRF(NOPW) PASSWORD(*NONE) TEXT(*BLANK)")
    assert rc == 0, err
    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw", "--text", "Sam")
    rc, out, err = tm(capsys, cfg, "chgusrprf", "--usrprf", "sam", "--password", "*SAME",
                      "--text", "*same")
    assert (rc, out) == (0, "User profile SAM unchanged (*SAME).\n"), err
    with SqliteDirectory.from_settings(config.load(cfg)) as d:
        assert d.authenticate("NOPW", "*NONE") is None and d.authenticate("NOPW", "") is None
        assert d.get_profile("NOPW").password_none and d.get_profile("NOPW").text == ""
        assert d.authenticate("sam", "pw") == "SAM" and d.authenticate("sam", "*SAME") is None
        assert d.get_profile("sam").text == "Sam"
    rc, out, err = tm(capsys, cfg, "dspusrprf", "--usrprf", "NOPW", "--json")
    assert json.loads(out)["password_none"] == "*YES"
    rc, out, err = tm(capsys, cfg, "chgusrprf", "--usrprf", "sam", "--password", "*none")
    assert rc == 0, err
    with SqliteDirectory.from_settings(config.load(cfg)) as d:
        assert d.authenticate("sam", "pw") is None and d.authenticate("sam", "*none") is None
    rc, out, err = tm(capsys, cfg, "dspusrprf", "--usrprf", "sam")
    assert "Password is *NONE" in out and "*YES" in out
    for command in (("crtusrprf", "--usrprf", "joe", "--password", "*SAME"),
                    ("crtusrprf", "--usrprf", "joe", "--password", "pw", "--text", "*SAME"),
                    ("crtusrprf", "--usrprf", "joe", "--password", "*USRPRF"),
                    ("chgusrprf", "--usrprf", "sam", "--password", "*USRPRF")):
        rc, out, err = tm(capsys, cfg, *command)
        assert rc == 2 and err.startswith("twistmail") and len(err.splitlines()) == 1, err
        assert ("--password:" in err and "allowed: a password, *NONE" in err) or \
            "--text: '*SAME' is not allowed for a new profile" in err, err


def test_same_in_a_directory_change_keeps_the_value(cfg, capsys):
    """chgdire --smtpuser '*SAME' stored the name *SAME, and all of the
    user's mail was refused as to an unknown user."""
    from twistmail import config

    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    rc, out, err = tm(capsys, cfg, "chgdire", "--usrid", "SAM", "MAIL", "--smtpuser", "*SAME",
                      "--usrd", "*same")
    assert (rc, out) == (0, "Directory entry SAM MAIL unchanged (*SAME).\n"), err
    rc, out, err = tm(capsys, cfg, "chgdire", "--usrid", "SAM", "MAIL", "--smtpuser", "*SAME",
                      "--usrd", "Sam Smith")
    assert rc == 0 and "changed" in out, err
    with SqliteDirectory.from_settings(config.load(cfg)) as d:
        entry = d.get_entry("SAM", "MAIL")
        assert (entry.smtpuser, entry.usrd) == ("sam", "Sam Smith")
    rc, out, err = tm(capsys, cfg, "adddire", "--usrid", "ANN", "MAIL", "--usrd", "Ann",
                      "--smtpuser", "*SAME")
    assert rc == 2 and "--smtpuser: '*SAME' is not allowed when adding" in err


def test_an_smtp_name_goes_as_a_whole_and_half_a_name_is_named(d):
    d.create_profile("sam", "pw")
    d.add_entry(DirectoryEntry("ANN", "MAIL", "Ann", user="sam", smtpuser="ann"))
    d.change_entry("ANN", "MAIL", smtpuser="*NONE")
    entry = d.get_entry("ANN", "MAIL")
    assert (entry.smtpuser, entry.smtpdomain) == (None, None)
    with pytest.raises(DirectoryError, match="smtpuser: '\\*NONE' is not allowed with SMTP "
                       "domain 'example.test'; allowed: a user name"):
        d.change_entry("ANN", "MAIL", smtpdomain="example.test")


def test_special_values_from_stdin_mean_what_they_mean_on_the_command_line(
        cfg, capsys, monkeypatch):
    """echo '*none' | crtusrprf --password - made a profile anyone could sign on
    to with "*none"; echo '*SAME' | chgusrprf set the password "*SAME"."""
    import io

    from twistmail import config

    monkeypatch.setattr("sys.stdin", io.StringIO("*none\n"))
    assert tm(capsys, cfg, "crtusrprf", "--usrprf", "mailonly", "--password", "-")[0] == 0
    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    monkeypatch.setattr("sys.stdin", io.StringIO("*SAME\n"))
    rc, out, err = tm(capsys, cfg, "chgusrprf", "--usrprf", "sam", "--password", "-")
    assert (rc, out) == (0, "User profile SAM unchanged (*SAME).\n"), err
    with SqliteDirectory.from_settings(config.load(cfg)) as d:
        assert d.get_profile("mailonly").password_none
        assert d.authenticate("mailonly", "*none") is None
        assert d.authenticate("sam", "pw") == "SAM"


def test_a_profile_an_older_version_gave_the_password_star_none_cannot_sign_on(d):
    """Before PASSWORD(*NONE) was understood it was stored as the password
    "*NONE"; IBM's special values never sign on, whatever is stored."""
    d.create_profile("OLDNONE", "pw")
    with d._write() as conn:
        conn.execute("UPDATE profiles SET pwhash = ? WHERE usrprf = 'OLDNONE'",
                     (dirmod.hash_password("*NONE"),))
    for typed in ("*NONE", "*none", " *NONE "):
        assert d.authenticate("OLDNONE", typed) is None
    assert dirmod.verify_password("*NONE", d._conn().execute(
        "SELECT pwhash FROM profiles WHERE usrprf = 'OLDNONE'").fetchone()[0])


def test_chgdire_keeps_a_profile_s_own_address_first(d):
    """A change rewrote the row, which then came after an entry routed to the
    same mailbox, whose name the profile then sent as."""
    d.create_profile("SALESTEAM1", "pw")
    d.create_profile("SALESTEAM2", "pw")  # enrolled as SALESTE1: not its name's first 8
    d.add_entry(DirectoryEntry("NDCOPY", "MAIL", "copies", user="SALESTEAM2",
                               msfsrvlvl="*SYSMS", prefadr="*SMTP", smtpuser="nondelivery"))
    own = d.get_entry("SALESTE1", "MAIL") or d.get_entry("SALESTEA", "MAIL")
    d.change_entry(own.userid, own.address, usrd="Sales team 2")
    assert d.smtp_address("SALESTEAM2") == "salesteam2@example.test"
    d.change_entry("NDCOPY", "MAIL", prefadr="*USRID", smtpuser=" *none ")  # any case
    assert d.get_entry("NDCOPY", "MAIL").smtpdomain is None


def test_a_sign_on_that_opens_after_dltusrprf_makes_no_mailbox_for_nobody(tmp_path: Path) -> None:
    """The password was checked before the deletion; the mailbox opens after it."""
    from twistmail.auth import MailboxRealm
    from twistmail.maildir import MailboxGone, MaildirStore

    d = SqliteDirectory(tmp_path / "directory.sqlite", DOMAINS, "MAIL")
    store = MaildirStore(tmp_path / "mailboxes", "mail.example.test")
    realm = MailboxRealm(None, store, d)
    d.create_profile("sam", "pw")
    realm._open("SAM").close()  # a profile that never had mail: its mailbox is made
    assert store.path("SAM").is_dir()
    d.create_profile("bob", "pw")
    d.delete_profile("bob")
    with pytest.raises(MailboxGone):
        realm._open("BOB")
    assert not (tmp_path / "mailboxes" / "BOB").exists()


def test_crtusrprf_says_why_a_profile_got_no_smtp_address(cfg, capsys):
    rc, out, err = tm(capsys, cfg, "crtusrprf", "--usrprf", "A@B", "--password", "pw")
    assert rc == 0, err
    assert out.splitlines()[-1] == (
        "No SMTP address: '@' is in no SMTP local part, so a@b is none; mail reaches the "
        "profile once its entry has one: chgdire --usrid A@B MAIL --prefadr '*SMTP' "
        "--smtpuser NAME")


def test_listings_make_no_state_directory(cfg, capsys, tmp_path):
    """A datadir mistyped in the settings was made by wrkdire, with a fresh
    directory in it, and listed empty as if it were the appliance's."""
    rc, out, err = tm(capsys, cfg, "wrkdire")
    assert (rc, out) == (0, "(no directory entries)\n"), err
    rc, out, err = tm(capsys, cfg, "wrkusrprf", "--json")
    assert (rc, out) == (0, "[]\n"), err
    rc, out, err = tm(capsys, cfg, "dspusrprf", "--usrprf", "sam")
    assert rc == 2 and "--usrprf: 'SAM' does not exist" in err
    assert not (tmp_path / "var").exists()
    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")  # a change makes it
    rc, out, err = tm(capsys, cfg, "wrkusrprf")
    assert rc == 0 and "SAM" in out


def test_dltusrprf_waits_for_a_delivery_and_keeps_the_mail_it_made(cfg, capsys):
    """A delivery resolved its recipient, then DLTUSRPRF *NODLT found the
    mailbox empty and removed it, with the mail just written: acknowledged
    mail lost.  Deletion now waits for deliveries in progress, decides on
    what they made, and none made afterwards re-creates the mailbox."""
    import threading

    from twistmail import config
    from twistmail.bridge.inbound import deliver_to_profile
    from twistmail.maildir import MailboxGone, MaildirStore, owner_lock

    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    settings = config.load(cfg)
    store = MaildirStore(settings.datadir / "mailboxes", "mail.example.test")
    directory = SqliteDirectory.from_settings(settings)
    body = settings.datadir / "body"
    body.write_bytes(b"Subject: hi\r\n\r\nfor sam\r\n")
    result = {}
    with owner_lock(store.root, "SAM"):  # a delivery under way
        t = threading.Thread(target=lambda: result.update(
            rc=tm(capsys, cfg, "dltusrprf", "--usrprf", "SAM")[0]))
        t.start()
        t.join(1.0)
        assert t.is_alive()  # waits for the delivery
        store.deliver("SAM", "q1.R0", body, b"")
    t.join(10)
    assert result["rc"] == 2 and store.path("SAM").exists()  # *NODLT: kept, with its mail
    assert tm(capsys, cfg, "dltusrprf", "--usrprf", "SAM", "--ownobjopt", "*DLT")[0] == 0
    with pytest.raises(MailboxGone):  # resolved before the deletion, delivered after
        deliver_to_profile(store, directory, "SAM", "q2.R0", body, b"")
    assert not store.path("SAM").parent.exists()  # not made again for nobody
    assert not [p for p in store.root.iterdir() if p.name.startswith(".deleted-")]
    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    assert deliver_to_profile(store, directory, "SAM", "q3.R0", body, b"").exists()


def test_a_responsible_person_with_no_mailbox_here_is_taken_with_a_note(cfg, capsys):
    """CHGSMTPA NFYDLVRY: copies of failure notices to an address no entry
    takes were dropped (7U), said only in the journal, when one failed."""
    tm(capsys, cfg, "crtusrprf", "--usrprf", "sam", "--password", "pw")
    rc, out, err = tm(capsys, cfg, "chgsmtpa", "--nfydlvry", "nosuch@example.test")
    assert rc == 0 and "note: nosuch@example.test is no mailbox here" in err, (out, err)
    for fine in ("sam@example.test", "admin@remote.test"):
        rc, out, err = tm(capsys, cfg, "chgsmtpa", "--nfydlvry", fine)
        assert rc == 0 and "no mailbox here" not in err, (fine, err)
