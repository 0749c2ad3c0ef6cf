"""CHGSMTPA and CHGPOPA change the running appliance without a restart."""

from __future__ import annotations

import json
import poplib
import smtplib


def test_chgsmtpa_applies_to_new_sessions(appliance):
    a = appliance
    a.user("SAM")
    a.user("JANE")
    rc, out, err = a.cli("chgsmtpa", "--maxrcpt", "1", "--maxmsgsize", "5000")
    assert rc == 0 and "applied" in out, err
    a.wait_for(lambda: "maxrcpt = 1" in a.config.read_text(), 5)
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo()
        assert s.esmtp_features["size"] == "5000"
        s.mail("jane@example.test")
        assert s.rcpt("sam@example.test")[0] == 250
        code, text = s.rcpt("jane@example.test")
        assert code == 452 and b"4.5.3" in text
    rc, out, err = a.cli("dspsmtpa", "--json")
    shown = json.loads(out)
    assert shown["maxrcpt"] == 1 and shown["rtymin"] == [3, 30]
    # The same values again: said so, not "changed".
    rc, out, err = a.cli("chgsmtpa", "--maxrcpt", "1")
    assert rc == 0 and "has these values already" in out and "changed" not in out, err


def test_chgpopa_applies_live_and_nbrsvr_is_the_pop_entry(appliance):
    a = appliance
    a.user("SAM")
    p = poplib.POP3(*a.addr("pop3"), timeout=30)
    assert "STLS" in p.capa()
    p.quit()
    rc, out, err = a.cli("chgpopa", "--alwssl", "*NO", "--nbrsvr", "2")
    assert rc == 0, err
    a.wait_for(lambda: a.count("QTPOPSRVP", "PSRW") == 2, 15, "NBRSVR jobs")
    p = poplib.POP3(*a.addr("pop3"), timeout=30)
    assert "STLS" not in p.capa()
    p.quit()
    rc, out, err = a.cli("dsppopa")
    assert "*NO" in out and "NBRSVR" in out
    rc, out, err = a.cli("chgpopa", "--nbrsvr", "21")
    assert rc == 2 and "1-20" in err
    rc, out, err = a.cli("cl", "CHGPOPA ALWSSL(*ONLY)")
    assert rc == 0, err
    p = poplib.POP3(*a.addr("pop3"), timeout=30)
    try:
        p.user("sam")
        raise AssertionError("plaintext USER accepted with ALWSSL(*ONLY)")
    except poplib.error_proto as e:
        assert b"STLS" in e.args[0]
    p.quit()
