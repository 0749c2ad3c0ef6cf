"""The Maildir store (``twistmail.maildir``): delivery durability and POP session semantics."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import fill
from fsyncs import record_fsyncs
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from twistmail.interfaces import IMailboxStore
from twistmail.maildir import (
    EXPUNGE_FILE,
    STUCK_FILE,
    DeletionFailed,
    InvalidName,
    MailboxGone,
    MailboxInUse,
    MaildirError,
    MaildirStore,
    MessageVanished,
    NoSuchMessage,
    SessionClosed,
    base_name,
    uidl_for,
)

HOST = "mail.example.test"
USER = "SAM"
PREFIX = b"Return-Path: <jane@example.test>\r\nDelivered-To: sam@example.test\r\n"
BODY = b"Subject: hello\r\n\r\nline one\r\n.line two\r\n"
PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "mailboxes"


@pytest.fixture
def store(root: Path) -> MaildirStore:
    return MaildirStore(root, HOST)


@pytest.fixture
def body(tmp_path: Path) -> Path:
    path = tmp_path / "body"
    path.write_bytes(BODY)
    return path


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def deliver_ids(store: MaildirStore, tmp_path: Path, *ids: str) -> dict[str, bytes]:
    """Deliver one distinct small message per id; returns id → expected content."""
    sent = {}
    for delivery_id in ids:
        path = tmp_path / f"body-{delivery_id}"
        path.write_bytes(b"Subject: " + delivery_id.encode() + b"\r\n\r\nbody\r\n")
        store.deliver(USER, delivery_id, path, PREFIX)
        sent[delivery_id] = PREFIX + path.read_bytes()
    return sent


def run_python(
    script: str, *, wait: bool = True, **kwargs
) -> subprocess.Popen | subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    argv = [sys.executable, "-c", textwrap.dedent(script)]
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True, **kwargs)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, **kwargs)


# -- layout and names ----------------------------------------------------------


def test_implements_the_interface(store: MaildirStore) -> None:
    assert verifyObject(IMailboxStore, store)


def test_layout_and_modes(store: MaildirStore, root: Path, body: Path) -> None:
    maildir = store.ensure("sam")
    assert maildir == root / "SAM" / "Maildir" == store.path("Sam")
    for directory in (root / "SAM", maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    delivered = store.deliver(USER, "Q1.R1", body, PREFIX)
    assert stat.S_IMODE(delivered.stat().st_mode) == 0o600


def test_deliver_creates_the_mailbox_on_first_use(store: MaildirStore, body: Path) -> None:
    delivered = store.deliver("jane", "Q1.R1", body, PREFIX)
    assert delivered.parent == store.path("JANE") / "new"


@pytest.mark.parametrize(
    "user", ["", "../SAM", "A/B", "..", ".", "TOOLONGNAME", "JANE.DOE", "A B", "SAM\n", "ıAN", 7]
)
def test_bad_user_is_refused(store: MaildirStore, root: Path, body: Path, user: object) -> None:
    with pytest.raises(InvalidName):
        store.path(user)  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        store.deliver(user, "Q1.R1", body, PREFIX)  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        store.open(user)  # type: ignore[arg-type]
    assert not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize("delivery_id", ["", ".hidden", "../x", "a/b", "a:2,", "a,S=1", "x" * 101])
def test_bad_delivery_id_is_refused(store: MaildirStore, body: Path, delivery_id: str) -> None:
    with pytest.raises(InvalidName):
        store.deliver(USER, delivery_id, body, PREFIX)


def test_name_is_delivery_id_host_and_size(store: MaildirStore, body: Path) -> None:
    delivered = store.deliver(USER, "0a1b2c.R3", body, PREFIX)
    size = len(PREFIX) + len(BODY)
    assert delivered.name == f"0a1b2c.R3.{HOST},S={size}"
    assert delivered.read_bytes() == PREFIX + BODY


def test_host_name_is_made_safe(root: Path, body: Path) -> None:
    store = MaildirStore(root, "odd/host:name,x y")
    delivered = store.deliver(USER, "Q1", body, PREFIX)
    assert delivered.name.startswith("Q1.odd\\057host\\072name\\054x\\040y,S=")
    with store.open(USER) as session:
        (msg,) = session.messages()
    assert msg.uidl == "Q1.odd\\057host\\072name\\054x\\040y"


# -- delivery ------------------------------------------------------------------


def test_deliver_twice_leaves_one_copy(store: MaildirStore, body: Path) -> None:
    first = store.deliver(USER, "Q1.R1", body, PREFIX)
    second = store.deliver(USER, "Q1.R1", body, PREFIX)
    maildir = store.path(USER)
    assert first == second
    assert files(maildir / "new") == [first.name]
    assert files(maildir / "tmp") == files(maildir / "cur") == []


@pytest.mark.parametrize("info", [":2,", ":2,S"])
def test_deliver_again_after_the_message_moved_to_cur(
    store: MaildirStore, body: Path, info: str
) -> None:
    first = store.deliver(USER, "Q1.R1", body, PREFIX)
    store.open(USER).close()
    maildir = store.path(USER)
    assert files(maildir / "cur") == [first.name + ":2,"]
    os.rename(maildir / "cur" / (first.name + ":2,"), maildir / "cur" / (first.name + info))
    again = store.deliver(USER, "Q1.R1", body, PREFIX)
    assert again == maildir / "cur" / (first.name + info)
    assert files(maildir / "new") == [] and files(maildir / "tmp") == []
    assert len(files(maildir / "cur")) == 1


def test_a_repeated_delivery_flushes_the_folder_it_finds_the_copy_in(
    store: MaildirStore, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt that made the copy may have died before flushing new/, and
    the caller drops its queue copy once this returns."""
    first = store.deliver(USER, "Q1.R1", body, PREFIX)
    synced = record_fsyncs(monkeypatch)
    assert store.deliver(USER, "Q1.R1", body, PREFIX) == first
    assert synced == [str(store.path(USER) / "new")]


def test_a_queued_file_that_is_the_copy_is_linked_in_and_only_new_is_synced(
        store: MaildirStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that begins with the delivery's trace fields (the queue's
    ``trace``) is the mailbox copy already, durable since its 250: linked,
    not written again."""
    queued = tmp_path / "queued"
    queued.write_bytes(PREFIX + BODY)
    store.ensure(USER)
    synced = record_fsyncs(monkeypatch)
    delivered = store.deliver(USER, "Q1.R0", queued, PREFIX, trace=len(PREFIX))
    assert os.path.samefile(delivered, queued) and delivered.parent.name == "new"
    assert delivered.name == f"Q1.R0.{HOST},S={len(PREFIX + BODY)}"
    assert synced == [str(store.path(USER) / "new")]
    assert delivered.stat().st_mode & 0o777 == 0o400  # so the queue never reuses it
    os.unlink(queued)  # the queue lets go of its name: the mailbox keeps the message
    assert delivered.read_bytes() == PREFIX + BODY
    assert store.deliver(USER, "Q1.R0", delivered, PREFIX, trace=len(PREFIX)) == delivered
    assert files(store.path(USER) / "tmp") == []


@pytest.mark.parametrize("trace", [
    b"Return-Path: <other@example.test>\r\nDelivered-To: sam@example.test\r\n",  # same length
    b"Return-Path: <>\r\n",
])
def test_a_queued_file_with_other_trace_fields_gives_a_copy_without_them(
        store: MaildirStore, tmp_path: Path, trace: bytes) -> None:
    queued = tmp_path / "queued"
    queued.write_bytes(trace + BODY)
    delivered = store.deliver(USER, "Q1.R0", queued, PREFIX, trace=len(trace))
    assert not os.path.samefile(delivered, queued)
    assert delivered.read_bytes() == PREFIX + BODY
    assert delivered.name == f"Q1.R0.{HOST},S={len(PREFIX + BODY)}"


def test_a_queued_file_on_another_file_system_is_copied(
        store: MaildirStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    queued = tmp_path / "queued"
    queued.write_bytes(PREFIX + BODY)
    real = os.link

    def cross_device(src: object, dst: object, **kw: object) -> None:
        if str(src) == str(queued):
            raise OSError(18, "Invalid cross-device link")
        real(src, dst, **kw)

    monkeypatch.setattr(os, "link", cross_device)
    delivered = store.deliver(USER, "Q1.R0", queued, PREFIX, trace=len(PREFIX))
    assert not os.path.samefile(delivered, queued)
    assert delivered.read_bytes() == PREFIX + BODY


def test_a_body_shorter_than_its_trace_is_refused(store: MaildirStore, tmp_path: Path) -> None:
    queued = tmp_path / "queued"
    queued.write_bytes(PREFIX[:10])
    with pytest.raises(MaildirError):
        store.deliver(USER, "Q1.R0", queued, PREFIX, trace=len(PREFIX))


def test_recipients_of_one_message_get_one_copy_each(store: MaildirStore, body: Path) -> None:
    store.deliver(USER, "Q1.R1", body, PREFIX)
    store.deliver(USER, "Q1.R2", body, PREFIX)
    assert len(files(store.path(USER) / "new")) == 2


def write_big_body(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = (b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.\r\n" * 1024)[:65536]
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("sendfile", [True, False], ids=["sendfile", "chunked"])
def test_big_body_is_streamed_not_loaded(
    store: MaildirStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sendfile: bool
) -> None:
    if not sendfile:

        def no_sendfile(*args: object) -> int:
            raise OSError(22, "Invalid argument")

        monkeypatch.setattr(os, "sendfile", no_sendfile)
    big = tmp_path / "big"
    body_digest = write_big_body(big, 30 * 1024 * 1024)
    store.ensure(USER)
    tracemalloc.start()
    try:
        delivered = store.deliver(USER, "Q1.R1", big, PREFIX)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024 * 1024
    assert delivered.stat().st_size == len(PREFIX) + big.stat().st_size
    with open(delivered, "rb") as f:
        assert f.read(len(PREFIX)) == PREFIX
    copy = tmp_path / "copy"
    with open(delivered, "rb") as src, open(copy, "wb") as dst:
        src.seek(len(PREFIX))
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    assert file_digest(copy) == body_digest


def test_fsync_of_file_then_link_then_fsync_of_new(
    store: MaildirStore, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.ensure(USER)
    events: list[tuple[str, str]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def link(src: object, dst: object) -> None:
        events.append(("link", str(dst)))
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    delivered = store.deliver(USER, "Q1.R1", body, PREFIX)
    maildir = store.path(USER)
    in_tmp = str(maildir / "tmp") + "/"
    tmp_file = next(i for i, (op, p) in enumerate(events) if op == "fsync" and p.startswith(in_tmp))
    linked = events.index(("link", str(delivered)))
    new_dir = events.index(("fsync", str(maildir / "new")))
    assert tmp_file < linked < new_dir


def test_names_sort_by_queue_id(store: MaildirStore, tmp_path: Path) -> None:
    deliver_ids(store, tmp_path, "0003.R1", "0001.R2", "0002.R1", "0001.R1")
    with store.open(USER) as session:
        order = [m.uidl for m in session.messages()]
    assert order == [f"{q}.{HOST}" for q in ("0001.R1", "0001.R2", "0002.R1", "0003.R1")]


def test_sigkill_during_delivery_leaves_only_tmp_and_retry_succeeds(
    store: MaildirStore, root: Path, body: Path
) -> None:
    result = run_python(f"""
        import os, signal
        from twistmail.maildir import MaildirStore
        os.link = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        MaildirStore({str(root)!r}, {HOST!r}).deliver("SAM", "Q1.R1", {str(body)!r}, {PREFIX!r})
    """)
    assert result.returncode == -signal.SIGKILL, result.stderr
    maildir = store.path(USER)
    assert len(files(maildir / "tmp")) == 1
    assert files(maildir / "new") == files(maildir / "cur") == []
    delivered = store.deliver(USER, "Q1.R1", body, PREFIX)
    assert delivered.read_bytes() == PREFIX + BODY
    with store.open(USER) as session:
        assert session.stat() == (1, len(PREFIX + BODY))


def test_a_mailbox_whose_new_is_gone_is_mended_by_the_next_delivery(
    store: MaildirStore, body: Path
) -> None:
    """tmp/ left alone, new/ removed by hand: every delivery used to fail on the link."""
    maildir = store.ensure(USER)
    (maildir / "new").rmdir()
    delivered = store.deliver(USER, "Q1.R1", body, PREFIX)
    assert delivered.parent == maildir / "new" and delivered.read_bytes() == PREFIX + BODY
    assert files(maildir / "tmp") == []


def test_stale_tmp_files_are_removed_by_a_session(store: MaildirStore) -> None:
    tmp = store.ensure(USER) / "tmp"
    (tmp / "stale").write_bytes(b"x")
    (tmp / "fresh").write_bytes(b"x")
    old = time.time() - 37 * 3600
    os.utime(tmp / "stale", (old, old))
    store.open(USER).close()
    assert files(tmp) == ["fresh"]


# -- sessions: locking -----------------------------------------------------------


def test_second_open_is_refused_until_close(store: MaildirStore) -> None:
    session = store.open(USER)
    with pytest.raises(MailboxInUse):
        store.open("sam")
    session.close()
    store.open(USER).close()


@pytest.mark.parametrize("step", ["_take_lock", "_remove_older", "_move_new"])
def test_a_mailbox_removed_while_it_opens_is_gone_not_an_error(
        store: MaildirStore, root: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """DLTUSRPRF *DLT removes the tree between a POP sign-on's password check
    and its open: the session is refused, with no traceback and no lock left."""
    import shutil

    import twistmail.maildir as maildir

    store.ensure(USER)
    original = getattr(maildir, step)

    def removed_first(*args: object, **kw: object) -> object:
        shutil.rmtree(root / USER)
        return original(*args, **kw)

    monkeypatch.setattr(maildir, step, removed_first)
    with pytest.raises(MailboxGone):
        store.open(USER)
    monkeypatch.setattr(maildir, step, original)
    store.open(USER).close()  # a profile made again under the name opens its mailbox


def test_lock_is_released_by_commit(store: MaildirStore) -> None:
    session = store.open(USER)
    session.commit()
    store.open(USER).commit()


def test_other_mailboxes_are_not_locked(store: MaildirStore) -> None:
    with store.open(USER), store.open("JANE"):
        pass


def test_lock_is_released_when_the_holder_dies(store: MaildirStore, root: Path) -> None:
    holder = run_python(
        f"""
        import sys, time
        from twistmail.maildir import MaildirStore
        session = MaildirStore({str(root)!r}, {HOST!r}).open("SAM")
        print("locked", flush=True)
        time.sleep(60)
        """,
        wait=False,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MailboxInUse):
            store.open(USER)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    store.open(USER).close()


def test_closed_session_refuses_use(store: MaildirStore) -> None:
    session = store.open(USER)
    session.close()
    session.close()
    assert session.closed
    for call in (session.messages, session.stat, session.commit, session.undelete_all):
        with pytest.raises(SessionClosed):
            call()
    with pytest.raises(SessionClosed):
        session.read(1)


# -- sessions: snapshot, sizes, uidl -----------------------------------------------


def test_new_mail_is_moved_to_cur_with_info(store: MaildirStore, body: Path) -> None:
    delivered = store.deliver(USER, "Q1.R1", body, PREFIX)
    with store.open(USER) as session:
        (msg,) = session.messages()
    maildir = store.path(USER)
    assert files(maildir / "new") == []
    assert msg.path == maildir / "cur" / (delivered.name + ":2,")


def test_snapshot_is_stable_during_the_session(store: MaildirStore, tmp_path: Path) -> None:
    deliver_ids(store, tmp_path, "0001.R1")
    session = store.open(USER)
    deliver_ids(store, tmp_path, "0002.R1")
    assert [m.uidl for m in session.messages()] == [f"0001.R1.{HOST}"]
    assert session.stat()[0] == 1
    with pytest.raises(NoSuchMessage):
        session.read(2)
    session.commit()
    with store.open(USER) as session:
        assert [m.uidl for m in session.messages()] == [f"0001.R1.{HOST}", f"0002.R1.{HOST}"]


def test_stat_and_sizes_are_exact_octets(store: MaildirStore, tmp_path: Path) -> None:
    sent = deliver_ids(store, tmp_path, "0001.R1", "0002.R1", "0003.R1")
    with store.open(USER) as session:
        assert session.stat() == (3, sum(len(v) for v in sent.values()))
        for msg, content in zip(session.messages(), sent.values(), strict=True):
            assert msg.size == len(content) == msg.path.stat().st_size
            with session.read(msg.index) as f:
                assert f.read() == content


def test_read_small_gives_a_range_or_none_when_over_the_limit(
    store: MaildirStore, tmp_path: Path
) -> None:
    sent = deliver_ids(store, tmp_path, "0001.R1")["0001.R1"]
    with store.open(USER) as session:
        size = len(sent)
        assert session.read_small(1, 0, None, size) == sent
        assert session.read_small(1, 0, None, size - 1) is None
        assert session.read_small(1, 3, 10, 7) == sent[3:10]
        assert session.read_small(1, 3, 10, 6) is None
        msg = session.message(1)
        os.rename(msg.path, msg.path.with_name(msg.path.name + "S"))  # another reader's flag
        assert session.read_small(1, 0, None, size) == sent


def test_uidl_is_stable_across_sessions_and_processes(
    store: MaildirStore, root: Path, tmp_path: Path
) -> None:
    deliver_ids(store, tmp_path, "0001.R1", "0002.R1")
    with store.open(USER) as session:
        first = [m.uidl for m in session.messages()]
    with store.open(USER) as session:
        assert [m.uidl for m in session.messages()] == first
    result = run_python(f"""
        import json
        from twistmail.maildir import MaildirStore
        with MaildirStore({str(root)!r}, {HOST!r}).open("SAM") as session:
            print(json.dumps([m.uidl for m in session.messages()]))
    """)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == first
    assert len(set(first)) == 2


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=120), st.text(min_size=1, max_size=120))
def test_uidl_is_valid_and_distinct(a: str, b: str) -> None:
    for name in (a, b):
        uidl = uidl_for(name)
        assert 1 <= len(uidl) <= 70
        assert all(0x21 <= ord(c) <= 0x7E for c in uidl)
    if a != b:
        assert uidl_for(a) != uidl_for(b)


def test_base_name_ignores_info_and_fields() -> None:
    assert base_name("Q1.R1.host,S=12:2,S") == base_name("Q1.R1.host,S=12,W=13") == "Q1.R1.host"
    assert base_name("1700000000.M1P2.host") == "1700000000.M1P2.host"


# -- sessions: deletion -------------------------------------------------------------


def test_dele_marks_rset_unmarks_and_close_deletes_nothing(
    store: MaildirStore, tmp_path: Path
) -> None:
    sent = deliver_ids(store, tmp_path, "0001.R1", "0002.R1", "0003.R1")
    sizes = [len(v) for v in sent.values()]
    session = store.open(USER)
    paths = [m.path for m in session.messages()]
    session.mark_deleted(2)
    assert [m.index for m in session.messages()] == [1, 3]
    assert session.stat() == (2, sizes[0] + sizes[2])
    for call in (session.read, session.mark_deleted, session.message):
        with pytest.raises(NoSuchMessage):
            call(2)
    assert all(p.exists() for p in paths)
    session.undelete_all()
    assert session.stat() == (3, sum(sizes))
    session.mark_deleted(1)
    session.mark_deleted(3)
    session.close()
    assert all(p.exists() for p in paths)
    with store.open(USER) as again:
        assert again.stat() == (3, sum(sizes))


def test_commit_deletes_the_marked_messages(store: MaildirStore, tmp_path: Path) -> None:
    deliver_ids(store, tmp_path, "0001.R1", "0002.R1", "0003.R1")
    session = store.open(USER)
    paths = [m.path for m in session.messages()]
    session.mark_deleted(1)
    session.mark_deleted(3)
    assert all(p.exists() for p in paths)
    session.commit()
    assert [p.exists() for p in paths] == [False, True, False]
    assert not (store.path(USER) / EXPUNGE_FILE).exists()
    with store.open(USER) as again:
        (msg,) = again.messages()
        assert (msg.index, msg.uidl) == (1, f"0002.R1.{HOST}")


def test_decide_is_the_point_of_no_return(store: MaildirStore, tmp_path: Path) -> None:
    """After decide, the deletions happen even if the session never expunges."""
    deliver_ids(store, tmp_path, "0001.R1", "0002.R1", "0003.R1")
    session = store.open(USER)
    paths = [m.path for m in session.messages()]
    session.mark_deleted(2)
    assert session.decide() == 1
    with pytest.raises(SessionClosed):
        session.mark_deleted(1)
    assert all(p.exists() for p in paths)  # nothing unlinked yet
    session.close()  # the job ends (or dies) before its expunge
    with store.open(USER) as again:
        assert [m.uidl for m in again.messages()] == [f"0001.R1.{HOST}", f"0003.R1.{HOST}"]
    assert [p.exists() for p in paths] == [True, False, True]
    assert not (store.path(USER) / EXPUNGE_FILE).exists()
    # The finishing open recorded the removal too: a retried delivery makes no copy.
    assert sorted(p.name for p in (store.path(USER).parent / "gone").iterdir()) == [".pruned",
        base_name(paths[1].name)]


def test_an_open_waits_for_a_quit_that_is_unlinking(
    store: MaildirStore, root: Path, tmp_path: Path
) -> None:
    """A client that logs in again right after QUIT gets the box as QUIT left it."""
    deliver_ids(store, tmp_path, "0001.R1", "0002.R1")
    holder = run_python(
        f"""
        import time
        from twistmail.maildir import MaildirStore
        session = MaildirStore({str(root)!r}, {HOST!r}).open("SAM")
        session.mark_deleted(1)
        session.decide()
        print("decided", flush=True)
        time.sleep(0.5)
        session.expunge()
        """,
        wait=False,
    )
    try:
        assert holder.stdout.readline().strip() == "decided"
        with store.open(USER) as session:
            assert [m.uidl for m in session.messages()] == [f"0002.R1.{HOST}"]
        assert holder.wait(10) == 0
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


@pytest.mark.parametrize("index", [0, 4, -1])
def test_out_of_range_numbers(store: MaildirStore, tmp_path: Path, index: int) -> None:
    deliver_ids(store, tmp_path, "0001.R1", "0002.R1", "0003.R1")
    with store.open(USER) as session:
        for call in (session.read, session.mark_deleted, session.message):
            with pytest.raises(NoSuchMessage):
                call(index)


def test_commit_is_all_or_nothing_across_a_crash(
    store: MaildirStore, root: Path, tmp_path: Path
) -> None:
    deliver_ids(store, tmp_path, "0001.R1", "0002.R1", "0003.R1", "0004.R1")
    result = run_python(f"""
        import os, signal
        from twistmail.maildir import MaildirStore
        session = MaildirStore({str(root)!r}, {HOST!r}).open("SAM")
        for index in (1, 2, 4):
            session.mark_deleted(index)
        real_unlink, seen = os.unlink, []
        def unlink(path, *args, **kwargs):
            if "/cur/" in str(path):
                seen.append(path)
                if len(seen) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            real_unlink(path, *args, **kwargs)
        os.unlink = unlink
        session.commit()
    """)
    assert result.returncode == -signal.SIGKILL, result.stderr
    maildir = store.path(USER)
    assert (maildir / EXPUNGE_FILE).exists()
    assert len(files(maildir / "cur")) == 3
    with store.open(USER) as session:
        assert [m.uidl for m in session.messages()] == [f"0003.R1.{HOST}"]
    assert len(files(maildir / "cur")) == 1
    assert not (maildir / EXPUNGE_FILE).exists()


def test_a_deleted_message_that_cannot_be_removed_never_comes_back(
    store: MaildirStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its file stays (read-only file system, a disk error) over several
    sessions; no session offers it, and it goes once it can."""
    deliver_ids(store, tmp_path, "0001.R1", "0002.R1", "0003.R1")
    maildir = store.path(USER)
    real_unlink = os.unlink
    stuck = {"on": True}

    def unlink(path, *args, **kwargs):
        if stuck["on"] and "0002.R1" in str(path) and "/cur/" in str(path):
            raise OSError(errno.EPERM, "Operation not permitted")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    session = store.open(USER)
    session.mark_deleted(1)
    session.mark_deleted(2)
    with pytest.raises(DeletionFailed):
        session.commit()
    for _ in range(2):  # opened again while the file still cannot go: not offered
        with store.open(USER) as again:
            assert [m.uidl for m in again.messages()] == [f"0003.R1.{HOST}"]
        # Recorded apart from the QUIT log: a login meeting a session that
        # holds the box is told at once, not made to wait for a QUIT's end.
        assert not (maildir / EXPUNGE_FILE).exists() and (maildir / STUCK_FILE).exists()
    with store.open(USER) as holder:
        started = time.monotonic()
        with pytest.raises(MailboxInUse):
            store.open(USER)
        assert time.monotonic() - started < 2
        # Its own deletions go as ever: the stuck file is none of its doing.
        holder.mark_deleted(1)
        holder.commit()
    assert [m for m in files(maildir / "cur") if "0002.R1" in m] != []
    with store.open(USER) as again:  # the stuck file is no deletion of a later session
        assert again.messages() == []
        assert again.decide() == 0
    stuck["on"] = False  # mended
    with store.open(USER) as again:
        assert again.messages() == []
    assert files(maildir / "cur") == [] and not (maildir / STUCK_FILE).exists()


def test_read_of_a_vanished_message_is_a_clear_error(store: MaildirStore, tmp_path: Path) -> None:
    deliver_ids(store, tmp_path, "0001.R1", "0002.R1")
    session = store.open(USER)
    gone = session.message(1)
    os.unlink(gone.path)
    with pytest.raises(MessageVanished, match=gone.uidl):
        session.read(1)
    session.mark_deleted(1)
    session.mark_deleted(2)
    session.commit()
    assert files(store.path(USER) / "cur") == []


def test_message_renamed_by_another_reader_is_followed(store: MaildirStore, tmp_path: Path) -> None:
    sent = deliver_ids(store, tmp_path, "0001.R1")
    session = store.open(USER)
    msg = session.message(1)
    flagged = msg.path.with_name(msg.path.name + "RS")
    os.rename(msg.path, flagged)
    with session.read(1) as f:
        assert f.read() == sent["0001.R1"]
    session.mark_deleted(1)
    session.commit()
    assert not flagged.exists()


def test_a_link_or_fifo_put_in_a_message_s_place_is_not_read(
        store: MaildirStore, tmp_path: Path) -> None:
    """Listed as a file, then swapped for a symlink to /etc/passwd (or a FIFO,
    which would hang the job) by another program with access to the Maildir."""
    deliver_ids(store, tmp_path, "0001.R1", "0002.R1")
    session = store.open(USER)
    first, second = session.message(1), session.message(2)
    os.unlink(first.path)
    os.symlink("/etc/passwd", first.path)
    os.unlink(second.path)
    os.mkfifo(second.path)
    for index in (1, 2):
        with pytest.raises(MessageVanished):
            session.read(index)
        with pytest.raises(MessageVanished):
            session.read_small(index, 0, None, 1000)
    session.close()


# -- coexistence with other Maildir writers and readers ---------------------------


@pytest.mark.parametrize("stem", ["dup", "1700000000.M1P2.other,S=22"])
def test_names_that_differ_only_in_their_info_both_stay(store: MaildirStore, stem: str) -> None:
    """Another program's dup:2,a and dup:2,b both went to cur/dup:2, (one lost);
    with Maildir++ fields, a second name of the same base was taken for a copy."""
    new = store.ensure(USER) / "new"
    (new / f"{stem}:2,a").write_bytes(b"Subject: first\r\n\r\n1\r\n")
    (new / f"{stem}:2,b").write_bytes(b"Subject: second\r\n\r\n2\r\n")
    with store.open(USER) as session:
        texts = set()
        for m in session.messages():
            with session.read(m.index) as f:
                texts.add(f.read())
    assert texts == {b"Subject: first\r\n\r\n1\r\n", b"Subject: second\r\n\r\n2\r\n"}
    assert files(new) == []
    with store.open(USER) as session:
        assert len(session.messages()) == 2
        session.commit()  # nothing marked: nothing goes
    assert len(files(store.path(USER) / "cur")) == 2


def test_foreign_message_is_listed_and_read(store: MaildirStore, tmp_path: Path) -> None:
    sent = deliver_ids(store, tmp_path, "0001.R1")
    foreign = b"From: a@b\nSubject: imported\n\nplain LF body\n"
    path = store.path(USER) / "new" / "1700000000.M12P34.otherhost"
    path.write_bytes(foreign)
    wire = len(foreign) + foreign.count(b"\n")  # as POP sends it: CRLF line ends
    with store.open(USER) as session:
        first, second = session.messages()
        assert (first.uidl, first.size) == ("1700000000.M12P34.otherhost", wire)
        with session.read(first.index) as f:
            assert f.read() == foreign
        assert second.size == len(sent["0001.R1"])
        assert session.stat() == (2, wire + second.size)
    # Worked out once: the size as sent is kept in the name (Maildir++ W=).
    assert f"1700000000.M12P34.otherhost,W={wire}:2," in files(store.path(USER) / "cur")
    with store.open(USER) as session:
        assert [(m.uidl, m.size) for m in session.messages()][0] == (
            "1700000000.M12P34.otherhost", wire)


def test_another_program_s_files_named_for_this_host_are_sized_as_sent(
    store: MaildirStore,
) -> None:
    """Dovecot or Postfix on the same host before twistmail: their names end in
    our host name as ours do, and their S= (or the file's size) counts bare LFs."""
    text = b"From: a@old\nSubject: x\n\nline1\n.dotline\n..two\n.\nend\n"
    wire = len(text) + text.count(b"\n")
    cur, new = store.ensure(USER) / "cur", store.path(USER) / "new"
    (cur / f"1700000004.M4P4.{HOST},S={len(text)},W={wire}:2,S").write_bytes(text)
    (new / f"1700000005.V801I1M5.{HOST}").write_bytes(text)
    with store.open(USER) as session:
        assert [m.size for m in session.messages()] == [wire, wire]
        assert session.stat() == (2, 2 * wire)


def test_the_size_of_another_program_s_file_is_what_pop_sends(tmp_path: Path) -> None:
    from twistmail.maildir import wire_size
    from twistmail.pop3.server import DotStuffer

    # The last two: LIST said 2 and 1 octets fewer than RETR sent (RFC 1939 §11).
    for data in (b"a\nb\r\nc\rd\n", b"\r\n" * 5 + b"x\n", b"x" * 70000 + b"\r\n", b"",
                 b"no end", b"ends in CR\r"):
        path = tmp_path / "m"
        path.write_bytes(data)
        stuffer = DotStuffer()
        sent = stuffer.feed(data[:65536]) + stuffer.feed(data[65536:]) + stuffer.end()
        assert sent.endswith(b".\r\n")
        assert wire_size(str(path)) == len(sent[:-3].replace(b"\r\n..", b"\r\n.")), data


def test_foreign_messages_are_ordered_by_mtime(store: MaildirStore) -> None:
    cur = store.ensure(USER) / "cur"
    for name, age in (("b", 100), ("a", 50), ("c", 200)):
        (cur / f"{name}:2,S").write_bytes(b"x\n")
        os.utime(cur / f"{name}:2,S", (time.time() - age, time.time() - age))
    with store.open(USER) as session:
        assert [m.uidl for m in session.messages()] == ["c", "b", "a"]


def test_copies_with_one_base_name_are_listed_once(
    store: MaildirStore, tmp_path: Path, body: Path
) -> None:
    store.deliver(USER, "Q1.R1", body, PREFIX)
    store.deliver(USER, "Q1.R1", body, PREFIX + b"X-Retry: 1\r\n")
    cur = store.path(USER) / "cur"
    assert len(files(store.path(USER) / "new")) == 2
    with store.open(USER) as session:
        assert len(session.messages()) == 1
    assert len(files(cur)) == 2
    session = store.open(USER)
    session.commit()
    assert len(files(cur)) == 1
    with store.open(USER) as session:
        assert [m.uidl for m in session.messages()] == [f"Q1.R1.{HOST}"]


@pytest.mark.parametrize("reverse", [False, True])
def test_another_program_s_messages_with_one_base_are_two_messages(
        store: MaildirStore, monkeypatch, reverse: bool) -> None:
    """Names no delivery of ours makes, one base: the second was taken for a
    copy of the first, never listed, and removed at QUIT.  Whichever order
    the directory lists them in, the earlier keeps its name."""
    from twistmail import maildir as maildirmod

    real = maildirmod._message_files
    monkeypatch.setattr(maildirmod, "_message_files", lambda directory: sorted(
        real(directory), key=lambda e: e.name, reverse=reverse))
    maildir = store.ensure(USER)
    old = time.time() - 3600
    (maildir / "cur" / "1700000100.M1P1.otherhost:2,S").write_bytes(b"Subject: old\n\nold\n")
    os.utime(maildir / "cur" / "1700000100.M1P1.otherhost:2,S", (old, old))
    (maildir / "new" / "1700000100.M1P1.otherhost").write_bytes(b"Subject: new\n\nnew\n")
    (maildir / "cur" / "dup1:2,S").write_bytes(b"Subject: a\n\na\n")
    os.utime(maildir / "cur" / "dup1:2,S", (old, old))
    (maildir / "cur" / "dup1,S=40:2,").write_bytes(b"Subject: b\n\nb\n")
    with store.open(USER) as session:
        messages = session.messages()
        subjects = {}
        for m in messages:
            with session.read(m.index) as f:
                subjects[m.uidl] = f.read().split(b"\n")[0]
        assert sorted(subjects.values()) == [b"Subject: a", b"Subject: b", b"Subject: new",
                                             b"Subject: old"]
        # The earlier message keeps the UIDL a client may have seen; the later gets one.
        assert subjects["1700000100.M1P1.otherhost"] == b"Subject: old"
        assert subjects["dup1"] == b"Subject: a"
        session.commit()  # deletes nothing: nothing was marked
    assert len(files(maildir / "cur")) == 4
    with store.open(USER) as session:
        assert sorted(m.uidl for m in session.messages()) == sorted(m.uidl for m in messages)


def test_a_session_whose_mailbox_was_deleted_meanwhile_is_told_so(
    store: MaildirStore, body: Path
) -> None:
    """DLTUSRPRF OWNOBJOPT(*DLT) while a POP session holds the mailbox: RETR
    got an unhandled FileNotFoundError and the client a dropped connection."""
    import shutil

    from twistmail.maildir import MaildirError

    store.deliver(USER, "Q1.R1", body, PREFIX)
    with store.open(USER) as mailbox:
        [message] = mailbox.messages()
        shutil.rmtree(store.path(USER).parent)
        with pytest.raises(MaildirError):
            mailbox.read(message.index)


def test_a_copy_fetched_and_deleted_is_not_delivered_again(store: MaildirStore,
                                                          body: Path) -> None:
    from twistmail.maildir import GONE_DIR

    first = store.deliver(USER, "Q1.R1", body, PREFIX)
    with store.open(USER) as mailbox:
        [message] = mailbox.messages()
        mailbox.mark_deleted(message.index)
        mailbox.commit()
    assert (store.path(USER).parent / GONE_DIR / base_name(first.name)).exists()
    again = store.deliver(USER, "Q1.R1", body, PREFIX)  # a crashed delivery, tried again
    assert again == first and files(store.path(USER) / "new") == []
    store.deliver(USER, "Q2.R1", body, PREFIX)  # other mail still comes in
    assert len(files(store.path(USER) / "new")) == 1


def test_the_names_of_removed_messages_are_forgotten_after_a_while(
        store: MaildirStore, body: Path) -> None:
    from twistmail.maildir import GONE_DIR, GONE_MAX_AGE, GONE_PRUNE_EVERY

    store.deliver(USER, "Q1.R1", body, PREFIX)
    with store.open(USER) as mailbox:
        mailbox.mark_deleted(1)
        mailbox.commit()
    gone = store.path(USER).parent / GONE_DIR
    [tombstone] = list(gone.iterdir())
    old = time.time() - GONE_MAX_AGE - 60
    os.utime(tombstone, (old, old))
    store.open(USER).close()  # the first open looks, and stamps when it did
    assert [p.name for p in gone.iterdir()] == [".pruned"]
    tombstone.touch()
    os.utime(tombstone, (old, old))
    store.open(USER).close()  # not again within GONE_PRUNE_EVERY
    assert tombstone.exists() and GONE_PRUNE_EVERY > 60


def test_on_a_full_disk_a_user_can_still_delete_mail(full_disk: Path, tmp_path: Path) -> None:
    """QUIT's log has no room: the files go before the answer, which frees room."""
    store = MaildirStore(full_disk / "mailboxes", HOST)
    deliver_ids(store, tmp_path, "Q1.R0", "Q2.R0", "Q3.R0")
    fill(full_disk)
    with pytest.raises(OSError):
        (full_disk / "probe").write_bytes(b"x" * 4096)
    box = store.open(USER)
    assert len(box.messages()) == 3
    box.mark_deleted(1)
    box.mark_deleted(2)
    assert box.decide() == 2
    box.expunge()
    cur = full_disk / "mailboxes" / USER / "Maildir" / "cur"
    assert len(files(cur)) == 1
    assert not (full_disk / "mailboxes" / USER / "Maildir" / EXPUNGE_FILE).exists()
    with store.open(USER) as again:
        assert len(again.messages()) == 1


def test_a_login_waits_for_a_quit_removing_many_messages_while_it_goes_on(
        store: MaildirStore, monkeypatch) -> None:
    """A QUIT that deleted 50,000 messages on a busy machine took longer than
    the wait, and the next login got [IN-USE]: the wait now counts from the
    last file removed, not from the start."""
    import fcntl
    import threading

    from twistmail import maildir as maildirmod

    monkeypatch.setattr(maildirmod, "EXPUNGE_WAIT", 0.3)
    box = store.ensure(USER)
    for i in range(10):
        (box / "cur" / f"m{i}").write_bytes(b"x")
    holder = open(box / maildirmod.LOCK_FILE, "a+b")  # noqa: SIM115
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    (box / EXPUNGE_FILE).write_bytes(b"")

    def quit_slowly() -> None:  # 1 s in all, a file each 0.1 s
        for i in range(10):
            time.sleep(0.1)
            (box / "cur" / f"m{i}").unlink()
        (box / EXPUNGE_FILE).unlink()
        holder.close()

    worker = threading.Thread(target=quit_slowly)
    worker.start()
    try:
        store.open(USER).close()  # waited past EXPUNGE_WAIT, while files went
    finally:
        worker.join()


def test_the_bridge_sweeps_what_killed_deliveries_left_in_every_tmp(make_appliance):
    """A delivery killed midway leaves its file in tmp/.  Only a POP sign-on
    removed it (36 hours on), so SNADS stores and the mailboxes of profiles
    that never sign on kept it for ever; the bridge sweeps them all at start
    (and every hour)."""
    a = make_appliance()
    rc, _, err = a.cli("crtusrprf", "--usrprf", "MAILONLY", "--password", "*NONE")
    assert rc == 0, err
    old = time.time() - 37 * 3600
    left = []
    for root, owner in (("snads", "OVUSER"), ("mailboxes", "MAILONLY")):
        tmp = a.datadir / root / owner / "Maildir" / "tmp"
        tmp.mkdir(parents=True)
        for name, when in (("old.R0.host,S=10.1.ab", old), ("young.R0.host,S=10.2.cd", None)):
            (tmp / name).write_bytes(b"x" * 10)
            if when is not None:
                os.utime(tmp / name, (when, when))
        left.append(tmp)
    (a.datadir / "snads" / "stray-file").write_bytes(b"")  # not a store: left alone
    # A mailbox a killed DLTUSRPRF moved aside goes; one that a live one is
    # removing stays.
    dead = a.datadir / "mailboxes" / ".deleted-GONE-999999999-ab12"
    live = a.datadir / "mailboxes" / f".deleted-BUSY-{os.getpid()}-cd34"
    for moved in (dead, live):
        (moved / "Maildir" / "new").mkdir(parents=True)
    a.start()
    a.wait_for(lambda: all(not (t / "old.R0.host,S=10.1.ab").exists() for t in left), 20,
               "the old files swept")
    assert all((t / "young.R0.host,S=10.2.cd").exists() for t in left)
    # said once the sweep is done, a moment after the files went
    a.wait_for(lambda: "removed 2 files in mailboxes' tmp/" in a.log_text(), 10, "the log line")
    assert not dead.exists() and live.exists()


def test_the_sweep_passes_over_a_mailbox_it_cannot_look_into(tmp_path, monkeypatch):
    """One mailbox in the wrong hands stopped the sweep of every one after it."""
    import twistmail.maildir as md

    old = time.time() - 37 * 3600
    for owner in ("AAA", "BBB"):
        tmp = tmp_path / owner / "Maildir" / "tmp"
        tmp.mkdir(parents=True)
        (tmp / "x.R0.h,S=1.1.ab").write_bytes(b"x")
        os.utime(tmp / "x.R0.h,S=1.1.ab", (old, old))
    real = md._remove_older

    def refused(directory, older_than):
        if "AAA" in str(directory):
            raise PermissionError(13, "Permission denied")
        return real(directory, older_than)

    monkeypatch.setattr(md, "_remove_older", refused)
    removed, problems = md.sweep_tmp([tmp_path])
    assert removed == 1 and len(problems) == 1 and "AAA" in problems[0]
