"""Debug dumps of development mode: ``{devdir}/dumps/{eventid}/{module}/...`` shows what a run committed.

Under ``dumps/``, never beside ``blobs/``, ``documents/``, ``events/`` and ``prefect/``: an event id
equal to one of those names wrote debug files among the published events (hostile trial). Per module
name under the event id: the modules an event fans out to share its event id, and each overwrote the
others' dumps (hostile trial).

``DESIGN.md`` (Development mode): ``dev.ready``, ``dev.done``, the insight, and each child's event and
event meta, so a module author can see exactly what would have been committed.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from sidecar.layout import write_json_atomic
from sidecar.paths import id_segment


class DebugDumps:
    """Writes the dumps of one run below ``root`` (``{devdir}/dumps/{eventid}/{module}``)."""

    def __init__(self, root: Path):
        self.root = root

    def write(self, name: str, value: BaseModel | list | dict) -> None:
        """Write ``value`` as JSON to ``root/name`` (``name`` may contain one subfolder)."""
        payload = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        write_json_atomic(self.root / name, payload)

    @staticmethod
    def for_run(devdir: Path, event_id: str, module: str) -> "DebugDumps":
        """The dumps of module ``module`` handling event ``event_id``; each is one folder name
        (:func:`~sidecar.paths.id_segment`), so neither can leave ``{devdir}/dumps``."""
        return DebugDumps(devdir / "dumps" / id_segment(event_id) / id_segment(module))


class NoDumps(DebugDumps):
    """Outside development mode nothing is dumped."""

    def __init__(self) -> None:
        super().__init__(Path())

    def write(self, name: str, value: BaseModel | list | dict) -> None:
        pass
