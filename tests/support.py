"""Test helpers: free ports, waiting for servers, and a real ``sidecar`` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SECRET = "test-secret-Zq9"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, ok=(200,), proc: subprocess.Popen | None = None) -> httpx.Response:
    """Poll ``url`` until it answers with a status in ``ok``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code in ok:
                return response
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last})")


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python process that imports this checkout's code first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def start_prefect_server(home: Path, record_task_runs: bool = True) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` on a free loopback port with ``PREFECT_HOME=home``; returns the
    process (its own session, log in ``home/server.log``) and its API URL once ``/health`` answers.

    ``record_task_runs``: task runs reach the API as events that the task-run recorder service writes,
    so services run, except those that schedule or police runs (none exist here; they only add writes
    to SQLite). False: ``--no-services``, no task runs in the API.

    Raises:
        RuntimeError: the server did not answer within 120 s (its log in the message).
    """
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    for service in ("SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP",
                    "REPOSSESSOR", "TRIGGERS", "DB_VACUUM", "CLEANUP_RECONCILER", "EVENT_LOGGER"):
        env[f"PREFECT_SERVER_SERVICES_{service}_ENABLED"] = "false"
    port = free_port()
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen(argv + ([] if record_task_runs else ["--no-services"]), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 120, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"prefect server did not start:\n{(home / 'server.log').read_text()}") from None
    return proc, url


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a service started with ``start_new_session=True``: SIGTERM its process group, SIGKILL
    after 15 s, and wait for it (nothing if it already exited)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class SidecarProcess:
    """A ``python -m sidecar`` process in ``cwd`` with ``args`` (seed flags), on a free port.

    The module's folders are ``cwd/ion``; development data lives in ``cwd/.dev``.
    """

    def __init__(self, cwd: Path, args: list[str], *, secret: str = SECRET, env: dict[str, str] | None = None):
        self.cwd = cwd
        self.port = free_port()
        self.secret = secret
        self.basedir = cwd / "ion"
        self.log = cwd / f"sidecar-{self.port}.log"
        argv = [sys.executable, "-m", "sidecar", f"--serverport={self.port}", f"--basedir={self.basedir}",
                f"--sharedsecret={secret}", *args]
        self.out = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=python_env(**(env or {})), stdout=self.out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 60) -> None:
        """Wait until ``/healthz`` answers 200 (the Prefect API is usable)."""
        try:
            wait_http(f"{self.url}/healthz", timeout, proc=self.proc)
        except Exception:
            raise AssertionError(f"sidecar did not become healthy:\n{self.output()}") from None

    def get(self, path: str, timeout: float = 120, secret: str | None = None) -> httpx.Response:
        """``GET path`` with the shared secret header."""
        headers = {"secret": self.secret if secret is None else secret}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=timeout)

    def output(self) -> str:
        self.out.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode

    def __enter__(self) -> "SidecarProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dev_args(event_id: str, correlation_id: str, name: str, *, parent: str = "", types: str = "file_discovered") -> list[str]:
    """Seed flags for a development-mode sidecar."""
    args = ["--development=true", f"--context.eventid={event_id}", f"--context.correlationid={correlation_id}",
            f"--context.name={name}", f"--valideventtypes={types}"]
    if parent:
        args.append(f"--context.parenteventid={parent}")
    return args


def read_runs(flow_run_ids: list[str], settled, timeout: float = 30) -> tuple[list, list]:
    """The flow runs ``flow_run_ids`` and their task runs, read through the Prefect API (what the UI
    shows). Task runs are recorded from events, so their rows, names and states settle shortly after
    the flow run ends: this polls until ``settled(task_runs)`` is true or ``timeout`` seconds pass."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> tuple[list, list]:
        async with get_client() as api:
            flow_runs = [await api.read_flow_run(i) for i in flow_run_ids]
            deadline = time.monotonic() + timeout
            while True:
                task_runs = await api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
                if settled(task_runs) or time.monotonic() > deadline:
                    return flow_runs, task_runs
                await asyncio.sleep(0.2)

    return asyncio.run(read())


def read_json(path: Path) -> object:
    return json.loads(path.read_text())
