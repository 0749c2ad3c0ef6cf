"""The QZMF journal: entry format, seq across processes, rotation, reading, dspjrn/chgjrn."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import multiprocessing
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from twistmail import journal
from twistmail.cli import journalcmds  # noqa: F401
from twistmail.cli.base import run
from twistmail.journal import (
    CODES,
    Journal,
    follow,
    parse_time,
    read_entries,
    receiver_name,
    receivers,
)


def lines_of(directory: Path) -> list[str]:
    out: list[str] = []
    for _, path in receivers(directory):
        out.extend(path.read_text().splitlines())
    return out


def test_codes_table() -> None:
    for code in ("7A", "7L", "8C", "88", "82", "9S", "9V", "B8", "AP", "EH", "JS", "JK", "JH"):
        assert code in CODES
    assert all(len(c) == 2 for c in CODES)
    assert all(meaning for meaning in CODES.values())


def test_entry_format_and_key_order(tmp_path: Path) -> None:
    j = Journal(tmp_path, "QTSMTPSRVP/4711")
    seq = j.write("88", "88 DLV 127.0.0.1", "Q0001", ip="127.0.0.1", recipient="sam@example.test")
    assert seq == 1
    assert j.write("JS", "JS QTSMTPSRVP started") == 2
    first, second = lines_of(tmp_path)
    assert " " not in first.split('"esd"')[0]  # compact separators
    entry = json.loads(first)
    assert list(entry) == ["seq", "ts", "code", "job", "msgid", "esd", "ip", "recipient"]
    assert entry["code"] == "88" and entry["job"] == "QTSMTPSRVP/4711"
    assert entry["msgid"] == "Q0001" and entry["esd"] == "88 DLV 127.0.0.1"
    assert entry["ts"].endswith("Z") and len(entry["ts"].split(".")[1]) == 7
    ts = datetime.fromisoformat(entry["ts"])
    assert abs(ts - datetime.now(UTC)) < timedelta(seconds=5)
    assert json.loads(second)["msgid"] is None
    with pytest.raises(ValueError):
        j.write("888", "bad")
    with pytest.raises(ValueError):
        j.write("88", "bad", seq=4)


def _writer(directory: str, n: int, worker: int, size: int) -> None:
    j = Journal(Path(directory), f"QTSMTPSRVP/{os.getpid()}", receiver_size=size)
    for i in range(n):
        assert j.write("92", f"92 R u{i}@example.test", f"Q{worker}-{i}", n=i) is not None
        if worker == 0 and i == n // 2:
            j.new_receiver()


def test_seq_strictly_increasing_across_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    n, size = 2000, 32 * 1024
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), n, w, size)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    entries = [json.loads(line) for line in lines_of(tmp_path)]
    seqs = [e["seq"] for e in entries]
    assert seqs == list(range(1, 4 * n + 1))  # file order is seq order, none lost
    assert len({e["job"] for e in entries}) == 4
    found = receivers(tmp_path)
    assert len(found) > 10
    biggest_line = max(len(line) + 1 for line in lines_of(tmp_path))
    for _, path in found[:-1]:
        assert path.stat().st_size < size + biggest_line


def test_journal_inherited_through_fork(tmp_path: Path) -> None:
    """A forked child must not share the parent's lock: it reopens the files."""
    j = Journal(tmp_path, "QTSMTPSRVD/1", receiver_size=8192)
    j.write("JG", "JG controller started")

    def child() -> None:
        for i in range(300):
            j.write("JS", f"JS job {i}")

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=child) for _ in range(2)]
    for p in procs:
        p.start()
    for i in range(300):
        j.write("JW", f"JW {i}")
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert [json.loads(line)["seq"] for line in lines_of(tmp_path)] == list(range(1, 902))


def test_rotation_by_size_and_new_receiver(tmp_path: Path) -> None:
    j = Journal(tmp_path, "QTSMTPBRSR/1", receiver_size=4096)
    for i in range(100):
        j.write("7A", "7A QTMSINQ TO QTSMTPBRSR", f"Q{i}")
    names = [p.name for _, p in receivers(tmp_path)]
    assert names[0] == "QZMF.000001.jsonl" and len(names) > 2
    j.receiver_size = 1 << 20
    name = j.new_receiver()
    assert name == receiver_name(len(names) + 1)
    seq = j.write("7M", "7M QTMSBSSQ TO QTSMTPBRSR")
    assert seq == 101
    assert json.loads((tmp_path / name).read_text())["seq"] == 101
    other = Journal(tmp_path, "QTSMTPSRVP/2")
    assert other.write("94", "94 LIN 10.0.0.1") == 102
    assert len((tmp_path / name).read_text().splitlines()) == 2


def test_old_receivers_go_as_new_ones_start(tmp_path: Path) -> None:
    """keep_receivers: the journal never fills the disk; seq goes on regardless."""
    j = Journal(tmp_path, "QTSMTPBRSR/1", receiver_size=4096, keep_receivers=2)
    for i in range(200):
        j.write("7A", "7A QTMSINQ TO QTSMTPBRSR", f"Q{i}")
    numbers = [n for n, _ in receivers(tmp_path)]
    assert len(numbers) == 2 and numbers[1] == numbers[0] + 1 > 2
    assert j.write("7M", "7M QTMSBSSQ TO QTSMTPBRSR") == 201
    assert Journal(tmp_path, "x", keep_receivers=0).new_receiver()  # 0 keeps every one
    assert len(receivers(tmp_path)) == 3


def test_a_quiet_writer_keeps_no_deleted_receiver_open(tmp_path: Path) -> None:
    """An idle job must not hold on to the space of a receiver rotation deleted."""
    quiet = Journal(tmp_path, "QTPOPSRVP/1", receiver_size=4096, keep_receivers=2)
    quiet.write("JS", "JS STR QTPOPSRVP/1")
    busy = Journal(tmp_path, "QTSMTPBRSR/2", receiver_size=4096, keep_receivers=2)
    for i in range(200):
        busy.write("7A", "7A QTMSINQ TO QTSMTPBRSR", f"Q{i}")
    assert receivers(tmp_path)[0][0] > 2  # the quiet writer's receiver is gone
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # listdir's own, closed by now
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert not [link for link in held if str(tmp_path) in link and "(deleted)" in link]
    assert quiet.write("JE", "JE END QTPOPSRVP/1") == 202


def test_disabled_journal_writes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "journal"
    j = Journal(d, "QTSMTPSRVP/1", enabled=False)
    assert j.write("94", "94 LIN 10.0.0.1") is None
    assert not d.exists()
    j.enabled = True
    assert j.write("94", "94 LIN 10.0.0.1") == 1
    j.enabled = False
    assert j.write("94", "94 LIN 10.0.0.1") is None
    assert len(lines_of(d)) == 1


def test_lost_state_and_torn_line_recovered(tmp_path: Path) -> None:
    j = Journal(tmp_path, "QTSMTPSRVP/1")
    for _ in range(5):
        j.write("91", "91 O a@example.test")
    j.close()
    (tmp_path / journal.STATE_FILE).unlink()
    current = receivers(tmp_path)[-1][1]
    with open(current, "ab") as f:
        f.write(b'{"seq":6,"ts":"2024-')  # a writer killed mid-line
    again = Journal(tmp_path, "QTSMTPSRVP/2")
    assert again.write("92", "92 R b@example.test") == 6
    assert [e["seq"] for e in read_entries(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_stale_state_after_killed_writer(tmp_path: Path) -> None:
    """A writer killed between appending and updating the state must not cause a duplicate."""
    j = Journal(tmp_path, "QTSMTPSRVP/1")
    j.write("91", "91 O a@example.test")
    current = receivers(tmp_path)[-1][1]
    with open(current, "a") as f:
        f.write('{"seq":2,"ts":"2024-05-01T10:00:00.000000Z","code":"92"}\n')
    assert Journal(tmp_path, "QTSMTPSRVP/2").write("92", "92 R b@example.test") == 3
    assert j.write("99", "99 <id@example.test>") == 4


def test_write_speed(tmp_path: Path) -> None:
    j = Journal(tmp_path, "QTSMTPSRVP/4711", receiver_size=1 << 20)
    n = 20000
    start = time.perf_counter()
    for i in range(n):
        j.write("82", "82 R sam@example.test", f"Q{i}", recipient="sam@example.test")
    rate = n / (time.perf_counter() - start)
    print(f"\njournal: {rate:,.0f} writes/s from one process")
    assert sum(1 for _ in read_entries(tmp_path)) == n


def qid(i: int) -> str:
    """A queue id, as dspjrn --msgid takes them."""
    return f"18ed{i:018x}"


def _filled(directory: Path) -> None:
    j = Journal(directory, "QTSMTPSRVP/7", receiver_size=4096)
    for i in range(30):
        j.write("94", "94 LIN 10.0.0.1", qid(i))
        j.write("92", "92 R sam@example.test", qid(i), recipient="sam@example.test")
        j.write("88", "88 DLV 10.0.0.2", qid(i), ip="10.0.0.2")
    j.write("9S", "9S 192.0.2.7", ip="192.0.2.7")


def test_read_filters(tmp_path: Path) -> None:
    _filled(tmp_path)
    assert len(receivers(tmp_path)) > 1
    assert [e["seq"] for e in read_entries(tmp_path)] == list(range(1, 92))
    assert {e["code"] for e in read_entries(tmp_path, codes=["9*"])} == {"94", "92", "9S"}
    assert [e["code"] for e in read_entries(tmp_path, codes=["9S", "8*"])].count("88") == 30
    assert [e["code"] for e in read_entries(tmp_path, codes=["*S"])] == ["9S"]
    assert [e["code"] for e in read_entries(tmp_path, msgid=qid(7))] == ["94", "92", "88"]
    all_entries = list(read_entries(tmp_path))
    t10 = datetime.fromisoformat(all_entries[9]["ts"])
    t20 = datetime.fromisoformat(all_entries[19]["ts"])
    window = [e["seq"] for e in read_entries(tmp_path, since=t10, until=t20)]
    assert window[0] <= 10 and window[-1] >= 20 and 11 in window
    assert list(read_entries(tmp_path, since=datetime.now(UTC) + timedelta(hours=1))) == []
    with pytest.raises(ValueError):
        list(read_entries(tmp_path, codes=["9SX"]))
    assert list(read_entries(tmp_path / "nothing")) == []


def test_partial_line_not_yielded(tmp_path: Path) -> None:
    j = Journal(tmp_path, "QTSMTPSRVP/1")
    j.write("94", "94 LIN 10.0.0.1", "Q1")
    path = receivers(tmp_path)[0][1]
    whole = json.dumps({"seq": 2, "ts": "2024-05-01T10:00:00.000000Z", "code": "97"}) + "\n"
    with open(path, "a") as f:
        f.write(whole[:20])
    assert [e["seq"] for e in read_entries(tmp_path)] == [1]

    got: list[dict] = []
    deadline = time.monotonic() + 5
    it = follow(tmp_path, poll_interval=0.01, stop=lambda: time.monotonic() > deadline)
    got.append(next(it))
    with open(path, "a") as f:
        f.write(whole[20:])
    got.append(next(it))
    it.close()
    assert [e["seq"] for e in got] == [1, 2]


def test_follow_across_rotation(tmp_path: Path) -> None:
    total = 300
    j = Journal(tmp_path, "QTSMTPCLTP/9", receiver_size=2048)
    for i in range(10):
        j.write("8B", "8B QTMSOUTQ TO QTSMTPCLTP", f"Q{i}")

    def produce() -> None:
        for i in range(10, total):
            j.write("88" if i % 2 else "8B", "8x", f"Q{i}")
            if i % 50 == 0:
                time.sleep(0.02)

    writer = threading.Thread(target=produce)
    deadline = time.monotonic() + 8
    seen: list[int] = []
    writer.start()
    for entry in follow(tmp_path, poll_interval=0.01, stop=lambda: time.monotonic() > deadline):
        seen.append(entry["seq"])
        if len(seen) == total:
            break
    writer.join()
    assert seen == list(range(1, total + 1))
    assert len(receivers(tmp_path)) > 5

    codes_only = follow(
        tmp_path, codes=["88"], poll_interval=0.01, stop=lambda: time.monotonic() > deadline
    )
    assert all(next(codes_only)["code"] == "88" for _ in range(5))
    codes_only.close()


def test_follow_ends_past_until(tmp_path: Path) -> None:
    j = Journal(tmp_path, "QTSMTPSRVP/1")
    j.write("94", "94 LIN 10.0.0.1")
    until = datetime.now(UTC)
    time.sleep(0.002)
    j.write("97", "97 QTSMTPSRVP TO QTMSINQ")
    assert [e["seq"] for e in follow(tmp_path, until=until, poll_interval=0.01)] == [1]


def test_parse_time() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_time("-10m", now) == now - timedelta(minutes=10)
    assert parse_time("-2h", now) == now - timedelta(hours=2)
    assert parse_time("-1d", now) == now - timedelta(days=1)
    assert parse_time("2024-05-01T10:30:00", now) == datetime(2024, 5, 1, 10, 30, tzinfo=UTC)
    assert parse_time("2024-05-01T12:30:00+02:00") == datetime(2024, 5, 1, 10, 30, tzinfo=UTC)
    assert parse_time("2024-05-01T10:30:00Z") == datetime(2024, 5, 1, 10, 30, tzinfo=UTC)
    assert parse_time("2024-04-30") == datetime(2024, 4, 30, tzinfo=UTC)
    end = parse_time("2024-04-30", end_of_day=True)
    assert end == datetime(2024, 4, 30, 23, 59, 59, 999999, tzinfo=UTC)
    assert parse_time("08:15", now) == datetime(2024, 5, 1, 8, 15, tzinfo=UTC)
    # IBM's FROMTIME('113026' '070257'): MMDDYY and HHMMSS; one word is ISO's.
    assert parse_time("113026 070257", now) == datetime(2026, 11, 30, 7, 2, 57, tzinfo=UTC)
    assert parse_time("010199 0800", now) == datetime(1999, 1, 1, 8, 0, tzinfo=UTC)
    assert parse_time("113026", now) == datetime(2026, 11, 30, tzinfo=UTC)  # a date, as IBM's
    assert parse_time("113026", now, end_of_day=True) == datetime(
        2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC)
    assert parse_time("113026 080434", now, end_of_day=True) == datetime(
        2026, 11, 30, 8, 4, 34, 999999, tzinfo=UTC)  # TOTIME: that whole second
    # An ISO --to takes the whole of its last unit too; a fraction is exact.
    for text, last in (("2026-11-30T08", (8, 59, 59, 999999)),
                       ("2026-11-30T08:04", (8, 4, 59, 999999)),
                       ("08:04:34Z", (8, 4, 34, 999999)),
                       ("2026-11-30T03:04:34-05:00", (8, 4, 34, 999999)),
                       ("20261130T0804", (8, 4, 59, 999999)),
                       ("20261130", (23, 59, 59, 999999)),
                       ("2026-W49-1", (23, 59, 59, 999999)),
                       ("2026-11-30_08", (8, 59, 59, 999999)),
                       ("2026-11-30 08:04", (8, 4, 59, 999999)),
                       ("2026-11-30T08:04:34.25", (8, 4, 34, 250000))):
        today = datetime(2026, 11, 30, tzinfo=UTC)
        assert parse_time(text, today, end_of_day=True) == today.replace(
            hour=last[0], minute=last[1], second=last[2], microsecond=last[3]), text
    # A bare time of day: the date is today's where its offset is; "T22" is
    # the whole hour, as "22" is; a year or a month alone is no time of day.
    late = datetime(2026, 11, 30, 22, 33, tzinfo=UTC)
    assert parse_time("01:00+03:00", late) == datetime(2026, 11, 30, 22, 0, tzinfo=UTC)
    assert parse_time("T22", late, end_of_day=True) == parse_time("22", late, end_of_day=True)
    assert parse_time("T0815Z", late) == datetime(2026, 11, 30, 8, 15, tzinfo=UTC)
    for bad in ("yesterday", "", "-10x", "10m", "2024-13-01", "-99999999999h", "-999999d",
                "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00",
                "133026 070257", "2026", "2026-11", "0815"):
        with pytest.raises(ValueError, match="not a time"):
            parse_time(bad, now)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "twistmail.toml"
    cfg.write_text('[system]\ndatadir = "var"\n')
    _filled(tmp_path / "var" / "journal")
    return cfg


def test_dspjrn_table(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--config", str(config), "dspjrn", "--code", "9S,8*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["seq", "time", "(UTC)", "code", "job", "msgid", "esd"]
    assert len(out) == 1 + 31
    assert out[1].split()[3:6] == ["88", "QTSMTPSRVP/7", qid(0)]
    assert out[-1].split()[3:] == ["9S", "QTSMTPSRVP/7", "9S", "192.0.2.7"]
    # IBM's entry type of every QZMF entry, and its default, select them all.
    for every in ("LG", "*ALL", "lg", "9S,LG"):
        assert run(["--config", str(config), "dspjrn", "--code", every]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 1 + 91
    # ... but a typo beside it is still named.
    assert run(["--config", str(config), "dspjrn", "--code", "LG,ZZ"]) == 2
    assert "'ZZ'" in capsys.readouterr().err


def test_dspjrn_json_and_msgid(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--config", str(config), "dspjrn", "--msgid", qid(3), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["code"] for e in entries] == ["94", "92", "88"]
    assert entries[1]["recipient"] == "sam@example.test"
    assert run(["--config", str(config), "dspjrn", "--from", "-1m", "--to", "now"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 92
    assert run(["--config", str(config), "dspjrn", "--from", "2999-01-01"]) == 0
    assert capsys.readouterr().out.strip() == "(no journal entries)"


def test_dspjrn_follow_json(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    until = (datetime.now(UTC) + timedelta(milliseconds=1)).isoformat()
    time.sleep(0.005)
    Journal(config.parent / "var" / "journal", "QTSMTPSRVP/8").write("JE", "JE maxuse")
    args = ["--config", str(config), "dspjrn", "--follow", "--json", "--code", "9S", "--to", until]
    assert run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["code"] for line in lines] == ["9S"]


def test_dspjrn_follow_prints_the_table_s_columns(config: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """With or without a queue id, each entry's esd is under the header's."""
    until = (datetime.now(UTC) + timedelta(milliseconds=1)).isoformat()
    time.sleep(0.005)
    Journal(config.parent / "var" / "journal", "QTSMTPSRVP/8").write("JE", "JE maxuse")  # past it
    args = ["--config", str(config), "dspjrn", "--follow", "--msgid", qid(3), "--to", until]
    assert run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["seq", "time", "(UTC)", "code", "job", "msgid", "esd"]
    at = lines[0].index("esd")
    assert [line[at - 24:at].strip() for line in lines[1:]] == [qid(3)] * 3
    # An id copied in capitals is the same id.
    assert run(["--config", str(config), "dspjrn", "--msgid", qid(3).upper()]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line[at:] for line in lines[1:]] == [
        line[table[0].index("esd"):] for line in table[1:]]
    assert run(["--config", str(config), "dspjrn", "--follow", "--code", "9S", "--to", until]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines[0].index("esd")
    assert lines[-1][at - 24:at].strip() == "" and lines[-1][at:].startswith("9S ")


def test_dspjrn_outfile(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out.csv"
    assert run(["--config", str(config), "dspjrn", "--code", "88", "--outfile", str(target)]) == 0
    assert "30 entries" in capsys.readouterr().out
    with open(target, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["seq", "ts", "code", "job", "msgid", "esd", "fields"]
    assert len(rows) == 30 and rows[0]["code"] == "88"
    assert json.loads(rows[0]["fields"]) == {"ip": "10.0.0.2"}


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--code", "9S,,8*"], "--code"),
        (["--code", "9SX"], "--code"),
        (["--code", "ZZ"], "--code"),
        (["--from", "yesterday"], "--from"),
        (["--to", "-5q"], "--to"),
        (["--jrn", "QAUDJRN"], "--jrn"),
        (["--output", "*", "--outfile", "j.csv"], "--outfile"),  # shown or written, not both
        (["--output", "*OUTFILE"], "--output"),
        (["--msgid", ""], "--msgid"),
        (["--msgid", "  "], "--msgid"),
        (["--msgid", "Q3"], "--msgid"),  # matched nothing, silently
        (["--msgid", qid(3) + "0"], "--msgid"),
    ],
)
def test_dspjrn_usage_errors(
    config: Path, capsys: pytest.CaptureFixture[str], args: list[str], option: str
) -> None:
    assert run(["--config", str(config), "dspjrn", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert option in captured.err


def test_chgjrn(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = config.parent / "var" / "journal"
    before = receivers(directory)[-1][0]
    assert run(["--config", str(config), "chgjrn"]) == 0
    name = capsys.readouterr().out.strip()
    assert name == receiver_name(before + 1)
    assert (directory / name).exists()
    Journal(directory, "QTSMTPSRVP/1").write("94", "94 LIN 10.0.0.1")
    assert json.loads((directory / name).read_text())["seq"] == 92


def test_chgjrn_without_journal_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text('[system]\ndatadir = "var"\n')
    assert run(["--config", str(cfg), "dspjrn"]) == 0
    assert capsys.readouterr().out.strip() == "(no journal entries)"
    assert run(["--config", str(cfg), "chgjrn"]) == 0
    assert capsys.readouterr().out.strip() == receiver_name(1)
    assert run(["--config", str(cfg), "chgjrn"]) == 0
    assert capsys.readouterr().out.strip() == receiver_name(2)


def test_a_batch_goes_out_in_one_write_with_consecutive_seqs(tmp_path):
    j = journal.Journal(tmp_path, "QTSMTPSRVR/1")
    other = journal.Journal(tmp_path, "QTSMTPSRVR/2")
    j.write("94", "94 LIN 127.0.0.1", "Q1")
    with j.batch():
        assert j.write("91", "91 O a@b", "Q2") is None
        with j.batch():  # nested: the outer block writes
            j.write("92", "92 R c@d", "Q2")
        other.write("JS", "JS STR")  # another writer takes the lock meanwhile
        assert [e["code"] for e in journal.read_entries(tmp_path)] == ["94", "JS"]
        j.write("97", "97 TIQ QTMSINQ", "Q2")
    entries = list(journal.read_entries(tmp_path))
    assert [e["code"] for e in entries] == ["94", "JS", "91", "92", "97"]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert len({e["ts"] for e in entries[2:]}) == 1


def test_flush_writes_a_batch_so_far_and_the_batch_goes_on(tmp_path):
    j = journal.Journal(tmp_path, "QTSMTPBRSR/1")
    with j.batch():
        j.write("7A", "7A FIQ QTMSINQ", "Q1")
        j.write("B8", "B8 DLV SAM", "Q1")
        j.flush()  # before the message leaves QTMSINQ
        assert [e["code"] for e in journal.read_entries(tmp_path)] == ["7A", "B8"]
        j.write("7P", "7P UNDL a@b", "Q1")
        assert len(list(journal.read_entries(tmp_path))) == 2
    assert [e["code"] for e in journal.read_entries(tmp_path)] == ["7A", "B8", "7P"]
    j.flush()  # outside a batch: nothing to do


def test_an_exception_in_a_batch_still_writes_what_came_before(tmp_path):
    j = journal.Journal(tmp_path, "QTSMTPBRSR/1")
    with pytest.raises(RuntimeError), j.batch():
        j.write("7A", "7A FIQ QTMSINQ", "Q1")
        raise RuntimeError("delivery failed")
    assert [e["code"] for e in journal.read_entries(tmp_path)] == ["7A"]


# -- writers that died at the worst moment ------------------------------------------


def _state_bytes(directory: Path) -> bytes:
    return (directory / journal.STATE_FILE).read_bytes()


def test_chgjrn_after_a_writer_killed_between_its_write_and_its_state(tmp_path: Path) -> None:
    """The state is one entry behind the file: the new receiver must not reuse its seq."""
    j = Journal(tmp_path, "T/1")
    j.write("ZZ", "one")
    behind = _state_bytes(tmp_path)
    j.write("ZZ", "two")
    j.close()
    (tmp_path / journal.STATE_FILE).write_bytes(behind)  # as the killed writer left it
    other = Journal(tmp_path, "T/2")
    other.new_receiver()
    other.write("ZZ", "three")
    seqs = [e["seq"] for e in read_entries(tmp_path)]
    assert seqs == [1, 2, 3]


def test_a_rotation_whose_writer_died_is_finished_by_the_next_writer(tmp_path: Path) -> None:
    """Followers move to the new receiver as soon as it exists: later entries must go there."""
    j = Journal(tmp_path, "T/1")
    j.write("ZZ", "one")
    j.close()
    (tmp_path / receiver_name(2)).touch()  # created; the state still names receiver 1
    seen: list[int] = []
    deadline = time.monotonic() + 1.0
    tail = threading.Thread(target=lambda: seen.extend(
        e["seq"] for e in follow(tmp_path, poll_interval=0.01,
                                 stop=lambda: time.monotonic() > deadline)))
    tail.start()
    time.sleep(0.1)
    other = Journal(tmp_path, "T/2")
    other.write("ZZ", "two")
    other.write("ZZ", "three")
    tail.join()
    assert seen == [1, 2, 3]
    assert [e["seq"] for e in read_entries(tmp_path)] == [1, 2, 3]


def test_a_field_json_cannot_hold_loses_no_other_entry(tmp_path: Path) -> None:
    j = Journal(tmp_path, "T/1")
    with j.batch():
        j.write("ZZ", "before")
        j.write("ZZ", "file", path="/tmp/n\udcff.mime")  # a name that was not UTF-8
        j.write("ZZ", "bad", weird={("a", "b"): 1})  # not JSON at all: this one only
        j.write("ZZ", "after")
    entries = list(read_entries(tmp_path))
    assert [e["esd"] for e in entries] == ["before", "file", "after"]
    assert entries[1]["path"] == "/tmp/n\udcff.mime" and j.failures == 1


def test_follow_until_ends_at_any_later_entry_not_only_its_message_s(tmp_path: Path) -> None:
    j = Journal(tmp_path, "T/1")
    j.write("ZZ", "mine", "MSG1")
    until = datetime.now(UTC)
    time.sleep(0.01)
    j.write("ZZ", "another's", "MSG2")
    deadline = time.monotonic() + 5
    got = list(follow(tmp_path, msgid="MSG1", until=until, poll_interval=0.01,
                      stop=lambda: time.monotonic() > deadline))
    assert [e["esd"] for e in got] == ["mine"] and time.monotonic() < deadline


def test_dltjrnrcv_deletes_detached_receivers_only(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = config.parent / "var" / "journal"
    j = Journal(directory, "CHGJRN/1")
    j.new_receiver()
    j.new_receiver()
    names = [p.name for _, p in receivers(directory)]
    first, second, attached = names[0], names[1], names[-1]
    assert run(["--config", str(config), "dltjrnrcv", "--jrnrcv", first]) == 0
    assert capsys.readouterr().out == f"Deleted 1 receiver: {first}; attached: {attached}\n"
    assert run(["--config", str(config), "dltjrnrcv", "--jrnrcv", attached]) == 2
    assert "is the attached receiver" in capsys.readouterr().err
    assert run(["--config", str(config), "dltjrnrcv", "--jrnrcv", "QZMF.999"]) == 2
    err = capsys.readouterr().err
    assert f"is not a receiver here; allowed: a receiver's name or number ({second} to " in err
    assert run(["--config", str(config), "dltjrnrcv", "--jrnrcv", "qzmf*"]) == 0
    # The newest with entries stays while the attached one is empty.
    assert [p.name for _, p in receivers(directory)] == [names[-3], attached]


def test_a_follower_says_which_receivers_went_between_two_it_read(tmp_path: Path) -> None:
    j = Journal(tmp_path, "QTSMTPBRSR/1")
    j.write("7A", "7A one")
    told: list[str] = []
    tail = journal._Tail(tmp_path, told.append)
    assert [json.loads(line)["esd"] for line in tail.read()] == ["7A one"]
    for n in ("two", "three", "four"):
        j.new_receiver()
        j.write("7A", f"7A {n}")
    for _, path in receivers(tmp_path)[1:3]:
        path.unlink()
    seen = []
    for _ in range(4):
        seen.extend(json.loads(line)["esd"] for line in tail.read() or [])
    assert seen == ["7A four"]
    assert told == ["QZMF.000002.jsonl to QZMF.000003.jsonl were deleted before they could "
                    "be read (any entries they held are not shown)"]


def test_a_follower_says_nothing_of_receivers_deleted_before_it_began(tmp_path: Path) -> None:
    """DLTJRNRCV of an empty receiver, then dspjrn --follow: it warned that the
    gap's entries were not shown, though there were none, and it came late."""
    j = Journal(tmp_path, "QTSMTPBRSR/1")
    j.write("7A", "7A one")
    for n in ("two", "three"):
        j.new_receiver()
        j.write("7A", f"7A {n}")
    receivers(tmp_path)[1][1].unlink()
    told: list[str] = []
    tail = journal._Tail(tmp_path, told.append)
    seen = []
    for _ in range(4):
        seen.extend(json.loads(line)["esd"] for line in tail.read() or [])
    assert seen == ["7A one", "7A three"] and told == []


def test_a_follower_far_behind_a_mass_deletion_says_so_once(tmp_path: Path,
                                                            monkeypatch) -> None:
    """Each receiver of a stale listing that was gone made a line of its own."""
    j = Journal(tmp_path, "QTSMTPBRSR/1")
    j.write("7A", "7A one")
    told: list[str] = []
    tail = journal._Tail(tmp_path, told.append)
    assert [json.loads(line)["esd"] for line in tail.read()] == ["7A one"]
    for n in range(30):
        j.new_receiver()
        j.write("7A", f"7A {n}")
    tail._newer()  # lists them all
    for _, path in receivers(tmp_path)[1:-1]:
        path.unlink()
    seen = []
    for _ in range(4):
        seen.extend(json.loads(line)["esd"] for line in tail.read() or [])
    assert seen == ["7A 29"]
    assert told == ["QZMF.000002.jsonl to QZMF.000030.jsonl were deleted before they could "
                    "be read (any entries they held are not shown)"]


def test_a_follower_skips_a_receiver_deleted_before_it_got_there(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """keep_receivers may delete the receiver a follower is about to open."""
    j = Journal(tmp_path, "QTSMTPBRSR/1")
    j.write("7A", "7A one")
    j.new_receiver()
    j.write("7A", "7A two")
    j.new_receiver()
    j.write("7A", "7A three")
    listed = receivers(tmp_path)
    listed[1][1].unlink()  # gone, though a listing made just before still names it
    monkeypatch.setattr(journal, "receivers", lambda d: listed)
    told = []
    tail = journal._Tail(tmp_path, told.append)
    seen = []
    for _ in range(4):
        seen.extend(json.loads(line)["esd"] for line in tail.read() or [])
    assert seen == ["7A one", "7A three"]
    # said, not skipped in silence
    assert told == [f"{listed[1][1].name} was deleted before it could be read (any "
                    "entries it held are not shown)"]


def test_retention_keeps_the_receiver_that_holds_the_last_seq(tmp_path: Path) -> None:
    """With only an empty attached receiver left, a lost state file restarted seq at 1."""
    j = Journal(tmp_path, "x", receiver_size=4096, keep_receivers=1)
    for i in range(100):
        j.write("7A", "7A QTMSINQ TO QTSMTPBRSR", f"Q{i}")
    j.new_receiver()
    (tmp_path / journal.STATE_FILE).unlink()
    assert Journal(tmp_path, "y").write("7A", "7A after") == 101


def test_empty_receivers_attached_in_a_row_never_take_the_last_seq_with_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CHGJRN three times on a quiet system, or DLTJRNRCV QZMF* with an empty
    receiver attached, deleted every entry; a lost state file then started
    seq again at 1."""
    config = tmp_path / "twistmail.toml"
    config.write_text('[system]\ndatadir = "var"\n')
    directory = tmp_path / "var" / "journal"
    j = Journal(directory, "x", keep_receivers=2)
    for i in range(5):
        j.write("7A", "7A QTMSINQ", f"Q{i}")
    j.new_receiver()
    holder = receivers(directory)[0][1].name
    # CHGJRN then DLTJRNRCV QZMF*, a nightly job: nothing to delete is no failure.
    assert run(["--config", str(config), "dltjrnrcv", "--jrnrcv", "qzmf*"]) == 0
    assert capsys.readouterr().out.endswith(f"; kept {holder}: it holds the last sequence "
                                            "number\n")
    for _ in range(2):
        j.new_receiver()
    assert [e["seq"] for e in read_entries(directory)] == [1, 2, 3, 4, 5]
    assert run(["--config", str(config), "dltjrnrcv", "--jrnrcv", "qzmf*"]) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"; kept {holder}: it holds the last sequence number\n"), out
    assert run(["--config", str(config), "dltjrnrcv", "--jrnrcv", holder]) == 1
    assert "holds the last sequence number" in capsys.readouterr().err
    (directory / journal.STATE_FILE).unlink()
    assert Journal(directory, "y").write("7A", "7A after") == 6
    assert run(["--config", str(config), "dltjrnrcv", "--jrnrcv", holder]) == 0  # now it may go


def test_a_journal_that_cannot_be_written_says_so_in_the_log(tmp_path: Path, capsys) -> None:
    """A receiver root made, a full disk: entries were lost without a word."""
    blocked = tmp_path / "journal"
    blocked.write_text("not a directory")
    jr = Journal(blocked, "TEST/1")
    assert jr.write("JG", "JG STR") is None
    assert jr.write("JG", "JG STR") is None
    err = capsys.readouterr().err
    assert err.count("entries are being lost") == 1 and str(blocked) in err
    assert jr.failing is not None and "2 entries lost" in jr.failing
    blocked.unlink()
    blocked.mkdir()
    assert jr.write("JG", "JG STR") is not None
    assert "written again, after 2 entries lost" in capsys.readouterr().err
    assert jr.failing is None


def test_a_batch_a_full_disk_cut_short_leaves_no_torn_line(full_disk: Path) -> None:
    """What the disk took of a refused batch went on being a broken JSON line."""
    from conftest import fill

    jr = Journal(full_disk / "journal", "TEST/1")
    assert jr.write("JG", "JG STR") == 1
    fill(full_disk)
    with jr.batch():
        for n in range(200):
            jr.write("JE", f"JE END {n}", filler="x" * 200)
    assert jr.failing is not None
    for filler in full_disk.glob("filler*"):
        filler.unlink()
    assert jr.write("JG", "JG STR") == 2
    [receiver] = (full_disk / "journal").glob("QZMF.*.jsonl")
    lines = receiver.read_bytes().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2]


def test_a_sign_on_an_older_version_wrote_as_9w_reads_as_9z(tmp_path: Path) -> None:
    """9W became IBM's "rejected by the SMTP server"; a sign-on is 9Z."""
    j = Journal(tmp_path, "QTSMTPSRVP/7")
    j.write("9W", "9W AUTH 127.0.0.1 KIM", ip="127.0.0.1", usrprf="KIM")  # as written then
    j.write("9W", "9W RJT 127.0.0.1 nobody@example.test", ip="127.0.0.1")
    assert [e["esd"] for e in read_entries(tmp_path, ["9Z"])] == ["9Z AUTH 127.0.0.1 KIM"]
    assert [e["esd"] for e in read_entries(tmp_path, ["9W"])] == [
        "9W RJT 127.0.0.1 nobody@example.test"]


def test_a_follower_lists_the_receivers_once_not_at_each_one(tmp_path: Path,
                                                            monkeypatch) -> None:
    """Listed at every move, thousands of receivers made dspjrn --follow take
    35 s before it showed a new entry."""
    j = Journal(tmp_path, "QTSMTPBRSR/1")
    for i in range(50):
        j.write("7A", f"7A {i}")
        j.new_receiver()
    listings = []
    real = journal.receivers
    monkeypatch.setattr(journal, "receivers", lambda d: listings.append(1) or real(d))
    tail = journal._Tail(tmp_path)
    seen = []
    while (lines := tail.read()) is not None:
        seen.extend(json.loads(line)["esd"] for line in lines)
    assert seen == [f"7A {i}" for i in range(50)]
    assert len(listings) <= 3, len(listings)


def test_from_skips_the_receivers_that_end_before_it(tmp_path: Path, monkeypatch) -> None:
    """dspjrn --from -1h read a journal of 1.7 million entries whole, and
    --follow --from parsed every receiver before its first new line."""
    j = Journal(tmp_path, "QTSMTPBRSR/1")
    for i in range(5):
        j.write("7A", f"7A old {i}")
        j.new_receiver()
    time.sleep(0.05)
    since = datetime.now(UTC)
    j.write("7A", "7A new")
    opened = []
    real_open = open

    def counting_open(path, *args, **kwargs):  # noqa: ANN001, ANN202
        if str(path).endswith(".jsonl"):
            opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert [e["esd"] for e in read_entries(tmp_path, since=since)] == ["7A new"]
    # Each older receiver: its first and last lines (a read, a seek), none whole.
    assert len(opened) <= 2 * len(receivers(tmp_path)) + 1
    followed = follow(tmp_path, since=since, poll_interval=0.01)
    assert next(followed)["esd"] == "7A new"
    followed.close()
    opened.clear()
    followed = follow(tmp_path, since=datetime.now(UTC), poll_interval=0.01,
                      stop=lambda: len(opened) > 20)
    j.write("7A", "7A newer")
    assert next(followed)["esd"] == "7A newer"  # from the attached receiver
    followed.close()


def test_from_keeps_a_receiver_whose_clock_was_set_back(tmp_path: Path) -> None:
    """An NTP step back can leave a receiver ending before entries it holds."""
    def line(seq: int, ts: str) -> str:
        return json.dumps({"seq": seq, "ts": ts, "code": "7A", "job": "x", "msgid": None,
                           "esd": f"e{seq}"}) + "\n"

    (tmp_path / receiver_name(1)).write_text(
        line(1, "2026-11-30T10:00:00+00:00") + line(2, "2026-11-30T11:00:00+00:00")
        + line(3, "2026-11-30T09:00:00+00:00"))
    (tmp_path / receiver_name(2)).write_text(line(4, "2026-11-30T09:10:00+00:00"))
    since = datetime(2026, 11, 30, 9, 30, tzinfo=UTC)
    assert [e["esd"] for e in read_entries(tmp_path, since=since)] == ["e1", "e2"]


def test_a_rotation_that_fails_loses_no_entry_written(tmp_path: Path, capsys) -> None:
    """Entries written before the next receiver could not be made (an immutable
    directory, no inode left) were counted as lost, and the state was left
    behind the file; they are in the receiver, which grows until rotation works."""
    j = Journal(tmp_path, "QTSMTPBRSR/1", receiver_size=256)
    real = j._rotate

    def refused(state):
        raise OSError(errno.EPERM, "Operation not permitted")

    j._rotate = refused
    seqs = [j.write("7A", "7A MSF", msgid=f"m{i}") for i in range(10)]
    assert seqs == list(range(1, 11)) and j.failures == 0
    err = capsys.readouterr().err
    assert err.count("cannot start a new receiver") == 1 and "lost" not in err
    j._rotate = real
    assert j.write("7A", "7A MSF", msgid="m10") == 11
    assert "a new receiver is started again" in capsys.readouterr().err
    entries = list(read_entries(tmp_path))
    assert [e["seq"] for e in entries] == list(range(1, 12))
    assert len(receivers(tmp_path)) == 2


def test_follow_starts_with_the_last_entries_as_tail_does(tmp_path: Path) -> None:
    """dspjrn --follow printed the whole journal (a gigabyte of receivers)
    before following; without --from it shows the last few, then new ones."""
    _filled(tmp_path)
    newest = receivers(tmp_path)[-1][1]
    in_newest = [json.loads(line)["seq"] for line in newest.read_text().splitlines()]
    got: list[int] = []
    for entry in follow(tmp_path, last=3, poll_interval=0.01, stop=lambda: len(got) >= 4):
        got.append(entry["seq"])
        if len(got) == 3:
            Journal(tmp_path, "QTSMTPSRVP/8").write("JE", "JE maxuse")
    assert got == [*in_newest[-3:], 92]
    # --from still reads from that time on, every receiver.
    since = datetime(2000, 1, 1, tzinfo=UTC)
    assert next(follow(tmp_path, since=since, last=3))["seq"] == 1


def test_an_old_receiver_that_cannot_go_stops_neither_rotation_nor_pruning(
        tmp_path: Path, capsys, monkeypatch) -> None:
    """One receiver that could not be deleted was told as 'cannot start a new
    receiver' (though rotation went on) and kept every receiver after it."""
    j = Journal(tmp_path, "QTSMTPBRSR/1", receiver_size=256, keep_receivers=2)
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == receiver_name(1):
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    for i in range(40):
        j.write("7A", "7A MSF", msgid=f"m{i}")
    err = capsys.readouterr().err
    assert "cannot start a new receiver" not in err
    assert err.count("old receivers cannot all be deleted") == 1
    left = [n for n, _ in receivers(tmp_path)]
    assert left[0] == 1 and len(left) == 3  # the one that cannot go, and the two kept
    assert [e["seq"] for e in read_entries(tmp_path)][-1] == 40


def test_follow_up_to_a_past_time_ends_at_once(tmp_path: Path) -> None:
    """With --to in the past it waited for the next entry to be written."""
    j = Journal(tmp_path, "QTSMTPBRSR/1", receiver_size=256)
    for i in range(10):
        j.write("7A", "7A MSF", msgid=f"m{i}")
    j.new_receiver()  # the attached one is empty
    until = datetime(2000, 1, 1, tzinfo=UTC)
    deadline = time.monotonic() + 5
    assert list(follow(tmp_path, until=until, last=10, poll_interval=0.01,
                       stop=lambda: time.monotonic() > deadline)) == []
    assert time.monotonic() < deadline  # ended by itself


def test_dspjrn_outfile_that_is_no_file_is_refused_at_once(config: Path, tmp_path: Path,
                                                           capsys) -> None:
    """A FIFO as --outfile held dspjrn for ever, waiting for a reader."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert run(["--config", str(config), "dspjrn", "--outfile", str(fifo)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "a named pipe that nothing reads" in err
    # What is not a file but takes what is written still does.
    assert run(["--config", str(config), "dspjrn", "--outfile", "/dev/null"]) == 0


def test_follow_up_to_a_later_time_starts_as_tail_does(tmp_path: Path) -> None:
    _filled(tmp_path)
    until = datetime.now(UTC) + timedelta(hours=1)
    got: list[int] = []
    for entry in follow(tmp_path, until=until, last=3, poll_interval=0.01,
                        stop=lambda: len(got) >= 3):
        got.append(entry["seq"])
    assert got == [89, 90, 91]
