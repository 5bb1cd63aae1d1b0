"""The done flow: commit a module's outputs (``DESIGN.md``: One run).

plan (read and validate ``out/``, no data-plane I/O) -> upload ``out/data/**`` -> upsert the insight ->
upsert every child's event meta -> publish the child events. Metas are stored before any event is
published, so a child never receives an event whose meta or files are missing. Every step is
idempotent (same blob keys, same document ids, same message ids), so a failed ``/done`` can be retried.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from prefect import flow, task
from prefect.utilities.annotations import quote
from prefect.runtime import flow_run

from flows import history
from flows.runtime import FLOW_OPTIONS, TASK_OPTIONS, Runtime, blob_key, child_event_id, split_batches
from sidecar import crashpoints
from sidecar.dataplane.blobs import BlobInfo, gather_all, gather_bounded
from sidecar.dataplane import topics
from sidecar.dataplane.events import STORE as EVENT_BUS
from sidecar.errors import DataPlaneError, DataPlaneTimeout, DataPlaneUnavailable, InputError
from sidecar.layout import check_event_meta_sizes, DonePlan, OutputFile, PlannedEvent, plan_outputs
from sidecar.models import BlobFile, DoneSummary, Event, EventContext, EventMeta, EventRef, Insight
from sidecar.orchestration import fleet_slot


@task(name="upload-files", task_run_name="upload-{count}-files", **TASK_OPTIONS)
async def upload_files(runtime: Runtime, files: list[OutputFile], count: int, limit: asyncio.Semaphore,
                       progress: history.TransferProgress) -> list[BlobInfo]:
    """Upload ``files`` to their blob keys; returns what the blob store holds for each."""
    blobs = runtime.dataplane.blobs

    async def one(f: OutputFile) -> BlobInfo:
        # A file the module changed (grown, truncated, rewritten, deleted) since the plan is the module's
        # fault, whatever the provider made of it: a 409 naming it, not a 500/503 or a blob that
        # disagrees with the file and its event meta (OutputChanged: not retried, nothing more committed).
        try:
            info = await progress.track(blobs.upload(f.local, blob_key(runtime.cfg, f.path)), f.size)
        except Exception:
            f.check_unchanged()
            raise
        f.check_unchanged(info.size)
        crashpoints.reached("uploaded-file")
        return info

    async with fleet_slot(runtime.cfg.transfer.fleetlimit):
        return await gather_bounded(limit, [one(f) for f in files])


@task(name="upsert-insight", task_run_name="upsert-insight", **TASK_OPTIONS)
async def upsert_insight(runtime: Runtime, insight: Insight) -> None:
    """Store the run's insight under its execution id."""
    await runtime.dataplane.documents.upsert_insight(insight)


@task(name="upsert-event-metas", task_run_name="upsert-{count}-event-metas", **TASK_OPTIONS)
async def upsert_event_metas(runtime: Runtime, metas: list[EventMeta], count: int) -> None:
    """Store each child's event meta under the child event id."""
    await runtime.dataplane.documents.upsert_event_metas(metas)


@task(name="publish-events", task_run_name="publish-{count}-events", **TASK_OPTIONS)
async def publish_events(runtime: Runtime, events: list[Event], count: int) -> None:
    """Publish the child events (message id = child event id, so a re-publish is dropped where the topic
    has duplicate detection); the ids of each batch are recorded on the volume before its transfer and
    again once the bus accepted it (``sidecar.runstate``). Events recorded as accepted (by this task's
    previous try) are not sent again. A batch an earlier attempt sent without an answer (this task's
    previous try, a killed predecessor) is recorded as "may have been delivered" before it is sent again."""
    runtime.run.settle_sending(maybe_delivered=True)
    # A retry of this task sends only what the bus has not accepted: a batch accepted before the failure
    # (recorded by on_published) was delivered again on every retry after a connection lost between batches.
    published = set(runtime.run.record.published)
    events = [event for event in events if event.id not in published]
    uncertain = set(runtime.run.record.uncertain)
    resent = [event.id for event in events if event.id in uncertain]
    if resent:
        log_resend(resent)
    await runtime.dataplane.events.publish(events, on_published=runtime.run.add_published,
                                           on_sending=runtime.run.add_sending)


def log_resend(ids: list[str]) -> None:
    """Warn that ``ids`` are sent again after a publish whose outcome was never known."""
    logging.getLogger(__name__).warning(
        "publishing %d child events again after an earlier publish of them ended without the event bus's "
        "answer: a topic without duplicate detection may deliver them twice (consumers dedupe on the message "
        "id, the child event id): %s", len(ids), ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else ""))


def _insight(runtime: Runtime, plan: DonePlan) -> Insight:
    ctx = runtime.cfg.context
    return Insight(
        id=ctx.execution_id(), executionId=ctx.execution_id(), eventId=ctx.eventid,
        correlationId=ctx.correlationid, parentEventId=ctx.parenteventid, name=ctx.name, data=plan.insight,
    )


def _child(runtime: Runtime, planned: PlannedEvent, stored: dict[str, BlobInfo]) -> tuple[EventMeta, Event]:
    cfg = runtime.cfg
    ctx = cfg.context
    child_id = child_event_id(cfg, planned.file)
    blobs = runtime.dataplane.blobs
    files = []
    for path in planned.files:
        info = stored[path]
        files.append(BlobFile(path=path, key=info.key, size=info.size, md5=info.md5, url=blobs.url(info.key)))
    meta = EventMeta(
        id=child_id, eventId=child_id, correlationId=ctx.correlationid, parentEventId=ctx.eventid,
        eventType=planned.event_type, producer=ctx.name, files=files, data=planned.data,
    )
    context = EventContext(eventId=child_id, correlationId=ctx.correlationid, parentEventId=ctx.eventid)
    return meta, Event(context=context, type=planned.event_type)


async def _publish_within_deadline(runtime: Runtime, events: list[Event], options: dict) -> None:
    """Run the publish task, its retries included, within the event publisher's deadline (the bound
    the module sees, end to end: ``DESIGN.md``, The sidecar's lifecycle, Time).

    Raises:
        DataPlaneTimeout: the deadline passed; the task run is cancelled and its connections closed.
    """
    publisher = runtime.dataplane.events
    deadline = publisher.deadline
    try:
        try:
            async with asyncio.timeout(deadline.seconds if deadline else None):
                await publish_events.with_options(**options)(runtime, quote(events), len(events))
        except TimeoutError:
            if deadline is None:  # not ours: a timeout inside the task that escaped it
                raise
            where = ", ".join(sorted({publisher.destination(event) for event in events}))
            raise DataPlaneTimeout(EVENT_BUS, f"publishing {len(events)} events to {where} did not finish "
                                              f"within {deadline.seconds:g} s, retries included "
                                              f"({deadline.setting})") from None
    except DataPlaneError:
        runtime.run.settle_sending(maybe_delivered=False)  # refused for good: the bus has none of them
        raise
    except DataPlaneUnavailable as exc:
        runtime.run.settle_sending(maybe_delivered=True)
        # Sent by this attempt or an earlier one (a task retry that failed before sending again included).
        record = runtime.run.record
        uncertain, published = set(record.uncertain), set(record.published)
        maybe = [e.id for e in events if e.id in uncertain and e.id not in published]
        if not maybe:
            raise
        error = type(exc)(exc.store, exc.message.partition(": ")[2] + (
            f"; {len(maybe)} of these events may have been delivered (sent, but the bus's answer never came): "
            "a retried /done sends them again under the same message ids, which a topic with duplicate "
            "detection drops"))
        raise error from exc


async def _commit_point() -> None:
    """Let a pending cancellation (SIGTERM: ``PrefectApi.cancel_running``) stop the commit here, between
    its steps: the development providers write files without ever waiting, so a cancelled flow used to
    run on and store its metas and publish its events before the cancellation could reach it."""
    await asyncio.sleep(0)


@flow(name="done", flow_run_name="done-{runtime.cfg.context.name}-{runtime.cfg.context.eventid}",
      on_failure=[history.record_failure], **FLOW_OPTIONS)
@history.untagged_task_runs
async def done(runtime: Runtime) -> DoneSummary:
    """Commit the outputs under ``out/``; returns the summary ``/done`` answers.

    Args:
        runtime: the run's config, folders and data plane. Child events recorded as published in
            ``runtime.run`` (an earlier attempt, maybe of a sidecar since restarted, published them) are
            not published again; this flow records each batch the event bus accepts.

    Raises:
        InputError: an output breaks the folder contract (HTTP 400); nothing was committed.
        OutputChanged: an output file changed during the call (HTTP 409); no insight, meta or event
            was stored (blobs already uploaded are overwritten by the next /done).
        DataPlaneUnavailable: a service stayed unreachable through the task retries (HTTP 503).
        DataPlaneError: a service refused a request for good (HTTP 502).
    """
    started = time.perf_counter()
    cfg = runtime.cfg
    key_of = functools.partial(blob_key, cfg)
    plan = plan_outputs(runtime.layout, list(cfg.valideventtypes), cfg.maxeventbytes, key_of=key_of)
    check_event_meta_sizes(plan, key_of)
    unroutable = topics.event_problems(cfg.servicebuseventprovider.topic,
                                       [(f"out/events/{e.file}", e.event_type) for e in plan.events])
    if unroutable:
        raise InputError.listing(unroutable)
    options = runtime.task_options()
    stored: dict[str, BlobInfo] = {}
    if plan.files:
        limit = runtime.semaphore()
        upload = upload_files.with_options(**options)
        batches = split_batches(plan.files, cfg.transfer.tasks, lambda f: f.size)
        # gather_all (a TaskGroup): when one batch fails, the others are cancelled and finished before the flow
        # run ends, so no upload outlives the answer (a retried /done never overlaps a stale one).
        async with history.TransferProgress.for_run(runtime, "done", "uploaded", [f.size for f in plan.files]) as progress:
            results = await gather_all(upload(runtime, quote(b), len(b), limit, progress) for b in batches)
        for batch, infos in zip(batches, results):
            stored.update({f.path: info for f, info in zip(batch, infos)})
    crashpoints.reached("uploaded")
    await _commit_point()
    insight = _insight(runtime, plan) if plan.insight else None
    if insight:
        await upsert_insight.with_options(**options)(runtime, insight)
    children = [_child(runtime, planned, stored) for planned in plan.events]
    if children:
        metas = [meta for meta, _ in children]
        await _commit_point()
        await upsert_event_metas.with_options(**options)(runtime, quote(metas), len(metas))
    crashpoints.reached("metas")
    recorded = set(runtime.run.record.published)
    pending = [event for _, event in children if event.id not in recorded]
    if pending:
        await _commit_point()
        await _publish_within_deadline(runtime, pending, options)
    crashpoints.reached("published")
    summary = DoneSummary(
        flowRunId=str(flow_run.get_id()), files=len(plan.files), bytes=plan.bytes,
        seconds=round(time.perf_counter() - started, 3),
        events=[EventRef(eventId=event.id, eventType=event.type) for _, event in children],
    )
    await history.report_done(runtime, plan, stored, insight, children, summary.seconds)
    dumps = runtime.dataplane.dumps
    dumps.write("dev.done", {"summary": summary.model_dump(), "files": [f.path for f in plan.files]})
    if insight:
        dumps.write("insight.json", insight)
    for meta, event in children:
        dumps.write(f"events/{event.id}.json", event)
        dumps.write(f"eventmeta/{meta.id}.json", meta)
    return summary
