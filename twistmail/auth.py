"""Authentication against user profiles, through ``twisted.cred``.

The checker asks the directory (Argon2id, in a worker thread, so the reactor
never waits on the hash); the realm opens the user's mailbox for a POP
session.  SMTP AUTH uses the same checker with its own realm.
"""

from __future__ import annotations

from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import threads
from zope.interface import Interface, implementer

from twistmail.maildir import MailboxGone


class IMailboxAccess(Interface):
    """A POP session's view of one locked mailbox (a maildir MailboxSession)."""


@implementer(ICredentialsChecker)
class DirectoryChecker:
    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, reactor: Any, directory: Any) -> None:
        self.reactor = reactor
        self.directory = directory

    def requestAvatarId(self, creds: Any) -> Any:
        user = _text(creds.username)
        password = _text(creds.password)
        d = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(),
            self.directory.authenticate, user, password,
        )

        def checked(usrprf: str | None) -> str:
            if usrprf is None:
                raise error.UnauthorizedLogin("invalid user name or password")
            return usrprf

        return d.addCallback(checked)


@implementer(IRealm)
class MailboxRealm:
    def __init__(self, reactor: Any, store: Any, directory: Any) -> None:
        self.reactor = reactor
        self.store = store
        self.directory = directory

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if IMailboxAccess not in interfaces:
            raise NotImplementedError("only mailbox access is offered")
        d = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._open, _text(avatar_id)
        )
        return d.addCallback(lambda box: (IMailboxAccess, box, box.close))

    def _open(self, usrprf: str) -> Any:
        """Open the mailbox, unless DLTUSRPRF deleted the profile since its password.

        Opening makes a mailbox that is not there (a profile that never had
        mail); after the deletion's own removal it would make one for nobody.
        """
        box = self.store.open(usrprf)
        if self.directory.get_profile(usrprf) is None:
            box.close()
            self.store.discard_if_empty(usrprf)
            raise MailboxGone(usrprf)
        return box


def mailbox_portal(reactor: Any, directory: Any, store: Any) -> Portal:
    return Portal(MailboxRealm(reactor, store, directory),
                  [DirectoryChecker(reactor, directory)])


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
