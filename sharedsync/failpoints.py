"""Named crash points for fault-injection tests (the gofail idea, in a few lines).

Production code calls :func:`hit` between the steps of multi-step operations. When the
environment variable ``SHAREDSYNC_FAILPOINTS`` lists a point's name (comma-separated), reaching it
kills the process with SIGKILL — no cleanup, no ``finally`` — which is exactly the crash the
recovery code must survive. Unset (always, in production) it costs one set lookup.
"""

import os
import signal

_ARMED = frozenset(p for p in os.environ.get("SHAREDSYNC_FAILPOINTS", "").split(",") if p)


def hit(name: str) -> None:
    """Die here if the failpoint ``name`` is armed."""
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
