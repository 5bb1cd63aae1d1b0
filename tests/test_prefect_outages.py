"""Prefect outages with real processes: a sidecar started before its Prefect server, the server killed
before /ready, between /ready and /done, and during /done. Every call answers 503 "Prefect API
unavailable" (never 500) while the API is down, the sidecar recovers without a restart, a /done whose
data plane has committed answers 200 although the API is down, and its flow run ends Completed once
the API is back. Each step asserts that its fault really happened."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from flows.history import artifact_key
from testsupport.outages import (Server, assert_unavailable, flow_run_state, wait_for_artifacts, wait_health,
                                  wait_state, write_outputs)
from testsupport.processes import SidecarProcess, dev_args

pytestmark = pytest.mark.timeout(900)


def test_sidecar_rides_out_prefect_outages(tmp_path: Path) -> None:
    server = Server(tmp_path / "prefect-home")
    server.home.mkdir()
    env = {"PREFECT_API_URL": server.url}
    wait = ["--prefectstartuptimeoutseconds=2"]
    (tmp_path / "a").mkdir()
    first = SidecarProcess(tmp_path / "a", dev_args("evt-out-a", "corr-out", "moda") + wait, env=env,
                           basedir=tmp_path / "a" / "ion")
    second = None
    try:
        # 1. The sidecar starts before its Prefect server: 503, not 500, and no restart needed later.
        assert wait_health(first, 503, 60).json()["status"] == "starting"
        assert_unavailable(first.get("/ready"))
        server.start()
        wait_health(first, 200, 120)

        # 2. The server is killed before /ready: health turns 503 within a few seconds, /ready is 503.
        server.kill()
        assert "unreachable" in wait_health(first, 503, 15).json()["message"]
        assert_unavailable(first.get("/ready"))
        server.start()
        wait_health(first, 200, 120)
        ready = first.get("/ready")
        assert ready.status_code == 200, ready.text

        # 3. Killed between /ready and /done: /done is 503 and commits nothing; later it succeeds.
        write_outputs(first.basedir, 3)
        server.kill()
        wait_health(first, 503, 15)
        assert_unavailable(first.get("/done"))
        dev = tmp_path / "a" / ".dev"
        committed = [p for d in ("blobs", "documents", "events") for p in (dev / d).rglob("*") if p.is_file()]
        assert committed == [], "a refused /done committed something"
        server.start()
        wait_health(first, 200, 120)
        done = first.get("/done")
        assert done.status_code == 200, done.text
        assert flow_run_state(server.url, done.json()["flowRunId"]) == "COMPLETED"

        # 4. Killed during /done: the data plane commits, /done answers 200 while the API is down, and
        #    the flow run ends Completed once the API is back (never left Running).
        (tmp_path / "b").mkdir()
        second = SidecarProcess(tmp_path / "b", dev_args("evt-out-b", "corr-out", "modb") + wait, env=env,
                                basedir=tmp_path / "b" / "ion")
        second.wait_healthy(300)  # a fresh process: its start-up is CPU, which a loaded machine starves
        assert second.get("/ready").status_code == 200
        write_outputs(second.basedir, 1200)
        blobs = tmp_path / "b" / ".dev" / "blobs" / "evt-out-b" / "modb" / "many"
        answer: dict = {}

        def call_done() -> None:
            answer["response"] = second.get("/done", timeout=300)
            answer["at"] = time.monotonic()
            answer["wall"] = time.time()

        caller = threading.Thread(target=call_done)
        caller.start()
        deadline = time.monotonic() + 120
        while not (blobs.exists() and any(blobs.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()
        killed_at = time.monotonic()
        stored_at_kill = len(list(blobs.iterdir()))
        assert stored_at_kill < 1200, "the kill came after the upload: the fault did not happen during /done"
        caller.join(300)
        response = answer["response"]
        assert response.status_code == 200, response.text
        assert server.proc.poll() is not None and answer["at"] > killed_at, "/done answered before the outage"
        assert len(list(blobs.iterdir())) == 1200
        assert len(response.json()["events"]) == 1
        # The commit's last step (the child event) is answered promptly, not after the Prefect client's
        # minute of retries of the run-history writes that follow it.
        published = [p for p in (tmp_path / "b" / ".dev" / "events").rglob("*") if p.is_file()]
        assert published, "no child event was published"
        late = answer["wall"] - max(p.stat().st_mtime for p in published)
        assert late < 30, f"/done answered {late:.1f} s after its commit"
        flow_run_id = response.json()["flowRunId"]
        server.start()
        wait_state(server.url, flow_run_id, "COMPLETED", 120)
        # The run history the outage kept out (report, files and events tables) is written once it is over.
        expected = {artifact_key(step, "modb", "evt-out-b") for step in ("done", "done-files", "done-events")}
        wait_for_artifacts(server.url, flow_run_id, expected, 60)
        log = second.output()
        assert "could not be reported" in log or "answering before Prefect recorded its final state" in log, log
        assert "500" not in [line.split()[-1] for line in log.splitlines() if "HTTP/1.1" in line]
    finally:
        for sidecar in (first, second):
            if sidecar is not None:
                sidecar.stop()
        server.stop()
