"""The durable spool (DESIGN.md §2 queue rules 1, 2 and 4) and WRKQ.

Crashes are simulated the way they happen: a writer process SIGKILLed in the
middle of a body, a move interrupted between its rename and its unlink, files
left behind with old timestamps.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs
import pytest
from fsyncs import record_fsyncs
from hypothesis import given
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

import twistmail.cli.queuecmds as queuecmds
import twistmail.queue as queuemod
import twistmail.spares as spares_mod
from twistmail.cli.base import run
from twistmail.interfaces import (
    CORRUPT,
    HOLD,
    QTMSINQ,
    QTMSOUTQ,
    QTMSRTQ1,
    QUARANTINE,
    QUEUES,
    IQueue,
)
from twistmail.queue import (
    DELIVERED,
    FAILED,
    STATES,
    CorruptEnvelope,
    Envelope,
    FileQueue,
    Recipient,
    id_time,
    is_queue_id,
    new_queue_id,
)

ID_RE = re.compile(r"[0-9a-f]{22}")


@pytest.fixture
def fq(tmp_path: Path) -> FileQueue:
    return FileQueue(tmp_path / "queue")


def enqueue(
    fq: FileQueue,
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    queue: str = QTMSINQ,
    originator: str = "jane@example.test",
    recipients: tuple = ("sam@example.test",),
    **fields,
) -> str:
    env = Envelope.new(originator, recipients, **fields)
    with fq.new_spool(env) as spool:
        spool.write(body)
        return spool.commit(queue)


def all_files(fq: FileQueue) -> list[str]:
    """Every file of the queue but the spares, which hold no message."""
    return sorted(str(p.relative_to(fq.root)) for p in fq.root.rglob("*")
                  if p.is_file() and p.parent.name not in ("spare", "retired"))


def age_file(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# -- queue ids -------------------------------------------------------------------


def test_ids_are_fixed_width_hex_and_sort_by_creation_time():
    before = time.time()
    ids = [new_queue_id() for _ in range(2000)]
    assert all(ID_RE.fullmatch(i) for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert before - 1 <= id_time(ids[0]) <= id_time(ids[-1]) <= time.time() + 1
    assert not is_queue_id("../../etc/passwd") and not is_queue_id(ids[0].upper())


def test_ids_are_unique_across_processes_without_coordination():
    script = (
        "from twistmail.queue import new_queue_id\n"
        "print('\\n'.join(new_queue_id() for _ in range(20000)))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    per_process = [p.communicate(timeout=60)[0].split() for p in procs]
    everything = [i for ids in per_process for i in ids]
    assert len(everything) == 80000
    assert len(set(everything)) == len(everything)
    assert all(ids == sorted(ids) for ids in per_process)


def test_paths_refuse_anything_but_a_queue_id_and_a_queue_name(fq):
    with pytest.raises(ValueError):
        fq.body_path("../../etc/passwd")
    with pytest.raises(ValueError):
        fq.load(QTMSINQ, "x" * 22)
    with pytest.raises(ValueError, match="allowed"):
        fq.list("QTMSNOQ")


def test_filequeue_provides_iqueue_and_creates_the_layout(fq):
    verifyObject(IQueue, fq)
    assert sorted(p.name for p in fq.root.iterdir()) == sorted(
        ["tmp", "data", "spare", "retired", *QUEUES])
    assert FileQueue(fq.root.parent / "absent", create=False).list(QTMSINQ) == []
    assert not (fq.root.parent / "absent").exists()


# -- enqueue ---------------------------------------------------------------------


def test_commit_puts_body_and_envelope_in_place_and_nothing_in_tmp(fq):
    body = b"x" * 10000
    qid = enqueue(fq, body)
    assert fq.list(QTMSINQ) == [qid]
    assert fq.body_path(qid).read_bytes() == body
    env = fq.load(QTMSINQ, qid)
    assert env.size == len(body)
    assert env.recipients == (Recipient("sam@example.test"),)
    assert os.listdir(fq.tmp) == []
    assert fq.find(qid) == QTMSINQ
    assert oct(fq.body_path(qid).stat().st_mode & 0o777) == "0o600"


def test_commit_may_replace_the_initial_envelope_but_not_its_id(fq):
    env = Envelope.new("jane@example.test", ["sam@example.test"])
    with fq.new_spool(env) as spool:
        spool.write(b"abc")
        with pytest.raises(ValueError, match="not the spool's id"):
            spool.commit(QTMSINQ, Envelope.new("x@y", ["z@w"]))
        spool.commit(QTMSOUTQ, env.evolve(message_id="<m@x>", size=999))
    final = fq.load(QTMSOUTQ, env.id)
    assert final.message_id == "<m@x>" and final.size == 3


def test_an_id_in_use_cannot_be_spooled_again(fq):
    qid = enqueue(fq)
    with pytest.raises(ValueError, match="already in use"):
        fq.new_spool(fq.load(QTMSINQ, qid))


def test_a_spool_without_an_envelope_has_a_fresh_id_and_takes_its_envelope_at_commit(fq):
    ids = set()
    for _ in range(3):
        with fq.new_spool() as spool:
            spool.write(b"Subject: x\r\n\r\nbody\r\n")
            with pytest.raises(ValueError, match="no envelope"):
                spool.commit(QTMSINQ)
            assert spool.active  # nothing was published; the abort cleans up
            env = attrs.evolve(Envelope.new("jane@example.test", ["sam@example.test"]),
                               id=spool.id)
            assert spool.commit(QTMSINQ, env) == spool.id
        ids.add(spool.id)
        assert fq.load(QTMSINQ, spool.id).originator == "jane@example.test"
    assert len(ids) == 3 and sorted(ids) == fq.list(QTMSINQ)


def test_a_concurrent_reader_never_sees_an_envelope_without_its_body(fq):
    writers, per_writer = 4, 40
    done = threading.Event()
    seen: set[str] = set()
    problems: list[str] = []

    def reader() -> None:
        while not done.is_set() or len(seen) < writers * per_writer:
            for qid in fq.list(QTMSINQ):
                env = fq.load(QTMSINQ, qid)
                try:
                    size = fq.body_path(qid).stat().st_size
                except FileNotFoundError:
                    problems.append(f"{qid}: envelope without body")
                    continue
                if size != env.size:
                    problems.append(f"{qid}: body {size} bytes, envelope says {env.size}")
                seen.add(qid)
            if done.is_set() and len(seen) >= writers * per_writer:
                return

    def writer(n: int) -> None:
        for i in range(per_writer):
            enqueue(fq, os.urandom(100 + 997 * ((n + i) % 7)))

    r = threading.Thread(target=reader)
    r.start()
    ws = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    done.set()
    r.join(timeout=60)
    assert not r.is_alive()
    assert problems == []
    assert len(seen) == writers * per_writer


def _commit_counting_fsyncs(fq, monkeypatch, queue):
    """Commit a 4-byte message to ``queue``; its envelope, id and the fsyncs so far."""
    env = Envelope.new("jane@example.test", ["sam@example.test"])
    spool = fq.new_spool(env)
    spool.write(b"body")
    calls = record_fsyncs(monkeypatch)
    return env, spool.commit(queue), calls


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("queue", [QTMSINQ, QTMSOUTQ])
def test_fsyncs_of_a_packed_message(fq, monkeypatch, queue):
    """The commit is 2 (the one file, the queue dir), the removal 1."""
    _, qid, calls = _commit_counting_fsyncs(fq, monkeypatch, queue)
    root = str(fq.root)
    assert calls == [f"{root}/tmp/{qid}.{os.getpid()}.body", f"{root}/{queue}"]
    assert sorted(os.listdir(fq.root / queue)) == [f"{qid}.msg"]
    assert os.listdir(fq.data) == []
    assert fq.list(queue) == [qid] and fq.find(qid) == queue
    assert fq.load(queue, qid).size == 4 and fq.body_path(qid).read_bytes() == b"body"
    assert (fq.root / queue / f"{qid}.msg").is_file()
    calls.clear()
    fq.remove(queue, qid)
    assert calls == [f"{root}/{queue}"]
    assert all_files(fq) == [] and not (fq.root / queue / f"{qid}.msg").exists()
    _, qid, calls = _commit_counting_fsyncs(fq, monkeypatch, queue)
    calls.clear()
    fq.remove(queue, qid, durable=False)  # handling it again would change nothing
    assert calls == [] and all_files(fq) == []


def test_without_extended_attributes_or_with_a_large_envelope_two_files(fq, monkeypatch):
    many = tuple(f"user{i:03d}@example.test" for i in range(60))  # over 3 KiB as JSON
    big = enqueue(fq, recipients=many)
    assert fq.envelope_path(QTMSINQ, big).exists() and (fq.data / big).exists()
    assert fq.packing  # the next small one is packed again

    def refused(*args, **kwargs):
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", refused)
    qid = enqueue(fq, body=b"plain\r\n")
    assert not fq.packing
    assert fq.envelope_path(QTMSINQ, qid).exists()
    assert (fq.data / qid).read_bytes() == b"plain\r\n"
    assert fq.load(QTMSINQ, qid).id == qid


def test_a_new_envelope_unpacks_the_message_first(fq, monkeypatch):
    """The body is linked into data/ before the envelope file is written: 4 fsyncs."""
    env = Envelope.new("jane@example.test", ["sam@example.test"])
    with fq.new_spool(env) as spool:
        spool.write(b"the body\r\n")
        qid = spool.commit(QTMSINQ)
    packed_inode = os.stat(fq.root / QTMSINQ / f"{qid}.msg").st_ino
    calls = record_fsyncs(monkeypatch)
    fq.move(qid, QTMSINQ, QTMSOUTQ, fq.load(QTMSINQ, qid).evolve(attempts=1))
    root = str(fq.root)
    assert calls[:4] == [f"{root}/data", f"{root}/tmp/{qid}.{os.getpid()}.json",
                         f"{root}/{QTMSINQ}", f"{root}/{QTMSINQ}"]
    assert os.listdir(fq.root / QTMSINQ) == []
    assert os.stat(fq.body_path(qid)).st_ino == packed_inode  # linked, not copied
    assert fq.body_path(qid).read_bytes() == b"the body\r\n"
    assert fq.load(QTMSOUTQ, qid).attempts == 1


def test_an_update_in_qtmsoutq_unpacks_in_place(fq):
    qid = enqueue(fq, body=b"out\r\n", queue=QTMSOUTQ)
    fq.update(QTMSOUTQ, fq.load(QTMSOUTQ, qid).evolve(attempts=3))
    assert sorted(os.listdir(fq.root / QTMSOUTQ)) == [f"{qid}.json"]
    assert fq.load(QTMSOUTQ, qid).attempts == 3
    assert fq.body_path(qid) == fq.data / qid and fq.body_path(qid).read_bytes() == b"out\r\n"
    fq.remove(QTMSOUTQ, qid)
    assert all_files(fq) == []


def test_fsyncs_per_operation(fq, monkeypatch):
    """Two files (a file system without extended attributes, or another queue):
    commit: 4 (body, data/, envelope, queue dir); update: 2; move: 2 (3 with a new
    envelope); remove: 1 (the envelope's directory; a body brought back by a crash
    is an orphan that recovery removes)."""
    fq.packing = False
    env, qid, calls = _commit_counting_fsyncs(fq, monkeypatch, QTMSINQ)
    root = str(fq.root)
    assert calls == [
        f"{root}/tmp/{qid}.{os.getpid()}.body",
        f"{root}/data",
        f"{root}/tmp/{qid}.{os.getpid()}.new",
        f"{root}/{QTMSINQ}",
    ]
    calls.clear()
    fq.update(QTMSINQ, env.evolve(attempts=1))
    assert len(calls) == 2 and calls[-1] == f"{root}/{QTMSINQ}"
    calls.clear()
    fq.move(qid, QTMSINQ, QTMSOUTQ)
    assert calls == [f"{root}/{QTMSOUTQ}", f"{root}/{QTMSINQ}"]
    calls.clear()
    fq.move(qid, QTMSOUTQ, QTMSRTQ1, env.evolve(attempts=2))
    assert len(calls) == 3 and calls[1:] == [f"{root}/{QTMSRTQ1}", f"{root}/{QTMSOUTQ}"]
    calls.clear()
    fq.remove(QTMSRTQ1, qid)
    assert calls == [f"{root}/{QTMSRTQ1}"]


# -- abort -----------------------------------------------------------------------


def test_abort_leaves_nothing(fq):
    spool = fq.new_spool(Envelope.new("a@example.test", ["b@example.test"]))
    spool.write(b"partial")
    assert len(os.listdir(fq.tmp)) == 1
    spool.abort()
    spool.abort()
    assert all_files(fq) == []
    with pytest.raises(ValueError):
        spool.write(b"more")


def test_an_aborted_spool_leaves_its_file_for_the_next_message(fq):
    """A client whose messages are refused at their end (too big, a bare LF)
    took a file each time and freed it: 200 such sessions emptied spare/."""
    spool = fq.new_spool(Envelope.new("a@example.test", ["b@example.test"]))
    spool.write(b"refused at its end")
    inode = os.stat(spool._body_tmp).st_ino
    spool.abort()
    assert all_files(fq) == [] and os.listdir(fq.tmp) == []
    fq.spares.flush()
    [spare] = spares(fq)
    assert spare.stat().st_ino == inode and spare.stat().st_size == 0
    qid = enqueue(FileQueue(fq.root), b"next\r\n")
    assert fq.body_path(qid, QTMSINQ).stat().st_ino == inode and spares(fq) == []


def test_abort_on_a_full_disk_still_removes_the_partial_body(fq):
    """The close cannot flush on ENOSPC: abort raised there, and the body stayed
    in tmp/ for a day (its writer, a prestart job, lives on)."""
    import errno

    spool = fq.new_spool(Envelope.new("a@example.test", ["b@example.test"]))
    spool.write(b"partial")

    class FullDisk:
        def __init__(self, real):
            self.real = real

        def close(self):
            self.real.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    spool._file = FullDisk(spool._file)
    spool.abort()
    assert all_files(fq) == []


def test_an_exception_inside_the_with_block_aborts(fq):
    with pytest.raises(RuntimeError), fq.new_spool(Envelope.new("", ["b@x.test"])) as spool:
        spool.write(b"partial")
        raise RuntimeError("client went away")
    assert all_files(fq) == []


def test_abort_after_commit_keeps_the_message(fq):
    env = Envelope.new("a@example.test", ["b@example.test"])
    spool = fq.new_spool(env)
    spool.write(b"kept")
    spool.commit(QTMSINQ)
    spool.abort()
    assert fq.body_path(env.id).read_bytes() == b"kept"
    assert fq.list(QTMSINQ) == [env.id]


@pytest.mark.parametrize("packing, last", [(True, 2), (False, 4)])
def test_a_commit_that_fails_at_its_last_step_leaves_nothing(fq, monkeypatch, packing, last):
    """SMTP answers 451 then, so the message must not stay queued (no duplicate later)."""
    fq.packing = packing
    spool = fq.new_spool(Envelope.new("a@example.test", ["b@example.test"]))
    spool.write(b"body")
    real, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == last:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        spool.commit(QTMSINQ)
    monkeypatch.undo()
    assert all_files(fq) == []


# -- crash recovery --------------------------------------------------------------

WRITER = """
import sys, time
from twistmail.queue import Envelope, FileQueue
spool = FileQueue(sys.argv[1]).new_spool(Envelope.new("a@example.test", ["b@example.test"]))
spool.write(b"x" * 100000)
print(spool.id, flush=True)
time.sleep(120)
"""


def test_a_writer_killed_mid_body_leaves_a_tmp_file_that_recover_removes(fq):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(fq.root)], stdout=subprocess.PIPE, text=True
    )
    try:
        qid = proc.stdout.readline().strip()
        name = f"{qid}.{proc.pid}.body"
        assert os.listdir(fq.tmp) == [name]
        assert fq.recover().clean, "a live writer's file must be left alone"
        assert os.listdir(fq.tmp) == [name]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    report = fq.recover()
    assert report.tmp_removed == (name,)
    assert report.counts() == {
        "tmp_removed": 1,
        "corrupt": 0,
        "duplicates": 0,
        "orphans_removed": 0,
    }
    assert all_files(fq) == []
    assert fq.find(qid) is None


def test_recovery_names_new_messages_never_queued_but_not_updates(fq):
    """A writer of two files (an envelope too big to pack) killed after its 97
    leaves only its envelope in tmp/: a new message's, told from an update's
    by its name."""
    new, updated = new_queue_id(), new_queue_id()
    dead = 999999999
    for name in (f"{new}.{dead}.new", f"{updated}.{dead}.json"):
        (fq.tmp / name).write_bytes(b"{}")
    assert fq.recover().unfinished() == [new]


def test_tmp_files_older_than_a_day_go_even_if_the_pid_is_alive(fq):
    old = fq.tmp / f"{new_queue_id()}.{os.getpid()}.json"
    young = fq.tmp / f"{new_queue_id()}.{os.getpid()}.body"
    stray = fq.tmp / "editor-backup~"
    for p in (old, young, stray):
        p.write_bytes(b"x")
    age_file(old, 2 * 86400)
    report = fq.recover()
    assert report.tmp_removed == (old.name,)
    assert sorted(os.listdir(fq.tmp)) == sorted([young.name, stray.name])
    age_file(stray, 2 * 86400)
    assert fq.recover().tmp_removed == (stray.name,)


def test_a_body_without_envelope_is_removed_only_once_old(fq):
    """A crash between the body's rename and the envelope's; also what another process's
    commit looks like for a few milliseconds, which is why young ones stay."""
    orphan = fq.body_path(new_queue_id())
    orphan.write_bytes(b"half-enqueued")
    assert fq.recover().clean
    assert orphan.exists()
    age_file(orphan, 30 * 60)
    assert fq.recover().clean
    age_file(orphan, 2 * 3600)
    report = fq.recover()
    assert report.orphans_removed == (orphan.name,)
    assert not orphan.exists()


def test_an_old_body_with_an_envelope_is_never_an_orphan(fq):
    qid = enqueue(fq)
    age_file(fq.body_path(qid), 10 * 86400)
    assert fq.recover(now=time.time() + 86400).clean
    assert fq.body_path(qid).exists()


def test_a_corrupt_envelope_goes_to_corrupt_with_its_body(fq):
    good = enqueue(fq)
    bad = enqueue(fq, queue=HOLD)
    fq.envelope_path(HOLD, bad).write_bytes(b'{"id": "trunc')
    with pytest.raises(CorruptEnvelope):
        fq.load(HOLD, bad)
    entry = next(e for e in fq.entries(HOLD))
    assert entry.id == bad and entry.error and entry.size > 0
    report = fq.recover()
    assert [(c.id, c.queue) for c in report.corrupt] == [(bad, HOLD)]
    assert "unreadable" in report.corrupt[0].reason
    assert fq.list(HOLD) == [] and fq.list(CORRUPT) == [bad]
    assert fq.body_path(bad).exists()
    assert fq.list(QTMSINQ) == [good]
    age_file(fq.body_path(bad), 2 * 3600)
    assert fq.recover().clean
    assert fq.body_path(bad).exists()


def test_an_envelope_whose_body_is_missing_or_whose_id_differs_is_corrupt(fq):
    fq.packing = False
    a, b = enqueue(fq, queue=HOLD), enqueue(fq, queue=HOLD)
    fq.body_path(a).unlink()
    other = json.loads(fq.envelope_path(HOLD, b).read_bytes())
    other["id"] = new_queue_id()
    fq.envelope_path(HOLD, b).write_text(json.dumps(other))
    report = fq.recover()
    reasons = {c.id: c.reason for c in report.corrupt}
    assert reasons[a] == "body missing"
    assert "holds the envelope of" in reasons[b]
    assert sorted(fq.list(CORRUPT)) == sorted([a, b])


def test_recovery_reads_an_unchanged_envelope_once(fq, monkeypatch):
    good, later = enqueue(fq), enqueue(fq, queue=HOLD)
    loads = []
    real = FileQueue.load
    monkeypatch.setattr(FileQueue, "load",
                        lambda self, q, i: loads.append(i) or real(self, q, i))
    assert fq.recover().clean and loads == [later]  # QTMSINQ's: checked when taken
    assert fq.list(QTMSINQ) == [good]
    loads.clear()
    assert fq.recover().clean and loads == []  # nothing changed, nothing read
    # A file written since is read again, and a damaged one still found.
    path = fq.envelope_path(HOLD, later)
    path.write_bytes(b'{"id": "trunc')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    report = fq.recover()
    assert loads == [later] and [c.id for c in report.corrupt] == [later]


def test_a_second_corrupt_copy_of_an_id_does_not_overwrite_the_first(fq):
    qid = enqueue(fq, queue=HOLD)
    (fq.root / CORRUPT / f"{qid}.json").write_bytes(b"first")
    fq.envelope_path(HOLD, qid).write_bytes(b"second")
    fq.recover()
    kept = sorted(p.read_bytes() for p in (fq.root / CORRUPT).iterdir() if p.suffix != ".why")
    assert kept == [b"first", b"second"]
    listed = [(e.id, e.error) for e in fq.entries(CORRUPT)]  # wrkq shows both
    assert len(listed) == 2 and {i for i, _ in listed} == {qid}
    assert "another copy set aside" in listed[1][1]


def test_recovery_leaves_the_checking_of_qtmsinq_to_whoever_takes_a_message(fq):
    """A bridge starting with a long backlog must not read every envelope first."""
    fq.packing = False
    bad, fine = enqueue(fq), enqueue(fq)
    fq.envelope_path(QTMSINQ, bad).write_bytes(b'{"id": "trunc')
    fq.packing = True
    packed = enqueue(fq)
    os.removexattr(fq.root / QTMSINQ / f"{packed}.msg", queuemod.ENVELOPE_ATTR)
    assert fq.recover().clean
    assert sorted(fq.list(QTMSINQ)) == sorted([bad, packed, fine])
    with pytest.raises(CorruptEnvelope):
        fq.load(QTMSINQ, bad)
    item = fq.set_aside(QTMSINQ, bad, "unreadable envelope")
    assert (item.id, item.queue, item.reason) == (bad, QTMSINQ, "unreadable envelope")
    assert fq.set_aside(QTMSINQ, packed, "no envelope attribute").id == packed
    assert fq.set_aside(QTMSINQ, packed, "again") is None  # gone already
    assert fq.list(QTMSINQ) == [fine] and sorted(fq.list(CORRUPT)) == sorted([bad, packed])
    assert fq.body_path(bad).exists() and (fq.root / CORRUPT / f"{packed}.msg").exists()


# -- move, update, remove --------------------------------------------------------


def test_move_is_a_rename_of_the_envelope(fq):
    qid = enqueue(fq)
    env = fq.load(QTMSINQ, qid)
    fq.move(qid, QTMSINQ, QTMSOUTQ)
    assert fq.list(QTMSINQ) == [] and fq.list(QTMSOUTQ) == [qid]
    assert fq.load(QTMSOUTQ, qid) == env
    assert fq.find(qid) == QTMSOUTQ
    with pytest.raises(KeyError):
        fq.load(QTMSINQ, qid)
    with pytest.raises(KeyError):
        fq.move(qid, QTMSINQ, HOLD)
    later = env.evolve(attempts=1, next_try=time.time() + 60).with_recipient(
        "sam@example.test", state="retry", last_error="451 4.4.1 no answer"
    )
    fq.move(qid, QTMSOUTQ, QTMSRTQ1, later)
    assert fq.load(QTMSRTQ1, qid) == later
    assert fq.find(qid) == QTMSRTQ1
    assert os.listdir(fq.tmp) == []
    with pytest.raises(ValueError):
        fq.move(qid, QTMSRTQ1, QTMSOUTQ, Envelope.new("x@y", ["z@w"]))


def test_update_replaces_the_envelope_in_place(fq):
    qid = enqueue(fq, recipients=("a@x.test", "b@x.test"))
    env = fq.load(QTMSINQ, qid)
    done = env.with_recipient("a@x.test", state=DELIVERED, delivered_at=time.time())
    fq.update(QTMSINQ, done)
    assert fq.load(QTMSINQ, qid) == done
    assert [r.address for r in done.pending] == ["b@x.test"]
    assert not done.done and done.with_recipient("b@x.test", state=FAILED).done
    assert os.listdir(fq.tmp) == []
    with pytest.raises(KeyError):
        fq.update(QTMSOUTQ, done)
    with pytest.raises(KeyError):
        env.with_recipient("nobody@x.test", state=DELIVERED)


def test_an_envelope_as_a_dict_is_what_attrs_makes_of_it():
    """Built by hand for speed: it must not drift from the fields."""
    import attrs

    from twistmail.queue import FORMAT

    env = Envelope.new("jane@example.test", [
        Recipient("a@x.test", notify=("SUCCESS", "DELAY"), orcpt="rfc822;a@x.test"),
        Recipient("b@x.test", state=DELIVERED, attempts=2, delivered_at=5.5),
    ], client_ip="192.0.2.1", ret="HDRS").note({"noticed": ["a@x.test"], "at": {"n": [1]}})
    assert env.to_dict() == {"v": FORMAT, **attrs.asdict(env)}
    assert Envelope.from_dict(env.to_dict()) == env


def test_remove_deletes_envelope_and_body(fq):
    keep, gone = enqueue(fq), enqueue(fq)
    fq.remove(QTMSINQ, gone)
    assert fq.list(QTMSINQ) == [keep]
    assert not fq.body_path(gone).exists()
    assert fq.find(gone) is None
    with pytest.raises(KeyError):
        fq.remove(QTMSINQ, gone)


def spares(fq: FileQueue) -> list[Path]:
    return sorted((fq.root / "spare").iterdir())


def retired(fq: FileQueue) -> list[Path]:
    return sorted((fq.root / "retired").iterdir())


def test_a_removed_message_leaves_an_empty_spare_that_the_next_message_takes(fq):
    """Every message delivered used to free an inode and every message
    received to allocate one; on ext4 without a journal the allocation scans
    past every inode freed in the last minutes."""
    gone = enqueue(fq, b"x" * 5000)
    inode = fq.body_path(gone, QTMSINQ).stat().st_ino
    fq.remove(QTMSINQ, gone)
    assert fq.list(QTMSINQ) == [] and fq.find(gone) is None
    [kept] = retired(fq)  # whole, until the queue directory it left is synced
    assert kept.stat().st_size == 5000 and spares(fq) == []
    fq.spares.flush()
    [spare] = spares(fq)
    assert spare.stat().st_size == 0 and spare.stat().st_ino == inode
    assert os.listxattr(spare) == []  # nothing of the old message's envelope either
    body = b"Subject: next\r\n\r\nshort\r\n"
    job = FileQueue(fq.root)  # an SMTP job, which had not looked at spare/ yet
    qid = enqueue(job, body, recipients=("bob@example.test",))
    assert spares(fq) == []
    path = fq.body_path(qid, QTMSINQ)
    assert path.stat().st_ino == inode and path.read_bytes() == body
    env = fq.load(QTMSINQ, qid)
    assert env.size == len(body) and [r.address for r in env.recipients] == ["bob@example.test"]
    assert all_files(fq) == [f"QTMSINQ/{qid}.msg"]


def test_a_file_is_reused_only_once_the_directory_it_left_is_synced(fq, monkeypatch):
    """The kernel's reason for its scan: after a power cut, a directory entry
    not yet written back must not name another message's file."""
    monkeypatch.setattr(spares_mod, "RELEASE_BATCH", 3)
    events = []
    sync = spares_mod.fsync_dir
    monkeypatch.setattr(spares_mod, "fsync_dir",
                        lambda d: (events.append(("sync", os.path.basename(d))), sync(d)))
    ids = [enqueue(fq, queue=QTMSOUTQ) for _ in range(3)]
    for qid in ids[:2]:
        fq.remove(QTMSOUTQ, qid, durable=False)
    assert events == [] and len(retired(fq)) == 2 and spares(fq) == []
    fq.remove(QTMSOUTQ, ids[2], durable=False)
    assert events == [("sync", QTMSOUTQ)]
    assert retired(fq) == [] and [p.stat().st_size for p in spares(fq)] == [0, 0, 0]


def test_an_envelope_file_removal_is_synced_before_its_body_is_reused(fq, monkeypatch):
    """Else a power cut could bring back the envelope without its body."""
    fq.packing = False
    qid = enqueue(fq, queue=QTMSOUTQ)
    synced = []
    sync = spares_mod.fsync_dir
    monkeypatch.setattr(spares_mod, "fsync_dir", lambda d: (synced.append(d), sync(d)))
    fq.remove(QTMSOUTQ, qid, durable=False)
    fq.spares.flush()
    assert sorted(os.path.basename(d) for d in synced) == [QTMSOUTQ, "data"]


def test_what_a_dead_process_retired_is_released_by_recovery(fq):
    qid = enqueue(fq)
    FileQueue(fq.root).remove(QTMSINQ, qid)  # that process is gone, its batch unreleased
    assert len(retired(fq)) == 1
    assert fq.recover().clean
    assert retired(fq) == [] and [p.stat().st_size for p in spares(fq)] == [0]


def test_an_aborted_spool_s_file_a_dead_process_retired_waits_for_tmp_to_be_synced(
        fq, monkeypatch):
    spool = FileQueue(fq.root).new_spool()  # that process is gone, its batch unreleased
    spool.write(b"refused")
    spool.abort()
    assert len(retired(fq)) == 1
    synced = []
    sync = spares_mod.fsync_dir
    monkeypatch.setattr(spares_mod, "fsync_dir", lambda d: (synced.append(d), sync(d)))
    assert fq.recover().clean
    assert str(fq.tmp) in synced and [p.stat().st_size for p in spares(fq)] == [0]


def test_a_spare_body_of_an_envelope_file_message_keeps_no_attribute(fq):
    gone = enqueue(fq)
    fq.remove(QTMSINQ, gone)
    fq.spares.flush()
    job = FileQueue(fq.root)
    job.packing = False  # as for an envelope too large for an attribute
    qid = enqueue(job, b"body\r\n")
    assert spares(fq) == []
    body = fq.body_path(qid)
    assert body == fq.data / qid and body.read_bytes() == b"body\r\n"
    assert queuemod.ENVELOPE_ATTR not in os.listxattr(body)
    assert fq.load(QTMSINQ, qid).id == qid
    fq.remove(QTMSINQ, qid)  # an unpacked body is kept too
    fq.spares.flush()
    assert [p.stat().st_size for p in spares(fq)] == [0]


def test_spares_are_kept_up_to_a_limit_then_files_are_removed(fq, monkeypatch):
    monkeypatch.setattr(spares_mod, "SPARE_MAX", 3)
    monkeypatch.setattr(spares_mod, "_RECOUNT", 1)  # count what all keep every time
    writer = FileQueue(fq.root)
    monkeypatch.setattr(writer.spares, "take", lambda dest: None)
    ids = [enqueue(writer) for _ in range(60)]
    removers = [FileQueue(fq.root) for _ in range(6)]  # six processes, one limit
    for n, qid in enumerate(ids):
        removers[n % 6].remove(QTMSINQ, qid)
        assert fq.find(qid) is None  # out of its queue at once, kept or not
    for r in removers:
        r.spares.flush()  # also unlinks what the discarding threads have not yet
    assert len(spares(fq)) == 3 and all_files(fq) == [] and retired(fq) == []


def test_a_whole_message_left_by_a_crash_before_its_release_is_in_no_queue(fq, monkeypatch):
    """Retiring renames first, empties later: a crash between them leaves
    the whole file where nothing reads it, never an empty one in a queue."""
    qid = enqueue(fq, b"whole\r\n")
    fq.remove(QTMSINQ, qid)
    assert [p.read_bytes() for p in retired(fq)] == [b"whole\r\n"]
    assert fq.find(qid) is None and fq.list(QTMSINQ) == []
    other = enqueue(FileQueue(fq.root), b"new\r\n")
    assert fq.body_path(other, QTMSINQ).read_bytes() == b"new\r\n"
    assert [p.read_bytes() for p in retired(fq)] == [b"whole\r\n"]


def test_a_queue_without_spare_directories_still_removes_and_creates(fq):
    """A queue directory made by an earlier version has neither until a restart."""
    (fq.root / "spare").rmdir()
    (fq.root / "retired").rmdir()
    qid = enqueue(fq)
    fq.remove(QTMSINQ, qid)
    fq.spares.flush()
    assert all_files(fq) == [] and not (fq.root / "spare").exists()
    enqueue(fq)


def test_an_unreadable_or_odd_spare_directory_only_stops_the_reuse(fq, tmp_path):
    job = FileQueue(fq.root)
    (fq.root / "spare").rmdir()
    (fq.root / "spare").write_bytes(b"not a directory")
    qid = enqueue(fq)
    fq.remove(QTMSINQ, qid)
    fq.spares.flush()
    assert all_files(fq) == ["spare"] and retired(fq) == []
    enqueue(job)
    (fq.root / "spare").unlink()
    (fq.root / "spare").mkdir()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not the queue's")
    (fq.root / "spare" / "18ece2c5e9680f8d3ee0f7").symlink_to(target)
    qid = enqueue(FileQueue(fq.root), b"new\r\n")
    assert target.read_bytes() == b"not the queue's"
    assert fq.body_path(qid, QTMSINQ).read_bytes() == b"new\r\n"


def test_a_missing_tmp_directory_fails_the_spool_and_does_not_spin(fq):
    fq.remove(QTMSINQ, enqueue(fq))
    fq.spares.flush()
    job = FileQueue(fq.root)
    fq.tmp.rmdir()
    with pytest.raises(FileNotFoundError):
        enqueue(job)


def test_odd_entries_in_spare_and_retired_neither_hang_nor_stop_recovery(fq):
    """Put there by hand: a FIFO would block the open for a reader, a full
    directory would go into tmp/ where recovery could not remove it."""
    os.mkfifo(fq.root / "spare" / "fifo")
    (fq.root / "spare" / "dir").mkdir()
    (fq.root / "spare" / "dir" / "f").write_bytes(b"x")
    (fq.root / "retired" / "dir").mkdir()
    (fq.root / "retired" / "dir" / "f").write_bytes(b"x")
    for _ in range(3):
        qid = enqueue(FileQueue(fq.root), b"new\r\n")
        assert fq.body_path(qid, QTMSINQ).read_bytes() == b"new\r\n"
    assert os.listdir(fq.tmp) == []
    assert fq.recover().clean and fq.spares.adopt() == 0
    assert not (fq.root / "spare" / "fifo").exists()


def test_a_packed_file_linked_into_data_goes_by_both_names(fq):
    """An unpacking cut short: ``X.msg`` and ``data/X`` are one file."""
    qid = enqueue(fq)
    os.link(fq.body_path(qid, QTMSINQ), fq.data / qid)
    fq.remove(QTMSINQ, qid)
    fq.spares.flush()
    assert all_files(fq) == [] and not (fq.data / qid).exists()
    assert [p.stat().st_size for p in spares(fq)] == [0]


def test_a_process_that_ends_releases_what_it_retired(fq):
    qid = enqueue(fq)
    script = ("import sys\nfrom twistmail.queue import FileQueue\n"
              "FileQueue(sys.argv[1]).remove('QTMSINQ', sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", script, str(fq.root), qid], check=True, timeout=60)
    assert retired(fq) == [] and [p.stat().st_size for p in spares(fq)] == [0]


def test_a_file_with_another_name_is_never_emptied_for_reuse(fq, tmp_path):
    """An unpacking cut short leaves the packed file linked into data/: the
    same inode, which another queue's envelope may name."""
    body = b"Subject: kept\r\n\r\nstill here\r\n"
    qid = enqueue(fq, body)
    other = tmp_path / "other-name"
    os.link(fq.body_path(qid, QTMSINQ), other)
    fq.remove(QTMSINQ, qid)
    fq.spares.flush()
    assert other.read_bytes() == body and spares(fq) == [] and retired(fq) == []
    (fq.root / "spare" / "18ece2c5e9680f8d3ee0f7").write_bytes(body)  # put there by hand
    os.link(fq.root / "spare" / "18ece2c5e9680f8d3ee0f7", tmp_path / "second")
    qid = enqueue(FileQueue(fq.root), b"new\r\n")
    assert (tmp_path / "second").read_bytes() == body
    assert fq.body_path(qid, QTMSINQ).read_bytes() == b"new\r\n"
    assert fq.body_path(qid, QTMSINQ).stat().st_ino != (tmp_path / "second").stat().st_ino


def test_list_is_oldest_first(fq):
    ids = [enqueue(fq) for _ in range(5)]
    fq.move(ids[2], QTMSINQ, HOLD)
    fq.move(ids[2], HOLD, QTMSINQ)
    assert fq.list(QTMSINQ) == ids
    assert [e.id for e in fq.entries(QTMSINQ)] == ids


def test_versions_list_the_queue_and_change_with_each_envelope(fq):
    """A scan caches envelopes by version: every change must show in it."""
    ids = [enqueue(fq) for _ in range(3)]  # packed: the .msg file is the entry
    first = dict(fq.versions(QTMSINQ))
    assert [qid for qid, _ in fq.versions(QTMSINQ)] == fq.list(QTMSINQ) == ids
    env = fq.load(QTMSINQ, ids[1])
    fq.update(QTMSINQ, env.evolve(attempts=1))  # unpacked: the .json file now
    second = dict(fq.versions(QTMSINQ))
    assert second[ids[0]] == first[ids[0]] and second[ids[2]] == first[ids[2]]
    assert second[ids[1]] != first[ids[1]]
    fq.update(QTMSINQ, env.evolve(attempts=2))
    assert dict(fq.versions(QTMSINQ))[ids[1]] not in (first[ids[1]], second[ids[1]])
    fq.remove(QTMSINQ, ids[0])
    assert [qid for qid, _ in fq.versions(QTMSINQ)] == ids[1:]
    assert fq.versions(HOLD) == []


class Crash(BaseException):
    """The process dies here."""


@pytest.mark.parametrize("step", ["envelope", "rename", "sync"])
def test_a_move_with_a_new_envelope_is_in_one_queue_wherever_it_stops(fq, monkeypatch, step):
    """A mover killed at any step leaves one copy, never one per queue for two readers."""
    fq.packing = False  # a packed source is unpacked first: see the unpacking tests
    qid = enqueue(fq, queue=QTMSOUTQ)
    env = fq.load(QTMSOUTQ, qid)
    target = str(fq.root / QTMSRTQ1)
    rename, sync = os.rename, queuemod.fsync_dir

    def crash(*_: object) -> None:
        raise Crash

    if step == "envelope":
        monkeypatch.setattr(queuemod, "_write_synced", crash)
    elif step == "rename":
        monkeypatch.setattr(queuemod.os, "rename", lambda a, b: crash() if str(b).startswith(
            target) else rename(a, b))
    else:
        monkeypatch.setattr(queuemod, "fsync_dir", lambda d: crash() if str(d) == target
                            else sync(d))
    with pytest.raises(Crash):
        fq.move(qid, QTMSOUTQ, QTMSRTQ1, env.evolve(attempts=1))
    monkeypatch.undo()
    holders = [q for q in (QTMSOUTQ, QTMSRTQ1) if fq.list(q) == [qid]]
    assert holders == ([QTMSRTQ1] if step == "sync" else [QTMSOUTQ])
    assert fq.load(holders[0], qid).attempts == (0 if step == "envelope" else 1)
    assert fq.recover().clean
    fq.move(qid, holders[0], QTMSRTQ1, env.evolve(attempts=1))  # tried again: done
    assert fq.find(qid) == QTMSRTQ1 and fq.body_path(qid).exists()


def test_two_copies_a_power_loss_left_are_settled_for_the_newer_envelope(fq, monkeypatch):
    """Renames not yet written back can come back in both directories after a
    power loss; the newer envelope wins, even with the clock stepped back."""
    fq.packing = False
    qid = enqueue(fq, queue=QTMSOUTQ)
    env = fq.load(QTMSOUTQ, qid)
    fq.move(qid, QTMSOUTQ, QTMSRTQ1, env.evolve(attempts=1))
    old = fq.root / QTMSRTQ1 / f"{qid}.json"
    stale = old.read_bytes()
    back = time.time_ns() - 3600 * 10**9
    monkeypatch.setattr(queuemod.time, "time_ns", lambda: back)
    fq.move(qid, QTMSRTQ1, QTMSOUTQ, env.evolve(attempts=2))
    monkeypatch.undo()
    old.write_bytes(stale)  # the source's entry, as the power loss kept it
    report = fq.recover()
    assert [(d.id, d.kept, d.removed) for d in report.duplicates] == [(qid, QTMSOUTQ, (QTMSRTQ1,))]
    assert fq.find(qid) == QTMSOUTQ and fq.load(QTMSOUTQ, qid).attempts == 2
    assert fq.list(QTMSRTQ1) == [] and fq.body_path(qid).exists()


def test_a_packed_message_that_lost_its_envelope_goes_to_corrupt_whole(fq):
    """A copy of the queue made without extended attributes, for instance."""
    qid = enqueue(fq, body=b"Subject: kept\r\n\r\nbody\r\n", queue=QTMSOUTQ)
    os.removexattr(fq.root / QTMSOUTQ / f"{qid}.msg", queuemod.ENVELOPE_ATTR)
    assert fq.recover().clean  # its reader finds it: the outbound scan
    with pytest.raises(CorruptEnvelope, match="envelope attribute") as e:
        fq.load(QTMSOUTQ, qid)
    item = fq.set_aside(QTMSOUTQ, qid, str(e.value))
    assert (item.id, item.queue) == (qid, QTMSOUTQ)
    assert fq.list(QTMSOUTQ) == [] and fq.list(CORRUPT) == [qid]
    assert (fq.root / CORRUPT / f"{qid}.msg").read_bytes() == b"Subject: kept\r\n\r\nbody\r\n"
    (entry,) = fq.entries(CORRUPT)
    assert entry.error is not None and entry.size > 0
    assert fq.recover().clean  # and it stays there, body and all


@pytest.mark.parametrize("step", [1, 2])
def test_an_unpacking_cut_short_is_finished_by_recovery(fq, monkeypatch, step):
    """Cut after the body is linked (1) or after the envelope file is written (2)."""
    qid = enqueue(fq, body=b"the body\r\n")
    real_rename, real_unlink = os.rename, queuemod._unlink

    def rename(src, dst):
        if step == 1 and str(dst).endswith(f"{QTMSINQ}/{qid}.json"):
            raise Crash
        real_rename(src, dst)

    def unlink(path):
        if step == 2 and str(path).endswith(".msg"):
            raise Crash
        return real_unlink(path)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(queuemod, "_unlink", unlink)
    with pytest.raises(Crash):
        fq.move(qid, QTMSINQ, QTMSOUTQ, fq.load(QTMSINQ, qid))
    monkeypatch.undo()
    assert fq.find(qid) == QTMSINQ and fq.load(QTMSINQ, qid).id == qid
    report = fq.recover()
    assert report.corrupt == () and report.duplicates == ()
    assert fq.list(QTMSINQ) == [qid] and fq.body_path(qid).read_bytes() == b"the body\r\n"
    names = sorted(os.listdir(fq.root / QTMSINQ))
    assert names == ([f"{qid}.msg"] if step == 1 else [f"{qid}.json"])
    fq.move(qid, QTMSINQ, QTMSOUTQ, fq.load(QTMSINQ, qid))
    assert os.listdir(fq.root / QTMSINQ) == [] and fq.list(QTMSOUTQ) == [qid]
    assert fq.body_path(qid).read_bytes() == b"the body\r\n"
    fq.remove(QTMSOUTQ, qid)
    assert all_files(fq) == []


def test_removing_one_copy_of_a_duplicate_keeps_the_body(fq):
    fq.packing = False
    qid = enqueue(fq)
    # Two entries, as a power loss can leave a move that was not written back.
    os.link(fq.root / QTMSINQ / f"{qid}.json", fq.root / HOLD / f"{qid}.json")
    fq.remove(QTMSINQ, qid)
    assert fq.body_path(qid).exists() and fq.find(qid) == HOLD


# -- envelope JSON ---------------------------------------------------------------

_text = st.text(max_size=30)
_opt_text = st.none() | _text
_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
_json_scalar = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text

recipients = st.builds(
    Recipient,
    address=_text,
    state=st.sampled_from(STATES),
    orcpt=_opt_text,
    notify=st.none() | st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY", "NEVER"])),
    kind=st.sampled_from(["to", "cc", "bcc"]),
    attempts=st.integers(0, 10**9),
    last_error=_opt_text,
    resolved=_opt_text,
    delivered_at=st.none() | _finite,
)
envelopes = st.builds(
    Envelope,
    id=st.from_regex(r"[0-9a-f]{22}", fullmatch=True),
    originator=_text,
    recipients=st.lists(recipients, max_size=4),
    received=_finite,
    client_ip=_opt_text,
    helo=_opt_text,
    size=st.integers(0, 2**40),
    source=st.sampled_from(["smtp", "api", "bridge"]),
    attempts=st.integers(0, 1000),
    next_try=st.none() | _finite,
    ret=st.none() | st.sampled_from(["FULL", "HDRS"]),
    envid=_opt_text,
    auth=_opt_text,
    message_id=_opt_text,
    history=st.lists(st.dictionaries(_text, _json_scalar, max_size=3), max_size=3),
)


@given(envelopes)
def test_envelope_json_round_trip(env):
    data = env.to_json()
    assert data.isascii()
    assert Envelope.from_json(data) == env


def test_unknown_keys_are_ignored_for_forward_compatibility():
    env = Envelope.new("", ["postmaster@example.test"])
    d = json.loads(env.to_json())
    d["v"] = 7
    d["priority"] = "high"
    d["recipients"][0]["ldap_dn"] = "cn=postmaster"
    assert Envelope.from_json(json.dumps(d).encode()) == env


def test_surrogate_escaped_eight_bit_addresses_survive():
    address = b"j\xf6rg@example.test".decode("ascii", "surrogateescape")
    env = Envelope.new(address, [address])
    assert Envelope.from_json(env.to_json()).originator == address


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[]",
        b"\xff\xfe",
        b'{"id": "0123456789abcdef012345"}',
        b'{"id": "../x", "originator": "", "recipients": [], "received": 1}',
        b'{"id": "0123456789abcdef012345", "originator": "", "recipients": [1], "received": 1}',
        b'{"id": "0123456789abcdef012345", "originator": "", "recipients": [], '
        b'"received": "yesterday"}',
        b'{"id": "0123456789abcdef012345", "originator": "", "recipients": [], "received": NaN}',
        b'{"id": "0123456789abcdef012345", "originator": "", "recipients": '
        b'[{"address": "a@b", "state": "lost"}], "received": 1}',
        b'{"id": "0123456789abcdef012345", "originator": "", "recipients": [], '
        b'"received": 1, "attempts": -1}',
        # a number no float holds, and nesting deeper than the parser's recursion
        b'{"id": "0123456789abcdef012345", "originator": "", "recipients": [], '
        b'"received": 1' + b"0" * 400 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_broken_envelopes_raise_corrupt_envelope(data):
    with pytest.raises(CorruptEnvelope):
        Envelope.from_json(data)


# -- wrkq ------------------------------------------------------------------------


@pytest.fixture
def cfg(tmp_path: Path) -> str:
    path = tmp_path / "twistmail.toml"
    path.write_text('[system]\ndatadir = "var"\n')
    return str(path)


@pytest.fixture
def cli_queue(tmp_path: Path) -> FileQueue:
    return FileQueue(tmp_path / "var" / "queue")


def test_wrkq_is_registered_on_the_twistmail_command():
    from twistmail.cli.main import cli

    assert "wrkq" in cli.commands


def bridge_writing(queue: FileQueue) -> None:
    """The status a running bridge writes once a second (bridge.status)."""
    run_dir = queue.root.parent / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "QTMSCCLCP.json").write_text(json.dumps({"at": time.time()}))


def test_wrkq_table(cfg, cli_queue, capsys):
    now = time.time()
    bridge_writing(cli_queue)
    inbound = enqueue(cli_queue, b"a" * 120, recipients=("sam@example.test", "joe@example.test"))
    env = cli_queue.load(QTMSINQ, inbound)
    env = env.with_recipient("sam@example.test", state=DELIVERED)
    cli_queue.update(QTMSINQ, env.with_recipient(
        "joe@example.test", last_error="452 4.2.2 mailbox\r\n full"))
    bounce = enqueue(
        cli_queue, b"b" * 30, QTMSOUTQ, "", ("jane@remote.test",),
        received=now - 2 * 3600 - 5, attempts=2, next_try=now + 600,
    )  # fmt: skip
    assert run(["--config", cfg, "wrkq"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "id", "queue", "age", "size", "from", "to", "state", "attempts", "next", "try",
    ]  # fmt: skip
    row_in = next(line for line in out if line.startswith(inbound))
    row_out = next(line for line in out if line.startswith(bounce))
    assert "QTMSINQ" in row_in and "jane@example.test" in row_in
    # Why a recipient waits, as mailq says it, on one line.
    assert "sam@example.test (delivered), joe@example.test (452 4.2.2 mailbox full)" in row_in
    assert row_in.split()[2] in ("0s", "1s", "2s") and row_in.split()[3] == "120"
    assert "<>" in row_out and " 2h " in row_out
    assert re.search(r"\bwaiting\s+2\s+in (9|10)m$", row_out)  # for the next transfer
    assert re.search(r"\barrived\s+0\s*$", row_in)
    assert out[-1] == "-- 2 messages, 150 bytes: QTMSINQ 1, QTMSOUTQ 1"


def test_wrkq_one_queue_by_any_case(cfg, cli_queue, capsys):
    enqueue(cli_queue)
    held = enqueue(cli_queue, queue=HOLD)
    assert run(["--config", cfg, "wrkq", "--queue", "HOLD"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[1].startswith(held)
    assert out[-1].endswith(": hold 1")
    assert run(["--config", cfg, "wrkq", "--queue", "qtmsoutq"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "(no messages)",
        "-- 0 messages, 0 bytes: QTMSOUTQ 0",
    ]


def test_wrkq_says_why_an_unreadable_envelope_is_there_below_the_table(cfg, cli_queue, capsys):
    """The reason went into the "from" column, and the table out of line."""
    qid = enqueue(cli_queue, b"Subject: x\r\n\r\ny\r\n")
    cli_queue.move(qid, QTMSINQ, QTMSOUTQ)  # an envelope file of its own
    Path(cli_queue.envelope_path(QTMSOUTQ, qid)).write_bytes(b"{not json")
    assert run(["--config", cfg, "wrkq"]) == 0
    out = capsys.readouterr().out.splitlines()
    [row] = [line for line in out if line.startswith(qid) and "set aside" not in line]
    assert "(unreadable)" in row and "JSON" not in row
    assert any(line.startswith(f"{qid} set aside: ") for line in out)


def test_wrkq_json(cfg, cli_queue, capsys):
    qid = enqueue(cli_queue, b"xyz", QTMSOUTQ, "", ("a@remote.test",), next_try=123.5)
    assert run(["--config", cfg, "wrkq", "--json", "--queue", "qtmsoutq"]) == 0
    # No bridge to send it (ENDMSF, the daemon down): it showed as "sending".
    assert json.loads(capsys.readouterr().out)[0]["state"] == "stopped"
    bridge_writing(cli_queue)
    assert run(["--config", cfg, "wrkq", "--json", "--queue", "qtmsoutq"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    row = rows[0]
    assert (row["id"], row["queue"], row["size"], row["originator"]) == (qid, QTMSOUTQ, 3, "")
    assert row["recipients"][0]["address"] == "a@remote.test"
    assert row["recipients"][0]["state"] == "pending"
    assert row["next_try"] == 123.5 and row["attempts"] == 0 and row["age"] >= 0
    assert row["state"] == "sending"  # due long ago


def test_wrkq_without_any_queue_yet(cfg, tmp_path, capsys):
    assert run(["--config", cfg, "wrkq"]) == 0
    assert capsys.readouterr().out.splitlines() == ["(no messages)", "-- 0 messages, 0 bytes"]
    assert not (tmp_path / "var").exists()


def test_wrkq_bad_queue_is_one_line_exit_2(cfg, capsys):
    assert run(["--config", cfg, "wrkq", "--queue", "QTMSNOQ"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "--queue: 'QTMSNOQ'" in lines[0]
    assert "QTMSINQ, QTMSOUTQ, QTMSRTQ1, QTMSRTQ2, QTMSBSSQ, hold, quarantine, corrupt" in lines[0]


def test_wrkq_says_in_one_line_that_it_cannot_read_the_queues(cfg, cli_queue, capsys):
    """As for a queue directory of mode 0700 read by another user than the daemon's."""
    inq = cli_queue.queue_dir(QTMSINQ)
    inq.rmdir()
    inq.write_text("not a directory")
    assert run(["--config", cfg, "wrkq"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the queues cannot be read: Not a directory" in err[0]


def test_json_goes_with_the_listing_only(cfg, cli_queue, capsys):
    """An action's outcome is a sentence: --json beside it would be ignored."""
    qid = enqueue(cli_queue, queue=QUARANTINE)
    for action in (["--retry"], ["--release", qid], ["--delete", qid]):
        assert run(["--config", cfg, "wrkq", "--json", *action]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--json: only for the listing" in err[0]
    assert cli_queue.list(QUARANTINE) == [qid]


def test_an_empty_id_is_a_usage_error_not_a_listing(cfg, cli_queue, capsys):
    for option in ("--delete", "--release"):
        assert run(["--config", cfg, "wrkq", option, ""]) == 2
        err = capsys.readouterr().err
        assert f"{option}: '' is not a queue id" in err


def test_quarantine_actions_on_one_message_take_turns(cfg, cli_queue, capsys):
    """A release and a delete of one id at once: one of them finds it gone."""
    qid = enqueue(cli_queue, queue=QUARANTINE)
    lock = os.open(cli_queue.queue_dir(QUARANTINE), os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another command holding quarantine
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(run(["--config", cfg, "wrkq",
                                                          "--release", qid])))
    t.start()
    t.join(0.3)
    assert t.is_alive() and cli_queue.list(QUARANTINE) == [qid]  # waiting its turn
    cli_queue.remove(QUARANTINE, qid)  # what the other command did meanwhile
    os.close(lock)
    t.join(10)
    assert result == [2]
    assert "is in no queue; allowed: a message in quarantine or corrupt/" in \
        capsys.readouterr().err
    assert cli_queue.find(qid) is None  # no envelope brought back without its body


@pytest.mark.parametrize("packed", [True, False])
def test_a_message_set_aside_is_released_from_corrupt(cfg, cli_queue, capsys, packed):
    """Set aside after its QMSF job failed on it for an hour and a half (a file
    system read-only meanwhile): once mended, the administrator sends it on."""
    from twistmail.journal import read_entries

    qid = enqueue(cli_queue, b"Subject: kept\r\n\r\nsafe\r\n")
    if not packed:
        cli_queue.move(qid, QTMSINQ, QTMSOUTQ)  # an envelope file, its body in data/
        cli_queue.move(qid, QTMSOUTQ, QTMSINQ)
    assert cli_queue.set_aside(QTMSINQ, qid, "its QMSF job failed on it 7 times") is not None
    assert run(["--config", cfg, "wrkq", "--release", qid]) == 0
    assert f"message {qid} released to QTMSINQ" in capsys.readouterr().out
    assert cli_queue.find(qid) == QTMSINQ and cli_queue.list(CORRUPT) == []
    assert cli_queue.body_path(qid, QTMSINQ).read_bytes().endswith(b"safe\r\n")
    assert cli_queue.recover().clean  # nothing left behind for recovery
    entries = list(read_entries(cli_queue.root.parent / "journal", ["7Z"]))
    assert [e["action"] for e in entries] == ["released by the administrator"]


@pytest.mark.parametrize("packed", [True, False])
def test_a_message_cut_short_is_released_as_it_is(cfg, cli_queue, capsys, packed):
    """Set aside for its size; the administrator sends on what is left of it."""
    qid = enqueue(cli_queue, b"Subject: cut\r\n\r\n" + b"x" * 1000 + b"\r\n")
    if not packed:
        cli_queue.move(qid, QTMSINQ, QTMSOUTQ)
        cli_queue.move(qid, QTMSOUTQ, QTMSINQ)
    os.truncate(cli_queue.body_path(qid, QTMSINQ), 40)
    env = cli_queue.load(QTMSINQ, qid)
    assert cli_queue.body_damage(QTMSINQ, env) == "body of 40 bytes, 1018 when it was received"
    assert cli_queue.set_aside(QTMSINQ, qid, "body of 40 bytes, 1018 when it was received") \
        is not None
    assert run(["--config", cfg, "wrkq"]) == 0  # why it is there: not only in its 7Y entry
    assert f"{qid} set aside: body of 40 bytes, 1018 when it was received" in \
        capsys.readouterr().out
    assert run(["--config", cfg, "wrkq", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["error"] == "body of 40 bytes, 1018 when it was received"
    assert row["originator"] == "jane@example.test"
    assert run(["--config", cfg, "wrkq", "--release", qid]) == 0
    out = capsys.readouterr().out
    assert "its body is 40 bytes, 1018 when it was received; released as it is" in out
    env = cli_queue.load(QTMSINQ, qid)
    assert env.size == 40 and cli_queue.body_damage(QTMSINQ, env) is None
    assert os.listdir(cli_queue.queue_dir(CORRUPT)) == []  # its reason went with it


@pytest.mark.parametrize("left", [20, 70])
def test_a_message_cut_short_keeps_its_trace_apart_when_released(cfg, cli_queue, capsys, left):
    """Cut inside its trace fields, none of the message is left: what is left
    of them stays trace, never sent or stored as the message."""
    trace = b"Return-Path: <jane@example.test>\r\nDelivered-To: sam@example.test\r\n"
    with cli_queue.new_spool(Envelope.new("jane@example.test", ("sam@example.test",))) as spool:
        spool.write_trace(trace)
        spool.write(b"Subject: cut\r\n\r\n" + b"x" * 100 + b"\r\n")
        qid = spool.commit(QTMSINQ)
    os.truncate(cli_queue.body_path(qid, QTMSINQ), left)
    env = cli_queue.load(QTMSINQ, qid)
    assert cli_queue.set_aside(QTMSINQ, qid, cli_queue.body_damage(QTMSINQ, env)) is not None
    assert run(["--config", cfg, "wrkq", "--release", qid]) == 0
    size = max(0, left - len(trace))
    assert f"its body is {size} bytes, 118 when it was received" in capsys.readouterr().out
    env = cli_queue.load(QTMSINQ, qid)
    assert (env.size, env.trace) == (size, min(left, len(trace)))
    assert cli_queue.body_damage(QTMSINQ, env) is None


def test_a_damaged_message_stays_in_corrupt_and_can_be_deleted(cfg, cli_queue, capsys):
    qid = enqueue(cli_queue)
    cli_queue.move(qid, QTMSINQ, QTMSOUTQ)
    (cli_queue.queue_dir(QTMSOUTQ) / f"{qid}.json").write_text("{not json")
    assert cli_queue.set_aside(QTMSOUTQ, qid, "unreadable envelope") is not None
    assert run(["--config", cfg, "wrkq", "--release", qid]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its envelope cannot be read" in err[0] and "stays in corrupt/" \
        in err[0]
    assert cli_queue.list(CORRUPT) == [qid]
    assert run(["--config", cfg, "wrkq", "--delete", qid]) == 0
    assert f"message {qid} deleted from corrupt/" in capsys.readouterr().out
    assert all_files(cli_queue) == []


def test_wrkq_says_which_mail_hlddstq_holds(cfg, cli_queue, capsys):
    enqueue(cli_queue, b"x", QTMSOUTQ, "", ("a@remote.test",))
    enqueue(cli_queue, b"y", QTMSRTQ1, "", ("b@remote.test",))
    assert run(["--config", cfg, "hlddstq"]) == 0
    capsys.readouterr()
    assert run(["--config", cfg, "wrkq", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["queue"], r["state"]) for r in rows) == [
        (QTMSOUTQ, "held"), (QTMSRTQ1, "retry")]


def test_hlddstq_holds_until_every_held_priority_is_released(cfg, cli_queue, capsys):
    from twistmail.bridge.outbound import held_parts

    root = cli_queue.root
    assert run(["--config", cfg, "hlddstq", "--pty", "*normal"]) == 0
    assert run(["--config", cfg, "hlddstq", "--pty", "*HIGH"]) == 0
    assert held_parts(root) == ["*NORMAL", "*HIGH"]
    capsys.readouterr()
    assert run(["--config", cfg, "rlsdstq", "--pty", "*HIGH"]) == 0
    assert "*NORMAL still held" in capsys.readouterr().out
    assert held_parts(root) == ["*NORMAL"]
    assert run(["--config", cfg, "rlsdstq"]) == 0
    assert "outbound delivery resumes" in capsys.readouterr().out
    assert held_parts(root) == []
    assert run(["--config", cfg, "rlsdstq"]) == 0  # again: nothing was held
    assert capsys.readouterr().out == "QSMTPQ *NORMAL was not held: outbound delivery goes on\n"


@pytest.mark.parametrize("command", ["hlddstq", "rlsdstq"])
def test_a_bad_priority_is_a_usage_error(cfg, cli_queue, capsys, command):
    assert run(["--config", cfg, command, "--pty", "BOGUS"]) == 2
    err = capsys.readouterr().err
    assert "--pty: 'BOGUS' is not allowed; allowed: *NORMAL, *HIGH" in err


def test_hlddstq_makes_no_queues_for_a_wrong_datadir(cfg, tmp_path, capsys):
    assert run(["--config", cfg, "hlddstq"]) == 1
    assert "no mail queues in" in capsys.readouterr().err
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-3, "0s"), (0, "0s"), (5, "5s"), (59.9, "59s"), (60, "1m"), (3599, "59m"),
     (3600, "1h"), (86399, "23h"), (86400, "1d"), (10 * 86400, "10d")],
)  # fmt: skip
def test_human_age(seconds, text):
    assert queuecmds.human_age(seconds) == text


# -- throughput (printed with -s; no assertion on timing) -------------------------


def _commit_rate(fq: FileQueue, threads: int, seconds: float = 1.0) -> float:
    body = os.urandom(4096)
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def work(n: int) -> None:
        while time.monotonic() < stop:
            enqueue(fq, body)
            counts[n] += 1

    start = time.monotonic()
    ts = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def test_commit_rate_of_4k_messages(tmp_path):
    rates = {n: _commit_rate(FileQueue(tmp_path / f"q{n}"), n) for n in (1, 8)}
    print(
        f"\nqueue commits/s, 4 KiB bodies, 4 fsyncs each: "
        f"1 thread {rates[1]:.0f}, 8 threads {rates[8]:.0f}"
    )
    assert all(r > 0 for r in rates.values())


def test_a_bridge_is_running_by_its_pid_not_by_the_age_of_its_status(tmp_path):
    """A bridge that cannot write its status (a full disk) still runs; one
    killed left a status behind."""
    import os
    import subprocess
    import sys

    from twistmail.bridge.status import bridge_running

    status = tmp_path / "QTMSCCLCP.json"
    status.write_text(json.dumps({"at": time.time() - 3600, "pid": os.getpid()}))
    assert bridge_running(tmp_path, time.time())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    status.write_text(json.dumps({"at": time.time(), "pid": int(gone)}))
    assert not bridge_running(tmp_path, time.time())
    status.unlink()
    assert not bridge_running(tmp_path, time.time())  # ENDMSF removes it


def test_an_envelope_write_that_fails_leaves_no_file(tmp_path, monkeypatch):
    """A full disk: the empty file stayed in tmp/ for a day while its writer lived."""
    import errno

    from twistmail import queue as queuemod

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(queuemod.os, "write", full)
    path = tmp_path / "x.json"
    with pytest.raises(OSError):
        queuemod._write_synced(path, b"{}")
    assert not path.exists()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "1s"), (5, "5s"), (59.6, "1m"), (89, "1m"), (91, "2m"), (3500, "58m"),
     (3590, "1h"), (86397, "1d"), (50000, "14h"), (10 * 86400, "10d")],
)  # fmt: skip
def test_a_time_to_come_reads_to_the_nearest_unit(seconds, text):
    """A retry due in 86,397 s showed as "in 23h"."""
    assert queuecmds._human_wait(seconds) == text


def test_trace_fields_are_counted_apart_from_the_message(tmp_path):
    """The size a message is judged and listed by is its own, not its trace's."""
    fq = FileQueue(tmp_path / "q")
    trace = b"Return-Path: <a@x.test>\r\nDelivered-To: b@y.test\r\n"
    with fq.new_spool() as spool:
        spool.write_trace(trace)
        spool.write(b"Subject: s\r\n\r\nbody\r\n")
        with pytest.raises(ValueError):
            spool.write_trace(trace)  # only first
        qid = spool.commit(QTMSINQ, Envelope(spool.id, "a@x.test", (Recipient("b@y.test"),),
                                             time.time()))
    env = fq.load(QTMSINQ, qid)
    assert (env.trace, env.size) == (len(trace), len(b"Subject: s\r\n\r\nbody\r\n"))
    assert fq.body_damage(QTMSINQ, env) is None
    [entry] = [e for e in fq.entries(QTMSINQ)]
    assert entry.size == env.size
    body = fq.body_path(qid, QTMSINQ)
    os.truncate(body, len(trace) + 3)
    assert fq.body_damage(QTMSINQ, env) == f"body of 3 bytes, {env.size} when it was received"
    os.truncate(body, 5)
    assert "shorter than its" in fq.body_damage(QTMSINQ, env)


def test_wrkq_delete_of_many_kept_messages_says_how_many(cfg, cli_queue, capsys):
    """One total, not a line per message, and every kept message counted."""
    quarantined = [enqueue(cli_queue, queue=QUARANTINE) for _ in range(3)]
    damaged = enqueue(cli_queue, queue=CORRUPT)
    assert run(["--config", cfg, "wrkq", "--delete", quarantined[0], "--delete", damaged]) == 0
    assert capsys.readouterr().out == "2 messages deleted\n"
    assert run(["--config", cfg, "wrkq", "--delete", "ALL", "--queue", "quarantine"]) == 0
    assert capsys.readouterr().out == "2 messages deleted\n"
    assert cli_queue.list(QUARANTINE) == [] and cli_queue.list(CORRUPT) == []


@pytest.mark.parametrize("args", [
    ["--delete", "18ed4d68f53b50905b1834", "--queue", "QTMSRTQ2"],
    ["--retry", "--queue", "nosuch"],
    ["--release", "18ed4d68f53b50905b1834", "--queue", "quarantine"],
])
def test_wrkq_queue_goes_only_with_a_listing_or_delete_all(cfg, cli_queue, capsys, args):
    assert run(["--config", cfg, "wrkq", *args]) == 2
    assert "--queue: only to list one queue, or with --delete ALL" in capsys.readouterr().err


def test_a_fifo_named_as_an_envelope_is_damaged_not_waited_on(fq):
    """Opened as a file, it held the bridge's reading thread and every wrkq for ever."""
    qid = new_queue_id()
    fq.queue_dir(QTMSRTQ1).mkdir(parents=True, exist_ok=True)
    os.mkfifo(fq.queue_dir(QTMSRTQ1) / f"{qid}.json")
    with pytest.raises(CorruptEnvelope, match="not a regular file"):
        fq.load(QTMSRTQ1, qid)
    [entry] = fq.entries(QTMSRTQ1)
    assert entry.id == qid and entry.error is not None
    item = fq.set_aside(QTMSRTQ1, qid, "not a regular file")
    assert item.id == qid and fq.list(QTMSRTQ1) == []


@pytest.mark.parametrize(("start", "to", "first"), [
    (QTMSINQ, QTMSOUTQ, False),  # moved on: met in both directories
    (QTMSRTQ1, QTMSOUTQ, True),  # moved back (a retry): met in neither
])
def test_a_listing_of_every_queue_shows_a_message_moved_meanwhile_once(
        fq, monkeypatch, start, to, first):
    """wrkq read the queues one after another while the bridge moved mail
    between them: a message was listed twice, or not at all."""
    qid = enqueue(fq, queue=start)
    other = enqueue(fq, queue=QTMSINQ)
    read = FileQueue.list

    def read_while_moving(self, queue):
        """The move comes just before (or after) ``to`` is read."""
        ids = read(self, queue) if first else None
        if queue == to and qid in read(self, start):
            fq.move(qid, start, to)
        return read(self, queue) if ids is None else ids

    monkeypatch.setattr(FileQueue, "list", read_while_moving)
    listed = [(e.queue, e.id) for e in fq.entries()]
    assert sorted(listed) == sorted([(QTMSINQ, other), (to, qid)])


def test_a_message_sent_before_its_retry_is_due_is_listed_as_sending(fq):
    """wrkq --retry sends mail at once and the message keeps its next try:
    wrkq said "waiting ... in 50s" for mail under way."""
    from twistmail.cli.queuecmds import state_of
    from twistmail.queue import EARLY

    now = time.time()
    kept = enqueue(fq, queue=QTMSOUTQ, next_try=now + 50)
    early = enqueue(fq, queue=QTMSOUTQ, next_try=now + 50, history=({EARLY: True},))
    states = {e.id: state_of(e, now, held=False) for e in fq.entries(QTMSOUTQ)}
    assert states == {kept: "waiting", early: "sending"}
    assert "early" not in next(fq.entries(QTMSOUTQ)).to_dict()  # wrkq --json as it was
