"""A Clock whose thread pool runs work at once, in the reactor's thread.

Code that hands disk work to ``deferToThreadPool`` then runs start to end
inside one test step, on a clock the test advances.
"""

from __future__ import annotations

from twisted.internet.task import Clock


class Inline(Clock):
    def getThreadPool(self):
        return self

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        on_result(True, f(*args, **kwargs))
