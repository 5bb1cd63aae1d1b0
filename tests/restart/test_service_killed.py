"""A data-plane service process itself SIGKILLed in the middle of /done (not a proxy cut: the server is
gone, its connections reset, and it comes back on the same port and data), then started again: /done
answers 503 within its deadlines, and the module's next /done commits every blob, event meta, insight and
event exactly once. Real processes: the sidecar (``python -m sidecar``, frozen at a crash point of
``sidecar/crashpoints.py`` while the service is killed), nx-27017 and Azurite, and the AMQP peer with
duplicate detection off, so every delivery counts."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from ion_sidecar_client import SidecarClient
from sidecar.childprocess import dies_with_parent
from testsupport.processes import SECRET, wait_http
from testsupport.restart import started_and_staged
from testsupport.stack import Stack, seed_args

FILES, EVENTS = 6, 3


def write_outputs(client: SidecarClient) -> None:
    for i in range(FILES):
        client.write_file(f"d/f{i}.bin", f"{i}:".encode() * 20_000)
    for i in range(EVENTS):
        client.write_event(f"e{i}", "file_discovered", [f"d/f{i}.bin"], index=str(i))
    client.write_insight(files=str(FILES))


def kill_mongo(stack: Stack) -> None:
    os.killpg(stack.mongo.proc.pid, signal.SIGKILL)
    stack.mongo.proc.wait(10)


def start_mongo(stack: Stack) -> None:
    stack.mongo.start()


def kill_azurite(stack: Stack) -> None:
    os.killpg(stack.azurite.proc.pid, signal.SIGKILL)
    stack.azurite.proc.wait(10)


def start_azurite(stack: Stack) -> None:
    old = stack.azurite.proc
    new = subprocess.Popen(old.args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                           preexec_fn=dies_with_parent())
    object.__setattr__(stack.azurite, "proc", new)  # frozen dataclass: the fixture's teardown stops this one
    wait_http(f"{stack.azurite.endpoint}?comp=list", 60, ok=(200, 403), proc=stack.azurite.proc)


# (service killed, crash point where the sidecar is frozen while it is killed, status of that /done): killed
# after the metas and the insight are stored, the document store is not needed again and /done commits.
TRIALS = [("mongo", "uploaded-file#2", 503), ("mongo", "uploaded", 503), ("mongo", "metas", 200),
          ("azurite", "uploaded-file#2", 503)]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("service, point, status", TRIALS, ids=[f"{s}-{p}" for s, p, _ in TRIALS])
def test_service_process_killed_mid_done_then_back_commits_once(tmp_path: Path, nodedup: Stack, sidecars: list,
                                                                service: str, point: str, status: int) -> None:
    stack = nodedup
    event_id = f"killed-{service}-{point.replace('#', '')}"
    args = seed_args(stack, event_id, "corr-" + event_id, "mod") + [
        "--transfer.concurrency=1", "--transfer.retries=1", "--transfer.retrydelayseconds=0.2",
        "--mongodbdocprovider.serverselectiontimeoutseconds=3", f"--devdir={tmp_path / '.dev'}"]
    sidecar, client = started_and_staged(tmp_path, sidecars, args, point)
    write_outputs(client)
    kill, start = (kill_mongo, start_mongo) if service == "mongo" else (kill_azurite, start_azurite)
    with httpx.Client(timeout=300) as http:
        answer: dict = {}
        t = threading.Thread(target=lambda: answer.setdefault("r", http.get(f"{sidecar.url}/done",
                                                                             headers={"secret": SECRET})), daemon=True)
        t.start()
        sidecar.wait_paused()
        kill(stack)  # the fault: the service process is gone
        assert service == "mongo" and not stack.mongo.running or service == "azurite" and stack.azurite.proc.poll() is not None
        t0 = time.monotonic()
        os.kill(sidecar.proc.pid, signal.SIGCONT)
        t.join(240)
        took = time.monotonic() - t0
        try:
            r = answer.get("r")
            assert r is not None, f"/done never answered with {service} killed:\n{sidecar.output()[-3000:]}"
            assert r.status_code == status, (r.status_code, r.text)
            assert took < 120, took
        finally:
            start(stack)
        again = http.get(f"{sidecar.url}/done", headers={"secret": SECRET})
        assert again.status_code == 200, again.text
    blobs = stack.blobs(f"{event_id}/mod/")
    metas = collections.Counter(m["eventId"] for m in stack.documents() if m["parentEventId"] == event_id)
    insights = [d for d in stack.documents("_insights") if d["eventId"] == event_id]
    delivered = collections.Counter(m.message_id for m in stack.received()
                                    if m.event.context.parentEventId == event_id)
    assert len(blobs) == FILES and len(metas) == EVENTS and len(insights) == 1, (sorted(blobs), metas, insights)
    assert len(delivered) == EVENTS and sum(delivered.values()) == EVENTS, delivered
    sidecar.stop()
