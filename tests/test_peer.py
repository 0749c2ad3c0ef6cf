"""How a client's address is written in the journal, Received: and the limits."""

from __future__ import annotations

import pytest

from twistmail.protocols.peer import client_address


@pytest.mark.parametrize(("host", "written"), [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),  # an IPv4 client of a [::] listener
    ("::FFFF:c000:0201", "192.0.2.1"),
    ("2001:db8::7", "2001:db8::7"),
    # A link-local client: Received: said ([IPv6:fe80::1%lo]), and a list
    # entry for fe80::1 did not match it.
    ("fe80::1%lo", "fe80::1"),
    ("::ffff:192.0.2.1%eth0", "192.0.2.1"),
])
def test_client_address(host: str, written: str) -> None:
    assert client_address(host) == written
