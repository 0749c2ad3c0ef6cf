"""SMTP list entries (ADDSMTPLE / RMVSMTPLE / WRKSMTPLE) and the checks that use them."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import sqlite3
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twistmail import directory as dirmod
from twistmail.cli.base import run
from twistmail.directory import DirectoryError, ListEntry, SqliteDirectory

CONFIG = """[system]
datadir = "var"
local_domains = ["example.test"]
hostname = "mail.example.test"
"""


def _open(path: Path) -> SqliteDirectory:
    return SqliteDirectory(path, ("example.test",), "mail")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "directory.sqlite"


@pytest.fixture
def d(db_path: Path) -> SqliteDirectory:
    directory = _open(db_path)
    yield directory
    directory.close()


def refused(d: SqliteDirectory, entry: ListEntry) -> DirectoryError:
    with pytest.raises(DirectoryError) as info:
        d.add_list_entry(entry)
    assert "\n" not in str(info.value)
    return info.value


# -- schema -------------------------------------------------------------------


def test_migration_adds_the_list_tables(d, db_path):
    d.add_list_entry(ListEntry("*NEAR", hostname="example.com"))
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == dirmod.SCHEMA_VERSION
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"smtp_list", "smtp_list_version", "profiles", "entries", "pop_logins"} <= names
    conn.close()


def test_database_holding_host_passwords_stays_private(d, db_path):
    d.add_list_entry(ListEntry("*HOSTAUTH", hostname="relay.test", username="u", password="pw"))
    for path in db_path.parent.glob(db_path.name + "*"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


# -- validation per type ------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "stored"),
    [
        (
            ListEntry("*reject", intnetadr=" 192.0.2.77 ", subnetmask="255.255.255.0"),
            ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="255.255.255.0"),
        ),
        (
            ListEntry("*ACCEPT", intnetadr="198.51.100.7"),
            ListEntry("*ACCEPT", intnetadr="198.51.100.7", subnetmask="255.255.255.255"),
        ),
        (
            ListEntry("*ACCEPT", intnetadr="10.1.2.3", subnetmask="/8"),
            ListEntry("*ACCEPT", intnetadr="10.0.0.0", subnetmask="255.0.0.0"),
        ),
        (
            ListEntry("*REJECT", intnetadr="2001:DB8:0:0:1::", subnetmask="64"),
            ListEntry("*REJECT", intnetadr="2001:db8::", subnetmask="64"),
        ),
        (
            ListEntry("*ACCEPT", intnetadr="2001:db8::1"),
            ListEntry("*ACCEPT", intnetadr="2001:db8::1", subnetmask="128"),
        ),
        (ListEntry("*Near", hostname="Example.COM."), ListEntry("*NEAR", hostname="example.com")),
        (
            ListEntry("*DOMAIN", intnetadr="192.0.2.1", hostname="Mail.Example.com"),
            ListEntry("*DOMAIN", intnetadr="192.0.2.1", hostname="mail.example.com"),
        ),
        (ListEntry("*SVRBIND", intnetadr="::1"), ListEntry("*SVRBIND", intnetadr="::1")),
        (
            ListEntry("*CLTBIND", intnetadr="192.0.2.2"),
            ListEntry("*CLTBIND", intnetadr="192.0.2.2"),
        ),
        (
            ListEntry("*ETRNSVR", hostname="Backup.Test"),
            ListEntry("*ETRNSVR", hostname="backup.test"),
        ),
        (
            ListEntry("*ETRNSVR", intnetadr="192.0.2.3"),
            ListEntry("*ETRNSVR", intnetadr="192.0.2.3"),
        ),
        (
            ListEntry("*FTRSUBJECT", ftrdata=" ILOVEYOU "),
            ListEntry("*FTRSUBJECT", ftrdata="ILOVEYOU"),
        ),
        (
            ListEntry("*FTRORIGIN", ftrdata="*@us.ibm.com"),
            ListEntry("*FTRORIGIN", ftrdata="*@us.ibm.com"),
        ),
        (ListEntry("*FTRFILNAME", ftrdata="*.vbs"), ListEntry("*FTRFILNAME", ftrdata="*.vbs")),
        (ListEntry("*FTRTYPE", ftrdata="image/*"), ListEntry("*FTRTYPE", ftrdata="image/*")),
        (
            ListEntry("*HOSTAUTH", hostname="Relay.Test", username="joe", password=" p w "),
            ListEntry("*HOSTAUTH", hostname="relay.test", username="joe", password=" p w "),
        ),
    ],
)
def test_each_type_is_stored_normalized(d, entry, stored):
    assert d.add_list_entry(entry) == stored
    assert d.list_entries() == [stored]


@pytest.mark.parametrize(
    ("entry", "field", "needle"),
    [
        (ListEntry("*FOO"), "type", "allowed: *ACCEPT, *REJECT"),
        (ListEntry("ACCEPT", intnetadr="192.0.2.1"), "type", "allowed: *ACCEPT"),
        (ListEntry("*ACCEPT"), "intnetadr", "IPv4 or IPv6 address"),
        (ListEntry("*REJECT", intnetadr="192.0.2.300"), "intnetadr", "IPv4 or IPv6 address"),
        (ListEntry("*REJECT", intnetadr="mail.test"), "intnetadr", "IPv4 or IPv6 address"),
        (
            ListEntry("*REJECT", intnetadr="192.0.2.0", hostname="x.test"),
            "hostname",
            "allowed: INTNETADR, SUBNETMASK",
        ),
        (ListEntry("*NEAR", hostname="x.test", subnetmask="24"), "subnetmask", "HOSTNAME"),
        (ListEntry("*NEAR"), "hostname", "a domain name"),
        (ListEntry("*NEAR", hostname="bad_name.test"), "hostname", "a domain name"),
        (ListEntry("*NEAR", hostname="192.0.2.1"), "hostname", "is an address"),
        (ListEntry("*NEAR", hostname="a..test"), "hostname", "a domain name"),
        (ListEntry("*DOMAIN", hostname="example.com"), "intnetadr", "IPv4 or IPv6"),
        (ListEntry("*DOMAIN", intnetadr="192.0.2.1"), "hostname", "a domain name"),
        (ListEntry("*SVRBIND"), "intnetadr", "IPv4 or IPv6"),
        (ListEntry("*CLTBIND", intnetadr="192.0.2.1", subnetmask="24"), "subnetmask", ""),
        (ListEntry("*ETRNSVR"), "hostname", "unless INTNETADR is given"),
        (
            ListEntry("*ETRNSVR", hostname="a.test", intnetadr="192.0.2.1"),
            "intnetadr",
            "one of them",
        ),
        (ListEntry("*FTRSUBJECT"), "ftrdata", "a subject"),
        (ListEntry("*FTRSUBJECT", ftrdata="**"), "ftrdata", "cannot be the whole pattern"),
        (ListEntry("*FTRSUBJECT", ftrdata="x" * 256), "ftrdata", "up to 255"),
        (ListEntry("*FTRSUBJECT", ftrdata="a\tb"), "ftrdata", "printable"),
        (ListEntry("*FTRTYPE", ftrdata="image"), "ftrdata", "a MIME type"),
        (ListEntry("*FTRORIGIN", ftrdata="a b@c"), "ftrdata", "an originator"),
        (ListEntry("*FTRFILNAME", ftrdata="dir/x.vbs"), "ftrdata", "a file name"),
        (ListEntry("*FTRTYPE", ftrdata="image/*", hostname="h.test"), "hostname", "FTRDATA"),
        (ListEntry("*HOSTAUTH", hostname="r.test", username="u"), "password", "1-128"),
        (ListEntry("*HOSTAUTH", hostname="r.test", password="p"), "username", "1-128"),
        (ListEntry("*HOSTAUTH", username="u", password="p"), "hostname", "a host name"),
        (
            ListEntry("*HOSTAUTH", hostname="r.test", username="u", password="p" * 129),
            "password",
            "1-128",
        ),
    ],
)
def test_each_type_refuses_what_it_does_not_take(d, entry, field, needle):
    error = refused(d, entry)
    assert error.field == field
    assert needle in error.problem
    assert d.list_entries() == []


def test_a_refused_password_is_not_echoed(d):
    error = refused(d, ListEntry("*HOSTAUTH", hostname="r.test", username="u", password="s" * 200))
    assert "s" * 200 not in str(error)
    error = refused(d, ListEntry("*NEAR", hostname="x.test", password="secret"))
    assert "secret" not in str(error)


def test_password_is_kept_out_of_repr():
    entry = ListEntry("*HOSTAUTH", hostname="r.test", username="u", password="secret")
    assert "secret" not in repr(entry)


# -- IPv4 masks and IPv6 prefixes ---------------------------------------------


@pytest.mark.parametrize(
    ("mask", "prefix"),
    [
        ("255.255.255.255", 32),
        ("255.255.255.0", 24),
        ("255.255.240.0", 20),
        ("255.0.0.0", 8),
        ("0.0.0.0", 0),
        ("24", 24),
        ("/16", 16),
    ],
)
def test_ipv4_masks(d, mask, prefix):
    entry = d.add_list_entry(ListEntry("*ACCEPT", intnetadr="10.20.30.40", subnetmask=mask))
    network = ipaddress.ip_network(f"10.20.30.40/{prefix}", strict=False)
    assert entry.subnetmask == str(network.netmask)
    assert d.address_listed("*ACCEPT", str(network.network_address))
    assert d.address_listed("*ACCEPT", str(network.broadcast_address))
    if prefix:
        assert not d.address_listed("*ACCEPT", str(network.network_address - 1))
    if prefix > 8:
        assert not d.address_listed("*ACCEPT", str(network.broadcast_address + 1))


@pytest.mark.parametrize(
    "mask", ["255.0.255.0", "0.0.255.255", "255.255.255.1", "33", "-1", "1.2.3", "64x", "²"]
)
def test_ipv4_masks_must_be_contiguous_masks_or_lengths(d, mask):
    error = refused(d, ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask=mask))
    assert error.field == "subnetmask" and "contiguous" in error.problem


def test_ipv6_prefixes(d):
    d.add_list_entry(ListEntry("*REJECT", intnetadr="2001:db8:1::", subnetmask="48"))
    d.add_list_entry(ListEntry("*REJECT", intnetadr="2001:db8:2::5"))
    assert d.address_listed("*REJECT", "2001:db8:1:ffff::1")
    assert not d.address_listed("*REJECT", "2001:db8:3::1")
    assert d.address_listed("*REJECT", "2001:DB8:2::5")
    assert not d.address_listed("*REJECT", "2001:db8:2::6")
    assert not d.address_listed("*REJECT", "192.0.2.1")


@pytest.mark.parametrize("mask", ["129", "255.255.0.0", "ffff::"])
def test_ipv6_prefix_is_a_length(d, mask):
    error = refused(d, ListEntry("*REJECT", intnetadr="2001:db8::", subnetmask=mask))
    assert error.field == "subnetmask" and "prefix length 0-128" in error.problem


def test_accept_and_reject_lists_are_separate(d):
    d.add_list_entry(ListEntry("*ACCEPT", intnetadr="192.0.2.0", subnetmask="24"))
    assert d.address_listed("*ACCEPT", "192.0.2.9")
    assert not d.address_listed("*REJECT", "192.0.2.9")
    assert d.address_listed("*accept", "192.0.2.9")
    with pytest.raises(DirectoryError):
        d.address_listed("*NEAR", "192.0.2.9")


def test_mapped_client_addresses_match_ipv4_entries(d):
    d.add_list_entry(ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="255.255.255.0"))
    assert d.address_listed("*REJECT", "::ffff:192.0.2.1")
    assert d.address_listed("*REJECT", "::FFFF:c000:0201")
    assert not d.address_listed("*REJECT", "::ffff:192.0.3.1")
    assert not d.address_listed("*REJECT", "::192.0.2.1")


def test_mapped_addresses_are_written_as_ipv4_in_entries(d):
    error = refused(d, ListEntry("*REJECT", intnetadr="::ffff:192.0.2.1"))
    assert "192.0.2.1 itself" in error.problem


@pytest.mark.parametrize("ip", ["", "junk", "192.0.2", "300.1.1.1", "[::1", None, 3232235521])
def test_unreadable_client_addresses_are_in_no_list(d, ip):
    d.add_list_entry(ListEntry("*REJECT", intnetadr="0.0.0.0", subnetmask="0"))
    d.add_list_entry(ListEntry("*REJECT", intnetadr="::", subnetmask="0"))
    assert d.address_listed("*REJECT", ip) is False


def test_client_address_forms(d):
    d.add_list_entry(ListEntry("*ACCEPT", intnetadr="fe80::", subnetmask="10"))
    assert d.address_listed("*ACCEPT", "fe80::1%eth0")
    assert d.address_listed("*ACCEPT", "[fe80::1]")


def test_ipv4_matching_agrees_with_ipaddress(d):
    networks = [
        ipaddress.ip_network(n)
        for n in ("10.0.0.0/8", "10.1.0.0/16", "172.16.0.0/12", "192.0.2.128/25", "198.51.100.7/32")
    ]
    for network in networks:
        d.add_list_entry(
            ListEntry(
                "*REJECT", intnetadr=str(network.network_address), subnetmask=str(network.netmask)
            )
        )

    @settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(0, 2**32 - 1), st.booleans())
    def check(number: int, mapped: bool) -> None:
        address = ipaddress.IPv4Address(number)
        client = f"::ffff:{address}" if mapped else str(address)
        expected = any(address in network for network in networks)
        assert d.address_listed("*REJECT", client) is expected

    check()


# -- near domains, ETRN, host sign-on, filters --------------------------------


def test_near_domains_cover_their_subdomains(d):
    d.add_list_entry(ListEntry("*NEAR", hostname="Example.com"))
    assert d.near_domain("example.com")
    assert d.near_domain("EXAMPLE.COM.")
    assert d.near_domain("x.example.com")
    assert d.near_domain("a.b.Example.Com")
    assert not d.near_domain("notexample.com")
    assert not d.near_domain("example.com.evil.test")
    assert not d.near_domain("com")
    assert not d.near_domain("")
    assert not d.near_domain(None)


def test_no_near_domains(d):
    assert not d.near_domain("example.com")


def test_etrn_by_host_name_or_address(d):
    d.add_list_entry(ListEntry("*ETRNSVR", hostname="backup.example.com"))
    d.add_list_entry(ListEntry("*ETRNSVR", intnetadr="192.0.2.10"))
    d.add_list_entry(ListEntry("*ETRNSVR", hostname="2001:db8::10"))
    assert d.etrn_allowed("Backup.Example.COM.")
    assert d.etrn_allowed("192.0.2.10")
    assert d.etrn_allowed("::ffff:192.0.2.10")
    assert d.etrn_allowed("2001:DB8:0::10")
    assert not d.etrn_allowed("other.example.com")
    assert not d.etrn_allowed("192.0.2.11")
    assert not d.etrn_allowed(None)


def test_hostauth_lookup(d):
    d.add_list_entry(
        ListEntry("*HOSTAUTH", hostname="relay.isp.test", username="me", password="pw")
    )
    d.add_list_entry(ListEntry("*HOSTAUTH", hostname="192.0.2.25", username="me2", password="pw2"))
    assert d.hostauth("RELAY.isp.test") == ("me", "pw")
    assert d.hostauth("relay.isp.test.") == ("me", "pw")
    assert d.hostauth("[192.0.2.25]") == ("me2", "pw2")
    assert d.hostauth("isp.test") is None
    assert d.hostauth("x.relay.isp.test") is None


def test_filters_by_type(d):
    assert d.filters() == {t: [] for t in dirmod.FILTER_TYPES}
    d.add_list_entry(ListEntry("*FTRSUBJECT", ftrdata="ILOVEYOU"))
    d.add_list_entry(ListEntry("*FTRFILNAME", ftrdata="*.vbs"))
    d.add_list_entry(ListEntry("*FTRFILNAME", ftrdata="lovebug.*"))
    d.add_list_entry(ListEntry("*FTRTYPE", ftrdata="image/*"))
    d.add_list_entry(ListEntry("*FTRORIGIN", ftrdata="*@us.ibm.com"))
    assert d.filters() == {
        "*FTRSUBJECT": ["ILOVEYOU"],
        "*FTRORIGIN": ["*@us.ibm.com"],
        "*FTRFILNAME": ["*.vbs", "lovebug.*"],
        "*FTRTYPE": ["image/*"],
    }
    d.filters()["*FTRTYPE"].append("changed")
    assert d.filters()["*FTRTYPE"] == ["image/*"]


@pytest.mark.parametrize(
    ("list_type", "value", "pattern"),
    [
        ("*FTRFILNAME", "LoveBug.VBS", "*.vbs"),
        ("*FTRFILNAME", ".vbs", None),
        ("*FTRFILNAME", "x.vbs.txt", None),
        ("*FTRTYPE", "image/jpg", "image/*"),
        ("*FTRTYPE", "image/", None),
        ("*FTRTYPE", "text/plain", None),
        ("*FTRORIGIN", "joe@US.ibm.com", "*@us.ibm.com"),
        ("*FTRORIGIN", "joe@uk.ibm.com", None),
        ("*FTRSUBJECT", "iloveyou", "ILOVEYOU"),
        ("*FTRSUBJECT", "Re: ILOVEYOU", None),
        ("*FTRSUBJECT", "a.b", None),
    ],
)
def test_filter_wildcards_stand_for_one_or_more_characters(d, list_type, value, pattern):
    d.add_list_entry(ListEntry("*FTRFILNAME", ftrdata="*.vbs"))
    d.add_list_entry(ListEntry("*FTRTYPE", ftrdata="image/*"))
    d.add_list_entry(ListEntry("*FTRORIGIN", ftrdata="*@us.ibm.com"))
    d.add_list_entry(ListEntry("*FTRSUBJECT", ftrdata="ILOVEYOU"))
    d.add_list_entry(ListEntry("*FTRSUBJECT", ftrdata="a+b"))
    assert d.filter_match(list_type, value) == pattern


# -- duplicates and removal ---------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (
            ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="255.255.255.0"),
            ListEntry("*REJECT", intnetadr="192.0.2.99", subnetmask="24"),
        ),
        (
            ListEntry("*ACCEPT", intnetadr="2001:db8::1"),
            ListEntry("*ACCEPT", intnetadr="2001:DB8::1"),
        ),
        (ListEntry("*NEAR", hostname="example.com"), ListEntry("*NEAR", hostname="EXAMPLE.com.")),
        (
            ListEntry("*DOMAIN", intnetadr="192.0.2.1", hostname="a.test"),
            ListEntry("*DOMAIN", intnetadr="192.0.2.1", hostname="b.test"),
        ),
        (ListEntry("*ETRNSVR", intnetadr="192.0.2.1"), ListEntry("*ETRNSVR", hostname="192.0.2.1")),
        (ListEntry("*FTRFILNAME", ftrdata="*.VBS"), ListEntry("*FTRFILNAME", ftrdata="*.vbs")),
        (
            ListEntry("*HOSTAUTH", hostname="r.test", username="a", password="1"),
            ListEntry("*HOSTAUTH", hostname="R.test", username="b", password="2"),
        ),
    ],
)
def test_duplicates_are_refused(d, first, second):
    d.add_list_entry(first)
    error = refused(d, second)
    assert "is already in the" in error.problem
    assert len(d.list_entries()) == 1


def test_same_address_different_lists_or_masks_are_not_duplicates(d):
    d.add_list_entry(ListEntry("*ACCEPT", intnetadr="192.0.2.0", subnetmask="24"))
    d.add_list_entry(ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="24"))
    d.add_list_entry(ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="25"))
    d.add_list_entry(ListEntry("*SVRBIND", intnetadr="192.0.2.0"))
    assert len(d.list_entries()) == 4


def test_remove_exactly_one_entry(d):
    d.add_list_entry(ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="24"))
    d.add_list_entry(ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="25"))
    d.add_list_entry(ListEntry("*REJECT", intnetadr="198.51.100.0", subnetmask="24"))
    d.add_list_entry(ListEntry("*ACCEPT", intnetadr="198.51.100.0", subnetmask="24"))
    removed = d.remove_list_entry("*reject", intnetadr="192.0.2.1", subnetmask="255.255.255.128")
    assert removed == ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="255.255.255.128")
    assert d.remove_list_entry("*REJECT", intnetadr="198.51.100.0").subnetmask == "255.255.255.0"
    assert [(e.type, e.intnetadr, e.subnetmask) for e in d.list_entries()] == [
        ("*ACCEPT", "198.51.100.0", "255.255.255.0"),
        ("*REJECT", "192.0.2.0", "255.255.255.0"),
    ]
    assert not d.address_listed("*REJECT", "198.51.100.1")
    assert d.address_listed("*ACCEPT", "198.51.100.1")


def test_remove_by_address_alone_must_be_unambiguous(d):
    d.add_list_entry(ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="24"))
    d.add_list_entry(ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="25"))
    with pytest.raises(DirectoryError) as info:
        d.remove_list_entry("*REJECT", intnetadr="192.0.2.0")
    assert info.value.field == "subnetmask"
    assert "2 times" in info.value.problem and "255.255.255.128" in info.value.problem
    assert len(d.list_entries()) == 2


@pytest.mark.parametrize(
    ("list_type", "fields", "field", "needle"),
    [
        ("*REJECT", {"intnetadr": "203.0.113.0"}, "intnetadr", "is not in the *REJECT list"),
        ("*REJECT", {}, "intnetadr", "IPv4 or IPv6"),
        ("*NEAR", {"hostname": "other.test"}, "hostname", "is not in the *NEAR list"),
        ("*NEAR", {"hostname": "x.example.com"}, "hostname", "is not in"),
        ("*DOMAIN", {"intnetadr": "192.0.2.1", "hostname": "b.test"}, "intnetadr", "is not in"),
        ("*HOSTAUTH", {"hostname": "r.test", "username": "other"}, "hostname", "is not in"),
        ("*HOSTAUTH", {"hostname": "r.test", "password": "pw"}, "password", "is not allowed"),
        ("*ETRNSVR", {}, "hostname", "unless INTNETADR"),
        ("*FTRTYPE", {"ftrdata": "audio/*"}, "ftrdata", "is not in"),
        ("*FTRTYPE", {"ftrdata": "image/*", "hostname": "x.test"}, "hostname", "not allowed"),
    ],
)
def test_remove_refuses_what_names_no_entry(d, list_type, fields, field, needle):
    d.add_list_entry(ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="24"))
    d.add_list_entry(ListEntry("*NEAR", hostname="example.com"))
    d.add_list_entry(ListEntry("*DOMAIN", intnetadr="192.0.2.1", hostname="a.test"))
    d.add_list_entry(ListEntry("*HOSTAUTH", hostname="r.test", username="joe", password="pw"))
    d.add_list_entry(ListEntry("*FTRTYPE", ftrdata="image/*"))
    with pytest.raises(DirectoryError) as info:
        d.remove_list_entry(list_type, **fields)
    assert info.value.field == field and needle in info.value.problem
    assert len(d.list_entries()) == 5


def test_remove_by_key_with_agreeing_details(d):
    d.add_list_entry(ListEntry("*HOSTAUTH", hostname="r.test", username="joe", password="pw"))
    d.add_list_entry(ListEntry("*FTRTYPE", ftrdata="image/*"))
    d.add_list_entry(ListEntry("*ETRNSVR", hostname="192.0.2.5"))
    assert d.remove_list_entry("*HOSTAUTH", hostname="R.TEST", username="joe").username == "joe"
    assert d.remove_list_entry("*FTRTYPE", ftrdata="IMAGE/*").ftrdata == "image/*"
    assert d.remove_list_entry("*ETRNSVR", intnetadr="192.0.2.5").hostname == "192.0.2.5"
    assert d.list_entries() == []
    assert d.hostauth("r.test") is None


def test_remove_takes_only_list_keywords(d):
    with pytest.raises(TypeError):
        d.remove_list_entry("*NEAR", domain="example.com")


def test_listing_by_type_in_the_order_added(d):
    d.add_list_entry(ListEntry("*NEAR", hostname="b.test"))
    d.add_list_entry(ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="24"))
    d.add_list_entry(ListEntry("*NEAR", hostname="a.test"))
    assert [e.hostname for e in d.list_entries("*near")] == ["b.test", "a.test"]
    assert [e.type for e in d.list_entries()] == ["*REJECT", "*NEAR", "*NEAR"]
    with pytest.raises(DirectoryError):
        d.list_entries("*BOGUS")


# -- the per-process cache ----------------------------------------------------


def test_a_change_by_another_directory_is_seen_at_the_next_check(db_path):
    checker, editor = _open(db_path), _open(db_path)
    try:
        assert not checker.address_listed("*REJECT", "192.0.2.1")
        assert not checker.near_domain("example.com")
        editor.add_list_entry(ListEntry("*REJECT", intnetadr="192.0.2.0", subnetmask="24"))
        editor.add_list_entry(ListEntry("*NEAR", hostname="example.com"))
        assert checker.address_listed("*REJECT", "192.0.2.1")
        assert checker.near_domain("x.example.com")
        editor.remove_list_entry("*REJECT", intnetadr="192.0.2.0")
        assert not checker.address_listed("*REJECT", "192.0.2.1")
    finally:
        checker.close()
        editor.close()


def test_a_change_made_outside_twistmail_is_seen(d, db_path):
    assert not d.etrn_allowed("backup.test")
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute(
        "INSERT INTO smtp_list (type, entrykey, hostname) VALUES ('*ETRNSVR', 'backup.test', ?)",
        ("backup.test",),
    )
    conn.close()
    assert d.etrn_allowed("backup.test")


def test_a_recreated_database_is_not_answered_from_the_old_one(db_path):
    first = _open(db_path)
    first.add_list_entry(ListEntry("*NEAR", hostname="old.test"))
    assert first.near_domain("old.test")
    first.close()
    for path in db_path.parent.glob(db_path.name + "*"):
        path.unlink()
    second = _open(db_path)
    try:
        second.add_list_entry(ListEntry("*NEAR", hostname="new.test"))
        assert second.near_domain("new.test")
        assert not second.near_domain("old.test")
    finally:
        second.close()


# -- the commands -------------------------------------------------------------


@pytest.fixture
def cfg(tmp_path: Path) -> str:
    path = tmp_path / "twistmail.toml"
    path.write_text(CONFIG)
    return str(path)


def tm(capsys: pytest.CaptureFixture, cfg: str, *args: str) -> tuple[int, str, str]:
    rc = run(["--config", cfg, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cl_addsmtple_reject(cfg, capsys, tmp_path):
    rc, out, err = tm(
        capsys,
        cfg,
        "cl",
        "ADDSMTPLE TYPE(*REJECT) INTNETADR('192.0.2.0') SUBNETMASK('255.255.255.0')",
    )
    assert (rc, err) == (0, ""), err
    assert out == "SMTP list entry *REJECT 192.0.2.0 255.255.255.0 added.\n"
    with _open(tmp_path / "var" / "directory.sqlite") as d:
        assert d.address_listed("*REJECT", "192.0.2.200")


def test_cl_positional_type_and_removal(cfg, capsys):
    rc, out, err = tm(capsys, cfg, "cl", "ADDSMTPLE *NEAR HOSTNAME('example.com')")
    assert rc == 0, err
    rc, out, err = tm(capsys, cfg, "cl", "RMVSMTPLE TYPE(*NEAR) HOSTNAME(EXAMPLE.COM)")
    assert rc == 0, err
    assert "removed" in out
    rc, out, err = tm(capsys, cfg, "cl", "RMVSMTPLE TYPE(*NEAR) HOSTNAME(EXAMPLE.COM)")
    assert rc == 2 and "HOSTNAME: 'EXAMPLE.COM' is not in the *NEAR list" in err


def test_wrksmtple_table_and_json_hide_the_password(cfg, capsys):
    for args in (
        ["--type", "*accept", "--intnetadr", "10.0.0.0", "--subnetmask", "8"],
        [
            "--type",
            "*HOSTAUTH",
            "--hostname",
            "relay.isp.test",
            "--username",
            "me",
            "--password",
            "topsecret",
        ],
        ["--type", "*FtrType", "--ftrdata", "image/*"],
    ):
        rc, out, err = tm(capsys, cfg, "addsmtple", *args)
        assert rc == 0, err
        assert "topsecret" not in out
    rc, out, err = tm(capsys, cfg, "wrksmtple")
    assert rc == 0 and "topsecret" not in out
    lines = out.splitlines()
    for heading in (
        "Type",
        "Internet address",
        "Subnet mask",
        "Host name",
        "Filter data",
        "User name",
        "Password",
    ):
        assert heading in lines[0]
    assert len(lines) == 4
    assert "*****" in lines[3] and "relay.isp.test" in lines[3]
    rc, out, err = tm(capsys, cfg, "wrksmtple", "--json")
    rows = json.loads(out)
    assert [r["type"] for r in rows] == ["*ACCEPT", "*FTRTYPE", "*HOSTAUTH"]
    assert rows[0]["subnetmask"] == "255.0.0.0" and rows[0]["password"] is None
    assert rows[2] == {
        "type": "*HOSTAUTH",
        "intnetadr": None,
        "subnetmask": None,
        "hostname": "relay.isp.test",
        "ftrdata": None,
        "username": "me",
        "password": "*****",
    }
    rc, out, err = tm(capsys, cfg, "wrksmtple", "--type", "*accept")
    lines = out.splitlines()
    assert len(lines) == 2 and "Filter data" not in lines[0] and "10.0.0.0" in lines[1]


def test_password_from_stdin(cfg, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    rc, out, err = tm(
        capsys,
        cfg,
        "addsmtple",
        "--type",
        "*HOSTAUTH",
        "--hostname",
        "r.test",
        "--username",
        "me",
        "--password",
        "-",
    )
    assert rc == 0, err
    with _open(tmp_path / "var" / "directory.sqlite") as d:
        assert d.hostauth("r.test") == ("me", "from stdin")


def test_empty_listing(cfg, capsys):
    rc, out, err = tm(capsys, cfg, "wrksmtple")
    assert rc == 0 and out.strip() == "(no SMTP list entries)"
    rc, out, err = tm(capsys, cfg, "wrksmtple", "--json")
    assert json.loads(out) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["addsmtple", "--type", "reject", "--intnetadr", "192.0.2.0"],
            "--type: 'reject' is not allowed; allowed: *ACCEPT, *REJECT, *NEAR",
        ),
        (["addsmtple", "--type", "*REJECT"], "--intnetadr: is required with type"),
        (
            ["addsmtple", "--type", "*REJECT", "--intnetadr", "192.0.2.0", "--ftrdata", "x"],
            "--ftrdata: 'x' is not allowed with type *REJECT; allowed: --intnetadr, --subnetmask",
        ),
        (
            [
                "addsmtple",
                "--type",
                "*REJECT",
                "--intnetadr",
                "192.0.2.0",
                "--subnetmask",
                "255.0.255.0",
            ],
            "--subnetmask: '255.0.255.0' is not allowed",
        ),
        (["addsmtple", "--type", "*ETRNSVR"], "unless --intnetadr is given"),
        (["addsmtple", "--type", "*NEAR", "--hostname", "bad host"], "--hostname: 'bad host'"),
        (["addsmtple", "--type", "*FTRTYPE", "--ftrdata", "*"], "--ftrdata: '*' is not allowed"),
        (
            ["addsmtple", "--type", "*HOSTAUTH", "--hostname", "r.test", "--username", "me"],
            "--password: is required with type *HOSTAUTH",
        ),
        (["addsmtple"], "--type"),
        (["rmvsmtple", "--type", "*NEAR"], "--hostname: is required with type *NEAR"),
        (
            ["rmvsmtple", "--type", "*NEAR", "--hostname", "nowhere.test"],
            "--hostname: 'nowhere.test' is not in the *NEAR list",
        ),
        (["wrksmtple", "--type", "*NOPE"], "--type: '*NOPE' is not allowed; allowed:"),
        (
            ["cl", "ADDSMTPLE TYPE(*REJECT) INTNETADR('192.0.2.0') IP6PFX(64)"],
            "ADDSMTPLE has no keyword IP6PFX",
        ),
    ],
)
def test_mistakes_are_one_line_and_exit_2(cfg, capsys, args, needle):
    rc, out, err = tm(capsys, cfg, *args)
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1


def test_a_refused_cli_password_is_not_echoed(cfg, capsys):
    rc, out, err = tm(
        capsys, cfg, "addsmtple", "--type", "*NEAR", "--hostname", "x.test", "--password", "hush"
    )
    assert rc == 2 and "hush" not in err and "--password" in err


def test_help_says_changes_apply_at_once(cfg, capsys):
    for command in ("addsmtple", "rmvsmtple"):
        rc, out, err = tm(capsys, cfg, command, "--help")
        assert rc == 0 and "Applies at once" in out and "no daemon is needed" in out


def test_filter_wildcards_match_in_linear_time(d):
    """A crafted subject must not hold a QMSF job: these took minutes as regular
    expressions with several .+ each."""
    d.add_list_entry(ListEntry("*FTRSUBJECT", ftrdata="*free*money*"))
    d.add_list_entry(ListEntry("*FTRSUBJECT", ftrdata="*a*a*a*b"))
    assert d.filter_match("*FTRSUBJECT", "free " * 20_000) is None  # 20 s as a regex
    assert d.filter_match("*FTRSUBJECT", "a" * 300) is None  # 10 s as a regex
    assert d.filter_match("*FTRSUBJECT", "xfree money!") == "*free*money*"


@given(pattern=st.text(alphabet="ab.*", max_size=6), value=st.text(alphabet="ab.", max_size=8))
def test_filter_wildcards_mean_one_or_more_characters(pattern, value):
    from twistmail.directory import _Wildcard

    expected = re.fullmatch(".+".join(re.escape(p) for p in pattern.split("*")), value,
                            re.IGNORECASE | re.DOTALL) is not None
    assert _Wildcard(pattern).fullmatch(value) == expected


def test_an_accept_entry_for_every_address_is_warned_of(cfg, capsys):
    rc, out, err = tm(capsys, cfg, "addsmtple", "--type", "*ACCEPT", "--intnetadr", "0.0.0.0",
                      "--subnetmask", "0.0.0.0")
    assert rc == 0 and "added" in out and "anyone on the Internet may relay" in err
    rc, out, err = tm(capsys, cfg, "addsmtple", "--type", "*ACCEPT", "--intnetadr",
                      "192.0.2.0", "--subnetmask", "255.255.255.0")
    assert rc == 0 and err == ""


def test_bind_and_domain_entries_say_they_are_kept_only(cfg, capsys):
    """They were added without a word, and changed nothing."""
    rc, out, err = tm(capsys, cfg, "addsmtple", "--type", "*SVRBIND", "--intnetadr", "127.0.0.5")
    assert rc == 0 and "added" in out
    assert "note: *SVRBIND entries are kept but not used" in err and "[listen]" in err
    rc, out, err = tm(capsys, cfg, "addsmtple", "--type", "*DOMAIN", "--intnetadr", "127.0.0.5",
                      "--hostname", "example.test")
    assert rc == 0 and "note: *DOMAIN entries are kept but not used" in err
