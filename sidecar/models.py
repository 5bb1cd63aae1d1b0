"""The records that cross the folder contract and the data plane (pydantic).

Names follow ``DESIGN.md`` (Data plane records) and keep the original Sidecar's camelCase field names
(``eventId``, ``correlationId``, ``parentEventId``, ``files``, ``data``) so that existing consumers
can query them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, RootModel


class KeyValuePair(BaseModel):
    """One ``{"key": ..., "value": ...}`` pair; both are strings (spec: Insight Schema)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    value: str


class KeyValuePairs(RootModel[list[KeyValuePair]]):
    """A JSON array of key/value pairs: ``in/meta.json``, ``out/meta.json`` and each event file."""

    root: list[KeyValuePair] = Field(default_factory=list)

    def get(self, key: str) -> str | None:
        """Return the value of the first pair named ``key``, or None."""
        return next((p.value for p in self.root if p.key == key), None)


class _Record(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class EventContext(_Record):
    """The context an event carries: which event, which chain, which parent."""

    eventId: str
    correlationId: str
    parentEventId: str = ""


class BlobFile(_Record):
    """One file an event passes on: its path relative to ``out/data`` (and later ``in/data``)."""

    path: str
    key: str  # blob key in the blob store
    # A stored event meta is read from outside (anyone with access to the document store): a size below 0 or
    # an MD5 that is not 32 lower-case hex digits (as the providers write it) could never verify, and
    # /ready answered 503 (retry) for good; refused as not a valid record (502) instead.
    size: int = Field(ge=0)  # bytes
    md5: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")  # hex digest, where known
    url: str | None = None  # read-only SAS URL, where the blob store can sign one


class EventMeta(_Record):
    """What a child module receives, stored under the child event id (``id``)."""

    id: str
    eventId: str
    correlationId: str
    parentEventId: str
    eventType: str
    producer: str  # the module name that produced the event
    files: list[BlobFile] = Field(default_factory=list)
    data: list[KeyValuePair] = Field(default_factory=list)


class Insight(_Record):
    """A run's insights (``out/meta.json``), stored under the execution id (``id``)."""

    id: str
    executionId: str
    eventId: str
    correlationId: str
    parentEventId: str
    name: str
    data: list[KeyValuePair] = Field(default_factory=list)


class Event(_Record):
    """A published event, as Ion's dispatcher reads it (``DESIGN.md``: Data plane records)."""

    context: EventContext
    type: str
    previousStages: list[str] = Field(default_factory=list)
    data: list[KeyValuePair] = Field(default_factory=list)

    @property
    def id(self) -> str:
        """The event id, which is also the message id it is published under."""
        return self.context.eventId


class EventRef(_Record):
    """An event a ``/done`` published: its id and type."""

    eventId: str
    eventType: str


class ReadySummary(_Record):
    """The JSON body of a successful ``/ready``: the flow run and what was staged."""

    flowRunId: str
    files: int
    bytes: int  # bytes staged into in/data
    seconds: float  # wall time of the flow run


class DoneSummary(ReadySummary):
    """The JSON body of a successful ``/done``: what was committed, and the events published."""

    events: list[EventRef] = Field(default_factory=list)
