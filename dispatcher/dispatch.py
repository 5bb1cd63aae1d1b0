"""The offline Dispatcher: runs a graph of modules on one machine, as Ion's Dispatcher does on a cluster.

Ion's Dispatcher picks up each event from the topic, schedules a module run (the module plus a sidecar)
for every module subscribed to the event's type, watches it until it ends, retries it on failure or
time-out and, after the last attempt, moves the event to a dead-letter queue. Here:

- the topic is the development event publisher's folder ``{rundir}/.dev/events`` (every sidecar of a
  graph run shares ``{rundir}/.dev``); it is read after every attempt, and an event id already seen is
  not dispatched again, as Service Bus duplicate detection would drop it (a module run is at least
  once: an attempt that committed and then failed is retried, and its retry publishes the same ids);
- each module run is one Prefect task run (``{module}-{eventid}``, tags ``correlation:{id}`` and
  ``module:{name}``) of the graph's flow run (``graph-{correlationid}``); its attempts are Prefect
  task retries, with back-off ``retrydelayseconds`` doubled per retry;
- a module's ``concurrency`` bounds its module runs at once (an ``asyncio.Semaphore``, held from the
  first attempt to the last);
- an event whose module run failed every attempt is written to ``{rundir}/deadletter/`` with the
  reason and the module's last log lines.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dispatcher.graph import Graph, as_dict
from dispatcher.launchers import Launcher
from dispatcher.processes import ModuleRun, ModuleRunFailed, Outcome
from sidecar.providers import eventfiles, jsonfiles, localblob
from sidecar.layout import write_json_atomic
from sidecar.models import BlobFile, Event, EventContext, EventMeta, KeyValuePair

log = logging.getLogger("ion-offline")

COMPLETED = "Completed"
DEAD_LETTER = "Dead letter"


@dataclass
class RunRecord:
    """One module run of the graph run, as the summary shows it."""

    module: str
    eventid: str
    eventtype: str
    attempts: int = 0
    seconds: float = 0.0
    status: str = "Pending"
    reason: str = ""
    folders: list[str] = field(default_factory=list)


class Dispatcher:
    """Dispatches the events of one graph run until none is pending.

    Args:
        graph: the checked graph.
        rundir: the graph run's folder (``.dev/``, ``runs/``, ``deadletter/``, ``summary.json``).
        correlationid: the graph run's correlation id.
        launcher: how attempts are started.

    ``__slots__`` and no ``__dict__``: Prefect records flow and task parameters by JSON-encoding them,
    and this object is passed as one; it is recorded as ``<Dispatcher>``.
    """

    __slots__ = ("graph", "rundir", "correlationid", "launcher", "seen", "records", "limits", "_group", "_lock",
                 "_context")

    def __init__(self, graph: Graph, rundir: Path, correlationid: str, launcher: Launcher):
        self.graph = graph
        self.rundir = rundir.resolve()
        self.correlationid = correlationid
        self.launcher = launcher
        self.seen: set[str] = set()
        self.records: dict[tuple[str, str], RunRecord] = {}
        self.limits = {name: asyncio.Semaphore(spec.concurrency) for name, spec in graph.config.modules.items()}
        self._group: asyncio.TaskGroup | None = None
        self._lock = asyncio.Lock()
        self._context: contextvars.Context | None = None

    def __repr__(self) -> str:
        return "<Dispatcher>"

    @property
    def devdir(self) -> Path:
        return self.rundir / ".dev"

    @property
    def events_dir(self) -> Path:
        return self.devdir / "events"

    @property
    def deadletter_dir(self) -> Path:
        return self.rundir / "deadletter"

    async def seed(self, files: Path | None, data: dict[str, str]) -> Event:
        """Publish the initial event (type ``initial.type``) the way a sidecar would: its files into the
        development blob store, its event meta into the development document store, then the event.

        Args:
            files: a folder whose files (recursively) the event carries, or None.
            data: pairs the first module finds in ``in/meta.json``.
        """
        seed_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"ion-offline/{self.correlationid}/seed"))
        # The development providers' own factories: the folders under devdir are theirs to name.
        blobs = localblob.create(None, self.devdir)
        carried: list[BlobFile] = []
        if files is not None:
            for path in sorted(p for p in files.rglob("*") if p.is_file()):
                relative = path.relative_to(files).as_posix()
                info = await blobs.upload(path, f"{seed_id}/ion-offline/{relative}")
                carried.append(BlobFile(path=relative, key=info.key, size=info.size, md5=info.md5))
        await blobs.close()
        pairs = [KeyValuePair(key=k, value=str(v)) for k, v in data.items()]
        event_type = self.graph.config.initial.type
        meta = EventMeta(id=seed_id, eventId=seed_id, correlationId=self.correlationid, parentEventId="",
                         eventType=event_type, producer="ion-offline", files=carried, data=pairs)
        await jsonfiles.create(None, self.devdir).upsert_event_metas([meta])
        event = Event(context=EventContext(eventId=seed_id, correlationId=self.correlationid), type=event_type,
                      data=pairs)
        await eventfiles.create(None, self.devdir).publish([event])
        return event

    async def run(self) -> list[RunRecord]:
        """Dispatch every event in the topic folder (the seed first) and every event its module runs
        publish, until no module run is pending. Returns the module runs in the order they started."""
        self.events_dir.mkdir(parents=True, exist_ok=True)
        # Module runs are started from inside other module runs' task runs; each starts from a copy of the
        # flow run's context instead, so its task run is the flow's child, not the other task's.
        self._context = contextvars.copy_context()
        async with asyncio.TaskGroup() as group:
            self._group = group
            await self.collect()
        self._group = None
        return list(self.records.values())

    async def collect(self) -> None:
        """Read the topic folder and start the module runs of every event not seen before."""
        async with self._lock:
            fresh: list[tuple[float, Path]] = []
            for path in self.events_dir.glob("*.json"):
                if path.stem not in self.seen:
                    fresh.append((path.stat().st_mtime, path))
            for _, path in sorted(fresh):
                event = Event.model_validate_json(path.read_text(encoding="utf-8"))
                self.seen.add(path.stem)
                subscribers = self.graph.subscribers(event.type)
                if not subscribers:
                    log.info("event %s (%s) has no subscriber", event.id, event.type)
                for module in subscribers:
                    record = RunRecord(module, event.id, event.type)
                    self.records[(module, event.id)] = record
                    assert self._group is not None and self._context is not None
                    self._group.create_task(self._module_run(record, event), context=self._context.copy())

    async def _module_run(self, record: RunRecord, event: Event) -> None:
        spec = self.graph.config.modules[record.module]
        delays = [spec.retrydelayseconds * 2**i for i in range(spec.attempts - 1)]
        run_task = module_run.with_options(
            retries=spec.attempts - 1, retry_delay_seconds=delays or 0,
            tags={f"correlation:{self.correlationid}", f"module:{record.module}", f"launcher:{self.launcher.name}"})
        async with self.limits[record.module]:
            started = time.monotonic()
            state = await run_task(self, record.module, event.id, event.model_dump(mode="json"), return_state=True)
            record.seconds = round(time.monotonic() - started, 3)
        if state.is_completed():
            record.status = COMPLETED
        else:
            record.status = DEAD_LETTER
            self.dead_letter(record, event)

    async def attempt(self, module: str, event: dict) -> Outcome:
        """One attempt of ``module`` on ``event``; then the topic folder is read again (also after a
        failed attempt: one that committed and then failed has published its events)."""
        record = self.records[(module, event["context"]["eventId"])]
        record.attempts += 1
        spec = self.graph.config.modules[module]
        context = event["context"]
        folder = self.rundir / "runs" / module / context["eventId"] / f"attempt-{record.attempts}"
        record.folders.append(str(folder))
        run = ModuleRun(module=module, eventid=context["eventId"], correlationid=self.correlationid,
                        parenteventid=context.get("parentEventId", ""), attempt=record.attempts,
                        command=list(spec.command), cwd=str(self.graph.resolve(spec.cwd)), env=dict(spec.env),
                        valideventtypes=list(spec.valideventtypes), timeoutseconds=spec.timeoutseconds,
                        startupseconds=spec.startupseconds,
                        rundir=str(self.rundir), folder=str(folder))
        outcome = await self.launcher.launch(run)  # a failed attempt is an outcome, not an exception
        await self.collect()
        record.reason = outcome.reason
        write_json_atomic(folder / "outcome.json", outcome.as_dict())
        if outcome.ok:
            log.info("%s %s attempt %s: completed in %.1f s", module, run.eventid, run.attempt, outcome.seconds)
        else:
            log.warning("%s %s attempt %s of %s failed after %.1f s: %s (log: %s)", module, run.eventid, run.attempt,
                        spec.attempts, outcome.seconds, outcome.reason, run.module_log)
        return outcome

    def dead_letter(self, record: RunRecord, event: Event) -> Path:
        """Write ``deadletter/{module}--{eventid}.json``: the event, the module, the attempts, the last
        attempt's reason and the module's last log lines."""
        last = json.loads((Path(record.folders[-1]) / "outcome.json").read_text()) if record.folders else {}
        target = self.deadletter_dir / f"{record.module}--{record.eventid}.json"
        write_json_atomic(target, {
            "event": event.model_dump(mode="json"), "module": record.module, "attempts": record.attempts,
            "reason": record.reason or "the module run did not complete", "logLines": last.get("log", []),
            "folders": record.folders,
        })
        log.warning("dead letter: %s for event %s after %s attempts: %s", record.module, record.eventid,
                    record.attempts, record.reason)
        return target


@task(name="module-run", task_run_name="{module}-{eventid}", persist_result=False, cache_policy=NO_CACHE)
async def module_run(dispatcher: Dispatcher, module: str, eventid: str, event: dict) -> dict:
    """One attempt of a module run (Prefect retries it): the outcome, or :class:`ModuleRunFailed`."""
    outcome = await dispatcher.attempt(module, event)
    if not outcome.ok:
        raise ModuleRunFailed(outcome.reason)
    return outcome.as_dict()


@flow(name="graph", flow_run_name="graph-{correlationid}", persist_result=False, log_prints=False)
async def graph_run(dispatcher: Dispatcher, correlationid: str, files: str | None = None,
                    data: dict[str, str] | None = None) -> list[dict]:
    """The graph run: seed the initial event, dispatch until nothing is pending, write the summary.

    Args:
        dispatcher: the dispatcher of this graph run.
        correlationid: its correlation id (the flow run's name).
        files: a folder the seed event carries, or None.
        data: the seed event's pairs.

    Returns:
        One dict per module run (:class:`RunRecord`), also written to ``{rundir}/summary.json``.
    """
    seed = await dispatcher.seed(Path(files) if files else None, data or {})
    log.info("graph run %s: seeded event %s (%s) in %s", correlationid, seed.id, seed.type, dispatcher.rundir)
    records = [asdict(r) for r in await dispatcher.run()]
    write_json_atomic(dispatcher.rundir / "summary.json", {
        "correlationId": correlationid, "graph": str(dispatcher.graph.path),
        "modules": as_dict(dispatcher.graph.config)["modules"], "runs": records})
    return records


def summary_table(records: list[RunRecord]) -> str:
    """The summary printed at the end: module, event, attempts, seconds, status (one row per run)."""
    rows = [("module", "event", "type", "attempts", "seconds", "status")]
    rows += [(r.module, r.eventid, r.eventtype, str(r.attempts), f"{r.seconds:.1f}", r.status) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
