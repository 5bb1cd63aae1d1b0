"""Session-wide fixtures: one Prefect API server for the whole test session, and on demand a second
one on PostgreSQL (``prefect_on_postgres``) for the fleet tests.

The server is ``prefect server start`` on a free loopback port with its own PREFECT_HOME, started in
``pytest_configure`` (before any test module imports Prefect, so in-process flows and every sidecar
subprocess see ``PREFECT_API_URL``) and stopped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import Postgres, start_prefect_server, stop_process_group

_server: dict[str, object] = {}


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    home = Path(tempfile.mkdtemp(prefix="sidecar-prefect-"))
    proc, url = start_prefect_server(home)
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    _server.update(proc=proc, home=home)


def pytest_unconfigure(config) -> None:
    proc = _server.get("proc")
    if isinstance(proc, subprocess.Popen):
        if "prefect.logging.handlers" in sys.modules:
            # Send the in-process flow runs' last log lines while the server still listens.
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
        stop_process_group(proc)
        shutil.rmtree(_server["home"], ignore_errors=True)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def prefect_on_postgres():
    """A Prefect server on a temporary PostgreSQL cluster: yields ``(api_url, server_process)``.

    Fails (never skips) when PostgreSQL or the server cannot start; both are stopped at the end.
    """
    # Not under pytest's basetemp: every pytest session on the machine makes /tmp/pytest-of-USER
    # private (0700) again and prunes old numbered folders, which locks the postgres user out.
    root = Path(tempfile.mkdtemp(prefix="sidecar-prefect-postgres-"))
    postgres = Postgres(root / "pg")
    try:
        home = root / "home"
        home.mkdir()
        proc, url = start_prefect_server(home, database_url=postgres.url)
        try:
            yield url, proc
        finally:
            stop_process_group(proc)
    finally:
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)
