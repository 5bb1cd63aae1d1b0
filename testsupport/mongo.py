"""nx-27017 (PyPI, installed by ``scripts/setup test``): a MongoDB wire-protocol server over SQLite, on a
free loopback port with its data file in a folder of the caller's. It has no auth and ignores the
database name, so tests isolate their data by collection name (:func:`collection_name`).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import bson
import pymongo

from sidecar.providers.mongo.config import MongoConfig
from testsupport.processes import dies_with_parent, free_port


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


def collection_name(prefix: str = "t") -> str:
    """A collection name no other test uses (nx-27017 shares collections across database names)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


class AuthRefusingProxy:
    """A MongoDB wire-protocol proxy to an nx-27017 server that refuses every authentication as a
    MongoDB server refuses a wrong user or password: ``{ok: 0, code: 18, codeName: "AuthenticationFailed",
    errmsg: "Authentication failed."}`` (MongoDB's error codes, ``AuthenticationFailed`` = 18).

    nx-27017 has no authentication (it answers ``saslStart`` with no SCRAM payload); this proxy answers
    ``saslStart``/``saslContinue``/``authenticate`` itself and forwards every other message
    (``OP_MSG``/``OP_QUERY``, the handshake included) to ``127.0.0.1:upstream`` unchanged.
    ``refused`` counts the authentication commands it refused, so a test can assert the refusal
    really happened. It runs its own event loop in a daemon thread; :meth:`close` stops it.
    """

    OP_MSG = 2013
    AUTH_COMMANDS = ("saslStart", "saslContinue", "authenticate")

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.port = free_port()
        self.refused = 0
        self._tasks: set = set()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the authentication-refusing proxy did not start")

    def _command(self, message: bytes) -> str | None:
        """The command name of an ``OP_MSG`` (the first key of its body section), else None."""
        if struct.unpack_from("<i", message, 12)[0] != self.OP_MSG or message[20] != 0:  # kind 0: the body
            return None
        size = struct.unpack_from("<i", message, 21)[0]
        return next(iter(bson.decode(message[21:21 + size])), None)

    def _refusal(self, message: bytes) -> bytes:
        body = bson.encode({"ok": 0.0, "errmsg": "Authentication failed.", "code": 18,
                            "codeName": "AuthenticationFailed"})
        payload = struct.pack("<I", 0) + b"\x00" + body
        request_id = struct.unpack_from("<i", message, 4)[0]
        return struct.pack("<iiii", 16 + len(payload), 0, request_id, self.OP_MSG) + payload

    async def _serve(self, reader, writer) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return

        async def back() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()

        answers = asyncio.ensure_future(back())
        try:
            while True:
                header = await reader.readexactly(16)
                message = header + await reader.readexactly(struct.unpack_from("<i", header)[0] - 16)
                if self._command(message) in self.AUTH_COMMANDS:
                    self.refused += 1
                    writer.write(self._refusal(message))
                else:
                    up_writer.write(message)
                    await up_writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(asyncio.current_task())
            answers.cancel()
            up_writer.transport.abort()
            writer.transport.abort()

    def close(self) -> None:
        """Stop listening, end every connection and the proxy's thread."""
        async def shut() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await asyncio.sleep(0)  # let the cancelled relays finish

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
