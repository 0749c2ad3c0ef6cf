"""What a QTMSCCLCP client job does with one task: route and deliver.

A task names one destination domain and one or more messages in QTMSOUTQ,
each with its recipients there and what goes on MAIL and RCPT for them (the
bridge read the envelopes already).  The job routes the domain by the
CHGSMTPA choices (FWDHUBSVR, FIREWALL with MAILROUTER, MX with MAILROUTER
as fallback), then for each message reads the body (it changes nothing: the
bridge alone moves messages between queues), delivers it with our own
client on the connection the one before it used, journals 8B, 88 and 82,
and returns one outcome per recipient for the bridge.  When no server could
take a message (every hop refused or failed to greet, or the session broke
or timed out), the messages after it in the task are not tried: the
destination is in trouble, and each would wait for the same timeouts; only
one whose retries this try uses up (``last``) is tried all the same.  A
server's own 4xx to a recipient (greylisting) stops nothing.  When no
server of the destination answered at all in the whole task (every hop
refused the connection or never greeted, or its DNS failed for now), the
answer says why in ``unreachable``: the bridge then keeps the
destination's other waiting messages from the same timeouts (see
``twistmail.bridge.outbound``).  A server that greeted, even with 421,
or whose session broke in the middle, is up: that says nothing of the
kind.  An MX that is this host itself is never used (``mx.LocalHost``).

An ``etrn`` task (the scheduled mail transfer with ETRNCLT) names the mail
router and our domains instead: the job connects to the router, issues
``ETRN domain`` for each (RFC 1985) and journals each reply (8Y).

Settings honoured: ``[smtp] nameservers hosttable mailrouter firewall
fwdhubsvr tlsoutbound clienttimeout``, ``[system] hostname``, ``[listen]
smtp``, and the *NEAR, *HOSTAUTH and *CLTBIND list entries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads

from twistmail import mx
from twistmail.smtp import client

LISTS_FOR = 1.0  # seconds a reading of the SMTP list entries is used


def _sending(message: dict[str, Any]) -> client.Envelope:
    """MAIL and RCPT as the bridge put them in the task (see outbound._sending)."""
    send = message["send"]
    return client.Envelope(
        send["originator"],
        [client.Recipient(address, tuple(notify) if notify else None, orcpt)
         for address, notify, orcpt in send["recipients"]],
        ret=send["ret"], envid=send["envid"], id=message["id"])


class Deliverer:
    def __init__(self, reactor: Any, settings: Any, queue: Any, directory: Any,
                 journal: Any) -> None:
        self.reactor = reactor
        self.settings = settings
        self.queue = queue
        self.directory = directory
        self.journal = journal
        s = settings.smtp
        hosttable = settings.resolve(s.hosttable) if s.hosttable else None
        self.resolver = mx.MXResolver(reactor, nameservers=list(s.nameservers) or None,
                                      hosttable=hosttable, local=local_host(settings))
        #: The connection of the last delivery, kept for the next to the same hop.
        self.sessions = client.SessionCache(reactor)
        #: The job is ending: a task's messages not begun are left to the bridge.
        self.winding_down = False
        self._lists_read: tuple[float, dict[str, Any]] | None = None

    def run(self, payload: bytes,
            part: Callable[[bytes], None] = lambda outcome: None) -> defer.Deferred:
        """Deliver one task; fires with the JSON result line (never fails).

        ``part`` is given each message's queue id and outcome (JSON) once its
        journal entries are written (the next message's 8B writes them):
        should the job die before the task ends, the messages already sent
        are not sent again.
        """
        task = json.loads(payload)
        if task.get("kind") == "etrn":
            d = defer.Deferred.fromCoroutine(self._etrn(task))
            d.addErrback(lambda f: {"kind": "etrn", "error": f.getErrorMessage()})
            return d.addCallback(lambda result: json.dumps(result).encode())
        d = defer.Deferred.fromCoroutine(self._run(task, part))
        d.addErrback(lambda f: self._all(task, task["messages"], "temporary", 451,
                                         f"4.3.0 local error: {f.getErrorMessage()}"))
        return d.addCallback(lambda result: json.dumps(result).encode())

    async def _run(self, task: dict[str, Any],
                   part: Callable[[bytes], None]) -> dict[str, Any]:
        domain, messages = task["domain"], task["messages"]
        lists = await self._lists()
        decision = mx.route_for(domain, self.settings.smtp, near_domains=lists["near"])
        try:
            route = list(await self.resolver.route_decision(decision))
        except mx.RouteError as e:
            with self.journal.batch():
                for m in messages:
                    self.journal.write("8B", f"8B FOQ {task['queue']}", m["id"], domain=domain)
                    self.journal.write("8K", f"8K RERR {domain}", m["id"], domain=domain,
                                       error=str(e))
            status = "permanent" if e.permanent else "temporary"
            result = self._all(task, messages, status, e.code, str(e))
            if not e.permanent:
                result["unreachable"] = str(e)
            return result
        with self.journal.batch():  # a message's 88 and 82 go with the next one's 8B
            return await self._each(task, route, lists, part)

    async def _each(self, task: dict[str, Any], route: list[Any], lists: dict[str, Any],
                    part: Callable[[bytes], None]) -> dict[str, Any]:
        domain, messages = task["domain"], task["messages"]
        out = []
        answer: dict[str, Any] = {"domain": domain, "messages": out}
        unreachable, answered = None, False
        held_back: tuple[int, str] | None = None  # why the rest are not tried, once one failed
        # Done, their outcomes not yet told (PART).  All are told before the
        # next message begins, so should the job die, the bridge knows that
        # only the message after the last one told may have been under way.
        untold: list[dict[str, Any]] = []
        for message in messages:
            if self.winding_down:
                # The one under way was let finish, so nothing the next hop
                # took is sent a second time; those not begun wait on
                # QTMSOUTQ, no try counted.
                out.append({"id": message["id"], "not_begun": True})
                continue
            if held_back is not None and not message.get("last"):
                out.append(self._message(message, "temporary", *held_back))
                untold.append(out[-1])
                continue
            self.journal.write("8B", f"8B FOQ {task['queue']}", message["id"], domain=domain)
            self.journal.flush()  # with the 88 and 82 of the message before
            for done in untold:  # told once their entries are written
                part(done["id"].encode("ascii") + b" " + json.dumps(done).encode())
            untold = []
            try:
                result, trouble, contact = await self._deliver(task, message, route, lists)
            except Exception as e:
                result = self._message(message, "temporary", 451, f"4.3.0 local error: {e}")
                trouble, contact = None, False
            out.append(result)
            untold.append(result)  # the last ones' outcomes go with the RESULT
            if contact is True:
                answered = True
            elif contact:
                unreachable = contact
            if trouble is not None and held_back is None:
                held_back = (trouble.code, f"4.4.0 not tried: the message before it to {domain}"
                             f" failed temporarily ({trouble.code} {trouble.text})")
        # Said once all are done: a message on its last try, tried after one
        # that found no server, may have found it back.
        if unreachable is not None and not answered:
            answer["unreachable"] = unreachable
        return answer

    async def _deliver(self, task: dict[str, Any], message: dict[str, Any], route: list[Any],
                       lists: dict[str, Any]) -> tuple[dict[str, Any], Any, bool | str]:
        """One message; with the failure that says the destination is in trouble, if any.

        That is when no server took part in the message's outcome (every
        hop refused or failed to greet, or the session broke or timed out)
        and every recipient waits: a server's own 4xx to a recipient
        (greylisting, a full mailbox) says nothing about the next message.
        The third item is True when a server answered (greeted), why none
        did when every hop was tried and none greeted, and False when no
        hop was tried (nothing left to send).
        """
        qid = message["id"]
        result = await client.deliver(
            self.reactor, route, _sending(message), self.queue.body_path(qid, task["queue"]),
            helo_name=self.settings.hostname, tls_policy=self.settings.smtp.tlsoutbound,
            auth=lists["auth"] or None, bind_address=lists["bind"], timeouts=self._timeouts(),
            cache=self.sessions, body_offset=message["send"].get("trace", 0))
        out = []
        for r in result.recipients:
            if r.status == client.DELIVERED:
                # Whether it went over TLS: under *OPPORTUNISTIC a next hop
                # whose STARTTLS failed takes it in the clear.
                self.journal.write("88", f"88 DLV {result.remote_ip}", qid,
                                   ip=result.remote_ip, recipient=r.address, tls=result.tls)
                self.journal.write("82", f"82 R {r.address}", qid, recipient=r.address)
            out.append({"address": r.address, "status": r.status, "code": r.code,
                        "text": r.text})
            if r.remote and result.hop is not None:
                out[-1]["mta"] = result.hop.host
        rcpts = result.recipients
        trouble = rcpts[0] if rcpts and all(
            r.status == client.TEMPORARY and not r.remote for r in rcpts) else None
        if result.hop is not None or any(a.answered for a in result.attempts):
            contact: bool | str = True
        else:
            contact = result.attempts[-1].error if result.attempts else False
        return {"id": qid, "remote_ip": result.remote_ip, "tls": result.tls,
                "dsn": result.dsn, "results": out}, trouble, contact

    async def _etrn(self, task: dict[str, Any]) -> dict[str, Any]:
        """ETRN for each node to the mail router; one 8Y per node with the reply."""
        nodes, router = task["nodes"], task["router"]
        host, port = mx.parse_hostport(router)
        try:
            route = await self.resolver.resolve_host(host, port, via=mx.VIA_MAILROUTER)
        except mx.RouteError as e:
            self.journal.write("8K", f"8K RERR {host}", domain=host, error=str(e))
            result = client.EtrnResult(tuple((n, client.Reply(e.code, (str(e),)))
                                             for n in nodes))
        else:
            lists = await self._lists()
            result = await client.etrn(
                self.reactor, list(route), nodes, helo_name=self.settings.hostname,
                tls_policy=self.settings.smtp.tlsoutbound, auth=lists["auth"] or None,
                bind_address=lists["bind"], timeouts=self._timeouts())
        out = []
        for node, reply in result.replies:
            self.journal.write("8Y", f"8Y ETRN {node} {reply.code}", node=node, router=router,
                               ip=result.remote_ip, reply=str(reply))
            out.append({"node": node, "code": reply.code, "text": reply.text})
        return {"kind": "etrn", "router": router, "remote_ip": result.remote_ip,
                "replies": out}

    def _timeouts(self) -> client.Timeouts:
        return client.Timeouts.for_reply(self.settings.smtp.clienttimeout)

    async def _lists(self) -> dict[str, Any]:
        """The *NEAR, *HOSTAUTH and *CLTBIND entries, read at most once a second.

        A kept connection carries a message in a few hundred microseconds;
        asking the directory in a thread for each one cost about as much.
        An ADDSMTPLE or RMVSMTPLE reaches the next delivery a second later
        at most.
        """
        now = self.reactor.seconds()
        if self._lists_read is None or now - self._lists_read[0] >= LISTS_FOR:
            lists = await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), self._read_lists)
            self._lists_read = (self.reactor.seconds(), lists)
        return self._lists_read[1]

    def _read_lists(self) -> dict[str, Any]:
        entries = self.directory.list_entries()
        near = [e.hostname for e in entries if e.type == "*NEAR" and e.hostname]
        auth = {e.hostname: client.Credentials(e.username, e.password)
                for e in entries if e.type == "*HOSTAUTH" and e.hostname}
        binds = [e.intnetadr for e in entries if e.type == "*CLTBIND" and e.intnetadr]
        # The first of each family: an IPv4 hop leaves from the IPv4 entry,
        # not from whatever address the kernel picks.
        bind = tuple(next((a for a in binds if (":" in a) == v6), None) or ""
                     for v6 in (False, True))
        return {"near": near, "auth": auth, "bind": tuple(a for a in bind if a) or None}

    @classmethod
    def _all(cls, task: dict[str, Any], messages: list[dict[str, Any]], status: str,
             code: int, text: str) -> dict[str, Any]:
        return {"domain": task["domain"],
                "messages": [cls._message(m, status, code, text) for m in messages]}

    @staticmethod
    def _message(message: dict[str, Any], status: str, code: int, text: str) -> dict[str, Any]:
        return {"id": message["id"], "remote_ip": None,
                "results": [{"address": a, "status": status, "code": code, "text": text}
                            for a in message["recipients"]]}


def local_host(settings: Any) -> mx.LocalHost:
    """This host as MX records name it: ``[system] hostname`` and the SMTP listener."""
    endpoint = settings.listen.smtp
    endpoints = [(endpoint.host, endpoint.port)] if endpoint is not None else []
    return mx.LocalHost([settings.hostname], endpoints)
