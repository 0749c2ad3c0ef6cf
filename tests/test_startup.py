"""Start-up as an administrator meets it: the plugin, a bad config, privileges."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from appliance import TWISTD, Appliance, alive, descendants_of

import twisted.plugins
from twistmail.control import ControlClient

ROOT = Path(__file__).resolve().parent.parent
TWISTMAIL = str(Path(TWISTD).with_name("twistmail"))


def test_twistd_lists_the_plugin_without_rewriting_its_cache():
    caches = [Path(p) / "dropin.cache" for p in twisted.plugins.__path__]
    caches = [c for c in caches if c.exists()]
    assert caches, "make install writes the plugin cache"
    before = {c: c.stat().st_mtime_ns for c in caches}
    r = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert "twistmail" in r.stdout
    assert "Unable to write to plugin cache" not in r.stdout + r.stderr
    # An up-to-date cache is not rewritten: an unprivileged daemon never needs to.
    assert {c: c.stat().st_mtime_ns for c in caches} == before


def test_bad_config_stops_startup_with_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[prestart.QTMSSRCP]\nmaxjobs = "many"\n')
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert lines == [
        "twistmail: " + str(cfg) + ": prestart.QTMSSRCP.maxjobs: 'many' is not allowed; "
        "allowed: 1-32000, *NOMAX"
    ]


def test_missing_config_is_one_line(tmp_path):
    r = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(tmp_path / "none.toml")],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_directory_given_as_config_is_one_line(tmp_path):
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert (r.stdout + r.stderr).strip().splitlines() == [
        f"twistmail: --config: {str(tmp_path)!r} cannot be read: Is a directory"]


def test_port_in_use_is_one_line(make_appliance, tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    a = make_appliance(listen={"smtp": f"127.0.0.1:{port}"})
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(a.config)],
                       capture_output=True, text=True, timeout=60)
    busy.close()
    assert r.returncode != 0
    assert f"cannot listen for smtp on 127.0.0.1:{port}: Address already in use" in (
        r.stdout + r.stderr)
    assert "Traceback" not in r.stdout + r.stderr


def test_ipv6_listener(make_appliance):
    a: Appliance = make_appliance(listen={"smtp": "[::1]:0"}).start()
    host, port = a.addr("smtp")
    assert host == "::1"
    import smtplib

    with smtplib.SMTP(host, port, timeout=10) as s:
        assert s.noop()[0] == 250


def test_an_unspecified_ipv6_listener_takes_ipv4_clients_named_as_ipv4(make_appliance):
    """[::]:25 is every address: one entry serves both families, and an IPv4
    client is an IPv4 address in the journal, Received: and the SMTP lists."""
    import smtplib

    a: Appliance = make_appliance(listen={"smtp": "[::]:0"}).start()
    a.user("SAM")
    _, port = a.addr("smtp")
    for host in ("127.0.0.1", "::1"):
        with smtplib.SMTP(host, port, timeout=10) as s:
            s.sendmail("jane@example.test", ["sam@example.test"],
                       f"Subject: from {host}\r\n\r\nx\r\n".encode())
    received = b"".join(p.read_bytes() for p in a.wait_mailbox("SAM", 2))
    assert b"[127.0.0.1]" in received and b"ffff" not in received
    ips = {e.get("ip") for e in a.journal() if e.get("ip")}
    assert "127.0.0.1" in ips and "::1" in ips and not any("ffff" in ip for ip in ips)


def test_shipped_config_is_what_make_run_uses():
    makefile = (ROOT / "Makefile").read_text()
    assert "twistd -n" in makefile and "twistmail --config $(CONFIG)" in makefile
    assert "CONFIG ?= etc/twistmail.toml" in makefile
    sys.path.insert(0, str(ROOT))
    from twistmail import config

    s = config.load(ROOT / "etc" / "twistmail.toml")
    assert s.datadir == ROOT / "var"
    assert str(s.listen.smtp) == "127.0.0.1:2525" and str(s.listen.pop3s) == "127.0.0.1:2995"


def test_a_bridge_whose_controller_is_gone_before_it_looks_ends(tmp_path):
    """Under a subreaper (systemd --user, tini -s) an orphan's new parent is not pid 1:
    the parent the controller named is what counts."""
    code = ("import os\nfrom twistmail.lifeline import die_with_parent\n"
            "die_with_parent(os.getppid() + 1)\nprint('still here')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "still here" not in r.stdout
    code = code.replace("os.getppid() + 1", "os.getppid()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "still here" in r.stdout


def test_a_child_s_log_leaves_out_what_every_new_resolver_and_every_job_end_says():
    code = ("from twistmail.lifeline import log_to_stderr\n"
            "log_to_stderr()\n"
            "from twisted.names import client\n"
            "from twisted.python import log\n"
            "from twisted.internet import reactor\n"
            "client.createResolver()\n"
            "log.msg('kept line')\n"
            "log.msg('DNSDatagramProtocol starting on 53535')\n"
            "log.msg('(UDP Port 53535 Closed)')\n"
            "log.err(ValueError('kept error'), 'an old-style error')\n"
            "reactor.callWhenRunning(reactor.stop)\n"
            "reactor.run()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "kept line" in r.stderr
    # Every line names its level, Twisted's older log calls' too, so the
    # controller logs each at the level the child did (not as a warning).
    assert re.search(r"\[-#info\] kept line", r.stderr)
    assert re.search(r"\[-#critical\] an old-style error", r.stderr)
    assert "53535" not in r.stderr
    assert "reparsing" not in r.stderr and "Resolver added" not in r.stderr
    assert "Main loop terminated" not in r.stderr


def test_sigterm_to_the_whole_process_group_leaves_no_traceback(tmp_path):
    """kill -TERM -PGID (timeout, a container stop) reaches every child, and so
    does the controller's own request to end: a second stop of a stopped
    reactor was a ReactorNotRunning traceback in each job."""
    import contextlib
    import os
    import signal
    import time

    a = Appliance(tmp_path).start()
    try:
        a.wait_for((a.datadir / "run" / "QTMSCCLCP.json").exists, 10, "the bridge running")
        for pid in [a.proc.pid, *a.children()]:  # what a signal to the group does
            with contextlib.suppress(ProcessLookupError):  # one that ended meanwhile
                os.kill(pid, signal.SIGTERM)
        a.proc.wait(30)
        time.sleep(0.5)
        assert "ReactorNotRunning" not in a.log_text()
    finally:
        a.kill_all()


@pytest.mark.skipif(os.geteuid() != 0, reason="twistd switches user only when started as root")
def test_started_as_root_with_uid_the_state_directory_belongs_to_that_user():
    """The README's production start: what is made before the switch (the
    state directory, its lock, run/, journal/) used to stay root's, and the
    daemon died on its first file after it (a traceback)."""
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="twistmail-uid-"))
    root.chmod(0o755)  # the daemon's user reads its configuration here
    a = Appliance(root)
    a.config.chmod(0o644)
    try:
        a.start(wait_jobs=False, twistd_args=("--uid", "nobody", "--gid", str(nobody.pw_gid)))
        for made in ("", "run", "journal", "twistmail.lock", "run/settings.json", "tls"):
            assert (a.datadir / made).stat().st_uid == nobody.pw_uid, made
        assert a.journal("JG")  # written as that user
        assert "Traceback" not in a.log_text()
    finally:
        a.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def _start_as_nobody(tmp_path: Path, datadir: Path) -> subprocess.CompletedProcess:
    """twistd as root with --uid nobody, on ``datadir``, no listener: how far it gets."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    config = tmp_path / "twistmail.toml"
    config.write_text(f'[system]\ndatadir = "{datadir}"\n[listen]\nsmtp = ""\n'
                      'submission = ""\nsmtps = ""\npop3 = ""\npop3s = ""\n')
    return subprocess.run([TWISTD, "-n", "--pidfile=", "--uid", "nobody", "--gid",
                           str(nobody.pw_gid), "twistmail", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a start as root can be led astray")
@pytest.mark.parametrize("planted", ["run", "twistmail.lock"])
def test_started_as_root_it_follows_no_link_the_daemon_s_user_planted(tmp_path, planted):
    """After a first start the state directory is the daemon's user's, who
    could point run/ or the lock at a file of root's, for root to chown."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    victim = tmp_path / "victim"
    victim.mkdir() if planted == "run" else victim.write_text("root's")
    victim.chmod(0o755)
    datadir = tmp_path / "var"
    datadir.mkdir()
    os.chown(datadir, nobody.pw_uid, nobody.pw_gid)
    (datadir / planted).symlink_to(victim)
    proc = _start_as_nobody(tmp_path, datadir)
    assert proc.returncode != 0
    assert "symbolic link" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    st = victim.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a start as root can be led astray")
def test_started_as_root_it_gives_away_no_file_hard_linked_as_its_lock(tmp_path):
    """O_NOFOLLOW stops symbolic links only: a hard link as twistmail.lock made
    root hand the daemon's user a file of root's."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    victim = tmp_path / "victim"
    victim.write_text("root's")
    victim.chmod(0o644)
    datadir = tmp_path / "var"
    datadir.mkdir()
    os.chown(datadir, nobody.pw_uid, nobody.pw_gid)
    os.link(victim, datadir / "twistmail.lock")
    proc = _start_as_nobody(tmp_path, datadir)
    assert proc.returncode != 0
    assert "no link there" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert victim.stat().st_uid == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="twistd switches user only when started as root")
def test_a_key_only_root_may_read_is_read_at_start_and_kept_for_the_daemons_user():
    """/etc/letsencrypt's keys are root's alone: the daemon's user could not
    read them, and no job could start."""
    import pwd
    import shutil
    import tempfile

    from test_tls_pair import make_chain

    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="twistmail-uid-"))
    root.chmod(0o755)
    secret = Path(tempfile.mkdtemp(prefix="twistmail-keys-"))  # 0700, root's
    _, chain, key = make_chain(secret)
    key.chmod(0o600)
    a = Appliance(root, tls={"certificate": str(chain), "key": str(key)})
    a.config.chmod(0o644)
    try:
        a.start(wait_jobs=False, twistd_args=("--uid", "nobody", "--gid", str(nobody.pw_gid)))
        kept = (a.datadir / "run" / "tls.pem").stat()
        assert (kept.st_uid, kept.st_mode & 0o777) == (nobody.pw_uid, 0o600)
        # Renewed in place, still root's alone: the daemon's user sees the
        # change and cannot read it.  The rest of an edit still applies.
        secret.chmod(0o755)
        before = kept.st_ino
        make_chain(secret)
        key.chmod(0o600)
        text = a.config.read_text().replace("[smtp]", "[smtp]\nmaxrcpt = 7", 1)
        a.config.write_text(text if "maxrcpt = 7" in text else text + "\n[smtp]\nmaxrcpt = 7\n")
        result = a.control("reload")
        assert "jobs" in result["applied"], result  # MAXRCPT, for every job
        assert any("restart" in w for w in result["warnings"]), result
        assert (a.datadir / "run" / "tls.pem").stat().st_ino == before  # still in use
        assert "Traceback" not in a.log_text()
    finally:
        a.kill_all()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(secret, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a start as root can be led astray")
def test_started_as_root_it_removes_no_socket_through_a_link_made_while_it_waited(tmp_path):
    """The daemon's user holds the lock (root waits for it), makes run/ a link
    to a directory of root's meanwhile, then lets go: root removed the
    control.sock it found there."""
    import fcntl
    import pwd
    import time

    nobody = pwd.getpwnam("nobody")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "control.sock").write_text("root's")
    datadir = tmp_path / "var"
    (datadir / "run").mkdir(parents=True)
    (datadir / "journal").mkdir()
    for d in (datadir, datadir / "run", datadir / "journal"):
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
    lock = os.open(datadir / "twistmail.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    config = tmp_path / "twistmail.toml"
    config.write_text(f'[system]\ndatadir = "{datadir}"\n[listen]\nsmtp = ""\n'
                      'submission = ""\nsmtps = ""\npop3 = ""\npop3s = ""\n')
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "--uid", "nobody", "--gid",
                             str(nobody.pw_gid), "twistmail", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        time.sleep(1.5)  # waiting for the lock
        (datadir / "run").rename(datadir / "run.old")
        (datadir / "run").symlink_to(victim)
        fcntl.flock(lock, fcntl.LOCK_UN)
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(lock)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (victim / "control.sock").exists()
    assert proc.returncode != 0 and b"symbolic link" in out


def test_a_daemon_in_the_background_tells_its_own_pid(tmp_path):
    """Without -n twistd forks after the service is made: status, the log and
    the journal name the process that runs, the one its pid file holds, which
    is the one an administrator signals to stop it."""
    import signal
    import time

    a = Appliance(tmp_path)
    pidfile = tmp_path / "twistd.pid"
    r = subprocess.run([TWISTD, f"--pidfile={pidfile}", f"--logfile={a.log}", "twistmail",
                        "--config", str(a.config)], cwd=tmp_path, timeout=60)
    assert r.returncode == 0
    try:
        a.wait_for(lambda: ControlClient(a.control_socket).running(), 20, "control socket")
        pid = int(pidfile.read_text())
        assert a.control("status")["pid"] == pid
        a.wait_for(lambda: a.journal("JG"), 10, "JG entry")
        assert a.journal("JG")[0]["pid"] == pid
        assert f"twistmail controller {pid} started" in a.log_text()
    finally:
        pid = int(pidfile.read_text())
        children = descendants_of(pid)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in children:
            if alive(child):
                os.kill(child, signal.SIGKILL)


def test_password_checks_in_threads_leave_no_buffers_resident():
    """Each Argon2id check takes 12 MiB; after the first one glibc kept such
    blocks, so every POP or SMTP job that signed users on grew by about 50 MB
    (98 MB in this test: four pool threads).  Jobs return large blocks."""
    code = ("import re, sys\nfrom pathlib import Path\n"
            "from concurrent.futures import ThreadPoolExecutor\n"
            "from twistmail import directory, lifeline\n"
            "lifeline.return_large_blocks()\n"
            "stored = directory.hash_password('secret')\n"
            "def rss():\n"
            "    text = Path('/proc/self/status').read_text()\n"
            "    return int(re.search(r'VmRSS:\\s+(\\d+)', text).group(1))\n"
            "before = rss()\n"
            "with ThreadPoolExecutor(4) as pool:\n"
            "    for _ in range(12):\n"
            "        list(pool.map(lambda _: directory.verify_password('secret', stored),"
            " range(4)))\n"
            "print(rss() - before)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 24 * 1024, f"{r.stdout.strip()} KB more resident"  # two buffers


def test_a_daemon_starts_on_a_full_disk_answers_452_and_lets_pop_users_in(full_disk, tmp_path):
    """It refused to start ("cannot keep the TLS pair"): a controller killed
    while the disk was full left the appliance down until a start by hand."""
    import poplib
    import smtplib

    from conftest import fill

    a = Appliance(tmp_path, system={"datadir": str(full_disk / "var")})
    a.datadir = full_disk / "var"
    try:
        a.start()
        a.user("SAM")
        a.stop()
        fill(full_disk)
        a.start()
        # Its look at the directory lets SQLite fold the log the last daemon
        # left into the file and remove it: space again, taken up once more.
        fill(full_disk)
        with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
            s.ehlo()
            assert s.mail("jane@example.test")[0] == 452
        p = poplib.POP3(*a.addr("pop3"), timeout=30)
        p.user("sam")
        assert p.pass_("secret").startswith(b"+OK")
        p.quit()
        a.stop()
        # Changed settings must be written: refused, in one line, and no debris.
        a.config.write_text(a.config.read_text() + "\n[smtp]\nmaxrcpt = 7\n")
        fill(full_disk)  # what the stop freed (the directory's log folded in)
        a.proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "twistmail", "--config",
                                   str(a.config)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, cwd=tmp_path)
        out = a.proc.communicate(timeout=60)[0].decode()
        assert "cannot record the settings for the jobs" in out and "Traceback" not in out
        assert sorted(os.listdir(a.datadir / "run")) == ["settings.json", "tls.pem"]
    finally:
        a.kill_all()


def test_a_sighup_while_the_daemon_starts_does_not_end_it(tmp_path):
    import resource
    import signal
    import sys

    from twistmail.tap import Options, makeService

    config = tmp_path / "twistmail.toml"
    config.write_text(f'[system]\ndatadir = "{tmp_path / "var"}"\n')
    before = signal.getsignal(signal.SIGHUP)
    hook, limit = sys.excepthook, resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        options = Options()
        options.parseOptions(["--config", str(config)])
        makeService(options)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:  # what twistd's process keeps, this test's process does not
        signal.signal(signal.SIGHUP, before)
        sys.excepthook = hook
        resource.setrlimit(resource.RLIMIT_NOFILE, limit)


def test_a_start_with_a_file_that_is_not_toml_names_it_once(tmp_path, capsys):
    from twistmail.tap import Options

    p = tmp_path / "twistmail.toml"
    p.write_text("[pop\n")
    with pytest.raises(SystemExit):
        Options().parseOptions(["--config", str(p)])
    err = capsys.readouterr().err
    assert err.count(str(p)) == 1 and "not valid TOML" in err, err


def test_the_daemon_reads_twistmail_config_as_the_commands_do(tmp_path, capsys, monkeypatch):
    """twistd twistmail ran etc/twistmail.toml while every command used the file
    TWISTMAIL_CONFIG named."""
    from twistmail.tap import Options

    p = tmp_path / "local.toml"
    p.write_text("[pop\n")
    monkeypatch.setenv("TWISTMAIL_CONFIG", str(p))
    with pytest.raises(SystemExit):
        Options().parseOptions([])
    assert str(p) in capsys.readouterr().err


def test_a_state_directory_held_by_an_earlier_daemon_names_the_holders(tmp_path):
    import fcntl

    from twistmail.controller.datadirlock import DatadirBusy, lock_datadir

    fd = lock_datadir(tmp_path)
    try:
        # flock is per open file: another opening of the lock waits for ours.
        with pytest.raises(DatadirBusy, match=rf"pids {os.getpid()}\)"):
            lock_datadir(tmp_path, wait=0)
        # A daemon started a moment before, which now answers, is told at once.
        started = time.monotonic()
        with pytest.raises(DatadirBusy, match="^another daemon is running$"):
            lock_datadir(tmp_path, running=lambda: "another daemon is running")
        assert time.monotonic() - started < 5
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_the_daemon_lifts_its_soft_descriptor_limit_towards_the_hard_one():
    """systemd starts services at a soft limit of 1024: a few hundred
    sessions, and accepts and job starts fail while clients wait."""
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from twistmail import tap\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "tap._raise_file_limit()\n"
        "soft, hard2 = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "assert hard2 == hard, (hard, hard2)\n"
        "want = tap.FILE_LIMIT if hard == resource.RLIM_INFINITY else min(hard, tap.FILE_LIMIT)\n"
        "assert soft == max(want, 256), (soft, want)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_state_left_beside_a_link_to_the_settings_is_not_started_over(tmp_path):
    """Relative paths are read from the real file now, no longer beside a link
    to it: a daemon that found an empty state directory there would show no
    profiles and leave the queued mail where it lies."""
    real = tmp_path / "opt" / "etc"
    real.mkdir(parents=True)
    (real / "twistmail.toml").write_text(
        '[system]\ndatadir = "../var"\nlocal_domains = ["example.test"]\n'
        '[listen]\nsmtp = ""\nsubmission = ""\nsmtps = ""\npop3 = ""\npop3s = ""\n')
    etc = tmp_path / "etc"
    etc.mkdir()
    link = etc / "twistmail.toml"
    link.symlink_to(real / "twistmail.toml")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "directory.sqlite").write_bytes(b"")  # where the link led
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(link)],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert f"the state is in {tmp_path / 'var'}, beside the link" in out
    assert "Traceback" not in out and not (tmp_path / "opt" / "var").exists()


@pytest.mark.parametrize("as_nobody", [False, True])
def test_a_state_directory_holding_other_files_is_refused_untouched(tmp_path, as_nobody):
    """A copy of the shipped settings in /etc says datadir = "../var": /var.
    A start as root with --uid gave the system's files to the mail user."""
    from twistmail.controller import statedir

    if as_nobody and os.geteuid() != 0:
        pytest.skip("only a start as root gives files away")
    home = tmp_path / "home"  # hidden names only: a home directory
    (home / ".ssh").mkdir(parents=True)
    assert "holds files twistmail did not make (.ssh)" in statedir.refusal(home)
    system = tmp_path / "var"
    (system / "lib" / "dpkg").mkdir(parents=True)
    (system / "lib" / "dpkg" / "status").write_text("root's")
    (system / "run").mkdir(mode=0o755)
    (system / "run").chmod(0o755)
    if as_nobody:
        proc = _start_as_nobody(tmp_path, system)
    else:
        config = tmp_path / "etc" / "twistmail.toml"
        config.parent.mkdir()
        config.write_text('[system]\ndatadir = "../var"\n[listen]\nsmtp = ""\nsubmission = ""\n'
                          'smtps = ""\npop3 = ""\npop3s = ""\n')
        proc = subprocess.run([TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"the state directory {system} holds files twistmail did not make (lib)" in out
    assert "Traceback" not in out
    assert sorted(os.listdir(system)) == ["lib", "run"]  # nothing made, nothing given
    assert (system / "lib" / "dpkg" / "status").stat().st_uid == os.geteuid()
    assert (system / "run").stat().st_mode & 0o777 == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can take another user's view")
def test_a_daemon_user_who_may_not_run_the_python_is_told():
    """A virtualenv under /root and --uid mail: the daemon came up, answered
    every client 421 and restarted its bridge for ever."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="twistmail-python-"))  # pytest's are private
    top.chmod(0o755)
    public, private = top / "public", top / "private"
    public.mkdir(mode=0o755)
    private.mkdir(mode=0o700)
    for d in (public, private):
        (d / "python").write_text("")
        (d / "python").chmod(0o755)
    # Imported first: this test's Python itself may be one nobody cannot read.
    code = ("import os, sys\n"
            "from twistmail.controller.preflight import unrunnable\n"
            f"os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n"
            f"sys.executable = {str(public / 'python')!r}\n"
            "print(unrunnable())\n"
            f"sys.executable = {str(private / 'python')!r}\n"
            "print(unrunnable())\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, cwd="/")
    finally:
        shutil.rmtree(top)
    assert r.returncode == 0, r.stderr
    fine, refused = r.stdout.splitlines()
    assert fine == "None"
    assert refused == (f"this daemon's user (nobody) may not run {private / 'python'}, which "
                       "every job and the bridge need: install twistmail where that user can")


@pytest.mark.parametrize("damage", ["missing", "empty", "not a database"])
def test_a_directory_lost_or_damaged_beside_mailboxes_refuses_the_start(make_appliance, damage):
    """A restore that missed the file started with no profiles at all: every
    message queued for the users was returned as to unknown users.  A damaged
    one started, and answered 451 to every message with a traceback a second."""
    a = make_appliance()
    rc, out, err = a.cli("crtusrprf", "--usrprf", "SAM", "--password", "secret")
    assert rc == 0, err
    (a.datadir / "mailboxes" / "SAM" / "Maildir" / "new").mkdir(parents=True, exist_ok=True)
    path = a.datadir / "directory.sqlite"
    for extra in ("-wal", "-shm"):
        path.with_name(path.name + extra).unlink(missing_ok=True)
    if damage == "missing":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with path.open("r+b") as f:
            f.write(b"\0" * 32)
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "twistmail", "--config", str(a.config)],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert f"the directory {path}" in out and "Traceback" not in out
    if damage == "not a database":
        assert "restore it from the backup" in out
    else:
        assert f"is {damage}, but {a.datadir / 'mailboxes'} holds 1 mailbox" in out
        assert path.exists() == (damage == "empty")  # not made anew
    rc, out, err = a.cli("wrkusrprf")
    assert rc != 0 and "Traceback" not in err


def test_a_stopped_daemon_leaves_the_directory_whole_in_its_file(make_appliance):
    """The jobs end without closing their connections: the profiles stayed in
    directory.sqlite-wal, and a copy of the file without it had none."""
    import contextlib
    import sqlite3

    a = make_appliance().start()
    a.user("SAM")
    a.stop()
    path = a.datadir / "directory.sqlite"
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    copy = a.root / "copy.sqlite"
    copy.write_bytes(path.read_bytes())
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        assert conn.execute("SELECT usrprf FROM profiles").fetchall() == [("SAM",)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs another user to read the settings as")
def test_a_pair_in_a_directory_only_root_may_enter_does_not_stop_the_jobs(tmp_path):
    """/etc/letsencrypt/live is 0700: the jobs and the bridge, reading the
    settings as the daemon's user, refused them ("not an existing file") and
    none could start, though they load the copy of the pair the daemon keeps."""
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    tmp_path = Path(tempfile.mkdtemp(prefix="twistmail-live-"))  # pytest's are private
    request_cleanup = shutil.rmtree
    tmp_path.chmod(0o755)
    live = tmp_path / "live"
    live.mkdir(mode=0o700)
    for name in ("cert.pem", "key.pem"):
        (live / name).write_text("")
    (tmp_path / "var").mkdir()
    config = tmp_path / "twistmail.toml"
    config.write_text('[system]\ndatadir = "var"\nlocal_domains = ["example.test"]\n'
                      '[tls]\ncertificate = "live/cert.pem"\nkey = "live/key.pem"\n')
    config.chmod(0o644)
    # Loaded once as root first: the modules it takes from this Python's
    # library, which nobody may not read where it lies (/root).
    code = ("import os\n"
            "from twistmail import config\n"
            f"config.load({str(config)!r})\n"
            "try:\n    config.load('/nonexistent.toml')\nexcept OSError:\n    pass\n"
            f"os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n"
            f"print(config.load({str(config)!r}).tls.certificate)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "live/cert.pem", r.stderr
    # Where it may look, a file that is not there is still refused.
    live.chmod(0o755)
    (live / "key.pem").unlink()
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, cwd="/")
    finally:
        request_cleanup(tmp_path)
    assert r.returncode != 0 and "tls.key: 'live/key.pem' is not allowed" in r.stderr


def test_a_state_directory_made_under_the_shell_s_umask_is_private(make_appliance):
    """twistd -n keeps the shell's umask (022): the state directory and the
    mailboxes' were 0755, and every local user could list the profile names."""
    a = make_appliance()
    (a.datadir / "mailboxes").mkdir(parents=True, mode=0o755)  # an earlier version's
    a.datadir.chmod(0o755)
    old = os.umask(0o022)
    try:
        a.start()
    finally:
        os.umask(old)
    a.user("SAM")
    import smtplib

    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.sendmail("jane@example.test", ["sam@example.test"], b"Subject: hi\r\n\r\nhi\r\n")
    a.wait_for(lambda: a.mailbox("SAM"), 30, "the delivery")
    for d in (a.datadir, a.datadir / "mailboxes", a.datadir / "journal", a.datadir / "run"):
        assert d.stat().st_mode & 0o077 == 0, (d, oct(d.stat().st_mode))


def test_commands_refuse_state_left_beside_a_link_as_the_daemon_does(tmp_path):
    """wrkusrprf said "(no user profiles)", and wrksmtple made a directory
    database beside the real file, after which the daemon started on it."""
    real = tmp_path / "opt" / "etc"
    real.mkdir(parents=True)
    (real / "twistmail.toml").write_text('[system]\ndatadir = "../var"\n')
    (tmp_path / "etc").mkdir()
    link = tmp_path / "etc" / "twistmail.toml"
    link.symlink_to(real / "twistmail.toml")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "directory.sqlite").write_bytes(b"")
    for command in (["wrkusrprf"], ["wrksmtple"], ["wrkq"]):
        r = subprocess.run([TWISTMAIL, "--config", str(link), *command],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"the state is in {tmp_path / 'var'}, beside the link" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout
    assert not (tmp_path / "opt" / "var").exists()
