"""A document store that trickles its connection handshake (the ``hello`` reply, which carries pymongo's
speculative authentication) a byte every 0.3 s: each gap is under every read timeout, so only the
call's total deadline can end it. A sidecar whose client connects for the first time inside /ready
answers 503 naming the document store within its deadline, and /ready succeeds once the fault is lifted.
Real nx-27017 behind the fault proxy, the sidecar's app in this process (``tests/production/test_slow_peers.py``
covers replies to commands on connections already open)."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from sidecar.api import create_app
from testsupport.stack import Stack
from tests.production.test_slow_peers import DOCS_DEADLINE, GAP, H, SLACK, runtime_for


def test_trickled_handshake_is_503_within_the_deadline_then_ready(tmp_path: Path, stack: Stack) -> None:
    runtime = runtime_for(stack, tmp_path, "handshake-drip", "mod")
    proxy = stack.docs_proxy
    with TestClient(create_app(runtime)) as client:
        proxy.drip(when=rb"(?i)hello|ismaster", after=0, interval=GAP)
        before = proxy.drips
        started = time.monotonic()
        answer = client.get("/ready", headers=H)
        seconds = time.monotonic() - started
        proxy.up()
        assert proxy.drips > before and proxy.dripped > 0, "the handshake was never slowed"
        assert answer.status_code == 503 and "document store" in answer.json()["message"], answer.text
        assert seconds <= DOCS_DEADLINE + SLACK, seconds
        again = client.get("/ready", headers=H)
        assert again.status_code == 200, again.text
