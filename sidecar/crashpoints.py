"""Named points in a run where a crash test can freeze the sidecar (test-only; off unless set).

``SIDECAR_TEST_PAUSE_AT=NAME`` (or ``NAME#N``, the N-th time that point is reached) makes the process
stop itself with SIGSTOP at that point, so a test can look at the data plane while the process is
frozen and then SIGKILL it exactly there (``tests/restart``). The points, in the order ``/done``
passes them: ``uploaded-file`` (after each blob), ``uploaded`` (every blob), ``metas`` (insight and
event metas stored), ``accepted`` (the event bus accepted a batch, before its ids are recorded),
``published`` (every event published and recorded).
"""

from __future__ import annotations

import collections
import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "SIDECAR_TEST_PAUSE_AT"
_counts: collections.Counter[str] = collections.Counter()


def reached(name: str) -> None:
    """Count a pass through point ``name``; stop the process here if ``SIDECAR_TEST_PAUSE_AT`` asks."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _counts[name] += 1
    target, _, nth = spec.partition("#")
    if target == name and _counts[name] == int(nth or 1):
        log.warning("pausing at %s (pass %d) for a test (%s)", name, _counts[name], ENV)
        os.kill(os.getpid(), signal.SIGSTOP)
