"""The Prefect API the flows report to: an existing server (``PREFECT_API_URL``) or a temporary one.

Facts from Prefect 3.9 that shape this: without ``PREFECT_API_URL`` the first flow run starts a
temporary server subprocess (8 to 15 s, about 200 MB) through ``SubprocessASGIServer``. The sidecar
starts it at start-up instead, in a thread, so the first ``/ready`` does not pay for it, and stops it on
shutdown (SIGTERM included: uvicorn runs the lifespan shutdown before it re-raises the signal).
"""

from __future__ import annotations

import asyncio
import logging

from typing import Sequence

import httpx
from prefect import Flow
from prefect.settings import PREFECT_API_URL

from sidecar.errors import SidecarError

log = logging.getLogger(__name__)


class PrefectUnavailable(SidecarError):
    """The Prefect API did not come up (or answer) in time. HTTP 503."""

    status_code = 503


class PrefectApi:
    """Starts (or checks) the Prefect API in the background and tells when it is usable.

    Args:
        timeout: seconds to wait for the API at start-up and in :meth:`wait`.
        flows: the flows to register with the API once it is up.
    """

    def __init__(self, timeout: float, flows: Sequence[Flow] = ()):
        self.timeout = timeout
        self.flows = list(flows)
        self.url: str | None = None
        self._server = None
        self._ready = asyncio.Event()
        self._error: Exception | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Begin bringing the API up; returns at once."""
        self._task = asyncio.create_task(self._start())

    async def _start(self) -> None:
        try:
            configured = PREFECT_API_URL.value()
            if configured:
                async with httpx.AsyncClient(timeout=self.timeout) as client:
                    response = await client.get(f"{configured.rstrip('/')}/health")
                    response.raise_for_status()
                self.url = configured
                log.info("Prefect API: %s (from PREFECT_API_URL)", configured)
            else:
                from prefect.server.api.server import SubprocessASGIServer

                # Prefect's client reuses this instance (same key) instead of starting a second one.
                self._server = SubprocessASGIServer()
                await asyncio.to_thread(self._server.start, int(self.timeout))
                self.url = self._server.api_url
                log.info("Prefect API: temporary server at %s (set PREFECT_API_URL to keep run history)", self.url)
            await self._warm_up()
        except Exception as exc:  # noqa: BLE001 - reported to every caller of wait()
            self._error = exc
            log.error("Prefect API unavailable: %s", exc)
        finally:
            self._ready.set()

    async def _warm_up(self) -> None:
        """Do at start-up what the first flow run would otherwise do inside the first /ready: import
        Prefect's run engines (imported lazily), open a client and register the flows."""
        import prefect.flow_engine  # noqa: F401
        import prefect.task_engine  # noqa: F401
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            for flow in self.flows:
                await client.create_flow(flow)

    async def wait(self) -> None:
        """Wait until the API is usable.

        Raises:
            PrefectUnavailable: it failed to start, or did not within ``timeout`` seconds.
        """
        try:
            await asyncio.wait_for(self._ready.wait(), self.timeout)
        except asyncio.TimeoutError:
            raise PrefectUnavailable("Prefect API is still starting; try again") from None
        if self._error is not None:
            raise PrefectUnavailable(f"Prefect API unavailable: {self._error}")

    @property
    def ready(self) -> bool:
        """True once the API answered."""
        return self._ready.is_set() and self._error is None

    async def stop(self) -> None:
        """Send what is still queued for the Prefect API, then stop the temporary server, if this
        process started one."""
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task], timeout=self.timeout)
        if self.ready:
            await self._drain()
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
            self._server = None
            log.info("stopped the temporary Prefect server")

    async def _drain(self) -> None:
        # Prefect sends log lines and run events from background queues that it drains in an atexit
        # hook; uvicorn re-raises SIGTERM after this shutdown, so that hook never runs and the last
        # lines of the final /done would be lost from the run history.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):
            try:
                await asyncio.wait_for(worker.drain_all(timeout=self.timeout), self.timeout)
            except Exception as exc:  # noqa: BLE001 - shutting down; report, never block the exit
                log.warning("could not send the remaining %s items to the Prefect API: %s", worker.__name__, exc)
