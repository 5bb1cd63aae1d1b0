"""EventPublisher: the event building block of the data plane.

Providers: ``sidecar.providers.servicebus`` (Azure Service Bus topics) and ``sidecar.providers.eventfiles``
(development: one JSON file per event), chosen by ``sidecar.dataplane.registry``. Publishing the same
event twice (same id) must be harmless on every provider: the file is overwritten, Service Bus drops
the duplicate message id.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

from sidecar.models import Event

STORE = "event bus"

# Called with the ids of each batch of events right after the event bus accepted it (``on_published``),
# or right before its transfer goes out (``on_sending``: from then on, until its answer, the bus may
# have it without the sidecar knowing).
OnPublished = Callable[[list[str]], None]


class Deadline(NamedTuple):
    """The bound on a whole publish step (task retries included): ``seconds``, and the ``setting``
    (dotted config key) a user changes it with, named in the timeout's message."""

    seconds: float
    setting: str


class EventPublisher(Protocol):
    """Publishes child events.

    Errors (``sidecar.dataplane.errors``): a bus that cannot be reached in time raises
    :class:`~sidecar.errors.DataPlaneUnavailable` (``store="event bus"``); a refused publish raises
    :class:`~sidecar.errors.DataPlaneError`.
    """

    # The bound the done flow puts on its publish step, or None for none (a local folder).
    deadline: Deadline | None

    def describe(self) -> str:
        """Where events go, for people reading the run history (no secret)."""

    async def publish(self, events: list[Event], on_published: OnPublished | None = None,
                      on_sending: OnPublished | None = None) -> None:
        """Publish ``events`` (all or, on error, possibly some of them; retrying is safe), calling
        ``on_sending(ids)`` before each batch whose outcome could be lost (a network transfer) and
        ``on_published(ids)`` after each batch the bus accepted."""

    def destination(self, event: Event) -> str:
        """Where ``event`` goes, for people reading the run history (e.g. ``topic 'x'``)."""

    async def check_topics(self, event_types: list[str]) -> bool | None:
        """At start-up: log once whether a retried publish can deliver events of ``event_types`` twice
        (True: the bus drops repeated message ids; False: it does not; None: not known). Never raises."""

    async def close(self) -> None:
        """Release connections."""
