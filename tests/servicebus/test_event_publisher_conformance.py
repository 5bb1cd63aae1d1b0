"""The EventPublisher conformance suite: the same tests against every provider of the event slot
(``DESIGN.md``: Layout), the development file publisher and Azure Service Bus (over the AMQP peer, with
a fixed topic and with one topic per event type).

Each case reads back what a consumer of one event type receives: for the file publisher the event files
of that type (the file name is the message id); for Service Bus what an SDK subscription receiver gets,
on the type's own topic or, with a fixed topic, filtered on the ``eventType`` application property as
a subscription rule would. "Exactly once" relies on Service Bus duplicate detection by message id, which
the peer implements (``amqp_peer.py``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import unquote

import pytest

from sidecar.providers.servicebus.config import ServiceBusConfig
from sidecar.dataplane.events import EventPublisher
from sidecar.providers.eventfiles import FileEventPublisher
from sidecar.providers.servicebus.publisher import PER_EVENT_TYPE, ServiceBusEventPublisher
from sidecar.models import Event, EventContext, KeyValuePair
from testsupport.amqp_peer import AmqpPeer
from testsupport.servicebus import Received, receive_all, unique


def make_events(count: int, types: list[str], data_bytes: int = 0) -> list[Event]:
    """``count`` events cycling through ``types``, each carrying ``data_bytes`` of data."""
    correlation = unique("corr")
    return [Event(context=EventContext(eventId=unique("evt"), correlationId=correlation, parentEventId="evt-parent"),
                  type=types[i % len(types)], data=[KeyValuePair(key="pad", value="x" * data_bytes)] if data_bytes else [])
            for i in range(count)]


class FileCase:
    """The development publisher: one JSON file per event id."""

    def __init__(self, root: Path):
        self.root = root

    def publisher(self) -> EventPublisher:
        return FileEventPublisher(self.root)

    def prepare(self, types: list[str]) -> None:
        pass

    def published(self, types: list[str]) -> dict[str, list[Received]]:
        found: dict[str, list[Received]] = {t: [] for t in types}
        for file in sorted(self.root.glob("*.json")):
            event = Event.model_validate(json.loads(file.read_text()))
            found.setdefault(event.type, []).append(Received(
                event=event, message_id=unquote(file.stem), correlation_id=event.context.correlationId,
                subject=event.type, event_type=event.type, content_type="application/json"))
        return found


class ServiceBusCase:
    """Service Bus over the AMQP peer; ``per_type``: topic ``{eventType}``, else one fixed topic."""

    def __init__(self, peer: AmqpPeer, per_type: bool):
        self.peer = peer
        self.topic = PER_EVENT_TYPE if per_type else unique("events")

    def publisher(self) -> EventPublisher:
        cfg = ServiceBusConfig(enabled=True, connectionstring=self.peer.connection_string(), topic=self.topic,
                               publishtimeoutseconds=20)
        return ServiceBusEventPublisher(cfg)

    def prepare(self, types: list[str]) -> None:
        for topic in types if self.topic == PER_EVENT_TYPE else [self.topic]:
            self.peer.create_topic(topic, ["sub"])

    def published(self, types: list[str]) -> dict[str, list[Received]]:
        cs = self.peer.connection_string()
        if self.topic == PER_EVENT_TYPE:
            async def each() -> list[list[Received]]:
                return await asyncio.gather(*(receive_all(cs, t) for t in types))

            return dict(zip(types, asyncio.run(each())))
        everything = asyncio.run(receive_all(cs, self.topic))
        return {t: [r for r in everything if r.event_type == t] for t in types}


@pytest.fixture(params=["file", "servicebus-topic", "servicebus-per-event-type"])
def case(request, tmp_path: Path):
    if request.param == "file":
        return FileCase(tmp_path / "events")
    return ServiceBusCase(request.getfixturevalue("amqp_peer"), per_type=request.param.endswith("per-event-type"))


def publish(case, *rounds: list[Event]) -> None:
    """Publish each list of events in turn with one publisher, then close it."""

    async def run() -> None:
        publisher = case.publisher()
        try:
            for events in rounds:
                await publisher.publish(events)
        finally:
            await publisher.close()

    asyncio.run(run())


def ids(records: list[Received]) -> list[str]:
    return sorted(r.message_id for r in records)


def test_one_event_is_published_with_its_message_properties(case) -> None:
    event_type = unique("single")
    case.prepare([event_type])
    [event] = make_events(1, [event_type])
    publish(case, [event])
    [record] = case.published([event_type])[event_type]
    assert record.event == event
    assert record.message_id == event.id
    assert record.correlation_id == event.context.correlationId
    assert record.subject == event_type and record.event_type == event_type
    assert record.content_type == "application/json"


def test_many_events_each_reach_the_consumers_of_their_type_once(case) -> None:
    types = [unique("found"), unique("other")]
    case.prepare(types)
    events = make_events(120, types, data_bytes=512)
    publish(case, events)
    got = case.published(types)
    for event_type in types:
        expected = [e for e in events if e.type == event_type]
        assert ids(got[event_type]) == sorted(e.id for e in expected)
        assert {r.message_id: r.event for r in got[event_type]} == {e.id: e for e in expected}


def test_republishing_the_same_events_delivers_each_exactly_once(case) -> None:
    event_type = unique("retry")
    case.prepare([event_type])
    events = make_events(6, [event_type])
    # A retried /done publishes the same events again, possibly after a partial first attempt.
    publish(case, events[:4], events, events)
    assert ids(case.published([event_type])[event_type]) == sorted(e.id for e in events)


def test_publishing_no_events_publishes_nothing(case) -> None:
    event_type = unique("none")
    case.prepare([event_type])
    publish(case, [])
    assert case.published([event_type])[event_type] == []
