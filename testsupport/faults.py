"""A fault-injecting TCP proxy for tests: stands between the sidecar and one service.

The sidecar connects to the proxy's port; the proxy forwards to the real service (Azurite, nx-27017,
the AMQP 1.0 test peer, a Prefect server) until a test tells it to fail:

- ``down()``: cut every open connection and refuse new ones (a service that went away);
- ``up()``: forward again (the service is back);
- ``down_after(n)``: forward ``n`` more bytes from the sidecar, then go down (a failure *during* a step);
- ``blackhole()``: accept connections but never answer (a peer that hangs);
- ``hang()`` / ``hang_when(pattern)``: stop moving bytes on every connection, open or new, now or once
  the sidecar has sent ``pattern`` (a regular expression over one connection's recent bytes): what a
  SIGSTOPped server looks like, at a chosen request. ``up()`` moves the held bytes on (SIGCONT) or
  ``up(resume=False)`` cuts those connections;
- ``answer(status, headers, body)``: answer every HTTP request itself with that response (a server
  failing with 5xx/429, a load balancer's error page, something that is not the service at all);
- ``drip(when, after, interval)``: a slow peer. On each connection whose request matches ``when``, the
  service's answer is forwarded for ``after`` bytes (counted from the end of its HTTP head with
  ``past_head``), then one byte (or ``piece``) every ``interval`` seconds, or none at all
  (``interval=None``: a stall after N bytes). Each gap is shorter than a read timeout, so only a total
  deadline ends a drip; a larger ``piece`` makes a slow but steady answer instead.

It runs its own asyncio loop in a daemon thread, so tests stay synchronous.
"""

from __future__ import annotations

import asyncio
import re
import threading
from http import HTTPStatus
from typing import NamedTuple

from testsupport.processes import free_port


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:upstream`` with faults on demand (see module doc)."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.port = free_port()
        self.mode = "up"
        self.budget: int | None = None  # bytes still forwarded upstream before going down
        self.forwarded = 0  # bytes forwarded sidecar -> service, in total
        self.answered = 0  # HTTP requests answered by answer()
        self.held = 0  # connections that had bytes held by hang()
        self.drips = 0  # connections whose answer drip() slowed down
        self.dripped = 0  # bytes of answers sent one at a time by drip()
        self.stalled = 0  # connections whose answer drip(interval=None) stopped
        self._drip: _Drip | None = None
        self._dripping: set[asyncio.StreamWriter] = set()
        self.triggered = threading.Event()  # hang_when's pattern was seen
        self.response: tuple[int, dict[str, str], bytes] = (503, {}, b"")
        self._trigger: tuple[re.Pattern[bytes], bool] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fault proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
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
        if self.mode == "answer":
            await self._answer(reader, writer)
            return
        if not self._flowing.is_set():  # hung: accepted, nothing reaches the service until up()
            self.held += 1
            self._writers.add(writer)
            await self._flowing.wait()
            if self.mode != "up":
                return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})
        slow = _SlowAnswer()  # armed by drip()'s pattern in this connection's requests
        await asyncio.gather(self._pipe(reader, up_writer, count=True, slow=slow),
                             self._pipe(up_reader, writer, count=False, slow=slow), return_exceptions=True)
        self._dripping.discard(writer)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer each HTTP/1.1 request on this connection with ``self.response`` (keep-alive)."""
        self._writers.add(writer)
        try:
            while self.mode == "answer":
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                status, headers, body = self.response
                lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"content-length: {len(body)}",
                         *(f"{k}: {v}" for k, v in headers.items())]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
                await writer.drain()
                self.answered += 1
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool,
                    slow: "_SlowAnswer | None" = None) -> None:
        recent = b""
        while True:
            data = await reader.read(65536)
            if not data or self.mode != "up":
                break
            if slow is not None and count and self._drip is not None and slow.drip is None:
                slow.seen = (slow.seen + data)[-65536:]
                if self._drip.when.search(slow.seen):
                    slow.drip = self._drip
                    self.drips += 1
            if slow is not None and not count and slow.drip is not None:
                self._dripping.add(writer)
                if not await self._slowly(writer, data, slow):
                    break
                continue
            if count and self._trigger is not None:
                recent = (recent + data)[-65536:]
                pattern, forward = self._trigger
                if pattern.search(recent):
                    self._trigger = None
                    if forward:
                        writer.write(data)
                        await writer.drain()
                        self.forwarded += len(data)
                        data = b""
                    self._flowing.clear()
                    self.triggered.set()
            if not self._flowing.is_set():
                self.held += 1
                await self._flowing.wait()
                if self.mode != "up":
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

    async def _slowly(self, writer: asyncio.StreamWriter, data: bytes, slow: "_SlowAnswer") -> bool:
        """Send ``data`` of an answer that ``slow.drip`` slows down; False once the connection is cut."""
        drip = slow.drip
        assert drip is not None
        if drip.past_head and not slow.head_done:
            slow.head = (slow.head + data)[-65536:]
            end = slow.head.find(b"\r\n\r\n")
            if end < 0:
                writer.write(data)
                await writer.drain()
                return True
            slow.head_done = True
            cut = len(data) - (len(slow.head) - end - 4)  # where the body starts in data
            writer.write(data[:cut])
            data = data[cut:]
        fast = max(0, min(len(data), drip.after - slow.passed))
        if fast:
            writer.write(data[:fast])
            await writer.drain()
            slow.passed += fast
            data = data[fast:]
        if not data:
            return True
        if drip.interval is None:
            self.stalled += 1
            while self.mode == "up" and not writer.transport.is_closing():  # until up() or the client cuts it
                await asyncio.sleep(0.05)
            return False
        for i in range(0, len(data), drip.piece):
            await asyncio.sleep(drip.interval)
            if self.mode != "up" or writer.transport.is_closing():
                return False
            piece = data[i:i + drip.piece]
            writer.write(piece)
            await writer.drain()
            self.dripped += len(piece)
        return True

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

    def up(self, resume: bool = True) -> None:
        """Forward again. Bytes held by :meth:`hang` move on (``resume``) or their connections are cut."""
        def go() -> None:
            if self.mode in ("answer", "blackhole") or not resume:
                self._cut("up")
            for writer in self._dripping:  # a slowed answer is never finished: cut it
                writer.transport.abort()
            self._dripping.clear()
            self.mode, self.budget, self._trigger, self._drip = "up", None, None, None
            self._flowing.set()
        self._call(go)

    def hang(self) -> None:
        """Hold every byte from now on, on open and new connections (connections stay open)."""
        self._call(self._flowing.clear)

    def hang_when(self, pattern: bytes, forward: bool = True) -> None:
        """Hang (see :meth:`hang`) once the sidecar has sent bytes matching the regular expression
        ``pattern`` on one connection; the matching chunk reaches the service first when ``forward``.
        :attr:`triggered` is set then."""
        def arm() -> None:
            self.triggered.clear()
            self._trigger = (re.compile(pattern, re.DOTALL), forward)
        self._call(arm)

    def answer(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        """Cut every connection; answer each HTTP request from now on with ``status``, ``headers`` and
        ``body`` (nothing reaches the service). :attr:`answered` counts them."""
        def go() -> None:
            self.response = (status, dict(headers or {}), body)
            self._cut("answer")
            self._flowing.set()
        self._call(go)

    def drip(self, when: bytes = b"", after: int = 0, interval: float | None = 0.25, past_head: bool = False,
             piece: int = 1) -> None:
        """From now on, slow down the service's answers on each connection (open or new) whose requests
        match the regular expression ``when`` (empty: every connection): forward ``after`` bytes of the
        answer (after its HTTP head, ending in a blank line, when ``past_head``), then ``piece`` bytes
        every ``interval`` seconds, or nothing more when ``interval`` is None (a stall). ``up()`` cuts
        those connections. :attr:`drips` counts the connections slowed, :attr:`dripped` the bytes sent
        slowly, :attr:`stalled` the answers stopped."""
        def arm() -> None:
            self._drip = _Drip(re.compile(when, re.DOTALL), after, interval, past_head, max(1, piece))
        self._call(arm)

    def down_after(self, nbytes: int) -> None:
        """Forward ``nbytes`` more bytes towards the service, then go down."""
        def arm() -> None:
            self.budget = nbytes
        self._call(arm)

    def close(self) -> None:
        """Stop the proxy and its thread."""
        self._call(self._cut, "down")

        async def shut() -> None:
            # Connections still being served (a drip's or a hang's) end here, not as pending tasks at exit.
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shut(), self._loop)
        self._thread.join(5)


class _Drip(NamedTuple):
    """What :meth:`FaultProxy.drip` does to an answer (see there)."""

    when: re.Pattern[bytes]
    after: int
    interval: float | None
    past_head: bool
    piece: int


class _SlowAnswer:
    """One connection's state under :meth:`FaultProxy.drip`: its recent request bytes, the drip armed
    by them, and how much of the answer went through."""

    def __init__(self) -> None:
        self.seen = b""
        self.drip: _Drip | None = None
        self.head = b""
        self.head_done = False
        self.passed = 0
