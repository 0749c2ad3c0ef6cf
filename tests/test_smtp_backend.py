"""What an SMTP job's sessions ask of the directory, on a real directory and thread pool."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from appliance import base_sections, render_toml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial import unittest

from twistmail import config as configmod
from twistmail.directory import DirectoryEntry, ListEntry, SqliteDirectory
from twistmail.queue import FileQueue
from twistmail.smtp import backend as backendmod
from twistmail.smtp.address import Address


class Journal:
    def write(self, *args: object, **fields: object) -> None:
        pass

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        yield


def enroll_nondelivery(directory: SqliteDirectory) -> None:
    """The seed's NONDELIVERY user: an entry with that SMTP name, SAM's mailbox."""
    directory.add_entry(DirectoryEntry("NONDLV", "MAIL", "copies", user="SAM",
                                       msfsrvlvl="*SYSMS", prefadr="*SMTP",
                                       smtpuser="NONDELIVERY"))


class BackendCase(unittest.TestCase):
    """A backend on a real directory with profile SAM, and these [smtp] settings."""

    smtp: dict[str, str] = {}
    local_domains = ["example.test"]

    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="twistmail-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        config = root / "twistmail.toml"
        sections = base_sections(root / "var")
        sections["smtp"] = dict(self.smtp)
        sections["system"]["local_domains"] = self.local_domains
        config.write_text(render_toml(sections))
        settings = configmod.load(config)
        self.directory = SqliteDirectory.from_settings(settings)
        self.directory.create_profile("SAM", "secret")
        self.backend = backendmod.QueueBackend(reactor, settings, self.directory,
                                               FileQueue.for_settings(settings), Journal())


class KnownRecipientTests(BackendCase):
    smtp = {"alwrly": "*LIST"}  # relay for the *ACCEPT list only

    def check(self, local: str) -> object:
        return self.backend.check_recipient(Address(local, "example.test"), "192.0.2.7", None)

    async def test_a_local_recipient_found_is_accepted_for_a_second_without_asking(self) -> None:
        self.patch(backendmod, "KNOWN_FOR", 0.2)
        first = self.check("sam")
        self.assertIsInstance(first, Deferred)  # asked in a thread
        self.assertEqual((await first).code, 250)
        self.directory.delete_profile("SAM")
        again = self.check("sam")
        self.assertNotIsInstance(again, Deferred)  # known: answered at once
        self.assertEqual(again.code, 250)
        await deferLater(reactor, 0.3, lambda: None)
        later = self.check("sam")
        self.assertIsInstance(later, Deferred)  # asked again: the profile is gone
        self.assertEqual((await later).code, 550)

    async def test_a_clock_set_back_does_not_stretch_the_second(self) -> None:
        first = self.check("sam")
        self.assertEqual((await first).code, 250)
        self.directory.delete_profile("SAM")
        until, verdict = self.backend._known["sam@example.test"]
        # As if the clock had been set back an hour after the verdict was kept.
        self.backend._known["sam@example.test"] = (until + 3600, verdict)
        later = self.check("sam")
        self.assertIsInstance(later, Deferred)  # asked again
        self.assertEqual((await later).code, 550)

    async def test_refusals_are_never_remembered(self) -> None:
        for _ in range(2):
            verdict = self.check("joe")
            self.assertIsInstance(verdict, Deferred)
            self.assertEqual((await verdict).code, 550)
        self.directory.create_profile("JOE", "secret")
        self.assertEqual((await self.check("joe")).code, 250)  # enrolled: accepted at once

    async def test_a_relay_recipient_is_remembered_for_its_client_only(self) -> None:
        self.patch(backendmod, "KNOWN_FOR", 0.2)
        self.directory.add_list_entry(ListEntry("*ACCEPT", intnetadr="192.0.2.7",
                                                subnetmask="255.255.255.255"))
        joe = Address("joe", "remote.test")
        first = self.backend.check_recipient(joe, "192.0.2.7", None)
        self.assertIsInstance(first, Deferred)
        verdict = await first
        self.assertEqual((verdict.code, verdict.local), (250, False))
        self.directory.remove_list_entry("*ACCEPT", intnetadr="192.0.2.7")
        again = self.backend.check_recipient(joe, "192.0.2.7", None)
        self.assertNotIsInstance(again, Deferred)  # the same client: answered at once
        self.assertEqual((again.code, again.local), (250, False))
        other = self.backend.check_recipient(joe, "192.0.2.8", None)
        self.assertIsInstance(other, Deferred)  # another client is judged on its own
        self.assertEqual((await other).code, 550)
        await deferLater(reactor, 0.3, lambda: None)
        later = self.backend.check_recipient(joe, "192.0.2.7", None)
        self.assertIsInstance(later, Deferred)  # asked again: no longer on the list
        self.assertEqual((await later).code, 550)


class PostmasterTests(BackendCase):
    def setUp(self) -> None:
        super().setUp()
        enroll_nondelivery(self.directory)  # the postmaster's stand-in

    async def test_bare_postmaster_is_the_first_local_domain_s_and_delivered_there(self) -> None:
        """RFC 5321 §4.5.1: <postmaster> must be accepted, and must reach someone."""
        verdict = await self.backend.check_recipient(Address("postmaster", ""), "192.0.2.7",
                                                     None)
        self.assertEqual((verdict.code, verdict.route), (250, "postmaster@example.test"))

    async def test_postmaster_and_mailer_daemon_of_the_host_name_are_the_postmaster(self) -> None:
        """Notices come from MAILER-DAEMON@<hostname> and name its postmaster; both
        were refused as relay when the host name is no local domain."""
        self.assertEqual(self.backend.hostname, "mail.example.test")
        for local in ("Postmaster", "MAILER-DAEMON"):
            verdict = await self.backend.check_recipient(
                Address(local, "MAIL.example.test"), "192.0.2.7", None)
            self.assertEqual((verdict.code, verdict.local, verdict.route),
                             (250, True, "postmaster@example.test"))
        other = await self.backend.check_recipient(Address("sam", "mail.example.test"),
                                                   "192.0.2.7", None)
        self.assertEqual(other.code, 550)

    async def test_a_literal_of_the_address_reached_is_the_first_local_domain(self) -> None:
        """RFC 1123 §5.2.17: a server recognises a literal of its own address;
        these were refused as relay.  Only the address the client reached
        counts, so that no client can map the host's other addresses."""
        for server_ip, domains in (("127.0.0.1", ("[127.0.0.1]",)),
                                   ("::1", ("[IPv6:::1]", "[IPv6:0:0:0:0:0:0:0:1]"))):
            for domain in domains:
                for local, route in (("postmaster", "postmaster@example.test"),
                                     ("Sam", "Sam@example.test")):
                    verdict = await self.backend.check_recipient(
                        Address(local, domain), "192.0.2.7", None, server_ip)
                    self.assertEqual((verdict.code, verdict.local, verdict.route),
                                     (250, True, route), (local, domain))
        unknown = await self.backend.check_recipient(Address("nobody", "[127.0.0.1]"),
                                                     "192.0.2.7", None, "127.0.0.1")
        self.assertEqual(unknown.code, 550)
        for domain, server_ip in (("[127.0.0.2]", "127.0.0.1"), ("[255.255.255.255]", "127.0.0.1"),
                                  ("[IPv6:127.0.0.1]", "127.0.0.1"), ("[127.0.0.1]", None)):
            verdict = await self.backend.check_recipient(Address("sam", domain),
                                                         "192.0.2.7", None, server_ip)
            self.assertEqual((verdict.code, verdict.text[:5]), (550, "5.7.1"), domain)

class SenderTests(BackendCase):
    smtp = {"vfyfromusr": "*YES"}

    async def test_vfyfromusr_is_not_fooled_by_the_catch_all(self) -> None:
        """*ANY *ANY takes mail for any local name; it names no sender."""
        from twistmail.directory import DirectoryEntry

        self.directory.add_entry(DirectoryEntry("*ANY", "*ANY", "catch-all", user="SAM",
                                                msfsrvlvl="*SYSMS"))
        invented = await self.backend.check_sender(Address("invented", "example.test"),
                                                   "192.0.2.7", None)
        self.assertEqual(invented.code, 553)
        self.assertIsNone(await self.backend.check_sender(Address("sam", "example.test"),
                                                          "192.0.2.7", None))


class SignOnTests(BackendCase):
    def test_an_address_signs_on_as_its_profile_but_not_through_the_catch_all(self) -> None:
        """*ANY *ANY takes mail for any local name; a made-up address with the
        catch-all owner's password signed on as that owner."""
        from twistmail.directory import DirectoryEntry

        self.directory.add_entry(DirectoryEntry("*ANY", "*ANY", "catch-all", user="SAM",
                                                msfsrvlvl="*SYSMS"))
        self.assertEqual(self.backend._authenticate("sam@example.test", "secret", "ip"), "SAM")
        self.assertIsNone(self.backend._authenticate("invented@example.test", "secret", "ip"))

    def test_an_address_of_nobody_costs_a_hash_like_any_other(self) -> None:
        """Without one, AUTH answered an unknown address 40 ms sooner: a way to find users."""
        from unittest import mock

        with mock.patch.object(self.directory, "authenticate",
                               wraps=self.directory.authenticate) as checked:
            self.assertIsNone(self.backend._authenticate("nobody@example.test", "x", "ip"))
            self.assertIsNone(self.backend._authenticate("x@remote.test", "x", "ip"))
        self.assertEqual(checked.call_count, 2)

    def test_a_profile_signs_on_while_it_exists_and_is_enabled(self) -> None:
        self.assertTrue(self.directory.signs_on("SAM"))
        self.directory.change_profile("SAM", status="*DISABLED")
        self.assertFalse(self.directory.signs_on("SAM"))
        self.directory.change_profile("SAM", status="*ENABLED")
        self.directory.delete_profile("SAM")
        self.assertFalse(self.directory.signs_on("SAM"))

    def test_an_authorization_identity_must_name_the_user_signing_on(self) -> None:
        """RFC 4616.  The user's own name or address, in any case, is no other
        identity: refusing it locked whole addresses out (MAXAUTHFAIL)."""
        sign_on = self.backend._authenticate
        for user, authzid in (("SAM", "sam@example.test"), ("sam", "Sam@Example.Test"),
                              ("sam@example.test", "SAM"), ("sam", "")):
            self.assertEqual(sign_on(user, "secret", "ip", authzid), "SAM", (user, authzid))
        self.directory.create_profile("BOB", "other")
        self.assertIsNone(sign_on("sam", "secret", "ip", "bob"))
        self.assertIsNone(sign_on("sam", "secret", "ip", "bob@example.test"))


class PostmasterWithoutStandInTests(BackendCase):
    """No POSTMASTER entry, no NFYDLVRY, no NONDELIVERY user: nobody reads it."""

    async def test_postmaster_mail_nobody_would_read_is_refused_not_bounced(self) -> None:
        """Taken, it went back to its sender as a notice: anyone could make the
        server mail 64 KiB of their own headers to any address."""
        journal = []
        self.backend.journal.write = lambda *a, **f: journal.append((a, f))
        for address in (Address("postmaster", ""), Address("postmaster", "example.test")):
            verdict = await self.backend.check_recipient(address, "192.0.2.7", None)
            self.assertEqual(verdict.code, 550, address)
            self.assertIn("5.1.1", verdict.text)
            self.assertIn("no mailbox is enrolled for the postmaster", verdict.text)
        self.assertEqual([a[0] for a, _ in journal], ["9W", "9W"])
        enroll_nondelivery(self.directory)
        verdict = await self.backend.check_recipient(Address("postmaster", "example.test"),
                                                     "192.0.2.7", None)
        self.assertEqual(verdict.code, 250)


class PostmasterOfEveryLocalDomainTests(BackendCase):
    local_domains = ["example.test", "Second.Test"]

    async def test_the_first_domain_s_postmaster_takes_the_others_mail(self) -> None:
        """RFC 5321 §4.5.1: each domain served has a postmaster.  With one entry
        for postmaster@example.test, postmaster@second.test was refused 5.1.1
        "no mailbox is enrolled for the postmaster"."""
        for address in (Address("postmaster", "second.test"),
                        Address("PostMaster", "SECOND.test")):
            verdict = await self.backend.check_recipient(address, "192.0.2.7", None)
            self.assertEqual(verdict.code, 550, address)
        self.directory.add_entry(DirectoryEntry("POSTMSTR", "MAIL", "Postmaster", user="SAM",
                                                msfsrvlvl="*SYSMS", prefadr="*SMTP",
                                                smtpuser="postmaster"))
        for address in (Address("postmaster", "second.test"),
                        Address("PostMaster", "SECOND.test")):
            verdict = await self.backend.check_recipient(address, "192.0.2.7", None)
            self.assertEqual(verdict.code, 250, address)


class PostmasterToTheResponsiblePersonTests(BackendCase):
    smtp = {"nfydlvry": "sam@example.test"}

    async def test_the_nfydlvry_person_stands_in_for_the_postmaster(self) -> None:
        verdict = await self.backend.check_recipient(Address("postmaster", "example.test"),
                                                     "192.0.2.7", None)
        self.assertEqual(verdict.code, 250)


class PercentRoutingTests(BackendCase):
    smtp = {"pctrtgchr": "*YES", "alwrly": "*ALL"}

    async def test_a_percent_route_to_a_local_domain_is_local_mail(self) -> None:
        """PCTRTGCHR forwards user%host@local to user@host; with host local that
        is local delivery.  It was judged a relay: refused under ALWRLY *NONE,
        sent to the hub, or returned, by settings unrelated to it."""
        verdict = await self.backend.check_recipient(
            Address("sam%example.test", "example.test"), "192.0.2.7", None)
        self.assertEqual((verdict.code, verdict.local, verdict.route),
                         (250, True, "sam@example.test"))
        unknown = await self.backend.check_recipient(
            Address("nobody%example.test", "example.test"), "192.0.2.7", None)
        self.assertEqual(unknown.code, 550)
        twice = await self.backend.check_recipient(
            Address("x%remote.test%example.test", "example.test"), "192.0.2.7", None)
        self.assertEqual((twice.code, twice.local, twice.route),
                         (250, False, "x@remote.test"))


class PercentRoutingWithoutRelayTests(BackendCase):
    smtp = {"pctrtgchr": "*YES", "alwrly": "*NONE"}

    async def test_a_local_percent_route_needs_no_relay_right(self) -> None:
        verdict = await self.backend.check_recipient(
            Address("sam%example.test", "example.test"), "192.0.2.7", None)
        self.assertEqual((verdict.code, verdict.local), (250, True))
        relay = await self.backend.check_recipient(
            Address("x%remote.test", "example.test"), "192.0.2.7", None)
        self.assertEqual(relay.code, 550)


class CommitFailureTests(BackendCase):
    def test_a_message_journaled_as_queued_that_could_not_be_is_journaled_9w(self) -> None:
        """The entries were written just before the message shows on its queue;
        when that last step fails the client gets 451, and the journal said 97."""
        import errno
        import os

        from twistmail import queue as queuemod
        from twistmail.smtp.server import Received

        journal = []
        self.backend.journal.write = lambda *a, **f: journal.append((a[0], f))
        spool = self.backend.new_spool()
        spool.write(b"Subject: x\r\n\r\nx\r\n")

        def refused(*args: object) -> None:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(args[-1]))

        self.patch(queuemod.os, "rename", refused)
        received = Received(helo="c", client_ip="192.0.2.7", originator="jane@example.test",
                            recipients=(("sam@example.test", True),), size=0, message_id=None)
        with self.assertRaises(PermissionError):
            self.backend._commit(spool, received)
        codes = [code for code, _ in journal]
        self.assertEqual(codes[-2:], ["97", "9W"])
        self.assertEqual(journal[-1][1]["reply"], "451 4.3.0 message not queued")


class SyntaxRefusalTests(BackendCase):
    def test_a_command_refused_for_its_syntax_is_journaled_as_sent_not_as_an_address(self):
        """Its text went into the originator field: an empty MAIL read as <>,
        a refused null sender."""
        journal = []
        self.backend.journal.write = lambda *a, **f: journal.append((a, f))
        self.backend.rejected("192.0.2.7", "originator", "",
                              backendmod.Verdict(501, "5.5.4 Syntax"), argument="FROM:")
        [(args, fields)] = journal
        assert args == ("9W", "9W RJT 192.0.2.7 (syntax)")
        assert fields["argument"] == "FROM:" and "originator" not in fields
        assert fields["refused"] == "originator"
