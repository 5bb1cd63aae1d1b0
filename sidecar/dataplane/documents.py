"""DocumentStore: the document building block of the data plane (event metas and insights).

Event metas are keyed by the child event id, insights by the execution id (``DESIGN.md``: Data plane
records), so every write is an idempotent upsert. Providers: ``sidecar.providers.mongo`` (MongoDB or
Cosmos DB) and ``sidecar.providers.jsonfiles`` (development), chosen by ``sidecar.dataplane.registry``.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from sidecar.errors import DataPlaneError
from sidecar.models import EventMeta, Insight

STORE = "document store"
R = TypeVar("R", bound=BaseModel)


def parse_record(model: type[R], doc: Any, where: str) -> R:
    """``doc`` (a stored document, as the provider read it) as a ``model`` record: the one check every
    provider applies to what it reads, so a document that is not a valid record is refused alike in
    development and production (HTTP 502, naming it), never a 500.

    Args:
        model: :class:`~sidecar.models.EventMeta` or :class:`~sidecar.models.Insight`.
        doc: the document's fields (without the store's own ``_id``).
        where: the document, as messages name it (e.g. ``"event meta 'x' in collection 'c'"``).

    Raises:
        DataPlaneError: naming ``where`` and the first field that is wrong.
    """
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DataPlaneError(STORE, f"{where} is not a valid record: {exc.error_count()} errors, "
                                    f"first: {first['loc']}: {first['msg']}") from exc


class DocumentStore(Protocol):
    """Stores event metas and insights. Every method is a coroutine; none blocks the event loop.

    Errors (``sidecar.dataplane.errors``): a service that cannot be reached raises
    :class:`~sidecar.errors.DataPlaneUnavailable` (``store="document store"``); a refused request, or a
    stored document that is not a valid record, raises :class:`~sidecar.errors.DataPlaneError`.
    """

    def describe(self) -> str:
        """Where documents are kept, for people reading the run history (no secret)."""

    async def get_event_meta(self, event_id: str) -> EventMeta | None:
        """The event meta stored for ``event_id``, or None when there is none (first module)."""

    async def upsert_event_metas(self, metas: list[EventMeta]) -> None:
        """Store each meta under its ``id``, replacing any earlier copy."""

    async def upsert_insight(self, insight: Insight) -> None:
        """Store the insight under its ``id`` (the execution id), replacing any earlier copy."""

    async def get_insight(self, execution_id: str) -> Insight | None:
        """The insight stored for ``execution_id``, or None."""

    async def close(self) -> None:
        """Release connections."""
