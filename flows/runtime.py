"""What the ready and done flows share: the run's runtime objects and the task policy.

Each unit of data-plane I/O is a Prefect task run with retries (``DESIGN.md``: One run); Prefect's task
retries are the only retry layer, so providers are configured not to retry on their own.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.settings import get_current_settings
from prefect.states import State

from sidecar.config import ID_NAMESPACE, SidecarConfig
from sidecar.dataplane import DataPlane, build_dataplane
from sidecar.errors import is_transient
from sidecar.layout import ModuleLayout
from sidecar.runstate import RunStore

T = TypeVar("T")

# Task options common to every data-plane task: no result persistence or caching (a retried /done
# must really redo the I/O), and one retry policy.
TASK_OPTIONS: dict[str, Any] = {"persist_result": False, "cache_policy": NO_CACHE}

# Flow options common to the ready and done flows. No result persistence (the summary goes back in the HTTP
# answer), and a result storage named here: left unset, Prefect's engine asks the API for the server's
# default result storage on every flow run, twice, each time through a new synchronous client (a TLS
# context of its own) and a blocking request on the event loop (``ResultStore.update_for_flow`` in
# ``prefect/results.py``, 3.x), only to store nothing. The folder is Prefect's local default; nothing is
# written there while ``persist_result`` is False.
FLOW_OPTIONS: dict[str, Any] = {
    "validate_parameters": False,
    "persist_result": False,
    "result_storage": Path(get_current_settings().results.local_storage_path),
}


class Runtime:
    """The objects a flow run needs: config, the module's folders and the data plane.

    Has ``__slots__`` and no ``__dict__`` on purpose: Prefect records flow parameters in its API by
    JSON-encoding them, and this object holds secrets; the UI shows ``flows.history.describe`` of it.
    """

    __slots__ = ("cfg", "layout", "dataplane", "run")

    def __init__(self, cfg: SidecarConfig, layout: ModuleLayout, dataplane: DataPlane):
        self.cfg = cfg
        self.layout = layout
        self.dataplane = dataplane
        # The run's record on the volume (phase, summaries, published child events): a retried or
        # restarted /done skips the events recorded there.
        self.run = RunStore(layout.basedir, cfg.context.eventid, cfg.context.name)

    @classmethod
    def for_config(cls, cfg: SidecarConfig) -> "Runtime":
        """The runtime ``cfg`` describes: the module's folders under ``cfg.basedir`` (made absolute)
        and the data-plane providers ``cfg`` selects (connections open lazily)."""
        return cls(cfg, ModuleLayout(Path(cfg.basedir).resolve()), build_dataplane(cfg))

    def task_options(self) -> dict[str, Any]:
        """Retries and the wait before each (seconds) from ``transfer.retries``/``retrydelayseconds``.

        One number, not a list of delays: the Prefect UI shows a task run's retry delay as a duration
        and a list of several delays as "NaNs".
        """
        return {
            "retries": self.cfg.transfer.retries,
            "retry_delay_seconds": self.cfg.transfer.retrydelayseconds,
            "retry_condition_fn": retry_transient,
        }

    def semaphore(self) -> asyncio.Semaphore:
        """A fresh bound on blob transfers in flight for one flow run (``transfer.concurrency``)."""
        return asyncio.Semaphore(max(1, self.cfg.transfer.concurrency))


def retry_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry transient failures only (see ``errors.is_transient``)."""
    exc = state.data
    return isinstance(exc, BaseException) and is_transient(exc)


def child_event_id(cfg: SidecarConfig, event_file: str) -> str:
    """The child event id for ``out/events/{event_file}``: a UUID5 of (event id, module name, file
    name), so a retried ``/done`` derives the same ids (``DESIGN.md``: Data plane records)."""
    ctx = cfg.context
    return str(uuid.uuid5(ID_NAMESPACE, f"{ctx.eventid}/{ctx.name}/{event_file}"))


def blob_key(cfg: SidecarConfig, path: str) -> str:
    """The blob key of output ``path`` (relative to out/data): ``{eventid}/{name}/{path}``."""
    return f"{cfg.context.eventid}/{cfg.context.name}/{path}"


# A transfer is split into batches of at least this many bytes (``split_batches``), 64 MiB.
BATCH_LEAST_BYTES = 64 * 1024 * 1024


def split_batches(items: Sequence[T], parts: int, size: Callable[[T], int],
                  least: int | None = None) -> list[list[T]]:
    """Split ``items`` into at most ``parts`` non-empty batches of about equal total ``size`` (bytes), and
    of at least ``least`` bytes each (default :data:`BATCH_LEAST_BYTES`): a transfer of less than
    ``2 * least`` is one batch.

    Few large batches keep the number of concurrent task runs (and so writes to Prefect's database)
    small however many files move; order inside a batch follows ``items``. A batch is what a task run's
    retry moves again, which matters for large transfers only, while each task run costs every call its
    bookkeeping: three more for 1000 files of 4 KiB cost the Prefect server about 0.1 s of CPU per call
    (0.21-0.27 s against 0.12-0.15 s, with the sidecar's own transfer of them taking 0.6-0.8 s).
    """
    if not items:
        return []
    total = sum(size(item) for item in items)
    least = BATCH_LEAST_BYTES if least is None else least
    parts = max(1, min(parts, len(items), total // max(least, 1)))
    bins: list[list[T]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for item in sorted(items, key=size, reverse=True):
        lightest = loads.index(min(loads))
        bins[lightest].append(item)
        loads[lightest] += size(item)
    order = {id(item): i for i, item in enumerate(items)}
    return [sorted(b, key=lambda it: order[id(it)]) for b in bins if b]
