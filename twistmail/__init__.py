"""twistmail: the IBM i e-mail subsystem on Twisted."""


class StartRefused(Exception):
    """Why the daemon cannot start, in one line for the administrator.

    An exception, not SystemExit: a daemonised twistd reports an exception
    to the process that started it, which then exits 1, while a SystemExit
    left that process waiting for ever.  The twistd plugin prints it
    without a traceback (``tap.makeService``).
    """
