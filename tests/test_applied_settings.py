"""What the daemon's processes read: the settings it accepted, not the file as it is now."""

from __future__ import annotations

import os
import signal
import smtplib

from appliance import read_reply


def _kill_idle_smtp_jobs(a) -> None:
    pids = [j["pid"] for j in a.jobs("QTMSSRCP") if j["status"] == "PSRW"]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    a.wait_for(lambda: not ({j["pid"] for j in a.jobs("QTMSSRCP")} & set(pids)), 10,
               "killed jobs gone")


def test_a_refused_hand_edit_never_reaches_a_job_started_later(make_appliance):
    """config --apply refuses the file and says the old settings stay: so they do.

    New jobs (a crash, MAXUSE, the pool growing) used to read the refused
    file themselves and die before they were ready, until the entry stopped.
    """
    a = make_appliance().start()
    a.user("SAM")
    good = a.config.read_text()
    a.config.write_text(good.replace("[pop]\n", "[pop]\ninacttimo = 5\n"))
    rc, out, err = a.cli("config", "--apply")
    assert rc == 2 and "pop.inacttimo" in err
    rc, out, err = a.cli("status")  # the daemon is still found and shown
    assert rc == 0 and "QTMSSRCP" in out, err
    _kill_idle_smtp_jobs(a)
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") >= a.inljobs("QTMSSRCP"), 20,
               "replacement jobs ready")
    assert a.control("dspactpj", pgm="QTMSSRCP")["status"] == "ACTIVE"
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["sam@example.test"], b"Subject: x\r\n\r\nx\r\n")
    a.wait_mailbox("SAM", 1)
    # A valid edit not applied yet does not reach new jobs either ...
    a.config.write_text(good + "\n[smtp]\nmaxrcpt = 1\n")
    _kill_idle_smtp_jobs(a)
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") >= a.inljobs("QTMSSRCP"), 20)
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        s.mail("jane@example.test")
        assert s.rcpt("sam@example.test")[0] == 250
        assert s.rcpt("sam@example.test")[0] == 250
    # ... until it is applied.
    rc, out, _ = a.cli("config", "--apply")
    assert rc == 0 and out.splitlines()[1:] == ["  smtp.maxrcpt 100 -> 1"], out
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        s.mail("jane@example.test")
        assert s.rcpt("sam@example.test")[0] == 250
        assert s.rcpt("sam@example.test")[0] == 452


def test_what_needs_a_restart_waits_for_it_and_is_said_until_then(make_appliance):
    """A new host name or listener is not half applied by the next change."""
    a = make_appliance().start()
    rc, out, _ = a.cli("config", "--apply")
    assert rc == 0 and out.strip() == "configuration applied to the running daemon: nothing changed"
    text = a.config.read_text()
    assert 'hostname = "mail.example.test"' in text
    a.config.write_text(text.replace('hostname = "mail.example.test"',
                                     'hostname = "other.example.test"'))
    for _ in range(2):  # said at every reload, not only the first
        rc, out, _ = a.cli("config", "--apply")
        assert rc == 0 and "restart needed for: system" in out
    rc, out, _ = a.cli("chgsmtpa", "--maxrcpt", "60")
    assert rc == 0 and "restart needed for: system" in out
    rc, out, _ = a.cli("status")
    assert rc == 0 and "restart needed for: system" in out
    _kill_idle_smtp_jobs(a)  # even a job started after the change
    a.wait_for(lambda: a.count("QTMSSRCP", "PSRW") >= a.inljobs("QTMSSRCP"), 20)
    s = a.connect()
    try:
        assert read_reply(s).startswith(b"220 mail.example.test ")
    finally:
        s.close()


def test_a_bad_state_directory_is_named_not_taken_for_a_stopped_daemon(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    twistmail = str(Path(sys.executable).with_name("twistmail"))
    for value in ("5", '""', '["a"]'):
        cfg = tmp_path / "twistmail.toml"
        cfg.write_text(f"[system]\ndatadir = {value}\n")
        r = subprocess.run([twistmail, "--config", str(cfg), "status"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and "system.datadir" in r.stderr, (value, r.stderr)


def test_sighup_applies_the_file_as_config_apply_does(make_appliance):
    """A Unix daemon's reload signal; by default it ended the controller without a word."""
    a = make_appliance().start()
    a.user("SAM")
    pid = a.control("status")["pid"]
    os.kill(pid, signal.SIGHUP)
    a.wait_for(lambda: "configuration applied: nothing changed" in a.log_text(), 10,
               "a reload that changed nothing, said")
    good = a.config.read_text()
    a.config.write_text(good.replace("[pop]\n", "[pop]\ninacttimo = 5\n"))
    os.kill(pid, signal.SIGHUP)
    a.wait_for(lambda: "configuration not applied: " in a.log_text(), 10, "the refusal logged")
    a.config.write_text(good + "\n[smtp]\nmaxrcpt = 1\n")
    os.kill(pid, signal.SIGHUP)
    # What changed, not only the parts that reloaded ("bridge, jobs").
    a.wait_for(lambda: "configuration applied: smtp.maxrcpt 100 -> 1 (reloaded: " in
               a.log_text(), 10, "the reload logged")
    assert a.control("status")["pid"] == pid
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        s.mail("jane@example.test")
        assert s.rcpt("sam@example.test")[0] == 250
        assert s.rcpt("sam@example.test")[0] == 452


def test_a_file_broken_by_a_hand_edit_still_finds_the_daemon(make_appliance):
    """A TOML syntax error: status said nothing of the daemon running on, and
    ENDTCPSVR could not reach it."""
    a = make_appliance().start()
    good = a.config.read_text()
    a.config.write_text(good.replace("[pop]\n", '[pop]\nalwssl = "*YES\n'))
    rc, out, err = a.cli("config", "--apply")
    assert rc == 2 and "not valid TOML" in err
    rc, out, err = a.cli("status")
    assert rc == 0 and "QTMSSRCP" in out, err
    rc, out, err = a.cli("endtcpsvr", "--server", "*POP")
    assert rc == 0, err


def test_a_settings_file_moved_elsewhere_behind_a_link_waits_for_a_restart(make_appliance):
    """Relative paths start at the real file's directory: one re-pointed to a
    copy elsewhere moves the state directory, which only a restart does."""
    a = make_appliance().start()
    elsewhere = a.config.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / a.config.name).write_text(a.config.read_text())
    a.config.unlink()
    a.config.symlink_to(elsewhere / a.config.name)
    rc, out, _ = a.cli("config", "--apply")
    assert rc == 0 and "restart needed for: system" in out, out


def test_a_change_saved_while_the_daemon_starts_is_applied_by_it(make_appliance):
    """The daemon had read its file; a CHGSMTPA before its socket answered
    said "it applies at the next start" and was never applied, by this start
    or any reload."""
    import json
    import subprocess
    import time

    from appliance import TWISTD

    a = make_appliance()
    a.proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(a.config)],
        stdout=a.log.open("ab"), stderr=subprocess.STDOUT, cwd=a.root)
    deadline = time.monotonic() + 30
    while not (a.datadir / "run").is_dir():  # made once the file is read
        assert time.monotonic() < deadline and a.proc.poll() is None, a.log_text()
        time.sleep(0.001)
    # Most often before its socket answers (the TLS pair is made meanwhile);
    # after it, the reload answers: the change must hold either way.
    rc, out, err = a.cli("chgsmtpa", "--maxrcpt", "55")
    assert rc == 0, err
    a.wait_for(a.running, 20, "control socket")
    applied = a.datadir / "run" / "settings.json"
    a.wait_for(lambda: json.loads(applied.read_text())["settings"]["smtp"]["maxrcpt"] == 55, 10,
               "the change applied")


def test_a_change_to_another_file_with_the_same_state_is_not_said_applied(make_appliance):
    a = make_appliance().start(wait_jobs=False)
    other = a.root / "other.toml"
    other.write_text(a.config.read_text())
    import contextlib
    import io

    from twistmail.cli import main as climain

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = climain.base.run(["--config", str(other), "chgsmtpa", "--maxrcpt", "5"])
    assert rc == 1, (out.getvalue(), err.getvalue())
    assert f"runs with {a.config}, not {other}" in err.getvalue()
    assert "applied to the running daemon" not in out.getvalue()
    link = a.root / "link.toml"
    link.symlink_to(a.config)
    rc, out, err = a.cli("config", "--apply")
    assert rc == 0, err
    with contextlib.redirect_stdout(io.StringIO()) as o:
        assert climain.base.run(["--config", str(link), "chgsmtpa", "--maxrcpt", "7"]) == 0
    assert "applied to the running daemon" in o.getvalue()
