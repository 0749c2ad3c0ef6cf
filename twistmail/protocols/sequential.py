"""The input discipline shared by our SMTP and POP3 sessions.

A session handles one command at a time.  Input that arrives meanwhile
waits in one bounded buffer: replies therefore go out in command order even
when a step is asynchronous (a directory lookup, a durable commit, a login),
and once the buffer holds more than ``max_pending`` bytes the session stops
reading, so a client cannot make it hold unbounded input.  Output is bounded
the same way: the session is its transport's streaming producer, and while
the client does not read its replies (the transport's buffer is full) no
command is handled, so input waits in the same bounded buffer.  An idle
session ends after the inactivity timeout, which only input the session can
act on restarts: a client that sends a byte now and then without ever
completing a command does not hold its job for ever.

Subclasses implement :meth:`step` (consume what they can from
``self.buffer``; False when more input is needed) and :meth:`timed_out`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from twistmail.protocols.writenow import close_now, cut_unfinished_tls, tls_lost

#: Seconds a closing session's last reply has to leave before the connection is cut.
CLOSE_GRACE = 10.0


def without_line_end(raw: bytes) -> bytes:
    """A command line without its one line end (LF, or CR LF).  Only one goes:
    a CR more (``NOOP<CR><CR><LF>``) stays, for the caller to refuse as it
    refuses one inside the line."""
    return raw.removesuffix(b"\n").removesuffix(b"\r")


def tls_reason(error: Exception) -> str:
    """OpenSSL's reasons, without the library and function names."""
    details = error.args[0] if error.args else None
    if isinstance(details, list):
        words = [str(d[-1]) for d in details if isinstance(d, tuple) and d and d[-1]]
        if words:
            return ", ".join(words)
    return str(error) or type(error).__name__


@implementer(IHalfCloseableProtocol)
class SequentialSession(Protocol):
    """A client that sends its last command and shuts down its side (``nc -N``,
    a script's ``shutdown(SHUT_WR)``) still has every command answered; the
    session ends once none is left to answer, as if the client had gone then.
    """

    max_pending = 64 * 1024

    def __init__(self, reactor: Any, inacttimo: float) -> None:
        self.reactor = reactor
        self.inacttimo = inacttimo
        self.buffer = b""
        self.busy = False  # a step is in progress, maybe asynchronously
        self.processing = False  # inside the loop of _process
        self.paused = False  # reading stopped: too much input waits
        self.output_full = False  # the client does not read its replies
        self.watching = False  # registered as the transport's producer
        self.closing = False
        self.input_ended = False  # the client shut down its side: no more input comes
        self.lost = False  # the connection is gone (connectionLost has run)
        self.timeout_call: Any = None
        #: Fires when the connection is gone: a job's shutdown waits for it.
        self.gone: defer.Deferred | None = None

    def wait_gone(self) -> defer.Deferred:
        """A Deferred fired once the connection is gone, its last replies flushed.

        The reactor's shutdown drops what a transport still buffers (a TLS
        transport's replies are not yet in the kernel): a job that ends
        waits for this before it lets the reactor go on.
        """
        if self.gone is None:
            self.gone = defer.Deferred()
        return self.gone

    def connection_gone(self, reason: Any = None) -> None:
        """For the subclasses' ``connectionLost``.

        A connection the TLS layer ended (a client offering only TLS 1.0,
        text where a ClientHello belongs, a refused renegotiation) is one
        log line, as Postfix logs its SSL_accept errors: the client sees
        only a closed connection, and nothing else would tell.
        """
        check = getattr(reason, "check", None)
        if check is not None and check("OpenSSL.SSL.Error"):
            self.log.info("TLS with {peer} failed: {why}", peer=getattr(self, "peer_ip", "?"),
                          why=tls_reason(reason.value))
        self.lost = True
        gone, self.gone = self.gone, None
        if gone is not None:
            gone.callback(None)

    # -- subclass hooks ---------------------------------------------------------

    def step(self) -> bool:
        raise NotImplementedError

    def timed_out(self) -> None:
        raise NotImplementedError

    def step_failed(self, failure: Any) -> None:
        raise NotImplementedError

    def signed_on(self) -> bool:
        raise NotImplementedError

    def shutdown_notice(self) -> defer.Deferred | None:
        """The job is being ended (ENDPJ after its delay, a shutdown): say so, then close.

        A Deferred (see :meth:`wait_gone`) when the job's shutdown must wait
        for the session, a bounded time: for its notice to leave, or for a
        step under way whose reply goes first.
        """
        raise NotImplementedError

    def cut_off(self) -> None:
        """MAXAUTHFAIL was reached from this client's address meanwhile: a
        session not signed on ends, or parallel sessions would each go on
        guessing.  A signed-on one (a user behind the same address) goes on."""
        raise NotImplementedError

    # -- timeout --------------------------------------------------------------

    def reset_timeout(self) -> None:
        if self.closing:
            return  # the close's own timer runs
        if self.timeout_call is not None and self.timeout_call.active():
            self.timeout_call.reset(self.inacttimo)
        else:
            self.timeout_call = self.reactor.callLater(self.inacttimo, self.timed_out)

    def cancel_timeout(self) -> None:
        if self.timeout_call is not None and self.timeout_call.active():
            self.timeout_call.cancel()

    # -- output ---------------------------------------------------------------

    def watch_output(self) -> None:
        """Be told when the client stops reading: call once connected.

        Something else that produces for the transport (a reply streamed
        from a file) takes this place with :meth:`lend_output` and gives it
        back with :meth:`watch_output`.
        """
        if not self.closing and not self.watching:
            self.transport.registerProducer(self, True)
            self.watching = True

    def lend_output(self) -> None:
        if self.watching:
            self.watching = False
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        # Reading goes on until max_pending bytes wait, as behind a slow step:
        # a TLS layer pauses its producer during a handshake, which needs reading.
        self.output_full = True

    def resumeProducing(self) -> None:
        if self.output_full:
            self.output_full = False
            if not self.closing:
                self.resume_steps()

    def stopProducing(self) -> None:
        pass

    # -- input ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.buffer += data
        self._process()
        if (self.busy or self.output_full) and len(self.buffer) > self.max_pending \
                and not self.paused:
            # Pipelined input piles up behind a slow step or unread replies: stop reading.
            self.paused = True
            self.transport.pauseProducing()

    def _process(self) -> None:
        """Run steps until the input runs out or one of them waits."""
        self.processing = True
        progressed = False
        try:
            while not (self.busy or self.closing or self.output_full):
                if tls_lost(self.transport):
                    # The client ended TLS: what it sent before is not to
                    # be carried out without its replies (see tls_lost).
                    self.buffer = b""
                    break
                if not self.step():
                    break
                progressed = True
        finally:
            self.processing = False
            if progressed:
                self.reset_timeout()
        if self.input_ended and not (self.busy or self.closing or self.output_full):
            self.close()  # what is left in the buffer can never be a whole command

    def readConnectionLost(self) -> None:
        self.input_ended = True
        if not self.processing:
            self._process()

    def writeConnectionLost(self) -> None:
        """Never asked for: a session closes both directions at once."""

    def wait_for(self, d: defer.Deferred) -> defer.Deferred:
        """Hold further input until ``d`` fires (it may have fired already)."""
        self.busy = True
        d.addErrback(self.step_failed)
        return d.addBoth(self.resume)

    def resume(self, _: Any = None) -> None:
        """An asynchronous step finished: go on with what was pipelined meanwhile."""
        self.busy = False
        self.reset_timeout()  # the client waited for us: its idle time starts now
        self.resume_steps()

    def resume_steps(self) -> None:
        if self.processing:
            return  # the loop in _process goes on
        self._process()
        if self.paused and not self.closing and len(self.buffer) <= self.max_pending:
            self.paused = False
            self.transport.resumeProducing()

    def close(self) -> None:
        self.closing = True
        self.buffer = b""
        if self.transport is not None and not self.lost:
            self.lend_output()  # a paused producer would keep the connection open for ever
            self.cancel_timeout()
            if close_now(self.reactor, self.transport):
                return  # every reply had left: connectionLost has run
            self.timeout_call = self.reactor.callLater(
                min(CLOSE_GRACE, self.inacttimo), self.transport.abortConnection)
            self.transport.loseConnection()
            cut_unfinished_tls(self.transport)
