"""The Prefect API the flows report to, as a dependency with a lifecycle (``DESIGN.md``: The engine).

Where the API is: ``PREFECT_API_URL`` (or a Prefect profile) when set; otherwise the development
server of this working directory (``sidecar/devserver.py``: one supervised server per ``{devdir}/prefect``,
shared by every sidecar started there, UI on), unless ``--requireprefectapi=true`` refuses that fallback.

What the sidecar does with it:

- It probes ``{api}/ready`` (Prefect's readiness check: the server reaches its database; ``/health``
  answers 200 while PostgreSQL is down) in the background, with back-off while the API is unavailable
  (0.5 s doubling to 5 s) and every :data:`CHECK_SECONDS` while it answers, and becomes usable as soon
  as it answers, without a restart. ``/healthz`` reports the last probe: 200 only when a flow can start
  now. An answer that is not a Prefect API's (an HTML page, a 404 of a wrong path) counts as unavailable.
- A call (``/ready``, ``/done``) waits for the API up to ``--prefectstartuptimeoutseconds``, then
  answers 503 "Prefect API unavailable" (retryable). A Prefect failure outside the flow's body (creating
  the flow run, proposing its states) is a 503 too, never a 500. Before the body starts, a call gives up
  (503) after :data:`ABANDON_AFTER_FAILURES` failed probes in a row, whatever Prefect's client is doing:
  it retries a hanging API for 6 x 60 s, 502/503/429 for ~62 s, a ``Retry-After`` for as long as it
  says and a ``Prefect-Maintenance`` answer for ever.
- Commit and report are decoupled: once the flow's body has returned (the data plane has committed), the
  call answers with its result even if Prefect's engine cannot report the final state; the state is then
  reported by this class when the API answers again (forced Completed, or Failed with the body's error),
  so no flow run stays Running after its call has answered while the sidecar lives.
- Past the sidecar's life: each flow run is recorded in the run record on the volume
  (``sidecar.runstate``, ``unreported``) as soon as the API has created it (before it is proposed
  Running) and forgotten once its final state is reported. A restarted sidecar (after SIGKILL, OOM, eviction) reports what it finds there before it
  calls itself healthy: Crashed for a flow run left mid-call, or the final state the dead process knew
  but could not report; a flow run whose final state the API already holds is left alone, unless that
  state is Crashed and the record knows how the body ended.

Prefect 3.9 facts this relies on (``prefect/client/base.py``, ``prefect/flow_engine.py``): the client
retries 408/429/502/503 and, once it has connected, connection errors, 5 times with exponential back-off
(about 62 s); the flow engine proposes Running before the body and Completed/Failed after it, and an
error in that last proposal propagates out of the flow call although the body has finished. Task-run
states travel as events (no blocking API call), so a running body is not stopped by an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, Protocol, Sequence, TypeVar

import httpx
from prefect import Flow

from sidecar.errors import SidecarError

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often an answering API is probed again, seconds (what /healthz may lag behind).
CHECK_SECONDS = 3.0
# Back-off between probes of an unreachable API, seconds: first and largest.
BACKOFF_SECONDS = (0.5, 5.0)
# Deadline of one probe, seconds.
PROBE_TIMEOUT = 5.0
# How long the shared Prefect clients keep an idle connection, seconds: well under the Prefect
# server's keep-alive (PREFECT_SERVER_API_KEEPALIVE_TIMEOUT, uvicorn's timeout_keep_alive: 5 s by default).
# Prefect's client keeps them 25 s (sized for Prefect Cloud's load balancer, 30 s), so a request sent
# on a connection as the server closed it failed, and Prefect's client retried it 2 s later: a /done
# of 8 x 64 MiB sent 5 s after its /ready waited 1.9-2.5 s for it in 6 of 9 bench rounds.
CLIENT_KEEPALIVE_SECONDS = 2.0
# How long a call whose body has finished waits for Prefect's engine to report the final state while
# the API is believed up, seconds; past it the call answers and the report continues in the background.
REPORT_WAIT_SECONDS = 30.0
# Run-history writes kept for the API's return at most (the oldest go first past it).
DEFERRED_WRITES = 1000
# How long shutdown waits for outstanding state reports, seconds.
SHUTDOWN_REPORT_SECONDS = 10.0
# How long a cancelled call (SIGTERM) waits for its flow run's engine to end its transfers, seconds.
STOP_ENGINE_SECONDS = 20.0
# How long shutdown waits for Prefect's log and event workers to send what they hold, seconds.
DRAIN_SECONDS = 5.0
# Failed probes in a row that make a call abandon a flow run whose body has not started (the API hangs,
# answers 5xx/429, or is gone): one failed probe may be a busy server, two are an outage.
ABANDON_AFTER_FAILURES = 2
# The longest a call waits for its flow run's body to start once the API answered its probe, seconds: a
# backstop for an API whose probe answers while its writes hang (Prefect's client would wait
# PREFECT_API_REQUEST_TIMEOUT, 60 s, per attempt, 6 attempts).
START_DEADLINE_SECONDS = 90.0


class PrefectUnavailable(SidecarError):
    """The Prefect API cannot be reached (or fails) now; retrying later may work. HTTP 503."""

    status_code = 503


class PrefectApiRequired(Exception):
    """``--requireprefectapi=true`` and no ``PREFECT_API_URL``: start-up stops with this message."""


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` as Prefect resolves it (environment, ``.env``, profile), or None."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def use_api_url(url: str) -> None:
    """Point this process's Prefect client (and its log and event workers, which read the settings in
    their own threads) at ``url``."""
    import prefect.context

    os.environ["PREFECT_API_URL"] = url
    prefect.context.refresh_global_settings_context()


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` raised by Prefect's client means the API is down or overloaded (connection
    errors, timeouts, 5xx, 429, "Failed to reach API"), not a bug to report as 500."""
    from prefect.exceptions import PrefectHTTPStatusError

    for err in _chain(exc):
        if isinstance(err, (httpx.TransportError, OSError, asyncio.TimeoutError)):
            return True
        if isinstance(err, (httpx.HTTPStatusError, PrefectHTTPStatusError)):
            code = err.response.status_code
            return code >= 500 or code in (408, 429)
        if isinstance(err, RuntimeError) and "Failed to reach API" in str(err):
            return True
    return False


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


class Ledger(Protocol):
    """Where a sidecar records its flow runs until their final states are reported
    (:class:`sidecar.runstate.RunStore`)."""

    def refresh(self) -> Any: ...
    def flow_started(self, flow_run_id: str) -> None: ...
    def flow_pending(self, flow_run_id: str, state_type: str, message: str) -> None: ...
    def flow_reported(self, flow_run_id: str) -> None: ...


@dataclass
class _Outcome:
    """What the flow's body did, independent of what Prefect's engine managed to report."""

    flow_run_id: str | None = None  # known once the API created the flow run
    on_created: Callable[[str], None] | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the body runs
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    result: Any = None
    error: BaseException | None = None
    api: "PrefectApi | None" = None
    # Set once a bounded write of this run (history) found the API gone: the run's later writes skip.
    api_lost: bool = False
    beside: list[asyncio.Future] = field(default_factory=list)  # beside_final_state's writes


_OUTCOME: contextvars.ContextVar[_Outcome | None] = contextvars.ContextVar("sidecar_flow_outcome", default=None)


def tracked(flow: Flow) -> Flow:
    """A copy of ``flow`` whose body records its flow run id, result or error in the calling task's
    :class:`_Outcome`, so a call can answer from the body even when the engine's report fails."""
    from prefect.runtime import flow_run

    original = flow.fn

    @functools.wraps(original)
    async def body(*args: Any, **kwargs: Any) -> Any:
        outcome = _OUTCOME.get()
        if outcome is not None:
            _created(outcome, str(flow_run.get_id()))
            outcome.started.set()
        try:
            result = await original(*args, **kwargs)
        except BaseException as exc:
            if outcome is not None:
                outcome.error = exc
                outcome.finished.set()
            raise
        if outcome is not None:
            outcome.result = result
            outcome.finished.set()
        return result

    copy = flow.with_options()
    copy.fn = body
    return copy


async def beside_final_state(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work``, a flow body's writes to the run history that nothing later in the body waits for
    (they never fail the run), alongside the rest of the body and Prefect's engine proposing the flow
    run's final state instead of before them: the call
    (:meth:`PrefectApi.run`) waits for both before it answers, so the history is whole when the module
    hears back, one round trip to the API sooner (the artifacts of a /done took 15-80 ms, its final
    state 25-55 ms more; bench/azure_transfers.py, the sidecar's requests logged). Outside a call made
    through :meth:`PrefectApi.run` (a flow run in a test), ``work`` is awaited here.
    """
    outcome = _OUTCOME.get()
    if outcome is None:
        await work
        return
    outcome.beside.append(asyncio.ensure_future(work))


def _created(outcome: _Outcome, flow_run_id: str) -> None:
    if outcome.flow_run_id is None:
        outcome.flow_run_id = flow_run_id
        if outcome.on_created is not None:
            outcome.on_created(flow_run_id)


# Allocations (net, of objects the garbage collector tracks) between two collections of its youngest
# generation; Python's default is 700 (``gc.set_threshold``).
GC_YOUNG_THRESHOLD = 10_000


def _settle_garbage_collector() -> None:
    """Once start-up is done: move every object alive now (the modules, classes and settings it made)
    into the garbage collector's permanent generation (``gc.freeze``), so full collections stop walking
    them, and collect the youngest generation every :data:`GC_YOUNG_THRESHOLD` allocations, not 700.

    A sidecar holds about 180,000 tracked objects after start-up (Prefect, FastAPI, pydantic, the Azure
    SDK); a plain SDK client a fraction of that. Measured with gc callbacks in a sidecar on Azurite, one
    call moving 1000 files of 4 KiB: 210 young, 19 middle and 2 full collections, 0.33 s of CPU; with the
    objects frozen 0.12 s; frozen and with this threshold, 4 young collections and 0.02 s (objects of a
    call mostly die by reference counting before any collection). What start-up left as garbage is
    collected first; objects made later are collected as usual.
    """
    if not gc.get_freeze_count():
        gc.collect()
        gc.freeze()
        young, middle, old = gc.get_threshold()
        gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


def _record_created_flow_runs() -> None:
    """Make ``PrefectClient.create_flow_run`` hand the new flow run's id to the calling flow's
    :class:`_Outcome` as soon as the API answers, before the engine proposes Running.

    Prefect's engine creates the flow run (Pending), names it and proposes Running before the body
    starts; a call abandoned in between (the API hangs, answers 5xx, the process is killed) used to
    leave a flow run nobody knew the id of, Running for ever once the API processed the proposal.
    With the id known, the run record holds it from creation on and it is reported Crashed.
    """
    from prefect.client.orchestration import PrefectClient

    original = PrefectClient.create_flow_run
    if getattr(original, "_sidecar_records", False):
        return

    @functools.wraps(original)
    async def create_flow_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        run = await original(self, *args, **kwargs)
        outcome = _OUTCOME.get()
        if outcome is not None and not kwargs.get("parent_task_run_id"):
            _created(outcome, str(run.id))
        return run

    create_flow_run._sidecar_records = True  # type: ignore[attr-defined]
    PrefectClient.create_flow_run = create_flow_run  # type: ignore[method-assign]


class PrefectApi:
    """Finds, watches and reports to the Prefect API for one sidecar process.

    Args:
        timeout: seconds a call waits for an unavailable API before answering 503.
        flows: the flows this sidecar runs (registered with the API once it answers).
        devdir: the development folder; the shared development server keeps its state in
            ``{devdir}/prefect``.
        require_api: refuse the development-server fallback (``--requireprefectapi``).
        ledger: where flow runs are recorded until their final states are reported (the run record);
            None: nowhere (a flow run of a killed process then stays Running).
    """

    def __init__(self, timeout: float, flows: Sequence[Flow] = (), devdir: str | Path = ".dev",
                 require_api: bool = False, ledger: Ledger | None = None):
        self.timeout = timeout
        self.flows = {flow: tracked(flow) for flow in flows}
        self.state_dir = Path(devdir).resolve() / "prefect"
        self.require_api = require_api
        self.url: str | None = None
        self.ui_url: str | None = None
        self.reason = "starting"
        self.ever_available = False
        self._available = asyncio.Event()
        self._lost = asyncio.Event()  # set while the last probe found the API unavailable
        self._failures = 0  # failed probes in a row
        self._outage = asyncio.Event()  # set after ABANDON_AFTER_FAILURES failed probes in a row
        self._wake = asyncio.Event()
        self._devserver = None
        self._task: asyncio.Task | None = None
        self._registered = False
        self._pending: dict[str, Any] = {}  # flow run id -> state still to report
        # flow run id -> state to report unless the API already holds a final one (a predecessor's)
        self._inherited: dict[str, Any] = {}
        self.ledger = ledger
        self._engines: dict[asyncio.Task, _Outcome] = {}  # the running flow engines and their bodies' outcomes
        self._ran_flows = False  # whether any call ran a flow: else Prefect's workers hold nothing to send
        # Writes flow runs' bodies could not make during an outage (run-history artifacts): (what, write).
        self._deferred: list[tuple[str, Callable[[Any], Awaitable[Any]]]] = []
        self._abandoned: set[asyncio.Task] = set()  # engines of calls answered 503 before their body ran
        self._flushing = asyncio.Lock()
        _record_created_flow_runs()
        # The probe's HTTP client, kept for the sidecar's life: a client per probe built a TLS context
        # (reading the CA bundle) every CHECK_SECONDS, a visible share of a loaded sidecar's CPU. It keeps
        # no connection alive, so every probe still opens a new one, as the flows' clients would.
        self._http: httpx.AsyncClient | None = None
        # The Prefect clients every flow run of this process uses: (API URL, async and sync client
        # contexts), and those of an earlier URL, closed at stop (a flow engine may still use them).
        self._clients: tuple[str | None, Any, Any] | None = None
        self._retired_clients: list[tuple[str | None, Any, Any]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def resolve(self) -> None:
        """Decide where the API is, before anything talks to Prefect.

        Raises:
            PrefectApiRequired: no ``PREFECT_API_URL`` and ``require_api``.
        """
        configured = configured_api_url()
        if configured:
            self.url = configured.rstrip("/")
            self.ui_url = self.url[:-4] if self.url.endswith("/api") else None
        elif self.require_api:
            raise PrefectApiRequired("PREFECT_API_URL is not set and --requireprefectapi=true refuses to start "
                                     "a Prefect server of its own; set PREFECT_API_URL to the fleet's Prefect API")

    def start(self) -> None:
        """Begin watching the API in the background; returns at once. Flow runs a previous process left
        unreported in the ledger are reported (see the module docstring) before the API counts as up."""
        self._inherit()
        self._task = asyncio.create_task(self._watch(), name="prefect-api-watch")

    async def _watch(self) -> None:
        try:
            if self.url is None:
                await self._attach_devserver()
            delay = BACKOFF_SECONDS[0]
            while True:
                reason = await self._probe()
                if reason is None:
                    delay = BACKOFF_SECONDS[0]
                    await self._flush_reports()
                    self._set_available(None)
                    await self._flush_deferred()  # history after health: it must not hold a 503
                    await self._sleep(CHECK_SECONDS)
                else:
                    self._set_available(reason)
                    if self._devserver is not None:
                        await self._reattach_devserver()
                    await self._sleep(delay)
                    delay = min(delay * 2, BACKOFF_SECONDS[1])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the watcher must not die silently
            log.exception("watching the Prefect API failed")
            self._set_available(f"{type(exc).__name__}: {exc}")

    async def _attach_devserver(self) -> None:
        from sidecar.devserver import DevServerClient

        self._devserver = DevServerClient(self.state_dir)
        info = await asyncio.to_thread(self._devserver.attach)
        self.url, self.ui_url = info["url"], info["ui"]
        use_api_url(self.url)
        # One server per development folder (--devdir), not per working directory.
        log.info("Prefect UI: %s (development server shared by every sidecar whose --devdir is %s; run history "
                 "in %s)", self.ui_url, self.state_dir.parent, self.state_dir / "prefect.db")

    async def _reattach_devserver(self) -> None:
        # The supervisor itself may be gone (killed): start a new one; its port may differ.
        info = await asyncio.to_thread(self._devserver.attach)
        if info["url"] != self.url:
            self.url, self.ui_url = info["url"], info["ui"]
            use_api_url(self.url)
            log.info("Prefect UI: %s (a new development server)", self.ui_url)

    async def _probe(self) -> str | None:
        """None when the API's readiness check answers 200 and the flows are registered; else the reason.

        ``{api}/ready`` (Prefect 3's readiness check: 503 "Database is not available" unless the
        server can connect to its database) rather than ``{api}/health``, which answers 200 while
        every write fails (PostgreSQL stopped). An API without ``/ready`` (404), or too busy to answer
        it in time, is asked ``/health``; a database that hangs rather than refuses is therefore not
        seen here, and a call's wait for its flow run is bounded by :data:`START_DEADLINE_SECONDS`.
        """
        assert self.url is not None
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=PROBE_TIMEOUT, limits=httpx.Limits(max_keepalive_connections=0))
        try:
            # Both at once, so a hanging server costs one PROBE_TIMEOUT. /ready decides, unless it is
            # missing (404) or too slow: a server whose database connections a fleet's writes hold
            # all (pool exhausted) is busy, not down, and /health needs no database.
            ready, health = await asyncio.gather(self._get_within(f"{self.url}/ready"),
                                                 self._get_within(f"{self.url}/health"), return_exceptions=True)
            slow = isinstance(ready, httpx.TimeoutException) or (
                isinstance(ready, httpx.Response) and ready.status_code == 404)
            answer = health if slow else ready
            if isinstance(answer, BaseException):
                raise answer
            response = answer
            problem = _not_prefect(response)
            if problem:
                return f"{_shown(str(response.request.url))} {problem}"
        except httpx.HTTPError as exc:
            return f"{_shown(self.url)} unreachable ({type(exc).__name__}: {exc or 'no answer'})"
        if not self._registered:
            try:
                await asyncio.wait_for(self._warm_up(), PROBE_TIMEOUT * 3)
            except Exception as exc:  # noqa: BLE001 - reported as the reason
                return f"{_shown(self.url)} failed registering the flows ({type(exc).__name__}: {exc})"
            self._registered = True
        return None

    async def _get_within(self, url: str) -> httpx.Response:
        """GET ``url`` whole (head and body) within :data:`PROBE_TIMEOUT` seconds.

        httpx's timeout bounds each read, not the answer: a server that sends a byte every second
        never trips it, and the probe that should find it unusable would wait for ever.

        Raises:
            httpx.TimeoutException: no complete answer in time.
            httpx.HTTPError: the request failed.
        """
        assert self._http is not None
        try:
            return await asyncio.wait_for(self._http.get(url, headers=_auth_headers()), PROBE_TIMEOUT)
        except TimeoutError:
            raise httpx.ReadTimeout(f"no complete answer within {PROBE_TIMEOUT:g} s") from None

    async def _warm_up(self) -> None:
        """Do once what the first flow run would otherwise do inside the first call: import Prefect's
        run engines (imported lazily), open the clients the flow runs share (:meth:`_shared_clients`),
        register the flows through them (which also fetches their CSRF token), start Prefect's log and
        event workers (:func:`_start_workers`); then settle the garbage collector on what start-up made
        (:func:`_settle_garbage_collector`)."""
        import prefect.flow_engine  # noqa: F401
        import prefect.task_engine  # noqa: F401
        import prefect.utilities.visualization  # noqa: F401 - the first Flow.__call__ imports it

        async_clients, _ = await self._shared_clients()
        for flow in self.flows:
            await async_clients.client.create_flow(flow)
        _start_workers()
        _settle_garbage_collector()

    def _set_available(self, reason: str | None) -> None:
        was = self._available.is_set()
        if reason is None:
            if not was:
                log.info("Prefect API: %s answers%s", _shown(self.url),
                         f"; UI at {self.ui_url}" if self.ui_url and not self.ever_available else "")
            self.ever_available = True
            self.reason = "ok"
            self._failures = 0
            self._outage.clear()
            self._available.set()
            self._lost.clear()
        else:
            self._failures += 1
            if self._failures >= ABANDON_AFTER_FAILURES:
                self._outage.set()
            if was or reason != self.reason:
                # Before the first answer this is the normal start-up wait (a development server takes
                # up to a minute or two the first time), not an outage worth a WARNING.
                if self.ever_available:
                    log.warning("Prefect API unavailable: %s", reason)
                else:
                    log.info("waiting for the Prefect API: %s", reason)
            self.reason = reason
            self._available.clear()
            if self.ever_available:
                self._lost.set()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    def check_soon(self) -> None:
        """Probe now instead of at the next scheduled check (a call just saw Prefect fail)."""
        self._wake.set()

    @property
    def ready(self) -> bool:
        """True when the last probe found the API answering: a flow can start now."""
        return self._available.is_set()

    def health(self) -> tuple[int, dict]:
        """``/healthz``: (200, ...) when a flow can start now, else (503, ...) with the reason."""
        if self.ready:
            return 200, {"status": "ok"}  # no URL: /healthz needs no secret, a URL may carry credentials
        status = "unavailable" if self.ever_available else "starting"
        return 503, {"status": status, "message": f"Prefect API unavailable: {self.reason}"}

    async def wait(self) -> None:
        """Wait until the API answers, at most ``timeout`` seconds.

        Raises:
            PrefectUnavailable: it did not answer in time (the message carries the last reason).
        """
        if self.ready:
            return
        try:
            await asyncio.wait_for(self._available.wait(), self.timeout)
        except asyncio.TimeoutError:
            raise PrefectUnavailable(f"Prefect API unavailable: {self.reason}") from None

    # -- running flows ---------------------------------------------------------------------------

    async def run(self, flow: Flow, *args: Any) -> Any:
        """Run ``flow(*args)`` as one flow run and return its body's result.

        Before the body starts, the call is abandoned (503) as soon as the API fails
        :data:`ABANDON_AFTER_FAILURES` probes in a row, or after :data:`START_DEADLINE_SECONDS`: Prefect's
        client would otherwise retry a hanging or failing API for minutes. Its flow run, if the API
        created one, is reported Crashed when the API answers again.

        The body's last history writes (:func:`beside_final_state`) are awaited before the call answers,
        unless it is cancelled.

        Raises:
            PrefectUnavailable: the API is down and the body did not run (HTTP 503; nothing was done).
            SidecarError: whatever the body raised (its final state is reported, later if need be).
        """
        await self.wait()
        outcome = _Outcome(on_created=self._created, api=self)
        self._ran_flows = True
        try:
            result = await self._run(flow, args, outcome)
        except asyncio.CancelledError:
            raise  # its history writes go on (each bounded) without holding the cancellation
        except BaseException:
            await asyncio.gather(*outcome.beside, return_exceptions=True)
            raise
        await asyncio.gather(*outcome.beside, return_exceptions=True)
        return result

    async def _run(self, flow: Flow, args: tuple[Any, ...], outcome: _Outcome) -> Any:
        """:meth:`run` but for the writes beside the final state."""
        async_clients, sync_clients = await self._shared_clients()
        tokens = (_OUTCOME.set(outcome), type(async_clients).__var__.set(async_clients),
                  type(sync_clients).__var__.set(sync_clients))
        try:
            engine = asyncio.create_task(self.flows.get(flow, flow)(*args))
        finally:
            for var, token in zip((_OUTCOME, type(async_clients).__var__, type(sync_clients).__var__), tokens):
                var.reset(token)
        self._engines[engine] = outcome
        engine.add_done_callback(lambda task: self._engines.pop(task, None))
        try:
            why = await self._body_started(engine, outcome)
        except asyncio.CancelledError:
            engine.cancel()
            if outcome.started.is_set():  # its transfers end before the caller is answered
                await asyncio.wait([engine], timeout=STOP_ENGINE_SECONDS)
            else:  # the body has not run: nothing to wait for (SIGTERM answers at once)
                self._abandon(engine, outcome)
            raise
        if why is not None:
            engine.cancel()
            self._abandon(engine, outcome)
            log.warning("abandoned flow run %s before its body started: Prefect API unavailable (%s)",
                        outcome.flow_run_id or "(not created yet)", why)
            raise PrefectUnavailable(f"Prefect API unavailable: {why}")
        finished = asyncio.create_task(outcome.finished.wait())
        try:
            await asyncio.wait([engine, finished], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The call is cancelled (SIGTERM): the engine runs in its own task, so cancel it too and let
            # its transfers end before the caller is answered, or the flow would go on committing.
            engine.cancel()
            await asyncio.wait([engine], timeout=STOP_ENGINE_SECONDS)
            raise
        finally:
            finished.cancel()
        if not outcome.finished.is_set():
            # The engine failed before or around the body without the body finishing.
            exc = engine.exception()
            if exc is None:
                self._reported(outcome.flow_run_id)
                return engine.result()
            if outcome.flow_run_id:
                self._report_later(outcome)
            if isinstance(exc, SidecarError):
                raise exc
            if is_outage(exc):
                self.check_soon()
                raise PrefectUnavailable(f"Prefect API unavailable: {type(exc).__name__}: {exc}") from exc
            if not outcome.started.is_set():
                # Something that is not the Prefect API answered (a 404 page of a proxy in a rollout,
                # HTML, a wrong path): the API is unavailable if the probe says so now.
                reason = await self._probe()
                if reason is not None:
                    self._set_available(reason)
                    raise PrefectUnavailable(f"Prefect API unavailable: {reason}") from exc
            raise exc
        await self._await_report(engine)
        if engine.done() and not engine.cancelled() and engine.exception() is None:
            self._reported(outcome.flow_run_id)
            return engine.result()
        if engine.done() and not engine.cancelled() and engine.exception() is outcome.error:
            self._reported(outcome.flow_run_id)
            raise outcome.error  # the body failed and the engine reported it
        if engine.done():
            # The body finished but its final state was not reported: report it when the API answers.
            exc = engine.exception() if not engine.cancelled() else None
            log.warning("flow run %s: its final state could not be reported (%s); reporting it when the "
                        "Prefect API answers", outcome.flow_run_id, exc)
            self._report_later(outcome)
        else:
            log.warning("flow run %s: answering before Prefect recorded its final state (API: %s)",
                        outcome.flow_run_id, self.reason)
            # Known now, so a successor reports it if this process dies while the engine still retries.
            state = self._final_state(outcome)
            self._record(lambda ledger: ledger.flow_pending(outcome.flow_run_id, state.type.value, state.message or ""))
            engine.add_done_callback(lambda task: self._engine_ended(task, outcome))
        if outcome.error is not None:
            raise outcome.error
        return outcome.result

    async def _shared_clients(self) -> tuple[Any, Any]:
        """The Prefect client contexts (async, sync) every flow run of this process starts in, made
        once per API URL and open until :meth:`stop`.

        Prefect's engine otherwise opens a new ``PrefectClient`` per flow run (a TLS context read from
        the CA bundle, new connections, a CSRF token and a version check: about 25 ms of CPU and four
        requests), and a new ``SyncPrefectClient`` (another TLS context) wherever it needs one; with a
        client context in force it uses that client (``AsyncClientContext.get_or_create``,
        ``get_client``). The clients are entered, not their contexts: entering a context would set its
        variable in the caller's context and make a version-check request here, before the call's
        deadline for the body to start applies (the probe has just checked the API). Their idle
        connections expire after :data:`CLIENT_KEEPALIVE_SECONDS`, before the server closes them.
        """
        from prefect.client.orchestration import get_client
        from prefect.context import AsyncClientContext, SyncClientContext

        def pool() -> dict[str, Any]:  # Prefect's own limits but the keep-alive (PrefectClient.__init__)
            return {"limits": httpx.Limits(max_connections=16, max_keepalive_connections=8,
                                           keepalive_expiry=CLIENT_KEEPALIVE_SECONDS)}

        url = configured_api_url()
        if self._clients is None or self._clients[0] != url:
            if self._clients is not None:
                self._retired_clients.append(self._clients)
            async_clients, sync_clients = AsyncClientContext(), SyncClientContext()
            # Their clients replaced, not made through the contexts' httpx_settings: get_client() hands
            # a context's client out only when the settings asked for equal the context's (None in the
            # engine), so a context made with settings is passed over and a new client made per call.
            async_clients.client = get_client(sync_client=False, httpx_settings=pool())
            sync_clients.client = get_client(sync_client=True, httpx_settings=pool())
            await async_clients.client.__aenter__()
            sync_clients.client.__enter__()
            self._clients = (url, async_clients, sync_clients)
        return self._clients[1], self._clients[2]

    async def _close_clients(self) -> None:
        for _, async_clients, sync_clients in [*self._retired_clients, *([self._clients] if self._clients else [])]:
            with contextlib.suppress(Exception):
                await async_clients.client.__aexit__(None, None, None)
            with contextlib.suppress(Exception):
                sync_clients.client.__exit__(None, None, None)
        self._clients, self._retired_clients = None, []

    async def _body_started(self, engine: asyncio.Task, outcome: _Outcome) -> str | None:
        """Wait until the flow's body starts or the engine ends first (None: the caller looks at it).
        Returns why to give up instead: the API failed :data:`ABANDON_AFTER_FAILURES` probes in a row
        meanwhile, or the body did not start within :data:`START_DEADLINE_SECONDS`."""
        started = asyncio.create_task(outcome.started.wait())
        outage = asyncio.create_task(self._outage.wait())
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        try:
            done, _ = await asyncio.wait([engine, started, outage], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                self.check_soon()  # slow to start: find out now whether the API still answers
                done, _ = await asyncio.wait([engine, started, outage], timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
            outage.cancel()
        if outcome.started.is_set() or engine.done():
            return None
        if not done:
            return f"no flow run started within {START_DEADLINE_SECONDS:g} s ({_shown(self.url or '')} does not answer in time)"
        return self.reason

    def _abandon(self, engine: asyncio.Task, outcome: _Outcome) -> None:
        """A call gave up on ``engine`` before its body ran: report its flow run (if the API created
        one) Crashed when the API answers, and do not wait for the engine at shutdown (Prefect's crash
        handling shields its own report from cancellation and may retry a hanging API for minutes)."""
        self._engines.pop(engine, None)
        self._abandoned.add(engine)
        engine.add_done_callback(self._abandoned.discard)
        self._report_later(outcome)

    async def _await_report(self, engine: asyncio.Task) -> None:
        """Give the engine time to report the final state while the API is believed up."""
        done, _ = await asyncio.wait([engine], timeout=1.0)
        if done:
            return
        self.check_soon()
        deadline = time.monotonic() + REPORT_WAIT_SECONDS
        while not engine.done() and self.ready and time.monotonic() < deadline:
            await asyncio.wait([engine], timeout=0.5)

    def _engine_ended(self, engine: asyncio.Task, outcome: _Outcome) -> None:
        if engine.cancelled() or engine.exception() is not None:
            self._report_later(outcome)
        else:
            self._reported(outcome.flow_run_id)

    @staticmethod
    def _final_state(outcome: _Outcome) -> Any:
        """The state the flow run ends in, from what its body did."""
        from prefect.states import Completed, Crashed, Failed

        if not outcome.finished.is_set():
            return Crashed(message="the sidecar's flow run ended without finishing (Prefect API unavailable)")
        if outcome.error is not None:
            return Failed(message=f"{type(outcome.error).__name__}: {outcome.error} (reported after an outage "
                                  "of the Prefect API)")
        return Completed(message="completed; reported after an outage of the Prefect API")

    def _report_later(self, outcome: _Outcome) -> None:
        if outcome.flow_run_id is None:
            return
        state = self._final_state(outcome)
        self._pending[outcome.flow_run_id] = state
        self._record(lambda ledger: ledger.flow_pending(outcome.flow_run_id, state.type.value, state.message or ""))
        self.check_soon()

    def _created(self, flow_run_id: str) -> None:
        if self.ledger is not None:
            # Recorded before the flow run is proposed Running: a successor reports it if this process
            # dies. A full volume fails the flow run before its body: nothing was done.
            self.ledger.flow_started(flow_run_id)

    def _reported(self, flow_run_id: str | None) -> None:
        if flow_run_id is not None:
            self._record(lambda ledger: ledger.flow_reported(flow_run_id))

    def _record(self, change: Callable[[Ledger], None]) -> None:
        if self.ledger is None:
            return
        try:
            change(self.ledger)
        except SidecarError as exc:  # the volume refused: the call's answer does not depend on this
            log.error("could not record a flow run's report in the run record: %s", exc.message)

    def _inherit(self) -> None:
        """Take over the flow runs a previous process on this volume left unreported."""
        from prefect.states import Crashed, State, StateType

        if self.ledger is None:
            return
        try:
            unreported = self.ledger.refresh().unreported
        except SidecarError as exc:
            log.error("could not read the run record for unreported flow runs: %s", exc.message)
            return
        for flow_run_id, known in unreported.items():
            try:
                known_type = None if known is None else StateType(known["type"])
            except (KeyError, TypeError, ValueError):
                # A record this version cannot read must not stop start-up: the run is still not Running.
                log.warning("flow run %s: the run record's state %r is not a Prefect state; reporting Crashed",
                            flow_run_id, known)
                known_type = None
            if known_type is None:
                state = Crashed(message="the sidecar running this flow run stopped before its call finished "
                                        "(killed: SIGKILL, out of memory, eviction); reported by its successor")
            else:
                state = State(type=known_type, message=f"{known.get('message', '')} (reported by the "
                                                       "sidecar's successor)")
            self._inherited[flow_run_id] = state
            log.info("flow run %s was left unreported by a previous sidecar on this volume: reporting %s",
                     flow_run_id, state.type.value)

    async def _flush_reports(self) -> None:
        """Report the final states the engine could not, now that the API answers, and those a previous
        process left (unless the API already holds a final state for them)."""
        if not self._pending and not self._inherited:
            return
        async with self._flushing:  # the watcher and shutdown must not report one flow run twice at once
            await self._flush_reports_now()

    async def _flush_reports_now(self) -> None:
        """One round of reports. A flow run the API does not know (another server's, or its database
        was reset) is dropped; one whose report fails otherwise is kept for the next round without
        holding back the others; the round ends when the API fails (unavailable again)."""
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            for flow_run_id, state in list(self._inherited.items()):
                try:
                    run = await asyncio.wait_for(client.read_flow_run(flow_run_id), PROBE_TIMEOUT * 3)
                    # Crashed is what Prefect's engine reports when it does not know how the body
                    # ended (cancelled at a process's exit); the run record knows better.
                    if (run.state is None or not run.state.is_final()
                            or (run.state.is_crashed() and not state.is_crashed())):
                        await asyncio.wait_for(client.set_flow_run_state(flow_run_id, state, force=True),
                                               PROBE_TIMEOUT * 3)
                        log.warning("flow run %s, left %s by a previous sidecar: reported %s", flow_run_id,
                                    run.state.type.value if run.state else "without a state", state.type.value)
                except Exception as exc:  # noqa: BLE001 - kept for the next round
                    if not self._report_failed(flow_run_id, "reporting a previous sidecar's flow run", exc):
                        if is_outage(exc):
                            return
                        continue
                self._inherited.pop(flow_run_id, None)
                self._reported(flow_run_id)
            for flow_run_id, state in list(self._pending.items()):
                try:
                    await asyncio.wait_for(client.set_flow_run_state(flow_run_id, state, force=True), PROBE_TIMEOUT * 3)
                    log.info("flow run %s: reported %s after the Prefect API returned", flow_run_id, state.type.value)
                except Exception as exc:  # noqa: BLE001 - kept for the next round
                    if not self._report_failed(flow_run_id, f"reporting {state.type.value}", exc):
                        if is_outage(exc):
                            return
                        continue
                self._pending.pop(flow_run_id, None)
                self._reported(flow_run_id)

    @staticmethod
    def _report_failed(flow_run_id: str, what: str, exc: BaseException) -> bool:
        """Log a failed report; True when there is nothing to report (the API does not know the flow run)."""
        if _is_missing(exc):
            log.warning("flow run %s: not in this Prefect API (another server's, or its database was reset); "
                        "nothing to report", flow_run_id)
            return True
        log.warning("flow run %s: %s failed: %s: %s", flow_run_id, what, type(exc).__name__, exc)
        return False

    async def _flush_deferred(self) -> None:
        """Make the writes queued by :func:`write_later` now that the API answers; one that fails for
        an outage waits for the next round, one the API refuses is dropped with a warning."""
        if not self._deferred:
            return
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            while self._deferred:
                what, write = self._deferred[0]
                try:
                    await asyncio.wait_for(write(client), PROBE_TIMEOUT * 3)
                    log.info("wrote %s after the Prefect API returned", what)
                except Exception as exc:  # noqa: BLE001 - kept for the next round, or dropped
                    if is_outage(exc):
                        return
                    log.warning("the Prefect API refused %s: %s", what, exc)
                self._deferred.pop(0)

    def cancel_running(self) -> None:
        """Cancel every running flow engine now (SIGTERM), so each stops committing at its next await.

        Cancelling the call alone reached the engine one turn of the event loop later, after the
        call's own task woke up; a flow whose steps no longer wait on the API (development providers,
        untagged task runs) went on to store its metas and publish its events in between.
        """
        for engine, outcome in list(self._engines.items()):
            # An engine whose body has finished only reports its final state: cancelled, Prefect would
            # report the committed flow run Crashed instead.
            if not outcome.finished.is_set():
                engine.cancel()

    def reporting(self) -> bool:
        """True while a flow engine still reports the final state of a flow run whose body has
        finished (after :meth:`stop`: the API did not answer in time). Cancelled, Prefect's engine
        would report that flow run Crashed; its state is in the run record instead."""
        return any(outcome.finished.is_set() for outcome in self._engines.values())

    async def stop(self) -> None:
        """Report what is still pending (bounded), send Prefect's queued logs and events, stop
        watching and leave the development server."""
        # One budget for the engines still reporting and the reports still pending: a hanging API must
        # not hold the exit past a container's grace period (Kubernetes: 30 s by default).
        deadline = time.monotonic() + SHUTDOWN_REPORT_SECONDS
        if self._engines and self.ready:  # an unavailable API: their final states are in the run record
            await asyncio.wait(list(self._engines), timeout=SHUTDOWN_REPORT_SECONDS)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + max(0.0, deadline - time.monotonic())):
                while self._pending:
                    if self.ready:
                        await self._flush_reports()
                    if self._pending:
                        self.check_soon()
                        await asyncio.sleep(0.5)
        if self._pending:
            log.error("Prefect API unavailable at shutdown: flow runs %s keep their last reported state until "
                      "a sidecar restarted on this volume reports them (they are in the run record)",
                      ", ".join(self._pending))
        if self.ready and self._ran_flows:
            # Without a flow run the workers the warm-up started hold nothing; draining them waited 5 s
            # each when the API hung (a sidecar that served no call stopped in 10.3 s, not 0.2 s).
            await drain_workers()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await self._close_clients()
        if self._devserver is not None:
            self._devserver.detach()
            self._devserver = None


def _start_workers() -> None:
    """Start Prefect's log and event workers for the current API URL, as the first flow run would.

    Each opens its own ``PrefectClient`` (a TLS context read from the CA bundle) in Prefect's loop
    thread, and the event worker a second one for its server version check and its websocket:
    started by the first flow run, they took about 100 ms of CPU from a fresh sidecar's first call
    (py-spy of a child's ``/ready``, bench/azure_transfers.py) and held its final state report. A
    worker whose start fails (the API went away meanwhile) stops itself, and the next flow run starts a
    new one (``QueueService.instance``); :func:`drain_workers` stops them at shutdown.
    """
    from prefect.events.worker import EventsWorker, should_emit_events
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED

    if PREFECT_LOGGING_TO_API_ENABLED.value():
        APILogWorker.instance()
    if should_emit_events():
        EventsWorker.instance()


async def drain_workers(seconds: float = DRAIN_SECONDS) -> None:
    """Send what Prefect's log and event workers still hold to the Prefect API, waiting at most
    ``seconds`` per worker; a failure is logged, never raised (callers are on their way out).

    Prefect sends log lines and run events from background queues that it drains in an atexit hook.
    That hook never runs in the sidecar (uvicorn re-raises SIGTERM after its shutdown), so the last lines
    of the final ``/done`` would be lost from the run history; and where it runs it waits without a bound,
    for as long as its client retries an API that is gone (e.g. a development server stopping).
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            await asyncio.wait_for(worker.drain_all(timeout=seconds), seconds)
        except Exception as exc:  # noqa: BLE001 - shutting down; report, never block the exit
            log.warning("could not send the remaining %s items to the Prefect API: %s", worker.__name__, exc)


def drain_workers_now(seconds: float = DRAIN_SECONDS) -> None:
    """:func:`drain_workers` outside an event loop (a command's last step, after ``asyncio.run``)."""
    asyncio.run(drain_workers(seconds))


def write_later(what: str, write: Callable[[Any], Awaitable[Any]]) -> bool:
    """Queue ``write`` (called with a ``PrefectClient``; ``what`` names it in the log) to be made once the
    Prefect API answers again, by the sidecar running the current flow run. False outside a tracked
    flow run (nothing would make it). At most :data:`DEFERRED_WRITES` wait; past that the oldest go."""
    outcome = _OUTCOME.get()
    if outcome is None or outcome.api is None:
        return False
    deferred = outcome.api._deferred
    deferred.append((what, write))
    if len(deferred) > DEFERRED_WRITES:
        dropped, _ = deferred.pop(0)
        log.warning("dropped %s from the writes waiting for the Prefect API (more than %s wait)", dropped,
                    DEFERRED_WRITES)
    return True


async def while_api_answers(work: Awaitable[T], seconds: float) -> T:
    """Await ``work`` (a write to the Prefect API made inside a flow run's body, e.g. an artifact)
    while the API answers, for at most ``seconds``.

    Prefect's client retries a failed request for about a minute (module docstring), and a body's
    writes run after its commit, so an outage would hold a committed ``/done``'s answer that long.
    Instead the write is abandoned as soon as the API watcher finds the API gone (or the deadline
    passes), and the flow run's later bounded writes are skipped at once. Outside a tracked flow run
    only the deadline applies.

    Raises:
        PrefectUnavailable: the API was or went unavailable, or ``seconds`` passed; ``work`` was cancelled.
        Exception: whatever ``work`` raised otherwise.
    """
    outcome = _OUTCOME.get()
    api = outcome.api if outcome is not None else None
    if outcome is not None and (outcome.api_lost or (api is not None and api._lost.is_set())):
        if asyncio.iscoroutine(work):
            work.close()
        raise PrefectUnavailable(f"Prefect API unavailable: {api.reason if api else 'lost earlier in this run'}")
    job = asyncio.ensure_future(work)
    lost = asyncio.ensure_future(api._lost.wait()) if api is not None else None
    try:
        await asyncio.wait([job, lost] if lost else [job], timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if lost is not None:
            lost.cancel()
    if job.done():
        exc = job.exception()
        if exc is not None and is_outage(exc):
            # The client's own retries ended first: the same outage, so the caller can tell it apart.
            if outcome is not None:
                outcome.api_lost = True
            if api is not None:
                api.check_soon()
            raise PrefectUnavailable(f"Prefect API unavailable: {type(exc).__name__}: {exc}") from exc
        return job.result()
    job.cancel()
    await asyncio.gather(job, return_exceptions=True)
    if outcome is not None:
        outcome.api_lost = True
    if api is not None:
        api.check_soon()
        if api._lost.is_set():
            raise PrefectUnavailable(f"Prefect API unavailable: {api.reason}")
    raise PrefectUnavailable(f"Prefect API unavailable: no answer in {seconds:g} s")


def fleet_slot(name: str):
    """An async context manager holding one slot of the Prefect global concurrency limit ``name``
    (``--transfer.fleetlimit``) for the duration of one transfer task run; a no-op when ``name`` is empty.

    Prefect's ``concurrency(strict=True)`` waits for a free slot through the API and raises
    ``ConcurrencySlotAcquisitionError`` when no such limit exists (a transient error to the task's
    retries, then a 5xx); a failed lease renewal during a long transfer does not stop the transfer.
    """
    if not name:
        return contextlib.nullcontext()
    from prefect.concurrency.asyncio import concurrency

    return concurrency(name, occupy=1, strict=True, raise_on_lease_renewal_failure=False)


def _not_prefect(response: httpx.Response) -> str | None:
    """Why ``response`` to a readiness probe is not "ready", or None: it must be 200 with JSON
    (a Prefect API answers ``{"message": "OK"}`` or ``true``), not a web page."""
    if response.status_code != 200:
        detail = ""
        if "json" in response.headers.get("content-type", ""):
            with contextlib.suppress(ValueError, AttributeError):
                body = response.json()
                detail = body.get("message") or body.get("exception_message") or body.get("detail") or ""
        shown = f"answered {response.status_code}" + (f" ({str(detail)[:200]})" if detail else "")
        if response.status_code == 404:
            shown += ": no Prefect API at this address (PREFECT_API_URL is the API's, e.g. http://prefect:4200/api)"
        return shown
    try:
        response.json()
    except ValueError:
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        return (f"answered 200 with {kind}, not JSON: not a Prefect API (PREFECT_API_URL is the API's "
                "address, e.g. http://prefect:4200/api)")
    return None


def _is_missing(exc: BaseException) -> bool:
    from prefect.exceptions import ObjectNotFound

    return any(isinstance(err, ObjectNotFound) for err in _chain(exc))


def _shown(url: str) -> str:
    """``url`` without user and password, for messages and logs."""
    return str(httpx.URL(url).copy_with(userinfo=b""))


def _auth_headers() -> dict[str, str]:
    """The headers Prefect's own client would send (``PREFECT_API_AUTH_STRING`` or ``PREFECT_API_KEY``)."""
    import base64

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    auth = PREFECT_API_AUTH_STRING.value()
    if auth:
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    key = PREFECT_API_KEY.value()
    return {"Authorization": f"Bearer {key}"} if key else {}
