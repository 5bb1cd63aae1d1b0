"""The ready flow: stage a module's inputs (``DESIGN.md``: One run).

``get_event_meta(eventid)`` -> download the files it lists into ``in/data`` (parallel, bounded, in a few
batch task runs) -> write ``in/meta.json`` from the meta's data pairs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.utilities.annotations import quote
from prefect.runtime import flow_run

from flows import history
from flows.runtime import FLOW_OPTIONS, TASK_OPTIONS, Runtime, split_batches
from sidecar.dataplane.blobs import BlobInfo, gather_all, gather_bounded
from sidecar.errors import DataPlaneError, VolumeError, volume_error
from sidecar.models import BlobFile, EventMeta, ReadySummary
from sidecar.orchestration import fleet_slot
from sidecar.paths import Confinement, collisions, name_folding, name_problem, shown


@task(name="get-event-meta", task_run_name="get-event-meta", **TASK_OPTIONS)
async def get_event_meta(runtime: Runtime, event_id: str) -> EventMeta | None:
    """Read the event meta of ``event_id`` from the document store (None: first module of a graph)."""
    return await runtime.dataplane.documents.get_event_meta(event_id)


@task(name="download-files", task_run_name="download-{count}-files", **TASK_OPTIONS)
async def download_files(runtime: Runtime, files: list[BlobFile], count: int, limit: asyncio.Semaphore,
                         progress: history.TransferProgress) -> int:
    """Download ``files`` into ``in/data`` at their relative paths; returns the bytes moved.

    Each file is downloaded and verified in the sidecar's own folder ``in/.staging``
    (:attr:`~sidecar.layout.ModuleLayout.staging`), then renamed into ``in/data``: no temp file ever
    takes a name in ``in/data``, where it could be (or overwrite, or delete) an input of the same name.
    """
    blobs = runtime.dataplane.blobs
    layout = runtime.layout

    async def one(f: BlobFile) -> BlobInfo:  # the download starts only when its turn comes
        held = staged_file(layout.staging, f.path)
        try:
            info = await progress.track(blobs.download(f.key, held, BlobInfo(f.key, f.size, f.md5)), f.size)
        except VolumeError as exc:  # named as the input the module waits for, not the staged file's hash
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else OSError(exc.errno, exc.message)
            raise VolumeError(f"{layout.name(layout.in_data / f.path)} (downloading in "
                              f"{layout.name(layout.staging)})", cause) from cause
        place(held, layout.in_data / f.path, layout.basedir)
        return info

    async with fleet_slot(runtime.cfg.transfer.fleetlimit):
        infos = await gather_bounded(limit, [one(f) for f in files])
    return sum(info.size for info in infos)


def staged_file(staging: Path, path: str) -> Path:
    """Where the input at ``path`` (relative to ``in/data``) is downloaded before it is moved into place:
    ``staging/{sha256 of path}``, a name of hex digits, so never a download's own partial file (which
    starts with a dot, ``sidecar.dataplane.blobs.partial_path``) nor another input's (paths do not collide)."""
    return staging / hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()


def place(held: Path, local: Path, basedir: Path) -> None:
    """Rename the verified download ``held`` to ``local`` (same file system: atomic), creating its folders.

    Raises:
        VolumeError: the module's volume refused it (naming the path under ``basedir``).
    """
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(held, local)
    except OSError as exc:
        held.unlink(missing_ok=True)
        raise (volume_error(exc, basedir) or exc) from exc


def _check_paths(meta: EventMeta, in_data: Path, fold: Callable[[str], str] | None = None) -> None:
    """Confine what an event meta (written by another module's sidecar, or anyone with access to the
    document store) asks to stage: every ``files[].path`` must be a good name inside ``in/data`` and
    every blob ``key`` a good blob name (``sidecar.paths``), and no two paths may merge, also as the
    file system of ``in/data`` compares names (``fold``, :func:`sidecar.paths.name_folding`: on a
    disk that does not tell case apart, ``Case.txt`` would overwrite ``case.txt`` behind a 200).

    Raises:
        DataPlaneError: naming the event meta and the path or key; nothing has been staged yet.
    """
    def refuse(what: str, value: str, problem: str) -> DataPlaneError:
        return DataPlaneError("document store", f"event meta '{shown(meta.id)}' lists {what} '{shown(value)}', "
                                                f"which {problem}; nothing was staged")

    confine = Confinement(in_data)
    for f in meta.files:
        try:
            confine(f.path)
        except ValueError as exc:
            raise refuse("path", f.path, str(exc)) from None
        problem = name_problem(f.key)
        if problem:
            raise refuse("blob key", f.key, problem)
    for first, second in collisions((f.path for f in meta.files), fold):
        where = "" if collisions([first, second]) else (
            " on this file system, which does not tell case or Unicode normalisation forms apart")
        raise refuse("path", second, f"collides with '{shown(first)}'{where}")


def _check_first_module(runtime: Runtime) -> None:
    """No event meta was found for this run's event: fine for the first module of a graph (no
    ``--context.parenteventid``), but a run with a parent event lost its inputs, and staging nothing
    would let the module run on none.

    Raises:
        DataPlaneError: (HTTP 502, as a blob listed but missing) naming the event, its parent event and
            the document store where the meta was looked for.
    """
    ctx = runtime.cfg.context
    if ctx.parenteventid:
        raise DataPlaneError("document store", (
            f"no event meta for event '{shown(ctx.eventid)}' (a child of event '{shown(ctx.parenteventid)}') "
            f"in {runtime.dataplane.documents.describe()}: its inputs cannot be staged. The parent's sidecar "
            "stores it there on /done: check that this sidecar uses the same document store (collection, "
            "--devdir or working folder in development mode); a first module of a graph has no "
            "--context.parenteventid"))


@flow(name="ready", flow_run_name="ready-{runtime.cfg.context.name}-{runtime.cfg.context.eventid}",
      on_failure=[history.record_failure], **FLOW_OPTIONS)
@history.untagged_task_runs
async def ready(runtime: Runtime) -> ReadySummary:
    """Stage the inputs of ``runtime.cfg.context.eventid``; returns the summary ``/ready`` answers.

    Raises:
        DataPlaneUnavailable: a service stayed unreachable through the task retries (HTTP 503).
        DataPlaneError: a blob is missing, the event meta is unusable, or a child's event meta is
            missing (HTTP 502).
        InputError: ``in`` or ``out`` is a link or not a folder (HTTP 400); nothing was deleted.
        VolumeError: the module's volume refused a write (HTTP 507 when full, else 500).
    """
    started = time.perf_counter()
    layout = runtime.layout
    layout.check_folders()
    stale = layout.clear()
    if stale:
        get_run_logger().warning("removed what another run left in the module's folders: %s", ", ".join(stale))
    layout.prepare()
    options = runtime.task_options()
    meta = await get_event_meta.with_options(**options)(runtime, runtime.cfg.context.eventid)
    if meta is None:
        _check_first_module(runtime)
    moved = 0
    files = meta.files if meta else []
    if meta:
        limit = runtime.semaphore()
        batches = split_batches(files, runtime.cfg.transfer.tasks, lambda f: f.size)
        download = download_files.with_options(**options)
        # gather_all (a TaskGroup): when one batch fails, the others are cancelled and finished before the flow
        # run ends, so no download writes into in/data after the answer (or into a retry's fresh in/).
        try:
            # The probe file goes to the sidecar's own folder too (one file system with in/data), never
            # among the inputs' names.
            layout.staging.mkdir(exist_ok=True)
            _check_paths(meta, layout.in_data, name_folding(layout.staging))
            async with history.TransferProgress.for_run(runtime, "ready", "downloaded",
                                                        [f.size for f in files]) as progress:
                moved = sum(await gather_all(download(runtime, quote(b), len(b), limit, progress) for b in batches))
        finally:  # what a failed download left; a killed /ready leaves it to the next one's clear()
            shutil.rmtree(layout.staging, ignore_errors=True)
    layout.write_input_meta(meta.data if meta else [])
    summary = ReadySummary(
        flowRunId=str(flow_run.get_id()), files=len(files), bytes=moved,
        seconds=round(time.perf_counter() - started, 3),
    )
    await history.report_ready(runtime, meta, summary.files, summary.bytes, summary.seconds)
    dumps = runtime.dataplane.dumps
    dumps.write("dev.ready", {"summary": summary.model_dump(), "eventMeta": meta.model_dump() if meta else None})
    return summary
