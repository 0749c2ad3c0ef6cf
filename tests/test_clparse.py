"""CL command strings: reading them, translating them, and running them through ``cl``."""

from __future__ import annotations

from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from twistmail.cli import base, clcmd
from twistmail.cli.clparse import (
    POSITIONAL,
    ClCommand,
    ClError,
    command_name,
    parse,
    render,
    to_args,
    unqualify,
)
from twistmail.cli.main import cli

SEED_EXAMPLE = "CHGPJE SBSD(QSYS/QSYSWRK) PGM(QTCP/QTMSSRCP) MAXJOBS(50)"


def error_of(text: str) -> str:
    with pytest.raises(ClError) as info:
        parse(text)
    return str(info.value)


# -- parse -------------------------------------------------------------------------------


def test_keyword_form() -> None:
    assert parse(SEED_EXAMPLE) == ClCommand(
        "CHGPJE",
        (
            ("SBSD", ("QSYS/QSYSWRK",)),
            ("PGM", ("QTCP/QTMSSRCP",)),
            ("MAXJOBS", ("50",)),
        ),
    )


def test_names_and_keywords_are_upper_cased_values_kept_as_typed() -> None:
    cmd = parse("crtusrprf usrprf(sam) password(S3cret) text(*nomax)")
    assert cmd.name == "CRTUSRPRF"
    assert cmd.params == (
        ("USRPRF", ("sam",)),
        ("PASSWORD", ("S3cret",)),
        ("TEXT", ("*nomax",)),
    )


def test_positional_values_take_the_tables_keywords() -> None:
    cmd = parse("CHGPJE QSYS/QSYSWRK QTCP/QTMSSRCP MAXJOBS(*NOMAX)")
    assert cmd.params == (
        ("SBSD", ("QSYS/QSYSWRK",)),
        ("PGM", ("QTCP/QTMSSRCP",)),
        ("MAXJOBS", ("*NOMAX",)),
    )


def test_positional_list_and_quoted_values() -> None:
    cmd = parse("ADDDIRE (SAM SYSTEM) 'Sam Smith' USRPRF(SAM)")
    assert cmd.params == (
        ("USRID", ("SAM", "SYSTEM")),
        ("USRD", ("Sam Smith",)),
        ("USRPRF", ("SAM",)),
    )


def test_command_library_is_dropped() -> None:
    assert parse("QSYS/STRTCPSVR *SMTP").params == (("SERVER", ("*SMTP",)),)
    assert parse("*LIBL/ENDMSF *IMMED").params == (("OPTION", ("*IMMED",)),)


def test_command_without_parameters() -> None:
    assert parse("  WRKACTJOB \n") == ClCommand("WRKACTJOB", ())


def test_quoted_string_with_doubled_quotes_keeps_case() -> None:
    cmd = parse("SNDDST TYPE(*LMSG) DSTD('It''s here') MSG('''Quoted'' Word')")
    assert cmd.get("DSTD") == ("It's here",)
    assert cmd.get("msg") == ("'Quoted' Word",)
    assert parse("X TEXT('')").get("TEXT") == ("",)


def test_quoted_string_protects_parentheses_and_comments() -> None:
    assert parse("X TEXT('a (b) /* c */ d')").get("TEXT") == ("a (b) /* c */ d",)


def test_element_lists_and_lists_of_lists() -> None:
    cmd = parse("SNDDST *LMSG TOUSRID((SAM SYSTEM *PRI) (JANE SYSTEM *CC)) RTYMIN(3 30)")
    assert cmd.get("TOUSRID") == (("SAM", "SYSTEM", "*PRI"), ("JANE", "SYSTEM", "*CC"))
    assert cmd.get("RTYMIN") == ("3", "30")
    assert parse("X L((A B)(C D))").get("L") == (("A", "B"), ("C", "D"))


def test_newlines_tabs_and_comments_between_parameters() -> None:
    cmd = parse("CHGSMTPA\n\tAUTOSTART(*YES) /* start with the daemon */\n  RTYMIN( 3  30 )\n")
    assert cmd.params == (("AUTOSTART", ("*YES",)), ("RTYMIN", ("3", "30")))


def test_plus_continuation_drops_leading_blanks_of_next_line() -> None:
    text = "CHGPJE SBSD(QSYSWRK) PGM(QTMSSRCP) +\n         MAXJOBS(50) +\n  MAXUSE(2+\n      00)"
    cmd = parse(text)
    assert cmd.get("MAXJOBS") == ("50",)
    assert cmd.get("MAXUSE") == ("200",)


def test_continuation_inside_quoted_string() -> None:
    assert parse("X TEXT('one +\n       two')").get("TEXT") == ("one two",)
    assert parse("X TEXT('one-\n  two')").get("TEXT") == ("one  two",)


def test_crlf_line_ends_with_continuation() -> None:
    assert parse("CHGPOPA +\r\n   NBRSVR(5)").get("NBRSVR") == ("5",)


def test_command_name_alone() -> None:
    assert command_name(" qsys/chgpje PGM(") == "CHGPJE"
    with pytest.raises(ClError, match="empty command"):
        command_name("  ")


def test_get_absent_keyword() -> None:
    assert parse("DSPSMTPA").get("AUTOSTART") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("CHGPJE PGM(QTMSSRCP) MAXJOBS(50", "unbalanced parenthesis after MAXJOBS"),
        ("CHGPJE PGM(QTMSSRCP)) MAXJOBS(50)", "unbalanced parenthesis: ')' without '(' after PGM"),
        ("SNDDST *LMSG TOUSRID((SAM SYSTEM)", "unbalanced parenthesis after TOUSRID"),
        ("CHGPJE QSYSWRK QTMSSRCP *CNTRLD", "unknown positional parameter 3 for CHGPJE"),
        ("WRKACTJOB QSYSWRK", "unknown positional parameter 1 for WRKACTJOB"),
        ("CHGPJE MAXJOBS(20) MAXJOBS(30)", "keyword MAXJOBS given twice"),
        ("CHGPJE QTMSSRCP SBSD(QSYSWRK)", "keyword SBSD given twice"),
        ("CHGPJE PGM(QTMSSRCP) QSYSWRK", "positional value QSYSWRK after keyword PGM"),
        ("X TEXT('It''s", "unterminated quoted string in TEXT"),
        ("X TEXT('a'b)", "missing blank after 'a' in TEXT"),
        ("X TOUSRID(SAM(X))", "missing blank after 'SAM' in TOUSRID"),
        ("X PGM(QTCP/QTMSSRCP MAXJOBS(5)", "or a ')' missing after the value of PGM"),
        ("X MAXJOBS()", "empty parentheses in MAXJOBS"),
        ("X QTCP/PGM(Y)", "bad keyword 'QTCP/PGM'"),
        ("", "empty command"),
        ("   /* only a comment */ ", "empty command"),
        ("'CHGPJE'", "bad command name"),
        ("CHGPJE PGM(QTMSSRCP) +", "ends with the continuation character +"),
        ("CHGPJE /* open", "unterminated comment"),
    ],
)
def test_errors_say_what_and_where(text: str, message: str) -> None:
    error = error_of(text)
    assert message in error
    assert "\n" not in error


# -- unqualify ---------------------------------------------------------------------------


def test_unqualify() -> None:
    assert unqualify("QTMSSRCP") == "QTMSSRCP"
    assert unqualify("QTCP/QTMSSRCP") == "QTMSSRCP"
    assert unqualify("qtcp/QTMSSRCP", ("QTCP", "QSYS")) == "QTMSSRCP"
    assert unqualify("QTMSSRCP", ()) == "QTMSSRCP"
    with pytest.raises(ClError, match=r"library QGPL is not allowed in PGM .*QTCP, QSYS"):
        unqualify("QGPL/QTMSSRCP", ("QTCP", "QSYS"), keyword="PGM")
    for bad in ("/QTMSSRCP", "QTCP/", "A/B/C"):
        with pytest.raises(ClError, match="bad qualified name"):
            unqualify(bad)


# -- to_args -----------------------------------------------------------------------------


def test_to_args_seed_example() -> None:
    assert to_args(parse(SEED_EXAMPLE)) == ["chgpje", "--pgm", "QTMSSRCP", "--maxjobs", "50"]


def test_to_args_upper_cases_object_names_and_checks_libraries() -> None:
    assert to_args(parse("DSPACTPJ *LIBL/QSYSWRK qsys/qtpopsrvp")) == [
        "dspactpj",
        "--pgm",
        "QTPOPSRVP",
    ]
    with pytest.raises(ClError, match="library QGPL is not allowed in PGM"):
        to_args(parse("CHGPJE PGM(QGPL/QTMSSRCP)"))
    with pytest.raises(ClError, match="library QTCP is not allowed in SBSD"):
        to_args(parse("CHGPJE SBSD(QTCP/QSYSWRK) PGM(QTMSSRCP)"))
    with pytest.raises(ClError, match="PGM takes one name"):
        to_args(parse("CHGPJE PGM(QTMSSRCP QTPOPSRVP)"))


def test_the_manual_s_pop_user_sign_on_keywords_are_taken_and_ignored() -> None:
    """The manual creates POP users with these; twistmail has no sign-on to limit."""
    assert to_args(parse("CRTUSRPRF USRPRF(POPUSER) PASSWORD(x) INLMNU(*SIGNOFF) "
                         "INLPGM(*NONE) LMTCPB(*YES)")) == [
        "crtusrprf", "--usrprf", "POPUSER", "--password", "x"]


def test_usrid_current_is_ibm_s_default_as_when_left_out() -> None:
    assert to_args(parse("QRYDST USRID(*CURRENT) USRPRF(SAM)")) == [
        "qrydst", "--usrprf", "SAM"]


def test_dspjrn_outmbr_add_is_refused_not_turned_into_a_replace() -> None:
    """OUTMBR is ignored, so *ADD wrote the outfile anew: what it held was lost."""
    with pytest.raises(ClError, match=r"OUTMBR\(MAR2 \*ADD\) is not allowed: \*ADD"):
        to_args(parse("DSPJRN OUTPUT(*OUTFILE) OUTFILE('/tmp/j.csv') OUTMBR(MAR2 *ADD)"))
    assert to_args(parse("DSPJRN OUTFILE('/tmp/j.csv') OUTMBR(*FIRST *REPLACE)")) == [
        "dspjrn", "--outfile", "/tmp/j.csv"]


def test_to_args_only_subsystem_is_qsyswrk() -> None:
    with pytest.raises(ClError, match=r"SBSD\(QSYS/QINTER\) is not allowed; "
                       r"allowed: QSYSWRK or QSYS/QSYSWRK"):
        to_args(parse("CHGPJE SBSD(QSYS/QINTER) PGM(QTMSSRCP)"))
    with pytest.raises(ClError, match=r"SBS\(QBATCH\)"):
        to_args(parse("STRPJ QBATCH QTMSSRCP"))


def test_to_args_element_list_and_list_of_lists() -> None:
    cmd = parse("SNDDST *LMSG ((SAM SYSTEM *PRI) (JANE SYSTEM *CC)) RTYMIN(3 30)")
    assert to_args(cmd) == [
        "snddst",
        "--type",
        "*LMSG",
        "--tousrid",
        "SAM",
        "SYSTEM",
        "*PRI",
        "--tousrid",
        "JANE",
        "SYSTEM",
        "*CC",
        "--rtymin",
        "3",
        "30",
    ]


def test_to_args_quoted_value_is_one_argument() -> None:
    assert to_args(parse("X TEXT('a b')")) == ["x", "--text", "a b"]


def test_to_args_same_means_leave_out() -> None:
    cmd = parse("CHGPJE SBSD(QSYSWRK) PGM(QTMSSRCP) STRJOBS(*SAME) MAXJOBS(20) WAIT(*same)")
    assert to_args(cmd) == ["chgpje", "--pgm", "QTMSSRCP", "--maxjobs", "20"]


CHGPJE_OPTIONS = {"pgm": 1, "maxjobs": 1, "wait": 1, "reset": 0, "rtymin": 2, "to": 1, "opt": None}


def test_to_args_unknown_keyword_lists_the_keywords() -> None:
    with pytest.raises(ClError) as info:
        to_args(parse("CHGPJE PGM(QTMSSRCP) FOO(1)"), CHGPJE_OPTIONS)
    assert str(info.value) == (
        "CHGPJE has no keyword FOO; keywords: PGM, MAXJOBS, WAIT, RESET, RTYMIN, TO, OPT, SBSD"
    )


def test_the_keywords_listed_in_a_refusal_are_all_that_are_taken() -> None:
    with pytest.raises(ClError) as info:
        to_args(parse("CHGPJE PGM(QTMSSRCP) FOO(1)"), CHGPJE_OPTIONS)
    assert str(info.value).endswith(", OPT, SBSD")
    with pytest.raises(ClError) as info:
        to_args(parse("DSPACTPJ PGM(QTMSSRCP) OUTPUT(*PRINT)"), {"pgm": 1})
    assert str(info.value).startswith("OUTPUT(*PRINT) is not allowed; allowed: * ")


def test_to_args_subsystem_needs_no_option() -> None:
    cmd = parse(SEED_EXAMPLE)
    assert to_args(cmd, CHGPJE_OPTIONS) == ["chgpje", "--pgm", "QTMSSRCP", "--maxjobs", "50"]


def test_to_args_checks_value_counts() -> None:
    with pytest.raises(ClError, match=r"MAXJOBS takes 1 value, got 2: \(20 30\)"):
        to_args(parse("CHGPJE MAXJOBS(20 30)"), CHGPJE_OPTIONS)
    with pytest.raises(ClError, match="RTYMIN takes 2 values, got 1"):
        to_args(parse("CHGPJE RTYMIN(3)"), CHGPJE_OPTIONS)
    # CHGSMTPA's and CHGPOPA's elements left out are *SAME, as IBM's take them;
    # an identifier's are not (half a USRID means nothing).
    assert to_args(parse("CHGSMTPA RTYMIN(3)"), {"rtymin": 2}) == [
        "chgsmtpa", "--rtymin", "3", "*SAME"]
    with pytest.raises(ClError, match="USRID takes 2 values, got 1"):
        to_args(parse("RMVDIRE USRID(CLG)"), {"usrid": 2})
    assert to_args(parse("CHGPJE OPT(A B C)"), CHGPJE_OPTIONS) == ["chgpje", "--opt", "A", "B", "C"]


def test_to_args_list_settings_are_one_blank_separated_value() -> None:
    """CHGSMTPA's list parameters, typed as IBM i lists, are what the click option takes."""
    options = {"authmech": 1, "rblsvr": 1, "nameservers": 1}
    assert to_args(parse("CHGSMTPA AUTHMECH(*PLAIN *LOGIN) RBLSVR(a.test b.test) "
                         "NAMESERVERS('127.0.0.1' '::1')"), options) == [
        "chgsmtpa", "--authmech", "*PLAIN *LOGIN", "--rblsvr", "a.test b.test",
        "--nameservers", "127.0.0.1 ::1"]
    assert to_args(parse("CHGSMTPA AUTHMECH(*PLAIN)"), options) == [
        "chgsmtpa", "--authmech", "*PLAIN"]


def test_to_args_switches() -> None:
    assert to_args(parse("X RESET(*YES)"), CHGPJE_OPTIONS) == ["x", "--reset"]
    assert to_args(parse("X RESET(*no)"), CHGPJE_OPTIONS) == ["x"]
    with pytest.raises(ClError, match=r"RESET\(MAYBE\) is not allowed; allowed: \*YES, \*NO"):
        to_args(parse("X RESET(MAYBE)"), CHGPJE_OPTIONS)


def test_to_args_repeatable_options() -> None:
    cmd = parse("X TO(a@example.test b@example.test)")
    assert to_args(cmd, CHGPJE_OPTIONS, multiple={"to"}) == [
        "x",
        "--to",
        "a@example.test",
        "--to",
        "b@example.test",
    ]
    with pytest.raises(ClError, match="TO takes 1 value, got 2"):
        to_args(cmd, CHGPJE_OPTIONS)
    with pytest.raises(ClError, match="RTYMIN takes one list, got 2"):
        to_args(parse("X RTYMIN((1 2) (3 4))"), CHGPJE_OPTIONS)


def test_to_args_rejects_shapes_click_cannot_take() -> None:
    with pytest.raises(ClError, match="mixes single values and lists"):
        to_args(parse("X OPT(A (B C))"))
    with pytest.raises(ClError, match="nests lists deeper"):
        to_args(parse("X OPT((A (B C)))"))


def test_positional_table_covers_the_interface_commands() -> None:
    for name in ("CHGPJE", "DSPACTPJ", "STRPJ", "ENDPJ", "ADDDIRE", "SNDDST", "ENDMSF"):
        assert name in POSITIONAL
    assert POSITIONAL["ENDPJ"] == ("SBS", "PGM", "OPTION")


# -- round trip --------------------------------------------------------------------------

names = st.from_regex(r"[A-Z][A-Z0-9]{0,9}", fullmatch=True)
texts = st.text(st.characters(exclude_characters="\n", exclude_categories=("Cs",)), max_size=12)
elements = st.recursive(
    texts, lambda inner: st.lists(inner, min_size=1, max_size=3).map(tuple), max_leaves=6
)
values = st.lists(elements, min_size=1, max_size=4).map(tuple)
commands = st.builds(
    ClCommand,
    names,
    st.dictionaries(names, values, max_size=5).map(lambda d: tuple(d.items())),
)


@given(commands)
def test_render_then_parse_is_identity(cmd: ClCommand) -> None:
    assert parse(render(cmd)) == cmd


@given(commands, st.sampled_from([" +\n    ", " -\n", "\n\t", "  /* note */  "]))
def test_any_separator_between_parameters(cmd: ClCommand, separator: str) -> None:
    parts = [render(ClCommand(cmd.name, ((kw, v),))).split(" ", 1)[1] for kw, v in cmd.params]
    assert parse(separator.join([cmd.name, *parts])) == cmd


flat_values = st.lists(texts.filter(lambda s: s.upper() != "*SAME"), min_size=1, max_size=3)


@given(
    names,
    st.dictionaries(
        names.filter(lambda n: n not in ("PGM", "SBSD", "SBS")), flat_values, max_size=4
    ),
)
def test_to_args_of_simple_values(name: str, params: dict[str, list[str]]) -> None:
    cmd = parse(render(ClCommand(name, tuple((k, tuple(v)) for k, v in params.items()))))
    expected = [name.lower()]
    for keyword, value in params.items():
        expected += [f"--{keyword.lower()}", *value]
    assert to_args(cmd) == expected


# -- the cl command on a throwaway group -------------------------------------------------


def make_group() -> tuple[click.Group, list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    @click.group()
    def group() -> None:
        pass

    @group.command("chgtst")
    @click.option("--pgm", required=True)
    @click.option("--maxjobs", type=int)
    @click.option("--rtymin", nargs=2, type=int)
    @click.option("--tousrid", nargs=2, multiple=True)
    @click.option("--to", multiple=True)
    @click.option("--reset", is_flag=True)
    @click.option("--text")
    def chgtst(**kwargs: Any) -> int:
        calls.append(kwargs)
        return 0

    @group.command("endtst")
    @click.option("--code", type=int, default=3)
    @click.pass_context
    def endtst(ctx: click.Context, code: int) -> None:
        ctx.exit(code)

    @group.command("rettst")
    def rettst() -> int:
        return 7

    @group.group("dcm")
    def dcm() -> None:
        pass

    group.add_command(clcmd.cl)
    return group, calls


def test_cl_runs_the_translated_command() -> None:
    group, calls = make_group()
    result = CliRunner().invoke(
        group,
        [
            "cl",
            "CHGTST SBSD(QSYS/QSYSWRK) PGM(QTCP/qtmssrcp) MAXJOBS(50) RTYMIN(3 30) +\n"
            "  TOUSRID((SAM SYSTEM) (JANE SYSTEM)) TO(a@x.test b@x.test) RESET(*YES) +\n"
            "  TEXT('It''s here')",
        ],
    )
    assert result.exit_code == 0, result.output
    assert calls == [
        {
            "pgm": "QTMSSRCP",
            "maxjobs": 50,
            "rtymin": (3, 30),
            "tousrid": (("SAM", "SYSTEM"), ("JANE", "SYSTEM")),
            "to": ("a@x.test", "b@x.test"),
            "reset": True,
            "text": "It's here",
        }
    ]


def test_cl_joins_several_arguments() -> None:
    group, calls = make_group()
    result = CliRunner().invoke(group, ["cl", "CHGTST", "PGM(QTMSSRCP)", "MAXJOBS(5)"])
    assert result.exit_code == 0, result.output
    assert calls[0]["maxjobs"] == 5


def test_cl_show_prints_instead_of_running() -> None:
    group, calls = make_group()
    result = CliRunner().invoke(
        group,
        ["cl", "--show", "CHGTST SBSD(QSYSWRK) PGM(QTCP/QTMSSRCP) TEXT('a b')"],
        prog_name="tm",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "tm chgtst --pgm QTMSSRCP --text 'a b'\n"
    assert calls == []


def test_cl_exit_status_is_the_commands() -> None:
    group, _ = make_group()
    assert CliRunner().invoke(group, ["cl", "ENDTST CODE(4)"]).exit_code == 4
    assert group.main(["cl", "RETTST"], standalone_mode=False) == 7


def test_cl_inner_usage_error_is_exit_2() -> None:
    group, calls = make_group()
    result = CliRunner().invoke(group, ["cl", "CHGTST PGM(QTMSSRCP) MAXJOBS(many)"])
    assert result.exit_code == 2
    assert "many" in result.output
    assert calls == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FOO X(1)", "CL command FOO is not supported; supported: CHGTST, ENDTST, RETTST"),
        ("DCM LIST", "CL command DCM is not supported"),
        ("CL X", "CL command CL is not supported"),
        ("CHGTST PGM(QTMSSRCP) FOO(1)", "CHGTST has no keyword FOO; keywords: PGM, MAXJOBS"),
        ("CHGTST PGM(QTMSSRCP) MAXJOBS(1 2)", "MAXJOBS takes 1 value, got 2"),
        ("CHGTST PGM(QTMSSRCP", "unbalanced parenthesis after PGM"),
        ("CHGTST SBSD(QINTER) PGM(QTMSSRCP)", "allowed: QSYSWRK or QSYS/QSYSWRK"),
    ],
)
def test_cl_mistakes_are_usage_errors(text: str, message: str) -> None:
    group, calls = make_group()
    result = CliRunner().invoke(group, ["cl", text])
    assert result.exit_code == 2
    assert message in result.output
    assert calls == []


# -- the cl command on the real group ----------------------------------------------------


def test_cl_is_registered_on_twistmail() -> None:
    assert cli.get_command(click.Context(cli), "cl") is clcmd.cl


def test_real_cl_unknown_command_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert base.run(["cl", "FOO X(1)"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twistmail cl: CL command FOO is not supported; supported: ")
    assert err.count("\n") == 1


def test_real_cl_parse_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert base.run(["cl", "CHGPJE PGM(QTMSSRCP"]) == 2
    err = capsys.readouterr().err
    assert err == "twistmail cl: unbalanced parenthesis after PGM: ')' missing\n"


def test_real_cl_show_chgpje(capsys: pytest.CaptureFixture[str]) -> None:
    if cli.get_command(click.Context(cli), "chgpje") is None:
        pytest.skip("chgpje is not registered yet")
    assert base.run(["cl", "--show", SEED_EXAMPLE]) == 0
    assert capsys.readouterr().out == "twistmail chgpje --pgm QTMSSRCP --maxjobs 50\n"


def test_deep_parentheses_are_a_mistake_not_a_crash() -> None:
    with pytest.raises(ClError, match="nested more than"):
        parse("CHGPJE PGM(QTMSSRCP) MAXJOBS(" + "(" * 3000 + "1" + ")" * 3001)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("RMVDIRE (CLUSR2 HQ)", "rmvdire --usrid CLUSR2 HQ"),
        ("DLTJRNRCV QZMF.000003", "dltjrnrcv --jrnrcv QZMF.000003"),
        ("WRKQ QTMSRTQ1", "wrkq --queue QTMSRTQ1"),
        ("WRKSMTPLE *FTRTYPE", "wrksmtple --type '*FTRTYPE'"),
        ("STRTCPSVR SERVER(*POP *SMTP)", "strtcpsvr --server '*POP' --server '*SMTP'"),
        ("DSPJRN JRN(QZMF) CODE(9T B2)", "dspjrn --jrn QZMF --code '9T B2'"),
        ("CHGJRN JRN(QZMF) JRNRCV(*GEN)", "chgjrn --jrn QZMF --jrnrcv '*GEN'"),
        ("DSPJRN OUTPUT(*OUTFILE) OUTFILE('/tmp/j.csv')",
         "dspjrn --output '*OUTFILE' --outfile /tmp/j.csv"),
        ("DSPJRN JRN(QZMF) ENTTYP(JG JP) FROMTIME('2026-11-30' '10:00')",
         "dspjrn --jrn QZMF --code 'JG JP' --from '2026-11-30 10:00'"),
        # The seed's own command: a database outfile's member and layout mean
        # nothing to one CSV file; every QZMF entry has entry type LG.
        ("DSPJRN JRN(QZMF) OUTPUT(*OUTFILE) OUTFILE(jrnlib/zmfstuff) OUTMBR(MAR2) "
         "ENTDTALEN(512) JRNCDE(U) ENTTYP(LG)",
         "dspjrn --jrn QZMF --output '*OUTFILE' --outfile jrnlib/zmfstuff --code LG"),
        ("DSPACTPJ SBS(QSYSWRK) PGM(QTCP/QTPOPSRVP) OUTPUT(*)", "dspactpj --pgm QTPOPSRVP"),
        ("WRKACTJOB OUTPUT(*)", "wrkactjob"),
    ],
)
def test_ibm_forms_of_the_commands(capsys: pytest.CaptureFixture[str], text: str,
                                   shown: str) -> None:
    """Positional values, CL lists and keywords as IBM i documents them."""
    assert base.run(["cl", "--show", text]) == 0
    assert capsys.readouterr().out == f"twistmail {shown}\n"


def test_two_names_of_one_parameter_are_refused_not_one_dropped() -> None:
    """CODE(9T) ENTTYP(EH) ran with ENTTYP's value alone, and exit 0."""
    with pytest.raises(ClError, match="keywords CODE and ENTTYP given together"):
        to_args(parse("DSPJRN CODE(9T) ENTTYP(EH)"))
