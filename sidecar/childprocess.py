"""Child processes that do not outlive the process that started them.

Linux's ``prctl(PR_SET_PDEATHSIG)`` (``man 2 PR_SET_PDEATHSIG``) makes the kernel signal a child when
its parent dies, SIGKILL included, so a server or module run a process started is never left running
as an orphan. Used by the development server's supervisor (its Prefect server), the offline dispatcher
(each module run's sidecar and module) and the tests' services.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def dies_with_parent(sig: int = signal.SIGKILL, then: Callable[[], None] | None = None) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` (or ``asyncio.create_subprocess_exec``): the child gets
    ``sig`` when its parent dies. It survives ``exec`` and is set after ``Popen``'s ``user=`` change
    (which would clear it); a child of that child is not covered, so services are started in the
    foreground (no daemonising). ``then``: another ``preexec_fn`` to run after.

    The signal comes when the *thread* that started the child ends, so it is set only from the main
    thread (elsewhere: ``then`` alone). Returns ``then`` unchanged on other systems.

    Raises (in the child, failing the start): OSError when ``prctl`` refuses.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return then
    parent = os.getpid()

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl: nothing will signal this child
            os.kill(os.getpid(), sig)
        if then is not None:
            then()

    return arm
