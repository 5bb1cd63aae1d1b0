"""Session-wide fixtures: one Prefect API server for the whole test session.

The server is ``prefect server start`` on a free loopback port with its own PREFECT_HOME, started in
``pytest_configure`` (before any test module imports Prefect, so in-process flows and every sidecar
subprocess see ``PREFECT_API_URL``) and stopped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support import free_port, wait_http

_server: dict[str, object] = {}


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    home = Path(tempfile.mkdtemp(prefix="sidecar-prefect-"))
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    # Task runs reach the API as events that the task-run recorder service writes, so services run;
    # the ones that schedule or police runs (none exist here) only add writes to SQLite.
    for service in ("SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP",
                    "REPOSSESSOR", "TRIGGERS", "DB_VACUUM", "CLEANUP_RECONCILER", "EVENT_LOGGER"):
        env[f"PREFECT_SERVER_SERVICES_{service}_ENABLED"] = "false"
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 120, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"prefect server did not start:\n{(home / 'server.log').read_text()}")
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    _server.update(proc=proc, home=home, log=log)


def pytest_unconfigure(config) -> None:
    proc = _server.get("proc")
    if isinstance(proc, subprocess.Popen):
        if "prefect.logging.handlers" in sys.modules:
            # Send the in-process flow runs' last log lines while the server still listens.
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        _server["log"].close()  # type: ignore[union-attr]
        shutil.rmtree(_server["home"], ignore_errors=True)  # type: ignore[arg-type]
