"""Two /done calls at once (a module that gives up on its client timeout and calls again while the first
call still runs), and /done calls racing a SIGTERM: one flow run commits, each output once, every answer
is a 200 with the same summary or a retryable 503, never a 500.

Real processes, development providers: the sidecar freezes itself at a step of /done
(``SIDECAR_TEST_PAUSE_AT``); while it is frozen the module's next calls wait in the listen queue, so
they reach it at the very moment it goes on.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from ion_sidecar_client import SidecarClient
from testsupport.processes import SECRET, RestartableSidecar
from testsupport.restart import dev_run_pausing_at, record

FILES, EVENTS = 6, 3
pytestmark = pytest.mark.timeout(300)


def started(tmp_path: Path, sidecars: list, step: str, event_id: str) -> tuple[RestartableSidecar, SidecarClient]:
    return dev_run_pausing_at(tmp_path, sidecars, step, event_id, "corr-race", files=FILES, events=EVENTS,
                              content=lambda i: f"{i}".encode() * 1000, insight={"files": str(FILES)},
                              flags=("--transfer.concurrency=1",))


class Call(threading.Thread):
    """One GET /done with its own connection and client timeout (seconds)."""

    def __init__(self, sidecar: RestartableSidecar, timeout: float = 120):
        super().__init__(daemon=True)
        self.sidecar, self.timeout = sidecar, timeout
        self.answer: httpx.Response | Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self.answer = httpx.get(f"{self.sidecar.url}/done", headers={"secret": SECRET}, timeout=self.timeout)
        except httpx.HTTPError as exc:
            self.answer = exc


def committed(dev: Path, event_id: str) -> dict[str, int]:
    return {"events": len(list((dev / "events").glob("*.json"))),
            "metas": len(list((dev / "documents" / "eventmeta").glob("*.json"))),
            "insights": len(list((dev / "documents" / "insight").glob("*.json"))),
            "blobs": len([p for p in (dev / "blobs" / event_id).rglob("*") if p.is_file()])}


def done_flow_runs(event_id: str) -> list[dict]:
    url = os.environ["PREFECT_API_URL"].rstrip("/")
    response = httpx.post(f"{url}/flow_runs/filter", timeout=30,
                          json={"flow_runs": {"name": {"any_": [f"done-mod-{event_id}"]}}})
    response.raise_for_status()
    return response.json()


def test_a_done_retried_on_a_client_timeout_shares_the_running_flow_run(tmp_path: Path, sidecars: list) -> None:
    sidecar, client = started(tmp_path, sidecars, "metas", "ev-race-timeout")
    first = Call(sidecar, timeout=2)  # the module's client gives up after 2 s ...
    sidecar.wait_paused()
    first.join(30)
    assert isinstance(first.answer, httpx.ReadTimeout), first.answer  # the fault: it timed out, connection closed
    retries = [Call(sidecar) for _ in range(3)]  # ... and calls again (three times, at once)
    time.sleep(0.5)
    os.kill(sidecar.proc.pid, signal.SIGCONT)
    for call in retries:
        call.join(60)
    answers = [call.answer for call in retries]
    assert all(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers), \
        [a if isinstance(a, Exception) else (a.status_code, a.text) for a in answers]
    summaries = [a.json() for a in answers]
    assert all(s == summaries[0] for s in summaries)
    assert committed(tmp_path / ".dev", "ev-race-timeout") == {"events": EVENTS, "metas": EVENTS, "insights": 1,
                                                               "blobs": FILES}
    runs = done_flow_runs("ev-race-timeout")
    assert [r["id"] for r in runs] == [summaries[0]["flowRunId"]], [(r["id"], r["state_type"]) for r in runs]
    assert runs[0]["state_type"] == "COMPLETED"
    assert client.done(retry_seconds=0) == summaries[0]
    assert sidecar.stop() == 0


@pytest.mark.parametrize("step", ["uploaded", "published"])
def test_done_calls_racing_a_sigterm_are_answered_503_and_the_successor_commits_once(
        tmp_path: Path, sidecars: list, step: str) -> None:
    event_id = f"ev-race-term-{step}"
    sidecar, client = started(tmp_path, sidecars, step, event_id)
    first = Call(sidecar)
    sidecar.wait_paused()
    others = [Call(sidecar) for _ in range(2)]  # waiting in the listen queue
    time.sleep(0.5)
    os.kill(sidecar.proc.pid, signal.SIGTERM)  # delivered the moment it goes on, with the calls
    os.kill(sidecar.proc.pid, signal.SIGCONT)
    assert sidecar.proc.wait(60) == 0, sidecar.output()[-3000:]
    for call in [first, *others]:
        call.join(60)
    for call in [first, *others]:
        answer = call.answer
        # Answered 503 JSON, or (queued calls) the connection closed by the stopping server: never a 500.
        if isinstance(answer, httpx.Response):
            assert answer.status_code == 503 and answer.json()["statusCode"] == 503, answer.text
        else:
            assert isinstance(answer, httpx.TransportError), answer
    assert isinstance(first.answer, httpx.Response), first.answer
    print(f"\nSIGTERM at {step}: " + ", ".join(f"{c.answer.status_code}" if isinstance(c.answer, httpx.Response)
                                              else type(c.answer).__name__ for c in [first, *others]))
    kept = record(sidecar)
    assert kept["phase"] == "ready" and not kept["closed"], kept
    events_before = {p.name: p.stat().st_ino for p in (tmp_path / ".dev" / "events").glob("*.json")} \
        if (tmp_path / ".dev" / "events").exists() else {}

    sidecar.start()
    sidecar.wait_healthy()
    resumed = [Call(sidecar) for _ in range(2)]  # the module's retries, at once
    for call in resumed:
        call.join(60)
    assert all(isinstance(c.answer, httpx.Response) and c.answer.status_code == 200 for c in resumed), \
        [c.answer if isinstance(c.answer, Exception) else c.answer.text for c in resumed]
    assert resumed[0].answer.json() == resumed[1].answer.json()
    assert committed(tmp_path / ".dev", event_id) == {"events": EVENTS, "metas": EVENTS, "insights": 1, "blobs": FILES}
    events_after = {p.name: p.stat().st_ino for p in (tmp_path / ".dev" / "events").glob("*.json")}
    assert all(events_after[name] == ino for name, ino in events_before.items())  # none published again
    assert not [r for r in done_flow_runs(event_id) if r["state_type"] in ("RUNNING", "PENDING")]
    assert sidecar.stop() == 0
