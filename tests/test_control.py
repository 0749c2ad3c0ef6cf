"""The control socket as a careless script or a sick daemon meets it: real sockets."""

from __future__ import annotations

import json
import select
import socket
import threading
from pathlib import Path

import pytest

from twistmail import config as configmod
from twistmail.control import ControlClient, ControlError, NotRunning
from twistmail.controller import controlsocket


def _raw(appliance) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(appliance.control_socket))
    return s


def test_a_client_that_never_reads_stops_being_read(appliance):
    """Ten megabytes of requests with no answer read made the daemon hold
    every answer (hundreds of megabytes); now it stops reading that client."""
    s = _raw(appliance)
    s.setblocking(False)
    request = b'{"cmd": "status"}\n' * 4096
    sent = 0
    while sent < 16 * 1024 * 1024:
        if not select.select([], [s], [], 3)[1]:
            break  # not read for three seconds: the daemon stopped reading
        try:
            sent += s.send(request)
        except BlockingIOError:
            continue
    assert sent < 16 * 1024 * 1024, "the daemon went on reading"
    assert appliance.control("status")["pid"]  # the others are still answered
    s.close()


def test_an_over_long_request_is_answered_and_the_connection_closed(appliance):
    s = _raw(appliance)
    s.sendall(b"x" * (controlsocket.MAX_LENGTH + 10))
    reply = json.loads(s.makefile("rb").readline())
    assert reply == {"ok": False, "usage": True,
                     "error": f"request longer than {controlsocket.MAX_LENGTH} bytes"}
    s.close()


def test_connections_beyond_the_limit_are_told_why(appliance):
    held = [_raw(appliance) for _ in range(controlsocket.MAX_CONNECTIONS)]
    try:
        with pytest.raises(ControlError, match="control connections open; try again"):
            appliance.control("status")
    finally:
        for s in held:
            s.close()
    appliance.wait_for(lambda: _answers(appliance), 10, "the daemon to answer again")


def _answers(appliance) -> bool:
    try:
        return bool(appliance.control("status"))
    except ControlError:
        return False


class _FakeDaemon:
    """A socket at the control path that answers ``reply`` (None: never)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.recv(65536)
        if self.reply is not None:
            conn.sendall(self.reply)
            conn.close()
        else:
            self.conn = conn  # kept open, silent

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("reply, said", [
    (b"not json\n", "cannot be read"),
    (b"[1]\n", "cannot be read"),
    (b'{"ok": "yes"}\n', "cannot be read"),
    (b'{"ok": true, "res', "closed the connection without an answer"),
    (None, "did not answer within 1 s"),
])
def test_the_cli_says_in_one_line_what_a_sick_daemon_did(tmp_path, reply, said):
    path = tmp_path / "control.sock"
    daemon = _FakeDaemon(path, reply)
    try:
        with pytest.raises(ControlError, match=said) as e:
            ControlClient(path, timeout=1).call("status")
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    finally:
        daemon.close()


def test_a_stale_socket_is_a_daemon_not_running(tmp_path):
    path = tmp_path / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file of a daemon killed with SIGKILL
    with pytest.raises(NotRunning):
        ControlClient(path, timeout=1).call("status")


def test_a_data_directory_too_long_for_a_socket_is_refused_at_load(tmp_path):
    config = tmp_path / "twistmail.toml"
    config.write_text(f'[system]\ndatadir = "{"d" * 120}"\n')
    with pytest.raises(configmod.SettingError, match="system.datadir") as e:
        configmod.load(config)
    assert "at most 107 bytes" in str(e.value)


def test_a_full_backlog_is_waited_for_then_said(tmp_path):
    """connect() under a timeout does not wait for room in the backlog: the
    CLI failed at once with "Resource temporarily unavailable"."""
    path = tmp_path / "control.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)  # a daemon too busy to accept
    waiting = []
    try:
        for _ in range(4):  # fill the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            waiting.append(s)
        with pytest.raises(ControlError, match="took no connection within 1 s"):
            ControlClient(path, timeout=1).call("status")
    finally:
        for s in waiting:
            s.close()
        listener.close()


def _connected(handler):
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    proto = controlsocket.ControlFactory(handler).buildProtocol(None)
    clock = Clock()
    proto.callLater = clock.callLater  # the idle timeout's clock
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def test_an_idle_connection_whose_answers_wait_unread_is_ended():
    """The timeout closed it with the producer still registered and paused:
    Twisted then resumed it instead of closing, and the connection stayed,
    one of the 64, for ever."""
    proto, transport, clock = _connected(object())
    proto.pauseProducing()  # its send buffer is full: the client reads nothing
    clock.advance(controlsocket.IDLE_TIMEOUT + 1)
    assert transport.producer is None and transport.disconnecting


def test_a_client_that_shuts_its_side_still_gets_its_answers(appliance):
    """As ``printf '{"cmd": "status"}\\n' | socat - UNIX-CONNECT:...`` does."""
    s = _raw(appliance)
    s.sendall(b'{"cmd": "status"}\n{"cmd": "nosuch"}\n')
    s.shutdown(socket.SHUT_WR)
    lines = s.makefile("rb").read().splitlines()
    assert [json.loads(line)["ok"] for line in lines] == [True, False]
    s.close()


def test_an_option_in_lower_case_is_the_option(appliance):
    reply = appliance.control("endpj", pgm="QTPOPSRVP", option="*immed", delay=30)
    assert reply == "prestart jobs for QTPOPSRVP ending (*IMMED)"


def test_the_idle_timeout_ends_a_connection_already_closing():
    """A half-closed client that reads none of its answers: the close waits
    for them for ever, so the timeout must abort it all the same."""
    proto, transport, clock = _connected(object())
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)
    proto.readConnectionLost()  # no request: the connection closes
    assert transport.disconnecting
    clock.advance(controlsocket.IDLE_TIMEOUT + 1)
    assert aborted == [True]


def test_a_refusal_written_before_the_request_is_still_read(tmp_path):
    """A daemon with too many control connections says why and closes at once:
    a request still being written then failed with EPIPE, and the CLI said
    "Broken pipe" instead of the daemon's line."""
    path = tmp_path / "control.sock"
    refusal = {"ok": False, "usage": False,
               "error": "the daemon has 64 control connections open; try again"}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()

    def refuse() -> None:
        conn, _ = sock.accept()
        conn.sendall(json.dumps(refusal).encode() + b"\n")
        conn.close()  # nothing read: the client's write fails

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        # Larger than the socket buffers: the write is still going when the
        # daemon closes.
        with pytest.raises(ControlError, match="control connections open; try again"):
            ControlClient(path, timeout=10).call("status", pad="x" * (8 << 20))
    finally:
        thread.join(10)
        sock.close()


def test_arguments_of_the_wrong_type_are_usage_errors(appliance):
    """From a script: STRMSF NBRMSFJOB(true) was taken and the bridge then
    restarted for ever; a number as PGM or SERVER was an internal error."""
    appliance.cli("endmsf", "--option", "*IMMED")
    for cmd, args, needle in (("strmsf", {"nbrmsfjob": True}, "--nbrmsfjob: True"),
                              ("dspactpj", {"pgm": 1}, "--pgm: 1"),
                              ("strpj", {"pgm": 5}, "--pgm: 5"),
                              ("endtcpsvr", {"server": ["*ALL"]}, "--server: ['*ALL']")):
        s = _raw(appliance)
        s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        reply = json.loads(s.makefile("rb").readline())
        s.close()
        assert reply["ok"] is False and reply["usage"] is True, (cmd, reply)
        assert reply["error"].startswith(needle), reply
    assert "Traceback" not in appliance.log_text()
    status = appliance.control("status")
    assert status["bridge"]["pid"] is None  # not started with True
    assert status["pools"]["QTMSCCLCP"] == "ENDED"  # the bridge runs them: not left out
