"""What a QTMSCCLCP client job does with one task: route and deliver.

A task names a message in QTMSOUTQ and the recipients of one destination
domain.  The job reads the envelope and the body (it changes neither: the
bridge alone moves messages between queues), routes the domain by the
CHGSMTPA choices (FWDHUBSVR, FIREWALL with MAILROUTER, MX with MAILROUTER
as fallback), delivers over one connection with our own client, journals
8B, 88 and 82, and returns one outcome per recipient for the bridge.

Settings honoured: ``[smtp] nameservers hosttable mailrouter firewall
fwdhubsvr tlsoutbound``, and the *NEAR, *HOSTAUTH and *CLTBIND list entries.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, threads

from twistmail import mx
from twistmail.smtp import client


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
                                      hosttable=hosttable)

    def run(self, payload: bytes) -> defer.Deferred:
        """Deliver one task; fires with the JSON result line (never fails)."""
        task = json.loads(payload)
        d = defer.Deferred.fromCoroutine(self._run(task))
        d.addErrback(lambda f: self._all(task, "temporary", 451,
                                         f"4.3.0 local error: {f.getErrorMessage()}"))
        return d.addCallback(lambda result: json.dumps(result).encode())

    async def _run(self, task: dict[str, Any]) -> dict[str, Any]:
        qid, domain = task["id"], task["domain"]
        env, lists = await threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._read, task)
        self.journal.write("8B", f"8B FOQ {task['queue']}", qid, domain=domain)
        decision = mx.route_for(domain, self.settings.smtp, near_domains=lists["near"])
        try:
            route = await self.resolver.route_decision(decision)
        except mx.RouteError as e:
            self.journal.write("8K", f"8K RERR {domain}", qid, domain=domain, error=str(e))
            status = "permanent" if e.permanent else "temporary"
            return self._all(task, status, e.code, str(e))
        wanted = set(task["recipients"])
        envelope = client.Envelope(
            env.originator,
            [client.Recipient(r.address, r.notify, r.orcpt) for r in env.recipients
             if r.address in wanted],
            ret=env.ret, envid=env.envid)
        result = await client.deliver(
            self.reactor, list(route), envelope, self.queue.body_path(qid),
            helo_name=self.settings.hostname, tls_policy=self.settings.smtp.tlsoutbound,
            auth=lists["auth"] or None, bind_address=lists["bind"])
        out = []
        for r in result.recipients:
            if r.status == client.DELIVERED:
                self.journal.write("88", f"88 DLV {result.remote_ip}", qid,
                                   ip=result.remote_ip, recipient=r.address)
                self.journal.write("82", f"82 R {r.address}", qid, recipient=r.address)
            out.append({"address": r.address, "status": r.status, "code": r.code,
                        "text": r.text})
        return {"id": qid, "domain": domain, "remote_ip": result.remote_ip,
                "tls": result.tls, "dsn": result.dsn, "results": out}

    def _read(self, task: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        env = self.queue.load(task["queue"], task["id"])
        entries = self.directory.list_entries()
        near = [e.hostname for e in entries if e.type == "*NEAR" and e.hostname]
        auth = {e.hostname: client.Credentials(e.username, e.password)
                for e in entries if e.type == "*HOSTAUTH" and e.hostname}
        bind = next((e.intnetadr for e in entries if e.type == "*CLTBIND"), None)
        return env, {"near": near, "auth": auth, "bind": bind}

    @staticmethod
    def _all(task: dict[str, Any], status: str, code: int, text: str) -> dict[str, Any]:
        return {"id": task["id"], "domain": task["domain"], "remote_ip": None,
                "results": [{"address": a, "status": status, "code": code, "text": text}
                            for a in task["recipients"]]}
