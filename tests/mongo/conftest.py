"""Fixtures of the MongoDB provider's tests: one real MongoDB wire-protocol server per session.

The server is nx-27017 (PyPI, installed by ``scripts/setup test``): a MongoDB wire-protocol server over
SQLite, on a free loopback port with its data file in a temp folder. It has no auth and ignores the
database name, so tests isolate their data by collection name (:func:`collection_name`). A server that
cannot start fails the tests that need it; nothing is skipped.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pymongo
import pytest

from sidecar.config import MongoConfig
from tests.support import dies_with_parent, free_port


class NxServer:
    """An ``nx-27017`` process on 127.0.0.1:``port`` keeping its data in ``root/mongo.db``.

    ``stop()`` and ``start()`` may be called repeatedly: a restart uses the same port and data file,
    as a restarted MongoDB would.
    """

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def executable(self) -> str:
        beside = Path(sys.executable).with_name("nx-27017")
        found = str(beside) if beside.exists() else shutil.which("nx-27017")
        if not found:
            raise RuntimeError("nx-27017 is not installed: run scripts/setup test")
        return found

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it answers ``ping``.

        Raises:
            RuntimeError: it exited or did not answer within ``timeout`` seconds (its log attached).
        """
        if self.running:
            return
        argv = [self.executable(), "--db", str(self.root / "mongo.db"), "--host", "127.0.0.1",
                "-p", str(self.port), "--pid-file", str(self.root / "nx.pid"), "--log-file", str(self.root / "nx.log")]
        with open(self.root / "nx.out", "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=dies_with_parent())
        deadline = time.monotonic() + timeout
        with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=500) as client:
            while True:
                try:
                    client.admin.command("ping")
                    return
                except pymongo.errors.PyMongoError as exc:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"nx-27017 did not start on port {self.port} ({exc}):\n{self.log()}") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and wait until it is gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        parts = [p.read_text(errors="replace")[-4000:] for p in (self.root / "nx.out", self.root / "nx.log") if p.exists()]
        return "\n".join(parts)

    def client(self) -> pymongo.MongoClient:
        """A pymongo client for inspecting what the sidecar stored (close it after use)."""
        return pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=5000)

    def config(self, collection: str, **overrides: object) -> MongoConfig:
        """A provider config for this server with small timeouts (seconds)."""
        values: dict = dict(enabled=True, uri=self.uri, collection=collection, serverselectiontimeoutseconds=2.0,
                            connecttimeoutseconds=2.0, sockettimeoutseconds=10.0)
        values.update(overrides)
        return MongoConfig(**values)


@pytest.fixture(scope="session")
def nx_server(tmp_path_factory: pytest.TempPathFactory):
    """The session's nx-27017 server (started once; fails, never skips, if it cannot start)."""
    server = NxServer(tmp_path_factory.mktemp("nx-27017"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mongo_server(nx_server: NxServer) -> NxServer:
    """The session server, running: a test that stopped it (fault tests) leaves it restarted."""
    nx_server.start()
    yield nx_server
    nx_server.start()


def collection_name(prefix: str = "t") -> str:
    """A collection name no other test uses (nx-27017 shares collections across database names)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"
