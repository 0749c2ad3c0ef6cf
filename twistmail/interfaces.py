"""The seams of the appliance: queue, mailbox store and directory.

Protocol code and the bridge reach state only through these interfaces, so a
second backend (a shared store for several nodes, PostgreSQL for the
directory) can be added without touching them.  Implementations are
synchronous and may block on disk; callers in a reactor run them in a thread
(``twisted.internet.threads.deferToThread``) — the short-lived CLI calls them
directly.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

#: Queue names, as IBM i names them, plus twistmail's side directories.
QTMSINQ = "QTMSINQ"  # inbound: the bridge resolves and delivers
QTMSOUTQ = "QTMSOUTQ"  # outbound: SMTP client jobs deliver
QTMSRTQ1 = "QTMSRTQ1"  # first-level retry
QTMSRTQ2 = "QTMSRTQ2"  # second-level retry
QTMSBSSQ = "QTMSBSSQ"  # busy storage: parked while the disk is too full
HOLD = "hold"
QUARANTINE = "quarantine"
CORRUPT = "corrupt"
QUEUES = (QTMSINQ, QTMSOUTQ, QTMSRTQ1, QTMSRTQ2, QTMSBSSQ, HOLD, QUARANTINE, CORRUPT)


class IQueue(Interface):
    """Durable message spool: one immutable body plus a small envelope per message.

    Every method that returns has made its effect durable (fsync of files and
    directories).  A move between queues is one rename of the envelope.
    """

    def new_spool(envelope=None):
        """Return a writable spool for a new message's body (``write``, ``commit``,
        ``abort``).  ``commit(queue)`` makes body and envelope durable in
        ``queue`` and returns the queue id; ``abort()`` leaves no debris.
        ``write_trace(fields)``, before any ``write``, begins the file with
        the trace fields local delivery adds (the envelope's ``trace``
        counts them).
        Without ``envelope`` the spool has a fresh id (``id``) and
        ``commit(queue, envelope)`` must name the envelope, with that id."""

    def load(queue, queue_id):
        """The envelope of a message in ``queue``; raises KeyError if absent."""

    def body_path(queue_id, queue=None):
        """Filesystem path of the message's body, unchanged until the message
        is removed (then its file may be emptied and reused for another);
        ``queue``, where the caller last saw the message, is where it is
        looked for first.  The message starts after the envelope's ``trace``
        octets of the file."""

    def body_damage(queue, envelope, body=None):
        """Why the message's body cannot be sent as it was received (gone, or
        not the size its envelope records), or None when it is whole.
        ``body``: the path ``body_path`` gave, saving a second look."""

    def list(queue):
        """Queue ids in ``queue``, oldest first."""

    def unpack(queue, queue_id):
        """Store a message as envelope file plus body file if it is one file;
        afterwards ``body_path`` stays valid until the message is removed."""

    def versions(queue):
        """Queue ids in ``queue``, oldest first, each with a value that changes
        whenever its envelope does (readers cache envelopes by it)."""

    def update(queue, envelope):
        """Durably replace the envelope of a message that stays in ``queue``."""

    def move(queue_id, source, target, envelope=None):
        """Move a message between queues (optionally with a new envelope)."""

    def remove(queue, queue_id, durable=True):
        """Delete a message whose next holder has it durably.

        ``durable=False`` when handling the message again would make no
        second copy (its deliveries are idempotent) or only the copy any
        mail system may relay twice after a crash of the machine: the removal
        may then be undone by such a crash, and is not worth a disk flush.
        A process killed at any moment never undoes it."""

    def set_aside(queue, queue_id, reason):
        """Move a message that cannot be read to ``corrupt/`` for the
        administrator; the item moved, or None if it was gone."""


class IMailboxStore(Interface):
    """Local mailboxes (Maildir)."""

    def deliver(user, delivery_id, body_path, prefix, trace=0):
        """Deliver ``prefix`` (bytes: added headers) + the body to ``user``'s mailbox.

        The body starts after the first ``trace`` octets of the file; when
        those are ``prefix`` itself the store may take the file as it is.
        ``delivery_id`` names the delivery (queue id and recipient); delivering
        the same id twice leaves one copy.  Returns the path of the message."""

    def open(user):
        """A mailbox snapshot for a POP session (listing, reading, deleting)."""


class IDirectory(Interface):
    """User profiles and the system distribution directory."""

    local_domains = Attribute("Domains delivered on this system, lower case.")

    def authenticate(usrprf, password):
        """The user profile name if the password is right and the profile enabled."""

    def signs_on(usrprf):
        """Whether the profile still exists and is enabled."""

    def resolve(address):
        """How to deliver to ``address``: a Resolution, or None when unknown."""
