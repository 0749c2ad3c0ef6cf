"""A client job's answer for a task: whether the destination answered at all.

The bridge holds back the other mail of a destination only when no server
of it answered (see ``twistmail.bridge.outbound``); a server that greets,
even with 421, is up.  Real loopback servers, the job's own code.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from appliance import base_sections, render_toml
from test_smtp_client import Behaviour, Sink, closed_port
from twisted.internet import reactor
from twisted.trial import unittest

from twistmail import config as configmod
from twistmail.bridge.outbound import _sending
from twistmail.directory import SqliteDirectory
from twistmail.interfaces import QTMSOUTQ
from twistmail.journal import Journal
from twistmail.queue import Envelope, FileQueue, Recipient
from twistmail.smtp.delivery import Deliverer


class AnswerTests(unittest.TestCase):
    def deliverer(self, port: int) -> Deliverer:
        root = Path(tempfile.mkdtemp(prefix="twistmail-delivery-"))
        self.addCleanup(shutil.rmtree, root, True)
        sections = base_sections(root / "var")
        sections["smtp"] = {"mailrouter": f"127.0.0.1:{port}", "firewall": "*YES"}
        (root / "twistmail.toml").write_text(render_toml(sections))
        settings = configmod.load(root / "twistmail.toml")
        self.queue = FileQueue.for_settings(settings)
        d = Deliverer(reactor, settings, self.queue, SqliteDirectory.from_settings(settings),
                      Journal.from_settings(settings, "QTSMTPCLTP/1"))
        self.addCleanup(d.resolver.close)
        self.addCleanup(d.sessions.close_all)
        return d

    def task(self, count: int, last: tuple[int, ...] = ()) -> bytes:
        messages = []
        for i in range(count):
            env = Envelope.new("jane@example.test", ()).with_recipients(
                [Recipient(f"r{i}@remote.test")])
            with self.queue.new_spool(env) as spool:
                spool.write(b"Subject: hi\r\n\r\nhello\r\n")
                qid = spool.commit(QTMSOUTQ)
            rcpts = [f"r{i}@remote.test"]
            messages.append({"id": qid, "recipients": rcpts, "send": _sending(env, rcpts),
                             "last": i in last})
        return json.dumps({"queue": QTMSOUTQ, "domain": "remote.test",
                           "messages": messages}).encode()

    async def answer(self, port: int, count: int = 2, last: tuple[int, ...] = ()
                     ) -> dict[str, Any]:
        d = self.deliverer(port)
        return json.loads(await d.run(self.task(count, last)))

    async def test_a_refused_connection_is_unreachable(self) -> None:
        answer = await self.answer(closed_port())
        self.assertIn("Cannot connect", answer["unreachable"])
        texts = [m["results"][0]["text"] for m in answer["messages"]]
        self.assertIn("not tried", texts[1])

    async def test_a_message_on_its_last_try_is_tried_after_one_that_failed(self) -> None:
        """It was returned, its retries used up, without a single try."""
        answer = await self.answer(closed_port(), count=4, last=(2,))
        texts = [m["results"][0]["text"] for m in answer["messages"]]
        self.assertEqual(["not tried" in t for t in texts], [False, True, False, True])
        self.assertIn("Cannot connect", texts[2])

    async def test_every_outcome_is_told_before_the_next_message_begins(self) -> None:
        """The bridge reads from the parts told which message a killed job had
        under way: the one after the last told.  Those held back behind a
        failure are told too, before the one on its last try begins."""
        d = self.deliverer(closed_port())
        task = self.task(4, last=(3,))
        ids = [m["id"] for m in json.loads(task)["messages"]]
        told: list[str] = []
        begun: list[tuple[str, list[str]]] = []
        real = d._deliver

        async def deliver(task, message, route, lists):
            begun.append((message["id"], list(told)))
            return await real(task, message, route, lists)

        d._deliver = deliver
        answer = json.loads(await d.run(task, lambda line: told.append(line.split()[0].decode())))
        self.assertEqual(begun, [(ids[0], []), (ids[3], ids[:3])])
        self.assertEqual(told, ids[:3])  # the last one's outcome goes with the answer
        self.assertEqual(len(answer["messages"]), 4)

    async def test_a_server_found_back_by_a_last_try_clears_the_doubt(self) -> None:
        """The first message found no server and the one on its last try, tried
        after it, was delivered: the answer said the destination unreachable,
        and the bridge held back its other mail as if no server answered."""
        d = self.deliverer(closed_port())
        script = iter([("Cannot connect to mx", True), (True, False)])

        async def deliver(task, message, route, lists):
            contact, failed = next(script)
            trouble = SimpleNamespace(code=451, text="4.4.1 refused") if failed else None
            status = "temporary" if failed else "delivered"
            return d._message(message, status, 451 if failed else 250, "x"), trouble, contact

        d._deliver = deliver
        answer = json.loads(await d.run(self.task(2, last=(1,))))
        self.assertNotIn("unreachable", answer)
        self.assertEqual([m["results"][0]["status"] for m in answer["messages"]],
                         ["temporary", "delivered"])

    async def test_a_server_that_greets_with_421_is_up(self) -> None:
        sink = Sink(Behaviour(greeting="421 4.7.0 too many connections"))
        self.addCleanup(sink.stop)
        answer = await self.answer(sink.port)
        self.assertNotIn("unreachable", answer)
        self.assertEqual({m["results"][0]["status"] for m in answer["messages"]},
                         {"temporary"})

    async def test_a_delivered_task_is_not_unreachable(self) -> None:
        sink = Sink()
        self.addCleanup(sink.stop)
        answer = await self.answer(sink.port)
        self.assertNotIn("unreachable", answer)
        self.assertEqual(len(sink.messages), 2)

    async def test_each_delivery_journals_whether_it_went_over_tls(self) -> None:
        """Under *OPPORTUNISTIC a next hop whose STARTTLS fails takes the mail in
        the clear, and only a log line without the message's id said so."""
        from twistmail.journal import read_entries

        for offered in (True, False):
            sink = Sink(Behaviour(tls=offered))
            self.addCleanup(sink.stop)
            d = self.deliverer(sink.port)
            await d.run(self.task(1))
            d.journal.flush()
            [entry] = list(read_entries(d.journal.directory, ["88"]))
            self.assertIs(entry["tls"], offered)
