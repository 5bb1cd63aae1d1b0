"""uvicorn as the sidecar runs it: bounded under descriptor exhaustion, graceful on SIGTERM.

Facts from uvicorn 0.54 (``uvicorn/protocols/http/h11_impl.py``, ``server.py``) and asyncio
(``selector_events._accept_connection``) that shape this:

- ``timeout_keep_alive`` closes a connection idle *after a response*; a connection that never sends a
  byte has no timer at all and stays open for ever. :class:`IdleClosingH11Protocol` starts the same
  timer when the connection is made, so such connections are closed after ``IDLE_SECONDS``.
- When ``accept()`` fails with EMFILE/ENFILE asyncio stops accepting for one second and reports
  ``socket.accept() out of system resource`` through the loop's exception handler, with a traceback,
  every time. :func:`_quiet_exhaustion` logs it at most once per ``EXHAUSTION_LOG_SECONDS``.
- ``limit_concurrency``: past that many open connections (or running requests) uvicorn answers 503
  at once instead of serving, so descriptors stay for the data plane's sockets and files.
- uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process dies of the signal
  (exit status 143 or 130). :class:`SidecarServer` exits 0 after a graceful stop instead, and calls
  ``on_stop`` as the signal arrives, so the running call is cancelled and answered 503 right away
  rather than after uvicorn waited for it.
- Prefect's log and event workers drain their queues at interpreter exit with no time limit
  (``prefect/_internal/concurrency/services.py``: ``threading._register_atexit``); against a Prefect
  API that hangs, each queued request waits ``PREFECT_API_REQUEST_TIMEOUT`` (60 s) per attempt, 6
  attempts, so a stopped sidecar did not exit for minutes. The graceful shutdown drains them while the
  API answers (bounded); the rest of the exit then gets ``EXIT_SECONDS``.
- After the lifespan's shutdown, ``asyncio.run`` cancels every task still running and waits for them.
  A flow engine still reporting a committed run's final state (the API hangs) would then report the
  flow run Crashed (Prefect's crash handling, shielded from cancellation, itself waiting on the API):
  while ``keep_running()`` says such tasks are left, the process exits without cancelling them (their
  final states are in the run record for the sidecar's successor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable, Generator

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# A connection that sends nothing for this long is closed, seconds (before or between requests).
IDLE_SECONDS = 5
# Descriptors kept back from HTTP connections for the data plane, Prefect and files.
RESERVED_FDS = 256
# At most one log line about descriptor exhaustion per this many seconds.
EXHAUSTION_LOG_SECONDS = 60.0
# How long the interpreter's exit may take after the server stopped, seconds (see the module docstring).
EXIT_SECONDS = 5.0


class IdleClosingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the keep-alive timer from the moment a connection is made, so a
    client that connects and never sends a request is closed after ``timeout_keep_alive`` seconds."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (containers often start at 1024 with a far
    higher hard limit); returns the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def connection_limit(fd_limit: int) -> int:
    """The ``limit_concurrency`` for a process allowed ``fd_limit`` descriptors: all but
    ``RESERVED_FDS`` of them (half of them on a very low limit)."""
    return max(8, fd_limit - RESERVED_FDS if fd_limit > 2 * RESERVED_FDS else fd_limit // 2)


def _quiet_exhaustion(interval: float) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    last = [float("-inf")]
    suppressed = [0]

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "out of system resource" not in str(context.get("message", "")):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - last[0] < interval:
            suppressed[0] += 1
            return
        exc = context.get("exception")
        log.error("cannot accept connections: %s (%s); idle connections close after %d s; %d more such "
                  "errors in the last %g s not logged", context["message"], exc, IDLE_SECONDS, suppressed[0], interval)
        last[0], suppressed[0] = now, 0

    return handler


class SidecarServer(uvicorn.Server):
    """``uvicorn.Server`` that calls ``on_stop`` on SIGTERM/SIGINT and exits 0 after a graceful stop."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None],
                 keep_running: Callable[[], bool] | None = None):
        super().__init__(config)
        self.on_stop = on_stop
        self.keep_running = keep_running

    async def serve(self, sockets: Any = None) -> None:
        asyncio.get_running_loop().set_exception_handler(_quiet_exhaustion(EXHAUSTION_LOG_SECONDS))
        await super().serve(sockets)
        # The lifespan has shut down; what follows (cancelling the tasks left, atexit hooks) is bounded.
        code = 0 if self.started else 1
        exit_within(EXIT_SECONDS, code)
        if self.keep_running is not None and self.keep_running():
            log.warning("exiting without cancelling the flow engines still reporting final states to the Prefect API")
            _exit_now(code)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("received %s: stopping the running call, then shutting down", signal.Signals(sig).name)
            self.on_stop()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            try:
                yield
            finally:
                # Stopped gracefully: exit 0 instead of letting uvicorn re-raise the signal (private
                # list of uvicorn 0.54's Server; without it the re-raise is all that changes).
                getattr(self, "_captured_signals", []).clear()


def keep_sigterm_with_the_server() -> None:
    """Stop Prefect's flow engine from taking SIGTERM over for the length of each flow run.

    Prefect 3.9's ``flow_engine`` wraps every flow run in ``capture_sigterm()``
    (``prefect/utilities/engine/__init__.py``), made for a worker's child process: its handler raises
    ``TerminationSignal`` wherever the main thread happens to be. In this server that is mostly the
    event loop's ``select()``, so a SIGTERM while a call waited on the data plane crashed the loop: the
    module got a plain-text 500 and the process exited 1. Here :class:`SidecarServer` owns SIGTERM
    (it cancels the running call, answers 503 and stops gracefully), so the engine gets a no-op.
    """
    import prefect.flow_engine

    prefect.flow_engine.capture_sigterm = contextlib.nullcontext


def run_server(app: Any, host: str, port: int, on_stop: Callable[[], None],
               keep_running: Callable[[], bool] | None = None) -> None:
    """Serve ``app`` on ``host:port`` until SIGTERM/SIGINT (see the module docstring). ``keep_running``:
    True when tasks are left that must not be cancelled at exit."""
    keep_sigterm_with_the_server()
    fd_limit = raise_fd_limit()
    config = uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="on",
                            http=IdleClosingH11Protocol, timeout_keep_alive=IDLE_SECONDS,
                            limit_concurrency=connection_limit(fd_limit))
    SidecarServer(config, on_stop, keep_running).run()


def exit_within(seconds: float, code: int) -> None:
    """End the process with ``code`` if its normal exit (atexit hooks, thread joins) has not ended it
    within ``seconds``: a daemon thread that outlives the main thread until the interpreter finishes."""
    def stop() -> None:
        time.sleep(seconds)
        log.warning("exiting without waiting any longer for Prefect's workers: the Prefect API does not answer")
        _exit_now(code)

    threading.Thread(target=stop, name="exit-within", daemon=True).start()


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
