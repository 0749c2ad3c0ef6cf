"""Who may connect: the reject list, block lists and abuse limits, with real sockets."""

from __future__ import annotations

import contextlib
import poplib
import smtplib
import socket
import ssl
import time
from pathlib import Path

import pytest
from appliance import read_reply

HERE = Path(__file__).parent


def connect_from(a, source: str, name: str = "smtp") -> socket.socket:
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(a.addr(name))
    return s


def test_reject_list_refuses_before_any_job(appliance):
    a = appliance
    rc, out, err = a.cli("addsmtple", "--type", "*REJECT", "--intnetadr", "127.0.0.2")
    assert rc == 0, err

    def refused() -> bool:
        s = connect_from(a, "127.0.0.2")
        line = read_reply(s)
        s.close()
        return line.startswith(b"554 5.7.1 ")

    a.wait_for(refused, 10, "the reject list to apply")
    s = connect_from(a, "127.0.0.1")
    assert read_reply(s).startswith(b"220 ")
    s.close()
    entries = [e for e in a.journal("9S")]
    assert entries and entries[0]["ip"] == "127.0.0.2"
    assert a.control("dspactpj", pgm="QTMSSRCP")["accepted"] >= 1  # 127.0.0.1 only
    # POP is not subject to the SMTP reject list.
    p = socket.create_connection(a.addr("pop3"), timeout=10)
    assert read_reply(p).startswith(b"+OK")
    p.close()


def test_pop_before_smtp_overrides_the_reject_list(make_appliance):
    a = make_appliance(smtp={"ovrrjtcnnl": "*YES", "popwdw": 15, "alwrly": "*POPWDW"}).start()
    a.user("SAM")
    a.cli("addsmtple", "--type", "*REJECT", "--intnetadr", "127.0.0.0", "--subnetmask",
          "255.0.0.0")
    time.sleep(3)
    s = connect_from(a, "127.0.0.5")
    assert read_reply(s).startswith(b"554 ")
    s.close()
    p = connect_from(a, "127.0.0.5", "pop3")
    read_reply(p)
    p.sendall(b"USER sam\r\nPASS secret\r\nQUIT\r\n")
    assert [read_reply(p)[:3] for _ in range(3)] == [b"+OK"] * 3
    p.close()
    s = connect_from(a, "127.0.0.5")
    assert read_reply(s).startswith(b"220 ")
    s.close()


def test_block_list_lookup(make_appliance, dns):
    port = dns({"2.0.0.127.bl.test": {"A": ["127.0.0.2"]},
                "3.0.0.127.bl.test": {"A": ["127.255.255.254"]}})
    a = make_appliance(smtp={"rblsvr": ["bl.test"], "nameservers": [f"127.0.0.1:{port}"]}
                       ).start()
    s = connect_from(a, "127.0.0.2")
    assert read_reply(s).startswith(b"554 5.7.1 mail.example.test Connection refused: "
                                    b"127.0.0.2 is listed by bl.test")
    s.close()
    # "Query refused" answers (127.255.255.x) never block; unlisted passes.
    for source in ("127.0.0.3", "127.0.0.1"):
        s = connect_from(a, source)
        assert read_reply(s).startswith(b"220 "), source
        s.close()
    [entry] = a.journal("9S")
    assert entry["zone"] == "bl.test"
    # The submission ports ask no block list: their clients sign on.
    for port in ("submission", "smtps"):
        s = connect_from(a, "127.0.0.2", port)
        if port == "smtps":
            s = ssl._create_unverified_context().wrap_socket(s)
        assert read_reply(s).startswith(b"220 "), port
        s.close()


def test_a_block_list_that_does_not_answer_is_said_once_in_the_log(make_appliance):
    """It let every client in with no word anywhere: the administrator could
    not tell that the block list no longer checked anyone."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # reads nothing, answers nothing
    silent.bind(("127.0.0.1", 0))
    try:
        a = make_appliance(smtp={"rblsvr": ["bl.test"],
                                 "nameservers": [f"127.0.0.1:{silent.getsockname()[1]}"]}
                           ).start()
        for _ in range(2):
            s = connect_from(a, "127.0.0.2")
            s.settimeout(20)
            assert read_reply(s).startswith(b"220 ")  # let in, as other MTAs do
            s.close()
    finally:
        silent.close()
    assert a.log_text().count("block list bl.test does not answer (no answer)") == 1


def test_flood_from_one_address_leaves_others_served(make_appliance):
    a = make_appliance(limits={"maxconnperip": 4},  # below MAXJOBS, as the default
                       prestart__QTMSSRCP={"inljobs": 2, "threshold": 1, "adljobs": 2,
                                           "maxjobs": 8}).start()
    flood = []
    refused = 0
    for _ in range(500):
        s = connect_from(a, "127.0.0.9")
        flood.append(s)
    for s in flood:
        s.settimeout(0.2)
        try:
            if s.recv(200).startswith(b"421 4.7.0"):
                refused += 1
        except TimeoutError:
            pass  # admitted: it holds or waits for a job
    print(f"flood: {refused} of 500 refused by the controller")
    assert refused >= 490
    t0 = time.monotonic()
    other = connect_from(a, "127.0.0.3")
    assert read_reply(other).startswith(b"220 ")
    print(f"another client greeted after {1000 * (time.monotonic() - t0):.1f} ms")
    other.close()
    assert a.count("QTMSSRCP") <= 8
    limits = a.journal("JL")
    assert 1 <= len(limits) <= 2  # once per interval and setting, not once per refusal
    assert limits[0]["setting"] in ("limits.maxconnperip", "limits.maxconnrate")
    for s in flood:
        s.close()


def fail_pop_sign_ons(a, n: int) -> None:
    """``n`` POP sessions with a wrong password; the last is ended at the limit."""
    for _ in range(n):
        p = poplib.POP3(*a.addr("pop3"), timeout=30)
        p.user("sam")
        with pytest.raises(poplib.error_proto):
            p.pass_("wrong")
        with contextlib.suppress(poplib.error_proto, OSError):
            p.quit()


def test_failed_sign_ons_per_address(make_appliance):
    a = make_appliance(limits={"maxauthfail": 2}).start()
    a.user("SAM")
    fail_pop_sign_ons(a, 2)
    s = socket.create_connection(a.addr("smtp"), timeout=10)
    assert read_reply(s).startswith(b"421 4.7.0 mail.example.test too many failed sign-ons")
    s.close()
    # Other addresses are not affected.
    with smtplib.SMTP(*a.addr("smtp"), timeout=30, source_address=("127.0.0.4", 0)) as c:
        assert c.noop()[0] == 250


def test_sessions_open_when_the_limit_is_reached_end_too(make_appliance):
    """MAXAUTHFAIL counted only at the next connection: each session already open
    went on guessing.  At the limit, those not signed on are ended."""
    a = make_appliance(limits={"maxauthfail": 2}).start()
    a.user("SAM")
    waiting = connect_from(a, "127.0.0.1")  # a guesser's other session, idle
    assert read_reply(waiting).startswith(b"220 ")
    pop = connect_from(a, "127.0.0.1", "pop3")
    assert read_reply(pop).startswith(b"+OK")
    fail_pop_sign_ons(a, 2)
    assert read_reply(waiting).startswith(b"421 4.7.0 mail.example.test Too many failed")
    assert read_reply(pop).startswith(b"-ERR [SYS/TEMP] Too many failed sign-ons")
    waiting.close()
    pop.close()


def test_block_lists_without_name_servers_ask_the_system_s():
    """An empty [smtp] nameservers means /etc/resolv.conf's servers; the
    resolver used to be made with an argument Twisted does not take, so
    setting RBLSVR alone stopped the daemon at its next start."""
    from twisted.internet.task import Clock
    from twisted.names import client

    from twistmail.policy.connection import make_resolver

    clock = Clock()
    resolver = make_resolver(clock, ())
    assert isinstance(resolver, client.Resolver)
    for call in clock.getDelayedCalls():  # its re-read of resolv.conf
        call.cancel()
    assert make_resolver(clock, ("127.0.0.1:5353", "[::1]")).servers == [
        ("127.0.0.1", 5353), ("::1", 53)]


def test_a_client_at_its_session_limit_waits_a_moment_for_one_to_end(tmp_path):
    """A client that closes and connects again at once was refused while its job
    had not yet reported the end of the last session: under the limit, refused."""
    from twisted.internet.task import Clock

    from twistmail import config as configmod
    from twistmail.policy.connection import PERIP_GRACE, ConnectionPolicy, Verdict

    path = tmp_path / "twistmail.toml"
    path.write_text(f'[system]\ndatadir = "{tmp_path}"\n[limits]\nmaxconnperip = 2\n')
    clock = Clock()
    policy = ConnectionPolicy(clock, configmod.load(path), None, None)
    assert policy.check("192.0.2.1", smtp=True) is None
    assert policy.check("192.0.2.1", smtp=True) is None
    third = policy.check("192.0.2.1", smtp=True)
    fourth = policy.check("192.0.2.1", smtp=True)
    flood = policy.check("192.0.2.1", smtp=True)  # as many wait as the limit: refused
    assert isinstance(flood, Verdict) and flood.reply.startswith("421 4.7.0 ")
    for _ in range(policy.anvil.settings.maxauthfail):
        policy.anvil.auth_failed("192.0.2.1")
    locked = policy.check("192.0.2.1", smtp=True)  # another limit refuses: no wait for it
    assert isinstance(locked, Verdict) and "failed sign-ons" in locked.reply
    policy.anvil.failures.clear()
    assert policy.check("192.0.2.2", smtp=True) is None  # other clients are not held
    got = []
    third.addCallback(got.append)
    fourth.addCallback(got.append)
    policy.closed("192.0.2.1")  # the end of a session reaches the controller
    assert got == []  # not from inside the report of that end
    clock.advance(0)
    assert got == [None]  # in: the third, in its turn
    clock.advance(PERIP_GRACE)
    assert len(got) == 2 and isinstance(got[1], Verdict)  # no session ended for it
    assert not policy.room and not clock.getDelayedCalls()


def test_clients_reconnecting_at_once_under_the_limit_are_not_refused(make_appliance):
    """Six connections at a time, each ended (221) before the next: never ten open."""
    import collections
    import threading

    a = make_appliance(limits={"maxconnperip": 10}).start()
    seen: collections.Counter[bytes] = collections.Counter()
    lock = threading.Lock()

    def client() -> None:
        for _ in range(15):
            with socket.create_connection(a.addr("smtp"), timeout=30) as s:
                greeting = read_reply(s)
                if greeting.startswith(b"220 "):
                    s.sendall(b"QUIT\r\n")
                    read_reply(s)
            with lock:
                seen[greeting[:9]] += 1

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {b"220 mail.": 90}


def test_a_connection_woken_as_a_pool_fails_is_not_left_in_its_queue(tmp_path):
    """The wake ran inside the pool's refusal of its waiting requests, before
    the entry was marked FAILED: the woken connection joined the queue of a
    pool that would never serve it, and its client lost a session for good."""
    from test_pool_start import Recorder
    from twisted.internet.task import Clock

    from twistmail import config as configmod
    from twistmail.config import PrestartEntry
    from twistmail.policy.connection import ConnectionPolicy
    from twistmail.prestart import pool as poolmod
    from twistmail.prestart.policy import Limits

    path = tmp_path / "twistmail.toml"
    path.write_text(f'[system]\ndatadir = "{tmp_path}"\n[limits]\nmaxconnperip = 2\n')
    clock = Clock()
    policy = ConnectionPolicy(clock, configmod.load(path), None, None)
    entry = PrestartEntry(inljobs=1, threshold=1, adljobs=1, maxjobs=1, wait="*YES")
    pool = poolmod.Pool(clock, "QTMSSRCP", entry, Limits(), "/dev/null", None, b"421 x\r\n")
    pool.launcher = Recorder()
    pool.session_ended = policy.closed
    pool.start()
    clock.advance(0)
    peers = []
    for _ in range(3):
        ours, theirs = socket.socketpair()
        peers.append(theirs)
        verdict = policy.check("192.0.2.9", smtp=True, rbl=False)
        if verdict is None:
            pool.submit(ours, "smtp", "192.0.2.9")
        else:
            verdict.addCallback(lambda v, s=ours: pool.submit(s, "smtp", "192.0.2.9")
                                if v is None else s.close())
    clock.advance(0)
    assert len(pool.waiting) == 2 and len(policy.room["192.0.2.9"]) == 1
    pool.boot_failures = Limits().boot_failure_limit  # its jobs keep dying before READY
    pool.evaluate()
    clock.advance(0)
    assert pool.status == "FAILED"
    assert not pool.waiting and not policy.anvil.active and not policy.room
    for s in peers:
        s.close()


def test_the_slot_a_session_frees_goes_to_the_connection_waiting_for_it(tmp_path):
    """A newcomer accepted in the same turn as the end of a session took the slot
    freed for the waiting connection, which was then refused 421."""
    from twisted.internet.task import Clock

    from twistmail import config as configmod
    from twistmail.policy.connection import ConnectionPolicy

    path = tmp_path / "twistmail.toml"
    path.write_text(f'[system]\ndatadir = "{tmp_path}"\n[limits]\nmaxconnperip = 1\n')
    clock = Clock()
    policy = ConnectionPolicy(clock, configmod.load(path), None, None)
    assert policy.check("192.0.2.1", smtp=True) is None
    waiting = policy.check("192.0.2.1", smtp=True)
    policy.closed("192.0.2.1")
    newcomer = policy.check("192.0.2.1", smtp=True)  # before the waiting one's turn
    got: dict[str, object] = {}
    waiting.addCallback(lambda v: got.setdefault("waiting", v))
    clock.advance(0)
    assert got == {"waiting": None}  # in
    assert newcomer is not None  # not in ahead of it: it waits, or is refused


def test_a_waiting_client_that_hung_up_gives_up_its_place(tmp_path):
    """Connections opened and dropped while waiting kept their places for their
    whole second: the next client was refused at once, or the freed slot lost."""
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from twistmail import config as configmod
    from twistmail.policy.connection import ConnectionPolicy, Verdict

    path = tmp_path / "twistmail.toml"
    path.write_text(f'[system]\ndatadir = "{tmp_path}"\n[limits]\nmaxconnperip = 2\n')
    clock = Clock()
    policy = ConnectionPolicy(clock, configmod.load(path), None, None)
    for _ in range(2):
        assert policy.check("192.0.2.1", smtp=True) is None
    dropped = [policy.check("192.0.2.1", smtp=True, gone=lambda: True) for _ in range(2)]
    live = policy.check("192.0.2.1", smtp=True, gone=lambda: False)
    assert isinstance(live, defer.Deferred)  # it waits, in the places the others left
    got: list[object] = []
    live.addCallback(got.append)
    for d in dropped:
        d.addCallback(lambda v: got.append(("dropped", v)))
    policy.closed("192.0.2.1")
    clock.advance(0)
    assert got.count(None) == 1  # the live one has the slot
    assert [v for v in got if isinstance(v, tuple)] and all(
        isinstance(v[1], Verdict) for v in got if isinstance(v, tuple))


def test_a_reject_list_that_cannot_be_read_is_said_once_not_a_traceback_a_second(tmp_path):
    """A directory locked by another program logged a critical traceback every
    few seconds; now one warning, and one line when it is read again."""
    import sqlite3

    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, capturedLogs
    from twisted.python.failure import Failure

    from twistmail import config as configmod
    from twistmail.policy.connection import ConnectionPolicy

    path = tmp_path / "twistmail.toml"
    path.write_text(f'[system]\ndatadir = "{tmp_path}"\n')
    policy = ConnectionPolicy(Clock(), configmod.load(path), None, None)
    with capturedLogs() as events:
        for _ in range(3):
            policy._not_read(Failure(sqlite3.OperationalError("database is locked")))
        policy._set_rejects([])
        policy._set_rejects([])
    said = [(e["log_level"], e.get("why")) for e in events]
    assert said == [(LogLevel.warn, "database is locked"), (LogLevel.info, None)]
