"""Prefect outages as the tests provoke and check them: a Prefect server that can be killed and started
again on one port, waiting for a sidecar's /healthz or a flow run's state, the answer every outage must
give (503 "Prefect API unavailable"), the run history written after it, and a module's outputs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from testsupport.processes import SidecarProcess, free_port, start_prefect_server


class Server:
    """A Prefect server (SQLite in ``home``) that can be killed and started again on one port."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc = None

    def start(self) -> None:
        self.proc, url = start_prefect_server(self.home, port=self.port)
        assert url == self.url

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def wait_health(sidecar: SidecarProcess, status: int, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(f"{sidecar.url}/healthz", timeout=5)
        except httpx.TransportError:  # not listening yet
            assert time.monotonic() < deadline and sidecar.proc.poll() is None, sidecar.output()
            time.sleep(0.1)
            continue
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, response.text
            return response
        time.sleep(0.1)


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["message"].startswith("Prefect API unavailable"), response.text


def flow_run_state(api_url: str, flow_run_id: str) -> str:
    response = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=10)
    response.raise_for_status()
    return response.json()["state"]["type"]


def wait_for_artifacts(api_url: str, flow_run_id: str, keys: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    found: set[str] = set()
    while time.monotonic() < deadline:
        response = httpx.post(f"{api_url}/artifacts/filter", timeout=10,
                              json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
        response.raise_for_status()
        found = {artifact["key"] for artifact in response.json()}
        if keys <= found:
            return
        time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id}: artifacts {sorted(keys - found)} missing (found {sorted(found)})")


def wait_state(api_url: str, flow_run_id: str, expected: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        try:
            state = flow_run_state(api_url, flow_run_id)
        except httpx.HTTPError:
            state = "unreachable"
        if state == expected:
            return
        time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} is {state}, expected {expected}")


def write_outputs(basedir: Path, files: int) -> None:
    data = basedir / "out" / "data" / "many"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (data / f"f{i:04}.bin").write_bytes(os.urandom(4096))
    events = basedir / "out" / "events"
    events.mkdir(parents=True, exist_ok=True)
    (events / "e1.json").write_text('[{"key": "eventType", "value": "file_discovered"}, '
                                     '{"key": "files", "value": "many/f0000.bin"}]')
