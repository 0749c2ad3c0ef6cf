"""The prestart pools with real job processes, real sockets and real clients."""

from __future__ import annotations

import os
import poplib
import signal
import smtplib
import socket
import ssl
import time

import pytest
from appliance import alive, read_reply, wait_gone


def hold(appliance, n: int, name: str = "smtp") -> list[socket.socket]:
    """Open n sessions and read their greetings, so n jobs are busy."""
    socks = []
    for _ in range(n):
        s = appliance.connect(name)
        assert read_reply(s).startswith(b"220" if "smtp" in name or name == "submission"
                                        else b"+OK")
        socks.append(s)
    return socks


def quit_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.sendall(b"QUIT\r\n")
        read_reply(s)
        s.close()


def test_initial_jobs_and_real_clients(appliance):
    assert appliance.count("QTMSSRCP") == 2
    assert appliance.count("QTPOPSRVP") == 1
    host, port = appliance.addr("smtp")
    with smtplib.SMTP(host, port, timeout=10) as s:
        code, banner = s.ehlo()
        assert code == 250 and s.has_extn("pipelining")
        assert s.noop()[0] == 250
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    host, port = appliance.addr("smtps")
    s = smtplib.SMTP_SSL(host, port, timeout=10, context=ctx)
    assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert s.quit()[0] == 221
    host, port = appliance.addr("pop3")
    p = poplib.POP3(host, port, timeout=10)
    assert p.getwelcome().startswith(b"+OK")
    assert "UIDL" in p.capa()
    assert p.quit().startswith(b"+OK")
    host, port = appliance.addr("pop3s")
    p = poplib.POP3_SSL(host, port, timeout=10, context=ctx)
    assert p.getwelcome().startswith(b"+OK")
    p.quit()
    uses = sum(r["uses"] for r in appliance.jobs("QTMSSRCP"))
    assert uses == 2
    appliance.wait_for(lambda: appliance.journal("JM"), 10, "bridge start entry")
    codes = {e["code"] for e in appliance.journal()}
    assert {"JG", "JP", "JS", "JM"} <= codes


def test_threshold_starts_additional_jobs(make_appliance):
    # INLJOBS 3, THRESHOLD 2: holding 2 leaves 1 available (< 2), so ADLJOBS 2 start.
    a = make_appliance(prestart__QTMSSRCP={"inljobs": 3, "threshold": 2, "adljobs": 2,
                                           "maxjobs": 10}).start()
    socks = hold(a, 1)
    time.sleep(0.5)
    assert a.count("QTMSSRCP") == 3  # 2 available: not below THRESHOLD
    socks += hold(a, 1)
    a.wait_for(lambda: a.count("QTMSSRCP") == 5, 10, "ADLJOBS more jobs")
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 3, 10, "new jobs ready")
    quit_all(socks)
    st = a.control("dspactpj", pgm="QTMSSRCP")
    assert st["jobs_peak"] == 5 and st["in_use_peak"] == 2 and st["accepted"] == 2


def test_wait_yes_queues_until_a_job_frees(make_appliance):
    a = make_appliance(prestart__QTMSSRCP={"inljobs": 2, "threshold": 1, "adljobs": 1,
                                           "maxjobs": 2, "wait": "*YES"}).start()
    busy = hold(a, 2)
    waiter = a.connect()
    # Well over the second from which a wait is journaled: the controller
    # may accept the connection a little after the client connected.
    waiter.settimeout(1.5)
    with pytest.raises(TimeoutError):
        waiter.recv(100)  # no greeting: it waits for a job
    a.wait_for(lambda: a.control("dspactpj", pgm="QTMSSRCP")["waiting_current"] == 1, 5)
    quit_all(busy[:1])
    assert read_reply(waiter, 10).startswith(b"220 ")
    quit_all([waiter, busy[1]])
    st = a.control("dspactpj", pgm="QTMSSRCP")
    assert st["rejected"] == 0 and st["accepted"] == 3 and st["average_wait"] > 0
    assert st["waiting_peak"] == 1 and st["jobs_peak"] == 2
    # A wait of a second or more is journaled when a job takes the request.
    [waited] = a.journal("JW")
    assert waited["waited"] >= 1.0 and waited["esd"].startswith("JW WAIT 127.0.0.1 ")


def test_clients_that_gave_up_waiting_take_no_job(make_appliance):
    a = make_appliance(prestart__QTMSSRCP={"inljobs": 1, "threshold": 1, "adljobs": 1,
                                           "maxjobs": 1, "wait": "*YES"}).start()
    busy = hold(a, 1)
    a.control("dspactpj", pgm="QTMSSRCP", reset=True)
    impatient = [a.connect() for _ in range(3)]
    a.wait_for(lambda: a.control("dspactpj", pgm="QTMSSRCP")["waiting_current"] == 3, 5)
    for s in impatient:
        s.close()
    patient = a.connect()
    # those who left are counted no more
    a.wait_for(lambda: a.control("dspactpj", pgm="QTMSSRCP")["waiting_current"] == 1, 5)
    quit_all(busy)
    assert read_reply(patient, 10).startswith(b"220 ")
    quit_all([patient])
    st = a.control("dspactpj", pgm="QTMSSRCP")
    assert st["accepted"] == 1 and st["rejected"] == 0  # the gone were handed to no job
    assert a.count("QTMSSRCP") == 1


def test_clients_waiting_when_wait_becomes_no_are_refused_at_once(make_appliance):
    a = make_appliance(prestart__QTMSSRCP={"inljobs": 1, "threshold": 1, "adljobs": 1,
                                           "maxjobs": 1, "wait": "*YES"}).start()
    busy = hold(a, 1)
    waiter = a.connect()
    a.wait_for(lambda: a.control("dspactpj", pgm="QTMSSRCP")["waiting_current"] == 1, 5)
    rc, out, err = a.cli("chgpje", "--pgm", "QTMSSRCP", "--wait", "*NO")
    assert rc == 0, err
    assert read_reply(waiter, 5).startswith(b"421 4.3.2 ")  # not after wait_limit (30 s)
    quit_all(busy)
    assert [e["reason"] for e in a.journal("JR")] == ["wait"]


def test_wait_limit_rejects_with_421(make_appliance):
    a = make_appliance(prestart={"wait_limit": 1},
                       prestart__QTMSSRCP={"inljobs": 1, "threshold": 1, "adljobs": 1,
                                           "maxjobs": 1}).start()
    busy = hold(a, 1)
    waiter = a.connect()
    assert read_reply(waiter, 10).startswith(b"421 4.3.2 ")
    quit_all(busy)
    a.wait_for(lambda: a.journal("JR"), 5, "the rejection's journal entry")
    assert [e["reason"] for e in a.journal("JR")] == ["waitlimit"]


def test_wait_no_rejects_at_once(make_appliance):
    a = make_appliance(prestart__QTMSSRCP={"inljobs": 1, "threshold": 1, "adljobs": 0,
                                           "maxjobs": 1, "wait": "*NO"},
                       pop={"nbrsvr": 1},
                       prestart__QTPOPSRVP={"threshold": 1, "adljobs": 0,
                                            "maxjobs": 1, "wait": "*NO"}).start()
    busy = hold(a, 1)
    t0 = time.monotonic()
    rejected = a.connect()
    line = read_reply(rejected)
    assert line.startswith(b"421 4.3.2 ") and time.monotonic() - t0 < 2
    assert rejected.recv(10) == b""  # closed by the controller
    pop_busy = hold(a, 1, "pop3")
    pop_rejected = a.connect("pop3")
    assert read_reply(pop_rejected).startswith(b"-ERR [SYS/TEMP]")
    quit_all(busy + pop_busy)
    assert a.control("dspactpj", pgm="QTMSSRCP")["rejected"] == 1
    a.wait_for(lambda: len(a.journal("JR")) == 2, 5, "two rejection entries")


def test_maxuse_replaces_used_up_job(make_appliance):
    a = make_appliance(prestart__QTMSSRCP={"inljobs": 1, "threshold": 1, "adljobs": 1,
                                           "maxjobs": 4, "maxuse": 2}).start()
    first = a.jobs("QTMSSRCP")[0]["pid"]
    held = hold(a, 1)
    # While the only job is busy, THRESHOLD 1 starts another.  (Held until
    # then: a session over before the controller looked, its FREE said
    # before, grows nothing, and a loaded machine can make it look late.)
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 1 and a.count("QTMSSRCP") == 2, 10,
               "a second job")
    quit_all(held)
    # Which of the two takes a next session depends on which was freed last
    # (the job's FREE or the new one's READY): two sessions at once give each one.
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 2, 10, "the second job idle too")
    quit_all(hold(a, 2))
    a.wait_for(lambda: not alive(first), 10, "used-up job to end")
    # The pool lists the job until it has heard of its end, a moment after the exit.
    a.wait_for(lambda: first not in [r["pid"] for r in a.jobs("QTMSSRCP")], 10,
               "the used-up job gone from the pool")
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") >= 1, 10, "replacement")
    ends = [e for e in a.journal("JE") if e["pid"] == first]
    assert ends and ends[0]["reason"] == "maxuse" and ends[0]["uses"] == 2


def test_sigkilled_job_is_replaced(appliance):
    a = appliance
    victim = a.jobs("QTMSSRCP")[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    a.wait_for(lambda: victim not in [r["pid"] for r in a.jobs("QTMSSRCP")], 10)
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 2, 10, "replacement job")
    crash = [e for e in a.journal("JC") if e["pid"] == victim]
    assert crash and crash[0]["exit"] == "signal 9"
    # A busy job killed mid-session is replaced too, and its client sees the close.
    s = hold(a, 1)[0]
    busy = [r["pid"] for r in a.jobs("QTMSSRCP") if r["status"] == "RUN"][0]
    os.kill(busy, signal.SIGKILL)
    assert s.recv(10) == b""
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 2, 10, "replacement job")
    assert a.count("QTMSSRCP") == 2


def test_clients_arriving_as_the_idle_jobs_die_are_served_by_their_replacements(appliance):
    """A job killed a moment before, its end not yet read, was still picked:
    the handoff failed and the client was closed without a word."""
    a = appliance
    for _ in range(3):
        a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == a.count("QTMSSRCP") >= 2, 10,
                   "every job idle")
        for job in a.jobs("QTMSSRCP"):
            os.kill(job["pid"], signal.SIGKILL)
        clients = [a.connect() for _ in range(2)]
        for s in clients:
            got = read_reply(s)
            assert got.startswith(b"220 "), got
            s.sendall(b"QUIT\r\n")
            assert read_reply(s).startswith(b"221 ")
            s.close()


def launchers(a) -> list[int]:
    """The controller's launchers (the bridge has its own, for QMSF and client jobs)."""
    out = []
    for r in a.control("wrkactjob"):
        if r["job"] == "QZMFLNCH":
            try:
                if _parent_of(r["pid"]) == a.proc.pid:
                    out.append(r["pid"])
            except FileNotFoundError:
                pass  # just ended
    return out


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_jobs_are_forked_by_a_launcher_that_is_replaced_when_it_dies(appliance):
    a = appliance
    jobs = [r["pid"] for r in a.jobs("QTMSSRCP")]
    with open(f"/proc/{jobs[0]}/comm") as f:
        assert f.read().strip() == "QTMSSRCP"  # what ps and top show
    launcher = _parent_of(jobs[0])
    with open(f"/proc/{launcher}/comm") as f:
        assert f.read().strip() == "QZMFLNCH"
    assert _parent_of(launcher) == a.proc.pid
    pop_jobs = [r["pid"] for r in a.jobs("QTPOPSRVP")]
    assert {_parent_of(p) for p in pop_jobs} == {launcher}  # one launcher for both entries
    a.control("dspactpj", pgm="QTMSSRCP", reset=True)
    os.kill(launcher, signal.SIGKILL)
    # Its jobs die with it; the pools start a new launcher and new jobs.
    assert wait_gone(jobs + pop_jobs, 10) == []
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 2, 15, "replacement jobs")
    a.wait_for(lambda: a.count("QTPOPSRVP", "PSRW") == 1, 15, "a replacement POP job")
    assert len(launchers(a)) == 1
    # The dead and their replacements are never counted together.
    assert a.control("dspactpj", pgm="QTMSSRCP")["jobs_peak"] == 2
    crashes = [e for e in a.journal("JC") if e["pid"] in jobs]
    assert crashes and all(e["cause"] == "its launcher (QZMFLNCH) ended" for e in crashes)
    fresh = a.jobs("QTMSSRCP")[0]["pid"]
    assert _parent_of(fresh) not in (launcher, a.proc.pid)
    s = smtplib.SMTP(*a.addr("smtp"), timeout=30)
    assert s.noop()[0] == 250
    s.quit()


def test_launcher_deaths_in_a_row_do_not_stop_the_entry(make_appliance):
    a = make_appliance(prestart__QTMSSRCP={"inljobs": 6, "threshold": 1, "adljobs": 1,
                                           "maxjobs": 8}).start()
    killed: set[int] = set()
    for _ in range(3):  # each new launcher is killed as soon as it shows, jobs half-started
        a.wait_for(lambda: set(launchers(a)) - killed, 15, "a new launcher")
        for pid in set(launchers(a)) - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 6, 20, "the jobs to be replaced")
    assert a.control("dspactpj", pgm="QTMSSRCP")["status"] == "ACTIVE"
    # At most one boot failure for each launcher killed before it forked anything.
    assert len([e for e in a.journal("JB") if e["pgm"] == "QTMSSRCP"]) <= 3


def test_idle_surplus_is_trimmed_to_inljobs(make_appliance):
    a = make_appliance(prestart={"trim_interval": 1},
                       prestart__QTMSSRCP={"inljobs": 2, "threshold": 1, "adljobs": 3,
                                           "maxjobs": 10}).start()
    socks = hold(a, 2)
    a.wait_for(lambda: a.count("QTMSSRCP") == 5, 10, "growth")
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 3, 10)
    quit_all(socks)
    a.wait_for(lambda: a.count("QTMSSRCP") == 2, 15, "trim back to INLJOBS")
    time.sleep(1.5)
    assert a.count("QTMSSRCP") == 2
    assert {e["reason"] for e in a.journal("JE")} == {"trim"}


def test_chgpje_applies_live_and_lowering_maxjobs_spares_busy(make_appliance):
    a = make_appliance(prestart__QTMSSRCP={"inljobs": 4, "threshold": 1, "adljobs": 1,
                                           "maxjobs": 8}).start()
    socks = hold(a, 2)
    busy = {r["pid"] for r in a.jobs("QTMSSRCP") if r["status"] == "RUN"}
    rc, out, err = a.cli("chgpje", "--pgm", "QTMSSRCP", "--inljobs", "1", "--maxjobs", "2")
    assert rc == 0, err
    assert "applied" in out
    a.wait_for(lambda: a.count("QTMSSRCP") == 2, 10, "idle jobs above MAXJOBS to end")
    assert {r["pid"] for r in a.jobs("QTMSSRCP")} == busy  # busy jobs were kept
    text = a.config.read_text()
    assert "maxjobs = 2" in text and "inljobs = 1" in text
    # MAXJOBS 2, both busy, WAIT *YES: a third client waits rather than a third job.
    extra = a.connect()
    time.sleep(0.5)
    assert a.count("QTMSSRCP") == 2
    quit_all(socks[:1])
    assert read_reply(extra).startswith(b"220")
    quit_all([extra, socks[1]])
    assert any(e["code"] == "JA" for e in a.journal())


def test_boot_failures_stop_the_entry(make_appliance):
    a = make_appliance(prestart__QTMSSRCP={"inljobs": 1, "threshold": 1, "adljobs": 1,
                                           "maxjobs": 2}).start()
    # Jobs started from now on cannot boot: the settings they read are damaged.
    record = a.datadir / "run" / "settings.json"
    good = record.read_bytes()
    assert b'"maxrcpt": 100' in good
    record.write_bytes(good.replace(b'"maxrcpt": 100', b'"maxrcpt": -1'))
    os.kill(a.jobs("QTMSSRCP")[0]["pid"], signal.SIGKILL)
    a.wait_for(lambda: a.control("dspactpj", pgm="QTMSSRCP")["status"] == "FAILED", 60,
               "entry to stop after boot failures")
    assert len([e for e in a.journal("JB") if e["pgm"] == "QTMSSRCP"]) == 5
    assert [e for e in a.journal("JF") if e["pgm"] == "QTMSSRCP"]
    s = a.connect()
    assert read_reply(s).startswith(b"421 ")
    assert "smtp.maxrcpt" in a.log_text()  # the jobs' one line says why
    record.write_bytes(good)
    rc, out, err = a.cli("strpj", "--pgm", "QTMSSRCP")
    assert rc == 0, err
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 1, 10, "entry to start again")
    assert a.control("dspactpj", pgm="QTMSSRCP")["status"] == "ACTIVE"


def test_strjobs_no_leaves_the_entry_without_jobs_until_strpj(make_appliance):
    a = make_appliance(prestart__QTMSSRCP={"strjobs": "*NO"}).start()
    assert a.count("QTPOPSRVP", "PSRW") == a.inljobs("QTPOPSRVP") > 0  # the other entry's
    assert a.count("QTMSSRCP") == 0
    s = a.connect()
    assert read_reply(s).startswith(b"421 4.3.2 ")  # listening, and no job to serve
    s.close()
    rc, out, err = a.cli("strpj", "--pgm", "QTMSSRCP")
    assert rc == 0, err
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 2, 10, "STRPJ to start them")
    s = a.connect()
    assert read_reply(s).startswith(b"220 ")
    s.close()


def test_endpj_strpj_endtcpsvr_strtcpsvr(appliance):
    a = appliance
    rc, out, err = a.cli("endpj", "--pgm", "QTMSSRCP", "--option", "*IMMED")
    assert rc == 0, err
    a.wait_for(lambda: a.count("QTMSSRCP") == 0, 10)
    # The two entries share one launcher: it stays while POP uses it.
    [launcher] = launchers(a)
    assert _parent_of(a.jobs("QTPOPSRVP")[0]["pid"]) == launcher
    s = a.connect()
    assert read_reply(s).startswith(b"421 ")
    rc, out, err = a.cli("strpj", "--pgm", "QTMSSRCP")
    assert rc == 0, err
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 2, 10)
    rc, out, err = a.cli("strpj", "--pgm", "QTMSSRCP")
    assert rc == 1 and "ENDPJ" in err and len(err.strip().splitlines()) == 1

    rc, out, err = a.cli("endtcpsvr", "--server", "*POP")
    assert rc == 0 and "*POP ended" in out
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(a.addr("pop3"), timeout=5)
    a.wait_for(lambda: a.count("QTPOPSRVP") == 0, 10)
    assert launchers(a) == [launcher]  # the SMTP jobs it forks since STRPJ
    rc, out, err = a.cli("endtcpsvr", "--server", "*SMTP")
    assert rc == 0, err
    a.wait_for(lambda: launchers(a) == [], 10, "the launcher to end with the last jobs")
    rc, out, err = a.cli("strtcpsvr", "--server", "*AUTOSTART")  # IBM's default: both here
    assert rc == 0 and "*SMTP started" in out and "*POP started" in out, (out, err)
    a.wait_for(lambda: a.count("QTPOPSRVP", "PSRW") == 1, 10)
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") == 2, 10)
    assert len(launchers(a)) == 1 and launchers(a) != [launcher]
    a.listeners = a.control("status")["listeners"]  # port 0: the kernel picked a new one
    p = poplib.POP3(*a.addr("pop3"), timeout=10)
    assert p.getwelcome().startswith(b"+OK")
    p.quit()
    # REFERENCE 2.2: STRTCPSVR *POP while POP runs starts one more server job.
    a.wait_for(lambda: a.count("QTPOPSRVP") == a.count("QTPOPSRVP", "PSRW"), 10,
               "the POP jobs free again")
    jobs = a.count("QTPOPSRVP")
    rc, out, err = a.cli("strtcpsvr", "--server", "*POP")
    assert rc == 0 and "*POP already started; one more server job started" in out, (out, err)
    a.wait_for(lambda: a.count("QTPOPSRVP", "PSRW") == jobs + 1, 10, "one more POP job")


def test_strtcpsvr_of_a_started_server_whose_jobs_were_ended_starts_them(appliance):
    """It said "*SMTP already started" and left every client a 421; for POP it
    blamed MAXJOBS."""
    a = appliance
    for server, pgm in (("*SMTP", "QTMSSRCP"), ("*POP", "QTPOPSRVP")):
        rc, out, err = a.cli("endpj", "--pgm", pgm, "--option", "*IMMED")
        assert rc == 0, err
        a.wait_for(lambda pgm=pgm: a.count(pgm) == 0, 10)
        rc, out, err = a.cli("strtcpsvr", "--server", server)
        assert rc == 0 and "were not running and are started" in out, (out, err)
        a.wait_for(lambda pgm=pgm: a.count(pgm, "PSRW") == a.inljobs(pgm), 10)
    s = a.connect()
    assert read_reply(s).startswith(b"220 ")
    s.close()


def test_a_busy_job_endpj_cntrld_ends_shows_as_ending(appliance):
    a = appliance
    s = a.connect()
    assert read_reply(s).startswith(b"220 ")
    a.wait_for(lambda: a.count("QTMSSRCP", "RUN") == 1, 10, "the session to be served")
    rc, out, err = a.cli("endpj", "--pgm", "QTMSSRCP", "--option", "*CNTRLD", "--delay", "30")
    assert rc == 0, err
    a.wait_for(lambda: a.count("QTMSSRCP") == 1, 10, "the idle jobs to end")
    assert a.count("QTMSSRCP", "END") == 1  # was RUN: it looked as if it would stay
    s.sendall(b"QUIT\r\n")
    assert read_reply(s).startswith(b"221 ")
    s.close()
    a.wait_for(lambda: a.count("QTMSSRCP") == 0, 10, "the job to end after its session")


def test_bridge_is_supervised(appliance):
    a = appliance
    pid = a.wait_for(lambda: a.control("status")["bridge"]["pid"], 10)
    a.wait_for(lambda: a.journal("JM"), 10, "bridge start entry")
    # Its client and QMSF jobs, listed in the status it writes once a second
    # (a job still starting has no pid there yet).
    def started() -> dict | None:
        jobs = {j["pid"]: j["job"] for j in a.control("wrkactjob")
                if j["job"] in ("QTSMTPCLTP", "QMSF")}
        return jobs if jobs and None not in jobs else None

    jobs = a.wait_for(started, 10, "the bridge's jobs")
    os.kill(pid, signal.SIGKILL)
    new = a.wait_for(
        lambda: (a.control("status")["bridge"]["pid"] or pid) != pid
        and a.control("status")["bridge"]["pid"], 15, "bridge restart")
    assert alive(new) and a.journal("JK")
    assert "bridge ended (signal 9); restarting in" in a.log_text()
    # They died with it: each has its end in the journal, as any other job.
    ended = {e["pid"]: e for e in a.journal("JC") + a.journal("JK")}
    assert set(jobs) <= set(ended), (jobs, ended)
    for p, name in jobs.items():  # JK for a QMSF job, as the bridge writes it; JC for a pool's
        assert ended[p]["code"] == ("JK" if name == "QMSF" else "JC"), (name, ended[p])
        assert ended[p]["cause"] == "its bridge (QTSMTPBRSR) ended"
    rc, out, err = a.cli("endmsf", "--option", "*IMMED")
    assert rc == 0, err
    assert not alive(new) or wait_gone([new], 5) == []
    rc, out, err = a.cli("endmsf")
    assert rc == 1 and "not active" in err
    rc, out, err = a.cli("strmsf")
    assert rc == 0
    a.wait_for(lambda: a.control("status")["bridge"]["pid"], 10)


def test_sigterm_lets_sessions_finish_then_leaves_nothing(make_appliance):
    a = make_appliance(prestart={"end_delay": 2}).start()
    children = a.children()
    sock = a.connect()
    read_reply(sock)
    t0 = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    # The session may go on during the delay...
    time.sleep(0.5)
    a.proc.send_signal(signal.SIGTERM)  # impatient: said, not a traceback
    sock.sendall(b"NOOP\r\n")
    assert read_reply(sock).startswith(b"250")
    # ...then it is ended, with the 421 of a server shutting down (RFC 5321 §3.8).
    sock.settimeout(10)
    assert read_reply(sock).startswith(b"421 4.3.2 mail.example.test Service shutting down")
    assert sock.recv(100) == b""
    # twistd re-raises the signal it stopped on, so its parent sees SIGTERM.
    assert a.proc.wait(30) in (0, -signal.SIGTERM)
    log = a.log_text()
    assert "Server Shut Down" in log
    assert "SIGTERM received: already ending" in log and "ReactorNotRunning" not in log
    assert {e["reason"] for e in a.journal("JE")} == {"shutdown"}
    assert time.monotonic() - t0 < 15
    assert wait_gone(children, 10) == []
    assert not a.control_socket.exists()


def test_the_shutdown_notice_reaches_tls_clients_too(make_appliance):
    """The reactor's end dropped what a TLS transport still held: 421 and -ERR."""
    a = make_appliance(prestart={"end_delay": 1}).start()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    smtp = smtplib.SMTP_SSL(*a.addr("smtps"), timeout=10, context=ctx)
    assert smtp.ehlo()[0] == 250
    pop = poplib.POP3_SSL(*a.addr("pop3s"), timeout=10, context=ctx)
    t0 = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    assert smtp.getreply() == (421, b"4.3.2 mail.example.test Service shutting down, try "
                                    b"again later")
    assert pop._getline()[0] == b"-ERR [SYS/TEMP] Server shutting down, try again later"
    print(f"notices after {time.monotonic() - t0:.2f} s")
    smtp.close()  # the server's TLS close waits for the client's
    pop.close()
    assert a.proc.wait(30) in (0, -signal.SIGTERM)
    print(f"daemon gone after {time.monotonic() - t0:.2f} s")


@pytest.mark.parametrize("listener", ["smtps", "smtp"])
def test_a_tls_client_quitting_while_its_job_ends_gets_its_221(make_appliance, listener):
    """QUIT freed the job, which was to end with its last session: the reactor
    stopped before the TLS layer had sent the 221, and the client saw EOF."""
    a = make_appliance().start()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if listener == "smtps":
        smtp = smtplib.SMTP_SSL(*a.addr("smtps"), timeout=10, context=ctx)
    else:
        smtp = smtplib.SMTP(*a.addr("smtp"), timeout=10)
        smtp.starttls(context=ctx)
    assert smtp.ehlo()[0] == 250
    code, _, err = a.cli("endpj", "--pgm", "QTMSSRCP", "--delay", "20")
    assert code == 0, err
    assert smtp.docmd("QUIT")[0] == 221
    smtp.close()


def test_jobs_exit_when_controller_dies(appliance):
    a = appliance
    children = a.children()
    assert len(children) >= 4
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    assert wait_gone(children, 10) == []


def test_second_daemon_refuses_to_start(appliance, make_appliance):
    a = appliance
    import subprocess

    from appliance import TWISTD

    r = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(a.config)],
        capture_output=True, timeout=30, cwd=a.root,
    )
    assert r.returncode == 1
    assert b"another daemon is running" in r.stdout + r.stderr
    assert b"Traceback" not in r.stdout + r.stderr
    # Daemonised, twistd's first process waits for word from the daemon: a
    # refusal that ended the daemon without one left it waiting for ever.
    log, pidfile = a.root / "second.log", a.root / "second.pid"
    r = subprocess.run(
        [TWISTD, "--pidfile", str(pidfile), "--logfile", str(log), "twistmail", "--config",
         str(a.config)],
        capture_output=True, timeout=30, cwd=a.root,
    )
    assert r.returncode == 1
    assert r.stderr.startswith(b"twistmail: another daemon is running (it answers on ")
    assert r.stderr.count(b"\n") == 1  # one plain line, not twistd's repr of bytes
    assert not pidfile.exists()
    assert a.running()


def test_a_new_daemon_waits_for_the_bridge_of_a_killed_one(appliance):
    """SIGKILL of the controller: its bridge ends in a controlled way, which may take
    END_DELAY and more, while the control socket answers no more.  A daemon started
    then must not run a second bridge on the same queues (a message sent twice)."""
    import subprocess

    from appliance import TWISTD

    from twistmail.control import ControlClient

    a = appliance
    a.wait_for(lambda: a.control("status")["bridge"]["pid"], 10, "the bridge")
    # Running, its signal handlers in place (its status file is written from
    # its reactor): a bridge still starting dies of the controller's death at once.
    a.wait_for((a.datadir / "run" / "QTMSCCLCP.json").exists, 10, "the bridge running")
    bridge = a.control("status")["bridge"]["pid"]
    os.kill(bridge, signal.SIGSTOP)  # a bridge still busy ending
    a.proc.kill()
    a.proc.wait()
    log = (a.root / "second.log").open("wb")
    second = subprocess.Popen([TWISTD, "-n", "--pidfile=", "twistmail", "--config",
                               str(a.config)], stdout=log, stderr=subprocess.STDOUT,
                              cwd=a.root)
    log.close()
    try:
        time.sleep(2)
        assert second.poll() is None and alive(bridge)
        # said at once, not after 30 s of silence
        said = (a.root / "second.log").read_text()
        assert "waiting up to 30 s for processes of an earlier twistmail daemon" in said
        assert str(bridge) in said
        # still waiting for the state directory: nothing answers
        assert not ControlClient(a.control_socket).running()
        os.kill(bridge, signal.SIGKILL)
        a.proc = second  # the fixture stops it
        a.wait_for(a.running, 20, "the new daemon, once the old bridge is gone")
    finally:
        if second.poll() is None and a.proc is not second:
            second.kill()


def test_ctrl_c_at_the_terminal_leaves_the_children_to_the_controller(appliance):
    """Ctrl-C reaches every process of the group: the jobs and the bridge ignore it
    (the controller ends them in a controlled way), so a session goes on."""
    a = appliance
    # Every launcher past its interpreter's start (a Python process starting
    # takes SIGINT as KeyboardInterrupt until its code ignores it): the
    # bridge's client jobs are ready.
    a.wait_for(lambda: a.count("QTMSCCLCP", "PSRW") >= 1, 20, "the client jobs")
    with socket.create_connection(a.addr("smtp"), timeout=10) as s:
        assert read_reply(s).startswith(b"220 ")
        for pid in a.children():
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        s.sendall(b"NOOP\r\n")
        assert read_reply(s).startswith(b"250 ")
    assert "KeyboardInterrupt" not in a.log_text()


def test_a_stopping_daemon_refuses_changes_but_still_shows_its_state(make_appliance):
    """A STRTCPSVR during shutdown reopened the listeners of a daemon going away."""
    a = make_appliance(prestart={"end_delay": 10}).start()
    with socket.create_connection(a.addr("smtp"), timeout=10) as s:  # keeps the end waiting
        assert read_reply(s).startswith(b"220 ")
        a.proc.send_signal(signal.SIGTERM)
        a.wait_for(lambda: a.cli("strtcpsvr", "--server", "*SMTP")[0] == 1, 5, "refusal")
        rc, out, err = a.cli("strmsf")
        assert rc == 1 and "the twistmail daemon is stopping" in err
        assert a.control("status")["pid"] == a.proc.pid
        assert "smtp" not in a.control("status")["listeners"]
        rc, out, err = a.cli("status")
        assert rc == 0 and out.startswith(f"twistmail daemon stopping, pid {a.proc.pid}\n")
        # A change is saved and applies at the next start: it said it failed.
        rc, out, err = a.cli("chgsmtpa", "--maxrcpt", "61")
        assert (rc, out) == (0, "SMTP attributes saved; the daemon is stopping, it applies at "
                                "the next start\n"), err


def test_shutdown_leaves_no_status_file_of_a_bridge_killed_before_it(appliance):
    a = appliance
    status = a.datadir / "run" / "QTMSCCLCP.json"
    a.wait_for(status.exists, 10, "the bridge's status file")
    os.kill(a.control("status")["bridge"]["pid"], signal.SIGKILL)
    a.stop()
    # What the jobs load stays for the next start, which need not write it.
    assert sorted(os.listdir(a.datadir / "run")) == ["settings.json", "tls.pem"]


def test_a_reload_while_the_bridge_starts_does_not_end_it(appliance):
    """CHGSMTPA, CHGPJE send SIGHUP to the bridge; one that came before its handler
    was in place ended it (a crash, a restart, a longer back-off)."""
    a = appliance
    a.wait_for(lambda: a.control("status")["bridge"]["pid"], 10, "the bridge")
    os.kill(a.control("status")["bridge"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        a.control("reload")
        time.sleep(0.01)
    crashes = [e.get("exit", "") for e in a.journal("JK")]
    assert len(crashes) == 1, crashes  # the SIGKILL, and nothing after it


def test_the_qmsf_jobs_hold_the_state_directory_lock_too(appliance):
    """Killed with its bridge, a QMSF job may still be delivering: no new daemon
    may start beside it."""
    from pathlib import Path

    a = appliance

    def holders() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for pid in a.children():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.endswith("twistmail.lock"):
                    out.setdefault(comm, []).append(pid)
        return out

    a.user("SAM")
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:  # work for a QMSF job
        s.sendmail("jane@example.test", ["sam@example.test"], b"Subject: x\r\n\r\nx\r\n")
    a.wait_for(lambda: "QMSF" in holders(), 10, "a QMSF job holding the lock")
    held = holders()
    assert len(held["QZMFLNCH"]) == 1  # the QMSF jobs' launcher, not the pools'
    assert not {"QTMSSRCP", "QTPOPSRVP", "QTMSCCLCP"} & set(held), held


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_cannot_take_all_its_ports_leaves_none_open(make_appliance):
    """STRTCPSVR with the submission port taken: the SMTP port it had bound
    stayed open with nothing accepting, so clients connected and were never
    greeted; and with *ALL the servers that did start were not said."""
    smtp, submission = _free_port(), _free_port()
    a = make_appliance(listen={"smtp": f"127.0.0.1:{smtp}",
                               "submission": f"127.0.0.1:{submission}"}).start()
    assert a.cli("endtcpsvr", "--server", "*SMTP")[0] == 0
    assert a.cli("endtcpsvr", "--server", "*POP")[0] == 0
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", submission))
        squatter.listen()
        rc, out, err = a.cli("strtcpsvr", "--server", "*ALL")
        assert rc == 1 and len(err.strip().splitlines()) == 1, err
        assert "*SMTP not started: cannot listen for submission" in err and "*POP started" in err
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", smtp), timeout=5)
    rc, out, err = a.cli("strtcpsvr", "--server", "*SMTP")  # the port is free again
    assert rc == 0 and "*SMTP started" in out, err
    with smtplib.SMTP("127.0.0.1", smtp, timeout=10) as client:
        assert client.noop()[0] == 250


def test_endpj_checks_its_option_and_delay_before_ending_anything(appliance):
    """From a script on the control socket, past the CLI's own checks."""
    from twistmail.control import ControlError

    with pytest.raises(ControlError, match="--option: '\\*BOGUS' is not allowed"):
        appliance.control("endpj", pgm="QTPOPSRVP", option="*BOGUS", delay=1)
    with pytest.raises(ControlError, match="--delay: -1 is not allowed"):
        appliance.control("endpj", pgm="QTPOPSRVP", option="*CNTRLD", delay=-1)
    with pytest.raises(ControlError, match="--delay"):
        appliance.control("endmsf", option="*IMMED", delay="soon")
    assert appliance.control("dspactpj", pgm="QTPOPSRVP")["status"] == "ACTIVE"
    assert appliance.control("status")["bridge"]["pid"]


def test_a_session_begun_before_a_reload_still_gets_the_shutdown_notice(make_appliance):
    """A reload (CHGSMTPA, CHGPOPA) gives the jobs new listeners' factories; a
    session under way kept the old one, and the job no longer found it: at
    the end it got no notice, and a CUT or the wait for its last reply missed it."""
    a = make_appliance(prestart={"end_delay": 1}).start()
    smtp = smtplib.SMTP(*a.addr("smtp"), timeout=10)
    assert smtp.ehlo()[0] == 250
    pop = poplib.POP3(*a.addr("pop3"), timeout=10)
    rc, out, err = a.cli("chgsmtpa", "--maxrcpt", "99")
    assert rc == 0, err
    rc, out, err = a.cli("chgpopa", "--inacttimo", "500")
    assert rc == 0, err
    assert smtp.noop()[0] == 250  # the job has read its CFG before this reply
    assert pop.capa()  # likewise
    a.proc.send_signal(signal.SIGTERM)
    assert smtp.getreply()[0] == 421
    assert pop._getline()[0] == b"-ERR [SYS/TEMP] Server shutting down, try again later"
    smtp.close()
    pop.close()
    assert a.proc.wait(30) in (0, -signal.SIGTERM)


def test_clients_waiting_when_the_launcher_dies_are_all_served(make_appliance):
    """Its jobs end by SIGTERM, telling their clients 421.  They used to say
    FREE as they did, and were handed waiting clients they never served:
    those got the end of their connection without a word."""
    a = make_appliance(prestart__QTMSSRCP={"inljobs": 2, "threshold": 1, "adljobs": 1,
                                           "maxjobs": 2, "wait": "*YES"}).start()
    busy = hold(a, 2)
    waiters = [a.connect() for _ in range(4)]
    a.wait_for(lambda: a.control("dspactpj", pgm="QTMSSRCP")["waiting_current"] == 4, 5)
    [launcher] = [p for p in launchers(a) if p == _parent_of(a.jobs("QTMSSRCP")[0]["pid"])]
    os.kill(launcher, signal.SIGKILL)
    for s in busy:
        assert read_reply(s, 10).startswith(b"421 ")
        s.close()
    for s in waiters:  # served one after another by the new jobs
        assert read_reply(s, 20).startswith(b"220 ")
        quit_all([s])
