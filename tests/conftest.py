"""Session-wide fixtures over ``testsupport``: one Prefect API server for the whole test session, and
on demand a second one on PostgreSQL (``prefect_on_postgres``), Azurite, nx-27017, the AMQP 1.0 peer
and the production stack (all three behind fault proxies).

The Prefect server is ``prefect server start`` on a free loopback port with its own PREFECT_HOME,
started in ``pytest_configure`` (before any test module imports Prefect, so in-process flows and every
sidecar subprocess see ``PREFECT_API_URL``) and stopped at the end of the session. The data-plane
services start the first time a test asks for them (one per xdist worker); one that cannot start fails
the tests that need it, never skips them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from testsupport.amqp_peer import AmqpPeer
from testsupport.azurite import Azurite, run_azurite
from testsupport.mongo import NxServer
from testsupport.processes import Postgres, free_port, start_prefect_server, stop_process_group
from testsupport.servicebus import SilentListener
from testsupport.stack import Stack, run_stack

_server: dict[str, object] = {}


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    home = Path(tempfile.mkdtemp(prefix="sidecar-prefect-"))
    proc, url = start_prefect_server(home)
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if "prefect.context" in sys.modules:
        # testsupport imported Prefect with this file, and Prefect reads its settings once, at import:
        # without a refresh an in-process sidecar saw no PREFECT_API_URL and started a development
        # server of its own (pointing this process's client at it, and stopping it on exit).
        import prefect.context

        prefect.context.refresh_global_settings_context()
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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """The session's Azurite blob service (HTTP, the development account)."""
    with run_azurite() as service:
        yield service


@pytest.fixture(scope="session")
def nx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NxServer]:
    """The session's nx-27017 server."""
    server = NxServer(tmp_path_factory.mktemp("nx-27017"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mongo_server(nx_server: NxServer) -> Iterator[NxServer]:
    """The session server, running: a test that stopped it (fault tests) leaves it restarted."""
    nx_server.start()
    yield nx_server
    nx_server.start()


@pytest.fixture(scope="session")
def amqp_peer() -> Iterator[AmqpPeer]:
    """The session's AMQP peer on 127.0.0.1 (declare topics with ``create_topic``)."""
    peer = AmqpPeer(free_port()).start()
    yield peer
    peer.stop()


@pytest.fixture(autouse=True)
def _peer_stays_up(request) -> Iterator[None]:
    """Fail the test after which the session's AMQP peer is no longer serving (its handler raised)."""
    yield
    if "amqp_peer" in request.fixturenames:
        peer = request.getfixturevalue("amqp_peer")
        assert peer.error is None, f"the AMQP peer stopped: {peer.error!r}"


@pytest.fixture
def silent_listener() -> Iterator[SilentListener]:
    """A TCP listener that accepts connections and never sends a byte (a bus that hangs)."""
    listener = SilentListener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Azurite, nx-27017 and the AMQP peer for this module, each behind a fault proxy."""
    with run_stack(tmp_path_factory.mktemp("nx")) as services:
        yield services
