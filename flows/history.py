"""Run history a person can read in the Prefect UI: tags, parameters, artifacts and progress.

Every ``ready`` and ``done`` flow run carries the tags ``module:{name}``, ``event:{eventid}``,
``correlation:{correlationid}`` and ``parent:{parenteventid}`` (ids only), so one filter on a
correlation tag shows a whole graph run. Each run leaves artifacts keyed per step, module and event
(:func:`artifact_key`), so the latest report of one module run is one lookup by key:

- ``{step}-{module}-{event}``: a markdown report (what moved, the pairs passed on or the insight, the
  child events, or why the run failed);
- ``{step}-files-{module}-{event}``: a table of the files (path, bytes, MD5, blob key);
- ``done-events-{module}-{event}``: a table of the child events (event id, type, destination, files);
- ``{step}-progress-{module}-{event}``: bytes done / total, only for transfers that last longer than
  :data:`PROGRESS_AFTER_SECONDS` (see :class:`TransferProgress`).

Lists are capped (:data:`MAX_ROWS`) with a last row counting what was left out, so 100,000 files make
a table of ``MAX_ROWS + 1`` rows. History never fails or delays a run: an artifact that cannot be
written within :data:`WRITE_SECONDS`, or while the Prefect API is down, is logged as a warning and
written when the API answers again (``sidecar.orchestration.while_api_answers``, ``write_later``);
one the API refuses is left out, and the run goes on. Source: Prefect 3 artifacts
(https://docs.prefect.io/v3/concepts/artifacts), ``prefect.tags``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, Iterable, Iterator, ParamSpec, Sequence, TypeVar

from fastapi.encoders import ENCODERS_BY_TYPE
from prefect import tags
from prefect.context import TagsContext
from prefect.artifacts import (
    Artifact,
    MarkdownArtifact,
    TableArtifact,
    acreate_progress_artifact,
    aupdate_progress_artifact,
)
from prefect.client.schemas.actions import ArtifactCreate

from flows.runtime import Runtime
from sidecar.config import ContextConfig
from sidecar.dataplane.blobs import BlobInfo
from sidecar.errors import InputError, SidecarError
from sidecar.layout import DonePlan
from sidecar.models import BlobFile, Event, EventMeta, Insight, KeyValuePair
from sidecar.orchestration import PrefectUnavailable, beside_final_state, while_api_answers, write_later

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

# Rows an artifact's table shows at most; one more row says how many were left out.
MAX_ROWS = 100
# Characters a table cell shows at most (a pair's value can be long).
MAX_CELL_CHARS = 200
# Files listed per child event in the events table.
MAX_EVENT_FILES = 10
# Files a markdown report lists (its table artifact lists up to MAX_ROWS).
MAX_REPORT_FILES = 20
# A history write gives up after this long, seconds (sooner when the API is found down): the writes
# run after the commit, and a committed call's answer must not wait for Prefect's minute of retries.
WRITE_SECONDS = 20.0
# A transfer gets a progress artifact once it has lasted this long, seconds...
PROGRESS_AFTER_SECONDS = 1.5
# ...and the artifact is updated at most this often, seconds.
PROGRESS_EVERY_SECONDS = 1.0


def run_tags(ctx: ContextConfig) -> list[str]:
    """The tags of a flow run for ``ctx``: ``module:``, ``event:``, ``correlation:`` and, when the
    event has a parent, ``parent:`` followed by the id. Ids only: never a secret."""
    found = [f"module:{ctx.name}", f"event:{ctx.eventid}", f"correlation:{ctx.correlationid}"]
    if ctx.parenteventid:
        found.append(f"parent:{ctx.parenteventid}")
    return found


@contextmanager
def tagged(ctx: ContextConfig) -> Iterator[None]:
    """Tag the flow runs started inside with :func:`run_tags` (``prefect.tags``); their task runs carry
    no tags (:func:`untagged_task_runs`) and are found through their flow run."""
    with tags(*run_tags(ctx)):
        yield


def untagged_task_runs(body: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Run a flow's ``body`` with no tags in force, so its task runs carry none.

    Prefect's task engine acquires a concurrency slot through the API for every tag of a task run
    (``concurrency(names=["tag:..."])`` in ``prefect/task_engine.py``) before the task starts: one more
    API round trip per task run for every sidecar of a fleet, and a task that cannot start while the
    API is down (``ConcurrencySlotAcquisitionError``), which stopped a ``/done`` halfway through its
    commit during a Prefect outage. Tags on the flow run alone keep the run history searchable.
    """

    @functools.wraps(body)
    async def without_tags(*args: P.args, **kwargs: P.kwargs) -> R:
        with TagsContext(current_tags=set()):
            return await body(*args, **kwargs)

    return without_tags


def describe(runtime: Runtime) -> dict[str, Any]:
    """What the UI shows as the flow run's ``runtime`` parameter: ids, folders and the providers in
    use, without any secret (no key, password, connection string or URI)."""
    cfg = runtime.cfg
    ctx = cfg.context
    plane = runtime.dataplane
    return {
        "module": ctx.name,
        "eventId": ctx.eventid,
        "correlationId": ctx.correlationid,
        "parentEventId": ctx.parenteventid,
        "executionId": ctx.execution_id(),
        "basedir": str(runtime.layout.basedir),
        "blobStore": plane.blobs.describe(),
        "documentStore": plane.documents.describe(),
        "eventBus": plane.events.describe(),
        "validEventTypes": list(cfg.valideventtypes),
        "transfer": {"concurrency": cfg.transfer.concurrency, "tasks": cfg.transfer.tasks,
                     "retries": cfg.transfer.retries, "retryDelaySeconds": cfg.transfer.retrydelayseconds},
    }


# Prefect records flow parameters with FastAPI's jsonable_encoder (Flow.serialize_parameters), which
# looks a type up in this table before anything else; without the entry the UI shows "<Runtime>".
ENCODERS_BY_TYPE[Runtime] = describe


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) for ``parts`` joined by dashes.

    Every run of other characters becomes one dash and letters are lowercased; when that changed
    anything, a dash and 8 hex digits of the SHA-256 of the joined parts follow, so ids that differ
    only in case or punctuation (``Evt_1``, ``evt-1``) never share a key.
    """
    raw = "-".join(parts)
    key = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")
    if key != raw:
        key = f"{key}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}".lstrip("-")
    return key


def _keys(runtime: Runtime, step: str) -> tuple[str, str, str]:
    ctx = runtime.cfg.context
    return ctx.name, ctx.eventid, step


def _cell(value: object) -> str:
    """``value`` as one markdown table cell: one line, ``|`` and ``<`` escaped, at most
    :data:`MAX_CELL_CHARS` characters (the rest counted)."""
    text = " ".join(str(value).split())
    if len(text) > MAX_CELL_CHARS:
        text = f"{text[:MAX_CELL_CHARS]}… ({len(text) - MAX_CELL_CHARS:,} more characters)"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def capped(rows: Sequence[dict[str, Any]], total: int, what: str, first_column: str) -> list[dict[str, Any]]:
    """``rows`` (the first items of ``total``; only the first :data:`MAX_ROWS` are kept) and, when some
    were left out, one more row whose ``first_column`` says how many ``what`` (e.g. "files") are not
    shown. Callers pass only the first rows, so a run of 100,000 files never builds 100,000 rows."""
    rows = list(rows[:MAX_ROWS])
    if total <= len(rows):
        return rows
    more = {column: "" for column in rows[0]} if rows else {}
    more[first_column] = f"… and {total - len(rows):,} more {what} not shown"
    return [*rows, more]


def _markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _pairs(pairs: Iterable[KeyValuePair], what: str) -> str:
    pairs = list(pairs)
    rows = capped([{"key": p.key, "value": p.value} for p in pairs[:MAX_ROWS]], len(pairs), what, "key")
    return _markdown_table(rows) if rows else f"_No {what}._"


def _file_rows(files: Sequence[BlobFile], total: int, limit: int = MAX_ROWS) -> list[dict[str, Any]]:
    """Rows of the first ``limit`` of ``files`` (the first files of ``total``), then the count row."""
    return capped([{"path": f.path, "bytes": f.size, "MD5": f.md5 or "", "blob key": f.key} for f in files[:limit]],
                  total, "files", "path")


def _files_section(files: Sequence[BlobFile], total: int, table_key: str) -> str:
    """The first :data:`MAX_REPORT_FILES` files (of ``total``) as a markdown table, pointing to the table
    artifact for more."""
    if not files:
        return "_No files._"
    shown = _markdown_table(_file_rows(files, min(total, MAX_REPORT_FILES), MAX_REPORT_FILES))
    more = (f"\n\n… and {total - MAX_REPORT_FILES:,} more: table artifact `{table_key}` lists "
            f"{min(total, MAX_ROWS):,} of the {total:,}." if total > MAX_REPORT_FILES else "")
    return shown + more


def _header(step: str, runtime: Runtime) -> str:
    ctx = runtime.cfg.context
    parent = f", parent event `{ctx.parenteventid}`" if ctx.parenteventid else ", no parent event"
    return (f"## /{step} of module `{ctx.name}`, event `{ctx.eventid}`\n\n"
            f"Correlation `{ctx.correlationid}`{parent}, execution `{ctx.execution_id()}`.")


async def _quietly(what: str, work: Awaitable[Any]) -> None:
    try:
        await work
    except Exception as exc:  # noqa: BLE001 - history never fails a run
        log.warning("could not record %s in the run history: %s: %s", what, type(exc).__name__, exc)


async def _write(artifact: Artifact, flow_run_id: Any = None) -> None:
    """Create ``artifact`` for the current flow run (or ``flow_run_id``) within :data:`WRITE_SECONDS`;
    during an outage of the Prefect API the same request is made once the API answers again
    (``sidecar.orchestration.write_later``). Never raises: history never fails a run."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    flow_run_id = flow_run_id or (context.flow_run.id if context and context.flow_run else None)
    what = f"artifact {artifact.key or artifact.type}"
    try:
        request = ArtifactCreate(type=artifact.type, key=artifact.key, description=artifact.description,
                                 flow_run_id=flow_run_id, data=await artifact.aformat())

        async def create(client: Any) -> Any:
            return await client.create_artifact(artifact=request)

        async def now() -> Any:
            async with get_client() as client:
                return await create(client)

        await while_api_answers(now(), WRITE_SECONDS)
    except PrefectUnavailable as exc:
        if write_later(what, create):
            log.warning("could not record %s in the run history now (%s); it is written when the Prefect API "
                        "answers again", what, exc.message)
        else:
            log.warning("could not record %s in the run history: %s", what, exc.message)
    except Exception as exc:  # noqa: BLE001 - history never fails a run
        log.warning("could not record %s in the run history: %s: %s", what, type(exc).__name__, exc)


async def report_ready(runtime: Runtime, meta: EventMeta | None, files: int, moved: int, seconds: float) -> None:
    """Record what ``/ready`` staged: the report (counts, the passed-on pairs) and the files table,
    written while the flow run's final state is reported (``sidecar.orchestration.beside_final_state``).

    Args:
        meta: the event meta read (None: the first module of a graph, nothing to stage).
        files, moved, seconds: files staged, bytes staged, wall time in seconds.
    """
    await beside_final_state(_quietly("the /ready report", _report_ready(runtime, meta, files, moved, seconds)))


async def _report_ready(runtime: Runtime, meta: EventMeta | None, files: int, moved: int, seconds: float) -> None:
    module, event, step = _keys(runtime, "ready")
    staged = meta.files if meta else []
    source = (f"from event meta `{meta.id}`" if meta else
              "(no event meta: the first module of a graph gets no inputs)")
    lines = [
        _header(step, runtime),
        f"Staged **{files:,} files, {moved:,} bytes** into `in/data` in {seconds:.3f} s {source}.",
        f"### Files (`in/data`)\n\n{_files_section(staged, len(staged), artifact_key(step + '-files', module, event))}",
        f"### Passed-on pairs (`in/meta.json`)\n\n{_pairs(meta.data if meta else [], 'passed-on pairs')}",
    ]
    work = [MarkdownArtifact(markdown="\n\n".join(lines), key=artifact_key(step, module, event),
                             description=f"/ready of {module} for event {event}")]
    if staged:
        work.append(TableArtifact(table=_file_rows(staged, len(staged)), key=artifact_key(step + "-files", module, event),
                                  description=f"Files staged into in/data ({len(staged):,})"))
    await asyncio.gather(*(_write(artifact) for artifact in work))


async def report_done(runtime: Runtime, plan: DonePlan, stored: dict[str, BlobInfo], insight: Insight | None,
                      children: Sequence[tuple[EventMeta, Event]], seconds: float) -> None:
    """Record what ``/done`` committed: the report (counts, the insight's pairs, the child events),
    the files table and the child events table, written while the flow run's final state is reported
    (``sidecar.orchestration.beside_final_state``).

    Args:
        plan: what was committed; ``stored`` maps each of its file paths to what the blob store holds.
        insight: the insight stored, if any.
        children: each child's event meta and the event published for it.
        seconds: wall time of the flow run, seconds.
    """
    await beside_final_state(_quietly("the /done report", _report_done(runtime, plan, stored, insight, children,
                                                                     seconds)))


async def _report_done(runtime: Runtime, plan: DonePlan, stored: dict[str, BlobInfo], insight: Insight | None,
                       children: Sequence[tuple[EventMeta, Event]], seconds: float) -> None:
    module, event, step = _keys(runtime, "done")
    moved = plan.bytes
    count = len(plan.files)
    files = [BlobFile(path=f.path, key=stored[f.path].key, size=stored[f.path].size, md5=stored[f.path].md5)
             for f in plan.files[:MAX_ROWS]]
    events = runtime.dataplane.events
    event_rows = capped([
        {"event id": e.id, "type": e.type, "destination": events.destination(e),
         "files": ", ".join(f.path for f in meta.files[:MAX_EVENT_FILES])
         + (f" (+{len(meta.files) - MAX_EVENT_FILES:,} more)" if len(meta.files) > MAX_EVENT_FILES else "")}
        for meta, e in children[:MAX_ROWS]], len(children), "child events", "event id")
    lines = [
        _header(step, runtime),
        f"Committed **{count:,} files, {moved:,} bytes**, {'an insight' if insight else 'no insight'} "
        f"and **{len(children):,} child events** in {seconds:.3f} s.",
        f"### Files (`out/data`)\n\n{_files_section(files, count, artifact_key(step + '-files', module, event))}",
        f"### Insight (`out/meta.json`)\n\n{_pairs(insight.data if insight else [], 'insight pairs')}",
        f"### Child events\n\n{_markdown_table(event_rows) or '_No child events._'}",
    ]
    uncertain = runtime.run.record.uncertain
    if uncertain:
        shown_ids = ", ".join(f"`{i}`" for i in uncertain[:MAX_ROWS]) + (" ..." if len(uncertain) > MAX_ROWS else "")
        lines.insert(2, f"**{len(uncertain):,} child events may have been delivered twice**: an earlier publish of "
                        "them ended without the event bus's answer (a timeout, a lost connection or a killed "
                        "sidecar) and they were sent again under the same message ids. A topic with duplicate "
                        "detection dropped the resend; consumers of one without it dedupe on the message id "
                        f"(the child event id): {shown_ids}")
    work = [MarkdownArtifact(markdown="\n\n".join(lines), key=artifact_key(step, module, event),
                             description=f"/done of {module} for event {event}")]
    if files:
        work.append(TableArtifact(table=_file_rows(files, count), key=artifact_key(step + "-files", module, event),
                                  description=f"Files committed from out/data ({count:,})"))
    if children:
        work.append(TableArtifact(table=event_rows, key=artifact_key(step + "-events", module, event),
                                  description=f"Child events published ({len(children):,})"))
    await asyncio.gather(*(_write(artifact) for artifact in work))


async def record_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_failure`` hook of the ready and done flows: the report of a failed run says what
    the module was told and what it may do, under the same key as a successful run's report."""
    await _quietly("the failure", _record_failure(flow, flow_run, state))


async def _record_failure(flow: Any, flow_run: Any, state: Any) -> None:
    ids = dict(tag.split(":", 1) for tag in flow_run.tags if ":" in tag)
    key = artifact_key(flow.name, ids["module"], ids["event"]) if {"module", "event"} <= ids.keys() else None
    try:
        exc = await state.aresult(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the message alone still tells what happened
        exc = None
    status = exc.status_code if isinstance(exc, SidecarError) else 500
    if isinstance(exc, InputError):
        meaning = ("The module's outputs break the folder contract; **nothing was committed**. Fix the file "
                   "named above and call `/done` again.")
    else:
        meaning = (f"The module may call `/{flow.name}` again: a retry re-does only what is safe (same blob "
                   "keys, document ids and message ids).")
    text = (f"## /{flow.name} failed: HTTP {status}\n\n"
            f"{_cell(exc.message if isinstance(exc, SidecarError) else state.message)}\n\n{meaning}")
    await _write(MarkdownArtifact(
        markdown=text, key=key,
        description=f"/{flow.name} of {ids.get('module', '?')} for event {ids.get('event', '?')} failed"), flow_run.id)


class TransferProgress:
    """Bytes done / total of one flow run's transfers, as a Prefect progress artifact.

    Nothing is written for a transfer shorter than ``after`` seconds; a longer one creates the
    artifact then and updates it at most every ``every`` seconds, and once more at the end, beside the
    flow run's final state (``sidecar.orchestration.beside_final_state``). Bytes
    count when a file is complete (a single large file shows 0 % until it is done).

    Use::

        async with TransferProgress(key, "downloaded", files=3, total=900) as progress:
            await progress.track(download_one(), 300)

    Args:
        key: the artifact key (:func:`artifact_key`).
        verb: what happens to the bytes, for the description ("downloaded", "uploaded").
        files, total: files and bytes the transfer moves.
    """

    def __init__(self, key: str, verb: str, files: int, total: int,
                 after: float = PROGRESS_AFTER_SECONDS, every: float = PROGRESS_EVERY_SECONDS):
        self.key, self.verb, self.files, self.total = key, verb, files, total
        self.after, self.every = after, every
        self.done_files = 0
        self.done_bytes = 0
        self.artifact_id: Any = None
        self.updates = 0  # artifact writes, creation included
        self._shown: tuple[int, int] | None = None
        self._ticker: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._given_up = False  # a write failed: no more updates (one warning, not one per second)

    @classmethod
    def for_run(cls, runtime: Runtime, step: str, verb: str, sizes: Sequence[int]) -> "TransferProgress":
        """The progress of ``step``'s transfer of files of ``sizes`` bytes, keyed per module and event."""
        module, event, _ = _keys(runtime, step)
        return cls(artifact_key(step + "-progress", module, event), verb, len(sizes), sum(sizes))

    async def track(self, job: Awaitable[T], size: int) -> T:
        """Await ``job`` (one file's transfer of ``size`` bytes) and count it as done."""
        result = await job
        self.done_files += 1
        self.done_bytes += size
        return result

    async def __aenter__(self) -> "TransferProgress":
        self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        # The transfer is over: the last write (100 %) goes beside the flow run's final state, not before
        # the flow's next step. A transfer just past ``after`` created the artifact as it ended, and
        # waiting for that and the last update took 0.13 s of a /done of 1000 files (about 1.5 s).
        self._stopping.set()
        await beside_final_state(self._finish())

    async def _finish(self) -> None:
        if self._ticker is not None:
            # A write under way ends first (within WRITE_SECONDS), not cancelled: a cancelled update's
            # request may still reach the API after the final one and leave an older percentage (a
            # test saw 90 of 100), and a cancelled creation leaves no artifact id for the final write.
            try:
                await asyncio.gather(self._ticker, return_exceptions=True)
            except asyncio.CancelledError:
                self._ticker.cancel()
                raise
        if self.artifact_id is not None:
            await self._publish_quietly()

    async def _tick(self) -> None:
        pause = self.after
        while not await self._stopped_within(pause):
            started = time.monotonic()
            await self._publish_quietly()
            pause = max(0.0, self.every - (time.monotonic() - started))

    async def _stopped_within(self, seconds: float) -> bool:
        """Whether the transfer ended (``__aexit__``) within ``seconds``."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _publish_quietly(self) -> None:
        if self._given_up:
            return
        try:
            await while_api_answers(self._publish(), WRITE_SECONDS)
        except Exception as exc:  # noqa: BLE001 - history never fails a run
            self._given_up = True
            log.warning("could not record transfer progress in the run history (no more updates for this "
                        "transfer): %s: %s", type(exc).__name__, exc)

    async def _publish(self) -> None:
        shown = (self.done_files, self.done_bytes)
        if shown == self._shown:
            return
        percent = 100.0 * self.done_bytes / self.total if self.total else 100.0 * self.done_files / max(self.files, 1)
        text = (f"{self.done_files:,} of {self.files:,} files, {self.done_bytes:,} of {self.total:,} bytes "
                f"{self.verb}")
        if self.artifact_id is None:
            self.artifact_id = await acreate_progress_artifact(percent, key=self.key, description=text)
        else:
            await aupdate_progress_artifact(self.artifact_id, percent, description=text)
        self._shown = shown
        self.updates += 1
