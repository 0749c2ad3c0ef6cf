"""Commands run as root make the state directory's files the daemon's user's.

Started as root with ``--uid``, the daemon runs as that user; what a
``sudo twistmail …`` made there as root it could not open (a queued message
set aside as corrupt, a journal receiver never written, every recipient
answered 451).  The CLI runs in a process of its own here: it changes its
effective ids.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from appliance import Appliance

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root's commands switch")
NOBODY = pwd.getpwnam("nobody")
HERE = Path(__file__).resolve().parent.parent


def _interpreter() -> list[str] | None:
    """A Python the daemon's user can run: the test's own, or the system's of its version.

    The commands import modules as they need them, after the switch; an
    interpreter under a directory only root may enter (pyenv in /root) cannot."""
    probe = [sys.executable, "-c", "import email.policy, csv, sqlite3"]
    try:
        subprocess.run(probe, check=True, timeout=60, user=NOBODY.pw_uid,
                       capture_output=True)
        return [sys.executable]
    except (subprocess.CalledProcessError, PermissionError):
        pass
    system = shutil.which("python3", path="/usr/bin")
    if system is None:
        return None
    same = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"],
                          capture_output=True, text=True, timeout=60).stdout.strip()
    return [system] if same == str(tuple(sys.version_info[:2])) else None


@pytest.fixture
def shared():
    """A state directory the daemon's user (nobody) owns, its settings root's."""
    root = Path(tempfile.mkdtemp(prefix="twistmail-root-cli-"))
    root.chmod(0o755)
    a = Appliance(root)
    a.config.chmod(0o644)
    a.datadir.mkdir()
    os.chown(a.datadir, NOBODY.pw_uid, NOBODY.pw_gid)
    yield a
    shutil.rmtree(root, ignore_errors=True)


def _cli(a: Appliance, python: list[str], *args: str) -> subprocess.CompletedProcess:
    paths = [str(HERE), *(p for p in sys.path if "site-packages" in p)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    main = "import sys; from twistmail.cli.main import base; sys.exit(base.run(sys.argv[1:]))"
    return subprocess.run([*python, "-c", main, "--config", str(a.config), *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd=a.root)


def test_roots_commands_leave_the_state_directory_to_its_owner(shared):
    python = _interpreter()
    if python is None:
        pytest.skip("no Python here that nobody may run")
    a = shared
    r = _cli(a, python, "crtusrprf", "--usrprf", "SAM", "--password", "secret")
    assert r.returncode == 0, r.stderr
    # A message file only root may read, in a directory only root may enter.
    private = Path(tempfile.mkdtemp(prefix="twistmail-root-only-"))
    note = private / "note.mime"
    note.write_bytes(b"Subject: from root\r\n\r\nhello\r\n")
    note.chmod(0o600)
    try:
        r = _cli(a, python, "sndmail", "--file", str(note), "--from", "sam@example.test",
                 "--to", "sam@example.test")
        assert r.returncode == 0 and r.stdout.startswith("queued as "), r.stderr
        assert not note.exists()  # taken, and removed as the API says
    finally:
        shutil.rmtree(private, ignore_errors=True)
    r = _cli(a, python, "chgjrn")
    assert r.returncode == 0, r.stderr
    r = _cli(a, python, "chgsmtpa", "--maxrcpt", "50")
    assert r.returncode == 0, r.stderr
    assert "maxrcpt = 50" in a.config.read_text() and a.config.stat().st_uid == 0
    made = [p for p in a.datadir.rglob("*")]
    assert made and all(p.lstat().st_uid == NOBODY.pw_uid for p in made), \
        [str(p) for p in made if p.lstat().st_uid != NOBODY.pw_uid]


def test_a_state_directory_root_made_becomes_the_daemon_users_at_its_first_start():
    """crtusrprf as root before the first start: the directory database was root's."""
    root = Path(tempfile.mkdtemp(prefix="twistmail-first-"))
    root.chmod(0o755)
    a = Appliance(root)
    a.config.chmod(0o644)
    try:
        assert a.cli("crtusrprf", "--usrprf", "SAM", "--password", "secret")[0] == 0
        before = [p for p in a.datadir.rglob("*")]
        assert any(p.name == "directory.sqlite" for p in before)
        outside = root / "outside"
        outside.write_text("root's")
        (a.datadir / "journal").mkdir(exist_ok=True)
        os.link(outside, a.datadir / "journal" / "linked")  # a second name: left alone
        elsewhere = root / "elsewhere"
        elsewhere.write_text("root's too")
        (a.datadir / "journal" / "pointer").symlink_to(elsewhere)  # a link: not followed
        a.start(wait_jobs=False, twistd_args=("--uid", "nobody", "--gid", str(NOBODY.pw_gid)))
        for p in before:
            assert p.lstat().st_uid == NOBODY.pw_uid, p
        assert outside.stat().st_uid == 0 and elsewhere.stat().st_uid == 0
        assert "Traceback" not in a.log_text()
    finally:
        a.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def test_mail_areas_in_roots_hands_are_given_back_at_a_later_start():
    """A ``chown -R`` mistake in mailboxes/, or SNADS stores an older version's
    root command made: after the first start these areas were never walked,
    and their mail was deferred, then returned."""
    root = Path(tempfile.mkdtemp(prefix="twistmail-later-"))
    root.chmod(0o755)
    a = Appliance(root)
    a.config.chmod(0o644)
    args = ("--uid", "nobody", "--gid", str(NOBODY.pw_gid))
    try:
        a.start(wait_jobs=False, twistd_args=args)
        a.stop()
        cur = a.datadir / "mailboxes" / "SAM" / "Maildir" / "cur"
        cur.mkdir(parents=True)
        (cur / "1.mail,S=3:2,").write_text("hi\n")
        store = a.datadir / "snads" / "OVX"
        store.mkdir(parents=True)
        (store / "1.note").write_text("note\n")
        (a.datadir / "snads" / "dstids.json").write_text("{}\n")
        made = [*(a.datadir / "mailboxes" / "SAM").rglob("*"), a.datadir / "mailboxes" / "SAM",
                a.datadir / "snads", *(a.datadir / "snads").rglob("*")]
        assert all(p.lstat().st_uid == 0 for p in made)
        a.start(wait_jobs=False, twistd_args=args)
        assert [str(p) for p in made if p.lstat().st_uid != NOBODY.pw_uid] == []
        assert "Traceback" not in a.log_text()
    finally:
        a.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def test_a_mailbox_in_roots_hands_is_walked_through_no_link_planted_meanwhile(tmp_path):
    """The daemon's user owns mailboxes/: between root's look at a mailbox and
    its walk, it could put a link in its place and have root give away the
    link's target (a walk by path followed it)."""
    from twistmail.controller.service import _give_bulk

    owner = (NOBODY.pw_uid, NOBODY.pw_gid)
    var = tmp_path / "var"
    mailboxes = var / "mailboxes"
    (mailboxes / "SAM" / "Maildir").mkdir(parents=True)
    (mailboxes / "SAM" / "Maildir" / "1.mail").write_text("mail\n")  # root's: a chown -R
    for d in (var, mailboxes):
        os.chown(d, *owner)
    victim = tmp_path / "victim"
    (victim / "SAM").mkdir(parents=True)
    (victim / "SAM" / "shadow").write_text("root's\n")
    fd = os.open(mailboxes, os.O_RDONLY | os.O_DIRECTORY)
    try:
        mailboxes.rename(var / "mailboxes.real")  # what the daemon's user may do meanwhile
        mailboxes.symlink_to(victim)
        _give_bulk(fd, "SAM", str(mailboxes / "SAM"), NOBODY.pw_uid, owner, 1)
    finally:
        os.close(fd)
    assert (victim / "SAM" / "shadow").stat().st_uid == 0
    assert (var / "mailboxes.real" / "SAM" / "Maildir" / "1.mail").stat().st_uid == owner[0]
