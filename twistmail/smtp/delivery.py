"""What a QTMSCCLCP client job does with one task: route and deliver.

A task names a message in QTMSOUTQ and the recipients of one destination
domain, with what goes on MAIL and RCPT for them (the bridge read the
envelope already).  The job reads the body (it changes nothing: the
bridge alone moves messages between queues), routes the domain by the
CHGSMTPA choices (FWDHUBSVR, FIREWALL with MAILROUTER, MX with MAILROUTER
as fallback), delivers over one connection with our own client, journals
8B, 88 and 82, and returns one outcome per recipient for the bridge.
An MX that is this host itself is never used (``mx.LocalHost``).

An ``etrn`` task (the scheduled mail transfer with ETRNCLT) names the mail
router and our domains instead: the job connects to the router, issues
``ETRN domain`` for each (RFC 1985) and journals each reply (8Y).

Settings honoured: ``[smtp] nameservers hosttable mailrouter firewall
fwdhubsvr tlsoutbound clienttimeout``, ``[system] hostname``, ``[listen]
smtp``, and the *NEAR, *HOSTAUTH and *CLTBIND list entries.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, threads

from twistmail import mx
from twistmail.smtp import client

LISTS_FOR = 1.0  # seconds a reading of the SMTP list entries is used


def _sending(task: dict[str, Any]) -> client.Envelope | None:
    """MAIL and RCPT as the bridge put them in the task (see outbound._sending)."""
    send = task.get("send")
    if send is None:
        return None
    return client.Envelope(
        send["originator"],
        [client.Recipient(address, tuple(notify) if notify else None, orcpt)
         for address, notify, orcpt in send["recipients"]],
        ret=send["ret"], envid=send["envid"])


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
        self._lists_read: tuple[float, dict[str, Any]] | None = None

    def run(self, payload: bytes) -> defer.Deferred:
        """Deliver one task; fires with the JSON result line (never fails)."""
        task = json.loads(payload)
        if task.get("kind") == "etrn":
            d = defer.Deferred.fromCoroutine(self._etrn(task))
            d.addErrback(lambda f: {"kind": "etrn", "error": f.getErrorMessage()})
            return d.addCallback(lambda result: json.dumps(result).encode())
        d = defer.Deferred.fromCoroutine(self._run(task))
        d.addErrback(lambda f: self._all(task, "temporary", 451,
                                         f"4.3.0 local error: {f.getErrorMessage()}"))
        return d.addCallback(lambda result: json.dumps(result).encode())

    async def _run(self, task: dict[str, Any]) -> dict[str, Any]:
        qid, domain = task["id"], task["domain"]
        envelope = _sending(task)
        if envelope is None:  # a task that does not carry it: read the envelope
            envelope = await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), self._read, task)
        lists = await self._lists()
        self.journal.write("8B", f"8B FOQ {task['queue']}", qid, domain=domain)
        decision = mx.route_for(domain, self.settings.smtp, near_domains=lists["near"])
        try:
            route = await self.resolver.route_decision(decision)
        except mx.RouteError as e:
            self.journal.write("8K", f"8K RERR {domain}", qid, domain=domain, error=str(e))
            status = "permanent" if e.permanent else "temporary"
            return self._all(task, status, e.code, str(e))
        result = await client.deliver(
            self.reactor, list(route), envelope, self.queue.body_path(qid),
            helo_name=self.settings.hostname, tls_policy=self.settings.smtp.tlsoutbound,
            auth=lists["auth"] or None, bind_address=lists["bind"], timeouts=self._timeouts(),
            cache=self.sessions)
        out = []
        with self.journal.batch():
            for r in result.recipients:
                if r.status == client.DELIVERED:
                    self.journal.write("88", f"88 DLV {result.remote_ip}", qid,
                                       ip=result.remote_ip, recipient=r.address)
                    self.journal.write("82", f"82 R {r.address}", qid, recipient=r.address)
                out.append({"address": r.address, "status": r.status, "code": r.code,
                            "text": r.text})
        return {"id": qid, "domain": domain, "remote_ip": result.remote_ip,
                "tls": result.tls, "dsn": result.dsn, "results": out}

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

    def _read(self, task: dict[str, Any]) -> client.Envelope:
        env = self.queue.load(task["queue"], task["id"])
        wanted = set(task["recipients"])
        return client.Envelope(
            env.originator,
            [client.Recipient(r.address, r.notify, r.orcpt) for r in env.recipients
             if r.address in wanted],
            ret=env.ret, envid=env.envid)

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
        bind = next((e.intnetadr for e in entries if e.type == "*CLTBIND"), None)
        return {"near": near, "auth": auth, "bind": bind}

    @staticmethod
    def _all(task: dict[str, Any], status: str, code: int, text: str) -> dict[str, Any]:
        return {"id": task["id"], "domain": task["domain"], "remote_ip": None,
                "results": [{"address": a, "status": status, "code": code, "text": text}
                            for a in task["recipients"]]}


def local_host(settings: Any) -> mx.LocalHost:
    """This host as MX records name it: ``[system] hostname`` and the SMTP listener."""
    endpoint = settings.listen.smtp
    endpoints = [(endpoint.host, endpoint.port)] if endpoint is not None else []
    return mx.LocalHost([settings.hostname], endpoints)
