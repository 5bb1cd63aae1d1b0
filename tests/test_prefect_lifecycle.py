"""Without PREFECT_API_URL, every sidecar started in one working directory shares one supervised
Prefect server (``sidecar/devserver.py``): started once however many sidecars race to start it, its
UI at a URL each sidecar prints, restarted when it dies, stopped after the last sidecar has gone
(SIGKILLed ones included), never orphaned. Real processes throughout."""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import psutil

from sidecar import devserver
from testsupport.processes import SidecarProcess, dev_args


def _supervisors(state_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "sidecar.devserver" in cmdline and str(state_dir) in cmdline:
            found.append(proc)
    return found


def _wait_status(sidecar: SidecarProcess, status: int, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{sidecar.url}/healthz", timeout=5)
        if response.status_code == status:
            return response
        time.sleep(0.1)
    raise AssertionError(f"/healthz never answered {status}; last {response.status_code} {response.text}")


@contextmanager
def _health_watched(sidecar: SidecarProcess) -> Iterator[list[httpx.Response]]:
    """Poll ``sidecar``'s /healthz every 0.1 s from before a fault on, so a short 503 window is seen even
    while the test itself waits for processes to exit; yields the answers so far."""
    seen: list[httpx.Response] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                seen.append(httpx.get(f"{sidecar.url}/healthz", timeout=5))
            except httpx.HTTPError:
                pass
            stop.wait(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        yield seen
    finally:
        stop.set()
        poller.join(10)


def _first(seen: list[httpx.Response], status: int, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for response in list(seen):
            if response.status_code == status:
                return response
        time.sleep(0.1)
    raise AssertionError(f"/healthz never answered {status}: {[r.status_code for r in seen][-20:]}")


def test_one_supervised_dev_server_per_working_directory(tmp_path: Path) -> None:
    env = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "home")}
    state_dir = tmp_path / ".dev" / "prefect"
    # Three sidecars started at the same moment in one working directory (parent, child, another).
    sidecars = [SidecarProcess(tmp_path, dev_args(f"evt-{i}", "corr-life", f"mod{i}"), env=env) for i in range(3)]
    try:
        for sidecar in sidecars:
            sidecar.wait_healthy(timeout=180)
        info = json.loads((state_dir / "server.json").read_text())
        for sidecar in sidecars:
            assert f"Prefect UI: {info['ui']}" in sidecar.output()
        # One supervisor, one server, one database; no migration raced another.
        supervisors = _supervisors(state_dir)
        assert len(supervisors) == 1, [p.cmdline() for p in supervisors]
        server = psutil.Process(int((state_dir / "server.pid").read_text()))
        assert server.ppid() == supervisors[0].pid
        assert (state_dir / "prefect.db").exists()
        log = (state_dir / "server.log").read_text()
        assert "Application startup failed" not in log and "duplicate column" not in log, log
        # The UI is served at the printed URL.
        assert "<html" in httpx.get(info["ui"], timeout=10).text.lower()

        assert sidecars[0].get("/ready").status_code == 200

        # The server dies: health says so, the supervisor restarts it on the same port, calls work.
        with _health_watched(sidecars[1]) as seen:
            server.kill()
            server.wait(10)
            down = _first(seen, 503, 15)
        assert "Prefect API unavailable" in down.json()["message"]
        _wait_status(sidecars[1], 200, 120)
        assert json.loads((state_dir / "server.json").read_text())["url"] == info["url"]
        assert int((state_dir / "server.pid").read_text()) != server.pid
        assert sidecars[1].get("/ready").status_code == 200

        # The supervisor itself is killed: its server goes with it, and the sidecars start a new one.
        server = psutil.Process(int((state_dir / "server.pid").read_text()))
        with _health_watched(sidecars[2]) as seen:
            supervisors[0].kill()
            psutil.wait_procs([supervisors[0], server], timeout=10)
            assert not server.is_running(), "the server outlived its supervisor"
            _first(seen, 503, 15)
        _wait_status(sidecars[2], 200, 180)
        supervisors = _supervisors(state_dir)
        assert len(supervisors) == 1, [p.cmdline() for p in supervisors]
        assert sidecars[2].get("/ready").status_code == 200
        restarted = psutil.Process(int((state_dir / "server.pid").read_text()))

        # One sidecar is SIGKILLed, the others stop normally: the server outlives none of them.
        sidecars[0].proc.send_signal(signal.SIGKILL)
        sidecars[0].proc.wait(10)
        time.sleep(devserver.LINGER_SECONDS + 2)
        assert restarted.is_running(), "the server stopped while two sidecars still used it"
        for sidecar in sidecars[1:]:
            assert sidecar.stop() == 0 or sidecar.proc.returncode is not None
        gone, alive = psutil.wait_procs([restarted, *supervisors], timeout=devserver.LINGER_SECONDS + 30)
        assert not alive, f"orphaned: {[p.cmdline() for p in alive]}"
        assert not (state_dir / "server.json").exists()
        # The next supervisor of this directory takes the same port: the UI's address does not move.
        assert devserver.Supervisor(state_dir)._previous_port() == info["port"]
    finally:
        for sidecar in sidecars:
            sidecar.stop()


def test_require_prefect_api_refuses_the_fallback(tmp_path: Path) -> None:
    env = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "home")}
    sidecar = SidecarProcess(tmp_path, [*dev_args("evt-r", "corr-r", "mod"), "--requireprefectapi=true"], env=env)
    assert sidecar.proc.wait(60) == 2
    out = sidecar.output()
    assert "PREFECT_API_URL is not set" in out and "--requireprefectapi" in out
    assert not (tmp_path / ".dev" / "prefect" / "server.json").exists()
    sidecar.stop()


def test_flow_runs_use_the_shared_clients_whose_idle_connections_expire_before_the_servers() -> None:
    """The engine's get_client() inside a call hands out the sidecar's shared clients (a context made
    with httpx settings was passed over and a new client made per call: 0.4 s more CPU per call of
    1000 files), and their idle connections expire before the Prefect server closes them (else a
    request sent as the server closed its connection waited 2 s for Prefect's client retry)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_API_KEEPALIVE_TIMEOUT, temporary_settings

    from sidecar.orchestration import PrefectApi

    async def check() -> None:
        api = PrefectApi(timeout=1)
        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # nothing is requested
            shared_async, shared_sync = await api._shared_clients()
            try:
                tokens = [(type(ctx).__var__, type(ctx).__var__.set(ctx)) for ctx in (shared_async, shared_sync)]
                try:
                    assert get_client() is shared_async.client
                    assert get_client(sync_client=True) is shared_sync.client
                finally:
                    for var, token in reversed(tokens):
                        var.reset(token)
                for client in (shared_async.client, shared_sync.client):
                    pool = client._client._transport._pool  # httpx's connection pool (httpcore)
                    assert pool._keepalive_expiry < PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value()
            finally:
                await api._close_clients()

    asyncio.run(check())


def test_a_fresh_sidecars_first_call_makes_no_prefect_start_up_requests(tmp_path: Path) -> None:
    """What Prefect's first flow run of a process would set up is done before /healthz answers 200: the
    event worker's server version check (its clients took about 100 ms of CPU from a child's first
    /ready) and the shared client's CSRF token, so the first call's requests are the flow run's own.
    Every httpx request of the sidecar is logged by ``testsupport/httplog`` (a real process and server)."""
    from testsupport.processes import ROOT

    log = tmp_path / "http.log"
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'testsupport' / 'httplog'}", "SIDECAR_TEST_HTTP_LOG": str(log)}
    sidecar = SidecarProcess(tmp_path, dev_args("evt-warm", "corr-warm", "mod"), env=env)
    try:
        sidecar.wait_healthy(120)
        deadline = time.monotonic() + 30
        while "GET /api/admin/version" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        before = log.read_text().splitlines()
        assert any(line.endswith("GET /api/admin/version") for line in before), before
        assert any(line.startswith("MainThread ") and line.endswith("GET /api/csrf-token") for line in before), before
        assert sidecar.get("/ready").status_code == 200, sidecar.output()
        during = log.read_text().splitlines()[len(before):]
        assert any(line.endswith("POST /api/flow_runs/") for line in during), during  # the log works
        assert not [line for line in during if line.endswith("GET /api/admin/version")], during
        assert not [line for line in during if line.startswith("MainThread ") and line.endswith("/csrf-token")], during
    finally:
        sidecar.stop()
