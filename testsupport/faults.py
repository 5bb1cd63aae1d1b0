"""A fault-injecting TCP proxy for tests: stands between the sidecar and one data-plane service.

The sidecar connects to the proxy's port; the proxy forwards to the real service (Azurite, nx-27017,
the AMQP 1.0 test peer) until a test tells it to fail:

- ``down()``: cut every open connection and refuse new ones (a service that went away);
- ``up()``: forward again (the service is back);
- ``down_after(n)``: forward ``n`` more bytes from the sidecar, then go down (a failure *during* a step);
- ``blackhole()``: accept connections but never answer (a peer that hangs).

It runs its own asyncio loop in a daemon thread, so tests stay synchronous.
"""

from __future__ import annotations

import asyncio
import threading

from testsupport.processes import free_port


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:upstream`` with faults on demand (see module doc)."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.port = free_port()
        self.mode = "up"
        self.budget: int | None = None  # bytes still forwarded upstream before going down
        self.forwarded = 0  # bytes forwarded sidecar -> service, in total
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fault proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._started.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "down":
            writer.transport.abort()
            return
        if self.mode == "blackhole":
            self._writers.add(writer)
            await reader.read()  # hold the connection open, answer nothing
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer, count=True), self._pipe(up_reader, writer, count=False),
                             return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool) -> None:
        while True:
            data = await reader.read(65536)
            if not data or self.mode != "up":
                break
            if count and self.budget is not None:
                if len(data) >= self.budget:
                    data = data[: self.budget]
                    writer.write(data)
                    self.forwarded += len(data)
                    self._cut("down")
                    break
                self.budget -= len(data)
            writer.write(data)
            await writer.drain()
            if count:
                self.forwarded += len(data)
        writer.transport.abort()

    def _cut(self, mode: str) -> None:
        self.mode = mode
        self.budget = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def _call(self, fn, *args) -> None:
        done = threading.Event()

        def run() -> None:
            fn(*args)
            done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    def down(self) -> None:
        """Cut every connection and refuse new ones."""
        self._call(self._cut, "down")

    def blackhole(self) -> None:
        """Cut every connection; accept new ones but never answer."""
        self._call(self._cut, "blackhole")

    def up(self) -> None:
        """Forward again."""
        def go() -> None:
            self.mode, self.budget = "up", None
        self._call(go)

    def down_after(self, nbytes: int) -> None:
        """Forward ``nbytes`` more bytes towards the service, then go down."""
        def arm() -> None:
            self.budget = nbytes
        self._call(arm)

    def close(self) -> None:
        """Stop the proxy and its thread."""
        self._call(self._cut, "down")
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
