"""The administrator's CLI: one-line mistakes, the daemon down, live CHGPJE, CL syntax."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from appliance import Appliance

from twistmail import config as configmod

TWISTMAIL = str(Path(sys.executable).with_name("twistmail"))
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stopped(make_appliance) -> Appliance:
    """An appliance whose daemon is not running."""
    return make_appliance()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["chgpje", "--pgm", "QTMSSRCP", "--maxjobs", "lots"], "--maxjobs: 'lots'"),
        (["chgpje", "--pgm", "QTMSSRCP", "--maxjobs", "0"], "1-32000, *NOMAX"),
        (["chgpje", "--pgm", "NOSUCH", "--maxjobs", "5"], "--pgm: 'NOSUCH'"),
        (["chgpje", "--pgm", "QTMSSRCP", "--threshold", "5"], "at most INLJOBS"),
        (["chgpje", "--pgm", "QTMSSRCP", "--wait", "maybe"], "*YES, *NO"),
        (["chgpje", "--pgm", "QTMSSRCP", "--maxjobs", "1"],
         "--maxjobs: INLJOBS 2 would then be out of range; allowed for INLJOBS: 1-1"),
        (["chgpopa", "--nbrsvr", "20"],
         "--nbrsvr: INLJOBS 20 would then be out of range; allowed for"),
        (["chgsmtpa", "--nameservers", "not a host"], "--nameservers: 'not a host'"),
        (["chgsmtpa", "--popwdw", "*NONE"], "--popwdw: '*NONE' is not allowed; allowed: 0 or "
         "15-65535"),
        (["chgpje", "--pgm", "QTMSSRCP", "--maxjobs", "\uff13\uff10"], "allowed: 1-32000"),
        (["chgsmtpa", "--mailrouter", "host:"], "--mailrouter: 'host:'"),
        (["chgpje", "--pgm", "QTMSSRCP"], "give at least one of"),
        (["endpj", "--pgm", "QTMSSRCP", "--option", "*NOW"], "*CNTRLD, *IMMED"),
        (["chgpje", "--pgm", "QTMSCCLCP", "--strjobs", "*NO"],
         "--strjobs: '*NO' is not allowed for QTMSCCLCP; allowed: *YES (the SMTP client jobs"),
        (["endpj", "--pgm", "QTMSSRCP", "--delay", "0"], "--delay"),
        (["strtcpsvr", "--server", "*FTP"], "*SMTP, *POP, *ALL, *AUTOSTART"),
        (["dspactpj"], "--pgm"),
        (["nosuchcommand"], "twistmail: nosuchcommand: no such command; allowed: adddire,"),
        (["dcm", "nosuch"], "twistmail dcm: nosuch: no such command; allowed: create-store,"),
        (["dspsmtpa", "a\nb"], "twistmail dspsmtpa: 'a\\nb': not an option"),
        (["crtsndemail", "--usrprf", "SAM", "--to", "jane@example.test", "--subject", "s",
          "--body-file", "/dev/zero"], "--body-file: /dev/zero is not a regular file"),
        (["crtsndemail", "--usrprf", "SAM", "--to", "jane@example.test", "--subject", "s",
          "--body-file", "/proc/self/cmdline"], "--body-file: /proc/self/cmdline holds a NUL"),
        (["dcm", "import", "--usrprf", "SAM", "--file", "/dev/zero", "--label", "a@b.test"],
         "/dev/zero is not a regular file"),
        (["cl", "CHGPJE PGM(QTCP/QTMSSRCP) MAXJOBS(0)"], "chgpje: MAXJOBS: '0' is not allowed"),
        (["cl", "DSPJRN ENTTYP(ZZ)"], "dspjrn: ENTTYP: 'ZZ' matches no journal code"),
        (["cl", "CHGUSRPRF USRPRF(NOSUCH) PASSWORD(*SAME)"], "USRPRF: 'NOSUCH' does not exist"),
        (["cl", "CHGDIRE USRID(NOSUCH MAIL) USRD(*SAME)"], "USRID: 'NOSUCH MAIL' is not in"),
        (["cl", "DSPJRN ENDTALEN(512)"], "ENTDTALEN, JRNCDE, OUTMBR"),
        # A missing keyword is named as typed, not as the option it maps to.
        (["cl", "CHGPJE MAXJOBS(20)"],
         "twistmail chgpje: PGM: required (Prestart program: QTMSSRCP"),
        (["cl", "CRTUSRPRF PASSWORD(x)"],
         "crtusrprf: USRPRF: required (User profile name, 1-10 characters)"),
        (["cl", "CHGPJE SBSD(QSYS/QINTER) PGM(QTCP/QTMSSRCP) MAXJOBS(5)"], "QSYSWRK"),
        # The shape of the arguments: each mistake named with its command.
        (["chgpje", "--pgm", "QTMSSRCP", "--maxjobs", "30", "--maxjobs", "40"],
         "twistmail chgpje: --maxjobs: given twice"),
        (["chgsmtpa", "--rblsvr", "a.test", "--rblsvr", "b.test"], "a list goes in one value"),
        (["chgsmtpa", "--rtymin", "5"],
         "twistmail chgsmtpa: --rtymin: takes 2 values (first-level"),
        (["chgpje", "--pgm", "QTMSSRCP", "--bogus", "1"],
         "--bogus: no such option; allowed: --adljobs, --help, --inljobs, --maxjobs,"),
        (["adddire", "--usrid", "ABC", "--usrd", "x"],
         "--usrid: takes 2 values, got the option --usrd instead (User ID"),
        (["dcm", "list", "--bogus"], "twistmail dcm list: --bogus: no such option"),
        (["chgsmtpa", "MAXRCPT(5)"], "twistmail chgsmtpa: MAXRCPT(5): not an option; allowed: "
         "--alwauth,"),
        (["chgsmtpa", "MAXRCPT(5)"], '(CL keywords go to cl: twistmail cl "CHGSMTPA MAXRCPT(5)")'),
        (["chgjrn", "extra"], "twistmail chgjrn: extra: not an option; allowed: --jrn, --jrnrcv"),
        (["dspsmtpa", ""], "twistmail dspsmtpa: '': not an option; allowed: --json"),
        (["dspjrn", "--outfile", "/nonexistent/j.csv"],
         "twistmail dspjrn: --outfile: '/nonexistent/j.csv' cannot be written: No such file"),
        # A long value is shown by its start and its length.
        (["crtusrprf", "--usrprf", "A" * 5000, "--password", "x"],
         f"--usrprf: '{'A' * 60}...' (5000 characters) is not allowed; allowed: 1-10"),
        (["cl", f"CHGSMTPA MAILROUTER('{'x' * 300}')"],
         f"MAILROUTER: '{'x' * 60}...' (300 characters) is not allowed"),
        # ...and only a value: an apostrophe in the text around it is no quote.
        (["chgsmtpa", "--hosttable", "/nonexistent"],
         "--hosttable: '/nonexistent' is not allowed; allowed: an existing file (relative "
         "paths start at the configuration file's directory)"),
        (["dspjrn", "--from", "yesterday"],
         "naive is UTC), IBM's MMDDYY [HHMMSS] (UTC), or relative"),
        (["chgsmtpa", "--authmech", "*PLAIN *CRAM"],
         "--authmech: '*CRAM' is not allowed; allowed: *PLAIN, *LOGIN"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(stopped, args, needle):
    before = stopped.config.read_text()
    rc, out, err = stopped.cli(*args)
    assert rc == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert "Traceback" not in err + out
    assert stopped.config.read_text() == before


def test_commands_needing_the_daemon_say_it_is_down(stopped):
    for args in (["dspactpj", "--pgm", "QTMSSRCP"], ["wrkactjob"], ["strpj", "--pgm",
                 "QTPOPSRVP"], ["endtcpsvr", "--server", "*ALL"], ["strmsf"]):
        rc, out, err = stopped.cli(*args)
        assert rc == 1, args
        assert "daemon is not running" in err and len(err.strip().splitlines()) == 1


def test_chgpje_while_down_is_saved_for_next_start(stopped):
    rc, out, err = stopped.cli("chgpje", "--pgm", "QTPOPSRVP", "--maxjobs", "*NOMAX",
                               "--maxuse", "50")
    assert rc == 0, err
    assert "applies at the next start" in out
    text = stopped.config.read_text()
    assert 'maxjobs = "*NOMAX"' in text and "maxuse = 50" in text
    rc, out, err = stopped.cli("config", "-n")
    assert "prestart.QTPOPSRVP.maxjobs" in out


def test_cl_syntax_reaches_the_running_daemon(appliance):
    rc, out, err = appliance.cli(
        "cl", "CHGPJE SBSD(QSYS/QSYSWRK) PGM(QTCP/QTMSSRCP) MAXJOBS(6) INLJOBS(3)")
    assert rc == 0, err
    appliance.wait_for(lambda: appliance.count("QTMSSRCP", "PSRW") == 3, 10)
    rc, out, err = appliance.cli("cl", "DSPACTPJ SBS(QSYSWRK) PGM(QTCP/QTMSSRCP)")
    assert rc == 0 and "Prestart jobs: current number" in out


def test_listings_take_json(appliance):
    rc, out, err = appliance.cli("wrkactjob", "--json")
    rows = json.loads(out)
    assert {r["job"] for r in rows} >= {"QTSMTPSRVD", "QTPOPSRVD", "QTSMTPSRVP", "QTPOPSRVP",
                                        "QZMFLNCH"}
    rc, out, err = appliance.cli("dspactpj", "--pgm", "QTPOPSRVP", "--json")
    st = json.loads(out)
    assert st["jobs_current"] == 1 and st["status"] == "ACTIVE"
    rc, out, err = appliance.cli("dspactpj", "--pgm", "QTPOPSRVP", "--reset", "--json")
    assert json.loads(out)["accepted"] == 0


def test_console_script_runs(stopped):
    r = subprocess.run([TWISTMAIL, "--config", str(stopped.config), "dspactpj", "--pgm",
                        "QTMSSRCP"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not running" in r.stderr
    r = subprocess.run([TWISTMAIL, "--config", str(stopped.config), "chgpje", "--pgm",
                        "QTMSSRCP", "--maxuse", "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        ([b"crtsndemail", b"--usrprf", b"SAM", b"--to", b"sam@example.test", b"--subject",
          b"caf\xe9", b"--body", b"x"], b"", "--subject: 'caf\\udce9' is not UTF-8 text"),
        ([b"crtusrprf", b"--usrprf", b"BOB", b"--password", b"p\xe9"], b"",
         "--password: the value is not UTF-8 text"),
        ([b"crtusrprf", b"--usrprf", b"BOB", b"--password", b"-"], b"p\xe9\n",
         "--password: standard input is not UTF-8 text"),
        ([b"snddst", b"--type", b"*LMSG", b"--usrprf", b"SAM", b"--tousrid", b"SAM MAIL",
          b"--dstd", b"d", b"--longmsg", b"-"], b"bad \xff", "--longmsg: standard input"),
        ([b"cl", b"CRTUSRPRF USRPRF(BOB) PASSWORD(p\xe9)"], b"", "is not UTF-8 text"),
    ],
)
def test_text_that_is_not_utf8_is_named_in_one_line(stopped, args, stdin, needle):
    """The shell passes any bytes; a traceback while building the mail named nothing."""
    stopped.user("SAM")
    r = subprocess.run([TWISTMAIL.encode(), b"--config", bytes(stopped.config), *args],
                       input=stdin, capture_output=True, timeout=60)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err
    assert "p\\udce9" not in err  # a password is never echoed


def test_a_file_with_strjobs_no_for_the_client_entry_still_loads(stopped):
    """CHGPJE refuses it now, but a file from before, where it did nothing, must not
    stop the daemon or the CLI that would mend it."""
    text = stopped.config.read_text()
    assert "[prestart.QTMSCCLCP]\n" in text
    stopped.config.write_text(text.replace("[prestart.QTMSCCLCP]\n",
                                           '[prestart.QTMSCCLCP]\nstrjobs = "*NO"\n'))
    rc, out, err = stopped.cli("config", "-n")
    assert rc == 0 and "strjobs" in out, err
    assert stopped.cli("chgpje", "--pgm", "QTMSCCLCP", "--strjobs", "*YES")[0] == 0


def test_a_closed_standard_input_is_named_in_one_line(stopped):
    """Under cron or a service manager descriptor 0 may be closed: '-' cannot read it."""
    r = subprocess.run([TWISTMAIL, "--config", str(stopped.config), "crtusrprf", "--usrprf",
                        "BOB", "--password", "-"], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=60, preexec_fn=lambda: os.close(0))
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("twistmail crtusrprf: --password: '-' reads standard input, which "
                           "is closed")


def test_a_group_alone_shows_its_help(tmp_path):
    for args in ([], ["dcm"]):
        r = subprocess.run([TWISTMAIL, *args], capture_output=True, text=True, timeout=60,
                           cwd=tmp_path)
        assert r.returncode == 2 and r.stdout.startswith("Usage: twistmail"), args
        assert "Commands:" in r.stdout and len(r.stdout.splitlines()) > 5 and not r.stderr


def test_version(tmp_path):
    from importlib.metadata import version

    r = subprocess.run([TWISTMAIL, "--version"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"twistmail {version('twistmail')}\n", "")


def test_a_file_that_is_not_toml_is_named_once_with_the_place(tmp_path):
    cfg = tmp_path / "twistmail.toml"
    cfg.write_text('[smtp]\nmaxrcpt = "unclosed\n')
    r = subprocess.run([TWISTMAIL, "--config", str(cfg), "dspsmtpa"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.count("twistmail.toml") == 1 and "not valid TOML" in line and "line 2" in line


def test_a_missing_option_is_named_with_what_it_takes(tmp_path):
    r = subprocess.run([TWISTMAIL, "--config", str(ROOT / "etc" / "twistmail.toml"), "dspactpj"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line == ("twistmail dspactpj: --pgm: required "
                    "(Prestart program: QTMSSRCP, QTPOPSRVP, QTMSCCLCP)")


def test_the_mail_commands_name_their_options_in_a_refusal(tmp_path):
    cfg = str(ROOT / "etc" / "twistmail.toml")
    r = subprocess.run([TWISTMAIL, "--config", cfg, "sndmail", "--file", "rel.mime", "--from",
                        "a@example.test", "--to", "b@example.test"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("twistmail sndmail: --file: 'rel.mime'")


def test_a_same_element_is_made_under_the_writers_lock(tmp_path):
    """Two commands at once, each changing one element of RTYMIN, must both
    stay.  The element kept with *SAME came from the file as the command read
    it at its start, which undid the other command's change."""
    from twistmail import configedit
    from twistmail.cli import attrcmds

    path = tmp_path / "t.toml"
    path.write_text("[smtp]\nrtymin = [4, 40]\n")
    stale = configmod.load(path)
    configedit.set_values(path, {"smtp.rtymin": (20, 50)})  # another command, meanwhile
    vtype = configmod.field_type(configmod.SmtpSettings, "rtymin")
    make = functools.partial(attrcmds._pair, "smtp", "rtymin", ("11", "*SAME"),
                             ["11", "*SAME"], (3, 30), vtype)
    assert make(stale) == (11, 40)
    before = configedit.set_values(path, {"smtp.rtymin": configedit.FromFile(make)})
    assert before.smtp.rtymin == (20, 50)
    assert configmod.load(path).smtp.rtymin == (11, 50)


def test_same_and_dft_as_ibm_i_takes_them(stopped):
    """*SAME keeps a value (or one element of a pair), *DFT restores the shipped one."""
    def rtymin() -> str:
        rc, out, err = stopped.cli("dspsmtpa", "--json")
        return json.loads(out)["rtymin"]

    assert stopped.cli("cl", "CHGSMTPA RTYMIN(5 10)")[0] == 0 and rtymin() == [5, 10]
    assert stopped.cli("cl", "CHGSMTPA RTYMIN(*SAME 25)")[0] == 0 and rtymin() == [5, 25]
    assert stopped.cli("cl", "CHGSMTPA RTYMIN(6)")[0] == 0 and rtymin() == [6, 25]
    assert stopped.cli("cl", "CHGSMTPA RTYMIN(5)")[0] == 0 and rtymin() == [5, 25]
    assert stopped.cli("chgsmtpa", "--rtymin", "7", "*DFT")[0] == 0 and rtymin() == [7, 30]
    assert stopped.cli("cl", "CHGSMTPA RTYMIN(*DFT)")[0] == 0 and rtymin() == [3, 30]
    assert json.loads(stopped.cli("dsppopa", "--json")[1])["nbrsvr"] == 1
    assert stopped.cli("cl", "CHGPOPA NBRSVR(*DFT)")[0] == 0
    assert json.loads(stopped.cli("dsppopa", "--json")[1])["nbrsvr"] == 3
    # A CL command whose every value is *SAME is complete and does nothing.
    before = stopped.config.read_text()
    for text in ("CHGPJE SBSD(QSYSWRK) PGM(QTMSSRCP) MAXJOBS(*SAME) WAIT(*SAME)",
                 "CHGSMTPA RTYMIN(*SAME)", "CHGDSTA KEEPRCP(*SAME)"):
        rc, out, err = stopped.cli("cl", text)
        assert (rc, out, err) == (0, "nothing changed: every value is *SAME\n", ""), text
    # So is one typed in the shell: the same command, the same outcome.
    for args in (["chgpje", "--pgm", "QTMSSRCP", "--maxjobs", "*same"],
                 ["chgsmtpa", "--maxrcpt", "*SAME"], ["chgpopa", "--nbrsvr", "*SAME"],
                 ["chgsmtpa", "--rtymin", "*SAME", "*SAME"]):
        rc, out, err = stopped.cli(*args)
        assert (rc, out, err) == (0, "nothing changed: every value is *SAME\n", ""), args
    assert stopped.config.read_text() == before


def test_values_that_wait_for_another_are_taken_with_a_note(stopped):
    rc, out, err = stopped.cli("chgsmtpa", "--alwrly", "*POPWDW")
    assert rc == 0 and err == "note: ALWRLY *POPWDW lets no one relay while POPWDW is 0\n"
    rc, out, err = stopped.cli("chgsmtpa", "--popwdw", "30")
    assert rc == 0 and err == ""
    rc, out, err = stopped.cli("chgsmtpa", "--firewall", "*YES", "--etrnclt", "*YES")
    assert rc == 0 and [line.split()[1] for line in err.splitlines()] == ["FIREWALL", "ETRNCLT"]


def test_chgpopa_nbrsvr_takes_1_to_20_as_ibm_i_does(stopped):
    """NBRSVR(1) was refused for the POP entry's THRESHOLD 2, which CHGPOPA
    does not show; it follows NBRSVR down now."""
    assert stopped.cli("cl", "CHGPOPA NBRSVR(3)")[0] == 0
    assert stopped.cli("chgpje", "--pgm", "QTPOPSRVP", "--threshold", "2")[0] == 0
    rc, out, err = stopped.cli("cl", "CHGPOPA NBRSVR(1)")
    assert rc == 0 and "note: THRESHOLD of QTPOPSRVP lowered from 2 to NBRSVR 1" in err, err
    settings = configmod.load(stopped.config)
    assert (settings.pop.nbrsvr, settings.prestart.QTPOPSRVP.threshold) == (1, 1)
    rc, out, err = stopped.cli("chgpopa", "--nbrsvr", "4")
    assert rc == 0 and "THRESHOLD" not in err
    assert configmod.load(stopped.config).prestart.QTPOPSRVP.threshold == 1


def test_tables_align_wide_characters_by_the_columns_they_take(capsys):
    from twistmail.cli.output import emit_table

    emit_table([{"d": "山田花子", "s": "hanako"}, {"d": "Sam", "s": "sam"}],
               [("d", "Description"), ("s", "SMTP name")], as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["Description  SMTP name", "山田花子     hanako", "Sam          sam"]


def test_listings_show_control_characters_instead_of_sending_them_to_the_terminal(capsys):
    """A remote server's reply (wrkq's last error) or a client's address is
    shown as text: its escape sequences must not colour the terminal or set
    its title."""
    from twistmail.cli.journalcmds import _follow_row, _table_row
    from twistmail.cli.output import emit_record, emit_table

    hostile = "451 4.7.1 \x1b[31mRED\x1b[0m \x1b]0;title\x07 \x9b2J later, café"
    emit_table([{"e": hostile, "r": ["a\x1b@b.test"]}], [("e", "Error"), ("r", "To")],
               as_json=False)
    emit_record({"e": hostile}, [("e", "Error")], as_json=False)
    row = _table_row({"seq": 1, "code": "8C", "esd": hostile})
    out = capsys.readouterr().out + _follow_row(row, 3)
    assert not any(c in out for c in "\x1b\x07\x9b")
    assert "\\x1b[31mRED\\x1b[0m \\x1b]0;title\\x07 \\x9b2J later, café" in out
    assert "a\\x1b@b.test" in out


def test_a_streamed_listing_prints_as_it_reads(capsys):
    """dspjrn held a journal of 1.7 million entries in memory (1.6 GB for the
    table, 5 GB for --json) before its first line."""
    import json

    from twistmail.cli.output import STREAM_WIDTHS_FROM, emit_table

    def entries():
        for n in range(STREAM_WIDTHS_FROM + 500):
            yield {"seq": n, "code": "7A", "esd": "x" * (n % 7)}
        raise RuntimeError("read no further")

    columns = (("seq", "seq"), ("code", "code"), ("esd", "esd"))
    for as_json in (False, True):
        with pytest.raises(RuntimeError):
            emit_table(entries(), columns, as_json, stream=True)
        out = capsys.readouterr().out
        assert out.count("7A") == STREAM_WIDTHS_FROM + 500  # all printed before the end
    rows = [{"seq": 1, "esd": "a\nb"}, {"seq": 2}]
    emit_table(iter(rows), columns, True, stream=True)
    assert json.loads(capsys.readouterr().out) == rows
    emit_table(iter([]), columns, False, empty="(no journal entries)", stream=True)
    assert capsys.readouterr().out == "(no journal entries)\n"
    # A column that grows past the first rows (the journal's seq) stays aligned.
    many = ({"seq": n, "code": "7A"} for n in range(STREAM_WIDTHS_FROM + 200))
    emit_table(many, columns, False, stream=True, least={"seq": 4})
    lines = capsys.readouterr().out.splitlines()
    assert {line.index("7A") for line in lines[1:]} == {lines[0].index("code")}


def test_a_change_command_sets_right_the_bad_value_it_changes(stopped):
    """A value mistyped by hand used to stop the very command that changes it."""
    from twistmail import configedit

    configedit.set_values(stopped.config, {"smtp.maxmsgsize": 1234})
    text = stopped.config.read_text()
    assert "maxmsgsize = 1234" in text
    stopped.config.write_text(text.replace("maxmsgsize = 1234", 'maxmsgsize = "big"'))
    rc, out, err = stopped.cli("chgsmtpa", "--maxrcpt", "50")
    assert rc == 2 and "smtp.maxmsgsize" in err and len(err.strip().splitlines()) == 1, err
    rc, out, err = stopped.cli("chgsmtpa", "--maxmsgsize", "5000")
    assert rc == 0, err
    assert configmod.load(stopped.config).smtp.maxmsgsize == 5000


def test_config_after_the_command_says_where_it_goes(stopped):
    rc, out, err = stopped.cli("status", "--config", "x.toml")
    assert rc == 2 and err.strip() == (
        "twistmail status: --config: goes before the command; allowed: "
        "twistmail --config FILE status ...")


def test_chgpopa_sets_right_a_bad_nbrsvr_and_blames_only_the_file(stopped):
    from twistmail import configedit

    configedit.set_values(stopped.config, {"pop.nbrsvr": 2})
    text = stopped.config.read_text()
    stopped.config.write_text(text.replace("nbrsvr = 2", 'nbrsvr = "abc"'))
    rc, out, err = stopped.cli("chgpopa", "--nbrsvr", "3")
    assert rc == 0, err
    assert configmod.load(stopped.config).pop.nbrsvr == 3
    stopped.config.write_text(text.replace("nbrsvr = 2", 'nbrsvr = "abc"'))
    rc, out, err = stopped.cli("chgpopa", "--msgsplit", "128")
    assert rc == 2 and "pop.nbrsvr: 'abc' is not allowed" in err and "--nbrsvr" not in err


def test_a_pair_kept_in_part_sets_right_a_bad_value_elsewhere(stopped):
    """chgsmtpa --maxrcpt 10 --rtymin *SAME 7 checked the pair against the
    whole file first, so the file's bad maxrcpt stopped the command fixing it."""
    from twistmail import configedit

    configedit.set_values(stopped.config, {"smtp.maxrcpt": 77})
    text = stopped.config.read_text()
    stopped.config.write_text(text.replace("maxrcpt = 77", 'maxrcpt = "xyz"'))
    rc, out, err = stopped.cli("chgsmtpa", "--maxrcpt", "10", "--rtymin", "*SAME", "7")
    assert rc == 0, err
    settings = configmod.load(stopped.config)
    assert settings.smtp.maxrcpt == 10 and settings.smtp.rtymin[1] == 7


def test_an_option_without_its_value_names_what_it_takes(stopped):
    rc, out, err = stopped.cli("chgpje", "--pgm")
    assert rc == 2 and err.strip() == ("twistmail chgpje: --pgm: a value is needed "
                                       "(Prestart program: QTMSSRCP, QTPOPSRVP, QTMSCCLCP)")


def test_a_pair_reset_in_part_sets_right_its_own_bad_value(stopped):
    """RTYMIN(4 *DFT) needs nothing from the file, yet a bad rtymin there stopped it."""
    from twistmail import configedit

    configedit.set_values(stopped.config, {"smtp.rtymin": (9, 9)})
    text = stopped.config.read_text()
    stopped.config.write_text(text.replace("rtymin = [9, 9]", 'rtymin = "junk"'))
    rc, out, err = stopped.cli("chgsmtpa", "--rtymin", "4", "*DFT")
    assert rc == 0, err
    assert configmod.load(stopped.config).smtp.rtymin == (4, 30)
