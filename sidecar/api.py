"""The HTTP API a module calls: ``GET /ready``, ``GET /done``, ``GET /healthz``.

``DESIGN.md`` (The HTTP contract): every request but ``/healthz`` carries header ``secret`` (compared in
constant time; 401 otherwise). ``/ready`` stages inputs once; repeats return the same summary and
concurrent calls share one flow run. ``/done`` before ``/ready`` and ``/ready`` after ``/done`` are 409,
and so is a repeated ``/done`` once ``out/`` changed after the commit (it names the outputs it would
drop; unchanged, it answers the same summary). A failed ``/done`` leaves the state at ready so the
module can retry it. Errors are JSON ``{"statusCode", "message"}``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ion_sidecar_client import COMMITTED_ALREADY
from starlette.exceptions import HTTPException as StarletteHTTPException

from flows.done import done as done_flow
from flows.history import tagged
from flows.ready import ready as ready_flow
from flows.runtime import Runtime
from sidecar.config import secret_values
from sidecar.errors import InputError, SidecarError, StateError, Stopping, spelt_out, volume_error
from sidecar.layout import ModuleLayout, changed_since
from sidecar.logs import ContextFilter
from sidecar.models import DoneSummary, ReadySummary
from sidecar.orchestration import PrefectApi
from sidecar.runstate import RunStore
from sidecar.sharedsecret import HEADER, header_value, matches

log = logging.getLogger(__name__)


class Phase(str, enum.Enum):
    """Where the run stands: nothing staged yet, inputs staged, outputs committed."""

    new = "new"
    ready = "ready"
    done = "done"


class RunState:
    """The run's state machine over its record on the volume (``sidecar.runstate``).

    ``phase`` moves new -> ready -> done and only on success; the summary of each successful step is
    recorded (durably, before the caller is answered) so repeats answer the same, here or in a
    restarted sidecar. ``inflight`` is the running step, which concurrent callers await. The record
    is re-read from the volume whenever no step runs: it is the run's only memory, so a module that
    deleted its base folder gets a fresh run (README: Restarts).
    """

    def __init__(self, store: RunStore, layout: ModuleLayout | None = None) -> None:
        self.store = store
        self.layout = layout  # fingerprints out/ for a repeated /done (None: repeats are not compared)
        self.inflight: tuple[Phase, asyncio.Task] | None = None
        self.stopping = False
        self._resumed_logged = False  # the first call of this process says where a previous one stopped

    @property
    def phase(self) -> Phase:
        """The phase of the run as last read or written."""
        return Phase(self.store.record.phase)

    async def run(self, step: Phase, start: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``step`` (ready or done) once, sharing an in-flight run with concurrent callers.

        Raises:
            StateError: the step is out of order (HTTP 409).
            Stopping: the sidecar is stopping (SIGTERM); the call can be retried on its successor.
            VolumeError: the record could not be read or written.
            Exception: whatever the step's flow raised; the phase is left unchanged.
        """
        if self.stopping:
            raise Stopping("the sidecar is stopping (SIGTERM); call again once it is back")
        if self.inflight is None:
            record = self.store.refresh()
            if step is Phase.ready and record.closed:
                # A done run whose sidecar stopped gracefully: /ready starts this run afresh.
                self.store.record = record = self.store.fresh()
            elif record.phase != Phase.new.value and not self._resumed_logged:
                log.info("resuming the run recorded in %s by an earlier sidecar (phase %s, %d events published)",
                         self.store.path, record.phase, len(record.published))
            self._resumed_logged = True
        if step is Phase.ready and (self.phase is Phase.done or self._running(Phase.done)):
            raise StateError("/ready after /done: this module's run is already committed")
        if step is Phase.done and self.phase is Phase.new:
            raise StateError("/done before /ready: call /ready first and wait for it to succeed")
        kept = self.store.record.ready if step is Phase.ready else self.store.record.done
        if kept is not None:
            if step is Phase.done:
                self._check_unchanged_since_commit()
            return (ReadySummary if step is Phase.ready else DoneSummary).model_validate(kept)
        if self.inflight is None:
            self.inflight = (step, asyncio.create_task(self._step(step, start)))
        task = self.inflight[1]
        try:
            # shield: a caller that disconnects must not cancel the run the others wait for.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if self.stopping and task.cancelled():
                raise Stopping("the sidecar stopped this call (SIGTERM); the run's state is kept on the "
                               "volume: call again once it is back") from None
            raise
        finally:
            if task.done() and self.inflight and self.inflight[1] is task:
                self.inflight = None

    def _check_unchanged_since_commit(self) -> None:
        """Refuse a repeated ``/done`` when ``out/`` differs from what the committed one found: those
        outputs would be dropped behind a 200 (the summary of the commit that did not include them).

        Raises:
            StateError: naming every entry added, removed or changed since the commit (HTTP 409).
        """
        committed = self.store.record.committed
        if self.layout is None or committed is None:  # a record written before fingerprints were kept
            return
        problems = changed_since(committed, self.layout.fingerprint())
        if problems:
            named = spelt_out(problems, InputError.MAX_NAMED)
            flow_run = (self.store.record.done or {}).get("flowRunId", "?")
            raise StateError(f"{COMMITTED_ALREADY} (flow run {flow_run}); not committed: "
                             + "; ".join(named))

    def _fingerprint(self) -> dict[str, list[int]] | None:
        """``out/`` as this ``/done`` finds it, or None when it cannot be listed: the plan then names the
        problem as it always did (a 400), and a repeat after a commit is answered without a comparison."""
        if self.layout is None:
            return None
        try:
            return self.layout.fingerprint()
        except OSError as exc:
            log.warning("could not list out/ to compare a repeated /done with this one: %s", exc)
            return None

    def _hold_to_what_was_sent(self, fingerprint: dict[str, list[int]] | None) -> None:
        """Before a ``/done`` attempt: once an earlier attempt (this process's, or a killed predecessor's)
        handed child events to the event bus, ``out/`` must be as that attempt found it. Children may
        already have those events and read their event metas and blobs; committing an edited ``out/``
        would change them under the same event ids (or drop a published event from the summary). While
        nothing was sent, the attempt's fingerprint is recorded (durably, before anything is committed):
        a failed ``/done`` may still be fixed and retried.

        Raises:
            StateError: naming every entry added, removed or changed since the attempt that sent events
                (HTTP 409, not retried by the module client); nothing is committed.
        """
        if fingerprint is None:
            return
        record = self.store.record
        sent = len({*record.published, *record.sending, *record.uncertain})
        if not sent:
            self.store.save(committed=fingerprint)
            return
        if record.committed is None:  # a record written before fingerprints were kept
            return
        problems = changed_since(record.committed, fingerprint)
        if problems:
            named = spelt_out(problems, InputError.MAX_NAMED)
            raise StateError(f"{COMMITTED_ALREADY} in part: an earlier /done handed {sent} child events to the "
                             "event bus, which committed out/ as it was then; not committed: " + "; ".join(named))

    async def _step(self, step: Phase, start: Callable[[], Awaitable[Any]]) -> Any:
        # Taken before the plan reads out/: a file written meanwhile is named by a repeated /done
        # (at worst a 409 for a file this commit took), never dropped behind its 200.
        fingerprint = self._fingerprint() if step is Phase.done else None
        self._hold_to_what_was_sent(fingerprint)
        summary = await start()
        # Recorded before anyone is answered: a restarted sidecar then answers the same.
        self.store.save(phase=step.value, committed=fingerprint, **{step.value: summary.model_dump(mode="json")})
        return summary

    def stop(self) -> None:
        """SIGTERM: refuse new steps and cancel the running one (its transfers end with it); its
        callers are answered 503. The record keeps what was done, so the successor resumes."""
        self.stopping = True
        if self.inflight is not None:
            self.inflight[1].cancel()

    def _running(self, step: Phase) -> bool:
        return self.inflight is not None and self.inflight[0] is step


def error_body(status: int, message: str) -> JSONResponse:
    """The JSON error body of the contract: ``{"statusCode": status, "message": message}``."""
    return JSONResponse({"statusCode": status, "message": message}, status_code=status)


def create_app(runtime: Runtime) -> FastAPI:
    """The FastAPI app serving one module run with ``runtime``.

    The lifespan starts the Prefect API (see :class:`~sidecar.orchestration.PrefectApi`) and, on
    shutdown, stops any temporary Prefect server and closes the data-plane connections.
    """
    cfg = runtime.cfg
    prefect_api = PrefectApi(cfg.prefectstartuptimeoutseconds, flows=[ready_flow, done_flow], devdir=cfg.devdir,
                             require_api=cfg.requireprefectapi, ledger=runtime.run)
    prefect_api.resolve()
    state = RunState(runtime.run, runtime.layout)
    expected_secret = header_value(cfg.sharedsecret)
    redact = ContextFilter({}, secret_values(cfg)).redact

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.layout.prepare()
        prefect_api.start()
        log.info("sidecar starting on http://%s:%s, base directory %s", cfg.host, cfg.serverport, runtime.layout.basedir)
        # In the background: a slow or refused management read must not hold the start-up.
        topic_check = asyncio.create_task(runtime.dataplane.events.check_topics(list(cfg.valideventtypes)))
        try:
            yield
        finally:
            topic_check.cancel()
            state.stop()
            try:
                runtime.run.close()  # a graceful stop after /done closes the run (README: Restarts)
            except SidecarError as exc:
                log.error("could not close the run record: %s", exc.message)
            await prefect_api.stop()
            await runtime.dataplane.close()
            await asyncio.wait({topic_check}, timeout=2)  # its connection closed before the loop ends

    def stop() -> None:
        """SIGTERM: refuse new steps, and cancel the running call and its flow engine at once."""
        state.stop()
        prefect_api.cancel_running()

    app = FastAPI(title="ion-sidecar", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.run = state
    app.state.prefect = prefect_api
    app.state.stop = stop

    @app.middleware("http")
    async def require_secret(request: Request, call_next):
        # The header's bytes against the secret's UTF-8 bytes (sidecar/sharedsecret.py).
        if request.url.path != "/healthz" and not matches(request.headers.get(HEADER, ""), expected_secret):
            return error_body(401, "missing or wrong 'secret' header")
        return await call_next(request)

    @app.exception_handler(SidecarError)
    async def sidecar_error(request: Request, exc: SidecarError) -> JSONResponse:
        level = logging.WARNING if exc.status_code < 500 else logging.ERROR
        if not isinstance(exc, InputError):  # the flow run logged it: one WARNING line (sidecar.logs)
            log.log(level, "%s %s -> %s: %s", request.method, request.url.path, exc.status_code, exc.message)
        # A service's answer quoted in the message may carry a key (a SAS URL, a connection string).
        return error_body(exc.status_code, redact(exc.message))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_body(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_body(400, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        volume = volume_error(exc, runtime.layout.basedir)
        if volume is not None:  # the module's own volume (full, read-only, permissions): name the path
            return await sidecar_error(request, volume)
        log.exception("%s %s failed", request.method, request.url.path)
        return error_body(500, redact(f"internal error: {type(exc).__name__}: {exc}"))

    # HEAD too: load balancers and uptime monitors probe with it.
    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> JSONResponse:
        """200 when a flow can start now (the Prefect API answered its last probe, at most a few seconds
        ago); 503 with the reason otherwise. Never needs the secret."""
        status, body = prefect_api.health()
        return JSONResponse({**body, "phase": state.phase.value}, status_code=status)

    async def run_step(step: Phase, flow: Callable[[Runtime], Awaitable[Any]]) -> tuple[Any, bool]:
        """Run ``step``; returns its summary and whether this call ran its flow (False: a repeat
        answered from the record, or a call that shared another caller's flow run)."""
        ran = False

        async def start() -> Any:
            nonlocal ran
            ran = True
            with tagged(cfg.context):  # the flow run carries the run's ids (its task runs none: flows/history.py)
                return await prefect_api.run(flow, runtime)

        return await state.run(step, start), ran

    @app.get("/ready", response_model=ReadySummary)
    async def ready() -> ReadySummary:
        summary, _ = await run_step(Phase.ready, ready_flow)
        log.info("ready: staged %s files, %s bytes in %ss", summary.files, summary.bytes, summary.seconds)
        return summary

    @app.get("/done", response_model=DoneSummary)
    async def done() -> DoneSummary:
        summary, ran = await run_step(Phase.done, done_flow)
        if ran:
            log.info("done: committed %s files, %s bytes, %s events in %ss",
                     summary.files, summary.bytes, len(summary.events), summary.seconds)
        else:  # out/ unchanged since (a changed one is a 409): the same summary, and nothing committed now
            log.info("done: already committed by flow run %s; nothing new", summary.flowRunId)
        return summary

    return app
