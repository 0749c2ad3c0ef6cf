"""How a client's address is written: an IPv4 client of a dual-stack listener
as IPv4.

A ``[::]`` listener takes IPv4 clients too; the kernel reports them as
``::ffff:a.b.c.d``.  The journal, Received: fields, the abuse limits and the
SMTP lists all name such a client by its IPv4 address.

A link-local client comes with its interface (``fe80::1%eth0``): the zone is
no part of an address literal (RFC 5321 §4.1.3), and an SMTP list entry
``fe80::1`` does not equal ``fe80::1%eth0`` to ``ipaddress``.
"""

from __future__ import annotations

import ipaddress


def client_address(host: str) -> str:
    host = host.partition("%")[0]
    # Only a mapped address is parsed: this runs for every connection.
    if host[:7].lower() != "::ffff:":
        return host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    return host if mapped is None else str(mapped)
