"""A job's adoption of the connections the controller hands it."""

from __future__ import annotations

import socket
import struct

from appliance import base_sections, render_toml
from twisted.internet import reactor

from twistmail import config as configmod
from twistmail.prestart.job import Job


def _reset_connection() -> int:
    """The server side of a loopback connection its client has reset (RST)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    return server.detach()


def test_a_client_gone_before_its_session_leaves_no_warning(tmp_path, capsys):
    """Any client could fill the log with warnings by resetting its connections
    right after connecting: the job found the socket unconnected when it adopted it."""
    config = tmp_path / "twistmail.toml"
    config.write_text(render_toml(base_sections(tmp_path / "var")))
    job = Job(reactor, "QTMSSRCP", configmod.load(config), source=str(config))
    assert job.serve(_reset_connection(), "smtp", socket.AF_INET) is False
    assert capsys.readouterr().err == ""
